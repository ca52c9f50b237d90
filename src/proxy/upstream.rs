//! The upstream client: pooled HTTP/1.1 connections per upstream origin (hyper-util's client),
//! a deadline for the response head, and failures mapped to 502/504.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::IdleTimeout;
use super::error::Rejection;
use crate::metrics::UpstreamFailure;

/// What keygate sends upstream: the client's body, streamed under the idle timeout.
pub type OutboundBody = IdleTimeout<Incoming>;

pub struct UpstreamClient {
    client: Client<HttpConnector, OutboundBody>,
    response_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(response_timeout: Duration) -> UpstreamClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(response_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        UpstreamClient {
            client,
            response_timeout,
        }
    }

    /// Sends `req` and waits for the response head. The body then streams without a deadline.
    pub async fn send(
        &self,
        req: Request<OutboundBody>,
    ) -> Result<Response<Incoming>, UpstreamFailure> {
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), connect = e.is_connect(), "upstream request failed");
                Err(if e.is_connect() {
                    UpstreamFailure::Connect
                } else {
                    UpstreamFailure::Request
                })
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.response_timeout.as_millis() as u64,
                    "upstream did not answer in time"
                );
                Err(UpstreamFailure::Timeout)
            }
        }
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
