//! Last-used stamping off the request path. A request only bumps an atomic on its key entry
//! and, at most once per flush, queues the entry; a background task writes the newest time per
//! key in one statement per table every `last_used.flush_interval`, and once more at shutdown.
//! The queue holds at most one slot per key, so it is bounded by the table's size. The same
//! statement writes each key's last client address.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::keys::{KeyEntry, KeyKind};
use crate::metrics::QueueMetrics;
use crate::store::{Store, StoreError, UseStamp};

#[derive(Default)]
pub struct Usage {
    queue: Mutex<Vec<Arc<KeyEntry>>>,
}

impl Usage {
    pub fn new() -> Usage {
        Usage::default()
    }

    /// Notes that `entry` was used at `now_ms`. Cheap: one relaxed load in the common case.
    pub fn record(&self, entry: &Arc<KeyEntry>, now_ms: i64) {
        self.record_from(entry, now_ms, None);
    }

    /// `record` with the client address of the use.
    pub fn record_from(&self, entry: &Arc<KeyEntry>, now_ms: i64, client: Option<IpAddr>) {
        if entry.note_use_from(now_ms, client) {
            self.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(entry.clone());
        }
    }

    /// Keys waiting to be stamped.
    pub fn pending(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Writes every pending stamp. On failure the stamps go back in the queue for the next try.
    pub async fn flush(&self, store: &Store) -> Result<usize, StoreError> {
        let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            return Ok(0);
        }
        let (mut keys, mut gateways) = (Vec::with_capacity(batch.len()), Vec::new());
        for entry in &batch {
            let at_ms = entry.take_stamp();
            let key = entry.id();
            match key.kind {
                KeyKind::ServiceAccount => keys.push(UseStamp {
                    id: key.id,
                    at_ms,
                    client: entry.last_client(),
                }),
                KeyKind::Gateway => gateways.push((key.id, at_ms)),
            }
        }
        match store.stamp_last_used(&keys, &gateways).await {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                queue.extend(batch.into_iter().filter(|entry| entry.requeue_stamp()));
                Err(e)
            }
        }
    }

    /// Flushes every `interval` until `shutdown`, then flushes once more.
    pub async fn run(
        self: Arc<Self>,
        store: Store,
        interval: Duration,
        shutdown: CancellationToken,
        metrics: QueueMetrics,
    ) {
        loop {
            let stop = tokio::select! {
                () = tokio::time::sleep(interval) => false,
                () = shutdown.cancelled() => true,
            };
            let started = Instant::now();
            let flushed = self.flush(&store).await;
            if !matches!(flushed, Ok(0)) {
                metrics.observe_flush(started, flushed.is_ok());
            }
            match flushed {
                Ok(0) => {}
                Ok(n) => tracing::debug!(keys = n, "last_used stamps written"),
                Err(e) => {
                    tracing::warn!(error = %e, pending = self.pending(), "writing last_used stamps failed; will retry")
                }
            }
            if stop {
                break;
            }
        }
    }
}
