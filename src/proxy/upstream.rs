//! The upstream side. An HTTP/1 client connection gets upstream connections of its own,
//! driven inside that client connection's task: no pool checkout per request and no wake-ups
//! crossing tasks or threads, which is most of what a proxy's own overhead is made of.
//! HTTP/2 client connections (many requests at once) and `https://` routes share per-worker
//! pools (hyper-util's client; over rustls for `https://`, one pool per such route with its own
//! trust and client certificate). Either way the response head has a deadline and failures map
//! to 502/504.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::body::{ClientBodyError, DataOnly, IdleTimeout};
use super::error::Rejection;
use super::route::Route;
use crate::config::RouteConfig;
use crate::metrics::UpstreamFailure;
use crate::tls::{self, TlsError};

/// What keygate sends upstream: the client's body without trailers, streamed under the idle
/// timeout.
pub type OutboundBody = IdleTimeout<DataOnly<Incoming>>;

type HttpsClient = Client<HttpsConnector<HttpConnector>, OutboundBody>;

/// Why a request could not be sent upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// The upstream could not be reached, broke, or was too slow.
    Upstream(UpstreamFailure),
    /// The client's own body failed while it was being forwarded (400, not the upstream's fault).
    ClientBody,
}

type UpstreamConnection = http1::Connection<TokioIo<TcpStream>, OutboundBody>;

/// The per-worker upstream client.
pub struct UpstreamClient {
    pool: Client<HttpConnector, OutboundBody>,
    /// One pool per `https://` route, by route name (few routes: a scan beats a hash).
    https: Vec<(String, HttpsClient)>,
    response_timeout: Duration,
}

impl UpstreamClient {
    /// Builds the pools; an unreadable CA bundle or client certificate is an error.
    pub fn new(
        routes: &[RouteConfig],
        response_timeout: Duration,
    ) -> Result<UpstreamClient, TlsError> {
        let pool = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(http_connector(response_timeout));
        let mut https = Vec::new();
        for route in routes.iter().filter(|r| r.upstream.scheme == Scheme::HTTPS) {
            let mut http = http_connector(response_timeout);
            http.enforce_http(false);
            let connector = HttpsConnectorBuilder::new()
                .with_tls_config(tls::client_config(&route.tls)?)
                .https_only()
                .enable_http1()
                .wrap_connector(http);
            let client = Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector);
            https.push((route.name.clone(), client));
        }
        Ok(UpstreamClient {
            pool,
            https,
            response_timeout,
        })
    }

    /// Sends `req` to `route`'s upstream through a shared pool and waits for the response head.
    pub async fn send_pooled(
        &self,
        route: &Route,
        req: Request<OutboundBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let sent = if route.upstream.scheme == Scheme::HTTPS {
            match self.https.iter().find(|(name, _)| *name == route.name) {
                Some((_, client)) => client.request(req),
                // Pools are built for the https routes known at start; a route added by a reload
                // needs a restart. Never fall back to clear text.
                None => {
                    tracing::warn!(route = %route.name, "no TLS pool for this https route; restart keygate to add one");
                    return Err(SendError::Upstream(UpstreamFailure::Connect));
                }
            }
        } else {
            self.pool.request(req)
        };
        match tokio::time::timeout(self.response_timeout, sent).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) if caused_by_client_body(&e) => {
                tracing::info!(error = %error_chain(&e), "client request body failed while forwarding");
                Err(SendError::ClientBody)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), connect = e.is_connect(), "upstream request failed");
                Err(SendError::Upstream(if e.is_connect() {
                    UpstreamFailure::Connect
                } else {
                    UpstreamFailure::Request
                }))
            }
            Err(_) => Err(SendError::Upstream(self.timed_out())),
        }
    }

    /// Sends `req` (in origin form) to `authority` on `own`'s upstream connection (opening one
    /// when there is none, or when it was closed before the request could be written) and
    /// waits for the response head.
    ///
    /// Written as a function returning an `async move` block, not as an `async fn`: an
    /// `async fn` keeps its arguments and the locals they move into side by side in its state,
    /// and every request's future (which hyper moves into place once per request) would carry
    /// the request twice.
    #[allow(clippy::manual_async_fn)] // see the note above: not an `async fn` on purpose
    pub fn send_dedicated<'a>(
        &'a self,
        own: &'a Dedicated,
        authority: &'a Authority,
        mut req: Request<OutboundBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, SendError>> + Send + 'a {
        async move {
            let mut reused = own.take_sender(authority);
            for _ in 0..2 {
                let mut sender = match reused.take() {
                    Some(s) => s,
                    // Boxed: connecting is rare, and its future would otherwise enlarge every
                    // request's.
                    None => Box::pin(self.connect(own, authority))
                        .await
                        .map_err(SendError::Upstream)?,
                };
                if !sender.is_ready() && sender.ready().await.is_err() {
                    // Closed while idle (the upstream's keep-alive ended): open a fresh one.
                    continue;
                }
                match own
                    .within(self.response_timeout, sender.try_send_request(req))
                    .await
                {
                    Ok(Ok(response)) => {
                        own.put_sender(authority, sender);
                        return Ok(response);
                    }
                    Ok(Err(mut e)) => match e.take_message() {
                        // Never written: safe to send again on a new connection.
                        Some(unsent) => req = unsent,
                        None if caused_by_client_body(e.error()) => {
                            tracing::info!(error = %error_chain(e.error()), "client request body failed while forwarding");
                            own.close();
                            return Err(SendError::ClientBody);
                        }
                        None => {
                            tracing::warn!(error = %error_chain(e.error()), "upstream request failed");
                            return Err(SendError::Upstream(UpstreamFailure::Request));
                        }
                    },
                    Err(TimedOut) => {
                        // The connection still carries the abandoned request: never reuse it.
                        own.close();
                        return Err(SendError::Upstream(self.timed_out()));
                    }
                }
            }
            tracing::warn!(upstream = %authority, "upstream closed two connections before a request could be sent");
            Err(SendError::Upstream(UpstreamFailure::Request))
        }
    }

    async fn connect(
        &self,
        own: &Dedicated,
        authority: &Authority,
    ) -> Result<http1::SendRequest<OutboundBody>, UpstreamFailure> {
        let address = match authority.port_u16() {
            Some(_) => authority.as_str().to_string(),
            None => format!("{}:80", authority.host()),
        };
        let stream =
            match tokio::time::timeout(self.response_timeout, TcpStream::connect(&address)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::warn!(upstream = %address, error = %e, "cannot connect to upstream");
                    return Err(UpstreamFailure::Connect);
                }
                Err(_) => return Err(self.timed_out()),
            };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                tracing::warn!(upstream = %address, error = %e, "upstream handshake failed");
                UpstreamFailure::Connect
            })?;
        own.install(authority.clone(), connection);
        Ok(sender)
    }

    fn timed_out(&self) -> UpstreamFailure {
        tracing::warn!(
            timeout_ms = self.response_timeout.as_millis() as u64,
            "upstream did not answer in time"
        );
        UpstreamFailure::Timeout
    }
}

/// The upstream connection owned by one HTTP/1 client connection. `drive` must be polled by
/// the same task that serves the client connection (`paired` with the server connection);
/// requests on that connection are sequential, so one upstream connection suffices.
#[derive(Default)]
pub struct Dedicated {
    inner: Mutex<DedicatedInner>,
}

#[derive(Default)]
struct DedicatedInner {
    authority: Option<Authority>,
    sender: Option<http1::SendRequest<OutboundBody>>,
    connection: Option<Pin<Box<UpstreamConnection>>>,
    waker: Option<Waker>,
    /// The response deadline's timer, made once and re-armed for each request.
    deadline: Option<Pin<Box<Sleep>>>,
}

/// A response head did not arrive within the upstream timeout.
struct TimedOut;

pin_project! {
    /// `Dedicated::within`'s future: `fut`'s output, or `TimedOut` once the connection's
    /// deadline passes.
    struct Within<'a, F> {
        own: &'a Dedicated,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match this
            .own
            .lock()
            .deadline
            .as_mut()
            .map(|s| s.as_mut().poll(cx))
        {
            Some(Poll::Ready(())) => Poll::Ready(Err(TimedOut)),
            _ => Poll::Pending,
        }
    }
}

impl Dedicated {
    /// Runs `fut` for at most `limit`, on this connection's own timer. A fresh timer per
    /// request would be inserted into and removed from the runtime's timer wheel each time;
    /// moving an armed timer's deadline later only stores the new deadline, and the wheel
    /// re-files the timer if its old deadline comes first.
    fn within<F: Future>(&self, limit: Duration, fut: F) -> Within<'_, F> {
        let at = tokio::time::Instant::now() + limit;
        let mut inner = self.lock();
        match inner.deadline.as_mut() {
            Some(sleep) => sleep.as_mut().reset(at),
            None => inner.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        Within { own: self, fut }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DedicatedInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drives the upstream connection, if any. Never completes: the client connection's end
    /// drops it, and with it the upstream connection.
    pub fn drive(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let mut inner = self.lock();
            if !inner
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                inner.waker = Some(cx.waker().clone());
            }
            if let Some(connection) = inner.connection.as_mut() {
                if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "upstream connection ended with an error");
                    }
                    inner.connection = None;
                    inner.sender = None;
                    inner.authority = None;
                }
            }
            Poll::Pending
        })
    }

    fn take_sender(&self, authority: &Authority) -> Option<http1::SendRequest<OutboundBody>> {
        let mut inner = self.lock();
        // The same route's authority, spelled the same: a byte compare, not `Authority`'s
        // case-insensitive one.
        if same_origin(inner.authority.as_ref(), authority) {
            inner.sender.take().filter(|s| !s.is_closed())
        } else {
            None
        }
    }

    fn put_sender(&self, authority: &Authority, sender: http1::SendRequest<OutboundBody>) {
        let mut inner = self.lock();
        if same_origin(inner.authority.as_ref(), authority) && inner.connection.is_some() {
            inner.sender = Some(sender);
        }
    }

    /// Replaces the upstream connection (a client connection talks to one upstream at a time;
    /// switching routes to another origin closes the old one).
    fn install(&self, authority: Authority, connection: UpstreamConnection) {
        let mut inner = self.lock();
        inner.authority = Some(authority);
        inner.sender = None;
        inner.connection = Some(Box::pin(connection));
        if let Some(w) = inner.waker.as_ref() {
            w.wake_by_ref();
        }
    }

    fn close(&self) {
        let mut inner = self.lock();
        inner.connection = None;
        inner.sender = None;
        inner.authority = None;
    }
}

fn same_origin(current: Option<&Authority>, wanted: &Authority) -> bool {
    current.is_some_and(|c| c.as_str() == wanted.as_str())
}

/// 502 when the upstream could not be reached or broke, 504 when it was too slow.
pub fn rejection(failure: UpstreamFailure) -> Rejection {
    match failure {
        UpstreamFailure::Connect | UpstreamFailure::Request => Rejection::BadGateway,
        UpstreamFailure::Timeout => Rejection::GatewayTimeout,
    }
}

fn http_connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector
}

fn caused_by_client_body(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<ClientBodyError>() {
            return true;
        }
        current = err.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
