//! Failure budgets against key-guessing floods. Prefixes are public, so anyone can forge
//! well-formed keys that reach argon2; each failed verification is counted against its key
//! prefix and its client address over a fixed window, and a spent budget refuses further
//! argon2 work for that prefix or client until the window ends. In memory only (moka).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::format::KeyPrefix;
use crate::config::VerificationConfig;

/// Failures within one window; the cache entry expires with the window.
struct Window {
    started: Instant,
    failures: AtomicU32,
}

pub struct Throttle {
    by_prefix: Cache<KeyPrefix, Arc<Window>>,
    by_client: Cache<IpAddr, Arc<Window>>,
    window: Duration,
    prefix_budget: u32,
    client_budget: u32,
}

impl Throttle {
    pub fn new(cfg: &VerificationConfig) -> Throttle {
        Throttle {
            by_prefix: window_cache(cfg),
            by_client: window_cache(cfg),
            window: cfg.failure_window,
            prefix_budget: cfg.prefix_failure_budget,
            client_budget: cfg.client_failure_budget,
        }
    }

    /// `Err(retry_after)` when the prefix or the client has spent its budget.
    pub fn check(&self, prefix: &KeyPrefix, client: IpAddr) -> Result<(), Duration> {
        let spent = |w: Option<Arc<Window>>, budget: u32| {
            w.filter(|w| w.failures.load(Ordering::Relaxed) >= budget)
                .map(|w| self.window.saturating_sub(w.started.elapsed()))
        };
        let wait = [
            spent(self.by_prefix.get(prefix), self.prefix_budget),
            spent(self.by_client.get(&client), self.client_budget),
        ]
        .into_iter()
        .flatten()
        .max();
        match wait {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Counts one failed verification against both budgets.
    pub fn record_failure(&self, prefix: &KeyPrefix, client: IpAddr) {
        let fresh = || {
            Arc::new(Window {
                started: Instant::now(),
                failures: AtomicU32::new(0),
            })
        };
        self.by_prefix
            .get_with(*prefix, fresh)
            .failures
            .fetch_add(1, Ordering::Relaxed);
        self.by_client
            .get_with(client, fresh)
            .failures
            .fetch_add(1, Ordering::Relaxed);
    }
}

fn window_cache<K>(cfg: &VerificationConfig) -> Cache<K, Arc<Window>>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(cfg.cache_capacity)
        .time_to_live(cfg.failure_window)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(window: Duration, prefix_budget: u32, client_budget: u32) -> Throttle {
        Throttle::new(&VerificationConfig {
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 1000,
            failure_ttl: Duration::from_secs(60),
            max_concurrent: 1,
            max_pending: 1,
            failure_window: window,
            prefix_failure_budget: prefix_budget,
            client_failure_budget: client_budget,
        })
    }

    fn prefix(s: &str) -> KeyPrefix {
        KeyPrefix::parse(s).expect("prefix")
    }

    #[test]
    fn a_prefix_is_refused_once_its_budget_is_spent_from_any_client() {
        let t = throttle(Duration::from_secs(60), 3, 100);
        let p = prefix("kgsAAAAA");
        for i in 0..3u8 {
            assert!(t.check(&p, IpAddr::from([10, 0, 0, i])).is_ok());
            t.record_failure(&p, IpAddr::from([10, 0, 0, i]));
        }
        let wait = t
            .check(&p, IpAddr::from([10, 0, 0, 99]))
            .expect_err("spent");
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(50));
        assert!(t
            .check(&prefix("kgsBBBBB"), IpAddr::from([10, 0, 0, 99]))
            .is_ok());
    }

    #[test]
    fn a_client_is_refused_once_its_budget_is_spent_on_any_prefix() {
        let t = throttle(Duration::from_secs(60), 100, 2);
        let ip = IpAddr::from([192, 0, 2, 1]);
        t.record_failure(&prefix("kgsAAAAA"), ip);
        t.record_failure(&prefix("kgsBBBBB"), ip);
        assert!(t.check(&prefix("kgsCCCCC"), ip).is_err());
        assert!(t
            .check(&prefix("kgsCCCCC"), IpAddr::from([192, 0, 2, 2]))
            .is_ok());
    }

    #[test]
    fn budgets_come_back_when_the_window_ends() {
        let t = throttle(Duration::from_millis(100), 1, 1);
        let (p, ip) = (prefix("kgsAAAAA"), IpAddr::from([192, 0, 2, 1]));
        t.record_failure(&p, ip);
        assert!(t.check(&p, ip).is_err());
        std::thread::sleep(Duration::from_millis(150));
        assert!(t.check(&p, ip).is_ok());
    }
}
