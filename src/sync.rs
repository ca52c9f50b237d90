//! Keeps the in-memory key table in step with the database: a full load at start (retried
//! until it succeeds), then incremental refreshes every `database.refresh_interval` reading
//! rows whose change marker is newer than the last one applied. The window overlaps by a few
//! seconds so that a transaction that committed late is not missed; rows already applied are
//! skipped. When the database is away the table keeps serving what it had.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::keys::KeyTable;
use crate::metrics::SyncMetrics;
use crate::store::{Store, StoreError};

/// How far back each refresh re-reads, for transactions that commit after a later one.
const OVERLAP_MS: i64 = 5_000;

/// Loads every key into `table`.
pub async fn load(store: &Store, table: &KeyTable, clock: &Clock) -> Result<usize, StoreError> {
    let rows = store.table_rows(i64::MIN).await?;
    let n = rows.len();
    table.replace_all(rows);
    table.mark_synced(clock.now_ms());
    Ok(n)
}

/// Applies what changed since the last refresh; returns how many entries changed.
pub async fn refresh(store: &Store, table: &KeyTable, clock: &Clock) -> Result<usize, StoreError> {
    let rows = store
        .table_rows(table.watermark().saturating_sub(OVERLAP_MS))
        .await?;
    let changed = table.apply(rows);
    table.mark_synced(clock.now_ms());
    Ok(changed)
}

/// Loads (retrying with backoff until it works) and then refreshes every `interval` until
/// `shutdown`.
pub async fn run(
    store: Store,
    table: Arc<KeyTable>,
    clock: Clock,
    interval: Duration,
    shutdown: CancellationToken,
    metrics: SyncMetrics,
) {
    let mut backoff = Duration::from_millis(100);
    while table.synced_at().is_none() {
        let started = Instant::now();
        let loaded = load(&store, &table, &clock).await;
        metrics.observe(started, loaded.is_ok());
        match loaded {
            Ok(n) => tracing::info!(keys = n, "key table loaded"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "loading the key table failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
        let started = Instant::now();
        let refreshed = refresh(&store, &table, &clock).await;
        metrics.observe(started, refreshed.is_ok());
        match refreshed {
            Ok(changed) => {
                if failing {
                    tracing::info!("key table refresh recovered");
                    failing = false;
                }
                if changed > 0 {
                    tracing::debug!(changed, "key table refreshed");
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "key table refresh failed; serving the last table loaded");
                }
                failing = true;
            }
        }
    }
}
