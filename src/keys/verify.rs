//! Verification of a presented key against its entry's argon2id hash, with two caches so the
//! hot path never pays argon2: successes (keyed digest → key id) and failures (so repeating a
//! wrong key costs nothing). The caches only answer "is this the right secret"; whether the
//! key is live is decided from the table on every request, so a cache can never keep a revoked
//! key alive. argon2 runs on the blocking pool behind two bounds: how many run at once, and
//! how many may wait; past the second the caller is told to retry later. Failed verifications
//! are also counted per key prefix and per client address (`throttle.rs`): a spent budget
//! refuses further argon2 work, while keys already in the success cache stay fast.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::format::{KeyPrefix, ParsedKey, KEY_LEN};
use super::hash::verify_hash;
use super::table::{KeyEntry, KeyId};
use super::throttle::Throttle;
use crate::config::VerificationConfig;

type Digest = [u8; 32];

/// How a key was verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// From the cache of earlier successes.
    Cached,
    /// By running argon2 now.
    Computed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the secret does not match")]
    Mismatch,
    #[error("too many verifications pending")]
    Busy,
    /// The key prefix or the client spent its failure budget; retry after this long.
    #[error("too many failed verifications; retry in {0:?}")]
    Throttled(Duration),
}

/// Whether an entry already verified a presented secret (`Verifier::recall`).
pub enum Recall {
    Remembered,
    /// Not by this entry: `Verifier::verify_unremembered` decides.
    Unremembered(Unremembered),
}

/// A presented secret that its entry has not verified: what deciding it needs, owned, so the
/// decision can wait without holding on to the request. Only `Verifier::recall` makes one.
pub struct Unremembered {
    digest: Digest,
    prefix: KeyPrefix,
    /// A copy, not a `String`: most forged keys end at the failure cache or the budget, and
    /// only an argon2 run needs the text.
    secret: [u8; KEY_LEN],
}

/// Counters read by the metrics scrape.
#[derive(Debug, Default)]
pub struct VerifyStats {
    /// Bumped by every warm request: sharded per thread.
    pub cache_hits: crate::shard::Counter,
    pub cache_misses: AtomicU64,
    pub argon2_runs: AtomicU64,
    pub argon2_nanos: AtomicU64,
    pub failures_cached_hits: AtomicU64,
    pub busy: AtomicU64,
    pub throttled: AtomicU64,
}

pub struct Verifier {
    verified: Cache<Digest, KeyId>,
    failed: Cache<Digest, ()>,
    /// Random per process: cache keys are useless outside it and never equal a stored hash.
    digest_key: [u8; 32],
    /// Admission: verifications waiting or running.
    pending: Arc<Semaphore>,
    /// argon2 runs at once.
    workers: Arc<Semaphore>,
    throttle: Throttle,
    pub stats: VerifyStats,
    /// Told the duration of every argon2 run (the metrics histogram), so this module stays
    /// free of the metrics crate.
    argon2_observer: Option<Argon2Observer>,
}

type Argon2Observer = Box<dyn Fn(Duration) + Send + Sync>;

impl Verifier {
    pub fn new(cfg: &VerificationConfig) -> Verifier {
        let mut digest_key = [0u8; 32];
        // No safe cache key without randomness.
        getrandom::getrandom(&mut digest_key)
            .expect("the operating system's random generator failed");
        Verifier {
            verified: Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_idle(cfg.cache_ttl)
                .build(),
            failed: Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(cfg.failure_ttl)
                .build(),
            digest_key,
            pending: Arc::new(Semaphore::new(cfg.max_pending)),
            workers: Arc::new(Semaphore::new(cfg.max_concurrent)),
            throttle: Throttle::new(cfg),
            stats: VerifyStats::default(),
            argon2_observer: None,
        }
    }

    /// Reports each argon2 run's duration (from holding a worker to the verdict) to `observe`.
    pub fn on_argon2(mut self, observe: impl Fn(Duration) + Send + Sync + 'static) -> Verifier {
        self.argon2_observer = Some(Box::new(observe));
        self
    }

    /// Checks that `key`, presented by `client`, is the secret behind `entry`. Concurrent
    /// requests with the same uncached key share one argon2 run.
    pub async fn verify(
        &self,
        entry: &KeyEntry,
        key: &ParsedKey<'_>,
        client: IpAddr,
    ) -> Result<Verified, VerifyError> {
        match self.recall(entry, key) {
            Recall::Remembered => Ok(Verified::Cached),
            // The rest waits on caches and argon2: a large future, boxed so that the warm
            // path's stays small.
            Recall::Unremembered(key) => {
                Box::pin(self.verify_unremembered(entry, key, client)).await
            }
        }
    }

    /// `verify`'s warm path, which needs no waiting: whether this entry already verified this
    /// secret. No shared cache is touched (its bookkeeping would bounce between cores on every
    /// request for a busy key).
    pub fn recall(&self, entry: &KeyEntry, key: &ParsedKey<'_>) -> Recall {
        let digest = *blake3::keyed_hash(&self.digest_key, key.secret_text().as_bytes()).as_bytes();
        if entry.verified_digest() == Some(&digest) {
            self.stats.cache_hits.inc();
            Recall::Remembered
        } else {
            Recall::Unremembered(Unremembered {
                digest,
                prefix: key.prefix,
                secret: key.secret_bytes(),
            })
        }
    }

    /// `verify` for a secret `recall` found `entry` has not verified: the shared caches (a
    /// rebuilt entry asks the verified cache once, then remembers), then argon2.
    pub async fn verify_unremembered(
        &self,
        entry: &KeyEntry,
        Unremembered {
            digest,
            prefix,
            secret,
        }: Unremembered,
        client: IpAddr,
    ) -> Result<Verified, VerifyError> {
        if self.verified.get(&digest).await == Some(entry.id()) {
            entry.remember_verified(digest);
            self.stats.cache_hits.inc();
            return Ok(Verified::Cached);
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        if self.failed.contains_key(&digest) {
            self.stats
                .failures_cached_hits
                .fetch_add(1, Ordering::Relaxed);
            return Err(VerifyError::Mismatch);
        }
        if let Err(wait) = self.throttle.check(&prefix, client) {
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            return Err(VerifyError::Throttled(wait));
        }
        let Ok(_admitted) = self.pending.clone().try_acquire_owned() else {
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            return Err(VerifyError::Busy);
        };

        let id = entry.id();
        let hash = entry.hash().into_owned();
        let workers = self.workers.clone();
        let stats = &self.stats;
        let observer = &self.argon2_observer;
        let run = async move {
            // The semaphore is never closed.
            let _worker = workers.acquire_owned().await.map_err(|_| ())?;
            let started = Instant::now();
            let span = tracing::Span::current();
            let ok = tokio::task::spawn_blocking(move || {
                span.in_scope(|| verify_hash(&hash, &String::from_utf8_lossy(&secret)))
            })
            .await
            .unwrap_or(false);
            stats.argon2_runs.fetch_add(1, Ordering::Relaxed);
            let elapsed = started.elapsed();
            stats
                .argon2_nanos
                .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
            if let Some(observe) = observer {
                observe(elapsed);
            }
            if ok {
                Ok(id)
            } else {
                Err(())
            }
        };
        match self
            .verified
            .try_get_with(digest, run.in_current_span())
            .await
        {
            Ok(cached) if cached == id => {
                entry.remember_verified(digest);
                Ok(Verified::Computed)
            }
            Ok(_) => {
                // The digest belongs to another key row: never trust it for this one.
                self.verified.invalidate(&digest).await;
                Err(VerifyError::Mismatch)
            }
            Err(_) => {
                self.failed.insert(digest, ()).await;
                self.throttle.record_failure(&prefix, client);
                Err(VerifyError::Mismatch)
            }
        }
    }

    /// Forgets every cached verdict (used after a key's hash could have changed).
    pub fn clear(&self) {
        self.verified.invalidate_all();
        self.failed.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HashingConfig;
    use crate::keys::{generate, hash_key, hasher, parse, KeyKind, KeyRow};

    fn cfg(max_pending: usize) -> VerificationConfig {
        VerificationConfig {
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 1000,
            failure_ttl: Duration::from_secs(60),
            max_concurrent: 1,
            max_pending,
            failure_window: Duration::from_secs(60),
            prefix_failure_budget: 1000,
            client_failure_budget: 1000,
        }
    }

    fn entry_for(key: &str) -> KeyEntry {
        let argon = hasher(HashingConfig {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        })
        .expect("params");
        KeyEntry::from_row(KeyRow {
            id: KeyId {
                kind: KeyKind::ServiceAccount,
                id: 1,
            },
            prefix: Some(key[..8].to_string()),
            key_hash: Some(hash_key(&argon, key)),
            scopes: String::new(),
            expires_at: None,
            revoked_at: None,
            updated_at: 1,
            owner_id: 1,
            owner_name: "a".into(),
        })
        .expect("entry")
    }

    #[tokio::test]
    async fn the_second_verification_of_a_key_is_served_from_the_cache() {
        let v = Verifier::new(&cfg(8));
        let key = generate(KeyKind::ServiceAccount);
        let entry = entry_for(key.expose());
        let parsed = parse(key.expose()).expect("parses");
        assert_eq!(
            v.verify(&entry, &parsed, CLIENT).await,
            Ok(Verified::Computed)
        );
        assert_eq!(
            v.verify(&entry, &parsed, CLIENT).await,
            Ok(Verified::Cached)
        );
        assert_eq!(v.stats.argon2_runs.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_wrong_secret_fails_and_its_repeat_costs_no_argon2() {
        let v = Verifier::new(&cfg(8));
        let key = generate(KeyKind::ServiceAccount);
        let entry = entry_for(key.expose());
        // Same prefix, other secret: well-formed, wrong.
        let other = generate(KeyKind::ServiceAccount);
        let forged = forge(&key.expose()[..8], &other.expose()[9..41]);
        let parsed = parse(&forged).expect("forged key is well-formed");
        assert_eq!(
            v.verify(&entry, &parsed, CLIENT).await,
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            v.verify(&entry, &parsed, CLIENT).await,
            Err(VerifyError::Mismatch)
        );
        assert_eq!(v.stats.argon2_runs.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_entry_remembers_only_the_secret_that_verified_and_a_new_entry_asks_the_cache() {
        let v = Verifier::new(&cfg(8));
        let key = generate(KeyKind::ServiceAccount);
        let entry = entry_for(key.expose());
        let parsed = parse(key.expose()).expect("parses");
        assert!(entry.verified_digest().is_none());
        assert_eq!(
            v.verify(&entry, &parsed, CLIENT).await,
            Ok(Verified::Computed)
        );
        assert!(entry.verified_digest().is_some());
        // A forged secret under the same prefix is not the remembered one: refused.
        let other = generate(KeyKind::ServiceAccount);
        let forged = forge(&key.expose()[..8], &other.expose()[9..41]);
        let forged = parse(&forged).expect("forged key is well-formed");
        assert_eq!(
            v.verify(&entry, &forged, CLIENT).await,
            Err(VerifyError::Mismatch)
        );
        // A row change builds a new entry without the memo: the shared cache answers it.
        let replaced = entry_for(key.expose());
        assert_eq!(
            v.verify(&replaced, &parsed, CLIENT).await,
            Ok(Verified::Cached)
        );
        assert!(replaced.verified_digest().is_some());
        assert_eq!(v.stats.argon2_runs.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn concurrent_requests_for_one_new_key_share_one_argon2_run() {
        let v = Arc::new(Verifier::new(&cfg(64)));
        let key = generate(KeyKind::ServiceAccount);
        let entry = Arc::new(entry_for(key.expose()));
        let text: Arc<str> = key.expose().into();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (v, entry, text) = (v.clone(), entry.clone(), text.clone());
            tasks.push(tokio::spawn(async move {
                let parsed = parse(&text).expect("parses");
                v.verify(&entry, &parsed, CLIENT).await
            }));
        }
        for t in tasks {
            assert!(t.await.expect("task").is_ok());
        }
        assert_eq!(v.stats.argon2_runs.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn verifications_beyond_the_pending_bound_are_refused_as_busy() {
        let v = Arc::new(Verifier::new(&cfg(1)));
        let keys: Vec<_> = (0..4).map(|_| generate(KeyKind::ServiceAccount)).collect();
        let mut tasks = Vec::new();
        for k in &keys {
            let (v, entry, text) = (
                v.clone(),
                Arc::new(entry_for(k.expose())),
                k.expose().to_string(),
            );
            tasks.push(tokio::spawn(async move {
                let parsed = parse(&text).expect("parses");
                v.verify(&entry, &parsed, CLIENT).await
            }));
        }
        let mut busy = 0;
        for t in tasks {
            if t.await.expect("task") == Err(VerifyError::Busy) {
                busy += 1;
            }
        }
        assert!(
            busy >= 1,
            "with room for one, some of four distinct keys must be refused"
        );
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// Builds a well-formed key (valid checksum) from a prefix and a secret.
    fn forge(prefix: &str, secret: &str) -> String {
        crate::keys::with_checksum(&format!("{prefix}_{secret}"))
    }
}
