//! The console: server-rendered pages (askama templates, escaped by default), one stylesheet
//! and one small script. Forms carry the session's CSRF token as a hidden `csrf` field; a new
//! key is rendered once, in the response to the form that created it. The Gateways page is
//! in `gateways`.

mod gateways;

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use super::api::{self, AuditQuery};
use super::error::AdminError;
use super::session::{self, ClientAddr, ConsoleUser, CurrentUser};
use super::AdminState;
use crate::clock::{parse_duration_ms, rfc3339};
use crate::fleet;
use crate::manage::{is_stale, key_status, Actor, IssuedKey, Password, MAX_EMAIL_BYTES};
use crate::store::{KeyRecord, User};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route(
            "/admin",
            get(|| async { Redirect::to("/admin/service-accounts") }),
        )
        .route("/admin/login", get(login_page).post(login_form))
        .route("/admin/setup", get(setup_page).post(setup_form))
        .route("/admin/logout", post(logout_form))
        .route(
            "/admin/service-accounts",
            get(accounts_page).post(create_account_form),
        )
        .route("/admin/service-accounts/{id}", get(account_page))
        .route("/admin/service-accounts/{id}/keys", post(create_key_form))
        .route("/admin/keys/{id}/revoke", post(revoke_key_form))
        .route("/admin/keys/{id}/expiry", post(expiry_form))
        .route("/admin/keys/{id}/replace", post(replace_key_form))
        .route("/admin/audit", get(audit_page))
        .route("/admin/sidecars", get(sidecars_page))
        .merge(gateways::routes())
        .route("/admin/static/console.css", get(stylesheet))
        .route("/admin/static/console.js", get(script))
        .layer(axum::middleware::map_response(super::secure_headers))
}

/// Checks a login (throttled per email and address), audits it either way.
pub(super) async fn log_in(
    state: &AdminState,
    email: &str,
    password: Password,
    addr: Option<String>,
) -> Result<User, AdminError> {
    let attempt = state.throttle.begin(email, addr.as_deref()).await?;
    let user = state.manager.authenticate(email, &password).await?;
    let mut actor = Actor {
        actor_type: "user",
        actor_id: None,
        client_addr: addr.clone(),
    };
    match user {
        Some(user) => {
            state.throttle.succeeded(attempt).await;
            actor.actor_id = Some(user.id.to_string());
            state
                .manager
                .record(
                    &actor,
                    "user.login",
                    serde_json::json!({ "email": user.email }),
                )
                .await?;
            Ok(user)
        }
        None => {
            // What a client sent, cut to an email's greatest length: a failed login costs
            // nothing to send, so it must not let anyone fill the audit log.
            state
                .manager
                .record(
                    &actor,
                    "user.login_failed",
                    serde_json::json!({ "email": clip(email.trim(), MAX_EMAIL_BYTES) }),
                )
                .await?;
            Err(AdminError::BadLogin)
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Ends the session and audits the logout.
pub(super) async fn log_out(state: &AdminState, user: &CurrentUser) -> Result<(), AdminError> {
    state
        .manager
        .store
        .end_session(user.session_id, state.clock.now_ms())
        .await?;
    state
        .manager
        .record(
            &user.actor(),
            "user.logout",
            serde_json::json!({ "email": user.email }),
        )
        .await?;
    Ok(())
}

// ---- view models ----------------------------------------------------------------------

/// What the layout needs on every page.
struct Chrome {
    email: String,
    role: &'static str,
    csrf: String,
    can_manage: bool,
    nav: &'static str,
}

impl Chrome {
    fn new(user: &CurrentUser, nav: &'static str) -> Chrome {
        Chrome {
            email: user.email.clone(),
            role: user.role.as_str(),
            csrf: user.csrf_token.clone(),
            can_manage: user.role.manages_keys(),
            nav,
        }
    }
}

struct AccountRow {
    id: i64,
    name: String,
    description: String,
    active_keys: usize,
    stale_keys: usize,
    created: String,
}

struct KeyView {
    id: i64,
    name: String,
    prefix: String,
    scopes: Vec<String>,
    created: String,
    last_used: String,
    last_client: String,
    expires: String,
    status: &'static str,
    stale: bool,
    live: bool,
    /// For a revoked key: on how many live sidecars the revocation has taken effect.
    propagation: String,
}

struct Rotation {
    old: KeyView,
    new: KeyView,
    rule: String,
}

struct NewKey {
    name: String,
    key: String,
    scopes: String,
}

struct AuditView {
    at: String,
    actor_type: String,
    actor: String,
    action: String,
    key_prefix: String,
    scopes: Vec<String>,
    detail: String,
    client: String,
}

struct Choice {
    value: &'static str,
    selected: bool,
}

#[derive(Default)]
struct FilterView {
    action: String,
    key_prefix: String,
    since: String,
    until: String,
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    setup: bool,
    token: String,
    email: String,
    error: Option<String>,
}

struct GatewayRow {
    id: i64,
    name: String,
    prefix: String,
    scopes: Vec<String>,
    last_seen: String,
}

#[derive(Template)]
#[template(path = "accounts.html")]
struct AccountsPage {
    chrome: Chrome,
    accounts: Vec<AccountRow>,
    gateways: Vec<GatewayRow>,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    chrome: Chrome,
    account: crate::store::Account,
    keys: Vec<KeyView>,
    rotations: Vec<Rotation>,
    route_scopes: Vec<String>,
    new_key: Option<NewKey>,
    error: Option<String>,
}

struct SidecarView {
    id: String,
    this: bool,
    host: String,
    version: String,
    started: String,
    seen: String,
    table_age: String,
    keys: i64,
    watermark: String,
}

#[derive(Template)]
#[template(path = "sidecars.html")]
struct SidecarsPage {
    chrome: Chrome,
    sidecars: Vec<SidecarView>,
    key_prefix: String,
    change: Option<fleet::Applied>,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    chrome: Chrome,
    entries: Vec<AuditView>,
    actor_types: Vec<Choice>,
    filter: FilterView,
    query: String,
    next_before: Option<i64>,
    error: Option<String>,
}

// ---- handlers -------------------------------------------------------------------------

async fn login_page() -> Response {
    render(&LoginPage {
        setup: false,
        token: String::new(),
        email: String::new(),
        error: None,
    })
}

async fn login_form(
    State(state): State<Arc<AdminState>>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if session::cross_site(&headers) {
        return AdminError::CrossSiteLogin.into_html();
    }
    let form = Form::parse(&body);
    let email = form.one("email").to_string();
    let result = log_in(
        &state,
        &email,
        Password::new(form.one("password")),
        addr.clone(),
    )
    .await;
    let user = match result {
        Ok(user) => user,
        Err(e @ (AdminError::BadLogin | AdminError::Throttled)) => {
            let mut r = render(&LoginPage {
                setup: false,
                token: String::new(),
                email,
                error: Some(e.to_string()),
            });
            *r.status_mut() = e.status();
            return r;
        }
        Err(e) => return e.into_html(),
    };
    signed_in(&state, user.id, addr).await
}

#[derive(serde::Deserialize)]
struct SetupQuery {
    #[serde(default)]
    token: String,
}

async fn setup_page(State(state): State<Arc<AdminState>>, Query(q): Query<SetupQuery>) -> Response {
    if !state.setup_token_matches(&q.token) {
        return AdminError::NotFound("this setup link is not valid (it works once)".into())
            .into_html();
    }
    render(&LoginPage {
        setup: true,
        token: q.token,
        email: String::new(),
        error: None,
    })
}

async fn setup_form(
    State(state): State<Arc<AdminState>>,
    ClientAddr(addr): ClientAddr,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    let token = form.one("token");
    let email = form.one("email");
    let password = Password::new(form.one("password"));
    if !state.setup_token_matches(token) {
        return AdminError::NotFound("this setup link is not valid (it works once)".into())
            .into_html();
    }
    // The token is used up only by a setup that succeeds, so a typo does not lock anyone out.
    match state
        .manager
        .create_first_owner(email, &password, addr.clone())
        .await
    {
        Ok(user) => {
            if !state.take_setup_token(token) {
                return AdminError::NotFound("this setup link was used meanwhile".into())
                    .into_html();
            }
            signed_in(&state, user.id, addr).await
        }
        Err(crate::manage::ManageError::Invalid(m)) => {
            // The form again, with what was wrong, as the 400 it is.
            let mut page = render(&LoginPage {
                setup: true,
                token: token.to_string(),
                email: email.to_string(),
                error: Some(m),
            });
            *page.status_mut() = StatusCode::BAD_REQUEST;
            page
        }
        Err(e) => AdminError::from(e).into_html(),
    }
}

async fn logout_form(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(e) = user.check_csrf(form.get("csrf")) {
        return e.into_html();
    }
    if let Err(e) = log_out(&state, &user).await {
        return e.into_html();
    }
    let mut r = Redirect::to("/admin/login").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, session::clear_cookie(&state));
    r
}

async fn accounts_page(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
) -> Response {
    accounts_view(&state, &user, None).await
}

async fn accounts_view(state: &AdminState, user: &CurrentUser, error: Option<String>) -> Response {
    let result = async {
        let accounts = state.manager.store.accounts().await?;
        let keys = state.manager.store.keys(None).await?;
        let now = state.clock.now_ms();
        let stale_after = state.stale_after.as_millis() as i64;
        let rows = accounts
            .into_iter()
            .map(|a| {
                let mine = keys.iter().filter(|k| k.account_id == a.id);
                AccountRow {
                    active_keys: mine
                        .clone()
                        .filter(|k| matches!(key_status(k, now), "active" | "expiring"))
                        .count(),
                    stale_keys: mine.filter(|k| is_stale(k, now, stale_after)).count(),
                    id: a.id,
                    name: a.name,
                    description: a.description,
                    created: human_time(a.created_at),
                }
            })
            .collect();
        let gateways = state
            .manager
            .store
            .gateway_keys()
            .await?
            .into_iter()
            .map(|g| GatewayRow {
                id: g.id,
                name: g.name,
                prefix: g.prefix,
                scopes: g
                    .scopes
                    .split_ascii_whitespace()
                    .map(str::to_string)
                    .collect(),
                last_seen: g
                    .last_seen_at
                    .map(human_time)
                    .unwrap_or_else(|| "never".into()),
            })
            .collect();
        Ok::<_, AdminError>(AccountsPage {
            chrome: Chrome::new(user, "keys"),
            accounts: rows,
            gateways,
            error,
        })
    }
    .await;
    match result {
        Ok(page) => render(&page),
        Err(e) => e.into_html(),
    }
}

async fn create_account_form(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(e) = check_form(&user, &form) {
        return e.into_html();
    }
    match state
        .manager
        .create_account(form.one("name"), form.one("description"), &user.actor())
        .await
    {
        Ok(a) => Redirect::to(&format!("/admin/service-accounts/{}", a.id)).into_response(),
        Err(e) => accounts_view(&state, &user, Some(AdminError::from(e).to_string())).await,
    }
}

async fn account_page(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    Path(id): Path<i64>,
) -> Response {
    account_view(&state, &user, id, None, None).await
}

async fn account_view(
    state: &AdminState,
    user: &CurrentUser,
    id: i64,
    new_key: Option<&IssuedKey>,
    error: Option<String>,
) -> Response {
    let result = async {
        let account = api::account(state, id).await?;
        let records = state.manager.store.keys(Some(id)).await?;
        let now = state.clock.now_ms();
        let stale_after = state.stale_after.as_millis() as i64;
        let view = |k: &KeyRecord| key_view(k, now, stale_after);
        let rotations = records
            .iter()
            .filter(|k| k.revoked_at.is_none())
            .filter_map(|old| {
                let new = records.iter().find(|n| Some(n.id) == old.replaced_by)?;
                let rule = match old.retire_after_idle_ms {
                    Some(ms) => format!(
                        "The old key is revoked automatically once the new key has carried traffic and the old one has been idle for {}, or at its expiry, whichever comes first.",
                        humantime::format_duration(std::time::Duration::from_millis(ms as u64))
                    ),
                    None => "The old key stops working at its expiry. Revoke it sooner once Last used shows the integration has switched.".into(),
                };
                Some(Rotation {
                    old: view(old),
                    new: view(new),
                    rule,
                })
            })
            .collect();
        let mut keys: Vec<KeyView> = records.iter().map(view).collect();
        // After a revoke, show how far it has spread across the fleet ("applied on 3 of 3").
        for (k, record) in keys.iter_mut().zip(&records) {
            if record.revoked_at.is_some() {
                if let Some(a) =
                    fleet::applied(&state.store, &record.prefix, now, state.heartbeat_interval)
                        .await?
                {
                    k.propagation = format!("applied on {} of {} sidecars", a.applied, a.of);
                }
            }
        }
        Ok::<_, AdminError>(AccountPage {
            chrome: Chrome::new(user, "keys"),
            account,
            keys,
            rotations,
            route_scopes: state
                .scopes()
                .routes
                .iter()
                .map(|s| s.as_str().to_string())
                .collect(),
            new_key: new_key.map(|n| NewKey {
                name: n.record.name.clone(),
                key: n.key.expose().to_string(),
                scopes: n.record.scopes.clone(),
            }),
            error,
        })
    }
    .await;
    match result {
        Ok(page) => {
            let mut r = render(&page);
            if page.new_key.is_some() {
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            }
            r
        }
        Err(e) => e.into_html(),
    }
}

async fn create_key_form(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    Path(id): Path<i64>,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(e) = check_form(&user, &form) {
        return e.into_html();
    }
    let scopes: Vec<String> = form.all("scope").map(str::to_string).collect();
    let result = async {
        let account = api::account(&state, id).await?;
        api::check_route_scopes(&state, &scopes)?;
        let expires_at = match form.one("expires_in") {
            "" | "never" => None,
            d => Some(state.clock.now_ms() + parse_duration_ms(d).map_err(AdminError::Invalid)?),
        };
        Ok::<_, AdminError>(
            state
                .manager
                .issue_key(
                    &account,
                    form.one("name"),
                    &scopes,
                    expires_at,
                    &user.actor(),
                )
                .await?,
        )
    }
    .await;
    match result {
        Ok(issued) => account_view(&state, &user, id, Some(&issued), None).await,
        Err(AdminError::NotFound(m)) => AdminError::NotFound(m).into_html(),
        Err(e) => account_view(&state, &user, id, None, Some(e.to_string())).await,
    }
}

async fn revoke_key_form(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    Path(id): Path<i64>,
    body: Bytes,
) -> Response {
    let (record, _) = match key_form(&state, &user, id, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let account_id = record.account_id;
    let result = state
        .manager
        .revoke_key(&record, &user.actor())
        .await
        .map(|_| None)
        .map_err(AdminError::from);
    after_key_change(&state, &user, account_id, result).await
}

async fn expiry_form(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    Path(id): Path<i64>,
    body: Bytes,
) -> Response {
    let (record, form) = match key_form(&state, &user, id, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let account_id = record.account_id;
    let result = async {
        let at = match form.one("expires_in") {
            "" | "never" => None,
            d => Some(state.clock.now_ms() + parse_duration_ms(d).map_err(AdminError::Invalid)?),
        };
        state.manager.set_expiry(&record, at, &user.actor()).await?;
        Ok(None)
    }
    .await;
    after_key_change(&state, &user, account_id, result).await
}

async fn replace_key_form(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    Path(id): Path<i64>,
    body: Bytes,
) -> Response {
    let (record, form) = match key_form(&state, &user, id, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let account_id = record.account_id;
    let result = async {
        let window = parse_duration_ms(match form.one("window") {
            "" => "7d",
            w => w,
        })
        .map_err(AdminError::Invalid)?;
        let retire = match form.one("retire_after_idle") {
            "" => None,
            d => Some(parse_duration_ms(d).map_err(AdminError::Invalid)?),
        };
        let (issued, _) = state
            .manager
            .replace_key(&record, form.one("name"), window, retire, &user.actor())
            .await?;
        Ok(Some(issued))
    }
    .await;
    after_key_change(&state, &user, account_id, result).await
}

/// The shared start of the key forms: CSRF and role first, then the key.
async fn key_form(
    state: &AdminState,
    user: &CurrentUser,
    id: i64,
    body: &[u8],
) -> Result<(KeyRecord, Form), Response> {
    let form = Form::parse(body);
    check_form(user, &form).map_err(AdminError::into_html)?;
    let record = api::key(state, id).await.map_err(AdminError::into_html)?;
    Ok((record, form))
}

/// The account page again, with a new key's one-time dialog when the change made one, or
/// with the error.
async fn after_key_change(
    state: &AdminState,
    user: &CurrentUser,
    account_id: i64,
    result: Result<Option<IssuedKey>, AdminError>,
) -> Response {
    match result {
        Ok(Some(issued)) => account_view(state, user, account_id, Some(&issued), None).await,
        Ok(None) => Redirect::to(&format!("/admin/service-accounts/{account_id}")).into_response(),
        Err(e) => account_view(state, user, account_id, None, Some(e.to_string())).await,
    }
}

#[derive(serde::Deserialize)]
struct SidecarsQuery {
    key_prefix: Option<String>,
}

/// The fleet: every live sidecar with how current its key table is, and on how many of them
/// a given key's latest change has taken effect.
async fn sidecars_page(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    Query(q): Query<SidecarsQuery>,
) -> Response {
    let now = state.clock.now_ms();
    let sidecars = match fleet::live(&state.store, now, state.heartbeat_interval).await {
        Ok(s) => s,
        Err(e) => return AdminError::from(e).into_html(),
    };
    let key_prefix = q.key_prefix.unwrap_or_default().trim().to_string();
    let (change, error) = if key_prefix.is_empty() {
        (None, None)
    } else {
        match fleet::applied(&state.store, &key_prefix, now, state.heartbeat_interval).await {
            Ok(Some(a)) => (Some(a), None),
            Ok(None) => (None, Some(format!("No key has the prefix {key_prefix}."))),
            Err(e) => return AdminError::from(e).into_html(),
        }
    };
    let page = SidecarsPage {
        chrome: Chrome::new(&user, "sidecars"),
        sidecars: sidecars
            .into_iter()
            .map(|h| SidecarView {
                this: h.id == state.identity.id,
                id: h.id,
                host: h.host,
                version: h.version,
                started: human_time(h.started_at),
                seen: human_time(h.seen_at),
                table_age: h
                    .table_age_ms
                    .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "not loaded".into()),
                keys: h.keys,
                watermark: human_time(h.watermark),
            })
            .collect(),
        key_prefix,
        change,
        error,
    };
    render(&page)
}

async fn audit_page(
    State(state): State<Arc<AdminState>>,
    ConsoleUser(user): ConsoleUser,
    Query(q): Query<AuditQuery>,
) -> Response {
    let (rows, error) = match q.filter() {
        Ok(f) => match state.manager.store.audit_page(&f).await {
            Ok(rows) => {
                let next = (rows.len() as i64 == f.limit)
                    .then(|| rows.last().map(|r| r.id))
                    .flatten();
                (Some((rows, next)), None)
            }
            Err(e) => return AdminError::from(e).into_html(),
        },
        Err(e) => (None, Some(e.to_string())),
    };
    let (rows, next_before) = rows.unwrap_or_default();
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("actor_type", &q.actor_type),
        ("action", &q.action),
        ("key_prefix", &q.key_prefix),
        ("since", &q.since),
        ("until", &q.until),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            query.append_pair(k, v);
        }
    }
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let page = AuditPage {
        chrome: Chrome::new(&user, "audit"),
        entries: rows
            .iter()
            .map(|r| AuditView {
                at: human_time(r.at),
                actor_type: r.actor_type.clone(),
                actor: match (r.actor_type.as_str(), &r.actor_id) {
                    ("user" | "setup", Some(id)) => format!("user #{id}"),
                    (_, Some(id)) => id.clone(),
                    (_, None) => String::new(),
                },
                action: r.action.clone(),
                key_prefix: r.key_prefix.clone().unwrap_or_default(),
                scopes: r
                    .scopes
                    .as_deref()
                    .unwrap_or("")
                    .split_ascii_whitespace()
                    .map(str::to_string)
                    .collect(),
                detail: r.detail.clone(),
                client: r.client_addr.clone().unwrap_or_default(),
            })
            .collect(),
        actor_types: [
            "user",
            "service_account",
            "gateway",
            "cli",
            "system",
            "setup",
        ]
        .into_iter()
        .map(|value| Choice {
            value,
            selected: q.actor_type.as_deref() == Some(value),
        })
        .collect(),
        filter: FilterView {
            action: text(&q.action),
            key_prefix: text(&q.key_prefix),
            since: text(&q.since),
            until: text(&q.until),
        },
        query: query.finish(),
        next_before,
        error,
    };
    render(&page)
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("static/console.css"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("static/console.js"),
    )
}

// ---- helpers --------------------------------------------------------------------------

async fn signed_in(state: &AdminState, user_id: i64, addr: Option<String>) -> Response {
    match session::start(state, user_id, addr).await {
        Ok((cookie, _)) => {
            let mut r = Redirect::to("/admin/service-accounts").into_response();
            r.headers_mut().insert(header::SET_COOKIE, cookie);
            r
        }
        Err(e) => e.into_html(),
    }
}

/// CSRF first, then the role: every console form changes keys or accounts.
fn check_form(user: &CurrentUser, form: &Form) -> Result<(), AdminError> {
    user.check_csrf(form.get("csrf"))?;
    user.require_key_manager()
}

fn key_view(k: &KeyRecord, now: i64, stale_after_ms: i64) -> KeyView {
    let status = key_status(k, now);
    KeyView {
        id: k.id,
        name: k.name.clone(),
        prefix: k.prefix.clone(),
        scopes: k
            .scopes
            .split_ascii_whitespace()
            .map(str::to_string)
            .collect(),
        created: human_time(k.created_at),
        last_used: k
            .last_used_at
            .map(human_time)
            .unwrap_or_else(|| "never".into()),
        last_client: k.last_client_addr.clone().unwrap_or_else(|| "–".into()),
        expires: k
            .expires_at
            .map(human_time)
            .unwrap_or_else(|| "never".into()),
        status,
        stale: is_stale(k, now, stale_after_ms),
        live: matches!(status, "active" | "expiring"),
        propagation: String::new(),
    }
}

/// `2026-11-26 20:50 UTC`: minutes are what people compare in a table.
fn human_time(ms: i64) -> String {
    let s = rfc3339(ms);
    match (s.get(..10), s.get(11..16)) {
        (Some(d), Some(t)) => format!("{d} {t} UTC"),
        _ => s,
    }
}

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "console template failed to render");
            AdminError::Invalid("the page could not be rendered".into()).into_html()
        }
    }
}

/// A parsed `application/x-www-form-urlencoded` body; repeated fields (checkboxes) kept.
struct Form(HashMap<String, Vec<String>>);

impl Form {
    fn parse(body: &[u8]) -> Form {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            map.entry(k.into_owned()).or_default().push(v.into_owned());
        }
        Form(map)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.first()).map(String::as_str)
    }

    /// The field's first value, or "" when missing.
    fn one(&self, name: &str) -> &str {
        self.get(name).unwrap_or("")
    }

    fn all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.get(name).into_iter().flatten().map(String::as_str)
    }
}
