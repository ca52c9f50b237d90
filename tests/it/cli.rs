//! The real binary: commands, their errors, and `serve` end to end with a signal to stop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::both_engines;
use crate::harness::*;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keygate")
}

/// A configuration file in a temporary directory.
pub(crate) struct ConfigFile {
    _dir: tempfile::TempDir,
    pub(crate) path: PathBuf,
}

pub(crate) fn write_config(text: &str) -> ConfigFile {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, text).expect("write config");
    ConfigFile { _dir: dir, path }
}

pub(crate) fn keygate(config: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run keygate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}{}",
        stderr(&o),
        stdout(&o)
    );
    stdout(&o)
}

/// Asserts a command failed with exactly one `error:` line mentioning `needle`.
pub(crate) fn fails_with(o: Output, needle: &str) {
    assert!(
        !o.status.success(),
        "command unexpectedly succeeded: {}",
        stdout(&o)
    );
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(lines.len(), 1, "one line of error expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "`{needle}` not in: {err}");
}

both_engines! {
    async fn the_cli_issues_keys_once_and_lists_them_without_secrets(engine: Engine) {
        let db = TestDb::new(engine).await;
        let cfg = write_config(&format!("[database]\nurl = \"{}\"\n[hashing]\nmemory_kib = 1024\niterations = 1\n", db.url));
        ok(keygate(&cfg.path, &["migrate"]));
        ok(keygate(&cfg.path, &["account", "create", "billing"]));
        let out = ok(keygate(&cfg.path, &[
            "key", "create", "--account", "billing", "--name", "ci", "--scope", "recordings:read",
            "--scope", "tickets:write", "--expires-in", "7d", "--json",
        ]));
        let created: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        let key = created["key"].as_str().expect("key").to_string();
        assert_eq!(created["prefix"].as_str(), Some(&key[..8]));
        assert_eq!(created["scopes"], serde_json::json!(["recordings:read", "tickets:write"]));
        assert!(created["expires_at"].as_str().expect("expiry").ends_with('Z'));
        assert!(created["id"].as_i64().is_some());

        let human = ok(keygate(&cfg.path, &["key", "create", "--account", "billing", "--name", "ops", "--scope", "tickets:write"]));
        assert!(human.contains("shown only this once"));

        let list = ok(keygate(&cfg.path, &["key", "list", "--json"]));
        assert!(!list.contains(&key[9..]), "key list must never show a key");
        assert!(!list.contains("argon2"), "key list must never show a hash");
        let keys: serde_json::Value = serde_json::from_str(list.trim()).expect("json");
        let ci = keys.as_array().expect("array").iter().find(|k| k["name"] == "ci").expect("ci key listed");
        assert_eq!(ci["status"], "expiring");
        assert_eq!(ci["account"], "billing");
        assert!(ci["last_used_at"].is_null());
        let table = ok(keygate(&cfg.path, &["key", "list", "--account", "billing"]));
        assert!(table.contains("PREFIX") && table.contains(&key[..8]) && !table.contains(&key[9..]));

        ok(keygate(&cfg.path, &["key", "expire", &key[..8], "--in", "1h"]));
        ok(keygate(&cfg.path, &["key", "revoke", &key[..8]]));
        let list = ok(keygate(&cfg.path, &["key", "list", "--json"]));
        let keys: serde_json::Value = serde_json::from_str(list.trim()).expect("json");
        let ci = keys.as_array().expect("array").iter().find(|k| k["name"] == "ci").expect("ci");
        assert_eq!(ci["status"], "revoked");
        let accounts: serde_json::Value = serde_json::from_str(ok(keygate(&cfg.path, &["account", "list", "--json"])).trim()).expect("json");
        assert_eq!(accounts[0]["name"], "billing");
    }
}

both_engines! {
    async fn cli_errors_are_one_clear_line_and_change_nothing(engine: Engine) {
        let db = TestDb::new(engine).await;
        let cfg = write_config(&format!("[database]\nurl = \"{}\"\n[hashing]\nmemory_kib = 1024\niterations = 1\n", db.url));
        ok(keygate(&cfg.path, &["account", "create", "billing"]));
        ok(keygate(&cfg.path, &["key", "create", "--account", "billing", "--name", "ci", "--scope", "a:read"]));

        fails_with(keygate(&cfg.path, &["account", "create", "billing"]), "already exists");
        fails_with(keygate(&cfg.path, &["key", "create", "--account", "nobody", "--name", "x", "--scope", "a:read"]), "no service account named `nobody`");
        fails_with(keygate(&cfg.path, &["key", "create", "--account", "billing", "--name", "ci", "--scope", "a:read"]), "already has a key named `ci`");
        fails_with(keygate(&cfg.path, &["key", "create", "--account", "billing", "--name", "y", "--scope", "bad/scope"]), "is not a scope");
        fails_with(keygate(&cfg.path, &["key", "create", "--account", "billing", "--name", "y", "--scope", "a:read", "--expires-at", "tomorrow"]), "RFC 3339");
        fails_with(keygate(&cfg.path, &["key", "revoke", "kgsZZZZZ"]), "no key with prefix");
        fails_with(keygate(&cfg.path, &["key", "revoke", "nope"]), "is not a key prefix");

        let keys: serde_json::Value = serde_json::from_str(ok(keygate(&cfg.path, &["key", "list", "--json"])).trim()).expect("json");
        assert_eq!(keys.as_array().expect("array").len(), 1, "no failed command wrote anything");
    }
}

#[test]
fn a_bad_configuration_is_refused_with_the_exact_setting() {
    let cfg = write_config("[database]\nrefresh_interval = \"often\"\n");
    fails_with(
        keygate(&cfg.path, &["config", "check"]),
        "database.refresh_interval",
    );
    let cfg = write_config("[proxy]\nlisten_addr = \"127.0.0.1:1\"\n");
    fails_with(keygate(&cfg.path, &["serve"]), "proxy.listen_addr");
    let ok_cfg = ok(keygate(
        Path::new("config.example.toml"),
        &["config", "check"],
    ));
    assert!(ok_cfg.contains("configuration is valid"));
}

#[test]
fn an_unreachable_database_is_named_in_one_line() {
    let port = free_port();
    let cfg = write_config(&format!(
        "[database]\nurl = \"postgres://keygate:pw@127.0.0.1:{port}/keys\"\n"
    ));
    let out = keygate(&cfg.path, &["account", "list"]);
    fails_with(
        out,
        &format!("cannot open database postgres://keygate:***@127.0.0.1:{port}/keys"),
    );
}

both_engines! {
    async fn the_binary_serves_authenticates_revokes_and_stops_cleanly_on_sigterm(engine: Engine) {
        let db = TestDb::new(engine).await;
        let upstream = Upstream::start().await;
        let served = Binary::start(&db.url, upstream.addr, "", &[], Some("debug")).await;
        let cfg = served.config().to_path_buf();
        ok(keygate(&cfg, &["account", "create", "alerts"]));
        let out = ok(keygate(&cfg, &["key", "create", "--account", "alerts", "--name", "v1", "--scope", "tickets:write", "--json"]));
        let created: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        let key = created["key"].as_str().expect("key").to_string();

        let c = client();
        let started = Instant::now();
        let status = loop {
            let req = http::Request::post(served.url("/tickets/new")).header("x-api-key", &key).body(full("{}")).expect("req");
            let r = send_with(&c, req).await;
            if r.status != 401 || started.elapsed() > Duration::from_secs(3) {
                break r.status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status, 200, "the new key works within a refresh");
        assert_eq!(upstream.last().headers["x-keygate-account"], "alerts");

        ok(keygate(&cfg, &["key", "revoke", &key[..8]]));
        let started = Instant::now();
        loop {
            let req = http::Request::post(served.url("/tickets/new")).header("x-api-key", &key).body(full("{}")).expect("req");
            if send_with(&c, req).await.status == 401 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(2), "revoked key still accepted by the binary");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (success, logs) = served.stop_status();
        assert!(success, "exit status 0 after SIGTERM; logs:\n{logs}");
        assert!(logs.contains("keygate stopped"), "{logs}");
        assert!(!logs.contains(&key[9..]), "a log line contained the key");
        let setup = logs.lines().find(|l| l.contains("/admin/setup?token=")).expect("a first start logs the setup link");
        assert!(setup.contains("WARN"), "{setup}");
    }
}

/// Runs the binary with `input` on stdin.
fn keygate_with_stdin(config: &Path, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keygate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

both_engines! {
    async fn console_users_are_added_with_a_password_from_stdin_and_listed_without_it(engine: Engine) {
        let db = TestDb::new(engine).await;
        let cfg = write_config(&format!("[database]\nurl = \"{}\"\n[hashing]\nmemory_kib = 1024\niterations = 1\n", db.url));
        let add = |email: &str, role: &str, password: &str| keygate_with_stdin(&cfg.path,
            &["user", "add", "--email", email, "--role", role, "--password-stdin"], password);
        let out = ok(add("ada@example.com", "admin", "a long password\n"));
        assert!(out.contains("added user ada@example.com with role admin"), "{out}");
        fails_with(add("bob@example.com", "superuser", "a long password\n"), "is not a role");
        fails_with(add("bob@example.com", "viewer", "short\n"), "10-256 characters");
        fails_with(add("ada@example.com", "viewer", "a long password\n"), "already exists");
        let no_flag = keygate(&cfg.path, &["user", "add", "--email", "x@example.com", "--role", "viewer"]);
        assert!(!no_flag.status.success() && stderr(&no_flag).contains("--password-stdin"), "no password on the command line");

        let listed = ok(keygate(&cfg.path, &["user", "list", "--json"]));
        let v: serde_json::Value = serde_json::from_str(listed.trim()).expect("json");
        assert_eq!(v.as_array().expect("list").len(), 1, "failed adds wrote nothing");
        assert_eq!(v[0]["email"], "ada@example.com");
        assert_eq!(v[0]["role"], "admin");
        assert!(!listed.contains("argon2") && !listed.contains("a long password"));
        let table = ok(keygate(&cfg.path, &["user", "list"]));
        assert!(table.contains("ada@example.com") && table.contains("EMAIL"), "{table}");

        // The password works for the console (verified through the same store).
        let store = keygate::store::Store::connect(&keygate::config::DatabaseUrl::new(db.url.clone()).expect("url"), 1).await.expect("store");
        let m = keygate::manage::Manager::new(store, keygate::config::HashingConfig { memory_kib: 1024, iterations: 1, parallelism: 1 }, keygate::clock::Clock::System).expect("manager");
        let pw = keygate::manage::Password::new("a long password");
        assert!(m.authenticate("ada@example.com", &pw).await.expect("auth").is_some());
    }
}

both_engines! {
    async fn console_users_are_disabled_enabled_given_roles_and_new_passwords_from_the_cli(engine: Engine) {
        let db = TestDb::new(engine).await;
        let cfg = write_config(&format!("[database]\nurl = \"{}\"\n[hashing]\nmemory_kib = 1024\niterations = 1\n", db.url));
        let user = |args: &[&str]| keygate(&cfg.path, &[&["user"], args].concat());
        let add = |email: &str, role: &str| ok(keygate_with_stdin(&cfg.path,
            &["user", "add", "--email", email, "--role", role, "--password-stdin"], "a long password\n"));
        add("owner@example.com", "owner");
        add("ada@example.com", "admin");

        let out = ok(user(&["disable", "--email", "ada@example.com"]));
        assert!(out.contains("disabled user ada@example.com"), "{out}");
        let table = ok(user(&["list"]));
        let ada = table.lines().find(|l| l.contains("ada@example.com")).expect("listed");
        assert!(ada.contains("disabled 20"), "{table}");
        assert!(table.contains("STATUS"), "{table}");
        fails_with(user(&["disable", "--email", "ada@example.com"]), "is already disabled");
        assert!(ok(user(&["enable", "--email", "ada@example.com"])).contains("enabled user ada@example.com"));
        let table = ok(user(&["list"]));
        assert!(table.lines().find(|l| l.contains("ada@example.com")).expect("listed").contains("active"), "{table}");

        let out = ok(user(&["set-role", "--email", "ada@example.com", "--role", "operator"]));
        assert!(out.contains("user ada@example.com now has role operator"), "{out}");
        fails_with(user(&["set-role", "--email", "ada@example.com", "--role", "root"]), "is not a role");
        fails_with(user(&["set-role", "--email", "owner@example.com", "--role", "admin"]), "last enabled owner");
        fails_with(user(&["disable", "--email", "owner@example.com"]), "last enabled owner");
        fails_with(user(&["disable", "--email", "nobody@example.com"]), "no console user with email `nobody@example.com`");
        let no_flag = user(&["set-password", "--email", "ada@example.com"]);
        assert!(!no_flag.status.success() && stderr(&no_flag).contains("--password-stdin"), "no password on the command line");
        fails_with(keygate_with_stdin(&cfg.path, &["user", "set-password", "--email", "ada@example.com", "--password-stdin"], "short\n"), "10-256 characters");
        let out = ok(keygate_with_stdin(&cfg.path, &["user", "set-password", "--email", "ada@example.com", "--password-stdin"], "another long password\n"));
        assert!(out.contains("set a new password for ada@example.com"), "{out}");

        let listed: serde_json::Value = serde_json::from_str(ok(user(&["list", "--json"])).trim()).expect("json");
        let roles: Vec<(&str, &str, bool)> = listed.as_array().expect("list").iter()
            .map(|u| (u["email"].as_str().unwrap_or(""), u["role"].as_str().unwrap_or(""), u["disabled_at"].is_null()))
            .collect();
        assert_eq!(roles, [("ada@example.com", "operator", true), ("owner@example.com", "owner", true)], "refused commands changed nothing");

        let store = keygate::store::Store::connect(&keygate::config::DatabaseUrl::new(db.url.clone()).expect("url"), 1).await.expect("store");
        let m = keygate::manage::Manager::new(store, keygate::config::HashingConfig { memory_kib: 1024, iterations: 1, parallelism: 1 }, keygate::clock::Clock::System).expect("manager");
        let signs_in = |pw: &'static str| { let m = &m; async move { m.authenticate("ada@example.com", &keygate::manage::Password::new(pw)).await.expect("auth").is_some() } };
        assert!(signs_in("another long password").await);
        assert!(!signs_in("a long password").await, "the old password no longer works");
        let audit = m.store.audit_page(&keygate::store::AuditFilter { action: Some("user.updated".into()), limit: 50, ..Default::default() }).await.expect("audit");
        let changes: Vec<&str> = audit.iter().map(|e| e.detail.as_str()).collect();
        assert_eq!(changes.len(), 4, "{changes:?}");
        assert!(changes.iter().all(|d| !d.contains("long password")), "{changes:?}");
        assert!(audit.iter().all(|e| e.actor_type == "cli"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_streams_large_bodies_in_bounded_memory() {
    let db = TestDb::new(Engine::Sqlite).await;
    let upstream = Upstream::start().await;
    let served = Binary::start(
        &db.url,
        upstream.addr,
        "[log]\naccess_log = false",
        &[],
        Some("debug"),
    )
    .await;
    let cfg = served.config().to_path_buf();
    ok(keygate(&cfg, &["account", "create", "exporter"]));
    let out = ok(keygate(
        &cfg,
        &[
            "key",
            "create",
            "--account",
            "exporter",
            "--name",
            "v1",
            "--scope",
            "recordings:read",
            "--scope",
            "recordings:write",
            "--json",
        ],
    ));
    let key = serde_json::from_str::<serde_json::Value>(out.trim()).expect("json")["key"]
        .as_str()
        .expect("key")
        .to_string();
    tokio::time::sleep(Duration::from_millis(400)).await;

    const SIZE: u64 = 256 * 1024 * 1024;
    let c = client();
    let upload = http::Request::put(served.url("/recordings/upload"))
        .header("x-api-key", &key)
        .body(http_body_util::BodyExt::boxed(ZeroBody::new(SIZE)))
        .expect("req");
    let r = send_with(&c, upload).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-upstream-received-bytes"], SIZE.to_string());

    let download = http::Request::get(served.url(&format!("/recordings/download?bytes={SIZE}")))
        .header("x-api-key", &key)
        .body(empty())
        .expect("req");
    let response = c.request(download).await.expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut got = 0u64;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        got += frame
            .expect("frame")
            .data_ref()
            .map(|d| d.len() as u64)
            .unwrap_or(0);
    }
    assert_eq!(got, SIZE);
    let peak = served.peak_rss_kib();
    assert!(
        peak < 64 * 1024,
        "peak resident memory {peak} KiB for 256 MiB each way"
    );
    let (success, _) = served.stop_status();
    assert!(success);
}

/// Writes a self-signed certificate and its key as `<name>.pem` and `<name>-key.pem`.
fn self_signed(dir: &Path, name: &str) -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.cert.pem()).expect("write cert");
    std::fs::write(&k, cert.signing_key.serialize_pem()).expect("write key");
    (c.display().to_string(), k.display().to_string())
}

#[test]
fn config_check_opens_every_tls_file_and_names_the_setting_of_a_bad_one() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key) = self_signed(dir.path(), "a");
    let (_, other_key) = self_signed(dir.path(), "b");
    let not_pem = dir.path().join("notes.txt").display().to_string();
    std::fs::write(&not_pem, "not a certificate\n").expect("write");
    let missing = "/nonexistent.pem";
    let route = |extra: &str| {
        format!(
            "[[routes]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"https://localhost:1\"\nscope = \"r:read\"\n{extra}\n"
        )
    };
    let listener =
        |c: &str, k: &str| format!("[proxy.tls]\ncert_file = \"{c}\"\nkey_file = \"{k}\"\n");
    let mtls = |c: &str, k: &str| format!("client_cert_file = \"{c}\"\nclient_key_file = \"{k}\"");

    let cases = [
        (
            route(&format!("ca_file = \"{missing}\"")),
            format!("routes[0].ca_file: {missing}: cannot read: "),
        ),
        (
            route(&format!("ca_file = \"{not_pem}\"")),
            format!("routes[0].ca_file: {not_pem}: no PEM certificate"),
        ),
        (
            route(&mtls(missing, &key)),
            format!("routes[0].client_cert_file: {missing}: cannot read: "),
        ),
        (
            route(&mtls(&cert, &not_pem)),
            format!("routes[0].client_key_file: {not_pem}: no usable PEM private key"),
        ),
        (
            route(&mtls(&cert, &other_key)),
            "routes[0].client_key_file: ".to_string() + &other_key + ": the key does not fit",
        ),
        (
            listener(missing, &key),
            format!("proxy.tls.cert_file: {missing}: cannot read: "),
        ),
        (
            listener(&not_pem, &key),
            format!("proxy.tls.cert_file: {not_pem}: no PEM certificate"),
        ),
        (
            listener(&cert, missing),
            format!("proxy.tls.key_file: {missing}: cannot read: "),
        ),
        (
            listener(&cert, &other_key),
            format!("proxy.tls.key_file: {other_key}: the key does not fit"),
        ),
    ];
    for (text, expected) in cases {
        let cfg = write_config(&text);
        fails_with(keygate(&cfg.path, &["config", "check"]), &expected);
    }

    // `serve` refuses the same way, naming the setting before it binds anything.
    let cfg = write_config(&listener(missing, &key));
    fails_with(
        keygate(&cfg.path, &["serve"]),
        "proxy.tls.cert_file: /nonexistent.pem: cannot read",
    );
    // Commands that use no TLS file do not open them: an operator may run `keygate key ...`
    // without read access to the listener's key.
    let db = dir.path().join("k.db").display().to_string();
    let cfg = write_config(&format!(
        "[database]\nurl = \"sqlite://{db}\"\n{}",
        listener(missing, &key)
    ));
    ok(keygate(&cfg.path, &["account", "list"]));

    let good = format!(
        "{}{}",
        listener(&cert, &key),
        route(&format!("ca_file = \"{cert}\"\n{}", mtls(&cert, &key)))
    );
    let out = ok(keygate(&write_config(&good).path, &["config", "check"]));
    assert!(out.contains("configuration is valid"), "{out}");
}

#[test]
fn config_check_names_bad_hashing_settings_and_warns_of_weak_ones() {
    for (setting, path) in [
        ("memory_kib = 1", "hashing.memory_kib: "),
        ("iterations = 0", "hashing.iterations: "),
        ("parallelism = 0", "hashing.parallelism: "),
    ] {
        let cfg = write_config(&format!("[hashing]\n{setting}\n"));
        fails_with(keygate(&cfg.path, &["config", "check"]), path);
    }

    let cfg = write_config("[hashing]\nmemory_kib = 1024\niterations = 1\n");
    let out = keygate(&cfg.path, &["config", "check"]);
    assert!(out.status.success(), "weak hashing is not refused");
    let warning = stderr(&out);
    assert!(
        warning.starts_with("warning: hashing.memory_kib = 1024 with hashing.iterations = 1 is below OWASP's minimum")
            && warning.lines().count() == 1,
        "{warning}"
    );
    let quiet = keygate(Path::new("config.example.toml"), &["config", "check"]);
    assert_eq!(stderr(&quiet), "", "the defaults meet OWASP's minimum");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_warns_at_start_when_hashing_is_below_the_owasp_minimum() {
    let db = TestDb::new(Engine::Sqlite).await;
    let upstream = Upstream::start().await;
    // The suite's usual configuration hashes with 1024 KiB and one iteration.
    let served = Binary::start(&db.url, upstream.addr, "", &[], None).await;
    let logs = served.stop();
    let warning = logs
        .lines()
        .find(|l| l.contains("below OWASP's minimum"))
        .unwrap_or_else(|| panic!("no hashing warning in:\n{logs}"));
    assert!(
        warning.contains("WARN") && warning.contains("hashing.memory_kib = 1024"),
        "{warning}"
    );
}

#[test]
fn a_reader_that_stops_early_ends_a_command_quietly() {
    use std::io::BufRead;
    // Far more output than a pipe holds, so keygate is still writing when the reader leaves.
    let routes: String = (0..2000)
        .map(|i| format!("[[routes]]\nname = \"route-{i}\"\npath_prefix = \"/r{i}\"\nupstream = \"http://127.0.0.1:1\"\nscope = \"r:read\"\n"))
        .collect();
    let cfg = write_config(&routes);
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(&cfg.path)
        .args(["config", "check"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keygate");
    // `keygate config check | head -1`
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    assert_eq!(first, "configuration is valid\n");
    let out = child.wait_with_output().expect("wait");
    let err = stderr(&out);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn with_json_logs_a_fatal_error_is_one_json_line_like_the_log() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let db = tempfile::tempdir().expect("dir");
    let base = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n",
        db.path().join("k.db").display()
    );
    let flag = write_config(&base);
    let file = write_config(&format!("{base}[log]\nformat = \"json\"\n"));
    for out in [
        keygate(&flag.path, &["--log-format", "json", "serve"]),
        keygate(&file.path, &["serve"]),
    ] {
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        let lines: Vec<serde_json::Value> = err
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let last = lines.last().expect("an error line");
        assert_eq!(last["level"], "ERROR", "{err}");
        let message = last["message"].as_str().expect("message");
        assert!(
            message.contains("cannot bind") && message.contains(&port.to_string()),
            "{err}"
        );
        assert!(
            last["target"]
                .as_str()
                .expect("target")
                .starts_with("keygate"),
            "{err}"
        );
        assert!(
            last["timestamp"]
                .as_str()
                .expect("timestamp")
                .ends_with('Z'),
            "{err}"
        );
        // The same shape as the log lines before it (field names, not values).
        if let Some(first) = lines.first().filter(|l| l["level"] != "ERROR") {
            for field in ["timestamp", "level", "target"] {
                assert!(first.get(field).is_some(), "{first}");
            }
        }
    }
    // A configuration error before the log format is known still follows the flag.
    let bad = write_config("[proxy]\nlisten = \"nowhere\"\n");
    let out = keygate(&bad.path, &["--log-format", "json", "config", "check"]);
    let line: serde_json::Value = serde_json::from_str(stderr(&out).trim()).expect("json");
    assert!(
        line["message"]
            .as_str()
            .expect("message")
            .contains("proxy.listen"),
        "{line}"
    );

    // Text mode is unchanged: the last line is `error: ...`.
    let out = keygate(&flag.path, &["serve"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1));
    let last = err.lines().last().expect("an error line");
    assert!(last.starts_with("error: cannot bind proxy.listen"), "{err}");
    drop(taken);
}

#[test]
fn usage_errors_are_one_line_and_exit_1_while_help_and_version_exit_0() {
    let db = tempfile::tempdir().expect("dir");
    let cfg = write_config(&format!(
        "[database]\nurl = \"sqlite://{}\"\n[hashing]\nmemory_kib = 1024\niterations = 1\n",
        db.path().join("k.db").display()
    ));
    ok(keygate(&cfg.path, &["account", "create", "billing"]));

    // A negative duration reaches keygate's own parser instead of reading as a flag.
    let create = |flag: &str, value: &str| {
        keygate(
            &cfg.path,
            &[
                "key",
                "create",
                "--account",
                "billing",
                "--name",
                "ci",
                "--scope",
                "a:read",
                flag,
                value,
            ],
        )
    };
    fails_with(create("--expires-in", "-1d"), "`-1d` is not a duration");
    fails_with(create("--expires-at", "-2026-01-01T00:00:00Z"), "RFC 3339");
    fails_with(
        keygate(&cfg.path, &["key", "expire", "kgsAAAAA", "--in", "-5m"]),
        "`-5m` is not a duration",
    );

    for (args, needle) in [
        (
            &["config", "check", "--foo"][..],
            "error: unexpected argument '--foo' found; see --help",
        ),
        (
            &["key", "frobnicate"][..],
            "error: unrecognized subcommand 'frobnicate'; see --help",
        ),
        (
            &["--log-format", "xml", "config", "check"][..],
            "error: invalid value 'xml' for '--log-format <LOG_FORMAT>' [possible values: text, json]; see --help",
        ),
        (
            &["user", "add", "--email", "a@example.com", "--role", "viewer"][..],
            "error: the following required arguments were not provided: --password-stdin; see --help",
        ),
    ] {
        let out = keygate(&cfg.path, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with(needle), "{args:?}: {err}");
    }

    for args in [
        &["--help"][..],
        &["key", "create", "--help"],
        &["--version"],
    ] {
        let out = keygate(&cfg.path, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            stderr(&out).is_empty() && !stdout(&out).is_empty(),
            "{args:?}"
        );
    }
    let out = keygate(&cfg.path, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: 'keygate' requires a subcommand but one was not provided \
         [subcommands: serve, migrate, config, account, key, user, gateway, help]; see --help\n"
    );
}
