//! `GET /admin/api/v1/sidecars`: the live fleet from its heartbeats and, with
//! `?key_prefix=PREFIX`, on how many of them the latest change to that key has taken effect.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::session::ApiUser;
use super::AdminError;
use super::AdminState;
use crate::fleet;

#[derive(Debug, Deserialize)]
pub struct SidecarsQuery {
    key_prefix: Option<String>,
}

/// Lists live sidecars (newest heartbeat first), this one marked, and optionally how far a
/// key change has spread.
pub async fn list_sidecars(
    State(state): State<Arc<AdminState>>,
    // Any signed-in console user may see the fleet; nobody else.
    _user: ApiUser,
    Query(query): Query<SidecarsQuery>,
) -> Response {
    let now = state.clock.now_ms();
    let sidecars = match fleet::live(&state.store, now, state.heartbeat_interval).await {
        Ok(s) => s,
        Err(e) => return unavailable(&e),
    };
    let mut body = json!({
        "self": state.identity.id,
        "sidecars": sidecars,
    });
    if let Some(prefix) = query.key_prefix {
        let prefix = match crate::manage::parse_prefix(&prefix) {
            Ok(p) => p,
            Err(e) => return AdminError::from(e).into_response(),
        };
        match fleet::applied(&state.store, prefix.as_str(), now, state.heartbeat_interval).await {
            Ok(Some(applied)) => body["change"] = json!(applied),
            Ok(None) => {
                return (
                    StatusCode::NOT_FOUND,
                    Json(json!({ "error": "not_found", "message": "no key has this prefix" })),
                )
                    .into_response()
            }
            Err(e) => return unavailable(&e),
        }
    }
    Json(body).into_response()
}

fn unavailable(e: &crate::store::StoreError) -> Response {
    tracing::warn!(error = %e, "listing sidecars failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": "unavailable", "message": "the database is unreachable" })),
    )
        .into_response()
}
