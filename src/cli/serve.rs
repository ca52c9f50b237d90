//! `keygate serve`: run until SIGTERM or SIGINT, then stop gracefully; SIGHUP re-reads the
//! configuration file and applies what can change live (a bad file is refused, the running
//! configuration stays).

use std::path::PathBuf;

use crate::clock::Clock;
use crate::config::Config;
use crate::server;

use super::CliError;

pub async fn run(config: Config, path: Option<PathBuf>) -> Result<(), CliError> {
    if config.routes.is_empty() {
        tracing::warn!("no [[routes]] configured: every request will get 404");
    }
    let (proxy, admin) = server::bind(&config).await?;
    let keygate = server::start(&config, proxy, admin, Clock::System).await?;
    let mut signals = Signals::new()?;
    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => match path.as_deref() {
                // Reloading "no file" would mean the defaults: no routes at all.
                None => tracing::warn!(
                    "SIGHUP ignored: keygate was started without a configuration file"
                ),
                Some(path) => {
                    if let Err(e) = keygate.reload_file(Some(path)) {
                        tracing::error!("{e}; the running configuration stays in force");
                    }
                }
            },
        }
    }
    tracing::info!(
        grace_ms = config.proxy.shutdown_grace.as_millis() as u64,
        delay_ms = config.proxy.shutdown_delay.as_millis() as u64,
        "stopping: draining in-flight requests"
    );
    keygate.shutdown().await;
    Ok(())
}

enum Signal {
    Stop,
    Reload,
}

/// SIGTERM and SIGINT stop; SIGHUP reloads.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, CliError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let install = |kind: SignalKind, name: &str| {
                signal(kind).map_err(|e| CliError::Failed(format!("cannot handle {name}: {e}")))
            };
            Ok(Signals {
                term: install(SignalKind::terminate(), "SIGTERM")?,
                hangup: install(SignalKind::hangup(), "SIGHUP")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => Signal::Stop,
                _ = tokio::signal::ctrl_c() => Signal::Stop,
                _ = self.hangup.recv() => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }
}
