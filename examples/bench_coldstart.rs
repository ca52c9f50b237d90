//! Bench-only: a cold start in front of a busy upstream. keygate (release build, OWASP argon2
//! settings, SQLite) is started with N keys it has never verified; N clients each send one
//! request with their own key, all at once, retrying on 503 after `Retry-After`; meanwhile one
//! warm key keeps sending requests. Reports how long until every key got through, how many
//! 503s were answered, argon2 runs (one per key is the target), and the warm key's latency.
//! Usage: `cargo run --release --example bench_coldstart -- [KEYS]`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::clock::Clock;
use keygate::config::Config;
use keygate::manage::{Actor, Manager};
use keygate::server;
use keygate::store::Store;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000);
    let dir = std::env::temp_dir().join(format!("keygate-cold-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // The upstream: answers 200 at once.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_r| async {
                    Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });

    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n\
         [log]\nfilter = \"warn\"\naccess_log = false\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"http://{upstream_addr}\"\nscope = \"bench\"\n",
        dir.join("k.db").display()
    );
    let config = Config::from_toml(&toml, "bench", std::iter::empty())?;
    // Keys are hashed with the configured (OWASP) parameters, two at a time.
    let store = Store::connect(&config.database.url, 4).await?;
    store.migrate().await?;
    let manager = Arc::new(Manager::new(store, config.hashing, Clock::System)?);
    let account = manager.create_account("cold", "", &Actor::cli()).await?;
    eprintln!(
        "hashing {n} keys with argon2id m={} KiB t={} ...",
        config.hashing.memory_kib, config.hashing.iterations
    );
    let mut keys = Vec::with_capacity(n + 1);
    for chunk in (0..=n).collect::<Vec<_>>().chunks(2) {
        let mut handles = Vec::new();
        for i in chunk {
            let (m, a) = (manager.clone(), account.clone());
            let i = *i;
            handles.push(tokio::spawn(async move {
                m.issue_key(&a, &format!("k{i}"), &["bench".into()], None, &Actor::cli())
                    .await
            }));
        }
        for h in handles {
            keys.push(h.await??.key.expose().to_string());
        }
    }
    let warm = keys.pop().ok_or("no keys")?;

    let (proxy, admin) = server::bind(&config).await?;
    let keygate = server::start(&config, proxy, admin, Clock::System).await?;
    keygate.ready(Duration::from_secs(30)).await;
    let url = format!("http://{}/x", keygate.proxy_addr);
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let send = move |key: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let req = hyper::Request::get(url)
                .header("x-api-key", key)
                .body(Empty::new())
                .expect("request");
            let resp = client.request(req).await.expect("keygate answers");
            let status = resp.status().as_u16();
            let retry = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let _ = resp.into_body().collect().await;
            (status, retry)
        }
    };
    // Warm the warm key.
    assert_eq!(send(warm.clone()).await.0, 200);

    let done = Arc::new(AtomicBool::new(false));
    let warm_task = {
        let (done, send) = (done.clone(), send.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let (status, _) = send(warm.clone()).await;
                assert_eq!(status, 200, "the warm key must keep working");
                lat.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            lat
        })
    };

    let unavailable = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for key in keys {
        let (send, unavailable) = (send.clone(), unavailable.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                match send(key.clone()).await {
                    (200, _) => return,
                    (503, retry) => {
                        unavailable.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_secs(retry.unwrap_or(1))).await;
                    }
                    (other, _) => panic!("unexpected status {other}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let all_in = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut lat = warm_task.await?;
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1000.0;
    let runs = keygate
        .proxy
        .verifier
        .stats
        .argon2_runs
        .load(Ordering::Relaxed);
    println!(
        "{n} new keys at once: all through in {:.1} s ({:.0} verifications/s); {} answers were 503 + Retry-After; argon2 runs: {runs} (1 for the warm key)",
        all_in.as_secs_f64(),
        n as f64 / all_in.as_secs_f64(),
        unavailable.load(Ordering::Relaxed),
    );
    println!(
        "warm key during the cold start: {} requests, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
    keygate.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
