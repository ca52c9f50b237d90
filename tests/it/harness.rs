//! The test harness: a fresh database per test (a SQLite file in a temporary directory, or a new
//! PostgreSQL database dropped afterwards), a real recording upstream on a real port, and
//! keygate itself on port 0 with typed helpers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::clock::Clock;
use keygate::config::Config;
use keygate::manage::{Actor, IssuedKey, Manager};
use keygate::server::{self, Keygate};
use keygate::store::{Account, Store};
use tokio::net::TcpListener;

/// Which database engine a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// Runs the same async test body once per engine, as `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! both_engines {
    ($(#[$meta:meta])* async fn $name:ident($engine:ident: Engine) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn body($engine: $crate::harness::Engine) $body
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() { body($crate::harness::Engine::Sqlite).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() { body($crate::harness::Engine::Postgres).await }
        }
    };
}

/// The PostgreSQL server tests create their databases on.
pub fn pg_admin_url() -> String {
    std::env::var("KEYGATE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(engine: Engine) -> TestDb {
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
                TestDb {
                    url,
                    _dir: Some(dir),
                    pg_name: None,
                }
            }
            Engine::Postgres => {
                let name = format!("keygate_test_{}", random_hex(8));
                let admin = sqlx::PgPool::connect(&pg_admin_url()).await.expect(
                    "PostgreSQL must be reachable for the postgres tests (set KEYGATE_TEST_PG_URL to point elsewhere)",
                );
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&admin)
                    .await
                    .expect("create test database");
                admin.close().await;
                let base = pg_admin_url();
                let url = format!(
                    "{}/{name}",
                    &base[..base.rfind('/').expect("url has a path")]
                );
                TestDb {
                    url,
                    _dir: None,
                    pg_name: Some(name),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            // Drop runs outside async context: use a small runtime of our own on a thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    if let Ok(admin) = sqlx::PgPool::connect(&pg_admin_url()).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&admin)
                                .await;
                        admin.close().await;
                    }
                });
            })
            .join();
        }
    }
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::getrandom(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: u64,
    /// The body ended in an error (aborted or malformed) rather than cleanly.
    pub body_error: bool,
    /// Trailer fields, when the body carried any.
    pub trailers: Option<HeaderMap>,
}

/// A real HTTP server on a real port that records every request it gets. Paths:
/// `/…/download?bytes=N` streams N bytes back; `/…/slow?ms=N` answers after N ms; anything
/// else answers 200 `upstream ok` after reading (and counting) the whole body.
pub struct Upstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Recorded>>>,
    /// TCP connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// TCP connections still open.
    open: Arc<std::sync::atomic::AtomicUsize>,
    /// Told: finish what is in progress on each open connection, then close it.
    closing: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let received: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let open: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let closing = Arc::new(tokio::sync::Notify::new());
        let log = received.clone();
        let (accepted, still_open, told) = (connections.clone(), open.clone(), closing.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                still_open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (log, still_open, told) = (log.clone(), still_open.clone(), told.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(upstream_answer(req, log).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = told.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                    still_open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        Upstream {
            addr,
            received,
            connections,
            open,
            closing,
            task,
        }
    }

    /// Closes every connection once what is in progress on it is answered, as an upstream
    /// does when its keep-alive timeout ends or it restarts; an idle one closes at once.
    pub fn close_connections(&self) {
        self.closing.notify_waiters();
    }

    /// TCP connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.received.lock().expect("lock").clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received a request")
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.received.lock().expect("lock").len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_number(uri: &http::Uri, name: &str) -> u64 {
    uri.query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn upstream_answer(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<Recorded>>>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let (parts, mut body) = req.into_parts();
    let mut body_len = 0u64;
    let mut body_error = false;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                body_len += f.data_ref().map(|d| d.len() as u64).unwrap_or(0);
                if let Some(t) = f.trailers_ref() {
                    trailers = Some(t.clone());
                }
            }
            Err(_) => {
                body_error = true;
                break;
            }
        }
    }
    log.lock().expect("lock").push(Recorded {
        method: parts.method.clone(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body_len,
        body_error,
        trailers,
    });
    let path = parts.uri.path();
    if path.ends_with("/download") {
        let n = query_number(&parts.uri, "bytes");
        return Response::new(ZeroBody::new(n).boxed());
    }
    if path.ends_with("/close") {
        return Response::builder()
            .header("connection", "close")
            .body(Full::new(Bytes::from_static(b"closing")).boxed())
            .expect("response");
    }
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_millis(query_number(&parts.uri, "ms"))).await;
    }
    Response::builder()
        .header("x-upstream-received-bytes", body_len.to_string())
        .header("connection", "x-upstream-private")
        .header("x-upstream-private", "hop")
        .body(Full::new(Bytes::from_static(b"upstream ok")).boxed())
        .expect("response")
}

/// A body of N zero bytes produced lazily in 64 KiB frames (no N-sized buffer anywhere).
pub struct ZeroBody {
    left: u64,
    chunk: Bytes,
}

impl ZeroBody {
    pub fn new(n: u64) -> Self {
        ZeroBody {
            left: n,
            chunk: Bytes::from(vec![0u8; 64 * 1024]),
        }
    }
}

impl Body for ZeroBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        let data = self.chunk.slice(..n);
        std::task::Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// A client response with its body read.
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub type TestClient = Client<HttpConnector, BoxBody<Bytes, Infallible>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// Options for one test instance.
pub struct AppOptions {
    pub clock: Clock,
    /// Extra TOML appended to the generated configuration (more routes, other settings).
    pub extra_toml: String,
    pub refresh_interval: &'static str,
    pub flush_interval: &'static str,
    pub upstream_timeout: &'static str,
    /// `[database] heartbeat_interval`.
    pub heartbeat_interval: &'static str,
    /// `[database] max_staleness` ("none" or a duration).
    pub max_staleness: &'static str,
    /// Extra settings inside `[proxy]` (limits and timeouts).
    pub proxy_toml: String,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            clock: Clock::System,
            extra_toml: String::new(),
            refresh_interval: "100ms",
            flush_interval: "200ms",
            upstream_timeout: "5s",
            heartbeat_interval: "200ms",
            max_staleness: "none",
            proxy_toml: String::new(),
        }
    }
}

/// keygate running against a fresh database in front of a recording upstream.
pub struct TestApp {
    pub keygate: Option<Keygate>,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub upstream: Upstream,
    pub manager: Manager,
    pub client: TestClient,
    /// Kept so the database outlives the instance.
    _db: TestDb,
}

/// The standard routes: `/recordings` (GET: recordings:read; POST: recordings:write) and
/// `/tickets` (tickets:write), all to the test's upstream.
pub fn standard_routes(upstream: SocketAddr) -> String {
    format!(
        r#"
[[routes]]
name = "recordings-read"
path_prefix = "/recordings"
methods = ["GET", "HEAD"]
upstream = "http://{upstream}"
scope = "recordings:read"

[[routes]]
name = "recordings-write"
path_prefix = "/recordings"
methods = ["POST", "PUT"]
upstream = "http://{upstream}"
scope = "recordings:write"

[[routes]]
name = "tickets"
path_prefix = "/tickets"
upstream = "http://{upstream}"
scope = "tickets:write"
"#
    )
}

/// The configuration text a test instance runs with.
pub fn test_config_toml(db_url: &str, upstream: SocketAddr, opts: &AppOptions) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream_timeout = "{upstream_timeout}"
idle_timeout = "5s"
shutdown_grace = "5s"
{proxy_extra}

[admin]
listen = "127.0.0.1:0"

[database]
url = "{db_url}"
refresh_interval = "{refresh}"
max_connections = 4
heartbeat_interval = "{heartbeat}"
max_staleness = "{max_staleness}"

[last_used]
flush_interval = "{flush}"

[hashing]
memory_kib = 1024
iterations = 1
parallelism = 1

{extra}
{routes}
"#,
        upstream_timeout = opts.upstream_timeout,
        refresh = opts.refresh_interval,
        flush = opts.flush_interval,
        heartbeat = opts.heartbeat_interval,
        max_staleness = opts.max_staleness,
        extra = opts.extra_toml,
        proxy_extra = opts.proxy_toml,
        routes = standard_routes(upstream),
    )
}

pub async fn spawn_app(engine: Engine) -> TestApp {
    spawn_app_with(engine, AppOptions::default()).await
}

pub async fn spawn_app_with(engine: Engine, opts: AppOptions) -> TestApp {
    let db = TestDb::new(engine).await;
    let upstream = Upstream::start().await;
    spawn_on(db, upstream, opts).await
}

/// Starts one keygate instance on `db_url` (which may lead through a relay) in front of
/// `upstream`, without waiting for it to be ready.
pub async fn start_keygate(db_url: &str, upstream: SocketAddr, opts: &AppOptions) -> Keygate {
    let toml = test_config_toml(db_url, upstream, opts);
    let config =
        Config::from_toml(&toml, "test", std::iter::empty()).expect("test config is valid");
    let (proxy, admin) = server::bind(&config).await.expect("bind");
    server::start(&config, proxy, admin, opts.clock.clone())
        .await
        .expect("keygate starts")
}

/// A manager writing straight to `db_url` (migrating it first), as an operator's CLI would.
pub async fn manager_for(db_url: &str) -> Manager {
    let url = keygate::config::DatabaseUrl::new(db_url).expect("url");
    let store = Store::connect(&url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    let hashing = keygate::config::HashingConfig {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    };
    Manager::new(store, hashing, Clock::System).expect("manager")
}

/// Starts keygate on an existing database and upstream (several instances may share both).
pub async fn spawn_on(db: TestDb, upstream: Upstream, opts: AppOptions) -> TestApp {
    let toml = test_config_toml(&db.url, upstream.addr, &opts);
    let config =
        Config::from_toml(&toml, "test", std::iter::empty()).expect("test config is valid");
    let (proxy, admin) = server::bind(&config).await.expect("bind");
    let keygate = server::start(&config, proxy, admin, opts.clock.clone())
        .await
        .expect("keygate starts");
    assert!(
        keygate.ready(Duration::from_secs(10)).await,
        "key table loads"
    );
    let store = Store::connect(&config.database.url, 2)
        .await
        .expect("store");
    let manager = Manager::new(store, config.hashing, opts.clock.clone()).expect("manager");
    TestApp {
        proxy_addr: keygate.proxy_addr,
        admin_addr: keygate.admin_addr,
        keygate: Some(keygate),
        upstream,
        manager,
        client: client(),
        _db: db,
    }
}

impl TestApp {
    pub async fn create_account(&self, name: &str) -> Account {
        self.manager
            .create_account(name, "", &Actor::cli())
            .await
            .expect("create account")
    }

    pub async fn create_key(&self, account: &Account, name: &str, scopes: &[&str]) -> IssuedKey {
        self.create_key_expiring(account, name, scopes, None).await
    }

    pub async fn create_key_expiring(
        &self,
        account: &Account,
        name: &str,
        scopes: &[&str],
        expires_at: Option<i64>,
    ) -> IssuedKey {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let issued = self
            .manager
            .issue_key(account, name, &scopes, expires_at, &Actor::cli())
            .await
            .expect("issue key");
        self.wait_for_key(issued.key.prefix().as_str()).await;
        issued
    }

    /// Waits until the key table knows `prefix` (the refresh has picked the key up).
    pub async fn wait_for_key(&self, prefix: &str) {
        let p = keygate::keys::KeyPrefix::parse(prefix).expect("prefix");
        let table = self.keygate.as_ref().expect("running").table.clone();
        wait_until(Duration::from_secs(5), || table.lookup(&p).is_some()).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy_addr, path)
    }

    /// GET through the proxy with the key as a bearer token (or no key).
    pub async fn get(&self, path: &str, key: Option<&str>) -> TestResponse {
        let mut req = Request::get(self.url(path));
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        self.send(req.body(empty()).expect("request")).await
    }

    pub async fn send(&self, req: Request<BoxBody<Bytes, Infallible>>) -> TestResponse {
        send_with(&self.client, req).await
    }

    pub async fn admin_get(&self, path: &str) -> TestResponse {
        let req = Request::get(format!("http://{}{}", self.admin_addr, path))
            .body(empty())
            .expect("request");
        self.send(req).await
    }

    pub async fn shutdown(&mut self) {
        if let Some(k) = self.keygate.take() {
            k.shutdown().await;
        }
    }
}

pub fn empty() -> BoxBody<Bytes, Infallible> {
    Full::new(Bytes::new()).boxed()
}

pub fn full(b: impl Into<Bytes>) -> BoxBody<Bytes, Infallible> {
    Full::new(b.into()).boxed()
}

pub async fn send_with(
    client: &TestClient,
    req: Request<BoxBody<Bytes, Infallible>>,
) -> TestResponse {
    let response = client.request(req).await.expect("request reaches keygate");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    TestResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Polls `check` every 10 ms until it holds, failing the test after `limit`.
pub async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// One HTTP/1.1 connection to `addr`, for tests that care which connection requests travel on.
pub async fn one_connection(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<BoxBody<Bytes, Infallible>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Sends `req` on a connection from `one_connection` and reads the whole response.
pub async fn send_on(
    sender: &mut hyper::client::conn::http1::SendRequest<BoxBody<Bytes, Infallible>>,
    req: Request<BoxBody<Bytes, Infallible>>,
) -> TestResponse {
    sender.ready().await.expect("connection ready");
    let response = sender.send_request(req).await.expect("response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    TestResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A child's stderr, read as it is written: a child whose pipe nobody reads blocks on its own
/// logging once the pipe is full (64 KiB), which a chatty `RUST_LOG` reaches in seconds on a
/// busy machine.
pub struct ChildLogs(Option<std::thread::JoinHandle<String>>);

impl ChildLogs {
    /// Takes over `child`'s piped stderr.
    pub fn read(child: &mut std::process::Child) -> ChildLogs {
        let pipe = child.stderr.take();
        ChildLogs(Some(std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                use std::io::Read;
                let _ = pipe.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })))
    }

    /// Everything the child wrote; call once it has exited.
    pub fn collect(&mut self) -> String {
        self.0
            .take()
            .map(|reader| reader.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

/// `keygate serve` as a child process with its stderr captured.
pub struct Binary {
    child: Child,
    logs: ChildLogs,
    pub proxy: u16,
    pub admin: u16,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

/// The status `/readyz` answers on admin port `admin`, if it answers.
pub async fn readyz(admin: u16) -> Option<u16> {
    let req = http::Request::get(format!("http://127.0.0.1:{admin}/readyz"))
        .body(empty())
        .expect("req");
    client()
        .request(req)
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// A port free a moment ago, for a child process to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Binary {
    /// Starts `keygate serve` with a configuration file that `text` makes of a proxy and an admin
    /// port, and waits (up to 20 s) until it answers 200 on `/readyz`. The ports were free a
    /// moment before; when another process took one first, the child exits saying it cannot bind,
    /// and it is started again on two new ports (three tries in all). Any other exit, or no
    /// readiness in 20 s, panics with the child's stderr.
    pub async fn serve(
        text: impl Fn(u16, u16) -> String,
        args: &[&str],
        rust_log: Option<&str>,
    ) -> Binary {
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("keygate.toml");
        for attempt in 1..=3 {
            let (proxy, admin) = (free_port(), free_port());
            std::fs::write(&config, text(proxy, admin)).expect("write config");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
            cmd.arg("--config").arg(&config).args(args).arg("serve");
            match rust_log {
                Some(filter) => cmd.env("RUST_LOG", filter),
                None => cmd.env_remove("RUST_LOG"),
            };
            let mut child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn keygate serve");
            let mut logs = ChildLogs::read(&mut child);
            let started = Instant::now();
            loop {
                // Ready only while the child runs: another process may hold the admin port.
                let ready = readyz(admin).await == Some(200);
                if child.try_wait().expect("wait").is_some() {
                    let err = logs.collect();
                    assert!(
                        err.contains("cannot bind") && attempt < 3,
                        "keygate serve exited before it was ready:\n{err}"
                    );
                    break;
                }
                if ready {
                    return Binary {
                        child,
                        logs,
                        proxy,
                        admin,
                        config,
                        _dir: dir,
                    };
                }
                if started.elapsed() > Duration::from_secs(20) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "keygate serve did not become ready in 20 s:\n{}",
                        logs.collect()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        unreachable!("the third failed start panics")
    }

    /// `serve` with the suite's usual configuration: fast refresh and flush, cheap hashing, the
    /// standard routes to `upstream`, and `extra` appended.
    pub async fn start(
        db_url: &str,
        upstream: std::net::SocketAddr,
        extra: &str,
        args: &[&str],
        rust_log: Option<&str>,
    ) -> Binary {
        let text = |proxy: u16, admin: u16| {
            format!(
                "[proxy]\nlisten = \"127.0.0.1:{proxy}\"\nshutdown_grace = \"5s\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 [database]\nurl = \"{db_url}\"\nrefresh_interval = \"100ms\"\n[last_used]\nflush_interval = \"200ms\"\n\
                 [hashing]\nmemory_kib = 1024\niterations = 1\n{extra}\n{}",
                standard_routes(upstream)
            )
        };
        Binary::serve(text, args, rust_log).await
    }

    /// Runs a CLI command against the same configuration; returns (stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "trace")
            .output()
            .expect("run keygate");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "keygate {args:?} failed: {stderr}");
        (stdout, stderr)
    }

    /// Issues a key with one scope by the CLI (`key create --json`); returns (the key, the
    /// command's stderr).
    pub fn create_key(&self, account: &str, name: &str, scope: &str) -> (String, String) {
        let (out, err) = self.cli(&[
            "key",
            "create",
            "--account",
            account,
            "--name",
            name,
            "--scope",
            scope,
            "--json",
        ]);
        let created: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        let key = created["key"].as_str().expect("key").to_string();
        (key, err)
    }

    pub async fn get(&self, path: &str, key: &str) -> http::StatusCode {
        let req = http::Request::get(format!("http://127.0.0.1:{}{path}", self.proxy))
            .header("authorization", format!("Bearer {key}"))
            .body(empty())
            .expect("req");
        send_with(&client(), req).await.status
    }

    /// SIGSTOP (`pause`) or SIGCONT (`resume`): while paused, whatever reaches its sockets
    /// waits, and is handled in one batch when it resumes.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Sends `signal` (`-TERM`, `-HUP`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// SIGTERM, wait for exit 0, return stderr.
    pub fn stop(mut self) -> String {
        let (status, err) = self.terminate();
        assert!(status.success(), "keygate exited with {status}:\n{err}");
        err
    }

    /// SIGTERM; (whether it exited 0, stderr).
    pub fn stop_status(mut self) -> (bool, String) {
        let (status, err) = self.terminate();
        (status.success(), err)
    }

    fn terminate(&mut self) -> (std::process::ExitStatus, String) {
        self.signal("-TERM");
        self.wait_exit(Duration::from_secs(15))
    }

    /// Waits up to `limit` for the process to exit (after a signal); (its status, stderr).
    pub fn wait_exit(&mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, self.logs.collect());
            }
            assert!(Instant::now() < deadline, "keygate did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The configuration file it runs with, for CLI commands against the same database.
    pub fn config(&self) -> &std::path::Path {
        &self.config
    }

    /// A URL on its proxy listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.proxy)
    }

    /// Its peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `stream` until the peer closes it (or it fails); what it sent, or `None` when it is
/// still open after `limit`.
pub async fn read_until_closed<S>(stream: &mut S, limit: Duration) -> Option<Vec<u8>>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| out)
}
