//! The one place admin errors become HTTP responses: JSON for the API, a small HTML page for
//! the console. The client gets a stable message; store failures go to the log only.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::manage::ManageError;
use crate::store::StoreError;

/// The 403 text for operators and viewers on every key- or account-changing call.
pub const ISSUANCE_FORBIDDEN: &str = "API key issuance is admin/owner-only";

/// The 403 text for operators and viewers on pair, unpair and re-pair.
pub const PAIRING_FORBIDDEN: &str = "gateway pairing is admin/owner-only";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("log in first")]
    Unauthenticated,
    #[error("{ISSUANCE_FORBIDDEN}")]
    IssuanceForbidden,
    #[error("{PAIRING_FORBIDDEN}")]
    PairingForbidden,
    #[error("missing or wrong CSRF token")]
    Csrf,
    #[error(
        "a sign-in form sent from another site is refused; sign in on keygate's own login page"
    )]
    CrossSiteLogin,
    #[error("too many failed logins; try again later")]
    Throttled,
    #[error("wrong email or password")]
    BadLogin,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the key store is unavailable")]
    Unavailable(#[source] StoreError),
}

impl From<ManageError> for AdminError {
    fn from(e: ManageError) -> Self {
        match e {
            ManageError::Invalid(m) => AdminError::Invalid(m),
            ManageError::NotFound(m) => AdminError::NotFound(m),
            ManageError::Conflict(m) => AdminError::Conflict(m),
            ManageError::Store(e) => AdminError::Unavailable(e),
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        ManageError::from(e).into()
    }
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthenticated | AdminError::BadLogin => StatusCode::UNAUTHORIZED,
            AdminError::IssuanceForbidden
            | AdminError::PairingForbidden
            | AdminError::Csrf
            | AdminError::CrossSiteLogin => StatusCode::FORBIDDEN,
            AdminError::Throttled => StatusCode::TOO_MANY_REQUESTS,
            AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Unauthenticated => "unauthenticated",
            AdminError::IssuanceForbidden | AdminError::PairingForbidden => "forbidden",
            AdminError::Csrf | AdminError::CrossSiteLogin => "csrf",
            AdminError::Throttled => "throttled",
            AdminError::BadLogin => "bad_login",
            AdminError::Invalid(_) => "invalid",
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::Unavailable(_) => "unavailable",
        }
    }

    fn log(&self) {
        if let AdminError::Unavailable(e) = self {
            tracing::warn!(error = %e, "admin request failed: the store is unavailable");
        }
    }

    /// The console's rendering: a plain page with the message, escaped.
    pub fn into_html(self) -> Response {
        self.log();
        let status = self.status();
        let body = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>keygate</title>\
             <link rel=\"stylesheet\" href=\"/admin/static/console.css\"></head><body class=\"bare\">\
             <main class=\"card narrow\"><h1>{}</h1><p>{}</p><p><a href=\"/admin/service-accounts\">Back to API Keys</a></p>\
             </main></body></html>",
            status.as_u16(),
            escape(&self.to_string())
        );
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response()
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        self.log();
        let mut response = (
            self.status(),
            Json(json!({ "error": self.code(), "message": self.to_string() })),
        )
            .into_response();
        if matches!(self, AdminError::Throttled) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        }
        response
    }
}

/// Minimal HTML escaping for the error page (templates escape by themselves).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_status_and_code() {
        let cases = [
            (AdminError::Unauthenticated, 401, "unauthenticated"),
            (AdminError::IssuanceForbidden, 403, "forbidden"),
            (AdminError::PairingForbidden, 403, "forbidden"),
            (AdminError::Csrf, 403, "csrf"),
            (AdminError::Throttled, 429, "throttled"),
            (AdminError::BadLogin, 401, "bad_login"),
            (AdminError::Invalid("x".into()), 400, "invalid"),
            (AdminError::NotFound("x".into()), 404, "not_found"),
            (AdminError::Conflict("x".into()), 409, "conflict"),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.code(), code);
        }
    }

    #[test]
    fn the_issuance_message_is_exact() {
        assert_eq!(
            AdminError::IssuanceForbidden.to_string(),
            "API key issuance is admin/owner-only"
        );
    }

    #[test]
    fn the_pairing_message_is_exact() {
        assert_eq!(
            AdminError::PairingForbidden.to_string(),
            "gateway pairing is admin/owner-only"
        );
    }

    #[test]
    fn the_html_error_page_escapes_the_message() {
        assert_eq!(escape("<b>&\"'"), "&lt;b&gt;&amp;&quot;&#39;");
    }
}
