//! The upstream side. An HTTP/1 client connection gets upstream connections of its own,
//! driven inside that client connection's task: no pool checkout per request and no wake-ups
//! crossing tasks or threads, which is most of what a proxy's own overhead is made of.
//! HTTP/2 client connections (many requests at once) share a per-worker pool (hyper-util's
//! client). Either way the response head has a deadline and failures map to 502/504.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::IdleTimeout;
use super::error::Rejection;
use crate::metrics::UpstreamFailure;

/// What keygate sends upstream: the client's body, streamed under the idle timeout.
pub type OutboundBody = IdleTimeout<Incoming>;

type UpstreamConnection = http1::Connection<TokioIo<TcpStream>, OutboundBody>;

/// The per-worker upstream client.
pub struct UpstreamClient {
    pool: Client<HttpConnector, OutboundBody>,
    response_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(response_timeout: Duration) -> UpstreamClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(response_timeout));
        let pool = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        UpstreamClient {
            pool,
            response_timeout,
        }
    }

    /// Sends `req` through the shared pool and waits for the response head.
    pub async fn send_pooled(
        &self,
        req: Request<OutboundBody>,
    ) -> Result<Response<Incoming>, UpstreamFailure> {
        match tokio::time::timeout(self.response_timeout, self.pool.request(req)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), connect = e.is_connect(), "upstream request failed");
                Err(if e.is_connect() {
                    UpstreamFailure::Connect
                } else {
                    UpstreamFailure::Request
                })
            }
            Err(_) => Err(self.timed_out()),
        }
    }

    /// Sends `req` on `own`'s upstream connection (opening one when there is none, or when it
    /// was closed before the request could be written) and waits for the response head.
    pub async fn send_dedicated(
        &self,
        own: &Dedicated,
        mut req: Request<OutboundBody>,
    ) -> Result<Response<Incoming>, UpstreamFailure> {
        let Some(authority) = req.uri().authority().cloned() else {
            return Err(UpstreamFailure::Request);
        };
        // On its own connection a request goes in origin form (`/path?query`, RFC 9112 §3.2.1);
        // the Host header already names the upstream.
        let mut origin_form = http::uri::Parts::default();
        origin_form.path_and_query = req.uri().path_and_query().cloned();
        *req.uri_mut() =
            http::Uri::from_parts(origin_form).map_err(|_| UpstreamFailure::Request)?;
        let mut reused = own.take_sender(&authority);
        for _ in 0..2 {
            let mut sender = match reused.take() {
                Some(s) => s,
                None => self.connect(own, &authority).await?,
            };
            if sender.ready().await.is_err() {
                // Closed while idle (the upstream's keep-alive ended): open a fresh one.
                continue;
            }
            match tokio::time::timeout(self.response_timeout, sender.try_send_request(req)).await {
                Ok(Ok(response)) => {
                    own.put_sender(authority, sender);
                    return Ok(response);
                }
                Ok(Err(mut e)) => match e.take_message() {
                    // Never written: safe to send again on a new connection.
                    Some(unsent) => req = unsent,
                    None => {
                        tracing::warn!(error = %error_chain(e.error()), "upstream request failed");
                        return Err(UpstreamFailure::Request);
                    }
                },
                Err(_) => {
                    // The connection still carries the abandoned request: never reuse it.
                    own.close();
                    return Err(self.timed_out());
                }
            }
        }
        tracing::warn!(upstream = %authority, "upstream closed two connections before a request could be sent");
        Err(UpstreamFailure::Request)
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
/// the same task that serves the client connection (select it with the server connection);
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
}

impl Dedicated {
    /// Drives the upstream connection, if any. Never completes: the client connection's end
    /// drops it, and with it the upstream connection.
    pub fn drive(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
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
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.authority.as_ref() == Some(authority) {
            inner.sender.take().filter(|s| !s.is_closed())
        } else {
            None
        }
    }

    fn put_sender(&self, authority: Authority, sender: http1::SendRequest<OutboundBody>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.authority.as_ref() == Some(&authority) && inner.connection.is_some() {
            inner.sender = Some(sender);
        }
    }

    /// Replaces the upstream connection (a client connection talks to one upstream at a time;
    /// switching routes to another origin closes the old one).
    fn install(&self, authority: Authority, connection: UpstreamConnection) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.authority = Some(authority);
        inner.sender = None;
        inner.connection = Some(Box::pin(connection));
        if let Some(w) = inner.waker.as_ref() {
            w.wake_by_ref();
        }
    }

    fn close(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.connection = None;
        inner.sender = None;
        inner.authority = None;
    }
}

/// 502 when the upstream could not be reached or broke, 504 when it was too slow.
pub fn rejection(failure: UpstreamFailure) -> Rejection {
    match failure {
        UpstreamFailure::Connect | UpstreamFailure::Request => Rejection::BadGateway,
        UpstreamFailure::Timeout => Rejection::GatewayTimeout,
    }
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
