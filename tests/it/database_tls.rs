//! PostgreSQL over TLS through keygate's own connect paths: the URLs in the Kubernetes manifest
//! and the fleet runbook carry `sslmode=require`, and the test server has `ssl = on`.

use keygate::config::DatabaseUrl;
use keygate::store::Store;

use crate::cli::{keygate, ok, write_config};
use crate::harness::*;

/// Whether the server sees the store's session as encrypted (`pg_stat_ssl`, not the client's
/// own opinion).
async fn encrypted(store: &Store) -> bool {
    let Store::Postgres(pool) = store else {
        panic!("a postgres:// URL opens a PostgreSQL store");
    };
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(pool)
        .await
        .expect("pg_stat_ssl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_connects_over_tls() {
    let db = TestDb::new(Engine::Postgres).await;
    let url = DatabaseUrl::new(format!("{}?sslmode=require", db.url)).expect("url");
    let store = Store::connect(&url, 1)
        .await
        .expect("connects with sslmode=require");
    assert!(encrypted(&store).await, "sslmode=require must encrypt");
    store.migrate().await.expect("migrations run over TLS");
    store.close().await;

    let lazy = Store::connect_lazy(&url, 1).expect("lazy pool");
    assert!(
        encrypted(&lazy).await,
        "the serve path's lazy pool must encrypt too"
    );
    lazy.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_prefer_uses_tls_when_the_server_offers_it() {
    let db = TestDb::new(Engine::Postgres).await;
    let url = DatabaseUrl::new(format!("{}?sslmode=prefer", db.url)).expect("url");
    let store = Store::connect(&url, 1).await.expect("connects");
    assert!(
        encrypted(&store).await,
        "sslmode=prefer must not fall back to plaintext when TLS is available"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_migrates_and_lists_over_sslmode_require() {
    let db = TestDb::new(Engine::Postgres).await;
    let cfg = write_config(&format!(
        "[database]\nurl = \"{}?sslmode=require\"\n",
        db.url
    ));
    let out = ok(keygate(&cfg.path, &["migrate"]));
    assert!(out.contains("migrations applied"), "{out}");
    ok(keygate(&cfg.path, &["account", "list"]));
}
