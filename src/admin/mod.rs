//! The control-plane listener, apart from the proxy port: liveness and readiness, the console
//! under `/admin` and its JSON API under `/admin/api/v1`. Both go through `manage::Manager`,
//! so the console, the API and the CLI change keys the same way, audited.

mod api;
mod console;
mod error;
mod session;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::keys::{KeyTable, Scope};
use crate::manage::Manager;

pub use error::{AdminError, ISSUANCE_FORBIDDEN};

/// What the admin listener reads.
pub struct AdminState {
    pub table: Arc<KeyTable>,
    pub clock: Clock,
    pub manager: Arc<Manager>,
    /// Scopes the configured routes require: what the console offers for new keys.
    pub route_scopes: Vec<Scope>,
    pub secure_cookies: bool,
    pub session_idle_timeout: Duration,
    pub stale_after: Duration,
    /// Digest of the one-time setup token while no user exists; taken by its first use.
    setup_digest: Mutex<Option<String>>,
    throttle: session::Throttle,
}

impl AdminState {
    pub fn new(config: &Config, table: Arc<KeyTable>, clock: Clock, manager: Arc<Manager>) -> Self {
        AdminState {
            table,
            clock,
            manager,
            route_scopes: config.route_scopes(),
            secure_cookies: config.admin.secure_cookies,
            session_idle_timeout: config.admin.session_idle_timeout,
            stale_after: config.admin.stale_after,
            setup_digest: Mutex::new(None),
            throttle: session::Throttle::default(),
        }
    }

    /// When no user exists yet, makes a one-time setup token and returns the link that uses
    /// it (`http://ADDR/admin/setup?token=...`); the link creates the first `owner` only.
    pub async fn offer_setup(&self, admin_addr: SocketAddr) -> Result<Option<String>, AdminError> {
        if self.manager.store.user_count().await? > 0 {
            return Ok(None);
        }
        let token = session::random_token();
        *self
            .setup_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(session::digest(&token));
        Ok(Some(format!(
            "http://{admin_addr}/admin/setup?token={token}"
        )))
    }

    /// Whether `token` is the live setup token (without using it up).
    fn setup_token_matches(&self, token: &str) -> bool {
        let d = session::digest(token);
        self.setup_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_deref()
            .is_some_and(|live| session::constant_time_eq(live.as_bytes(), d.as_bytes()))
    }

    /// Uses up the setup token: true for exactly one caller holding the right token.
    fn take_setup_token(&self, token: &str) -> bool {
        let d = session::digest(token);
        let mut live = self
            .setup_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if live
            .as_deref()
            .is_some_and(|l| session::constant_time_eq(l.as_bytes(), d.as_bytes()))
        {
            *live = None;
            true
        } else {
            false
        }
    }

    /// `[admin] stale_after` in milliseconds.
    fn stale_after_ms(&self) -> i64 {
        self.stale_after.as_millis() as i64
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(api::routes())
        .merge(console::routes())
        .with_state(state)
}

/// Serves the admin listener until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// Auto-retire: every `interval`, revokes replaced keys that meet their retire rule.
pub async fn run_auto_retire(
    manager: Arc<Manager>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => break,
        }
        match manager.retire_idle_keys().await {
            Ok(retired) if retired.is_empty() => {}
            Ok(retired) => tracing::info!(keys = ?retired, "auto-retired replaced keys"),
            Err(e) => tracing::warn!(error = %e, "auto-retire check failed; will retry"),
        }
    }
}

/// Security headers for every console page: no framing, no sniffing, only our own scripts
/// and styles, no referrer (the setup link carries a token), nothing cached.
async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Alive: the process answers.
async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, Json(json!({ "status": "ok" })))
}

/// Ready: the key table is loaded, with its age.
async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    match state.table.synced_at() {
        Some(at) => (
            StatusCode::OK,
            Json(json!({
                "status": "ready",
                "keys": state.table.len(),
                "table_age_ms": (state.clock.now_ms() - at).max(0),
            })),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "loading" })),
        ),
    }
}
