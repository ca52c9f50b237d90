//! `keygate serve`: run until SIGTERM or SIGINT, then stop gracefully.

use crate::clock::Clock;
use crate::config::Config;
use crate::server;

use super::CliError;

pub async fn run(config: Config) -> Result<(), CliError> {
    if config.routes.is_empty() {
        tracing::warn!("no [[routes]] configured: every request will get 404");
    }
    let (proxy, admin) = server::bind(&config).await?;
    let keygate = server::start(&config, proxy, admin, Clock::System).await?;
    wait_for_signal().await;
    tracing::info!(
        grace_ms = config.proxy.shutdown_grace.as_millis() as u64,
        "stopping: draining in-flight requests"
    );
    keygate.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
