//! The control-plane listener, apart from the proxy port: liveness, readiness, Prometheus
//! metrics and the fleet list; the console and JSON API join it here.

mod sidecars;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::fleet::Identity;
use crate::keys::KeyTable;
use crate::metrics::{self, Metrics};
use crate::store::Store;
use crate::sync::SyncStatus;

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
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin/api/v1/sidecars", get(sidecars::list_sidecars))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

/// Serves the admin listener until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let app = router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
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
