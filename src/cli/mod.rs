//! The command line: `keygate [--config PATH] <command>`. Each command group has its file.
//! Errors come back as one clear line; the binary prints it and exits non-zero.

/// `println!` for command output, returning the write error instead of panicking: a reader
/// that stops early (`keygate key list | head -1`) makes it `CliError::OutputClosed`, which
/// ends the command quietly. (Rust ignores SIGPIPE, which `serve`'s sockets need; a one-shot
/// command sees the closed pipe as this error rather than dying of the signal.)
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err($crate::cli::CliError::from)
    }};
}

mod account;
mod gateway;
mod key;
mod serve;
mod user;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::clock::Clock;
use crate::config::{Config, ConfigError, LogFormat};
use crate::manage::{ManageError, Manager};
use crate::server::StartError;
use crate::store::{Store, StoreError};

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "API-key authentication sidecar and reverse proxy"
)]
pub struct Cli {
    /// Configuration file (TOML). Without one, built-in defaults apply.
    #[arg(long, global = true, env = "KEYGATE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format; overrides `log.format`.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and the admin listener.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Service accounts.
    #[command(subcommand)]
    Account(account::AccountCommand),
    /// Service-account API keys.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Console users.
    #[command(subcommand)]
    User(user::UserCommand),
    /// Gateways: pair, unpair, re-pair, list.
    #[command(subcommand)]
    Gateway(gateway::GatewayCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and print a summary, without starting anything.
    Check,
}

/// How a command ends other than in success.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A failure, as the one line the user sees.
    #[error("{0}")]
    Failed(String),
    /// Standard output's reader went away (`| head -1`). Not a failure: the reader had all it
    /// wanted, so the binary exits 0 without a message.
    #[error("standard output was closed")]
    OutputClosed,
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::Failed(format!("invalid configuration: {e}"))
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError::Failed(e.to_string())
    }
}

impl From<ManageError> for CliError {
    fn from(e: ManageError) -> Self {
        CliError::Failed(e.to_string())
    }
}

impl From<StartError> for CliError {
    fn from(e: StartError) -> Self {
        CliError::Failed(e.to_string())
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::OutputClosed
        } else {
            CliError::Failed(e.to_string())
        }
    }
}

/// The log format a command's fatal error is written in (`telemetry::fatal`): the flag, else
/// `KEYGATE_LOG_FORMAT`, else the file's `log.format`, read leniently since the error may be
/// that the file is invalid.
pub fn error_format(config: Option<&std::path::Path>, flag: Option<LogFormatArg>) -> LogFormat {
    if let Some(flag) = flag {
        return flag.into();
    }
    let from_file = || {
        let text = std::fs::read_to_string(config?).ok()?;
        let table: toml::Table = toml::from_str(&text).ok()?;
        Some(table.get("log")?.get("format")?.as_str()?.to_string())
    };
    match std::env::var("KEYGATE_LOG_FORMAT").ok().or_else(from_file) {
        Some(f) if f.trim() == "json" => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> Self {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let mut config = Config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(f) = cli.log_format {
        config.log.format = f.into();
    }
    match cli.command {
        Command::Serve => {
            config.check_files()?;
            crate::telemetry::init(config.log.format, &config.log.filter);
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            for name in &config.ignored_env {
                tracing::debug!(variable = %name, "ignored: a Kubernetes service-link variable, not a setting");
            }
            serve::run(config, cli.config.clone()).await
        }
        Command::Migrate => {
            let store = connect(&config).await?;
            store.migrate().await?;
            outln!(
                "migrations applied ({} at {})",
                store.engine(),
                config.database.url
            )?;
            Ok(())
        }
        Command::Config(ConfigCommand::Check) => {
            config.check_files()?;
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            outln!("configuration is valid")?;
            outln!("  proxy.listen     {}", config.proxy.listen)?;
            outln!("  admin.listen     {}", config.admin.listen)?;
            outln!("  database.url     {}", config.database.url)?;
            outln!("  gateways.scopes  {}", config.gateways.scopes.joined())?;
            outln!("  routes           {}", config.routes.len())?;
            for r in &config.routes {
                let methods = if r.methods.is_empty() {
                    "*".to_string()
                } else {
                    r.methods
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                outln!(
                    "    {:<20} {:<24} {:<12} {:<20} -> {}",
                    r.name,
                    r.path_prefix,
                    methods,
                    r.scope,
                    r.upstream
                )?;
            }
            Ok(())
        }
        Command::Account(cmd) => account::run(cmd, &manager(&config).await?).await,
        Command::Key(cmd) => key::run(cmd, &manager(&config).await?, &config).await,
        Command::User(cmd) => user::run(cmd, &manager(&config).await?).await,
        Command::Gateway(cmd) => gateway::run(cmd, &manager(&config).await?, &config).await,
    }
}

/// Opens the store for a one-shot command, with a message naming the database on failure.
async fn connect(config: &Config) -> Result<Store, CliError> {
    Store::connect(&config.database.url, 2)
        .await
        .map_err(|e| CliError::Failed(format!("cannot open database {}: {e}", config.database.url)))
}

async fn manager(config: &Config) -> Result<Manager, CliError> {
    let store = connect(config).await?;
    store.migrate().await?;
    Ok(Manager::new(store, config.hashing, Clock::System)?)
}

/// Prints rows as left-aligned columns under a header.
fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<(), CliError> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        outln!("{}", s.trim_end())
    };
    line(header.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}
