//! Micro-benchmarks of keygate's request-path work on a warm key, and of the cold and bulk
//! operations around it. Run with `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::Method;
use keygate::config::{HashingConfig, RouteConfig, Upstream, VerificationConfig};
use keygate::keys::{self, KeyId, KeyKind, KeyRow, KeyState, KeyTable, Scope, Verifier};
use keygate::proxy::{canonical_path, Router};

const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const CHEAP: HashingConfig = HashingConfig {
    memory_kib: 1024,
    iterations: 1,
    parallelism: 1,
};
const OWASP: HashingConfig = HashingConfig {
    memory_kib: 19_456,
    iterations: 2,
    parallelism: 1,
};

fn row(id: i64, prefix: &str, hash: String) -> KeyRow {
    KeyRow {
        id: KeyId {
            kind: KeyKind::ServiceAccount,
            id,
        },
        prefix: Some(prefix.to_string()),
        key_hash: Some(hash),
        scopes: "recordings:read tickets:write".into(),
        expires_at: Some(i64::MAX),
        revoked_at: None,
        updated_at: id,
        owner_id: 1,
        owner_name: "billing".into(),
    }
}

/// A table of `n` keys (cheap placeholder hashes) plus one real key, returned with its text.
fn table_with(n: usize) -> (KeyTable, String) {
    let argon = keys::hasher(CHEAP).expect("params");
    let real = keys::generate(KeyKind::ServiceAccount);
    let mut rows = Vec::with_capacity(n + 1);
    for i in 0..n {
        let k = keys::generate(KeyKind::ServiceAccount);
        rows.push(row(
            i as i64 + 2,
            k.prefix().as_str(),
            "$argon2id$placeholder".into(),
        ));
    }
    rows.push(row(
        1,
        real.prefix().as_str(),
        keys::hash_key(&argon, real.expose()),
    ));
    let table = KeyTable::new();
    table.replace_all(rows);
    (table, real.expose().to_string())
}

fn verification() -> VerificationConfig {
    keygate::config::Config::default().verification
}

fn warm_key_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (table, key) = table_with(10_000);
    let verifier = Verifier::new(&verification());
    let scope = Scope::new("recordings:read").expect("scope");
    // Warm the cache with one real argon2 verification.
    rt.block_on(async {
        let parsed = keys::parse(&key).expect("parses");
        let entry = table.lookup(&parsed.prefix).expect("entry");
        verifier
            .verify(&entry, &parsed, LOCAL)
            .await
            .expect("verifies");
    });

    let mut g = c.benchmark_group("hot_path");
    g.bench_function("parse_and_checksum", |b| {
        b.iter(|| keys::parse(black_box(&key)).is_ok())
    });
    let parsed = keys::parse(&key).expect("parses");
    g.bench_function("table_lookup_10k", |b| {
        b.iter(|| table.lookup(black_box(&parsed.prefix)).is_some())
    });
    let entry = table.lookup(&parsed.prefix).expect("entry");
    g.bench_function("verification_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            verifier
                .verify(black_box(&entry), black_box(&parsed), LOCAL)
                .await
                .is_ok()
        })
    });
    g.bench_function("scope_and_expiry_check", |b| {
        b.iter(|| {
            black_box(&entry).state(black_box(1_000)) == KeyState::Active
                && entry.scopes().contains(black_box(&scope))
        })
    });
    g.bench_function("warm_key_total", |b| {
        b.to_async(&rt).iter(|| async {
            let parsed = keys::parse(black_box(&key)).expect("parses");
            let entry = table.lookup(&parsed.prefix).expect("entry");
            let active = entry.state(1_000) == KeyState::Active;
            let ok = verifier.verify(&entry, &parsed, LOCAL).await.is_ok();
            active && ok && entry.scopes().contains(&scope)
        })
    });
    g.bench_function("path_canonical_check", |b| {
        b.iter(|| canonical_path(black_box(b"/recordings/2026/11/26/export.json")).is_ok())
    });
    g.finish();
}

fn routing(c: &mut Criterion) {
    let upstream = Upstream {
        scheme: http::uri::Scheme::HTTP,
        authority: "127.0.0.1:3000".parse().expect("authority"),
    };
    let routes: Vec<RouteConfig> = (0..100)
        .map(|i| RouteConfig {
            name: format!("route-{i}"),
            path_prefix: format!("/service-{i}/v1"),
            methods: if i % 2 == 0 {
                vec![Method::GET]
            } else {
                vec![]
            },
            upstream: upstream.clone(),
            scope: Scope::new(&format!("svc{i}:read")).expect("scope"),
            audit: keygate::config::AuditMode::Writes,
            tls: Default::default(),
        })
        .collect();
    let router = Router::new(&routes);
    c.bench_function("route_match_100_routes_worst_case", |b| {
        b.iter(|| {
            router
                .find(
                    black_box(&Method::POST),
                    black_box("/service-0/v1/items/42"),
                )
                .is_none()
        })
    });
}

fn cold_argon2(c: &mut Criterion) {
    let argon = keys::hasher(OWASP).expect("params");
    let key = keys::generate(KeyKind::ServiceAccount);
    let hash = keys::hash_key(&argon, key.expose());
    let mut g = c.benchmark_group("cold");
    g.sample_size(20);
    g.bench_function("argon2id_verify_owasp_19MiB_t2", |b| {
        b.iter(|| keys::verify_hash(black_box(&hash), black_box(key.expose())))
    });
    g.finish();
}

fn table_refresh(c: &mut Criterion) {
    let n = 1_000_000;
    let rows: Vec<KeyRow> = (0..n)
        .map(|i| {
            let k = keys::generate(KeyKind::ServiceAccount);
            row(
                i as i64 + 1,
                k.prefix().as_str(),
                "$argon2id$placeholder".into(),
            )
        })
        .collect();
    let target = rows[n / 2].clone();
    let table = Arc::new(KeyTable::new());
    table.replace_all(rows);
    let mut version = 10_000_000;
    let mut g = c.benchmark_group("refresh");
    g.sample_size(50);
    g.bench_function("apply_1_changed_key_among_1m", |b| {
        b.iter_batched(
            || {
                version += 1;
                let mut r = target.clone();
                r.updated_at = version;
                r.expires_at = Some(version);
                vec![r]
            },
            |rows| table.apply(rows),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, warm_key_path, routing, cold_argon2, table_refresh);
criterion_main!(benches);
