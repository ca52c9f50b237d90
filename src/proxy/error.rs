//! Every way the proxy can refuse or fail a request, and the one place each becomes a response.
//! Clients get a stable, generic JSON body; the precise reason goes to the log and metrics.

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use crate::keys::Scope;

/// Why a request was refused with 401. Logged and counted; never told to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    Unknown,
    Revoked,
    Expired,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Unknown => "unknown",
            AuthFailure::Revoked => "revoked",
            AuthFailure::Expired => "expired",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// A path or header keygate will not guess the meaning of.
    BadRequest(&'static str),
    /// No route matches the method and path.
    NoRoute,
    Unauthorized(AuthFailure),
    /// A valid key without the route's scope.
    Forbidden(Scope),
    /// The key table has not been loaded yet: retry, do not treat the key as bad.
    NotReady,
    /// The database has been away longer than `database.max_staleness`: fail closed.
    Stale,
    /// Too many new keys are being verified at once.
    Busy,
    /// The key prefix or the client address spent its failure budget (key guessing);
    /// carries the seconds until it comes back.
    Throttled(u64),
    /// The upstream could not be reached or failed mid-response.
    BadGateway,
    /// The upstream did not answer in time.
    GatewayTimeout,
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::NoRoute => StatusCode::NOT_FOUND,
            Rejection::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Rejection::Forbidden(_) => StatusCode::FORBIDDEN,
            Rejection::NotReady | Rejection::Stale | Rejection::Busy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Rejection::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            Rejection::BadGateway => StatusCode::BAD_GATEWAY,
            Rejection::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The outcome label for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Rejection::BadRequest(_) => "bad_request",
            Rejection::NoRoute => "not_found",
            Rejection::Unauthorized(_) => "unauthorized",
            Rejection::Forbidden(_) => "forbidden",
            Rejection::NotReady | Rejection::Stale => "not_ready",
            Rejection::Busy => "busy",
            Rejection::Throttled(_) => "throttled",
            Rejection::BadGateway | Rejection::GatewayTimeout => "upstream_error",
        }
    }

    /// The precise reason, for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::BadRequest(why) => why,
            Rejection::Unauthorized(f) => f.as_str(),
            Rejection::Forbidden(_) => "insufficient_scope",
            Rejection::NoRoute => "no_route",
            Rejection::NotReady => "table_not_loaded",
            Rejection::Stale => "table_stale",
            Rejection::Busy => "verification_saturated",
            Rejection::Throttled(_) => "failure_budget_spent",
            Rejection::BadGateway => "upstream_unreachable",
            Rejection::GatewayTimeout => "upstream_timeout",
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        self.into_response_in(HeaderMap::new())
    }

    /// The response, with its headers in `headers` (empty, but perhaps with room already: see
    /// `pipeline::emptied`).
    pub fn into_response_in(self, mut headers: HeaderMap) -> Response<ProxyBody> {
        // A header beside Content-Type: the challenge or Retry-After.
        let mut extra: Option<(HeaderName, HeaderValue)> = None;
        let body: Bytes = match &self {
            Rejection::BadRequest(why) => json_error("bad_request", why, None),
            Rejection::NoRoute => Bytes::from_static(br#"{"error":"not_found","message":"no route for this method and path"}"#),
            Rejection::Unauthorized(failure) => {
                // RFC 6750 §3: no error code when no credentials were sent; otherwise
                // invalid_token for every other case, so the client cannot tell them apart.
                extra = Some((
                    WWW_AUTHENTICATE,
                    if *failure == AuthFailure::Missing {
                        HeaderValue::from_static(r#"Bearer realm="keygate""#)
                    } else {
                        HeaderValue::from_static(r#"Bearer realm="keygate", error="invalid_token""#)
                    },
                ));
                Bytes::from_static(br#"{"error":"unauthorized","message":"a valid API key is required"}"#)
            }
            Rejection::Forbidden(scope) => {
                // RFC 6750 §3.1 insufficient_scope, naming the scope the route requires.
                let challenge = format!(r#"Bearer realm="keygate", error="insufficient_scope", scope="{scope}""#);
                extra = HeaderValue::from_str(&challenge).ok().map(|v| (WWW_AUTHENTICATE, v));
                json_error(
                    "insufficient_scope",
                    &format!("this key lacks the scope `{scope}` required by this route"),
                    Some(scope.as_str()),
                )
            }
            Rejection::NotReady => {
                extra = Some((RETRY_AFTER, HeaderValue::from_static("1")));
                Bytes::from_static(br#"{"error":"unavailable","message":"keygate is starting; retry shortly"}"#)
            }
            Rejection::Stale => {
                extra = Some((RETRY_AFTER, HeaderValue::from_static("1")));
                Bytes::from_static(br#"{"error":"unavailable","message":"keygate cannot reach its key store; retry shortly"}"#)
            }
            Rejection::Busy => {
                extra = Some((RETRY_AFTER, HeaderValue::from_static("1")));
                Bytes::from_static(br#"{"error":"unavailable","message":"too many new keys are being verified; retry shortly"}"#)
            }
            Rejection::Throttled(secs) => {
                extra = Some((RETRY_AFTER, HeaderValue::from(*secs)));
                Bytes::from_static(br#"{"error":"too_many_requests","message":"too many failed key checks; retry later"}"#)
            }
            Rejection::BadGateway => Bytes::from_static(br#"{"error":"bad_gateway","message":"the upstream service could not be reached"}"#),
            Rejection::GatewayTimeout => Bytes::from_static(br#"{"error":"gateway_timeout","message":"the upstream service did not answer in time"}"#),
        };
        // Put together directly: a refusal is the whole of a key flood's work, and
        // `Response::builder` costs several times more for the same response.
        debug_assert!(headers.is_empty());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some((name, value)) = extra {
            headers.insert(name, value);
        }
        let mut response = Response::new(ProxyBody::full(body));
        *response.status_mut() = self.status();
        *response.headers_mut() = headers;
        response
    }
}

fn json_error(code: &str, message: &str, required_scope: Option<&str>) -> Bytes {
    let mut v = serde_json::json!({ "error": code, "message": message });
    if let Some(scope) = required_scope {
        v["required_scope"] = serde_json::Value::from(scope);
    }
    Bytes::from(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(r: Response<ProxyBody>) -> serde_json::Value {
        let bytes = r.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&bytes).expect("json body")
    }

    #[tokio::test]
    async fn every_401_looks_the_same_to_the_client_except_missing() {
        let mut bodies = Vec::new();
        for f in [
            AuthFailure::Malformed,
            AuthFailure::Unknown,
            AuthFailure::Revoked,
            AuthFailure::Expired,
        ] {
            let r = Rejection::Unauthorized(f).into_response();
            assert_eq!(r.status(), 401);
            assert_eq!(
                r.headers()[WWW_AUTHENTICATE],
                r#"Bearer realm="keygate", error="invalid_token""#
            );
            bodies.push(body_json(r).await);
        }
        assert!(bodies.windows(2).all(|w| w[0] == w[1]));
        let missing = Rejection::Unauthorized(AuthFailure::Missing).into_response();
        assert_eq!(
            missing.headers()[WWW_AUTHENTICATE],
            r#"Bearer realm="keygate""#
        );
    }

    #[tokio::test]
    async fn a_403_names_the_required_scope() {
        let r = Rejection::Forbidden(Scope::new("tickets:write").expect("scope")).into_response();
        assert_eq!(r.status(), 403);
        assert!(r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .expect("ascii")
            .contains(r#"scope="tickets:write""#));
        let v = body_json(r).await;
        assert_eq!(v["error"], "insufficient_scope");
        assert_eq!(v["required_scope"], "tickets:write");
    }

    #[tokio::test]
    async fn statuses_map_one_to_one() {
        let cases = [
            (Rejection::BadRequest("x"), 400),
            (Rejection::NoRoute, 404),
            (Rejection::NotReady, 503),
            (Rejection::Stale, 503),
            (Rejection::Busy, 503),
            (Rejection::BadGateway, 502),
            (Rejection::GatewayTimeout, 504),
        ];
        for (rej, status) in cases {
            let r = rej.clone().into_response();
            assert_eq!(r.status(), status, "{rej:?}");
            assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
            assert!(body_json(r).await["error"].is_string());
        }
        assert_eq!(Rejection::Busy.into_response().headers()[RETRY_AFTER], "1");
        let throttled = Rejection::Throttled(42).into_response();
        assert_eq!(throttled.status(), 429);
        assert_eq!(throttled.headers()[RETRY_AFTER], "42");
    }
}
