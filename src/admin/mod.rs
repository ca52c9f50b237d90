//! The control-plane listener, apart from the proxy port: liveness and readiness now; the
//! console, JSON API and metrics join it here.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::keys::KeyTable;

/// What the admin listener reads.
pub struct AdminState {
    pub table: Arc<KeyTable>,
    pub clock: Clock,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
