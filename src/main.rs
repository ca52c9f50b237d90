//! The `keygate` binary: parse the command line, run it, report the one-line error if any
//! (a JSON object instead when logs are JSON).

use std::process::ExitCode;

use clap::Parser;
use keygate::cli::CliError;

fn main() -> ExitCode {
    let cli = keygate::cli::Cli::parse();
    let (config, log_format) = (cli.config.clone(), cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"));
    let result = runtime.and_then(|rt| match rt.block_on(keygate::cli::run(cli)) {
        Ok(()) | Err(CliError::OutputClosed) => Ok(()),
        Err(e) => Err(anyhow::Error::from(e)),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let format = keygate::cli::error_format(config.as_deref(), log_format);
            keygate::telemetry::fatal(format, &format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
