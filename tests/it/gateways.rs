//! Gateways on both engines: pair, unpair and re-pair through the API, the console and the
//! real binary, each proven through the proxy (the paired key works, an unpaired or
//! re-paired-away key gets 401), with audit, last seen, roles and the keys API's 409.

use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use keygate::keys::KeyPrefix;
use keygate::manage::Role;
use serde_json::{json, Value};

use crate::admin_api::{admin, change, get, session_as, Session};
use crate::both_engines;
use crate::cli::{fails_with, keygate, ok, write_config};
use crate::harness::*;

/// Gateway keys may read and write recordings, never tickets.
const GATEWAY_TOML: &str = "[gateways]\nscopes = [\"recordings:read\", \"recordings:write\"]\n";

fn opts() -> AppOptions {
    AppOptions {
        extra_toml: GATEWAY_TOML.into(),
        ..Default::default()
    }
}

/// Pairs `name` through the API; returns (gateway id, key) once every table knows the key.
async fn pair(app: &TestApp, s: &Session, name: &str) -> (i64, String) {
    let r = change(
        app,
        Method::POST,
        "/admin/api/v1/gateways",
        s,
        Some(json!({"name": name})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.headers["cache-control"], "no-store");
    let v = r.json();
    let key = v["key"]
        .as_str()
        .expect("the pair response carries the key")
        .to_string();
    app.wait_for_key(&key[..8]).await;
    (v["id"].as_i64().expect("id"), key)
}

/// Polls the proxy until `key` gets `status` on GET /recordings/1; returns how long it took.
async fn until_status(app: &TestApp, key: &str, status: u16) -> Duration {
    let started = Instant::now();
    loop {
        let got = app.get("/recordings/1", Some(key)).await.status;
        if got == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still {got}, not {status}, after 5s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn gateway_list(app: &TestApp, s: &Session) -> Vec<Value> {
    let r = get(app, "/admin/api/v1/gateways", s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["gateways"].as_array().expect("list").clone()
}

async fn last_audit(app: &TestApp, s: &Session, query: &str) -> Value {
    let r = get(app, &format!("/admin/api/v1/audit?{query}"), s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["entries"][0].clone()
}

both_engines! {
    async fn a_gateway_is_paired_repaired_and_unpaired_through_the_api_and_the_proxy_follows(engine: Engine) {
        let app = spawn_app_with(engine, opts()).await;
        let s = session_as(&app, Role::Owner).await;
        let (id, key) = pair(&app, &s, "warehouse-7").await;
        assert!(key.starts_with("kgg"), "gateway keys carry their own marker: {}", &key[..3]);

        // The key authenticates like any key, with the configured scopes and nothing more.
        assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 200);
        let seen = app.upstream.last();
        assert_eq!(seen.headers["x-keygate-account"], "warehouse-7");
        assert_eq!(seen.headers["x-keygate-key-prefix"], &key[..8]);
        assert_eq!(seen.headers["x-keygate-scopes"], "recordings:read recordings:write");
        assert_eq!(app.get("/tickets/1", Some(&key)).await.status, 403);

        // The list shows prefix, state and last seen, never the key or its hash.
        let list = get(&app, "/admin/api/v1/gateways", &s).await;
        assert!(!list.text().contains(&key[9..]) && !list.text().contains("argon2"), "{}", list.text());
        let list = gateway_list(&app, &s).await;
        let g = &list[0];
        assert_eq!((g["id"].as_i64(), g["name"].as_str(), g["prefix"].as_str(), g["state"].as_str()),
                   (Some(id), Some("warehouse-7"), Some(&key[..8]), Some("paired")));
        assert_eq!(g["scopes"], json!(["recordings:read", "recordings:write"]));
        assert_eq!(get(&app, &format!("/admin/api/v1/gateways/{id}"), &s).await.json()["prefix"], &key[..8]);
        let audit = last_audit(&app, &s, "action=gateway.paired").await;
        assert_eq!(audit["actor_type"], "user");
        assert!(audit["actor_id"].is_string());
        assert_eq!(audit["key_prefix"], &key[..8]);
        assert_eq!(audit["detail"]["gateway_id"], id);

        // Re-pair: a new key, and the old one stops working in the same step.
        let r = change(&app, Method::POST, &format!("/admin/api/v1/gateways/{id}/repair"), &s, None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(r.headers["cache-control"], "no-store");
        let new_key = r.json()["key"].as_str().expect("new key").to_string();
        assert_ne!(&new_key[..8], &key[..8]);
        assert_eq!(r.json()["prefix"], &new_key[..8]);
        app.wait_for_key(&new_key[..8]).await;
        until_status(&app, &key, 401).await;
        assert_eq!(app.get("/recordings/1", Some(&new_key)).await.status, 200);
        let table = app.keygate.as_ref().expect("running").table.clone();
        assert!(table.lookup(&KeyPrefix::parse(&key[..8]).expect("prefix")).is_none(), "the old prefix is gone");
        let audit = last_audit(&app, &s, "action=gateway.repaired").await;
        assert_eq!(audit["key_prefix"], &new_key[..8]);
        assert_eq!(audit["detail"]["gateway_id"], id);
        assert_eq!(audit["detail"]["old_prefix"], &key[..8]);

        // Unpair: the key gets 401 within the propagation time.
        let r = change(&app, Method::POST, &format!("/admin/api/v1/gateways/{id}/unpair"), &s, None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["state"], "unpaired");
        assert!(r.json().get("key").is_none());
        until_status(&app, &new_key, 401).await;
        let list = gateway_list(&app, &s).await;
        let g = &list[0];
        assert_eq!(g["state"], "unpaired");
        assert!(g["prefix"].is_null(), "an unpaired gateway holds no key");
        assert!(g["unpaired_at"].is_string());
        let audit = last_audit(&app, &s, "action=gateway.unpaired").await;
        assert_eq!(audit["key_prefix"], &new_key[..8]);
        assert_eq!(audit["detail"]["gateway_id"], id);
        let again = change(&app, Method::POST, &format!("/admin/api/v1/gateways/{id}/unpair"), &s, None).await;
        assert_eq!(again.status, 409, "{}", again.text());
        assert!(again.json()["message"].as_str().expect("message").contains("already unpaired"));

        // Re-pairing an unpaired gateway pairs it again with a fresh key.
        let r = change(&app, Method::POST, &format!("/admin/api/v1/gateways/{id}/repair"), &s, None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let third = r.json()["key"].as_str().expect("key").to_string();
        app.wait_for_key(&third[..8]).await;
        until_status(&app, &third, 200).await;
        assert_eq!(app.get("/recordings/1", Some(&new_key)).await.status, 401);
    }
}

both_engines! {
    async fn bad_pairing_requests_get_clear_errors_and_change_nothing(engine: Engine) {
        let app = spawn_app_with(engine, opts()).await;
        let s = session_as(&app, Role::Owner).await;
        pair(&app, &s, "edge-1").await;
        let audit_before = get(&app, "/admin/api/v1/audit?limit=500", &s).await.json()["entries"].as_array().expect("entries").len();
        let cases: [(Value, u16, &str); 4] = [
            (json!({"name": "edge-1"}), 409, "already exists"),
            (json!({"name": "two\nlines"}), 400, "a gateway name must be"),
            (json!({"name": ""}), 400, "a gateway name must be"),
            (json!({"nome": "x"}), 400, "bad JSON body"),
        ];
        for (body, status, message) in cases {
            let r = change(&app, Method::POST, "/admin/api/v1/gateways", &s, Some(body.clone())).await;
            assert_eq!(r.status, status, "{body}: {}", r.text());
            assert!(r.json()["message"].as_str().expect("message").contains(message), "{}", r.text());
        }
        for path in ["/admin/api/v1/gateways/999/unpair", "/admin/api/v1/gateways/999/repair", "/admin/api/v1/gateways/edge-1/repair"] {
            let r = change(&app, Method::POST, path, &s, None).await;
            assert_eq!(r.status, 404, "{path}: {}", r.text());
            assert!(r.json()["message"].as_str().expect("message").contains("no gateway with id"));
        }
        assert_eq!(gateway_list(&app, &s).await.len(), 1);
        let audit_after = get(&app, "/admin/api/v1/audit?limit=500", &s).await.json()["entries"].as_array().expect("entries").len();
        assert_eq!(audit_before, audit_after, "refused requests audit nothing");

        // Without [gateways] scopes, pairing is refused and names the setting.
        let bare = spawn_app(engine).await;
        let s = session_as(&bare, Role::Owner).await;
        let r = change(&bare, Method::POST, "/admin/api/v1/gateways", &s, Some(json!({"name": "edge-1"}))).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.json()["message"].as_str().expect("message").contains("[gateways] scopes"));
        assert!(gateway_list(&bare, &s).await.is_empty());
    }
}

both_engines! {
    async fn only_owners_and_admins_may_pair_unpair_or_repair(engine: Engine) {
        let app = spawn_app_with(engine, opts()).await;
        let owner = session_as(&app, Role::Owner).await;
        let (id, key) = pair(&app, &owner, "edge-1").await;
        for role in [Role::Operator, Role::Viewer] {
            let s = session_as(&app, role).await;
            let calls = [
                ("/admin/api/v1/gateways".to_string(), Some(json!({"name": "edge-2"}))),
                (format!("/admin/api/v1/gateways/{id}/unpair"), None),
                (format!("/admin/api/v1/gateways/{id}/repair"), None),
            ];
            for (path, body) in calls {
                let r = change(&app, Method::POST, &path, &s, body).await;
                assert_eq!(r.status, 403, "{role:?} {path}");
                assert_eq!(r.json()["message"], keygate::admin::PAIRING_FORBIDDEN, "{role:?} {path}");
            }
            assert_eq!(gateway_list(&app, &s).await.len(), 1, "{role:?} may list");
        }
        // CSRF comes first, for every role.
        let r = admin(&app, Method::POST, &format!("/admin/api/v1/gateways/{id}/unpair"), Some(&owner), None, None).await;
        assert_eq!((r.status, r.json()["error"].as_str()), (StatusCode::FORBIDDEN, Some("csrf")));
        // Nothing changed: one gateway, still paired with the same key.
        let list = gateway_list(&app, &owner).await;
        assert_eq!((list.len(), list[0]["state"].as_str(), list[0]["prefix"].as_str()), (1, Some("paired"), Some(&key[..8])));
        assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 200);

        let admin_session = session_as(&app, Role::Admin).await;
        pair(&app, &admin_session, "edge-2").await;
        let r = change(&app, Method::POST, &format!("/admin/api/v1/gateways/{id}/repair"), &admin_session, None).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let r = change(&app, Method::POST, &format!("/admin/api/v1/gateways/{id}/unpair"), &admin_session, None).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

both_engines! {
    async fn revoking_a_paired_key_through_the_keys_api_gets_409_naming_the_unpair_path(engine: Engine) {
        let app = spawn_app_with(engine, opts()).await;
        let s = session_as(&app, Role::Owner).await;
        let (id, key) = pair(&app, &s, "edge-1").await;
        let r = change(&app, Method::POST, &format!("/admin/api/v1/keys/{}/revoke", &key[..8]), &s, None).await;
        assert_eq!(r.status, 409, "{}", r.text());
        let message = r.json()["message"].as_str().expect("message").to_string();
        assert!(message.contains("gateway unpair flow"), "{message}");
        assert!(message.contains(&format!("/admin/api/v1/gateways/{id}/unpair")), "{message}");
        assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 200, "the key still works");

        // The API Keys page lists it gateway-owned, Revoke disabled, linked to its gateway.
        let page = get(&app, "/admin/service-accounts", &s).await.text();
        let row = &page[page.find(&format!("data-prefix=\"{}\"", &key[..8])).expect("listed")..];
        let row = &row[..row.find("</tr>").expect("row end")];
        assert!(row.contains("gateway-owned") && row.contains("disabled"), "{row}");
        assert!(row.contains(&format!("href=\"/admin/gateways#gateway-{id}\"")), "{row}");
    }
}

both_engines! {
    async fn gateway_traffic_stamps_last_seen_and_is_audited_as_a_gateway(engine: Engine) {
        let app = spawn_app_with(engine, opts()).await;
        let s = session_as(&app, Role::Owner).await;
        let (id, key) = pair(&app, &s, "edge-1").await;
        assert!(gateway_list(&app, &s).await[0]["last_seen_at"].is_null());
        let req = Request::post(app.url("/recordings"))
            .header("authorization", format!("Bearer {key}"))
            .body(full("x"))
            .expect("request");
        assert_eq!(app.send(req).await.status, 200);

        let started = Instant::now();
        let seen = loop {
            let g = gateway_list(&app, &s).await.remove(0);
            if g["last_seen_at"].is_string() {
                break g;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "last seen was not stamped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(seen["id"], id);
        let entry = loop {
            let e = last_audit(&app, &s, "actor_type=gateway&action=proxy.request").await;
            if !e.is_null() {
                break e;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "the request was not audited");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(entry["actor_id"], "edge-1");
        assert_eq!(entry["key_prefix"], &key[..8]);
        assert_eq!(entry["detail"]["gateway_id"], id);
        assert_eq!(entry["detail"]["method"], "POST");
        assert_eq!(entry["detail"]["path"], "/recordings");
        assert!(!entry.to_string().contains(&key[9..]));
    }
}

both_engines! {
    async fn an_unpaired_key_gets_401_on_every_sidecar(engine: Engine) {
        let db = TestDb::new(engine).await;
        let upstream = Upstream::start().await;
        let options = opts();
        let mut sidecars = Vec::new();
        for _ in 0..2 {
            let k = start_keygate(&db.url, upstream.addr, &options).await;
            assert!(k.ready(Duration::from_secs(10)).await, "sidecar loads");
            sidecars.push(k);
        }
        let manager = manager_for(&db.url).await;
        let scopes = keygate::keys::Scopes::new(vec![keygate::keys::Scope::new("recordings:read").expect("scope")]);
        let actor = keygate::manage::Actor::cli();
        let paired = manager.pair_gateway("edge-1", &scopes, &actor).await.expect("pair");
        let client = client();
        let status = |addr: std::net::SocketAddr, key: String| {
            let client = client.clone();
            async move {
                let req = Request::get(format!("http://{addr}/recordings/1"))
                    .header("authorization", format!("Bearer {key}"))
                    .body(empty())
                    .expect("request");
                send_with(&client, req).await.status
            }
        };
        let key = paired.key.expose().to_string();
        for k in &sidecars {
            let table = k.table.clone();
            wait_until(Duration::from_secs(5), || table.lookup(&paired.key.prefix()).is_some()).await;
            assert_eq!(status(k.proxy_addr, key.clone()).await, 200);
        }
        let unpaired_at = Instant::now();
        manager.unpair_gateway(&paired.gateway, &actor).await.expect("unpair");
        for k in &sidecars {
            loop {
                if status(k.proxy_addr, key.clone()).await == 401 {
                    break;
                }
                // refresh_interval is 100ms in tests; a second is ten refreshes.
                assert!(unpaired_at.elapsed() < Duration::from_secs(1), "a sidecar still accepts the unpaired key");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(k.table.lookup(&paired.key.prefix()).is_none(), "the table dropped the key");
        }
        eprintln!("{engine:?}: unpaired key refused by both sidecars {:?} after the unpair", unpaired_at.elapsed());
        for k in sidecars {
            k.shutdown().await;
        }
    }
}

both_engines! {
    async fn the_cli_pairs_repairs_unpairs_and_lists_gateways_through_the_real_binary(engine: Engine) {
        let db = TestDb::new(engine).await;
        let url = db.url.clone();
        let app = spawn_on(db, Upstream::start().await, opts()).await;
        let cfg = write_config(&format!("[database]\nurl = \"{url}\"\n[hashing]\nmemory_kib = 1024\niterations = 1\n{GATEWAY_TOML}"));

        let out = ok(keygate(&cfg.path, &["gateway", "pair", "warehouse-7", "--json"]));
        let paired: Value = serde_json::from_str(out.trim()).expect("json");
        let key = paired["key"].as_str().expect("key").to_string();
        assert!(key.starts_with("kgg"));
        assert_eq!(paired["prefix"].as_str(), Some(&key[..8]));
        assert_eq!(paired["state"], "paired");
        app.wait_for_key(&key[..8]).await;
        assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 200);

        let human = ok(keygate(&cfg.path, &["gateway", "pair", "dock-2"]));
        assert!(human.contains("shown only this once") && human.contains("kgg"), "{human}");
        fails_with(keygate(&cfg.path, &["gateway", "pair", "warehouse-7"]), "already exists");
        fails_with(keygate(&cfg.path, &["gateway", "unpair", "nowhere"]), "no gateway named `nowhere`");
        fails_with(keygate(&cfg.path, &["key", "revoke", &key[..8]]), "keygate gateway unpair");

        let list = ok(keygate(&cfg.path, &["gateway", "list", "--json"]));
        assert!(!list.contains(&key[9..]) && !list.contains("argon2"), "{list}");
        let gateways: Value = serde_json::from_str(list.trim()).expect("json");
        let w = gateways.as_array().expect("array").iter().find(|g| g["name"] == "warehouse-7").expect("listed");
        assert_eq!((w["prefix"].as_str(), w["state"].as_str()), (Some(&key[..8]), Some("paired")));
        let table = ok(keygate(&cfg.path, &["gateway", "list"]));
        assert!(table.contains("LAST SEEN") && table.contains(&key[..8]) && !table.contains(&key[9..]), "{table}");

        let out = ok(keygate(&cfg.path, &["gateway", "repair", "warehouse-7", "--json"]));
        let new_key = serde_json::from_str::<Value>(out.trim()).expect("json")["key"].as_str().expect("key").to_string();
        app.wait_for_key(&new_key[..8]).await;
        until_status(&app, &key, 401).await;
        assert_eq!(app.get("/recordings/1", Some(&new_key)).await.status, 200);

        let out = ok(keygate(&cfg.path, &["gateway", "unpair", "warehouse-7"]));
        assert!(out.contains(&new_key[..8]) && !out.contains(&new_key[9..]), "{out}");
        until_status(&app, &new_key, 401).await;
        fails_with(keygate(&cfg.path, &["gateway", "unpair", "warehouse-7"]), "already unpaired");
        let gateways: Value = serde_json::from_str(ok(keygate(&cfg.path, &["gateway", "list", "--json"])).trim()).expect("json");
        let w = gateways.as_array().expect("array").iter().find(|g| g["name"] == "warehouse-7").expect("listed");
        assert_eq!(w["state"], "unpaired");

        let actions: Vec<String> = app.manager.store.audit(50).await.expect("audit").into_iter()
            .filter(|e| e.action.starts_with("gateway."))
            .map(|e| format!("{} {}", e.actor_type, e.action))
            .collect();
        assert_eq!(actions, ["cli gateway.unpaired", "cli gateway.repaired", "cli gateway.paired", "cli gateway.paired"]);
    }
}

both_engines! {
    async fn the_console_pairs_with_the_key_shown_once_and_unpairs_behind_a_confirmation(engine: Engine) {
        let app = spawn_app_with(engine, opts()).await;
        let s = session_as(&app, Role::Owner).await;
        let form = |path: &str, body: String, s: &Session| {
            Request::post(format!("http://{}{path}", app.admin_addr))
                .header("cookie", &s.cookie)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(full(body))
                .expect("request")
        };
        let page = get(&app, "/admin/gateways", &s).await;
        assert_eq!(page.status, 200);
        let html = page.text();
        assert!(html.contains("href=\"/admin/gateways\" class=\"active\""), "reachable from the left nav");
        assert!(html.contains("id=\"pair-gateway\"") && html.contains("No gateways yet"));

        let r = app.send(form("/admin/gateways", format!("csrf={}&name=dock-3", s.csrf), &s)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.headers["cache-control"], "no-store");
        let html = r.text();
        let start = html.find("<code id=\"new-key\">").expect("the key dialog") + "<code id=\"new-key\">".len();
        let key = html[start..start + html[start..].find('<').expect("end")].to_string();
        assert!(key.starts_with("kgg"), "{key}");
        assert!(html.contains("data-open") && html.contains("shown only this once"));
        app.wait_for_key(&key[..8]).await;
        assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 200);

        let html = get(&app, "/admin/gateways", &s).await.text();
        assert!(!html.contains(&key[9..]), "the key is shown only once");
        let id = app.manager.gateway_named("dock-3").await.expect("paired").id;
        assert!(html.contains(&format!("id=\"unpair-{id}\"")) && html.contains(&format!("action=\"/admin/gateways/{id}/unpair\"")), "confirmation dialog");

        let viewer = session_as(&app, Role::Viewer).await;
        let r = app.send(form(&format!("/admin/gateways/{id}/unpair"), format!("csrf={}", viewer.csrf), &viewer)).await;
        assert_eq!(r.status, 403);
        assert!(r.text().contains(keygate::admin::PAIRING_FORBIDDEN));

        let r = app.send(form(&format!("/admin/gateways/{id}/unpair"), format!("csrf={}", s.csrf), &s)).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text());
        until_status(&app, &key, 401).await;
        let html = get(&app, "/admin/gateways", &s).await.text();
        assert!(html.contains("data-state=\"unpaired\""));

        let r = app.send(form(&format!("/admin/gateways/{id}/repair"), format!("csrf={}", s.csrf), &s)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("Gateway re-paired"));
    }
}

both_engines! {
    async fn a_reload_brings_new_route_scopes_and_gateway_scopes_to_the_api(engine: Engine) {
        // Started without [gateways] scopes and without a reports route.
        let app = spawn_app(engine).await;
        let s = session_as(&app, Role::Owner).await;
        let refused = change(&app, Method::POST, "/admin/api/v1/gateways", &s, Some(json!({"name": "edge-1"}))).await;
        assert_eq!(refused.status, 400, "{}", refused.text());
        assert!(!get(&app, "/admin/api/v1/scopes", &s).await.json()["scopes"].to_string().contains("reports:read"));

        // SIGHUP: the file now has a reports route and gateway scopes.
        let reports = format!(
            "[[routes]]\nname = \"reports\"\npath_prefix = \"/reports\"\nupstream = \"http://{}\"\nscope = \"reports:read\"\n",
            app.upstream.addr
        );
        let toml = test_config_toml("sqlite://unused.db", app.upstream.addr, &AppOptions {
            extra_toml: format!("{GATEWAY_TOML}\n{reports}"),
            ..AppOptions::default()
        });
        let config = keygate::config::Config::from_toml(&toml, "test", std::iter::empty()).expect("valid configuration");
        app.keygate.as_ref().expect("running").reload(&config).expect("reload");

        assert!(get(&app, "/admin/api/v1/scopes", &s).await.json()["scopes"].to_string().contains("reports:read"));
        let (account, _, _) = crate::admin_api::account_with_key(&app, &s, "billing", &["recordings:read"]).await;
        let r = change(&app, Method::POST, &format!("/admin/api/v1/service-accounts/{account}/keys"), &s,
            Some(json!({"name": "reports", "scopes": ["reports:read"]}))).await;
        assert_eq!(r.status, 201, "a key for the new route's scope: {}", r.text());
        let (_, key) = pair(&app, &s, "edge-1").await;
        let gateway = get(&app, "/admin/api/v1/gateways", &s).await.json();
        assert!(gateway.to_string().contains("recordings:write"), "{gateway}");
        until_status(&app, &key, 200).await;
    }
}
