//! The JSON API under `/admin/api/v1`: login, service accounts, keys (the create response is
//! the only place a key ever appears), revoke, expiry, replacement, and the audit log.
//! State-changing calls need the session's `X-CSRF-Token`; key and account changes need the
//! `owner` or `admin` role, checked here on every call. Gateways have their own routes in
//! `gateways`.

pub(super) mod gateways;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AdminError;
use super::session::{self, ApiUser, ClientAddr, CurrentUser};
use super::AdminState;
use crate::clock::{parse_duration_ms, parse_rfc3339, rfc3339};
use crate::keys::{KeyKind, KeyPrefix};
use crate::manage::{echo_ref, key_json, parse_prefix, Password};
use crate::store::{Account, AuditFilter, AuditRecord, KeyRecord};

/// The CSRF header state-changing API calls carry.
pub const CSRF_HEADER: &str = "x-csrf-token";

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/admin/api/v1/login", post(login))
        .route("/admin/api/v1/logout", post(logout))
        .route("/admin/api/v1/session", get(current_session))
        .route(
            "/admin/api/v1/service-accounts",
            get(list_accounts).post(create_account),
        )
        .route("/admin/api/v1/service-accounts/{id}", get(show_account))
        .route(
            "/admin/api/v1/service-accounts/{id}/keys",
            get(list_keys).post(create_key),
        )
        .route("/admin/api/v1/keys/{id}", get(show_key).patch(update_key))
        .route("/admin/api/v1/keys/{id}/revoke", post(revoke_key))
        .route("/admin/api/v1/keys/{id}/replace", post(replace_key))
        .route("/admin/api/v1/audit", get(list_audit))
        .route("/admin/api/v1/scopes", get(list_scopes))
        .merge(gateways::routes())
}

#[derive(Deserialize)]
struct LoginBody {
    email: String,
    password: String,
}

async fn login(
    State(state): State<Arc<AdminState>>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AdminError> {
    // Login CSRF, as on the console's form: another site's page must not sign a browser in.
    // A JSON content type is also required: a page on another site can send a JSON-looking
    // body as text/plain without asking first, never as application/json.
    if session::cross_site(&headers) {
        return Err(AdminError::CrossSiteLogin);
    }
    if !json_content(&headers) {
        return Err(AdminError::Invalid(
            "the login takes a JSON body with content-type: application/json".into(),
        ));
    }
    let body: LoginBody = parse(&body)?;
    let user = super::console::log_in(
        &state,
        &body.email,
        Password::new(body.password),
        addr.clone(),
    )
    .await?;
    let (cookie, csrf) = session::start(&state, user.id, addr).await?;
    let mut response = Json(json!({
        "csrf_token": csrf,
        "user": { "id": user.id, "email": user.email, "role": user.role },
    }))
    .into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

async fn logout(
    State(state): State<Arc<AdminState>>,
    ApiUser(user): ApiUser,
    headers: HeaderMap,
) -> Result<Response, AdminError> {
    user.check_csrf(csrf(&headers))?;
    super::console::log_out(&state, &user).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session::clear_cookie(&state));
    Ok(response)
}

async fn current_session(ApiUser(user): ApiUser) -> Json<Value> {
    Json(json!({
        "user": { "id": user.user_id, "email": user.email, "role": user.role.as_str() },
        "csrf_token": user.csrf_token,
    }))
}

async fn list_scopes(State(state): State<Arc<AdminState>>, ApiUser(_): ApiUser) -> Json<Value> {
    let configured = state.scopes();
    let scopes: Vec<&str> = configured.routes.iter().map(|s| s.as_str()).collect();
    Json(json!({ "scopes": scopes }))
}

async fn list_accounts(
    State(state): State<Arc<AdminState>>,
    ApiUser(_): ApiUser,
) -> Result<Json<Value>, AdminError> {
    let accounts = state.manager.store.accounts().await?;
    let keys = state.manager.store.keys(None).await?;
    let list: Vec<Value> = accounts
        .iter()
        .map(|a| {
            let mut v = account_json(a);
            v["key_count"] = keys.iter().filter(|k| k.account_id == a.id).count().into();
            v
        })
        .collect();
    Ok(Json(json!({ "service_accounts": list })))
}

#[derive(Deserialize)]
struct NewAccountBody {
    name: String,
    #[serde(default)]
    description: String,
}

async fn create_account(
    State(state): State<Arc<AdminState>>,
    ApiUser(user): ApiUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    authorize_change(&user, &headers)?;
    let body: NewAccountBody = parse(&body)?;
    let account = state
        .manager
        .create_account(&body.name, &body.description, &user.actor())
        .await?;
    Ok((StatusCode::CREATED, Json(account_json(&account))))
}

async fn show_account(
    State(state): State<Arc<AdminState>>,
    ApiUser(_): ApiUser,
    Path(id): Path<i64>,
) -> Result<Json<Value>, AdminError> {
    let account = account(&state, id).await?;
    let keys = state.manager.store.keys(Some(id)).await?;
    let mut v = account_json(&account);
    v["keys"] = keys_json(&state, &keys);
    Ok(Json(v))
}

async fn list_keys(
    State(state): State<Arc<AdminState>>,
    ApiUser(_): ApiUser,
    Path(id): Path<i64>,
) -> Result<Json<Value>, AdminError> {
    account(&state, id).await?;
    let keys = state.manager.store.keys(Some(id)).await?;
    Ok(Json(json!({ "keys": keys_json(&state, &keys) })))
}

#[derive(Deserialize)]
struct NewKeyBody {
    name: String,
    scopes: Vec<String>,
    #[serde(default)]
    expires_at: Option<String>,
}

async fn create_key(
    State(state): State<Arc<AdminState>>,
    ApiUser(user): ApiUser,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AdminError> {
    authorize_change(&user, &headers)?;
    let body: NewKeyBody = parse(&body)?;
    let account = account(&state, id).await?;
    check_route_scopes(&state, &body.scopes)?;
    let expires_at = body
        .expires_at
        .as_deref()
        .map(parse_rfc3339)
        .transpose()
        .map_err(AdminError::Invalid)?;
    let issued = state
        .manager
        .issue_key(
            &account,
            &body.name,
            &body.scopes,
            expires_at,
            &user.actor(),
        )
        .await?;
    let mut v = key_json(&issued.record, state.clock.now_ms(), state.stale_after_ms());
    v["key"] = issued.key.expose().into();
    Ok(no_store((StatusCode::CREATED, Json(v)).into_response()))
}

async fn show_key(
    State(state): State<Arc<AdminState>>,
    ApiUser(_): ApiUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    let record = key_ref(&state, &id).await?;
    Ok(Json(key_json(
        &record,
        state.clock.now_ms(),
        state.stale_after_ms(),
    )))
}

async fn revoke_key(
    State(state): State<Arc<AdminState>>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, AdminError> {
    authorize_change(&user, &headers)?;
    let record = key_ref(&state, &id).await?;
    let revoked = state.manager.revoke_key(&record, &user.actor()).await?;
    Ok(Json(key_json(
        &revoked,
        state.clock.now_ms(),
        state.stale_after_ms(),
    )))
}

async fn update_key(
    State(state): State<Arc<AdminState>>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, AdminError> {
    authorize_change(&user, &headers)?;
    let body: Value = parse(&body)?;
    let expires_at = match body.get("expires_at") {
        Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_rfc3339(s).map_err(AdminError::Invalid)?),
        _ => {
            return Err(AdminError::Invalid(
                "send {\"expires_at\": \"<RFC 3339>\"} or {\"expires_at\": null}".into(),
            ))
        }
    };
    let record = key_ref(&state, &id).await?;
    let updated = state
        .manager
        .set_expiry(&record, expires_at, &user.actor())
        .await?;
    Ok(Json(key_json(
        &updated,
        state.clock.now_ms(),
        state.stale_after_ms(),
    )))
}

#[derive(Deserialize)]
struct ReplaceBody {
    name: String,
    /// How long the old key keeps working, e.g. `7d` (the default).
    #[serde(default)]
    window: Option<String>,
    /// Revoke the old key once the new one carried traffic and the old one idled this long.
    #[serde(default)]
    retire_after_idle: Option<String>,
}

async fn replace_key(
    State(state): State<Arc<AdminState>>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AdminError> {
    authorize_change(&user, &headers)?;
    let body: ReplaceBody = parse(&body)?;
    let window_ms =
        parse_duration_ms(body.window.as_deref().unwrap_or("7d")).map_err(AdminError::Invalid)?;
    let retire = body
        .retire_after_idle
        .as_deref()
        .map(parse_duration_ms)
        .transpose()
        .map_err(AdminError::Invalid)?;
    let old = key_ref(&state, &id).await?;
    let (issued, old) = state
        .manager
        .replace_key(&old, &body.name, window_ms, retire, &user.actor())
        .await?;
    let now = state.clock.now_ms();
    let mut new = key_json(&issued.record, now, state.stale_after_ms());
    new["key"] = issued.key.expose().into();
    let v = json!({ "replacement": new, "old": key_json(&old, now, state.stale_after_ms()) });
    Ok(no_store((StatusCode::CREATED, Json(v)).into_response()))
}

/// Query parameters of `GET /admin/api/v1/audit`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct AuditQuery {
    pub actor_type: Option<String>,
    pub action: Option<String>,
    pub key_prefix: Option<String>,
    /// RFC 3339, inclusive.
    pub since: Option<String>,
    /// RFC 3339, exclusive.
    pub until: Option<String>,
    /// The `next_before` cursor of the previous page.
    pub before: Option<i64>,
    pub limit: Option<i64>,
    /// `jsonl` for an export as JSON lines.
    pub format: Option<String>,
}

impl AuditQuery {
    pub(super) fn filter(&self) -> Result<AuditFilter, AdminError> {
        let time = |s: &Option<String>| {
            s.as_deref()
                .filter(|s| !s.is_empty())
                .map(parse_rfc3339)
                .transpose()
                .map_err(AdminError::Invalid)
        };
        // Names from closed sets: anything longer, or with a control character (a NUL, which
        // PostgreSQL refuses as text), matches nothing and is said to be wrong.
        let text = |what: &str, s: &Option<String>| match s.as_deref().filter(|s| !s.is_empty()) {
            Some(t) if t.len() > 64 || t.chars().any(char::is_control) => Err(AdminError::Invalid(
                format!("`{what}` must be at most 64 printable characters"),
            )),
            t => Ok(t.map(str::to_string)),
        };
        let key_prefix = match self.key_prefix.as_deref().filter(|s| !s.is_empty()) {
            Some(p) => Some(parse_prefix(p)?.to_string()),
            None => None,
        };
        let export = self.format.as_deref() == Some("jsonl");
        Ok(AuditFilter {
            actor_type: text("actor_type", &self.actor_type)?,
            action: text("action", &self.action)?,
            key_prefix,
            since_ms: time(&self.since)?,
            until_ms: time(&self.until)?,
            before_id: self.before,
            limit: self
                .limit
                .unwrap_or(if export { 10_000 } else { 50 })
                .clamp(1, if export { 100_000 } else { 500 }),
        })
    }
}

async fn list_audit(
    State(state): State<Arc<AdminState>>,
    ApiUser(_): ApiUser,
    Query(q): Query<AuditQuery>,
) -> Result<Response, AdminError> {
    let filter = q.filter()?;
    let rows = state.manager.store.audit_page(&filter).await?;
    if let Some(f) = q.format.as_deref().filter(|f| *f != "json") {
        if f != "jsonl" {
            return Err(AdminError::Invalid(format!(
                "`{f}` is not an export format; use jsonl"
            )));
        }
        let mut out = String::new();
        for r in &rows {
            out.push_str(&audit_json(r).to_string());
            out.push('\n');
        }
        return Ok((
            [
                (header::CONTENT_TYPE, "application/x-ndjson"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"keygate-audit.jsonl\"",
                ),
            ],
            out,
        )
            .into_response());
    }
    let next_before = (rows.len() as i64 == filter.limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let entries: Vec<Value> = rows.iter().map(audit_json).collect();
    Ok(Json(json!({ "entries": entries, "next_before": next_before })).into_response())
}

/// An audit entry for JSON output: `detail` as an object, times as RFC 3339.
pub(super) fn audit_json(r: &AuditRecord) -> Value {
    json!({
        "id": r.id,
        "at": rfc3339(r.at),
        "actor_type": r.actor_type,
        "actor_id": r.actor_id,
        "action": r.action,
        "key_prefix": r.key_prefix,
        "scopes": r.scopes.as_deref().map(|s| s.split_ascii_whitespace().collect::<Vec<_>>()),
        "detail": serde_json::from_str::<Value>(&r.detail).unwrap_or(Value::Null),
        "client_addr": r.client_addr,
    })
}

fn account_json(a: &Account) -> Value {
    json!({
        "id": a.id,
        "name": a.name,
        "description": a.description,
        "created_at": rfc3339(a.created_at),
        "created_by": a.created_by,
    })
}

fn keys_json(state: &AdminState, keys: &[KeyRecord]) -> Value {
    let now = state.clock.now_ms();
    keys.iter()
        .map(|k| key_json(k, now, state.stale_after_ms()))
        .collect::<Vec<_>>()
        .into()
}

/// CSRF first (a forged request learns nothing), then the role.
fn authorize_change(user: &CurrentUser, headers: &HeaderMap) -> Result<(), AdminError> {
    user.check_csrf(csrf(headers))?;
    user.require_key_manager()
}

fn csrf(headers: &HeaderMap) -> Option<&str> {
    headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok())
}

/// New keys may only hold scopes some configured route requires (when routes exist), so a
/// typo cannot make a key silently narrower than intended.
pub(super) fn check_route_scopes(state: &AdminState, scopes: &[String]) -> Result<(), AdminError> {
    let configured = state.scopes();
    if configured.routes.is_empty() {
        return Ok(());
    }
    for s in scopes {
        if !configured.routes.iter().any(|r| r.as_str() == s.trim()) {
            return Err(AdminError::Invalid(format!(
                "no configured route requires scope `{s}`"
            )));
        }
    }
    Ok(())
}

pub(super) async fn account(state: &AdminState, id: i64) -> Result<Account, AdminError> {
    state
        .manager
        .store
        .account(id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no service account with id {id}")))
}

pub(super) async fn key(state: &AdminState, id: i64) -> Result<KeyRecord, AdminError> {
    state
        .manager
        .store
        .key(id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no key with id {id}")))
}

/// `/keys/{key}` names a key by its id or by its prefix. A gateway's prefix is a conflict:
/// gateway keys change only through pairing, so the answer names that gateway's unpair path.
async fn key_ref(state: &AdminState, key_ref: &str) -> Result<KeyRecord, AdminError> {
    if let Ok(id) = key_ref.parse::<i64>() {
        return key(state, id).await;
    }
    match KeyPrefix::parse(key_ref) {
        Ok(p) if p.kind() == KeyKind::Gateway => {
            let how = match state.manager.store.gateway_by_prefix(key_ref).await? {
                Some(g) => format!(
                    "gateway `{}`: POST /admin/api/v1/gateways/{}/unpair (or /repair for a new key)",
                    g.name, g.id
                ),
                None => "POST /admin/api/v1/gateways/{id}/unpair".to_string(),
            };
            Err(AdminError::Conflict(format!(
                "`{key_ref}` is a gateway key: use the gateway unpair flow instead ({how})"
            )))
        }
        Ok(_) => state
            .manager
            .store
            .key_by_prefix(key_ref)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("no key with prefix `{key_ref}`"))),
        Err(_) => Err(AdminError::NotFound(format!(
            "`{}` is neither a key id nor a key prefix",
            echo_ref(key_ref)
        ))),
    }
}

/// Whether the request says its body is JSON (`application/json`, any parameters).
fn json_content(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| AdminError::Invalid(format!("bad JSON body: {e}")))
}

/// A response carrying a key must not be stored by any cache.
fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
