//! The in-memory key table: prefix → entry, for every key the database knows (revoked ones
//! without their hash, so logs can say "revoked" rather than "unknown"). The request path only
//! reads it; `sync` replaces or patches it from the database.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use http::HeaderValue;

use super::format::{KeyKind, KeyPrefix};
use super::scope::Scopes;

/// Which database row a key lives in: `api_keys.id` or `gateways.id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    pub kind: KeyKind,
    pub id: i64,
}

/// Who a key authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    ServiceAccount { id: i64, name: String },
    Gateway { id: i64, name: String },
}

impl Owner {
    pub fn name(&self) -> &str {
        match self {
            Owner::ServiceAccount { name, .. } | Owner::Gateway { name, .. } => name,
        }
    }
}

/// A key as the store reads it. `prefix` and `key_hash` are absent for an unpaired gateway.
#[derive(Clone, Debug)]
pub struct KeyRow {
    pub id: KeyId,
    pub prefix: Option<String>,
    pub key_hash: Option<String>,
    pub scopes: String,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub updated_at: i64,
    pub owner_id: i64,
    pub owner_name: String,
}

/// Whether a key may be used right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
    Expired,
}

/// One key in the table.
pub struct KeyEntry {
    pub id: KeyId,
    pub prefix: KeyPrefix,
    pub owner: Owner,
    pub scopes: Scopes,
    /// The argon2id PHC string; empty once revoked (it can never be needed again).
    hash: Box<str>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    /// The row's change marker, to skip rows a refresh has already applied.
    pub updated_at: i64,
    /// Values for `X-Keygate-Account`, `X-Keygate-Key-Prefix`, `X-Keygate-Scopes`, built once
    /// here so the request path copies reference counts instead of formatting strings.
    pub identity: [HeaderValue; 3],
    /// `X-Keygate-Key-Expires-At` for a key with an expiry (RFC 3339), built once here.
    pub expires_header: Option<HeaderValue>,
    /// The client address of the newest use noted (at most one update per key per second).
    last_client: Mutex<Option<IpAddr>>,
    /// Newest use seen by this process, in Unix ms (starts at the database's value).
    last_used_ms: AtomicI64,
    /// Set while a stamp for this key waits in the usage queue, so each key is queued once.
    stamp_pending: AtomicBool,
    /// The verifier's digest of the secret that verified against this entry's hash, once one
    /// has: the warm path compares against it instead of consulting the shared cache. Dies
    /// with the entry, which any change to the row replaces.
    verified: OnceLock<Box<[u8; 32]>>,
}

impl KeyEntry {
    /// Builds an entry from a row; `None` for a row without a usable prefix (an unpaired
    /// gateway, or a prefix that does not parse).
    pub fn from_row(row: KeyRow) -> Option<KeyEntry> {
        let prefix = KeyPrefix::parse(row.prefix.as_deref()?).ok()?;
        let owner = match row.id.kind {
            KeyKind::ServiceAccount => Owner::ServiceAccount {
                id: row.owner_id,
                name: row.owner_name,
            },
            KeyKind::Gateway => Owner::Gateway {
                id: row.owner_id,
                name: row.owner_name,
            },
        };
        // A stored scope list that no longer parses grants nothing rather than failing the load.
        let scopes = Scopes::parse_stored(&row.scopes).unwrap_or_default();
        let revoked = row.revoked_at.is_some();
        let hash = if revoked {
            "".into()
        } else {
            row.key_hash.unwrap_or_default().into_boxed_str()
        };
        let identity = [
            HeaderValue::from_str(owner.name()).unwrap_or(HeaderValue::from_static("")),
            HeaderValue::from_str(prefix.as_str()).unwrap_or(HeaderValue::from_static("")),
            HeaderValue::from_str(&scopes.joined()).unwrap_or(HeaderValue::from_static("")),
        ];
        Some(KeyEntry {
            id: row.id,
            prefix,
            owner,
            scopes,
            hash,
            expires_at: row.expires_at,
            revoked_at: row.revoked_at,
            updated_at: row.updated_at,
            identity,
            expires_header: row
                .expires_at
                .and_then(|at| HeaderValue::from_str(&crate::clock::rfc3339(at)).ok()),
            last_client: Mutex::new(None),
            last_used_ms: AtomicI64::new(row.last_used_at.unwrap_or(0)),
            stamp_pending: AtomicBool::new(false),
            verified: OnceLock::new(),
        })
    }

    /// Revocation and expiry, decided from this entry and the clock on every request.
    pub fn state(&self, now_ms: i64) -> KeyState {
        if self.revoked_at.is_some() || self.hash.is_empty() {
            KeyState::Revoked
        } else if self.expires_at.is_some_and(|at| now_ms >= at) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The digest of the secret known to match this entry, if one has been verified.
    pub fn verified_digest(&self) -> Option<&[u8; 32]> {
        self.verified.get().map(|d| &**d)
    }

    /// Remembers `digest` as the verified secret's (the first one wins; only one secret can
    /// match a hash).
    pub fn remember_verified(&self, digest: [u8; 32]) {
        let _ = self.verified.set(Box::new(digest));
    }

    /// Records a use at `now_ms`. Returns true when the key must be queued for a stamp (it was
    /// not queued already). At most one atomic write per key per second.
    pub fn note_use(&self, now_ms: i64) -> bool {
        self.note_use_from(now_ms, None)
    }

    /// `note_use` that also remembers the client address of the use (within the same
    /// once-per-second gate, so the lock is taken at most once per key per second).
    pub fn note_use_from(&self, now_ms: i64, client: Option<IpAddr>) -> bool {
        if now_ms - self.last_used_ms.load(Ordering::Relaxed) < 1_000 {
            return false;
        }
        self.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
        if client.is_some() {
            *self
                .last_client
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = client;
        }
        !self.stamp_pending.load(Ordering::Relaxed)
            && !self.stamp_pending.swap(true, Ordering::AcqRel)
    }

    /// Takes the pending stamp for writing: the newest use time, and the key is free to be
    /// queued again.
    pub fn take_stamp(&self) -> i64 {
        self.stamp_pending.store(false, Ordering::Release);
        self.last_used_ms.load(Ordering::Acquire)
    }

    /// Marks a stamp as still pending after a failed write.
    pub fn requeue_stamp(&self) -> bool {
        !self.stamp_pending.swap(true, Ordering::AcqRel)
    }

    pub fn last_used_ms(&self) -> i64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// The client address of the newest noted use, if any.
    pub fn last_client(&self) -> Option<IpAddr> {
        *self
            .last_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn inherit_use(&self, older: &KeyEntry) {
        self.last_used_ms
            .fetch_max(older.last_used_ms(), Ordering::Relaxed);
        if let Some(ip) = older.last_client() {
            self.last_client
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(ip);
        }
    }
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .field("prefix", &self.prefix)
            .field("owner", &self.owner)
            .field("scopes", &self.scopes)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// The table itself.
#[derive(Default)]
pub struct KeyTable {
    map: RwLock<HashMap<KeyPrefix, Arc<KeyEntry>>>,
    /// Gateway id → its current prefix, so a re-pair or unpair removes the old prefix.
    gateways: Mutex<HashMap<i64, KeyPrefix>>,
    /// Newest `updated_at` applied: incremental refreshes read from here.
    watermark: AtomicI64,
    /// When the table last matched the database (Unix ms), 0 before the first load.
    synced_at_ms: AtomicI64,
}

impl KeyTable {
    pub fn new() -> KeyTable {
        KeyTable::default()
    }

    /// The entry for `prefix`, if the database knows it.
    pub fn lookup(&self, prefix: &KeyPrefix) -> Option<Arc<KeyEntry>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(prefix)
            .cloned()
    }

    /// Replaces the whole table (first load, reload after a reconnect). Use times seen by this
    /// process survive the swap.
    pub fn replace_all(&self, rows: Vec<KeyRow>) {
        let mut watermark = 0;
        let mut map = HashMap::with_capacity(rows.len());
        let mut gateways = HashMap::new();
        for row in rows {
            watermark = watermark.max(row.updated_at);
            if let Some(entry) = KeyEntry::from_row(row) {
                if entry.id.kind == KeyKind::Gateway {
                    gateways.insert(entry.id.id, entry.prefix);
                }
                map.insert(entry.prefix, Arc::new(entry));
            }
        }
        {
            let old = self.map.read().unwrap_or_else(PoisonError::into_inner);
            for (prefix, entry) in &map {
                if let Some(o) = old.get(prefix) {
                    entry.inherit_use(o);
                }
            }
        }
        *self.gateways.lock().unwrap_or_else(PoisonError::into_inner) = gateways;
        *self.map.write().unwrap_or_else(PoisonError::into_inner) = map;
        self.watermark.fetch_max(watermark, Ordering::AcqRel);
    }

    /// Applies changed rows. Rows already applied (same `updated_at`) are skipped, so
    /// overlapping refresh windows are harmless. Returns how many entries changed.
    pub fn apply(&self, rows: Vec<KeyRow>) -> usize {
        let mut changed = 0;
        let mut gateways = self.gateways.lock().unwrap_or_else(PoisonError::into_inner);
        for row in rows {
            self.watermark.fetch_max(row.updated_at, Ordering::AcqRel);
            let id = row.id;
            let new_prefix = row.prefix.as_deref().and_then(|p| KeyPrefix::parse(p).ok());
            // A gateway that was re-paired or unpaired leaves its old prefix behind: drop it.
            if id.kind == KeyKind::Gateway {
                if let Some(old) = gateways
                    .get(&id.id)
                    .copied()
                    .filter(|old| Some(*old) != new_prefix)
                {
                    self.map
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&old);
                    gateways.remove(&id.id);
                    changed += 1;
                }
            }
            let Some(prefix) = new_prefix else { continue };
            let existing = self.lookup(&prefix);
            if existing
                .as_ref()
                .is_some_and(|e| e.id == id && e.updated_at >= row.updated_at)
            {
                continue;
            }
            let Some(entry) = KeyEntry::from_row(row) else {
                continue;
            };
            if let Some(old) = &existing {
                entry.inherit_use(old);
            }
            if id.kind == KeyKind::Gateway {
                gateways.insert(id.id, prefix);
            }
            self.map
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(prefix, Arc::new(entry));
            changed += 1;
        }
        changed
    }

    /// Entries in the table, revoked keys included (they stay, without their hash, so logs can
    /// tell "revoked" from "unknown").
    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn count_by_kind(&self) -> (usize, usize) {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let gateways = map
            .values()
            .filter(|e| e.id.kind == KeyKind::Gateway)
            .count();
        (map.len() - gateways, gateways)
    }

    pub fn watermark(&self) -> i64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// Records that the table matched the database at `now_ms`.
    pub fn mark_synced(&self, now_ms: i64) {
        self.synced_at_ms.store(now_ms, Ordering::Release);
    }

    /// When the table last matched the database; `None` before the first load.
    pub fn synced_at(&self) -> Option<i64> {
        Some(self.synced_at_ms.load(Ordering::Acquire)).filter(|t| *t > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::generate;

    fn row(kind: KeyKind, id: i64, prefix: &str, updated_at: i64) -> KeyRow {
        KeyRow {
            id: KeyId { kind, id },
            prefix: Some(prefix.to_string()),
            key_hash: Some("$argon2id$fake".into()),
            scopes: "a:read".into(),
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            updated_at,
            owner_id: 1,
            owner_name: "billing".into(),
        }
    }

    fn prefix(kind: KeyKind) -> String {
        generate(kind).prefix().to_string()
    }

    #[test]
    fn apply_replaces_changed_rows_and_skips_seen_ones() {
        let t = KeyTable::new();
        let p = prefix(KeyKind::ServiceAccount);
        t.replace_all(vec![row(KeyKind::ServiceAccount, 1, &p, 10)]);
        let key = KeyPrefix::parse(&p).expect("prefix");
        assert_eq!(t.lookup(&key).map(|e| e.state(0)), Some(KeyState::Active));
        assert_eq!(t.apply(vec![row(KeyKind::ServiceAccount, 1, &p, 10)]), 0);
        let mut revoked = row(KeyKind::ServiceAccount, 1, &p, 11);
        revoked.revoked_at = Some(11);
        assert_eq!(t.apply(vec![revoked]), 1);
        let e = t.lookup(&key).expect("still known");
        assert_eq!(e.state(0), KeyState::Revoked);
        assert_eq!(e.hash(), "", "a revoked key's hash is dropped");
        assert_eq!(t.watermark(), 11);
    }

    #[test]
    fn expiry_is_decided_against_the_clock() {
        let mut r = row(
            KeyKind::ServiceAccount,
            1,
            &prefix(KeyKind::ServiceAccount),
            1,
        );
        r.expires_at = Some(5_000);
        let e = KeyEntry::from_row(r).expect("entry");
        assert_eq!(e.state(4_999), KeyState::Active);
        assert_eq!(e.state(5_000), KeyState::Expired);
    }

    #[test]
    fn a_repaired_gateway_loses_its_old_prefix() {
        let t = KeyTable::new();
        let (old, new) = (prefix(KeyKind::Gateway), prefix(KeyKind::Gateway));
        t.replace_all(vec![row(KeyKind::Gateway, 7, &old, 1)]);
        t.apply(vec![row(KeyKind::Gateway, 7, &new, 2)]);
        assert!(t.lookup(&KeyPrefix::parse(&old).expect("p")).is_none());
        assert!(t.lookup(&KeyPrefix::parse(&new).expect("p")).is_some());
        let mut unpaired = row(KeyKind::Gateway, 7, &new, 3);
        unpaired.prefix = None;
        t.apply(vec![unpaired]);
        assert!(t.is_empty());
    }

    #[test]
    fn uses_are_queued_once_and_survive_a_reload() {
        let t = KeyTable::new();
        let p = prefix(KeyKind::ServiceAccount);
        t.replace_all(vec![row(KeyKind::ServiceAccount, 1, &p, 1)]);
        let key = KeyPrefix::parse(&p).expect("p");
        let e = t.lookup(&key).expect("entry");
        assert!(e.note_use(10_000));
        assert!(!e.note_use(10_500), "same second: nothing new");
        assert!(!e.note_use(12_000), "already queued");
        assert_eq!(e.take_stamp(), 12_000);
        t.replace_all(vec![row(KeyKind::ServiceAccount, 1, &p, 1)]);
        assert_eq!(t.lookup(&key).expect("entry").last_used_ms(), 12_000);
    }

    #[test]
    fn the_expiry_header_and_client_address_are_kept_on_the_entry() {
        let mut r = row(
            KeyKind::ServiceAccount,
            1,
            &prefix(KeyKind::ServiceAccount),
            1,
        );
        r.expires_at = Some(1_796_112_000_000);
        let e = KeyEntry::from_row(r).expect("entry");
        assert_eq!(
            e.expires_header
                .as_ref()
                .map(|v| v.to_str().expect("ascii")),
            Some("2026-12-01T08:00:00Z")
        );
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        assert!(e.note_use_from(5_000, Some(ip)));
        assert!(!e.note_use_from(5_500, Some("10.9.9.9".parse().expect("ip"))));
        assert_eq!(
            e.last_client(),
            Some(ip),
            "inside the same second nothing changes"
        );
    }

    #[test]
    fn identity_headers_are_prebuilt() {
        let e = KeyEntry::from_row(row(
            KeyKind::ServiceAccount,
            1,
            &prefix(KeyKind::ServiceAccount),
            1,
        ))
        .expect("e");
        assert_eq!(e.identity[0], "billing");
        assert_eq!(e.identity[1], e.prefix.as_str());
        assert_eq!(e.identity[2], "a:read");
    }
}
