//! The upstream client: pooled HTTP/1.1 connections per upstream origin (hyper-util's client),
//! over rustls for `https://` routes (one pool per such route, with its own trust and client
//! certificate), a deadline for the response head, and failures mapped to 502/504.

use std::time::Duration;

use http::uri::Scheme;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::{ClientBodyError, DataOnly, IdleTimeout};
use super::error::Rejection;
use super::route::Route;
use crate::config::RouteConfig;
use crate::tls::{self, TlsError};

/// What keygate sends upstream: the client's body without trailers, streamed under the idle
/// timeout.
pub type OutboundBody = IdleTimeout<DataOnly<Incoming>>;

type HttpsClient = Client<HttpsConnector<HttpConnector>, OutboundBody>;

pub struct UpstreamClient {
    client: Client<HttpConnector, OutboundBody>,
    /// One client per `https://` route, by route name (few routes: a scan beats a hash).
    https: Vec<(String, HttpsClient)>,
    response_timeout: Duration,
}

impl UpstreamClient {
    /// Builds the pools; an unreadable CA bundle or client certificate fails the start.
    pub fn new(routes: &[RouteConfig], response_timeout: Duration) -> Result<Self, TlsError> {
        let client = Client::builder(TokioExecutor::new())
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
            client,
            https,
            response_timeout,
        })
    }

    /// Sends `req` to `route`'s upstream and waits for the response head. The body then
    /// streams without a deadline.
    pub async fn send(
        &self,
        route: &Route,
        req: Request<OutboundBody>,
    ) -> Result<Response<Incoming>, Rejection> {
        let sent = if route.upstream.scheme == Scheme::HTTPS {
            match self.https.iter().find(|(name, _)| *name == route.name) {
                Some((_, client)) => client.request(req),
                // `new` builds a client for every https route; never fall back to clear text.
                None => return Err(Rejection::BadGateway),
            }
        } else {
            self.client.request(req)
        };
        match tokio::time::timeout(self.response_timeout, sent).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) if caused_by_client_body(&e) => {
                tracing::info!(error = %error_chain(&e), "client request body failed while forwarding");
                Err(Rejection::BadRequest("bad_request_body"))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), connect = e.is_connect(), "upstream request failed");
                Err(Rejection::BadGateway)
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.response_timeout.as_millis() as u64,
                    "upstream did not answer in time"
                );
                Err(Rejection::GatewayTimeout)
            }
        }
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
