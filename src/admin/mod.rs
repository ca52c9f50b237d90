//! The control-plane listener, apart from the proxy port: liveness, readiness and Prometheus
//! metrics now; the console and JSON API join it here.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::keys::KeyTable;
use crate::metrics::{self, Metrics};

/// What the admin listener reads.
pub struct AdminState {
    pub table: Arc<KeyTable>,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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

/// The Prometheus text exposition of this instance's registry.
async fn render_metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}
