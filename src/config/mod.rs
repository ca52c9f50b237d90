//! Configuration: a TOML file and `KEYGATE_*` environment variables, read into raw serde types
//! that reject unknown keys, then converted once into validated types. Every error names the
//! exact setting that is wrong (`routes[1].upstream: ...`).

mod env;
mod raw;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;

use crate::keys::{Scope, Scopes};

/// A fully validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub database: DatabaseConfig,
    pub last_used: LastUsedConfig,
    pub hashing: HashingConfig,
    pub verification: VerificationConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub gateways: GatewaysConfig,
    pub routes: Vec<RouteConfig>,
    /// `KEYGATE_*` variables skipped because they have the shape of Kubernetes service links
    /// (`KEYGATE_PORT=tcp://...` for a Service named `keygate`); `serve` logs them at debug.
    pub ignored_env: Vec<String>,
    /// Settings that are valid but unwise, each a line naming the setting; `serve` logs them
    /// as warnings and `config check` prints them.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Longest wait for the upstream's response head; past it the client gets 504.
    pub upstream_timeout: Duration,
    /// Longest silence inside a streaming body, either direction. There is deliberately no
    /// total timeout: exports and event feeds may run for hours.
    pub idle_timeout: Duration,
    /// Longest time a client may take to send its request head (slowloris guard).
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run on after a stop signal.
    pub shutdown_grace: Duration,
    /// Proxy worker threads, each running its own event loop and upstream pool.
    pub workers: usize,
    /// After a stop signal, how long to keep serving while `/readyz` already says not-ready, so
    /// load balancers (Kubernetes endpoints) stop sending before the listener closes.
    pub shutdown_delay: Duration,
    /// Connection and request-size caps (hostile traffic).
    pub limits: ProxyLimits,
    /// TLS on the proxy listener; plain HTTP when `None`.
    pub tls: Option<ListenerTls>,
}

/// Caps that keep one client from costing keygate unbounded memory, CPU or sockets.
#[derive(Clone, Debug)]
pub struct ProxyLimits {
    /// rustls sets no deadline on a handshake; a silent client would hold a socket forever.
    pub tls_handshake_timeout: Duration,
    /// Open client connections; past it keygate stops accepting until one closes.
    pub max_connections: usize,
    /// Request line plus headers (HTTP/1.1), header list (HTTP/2); past it: 431.
    pub max_header_bytes: usize,
    /// Header fields per request (HTTP/1.1); past it: 431.
    pub max_headers: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client before keygate accepted them (rapid reset,
    /// CVE-2023-44487); past it the connection gets GOAWAY.
    pub h2_max_pending_reset_streams: usize,
    /// HTTP/2 streams keygate had to reset for protocol errors; past it: GOAWAY.
    pub h2_max_local_error_reset_streams: usize,
}

/// PEM files for the proxy listener's certificate, re-read when they change.
#[derive(Clone, Debug)]
pub struct ListenerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// How often the files' modification times are checked.
    pub watch_interval: Duration,
}

/// TLS towards one `https://` upstream. Hostname verification has no switch on purpose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain and key keygate presents to the upstream (mTLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Mark the console's session cookie `Secure` (serve the admin listener behind TLS).
    pub secure_cookies: bool,
    /// A console session unused this long ends; the next request must log in again.
    pub session_idle_timeout: Duration,
    /// Keys unused this long are flagged as stale in the console and the API.
    pub stale_after: Duration,
}

#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub url: DatabaseUrl,
    pub refresh_interval: Duration,
    pub max_connections: u32,
    /// Past this table age while the database is away, fail closed (proxy and `/readyz` answer
    /// 503); `None` serves the last table for as long as it takes.
    pub max_staleness: Option<Duration>,
    /// How often this sidecar records its heartbeat row.
    pub heartbeat_interval: Duration,
}

#[derive(Clone, Debug)]
pub struct LastUsedConfig {
    pub flush_interval: Duration,
}

/// argon2id cost parameters for key hashes (OWASP's minimum by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashingConfig {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

#[derive(Clone, Debug)]
pub struct VerificationConfig {
    /// How long a successful argon2 verification is remembered (idle time).
    pub cache_ttl: Duration,
    pub cache_capacity: u64,
    /// How long a failed verification is remembered, so a repeated wrong key costs no argon2.
    pub failure_ttl: Duration,
    /// argon2 verifications running at once (each holds a CPU and `hashing.memory_kib`).
    pub max_concurrent: usize,
    /// Verifications allowed to wait or run; beyond it a request gets 503 with Retry-After.
    pub max_pending: usize,
    /// Failed argon2 verifications counted per key prefix and per client address over this
    /// window; a spent budget answers 429 with Retry-After until the window ends.
    pub failure_window: Duration,
    /// Failed verifications one key prefix may cost per window (prefixes are public).
    pub prefix_failure_budget: u32,
    /// Failed verifications one client address may cost per window.
    pub client_failure_budget: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` itself wins when set.
    pub filter: String,
    /// One info line per proxied request.
    pub access_log: bool,
}

#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Adds `keygate_account_requests_total{account=...}`: one series per account and outcome,
    /// so off by default (cardinality grows with the number of accounts).
    pub per_account_labels: bool,
}

/// `[gateways]`: what a paired gateway's key may do.
#[derive(Clone, Debug, Default)]
pub struct GatewaysConfig {
    /// The scopes every gateway key carries, set at pairing and re-pairing. Empty: pairing is
    /// refused, since a key that grants nothing only looks like it works.
    pub scopes: Scopes,
}

/// One `[[routes]]` entry.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub name: String,
    /// Canonical, without a trailing slash (except the root `/`).
    pub path_prefix: String,
    /// Empty means every method.
    pub methods: Vec<Method>,
    pub upstream: Upstream,
    pub scope: Scope,
    /// Only for `https://` upstreams.
    pub tls: UpstreamTls,
    /// Which proxied requests by service accounts are written to the audit log.
    pub audit: AuditMode,
}

/// A route's `audit` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuditMode {
    None,
    /// State-changing methods only (everything but GET, HEAD, OPTIONS, TRACE).
    #[default]
    Writes,
    All,
}

impl AuditMode {
    /// Whether a request with `method` is audited on this route.
    pub fn covers(self, method: &Method) -> bool {
        match self {
            AuditMode::None => false,
            AuditMode::All => true,
            AuditMode::Writes => !matches!(
                *method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            ),
        }
    }
}

/// An upstream origin: scheme, host and port, no path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// A database URL whose password never reaches a log or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Result<Self, String> {
        let url = url.into();
        if url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://")
        {
            Ok(DatabaseUrl(url))
        } else {
            Err(format!(
                "`{}` is not a supported database URL; use sqlite://PATH or postgres://USER@HOST/DB",
                DatabaseUrl(url)
            ))
        }
    }

    /// The URL with its password; only for handing to the driver.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_postgres(&self) -> bool {
        self.0.starts_with("postgres")
    }
}

impl fmt::Display for DatabaseUrl {
    /// Shows the URL with any password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.0;
        if let (Some(scheme_end), Some(at)) = (s.find("://"), s.rfind('@')) {
            let userinfo = &s[scheme_end + 3..at];
            if let Some(colon) = userinfo.find(':') {
                return write!(
                    f,
                    "{}{}:***{}",
                    &s[..scheme_end + 3],
                    &userinfo[..colon],
                    &s[at..]
                );
            }
        }
        f.write_str(s)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// A configuration problem, naming the setting (`path`) it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl Config {
    /// Reads `path` (or starts from the defaults when `None`), applies `KEYGATE_*` variables from
    /// `env`, and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| {
                ConfigError::new(p.display().to_string(), format!("cannot read: {e}"))
            })?,
            None => String::new(),
        };
        let origin = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config".into());
        Config::from_toml(&text, &origin, env)
    }

    /// Opens every TLS file the configuration names and parses it as `serve` will, so a
    /// missing or malformed file fails `config check` and the start with its setting's path
    /// (`routes[0].ca_file: /etc/ca.pem: cannot read: ...`). `serve`, `config check` and a
    /// SIGHUP reload call it; the key and account commands, which use no TLS file, do not (an
    /// operator may run them without read access to the listener's key).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        use crate::tls::{check_certs, check_key, check_pair};
        let named =
            |path: String| move |e: crate::tls::TlsError| ConfigError::new(path, e.to_string());
        if let Some(t) = &self.proxy.tls {
            check_certs(&t.cert_file).map_err(named("proxy.tls.cert_file".into()))?;
            check_key(&t.key_file).map_err(named("proxy.tls.key_file".into()))?;
            check_pair(&t.cert_file, &t.key_file).map_err(named("proxy.tls.key_file".into()))?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            let at = |field: &str| format!("routes[{i}].{field}");
            if let Some(ca) = &r.tls.ca_file {
                check_certs(ca).map_err(named(at("ca_file")))?;
            }
            if let Some((cert, key)) = &r.tls.client_cert {
                check_certs(cert).map_err(named(at("client_cert_file")))?;
                check_key(key).map_err(named(at("client_key_file")))?;
                check_pair(cert, key).map_err(named(at("client_key_file")))?;
            }
        }
        Ok(())
    }

    /// Parses TOML text (`origin` names it in errors) with environment overrides applied.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            ConfigError::new(origin, e.message().to_string() + &location(text, e.span()))
        })?;
        let ignored_env = env::apply_env(&mut table, env)?;
        let raw: raw::RawConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::new(e.path().to_string(), e.inner().message().to_string()))?;
        let mut config = raw.validate()?;
        config.ignored_env = ignored_env;
        Ok(config)
    }

    /// The scopes the configured routes require, sorted and unique: what a key can usefully hold.
    pub fn route_scopes(&self) -> Vec<Scope> {
        let mut scopes: Vec<Scope> = self.routes.iter().map(|r| r.scope.clone()).collect();
        scopes.sort();
        scopes.dedup();
        scopes
    }
}

impl Default for Config {
    fn default() -> Self {
        // The empty document is valid by construction: every setting has a default.
        Config::from_toml("", "defaults", std::iter::empty()).expect("defaults are valid")
    }
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests;
