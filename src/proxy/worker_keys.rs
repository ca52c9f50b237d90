//! A proxy worker's own handles on the keys its requests use.
//!
//! An integration sends its traffic with one key, over connections spread across the workers.
//! Looking that key up in the shared table takes the table's read lock and clones the entry's
//! `Arc`, and forwarding clones the entry's identity header values: each of those writes a
//! reference count that every worker writes too, so the cache line moves between cores on
//! every request. Here each worker keeps, per verified key, the entry and its own copies of
//! the header values; a request reads one shared counter (the table's generation, written only
//! when the table changes) and touches nothing another worker writes.
//!
//! A worker's copies are good while the table's generation is unchanged: any change to the
//! table (a revocation, a new expiry, a reload) makes every worker drop its copies at its next
//! request. Only keys that verified are kept, at most `CAPACITY` per worker; keys beyond that
//! are served from the table's entry as before (with many keys in use, the traffic is spread
//! over many entries and little of it shares a cache line anyway).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use http::HeaderValue;

use super::headers::unshared;
use crate::keys::{KeyEntry, KeyPrefix, KeyTable, PrefixMap};

/// Keys kept per worker (until the table next changes).
const CAPACITY: usize = 4096;

/// One worker's copies, behind a lock only that worker's thread takes.
#[derive(Default)]
pub struct WorkerKeys {
    inner: Mutex<Copies>,
}

#[derive(Default)]
struct Copies {
    /// The table generation the copies were taken under.
    generation: u64,
    keys: PrefixMap<Arc<LocalKey>>,
}

/// A verified key as one worker holds it.
pub struct LocalKey {
    pub entry: Arc<KeyEntry>,
    /// `X-Keygate-Account`, `X-Keygate-Key-Prefix`, `X-Keygate-Scopes`: copies of the entry's,
    /// in buffers of this worker's own.
    identity: [HeaderValue; 3],
    /// `X-Keygate-Key-Expires-At`, likewise.
    expires: Option<HeaderValue>,
}

impl LocalKey {
    pub fn new(entry: Arc<KeyEntry>) -> LocalKey {
        let [account, prefix, scopes] = entry.identity();
        LocalKey {
            identity: [unshared(account), unshared(prefix), unshared(scopes)],
            expires: entry.expires_header().map(unshared),
            entry,
        }
    }

    pub fn identity(&self) -> [&HeaderValue; 3] {
        [&self.identity[0], &self.identity[1], &self.identity[2]]
    }

    pub fn expires_header(&self) -> Option<&HeaderValue> {
        self.expires.as_ref()
    }
}

/// What `WorkerKeys::find` found: a key entry and its identity header values.
pub enum Found {
    /// This worker's copy of a key that verified.
    Local(Arc<LocalKey>),
    /// The table's entry, not yet held here; `keep` it once it verifies. `generation` is the
    /// table's, read before the entry was looked up.
    Shared {
        entry: Arc<KeyEntry>,
        generation: u64,
    },
}

impl Found {
    pub fn entry(&self) -> &Arc<KeyEntry> {
        match self {
            Found::Local(local) => &local.entry,
            Found::Shared { entry, .. } => entry,
        }
    }

    /// `X-Keygate-Account`, `X-Keygate-Key-Prefix`, `X-Keygate-Scopes`.
    pub fn identity(&self) -> [&HeaderValue; 3] {
        match self {
            Found::Local(local) => local.identity(),
            Found::Shared { entry, .. } => entry.identity(),
        }
    }

    /// `X-Keygate-Key-Expires-At`, for a key with an expiry.
    pub fn expires_header(&self) -> Option<&HeaderValue> {
        match self {
            Found::Local(local) => local.expires_header(),
            Found::Shared { entry, .. } => entry.expires_header(),
        }
    }
}

impl WorkerKeys {
    /// The current entry for `prefix`: this worker's copy when it has one, else the table's.
    pub fn find(&self, table: &KeyTable, prefix: &KeyPrefix) -> Option<Found> {
        let generation = table.generation();
        {
            let mut copies = self.copies();
            if copies.generation != generation {
                copies.keys.clear();
                copies.generation = generation;
            } else if let Some(local) = copies.keys.get(prefix) {
                return Some(Found::Local(local.clone()));
            }
        }
        let entry = table.lookup(prefix)?;
        Some(Found::Shared { entry, generation })
    }

    /// Makes `found` this worker's own (after it verified) and returns the copy; returns it
    /// unchanged when this worker holds `CAPACITY` keys already, or when it was found under an
    /// older generation (the table may have replaced it since).
    pub fn keep(&self, found: Found) -> Found {
        let Found::Shared { entry, generation } = found else {
            return found;
        };
        let mut copies = self.copies();
        if copies.generation != generation || copies.keys.len() >= CAPACITY {
            return Found::Shared { entry, generation };
        }
        let local = Arc::new(LocalKey::new(entry));
        copies.keys.insert(local.entry.prefix, local.clone());
        Found::Local(local)
    }

    fn copies(&self) -> MutexGuard<'_, Copies> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.copies().keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{generate, KeyId, KeyKind, KeyRow, KeyState};

    fn row(prefix: &str, updated_at: i64, revoked_at: Option<i64>) -> KeyRow {
        KeyRow {
            id: KeyId {
                kind: KeyKind::ServiceAccount,
                id: 1,
            },
            prefix: Some(prefix.to_string()),
            key_hash: Some("$argon2id$fake".into()),
            scopes: "a:read".into(),
            expires_at: None,
            revoked_at,
            updated_at,
            owner_id: 1,
            owner_name: "billing".into(),
        }
    }

    /// A table of one active key, its prefix as text and parsed, and a worker with no copies.
    fn one_key() -> (KeyTable, String, KeyPrefix, WorkerKeys) {
        let table = KeyTable::new();
        let text = generate(KeyKind::ServiceAccount).prefix().to_string();
        let prefix = KeyPrefix::parse(&text).expect("prefix");
        table.replace_all(vec![row(&text, 10, None)]);
        (table, text, prefix, WorkerKeys::default())
    }

    #[test]
    fn a_kept_key_is_served_from_the_copy_until_the_table_changes() {
        let (table, text, prefix, keys) = one_key();

        let found = keys.find(&table, &prefix).expect("known");
        assert!(matches!(found, Found::Shared { .. }));
        let Found::Local(kept) = keys.keep(found) else {
            panic!("a verified key is kept");
        };
        assert_eq!(kept.identity()[0], "billing");
        assert_eq!(kept.identity()[1], text.as_str());
        match keys.find(&table, &prefix).expect("known") {
            Found::Local(local) => assert!(Arc::ptr_eq(&local, &kept), "the copy is reused"),
            Found::Shared { .. } => panic!("a kept key comes from the copy"),
        }
        assert_ne!(
            kept.identity()[2].as_bytes().as_ptr(),
            table.lookup(&prefix).expect("known").identity()[2]
                .as_bytes()
                .as_ptr(),
            "its header values live in buffers of the worker's own"
        );

        // A revocation is a new entry and a new generation: the copy is dropped at once.
        table.apply(vec![row(&text, 11, Some(11))]);
        let after = keys.find(&table, &prefix).expect("still known");
        assert!(matches!(after, Found::Shared { .. }));
        assert_eq!(after.entry().state(0), KeyState::Revoked);
        assert_eq!(keys.len(), 0);
    }

    #[test]
    fn an_entry_found_before_a_change_is_not_kept_after_it() {
        let (table, text, prefix, keys) = one_key();
        let found = keys.find(&table, &prefix).expect("known");
        // The key is revoked while this request verifies it; another request sees the change.
        table.apply(vec![row(&text, 11, Some(11))]);
        let other = keys.find(&table, &prefix).expect("known");
        assert_eq!(other.entry().state(0), KeyState::Revoked);
        let kept = keys.keep(found);
        assert!(
            matches!(kept, Found::Shared { .. }),
            "the stale entry is not kept"
        );
        assert_eq!(
            kept.entry().state(0),
            KeyState::Active,
            "this request's own view"
        );
        assert_eq!(keys.len(), 0);
        assert_eq!(
            keys.find(&table, &prefix).expect("known").entry().state(0),
            KeyState::Revoked
        );
    }

    #[test]
    fn a_full_worker_serves_further_keys_from_the_table() {
        let table = KeyTable::new();
        // Distinct prefixes: among 4,097 random ones, two are the same about once in a
        // hundred runs (62^5 of them), and the table would hold one key fewer.
        let mut seen = std::collections::HashSet::new();
        let texts: Vec<String> =
            std::iter::repeat_with(|| generate(KeyKind::ServiceAccount).prefix().to_string())
                .filter(|t| seen.insert(t.clone()))
                .take(CAPACITY + 1)
                .collect();
        table.replace_all(
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let mut r = row(t, 10, None);
                    r.id.id = i as i64 + 1;
                    r
                })
                .collect(),
        );
        let keys = WorkerKeys::default();
        for t in &texts[..CAPACITY] {
            let found = keys.find(&table, &KeyPrefix::parse(t).expect("prefix"));
            assert!(matches!(keys.keep(found.expect("known")), Found::Local(_)));
        }
        let last = KeyPrefix::parse(&texts[CAPACITY]).expect("prefix");
        let found = keys.keep(keys.find(&table, &last).expect("known"));
        assert!(matches!(found, Found::Shared { .. }));
        assert_eq!(found.identity()[1], texts[CAPACITY].as_str());
        assert_eq!(keys.len(), CAPACITY);
    }

    #[test]
    fn unknown_prefixes_are_not_kept() {
        let table = KeyTable::new();
        table.replace_all(Vec::new());
        let keys = WorkerKeys::default();
        let text = generate(KeyKind::ServiceAccount).prefix().to_string();
        assert!(keys
            .find(&table, &KeyPrefix::parse(&text).expect("prefix"))
            .is_none());
        assert_eq!(keys.len(), 0);
    }
}
