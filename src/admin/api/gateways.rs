//! `/admin/api/v1/gateways`: list, pair, unpair and re-pair. Pair and re-pair answer with the
//! gateway's key, the only place it ever appears; changes need the CSRF header first, then
//! the `owner` or `admin` role.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{csrf, no_store, parse};
use crate::admin::error::AdminError;
use crate::admin::session::{ApiUser, CurrentUser};
use crate::admin::AdminState;
use crate::manage::{gateway_json, PairedGateway};
use crate::store::Gateway;

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route(
            "/admin/api/v1/gateways",
            get(list_gateways).post(pair_gateway),
        )
        .route("/admin/api/v1/gateways/{id}", get(show_gateway))
        .route("/admin/api/v1/gateways/{id}/unpair", post(unpair_gateway))
        .route("/admin/api/v1/gateways/{id}/repair", post(repair_gateway))
}

async fn list_gateways(
    State(state): State<Arc<AdminState>>,
    ApiUser(_): ApiUser,
) -> Result<Json<Value>, AdminError> {
    let gateways = state.manager.store.gateways().await?;
    let list: Vec<Value> = gateways.iter().map(gateway_json).collect();
    Ok(Json(json!({ "gateways": list })))
}

async fn show_gateway(
    State(state): State<Arc<AdminState>>,
    ApiUser(_): ApiUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    Ok(Json(gateway_json(&gateway(&state, &id).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairBody {
    name: String,
}

async fn pair_gateway(
    State(state): State<Arc<AdminState>>,
    ApiUser(user): ApiUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AdminError> {
    authorize_pairing(&user, &headers)?;
    let body: PairBody = parse(&body)?;
    let paired = state
        .manager
        .pair_gateway(&body.name, &state.scopes().gateways, &user.actor())
        .await?;
    Ok(with_key(paired))
}

async fn unpair_gateway(
    State(state): State<Arc<AdminState>>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, AdminError> {
    authorize_pairing(&user, &headers)?;
    let gateway = gateway(&state, &id).await?;
    let unpaired = state
        .manager
        .unpair_gateway(&gateway, &user.actor())
        .await?;
    Ok(Json(gateway_json(&unpaired)))
}

async fn repair_gateway(
    State(state): State<Arc<AdminState>>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, AdminError> {
    authorize_pairing(&user, &headers)?;
    let gateway = gateway(&state, &id).await?;
    let paired = state
        .manager
        .repair_gateway(&gateway, &state.scopes().gateways, &user.actor())
        .await?;
    Ok(with_key(paired))
}

/// `201` with the gateway and, once, its key; never cached.
fn with_key(paired: PairedGateway) -> Response {
    let mut v = gateway_json(&paired.gateway);
    v["key"] = paired.key.expose().into();
    no_store((StatusCode::CREATED, Json(v)).into_response())
}

/// CSRF first (a forged request learns nothing), then the role.
fn authorize_pairing(user: &CurrentUser, headers: &HeaderMap) -> Result<(), AdminError> {
    user.check_csrf(csrf(headers))?;
    user.require_gateway_manager()
}

/// The gateway named by its numeric id in the path.
pub(in crate::admin) async fn gateway(state: &AdminState, id: &str) -> Result<Gateway, AdminError> {
    let id = id
        .parse::<i64>()
        .map_err(|_| AdminError::NotFound(format!("no gateway with id `{id}`")))?;
    Ok(state.manager.gateway(id).await?)
}
