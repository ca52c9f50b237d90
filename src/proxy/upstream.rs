//! The upstream side. An HTTP/1 client connection gets upstream connections of its own,
//! driven inside that client connection's task: no pool checkout per request and no wake-ups
//! crossing tasks or threads, which is most of what a proxy's own overhead is made of.
//! HTTP/2 client connections (many requests at once) and `https://` routes share per-worker
//! pools (hyper-util's client; over rustls for `https://`, one pool per such route with its own
//! trust and client certificate). Either way the response head has a deadline and failures map
//! to 502/504.
//!
//! When a client connection ends with its upstream connection idle, the connection is parked
//! for the worker's next client connection (`Parked`): a client that opens a connection per
//! request then costs one TCP handshake per request, not two.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, TrySendError};
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

/// The upstream's response head, or why there is none.
pub type Answer = Result<Response<Incoming>, SendError>;

/// hyper's answer to a request queued on a connection: it gives back a request it never wrote.
pub type QueuedAnswer = Result<Response<Incoming>, TrySendError<Request<OutboundBody>>>;

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
    /// Idle upstream connections left by ended client connections, for the next ones.
    parked: Arc<Parked>,
}

impl UpstreamClient {
    /// Builds the pools; an unreadable CA bundle or client certificate is an error.
    pub fn new(
        routes: &[RouteConfig],
        response_timeout: Duration,
    ) -> Result<UpstreamClient, TlsError> {
        // One `write` per request, as on the dedicated connections (see `connect`).
        let pool = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http1_writev(false)
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
                .http1_writev(false)
                .build(connector);
            https.push((route.name.clone(), client));
        }
        Ok(UpstreamClient {
            pool,
            https,
            response_timeout,
            parked: Arc::default(),
        })
    }

    /// This worker's parked upstream connections (for `Parked::sweep`).
    pub fn parked(&self) -> Arc<Parked> {
        self.parked.clone()
    }

    /// Called when a client connection has ended: parks its upstream connection if that is
    /// still open and idle, its last exchange complete.
    pub fn park(&self, own: &Dedicated) {
        if let Some(idle) = own.take_idle() {
            self.parked.park(idle, tokio::time::Instant::now());
        }
    }

    /// Step 8's first half, without waiting: hands `req` to hyper. A request for the client
    /// connection's own upstream connection is queued on it when that connection is open and
    /// ready (nearly always after the first request, and for a first request when the worker
    /// has a parked connection to the upstream, which becomes the own one); otherwise the
    /// opening, or the wait, goes into a boxed future. The result borrows nothing, so the
    /// request's future can own it beside the connection it is polled with, and the request
    /// is held once, inside hyper's send, rather than once per layer of futures.
    ///
    /// `decided_at` is when the request was authorised, a moment ago: the response deadline
    /// counts from it, which spares a clock read.
    pub fn send(
        &self,
        own: &Arc<Dedicated>,
        route: &Route,
        dedicated: bool,
        req: Request<OutboundBody>,
        decided_at: std::time::Instant,
    ) -> Sending<
        impl Future<Output = QueuedAnswer> + Send + 'static,
        impl Future<Output = Answer> + Send + 'static,
    > {
        if !dedicated {
            return Sending::Pooled {
                fut: self.send_pooled(route, req),
            };
        }
        let authority = &route.upstream.authority;
        // A new client connection's first request: an upstream connection a finished one left.
        let sender = own.take_sender(authority).or_else(|| {
            let idle = self.parked.take(authority, tokio::time::Instant::now())?;
            own.install_boxed(idle.authority, idle.connection);
            Some(idle.sender)
        });
        match sender {
            Some(mut sender) if sender.is_ready() => {
                own.arm_from(decided_at.into(), self.response_timeout);
                let fut = sender.try_send_request(req);
                Sending::Queued {
                    sender: Some(sender),
                    fut,
                }
            }
            reused => Sending::Later {
                fut: Box::pin(send_dedicated(
                    self.response_timeout,
                    own.clone(),
                    authority.clone(),
                    reused,
                    req,
                    2,
                )),
            },
        }
    }

    /// Sends `req` to `route`'s upstream through a shared pool, under the response timeout.
    fn send_pooled(
        &self,
        route: &Route,
        req: Request<OutboundBody>,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let sent = if route.upstream.scheme == Scheme::HTTPS {
            match self.https.iter().find(|(name, _)| *name == route.name) {
                Some((_, client)) => Some(client.request(req)),
                // Pools are built for the https routes known at start, and a reload that adds
                // one is refused (`ProxyState::check_routes`). Never fall back to clear text.
                None => {
                    tracing::warn!(route = %route.name, "no TLS pool for this https route; restart keygate to add one");
                    None
                }
            }
        } else {
            Some(self.pool.request(req))
        };
        let limit = self.response_timeout;
        async move {
            let Some(sent) = sent else {
                return Err(SendError::Upstream(UpstreamFailure::Connect));
            };
            match tokio::time::timeout(limit, sent).await {
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
                Err(_) => Err(SendError::Upstream(timed_out(limit))),
            }
        }
    }
}

type BoxedSend = Pin<Box<dyn Future<Output = Answer> + Send>>;

pin_project! {
    /// A request handed to the upstream side by `UpstreamClient::send`; `poll_response` yields
    /// its response head.
    #[project = SendingProj]
    pub enum Sending<Q, P> {
        /// Queued on the client connection's own upstream connection, whose sender goes back
        /// once the response head is in.
        Queued {
            sender: Option<http1::SendRequest<OutboundBody>>,
            #[pin]
            fut: Q,
        },
        /// Through a shared pool.
        Pooled {
            #[pin]
            fut: P,
        },
        /// For the own connection once it is open (or ready, or open again).
        Later { fut: BoxedSend },
    }
}

impl<Q, P> Sending<Q, P>
where
    Q: Future<Output = QueuedAnswer>,
    P: Future<Output = Answer>,
{
    /// The response head, or why there is none. `own` and `authority` are the ones the
    /// request was sent with.
    pub fn poll_response(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        client: &UpstreamClient,
        own: &Arc<Dedicated>,
        authority: &Authority,
    ) -> Poll<Answer> {
        loop {
            let unsent = match self.as_mut().project() {
                SendingProj::Pooled { fut } => return fut.poll(cx),
                SendingProj::Later { fut } => return fut.as_mut().poll(cx),
                SendingProj::Queued { sender, fut } => match fut.poll(cx) {
                    Poll::Ready(Ok(response)) => {
                        if let Some(sender) = sender.take() {
                            own.put_sender(authority, sender);
                        }
                        return Poll::Ready(Ok(response));
                    }
                    Poll::Ready(Err(mut e)) => match e.take_message() {
                        Some(unsent) => unsent,
                        None => return Poll::Ready(Err(failed(own, e.error()))),
                    },
                    Poll::Pending => {
                        return match own.poll_deadline(cx) {
                            Poll::Ready(()) => {
                                // The connection still carries the abandoned request: never reuse it.
                                own.close();
                                Poll::Ready(Err(SendError::Upstream(timed_out(
                                    client.response_timeout,
                                ))))
                            }
                            Poll::Pending => Poll::Pending,
                        };
                    }
                },
            };
            // Never written (the connection closed first): safe to send again on a new one.
            self.set(Sending::Later {
                fut: Box::pin(send_dedicated(
                    client.response_timeout,
                    own.clone(),
                    authority.clone(),
                    None,
                    unsent,
                    1,
                )),
            });
        }
    }
}

/// Sends `req` (in origin form) to `authority` on `own`'s upstream connection, opening one when
/// there is none (or when it was closed before the request could be written, up to `attempts`
/// times), and waits for the response head.
async fn send_dedicated(
    limit: Duration,
    own: Arc<Dedicated>,
    authority: Authority,
    mut reused: Option<http1::SendRequest<OutboundBody>>,
    mut req: Request<OutboundBody>,
    attempts: usize,
) -> Result<Response<Incoming>, SendError> {
    for _ in 0..attempts {
        let mut sender = match reused.take() {
            Some(s) => s,
            None => connect(limit, &own, &authority)
                .await
                .map_err(SendError::Upstream)?,
        };
        if !sender.is_ready() && sender.ready().await.is_err() {
            // Closed while idle (the upstream's keep-alive ended): open a fresh one.
            continue;
        }
        own.arm_from(tokio::time::Instant::now(), limit);
        match own.within(sender.try_send_request(req)).await {
            Ok(Ok(response)) => {
                own.put_sender(&authority, sender);
                return Ok(response);
            }
            Ok(Err(mut e)) => match e.take_message() {
                // Never written: safe to send again on a new connection.
                Some(unsent) => req = unsent,
                None => return Err(failed(&own, e.error())),
            },
            Err(TimedOut) => {
                // The connection still carries the abandoned request: never reuse it.
                own.close();
                return Err(SendError::Upstream(timed_out(limit)));
            }
        }
    }
    tracing::warn!(upstream = %authority, "upstream closed two connections before a request could be sent");
    Err(SendError::Upstream(UpstreamFailure::Request))
}

/// A request on the own connection failed after it was (or may have been) written.
fn failed(own: &Dedicated, error: &hyper::Error) -> SendError {
    if caused_by_client_body(error) {
        tracing::info!(error = %error_chain(error), "client request body failed while forwarding");
        own.close();
        SendError::ClientBody
    } else {
        tracing::warn!(error = %error_chain(error), "upstream request failed");
        SendError::Upstream(UpstreamFailure::Request)
    }
}

/// Opens an upstream connection for `own`, under the response timeout.
async fn connect(
    limit: Duration,
    own: &Dedicated,
    authority: &Authority,
) -> Result<http1::SendRequest<OutboundBody>, UpstreamFailure> {
    let address = match authority.port_u16() {
        Some(_) => authority.as_str().to_string(),
        None => format!("{}:80", authority.host()),
    };
    let stream = match tokio::time::timeout(limit, TcpStream::connect(&address)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::warn!(upstream = %address, error = %e, "cannot connect to upstream");
            return Err(UpstreamFailure::Connect);
        }
        Err(_) => return Err(timed_out(limit)),
    };
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::Builder::new()
        // One `write` per request head (and small body), as the listener side does (see
        // `proxy::worker`): −270 instructions per forwarded request, no loss on uploads.
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            tracing::warn!(upstream = %address, error = %e, "upstream handshake failed");
            UpstreamFailure::Connect
        })?;
    own.install(authority.clone(), connection);
    Ok(sender)
}

fn timed_out(limit: Duration) -> UpstreamFailure {
    tracing::warn!(
        timeout_ms = limit.as_millis() as u64,
        "upstream did not answer in time"
    );
    UpstreamFailure::Timeout
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
        this.own.poll_deadline(cx).map(|()| Err(TimedOut))
    }
}

impl Dedicated {
    /// Sets the response deadline `limit` after `start`, on this connection's own timer. A fresh
    /// timer per request would be inserted into and removed from the runtime's timer wheel each
    /// time; moving an armed timer's deadline later only stores the new deadline, and the wheel
    /// re-files the timer if its old deadline comes first.
    fn arm_from(&self, start: tokio::time::Instant, limit: Duration) {
        let at = start + limit;
        let mut inner = self.lock();
        match inner.deadline.as_mut() {
            Some(sleep) => sleep.as_mut().reset(at),
            None => inner.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Whether the deadline `arm` set has passed (registering `cx` to hear when it does).
    fn poll_deadline(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self.lock().deadline.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// `fut`'s output, or `TimedOut` once the deadline `arm` set passes.
    fn within<F: Future>(&self, fut: F) -> Within<'_, F> {
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
        self.install_boxed(authority, Box::pin(connection));
    }

    fn install_boxed(&self, authority: Authority, connection: Pin<Box<UpstreamConnection>>) {
        let mut inner = self.lock();
        inner.authority = Some(authority);
        inner.sender = None;
        inner.connection = Some(connection);
        // `drive` polls it from now on (and sends what is queued on it).
        if let Some(w) = inner.waker.as_ref() {
            w.wake_by_ref();
        }
    }

    /// Takes the upstream connection out, with its sender: `None` while a request waits for
    /// its response head (the sender is with it). Whether the connection is idle is for
    /// `still_open` to say.
    fn take_idle(&self) -> Option<Idle> {
        let mut inner = self.lock();
        let sender = inner.sender.take()?;
        Some(Idle {
            authority: inner.authority.take()?,
            sender,
            connection: inner.connection.take()?,
        })
    }

    fn close(&self) {
        let mut inner = self.lock();
        inner.connection = None;
        inner.sender = None;
        inner.authority = None;
    }
}

/// An idle upstream connection, out of its client connection.
struct Idle {
    authority: Authority,
    sender: http1::SendRequest<OutboundBody>,
    connection: Pin<Box<UpstreamConnection>>,
}

/// How long a parked connection is kept. Short: a client that opens a connection per request
/// comes back within milliseconds, and an upstream that closes idle connections (Node.js does
/// after 5 s) must not close one just as a request is written to it.
const PARKED_IDLE: Duration = Duration::from_secs(2);

/// Parked connections kept per worker at most; past it the oldest closes.
const PARKED_MAX: usize = 64;

/// One worker's idle upstream connections whose client connections have ended, newest last.
/// Nothing polls a parked connection: it is checked when parked and when taken (a poll sees
/// an upstream's close or stray bytes, and ends it), and dropped after `PARKED_IDLE`.
#[derive(Default)]
pub struct Parked {
    idle: Mutex<VecDeque<(tokio::time::Instant, Idle)>>,
}

impl Parked {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(tokio::time::Instant, Idle)>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn park(&self, mut idle: Idle, now: tokio::time::Instant) {
        if !still_open(&mut idle) {
            return;
        }
        let mut parked = self.lock();
        while parked.len() >= PARKED_MAX {
            parked.pop_front();
        }
        parked.push_back((now, idle));
    }

    /// The newest parked connection to `authority` that is still open and ready, if any.
    fn take(&self, authority: &Authority, now: tokio::time::Instant) -> Option<Idle> {
        let mut parked = self.lock();
        expire(&mut parked, now);
        while let Some(at) = parked
            .iter()
            .rposition(|(_, idle)| same_origin(Some(&idle.authority), authority))
        {
            let (_, mut idle) = parked.remove(at)?;
            if still_open(&mut idle) {
                return Some(idle);
            }
        }
        None
    }

    /// Closes parked connections past `PARKED_IDLE`, every second, for as long as the worker
    /// runs.
    pub async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = tick.tick().await;
            expire(&mut self.lock(), now);
        }
    }

    /// Parked connections now (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Closes the parked connections past `PARKED_IDLE` (the oldest are at the front). Under the
/// lock, which only the worker's own thread takes.
fn expire(parked: &mut VecDeque<(tokio::time::Instant, Idle)>, now: tokio::time::Instant) {
    let fresh = parked
        .iter()
        .position(|(at, _)| now.saturating_duration_since(*at) < PARKED_IDLE)
        .unwrap_or(parked.len());
    parked.drain(..fresh);
}

/// Polls an idle connection once, with no one to wake: it ends if the upstream closed it or
/// sent something unasked. Whether it is still open and ready for a request: hyper is ready
/// once the last exchange is over, response body included, so a connection whose response
/// the client left unread is never ready, never parked nor handed on (it closes when dropped).
fn still_open(idle: &mut Idle) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    idle.connection.as_mut().poll(&mut cx).is_pending() && idle.sender.is_ready()
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// An idle client connection to a real listener, and the listener's end of it.
    async fn idle_connection(listener: &TcpListener) -> (Idle, TcpStream) {
        let authority = authority_of(listener);
        let (client, accepted) =
            tokio::join!(TcpStream::connect(authority.as_str()), listener.accept());
        let (sender, connection) = http1::handshake(TokioIo::new(client.expect("connect")))
            .await
            .expect("handshake");
        let idle = Idle {
            authority,
            sender,
            connection: Box::pin(connection),
        };
        (idle, accepted.expect("accept").0)
    }

    /// The server end of a connection keygate closed reads its end promptly.
    async fn assert_closed(server: &mut TcpStream) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf)).await;
        assert_eq!(read.expect("closed promptly").expect("read"), 0);
    }

    /// The server end of a connection keygate keeps has nothing to read for 100 ms.
    async fn assert_open(server: &mut TcpStream, why: &str) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(100), server.read(&mut buf)).await;
        assert!(read.is_err(), "{why}");
    }

    async fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").await.expect("bind")
    }

    fn authority_of(listener: &TcpListener) -> Authority {
        listener
            .local_addr()
            .expect("addr")
            .to_string()
            .parse()
            .expect("authority")
    }

    #[tokio::test]
    async fn a_parked_connection_goes_once_to_a_request_for_its_own_upstream() {
        let (a, b) = (listener().await, listener().await);
        let now = tokio::time::Instant::now();
        let parked = Parked::default();
        let (idle, _server) = idle_connection(&a).await;
        parked.park(idle, now);
        assert_eq!(parked.len(), 1, "an open, idle connection is parked");

        assert!(
            parked.take(&authority_of(&b), now).is_none(),
            "never handed to another upstream"
        );
        let taken = parked
            .take(&authority_of(&a), now)
            .expect("handed to a request for its upstream");
        assert!(taken.sender.is_ready());
        assert!(
            parked.take(&authority_of(&a), now).is_none(),
            "and only once"
        );
    }

    #[tokio::test]
    async fn the_newest_parked_connection_goes_first() {
        let a = listener().await;
        let now = tokio::time::Instant::now();
        let parked = Parked::default();
        let (old, mut old_server) = idle_connection(&a).await;
        let (new, mut new_server) = idle_connection(&a).await;
        parked.park(old, now);
        parked.park(new, now + Duration::from_millis(500));

        let taken = parked
            .take(&authority_of(&a), now + Duration::from_millis(600))
            .expect("one of them");
        assert_eq!(parked.len(), 1);
        // Dropping what is still parked closes it: the older one's server end reads its end.
        drop(parked);
        assert_closed(&mut old_server).await;
        assert_open(&mut new_server, "the newer one was taken and stays open").await;
        drop(taken);
    }

    #[tokio::test]
    async fn connections_parked_longer_than_parked_idle_close_when_one_is_taken() {
        let a = listener().await;
        let start = tokio::time::Instant::now();
        let parked = Parked::default();
        let (old, mut old_server) = idle_connection(&a).await;
        let (new, mut new_server) = idle_connection(&a).await;
        parked.park(old, start);
        parked.park(new, start + Duration::from_millis(500));

        let later = start + PARKED_IDLE + Duration::from_millis(100);
        let taken = parked
            .take(&authority_of(&a), later)
            .expect("the newer one");
        assert_eq!(parked.len(), 0, "the one past PARKED_IDLE was closed");
        // The closed one's server end reads its end; the taken one's is still open.
        assert_closed(&mut old_server).await;
        assert_open(&mut new_server, "the taken connection stays open").await;
        drop(taken);
    }

    #[tokio::test]
    async fn a_connection_its_upstream_closed_while_parked_is_not_handed_on() {
        let a = listener().await;
        let now = tokio::time::Instant::now();
        let parked = Parked::default();
        let (idle, server) = idle_connection(&a).await;
        parked.park(idle, now);
        drop(server);
        // Let the runtime's driver take in the close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(parked.take(&authority_of(&a), now).is_none());
        assert_eq!(parked.len(), 0);

        // Closed before it could be parked: not kept either.
        let (idle, server) = idle_connection(&a).await;
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        parked.park(idle, now);
        assert_eq!(parked.len(), 0);
    }

    #[tokio::test]
    async fn a_worker_keeps_at_most_parked_max_connections() {
        let a = listener().await;
        let now = tokio::time::Instant::now();
        let parked = Parked::default();
        let mut servers = Vec::new();
        for _ in 0..PARKED_MAX + 3 {
            let (idle, server) = idle_connection(&a).await;
            parked.park(idle, now);
            servers.push(server);
        }
        assert_eq!(parked.len(), PARKED_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_closes_connections_parked_longer_than_parked_idle() {
        let a = listener().await;
        let parked = Arc::new(Parked::default());
        // Connected before the sweep's timer exists, which paused time would skip ahead to.
        let (idle, _server) = idle_connection(&a).await;
        parked.park(idle, tokio::time::Instant::now());
        tokio::spawn(parked.clone().sweep());
        tokio::time::sleep(PARKED_IDLE - Duration::from_millis(100)).await;
        assert_eq!(parked.len(), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(parked.len(), 0);
    }
}
