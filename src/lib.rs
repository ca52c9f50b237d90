//! keygate: an API-key authentication sidecar and reverse proxy.
//!
//! keygate sits in front of an upstream HTTP service, checks the API key on every request
//! against an in-memory table of argon2id key hashes, enforces a scope per route, and forwards
//! allowed traffic with the key removed and trusted identity headers added.
//!
//! Layout (dependencies point downwards only):
//!
//! ```text
//! cli        command-line front end (serve, migrate, config, account, key, user, gateway)
//! server     starts and stops one keygate instance: listeners, background tasks, drain
//! tls        rustls: the listener's reloadable certificate, https upstream client config
//! proxy      data plane: the request pipeline, routing, header rules, upstream client
//! admin      control-plane listener: health, readiness, metrics, the console and its JSON API,
//!            sessions, the fleet list
//! manage     control-plane operations shared by the CLI and the admin API (issue, revoke,
//!            replace, users, gateway pairing)
//! sync       keeps the in-memory key table in step with the database (NOTIFY + refresh)
//! fleet      sidecar heartbeats: who runs, and how current each key table is
//! usage      last-used stamping, batched off the request path
//! audit      proxied-request audit records, batched off the request path
//! store      the only module that talks to a database (SQLite or PostgreSQL)
//! keys       pure: key format, hashing, the key table, verification with its cache
//! config     file and environment → validated configuration
//! metrics    Prometheus metrics of one instance, with its own registry
//! clock      wall-clock time, injectable for tests
//! telemetry  tracing setup
//! ```

pub mod admin;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod fleet;
pub mod keys;
pub mod manage;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod shard;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod usage;
