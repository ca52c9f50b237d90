//! The `keygate` binary: parse the command line, run it, report the one-line error if any
//! (a JSON object instead when logs are JSON).

use std::process::ExitCode;

use clap::Parser;
use keygate::cli::CliError;

fn main() -> ExitCode {
    let cli = match keygate::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(e),
    };
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

/// `--help` and `--version` print as clap makes them and exit 0. A usage error is one line,
/// clap's first paragraph (`error: unexpected argument '--foo' found; see --help`), with
/// status 1 like every other error (clap's own is 2, with the usage and a tip on further lines).
fn usage(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            // clap's first paragraph, joined: the problem and what it lists (missing
            // arguments, possible values), without the usage and tips that follow.
            let text = e.render().to_string();
            let problem: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{}; see --help", problem.join(" "));
            ExitCode::FAILURE
        }
    }
}
