//! Bench-only: a key-guessing flood. keygate (OWASP argon2 settings, SQLite) holds one real
//! key; 16 clients send well-formed keys with that key's public prefix and wrong secrets for a
//! few seconds while one client keeps using the real (warm) key. Runs once with the failure
//! budgets switched off and once with the defaults, and reports the answers the flood got,
//! argon2 runs, keygate's CPU time (its threads only: the load generator runs on threads named
//! `client`), and the warm key's latency.
//! Usage: `cargo run --release --example bench_flood -- [SECONDS]`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    // keygate's own background work runs here; its proxy workers are threads of their own.
    let keygate_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kg-main")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client")
        .enable_all()
        .build()?;
    for (label, budgets) in [
        (
            "failure budgets off",
            "prefix_failure_budget = 1000000000\nclient_failure_budget = 1000000000\n",
        ),
        (
            "default failure budgets (10 per prefix, 20 per client address / min)",
            "",
        ),
    ] {
        let upstream = client_rt.block_on(start_upstream())?;
        let dir = std::env::temp_dir().join(format!(
            "keygate-flood-{}-{}",
            std::process::id(),
            budgets.len()
        ));
        std::fs::create_dir_all(&dir)?;
        let toml = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n\
             [log]\nfilter = \"error\"\naccess_log = false\n[verification]\n{budgets}\n\
             [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"http://{upstream}\"\nscope = \"bench\"\n",
            dir.join("k.db").display()
        );
        let config = Config::from_toml(&toml, "bench", std::iter::empty())?;
        let (kg, key) = keygate_rt.block_on(async {
            let store = Store::connect(&config.database.url, 2).await?;
            store.migrate().await?;
            let manager = Manager::new(store, config.hashing, Clock::System)?;
            let account = manager.create_account("flood", "", &Actor::cli()).await?;
            let key = manager
                .issue_key(&account, "real", &["bench".into()], None, &Actor::cli())
                .await?
                .key
                .expose()
                .to_string();
            let (p, a) = server::bind(&config).await?;
            let kg = server::start(&config, p, a, Clock::System).await?;
            kg.ready(Duration::from_secs(30)).await;
            Ok::<_, Box<dyn std::error::Error>>((kg, key))
        })?;
        let url = format!("http://{}/x", kg.proxy_addr);
        let (cpu0, wall0) = (keygate_cpu(), Instant::now());
        let (counts, mut lat) = client_rt.block_on(flood(url, key, Duration::from_secs(seconds)));
        let (cpu, wall) = (keygate_cpu() - cpu0, wall0.elapsed().as_secs_f64());
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1000.0;
        let total: u64 = counts.values().sum();
        let runs = kg.proxy.verifier.stats.argon2_runs.load(Ordering::Relaxed);
        println!("{label}:");
        println!(
            "  flood answers {counts:?}: {total} in {wall:.1} s ({:.0}/s); argon2 runs {runs}",
            total as f64 / wall
        );
        println!(
            "  keygate CPU {cpu:.2} s ({:.0}% of one core; {:.1} µs per flood request)",
            100.0 * cpu / wall,
            cpu * 1e6 / total.max(1) as f64
        );
        println!(
            "  warm key: {} requests, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            p(0.5),
            p(0.99),
            p(1.0)
        );
        keygate_rt.block_on(kg.shutdown());
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

async fn flood(
    url: String,
    key: String,
    duration: Duration,
) -> (BTreeMap<u16, u64>, Vec<Duration>) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let get = move |k: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let req = hyper::Request::get(url)
                .header("authorization", format!("Bearer {k}"))
                .body(Empty::new())
                .expect("request");
            let resp = client.request(req).await.expect("keygate answers");
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            status
        }
    };
    assert_eq!(
        get(key.clone()).await,
        200,
        "the real key works (and is now warm)"
    );
    let stop = Instant::now() + duration;
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let (get, key) = (get.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut counts = BTreeMap::<u16, u64>::new();
            let mut i = 0u64;
            while Instant::now() < stop {
                *counts.entry(get(forge(&key[..8], t, i)).await).or_default() += 1;
                i += 1;
            }
            counts
        }));
    }
    let mut lat = Vec::new();
    while Instant::now() < stop {
        let t = Instant::now();
        assert_eq!(
            get(key.clone()).await,
            200,
            "the warm key must keep working"
        );
        lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut counts = BTreeMap::<u16, u64>::new();
    for task in tasks {
        for (s, n) in task.await.expect("flood task") {
            *counts.entry(s).or_default() += n;
        }
    }
    (counts, lat)
}

/// A well-formed key with `prefix` and a wrong secret: the checksum is public, so this is what
/// an attacker can send.
fn forge(prefix: &str, t: u64, i: u64) -> String {
    keygate::keys::with_checksum(&format!("{prefix}_{t:0>8}{i:0>24}"))
}

async fn start_upstream() -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
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
    Ok(addr)
}

/// CPU seconds of every thread of this process except the load generator's (`client*`).
fn keygate_cpu() -> f64 {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some((head, rest))) = (stat.find('('), stat.rsplit_once(") ")) else {
            continue;
        };
        if head[open + 1..].starts_with("client") {
            continue;
        }
        let f: Vec<&str> = rest.split(' ').collect();
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    ticks as f64 / 100.0
}
