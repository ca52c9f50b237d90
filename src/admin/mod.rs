//! The control-plane listener, apart from the proxy port: liveness and readiness, Prometheus
//! metrics, the console under `/admin` and its JSON API under `/admin/api/v1` (with the fleet
//! list). Changes go through `manage::Manager`, so the console, the API and the CLI change
//! keys the same way, audited.

mod api;
mod console;
mod error;
mod session;
mod sidecars;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
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
use crate::fleet::Identity;
use crate::keys::{KeyTable, Scope, Scopes};
use crate::manage::Manager;
use crate::metrics::{self, Metrics};
use crate::store::Store;
use crate::sync::{Schema, SyncStatus};

pub use error::{AdminError, ISSUANCE_FORBIDDEN, PAIRING_FORBIDDEN};

/// What the admin listener reads.
pub struct AdminState {
    pub table: Arc<KeyTable>,
    pub clock: Clock,
    pub store: Store,
    pub sync: Arc<SyncStatus>,
    pub identity: Identity,
    pub heartbeat_interval: Duration,
    /// `database.max_staleness`: past it, readiness fails (the proxy fails closed too).
    pub max_staleness: Option<Duration>,
    /// Cancelled when a stop signal arrives: readiness fails while requests still drain.
    pub stopping: CancellationToken,
    pub metrics: Arc<Metrics>,
    pub manager: Arc<Manager>,
    /// The scopes the configuration names, swapped whole when SIGHUP reloads it.
    scopes: ArcSwap<ConfiguredScopes>,
    pub secure_cookies: bool,
    pub session_idle_timeout: Duration,
    pub stale_after: Duration,
    /// Digest of the one-time setup token while no user exists; taken by its first use.
    setup_digest: Mutex<Option<String>>,
    throttle: session::Throttle,
}

/// The scopes the configuration names, as the console and the API offer and check them.
pub struct ConfiguredScopes {
    /// Scopes the configured routes require: what the console offers for new keys.
    pub routes: Vec<Scope>,
    /// `[gateways] scopes`: what pairing and re-pairing give a gateway's key.
    pub gateways: Scopes,
}

impl ConfiguredScopes {
    fn of(config: &Config) -> Self {
        ConfiguredScopes {
            routes: config.route_scopes(),
            gateways: config.gateways.scopes.clone(),
        }
    }
}

impl AdminState {
    /// The scopes of the configuration in force.
    pub fn scopes(&self) -> Arc<ConfiguredScopes> {
        self.scopes.load_full()
    }

    /// Takes the scopes of a reloaded configuration (SIGHUP): new routes' scopes are offered
    /// and accepted for keys, and pairing gives gateways the new `[gateways] scopes`.
    pub fn reload(&self, config: &Config) {
        self.scopes.store(Arc::new(ConfiguredScopes::of(config)));
    }

    pub fn new(
        config: &Config,
        table: Arc<KeyTable>,
        clock: Clock,
        manager: Arc<Manager>,
        instance: Instance,
    ) -> Self {
        AdminState {
            table,
            clock,
            store: manager.store.clone(),
            sync: instance.sync,
            identity: instance.identity,
            heartbeat_interval: config.database.heartbeat_interval,
            max_staleness: config.database.max_staleness,
            stopping: instance.stopping,
            metrics: instance.metrics,
            manager,
            scopes: ArcSwap::from_pointee(ConfiguredScopes::of(config)),
            secure_cookies: config.admin.secure_cookies,
            session_idle_timeout: config.admin.session_idle_timeout,
            stale_after: config.admin.stale_after,
            setup_digest: Mutex::new(None),
            throttle: session::Throttle::default(),
        }
    }

    /// Arms a one-time setup token and returns the link that uses it
    /// (`http://ADDR/admin/setup?token=...`). The link creates the first `owner` only, and only
    /// while no user exists; `announce_setup` logs it or disarms it once the database answers.
    pub fn arm_setup(&self, admin_addr: SocketAddr) -> String {
        let token = session::random_token();
        *self
            .setup_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(session::digest(&token));
        format!("http://{admin_addr}/admin/setup?token={token}")
    }

    /// Once the database is reachable (the key table has loaded): logs the setup link when no
    /// console user exists, and disarms it when one does.
    pub async fn announce_setup(&self, url: String, shutdown: CancellationToken) {
        while self.table.synced_at().is_none() {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = shutdown.cancelled() => return,
            }
        }
        match self.manager.store.user_count().await {
            Ok(0) => tracing::warn!(
                "no console user exists yet: open {url} to create the owner (the link works once)"
            ),
            Ok(_) => {
                *self
                    .setup_digest
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether a console user exists; the setup link stays armed but is not shown")
            }
        }
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

/// What the admin listener reports about the running instance it belongs to.
pub struct Instance {
    pub sync: Arc<SyncStatus>,
    pub identity: Identity,
    /// Cancelled when a stop signal arrives: readiness fails while requests still drain.
    pub stopping: CancellationToken,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin/api/v1/sidecars", get(sidecars::list_sidecars))
        .route("/metrics", get(render_metrics))
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
    sync: Arc<SyncStatus>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    // The check reads tables a first start creates: not before they exist (on a slow first
    // start it warned that `api_key_usage` did not exist).
    tokio::select! {
        () = sync.schema_at_least(Schema::Migrated) => {}
        () = shutdown.cancelled() => return,
    }
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

/// Ready: the key table is loaded and current (or, with the database away, younger than
/// `max_staleness`), and no stop signal has arrived. The body tells which and gives the age.
async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let Some(at) = state.table.synced_at() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "loading", "database": state.sync.database_ok() })),
        );
    };
    let age_ms = (state.clock.now_ms() - at).max(0);
    let keys = state.table.len();
    let (code, status) = if state.stopping.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else if state
        .max_staleness
        .is_some_and(|max| age_ms > max.as_millis() as i64)
    {
        (StatusCode::SERVICE_UNAVAILABLE, "stale")
    } else if state.sync.database_ok() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::OK, "degraded")
    };
    (
        code,
        Json(json!({
            "status": status,
            "keys": keys,
            "table_age_ms": age_ms,
            "database": state.sync.database_ok(),
            "listening": state.sync.listening(),
        })),
    )
}

/// The Prometheus text exposition of this instance's registry.
async fn render_metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}
