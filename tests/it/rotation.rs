//! Key rotation against a live integration, on both engines: the replacement flow with steady
//! traffic and zero failed requests, the scheduled variant at its exact expiry, auto-retire,
//! and the data-plane parts rotation relies on (expiry header, last client, request audit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request};
use keygate::clock::{parse_rfc3339, rfc3339, system_now_ms, Clock};
use keygate::keys::KeyPrefix;
use keygate::manage::Role;
use serde_json::json;

use crate::admin_api::{account_with_key, change, get, session_as};
use crate::both_engines;
use crate::harness::*;

/// Polls `check` (async) every 20 ms until it holds, failing after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

both_engines! {
    async fn a_live_integration_rotates_to_a_replacement_key_without_a_failed_request(engine: Engine) {
        let app = spawn_app(engine).await;
        let s = session_as(&app, Role::Admin).await;
        let (_, old_id, old_key) = account_with_key(&app, &s, "billing", &["recordings:read", "tickets:write"]).await;

        // The integration: steady traffic with whatever key it was last told to use.
        let current = Arc::new(Mutex::new(old_key.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
        let traffic = {
            let (current, stop, ok, failed) = (current.clone(), stop.clone(), ok.clone(), failed.clone());
            let url = app.url("/recordings/7");
            tokio::spawn(async move {
                let client = client();
                while !stop.load(Ordering::Relaxed) {
                    let key = current.lock().expect("lock").clone();
                    let req = Request::get(&url).header("authorization", format!("Bearer {key}")).body(empty()).expect("request");
                    let r = send_with(&client, req).await;
                    if r.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.lock().expect("lock").push((key[..8].to_string(), r.status));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Create replacement: same scopes, the old key gets a 7-day window in the same step.
        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{old_id}/replace"), &s,
            Some(json!({"name": "primary-2026-12", "window": "7d"}))).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json();
        let new_key = v["replacement"]["key"].as_str().expect("the key, once").to_string();
        let new_id = v["replacement"]["id"].as_i64().expect("id");
        assert_eq!(v["replacement"]["scopes"], json!(["recordings:read", "tickets:write"]));
        assert_eq!(v["old"]["status"], "expiring");
        assert_eq!(v["old"]["replaced_by"], new_id);
        let window = parse_rfc3339(v["old"]["expires_at"].as_str().expect("expiry")).expect("time") - system_now_ms();
        assert!((7 * 86_400_000 - 60_000..=7 * 86_400_000).contains(&window), "{window}");
        app.wait_for_key(&new_key[..8]).await;

        // Switch the integration and watch Last used (and the client) fill in on the new key.
        *current.lock().expect("lock") = new_key.clone();
        let started = Instant::now();
        eventually(Duration::from_secs(60), "Last used on the new key", || async {
            !get(&app, &format!("/admin/api/v1/keys/{new_id}"), &s).await.json()["last_used_at"].is_null()
        }).await;
        assert!(started.elapsed() < Duration::from_secs(60));
        let new = get(&app, &format!("/admin/api/v1/keys/{new_id}"), &s).await.json();
        assert_eq!(new["last_client_addr"], "127.0.0.1");
        let old = get(&app, &format!("/admin/api/v1/keys/{old_id}"), &s).await.json();
        assert!(!old["last_used_at"].is_null(), "the old key's use before the switch is recorded");

        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{old_id}/revoke"), &s, None).await;
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        traffic.await.expect("traffic task");

        let failed = failed.lock().expect("lock").clone();
        assert!(failed.is_empty(), "failed requests during rotation: {failed:?}");
        assert!(ok.load(Ordering::Relaxed) > 50, "steady traffic ran: {}", ok.load(Ordering::Relaxed));
        eventually(Duration::from_secs(5), "the old key is refused", || async {
            app.get("/recordings/7", Some(&old_key)).await.status == 401
        }).await;
        assert_eq!(app.get("/recordings/7", Some(&new_key)).await.status, 200);
    }
}

both_engines! {
    async fn a_replacement_of_a_key_revoked_meanwhile_writes_nothing(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let old = app.create_key(&account, "primary", &["recordings:read"]).await;
        let actor = keygate::manage::Actor::cli();
        // The API read the key, then a revoke landed before the replacement was written.
        let seen = app.manager.store.key(old.record.id).await.expect("key").expect("exists");
        app.manager.revoke_key(&seen, &actor).await.expect("revoke");
        let audit_before = app.manager.store.audit(1000).await.expect("audit").len();

        let err = app.manager.replace_key(&seen, "next", 7 * 86_400_000, None, &actor).await
            .expect_err("the old key is revoked");
        assert!(matches!(err, keygate::manage::ManageError::Conflict(_)), "{err:?}");
        assert!(err.to_string().contains(&old.record.prefix), "names the key by prefix: {err}");
        let keys = app.manager.store.keys(Some(account.id)).await.expect("keys");
        assert_eq!(keys.len(), 1, "no replacement key was left behind: {keys:?}");
        assert_eq!(app.manager.store.audit(1000).await.expect("audit").len(), audit_before, "nothing audited");
        // The name is still free for the next try.
        app.create_key(&account, "next", &["recordings:read"]).await;
    }
}

both_engines! {
    async fn a_replacement_never_lengthens_or_revives_the_old_key(engine: Engine) {
        let clock = Clock::manual(system_now_ms());
        let app = spawn_app_with(engine, AppOptions { clock: clock.clone(), ..Default::default() }).await;
        let account = app.create_account("billing").await;
        let actor = keygate::manage::Actor::cli();
        let hour = 3_600_000;

        // An expiry an hour ahead stays an hour ahead: a 7-day window does not stretch it.
        let soon = app.create_key_expiring(&account, "soon", &["recordings:read"], Some(clock.now_ms() + hour)).await;
        let (_, old) = app.manager.replace_key(&soon.record, "soon-next", 7 * 86_400_000, None, &actor).await.expect("replace");
        assert_eq!(old.expires_at, Some(clock.now_ms() + hour));
        // A window shorter than the expiry it has shortens it.
        let later = app.create_key_expiring(&account, "later", &["recordings:read"], Some(clock.now_ms() + 30 * 86_400_000)).await;
        let (_, old) = app.manager.replace_key(&later.record, "later-next", 7 * 86_400_000, None, &actor).await.expect("replace");
        assert_eq!(old.expires_at, Some(clock.now_ms() + 7 * 86_400_000));

        // An expired key stays expired; its replacement is a working key with its scopes.
        let gone = app.create_key_expiring(&account, "gone", &["recordings:read"], Some(clock.now_ms() + hour)).await;
        clock.advance_ms(2 * hour);
        let (new, old) = app.manager.replace_key(&gone.record, "gone-next", 7 * 86_400_000, None, &actor).await.expect("replace");
        assert_eq!(old.expires_at, gone.record.expires_at, "not revived");
        app.wait_for_key(new.key.prefix().as_str()).await;
        assert_eq!(app.get("/recordings/1", Some(new.key.expose())).await.status, 200);
        assert_eq!(app.get("/recordings/1", Some(gone.key.expose())).await.status, 401);
    }
}

both_engines! {
    async fn a_scheduled_rotation_keeps_the_old_key_until_its_expiry_and_refuses_it_right_after(engine: Engine) {
        let clock = Clock::manual(system_now_ms());
        let app = spawn_app_with(engine, AppOptions { clock: clock.clone(), ..Default::default() }).await;
        let s = session_as(&app, Role::Owner).await;
        let (_, old_id, old_key) = account_with_key(&app, &s, "billing", &["recordings:read"]).await;
        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{old_id}/replace"), &s,
            Some(json!({"name": "next"}))).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json();
        let new_key = v["replacement"]["key"].as_str().expect("key").to_string();
        let expires_at = app.manager.store.key(old_id).await.expect("key").expect("exists").expires_at.expect("expiry");
        assert_eq!(expires_at, clock.now_ms() + 7 * 86_400_000, "the default window is 7 days");
        assert_eq!(v["old"]["expires_at"], rfc3339(expires_at).as_str());
        app.wait_for_key(&new_key[..8]).await;
        let table = app.keygate.as_ref().expect("running").table.clone();
        let old_prefix = KeyPrefix::parse(&old_key[..8]).expect("prefix");
        wait_until(Duration::from_secs(5), || table.lookup(&old_prefix).is_some_and(|e| e.expires_at().is_some())).await;

        clock.set_ms(expires_at - 1);
        let r = app.get("/recordings/1", Some(&old_key)).await;
        assert_eq!(r.status, 200, "the old key works until its expires_at");
        assert_eq!(r.headers["x-keygate-key-expires-at"], rfc3339(expires_at).as_str());
        let r = app.get("/recordings/1", Some(&new_key)).await;
        assert_eq!(r.status, 200);
        assert!(r.headers.get("x-keygate-key-expires-at").is_none(), "the new key has no expiry");

        clock.set_ms(expires_at);
        assert_eq!(app.get("/recordings/1", Some(&old_key)).await.status, 401, "401 right at expiry");
        assert_eq!(app.get("/recordings/1", Some(&new_key)).await.status, 200);
    }
}

both_engines! {
    async fn auto_retire_revokes_the_old_key_once_the_new_one_carries_traffic_and_the_old_one_idles(engine: Engine) {
        let clock = Clock::manual(system_now_ms());
        let app = spawn_app_with(engine, AppOptions { clock: clock.clone(), ..Default::default() }).await;
        let s = session_as(&app, Role::Owner).await;
        let (_, old_id, old_key) = account_with_key(&app, &s, "billing", &["recordings:read"]).await;
        assert_eq!(app.get("/recordings/1", Some(&old_key)).await.status, 200);
        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{old_id}/replace"), &s,
            Some(json!({"name": "next", "window": "30d", "retire_after_idle": "10m"}))).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let new_key = r.json()["replacement"]["key"].as_str().expect("key").to_string();
        app.wait_for_key(&new_key[..8]).await;

        // Idle but the new key has carried no traffic yet: the old key stays.
        clock.advance_ms(11 * 60_000);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(app.manager.store.key(old_id).await.expect("key").expect("exists").revoked_at.is_none());

        assert_eq!(app.get("/recordings/1", Some(&new_key)).await.status, 200);
        eventually(Duration::from_secs(10), "auto-retire", || async {
            app.manager.store.key(old_id).await.expect("key").expect("exists").revoked_at.is_some()
        }).await;
        let old = app.manager.store.key(old_id).await.expect("key").expect("exists");
        assert_eq!(old.revoked_by.as_deref(), Some("system:auto-retire"));
        let audit = app.manager.store.audit(50).await.expect("audit");
        assert!(audit.iter().any(|a| a.actor_type == "system" && a.key_prefix.as_deref() == Some(&old_key[..8])
            && a.detail.contains("key.revoked")), "{audit:?}");
        eventually(Duration::from_secs(5), "the retired key is refused", || async {
            app.get("/recordings/1", Some(&old_key)).await.status == 401
        }).await;
        assert_eq!(app.get("/recordings/1", Some(&new_key)).await.status, 200);
    }
}

both_engines! {
    async fn proxied_requests_are_audited_per_route_with_the_client_address(engine: Engine) {
        let upstream = Upstream::start().await;
        let extra = format!(r#"
[[routes]]
name = "everything"
path_prefix = "/everything"
upstream = "http://{0}"
scope = "tickets:write"
audit = "all"

[[routes]]
name = "quiet"
path_prefix = "/quiet"
upstream = "http://{0}"
scope = "tickets:write"
audit = "none"
"#, upstream.addr);
        let app = spawn_on(TestDb::new(engine).await, upstream, AppOptions { extra_toml: extra, ..Default::default() }).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read", "recordings:write", "tickets:write"]).await;
        let key = issued.key.expose();
        let post = |path: &str| Request::post(app.url(path)).header("x-api-key", key).body(full("x")).expect("request");

        assert_eq!(app.get("/recordings/1", Some(key)).await.status, 200, "a read: not audited by default");
        assert_eq!(app.send(post("/recordings/1")).await.status, 200, "a write: audited");
        assert_eq!(app.get("/everything/1", Some(key)).await.status, 200, "audit = all");
        assert_eq!(app.send(post("/quiet/1")).await.status, 200, "audit = none");

        let requests = || async {
            app.manager.store.audit(100).await.expect("audit").into_iter()
                .filter(|a| a.actor_type == "service_account").collect::<Vec<_>>()
        };
        eventually(Duration::from_secs(5), "two audited requests", || async { requests().await.len() >= 2 }).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut seen: Vec<(String, String)> = requests().await.iter().map(|a| {
            let d: serde_json::Value = serde_json::from_str(&a.detail).expect("json");
            assert_eq!(a.key_prefix.as_deref(), Some(issued.key.prefix().as_str()));
            assert_eq!(a.actor_id.as_deref(), Some("billing"));
            assert_eq!(d["account"], "billing");
            assert_eq!(d["status"], 200);
            assert_eq!(a.client_addr.as_deref(), Some("127.0.0.1"));
            assert!(!a.detail.contains(key));
            (d["method"].as_str().expect("m").to_string(), d["path"].as_str().expect("p").to_string())
        }).collect();
        seen.sort();
        assert_eq!(seen, [("GET".to_string(), "/everything/1".to_string()), ("POST".to_string(), "/recordings/1".to_string())]);

        let mut app = app;
        app.shutdown().await;
        let rec = app.manager.store.key(issued.record.id).await.expect("key").expect("exists");
        assert_eq!(rec.last_client_addr.as_deref(), Some("127.0.0.1"));
    }
}

both_engines! {
    async fn audited_requests_still_queued_at_shutdown_are_written(engine: Engine) {
        let mut app = spawn_app_with(engine, AppOptions { flush_interval: "60s", ..Default::default() }).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["tickets:write"]).await;
        for _ in 0..3 {
            let req = Request::post(app.url("/tickets/1")).header("x-api-key", issued.key.expose()).body(full("x")).expect("request");
            assert_eq!(app.send(req).await.status, 200);
        }
        assert_eq!(app.keygate.as_ref().expect("running").proxy.audit.pending(), 3, "nothing written yet");
        app.shutdown().await;
        let n = app.manager.store.audit(100).await.expect("audit").into_iter()
            .filter(|a| a.actor_type == "service_account").count();
        assert_eq!(n, 3);
    }
}

both_engines! {
    async fn an_emergency_rotation_revokes_first_and_the_new_key_works_at_once(engine: Engine) {
        let app = spawn_app(engine).await;
        let s = session_as(&app, Role::Admin).await;
        let (account, old_id, old_key) = account_with_key(&app, &s, "billing", &["recordings:read"]).await;
        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{old_id}/revoke"), &s, None).await;
        assert_eq!(r.status, 200);
        eventually(Duration::from_secs(5), "the leaked key is refused", || async {
            app.get("/recordings/1", Some(&old_key)).await.status == 401
        }).await;
        let replace = change(&app, Method::POST, &format!("/admin/api/v1/keys/{old_id}/replace"), &s, Some(json!({"name": "x"}))).await;
        assert_eq!(replace.status, 409, "a revoked key has no rotation window to give");
        let r = change(&app, Method::POST, &format!("/admin/api/v1/service-accounts/{account}/keys"), &s,
            Some(json!({"name": "after-incident", "scopes": ["recordings:read"]}))).await;
        assert_eq!(r.status, 201);
        let new_key = r.json()["key"].as_str().expect("key").to_string();
        app.wait_for_key(&new_key[..8]).await;
        assert_eq!(app.get("/recordings/1", Some(&new_key)).await.status, 200);
    }
}

both_engines! {
    async fn a_full_batch_of_audited_requests_is_written_before_the_interval(engine: Engine) {
        let app = spawn_app_with(engine, AppOptions { flush_interval: "60s", ..Default::default() }).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["tickets:write"]).await;
        let key = issued.key.expose().to_string();
        let mut tasks = Vec::new();
        for worker in 0..4 {
            let (url, key) = (app.url(&format!("/tickets/{worker}")), key.clone());
            tasks.push(tokio::spawn(async move {
                let c = client();
                for _ in 0..275 {
                    let req = Request::post(&url).header("x-api-key", &key).body(full("x")).expect("request");
                    assert_eq!(send_with(&c, req).await.status, 200);
                }
            }));
        }
        for t in tasks {
            t.await.expect("worker");
        }
        eventually(Duration::from_secs(10), "a batch written long before the 60 s interval", || async {
            app.manager.store.audit(2_000).await.expect("audit").iter().filter(|a| a.actor_type == "service_account").count() >= 1_000
        }).await;
        assert_eq!(app.keygate.as_ref().expect("running").proxy.audit.dropped_total(), 0);
    }
}
