//! Many sidecars on one database: revocation reaches every one of them at once (NOTIFY on
//! PostgreSQL, the refresh on SQLite), a cached verification never undoes a revoke, and the
//! fleet is visible from any sidecar's admin API.

use std::time::{Duration, Instant};

use keygate::keys::{KeyPrefix, KeyState, KeyTable};
use keygate::manage::{Actor, IssuedKey, Manager};
use keygate::server::Keygate;

use crate::both_engines;
use crate::harness::*;

/// Three sidecars on one database and one upstream.
struct Fleet {
    sidecars: Vec<Keygate>,
    manager: Manager,
    client: TestClient,
    /// A viewer's console session (sessions live in the shared database: any sidecar takes it).
    session_cookie: String,
    _upstream: Upstream,
    _db: TestDb,
}

impl Fleet {
    async fn start(engine: Engine, opts: AppOptions) -> Fleet {
        let db = TestDb::new(engine).await;
        let upstream = Upstream::start().await;
        let mut sidecars = Vec::new();
        for _ in 0..3 {
            let k = start_keygate(&db.url, upstream.addr, &opts).await;
            assert!(k.ready(Duration::from_secs(10)).await, "sidecar loads");
            sidecars.push(k);
        }
        let manager = manager_for(&db.url).await;
        let client = client();
        let session_cookie = viewer_session(&manager, &client, sidecars[0].admin_addr).await;
        Fleet {
            sidecars,
            manager,
            client,
            session_cookie,
            _upstream: upstream,
            _db: db,
        }
    }

    async fn issue(&self, name: &str) -> IssuedKey {
        let account = match self.manager.account_named("billing").await {
            Ok(a) => a,
            Err(_) => self
                .manager
                .create_account("billing", "", &Actor::cli())
                .await
                .expect("account"),
        };
        let issued = self
            .manager
            .issue_key(
                &account,
                name,
                &["recordings:read".to_string()],
                None,
                &Actor::cli(),
            )
            .await
            .expect("issue");
        let prefix = issued.key.prefix();
        for k in &self.sidecars {
            let table = k.table.clone();
            wait_until(Duration::from_secs(5), || table.lookup(&prefix).is_some()).await;
        }
        issued
    }

    async fn status(&self, sidecar: usize, key: &IssuedKey) -> http::StatusCode {
        let req = http::Request::get(format!(
            "http://{}/recordings/1",
            self.sidecars[sidecar].proxy_addr
        ))
        .header("authorization", format!("Bearer {}", key.key.expose()))
        .body(empty())
        .expect("request");
        send_with(&self.client, req).await.status
    }

    async fn admin_get(&self, sidecar: usize, path: &str) -> TestResponse {
        let req = http::Request::get(format!(
            "http://{}{path}",
            self.sidecars[sidecar].admin_addr
        ))
        .header("cookie", &self.session_cookie)
        .body(empty())
        .expect("request");
        send_with(&self.client, req).await
    }

    async fn shutdown(self) {
        for k in self.sidecars {
            k.shutdown().await;
        }
    }
}

fn refused(table: &KeyTable, prefix: &KeyPrefix) -> bool {
    table
        .lookup(prefix)
        .is_some_and(|e| e.state(keygate::clock::system_now_ms()) == KeyState::Revoked)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_three_postgres_sidecars_within_a_second() {
    // A long refresh, so what is measured is the NOTIFY path, not the backstop.
    let fleet = Fleet::start(
        Engine::Postgres,
        AppOptions {
            refresh_interval: "30s",
            ..AppOptions::default()
        },
    )
    .await;
    const KEYS: usize = 40;
    let mut keys = Vec::new();
    for i in 0..KEYS {
        let key = fleet.issue(&format!("k{i}")).await;
        for s in 0..3 {
            assert_eq!(fleet.status(s, &key).await, 200, "verified and cached");
        }
        keys.push(key);
    }

    let mut lags = Vec::new();
    for key in &keys {
        let prefix = key.key.prefix();
        let started = Instant::now();
        fleet
            .manager
            .revoke_key(&key.record, &Actor::cli())
            .await
            .expect("revoke");
        let mut pending: Vec<usize> = (0..3).collect();
        while !pending.is_empty() {
            pending.retain(|&s| {
                if refused(&fleet.sidecars[s].table, &prefix) {
                    lags.push(started.elapsed());
                    false
                } else {
                    true
                }
            });
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "a revoke took more than 1 s to reach sidecars {pending:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for s in 0..3 {
            assert_eq!(fleet.status(s, key).await, 401, "sidecar {s} refuses");
        }
    }
    lags.sort();
    let (p50, p99, max) = (
        percentile(&lags, 0.50),
        percentile(&lags, 0.99),
        *lags.last().expect("samples"),
    );
    println!(
        "revocation propagation over {} sidecar samples: p50 {p50:?}, p99 {p99:?}, max {max:?}",
        lags.len()
    );
    assert_eq!(lags.len(), 3 * KEYS);
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    for k in &fleet.sidecars {
        assert!(
            k.sync.notifications() >= KEYS as u64,
            "changes arrived as notifications"
        );
        let lag = k
            .sync
            .last_lag_ms()
            .expect("a change→applied lag is recorded");
        assert!((0..1_000).contains(&lag), "last lag {lag} ms");
        assert!(k.sync.listening());
    }
    fleet.shutdown().await;
}

both_engines! {
    async fn an_emergency_revoke_is_not_undone_by_cached_verifications(engine: Engine) {
        let fleet = Fleet::start(engine, AppOptions::default()).await;
        let key = fleet.issue("leaked").await;
        for s in 0..3 {
            assert_eq!(fleet.status(s, &key).await, 200);
            assert_eq!(fleet.status(s, &key).await, 200, "now served from the cache");
        }
        fleet.manager.revoke_key(&key.record, &Actor::cli()).await.expect("revoke");
        let started = Instant::now();
        for s in 0..3 {
            while fleet.status(s, &key).await != 401 {
                assert!(started.elapsed() < Duration::from_secs(2), "sidecar {s} still accepts");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Many refreshes later, and through the caches' lifetime: still refused everywhere.
        let until = Instant::now() + Duration::from_millis(1_500);
        let mut checks = 0;
        while Instant::now() < until {
            for s in 0..3 {
                assert_eq!(fleet.status(s, &key).await, 401, "sidecar {s} let a revoked key back in");
                checks += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(checks > 30);
        fleet.shutdown().await;
    }
}

both_engines! {
    async fn the_fleet_lists_its_sidecars_and_where_a_revoke_took_effect(engine: Engine) {
        let fleet = Fleet::start(engine, AppOptions::default()).await;
        let ids: Vec<String> = fleet.sidecars.iter().map(|k| k.identity.id.clone()).collect();
        let started = Instant::now();
        let listed = loop {
            let r = fleet.admin_get(1, "/admin/api/v1/sidecars").await;
            assert_eq!(r.status, 200);
            let body = r.json();
            // Each sidecar beats at start, and again once its table has loaded.
            if body["sidecars"]
                .as_array()
                .is_some_and(|a| a.len() == 3 && a.iter().all(|s| s["table_age_ms"].is_i64()))
            {
                break body;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "three heartbeats: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(listed["self"], ids[1].as_str());
        for s in listed["sidecars"].as_array().expect("list") {
            assert!(ids.iter().any(|id| s["id"] == id.as_str()), "{s}");
            assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
            assert!(!s["host"].as_str().expect("host").is_empty());
            assert!(s["table_age_ms"].as_i64().expect("age") >= 0);
        }

        let key = fleet.issue("rotating").await;
        fleet.manager.revoke_key(&key.record, &Actor::cli()).await.expect("revoke");
        let path = format!("/admin/api/v1/sidecars?key_prefix={}", key.key.prefix());
        let started = Instant::now();
        loop {
            let change = fleet.admin_get(0, &path).await.json()["change"].clone();
            if change["applied"] == 3 && change["of"] == 3 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "not applied everywhere: {change}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let unknown = fleet.admin_get(0, "/admin/api/v1/sidecars?key_prefix=kgsZZZZZ").await;
        assert_eq!(unknown.status, 404, "no key has this prefix");
        let malformed = fleet.admin_get(0, "/admin/api/v1/sidecars?key_prefix=kg_nope").await;
        assert_eq!(malformed.status, 400, "not a prefix at all");

        // A sidecar that stops gracefully leaves the list at once.
        let mut fleet = fleet;
        let gone = fleet.sidecars.pop().expect("third sidecar");
        let gone_id = gone.identity.id.clone();
        gone.shutdown().await;
        let body = fleet.admin_get(0, "/admin/api/v1/sidecars").await.json();
        let listed = body["sidecars"].as_array().expect("list");
        assert_eq!(listed.len(), 2, "{body}");
        assert!(listed.iter().all(|s| s["id"] != gone_id.as_str()));
        fleet.shutdown().await;
    }
}

/// Adds a viewer and logs it in; returns the session cookie (`name=value`).
async fn viewer_session(
    manager: &Manager,
    client: &TestClient,
    admin: std::net::SocketAddr,
) -> String {
    let password = "fleet watcher password";
    manager
        .add_user(
            "viewer@example.com",
            keygate::manage::Role::Viewer,
            &keygate::manage::Password::new(password),
            &Actor::cli(),
        )
        .await
        .expect("add viewer");
    let body =
        serde_json::json!({ "email": "viewer@example.com", "password": password }).to_string();
    let req = http::Request::post(format!("http://{admin}/admin/api/v1/login"))
        .header("content-type", "application/json")
        .body(full(body))
        .expect("request");
    let r = send_with(client, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let cookie = r.headers["set-cookie"].to_str().expect("ascii");
    cookie.split(';').next().expect("name=value").to_string()
}

both_engines! {
    async fn the_fleet_list_needs_a_console_session(engine: Engine) {
        let app = spawn_app(engine).await;
        let r = app.admin_get("/admin/api/v1/sidecars").await;
        assert_eq!(r.status, 401, "{}", r.text());
    }
}

both_engines! {
    async fn the_console_shows_the_fleet_and_where_a_revoke_took_effect(engine: Engine) {
        let fleet = Fleet::start(engine, AppOptions::default()).await;
        let key = fleet.issue("to-revoke").await;
        fleet.manager.revoke_key(&key.record, &Actor::cli()).await.expect("revoke");
        let prefix = key.key.prefix().to_string();
        let started = Instant::now();
        loop {
            let page = fleet.admin_get(2, &format!("/admin/sidecars?key_prefix={prefix}")).await;
            assert_eq!(page.status, 200);
            let html = page.text();
            for k in &fleet.sidecars {
                assert!(html.contains(&k.identity.id), "sidecar {} listed", k.identity.id);
            }
            if html.contains("applied on <strong>3 of 3</strong>") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "not applied on 3 of 3: {html}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let account = fleet.manager.account_named("billing").await.expect("account");
        let page = fleet.admin_get(0, &format!("/admin/service-accounts/{}", account.id)).await;
        assert_eq!(page.status, 200);
        assert!(page.text().contains("applied on 3 of 3 sidecars"), "{}", page.text());
        fleet.shutdown().await;
    }
}
