//! Keeps the in-memory key table in step with the database: migrate and load at start (retried
//! with backoff while the database is away), then apply every change PostgreSQL announces on
//! `keygate_changes` at once, with an incremental refresh every `database.refresh_interval` as
//! the backstop (and the only path on SQLite). PostgreSQL does not redeliver notifications sent
//! while a listener was away, so every (re)connect of the listener reloads the whole table.
//! When the database is away the table keeps serving what it had.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::{self, Clock};
use crate::keys::KeyTable;
use crate::metrics::SyncMetrics;
use crate::store::{Store, StoreError};

/// How far back each refresh re-reads, for transactions that commit after a later one: the
/// rows stamped in the last `OVERLAP_MS` before the newest applied change, but never rows
/// stamped more than `OVERLAP_MS` before an earlier refresh began (database clock). Without
/// that second bound, a burst of changes (a bulk import) would be read again on every refresh
/// until the next change came.
const OVERLAP_MS: i64 = 5_000;

/// Longest a load or refresh may take. A connection to a database host that vanished without
/// closing it could otherwise hang the sync loop until TCP gives up (minutes).
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(15);

/// What the sync task has seen, as atomics for readiness, heartbeats and metrics. The table's
/// own `synced_at` gives its age.
#[derive(Debug)]
pub struct SyncStatus {
    notifications: AtomicU64,
    /// Commit → applied for the newest notified change, in ms (-1 before the first one).
    last_lag_ms: AtomicI64,
    database_ok: AtomicBool,
    listening: AtomicBool,
    reloads: AtomicU64,
    /// How far migrating the schema has got, for the tasks that must not touch the database
    /// before it exists.
    schema: watch::Sender<Schema>,
    /// Woken whenever a change has been applied, so the heartbeat reports it promptly.
    pub(crate) applied: Notify,
}

impl Default for SyncStatus {
    fn default() -> Self {
        SyncStatus {
            notifications: AtomicU64::new(0),
            last_lag_ms: AtomicI64::new(-1),
            database_ok: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            reloads: AtomicU64::new(0),
            schema: watch::Sender::new(Schema::Untried),
            applied: Notify::new(),
        }
    }
}

impl SyncStatus {
    pub fn new() -> SyncStatus {
        SyncStatus::default()
    }

    /// Change notifications received from PostgreSQL.
    pub fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Relaxed)
    }

    /// Lag between the newest notified change being committed and applied here, in ms.
    pub fn last_lag_ms(&self) -> Option<i64> {
        Some(self.last_lag_ms.load(Ordering::Relaxed)).filter(|l| *l >= 0)
    }

    /// Whether the last load or refresh reached the database.
    pub fn database_ok(&self) -> bool {
        self.database_ok.load(Ordering::Relaxed)
    }

    /// Whether the change listener is connected (always false on SQLite).
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// Whole-table loads, the first included.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Waits until migrating the schema has got as far as `wanted`: `Schema::Failed` once the
    /// first attempt has ended either way, `Schema::Migrated` once one has succeeded.
    pub async fn schema_at_least(&self, wanted: Schema) {
        let mut schema = self.schema.subscribe();
        // Never an error: `self` holds the sender.
        let _ = schema.wait_for(|now| *now >= wanted).await;
    }

    /// Records a migration attempt's outcome; a schema once migrated stays so.
    fn schema_attempted(&self, migrated: bool) {
        let outcome = if migrated {
            Schema::Migrated
        } else {
            Schema::Failed
        };
        self.schema.send_if_modified(|now| {
            let raised = outcome > *now;
            if raised {
                *now = outcome;
            }
            raised
        });
    }
}

/// How far migrating the schema has got, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Schema {
    /// Not yet tried: a first start may be creating the tables right now.
    Untried,
    /// Tried and failed; the tables may not exist.
    Failed,
    /// The tables this version uses exist.
    Migrated,
}

/// Loads every key into `table`, building the new table from rows as they arrive; the old one
/// serves until the last row is in.
pub async fn load(store: &Store, table: &KeyTable, clock: &Clock) -> Result<usize, StoreError> {
    let started = limited(store.now_ms()).await?;
    let mut load = table.begin_load();
    limited(store.each_table_row(i64::MIN, |row| load.add(row))).await?;
    let n = load.finish();
    table.settle(started - OVERLAP_MS);
    table.mark_synced(clock.now_ms());
    Ok(n)
}

/// What one refresh did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refreshed {
    /// Rows the database sent.
    pub read: usize,
    /// Entries that changed in the table.
    pub changed: usize,
}

/// Applies what changed since the last refresh.
pub async fn refresh(
    store: &Store,
    table: &KeyTable,
    clock: &Clock,
) -> Result<Refreshed, StoreError> {
    let started = limited(store.now_ms()).await?;
    let since = table
        .watermark()
        .saturating_sub(OVERLAP_MS)
        .max(table.settled());
    let rows = limited(store.table_rows(since)).await?;
    let read = rows.len();
    let changed = table.apply(rows);
    table.settle(started - OVERLAP_MS);
    table.mark_synced(clock.now_ms());
    Ok(Refreshed { read, changed })
}

/// Migrates and loads (retrying with backoff until it works), then applies changes as they are
/// announced and refreshes every `interval`, until `shutdown`. All table writes happen in this
/// one task, so a whole-table load can never overwrite a newer incremental change.
pub async fn run(
    store: Store,
    table: Arc<KeyTable>,
    status: Arc<SyncStatus>,
    clock: Clock,
    interval: Duration,
    shutdown: CancellationToken,
    metrics: SyncMetrics,
) {
    // Every load and refresh is timed and counted for /metrics.
    let timed_load = || async {
        let started = std::time::Instant::now();
        let loaded = load(&store, &table, &clock).await;
        metrics.observe(started, loaded.is_ok());
        loaded
    };
    let timed_refresh = || async {
        let started = std::time::Instant::now();
        let refreshed = refresh(&store, &table, &clock).await;
        metrics.observe(started, refreshed.is_ok());
        refreshed
    };
    let mut backoff = Backoff::new();
    loop {
        let attempt = async {
            let migrated = store.migrate().await;
            status.schema_attempted(migrated.is_ok());
            migrated?;
            timed_load().await
        };
        let result = tokio::select! {
            r = attempt => r,
            () = shutdown.cancelled() => return,
        };
        match result {
            Ok(n) => {
                status.database_ok.store(true, Ordering::Relaxed);
                status.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(keys = n, "key table loaded");
                status.applied.notify_one();
                break;
            }
            Err(e) => {
                status.database_ok.store(false, Ordering::Relaxed);
                let wait = backoff.next_wait();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "loading the key table failed; not ready");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }

    let (events_tx, mut events) = mpsc::channel(1024);
    if matches!(store, Store::Postgres(_)) {
        tokio::spawn(listen(store.clone(), events_tx, shutdown.clone()));
    }
    let mut next_refresh = Instant::now() + interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_refresh) => {
                next_refresh = Instant::now() + interval;
                let outcome = timed_refresh().await.map(|_| ());
                note_outcome(&status, outcome, "key table refresh");
            }
            Some(event) = events.recv() => {
                match event {
                    Event::Change { updated_at } => {
                        // Coalesce a burst: one refresh covers every change queued so far.
                        let mut newest = updated_at;
                        let mut count = 1;
                        while let Ok(Event::Change { updated_at }) = events.try_recv() {
                            newest = newest.max(updated_at);
                            count += 1;
                        }
                        status.notifications.fetch_add(count, Ordering::Relaxed);
                        metrics.notifications.inc_by(count);
                        let outcome = timed_refresh().await.map(|_| ());
                        if outcome.is_ok() {
                            let lag = (clock::system_now_ms() - newest).max(0);
                            status.last_lag_ms.store(lag, Ordering::Relaxed);
                            metrics.change_lag.set(lag as f64 / 1000.0);
                            tracing::debug!(changes = count, lag_ms = lag, "announced changes applied");
                        }
                        note_outcome(&status, outcome, "applying an announced change");
                    }
                    Event::Connected => {
                        status.listening.store(true, Ordering::Relaxed);
                        let outcome = timed_load().await.map(|n| {
                            status.reloads.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(keys = n, "change listener connected; key table reloaded");
                        });
                        note_outcome(&status, outcome, "reloading the key table");
                    }
                    Event::Lost => status.listening.store(false, Ordering::Relaxed),
                }
            }
            () = shutdown.cancelled() => return,
        }
    }
}

/// Runs a store call within `ROUND_TRIP_LIMIT`.
async fn limited<T>(
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(ROUND_TRIP_LIMIT, call)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {}s", ROUND_TRIP_LIMIT.as_secs()),
                ),
            )))
        })
}

/// Logs the first failure and the recovery, not every attempt in between.
fn note_outcome(status: &SyncStatus, outcome: Result<(), StoreError>, what: &str) {
    let was_ok = status.database_ok.swap(outcome.is_ok(), Ordering::Relaxed);
    match outcome {
        Ok(()) if !was_ok => tracing::info!("database reachable again; key table caught up"),
        Ok(()) => {}
        Err(e) if was_ok => {
            tracing::warn!(error = %e, "{what} failed; serving the last table loaded")
        }
        Err(_) => {}
    }
    status.applied.notify_one();
}

/// What the change listener tells the sync loop.
#[derive(Debug)]
enum Event {
    /// A key or gateway row changed; `updated_at` is its new change marker.
    Change { updated_at: i64 },
    /// The listener (re)connected: notifications may have been missed.
    Connected,
    /// The listener's connection dropped.
    Lost,
}

/// Listens on the changes channel, reconnecting with backoff and jitter, until `shutdown`.
async fn listen(store: Store, events: mpsc::Sender<Event>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new();
    let mut reported = false;
    loop {
        let connected = tokio::select! {
            r = store.listen_for_changes() => r,
            () = shutdown.cancelled() => return,
        };
        match connected {
            Ok(None) => return,
            Ok(Some(mut listener)) => {
                backoff.reset();
                reported = false;
                if events.send(Event::Connected).await.is_err() {
                    return;
                }
                loop {
                    let next = tokio::select! {
                        r = listener.try_recv() => r,
                        () = shutdown.cancelled() => return,
                    };
                    let event = match next {
                        Ok(Some(n)) => {
                            match parse_payload(n.payload()) {
                                Some(updated_at) => Event::Change { updated_at },
                                None => {
                                    tracing::warn!(payload = n.payload(), "ignoring a change notification keygate does not understand");
                                    continue;
                                }
                            }
                        }
                        Ok(None) | Err(_) => {
                            tracing::warn!("change listener lost its connection; reconnecting");
                            let _ = events.send(Event::Lost).await;
                            break;
                        }
                    };
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if !reported {
                    tracing::warn!(error = %e, "change listener cannot connect; retrying with backoff");
                    reported = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_wait()) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// `KIND:ID:UPDATED_AT` → `UPDATED_AT`.
fn parse_payload(payload: &str) -> Option<i64> {
    let mut parts = payload.split(':');
    let kind = parts.next()?;
    let _id: i64 = parts.next()?.parse().ok()?;
    let updated_at = parts.next()?.parse().ok()?;
    (matches!(kind, "s" | "g") && parts.next().is_none()).then_some(updated_at)
}

/// Exponential backoff from 100 ms to 5 s with "equal jitter" (half fixed, half random), so a
/// fleet that lost its database together does not reconnect in lockstep.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Backoff {
        Backoff { next: Self::MIN }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// The wait before the next attempt.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let mut b = [0u8; 2];
        let _ = getrandom::getrandom(&mut b);
        let fraction = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
        base / 2 + base.mul_f64(fraction / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_hear_how_far_the_schema_got_and_a_migrated_schema_stays_so() {
        let status = Arc::new(SyncStatus::new());
        let waiting = |wanted| {
            let status = status.clone();
            tokio::spawn(async move { status.schema_at_least(wanted).await })
        };
        let (any_outcome, migrated) = (waiting(Schema::Failed), waiting(Schema::Migrated));
        tokio::task::yield_now().await;
        assert!(!any_outcome.is_finished() && !migrated.is_finished());

        status.schema_attempted(false);
        any_outcome.await.expect("woken by a failed attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !migrated.is_finished(),
            "a failed attempt is not a migrated schema"
        );

        status.schema_attempted(true);
        migrated.await.expect("woken once migrated");
        status.schema_attempted(false);
        assert_eq!(*status.schema.borrow(), Schema::Migrated);
        // Already there: returns at once.
        status.schema_at_least(Schema::Migrated).await;
    }

    #[test]
    fn payloads_parse_strictly() {
        assert_eq!(parse_payload("s:42:1700000000123"), Some(1_700_000_000_123));
        assert_eq!(parse_payload("g:7:5"), Some(5));
        assert_eq!(parse_payload("x:7:5"), None);
        assert_eq!(parse_payload("s:7"), None);
        assert_eq!(parse_payload("s:7:5:9"), None);
        assert_eq!(parse_payload("s:seven:5"), None);
    }

    #[test]
    fn backoff_grows_to_a_cap_with_jitter_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_wait();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let waits: Vec<Duration> = (0..10).map(|_| b.next_wait()).collect();
        let last = *waits.last().expect("ten waits");
        assert!(last >= Duration::from_millis(2_500) && last <= Duration::from_secs(5));
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
