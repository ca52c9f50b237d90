//! Bench-only: keygate's own server, pipeline and upstream client with the authentication step
//! removed, the baseline the load harness measures keygate's auth overhead against.
//! With a certificate and key the listener speaks TLS, as keygate's does with `[proxy.tls]`.
//! Usage: `bench_passthrough LISTEN_ADDR UPSTREAM_URL [CERT_FILE KEY_FILE]` (needs
//! `--features bench-passthrough`).

use std::sync::Arc;

use keygate::clock::Clock;
use keygate::config::Config;
use keygate::keys::{KeyTable, Verifier};
use keygate::metrics::Metrics;
use keygate::proxy::{self, ProxyState};
use keygate::tls::CertStore;
use keygate::usage::Usage;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let upstream = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:3000".into());
    let tls = match (args.next(), args.next()) {
        (Some(cert), Some(key)) => {
            format!("[proxy.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n")
        }
        _ => String::new(),
    };
    let toml = format!(
        "[proxy]\nlisten = \"{listen}\"\n{tls}[log]\naccess_log = false\n\
         [[routes]]\nname = \"bench\"\npath_prefix = \"/\"\nupstream = \"{upstream}\"\nscope = \"bench\"\n"
    );
    let config = Config::from_toml(&toml, "bench", std::iter::empty())?;
    let routes: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
    let mut state = ProxyState::new(
        &config,
        Arc::new(KeyTable::new()),
        Arc::new(Verifier::new(&config.verification)),
        Arc::new(Usage::new()),
        Clock::System,
        Arc::new(Metrics::new(&routes, false)),
    )?;
    if let Some(tls) = &config.proxy.tls {
        keygate::tls::install_provider();
        state = state.with_tls(CertStore::load(tls)?);
    }
    let state = Arc::new(state);
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
