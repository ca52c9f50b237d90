//! The Gateways page: every gateway with its key prefix, state and last seen; pair (the key
//! is shown once, in a dialog on the response to the form), re-pair and unpair, each behind
//! a confirmation dialog.

use std::sync::Arc;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use super::{human_time, render, Chrome, Form};
use crate::admin::api::gateways::gateway;
use crate::admin::error::AdminError;
use crate::admin::session::{ConsoleUser, CurrentUser};
use crate::admin::AdminState;
use crate::manage::{gateway_state, PairedGateway};
use crate::store::Gateway;

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/admin/gateways", get(gateways_page).post(pair_form))
        .route("/admin/gateways/{id}/unpair", post(unpair_form))
        .route("/admin/gateways/{id}/repair", post(repair_form))
}

struct GatewayView {
    id: i64,
    name: String,
    prefix: String,
    state: &'static str,
    paired: bool,
    scopes: Vec<String>,
    paired_at: String,
    last_seen: String,
}

struct NewGatewayKey {
    name: String,
    key: String,
    scopes: String,
    repaired: bool,
}

#[derive(Template)]
#[template(path = "gateways.html")]
struct GatewaysPage {
    chrome: Chrome,
    gateways: Vec<GatewayView>,
    /// `[gateways] scopes`: what a new pairing gets; empty disables pairing.
    scopes: Vec<String>,
    new_key: Option<NewGatewayKey>,
    error: Option<String>,
}

async fn gateways_page(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
) -> Response {
    gateways_view(&state, &user, None, None).await
}

async fn pair_form(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(e) = check_form(&user, &form) {
        return e.into_html();
    }
    let result = state
        .manager
        .pair_gateway(form.one("name"), &state.scopes().gateways, &user.actor())
        .await;
    match result {
        Ok(paired) => gateways_view(&state, &user, Some((&paired, false)), None).await,
        Err(e) => gateways_view(&state, &user, None, Some(AdminError::from(e).to_string())).await,
    }
}

async fn unpair_form(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let target = match gateway_form(&state, &user, &id, &body).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    match state.manager.unpair_gateway(&target, &user.actor()).await {
        Ok(_) => Redirect::to("/admin/gateways").into_response(),
        Err(e) => gateways_view(&state, &user, None, Some(AdminError::from(e).to_string())).await,
    }
}

async fn repair_form(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let target = match gateway_form(&state, &user, &id, &body).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let result = state
        .manager
        .repair_gateway(&target, &state.scopes().gateways, &user.actor())
        .await;
    match result {
        Ok(paired) => gateways_view(&state, &user, Some((&paired, true)), None).await,
        Err(e) => gateways_view(&state, &user, None, Some(AdminError::from(e).to_string())).await,
    }
}

/// The page, with a new key's one-time dialog when the form made one, or with the error.
async fn gateways_view(
    state: &AdminState,
    user: &CurrentUser,
    new_key: Option<(&PairedGateway, bool)>,
    error: Option<String>,
) -> Response {
    let gateways = match state.manager.store.gateways().await {
        Ok(g) => g,
        Err(e) => return AdminError::from(e).into_html(),
    };
    let page = GatewaysPage {
        chrome: Chrome::new(user, "gateways"),
        gateways: gateways.iter().map(view).collect(),
        scopes: state
            .scopes()
            .gateways
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        new_key: new_key.map(|(p, repaired)| NewGatewayKey {
            name: p.gateway.name.clone(),
            key: p.key.expose().to_string(),
            scopes: p.gateway.scopes.clone(),
            repaired,
        }),
        error,
    };
    let mut r = render(&page);
    if page.new_key.is_some() {
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// The shared start of unpair and re-pair: CSRF and role first, then the gateway.
async fn gateway_form(
    state: &AdminState,
    user: &CurrentUser,
    id: &str,
    body: &[u8],
) -> Result<Gateway, Response> {
    let form = Form::parse(body);
    check_form(user, &form).map_err(AdminError::into_html)?;
    gateway(state, id).await.map_err(AdminError::into_html)
}

/// CSRF first, then the role.
fn check_form(user: &CurrentUser, form: &Form) -> Result<(), AdminError> {
    user.check_csrf(form.get("csrf"))?;
    user.require_gateway_manager()
}

fn view(g: &Gateway) -> GatewayView {
    GatewayView {
        id: g.id,
        name: g.name.clone(),
        prefix: g.prefix.clone().unwrap_or_default(),
        state: gateway_state(g),
        paired: g.is_paired(),
        scopes: g
            .scopes
            .split_ascii_whitespace()
            .map(str::to_string)
            .collect(),
        paired_at: g.paired_at.map(human_time).unwrap_or_else(|| "–".into()),
        last_seen: g
            .last_seen_at
            .map(human_time)
            .unwrap_or_else(|| "never".into()),
    }
}
