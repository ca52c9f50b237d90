//! The configuration file as written, with every default, and its conversion into validated
//! types.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::*;
use crate::proxy::canonical_path;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    proxy: RawProxy,
    admin: RawAdmin,
    database: RawDatabase,
    last_used: RawLastUsed,
    hashing: RawHashing,
    verification: RawVerification,
    log: RawLog,
    metrics: RawMetrics,
    gateways: RawGateways,
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    listen: String,
    upstream_timeout: String,
    idle_timeout: String,
    header_read_timeout: String,
    shutdown_grace: String,
    workers: usize,
    shutdown_delay: String,
    tls_handshake_timeout: String,
    max_connections: usize,
    max_header_bytes: usize,
    max_headers: usize,
    h2_max_concurrent_streams: u32,
    h2_max_pending_reset_streams: usize,
    h2_max_local_error_reset_streams: usize,
    tls: Option<RawListenerTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenerTls {
    cert_file: String,
    key_file: String,
    #[serde(default = "default_watch_interval")]
    watch_interval: String,
}

fn default_watch_interval() -> String {
    "5s".into()
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            listen: "127.0.0.1:8080".into(),
            upstream_timeout: "30s".into(),
            idle_timeout: "60s".into(),
            header_read_timeout: "10s".into(),
            shutdown_grace: "30s".into(),
            workers: 0,
            shutdown_delay: "0s".into(),
            tls_handshake_timeout: "10s".into(),
            max_connections: 10_000,
            max_header_bytes: 16_384,
            max_headers: 100,
            h2_max_concurrent_streams: 256,
            h2_max_pending_reset_streams: 20,
            h2_max_local_error_reset_streams: 256,
            tls: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: String,
    secure_cookies: bool,
    session_idle_timeout: String,
    stale_after: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: "127.0.0.1:9090".into(),
            secure_cookies: false,
            session_idle_timeout: "30m".into(),
            stale_after: "30d".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDatabase {
    url: String,
    refresh_interval: String,
    max_connections: u32,
    max_staleness: String,
    heartbeat_interval: String,
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            url: "sqlite://keygate.db".into(),
            refresh_interval: "2s".into(),
            max_connections: 8,
            max_staleness: "none".into(),
            heartbeat_interval: "5s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLastUsed {
    flush_interval: String,
}

impl Default for RawLastUsed {
    fn default() -> Self {
        RawLastUsed {
            flush_interval: "10s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHashing {
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
}

impl Default for RawHashing {
    fn default() -> Self {
        RawHashing {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawVerification {
    cache_ttl: String,
    cache_capacity: u64,
    failure_ttl: String,
    max_concurrent: usize,
    max_pending: usize,
    failure_window: String,
    prefix_failure_budget: u32,
    client_failure_budget: u32,
}

impl Default for RawVerification {
    fn default() -> Self {
        RawVerification {
            cache_ttl: "10m".into(),
            cache_capacity: 100_000,
            failure_ttl: "1m".into(),
            max_concurrent: 0,
            max_pending: 256,
            failure_window: "1m".into(),
            prefix_failure_budget: 10,
            client_failure_budget: 20,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: String,
    filter: String,
    access_log: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            filter: "info".into(),
            access_log: true,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    per_account_labels: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawGateways {
    scopes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    path_prefix: String,
    #[serde(default)]
    methods: Vec<String>,
    upstream: String,
    scope: String,
    #[serde(default)]
    audit: Option<String>,
    ca_file: Option<String>,
    client_cert_file: Option<String>,
    client_key_file: Option<String>,
}

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let p = &self.proxy;
        let proxy = ProxyConfig {
            listen: socket_addr("proxy.listen", &p.listen)?,
            upstream_timeout: duration("proxy.upstream_timeout", &p.upstream_timeout, MS)?,
            idle_timeout: duration("proxy.idle_timeout", &p.idle_timeout, MS)?,
            header_read_timeout: duration("proxy.header_read_timeout", &p.header_read_timeout, MS)?,
            shutdown_grace: duration("proxy.shutdown_grace", &p.shutdown_grace, Duration::ZERO)?,
            workers: if p.workers == 0 {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            } else {
                p.workers
            },
            shutdown_delay: duration("proxy.shutdown_delay", &p.shutdown_delay, Duration::ZERO)?,
            limits: ProxyLimits {
                tls_handshake_timeout: duration(
                    "proxy.tls_handshake_timeout",
                    &p.tls_handshake_timeout,
                    MS,
                )?,
                max_connections: at_least("proxy.max_connections", p.max_connections, 1)?,
                max_header_bytes: max_header_bytes(p.max_header_bytes)?,
                max_headers: at_least("proxy.max_headers", p.max_headers, 8)?,
                h2_max_concurrent_streams: at_least(
                    "proxy.h2_max_concurrent_streams",
                    p.h2_max_concurrent_streams as usize,
                    1,
                )? as u32,
                h2_max_pending_reset_streams: at_least(
                    "proxy.h2_max_pending_reset_streams",
                    p.h2_max_pending_reset_streams,
                    1,
                )?,
                h2_max_local_error_reset_streams: at_least(
                    "proxy.h2_max_local_error_reset_streams",
                    p.h2_max_local_error_reset_streams,
                    1,
                )?,
            },
            tls: match &p.tls {
                None => None,
                Some(t) => Some(ListenerTls {
                    cert_file: file("proxy.tls.cert_file", &t.cert_file)?,
                    key_file: file("proxy.tls.key_file", &t.key_file)?,
                    watch_interval: duration(
                        "proxy.tls.watch_interval",
                        &t.watch_interval,
                        10 * MS,
                    )?,
                }),
            },
        };
        let a = &self.admin;
        let admin = AdminConfig {
            listen: socket_addr("admin.listen", &a.listen)?,
            secure_cookies: a.secure_cookies,
            session_idle_timeout: duration(
                "admin.session_idle_timeout",
                &a.session_idle_timeout,
                Duration::from_secs(1),
            )?,
            stale_after: duration("admin.stale_after", &a.stale_after, Duration::from_secs(1))?,
        };
        if admin.listen == proxy.listen && proxy.listen.port() != 0 {
            return Err(ConfigError::new(
                "admin.listen",
                "must differ from proxy.listen",
            ));
        }

        let d = &self.database;
        let database = DatabaseConfig {
            url: DatabaseUrl::new(d.url.clone())
                .map_err(|m| ConfigError::new("database.url", m))?,
            refresh_interval: duration("database.refresh_interval", &d.refresh_interval, 50 * MS)?,
            max_connections: d.max_connections,
            max_staleness: match d.max_staleness.trim() {
                "none" => None,
                s => Some(duration("database.max_staleness", s, MS)?),
            },
            heartbeat_interval: duration(
                "database.heartbeat_interval",
                &d.heartbeat_interval,
                50 * MS,
            )?,
        };
        if database
            .max_staleness
            .is_some_and(|m| m <= database.refresh_interval)
        {
            return Err(ConfigError::new(
                "database.max_staleness",
                "must be longer than database.refresh_interval (or \"none\")",
            ));
        }
        if database.max_connections == 0 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 1",
            ));
        }

        let flush_interval = duration(
            "last_used.flush_interval",
            &self.last_used.flush_interval,
            50 * MS,
        )?;
        if flush_interval > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "last_used.flush_interval",
                "must be at most 60s, so Last used is never more than a minute behind",
            ));
        }

        let h = &self.hashing;
        let hashing = HashingConfig {
            memory_kib: h.memory_kib,
            iterations: h.iterations,
            parallelism: h.parallelism,
        };
        check_hashing(hashing)?;

        let v = &self.verification;
        let verification = VerificationConfig {
            cache_ttl: duration("verification.cache_ttl", &v.cache_ttl, MS)?,
            cache_capacity: v.cache_capacity.max(1),
            failure_ttl: duration("verification.failure_ttl", &v.failure_ttl, Duration::ZERO)?,
            max_concurrent: if v.max_concurrent == 0 {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            } else {
                v.max_concurrent
            },
            max_pending: v.max_pending,
            failure_window: duration("verification.failure_window", &v.failure_window, MS)?,
            prefix_failure_budget: at_least(
                "verification.prefix_failure_budget",
                v.prefix_failure_budget as usize,
                1,
            )? as u32,
            client_failure_budget: at_least(
                "verification.client_failure_budget",
                v.client_failure_budget as usize,
                1,
            )? as u32,
        };
        if verification.max_pending < verification.max_concurrent {
            return Err(ConfigError::new(
                "verification.max_pending",
                "must be at least verification.max_concurrent",
            ));
        }

        let log = LogConfig {
            format: match self.log.format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError::new(
                        "log.format",
                        format!("`{other}` is not one of: text, json"),
                    ))
                }
            },
            filter: self.log.filter.clone(),
            access_log: self.log.access_log,
        };
        tracing_subscriber::EnvFilter::try_new(&log.filter)
            .map_err(|e| ConfigError::new("log.filter", e.to_string()))?;

        let routes = validate_routes(&self.routes)?;
        let gateways = GatewaysConfig {
            scopes: gateway_scopes(&self.gateways.scopes, &routes)?,
        };
        Ok(Config {
            proxy,
            admin,
            database,
            last_used: LastUsedConfig { flush_interval },
            hashing,
            verification,
            log,
            metrics: MetricsConfig {
                per_account_labels: self.metrics.per_account_labels,
            },
            gateways,
            routes,
            ignored_env: Vec::new(),
            warnings: weak_hashing(hashing).into_iter().collect(),
        })
    }
}

const MS: Duration = Duration::from_millis(1);

fn duration(path: &str, s: &str, min: Duration) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        ConfigError::new(
            path,
            format!("`{s}` is not a duration ({e}); examples: 500ms, 2s, 10m"),
        )
    })?;
    if d < min {
        return Err(ConfigError::new(
            path,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(d)
}

/// `proxy.max_header_bytes`: HTTP/1.1 heads are bounded by hyper's read buffer, which cannot
/// be smaller than 8192 bytes, so a lower limit could not be enforced (and would be a lie).
fn max_header_bytes(n: usize) -> Result<usize, ConfigError> {
    const MIN: usize = 8192;
    if n < MIN {
        return Err(ConfigError::new(
            "proxy.max_header_bytes",
            format!(
                "must be at least {MIN}: HTTP/1.1 heads are read into a buffer that cannot be \
                 smaller, so a lower limit could not be enforced"
            ),
        ));
    }
    Ok(n)
}

fn at_least(path: &str, n: usize, min: usize) -> Result<usize, ConfigError> {
    if n < min {
        return Err(ConfigError::new(path, format!("must be at least {min}")));
    }
    Ok(n)
}

fn file(path: &str, s: &str) -> Result<PathBuf, ConfigError> {
    if s.trim().is_empty() {
        return Err(ConfigError::new(path, "must name a file"));
    }
    Ok(PathBuf::from(s))
}

/// argon2's own limits, each reported at its setting; argon2 checks the rest.
fn check_hashing(h: HashingConfig) -> Result<(), ConfigError> {
    use argon2::Params;
    if !(Params::MIN_P_COST..=Params::MAX_P_COST).contains(&h.parallelism) {
        return Err(ConfigError::new(
            "hashing.parallelism",
            format!(
                "must be {} to {} lanes",
                Params::MIN_P_COST,
                Params::MAX_P_COST
            ),
        ));
    }
    if h.iterations < Params::MIN_T_COST {
        return Err(ConfigError::new(
            "hashing.iterations",
            format!("must be at least {}", Params::MIN_T_COST),
        ));
    }
    let min_memory = Params::MIN_M_COST.max(8 * h.parallelism);
    if h.memory_kib < min_memory {
        return Err(ConfigError::new(
            "hashing.memory_kib",
            format!(
                "must be at least {min_memory} (argon2 needs 8 KiB per lane; parallelism = {})",
                h.parallelism
            ),
        ));
    }
    crate::keys::hasher(h)
        .map(drop)
        .map_err(|m| ConfigError::new("hashing", m))
}

/// OWASP's minimum argon2id costs (Password Storage Cheat Sheet), as equivalent pairs of
/// memory (KiB) and iterations with one lane; keygate's default is the second.
const OWASP_ARGON2ID: [(u32, u32); 5] = [
    (47_104, 1),
    (19_456, 2),
    (12_288, 3),
    (9_216, 4),
    (7_168, 5),
];

/// A warning when new key hashes would be cheaper than OWASP's minimum. Not refused: tests and
/// development machines run on cheap parameters on purpose.
fn weak_hashing(h: HashingConfig) -> Option<String> {
    if OWASP_ARGON2ID
        .iter()
        .any(|&(memory, iterations)| h.memory_kib >= memory && h.iterations >= iterations)
    {
        return None;
    }
    Some(format!(
        "hashing.memory_kib = {} with hashing.iterations = {} is below OWASP's minimum for \
         argon2id (19456 KiB with 2 iterations, or 47104/1, 12288/3, 9216/4, 7168/5): new key \
         hashes are cheaper to brute-force than recommended",
        h.memory_kib, h.iterations
    ))
}

fn socket_addr(path: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError::new(
            path,
            format!("`{s}` is not an IP:port address, e.g. 127.0.0.1:8080"),
        )
    })
}

/// Gateway scopes must be scopes, and (when routes exist) ones some route requires, so a typo
/// cannot pair gateways with a key that is silently narrower than intended.
fn gateway_scopes(raw: &[String], routes: &[RouteConfig]) -> Result<Scopes, ConfigError> {
    let mut scopes = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let at = format!("gateways.scopes[{i}]");
        let scope = Scope::new(s).map_err(|m| ConfigError::new(&at, m))?;
        if !routes.is_empty() && !routes.iter().any(|r| r.scope == scope) {
            return Err(ConfigError::new(
                at,
                format!("no configured route requires scope `{s}`"),
            ));
        }
        scopes.push(scope);
    }
    Ok(Scopes::new(scopes))
}

fn validate_routes(raw: &[RawRoute]) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut names = HashSet::new();
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let at = |field: &str| format!("routes[{i}].{field}");
        if r.name.is_empty()
            || r.name.len() > 64
            || !r
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(ConfigError::new(
                at("name"),
                "must be 1-64 characters of A-Z a-z 0-9 _ . -",
            ));
        }
        if !names.insert(r.name.as_str()) {
            return Err(ConfigError::new(
                at("name"),
                format!("`{}` is used by another route", r.name),
            ));
        }
        let path_prefix =
            route_prefix(&r.path_prefix).map_err(|m| ConfigError::new(at("path_prefix"), m))?;
        let mut methods = Vec::with_capacity(r.methods.len());
        for (j, m) in r.methods.iter().enumerate() {
            let method = http::Method::from_bytes(m.as_bytes())
                .ok()
                .filter(|_| !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()))
                .ok_or_else(|| {
                    ConfigError::new(
                        format!("routes[{i}].methods[{j}]"),
                        format!("`{m}` is not an upper-case HTTP method"),
                    )
                })?;
            methods.push(method);
        }
        let upstream = upstream(&r.upstream).map_err(|m| ConfigError::new(at("upstream"), m))?;
        let scope = Scope::new(&r.scope).map_err(|m| ConfigError::new(at("scope"), m))?;
        let audit = match r.audit.as_deref() {
            None | Some("writes") => AuditMode::Writes,
            Some("none") => AuditMode::None,
            Some("all") => AuditMode::All,
            Some(other) => {
                return Err(ConfigError::new(
                    at("audit"),
                    format!("`{other}` is not one of: none, writes, all"),
                ))
            }
        };
        let tls = upstream_tls(r, &upstream, &at)?;
        let route = RouteConfig {
            name: r.name.clone(),
            path_prefix,
            methods,
            upstream,
            scope,
            audit,
            tls,
        };
        if let Some(other) = routes
            .iter()
            .find(|o| o.path_prefix == route.path_prefix && methods_overlap(o, &route))
        {
            return Err(ConfigError::new(
                at("path_prefix"),
                format!(
                    "`{}` with these methods is already routed by `{}`",
                    route.path_prefix, other.name
                ),
            ));
        }
        routes.push(route);
    }
    Ok(routes)
}

fn methods_overlap(a: &RouteConfig, b: &RouteConfig) -> bool {
    a.methods.is_empty() || b.methods.is_empty() || a.methods.iter().any(|m| b.methods.contains(m))
}

fn route_prefix(s: &str) -> Result<String, String> {
    if canonical_path(s.as_bytes()).is_err() {
        return Err(format!(
            "`{s}` must start with / and contain no //, /./, /../, encoded . / \\ or control characters"
        ));
    }
    if s.contains('?') || s.contains('#') {
        return Err(format!("`{s}` must be a path without query or fragment"));
    }
    let trimmed = s.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

fn upstream(s: &str) -> Result<Upstream, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("`{s}` is not a URL ({e})"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("`{s}` needs a scheme: http://HOST:PORT"))?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(format!(
            "`{s}`: only http:// and https:// upstreams are supported"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{s}` needs a host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("`{s}` must not carry credentials"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "`{s}` must be an origin (scheme, host, port) without a path: requests keep their own path"
        ));
    }
    Ok(Upstream { scheme, authority })
}

fn upstream_tls(
    r: &RawRoute,
    upstream: &Upstream,
    at: &dyn Fn(&str) -> String,
) -> Result<UpstreamTls, ConfigError> {
    let https = upstream.scheme == http::uri::Scheme::HTTPS;
    for (field, value) in [
        ("ca_file", &r.ca_file),
        ("client_cert_file", &r.client_cert_file),
        ("client_key_file", &r.client_key_file),
    ] {
        if value.is_some() && !https {
            return Err(ConfigError::new(
                at(field),
                "only applies to an https:// upstream",
            ));
        }
    }
    let ca_file = match &r.ca_file {
        Some(f) => Some(file(&at("ca_file"), f)?),
        None => None,
    };
    let client_cert = match (&r.client_cert_file, &r.client_key_file) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((
            file(&at("client_cert_file"), c)?,
            file(&at("client_key_file"), k)?,
        )),
        (Some(_), None) => {
            return Err(ConfigError::new(
                at("client_key_file"),
                "is required with client_cert_file",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                at("client_cert_file"),
                "is required with client_key_file",
            ))
        }
    };
    Ok(UpstreamTls {
        ca_file,
        client_cert,
    })
}
