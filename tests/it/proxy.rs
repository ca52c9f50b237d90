//! The data path end to end: keygate on a real port, a real upstream, both engines.

use std::time::{Duration, Instant};

use http::Request;
use keygate::clock::{system_now_ms, Clock};
use keygate::manage::Actor;

use crate::both_engines;
use crate::harness::*;

both_engines! {
    async fn a_key_with_the_route_scope_is_forwarded_with_identity_headers(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read", "tickets:write"]).await;

        let r = app.get("/recordings/42?format=json", Some(issued.key.expose())).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "upstream ok");

        let seen = app.upstream.last();
        assert_eq!(seen.method, http::Method::GET);
        assert_eq!(seen.uri, "/recordings/42?format=json");
        assert_eq!(seen.headers["x-keygate-account"], "billing");
        assert_eq!(seen.headers["x-keygate-key-prefix"], issued.key.prefix().as_str());
        assert_eq!(seen.headers["x-keygate-scopes"], "recordings:read tickets:write");
        assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(seen.headers["x-forwarded-proto"], "http");
        assert!(seen.headers.get("authorization").is_none(), "the key never reaches the upstream");
        assert!(seen.headers.get("x-request-id").is_some());
        assert_eq!(seen.headers["x-request-id"], r.headers["x-request-id"]);
    }
}

both_engines! {
    async fn a_missing_key_gets_401_with_a_bearer_challenge(engine: Engine) {
        let app = spawn_app(engine).await;
        let r = app.get("/recordings/1", None).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="keygate""#);
        assert_eq!(r.json()["error"], "unauthorized");
        assert_eq!(app.upstream.count(), 0);
    }
}

both_engines! {
    async fn malformed_unknown_and_wrong_secret_keys_all_get_the_same_401(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let real = app.create_key(&account, "primary", &["recordings:read"]).await;
        let never_issued = keygate::keys::generate(keygate::keys::KeyKind::ServiceAccount);
        let mut typo = real.key.expose().to_string();
        typo.replace_range(20..21, if &typo[20..21] == "a" { "b" } else { "a" });
        // Same (public) prefix, another secret, valid checksum: what an attacker can forge.
        let forged = forge(&real.key.expose()[..8], &never_issued.expose()[9..41]);

        let mut bodies = Vec::new();
        for bad in ["not-a-key", typo.as_str(), never_issued.expose(), forged.as_str()] {
            let r = app.get("/recordings/1", Some(bad)).await;
            assert_eq!(r.status, 401, "{bad}");
            assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="keygate", error="invalid_token""#);
            bodies.push(r.body.clone());
        }
        assert!(bodies.windows(2).all(|w| w[0] == w[1]), "the client cannot tell the cases apart");
        assert_eq!(app.upstream.count(), 0);
        // The real key still works after the forgery attempts.
        assert_eq!(app.get("/recordings/1", Some(real.key.expose())).await.status, 200);
    }
}

both_engines! {
    async fn a_valid_key_without_the_route_scope_gets_403_naming_it(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "reader", &["recordings:read"]).await;
        let req = Request::post(app.url("/recordings/42"))
            .header("x-api-key", issued.key.expose())
            .body(full("data"))
            .expect("request");
        let r = app.send(req).await;
        assert_eq!(r.status, 403);
        assert_eq!(r.json()["required_scope"], "recordings:write");
        assert!(r.headers["www-authenticate"].to_str().expect("ascii").contains(r#"error="insufficient_scope""#));
        assert_eq!(app.upstream.count(), 0);
    }
}

both_engines! {
    async fn a_request_matching_no_route_gets_404_and_never_reaches_the_upstream(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        for path in ["/", "/admin", "/recordingsX", "/Recordings/1"] {
            assert_eq!(app.get(path, Some(issued.key.expose())).await.status, 404, "{path}");
            assert_eq!(app.get(path, None).await.status, 404, "{path} without a key");
        }
        // DELETE is not routed for /recordings.
        let req = Request::delete(app.url("/recordings/1"))
            .header("authorization", format!("Bearer {}", issued.key.expose()))
            .body(empty())
            .expect("request");
        assert_eq!(app.send(req).await.status, 404);
        assert_eq!(app.upstream.count(), 0);
    }
}

both_engines! {
    async fn a_revoked_key_is_refused_within_the_refresh_interval(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        let key = issued.key.expose().to_string();
        assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 200);

        app.manager.revoke_key(&issued.record, &Actor::cli()).await.expect("revoke");
        let revoked_at = Instant::now();
        loop {
            let status = app.get("/recordings/1", Some(&key)).await.status;
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            // refresh_interval is 100 ms here; allow generous scheduling slack.
            assert!(revoked_at.elapsed() < Duration::from_secs(2), "revoked key still accepted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // And it stays refused: the verification cache never revives it.
        for _ in 0..5 {
            assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 401);
        }
    }
}

both_engines! {
    async fn expiry_is_honoured_to_the_millisecond(engine: Engine) {
        let clock = Clock::manual(system_now_ms());
        let app = spawn_app_with(engine, AppOptions { clock: clock.clone(), ..Default::default() }).await;
        let account = app.create_account("billing").await;
        let expires_at = clock.now_ms() + 7 * 86_400_000;
        let issued = app.create_key_expiring(&account, "old", &["recordings:read"], Some(expires_at)).await;
        let key = issued.key.expose();

        clock.set_ms(expires_at - 1_000);
        assert_eq!(app.get("/recordings/1", Some(key)).await.status, 200, "a second before expiry");
        clock.set_ms(expires_at - 1);
        assert_eq!(app.get("/recordings/1", Some(key)).await.status, 200, "a millisecond before expiry");
        clock.set_ms(expires_at);
        assert_eq!(app.get("/recordings/1", Some(key)).await.status, 401, "at expiry");
        clock.set_ms(expires_at + 1_000);
        assert_eq!(app.get("/recordings/1", Some(key)).await.status, 401, "after expiry");
    }
}

both_engines! {
    async fn spoofed_identity_and_forwarding_headers_never_reach_the_upstream(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        let req = Request::get(app.url("/recordings/1"))
            .header("x-api-key", issued.key.expose())
            .header("x-keygate-account", "root")
            .header("X_Keygate_Account", "root")
            .header("x.keygate.scopes", "admin")
            .header("x-keygate-key-prefix", "kgsAAAAA")
            .header("x-keygate-other", "1")
            .header("x-forwarded-for", "10.1.2.3")
            .header("x_forwarded_for", "10.1.2.3")
            .header("forwarded", "for=10.1.2.3")
            .header("connection", "x-keygate-account")
            .body(empty())
            .expect("request");
        assert_eq!(app.send(req).await.status, 200);
        let seen = app.upstream.last();
        assert_eq!(seen.headers.get_all("x-keygate-account").iter().collect::<Vec<_>>(), vec!["billing"]);
        assert_eq!(seen.headers["x-keygate-scopes"], "recordings:read");
        assert_eq!(seen.headers["x-keygate-key-prefix"], issued.key.prefix().as_str());
        assert_eq!(seen.headers.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), vec!["127.0.0.1"]);
        for name in ["x_keygate_account", "x.keygate.scopes", "x-keygate-other", "x_forwarded_for", "forwarded", "x-api-key"] {
            assert!(seen.headers.get(name).is_none(), "{name} reached the upstream");
        }
        let secret = &issued.key.expose()[9..];
        for (name, value) in &seen.headers {
            assert!(!value.as_bytes().windows(secret.len()).any(|w| w == secret.as_bytes()), "key leaked in {name}");
        }
    }
}

both_engines! {
    async fn keys_in_both_headers_or_twice_are_refused_with_400(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        let k = issued.key.expose();
        let both = Request::get(app.url("/recordings/1"))
            .header("authorization", format!("Bearer {k}"))
            .header("x-api-key", k)
            .body(empty())
            .expect("request");
        assert_eq!(app.send(both).await.status, 400);
        let twice = Request::get(app.url("/recordings/1"))
            .header("authorization", format!("Bearer {k}"))
            .header("authorization", format!("Bearer {k}"))
            .body(empty())
            .expect("request");
        assert_eq!(app.send(twice).await.status, 400);
        assert_eq!(app.upstream.count(), 0);
    }
}

both_engines! {
    async fn request_ids_are_passed_through_or_generated(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        let req = Request::get(app.url("/recordings/1"))
            .header("x-api-key", issued.key.expose())
            .header("x-request-id", "trace-123")
            .body(empty())
            .expect("request");
        let r = app.send(req).await;
        assert_eq!(r.headers["x-request-id"], "trace-123");
        assert_eq!(app.upstream.last().headers["x-request-id"], "trace-123");
        let a = app.get("/recordings/1", Some(issued.key.expose())).await;
        let b = app.get("/recordings/1", Some(issued.key.expose())).await;
        assert_ne!(a.headers["x-request-id"], b.headers["x-request-id"]);
        assert_eq!(a.headers["x-request-id"].len(), 32);
        // Rejections carry one too, for support tickets.
        assert!(app.get("/recordings/1", None).await.headers.contains_key("x-request-id"));
    }
}

both_engines! {
    async fn a_verified_key_is_served_from_the_cache_without_argon2(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        for _ in 0..20 {
            assert_eq!(app.get("/recordings/1", Some(issued.key.expose())).await.status, 200);
        }
        let stats = &app.keygate.as_ref().expect("running").proxy.verifier.stats;
        assert_eq!(stats.argon2_runs.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(stats.cache_hits.get(), 19);
    }
}

both_engines! {
    async fn large_bodies_stream_both_ways(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("exporter").await;
        let issued = app.create_key(&account, "primary", &["recordings:read", "recordings:write"]).await;
        const SIZE: u64 = 64 * 1024 * 1024;

        let upload = Request::post(app.url("/recordings/upload"))
            .header("x-api-key", issued.key.expose())
            .body(http_body_util::BodyExt::boxed(ZeroBody::new(SIZE)))
            .expect("request");
        let r = app.send(upload).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-upstream-received-bytes"], SIZE.to_string());
        assert_eq!(app.upstream.last().body_len, SIZE);

        let r = app.get(&format!("/recordings/export/download?bytes={SIZE}"), Some(issued.key.expose())).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len() as u64, SIZE);
    }
}

both_engines! {
    async fn hop_by_hop_response_headers_are_removed(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        let r = app.get("/recordings/1", Some(issued.key.expose())).await;
        assert!(r.headers.get("x-upstream-private").is_none(), "a Connection-nominated header passed");
    }
}

both_engines! {
    async fn http2_clients_are_served(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        let req = Request::get(app.url("/recordings/7"))
            .header("authorization", format!("Bearer {}", issued.key.expose()))
            .body(empty())
            .expect("request");
        let r = send_with(&h2_client(), req).await;
        assert_eq!(r.status, 200);
        let seen = app.upstream.last();
        assert_eq!(seen.uri, "/recordings/7");
        assert_eq!(seen.headers["x-keygate-account"], "billing");
        let h2_unauth = Request::get(app.url("/recordings/7")).body(empty()).expect("request");
        assert_eq!(send_with(&h2_client(), h2_unauth).await.status, 401);
    }
}

both_engines! {
    async fn an_unreachable_upstream_gives_502_and_a_slow_one_504(engine: Engine) {
        let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        let extra = format!(
            "[[routes]]\nname = \"dead\"\npath_prefix = \"/dead\"\nupstream = \"http://{unused}\"\nscope = \"recordings:read\"\n"
        );
        let app = spawn_app_with(engine, AppOptions { extra_toml: extra, upstream_timeout: "300ms", ..Default::default() }).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        let r = app.get("/dead/x", Some(issued.key.expose())).await;
        assert_eq!(r.status, 502);
        assert_eq!(r.json()["error"], "bad_gateway");
        let r = app.get("/recordings/slow?ms=2000", Some(issued.key.expose())).await;
        assert_eq!(r.status, 504);
        assert_eq!(r.json()["error"], "gateway_timeout");
    }
}

both_engines! {
    async fn each_request_on_a_kept_alive_connection_gets_its_own_response_deadline(engine: Engine) {
        // One timer per client connection is re-armed for each request: a deadline moved
        // later, a deadline that fired while the connection sat idle, and one after a 504.
        let app = spawn_app_with(engine, AppOptions { upstream_timeout: "300ms", ..Default::default() }).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        let key = Some(issued.key.expose());
        assert_eq!(app.get("/recordings/1", key).await.status, 200);
        let started = Instant::now();
        assert_eq!(app.get("/recordings/slow?ms=2000", key).await.status, 504);
        assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
        assert_eq!(app.get("/recordings/slow?ms=100", key).await.status, 200, "not cut short after a 504");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(app.get("/recordings/slow?ms=100", key).await.status, 200, "not cut short after an idle spell");
        let started = Instant::now();
        assert_eq!(app.get("/recordings/slow?ms=2000", key).await.status, 504);
        assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    }
}

both_engines! {
    async fn last_used_is_stamped_within_the_flush_interval(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        let unused = app.create_key(&account, "spare", &["recordings:read"]).await;
        assert_eq!(issued.record.last_used_at, None);
        let before = system_now_ms();
        assert_eq!(app.get("/recordings/1", Some(issued.key.expose())).await.status, 200);
        let started = Instant::now();
        let stamped = loop {
            let rec = app.manager.store.key(issued.record.id).await.expect("store").expect("key");
            if let Some(at) = rec.last_used_at {
                break at;
            }
            // flush_interval is 200 ms here.
            assert!(started.elapsed() < Duration::from_secs(3), "last_used_at not written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(stamped >= before && stamped <= system_now_ms(), "stamp {stamped} is the request's time");
        let spare = app.manager.store.key(unused.record.id).await.expect("store").expect("key");
        assert_eq!(spare.last_used_at, None, "an unused key is not stamped");
    }
}

both_engines! {
    async fn pending_stamps_are_flushed_on_shutdown(engine: Engine) {
        let mut app = spawn_app_with(engine, AppOptions { flush_interval: "60s", ..Default::default() }).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        assert_eq!(app.get("/recordings/1", Some(issued.key.expose())).await.status, 200);
        app.shutdown().await;
        let rec = app.manager.store.key(issued.record.id).await.expect("store").expect("key");
        assert!(rec.last_used_at.is_some(), "the final flush wrote the stamp");
    }
}

both_engines! {
    async fn health_and_readiness_answer_on_the_admin_listener(engine: Engine) {
        let app = spawn_app(engine).await;
        let r = app.admin_get("/healthz").await;
        assert_eq!(r.status, 200);
        let r = app.admin_get("/readyz").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"], "ready");
        assert!(r.json()["table_age_ms"].as_i64().expect("age") >= 0);
    }
}

both_engines! {
    async fn non_canonical_paths_are_refused_before_routing(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        for path in ["/recordings/../tickets/1", "/recordings//1", "/recordings/%2e%2e/tickets", "/recordings%2fx", "/%72ecordings/1"] {
            let r = app.get(path, Some(issued.key.expose())).await;
            assert_eq!(r.status, 400, "{path}");
        }
        assert_eq!(app.upstream.count(), 0);
    }
}

/// A well-formed key with the given prefix and secret (the checksum is public).
pub fn forge(prefix: &str, secret: &str) -> String {
    keygate::keys::with_checksum(&format!("{prefix}_{secret}"))
}

both_engines! {
    async fn a_client_connection_keeps_one_upstream_connection_for_its_requests(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        // One client connection, many sequential requests.
        let mut conn = one_connection(app.proxy_addr).await;
        for _ in 0..25 {
            let req = Request::get("/recordings/1")
                .header("host", "keygate.test")
                .header("x-api-key", issued.key.expose())
                .body(empty())
                .expect("request");
            assert_eq!(send_on(&mut conn, req).await.status, 200);
        }
        assert_eq!(app.upstream.count(), 25);
        assert_eq!(app.upstream.connections(), 1, "requests on one client connection reuse one upstream connection");
    }
}

both_engines! {
    async fn an_upstream_that_closes_its_connections_is_reconnected_transparently(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        for i in 0..10 {
            let r = app.get("/recordings/close", Some(issued.key.expose())).await;
            assert_eq!(r.status, 200, "request {i}");
            assert_eq!(r.text(), "closing");
            // Interleave ordinary requests on the same client connection.
            assert_eq!(app.get("/recordings/1", Some(issued.key.expose())).await.status, 200, "request {i}");
        }
        assert_eq!(app.upstream.count(), 20);
        assert!(app.upstream.connections() >= 10, "each `Connection: close` forces a new upstream connection");
    }
}

/// An upstream closes an idle keep-alive connection just as the client's next request
/// arrives, so keygate hands the request to that connection before it has read the close.
/// hyper gives the request back unwritten, and keygate sends it on a new connection: the
/// client gets its answer, not a 502. keygate is paused (SIGSTOP) while the close and the
/// request both reach its sockets, so it meets them in one batch, request first: the race,
/// made deterministic. (With the retry replaced by a 502, this test fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_to_an_upstream_connection_that_closed_unseen_is_sent_on_a_new_one() {
    let db = TestDb::new(Engine::Sqlite).await;
    let upstream = Upstream::start().await;
    let binary = Binary::start(&db.url, upstream.addr, "", &[], None).await;
    binary.cli(&["account", "create", "billing"]);
    let (key, _) = binary.create_key("billing", "primary", "recordings:read");
    let request = |path: &str| {
        Request::get(path)
            .header("host", "keygate.test")
            .header("x-api-key", &key)
            .body(empty())
            .expect("request")
    };
    let mut conn = one_connection(std::net::SocketAddr::from(([127, 0, 0, 1], binary.proxy))).await;
    // The key works once the table's next refresh (every 100 ms) has it.
    let started = Instant::now();
    while send_on(&mut conn, request("/recordings/1")).await.status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new key never worked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.connections(), 1);

    binary.pause();
    upstream.close_connections();
    wait_until(Duration::from_secs(5), || upstream.open_connections() == 0).await;
    conn.ready().await.expect("client connection ready");
    let answer = tokio::spawn(conn.send_request(request("/recordings/2")));
    // Long enough for the request to reach keygate's socket while it is paused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    binary.resume();

    let response = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered")
        .expect("request task")
        .expect("response");
    assert_eq!(response.status(), 200, "sent again, not refused with a 502");
    assert_eq!(upstream.connections(), 2, "on a new upstream connection");
    let sent: Vec<String> = upstream.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(
        sent,
        ["/recordings/1", "/recordings/2"],
        "each request reached the upstream once"
    );
}

/// Sends one keyed GET on a new client connection that asks to be closed after it, and reads
/// until keygate closes it: the whole response, as text.
async fn on_a_new_connection(proxy: std::net::SocketAddr, path: &str, key: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let head = format!("GET {path} HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("send");
    let answer = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("keygate closes the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

/// One worker, so that client connections one after another meet the same parked connections.
/// Not a storage test: SQLite only.
async fn one_worker_app() -> TestApp {
    spawn_app_with(
        Engine::Sqlite,
        AppOptions {
            proxy_toml: "workers = 1".into(),
            ..Default::default()
        },
    )
    .await
}

/// A client that opens a connection per request: each one's upstream connection, idle when it
/// ends, serves the next client connection, so a request costs one TCP handshake, not two.
/// Identity is per request: two accounts take turns on the one upstream connection.
#[tokio::test]
async fn client_connections_one_after_another_reuse_an_idle_upstream_connection() {
    let app = one_worker_app().await;
    let billing = app.create_account("billing").await;
    let support = app.create_account("support").await;
    let billing_key = app
        .create_key(&billing, "primary", &["recordings:read"])
        .await;
    let support_key = app
        .create_key(&support, "primary", &["recordings:read"])
        .await;
    for i in 0..10 {
        let (key, account) = if i % 2 == 0 {
            (&billing_key, "billing")
        } else {
            (&support_key, "support")
        };
        let answer = on_a_new_connection(
            app.proxy_addr,
            &format!("/recordings/{i}"),
            key.key.expose(),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK"),
            "request {i}: {answer}"
        );
        assert!(answer.ends_with("upstream ok"), "request {i}: {answer}");
        let seen = app.upstream.last();
        assert_eq!(seen.uri, format!("/recordings/{i}"));
        assert_eq!(seen.headers["x-keygate-account"], account, "request {i}");
    }
    assert_eq!(app.upstream.count(), 10);
    assert_eq!(
        app.upstream.connections(),
        1,
        "ten client connections, one upstream connection"
    );
}

/// A client that leaves in the middle of a response leaves its upstream connection mid-body:
/// that connection is closed, never handed to the next client, who gets its own answer whole
/// on a new one.
#[tokio::test]
async fn an_upstream_connection_left_mid_response_is_closed_not_handed_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = one_worker_app().await;
    let account = app.create_account("billing").await;
    let issued = app
        .create_key(&account, "primary", &["recordings:read"])
        .await;

    let mut leaving = tokio::net::TcpStream::connect(app.proxy_addr)
        .await
        .expect("connect");
    let head = format!(
        "GET /recordings/download?bytes=268435456 HTTP/1.1\r\nhost: keygate.test\r\nx-api-key: {}\r\n\r\n",
        issued.key.expose()
    );
    leaving.write_all(head.as_bytes()).await.expect("send");
    let mut got = vec![0u8; 256 * 1024];
    leaving
        .read_exact(&mut got)
        .await
        .expect("the download has begun");
    assert!(got.starts_with(b"HTTP/1.1 200 OK"));
    drop(leaving);
    wait_until(Duration::from_secs(5), || {
        app.upstream.open_connections() == 0
    })
    .await;

    let answer = on_a_new_connection(app.proxy_addr, "/recordings/1", issued.key.expose()).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nupstream ok"),
        "nothing of the other body: {answer}"
    );
    assert_eq!(
        app.upstream.connections(),
        2,
        "on a new upstream connection"
    );
    let sent: Vec<String> = app.upstream.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(
        sent,
        ["/recordings/download?bytes=268435456", "/recordings/1"]
    );
}

/// A one-worker instance with a key, after one request on a client connection that has
/// ended: its upstream connection is parked, still open.
async fn one_connection_parked() -> (TestApp, String) {
    let app = one_worker_app().await;
    let account = app.create_account("billing").await;
    let issued = app
        .create_key(&account, "primary", &["recordings:read"])
        .await;
    let key = issued.key.expose().to_string();
    let answer = on_a_new_connection(app.proxy_addr, "/recordings/1", &key).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert_eq!(app.upstream.open_connections(), 1, "parked, open");
    (app, key)
}

/// An upstream that closes its idle connections closes the parked ones too: the next client
/// connection gets its answer on a new upstream connection, not an error.
#[tokio::test]
async fn a_parked_connection_its_upstream_closed_is_replaced_without_an_error() {
    let (app, key) = one_connection_parked().await;
    app.upstream.close_connections();
    wait_until(Duration::from_secs(5), || {
        app.upstream.open_connections() == 0
    })
    .await;
    let answer = on_a_new_connection(app.proxy_addr, "/recordings/2", &key).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "not a 502: {answer}");
    assert_eq!(app.upstream.connections(), 2);
    assert_eq!(app.upstream.count(), 2);
}

/// A parked connection nobody takes is closed after a couple of seconds, so a burst of
/// clients leaves no idle connections holding the upstream open.
#[tokio::test]
async fn a_parked_connection_nobody_takes_is_closed() {
    let (app, _) = one_connection_parked().await;
    wait_until(Duration::from_secs(6), || {
        app.upstream.open_connections() == 0
    })
    .await;
}

both_engines! {
    async fn one_client_connection_can_alternate_between_upstreams(engine: Engine) {
        let other = Upstream::start().await;
        let extra = format!(
            "[[routes]]\nname = \"alerts\"\npath_prefix = \"/alerts\"\nupstream = \"http://{}\"\nscope = \"recordings:read\"\n",
            other.addr
        );
        let app = spawn_app_with(engine, AppOptions { extra_toml: extra, ..Default::default() }).await;
        let account = app.create_account("billing").await;
        let issued = app.create_key(&account, "primary", &["recordings:read"]).await;
        for _ in 0..5 {
            assert_eq!(app.get("/recordings/1", Some(issued.key.expose())).await.status, 200);
            assert_eq!(app.get("/alerts/1", Some(issued.key.expose())).await.status, 200);
        }
        assert_eq!(app.upstream.count(), 5);
        assert_eq!(other.count(), 5);
        assert_eq!(other.last().uri, "/alerts/1");
    }
}
