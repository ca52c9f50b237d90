//! Logging setup: human-readable or JSON lines on stderr (stdout stays clean for command
//! output such as `key create --json`), filtered by `RUST_LOG` or `log.filter`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber once; later calls are no-ops (tests start many instances).
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    // Colour only for a person at a terminal: journald and log shippers get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Writes a command's fatal error as its last line on stderr: `error: ...` with text logs, and
/// with JSON logs one object shaped like every other log line (`timestamp`, `level` "ERROR",
/// `message`, `target`) so `keygate ... 2>&1 | jq` keeps parsing to the end. The line goes
/// through a subscriber of its own, without the log filter: a fatal error is never filtered out.
pub fn fatal(format: LogFormat, message: &str) {
    match format {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json => {
            // The same line shape as `init`'s JSON.
            let subscriber = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_ansi(false)
                .with_writer(std::io::stderr)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::error!(target: "keygate", "{message}");
            });
        }
    }
}
