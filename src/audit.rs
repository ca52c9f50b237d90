//! Audit of requests service accounts and gateways make through the proxy (actor_type
//! `service_account` or `gateway`), off the request path: the pipeline pushes a small record
//! into a bounded queue (one short lock, no I/O); a background task writes the queue with
//! multi-row inserts every flush interval, as soon as a batch has filled, and once more at
//! shutdown. When the queue is full the record is dropped, counted, and the loss is logged at
//! the next flush.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Method;
use prometheus::IntGauge;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::keys::{KeyEntry, KeyKind, KEY_LEN, PREFIX_LEN};
use crate::metrics::QueueMetrics;
use crate::store::{AuditEntry, Store, StoreError};

/// Records waiting to be written, at most this many.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// A queue this long wakes the writer before its interval is up.
const BATCH: usize = 1_000;

/// One proxied request, as the pipeline hands it over.
pub struct ProxiedRequest {
    pub at_ms: i64,
    pub entry: Arc<KeyEntry>,
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub client: IpAddr,
}

pub struct AuditQueue {
    queue: Mutex<Vec<ProxiedRequest>>,
    capacity: usize,
    /// Wakes the writer when a batch has filled.
    batch_ready: tokio::sync::Notify,
    /// Records dropped since the last report.
    dropped: AtomicU64,
    /// Records dropped since start (tests, metrics).
    dropped_total: AtomicU64,
}

impl AuditQueue {
    pub fn new(capacity: usize) -> AuditQueue {
        AuditQueue {
            queue: Mutex::new(Vec::new()),
            capacity,
            batch_ready: tokio::sync::Notify::new(),
            dropped: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
        }
    }

    /// Queues a record, or counts it as lost when the queue is full. Never waits on I/O.
    pub fn push(&self, record: ProxiedRequest) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.len() >= self.capacity {
            drop(queue);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
        } else {
            queue.push(record);
            let full = queue.len() == BATCH.min(self.capacity);
            drop(queue);
            if full {
                self.batch_ready.notify_one();
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// Writes every queued record in one transaction. On failure the records go back in the
    /// queue as far as its capacity allows, for the next attempt; the rest are counted as lost.
    pub async fn flush(&self, store: &Store) -> Result<usize, StoreError> {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                capacity = self.capacity,
                "audit queue overflowed: proxied-request audit records were lost"
            );
        }
        let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            return Ok(0);
        }
        let entries: Vec<AuditEntry> = batch.iter().map(entry).collect();
        match store.append_audit_batch(&entries).await {
            Ok(()) => Ok(entries.len()),
            Err(e) => {
                // Hold what fits for the next attempt (the database may be away for a while);
                // count and log the rest. Memory stays bounded by the queue's capacity.
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                let room = self.capacity.saturating_sub(queue.len());
                let kept = batch.len().min(room);
                let lost = batch.len() - kept;
                let newer = std::mem::take(&mut *queue);
                queue.extend(batch.into_iter().take(kept));
                queue.extend(newer);
                drop(queue);
                if lost > 0 {
                    self.dropped_total.fetch_add(lost as u64, Ordering::Relaxed);
                }
                tracing::warn!(
                    error = %e,
                    held = kept,
                    lost,
                    "writing proxied-request audit records failed; holding them for the next attempt"
                );
                Err(e)
            }
        }
    }

    /// Flushes every `interval` and whenever a batch fills, until `shutdown`, then once more.
    pub async fn run(
        self: Arc<Self>,
        store: Store,
        interval: Duration,
        shutdown: CancellationToken,
        metrics: QueueMetrics,
        depth: IntGauge,
    ) {
        let mut reported_drops = 0;
        loop {
            let stop = tokio::select! {
                () = tokio::time::sleep(interval) => false,
                () = self.batch_ready.notified() => false,
                () = shutdown.cancelled() => true,
            };
            let started = std::time::Instant::now();
            let flushed = self.flush(&store).await;
            metrics.observe_flush(started, flushed.is_ok());
            if let Ok(n) = flushed {
                if n > 0 {
                    tracing::debug!(records = n, "proxied-request audit records written");
                }
            }
            let dropped = self.dropped_total();
            metrics.dropped.inc_by(dropped - reported_drops);
            reported_drops = dropped;
            depth.set(self.pending() as i64);
            if stop {
                break;
            }
        }
    }
}

/// A path with every key in it cut to its prefix: a client that puts a key in a URL (a
/// webhook registered with its key in the path, say) must not have it stored in the audit
/// log. Keys are found by their shape (`keys::starts_with_key_shape`); the path check has
/// already refused encoded characters.
fn redact_keys(path: &str) -> std::borrow::Cow<'_, str> {
    let b = path.as_bytes();
    let mut out = String::new();
    // `path[copied..]` is not in `out` yet. A key is ASCII, so where one starts and ends are
    // character boundaries.
    let (mut copied, mut i) = (0, 0);
    while i < b.len() {
        if crate::keys::starts_with_key_shape(&b[i..]) {
            out.push_str(&path[copied..i + PREFIX_LEN]);
            out.push_str("_[redacted]");
            i += KEY_LEN;
            copied = i;
        } else {
            i += 1;
        }
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(path);
    }
    out.push_str(&path[copied..]);
    std::borrow::Cow::Owned(out)
}

fn entry(r: &ProxiedRequest) -> AuditEntry {
    let name = r.entry.owner.name();
    let path = redact_keys(&r.path);
    let (actor_type, detail) = match r.entry.owner.kind {
        KeyKind::ServiceAccount => (
            "service_account",
            json!({ "account": name, "method": r.method.as_str(), "path": path, "status": r.status }),
        ),
        KeyKind::Gateway => (
            "gateway",
            json!({ "gateway": name, "gateway_id": r.entry.owner.id, "method": r.method.as_str(), "path": path, "status": r.status }),
        ),
    };
    AuditEntry {
        at: r.at_ms,
        actor_type: actor_type.into(),
        actor_id: Some(name.to_string()),
        action: "proxy.request".into(),
        key_prefix: Some(r.entry.prefix.to_string()),
        scopes: Some(r.entry.scopes().joined()),
        detail: detail.to_string(),
        client_addr: Some(r.client.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{generate, KeyId, KeyRow};

    fn record() -> ProxiedRequest {
        record_of(KeyKind::ServiceAccount)
    }

    fn record_of(kind: KeyKind) -> ProxiedRequest {
        let row = KeyRow {
            id: KeyId { kind, id: 1 },
            prefix: Some(generate(kind).prefix().to_string()),
            key_hash: Some("$argon2id$fake".into()),
            scopes: "a:write".into(),
            expires_at: None,
            revoked_at: None,
            updated_at: 1,
            owner_id: 1,
            owner_name: "billing".into(),
        };
        ProxiedRequest {
            at_ms: 1,
            entry: Arc::new(KeyEntry::from_row(row).expect("entry")),
            method: Method::POST,
            path: "/x".into(),
            status: 201,
            client: "127.0.0.1".parse().expect("ip"),
        }
    }

    #[tokio::test]
    async fn a_full_batch_wakes_the_writer_before_its_interval() {
        let url = crate::config::DatabaseUrl::new("sqlite::memory:").expect("url");
        let store = Store::connect(&url, 1).await.expect("store");
        store.migrate().await.expect("migrate");
        let q = Arc::new(AuditQueue::new(DEFAULT_CAPACITY));
        let stop = CancellationToken::new();
        let metrics = crate::metrics::Metrics::new(&[], false);
        let writer = tokio::spawn(q.clone().run(
            store.clone(),
            Duration::from_secs(3600),
            stop.clone(),
            metrics.audit.clone(),
            metrics.audit_depth.clone(),
        ));
        for _ in 0..BATCH {
            q.push(record());
        }
        let started = std::time::Instant::now();
        while q.pending() > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the writer did not wake"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        writer.await.expect("writer");
        assert_eq!(store.audit(5_000).await.expect("audit").len(), BATCH);
    }

    #[test]
    fn a_full_queue_counts_what_it_drops() {
        let q = AuditQueue::new(2);
        for _ in 0..5 {
            q.push(record());
        }
        assert_eq!(q.pending(), 2);
        assert_eq!(q.dropped_total(), 3);
    }

    #[test]
    fn a_record_becomes_a_service_account_entry_without_the_key() {
        let r = record();
        let e = entry(&r);
        assert_eq!(e.actor_type, "service_account");
        assert_eq!(e.actor_id.as_deref(), Some("billing"));
        assert_eq!(e.key_prefix.as_deref(), Some(r.entry.prefix.as_str()));
        let detail: serde_json::Value = serde_json::from_str(&e.detail).expect("json");
        assert_eq!(detail["method"], "POST");
        assert_eq!(detail["path"], "/x");
        assert_eq!(detail["status"], 201);
    }

    #[test]
    fn a_gateway_record_becomes_a_gateway_entry_without_the_key() {
        let r = record_of(KeyKind::Gateway);
        let e = entry(&r);
        assert_eq!(e.actor_type, "gateway");
        assert_eq!(e.actor_id.as_deref(), Some("billing"));
        assert_eq!(e.key_prefix.as_deref(), Some(r.entry.prefix.as_str()));
        assert!(e
            .key_prefix
            .as_deref()
            .is_some_and(|p| p.starts_with("kgg")));
        let detail: serde_json::Value = serde_json::from_str(&e.detail).expect("json");
        assert_eq!(detail["gateway"], "billing");
        assert_eq!(detail["gateway_id"], 1);
        assert!(detail.get("account").is_none());
    }

    #[test]
    fn a_key_in_a_path_is_audited_as_its_prefix_only() {
        let key = crate::keys::generate(KeyKind::ServiceAccount);
        let path = format!("/hooks/{}/événement?x", key.expose());
        let redacted = redact_keys(&path);
        assert_eq!(
            redacted,
            format!("/hooks/{}_[redacted]/événement?x", key.prefix())
        );
        assert!(!redacted.contains(&key.expose()[9..]));
        let twice = format!("/{0}{0}", key.expose());
        assert!(!redact_keys(&twice).contains(&key.expose()[9..]));
        assert!(matches!(
            redact_keys("/recordings/42"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(redact_keys("/kgsA1b2C_short"), "/kgsA1b2C_short");
    }
}
