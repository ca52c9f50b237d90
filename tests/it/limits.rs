//! Resource abuse: connection cap, slow and idle clients, HTTP/2 stream caps and rapid reset,
//! and key-guessing floods (failure budgets per prefix and per client, warm keys unaffected).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::both_engines;
use crate::harness::*;

fn with_proxy(proxy_toml: &str) -> AppOptions {
    AppOptions {
        proxy_toml: proxy_toml.to_string(),
        ..AppOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_client_waits_until_one_closes() {
    let app = spawn_app_with(Engine::Sqlite, with_proxy("max_connections = 2")).await;
    // Two connections that hold their slots (an unfinished request head).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(app.proxy_addr).await.expect("connect");
        s.write_all(b"GET /recordings/1 HTTP/1.1\r\n")
            .await
            .expect("write");
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(app.proxy_addr)
        .await
        .expect("the kernel backlog accepts");
    third
        .write_all(b"GET /recordings/1 HTTP/1.1\r\nHost: kg\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(400), third.read(&mut buf))
            .await
            .is_err(),
        "keygate must not serve a third connection while two are open"
    );
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a slot frees")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 401"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_a_silent_client_and_an_idle_keep_alive_connection_are_closed() {
    let app = spawn_app_with(
        Engine::Sqlite,
        with_proxy("header_read_timeout = \"300ms\""),
    )
    .await;

    // Slowloris: half a head, then silence; and a client that connects and sends nothing.
    // Both are closed once the timeout has passed, not before.
    let started = Instant::now();
    let mut slow = TcpStream::connect(app.proxy_addr).await.expect("connect");
    slow.write_all(b"GET /recordings/1 HTTP/1.1\r\nHost: kg\r\n")
        .await
        .expect("write");
    let silent = TcpStream::connect(app.proxy_addr).await.expect("connect");
    for (what, mut stream) in [("half a head", slow), ("nothing sent", silent)] {
        read_until_closed(&mut stream, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{what}: not closed"));
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{what}: closed after {:?}",
            started.elapsed()
        );
    }

    // Keep-alive: one full exchange, then idle.
    let mut idle = TcpStream::connect(app.proxy_addr).await.expect("connect");
    idle.write_all(b"GET /recordings/1 HTTP/1.1\r\nHost: kg\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 401"));
    let started = Instant::now();
    read_until_closed(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_but_not_while_a_request_or_its_body_is_open() {
    let app = spawn_app_with(
        Engine::Sqlite,
        with_proxy("header_read_timeout = \"300ms\""),
    )
    .await;
    let account = app.create_account("h2-idle").await;
    let key = app.create_key(&account, "k", &["recordings:read"]).await;
    let get = |path: &str| {
        http::Request::get(format!("http://kg{path}"))
            .header("authorization", format!("Bearer {}", key.key.expose()))
            .body(())
            .expect("request")
    };
    let tcp = TcpStream::connect(app.proxy_addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2");
    let closed = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });

    // A response head that takes over three idle periods: the request keeps the connection.
    let mut client = client.ready().await.expect("ready");
    let (response, _) = client
        .send_request(get("/recordings/1/slow?ms=1000"), true)
        .expect("send");
    assert_eq!(response.await.expect("response").status(), 200);

    // A body read slowly over about as long: still open, so the connection stays. Had it been
    // told to go away meanwhile, this second request would be refused.
    let mut client = client.ready().await.expect("still accepting streams");
    let (response, _) = client
        .send_request(get("/recordings/1/download?bytes=262144"), true)
        .expect("send");
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (mut got, started) = (0, Instant::now());
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        got += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
        if started.elapsed() < Duration::from_millis(1000) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(got, 262_144);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Then nothing: told to go away and closed after one to two periods, not at once.
    let idle_from = Instant::now();
    let closed_at = tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .expect("connection task");
    let idle = closed_at - idle_from;
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_secs(2),
        "closed after {idle:?} idle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_told_the_stream_cap() {
    let app = spawn_app_with(Engine::Sqlite, with_proxy("h2_max_concurrent_streams = 7")).await;
    let tcp = TcpStream::connect(app.proxy_addr).await.expect("connect");
    let (client, mut conn) = h2::client::handshake(tcp).await.expect("h2");
    // The peer's SETTINGS arrive with the first exchange; drive the connection until then.
    let exchange = async {
        let mut client = client.ready().await.expect("ready");
        let req = http::Request::get("http://kg/recordings/1")
            .body(())
            .expect("request");
        let (resp, _) = client.send_request(req, true).expect("send");
        resp.await.expect("response").status()
    };
    let status = tokio::select! {
        s = exchange => s,
        r = &mut conn => panic!("connection ended early: {r:?}"),
    };
    assert_eq!(status, 401);
    assert_eq!(conn.max_concurrent_send_streams(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_gets_goaway_and_costs_no_upstream_requests() {
    let app = spawn_app_with(
        Engine::Sqlite,
        with_proxy("h2_max_pending_reset_streams = 20"),
    )
    .await;
    let account = app.create_account("flood").await;
    let key = app.create_key(&account, "k", &["recordings:read"]).await;
    // 2000 keyed requests, each reset right after its HEADERS, in one write.
    let mut block = Vec::new();
    for (n, v) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "kg"),
        (":path", "/recordings/slow?ms=1000"),
        ("authorization", &format!("Bearer {}", key.key.expose())[..]),
    ] {
        block.push(0u8);
        block.push(n.len() as u8);
        block.extend_from_slice(n.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    }
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        out.extend(frame(1, 0x5, id, &block));
        out.extend(frame(3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let mut tcp = TcpStream::connect(app.proxy_addr).await.expect("connect");
    let _ = tcp.write_all(&out).await; // keygate may close before reading it all
    let bytes = read_until_closed(&mut tcp, Duration::from_secs(10))
        .await
        .expect("connection ends");
    // Find a GOAWAY frame (type 7) with ENHANCE_YOUR_CALM (0xb).
    let mut i = 0;
    let mut goaway = None;
    while i + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[i], bytes[i + 1], bytes[i + 2]]) as usize;
        if bytes[i + 3] == 7 && i + 9 + 8 <= bytes.len() {
            goaway = Some(u32::from_be_bytes(
                bytes[i + 13..i + 17].try_into().expect("4 bytes"),
            ));
        }
        i += 9 + len;
    }
    assert_eq!(goaway, Some(0xb), "GOAWAY with ENHANCE_YOUR_CALM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reached = app.upstream.count();
    assert!(
        reached < 300,
        "{reached} of 2000 reset requests reached the upstream"
    );
}

both_engines! {
    async fn forged_keys_past_the_prefix_budget_get_429_while_a_warm_key_stays_fast(engine: Engine) {
        let app = spawn_app_with(engine, AppOptions {
            extra_toml: "[verification]\nprefix_failure_budget = 3\nclient_failure_budget = 1000\nfailure_window = \"1m\"\n".into(),
            ..AppOptions::default()
        }).await;
        let account = app.create_account("victim").await;
        let real = app.create_key(&account, "k", &["recordings:read"]).await;
        let key = real.key.expose().to_string();
        assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 200, "warm the cache");

        let mut statuses = Vec::new();
        for i in 0..6 {
            let forged = crate::proxy::forge(&key[..8], &format!("{:0>32}", i));
            let r = app.get("/recordings/1", Some(&forged)).await;
            if r.status == 429 {
                let secs: u64 = r.headers["retry-after"].to_str().expect("ascii").parse().expect("seconds");
                assert!((1..=60).contains(&secs), "{secs}");
                assert_eq!(r.json()["error"], "too_many_requests");
            }
            statuses.push(r.status.as_u16());
        }
        assert_eq!(statuses, [401, 401, 401, 429, 429, 429]);
        // The warm key is served from the cache: never throttled.
        assert_eq!(app.get("/recordings/1", Some(&key)).await.status, 200);
        let stats = &app.keygate.as_ref().expect("running").proxy.verifier.stats;
        assert_eq!(stats.argon2_runs.load(std::sync::atomic::Ordering::Relaxed), 4, "one for the real key, three for the budget");
        assert_eq!(app.upstream.count(), 2);
    }
}

both_engines! {
    async fn a_client_past_its_failure_budget_gets_429_on_any_prefix(engine: Engine) {
        let app = spawn_app_with(engine, AppOptions {
            extra_toml: "[verification]\nprefix_failure_budget = 1000\nclient_failure_budget = 2\n".into(),
            ..AppOptions::default()
        }).await;
        let account = app.create_account("victim").await;
        let a = app.create_key(&account, "a", &["recordings:read"]).await;
        let b = app.create_key(&account, "b", &["recordings:read"]).await;
        let a_key = a.key.expose().to_string();
        assert_eq!(app.get("/recordings/1", Some(&a_key)).await.status, 200);
        for i in 0..2 {
            let forged = crate::proxy::forge(&a_key[..8], &format!("{:0>32}", i));
            assert_eq!(app.get("/recordings/1", Some(&forged)).await.status, 401);
        }
        // Another prefix from the same address: its verification would cost argon2, refused.
        let r = app.get("/recordings/1", Some(b.key.expose())).await;
        assert_eq!(r.status, 429);
        assert!(r.headers.contains_key("retry-after"));
        // A key verified earlier still passes.
        assert_eq!(app.get("/recordings/1", Some(&a_key)).await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_header_list_over_max_header_bytes_is_refused() {
    let app = spawn_app_with(Engine::Sqlite, with_proxy("max_header_bytes = 8192")).await;
    let tcp = TcpStream::connect(app.proxy_addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let small = http::Request::get("http://kg/recordings/1")
        .body(())
        .expect("request");
    let (resp, _) = client.send_request(small, true).expect("send");
    assert_eq!(resp.await.expect("response").status(), 401);
    let mut client = client.ready().await.expect("ready");
    let big = http::Request::get("http://kg/recordings/1")
        .header("x-big", "a".repeat(8 * 1024))
        .body(())
        .expect("request");
    let (resp, _) = client.send_request(big, true).expect("send");
    let outcome = resp.await.map(|r| r.status().as_u16());
    assert_eq!(outcome.ok(), Some(431));
    assert_eq!(app.upstream.count(), 0);
}
