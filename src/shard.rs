//! Per-thread shards for what every request counts. Two proxy workers bumping one shared
//! atomic make its cache line bounce between cores on every request; here each thread writes
//! its own line and a scrape adds the lines up. Threads pick a shard once, round-robin, so the
//! proxy workers (the only hot writers) never share one while there are at most `SHARDS`.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

const SHARDS: usize = 8;

/// Buckets a sharded histogram can have, `+Inf` included.
const MAX_BUCKETS: usize = 24;

fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    MINE.with(|s| *s)
}

/// One cache line (two on CPUs that prefetch pairs) per shard.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Line<T>(T);

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter {
    shards: [Line<AtomicU64>; SHARDS],
}

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.shards[shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// Counters per line: a line holds 16 of them.
const PER_LINE: usize = 16;

/// A fixed number of monotonic counters, addressed by index (a labelled family whose label
/// values are known up front). Each shard is a run of whole lines, so threads never share one.
pub struct Counters {
    len: usize,
    /// Lines per shard.
    lines: usize,
    shards: Box<[Line<[AtomicU64; PER_LINE]>]>,
}

impl Counters {
    pub fn new(len: usize) -> Counters {
        let lines = len.div_ceil(PER_LINE);
        Counters {
            len,
            lines,
            shards: (0..lines * SHARDS).map(|_| Line::default()).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds one to counter `index`; an index past the end counts nothing.
    pub fn inc(&self, index: usize) {
        if index < self.len {
            let line = &self.shards[shard() * self.lines + index / PER_LINE].0;
            line[index % PER_LINE].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, index: usize) -> u64 {
        if index >= self.len {
            return 0;
        }
        (0..SHARDS)
            .map(|s| {
                self.shards[s * self.lines + index / PER_LINE].0[index % PER_LINE]
                    .load(Ordering::Relaxed)
            })
            .sum()
    }
}

/// A gauge moved up and down (a shard may go negative; the sum is what counts).
#[derive(Default)]
pub struct Gauge {
    shards: [Line<AtomicI64>; SHARDS],
}

impl Gauge {
    pub fn add(&self, n: i64) {
        self.shards[shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[derive(Default)]
struct HistogramShard {
    count: AtomicU64,
    sum_nanos: AtomicU64,
    /// Per bucket (not cumulative); the last used slot is `+Inf`.
    buckets: [AtomicU64; MAX_BUCKETS],
}

/// A duration histogram with fixed upper bounds (seconds, ascending).
pub struct Histogram {
    bounds: Vec<f64>,
    bounds_nanos: Vec<u64>,
    shards: Box<[Line<HistogramShard>]>,
}

/// A histogram as read at one moment.
#[derive(Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum_seconds: f64,
    /// (upper bound, cumulative count), `+Inf` excluded (it equals `count`).
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// # Panics
    /// When `bounds` has more than `MAX_BUCKETS - 1` entries (a programming error).
    pub fn new(bounds: &[f64]) -> Histogram {
        assert!(bounds.len() < MAX_BUCKETS, "too many histogram buckets");
        Histogram {
            bounds: bounds.to_vec(),
            bounds_nanos: bounds.iter().map(|b| (b * 1e9) as u64).collect(),
            shards: (0..SHARDS).map(|_| Line::default()).collect(),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // A value equal to a bound belongs to that bound's bucket (`le`).
        let bucket = self.bounds_nanos.partition_point(|&b| b < nanos);
        let s = &self.shards[shard()].0;
        s.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        s.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        s.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut per_bucket = vec![0u64; self.bounds.len()];
        let (mut count, mut sum) = (0u64, 0u64);
        for s in self.shards.iter() {
            for (total, b) in per_bucket.iter_mut().zip(&s.0.buckets) {
                *total += b.load(Ordering::Relaxed);
            }
            count += s.0.count.load(Ordering::Relaxed);
            sum = sum.wrapping_add(s.0.sum_nanos.load(Ordering::Relaxed));
        }
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(per_bucket)
            .map(|(&bound, n)| {
                cumulative += n;
                // Read while others write: never report a bucket above the total.
                (bound, cumulative.min(count))
            })
            .collect();
        HistogramSnapshot {
            count,
            sum_seconds: sum as f64 / 1e9,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive_of_their_bound() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets, vec![(0.001, 2), (0.01, 3)]);
        assert!((s.sum_seconds - 1.0065).abs() < 1e-9, "{}", s.sum_seconds);
    }

    #[test]
    fn writes_from_many_threads_add_up() {
        let (c, g, h) = (
            Arc::new(Counter::default()),
            Arc::new(Gauge::default()),
            Arc::new(Histogram::new(&[0.5])),
        );
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let (c, g, h) = (c.clone(), g.clone(), h.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.inc();
                        g.add(1);
                        h.observe(Duration::from_millis(1));
                    }
                    g.add(-400);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(c.get(), 12_000);
        assert_eq!(g.get(), 12 * 600);
        assert_eq!(h.snapshot().count, 12_000);
        assert_eq!(h.snapshot().buckets, vec![(0.5, 12_000)]);
    }

    #[test]
    fn counters_by_index_add_up_across_threads_and_lines() {
        // 40 counters: three lines per shard, the last one partly used.
        let c = Arc::new(Counters::new(40));
        let threads: Vec<_> = (0..12)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..40 {
                        for _ in 0..(i + t) {
                            c.inc(i);
                        }
                    }
                    c.inc(40);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        for i in 0..40 {
            // Thread t added i + t to counter i: 12 i + (0 + 1 + ... + 11).
            assert_eq!(c.get(i), 12 * i as u64 + 66, "counter {i}");
        }
        assert_eq!(c.get(40), 0, "past the end counts nothing");
        assert_eq!(c.len(), 40);
    }
}
