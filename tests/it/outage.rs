//! The database goes away under live traffic, and keygate starts while it is away. PostgreSQL
//! only: the outage is a severed TCP relay between keygate and the server (SQLite is a local
//! file, with no connection to lose).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::manage::{Actor, IssuedKey, Manager};
use keygate::server::Keygate;

use crate::harness::*;
use crate::relay::{postgres_addr, Relay};

/// One sidecar reaching its PostgreSQL database through a relay.
struct Cut {
    keygate: Keygate,
    relay: Relay,
    manager: Manager,
    client: TestClient,
    _upstream: Upstream,
    _db: TestDb,
}

impl Cut {
    async fn start(opts: AppOptions, relay_up: bool) -> Cut {
        let db = TestDb::new(Engine::Postgres).await;
        let manager = manager_for(&db.url).await;
        let upstream = Upstream::start().await;
        let relay = Relay::start(postgres_addr(), relay_up).await;
        let keygate = start_keygate(&relay.url_for(&db.url), upstream.addr, &opts).await;
        Cut {
            keygate,
            relay,
            manager,
            client: client(),
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
        self.manager
            .issue_key(
                &account,
                name,
                &["recordings:read".to_string()],
                None,
                &Actor::cli(),
            )
            .await
            .expect("issue")
    }

    async fn wait_known(&self, key: &IssuedKey) {
        let prefix = key.key.prefix();
        let table = self.keygate.table.clone();
        wait_until(Duration::from_secs(10), || table.lookup(&prefix).is_some()).await;
    }

    async fn status(&self, key: &IssuedKey) -> http::StatusCode {
        get_status(&self.client, self.keygate.proxy_addr, key.key.expose()).await
    }

    async fn readyz(&self) -> (u16, serde_json::Value) {
        let req = http::Request::get(format!("http://{}/readyz", self.keygate.admin_addr))
            .body(empty())
            .expect("request");
        let r = send_with(&self.client, req).await;
        (r.status.as_u16(), r.json())
    }

    /// Polls `/readyz` until its status is `want`.
    async fn wait_ready_status(&self, want: &str, limit: Duration) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let (_, body) = self.readyz().await;
            if body["status"] == want {
                return body;
            }
            assert!(
                started.elapsed() < limit,
                "readyz never said {want}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn last_used(&self, key: &IssuedKey) -> Option<i64> {
        self.manager
            .key_by_prefix(key.key.prefix().as_str())
            .await
            .expect("key")
            .last_used_at
    }
}

async fn get_status(
    client: &TestClient,
    proxy: std::net::SocketAddr,
    key: &str,
) -> http::StatusCode {
    let req = http::Request::get(format!("http://{proxy}/recordings/1"))
        .header("authorization", format!("Bearer {key}"))
        .body(empty())
        .expect("request");
    match client.request(req).await {
        Ok(r) => r.status(),
        Err(_) => http::StatusCode::from_u16(599).expect("a status"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_under_live_traffic_fails_no_valid_request() {
    let cut = Cut::start(AppOptions::default(), true).await;
    assert!(cut.keygate.ready(Duration::from_secs(10)).await);
    let valid = cut.issue("valid").await;
    let revoked = cut.issue("revoked").await;
    let used_in_outage = cut.issue("used-in-outage").await;
    let revoked_in_outage = cut.issue("revoked-in-outage").await;
    for k in [&valid, &revoked, &used_in_outage, &revoked_in_outage] {
        cut.wait_known(k).await;
    }
    cut.manager
        .revoke_key(&revoked.record, &Actor::cli())
        .await
        .expect("revoke");
    let started = Instant::now();
    while cut.status(&revoked).await != 401 {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Live traffic with the valid key for the whole test, on four connections.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (proxy, key) = (cut.keygate.proxy_addr, valid.key.expose().to_string());
        workers.push(tokio::spawn(async move {
            let client = client();
            while !stop.load(Ordering::Relaxed) {
                if get_status(&client, proxy, &key).await == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    cut.relay.sever();
    let body = cut
        .wait_ready_status("degraded", Duration::from_secs(15))
        .await;
    let (code, _) = cut.readyz().await;
    assert_eq!(
        code, 200,
        "degraded is still ready (no max_staleness): {body}"
    );
    assert!(body["table_age_ms"].as_i64().is_some());
    assert_eq!(cut.status(&revoked).await, 401, "revoked stays refused");
    assert_eq!(
        cut.status(&used_in_outage).await,
        200,
        "a valid key never used before passes"
    );
    // A revoke made while this sidecar cannot see the database...
    cut.manager
        .revoke_key(&revoked_in_outage.record, &Actor::cli())
        .await
        .expect("revoke during the outage");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = ok.load(Ordering::Relaxed);
    assert_eq!(
        cut.last_used(&used_in_outage).await,
        None,
        "no stamp while cut"
    );

    cut.relay.restore();
    let recovered = Instant::now();
    cut.wait_ready_status("ready", Duration::from_secs(15))
        .await;
    // ...is applied on return.
    while cut.status(&revoked_in_outage).await != 401 {
        assert!(
            recovered.elapsed() < Duration::from_secs(10),
            "outage revoke not caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stamp queued during the outage is written after it.
    while cut.last_used(&used_in_outage).await.is_none() {
        assert!(
            recovered.elapsed() < Duration::from_secs(10),
            "backlog not written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backlog_ms = recovered.elapsed().as_millis();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "outage: {ok} valid requests passed ({during} by the end of the cut), {failed} failed; \
         last_used backlog written {backlog_ms} ms after the database returned"
    );
    assert_eq!(failed, 0, "valid requests failed during the outage");
    assert!(during > 50, "traffic ran through the outage");
    assert!(cut.last_used(&valid).await.is_some());
    assert_eq!(cut.status(&revoked).await, 401);
    cut.keygate.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_staleness_the_proxy_fails_closed_and_recovers() {
    let cut = Cut::start(
        AppOptions {
            max_staleness: "1s",
            ..AppOptions::default()
        },
        true,
    )
    .await;
    assert!(cut.keygate.ready(Duration::from_secs(10)).await);
    let key = cut.issue("valid").await;
    cut.wait_known(&key).await;
    assert_eq!(cut.status(&key).await, 200);

    cut.relay.sever();
    let body = cut
        .wait_ready_status("stale", Duration::from_secs(15))
        .await;
    assert_eq!(cut.readyz().await.0, 503, "{body}");
    assert!(body["table_age_ms"].as_i64().expect("age") > 1_000);
    assert_eq!(cut.status(&key).await, 503, "fail closed, not 401");

    cut.relay.restore();
    cut.wait_ready_status("ready", Duration::from_secs(15))
        .await;
    assert_eq!(cut.readyz().await.0, 200);
    assert_eq!(cut.status(&key).await, 200);
    cut.keygate.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygate_starts_without_its_database_and_answers_503_until_the_first_load() {
    let cut = Cut::start(AppOptions::default(), false).await;
    let key = cut.issue("early").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, body) = cut.readyz().await;
    assert_eq!(
        (code, body["status"].as_str()),
        (503, Some("loading")),
        "{body}"
    );
    assert_eq!(cut.status(&key).await, 503, "retry later, not 401");

    cut.relay.restore();
    assert!(
        cut.keygate.ready(Duration::from_secs(15)).await,
        "loads once the database is back"
    );
    assert_eq!(cut.readyz().await.0, 200);
    assert_eq!(cut.status(&key).await, 200);
    cut.keygate.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_announced_while_the_listener_was_cut_is_applied_on_reconnect() {
    // The backstop refresh is far away: only the reload on reconnect can catch this revoke.
    let cut = Cut::start(
        AppOptions {
            refresh_interval: "60s",
            ..AppOptions::default()
        },
        true,
    )
    .await;
    assert!(cut.keygate.ready(Duration::from_secs(10)).await);
    let key = cut.issue("missed").await;
    cut.wait_known(&key).await;
    assert_eq!(cut.status(&key).await, 200);
    let sync = cut.keygate.sync.clone();
    wait_until(Duration::from_secs(5), || sync.listening()).await;

    cut.relay.sever();
    wait_until(Duration::from_secs(5), || !sync.listening()).await;
    // PostgreSQL announces this to nobody: the listener is away.
    cut.manager
        .revoke_key(&key.record, &Actor::cli())
        .await
        .expect("revoke");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reloads = sync.reloads();

    cut.relay.restore();
    let restored = Instant::now();
    while cut.status(&key).await != 401 {
        assert!(
            restored.elapsed() < Duration::from_secs(15),
            "the missed revoke was not caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "missed notification caught up {:?} after the database returned",
        restored.elapsed()
    );
    assert!(
        sync.reloads() > reloads,
        "caught up by a whole-table reload"
    );
    assert!(sync.listening());
    cut.keygate.shutdown().await;
}
