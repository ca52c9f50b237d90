use super::*;

fn parse(toml: &str) -> Result<Config, ConfigError> {
    Config::from_toml(toml, "test.toml", std::iter::empty())
}

fn parse_env(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml(
        toml,
        "test.toml",
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn the_example_file_is_valid_and_shows_the_defaults() {
    let text = include_str!("../../config.example.toml");
    let example = parse(text).expect("config.example.toml is valid");
    let defaults = Config::default();
    assert_eq!(example.proxy.listen, defaults.proxy.listen);
    assert_eq!(example.admin.listen.to_string(), "127.0.0.1:9090");
    assert!(!example.admin.secure_cookies);
    assert_eq!(
        example.admin.session_idle_timeout,
        Duration::from_secs(30 * 60)
    );
    assert_eq!(example.admin.stale_after, Duration::from_secs(30 * 86_400));
    assert_eq!(defaults.admin.stale_after, example.admin.stale_after);
    assert!(example.routes.iter().all(|r| r.audit == AuditMode::Writes));
    assert_eq!(example.database.url, defaults.database.url);
    assert_eq!(example.database.refresh_interval, Duration::from_secs(2));
    assert_eq!(example.last_used.flush_interval, Duration::from_secs(10));
    assert_eq!(example.hashing, defaults.hashing);
    assert_eq!(
        example.verification.max_pending,
        defaults.verification.max_pending
    );
    assert_eq!(example.log.access_log, defaults.log.access_log);
    assert!(!example.metrics.per_account_labels && !defaults.metrics.per_account_labels);
    assert_eq!(example.routes.len(), 3);
}

#[test]
fn unknown_settings_are_rejected_with_their_path() {
    let err = parse("[proxy]\nlisten = \"127.0.0.1:1\"\nlisten_port = 2\n").expect_err("must fail");
    assert_eq!(err.path, "proxy.listen_port");
    assert!(err.message.contains("listen_port"), "{err}");
    let err = parse("[[routes]]\nname=\"a\"\npath_prefix=\"/\"\nupstream=\"http://h:1\"\nscope=\"s\"\nscopes=[]\n").expect_err("must fail");
    assert!(err.path.starts_with("routes[0]"), "{err}");
    assert!(parse("[nonsense]\n").is_err());
}

#[test]
fn invalid_values_name_the_exact_setting() {
    let cases = [
        ("[database]\nrefresh_interval = \"soon\"", "database.refresh_interval"),
        ("[database]\nurl = \"mysql://x\"", "database.url"),
        ("[proxy]\nlisten = \"localhost\"", "proxy.listen"),
        ("[last_used]\nflush_interval = \"2m\"", "last_used.flush_interval"),
        ("[hashing]\nmemory_kib = 1", "hashing.memory_kib"),
        ("[hashing]\nmemory_kib = 15\nparallelism = 2", "hashing.memory_kib"),
        ("[hashing]\niterations = 0", "hashing.iterations"),
        ("[hashing]\nparallelism = 0", "hashing.parallelism"),
        ("[hashing]\nparallelism = 16777216", "hashing.parallelism"),
        ("[log]\nformat = \"xml\"", "log.format"),
        ("[[routes]]\nname=\"a\"\npath_prefix=\"/x/../y\"\nupstream=\"http://h:1\"\nscope=\"s\"", "routes[0].path_prefix"),
        ("[[routes]]\nname=\"a\"\npath_prefix=\"/x\"\nupstream=\"http://h:1/base\"\nscope=\"s\"", "routes[0].upstream"),
        ("[[routes]]\nname=\"a\"\npath_prefix=\"/x\"\nupstream=\"http://h:1\"\nscope=\"bad scope\"", "routes[0].scope"),
        ("[[routes]]\nname=\"a\"\npath_prefix=\"/x\"\nmethods=[\"get\"]\nupstream=\"http://h:1\"\nscope=\"s\"", "routes[0].methods[0]"),
    ];
    for (toml, path) in cases {
        let err = parse(toml).expect_err(toml);
        assert_eq!(err.path, path, "{toml}: {err}");
    }
}

#[test]
fn routes_must_not_collide() {
    let two = "[[routes]]\nname=\"a\"\npath_prefix=\"/x\"\nupstream=\"http://h:1\"\nscope=\"s\"\n\
               [[routes]]\nname=\"b\"\npath_prefix=\"/x/\"\nmethods=[\"GET\"]\nupstream=\"http://h:1\"\nscope=\"s\"\n";
    let err = parse(two).expect_err("must fail");
    assert_eq!(err.path, "routes[1].path_prefix");
    let dup = two.replace("name=\"b\"", "name=\"a\"").replace("/x/", "/y");
    assert_eq!(parse(&dup).expect_err("must fail").path, "routes[1].name");
}

#[test]
fn environment_variables_override_the_file() {
    let c = parse_env(
        "[database]\nurl = \"sqlite://a.db\"\n",
        &[
            ("KEYGATE_DATABASE_URL", "postgres://u:secret@db/keys"),
            ("KEYGATE_LAST_USED_FLUSH_INTERVAL", "5s"),
            ("KEYGATE_DATABASE_MAX_CONNECTIONS", "3"),
            ("KEYGATE_CONFIG", "ignored.toml"),
            ("HOME", "/root"),
        ],
    )
    .expect("valid");
    assert!(c.database.url.is_postgres());
    assert_eq!(c.last_used.flush_interval, Duration::from_secs(5));
    assert_eq!(c.database.max_connections, 3);
    let err = parse_env("", &[("KEYGATE_NOPE", "1")]).expect_err("must fail");
    assert_eq!(err.path, "KEYGATE_NOPE");
}

#[test]
fn database_passwords_never_show() {
    let url = DatabaseUrl::new("postgres://keygate:hunter2@db:5432/keys").expect("valid");
    assert_eq!(url.to_string(), "postgres://keygate:***@db:5432/keys");
    assert!(!format!("{url:?}").contains("hunter2"));
}

#[test]
fn syntax_errors_give_the_line() {
    let err = parse("[proxy]\nlisten = \n").expect_err("must fail");
    assert!(err.message.contains("line 2"), "{err}");
}

#[test]
fn fleet_settings_default_to_serving_the_last_table_forever() {
    let c = parse("").expect("valid");
    assert_eq!(c.database.max_staleness, None);
    assert_eq!(c.database.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(c.proxy.shutdown_delay, Duration::ZERO);
    let c = parse("[database]\nmax_staleness = \"5m\"\n[proxy]\nshutdown_delay = \"5s\"\n")
        .expect("valid");
    assert_eq!(c.database.max_staleness, Some(Duration::from_secs(300)));
    assert_eq!(c.proxy.shutdown_delay, Duration::from_secs(5));
}

#[test]
fn max_staleness_must_outlast_the_refresh_interval() {
    let err = parse("[database]\nrefresh_interval = \"2s\"\nmax_staleness = \"1s\"\n")
        .expect_err("must fail");
    assert_eq!(err.path, "database.max_staleness");
    let err = parse("[database]\nmax_staleness = \"soon\"\n").expect_err("must fail");
    assert_eq!(err.path, "database.max_staleness");
}

#[test]
fn per_account_metric_labels_are_opt_in_from_the_file_or_the_environment() {
    assert!(
        parse("[metrics]\nper_account_labels = true")
            .expect("valid")
            .metrics
            .per_account_labels
    );
    let from_env = parse_env("", &[("KEYGATE_METRICS_PER_ACCOUNT_LABELS", "true")]).expect("valid");
    assert!(from_env.metrics.per_account_labels);
    let err = parse("[metrics]\nper_account_labels = \"yes\"").expect_err("not a boolean");
    assert_eq!(err.path, "metrics.per_account_labels");
    let err = parse("[metrics]\nper_route_labels = true").expect_err("unknown");
    assert_eq!(err.path, "metrics.per_route_labels");
}

#[test]
fn route_audit_modes_are_parsed_and_bad_ones_named() {
    let route = |audit: &str| {
        format!("[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\nscope = \"a:b\"\n{audit}")
    };
    let mode = |audit: &str| parse(&route(audit)).expect("valid").routes[0].audit;
    assert_eq!(mode(""), AuditMode::Writes);
    assert_eq!(mode("audit = \"none\""), AuditMode::None);
    assert_eq!(mode("audit = \"all\""), AuditMode::All);
    let err = parse(&route("audit = \"some\"")).expect_err("must fail");
    assert_eq!(err.path, "routes[0].audit");
    assert!(AuditMode::Writes.covers(&http::Method::POST));
    assert!(!AuditMode::Writes.covers(&http::Method::GET));
    assert!(AuditMode::All.covers(&http::Method::GET));
    assert!(!AuditMode::None.covers(&http::Method::DELETE));
}

#[test]
fn admin_durations_are_validated() {
    let err = parse("[admin]\nsession_idle_timeout = \"soon\"\n").expect_err("must fail");
    assert_eq!(err.path, "admin.session_idle_timeout");
    let c = parse_env(
        "",
        &[
            ("KEYGATE_ADMIN_SECURE_COOKIES", "true"),
            ("KEYGATE_ADMIN_STALE_AFTER", "7d"),
        ],
    )
    .expect("valid");
    assert!(c.admin.secure_cookies);
    assert_eq!(c.admin.stale_after, Duration::from_secs(7 * 86_400));
}

#[test]
fn the_example_file_shows_the_hostile_traffic_limits_at_their_defaults() {
    let example = parse(include_str!("../../config.example.toml")).expect("valid");
    let defaults = Config::default();
    let (e, d) = (&example.proxy.limits, &defaults.proxy.limits);
    assert_eq!(e.tls_handshake_timeout, d.tls_handshake_timeout);
    assert_eq!(e.max_connections, d.max_connections);
    assert_eq!(e.max_header_bytes, d.max_header_bytes);
    assert_eq!(e.max_headers, d.max_headers);
    assert_eq!(e.h2_max_concurrent_streams, d.h2_max_concurrent_streams);
    assert_eq!(
        e.h2_max_pending_reset_streams,
        d.h2_max_pending_reset_streams
    );
    assert_eq!(
        e.h2_max_local_error_reset_streams,
        d.h2_max_local_error_reset_streams
    );
    assert!(
        example.proxy.tls.is_none(),
        "TLS is an example, commented out"
    );
    let (e, d) = (&example.verification, &defaults.verification);
    assert_eq!(e.failure_window, d.failure_window);
    assert_eq!(e.prefix_failure_budget, d.prefix_failure_budget);
    assert_eq!(e.client_failure_budget, d.client_failure_budget);
}

#[test]
fn max_header_bytes_below_what_http1_can_enforce_is_refused_with_the_reason() {
    let err = parse("[proxy]\nmax_header_bytes = 8191\n").expect_err("below 8192");
    assert_eq!(err.path, "proxy.max_header_bytes");
    assert!(err.message.contains("at least 8192"), "{err}");
    assert!(err.message.contains("HTTP/1.1"), "{err}");
    let ok = parse("[proxy]\nmax_header_bytes = 8192\n").expect("the minimum is valid");
    assert_eq!(ok.proxy.limits.max_header_bytes, 8192);
}

#[test]
fn listener_tls_needs_both_files_and_bad_limits_name_their_setting() {
    let err = parse("[proxy.tls]\ncert_file = \"c.pem\"\n").expect_err("key_file missing");
    assert!(err.to_string().contains("key_file"), "{err}");
    let err = parse("[proxy]\nmax_connections = 0\n").expect_err("zero");
    assert_eq!(err.path, "proxy.max_connections");
    let err = parse("[verification]\nprefix_failure_budget = 0\n").expect_err("zero");
    assert_eq!(err.path, "verification.prefix_failure_budget");
    let ok = parse("[proxy.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n").expect("valid");
    let tls = ok.proxy.tls.expect("tls");
    assert_eq!(tls.watch_interval, Duration::from_secs(5));
}

#[test]
fn gateway_scopes_are_scopes_some_route_requires() {
    let route =
        "[[routes]]\nname=\"a\"\npath_prefix=\"/a\"\nupstream=\"http://h:1\"\nscope=\"a:read\"\n";
    assert!(
        Config::default().gateways.scopes.is_empty(),
        "none by default"
    );
    let ok = parse(&format!(
        "[gateways]\nscopes = [\"a:read\", \"a:read\"]\n{route}"
    ))
    .expect("valid");
    assert_eq!(ok.gateways.scopes.joined(), "a:read");
    let err = parse(&format!(
        "[gateways]\nscopes = [\"a:read\", \"b:write\"]\n{route}"
    ))
    .expect_err("unrouted");
    assert_eq!(err.path, "gateways.scopes[1]");
    assert!(err.message.contains("b:write"), "{err}");
    let err = parse("[gateways]\nscopes = [\"no spaces\"]\n").expect_err("not a scope");
    assert_eq!(err.path, "gateways.scopes[0]");
    assert_eq!(
        parse("[gateways]\nscope = []\n").expect_err("unknown").path,
        "gateways.scope"
    );
    let env = parse_env("", &[("KEYGATE_GATEWAYS_SCOPES", "[\"x:read\"]")])
        .expect("from the environment");
    assert_eq!(env.gateways.scopes.joined(), "x:read");
}

#[test]
fn kubernetes_service_link_variables_are_ignored_and_typos_still_fail() {
    // What a pod gets for Services named keygate, keygate-proxy and keygate-admin.
    let links = [
        ("KEYGATE_PORT", "tcp://10.0.0.7:8080"),
        ("KEYGATE_SERVICE_HOST", "10.0.0.7"),
        ("KEYGATE_SERVICE_PORT", "8080"),
        ("KEYGATE_SERVICE_PORT_HTTP", "8080"),
        ("KEYGATE_PORT_8080_TCP", "tcp://10.0.0.7:8080"),
        ("KEYGATE_PORT_8080_TCP_ADDR", "10.0.0.7"),
        ("KEYGATE_PORT_8080_TCP_PORT", "8080"),
        ("KEYGATE_PORT_8080_TCP_PROTO", "tcp"),
        ("KEYGATE_PROXY_PORT", "tcp://10.0.0.8:443"),
        ("KEYGATE_PROXY_SERVICE_HOST", "10.0.0.8"),
        ("KEYGATE_PROXY_SERVICE_PORT", "443"),
        ("KEYGATE_PROXY_PORT_443_TCP_ADDR", "10.0.0.8"),
        ("KEYGATE_ADMIN_PORT", "tcp://10.0.0.9:9090"),
        ("KEYGATE_ADMIN_SERVICE_PORT_HTTP", "9090"),
        ("KEYGATE_ADMIN_SERVICE_PORT_METRICS_HTTP", "9090"),
        ("KEYGATE_ADMIN_PORT_9090_UDP_PROTO", "udp"),
        ("KEYGATE_ADMIN_PORT_9090_SCTP", "sctp://10.0.0.9:9090"),
        ("KEYGATE_PROXY_LISTEN", "0.0.0.0:8080"),
    ];
    let c = parse_env("", &links).expect("service links do not stop keygate");
    assert_eq!(c.proxy.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.ignored_env.len(), links.len() - 1, "{:?}", c.ignored_env);
    assert!(c.ignored_env.iter().all(|n| n != "KEYGATE_PROXY_LISTEN"));

    for typo in [
        "KEYGATE_PROXY_LISTN",
        "KEYGATE_PROXY_LISTEN_ADDR",
        "KEYGATE_DATABASE_URI",
        "KEYGATE_PORTS",
        "KEYGATE_PORT_8080",
        "KEYGATE_PORT_HTTP_TCP",
        "KEYGATE_PORT_8080_TCP_HOST",
        "KEYGATE_SERVICE_PORT_",
    ] {
        let err = parse_env("", &[(typo, "1")]).expect_err(typo);
        assert_eq!(err.path, typo, "{err}");
        assert!(err.message.contains("does not name a setting"), "{err}");
    }
}

#[test]
fn no_setting_is_named_like_a_kubernetes_service_link() {
    let settings = env::settings();
    assert!(
        settings.len() > 40,
        "the walk found every setting: {settings:?}"
    );
    for s in &settings {
        let name = env::variable(s);
        assert!(
            !env::is_service_link(&name),
            "{name} would be ignored as a Kubernetes service link"
        );
    }
    let mut names: Vec<String> = settings.iter().map(|s| env::variable(s)).collect();
    names.sort();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "two settings share a variable name");
}

#[test]
fn every_setting_can_come_from_the_environment_nested_ones_included() {
    let c = parse_env(
        "",
        &[
            ("KEYGATE_PROXY_TLS_CERT_FILE", "/etc/keygate/cert.pem"),
            ("KEYGATE_PROXY_TLS_KEY_FILE", "/etc/keygate/key.pem"),
            ("KEYGATE_PROXY_TLS_WATCH_INTERVAL", "30s"),
            ("KEYGATE_PROXY_TLS_HANDSHAKE_TIMEOUT", "3s"),
        ],
    )
    .expect("valid");
    let tls = c.proxy.tls.expect("[proxy.tls] from the environment");
    assert_eq!(tls.cert_file, Path::new("/etc/keygate/cert.pem"));
    assert_eq!(tls.key_file, Path::new("/etc/keygate/key.pem"));
    assert_eq!(tls.watch_interval, Duration::from_secs(30));
    assert_eq!(c.proxy.limits.tls_handshake_timeout, Duration::from_secs(3));

    // The environment wins over the file inside a nested table too.
    let c = parse_env(
        "[proxy.tls]\ncert_file = \"a.pem\"\nkey_file = \"b.pem\"\n",
        &[("KEYGATE_PROXY_TLS_KEY_FILE", "c.pem")],
    )
    .expect("valid");
    let tls = c.proxy.tls.expect("tls");
    assert_eq!(
        (tls.cert_file.as_path(), tls.key_file.as_path()),
        (Path::new("a.pem"), Path::new("c.pem"))
    );

    // Every setting the walk finds maps back onto itself (a table of its own where nested).
    let settings = env::settings();
    assert!(settings.contains(&vec!["proxy", "tls", "watch_interval"]));
    assert!(settings.contains(&vec!["gateways", "scopes"]));
    assert!(
        !settings.iter().any(|s| s[0] == "routes"),
        "routes are file-only"
    );
}

#[test]
fn hashing_below_the_owasp_minimum_is_a_warning_not_an_error() {
    assert!(
        Config::default().warnings.is_empty(),
        "the defaults are OWASP's minimum"
    );
    for ok in [
        "memory_kib = 47104\niterations = 1",
        "memory_kib = 7168\niterations = 5",
    ] {
        let c = parse(&format!("[hashing]\n{ok}\n")).expect("valid");
        assert!(c.warnings.is_empty(), "{ok}: {:?}", c.warnings);
    }
    for weak in [
        "memory_kib = 1024\niterations = 1",
        "memory_kib = 19455",
        "iterations = 1",
    ] {
        let c = parse(&format!("[hashing]\n{weak}\n")).expect("cheap hashing is allowed");
        assert_eq!(c.warnings.len(), 1, "{weak}");
        assert!(
            c.warnings[0].starts_with("hashing.memory_kib = ") && c.warnings[0].contains("OWASP"),
            "{}",
            c.warnings[0]
        );
    }
}
