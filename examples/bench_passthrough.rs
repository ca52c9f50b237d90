//! Bench-only: keygate's own server, pipeline and upstream client with the authentication step
//! removed, the baseline the load harness measures keygate's auth overhead against.
//! Usage: `bench_passthrough LISTEN_ADDR UPSTREAM_URL` (needs `--features bench-passthrough`).

use std::sync::Arc;

use keygate::clock::Clock;
use keygate::config::Config;
use keygate::keys::{KeyTable, Verifier};
use keygate::metrics::Metrics;
use keygate::proxy::{self, ProxyState};
use keygate::usage::Usage;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let upstream = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:3000".into());
    let toml = format!(
        "[proxy]\nlisten = \"{listen}\"\n[log]\naccess_log = false\n\
         [[routes]]\nname = \"bench\"\npath_prefix = \"/\"\nupstream = \"{upstream}\"\nscope = \"bench\"\n"
    );
    let config = Config::from_toml(&toml, "bench", std::iter::empty())?;
    let routes: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
    let state = Arc::new(ProxyState::new(
        &config,
        Arc::new(KeyTable::new()),
        Arc::new(Verifier::new(&config.verification)),
        Arc::new(Usage::new()),
        Clock::System,
        Arc::new(Metrics::new(&routes, false)),
    )?);
    let listener = tokio::net::TcpListener::bind(config.proxy.listen).await?;
    proxy::serve_passthrough(
        listener,
        state,
        CancellationToken::new(),
        config.proxy.shutdown_grace,
    )
    .await;
    Ok(())
}
