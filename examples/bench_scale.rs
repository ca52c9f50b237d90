//! Bench-only: keygate at scale on PostgreSQL. Loads 1,000,000 keys into a fresh database,
//! measures loading them into the key table (time and resident memory), the warm-key hot path
//! with 1,000 and with 1,000,000 keys in the table, and last_used flushes of 100,000 distinct
//! keys through the same queue and writer the proxy uses (PostgreSQL and SQLite). Creates and
//! drops its own database.
//!
//! The rows are shaped like real ones: spread over 1,000 accounts and 10 scope lists, each with
//! its own 97-byte argon2id PHC string (random salt and output at the OWASP parameters; never
//! verifiable, and never verified). The flushed keys are a random sample of the table, each
//! used from a client address, as the proxy records them; nothing is read beforehand to warm
//! the database's cache.
//!
//! The load is measured in a child process of its own (this program, run with `--load-only`),
//! so that its resident-memory growth is not hidden by heap pages the bulk insert left behind.
//! Usage: `cargo run --release --example bench_scale -- [POSTGRES_ADMIN_URL] [KEYS]`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use argon2::password_hash::{Output, SaltString};
use keygate::clock::Clock;
use keygate::config::{DatabaseUrl, HashingConfig};
use keygate::keys::{self, KeyEntry, KeyKind, KeyPrefix, KeyState, KeyTable, Scope, Verifier};
use keygate::manage::{Actor, Manager};
use keygate::store::Store;
use keygate::usage::Usage;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const CHEAP: HashingConfig = HashingConfig {
    memory_kib: 1024,
    iterations: 1,
    parallelism: 1,
};
const ACCOUNTS: usize = 1_000;
const SCOPE_LISTS: [&str; 10] = [
    "bench",
    "recordings:read",
    "recordings:read recordings:write",
    "tickets:read",
    "tickets:read tickets:write",
    "alerts:write",
    "billing:read invoices:read",
    "exports:read recordings:read",
    "search:read",
    "admin:read metrics:read",
];
const FLUSHED: usize = 100_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--load-only") {
        let url = args.nth(1).ok_or("--load-only needs a database url")?;
        return measure_load(&url).await;
    }
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
    let accounts = bulk_accounts(&store, ACCOUNTS).await?;
    bulk_insert(&store, &accounts, n - 1).await?;
    println!(
        "inserted {} keys over {} accounts in {:.1} s",
        n,
        accounts.len() + 1,
        started.elapsed().as_secs_f64()
    );
    // Loading the whole table, as a sidecar does at start, in a fresh process.
    let child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--load-only")
        .arg(url)
        .status()
        .await?;
    if !child.success() {
        return Err(format!("the load measurement failed: {child}").into());
    }
    let table = KeyTable::new();
    let loaded = keygate::sync::load(&store, &table, &Clock::System).await?;

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
    drop(small);

    // Two flushes of the same 100,000 random keys one flush interval apart: the first writes
    // each key's first stamp, the second is the steady state. Picking the sample scans
    // api_keys the same way the load just did, so it warms nothing the load did not.
    let Store::Postgres(pool) = &store else {
        unreachable!("connected with a postgres:// url")
    };
    let sample: Vec<String> =
        sqlx::query_scalar("SELECT prefix FROM api_keys ORDER BY random() LIMIT $1")
            .bind(FLUSHED as i64)
            .fetch_all(pool)
            .await?;
    let entries: Vec<Arc<KeyEntry>> = sample
        .iter()
        .filter_map(|p| table.lookup(&KeyPrefix::parse(p).ok()?))
        .collect();
    for round in 1..=2 {
        let ms = flush_ms(&store, &entries, round).await?;
        println!(
            "last_used flush #{round}, {} keys with client addresses, PostgreSQL: {ms:.0} ms",
            entries.len()
        );
    }
    drop(entries);
    drop(table);
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
    m.create_account("scale", "", &Actor::cli()).await?;
    let accounts = bulk_accounts(&sqlite, 10).await?;
    bulk_insert(&sqlite, &accounts, FLUSHED).await?;
    let table = KeyTable::new();
    keygate::sync::load(&sqlite, &table, &Clock::System).await?;
    let Store::Sqlite(pool) = &sqlite else {
        unreachable!("connected with a sqlite:// url")
    };
    let prefixes: Vec<String> = sqlx::query_scalar("SELECT prefix FROM api_keys")
        .fetch_all(pool)
        .await?;
    let entries: Vec<Arc<KeyEntry>> = prefixes
        .iter()
        .filter_map(|p| table.lookup(&KeyPrefix::parse(p).ok()?))
        .collect();
    for round in 1..=2 {
        let ms = flush_ms(&sqlite, &entries, round).await?;
        println!(
            "last_used flush #{round}, {} keys with client addresses, SQLite: {ms:.0} ms",
            entries.len()
        );
    }
    sqlite.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Loads the whole table into a fresh process, as a sidecar does at start, then once more (a
/// reload after the change listener reconnects, while the first table still serves).
async fn measure_load(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::connect(&DatabaseUrl::new(url)?, 4).await?;
    store.ping().await?;
    let rss_before = rss_kib();
    let table = KeyTable::new();
    let started = Instant::now();
    let loaded = keygate::sync::load(&store, &table, &Clock::System).await?;
    let load_time = started.elapsed();
    let rss_after = rss_kib();
    let added_kib = rss_after.saturating_sub(rss_before);
    println!(
        "load: {loaded} keys into the table in {:.2} s; resident memory +{} MiB ({} bytes per key; process {} MiB); size_of::<KeyEntry>() = {} bytes",
        load_time.as_secs_f64(),
        added_kib / 1024,
        added_kib * 1024 / loaded.max(1) as u64,
        rss_after / 1024,
        std::mem::size_of::<KeyEntry>(),
    );
    let started = Instant::now();
    keygate::sync::load(&store, &table, &Clock::System).await?;
    println!(
        "reload of the unchanged rows: {:.2} s; process {} MiB afterwards",
        started.elapsed().as_secs_f64(),
        rss_kib() / 1024
    );
    store.close().await;
    Ok(())
}

/// Notes one use of every entry from its own client address, as the proxy does, then times
/// one flush of the usage queue.
async fn flush_ms(
    store: &Store,
    entries: &[Arc<KeyEntry>],
    round: i64,
) -> Result<f64, Box<dyn std::error::Error>> {
    let usage = Usage::new();
    let now = Clock::System.now_ms() + round * 10_000;
    for (i, entry) in entries.iter().enumerate() {
        let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i as u32));
        usage.record_from(entry, now, Some(client));
    }
    assert_eq!(usage.pending(), entries.len(), "one queued stamp per key");
    let started = Instant::now();
    let written = usage.flush(store).await?;
    assert_eq!(written, entries.len());
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// Creates `n` service accounts in one statement; returns their ids.
async fn bulk_accounts(store: &Store, n: usize) -> Result<Vec<i64>, Box<dyn std::error::Error>> {
    let names: Vec<String> = (0..n).map(|i| format!("bulk-account-{i}")).collect();
    let ids = match store {
        Store::Postgres(pool) => {
            sqlx::query_scalar(
                "INSERT INTO service_accounts (name, created_at, created_by)
                 SELECT n, 0, 'bench' FROM unnest($1::TEXT[]) AS v(n) RETURNING id",
            )
            .bind(&names)
            .fetch_all(pool)
            .await?
        }
        Store::Sqlite(pool) => {
            sqlx::query_scalar(
                "INSERT INTO service_accounts (name, created_at, created_by)
                 SELECT value, 0, 'bench' FROM json_each($1) RETURNING id",
            )
            .bind(serde_json::to_string(&names)?)
            .fetch_all(pool)
            .await?
        }
    };
    Ok(ids)
}

/// Inserts `n` keys spread over `accounts` and the scope lists, in batches.
async fn bulk_insert(
    store: &Store,
    accounts: &[i64],
    n: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    const BATCH: usize = 50_000;
    let mut done = 0;
    while done < n {
        let count = BATCH.min(n - done);
        let prefixes: Vec<String> = (0..count)
            .map(|_| keys::generate(KeyKind::ServiceAccount).prefix().to_string())
            .collect();
        let hashes: Vec<String> = (0..count).map(|_| placeholder_phc()).collect();
        let batch_id = getrandom_u32();
        let names: Vec<String> = (0..count)
            .map(|i| format!("bulk-{batch_id:08x}-{i}"))
            .collect();
        let owners: Vec<i64> = (0..count)
            .map(|i| accounts[(done + i) % accounts.len()])
            .collect();
        let scopes: Vec<&str> = (0..count)
            .map(|i| SCOPE_LISTS[(done + i) / 7 % SCOPE_LISTS.len()])
            .collect();
        // A prefix clash (5 random base62 characters) skips a row; the loop makes up for it.
        let inserted = match store {
            Store::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO api_keys (account_id, prefix, key_hash, name, scopes, created_at, created_by)
                     SELECT a, p, h, n, s, 0, 'bench'
                       FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[]) AS v(a, p, h, n, s)
                     ON CONFLICT DO NOTHING",
                )
                .bind(&owners)
                .bind(&prefixes)
                .bind(&hashes)
                .bind(&names)
                .bind(&scopes)
                .execute(pool)
                .await?
                .rows_affected()
            }
            Store::Sqlite(pool) => {
                let rows: Vec<(i64, &str, &str, &str, &str)> = (0..count)
                    .map(|i| {
                        (
                            owners[i],
                            prefixes[i].as_str(),
                            hashes[i].as_str(),
                            names[i].as_str(),
                            scopes[i],
                        )
                    })
                    .collect();
                sqlx::query(
                    "INSERT OR IGNORE INTO api_keys (account_id, prefix, key_hash, name, scopes, created_at, created_by)
                     SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
                            json_extract(value, '$[3]'), json_extract(value, '$[4]'), 0, 'bench'
                       FROM json_each($1)",
                )
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

/// A PHC string shaped like a real one at the OWASP parameters (16-byte salt, 32-byte output),
/// with random bytes: as long and as distinct as a real hash, and never verifiable.
fn placeholder_phc() -> String {
    let mut bytes = [0u8; 48];
    getrandom::getrandom(&mut bytes).expect("random");
    let salt = SaltString::encode_b64(&bytes[..16]).expect("16 bytes is a valid salt");
    let output = Output::new(&bytes[16..]).expect("32 bytes is a valid output");
    format!("$argon2id$v=19$m=19456,t=2,p=1${}${output}", salt.as_str())
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
                && entry.scopes().contains(&scope);
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
