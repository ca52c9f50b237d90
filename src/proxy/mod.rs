//! The data plane. A request goes through one pipeline, top to bottom (see `pipeline.rs`):
//!
//! 1. readiness (503 until the key table is loaded, or once it is older than
//!    `database.max_staleness`), framing and path checks (400 for anything ambiguous),
//! 2. route match (404 when none),
//! 3. key extraction and shape check (401 missing/malformed),
//! 4. table lookup, revocation and expiry from the live table (401 unknown/revoked/expired);
//!    a worker serves a key that verified from its own copy while the table is unchanged
//!    (`worker_keys.rs`),
//! 5. secret verification: the cache, or argon2 on the bounded pool (401, or 503 when busy),
//! 6. scope check (403 naming the scope),
//! 7. strip the key, hop-by-hop and spoofed headers; add identity and forwarding headers,
//! 8. forward and stream both ways (502/504 on upstream failure),
//! 9. record the use (and client address) in memory, queue an audit record when the route
//!    audits the method, add `X-Keygate-Key-Expires-At` while the key has an expiry ahead,
//!    and write one access-log line.
//!
//! Nothing on this path waits on the database.

mod body;
mod drain;
mod error;
mod h2_idle;
mod head_timer;
mod headers;
mod paired;
mod path;
mod pipeline;
#[cfg(test)]
mod props;
mod route;
mod upstream;
mod worker_keys;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
#[cfg(feature = "bench-passthrough")]
use futures_util::future::Either;
use futures_util::FutureExt;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use body::{BoxError, IdleTimeout, ProxyBody};
pub use error::{AuthFailure, Rejection};
pub use headers::{extract_key, strip_hop_by_hop, strip_request, CredentialError, KeySource};
pub use path::{canonical_path, PathError};
pub use route::{Route, Router};

use crate::audit::AuditQueue;
use crate::clock::Clock;
use crate::config::{Config, ProxyLimits, RouteConfig};
use crate::keys::{KeyTable, Verifier};
use crate::metrics::Metrics;
use crate::tls::{self, CertStore, TlsError};
use crate::usage::Usage;
use drain::Drain;
use h2_idle::Tracked;
use head_timer::HeadTimer;
use paired::paired;
use pipeline::Conn;
use upstream::{Dedicated, UpstreamClient};
use worker_keys::WorkerKeys;

/// Everything the request path reads.
pub struct ProxyState {
    /// Swapped whole on SIGHUP; a request loads it once without taking a lock.
    pub router: ArcSwap<Router>,
    /// Proxied requests by service accounts, waiting to be audited.
    pub audit: Arc<AuditQueue>,
    pub table: Arc<KeyTable>,
    pub verifier: Arc<Verifier>,
    pub usage: Arc<Usage>,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    /// The routes at start: each worker builds its upstream pools (TLS ones included) from them.
    routes: Vec<RouteConfig>,
    upstream_timeout: Duration,
    /// Proxy worker threads, each with its own runtime and upstream pool.
    workers: usize,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    access_log: bool,
    /// `database.max_staleness` in ms: past this table age requests fail closed with 503.
    max_staleness_ms: Option<i64>,
    limits: ProxyLimits,
    /// TLS on the listener; `None` serves plain HTTP.
    tls: Option<TlsAcceptor>,
}

impl ProxyState {
    /// Checks the upstream TLS settings (CA bundles, client certificates) by building the
    /// pools once, so a bad file fails the start rather than the first request.
    pub fn new(
        config: &Config,
        table: Arc<KeyTable>,
        verifier: Arc<Verifier>,
        usage: Arc<Usage>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsError> {
        UpstreamClient::new(&config.routes, config.proxy.upstream_timeout)?;
        Ok(ProxyState {
            router: ArcSwap::from_pointee(Router::new(&config.routes)),
            audit: Arc::new(AuditQueue::new(crate::audit::DEFAULT_CAPACITY)),
            table,
            verifier,
            usage,
            clock,
            metrics,
            routes: config.routes.clone(),
            upstream_timeout: config.proxy.upstream_timeout,
            workers: config.proxy.workers,
            idle_timeout: config.proxy.idle_timeout,
            header_read_timeout: config.proxy.header_read_timeout,
            access_log: config.log.access_log,
            max_staleness_ms: config.database.max_staleness.map(|d| d.as_millis() as i64),
            limits: config.proxy.limits.clone(),
            tls: None,
        })
    }

    /// Serves TLS with the certificate in `certs` (reloadable while serving).
    pub fn with_tls(mut self, certs: Arc<CertStore>) -> Self {
        self.tls = Some(TlsAcceptor::from(tls::server_config(certs)));
        self
    }

    /// Whether `routes` can replace the running ones without a restart. Each worker builds
    /// the TLS pool of an `https://` route at start, with that route's trust and client
    /// certificate: a route that is `https://` now must have been at start, under the same
    /// name and with the same TLS settings. Names the first route that is not.
    pub fn check_routes(&self, routes: &[RouteConfig]) -> Result<(), String> {
        let https = http::uri::Scheme::HTTPS;
        match routes.iter().find(|route| {
            route.upstream.scheme == https
                && !self.routes.iter().any(|at_start| {
                    at_start.name == route.name
                        && at_start.upstream.scheme == https
                        && at_start.tls == route.tls
                })
        }) {
            Some(route) => Err(format!(
                "route `{}`: its https:// upstream is new or has other TLS settings",
                route.name
            )),
            None => Ok(()),
        }
    }

    /// Replaces the routes (after `check_routes`); requests already routed keep the table
    /// they started with.
    pub fn replace_routes(&self, routes: &[RouteConfig]) {
        // Metric handles were made for the routes at start: keep each route on its own.
        self.router
            .store(Arc::new(Router::new(routes).indexed_by(&self.routes)));
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
    serve_with(listener, state, shutdown, grace, Mode::Authenticate).await
}

/// Bench-only: the same server and forwarding code with the authentication step removed, the
/// baseline keygate's auth overhead is measured against. Never part of a shipped build.
#[cfg(feature = "bench-passthrough")]
pub async fn serve_passthrough(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    serve_with(listener, state, shutdown, grace, Mode::PassThrough).await
}

#[derive(Clone, Copy)]
enum Mode {
    Authenticate,
    #[cfg(feature = "bench-passthrough")]
    PassThrough,
}

/// A client connection on its way to a worker, holding its place under `max_connections`.
type Handoff = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

async fn serve_with(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: CancellationToken,
    grace: Duration,
    mode: Mode,
) {
    // One current-thread runtime per worker, each with its own upstream pools: a request, its
    // upstream connection and their wake-ups stay on one thread (no work stealing, no
    // cross-thread wake-ups). This acceptor hands connections out round-robin, which balances
    // better than SO_REUSEPORT hashing with few long-lived client connections.
    let mut workers = Vec::with_capacity(state.workers);
    let mut finished = Vec::with_capacity(state.workers);
    for i in 0..state.workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (state, shutdown) = (state.clone(), shutdown.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("keygate-proxy-{i}"))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker(rx, state, shutdown, grace, mode)),
                    Err(e) => tracing::error!(error = %e, "cannot start a proxy worker runtime"),
                }
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => {
                workers.push(tx);
                finished.push(done_rx);
            }
            Err(e) => tracing::error!(error = %e, "cannot start a proxy worker thread"),
        }
    }
    if workers.is_empty() {
        tracing::error!("no proxy worker could start; the proxy is not serving");
        shutdown.cancelled().await;
        return;
    }

    let connections = Arc::new(Semaphore::new(state.limits.max_connections));
    let mut next = 0usize;
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
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        // A worker only goes away at shutdown; if it did, the connection is simply closed.
        let _ = workers[next % workers.len()].send((stream, peer, permit));
        next = next.wrapping_add(1);
    }
    drop(listener);
    drop(workers);
    for done in finished {
        let _ = done.await;
    }
}

/// One proxy worker: serves the connections handed to it on its own runtime until shutdown,
/// then lets in-flight requests finish for up to `grace`.
async fn worker(
    mut connections: tokio::sync::mpsc::UnboundedReceiver<Handoff>,
    state: Arc<ProxyState>,
    shutdown: CancellationToken,
    grace: Duration,
    mode: Mode,
) {
    let client = match UpstreamClient::new(&state.routes, state.upstream_timeout) {
        Ok(client) => client,
        Err(e) => {
            // `ProxyState::new` built the same pools already; only a file changed since fails.
            tracing::error!(error = %e, "a proxy worker cannot build its upstream pools");
            return;
        }
    };
    let limits = &state.limits;
    let head_timer = HeadTimer::new(state.header_read_timeout);
    let mut h1 = http1::Builder::new();
    h1.timer(head_timer.clone())
        // A response's head and a small body go out in one buffer and one `write`, not a
        // `writev` of two: hyper copies the body into its head buffer (up to `max_buf_size`,
        // then it writes). Fewer instructions per response (−480 on a 401, −440 on a
        // forwarded request, callgrind) and no loss on a 256 MiB download.
        .writev(false)
        // hyper starts this timer whenever it waits for a request head, so it also bounds an
        // idle keep-alive connection.
        .header_read_timeout(state.header_read_timeout)
        .max_headers(limits.max_headers)
        // hyper answers 431 once the head outgrows its read buffer. hyper panics below 8192
        // bytes, the least `proxy.max_header_bytes` the configuration accepts; the `max` only
        // guards limits built in code.
        .max_buf_size(limits.max_header_bytes.max(8192));
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams);
    let servers = Arc::new(Servers { h1, h2 });
    tokio::spawn(head_timer.sweep());
    tokio::spawn(client.parked().sweep());
    // What a request clones: this worker's own handle, so the reference count it bumps is
    // never shared with another thread (the shared state's would bounce between cores).
    let local = Arc::new(Worker {
        router: Mutex::new(Worker::copy_router(&state)),
        state: state.clone(),
        client,
        drain: Drain::default(),
        keys: WorkerKeys::default(),
    });

    loop {
        let (stream, peer, permit) = tokio::select! {
            next = connections.recv() => match next {
                Some(conn) => conn,
                None => break,
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
            continue;
        };
        tokio::spawn(serve_client(
            servers.clone(),
            stream,
            local.clone(),
            peer,
            permit,
            mode,
        ));
    }
    if tokio::time::timeout(grace, local.drain.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace elapsed; closing remaining connections"
        );
    }
}

/// One proxy worker's view: the shared state, its own upstream pools, and its own copy of
/// the routes.
pub(crate) struct Worker {
    state: Arc<ProxyState>,
    client: UpstreamClient,
    /// The shared router this copy was made from (held, so its address cannot be reused by a
    /// later one) and the copy. Requests hold the copy, whose reference count only this
    /// worker's thread touches.
    router: Mutex<(Arc<Router>, Arc<Router>)>,
    /// This worker's connections, for a graceful shutdown.
    drain: Drain,
    /// This worker's copies of the keys its requests use.
    keys: WorkerKeys,
}

impl Worker {
    fn copy_router(state: &ProxyState) -> (Arc<Router>, Arc<Router>) {
        let shared = state.router.load_full();
        let copy = Arc::new(shared.detached());
        (shared, copy)
    }

    /// The current routes: this worker's copy, remade after a reload swapped them.
    pub(crate) fn router(&self) -> Arc<Router> {
        let current = self.state.router.load();
        let mut copy = self.router.lock().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&copy.0, &current) {
            *copy = Worker::copy_router(&self.state);
        }
        copy.1.clone()
    }
}

/// One client connection's task, holding its place under `max_connections`.
///
/// A task holds room for the state of every path its connection could take, for as long as
/// the connection lasts. The TLS path (handshake, TLS stream) is boxed, so a cleartext
/// connection's task does not carry it: 2,864 bytes a connection instead of 10,400 (with
/// `serve_connection`'s HTTP/2 path boxed too and its HTTP/1 connection built in place).
async fn serve_client(
    servers: Arc<Servers>,
    stream: tokio::net::TcpStream,
    local: Arc<Worker>,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    mode: Mode,
) {
    let _permit = permit;
    match local.state.tls.clone() {
        None => serve_cleartext(&servers, stream, local, peer, mode).await,
        Some(acceptor) => Box::pin(serve_tls(&servers, acceptor, stream, local, peer, mode)).await,
    }
}

/// A cleartext client: HTTP/2 when it opens with the preface, HTTP/1 otherwise. A client that
/// sends nothing within the header read timeout is closed.
async fn serve_cleartext(
    servers: &Servers,
    stream: tokio::net::TcpStream,
    local: Arc<Worker>,
    peer: SocketAddr,
    mode: Mode,
) {
    let limit = local.state.header_read_timeout;
    match tokio::time::timeout(limit, sniff(&stream)).await {
        Ok(Ok(Some(protocol))) => {
            serve_connection(servers, protocol, stream, local, peer, false, mode).await
        }
        Ok(Ok(None) | Err(_)) => {}
        Err(_) => tracing::debug!(
            peer = %peer,
            timeout_ms = limit.as_millis() as u64,
            "no request within the header read timeout"
        ),
    }
}

/// A TLS client: the handshake (bounded by its own timeout), then HTTP/2 or HTTP/1 by ALPN
/// alone (RFC 9113 §3.3).
async fn serve_tls(
    servers: &Servers,
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    local: Arc<Worker>,
    peer: SocketAddr,
    mode: Mode,
) {
    let handshake = local.state.limits.tls_handshake_timeout;
    match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let protocol = match tls.get_ref().1.alpn_protocol() {
                Some(b"h2") => Protocol::Http2,
                _ => Protocol::Http1,
            };
            serve_connection(servers, protocol, tls, local, peer, true, mode).await
        }
        Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(
            peer = %peer,
            timeout_ms = handshake.as_millis() as u64,
            "TLS handshake timed out"
        ),
    }
}

/// One worker's HTTP/1 and HTTP/2 servers, configured once.
struct Servers {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// The protocol a client connection speaks.
#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
}

/// HTTP/2's connection preface (RFC 9113 §3.4), which a cleartext client with prior knowledge
/// sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which protocol a cleartext client speaks, from the first bytes it sent, read without
/// consuming them; `None` when it closed first.
///
/// hyper-util's `auto` server reads those bytes and hands them to hyper through a wrapper that
/// every later read of the connection goes through; and because hyper's first read then gets
/// only those bytes, its read buffer grows to 16 KiB per connection instead of 8 KiB. Peeking
/// leaves them in the socket for hyper's own first read.
async fn sniff(stream: &tokio::net::TcpStream) -> std::io::Result<Option<Protocol>> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Ok(None);
        }
        if first[..n] != H2_PREFACE[..n] {
            return Ok(Some(Protocol::Http1));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(Protocol::Http2));
        }
        // Part of the preface so far (a client that split it): wait for the rest. A peek is
        // ready again at once while unread bytes wait, so this polls, bounded by the caller's
        // timeout; whole prefaces come in one segment.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Serves one client connection. Its own upstream connection (HTTP/1 clients) is driven by
/// this same task, and parked for the worker's next client connection when this one ends.
async fn serve_connection<I>(
    servers: &Servers,
    protocol: Protocol,
    io: I,
    local: Arc<Worker>,
    peer: SocketAddr,
    tls: bool,
    mode: Mode,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let own = Arc::new(Dedicated::default());
    let service_own = own.clone();
    let worker = local.clone();
    let peer_ip = headers::client_ip_value(peer.ip());
    // The service returns the pipeline's future itself, not a block awaiting it: hyper moves
    // each request's future into place, so every byte of it is copied once per request.
    let respond = move |req| {
        let conn = Conn {
            router: local.router(),
            worker: local.clone(),
            own: service_own.clone(),
            peer,
            peer_ip: peer_ip.clone(),
            tls,
        };
        #[cfg(not(feature = "bench-passthrough"))]
        let Mode::Authenticate = mode;
        #[cfg(not(feature = "bench-passthrough"))]
        let response = pipeline::handle(conn, req);
        #[cfg(feature = "bench-passthrough")]
        let response = match mode {
            Mode::Authenticate => Either::Left(pipeline::handle(conn, req)),
            Mode::PassThrough => Either::Right(pipeline::passthrough(conn, req)),
        };
        response
    };
    let io = TokioIo::new(io);
    let served = match protocol {
        // Built where it is awaited: a connection bound to a name, then moved into `paired`,
        // would be stored in this future twice (2,368 bytes more).
        Protocol::Http1 => {
            let served = paired(
                {
                    let service = service_fn(move |req| respond(req).map(Ok::<_, Infallible>));
                    worker.drain.watch(servers.h1.serve_connection(io, service))
                },
                own.drive(),
            )
            .await;
            // Its upstream connection, if idle, serves this worker's next client connection.
            worker.client.park(&own);
            served
        }
        // Boxed, so an HTTP/1 connection's task does not carry room for it.
        Protocol::Http2 => {
            Box::pin(async move {
                let streams = Arc::new(h2_idle::Streams::default());
                let counted = streams.clone();
                let service = service_fn(move |req| {
                    let open = counted.open();
                    respond(req).map(move |response| {
                        Ok::<_, Infallible>(response.map(|b| Tracked::new(b, open)))
                    })
                });
                let limit = worker.state.header_read_timeout;
                let conn = worker.drain.watch_until(
                    servers.h2.serve_connection(io, service),
                    streams.idle(limit),
                );
                // Told to go away when idle; dropped if still idle a period later.
                let dropped = async {
                    streams.idle(limit).await;
                    streams.idle(limit).await;
                    tracing::debug!(peer = %peer, "idle HTTP/2 connection closed");
                };
                tokio::select! {
                    served = paired(conn, own.drive()) => served,
                    () = dropped => Ok(()),
                }
            })
            .await
        }
    };
    if let Err(e) = served {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}

/// The address a listener is bound to (for logs and tests).
pub fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, E, F, Fut>(_: &impl FnOnce(A, B, C, D, E, F) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn a_connection_task_carries_no_room_for_paths_it_does_not_take() {
        // Every open connection holds one for its whole life (10,400 bytes in a release
        // build when it had room for the TLS and HTTP/2 paths and the HTTP/1 connection twice;
        // 2,864 now).
        let size = future_size(&serve_client);
        assert!(size <= 4096, "a connection's task takes {size} bytes");
    }
}
