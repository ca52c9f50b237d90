//! The in-memory key table: prefix → entry, for every key the database knows (revoked ones
//! without their hash, so logs can say "revoked" rather than "unknown"). The request path only
//! reads it; `sync` replaces or patches it from the database. Sized for a million keys: an
//! owner and a scope list (with their header values) are built once and shared by every key
//! that has them, hashes are held compactly, and a whole load takes rows one at a time as the
//! database streams them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use bytes::BytesMut;
use http::HeaderValue;

use super::format::{KeyKind, KeyPrefix, PrefixMap};
use super::hash::StoredHash;
use super::scope::Scopes;

/// Which database row a key lives in: `api_keys.id` or `gateways.id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    pub kind: KeyKind,
    pub id: i64,
}

/// Who a key authenticates: a service account (`kind` `ServiceAccount`, `id` the account's)
/// or a gateway. Built once per owner and shared by all its keys in the table.
#[derive(Debug, PartialEq, Eq)]
pub struct Owner {
    pub kind: KeyKind,
    pub id: i64,
    name: Box<str>,
    /// `X-Keygate-Account`.
    header: HeaderValue,
}

impl Owner {
    fn new(kind: KeyKind, id: i64, name: &str) -> Owner {
        Owner {
            kind,
            id,
            name: name.into(),
            header: HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("")),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
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

/// One key in the table. Kept to 200 bytes (a 224-byte allocation with the `Arc` counts) by
/// holding shared parts behind `Arc`s and by the field shapes below.
pub struct KeyEntry {
    /// The row id; with `kind` (which packs beside `stamp_pending`), the `KeyId`.
    row_id: i64,
    kind: KeyKind,
    pub prefix: KeyPrefix,
    pub owner: Arc<Owner>,
    grant: Arc<Grant>,
    secret: Secret,
    /// Unix ms, `NEVER` for a key without an expiry (8 bytes where an `Option` takes 16).
    expires_at: i64,
    /// The row's change marker, to skip rows a refresh has already applied.
    pub updated_at: i64,
    /// `X-Keygate-Key-Prefix`, built once here (its bytes in a buffer shared with other
    /// entries) so the request path copies a reference count instead of formatting.
    prefix_header: HeaderValue,
    /// `X-Keygate-Key-Expires-At` for a key with an expiry (RFC 3339), built once here; boxed,
    /// as most keys have none.
    expires_header: Option<Box<HeaderValue>>,
    /// The client address of the newest use noted (at most one update per key per second).
    last_client: Mutex<Option<IpAddr>>,
    /// Newest use seen by this process, in Unix ms.
    last_used_ms: AtomicI64,
    /// Set while a stamp for this key waits in the usage queue, so each key is queued once.
    stamp_pending: AtomicBool,
    /// The verifier's digest of the secret that verified against this entry's hash, once one
    /// has: the warm path compares against it instead of consulting the shared cache. Dies
    /// with the entry, which any change to the row replaces.
    verified: OnceLock<Box<[u8; 32]>>,
}

/// What a presented secret is checked against.
enum Secret {
    /// The argon2id hash.
    Hash(StoredHash),
    /// Revoked (at this time; `None` when the row had no hash). The hash is dropped: it can
    /// never be needed again.
    Revoked(Option<i64>),
}

/// A scope list with its `X-Keygate-Scopes` value, built once per distinct stored list and
/// shared by every key that carries it.
#[derive(Debug)]
struct Grant {
    scopes: Scopes,
    header: HeaderValue,
}

/// `KeyEntry::expires_at` of a key that never expires.
const NEVER: i64 = i64::MAX;

impl KeyEntry {
    /// Builds an entry from a row; `None` for a row without a usable prefix (an unpaired
    /// gateway, or a prefix that does not parse). The table itself builds entries that share
    /// owners and scope lists; this one shares nothing.
    pub fn from_row(row: KeyRow) -> Option<KeyEntry> {
        Interner::default().entry(row)
    }

    /// Revocation and expiry, decided from this entry and the clock on every request.
    pub fn state(&self, now_ms: i64) -> KeyState {
        if matches!(self.secret, Secret::Revoked(_)) {
            KeyState::Revoked
        } else if now_ms >= self.expires_at {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }

    pub fn id(&self) -> KeyId {
        KeyId {
            kind: self.kind,
            id: self.row_id,
        }
    }

    /// When the key stops working, if it has an expiry.
    pub fn expires_at(&self) -> Option<i64> {
        Some(self.expires_at).filter(|at| *at != NEVER)
    }

    /// The stored PHC string, exactly as the database holds it; empty once revoked. Rebuilt
    /// from the compact form on each call: only a verification that runs argon2 needs it.
    pub fn hash(&self) -> Cow<'_, str> {
        match &self.secret {
            Secret::Hash(hash) => hash.phc(),
            Secret::Revoked(_) => Cow::Borrowed(""),
        }
    }

    /// When the key was revoked, if it was.
    pub fn revoked_at(&self) -> Option<i64> {
        match self.secret {
            Secret::Hash(_) => None,
            Secret::Revoked(at) => at,
        }
    }

    pub fn scopes(&self) -> &Scopes {
        &self.grant.scopes
    }

    /// Values for `X-Keygate-Account`, `X-Keygate-Key-Prefix` and `X-Keygate-Scopes`.
    pub fn identity(&self) -> [&HeaderValue; 3] {
        [&self.owner.header, &self.prefix_header, &self.grant.header]
    }

    /// `X-Keygate-Key-Expires-At`, for a key with an expiry.
    pub fn expires_header(&self) -> Option<&HeaderValue> {
        self.expires_header.as_deref()
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
            .field("id", &self.id())
            .field("prefix", &self.prefix)
            .field("owner", &self.owner)
            .field("scopes", self.scopes())
            .field("expires_at", &self.expires_at())
            .field("revoked_at", &self.revoked_at())
            .finish_non_exhaustive()
    }
}

/// The table itself.
#[derive(Default)]
pub struct KeyTable {
    map: RwLock<PrefixMap<Arc<KeyEntry>>>,
    /// Gateway id → its current prefix, so a re-pair or unpair removes the old prefix.
    gateways: Mutex<HashMap<i64, KeyPrefix>>,
    /// Owners, scope lists and header buffers for the entries `apply` builds, shared with the
    /// entries of the last whole load.
    interner: Mutex<Interner>,
    /// Newest `updated_at` applied: incremental refreshes read from here.
    watermark: AtomicI64,
    /// Every row stamped at or before this (database clock, Unix ms) is in the table: a
    /// refresh never needs to read below it.
    settled: AtomicI64,
    /// When the table last matched the database (Unix ms), 0 before the first load.
    synced_at_ms: AtomicI64,
    /// Counts changes to the map, each counted after it is made: a copy of an entry taken
    /// while this still reads the same is current (see `generation`).
    generation: AtomicU64,
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

    /// Starts replacing the whole table (first load, reload after a reconnect): rows are added
    /// one at a time, and `TableLoad::finish` swaps the new table in.
    pub fn begin_load(&self) -> TableLoad<'_> {
        TableLoad {
            table: self,
            map: PrefixMap::with_capacity_and_hasher(self.len(), Default::default()),
            gateways: HashMap::new(),
            interner: self
                .interner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .seeded(),
            watermark: 0,
            rows: 0,
        }
    }

    /// Replaces the whole table with `rows` (see `begin_load`).
    pub fn replace_all(&self, rows: Vec<KeyRow>) {
        let mut load = self.begin_load();
        for row in rows {
            load.add(row);
        }
        load.finish();
    }

    /// Applies changed rows. Rows already applied (same `updated_at`) are skipped, so
    /// overlapping refresh windows are harmless. Returns how many entries changed.
    pub fn apply(&self, rows: Vec<KeyRow>) -> usize {
        let mut changed = 0;
        let mut gateways = self.gateways.lock().unwrap_or_else(PoisonError::into_inner);
        let mut interner = self.interner.lock().unwrap_or_else(PoisonError::into_inner);
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
                    self.generation.fetch_add(1, Ordering::Release);
                    gateways.remove(&id.id);
                    changed += 1;
                }
            }
            let Some(prefix) = new_prefix else { continue };
            let existing = self.lookup(&prefix);
            if existing
                .as_ref()
                .is_some_and(|e| e.id() == id && e.updated_at >= row.updated_at)
            {
                continue;
            }
            let Some(entry) = interner.entry(row) else {
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
            self.generation.fetch_add(1, Ordering::Release);
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

    /// Service-account keys and gateway keys in the table. Counted from the gateway index,
    /// not by walking a million entries on every metrics scrape.
    pub fn count_by_kind(&self) -> (usize, usize) {
        let gateways = self
            .gateways
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        (self.len().saturating_sub(gateways), gateways)
    }

    pub fn watermark(&self) -> i64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// See `settle`; 0 until the first.
    pub fn settled(&self) -> i64 {
        self.settled.load(Ordering::Acquire)
    }

    /// Records that every row stamped at or before `at_ms` has been applied (never moves back).
    pub fn settle(&self, at_ms: i64) {
        self.settled.fetch_max(at_ms, Ordering::AcqRel);
    }

    /// Records that the table matched the database at `now_ms`.
    pub fn mark_synced(&self, now_ms: i64) {
        self.synced_at_ms.store(now_ms, Ordering::Release);
    }

    /// Changes so far. Read it before a lookup: while it still reads the same, the entry
    /// found is the table's current one for its prefix (entries are replaced, never changed
    /// in place, so a revocation or a new expiry is a new entry and a new generation).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// When the table last matched the database; `None` before the first load.
    pub fn synced_at(&self) -> Option<i64> {
        Some(self.synced_at_ms.load(Ordering::Acquire)).filter(|t| *t > 0)
    }
}

/// A whole-table load in progress. Rows go in as the database streams them, so a load never
/// holds every row at once beside the table it builds; the table keeps serving its old
/// entries until `finish`. An entry whose row has not changed is carried over rather than
/// rebuilt, so a reload (after every reconnect of the change listener) costs a new index, not
/// a second table. Dropped unfinished (the database went away mid-load), it changes nothing.
pub struct TableLoad<'t> {
    table: &'t KeyTable,
    map: PrefixMap<Arc<KeyEntry>>,
    gateways: HashMap<i64, KeyPrefix>,
    interner: Interner,
    watermark: i64,
    rows: usize,
}

impl TableLoad<'_> {
    pub fn add(&mut self, row: KeyRow) {
        self.rows += 1;
        self.watermark = self.watermark.max(row.updated_at);
        let entry = match self.unchanged(&row) {
            Some(entry) => entry,
            None => match self.interner.entry(row) {
                Some(entry) => Arc::new(entry),
                None => return,
            },
        };
        if entry.kind == KeyKind::Gateway {
            self.gateways.insert(entry.row_id, entry.prefix);
        }
        self.map.insert(entry.prefix, entry);
    }

    /// The table's current entry for `row` if the row has not changed since it was built:
    /// same row, same change marker (bumped by every change that matters to authentication),
    /// same owner.
    fn unchanged(&self, row: &KeyRow) -> Option<Arc<KeyEntry>> {
        let prefix = KeyPrefix::parse(row.prefix.as_deref()?).ok()?;
        self.table.lookup(&prefix).filter(|old| {
            old.id() == row.id
                && old.updated_at == row.updated_at
                && old.owner.id == row.owner_id
                && old.owner.name() == row.owner_name
        })
    }

    /// Swaps the new table in; use times seen by this process survive the swap. Returns how
    /// many rows were read.
    pub fn finish(self) -> usize {
        let table = self.table;
        {
            let old = table.map.read().unwrap_or_else(PoisonError::into_inner);
            for (prefix, entry) in &self.map {
                if let Some(o) = old.get(prefix).filter(|o| !Arc::ptr_eq(o, entry)) {
                    entry.inherit_use(o);
                }
            }
        }
        *table
            .gateways
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.gateways;
        *table
            .interner
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.interner;
        let old = std::mem::replace(
            &mut *table.map.write().unwrap_or_else(PoisonError::into_inner),
            self.map,
        );
        table.generation.fetch_add(1, Ordering::Release);
        // Freeing a million entries takes a while: not while holding the lock.
        drop(old);
        table.watermark.fetch_max(self.watermark, Ordering::AcqRel);
        self.rows
    }
}

/// Builds entries, handing out one `Owner` per owner and one `Grant` per stored scope list.
/// A table holds few distinct ones (accounts, not keys), so these maps stay small.
#[derive(Default)]
struct Interner {
    owners: HashMap<(KeyKind, i64), Arc<Owner>>,
    grants: HashMap<Box<str>, Arc<Grant>>,
    headers: HeaderArena,
}

impl Interner {
    /// A new interner for a whole load, starting from the owners and scope lists this one
    /// holds, so entries carried over and entries built anew keep sharing them.
    fn seeded(&self) -> Interner {
        Interner {
            owners: self.owners.clone(),
            grants: self.grants.clone(),
            headers: HeaderArena::default(),
        }
    }

    fn entry(&mut self, row: KeyRow) -> Option<KeyEntry> {
        let prefix = KeyPrefix::parse(row.prefix.as_deref()?).ok()?;
        let owner = self.owner(row.id.kind, row.owner_id, &row.owner_name);
        let grant = self.grant(&row.scopes);
        let secret = match (row.revoked_at, row.key_hash) {
            (None, Some(hash)) if !hash.is_empty() => Secret::Hash(StoredHash::new(&hash)),
            (revoked_at, _) => Secret::Revoked(revoked_at),
        };
        Some(KeyEntry {
            row_id: row.id.id,
            kind: row.id.kind,
            prefix,
            owner,
            grant,
            secret,
            expires_at: row.expires_at.unwrap_or(NEVER),
            updated_at: row.updated_at,
            prefix_header: self.headers.value(prefix.as_str()),
            expires_header: row
                .expires_at
                .filter(|at| *at != NEVER)
                .and_then(|at| HeaderValue::from_str(&crate::clock::rfc3339(at)).ok())
                .map(Box::new),
            last_client: Mutex::new(None),
            last_used_ms: AtomicI64::new(0),
            stamp_pending: AtomicBool::new(false),
            verified: OnceLock::new(),
        })
    }

    fn owner(&mut self, kind: KeyKind, id: i64, name: &str) -> Arc<Owner> {
        match self.owners.get(&(kind, id)) {
            Some(owner) if owner.name() == name => owner.clone(),
            _ => {
                let owner = Arc::new(Owner::new(kind, id, name));
                self.owners.insert((kind, id), owner.clone());
                owner
            }
        }
    }

    fn grant(&mut self, stored: &str) -> Arc<Grant> {
        if let Some(grant) = self.grants.get(stored) {
            return grant.clone();
        }
        // A stored scope list that no longer parses grants nothing rather than failing the load.
        let scopes = Scopes::parse_stored(stored).unwrap_or_default();
        let header =
            HeaderValue::from_str(&scopes.joined()).unwrap_or(HeaderValue::from_static(""));
        let grant = Arc::new(Grant { scopes, header });
        self.grants.insert(stored.into(), grant.clone());
        grant
    }
}

/// Cuts header values out of shared 16 KiB buffers. A value of its own would cost an
/// allocation per entry (and a second one at its first clone, when `bytes` makes it
/// shareable); cut from a shared buffer it costs its bytes, and a clone is a reference-count
/// increment either way.
#[derive(Default)]
struct HeaderArena {
    buf: BytesMut,
}

impl HeaderArena {
    const CHUNK: usize = 16 * 1024;

    fn value(&mut self, text: &str) -> HeaderValue {
        if self.buf.capacity() - self.buf.len() < text.len() {
            self.buf = BytesMut::with_capacity(Self::CHUNK.max(text.len()));
        }
        self.buf.extend_from_slice(text.as_bytes());
        HeaderValue::from_maybe_shared(self.buf.split().freeze())
            .unwrap_or(HeaderValue::from_static(""))
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
        assert_eq!(e.revoked_at(), Some(11));
        assert_eq!(t.watermark(), 11);
    }

    #[test]
    fn every_change_to_the_table_and_only_a_change_moves_its_generation() {
        let t = KeyTable::new();
        let p = prefix(KeyKind::ServiceAccount);
        let g0 = t.generation();
        t.replace_all(vec![row(KeyKind::ServiceAccount, 1, &p, 10)]);
        let g1 = t.generation();
        assert!(g1 > g0, "a load is a change");
        assert_eq!(t.apply(vec![row(KeyKind::ServiceAccount, 1, &p, 10)]), 0);
        assert_eq!(t.generation(), g1, "a row already applied changes nothing");
        let mut revoked = row(KeyKind::ServiceAccount, 1, &p, 11);
        revoked.revoked_at = Some(11);
        t.apply(vec![revoked]);
        let g2 = t.generation();
        assert!(g2 > g1, "a revocation is a change");
        // A gateway's re-pairing removes its old prefix: a change too.
        let (old, new) = (prefix(KeyKind::Gateway), prefix(KeyKind::Gateway));
        t.apply(vec![row(KeyKind::Gateway, 7, &old, 12)]);
        let g3 = t.generation();
        assert!(g3 > g2);
        t.apply(vec![row(KeyKind::Gateway, 7, &new, 13)]);
        assert!(t.generation() > g3);
        assert!(t.lookup(&KeyPrefix::parse(&old).expect("prefix")).is_none());
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
            e.expires_header().map(|v| v.to_str().expect("ascii")),
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
        let [account, prefix, scopes] = e.identity();
        assert_eq!(account, "billing");
        assert_eq!(prefix, e.prefix.as_str());
        assert_eq!(scopes, "a:read");
    }

    #[test]
    fn keys_of_one_owner_and_scope_list_share_them_and_their_header_values() {
        let t = KeyTable::new();
        let mut other = row(
            KeyKind::ServiceAccount,
            3,
            &prefix(KeyKind::ServiceAccount),
            1,
        );
        other.owner_id = 2;
        other.owner_name = "search".into();
        other.scopes = "b:write a:read".into();
        t.replace_all(vec![
            row(
                KeyKind::ServiceAccount,
                1,
                &prefix(KeyKind::ServiceAccount),
                1,
            ),
            row(
                KeyKind::ServiceAccount,
                2,
                &prefix(KeyKind::ServiceAccount),
                1,
            ),
            other.clone(),
        ]);
        let entries: Vec<Arc<KeyEntry>> = t.map.read().expect("lock").values().cloned().collect();
        let by_id = |id: i64| entries.iter().find(|e| e.id().id == id).expect("entry");
        let (a, b, c) = (by_id(1), by_id(2), by_id(3));
        assert!(Arc::ptr_eq(&a.owner, &b.owner) && Arc::ptr_eq(&a.grant, &b.grant));
        assert!(!Arc::ptr_eq(&a.owner, &c.owner) && !Arc::ptr_eq(&a.grant, &c.grant));
        assert_eq!(c.owner.name(), "search");
        assert_eq!(
            c.identity()[2],
            "a:read b:write",
            "the header carries the sorted list"
        );
        // A refresh reuses what the load built; a renamed owner gets a new one.
        let mut renamed = row(
            KeyKind::ServiceAccount,
            4,
            &prefix(KeyKind::ServiceAccount),
            2,
        );
        renamed.owner_id = 2;
        renamed.owner_name = "search-v2".into();
        let fresh = row(
            KeyKind::ServiceAccount,
            5,
            &prefix(KeyKind::ServiceAccount),
            2,
        );
        let fresh_prefix = KeyPrefix::parse(fresh.prefix.as_deref().expect("p")).expect("p");
        let renamed_prefix = KeyPrefix::parse(renamed.prefix.as_deref().expect("p")).expect("p");
        assert_eq!(t.apply(vec![fresh, renamed]), 2);
        let fresh = t.lookup(&fresh_prefix).expect("applied");
        assert!(Arc::ptr_eq(&fresh.owner, &a.owner) && Arc::ptr_eq(&fresh.grant, &a.grant));
        assert_eq!(
            t.lookup(&renamed_prefix).expect("applied").owner.name(),
            "search-v2"
        );
    }

    #[test]
    fn prefix_header_values_cut_from_a_shared_buffer_stay_apart() {
        let mut arena = HeaderArena::default();
        let prefixes: Vec<String> = (0..5_000)
            .map(|_| prefix(KeyKind::ServiceAccount))
            .collect();
        let values: Vec<HeaderValue> = prefixes.iter().map(|p| arena.value(p)).collect();
        for (p, v) in prefixes.iter().zip(&values) {
            assert_eq!(v, p.as_str());
            assert_eq!(v.clone(), p.as_str());
        }
        drop(arena);
        assert_eq!(
            values[4_999],
            prefixes[4_999].as_str(),
            "values outlive the arena"
        );
    }

    #[test]
    fn a_reload_carries_unchanged_entries_over_and_rebuilds_changed_ones() {
        let t = KeyTable::new();
        let (p1, p2) = (
            prefix(KeyKind::ServiceAccount),
            prefix(KeyKind::ServiceAccount),
        );
        t.replace_all(vec![
            row(KeyKind::ServiceAccount, 1, &p1, 1),
            row(KeyKind::ServiceAccount, 2, &p2, 1),
        ]);
        let (k1, k2) = (
            KeyPrefix::parse(&p1).expect("p"),
            KeyPrefix::parse(&p2).expect("p"),
        );
        let (before1, before2) = (t.lookup(&k1).expect("e"), t.lookup(&k2).expect("e"));
        assert!(before2.note_use_from(5_000, Some("10.0.0.1".parse().expect("ip"))));
        let mut changed = row(KeyKind::ServiceAccount, 2, &p2, 2);
        changed.scopes = "c:read".into();
        t.replace_all(vec![row(KeyKind::ServiceAccount, 1, &p1, 1), changed]);
        let (after1, after2) = (t.lookup(&k1).expect("e"), t.lookup(&k2).expect("e"));
        assert!(Arc::ptr_eq(&before1, &after1), "unchanged: the same entry");
        assert!(!Arc::ptr_eq(&before2, &after2), "changed: rebuilt");
        assert_eq!(after2.identity()[2], "c:read");
        assert_eq!(
            after2.last_used_ms(),
            5_000,
            "uses seen survive the rebuild"
        );
        assert_eq!(after2.last_client(), Some("10.0.0.1".parse().expect("ip")));
        assert!(Arc::ptr_eq(&after1.owner, &after2.owner), "still one owner");
    }

    #[test]
    fn a_load_dropped_unfinished_changes_nothing() {
        let t = KeyTable::new();
        let p = prefix(KeyKind::ServiceAccount);
        t.replace_all(vec![row(KeyKind::ServiceAccount, 1, &p, 1)]);
        let mut load = t.begin_load();
        load.add(row(
            KeyKind::ServiceAccount,
            2,
            &prefix(KeyKind::ServiceAccount),
            9,
        ));
        drop(load);
        assert_eq!(t.len(), 1);
        assert_eq!(t.watermark(), 1);
        let mut load = t.begin_load();
        load.add(row(KeyKind::Gateway, 7, &prefix(KeyKind::Gateway), 3));
        let mut unpaired = row(KeyKind::Gateway, 8, "", 4);
        unpaired.prefix = None;
        load.add(unpaired);
        assert_eq!(load.finish(), 2, "rows read, unpaired gateways included");
        assert_eq!(t.count_by_kind(), (0, 1));
        assert_eq!(t.watermark(), 4);
    }

    /// The entry's share of the table's memory at a million keys (see benches/RESULTS.md):
    /// 216 bytes (200, plus 16 for the remembered verified digest's slot) and the `Arc` counts
    /// fill a 240-byte allocation.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn an_entry_stays_within_its_size_budget() {
        assert!(
            std::mem::size_of::<KeyEntry>() <= 216,
            "{}",
            std::mem::size_of::<KeyEntry>()
        );
    }
}
