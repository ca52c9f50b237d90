//! TLS end to end with certificates made in the test (rcgen): the proxy listener (ALPN, reload
//! without dropping connections, handshake timeout) and `https://` upstreams (CA bundle, mTLS,
//! host-name verification).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::harness::*;

/// A test CA and leaf certificates it signs.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        let pki = Pki {
            dir: tempfile::tempdir().expect("tempdir"),
            ca,
        };
        std::fs::write(pki.ca_file(), pki.ca.pem()).expect("write ca");
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes `<name>.pem` and `<name>-key.pem` for a leaf valid for `names`.
    fn leaf(&self, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let (c, k) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("add ca");
        roots
    }
}

fn toml_path(p: &Path) -> String {
    p.display().to_string()
}

fn client_tls(
    pki: &Pki,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut cfg = rustls::ClientConfig::builder_with_provider(keygate::tls::provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}

async fn connect_tls(
    app: &TestApp,
    connector: &TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(app.proxy_addr).await.expect("connect");
    connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake with keygate")
}

async fn tls_app(pki: &Pki, extra: &str) -> TestApp {
    let (cert, key) = pki.leaf("listener", &["localhost"]);
    spawn_app_with(
        Engine::Sqlite,
        AppOptions {
            extra_toml: format!(
                "[proxy.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nwatch_interval = \"50ms\"\n{extra}",
                toml_path(&cert),
                toml_path(&key)
            ),
            ..AppOptions::default()
        },
    )
    .await
}

type H1Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn h1_over(stream: tokio_rustls::client::TlsStream<TcpStream>) -> H1Sender {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    sender
}

fn keyed_get(path: &str, key: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {key}"))
        .body(Empty::new())
        .expect("request")
}

fn leaf_of(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().expect("peer certs")[0]
        .clone()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_listener_speaks_http1_and_h2_by_alpn_and_forwards_proto_https() {
    let pki = Pki::new();
    let app = tls_app(&pki, "").await;
    let account = app.create_account("tls").await;
    let key = app.create_key(&account, "k", &["recordings:read"]).await;

    let stream = connect_tls(
        &app,
        &client_tls(&pki, &[b"http/1.1"], &[&rustls::version::TLS13]),
    )
    .await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut h1 = h1_over(stream).await;
    let r = h1
        .send_request(keyed_get("/recordings/1", key.key.expose()))
        .await
        .expect("response");
    assert_eq!(r.status(), 200);
    assert_eq!(app.upstream.last().headers["x-forwarded-proto"], "https");

    // TLS 1.2 with h2.
    let stream = connect_tls(
        &app,
        &client_tls(&pki, &[b"h2"], &[&rustls::version::TLS12]),
    )
    .await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::get("https://localhost/recordings/2")
        .header("authorization", format!("Bearer {}", key.key.expose()))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let r = h2.send_request(req).await.expect("response");
    assert_eq!(r.status(), 200);
    let seen = app.upstream.last();
    assert_eq!(seen.uri, "/recordings/2");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");

    // Plain HTTP on the TLS port gets nowhere.
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut tcp = TcpStream::connect(app.proxy_addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(
            &mut tcp,
            b"GET /recordings/1 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .expect("write");
        let mut buf = Vec::new();
        let _ = tcp.read_to_end(&mut buf).await;
        buf
    })
    .await
    .expect("keygate closes a non-TLS connection");
    assert!(!r.starts_with(b"HTTP/1.1 200"));
    assert_eq!(app.upstream.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_served_to_new_connections_while_open_ones_keep_working()
{
    let pki = Pki::new();
    let app = tls_app(&pki, "").await;
    let account = app.create_account("tls").await;
    let key = app.create_key(&account, "k", &["recordings:read"]).await;
    let connector = client_tls(&pki, &[b"http/1.1"], &[&rustls::version::TLS13]);

    let old_stream = connect_tls(&app, &connector).await;
    let old_leaf = leaf_of(&old_stream);
    let mut old = h1_over(old_stream).await;
    assert_eq!(
        old.send_request(keyed_get("/recordings/1", key.key.expose()))
            .await
            .expect("response")
            .status(),
        200
    );

    // Replace both files (same paths) with a new certificate and key.
    let (new_cert, new_key) = pki.leaf("next", &["localhost"]);
    std::fs::copy(&new_key, pki.path("listener-key.pem")).expect("copy key");
    std::fs::copy(&new_cert, pki.path("listener.pem")).expect("copy cert");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = connect_tls(&app, &connector).await;
        if leaf_of(&s) != old_leaf {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate is never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection opened before the swap still works.
    assert_eq!(
        old.send_request(keyed_get("/recordings/2", key.key.expose()))
            .await
            .expect("response")
            .status(),
        200
    );

    // A broken file is logged and ignored: the current certificate stays.
    std::fs::write(pki.path("listener.pem"), "garbage").expect("write");
    let current = leaf_of(&connect_tls(&app, &connector).await);
    assert!(app.keygate.as_ref().expect("running").reload_tls().is_err());
    assert_eq!(leaf_of(&connect_tls(&app, &connector).await), current);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_tls_swaps_the_certificate_on_demand() {
    let pki = Pki::new();
    let app = tls_app(&pki, "").await;
    let connector = client_tls(&pki, &[b"http/1.1"], &[&rustls::version::TLS13]);
    let before = leaf_of(&connect_tls(&app, &connector).await);
    let (c, k) = pki.leaf("next", &["localhost"]);
    std::fs::copy(&k, pki.path("listener-key.pem")).expect("copy key");
    std::fs::copy(&c, pki.path("listener.pem")).expect("copy cert");
    app.keygate
        .as_ref()
        .expect("running")
        .reload_tls()
        .expect("reload");
    assert_ne!(leaf_of(&connect_tls(&app, &connector).await), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_the_tls_handshake_is_dropped() {
    let pki = Pki::new();
    // The harness has no setting for the handshake timeout: set it in the generated file.
    let (cert, key) = pki.leaf("listener2", &["localhost"]);
    let db = TestDb::new(Engine::Sqlite).await;
    let upstream = Upstream::start().await;
    let opts = AppOptions {
        extra_toml: format!(
            "[proxy.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            toml_path(&cert),
            toml_path(&key)
        ),
        ..AppOptions::default()
    };
    let toml = test_config_toml(&db.url, upstream.addr, &opts)
        .replace("[proxy]\n", "[proxy]\ntls_handshake_timeout = \"300ms\"\n");
    let config =
        keygate::config::Config::from_toml(&toml, "test", std::iter::empty()).expect("config");
    let (proxy, admin) = keygate::server::bind(&config).await.expect("bind");
    let kg = keygate::server::start(&config, proxy, admin, keygate::clock::Clock::System)
        .await
        .expect("start");
    let mut tcp = TcpStream::connect(kg.proxy_addr).await.expect("connect");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("keygate closes the silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    kg.shutdown().await;
}

/// A TLS upstream on a real port; records whether the client presented a certificate.
struct TlsUpstream {
    port: u16,
    client_certs: Arc<Mutex<Vec<bool>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_upstream(pki: &Pki, require_client_cert: bool) -> TlsUpstream {
    let (cert, key) = pki.leaf("upstream", &["localhost"]);
    let chain = vec![CertificateDer::from_pem_file(&cert).expect("cert pem")];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).expect("key pem");
    let builder = rustls::ServerConfig::builder_with_provider(keygate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let cfg = if require_client_cert {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(pki.roots()),
            keygate::tls::provider(),
        )
        .build()
        .expect("verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    }
    .with_single_cert(chain, key)
    .expect("server cert");
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let client_certs: Arc<Mutex<Vec<bool>>> = Arc::default();
    let log = client_certs.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let has_cert = tls.get_ref().1.peer_certificates().is_some();
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        log.lock().expect("lock").push(has_cert);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"secure ok",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsUpstream {
        port,
        client_certs,
        task,
    }
}

fn secure_route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\nscope = \"recordings:read\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_by_ca_and_host_name_and_get_the_client_certificate() {
    let pki = Pki::new();
    let mtls = tls_upstream(&pki, true).await;
    let (ccert, ckey) = pki.leaf("client", &["keygate"]);
    let ca = toml_path(&pki.ca_file());
    let with_client = format!(
        "ca_file = \"{ca}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        toml_path(&ccert),
        toml_path(&ckey)
    );
    let mut routes = String::new();
    // Verified by the CA and host name, presenting a client certificate.
    routes += &secure_route(
        "mtls",
        "/mtls",
        &format!("https://localhost:{}", mtls.port),
        &with_client,
    );
    // Same upstream without a client certificate: the upstream refuses the handshake.
    routes += &secure_route(
        "no-client-cert",
        "/nocert",
        &format!("https://localhost:{}", mtls.port),
        &format!("ca_file = \"{ca}\""),
    );
    // The certificate names localhost, not 127.0.0.1: host-name verification fails.
    routes += &secure_route(
        "wrong-name",
        "/wrongname",
        &format!("https://127.0.0.1:{}", mtls.port),
        &with_client,
    );
    // System roots do not know the test CA.
    routes += &secure_route(
        "unknown-ca",
        "/unknownca",
        &format!("https://localhost:{}", mtls.port),
        "",
    );
    let app = spawn_app_with(
        Engine::Sqlite,
        AppOptions {
            extra_toml: routes,
            ..AppOptions::default()
        },
    )
    .await;
    let account = app.create_account("tls").await;
    let key = app.create_key(&account, "k", &["recordings:read"]).await;

    let r = app.get("/mtls/1", Some(key.key.expose())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "secure ok");
    assert_eq!(*mtls.client_certs.lock().expect("lock"), vec![true]);

    for path in ["/nocert/1", "/wrongname/1", "/unknownca/1"] {
        let r = app.get(path, Some(key.key.expose())).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
    }
    assert_eq!(
        mtls.client_certs.lock().expect("lock").len(),
        1,
        "no unverified exchange reached the upstream"
    );
}

#[tokio::test]
async fn tls_settings_on_an_http_upstream_or_a_missing_ca_file_fail_the_start() {
    let err = keygate::config::Config::from_toml(
        &secure_route("r", "/r", "http://localhost:1", "ca_file = \"/x\""),
        "test",
        std::iter::empty(),
    )
    .expect_err("ca_file on http");
    assert_eq!(err.path, "routes[0].ca_file");
    let err = keygate::config::Config::from_toml(
        &secure_route(
            "r",
            "/r",
            "https://localhost:1",
            "client_cert_file = \"/x\"",
        ),
        "test",
        std::iter::empty(),
    )
    .expect_err("cert without key");
    assert_eq!(err.path, "routes[0].client_key_file");

    let config = keygate::config::Config::from_toml(
        &format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n{}",
            tempfile::tempdir().expect("dir").keep().join("k.db").display(),
            secure_route("r", "/r", "https://localhost:1", "ca_file = \"/nonexistent/ca.pem\"")
        ),
        "test",
        std::iter::empty(),
    )
    .expect("valid config");
    let (p, a) = keygate::server::bind(&config).await.expect("bind");
    let err = keygate::server::start(&config, p, a, keygate::clock::Clock::System)
        .await
        .err()
        .expect("a missing CA file fails the start");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_needs_a_new_tls_pool_is_refused_and_the_running_routes_stay() {
    let pki = Pki::new();
    let secure = tls_upstream(&pki, false).await;
    let ca = toml_path(&pki.ca_file());
    let upstream = format!("https://localhost:{}", secure.port);
    let at_start = secure_route(
        "secure",
        "/secure",
        &upstream,
        &format!("ca_file = \"{ca}\""),
    );
    let was_plain = |scheme: &str| {
        let extra = if scheme == "https" {
            format!("ca_file = \"{ca}\"")
        } else {
            String::new()
        };
        secure_route(
            "was-plain",
            "/was-plain",
            &format!("{scheme}://localhost:9"),
            &extra,
        )
    };
    let app = spawn_app_with(
        Engine::Sqlite,
        AppOptions {
            extra_toml: format!("{at_start}{}", was_plain("http")),
            ..AppOptions::default()
        },
    )
    .await;
    let account = app.create_account("tls").await;
    let key = app.create_key(&account, "k", &["recordings:read"]).await;
    let status = |path: &'static str| {
        let app = &app;
        let key = key.key.expose().to_string();
        async move { app.get(path, Some(&key)).await.status }
    };
    let reload = |routes: String| {
        let toml = test_config_toml(
            "sqlite://unused.db",
            app.upstream.addr,
            &AppOptions {
                extra_toml: routes,
                ..AppOptions::default()
            },
        );
        let config = keygate::config::Config::from_toml(&toml, "test", std::iter::empty())
            .expect("valid configuration");
        app.keygate.as_ref().expect("running").reload(&config)
    };
    assert_eq!(status("/secure/1").await, 200);

    // A new https route, a route turned https, other trust for a known one: each refused,
    // naming the route, and nothing of the file applied (its plain route included).
    let plain = format!(
        "[[routes]]\nname = \"plain\"\npath_prefix = \"/plain\"\nupstream = \"http://{}\"\nscope = \"recordings:read\"\n",
        app.upstream.addr
    );
    let refused = [
        (
            "second",
            format!(
                "{at_start}{plain}{}",
                secure_route(
                    "second",
                    "/second",
                    &upstream,
                    &format!("ca_file = \"{ca}\"")
                )
            ),
        ),
        (
            "was-plain",
            format!("{at_start}{plain}{}", was_plain("https")),
        ),
        (
            "secure",
            format!(
                "{plain}{}",
                secure_route("secure", "/secure", &upstream, "")
            ),
        ),
    ];
    for (route, routes) in refused {
        let err = reload(routes).expect_err("refused").to_string();
        assert!(
            err.contains(&format!("route `{route}`")) && err.contains("restart"),
            "{err}"
        );
        assert_eq!(
            status("/plain/1").await,
            404,
            "nothing of a refused file applies"
        );
        assert_eq!(status("/secure/1").await, 200);
    }

    // The same https route (even under another path) and a new plain one need no restart.
    let moved = secure_route(
        "secure",
        "/moved",
        &upstream,
        &format!("ca_file = \"{ca}\""),
    );
    reload(format!("{moved}{plain}")).expect("reloaded");
    assert_eq!(status("/plain/1").await, 200);
    assert_eq!(status("/moved/1").await, 200);
    assert_eq!(status("/secure/1").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_after_the_tls_handshake_is_closed_after_the_header_read_timeout() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("listener", &["localhost"]);
    let app = spawn_app_with(
        Engine::Sqlite,
        AppOptions {
            extra_toml: format!(
                "[proxy.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                toml_path(&cert),
                toml_path(&key)
            ),
            proxy_toml: "header_read_timeout = \"300ms\"".into(),
            ..AppOptions::default()
        },
    )
    .await;
    // HTTP/1.1 by ALPN, no ALPN at all (HTTP/1.1 too), and h2 without its preface: each
    // finishes the handshake, then sends nothing.
    for alpn in [&[&b"http/1.1"[..]][..], &[], &[b"h2"]] {
        let connector = client_tls(&pki, alpn, &[&rustls::version::TLS13]);
        let started = std::time::Instant::now();
        let mut stream = connect_tls(&app, &connector).await;
        // h2: the server's SETTINGS (and a GOAWAY) may come before the close.
        let closed = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "ALPN {alpn:?}: still open after 5 s");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "ALPN {alpn:?}: closed after {:?}",
            started.elapsed()
        );
    }
}
