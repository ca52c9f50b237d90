//! The data plane. A request goes through one pipeline, top to bottom (see `pipeline.rs`):
//!
//! 1. framing and path checks (400 for anything ambiguous),
//! 2. route match (404 when none),
//! 3. key extraction and shape check (401 missing/malformed),
//! 4. table lookup, revocation and expiry from the live table (401 unknown/revoked/expired),
//! 5. secret verification: the cache, or argon2 on the bounded pool (401, or 503 when busy),
//! 6. scope check (403 naming the scope),
//! 7. strip the key, hop-by-hop and spoofed headers; add identity and forwarding headers,
//! 8. forward and stream both ways (502/504 on upstream failure),
//! 9. record the use in memory and write one access-log line.
//!
//! Nothing on this path waits on the database.

mod body;
mod error;
mod headers;
mod path;
mod pipeline;
#[cfg(test)]
mod props;
mod route;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use body::{BoxError, IdleTimeout, ProxyBody};
pub use error::{AuthFailure, Rejection};
pub use headers::{extract_key, strip_hop_by_hop, strip_request, CredentialError, KeySource};
pub use path::{canonical_path, PathError};
pub use route::{Route, Router};

use crate::clock::Clock;
use crate::config::{Config, ProxyLimits};
use crate::keys::{KeyTable, Verifier};
use crate::tls::{self, CertStore, TlsError};
use crate::usage::Usage;
use upstream::UpstreamClient;

/// Everything the request path reads.
pub struct ProxyState {
    pub router: Router,
    pub table: Arc<KeyTable>,
    pub verifier: Arc<Verifier>,
    pub usage: Arc<Usage>,
    pub clock: Clock,
    client: UpstreamClient,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    access_log: bool,
    limits: ProxyLimits,
    /// TLS on the listener; `None` serves plain HTTP.
    tls: Option<TlsAcceptor>,
}

impl ProxyState {
    pub fn new(
        config: &Config,
        table: Arc<KeyTable>,
        verifier: Arc<Verifier>,
        usage: Arc<Usage>,
        clock: Clock,
    ) -> Result<Self, TlsError> {
        Ok(ProxyState {
            router: Router::new(&config.routes),
            table,
            verifier,
            usage,
            clock,
            client: UpstreamClient::new(&config.routes, config.proxy.upstream_timeout)?,
            idle_timeout: config.proxy.idle_timeout,
            header_read_timeout: config.proxy.header_read_timeout,
            access_log: config.log.access_log,
            limits: config.proxy.limits.clone(),
            tls: None,
        })
    }

    /// Serves TLS with the certificate in `certs` (reloadable while serving).
    pub fn with_tls(mut self, certs: Arc<CertStore>) -> Self {
        self.tls = Some(TlsAcceptor::from(tls::server_config(certs)));
        self
    }
}

/// Serves the proxy on `listener` until `shutdown`, then stops accepting and lets in-flight
/// requests finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let limits = &state.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper starts this timer whenever it waits for a request head, so it also bounds an
        // idle keep-alive connection.
        .header_read_timeout(state.header_read_timeout)
        .max_headers(limits.max_headers)
        // hyper answers 431 once the head outgrows its read buffer.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));

    loop {
        // At the connection cap, stop accepting: new clients wait in the kernel's backlog.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            match state.tls.clone() {
                None => serve_connection(&builder, stream, state, peer, false, watcher).await,
                Some(acceptor) => {
                    let handshake = state.limits.tls_handshake_timeout;
                    match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            serve_connection(&builder, tls, state, peer, true, watcher).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(
                            peer = %peer,
                            timeout_ms = handshake.as_millis() as u64,
                            "TLS handshake timed out"
                        ),
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace elapsed; closing remaining connections"
        );
    }
}

async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    state: Arc<ProxyState>,
    peer: SocketAddr,
    tls: bool,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(pipeline::handle(&state, peer, tls, req).await) }
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}

/// The address a listener is bound to (for logs and tests).
pub fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
