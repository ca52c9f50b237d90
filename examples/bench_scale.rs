//! Bench-only: keygate at scale on PostgreSQL. Loads 1,000,000 keys into a fresh database,
//! measures loading them into the key table (time and resident memory), the warm-key hot path
//! with 1,000 and with 1,000,000 keys in the table, and one last_used flush of 100,000 distinct
//! keys (PostgreSQL and SQLite). Creates and drops its own database.
//! Usage: `cargo run --release --example bench_scale -- [POSTGRES_ADMIN_URL] [KEYS]`.

use std::time::Instant;

use keygate::clock::Clock;
use keygate::config::{DatabaseUrl, HashingConfig};
use keygate::keys::{self, KeyKind, KeyState, KeyTable, Scope, Verifier};
use keygate::manage::{Actor, Manager};
use keygate::store::Store;

const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const CHEAP: HashingConfig = HashingConfig {
    memory_kib: 1024,
    iterations: 1,
    parallelism: 1,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let admin_url = args
        .next()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let n: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let name = format!("keygate_bench_{}", std::process::id());
    let admin = sqlx::PgPool::connect(&admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    let url = format!(
        "{}/{name}",
        &admin_url[..admin_url.rfind('/').ok_or("url needs a path")?]
    );
    let result = run(&url, n).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    result
}

async fn run(url: &str, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::connect(&DatabaseUrl::new(url)?, 4).await?;
    store.migrate().await?;
    let manager = Manager::new(store.clone(), CHEAP, Clock::System)?;
    let account = manager.create_account("scale", "", &Actor::cli()).await?;
    let real = manager
        .issue_key(&account, "real", &["bench".into()], None, &Actor::cli())
        .await?;

    let started = Instant::now();
    bulk_insert(&store, account.id, n - 1).await?;
    println!(
        "inserted {} keys in {:.1} s",
        n,
        started.elapsed().as_secs_f64()
    );

    // Loading the whole table, as a sidecar does at start.
    let rss_before = rss_kib();
    let table = KeyTable::new();
    let started = Instant::now();
    let loaded = keygate::sync::load(&store, &table, &Clock::System).await?;
    let load_time = started.elapsed();
    let rss_after = rss_kib();
    println!(
        "load: {loaded} keys into the table in {:.2} s; resident memory +{} MiB (process {} MiB)",
        load_time.as_secs_f64(),
        (rss_after.saturating_sub(rss_before)) / 1024,
        rss_after / 1024
    );

    // The warm-key path with the big table and with a small one.
    let small = KeyTable::new();
    small.replace_all(
        store
            .table_rows(i64::MIN)
            .await?
            .into_iter()
            .take(1_000)
            .collect(),
    );
    small.apply(
        store
            .table_rows(i64::MIN)
            .await?
            .into_iter()
            .filter(|r| r.id.id == real.record.id)
            .collect(),
    );
    for (label, t) in [("1,000 keys", &small), (&format!("{loaded} keys"), &table)] {
        let ns = warm_path_ns(t, real.key.expose()).await;
        println!("warm key path (parse, lookup, state, cached verify, scope) with {label}: {ns:.0} ns median");
    }

    // One flush of 100,000 distinct stamps, one statement.
    let stamps: Vec<(i64, i64)> = (1..=100_000)
        .map(|id| (id, 1_800_000_000_000 + id))
        .collect();
    let started = Instant::now();
    store.stamp_last_used(&stamps, &[]).await?;
    println!(
        "last_used flush, 100,000 keys, PostgreSQL: {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    store.close().await;

    let dir = std::env::temp_dir().join(format!("keygate-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sqlite = Store::connect(
        &DatabaseUrl::new(format!("sqlite://{}", dir.join("k.db").display()))?,
        2,
    )
    .await?;
    sqlite.migrate().await?;
    let m = Manager::new(sqlite.clone(), CHEAP, Clock::System)?;
    let acct = m.create_account("scale", "", &Actor::cli()).await?;
    bulk_insert(&sqlite, acct.id, 100_000).await?;
    let started = Instant::now();
    sqlite.stamp_last_used(&stamps, &[]).await?;
    println!(
        "last_used flush, 100,000 keys, SQLite: {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    sqlite.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Inserts `n` keys with placeholder hashes (never verifiable) in batches.
async fn bulk_insert(
    store: &Store,
    account_id: i64,
    n: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    const BATCH: usize = 50_000;
    let mut done = 0;
    while done < n {
        let count = BATCH.min(n - done);
        let prefixes: Vec<String> = (0..count)
            .map(|_| keys::generate(KeyKind::ServiceAccount).prefix().to_string())
            .collect();
        let batch_id = getrandom_u32();
        let names: Vec<String> = (0..count)
            .map(|i| format!("bulk-{batch_id:08x}-{i}"))
            .collect();
        // A prefix clash (5 random base62 characters) skips a row; the loop makes up for it.
        let inserted = match store {
            Store::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO api_keys (account_id, prefix, key_hash, name, scopes, created_at, created_by)
                     SELECT $1, p, '$argon2id$placeholder', n, 'bench', 0, 'bench'
                       FROM unnest($2::TEXT[], $3::TEXT[]) AS v(p, n)
                     ON CONFLICT DO NOTHING",
                )
                .bind(account_id)
                .bind(&prefixes)
                .bind(&names)
                .execute(pool)
                .await?
                .rows_affected()
            }
            Store::Sqlite(pool) => {
                let rows: Vec<(String, String)> = prefixes.into_iter().zip(names).collect();
                sqlx::query(
                    "INSERT OR IGNORE INTO api_keys (account_id, prefix, key_hash, name, scopes, created_at, created_by)
                     SELECT $1, json_extract(value, '$[0]'), '$argon2id$placeholder', json_extract(value, '$[1]'), 'bench', 0, 'bench'
                       FROM json_each($2)",
                )
                .bind(account_id)
                .bind(serde_json::to_string(&rows)?)
                .execute(pool)
                .await?
                .rows_affected()
            }
        };
        done += inserted as usize;
    }
    Ok(())
}

async fn warm_path_ns(table: &KeyTable, key: &str) -> f64 {
    let verifier = Verifier::new(&keygate::config::Config::default().verification);
    let scope = Scope::new("bench").expect("scope");
    let parsed = keys::parse(key).expect("real key parses");
    let entry = table.lookup(&parsed.prefix).expect("real key loaded");
    verifier
        .verify(&entry, &parsed, LOCAL)
        .await
        .expect("real key verifies");
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = Instant::now();
        for _ in 0..1_000 {
            let parsed = keys::parse(std::hint::black_box(key)).expect("parses");
            let entry = table.lookup(&parsed.prefix).expect("entry");
            let ok = entry.state(1) == KeyState::Active
                && verifier.verify(&entry, &parsed, LOCAL).await.is_ok()
                && entry.scopes.contains(&scope);
            std::hint::black_box(ok);
        }
        samples.push(started.elapsed().as_nanos() as f64 / 1_000.0);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn getrandom_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).expect("random");
    u32::from_le_bytes(b)
}
