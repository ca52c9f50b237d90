//! Prometheus metrics: one `Metrics` value per instance with its own registry, scraped at the
//! admin listener's `/metrics`. A request is counted in a slot per (route, method class,
//! outcome), so counting it costs a few atomic operations and no hashing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::clock::Clock;
use crate::keys::{KeyTable, Verifier};
use crate::shard;
use crate::usage::Usage;

/// The `route` label of requests refused before a route was chosen. Parentheses cannot occur
/// in a configured route name, so it never collides with one.
pub const NO_ROUTE: &str = "(none)";

/// The content type of a scrape.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// How a request ended, as counted. Each variant fixes the `outcome`, `reason` and (except for
/// `Allowed`) the status label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Unauthorized(AuthReason),
    Forbidden,
    NotFound,
    UpstreamError(UpstreamFailure),
    BadRequest,
    Busy,
    /// A prefix or client address spent its failure budget (429).
    Throttled,
    NotReady,
}

/// Why a request got 401 (mirrors the proxy's own enum; kept here so metrics does not depend on
/// the proxy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthReason {
    Missing,
    Malformed,
    Unknown,
    Revoked,
    Expired,
}

/// How a forward to the upstream failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No TCP connection could be made.
    Connect,
    /// The connection failed or broke before a response head arrived, or the head is one
    /// keygate will not relay (a 101, a status past 599, a transfer coding but `chunked`).
    Request,
    /// No response head within `proxy.upstream_timeout`.
    Timeout,
}

/// The background queues whose health is exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    LastUsed,
    Audit,
}

/// Flush health of one background queue.
#[derive(Clone)]
pub struct QueueMetrics {
    pub flush_duration: Histogram,
    pub flush_failures: IntCounter,
    /// Records lost because the queue was full. Never silent: also logged by the writer.
    pub dropped: IntCounter,
}

/// Key-table refresh health.
#[derive(Clone)]
pub struct SyncMetrics {
    pub refresh_duration: Histogram,
    pub refresh_failures: IntCounter,
    /// Change notifications received (PostgreSQL LISTEN/NOTIFY).
    pub notifications: IntCounter,
    /// Commit-to-applied lag of the newest announced change.
    pub change_lag: Gauge,
}

impl SyncMetrics {
    /// Records one load or refresh that began at `started`.
    pub fn observe(&self, started: std::time::Instant, ok: bool) {
        self.refresh_duration
            .observe(started.elapsed().as_secs_f64());
        if !ok {
            self.refresh_failures.inc();
        }
    }
}

impl QueueMetrics {
    /// Records one batched write that began at `started`.
    pub fn observe_flush(&self, started: std::time::Instant, ok: bool) {
        self.flush_duration.observe(started.elapsed().as_secs_f64());
        if !ok {
            self.flush_failures.inc();
        }
    }
}

/// Every metric of one keygate instance, in its own registry (never the global one), so two
/// instances can run in one process.
pub struct Metrics {
    registry: Registry,
    routes: Vec<String>,
    /// `keygate_requests_total`, one counter per (route, method class, outcome slot), in
    /// per-thread shards: one shared counter was the request path's last cache line written by
    /// both proxy workers on every request.
    requests: Arc<shard::Counters>,
    account_requests: Option<IntCounterVec>,
    /// The request path's counters, histograms and gauge live in per-thread shards
    /// (`shard.rs`), added up at scrape by the `Sharded` collector.
    auth_duration: Arc<shard::Histogram>,
    upstream_duration: Vec<Arc<shard::Histogram>>,
    upstream_errors: Vec<[IntCounter; 3]>,
    in_flight: Arc<shard::Gauge>,
    argon2_duration: Histogram,
    pub sync: SyncMetrics,
    pub last_used: QueueMetrics,
    pub audit: QueueMetrics,
    /// Records waiting in the audit queue, set by its writer and exported as
    /// `keygate_queue_depth{queue="audit"}` (the last-used depth is read from its queue).
    pub audit_depth: IntGauge,
}

impl Metrics {
    /// Creates the metrics of one instance. `routes` are the configured route names in file
    /// order (the proxy counts by index into it).
    pub fn new(routes: &[String], per_account_labels: bool) -> Metrics {
        // Every name and label below is a literal checked by the unit tests, so registration
        // cannot fail at run time.
        Metrics::build(routes, per_account_labels).expect("metric definitions are valid")
    }

    fn build(routes: &[String], per_account_labels: bool) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let reg = |c: Box<dyn Collector>| registry.register(c);

        let requests = Arc::new(shard::Counters::new(
            (routes.len() + 1) * METHOD_CLASSES.len() * OUTCOME_SLOTS,
        ));

        let account_requests = if per_account_labels {
            let v = IntCounterVec::new(
                Opts::new(
                    "keygate_account_requests_total",
                    "Requests with a known key, by service account or gateway and outcome ([metrics] per_account_labels).",
                ),
                &["account", "outcome"],
            )?;
            reg(Box::new(v.clone()))?;
            Some(v)
        } else {
            None
        };

        let auth_duration = Arc::new(shard::Histogram::new(AUTH_BUCKETS));
        let upstream_duration: Vec<_> = routes
            .iter()
            .map(|_| Arc::new(shard::Histogram::new(UPSTREAM_BUCKETS)))
            .collect();
        let in_flight = Arc::new(shard::Gauge::default());
        reg(Box::new(Sharded {
            requests: (
                Desc::new(
                    "keygate_requests_total".into(),
                    "Requests answered by the proxy, by route, method class, outcome, reason and status class.".into(),
                    ["route", "method", "outcome", "reason", "status_class"]
                        .map(String::from)
                        .to_vec(),
                    Default::default(),
                )?,
                routes.to_vec(),
                requests.clone(),
            ),
            auth: (
                Desc::new(
                    "keygate_auth_duration_seconds".into(),
                    "Time keygate spent deciding a request (checks, route, key, verification, scope), upstream excluded.".into(),
                    vec![],
                    Default::default(),
                )?,
                auth_duration.clone(),
            ),
            upstream: (
                Desc::new(
                    "keygate_upstream_duration_seconds".into(),
                    "Time from sending a request upstream to receiving its response head, by route.".into(),
                    vec!["route".into()],
                    Default::default(),
                )?,
                routes.iter().cloned().zip(upstream_duration.iter().cloned()).collect(),
            ),
            in_flight: (
                Desc::new(
                    "keygate_requests_in_flight".into(),
                    "Proxy requests between arrival and their response head.".into(),
                    vec![],
                    Default::default(),
                )?,
                in_flight.clone(),
            ),
        }))?;

        let errors = IntCounterVec::new(
            Opts::new(
                "keygate_upstream_errors_total",
                "Forwards that failed before a response head, or whose head keygate would not relay, by route and kind (connect, request, timeout).",
            ),
            &["route", "kind"],
        )?;
        reg(Box::new(errors.clone()))?;
        let upstream_errors = routes
            .iter()
            .map(|r| {
                ["connect", "request", "timeout"]
                    .map(|kind| errors.with_label_values(&[r.as_str(), kind]))
            })
            .collect();

        let argon2_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_argon2_duration_seconds",
                "argon2id verifications run (cache misses) and their duration once a worker is free.",
            )
            .buckets(ARGON2_BUCKETS.to_vec()),
        )?;
        reg(Box::new(argon2_duration.clone()))?;

        let refresh_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_table_refresh_duration_seconds",
                "Duration of key-table loads and refreshes from the database, failed ones included.",
            )
            .buckets(IO_BUCKETS.to_vec()),
        )?;
        reg(Box::new(refresh_duration.clone()))?;
        let refresh_failures = IntCounter::new(
            "keygate_table_refresh_failures_total",
            "Key-table loads and refreshes that failed; the last table loaded keeps serving.",
        )?;
        reg(Box::new(refresh_failures.clone()))?;
        let notifications = IntCounter::new(
            "keygate_notifications_received_total",
            "Key-change notifications received from PostgreSQL LISTEN/NOTIFY.",
        )?;
        reg(Box::new(notifications.clone()))?;
        let change_lag = Gauge::new(
            "keygate_table_change_lag_seconds",
            "Time from a key change being committed to this sidecar applying it, for the newest announced change (PostgreSQL).",
        )?;
        reg(Box::new(change_lag.clone()))?;

        let flush_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_queue_flush_duration_seconds",
                "Duration of each batched write of a background queue, failed ones included.",
            )
            .buckets(IO_BUCKETS.to_vec()),
            &["queue"],
        )?;
        reg(Box::new(flush_duration.clone()))?;
        let flush_failures = IntCounterVec::new(
            Opts::new(
                "keygate_queue_flush_failures_total",
                "Batched writes of a background queue that failed (the records are kept for the next try).",
            ),
            &["queue"],
        )?;
        reg(Box::new(flush_failures.clone()))?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "keygate_queue_dropped_total",
                "Records a background queue dropped because it was full.",
            ),
            &["queue"],
        )?;
        reg(Box::new(dropped.clone()))?;
        let queue = |name: &str| QueueMetrics {
            flush_duration: flush_duration.with_label_values(&[name]),
            flush_failures: flush_failures.with_label_values(&[name]),
            dropped: dropped.with_label_values(&[name]),
        };
        let (last_used, audit) = (queue("last_used"), queue("audit"));

        let build_info = IntGaugeVec::new(
            Opts::new(
                "keygate_build_info",
                "Always 1; the version label says which keygate is running.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        reg(Box::new(build_info))?;

        Ok(Metrics {
            registry,
            routes: routes.to_vec(),
            requests,
            account_requests,
            auth_duration,
            upstream_duration,
            upstream_errors,
            in_flight,
            argon2_duration,
            sync: SyncMetrics {
                refresh_duration,
                refresh_failures,
                notifications,
                change_lag,
            },
            last_used,
            audit,
            // Not registered itself: the scrape-time collector reads it into `keygate_queue_depth`.
            audit_depth: IntGauge::new("keygate_audit_queue_depth", "read at scrape")?,
        })
    }

    /// Exports values kept elsewhere as atomics (verification stats, table size and age, the
    /// last-used queue) by reading them at scrape time.
    pub fn watch(
        &self,
        table: Arc<KeyTable>,
        verifier: Arc<Verifier>,
        usage: Arc<Usage>,
        clock: Clock,
    ) {
        let collector = Pulled::new(table, verifier, usage, clock, self.audit_depth.clone());
        // A second `watch` on the same registry is a programming error; keep the first.
        if let Err(e) = collector.and_then(|c| self.registry.register(Box::new(c))) {
            tracing::warn!(error = %e, "metrics sources were not registered");
        }
    }

    /// Counts one answered request. `route` indexes the configured routes (file order).
    pub fn request(&self, route: Option<usize>, method: &Method, outcome: Outcome, status: u16) {
        let route_slot = route
            .filter(|r| *r < self.routes.len())
            .unwrap_or(self.routes.len());
        let (outcome_slot, _) = outcome_slot(outcome, status);
        let method_slot = method_class(method);
        self.requests
            .inc((route_slot * METHOD_CLASSES.len() + method_slot) * OUTCOME_SLOTS + outcome_slot);
    }

    /// Counts a request per account; a no-op unless `[metrics] per_account_labels` is on.
    pub fn account_request(&self, account: &str, outcome: Outcome) {
        if let Some(v) = &self.account_requests {
            v.with_label_values(&[account, outcome_labels(outcome).0])
                .inc();
        }
    }

    pub fn observe_auth(&self, elapsed: Duration) {
        self.auth_duration.observe(elapsed);
    }

    pub fn observe_upstream(&self, route: usize, elapsed: Duration) {
        if let Some(h) = self.upstream_duration.get(route) {
            h.observe(elapsed);
        }
    }

    pub fn upstream_error(&self, route: usize, failure: UpstreamFailure) {
        if let Some(c) = self.upstream_errors.get(route) {
            c[failure as usize].inc();
        }
    }

    /// Records argon2 durations; handed to the verifier (which the metrics read at scrape, so
    /// it must not hold the metrics themselves).
    pub fn argon2_observer(&self) -> impl Fn(Duration) + Send + Sync + 'static {
        let histogram = self.argon2_duration.clone();
        move |elapsed| histogram.observe(elapsed.as_secs_f64())
    }

    /// Marks a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.add(1);
        InFlight(&self.in_flight)
    }

    /// `in_flight` for a holder that cannot keep a guard (a future that owns what the guard
    /// would borrow): it must call `left_flight` once, when it is dropped.
    pub fn entered_flight(&self) {
        self.in_flight.add(1);
    }

    /// Ends an `entered_flight`.
    pub fn left_flight(&self) {
        self.in_flight.add(-1);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding well-formed families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Decrements the in-flight gauge on drop, however the request ends.
pub struct InFlight<'m>(&'m shard::Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

const METHOD_CLASSES: [&str; 3] = ["read", "write", "other"];

/// `allowed` × five status classes, then one slot for each fixed-status outcome.
const OUTCOME_SLOTS: usize = 5 + 13;

const AUTH_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
const UPSTREAM_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ARGON2_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];
const IO_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `read` for safe methods, `write` for the ones that change state, `other` for the rest.
fn method_class(method: &Method) -> usize {
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS => 0,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE => 1,
        _ => 2,
    }
}

fn outcome_slot(outcome: Outcome, status: u16) -> (usize, &'static str) {
    match outcome {
        Outcome::Allowed => {
            let class = (status / 100).clamp(1, 5) as usize;
            (class - 1, ["1xx", "2xx", "3xx", "4xx", "5xx"][class - 1])
        }
        Outcome::Unauthorized(r) => (5 + r as usize, "4xx"),
        Outcome::Forbidden => (10, "4xx"),
        Outcome::NotFound => (11, "4xx"),
        Outcome::UpstreamError(UpstreamFailure::Connect | UpstreamFailure::Request) => (12, "5xx"),
        Outcome::UpstreamError(UpstreamFailure::Timeout) => (13, "5xx"),
        Outcome::BadRequest => (14, "4xx"),
        Outcome::Busy => (15, "5xx"),
        Outcome::NotReady => (16, "5xx"),
        Outcome::Throttled => (17, "4xx"),
    }
}

/// Every outcome but `Allowed`, each of which has a slot of its own (except `Request`, which
/// shares `Connect`'s).
const FIXED_OUTCOMES: [Outcome; 13] = [
    Outcome::Unauthorized(AuthReason::Missing),
    Outcome::Unauthorized(AuthReason::Malformed),
    Outcome::Unauthorized(AuthReason::Unknown),
    Outcome::Unauthorized(AuthReason::Revoked),
    Outcome::Unauthorized(AuthReason::Expired),
    Outcome::Forbidden,
    Outcome::NotFound,
    Outcome::UpstreamError(UpstreamFailure::Connect),
    Outcome::UpstreamError(UpstreamFailure::Timeout),
    Outcome::BadRequest,
    Outcome::Busy,
    Outcome::NotReady,
    Outcome::Throttled,
];

/// The `outcome`, `reason` and `status_class` labels of an outcome slot (`outcome_slot`
/// backwards).
fn slot_labels(slot: usize) -> (&'static str, &'static str, &'static str) {
    let outcome = if slot < 5 {
        (Outcome::Allowed, (slot as u16 + 1) * 100)
    } else {
        let fixed = FIXED_OUTCOMES
            .into_iter()
            .find(|o| outcome_slot(*o, 0).0 == slot)
            .expect("every slot past `allowed` has a fixed outcome");
        (fixed, 0)
    };
    let (label, reason) = outcome_labels(outcome.0);
    (label, reason, outcome_slot(outcome.0, outcome.1).1)
}

/// The `outcome` and `reason` labels.
fn outcome_labels(outcome: Outcome) -> (&'static str, &'static str) {
    match outcome {
        Outcome::Allowed => ("allowed", "none"),
        Outcome::Unauthorized(r) => (
            "unauthorized",
            match r {
                AuthReason::Missing => "missing",
                AuthReason::Malformed => "malformed",
                AuthReason::Unknown => "unknown",
                AuthReason::Revoked => "revoked",
                AuthReason::Expired => "expired",
            },
        ),
        Outcome::Forbidden => ("forbidden", "insufficient_scope"),
        Outcome::NotFound => ("not_found", "none"),
        Outcome::UpstreamError(UpstreamFailure::Timeout) => ("upstream_error", "timeout"),
        Outcome::UpstreamError(_) => ("upstream_error", "unreachable"),
        Outcome::BadRequest => ("bad_request", "none"),
        Outcome::Busy => ("busy", "none"),
        Outcome::NotReady => ("not_ready", "none"),
        Outcome::Throttled => ("throttled", "failure_budget"),
    }
}

/// A value read at scrape time.
type Reader = Box<dyn Fn() -> f64 + Send + Sync>;

/// One metric family whose samples are read at scrape time.
struct PulledFamily {
    desc: Desc,
    kind: MetricType,
    samples: Vec<(Vec<LabelPair>, Reader)>,
}

/// The collector for values that live elsewhere as atomics.
struct Pulled {
    families: Vec<PulledFamily>,
}

impl Pulled {
    fn new(
        table: Arc<KeyTable>,
        verifier: Arc<Verifier>,
        usage: Arc<Usage>,
        clock: Clock,
        audit_depth: IntGauge,
    ) -> prometheus::Result<Pulled> {
        let stat = |f: fn(&Verifier) -> &AtomicU64| -> Reader {
            let v = verifier.clone();
            Box::new(move || f(&v).load(Ordering::Relaxed) as f64)
        };
        let counter = |name: &str, help: &str, read: Reader| -> prometheus::Result<PulledFamily> {
            Ok(PulledFamily {
                desc: Desc::new(name.into(), help.into(), vec![], Default::default())?,
                kind: MetricType::COUNTER,
                samples: vec![(vec![], read)],
            })
        };
        let (t1, t2, t3, t4) = (table.clone(), table.clone(), table.clone(), table);
        let families = vec![
            counter(
                "keygate_verification_cache_hits_total",
                "Key verifications answered from the cache of earlier successes (no argon2).",
                {
                    let v = verifier.clone();
                    Box::new(move || v.stats.cache_hits.get() as f64)
                },
            )?,
            counter(
                "keygate_verification_cache_misses_total",
                "Key verifications not in the success cache (answered by the failure cache or argon2).",
                stat(|v| &v.stats.cache_misses),
            )?,
            counter(
                "keygate_verification_failure_cache_hits_total",
                "Wrong secrets refused from the cache of recent failures (no argon2).",
                stat(|v| &v.stats.failures_cached_hits),
            )?,
            counter(
                "keygate_verification_busy_total",
                "Verifications refused with 503 because verification.max_pending were already waiting.",
                stat(|v| &v.stats.busy),
            )?,
            PulledFamily {
                desc: Desc::new(
                    "keygate_table_keys".into(),
                    "Keys in the in-memory table, by kind (service_account, gateway).".into(),
                    vec!["kind".into()],
                    Default::default(),
                )?,
                kind: MetricType::GAUGE,
                samples: vec![
                    (
                        labels(&[("kind", "service_account")]),
                        Box::new(move || t1.count_by_kind().0 as f64),
                    ),
                    (
                        labels(&[("kind", "gateway")]),
                        Box::new(move || t2.count_by_kind().1 as f64),
                    ),
                ],
            },
            PulledFamily {
                desc: Desc::new(
                    "keygate_table_loaded".into(),
                    "1 once the key table has been loaded from the database; until then the proxy answers 503.".into(),
                    vec![],
                    Default::default(),
                )?,
                kind: MetricType::GAUGE,
                samples: vec![(
                    vec![],
                    Box::new(move || f64::from(u8::from(t3.synced_at().is_some()))),
                )],
            },
            PulledFamily {
                desc: Desc::new(
                    "keygate_table_age_seconds".into(),
                    "Time since the key table last matched the database (0 before the first load).".into(),
                    vec![],
                    Default::default(),
                )?,
                kind: MetricType::GAUGE,
                samples: vec![(
                    vec![],
                    Box::new(move || {
                        t4.synced_at()
                            .map_or(0.0, |at| (clock.now_ms() - at).max(0) as f64 / 1000.0)
                    }),
                )],
            },
            PulledFamily {
                desc: Desc::new(
                    "keygate_queue_depth".into(),
                    "Records waiting in a background queue (last_used, audit).".into(),
                    vec!["queue".into()],
                    Default::default(),
                )?,
                kind: MetricType::GAUGE,
                samples: vec![
                    (
                        labels(&[("queue", "last_used")]),
                        Box::new(move || usage.pending() as f64),
                    ),
                    (
                        labels(&[("queue", "audit")]),
                        Box::new(move || audit_depth.get() as f64),
                    ),
                ],
            },
        ];
        Ok(Pulled { families })
    }
}

impl Collector for Pulled {
    fn desc(&self) -> Vec<&Desc> {
        self.families.iter().map(|f| &f.desc).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.families
            .iter()
            .map(|f| {
                let metrics: Vec<proto::Metric> = f
                    .samples
                    .iter()
                    .map(|(labels, read)| {
                        let mut m = proto::Metric::from_label(labels.clone());
                        let value = read();
                        if f.kind == MetricType::COUNTER {
                            let mut c = proto::Counter::default();
                            c.set_value(value);
                            m.set_counter(c);
                        } else {
                            let mut g = proto::Gauge::default();
                            g.set_value(value);
                            m.set_gauge(g);
                        }
                        m
                    })
                    .collect();
                let mut family = MetricFamily::default();
                family.set_name(f.desc.fq_name.clone());
                family.set_help(f.desc.help.clone());
                family.set_field_type(f.kind);
                family.set_metric(metrics);
                family
            })
            .collect()
    }
}

/// The request path's sharded counters, histograms and in-flight gauge, added up at scrape.
struct Sharded {
    /// With the route names, in the order of `Metrics::routes`; only counted slots are
    /// exported, as a labelled counter family exports only the series it has seen.
    requests: (Desc, Vec<String>, Arc<shard::Counters>),
    auth: (Desc, Arc<shard::Histogram>),
    /// One series per route (label `route`).
    upstream: (Desc, Vec<(String, Arc<shard::Histogram>)>),
    in_flight: (Desc, Arc<shard::Gauge>),
}

impl Collector for Sharded {
    fn desc(&self) -> Vec<&Desc> {
        vec![
            &self.requests.0,
            &self.auth.0,
            &self.upstream.0,
            &self.in_flight.0,
        ]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let histogram = |labels: Vec<LabelPair>, h: &shard::Histogram| {
            let s = h.snapshot();
            let mut p = proto::Histogram::default();
            p.set_sample_count(s.count);
            p.set_sample_sum(s.sum_seconds);
            p.set_bucket(
                s.buckets
                    .into_iter()
                    .map(|(bound, cumulative)| {
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(bound);
                        b.set_cumulative_count(cumulative);
                        b
                    })
                    .collect(),
            );
            let mut m = proto::Metric::from_label(labels);
            m.set_histogram(p);
            m
        };
        let family = |desc: &Desc, kind: MetricType, metrics: Vec<proto::Metric>| {
            let mut f = MetricFamily::default();
            f.set_name(desc.fq_name.clone());
            f.set_help(desc.help.clone());
            f.set_field_type(kind);
            f.set_metric(metrics);
            f
        };
        let mut in_flight = proto::Gauge::default();
        in_flight.set_value(self.in_flight.1.get() as f64);
        let (_, routes, counts) = &self.requests;
        let requests = (0..counts.len())
            .filter_map(|slot| {
                let n = counts.get(slot);
                (n > 0).then(|| {
                    let (outcome, reason, status_class) = slot_labels(slot % OUTCOME_SLOTS);
                    let method = METHOD_CLASSES[slot / OUTCOME_SLOTS % METHOD_CLASSES.len()];
                    let route = routes
                        .get(slot / OUTCOME_SLOTS / METHOD_CLASSES.len())
                        .map_or(NO_ROUTE, String::as_str);
                    let mut c = proto::Counter::default();
                    c.set_value(n as f64);
                    let mut m = proto::Metric::from_label(labels(&[
                        ("method", method),
                        ("outcome", outcome),
                        ("reason", reason),
                        ("route", route),
                        ("status_class", status_class),
                    ]));
                    m.set_counter(c);
                    m
                })
            })
            .collect();
        vec![
            family(&self.requests.0, MetricType::COUNTER, requests),
            family(
                &self.auth.0,
                MetricType::HISTOGRAM,
                vec![histogram(vec![], &self.auth.1)],
            ),
            family(
                &self.upstream.0,
                MetricType::HISTOGRAM,
                self.upstream
                    .1
                    .iter()
                    .map(|(route, h)| histogram(labels(&[("route", route)]), h))
                    .collect(),
            ),
            family(
                &self.in_flight.0,
                MetricType::GAUGE,
                vec![proto::Metric::from_gauge(in_flight)],
            ),
        ]
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut l = LabelPair::default();
            l.set_name((*name).into());
            l.set_value((*value).into());
            l
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn routes() -> Vec<String> {
        vec!["read".into(), "write".into()]
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn a_request_is_counted_under_its_route_method_class_outcome_and_status_class() {
        let m = Metrics::new(&routes(), false);
        m.request(Some(1), &Method::POST, Outcome::Allowed, 201);
        m.request(Some(1), &Method::POST, Outcome::Allowed, 204);
        m.request(
            Some(0),
            &Method::GET,
            Outcome::Unauthorized(AuthReason::Revoked),
            401,
        );
        m.request(
            None,
            &Method::from_bytes(b"PROPFIND").expect("method"),
            Outcome::NotFound,
            404,
        );
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                r#"keygate_requests_total{method="write",outcome="allowed",reason="none",route="write",status_class="2xx"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"keygate_requests_total{method="read",outcome="unauthorized",reason="revoked",route="read",status_class="4xx"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"keygate_requests_total{method="other",outcome="not_found",reason="none",route="(none)",status_class="4xx"}"#
            ),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn every_outcome_has_its_own_slot() {
        let outcomes = FIXED_OUTCOMES;
        let mut slots: Vec<usize> = (100..=599)
            .step_by(100)
            .map(|s| outcome_slot(Outcome::Allowed, s).0)
            .chain(outcomes.iter().map(|o| outcome_slot(*o, 0).0))
            .collect();
        assert!(slots.iter().all(|s| *s < OUTCOME_SLOTS));
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), OUTCOME_SLOTS);
        // A scrape reads each slot's labels back from the slot alone.
        for (outcome, status) in (100..=599)
            .step_by(100)
            .map(|s| (Outcome::Allowed, s))
            .chain(outcomes.iter().map(|o| (*o, 0)))
        {
            let (slot, status_class) = outcome_slot(outcome, status);
            let (label, reason) = outcome_labels(outcome);
            assert_eq!(
                slot_labels(slot),
                (label, reason, status_class),
                "{outcome:?} {status}"
            );
        }
        // Connect and request failures share the `unreachable` series on purpose.
        assert_eq!(
            outcome_slot(Outcome::UpstreamError(UpstreamFailure::Request), 0),
            outcome_slot(Outcome::UpstreamError(UpstreamFailure::Connect), 0)
        );
    }

    #[test]
    fn two_instances_in_one_process_count_separately() {
        let (a, b) = (
            Metrics::new(&routes(), false),
            Metrics::new(&routes(), false),
        );
        a.request(Some(0), &Method::GET, Outcome::Forbidden, 403);
        a.upstream_error(0, UpstreamFailure::Timeout);
        let forbidden = r#"keygate_requests_total{method="read",outcome="forbidden",reason="insufficient_scope",route="read",status_class="4xx"}"#;
        assert_eq!(sample(&a.render(), forbidden), Some(1.0));
        assert_eq!(sample(&b.render(), forbidden), None);
        let timeouts = r#"keygate_upstream_errors_total{kind="timeout",route="read"}"#;
        assert_eq!(sample(&a.render(), timeouts), Some(1.0));
        assert_eq!(sample(&b.render(), timeouts), Some(0.0));
    }

    #[test]
    fn the_in_flight_gauge_falls_back_when_the_guard_drops() {
        let m = Metrics::new(&routes(), false);
        let guard = m.in_flight();
        assert_eq!(sample(&m.render(), "keygate_requests_in_flight"), Some(1.0));
        drop(guard);
        assert_eq!(sample(&m.render(), "keygate_requests_in_flight"), Some(0.0));
    }

    #[test]
    fn the_per_account_family_exists_only_when_turned_on() {
        let off = Metrics::new(&routes(), false);
        off.account_request("billing", Outcome::Allowed);
        assert!(!off.render().contains("keygate_account_requests_total"));
        let on = Metrics::new(&routes(), true);
        on.account_request("billing", Outcome::Allowed);
        assert_eq!(
            sample(
                &on.render(),
                r#"keygate_account_requests_total{account="billing",outcome="allowed"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn scrape_time_values_come_from_the_table_the_verifier_and_the_queues() {
        let config = Config::default();
        let m = Metrics::new(&routes(), false);
        let table = Arc::new(KeyTable::new());
        let verifier = Arc::new(Verifier::new(&config.verification));
        let clock = Clock::System;
        m.watch(
            table.clone(),
            verifier.clone(),
            Arc::new(Usage::new()),
            clock.clone(),
        );
        assert_eq!(sample(&m.render(), "keygate_table_loaded"), Some(0.0));
        table.mark_synced(clock.now_ms() - 3_000);
        verifier.stats.cache_hits.add(7);
        m.audit_depth.set(5);
        let text = m.render();
        assert_eq!(sample(&text, "keygate_table_loaded"), Some(1.0));
        let age = sample(&text, "keygate_table_age_seconds").expect("age");
        assert!((3.0..10.0).contains(&age), "{age}");
        assert_eq!(
            sample(&text, "keygate_verification_cache_hits_total"),
            Some(7.0)
        );
        assert_eq!(
            sample(&text, r#"keygate_queue_depth{queue="audit"}"#),
            Some(5.0)
        );
        assert_eq!(
            sample(&text, r#"keygate_table_keys{kind="service_account"}"#),
            Some(0.0)
        );
        assert!(text.contains("# TYPE keygate_verification_cache_hits_total counter"));
    }
}
