//! Heartbeats: every sidecar records who it is and how current its key table is in the shared
//! database, so an operator can list the fleet and see on how many live sidecars a key change
//! has taken effect ("applied on 3 of 3").

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::keys::KeyTable;
use crate::store::{Heartbeat, Store, StoreError};
use crate::sync::{Schema, SyncStatus};

/// A sidecar missing this many heartbeats in a row no longer counts as live.
const LIVE_BEATS: u32 = 3;

/// Rows of sidecars silent this long are deleted (checked every `PRUNE_EVERY` beats).
const FORGET_AFTER_MS: i64 = 24 * 60 * 60 * 1000;
const PRUNE_EVERY: u32 = 100;

/// Who this sidecar is, fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Random per start, so a restarted sidecar is a new row (the old one ages out).
    pub id: String,
    pub host: String,
    pub started_at: i64,
}

impl Identity {
    pub fn new(now_ms: i64) -> Identity {
        let mut b = [0u8; 6];
        let _ = getrandom::getrandom(&mut b);
        Identity {
            id: b.iter().map(|x| format!("{x:02x}")).collect(),
            host: hostname(),
            started_at: now_ms,
        }
    }
}

/// How far a key change has spread.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub key_prefix: String,
    /// The key's change marker: a sidecar whose watermark reached it has applied the change.
    pub updated_at: i64,
    pub applied: usize,
    pub of: usize,
}

/// Heartbeats recent enough (within three intervals) to count as live, newest first.
pub async fn live(
    store: &Store,
    now_ms: i64,
    interval: Duration,
) -> Result<Vec<Heartbeat>, StoreError> {
    let window = (interval * LIVE_BEATS).as_millis() as i64;
    store.heartbeats(now_ms - window).await
}

/// On how many live sidecars the latest change to the key with `prefix` has taken effect;
/// `None` for a prefix no key has.
pub async fn applied(
    store: &Store,
    prefix: &str,
    now_ms: i64,
    interval: Duration,
) -> Result<Option<Applied>, StoreError> {
    let Some(updated_at) = store.key_change_marker(prefix).await? else {
        return Ok(None);
    };
    let sidecars = live(store, now_ms, interval).await?;
    Ok(Some(Applied {
        key_prefix: prefix.to_string(),
        updated_at,
        applied: sidecars
            .iter()
            .filter(|s| s.watermark >= updated_at)
            .count(),
        of: sidecars.len(),
    }))
}

/// Records a heartbeat every `interval`, and soon after the table applies a change, until
/// `shutdown`; then removes this sidecar's row.
pub async fn run(
    store: Store,
    identity: Identity,
    table: Arc<KeyTable>,
    status: Arc<SyncStatus>,
    clock: Clock,
    interval: Duration,
    shutdown: CancellationToken,
) {
    // A change applied wakes the loop, but beats stay at least this far apart.
    let min_gap = (interval / 10).max(Duration::from_millis(50));
    // What the last beat told: the watermark, and whether the table was loaded then.
    let mut reported = None;
    let mut next_beat = Instant::now();
    let mut failing = false;
    let mut beats = 0u32;
    // Not while a first start creates the schema: on SQLite, another connection writing
    // meanwhile can make a migration step fail with "database is locked" (seen once in CI; the
    // start warned and retried). A first attempt that failed does not hold it back: a sidecar
    // whose migrations keep failing still reports itself.
    tokio::select! {
        () = status.schema_at_least(Schema::Failed) => {}
        () = shutdown.cancelled() => return,
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_beat) => {}
            () = status.applied.notified() => {
                if reported == Some((table.watermark(), table.synced_at().is_some())) {
                    continue;
                }
                tokio::select! {
                    () = tokio::time::sleep(min_gap) => {}
                    () = shutdown.cancelled() => break,
                }
            }
            () = shutdown.cancelled() => break,
        }
        let now = clock.now_ms();
        let watermark = table.watermark();
        let synced_at = table.synced_at();
        let beat = Heartbeat {
            id: identity.id.clone(),
            host: identity.host.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: identity.started_at,
            seen_at: now,
            watermark,
            table_age_ms: synced_at.map(|at| (now - at).max(0)),
            keys: table.len() as i64,
        };
        match store.record_heartbeat(&beat).await {
            Ok(()) => {
                reported = Some((watermark, synced_at.is_some()));
                beats = beats.wrapping_add(1);
                if beats % PRUNE_EVERY == 1 {
                    match store.prune_heartbeats(now - FORGET_AFTER_MS).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(sidecars = n, "forgot sidecars silent for a day"),
                        Err(e) => tracing::debug!(error = %e, "pruning old heartbeats failed"),
                    }
                }
                if failing {
                    tracing::info!("heartbeat recorded again");
                    failing = false;
                }
            }
            // Until the key table's first load the schema may not exist yet (a first start
            // creates it), and the sync task already warns when the database cannot be
            // reached: nothing to add but a debug line.
            Err(e) if synced_at.is_none() => {
                tracing::debug!(error = %e, "heartbeat not recorded before the first table load; will retry");
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "recording the heartbeat failed; will retry");
                }
                failing = true;
            }
        }
        next_beat = Instant::now() + interval;
    }
    if let Err(e) = store.remove_heartbeat(&identity.id).await {
        tracing::debug!(error = %e, "removing the heartbeat at stop failed; it will age out");
    }
}

/// The machine's name, for the fleet list.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
