//! The admin JSON API and console over real HTTP, on both engines: setup link, login and
//! sessions, every role × action, CSRF, the key lifecycle, audit filters and export.

use std::time::Duration;

use http::{Method, Request, StatusCode};
use keygate::clock::{system_now_ms, Clock};
use keygate::manage::{Actor, Password, Role};
use serde_json::{json, Value};

use crate::both_engines;
use crate::harness::*;

pub const PASSWORD: &str = "correct horse battery";

/// A logged-in API client: the session cookie and the CSRF token login returned.
#[derive(Clone, Debug)]
pub struct Session {
    pub cookie: String,
    pub csrf: String,
}

pub async fn add_user(app: &TestApp, email: &str, role: Role) {
    app.manager
        .add_user(email, role, &Password::new(PASSWORD), &Actor::cli())
        .await
        .expect("add user");
}

pub async fn login(app: &TestApp, email: &str) -> Session {
    let r = admin(
        app,
        Method::POST,
        "/admin/api/v1/login",
        None,
        None,
        Some(json!({"email": email, "password": PASSWORD})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let set_cookie = r.headers["set-cookie"].to_str().expect("ascii").to_string();
    let cookie = set_cookie
        .split(';')
        .next()
        .expect("name=value")
        .to_string();
    Session {
        cookie,
        csrf: r.json()["csrf_token"].as_str().expect("csrf").to_string(),
    }
}

/// Logs in a new user with `role` and returns its session.
pub async fn session_as(app: &TestApp, role: Role) -> Session {
    let email = format!("{}@example.com", role.as_str());
    add_user(app, &email, role).await;
    login(app, &email).await
}

/// One admin request: `csrf` is sent as `X-CSRF-Token` when given.
pub async fn admin(
    app: &TestApp,
    method: Method,
    path: &str,
    session: Option<&Session>,
    csrf: Option<&str>,
    body: Option<Value>,
) -> TestResponse {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{}{}", app.admin_addr, path));
    if let Some(s) = session {
        req = req.header("cookie", &s.cookie);
    }
    if let Some(c) = csrf {
        req = req.header("x-csrf-token", c);
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(full(b.to_string())),
        None => req.body(empty()),
    }
    .expect("request");
    app.send(req).await
}

/// A state-changing call with the session's own CSRF token.
pub async fn change(
    app: &TestApp,
    method: Method,
    path: &str,
    s: &Session,
    body: Option<Value>,
) -> TestResponse {
    admin(app, method, path, Some(s), Some(&s.csrf), body).await
}

pub async fn get(app: &TestApp, path: &str, s: &Session) -> TestResponse {
    admin(app, Method::GET, path, Some(s), None, None).await
}

/// Creates an account and a key through the API; returns (account id, key id, key).
pub async fn account_with_key(
    app: &TestApp,
    s: &Session,
    name: &str,
    scopes: &[&str],
) -> (i64, i64, String) {
    let r = change(
        app,
        Method::POST,
        "/admin/api/v1/service-accounts",
        s,
        Some(json!({"name": name})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let account = r.json()["id"].as_i64().expect("id");
    let r = change(
        app,
        Method::POST,
        &format!("/admin/api/v1/service-accounts/{account}/keys"),
        s,
        Some(json!({"name": "primary", "scopes": scopes})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let key = v["key"]
        .as_str()
        .expect("the create response carries the key")
        .to_string();
    app.wait_for_key(&key[..8]).await;
    (account, v["id"].as_i64().expect("id"), key)
}

both_engines! {
    async fn the_setup_link_creates_the_owner_once_and_nothing_else(engine: Engine) {
        let app = spawn_app(engine).await;
        let url = app.keygate.as_ref().expect("running").setup_url.clone().expect("no users: a setup link");
        let path_and_query = &url[url.find("/admin").expect("path")..];
        let token = url.split("token=").nth(1).expect("token");

        let page = app.admin_get(path_and_query).await;
        assert_eq!(page.status, 200);
        assert!(page.text().contains("Create the owner account"));
        assert!(app.admin_get("/admin/setup?token=wrong").await.status == 404);

        let form = |email: &str| format!("token={token}&email={email}&password=a+long+enough+password");
        let post = |body: String| Request::post(format!("http://{}/admin/setup", app.admin_addr))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full(body)).expect("request");
        let short = app.send(post(format!("token={token}&email=first%40example.com&password=short"))).await;
        assert_eq!(short.status, StatusCode::BAD_REQUEST, "a refused form is not a 200");
        assert!(short.text().contains("Create the owner account"), "the form again, to correct");
        assert!(app.manager.store.users().await.expect("users").is_empty());
        let r = app.send(post(form("first%40example.com"))).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text());
        assert!(r.headers["set-cookie"].to_str().expect("ascii").contains("HttpOnly"));
        let again = app.send(post(form("second%40example.com"))).await;
        assert_eq!(again.status, 404, "the link works once");

        let users = app.manager.store.users().await.expect("users");
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].email, "first@example.com");
        assert_eq!(users[0].role, "owner");
    }
}

both_engines! {
    async fn login_sets_a_strict_http_only_cookie_and_logout_ends_the_session(engine: Engine) {
        let app = spawn_app(engine).await;
        add_user(&app, "ada@example.com", Role::Admin).await;
        let r = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
            Some(json!({"email": "ada@example.com", "password": PASSWORD}))).await;
        assert_eq!(r.status, 200);
        let cookie = r.headers["set-cookie"].to_str().expect("ascii");
        assert!(cookie.starts_with("keygate_session="), "{cookie}");
        for attr in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
            assert!(cookie.contains(attr), "{cookie} lacks {attr}");
        }
        assert!(!cookie.contains("Secure"), "secure_cookies defaults to false");
        assert!(!r.text().contains(PASSWORD));

        let s = login(&app, "ada@example.com").await;
        assert_eq!(get(&app, "/admin/api/v1/session", &s).await.json()["user"]["role"], "admin");
        let no_csrf = admin(&app, Method::POST, "/admin/api/v1/logout", Some(&s), None, None).await;
        assert_eq!(no_csrf.status, 403);
        assert_eq!(change(&app, Method::POST, "/admin/api/v1/logout", &s, None).await.status, 204);
        assert_eq!(get(&app, "/admin/api/v1/session", &s).await.status, 401, "the session ended");
        assert_eq!(app.admin_get("/admin/api/v1/service-accounts").await.status, 401);
        let console = app.admin_get("/admin/service-accounts").await;
        assert_eq!(console.status, StatusCode::SEE_OTHER);
        assert_eq!(console.headers["location"], "/admin/login");
    }
}

both_engines! {
    async fn the_console_refuses_a_sign_in_form_sent_from_another_site(engine: Engine) {
        // Login CSRF: a page elsewhere posting valid credentials would sign the victim's
        // browser in to the attacker's account. Browsers label such a form `cross-site`.
        let app = spawn_app(engine).await;
        add_user(&app, "ada@example.com", Role::Admin).await;
        let form = format!("email=ada%40example.com&password={}", PASSWORD.replace(' ', "+"));
        let post = |site: Option<&'static str>| {
            let mut req = Request::post(format!("http://{}/admin/login", app.admin_addr))
                .header("content-type", "application/x-www-form-urlencoded");
            if let Some(site) = site {
                req = req.header("sec-fetch-site", site);
            }
            req.body(full(form.clone())).expect("request")
        };
        let refused = app.send(post(Some("cross-site"))).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(refused.headers.get("set-cookie").is_none(), "no session for a cross-site form");
        assert!(refused.text().contains("another site"), "{}", refused.text());
        let logins = |audit: Vec<keygate::store::AuditEntry>| audit.into_iter().filter(|a| a.action.starts_with("user.login")).count();
        assert_eq!(logins(app.manager.store.audit(100).await.expect("audit")), 0, "refused before the password is checked");
        // keygate's own page (same-origin), and a client that does not label its requests.
        for site in [Some("same-origin"), None] {
            let r = app.send(post(site)).await;
            assert_eq!(r.status, StatusCode::SEE_OTHER, "{site:?}");
            assert!(r.headers["set-cookie"].to_str().expect("ascii").starts_with("keygate_session="));
        }
        assert_eq!(logins(app.manager.store.audit(100).await.expect("audit")), 2);
    }
}

both_engines! {
    async fn failed_logins_are_audited_and_throttled_per_email(engine: Engine) {
        let app = spawn_app(engine).await;
        add_user(&app, "ada@example.com", Role::Owner).await;
        for _ in 0..5 {
            let r = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
                Some(json!({"email": "ada@example.com", "password": "wrong password!"}))).await;
            assert_eq!(r.status, 401);
            assert!(!r.text().contains("wrong password!"));
        }
        let r = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
            Some(json!({"email": "ada@example.com", "password": PASSWORD}))).await;
        assert_eq!(r.status, 429, "throttled even with the right password");
        assert!(r.headers.contains_key("retry-after"));
        let unknown = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
            Some(json!({"email": "nobody@example.com", "password": PASSWORD}))).await;
        assert_eq!(unknown.status, 401, "an unknown email looks like a wrong password");

        let failed = app.manager.store.audit(100).await.expect("audit")
            .into_iter().filter(|a| a.action == "user.login_failed").count();
        assert_eq!(failed, 6);
        let all = format!("{:?}", app.manager.store.audit(100).await.expect("audit"));
        assert!(!all.contains(PASSWORD) && !all.contains("wrong password!"), "passwords are never audited");
    }
}

both_engines! {
    async fn the_api_login_refuses_another_sites_page_and_bodies_not_sent_as_json(engine: Engine) {
        // A page elsewhere can post `{"email":…,"password":…}` as text/plain without asking
        // first (an `enctype="text/plain"` form), never as application/json.
        let app = spawn_app(engine).await;
        add_user(&app, "ada@example.com", Role::Admin).await;
        let body = json!({"email": "ada@example.com", "password": PASSWORD}).to_string();
        let post = |content_type: &'static str, site: Option<&'static str>| {
            let mut req = Request::post(format!("http://{}/admin/api/v1/login", app.admin_addr))
                .header("content-type", content_type);
            if let Some(site) = site {
                req = req.header("sec-fetch-site", site);
            }
            req.body(full(body.clone())).expect("request")
        };
        let cross = app.send(post("application/json", Some("cross-site"))).await;
        assert_eq!(cross.status, StatusCode::FORBIDDEN);
        assert_eq!(cross.json()["error"], "csrf");
        for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
            let r = app.send(post(content_type, None)).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{content_type}");
            assert!(r.text().contains("application/json"), "{}", r.text());
            assert!(r.headers.get("set-cookie").is_none(), "{content_type}");
        }
        let logins = |audit: Vec<keygate::store::AuditEntry>| audit.into_iter().filter(|a| a.action.starts_with("user.login")).count();
        assert_eq!(logins(app.manager.store.audit(100).await.expect("audit")), 0, "refused before the password is checked");
        let ok = app.send(post("application/json; charset=utf-8", Some("same-origin"))).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    }
}

both_engines! {
    async fn logins_sent_at_once_or_respelled_get_no_more_guesses_than_the_budget(engine: Engine) {
        let app = spawn_app(engine).await;
        add_user(&app, "ada@example.com", Role::Owner).await;
        let tries = (0..30).map(|_| admin(&app, Method::POST, "/admin/api/v1/login", None, None,
            Some(json!({"email": "ada@example.com", "password": "wrong password!"}))));
        let statuses: Vec<u16> = futures_util::future::join_all(tries).await.iter().map(|r| r.status.as_u16()).collect();
        assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 5, "{statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 25, "{statuses:?}");
        // The login trims the email; the budget is the same email however it is padded or cased.
        for email in [" ada@example.com", "\tada@example.com\n", "ADA@example.com"] {
            let r = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
                Some(json!({"email": email, "password": PASSWORD}))).await;
            assert_eq!(r.status, 429, "{email:?}");
        }
        let failed = app.manager.store.audit(100).await.expect("audit")
            .into_iter().filter(|a| a.action == "user.login_failed").count();
        assert_eq!(failed, 5, "only the guesses that were checked are audited");
    }
}

both_engines! {
    async fn a_login_with_an_email_no_user_could_have_fails_like_a_wrong_password(engine: Engine) {
        let app = spawn_app(engine).await;
        add_user(&app, "ada@example.com", Role::Owner).await;
        let long = format!("ada@example.com{}", "x".repeat(100_000));
        for email in ["ada\u{0}@example.com", long.as_str()] {
            let r = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
                Some(json!({"email": email, "password": PASSWORD}))).await;
            assert_eq!(r.status, 401, "{}", r.text());
        }
        let details: Vec<String> = app.manager.store.audit(100).await.expect("audit").into_iter()
            .filter(|a| a.action == "user.login_failed").map(|a| a.detail).collect();
        assert_eq!(details.len(), 2);
        assert!(details.iter().all(|d| d.len() < 300), "the audit log keeps at most an email's length: {:?}",
            details.iter().map(String::len).collect::<Vec<_>>());
        let ok = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
            Some(json!({"email": "ada@example.com", "password": PASSWORD}))).await;
        assert_eq!(ok.status, 200, "{}", ok.text());
    }
}

both_engines! {
    async fn an_email_is_one_user_whatever_its_case(engine: Engine) {
        let app = spawn_app(engine).await;
        add_user(&app, "ada@example.com", Role::Admin).await;
        let again = app.manager.add_user("ADA@example.com", Role::Owner, &Password::new(PASSWORD), &Actor::cli()).await
            .expect_err("the same address");
        assert!(again.to_string().contains("already exists"), "{again}");
        assert_eq!(app.manager.store.users().await.expect("users").len(), 1);
        // The login and the user commands find it however it is typed.
        login(&app, "Ada@Example.COM").await;
        let disabled = app.manager.disable_user("ADA@EXAMPLE.COM", &Actor::cli()).await.expect("found");
        assert_eq!(disabled.email, "ada@example.com");
    }
}

both_engines! {
    async fn only_owners_and_admins_may_change_accounts_and_keys(engine: Engine) {
        let app = spawn_app(engine).await;
        let owner = session_as(&app, Role::Owner).await;
        let (account, key_id, _) = account_with_key(&app, &owner, "billing", &["recordings:read"]).await;

        for role in [Role::Owner, Role::Admin, Role::Operator, Role::Viewer] {
            let s = if role == Role::Owner { owner.clone() } else { session_as(&app, role).await };
            let allowed = role.manages_keys();
            let n = role.as_str();
            // Reading is open to every role, and never shows a key or a hash.
            let list = get(&app, &format!("/admin/api/v1/service-accounts/{account}"), &s).await;
            assert_eq!(list.status, 200, "{n}");
            assert!(list.json()["keys"][0].get("key").is_none());
            assert!(!list.text().contains("argon2"));

            let key_path = |k: i64| format!("/admin/api/v1/keys/{k}");
            // A key of the role's own to revoke, made by the owner.
            let r = change(&app, Method::POST, &format!("/admin/api/v1/service-accounts/{account}/keys"), &owner,
                Some(json!({"name": format!("for-{n}"), "scopes": ["recordings:read"]}))).await;
            let victim = r.json()["id"].as_i64().expect("id");

            let calls: Vec<(&str, Method, String, Option<Value>, u16)> = vec![
                ("create account", Method::POST, "/admin/api/v1/service-accounts".into(), Some(json!({"name": format!("acct-{n}")})), 201),
                ("issue key", Method::POST, format!("/admin/api/v1/service-accounts/{account}/keys"), Some(json!({"name": format!("by-{n}"), "scopes": ["recordings:read"]})), 201),
                ("change expiry", Method::PATCH, key_path(key_id), Some(json!({"expires_at": "2099-01-01T00:00:00Z"})), 200),
                ("clear expiry", Method::PATCH, key_path(key_id), Some(json!({"expires_at": null})), 200),
                ("create replacement", Method::POST, format!("{}/replace", key_path(victim)), Some(json!({"name": format!("next-{n}")})), 201),
                ("revoke", Method::POST, format!("{}/revoke", key_path(victim)), None, 200),
            ];
            for (what, method, path, body, ok) in calls {
                let r = change(&app, method, &path, &s, body).await;
                if allowed {
                    assert_eq!(r.status.as_u16(), ok, "{n} {what}: {}", r.text());
                } else {
                    assert_eq!(r.status, 403, "{n} {what}");
                    assert_eq!(r.json()["message"], "API key issuance is admin/owner-only", "{n} {what}");
                }
            }
        }
        // Nothing the operator or viewer tried was written.
        let accounts = app.manager.store.accounts().await.expect("accounts");
        let names: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["acct-admin", "acct-owner", "billing"]);
        let keys = app.manager.store.keys(Some(account)).await.expect("keys");
        assert!(keys.iter().all(|k| !k.name.starts_with("by-operator") && !k.name.starts_with("by-viewer")));
        assert!(keys.iter().filter(|k| k.name == "for-operator" || k.name == "for-viewer").all(|k| k.revoked_at.is_none()));
    }
}

both_engines! {
    async fn state_changing_calls_without_the_csrf_token_are_refused_and_change_nothing(engine: Engine) {
        let app = spawn_app(engine).await;
        let s = session_as(&app, Role::Owner).await;
        let (account, key_id, _) = account_with_key(&app, &s, "billing", &["recordings:read"]).await;
        let calls: Vec<(Method, String, Option<Value>)> = vec![
            (Method::POST, "/admin/api/v1/service-accounts".into(), Some(json!({"name": "forged"}))),
            (Method::POST, format!("/admin/api/v1/service-accounts/{account}/keys"), Some(json!({"name": "forged", "scopes": ["recordings:read"]}))),
            (Method::PATCH, format!("/admin/api/v1/keys/{key_id}"), Some(json!({"expires_at": "2099-01-01T00:00:00Z"}))),
            (Method::POST, format!("/admin/api/v1/keys/{key_id}/replace"), Some(json!({"name": "forged"}))),
            (Method::POST, format!("/admin/api/v1/keys/{key_id}/revoke"), None),
            (Method::POST, "/admin/api/v1/logout".into(), None),
        ];
        for (method, path, body) in calls {
            for token in [None, Some("0".repeat(64))] {
                let r = admin(&app, method.clone(), &path, Some(&s), token.as_deref(), body.clone()).await;
                assert_eq!(r.status, 403, "{method} {path} with {token:?}");
                assert_eq!(r.json()["error"], "csrf");
            }
        }
        assert_eq!(app.manager.store.accounts().await.expect("accounts").len(), 1);
        let keys = app.manager.store.keys(None).await.expect("keys");
        assert_eq!(keys.len(), 1);
        assert!(keys[0].revoked_at.is_none() && keys[0].expires_at.is_none());
        assert_eq!(get(&app, "/admin/api/v1/session", &s).await.status, 200, "still logged in");

        // Console forms need the hidden field just the same.
        let r = app.send(Request::post(format!("http://{}/admin/keys/{key_id}/revoke", app.admin_addr))
            .header("cookie", &s.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full("csrf=nope")).expect("request")).await;
        assert_eq!(r.status, 403);
        assert!(app.manager.store.key(key_id).await.expect("key").expect("exists").revoked_at.is_none());
    }
}

both_engines! {
    async fn a_key_lives_its_whole_life_through_the_api_and_the_audit_shows_prefixes_only(engine: Engine) {
        let app = spawn_app(engine).await;
        let s = session_as(&app, Role::Admin).await;
        let (account, key_id, key) = account_with_key(&app, &s, "billing", &["recordings:read", "tickets:write"]).await;
        assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 200);

        let bad = change(&app, Method::POST, &format!("/admin/api/v1/service-accounts/{account}/keys"), &s,
            Some(json!({"name": "typo", "scopes": ["recordings:raed"]}))).await;
        assert_eq!(bad.status, 400, "scopes come from the configured routes");
        let dup = change(&app, Method::POST, &format!("/admin/api/v1/service-accounts/{account}/keys"), &s,
            Some(json!({"name": "primary", "scopes": ["recordings:read"]}))).await;
        assert_eq!(dup.status, 409);

        let listed = get(&app, &format!("/admin/api/v1/service-accounts/{account}/keys"), &s).await;
        let listed = listed.json();
        assert_eq!(listed["keys"][0]["prefix"], &key[..8]);
        assert_eq!(listed["keys"][0]["status"], "active");
        assert_eq!(listed["keys"][0]["stale"], false);
        assert!(!listed.to_string().contains(&key[9..]), "a list never holds the key");

        let r = change(&app, Method::PATCH, &format!("/admin/api/v1/keys/{key_id}"), &s, Some(json!({"expires_at": "2099-01-01T00:00:00Z"}))).await;
        assert_eq!(r.json()["status"], "expiring");
        let r = change(&app, Method::PATCH, &format!("/admin/api/v1/keys/{key_id}"), &s, Some(json!({"expires_at": "not a time"}))).await;
        assert_eq!(r.status, 400);

        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{key_id}/revoke"), &s, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"], "revoked");
        let again = change(&app, Method::POST, &format!("/admin/api/v1/keys/{key_id}/revoke"), &s, None).await;
        assert_eq!(again.status, 409);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while app.get("/recordings/1", Some(&key)).await.status != 401 {
            assert!(std::time::Instant::now() < deadline, "the revoked key keeps working");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(get(&app, "/admin/api/v1/keys/999999", &s).await.status, 404);

        let audit = get(&app, &format!("/admin/api/v1/audit?key_prefix={}", &key[..8]), &s).await.json();
        let changes: Vec<&str> = audit["entries"].as_array().expect("entries").iter()
            .map(|e| e["detail"]["change"].as_str().unwrap_or("")).collect();
        assert_eq!(changes, ["key.revoked", "key.expiry_changed", "key.created"], "newest first");
        let created = &audit["entries"][2];
        assert_eq!(created["actor_type"], "user");
        assert_eq!(created["action"], "user.updated");
        assert_eq!(created["scopes"], json!(["recordings:read", "tickets:write"]));
        assert_eq!(created["client_addr"], "127.0.0.1");
        let export = get(&app, "/admin/api/v1/audit?format=jsonl", &s).await;
        assert_eq!(export.headers["content-type"], "application/x-ndjson");
        let lines: Vec<Value> = export.text().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        assert!(lines.len() >= 5, "{lines:?}");
        assert!(!export.text().contains(&key) && !export.text().contains(&key[9..]), "no key in the audit");

        let page1 = get(&app, "/admin/api/v1/audit?limit=2", &s).await.json();
        let before = page1["next_before"].as_i64().expect("more pages");
        let page2 = get(&app, &format!("/admin/api/v1/audit?limit=2&before={before}"), &s).await.json();
        assert!(page2["entries"][0]["id"].as_i64() < page1["entries"][1]["id"].as_i64());
        let users = get(&app, "/admin/api/v1/audit?actor_type=user&action=user.login", &s).await.json();
        assert_eq!(users["entries"].as_array().expect("entries").len(), 1);
        let future = get(&app, "/admin/api/v1/audit?since=2099-01-01T00:00:00Z", &s).await.json();
        assert_eq!(future["entries"], json!([]));
        assert_eq!(get(&app, "/admin/api/v1/audit?since=yesterday", &s).await.status, 400);
    }
}

both_engines! {
    async fn an_account_named_like_a_script_is_escaped_in_the_console(engine: Engine) {
        let app = spawn_app(engine).await;
        let s = session_as(&app, Role::Owner).await;
        let evil = "<script>alert(1)</script>";
        let r = change(&app, Method::POST, "/admin/api/v1/service-accounts", &s, Some(json!({"name": evil}))).await;
        assert_eq!(r.status, 201);
        let id = r.json()["id"].as_i64().expect("id");
        for path in ["/admin/service-accounts".to_string(), format!("/admin/service-accounts/{id}")] {
            let page = get(&app, &path, &s).await;
            assert_eq!(page.status, 200);
            let html = page.text();
            assert!(!html.contains(evil), "{path} renders the name raw");
            assert!(html.contains("&#60;script&#62;alert(1)&#60;/script&#62;") || html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{path}");
            assert_eq!(page.headers["content-security-policy"].to_str().expect("ascii").split(';').next(), Some("default-src 'self'"));
            assert!(page.headers["content-security-policy"].to_str().expect("ascii").contains("frame-ancestors 'none'"));
            assert_eq!(page.headers["x-content-type-options"], "nosniff");
        }
        let bad = change(&app, Method::POST, "/admin/api/v1/service-accounts", &s, Some(json!({"name": "two\nlines"}))).await;
        assert_eq!(bad.status, 400, "no control characters: the name becomes a header value");
    }
}

both_engines! {
    async fn input_no_engine_can_store_gets_400_and_a_pasted_key_is_never_echoed(engine: Engine) {
        let app = spawn_app(engine).await;
        let s = session_as(&app, Role::Owner).await;
        let (account, key_id, key) = account_with_key(&app, &s, "billing", &["recordings:read"]).await;
        let snapshot = |app: &TestApp| {
            let store = app.manager.store.clone();
            async move { format!("{:?}", (store.accounts().await.expect("accounts"), store.keys(None).await.expect("keys"))) }
        };
        let before = snapshot(&app).await;

        // Descriptions: printable text of a bounded length (a NUL made PostgreSQL answer 503;
        // terminal escapes reached `keygate account list`).
        for description in ["a\u{0}b".to_string(), "\u{1b}[2J\u{1b}[31mred".into(), "x".repeat(501)] {
            let r = change(&app, Method::POST, "/admin/api/v1/service-accounts", &s,
                Some(json!({"name": "ops", "description": description}))).await;
            assert_eq!(r.status, 400, "{}", r.text());
            assert!(r.json()["message"].as_str().expect("message").contains("description"));
        }
        // Durations past 100 years are refused, not wrapped into a key that expires at once.
        for window in ["9223372036854775s", "18446744073709552s", "106751991d"] {
            let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{key_id}/replace"), &s,
                Some(json!({"name": "next", "window": window}))).await;
            assert_eq!(r.status, 400, "{window}: {}", r.text());
            assert!(r.text().contains("longer than 100 years"), "{}", r.text());
        }
        // Auto-retire reads last-used stamps that arrive up to a minute late.
        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{key_id}/replace"), &s,
            Some(json!({"name": "next", "retire_after_idle": "1s"}))).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("at least 2m"), "{}", r.text());
        assert_eq!(snapshot(&app).await, before, "nothing changed");

        // Query parameters that can match nothing are said to be wrong, never a 503.
        for path in ["/admin/api/v1/audit?action=a%00", "/admin/api/v1/audit?actor_type=%00",
                     "/admin/api/v1/audit?key_prefix=%00", "/admin/api/v1/sidecars?key_prefix=%00"] {
            let r = get(&app, path, &s).await;
            assert_eq!(r.status, 400, "{path}: {}", r.text());
        }

        // A whole key pasted where an id or a prefix belongs is never repeated back.
        let secret = &key[8..];
        for path in [format!("/admin/api/v1/keys/{key}"), format!("/admin/api/v1/audit?key_prefix={key}"),
                     format!("/admin/api/v1/sidecars?key_prefix={key}")] {
            let r = get(&app, &path, &s).await;
            assert!(r.status.is_client_error(), "{path}: {}", r.status);
            assert!(!r.text().contains(secret), "{path} echoed the key: {}", r.text());
            assert!(r.text().contains(&key[..8]), "but names the prefix: {}", r.text());
        }
        let listed = get(&app, &format!("/admin/api/v1/sidecars?key_prefix={}", &key[..8]), &s).await;
        assert_eq!(listed.status, 200, "{}", listed.text());
        let _ = account;
    }
}

both_engines! {
    async fn an_idle_session_expires_and_unused_keys_are_flagged_stale(engine: Engine) {
        let clock = Clock::manual(system_now_ms());
        let app = spawn_app_with(engine, AppOptions { clock: clock.clone(), ..Default::default() }).await;
        let s = session_as(&app, Role::Viewer).await;
        let owner = session_as(&app, Role::Owner).await;
        let (account, _, _) = account_with_key(&app, &owner, "billing", &["recordings:read"]).await;
        clock.advance_ms(29 * 60_000);
        assert_eq!(get(&app, "/admin/api/v1/session", &s).await.status, 200, "activity keeps it alive");
        clock.advance_ms(29 * 60_000);
        assert_eq!(get(&app, "/admin/api/v1/session", &s).await.status, 200);
        clock.advance_ms(30 * 60_000);
        assert_eq!(get(&app, "/admin/api/v1/session", &s).await.status, 401, "idle for 30 minutes");
        assert_eq!(get(&app, "/admin/api/v1/session", &s).await.status, 401, "and it stays ended");

        let owner = login(&app, "owner@example.com").await;
        let keys = get(&app, &format!("/admin/api/v1/service-accounts/{account}/keys"), &owner).await.json();
        assert_eq!(keys["keys"][0]["stale"], false);
        clock.advance_ms(30 * 86_400_000);
        let owner = login(&app, "owner@example.com").await;
        let keys = get(&app, &format!("/admin/api/v1/service-accounts/{account}/keys"), &owner).await.json();
        assert_eq!(keys["keys"][0]["stale"], true, "unused for 30 days");
    }
}

both_engines! {
    async fn gateway_keys_are_listed_as_gateway_owned_and_cannot_be_revoked_here(engine: Engine) {
        let app = spawn_app(engine).await;
        let s = session_as(&app, Role::Owner).await;
        let prefix = keygate::keys::generate(keygate::keys::KeyKind::Gateway).prefix().to_string();
        // Pairing belongs to the gateway flow; a paired row is all this test needs.
        let sql = "INSERT INTO gateways (name, prefix, api_key_hash, scopes, created_at, created_by, paired_at)
                   VALUES ('edge-1', $1, '$argon2id$fake', 'recordings:read', 1, 'test', 1)";
        match &app.manager.store {
            keygate::store::Store::Sqlite(p) => { sqlx::query(sql).bind(&prefix).execute(p).await.expect("insert"); }
            keygate::store::Store::Postgres(p) => { sqlx::query(sql).bind(&prefix).execute(p).await.expect("insert"); }
        }
        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{prefix}/revoke"), &s, None).await;
        assert_eq!(r.status, 409, "{}", r.text());
        assert!(r.json()["message"].as_str().expect("message").contains("gateway unpair flow"));
        let viewer = session_as(&app, Role::Viewer).await;
        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{prefix}/revoke"), &viewer, None).await;
        assert_eq!(r.status, 403, "the role check comes first");

        let page = get(&app, "/admin/service-accounts", &s).await.text();
        let row = &page[page.find(&format!("data-prefix=\"{prefix}\"")).expect("the gateway key is listed")..];
        let row = &row[..row.find("</tr>").expect("row end")];
        assert!(row.contains("gateway-owned") && row.contains("disabled") && row.contains("unpair"), "{row}");

        // Service-account keys can be named by prefix as well as by id.
        let (_, _, key) = account_with_key(&app, &s, "billing", &["recordings:read"]).await;
        let r = get(&app, &format!("/admin/api/v1/keys/{}", &key[..8]), &s).await;
        assert_eq!(r.json()["prefix"], &key[..8]);
    }
}

both_engines! {
    async fn disabling_demoting_or_resetting_a_user_takes_effect_on_its_open_sessions(engine: Engine) {
        let app = spawn_app(engine).await;
        let owner = session_as(&app, Role::Owner).await;
        let ops = session_as(&app, Role::Operator).await;
        let m = &app.manager;
        let cli = Actor::cli();
        let create = |s: Session, name: &'static str| {
            let app = &app;
            async move {
                change(app, Method::POST, "/admin/api/v1/service-accounts", &s, Some(json!({"name": name})))
                    .await
                    .status
            }
        };

        // A promotion applies to the session already open; a demotion likewise.
        assert_eq!(create(ops.clone(), "billing").await, 403);
        let promoted = m.set_user_role("operator@example.com", Role::Admin, &cli).await.expect("promote");
        assert_eq!(promoted.role, "admin");
        assert_eq!(create(ops.clone(), "billing").await, 201, "the open session acts as admin now");
        m.set_user_role("operator@example.com", Role::Viewer, &cli).await.expect("demote");
        assert_eq!(create(ops.clone(), "tickets").await, 403);

        // Disabling ends every session of the user at once and refuses new sign-ins.
        let second = login(&app, "operator@example.com").await;
        let disabled = m.disable_user("operator@example.com", &cli).await.expect("disable");
        assert!(disabled.disabled_at.is_some());
        for s in [&ops, &second] {
            assert_eq!(get(&app, "/admin/api/v1/session", s).await.status, 401);
        }
        let refused = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
            Some(json!({"email": "operator@example.com", "password": PASSWORD}))).await;
        assert_eq!(refused.status, 401);
        m.enable_user("operator@example.com", &cli).await.expect("enable");
        assert_eq!(get(&app, "/admin/api/v1/session", &ops).await.status, 401, "old sessions stay ended");
        let back = login(&app, "operator@example.com").await;

        // A new password ends the user's sessions; only the new password signs in.
        m.set_user_password("operator@example.com", &Password::new("a brand new passphrase"), &cli)
            .await
            .expect("new password");
        assert_eq!(get(&app, "/admin/api/v1/session", &back).await.status, 401);
        let old = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
            Some(json!({"email": "operator@example.com", "password": PASSWORD}))).await;
        assert_eq!(old.status, 401);
        let new = admin(&app, Method::POST, "/admin/api/v1/login", None, None,
            Some(json!({"email": "operator@example.com", "password": "a brand new passphrase"}))).await;
        assert_eq!(new.status, 200, "{}", new.text());

        // Bad changes are refused with a reason and change nothing.
        let refused = |r: Result<keygate::store::User, keygate::manage::ManageError>| r.expect_err("refused").to_string();
        assert!(refused(m.disable_user("owner@example.com", &cli).await).contains("last enabled owner"));
        assert!(refused(m.set_user_role("owner@example.com", Role::Admin, &cli).await).contains("last enabled owner"));
        assert!(refused(m.disable_user("nobody@example.com", &cli).await).contains("no console user"));
        assert!(refused(m.set_user_role("operator@example.com", Role::Viewer, &cli).await).contains("already has role viewer"));
        assert!(refused(m.enable_user("operator@example.com", &cli).await).contains("is not disabled"));
        assert!(refused(m.set_user_password("operator@example.com", &Password::new("short"), &cli).await).contains("10-256"));
        assert_eq!(get(&app, "/admin/api/v1/session", &owner).await.status, 200, "the owner was not touched");
        let users = m.store.users().await.expect("users");
        let role_of = |email: &str| users.iter().find(|u| u.email == email).map(|u| (u.role.clone(), u.disabled_at.is_some()));
        assert_eq!(role_of("owner@example.com"), Some(("owner".into(), false)));
        assert_eq!(role_of("operator@example.com"), Some(("viewer".into(), false)));

        // With a second owner, the first may step down.
        m.set_user_role("operator@example.com", Role::Owner, &cli).await.expect("second owner");
        m.set_user_role("owner@example.com", Role::Admin, &cli).await.expect("the first steps down");

        let audit = get(&app, "/admin/api/v1/audit?action=user.updated", &owner).await.json();
        let changes: Vec<(String, String)> = audit["entries"].as_array().expect("entries").iter()
            .map(|e| (e["detail"]["change"].as_str().unwrap_or("").to_string(), e["detail"]["email"].as_str().unwrap_or("").to_string()))
            .filter(|(change, _)| change.starts_with("user."))
            .collect();
        let op = |c: &str| (c.to_string(), "operator@example.com".to_string());
        assert_eq!(changes, [
            ("user.role_changed".to_string(), "owner@example.com".to_string()),
            op("user.role_changed"), op("user.password_changed"), op("user.enabled"), op("user.disabled"),
            op("user.role_changed"), op("user.role_changed"),
        ], "newest first; refused changes left no entry");
        assert_eq!(audit["entries"][0]["detail"]["to"], "admin");
        assert_eq!(audit["entries"][0]["actor_type"], "cli");
        assert!(!audit.to_string().contains("brand new"), "no password in the audit");
    }
}

both_engines! {
    async fn two_owners_demoting_each_other_at_once_leave_one_owner(engine: Engine) {
        let app = spawn_app(engine).await;
        let m = &app.manager;
        let cli = Actor::cli();
        add_user(&app, "a@example.com", Role::Owner).await;
        add_user(&app, "b@example.com", Role::Owner).await;
        for round in 0..10 {
            let (a, b) = tokio::join!(
                m.set_user_role("a@example.com", Role::Admin, &cli),
                m.disable_user("b@example.com", &cli),
            );
            assert!(a.is_ok() != b.is_ok(), "round {round}: exactly one may succeed: {a:?} {b:?}");
            let owners: Vec<String> = m.store.users().await.expect("users").into_iter()
                .filter(|u| u.role == "owner" && u.disabled_at.is_none()).map(|u| u.email).collect();
            assert_eq!(owners.len(), 1, "round {round}: {owners:?}");
            // Back to two owners for the next round.
            if a.is_ok() {
                m.set_user_role("a@example.com", Role::Owner, &cli).await.expect("restore a");
            } else {
                m.enable_user("b@example.com", &cli).await.expect("restore b");
            }
        }
    }
}
