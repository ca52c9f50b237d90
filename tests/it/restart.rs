//! Restarts and rollouts with the real binary: SIGTERM under steady load fails no request and
//! lets a long stream finish; SIGHUP reloads routes without dropping connections and refuses a
//! bad file.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use keygate::manage::{Actor, IssuedKey};

use crate::harness::*;

/// `keygate serve` on free ports with the configuration `text` makes of them, logging at info.
async fn serve(text: impl Fn(u16, u16) -> String) -> Binary {
    Binary::serve(text, &[], Some("info,keygate::access=warn")).await
}

fn config_text(proxy: u16, admin: u16, db_url: &str, extra_proxy: &str, routes: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:{proxy}\"\n{extra_proxy}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [database]\nurl = \"{db_url}\"\nrefresh_interval = \"100ms\"\n[last_used]\nflush_interval = \"60s\"\n\
         [hashing]\nmemory_kib = 1024\niterations = 1\n{routes}"
    )
}

async fn issue(db_url: &str, scopes: &[&str]) -> IssuedKey {
    let manager = manager_for(db_url).await;
    let account = manager
        .create_account("billing", "", &Actor::cli())
        .await
        .expect("account");
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    manager
        .issue_key(&account, "k", &scopes, None, &Actor::cli())
        .await
        .expect("issue")
}

fn get(
    url: String,
    key: &str,
) -> http::Request<http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>> {
    http::Request::get(url)
        .header("authorization", format!("Bearer {key}"))
        .body(empty())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_request_and_lets_a_long_stream_finish() {
    let db = TestDb::new(Engine::Sqlite).await;
    let upstream = Upstream::start().await;
    let key = issue(&db.url, &["recordings:read"]).await;
    let secret = key.key.expose().to_string();
    let mut served = serve(|p, a| {
        config_text(
            p,
            a,
            &db.url,
            "shutdown_grace = \"10s\"\nshutdown_delay = \"1s\"",
            &standard_routes(upstream.addr),
        )
    })
    .await;

    // The load balancer: stops routing new requests once readiness fails.
    let draining = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (draining, ok, failed) = (draining.clone(), ok.clone(), failed.clone());
        let (url, secret) = (served.url("/recordings/1"), secret.clone());
        workers.push(tokio::spawn(async move {
            let client = client();
            while !draining.load(Ordering::Relaxed) {
                match client.request(get(url.clone(), &secret)).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let admin = served.admin;
    let watcher = {
        let draining = draining.clone();
        tokio::spawn(async move {
            while readyz(admin).await == Some(200) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            draining.store(true, Ordering::Relaxed);
        })
    };

    // A long download read slowly, and a slow request: both in flight when SIGTERM arrives.
    const SIZE: u64 = 32 * 1024 * 1024;
    let stream = {
        let url = served.url(&format!("/recordings/download?bytes={SIZE}"));
        let secret = secret.clone();
        tokio::spawn(async move {
            let response = client()
                .request(get(url, &secret))
                .await
                .expect("stream starts");
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            let (mut got, started) = (0u64, Instant::now());
            while let Some(frame) = body.frame().await {
                let frame = frame.expect("the stream is never cut");
                got += frame.data_ref().map(|d| d.len() as u64).unwrap_or(0);
                // Read at 8 MiB/s: the transfer takes about 4 s whatever the frame sizes.
                let due = started + Duration::from_secs_f64(got as f64 / (8.0 * 1024.0 * 1024.0));
                tokio::time::sleep_until(due.into()).await;
            }
            (got, started.elapsed(), Instant::now())
        })
    };
    let slow = {
        let url = served.url("/recordings/slow?ms=2500");
        let secret = secret.clone();
        tokio::spawn(async move {
            let r = client()
                .request(get(url, &secret))
                .await
                .expect("slow request answered");
            r.status()
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before_stop = ok.load(Ordering::Relaxed);
    served.signal("-TERM");
    let signalled = Instant::now();

    let (got, streamed_for, stream_done) = stream.await.expect("stream task");
    assert_eq!(slow.await.expect("slow task"), 200);
    watcher.await.expect("watcher");
    for w in workers {
        w.await.expect("worker");
    }
    let (status, logs) = served.wait_exit(Duration::from_secs(15));
    let exited = status.success();
    let stopped_in = signalled.elapsed();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "graceful stop: {ok} requests passed ({before_stop} before SIGTERM), {failed} failed; \
         a {SIZE}-byte stream took {streamed_for:?}; exit {stopped_in:?} after SIGTERM"
    );
    assert!(exited, "exit 0 after SIGTERM: {logs}");
    assert_eq!(failed, 0, "requests failed during the graceful stop");
    assert!(before_stop > 50, "steady load ran before the stop");
    assert!(
        ok > before_stop,
        "requests kept passing during the shutdown delay"
    );
    assert_eq!(got, SIZE, "the long stream completed during the drain");
    assert!(
        stream_done > signalled + Duration::from_secs(1),
        "the stream was still running after the listener closed (1 s delay)"
    );
    assert!(logs.contains("stopping"), "{logs}");
    // last_used flushes every 60 s here: only the final flush at stop can have written it.
    let manager = manager_for(&db.url).await;
    let record = manager
        .key_by_prefix(key.key.prefix().as_str())
        .await
        .expect("key");
    assert!(record.last_used_at.is_some(), "last_used flushed at stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_without_dropping_connections_and_refuses_a_bad_file() {
    let db = TestDb::new(Engine::Sqlite).await;
    let upstream = Upstream::start().await;
    let key = issue(&db.url, &["recordings:read"]).await;
    let secret = key.key.expose().to_string();
    let reports = format!(
        "[[routes]]\nname = \"reports\"\npath_prefix = \"/reports\"\nupstream = \"http://{}\"\nscope = \"recordings:read\"\n",
        upstream.addr
    );
    let mut served =
        serve(|p, a| config_text(p, a, &db.url, "", &standard_routes(upstream.addr))).await;
    let c = client();
    let status = |path: &str| {
        let req = get(served.url(path), &secret);
        let c = c.clone();
        async move { c.request(req).await.expect("answered").status() }
    };
    assert_eq!(status("/reports/q3").await, 404);

    // A request in flight across the reload, on a connection that must survive it.
    let in_flight = tokio::spawn(status("/recordings/slow?ms=1500"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(served.config()).expect("read config");
    std::fs::write(served.config(), format!("{text}\n{reports}")).expect("write config");
    served.signal("-HUP");
    let started = Instant::now();
    while status("/reports/q3").await != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "routes not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        in_flight.await.expect("task"),
        200,
        "the reload dropped an in-flight request"
    );

    // A bad file is refused and the running routes stay.
    std::fs::write(served.config(), "[proxy]\nlisten = \"nonsense\"\n").expect("write config");
    served.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status("/reports/q3").await, 200);
    assert_eq!(status("/recordings/1").await, 200);
    assert_eq!(readyz(served.admin).await, Some(200));

    served.signal("-TERM");
    let (status, logs) = served.wait_exit(Duration::from_secs(15));
    let exited = status.success();
    assert!(exited, "{logs}");
    let refused: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("configuration not reloaded"))
        .collect();
    assert_eq!(refused.len(), 1, "one clear line for the bad file: {logs}");
    assert!(refused[0].contains("proxy.listen"), "{}", refused[0]);
    assert!(logs.contains("configuration reloaded"), "{logs}");
}
