//! What SREs and ops see: a live `/metrics` scrape checked by promtool and by value, the alert
//! rules and dashboard checked against it, the references checked against the config and the
//! scrape, the Kubernetes kit and the image checked against their own configuration (their
//! command lines run by the real binary), and the real binary's logs at trace level checked
//! for keys, hashes and passwords.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keygate::config::{Config, DatabaseUrl};
use keygate::keys::{generate, KeyKind};
use keygate::store::Store;

use crate::both_engines;
use crate::harness::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Runs promtool (Debian package `prometheus`); a missing promtool fails the test.
fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (Debian package `prometheus`; .ci/run installs it)");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write to promtool");
    }
    drop(input);
    child.wait_with_output().expect("promtool runs")
}

/// The value of one exact series line (`name{labels}`) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Every metric family a scrape declares with `# TYPE`.
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every `keygate_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("keygate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if end > "keygate_".len() {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The family a queried series belongs to (`_bucket`, `_sum`, `_count` of a histogram).
fn family_of<'a>(name: &'a str, known: &BTreeSet<String>) -> Option<&'a str> {
    if known.contains(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|base| known.contains(*base))
}

fn requests(route: &str, method: &str, outcome: &str, reason: &str, class: &str) -> String {
    format!(
        r#"keygate_requests_total{{method="{method}",outcome="{outcome}",reason="{reason}",route="{route}",status_class="{class}"}}"#
    )
}

async fn scrape(app: &TestApp) -> String {
    let r = app.admin_get("/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-type"], "text/plain; version=0.0.4",
        "the Prometheus text format"
    );
    r.text()
}

/// A well-formed key (valid checksum) with `prefix` and a secret that is not the real one.
fn forge(prefix: &str) -> String {
    let other = generate(KeyKind::ServiceAccount);
    keygate::keys::with_checksum(&format!("{prefix}_{}", &other.expose()[9..41]))
}

/// Sends a request with the key in `X-Api-Key`.
async fn call(app: &TestApp, method: &str, path: &str, key: Option<&str>) -> TestResponse {
    let mut req = http::Request::builder().method(method).uri(app.url(path));
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    app.send(req.body(empty()).expect("request")).await
}

both_engines! {
    async fn a_live_scrape_counts_every_outcome_and_passes_promtool(engine: Engine) {
        let app = spawn_app(engine).await;
        let account = app.create_account("billing").await;
        let good = app.create_key(&account, "good", &["recordings:read"]).await;
        let revoked = app.create_key(&account, "old", &["recordings:read"]).await;
        let expired = app
            .create_key_expiring(&account, "short", &["recordings:read"], Some(app.manager.now_ms() + 300))
            .await;
        let record = app
            .manager
            .key_by_prefix(revoked.key.prefix().as_str())
            .await
            .expect("record");
        app.manager
            .revoke_key(&record, &keygate::manage::Actor::cli())
            .await
            .expect("revoke");
        let good = good.key.expose().to_string();
        let (revoked, expired) = (revoked.key.expose().to_string(), expired.key.expose().to_string());
        // Wait for the revocation to reach the table, without ever sending the revoked key
        // while it was still live (so the argon2 count below is exact).
        let table = app.keygate.as_ref().expect("running").table.clone();
        let prefix = keygate::keys::KeyPrefix::parse(&revoked[..8]).expect("prefix");
        wait_until(Duration::from_secs(5), || {
            table.lookup(&prefix).map(|e| e.state(i64::MAX / 2)) == Some(keygate::keys::KeyState::Revoked)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        assert_eq!(call(&app, "GET", "/recordings/1", Some(&good)).await.status, 200);
        assert_eq!(call(&app, "HEAD", "/recordings/1", Some(&good)).await.status, 200);
        assert_eq!(call(&app, "GET", "/recordings/1", None).await.status, 401);
        assert_eq!(call(&app, "GET", "/recordings/1", Some("kgs_not_a_key")).await.status, 401);
        let unknown = generate(KeyKind::ServiceAccount);
        assert_eq!(call(&app, "GET", "/recordings/1", Some(unknown.expose())).await.status, 401);
        assert_eq!(call(&app, "GET", "/recordings/1", Some(&forge(&good[..8]))).await.status, 401);
        assert_eq!(call(&app, "GET", "/recordings/1", Some(&expired)).await.status, 401);
        assert_eq!(call(&app, "GET", "/recordings/1", Some(&revoked)).await.status, 401);
        assert_eq!(call(&app, "POST", "/tickets/1", Some(&good)).await.status, 403);
        assert_eq!(call(&app, "GET", "/nowhere", Some(&good)).await.status, 404);
        assert_eq!(call(&app, "GET", "/recordings//1", Some(&good)).await.status, 400);
        // Credentials are read after routing: two of them are a bad_request on the route.
        let two_keys = http::Request::builder()
            .uri(app.url("/recordings/1"))
            .header("authorization", format!("Bearer {good}"))
            .header("x-api-key", &good)
            .body(empty())
            .expect("request");
        assert_eq!(app.send(two_keys).await.status, 400);

        let text = scrape(&app).await;
        let allowed = 2.0;
        let expect = [
            (requests("recordings-read", "read", "allowed", "none", "2xx"), allowed),
            (requests("recordings-read", "read", "unauthorized", "revoked", "4xx"), 1.0),
            (requests("recordings-read", "read", "unauthorized", "missing", "4xx"), 1.0),
            (requests("recordings-read", "read", "unauthorized", "malformed", "4xx"), 1.0),
            // An unknown prefix and a wrong secret are both `unknown`.
            (requests("recordings-read", "read", "unauthorized", "unknown", "4xx"), 2.0),
            (requests("recordings-read", "read", "unauthorized", "expired", "4xx"), 1.0),
            (requests("tickets", "write", "forbidden", "insufficient_scope", "4xx"), 1.0),
            (requests("(none)", "read", "not_found", "none", "4xx"), 1.0),
            (requests("(none)", "read", "bad_request", "none", "4xx"), 1.0),
            (requests("recordings-read", "read", "bad_request", "none", "4xx"), 1.0),
        ];
        for (series, value) in &expect {
            assert_eq!(sample(&text, series), Some(*value), "{series} in:\n{text}");
        }
        assert!(!text.contains(&good[..8]), "a key prefix must never be a label");
        assert!(!text.contains("billing"), "no account label unless turned on");

        // One argon2 run for the good key, one for the forged secret; the repeat was cached.
        assert_eq!(sample(&text, "keygate_argon2_duration_seconds_count"), Some(2.0), "{text}");
        assert!(sample(&text, "keygate_verification_cache_hits_total").expect("hits") >= 2.0);
        assert!(sample(&text, "keygate_verification_cache_misses_total").expect("misses") >= 2.0);
        assert_eq!(sample(&text, r#"keygate_table_keys{kind="service_account"}"#), Some(3.0));
        assert_eq!(sample(&text, r#"keygate_table_keys{kind="gateway"}"#), Some(0.0));
        assert_eq!(sample(&text, "keygate_table_loaded"), Some(1.0));
        assert!(sample(&text, "keygate_table_age_seconds").expect("age") < 5.0);
        assert!(sample(&text, "keygate_table_refresh_duration_seconds_count").expect("refreshes") >= 1.0);
        assert_eq!(sample(&text, "keygate_requests_in_flight"), Some(0.0));
        assert_eq!(
            sample(&text, r#"keygate_upstream_duration_seconds_count{route="recordings-read"}"#),
            Some(allowed)
        );
        // Every request above was timed, whatever its outcome.
        assert_eq!(sample(&text, "keygate_auth_duration_seconds_count"), Some(12.0));
        assert_eq!(
            sample(&text, &format!(r#"keygate_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION"))),
            Some(1.0)
        );

        // The last-used writer flushes within its interval and is timed.
        let started = Instant::now();
        loop {
            let text = scrape(&app).await;
            if sample(&text, r#"keygate_queue_flush_duration_seconds_count{queue="last_used"}"#) >= Some(1.0) {
                assert_eq!(sample(&text, r#"keygate_queue_depth{queue="last_used"}"#), Some(0.0));
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "no last_used flush counted:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let out = promtool(&["check", "metrics"], Some(&text));
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics found problems:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connection_errors_and_timeouts_are_counted_per_route() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    // Nothing listens there any more: connections are refused.
    let app = spawn_app_with(
        Engine::Sqlite,
        AppOptions {
            upstream_timeout: "300ms",
            extra_toml: format!(
                "[[routes]]\nname = \"dead\"\npath_prefix = \"/dead\"\nupstream = \"http://{closed}\"\nscope = \"tickets:write\"\n"
            ),
            ..AppOptions::default()
        },
    )
    .await;
    let account = app.create_account("ops").await;
    let key = app.create_key(&account, "k", &["tickets:write"]).await;
    let key = key.key.expose();
    assert_eq!(call(&app, "POST", "/dead/x", Some(key)).await.status, 502);
    assert_eq!(
        call(&app, "POST", "/tickets/slow?ms=2000", Some(key))
            .await
            .status,
        504
    );
    let text = scrape(&app).await;
    assert_eq!(
        sample(
            &text,
            r#"keygate_upstream_errors_total{kind="connect",route="dead"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"keygate_upstream_errors_total{kind="timeout",route="tickets"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            &requests("dead", "write", "upstream_error", "unreachable", "5xx")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            &requests("tickets", "write", "upstream_error", "timeout", "5xx")
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_on_the_upstream_is_in_flight_once_whether_its_key_was_cold_or_warm() {
    let app = spawn_app(Engine::Sqlite).await;
    let account = app.create_account("ops").await;
    let issued = app.create_key(&account, "k", &["recordings:read"]).await;
    let key = issued.key.expose();
    app.wait_for_key(&key[..8]).await;
    // The first request verifies the key (its own future), the second finds it verified.
    for round in ["cold key", "warm key"] {
        let (response, during) = tokio::join!(
            call(&app, "GET", "/recordings/slow?ms=1500", Some(key)),
            async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                sample(&scrape(&app).await, "keygate_requests_in_flight")
            }
        );
        assert_eq!(response.status, 200, "{round}");
        assert_eq!(
            during,
            Some(1.0),
            "{round}: in flight while the upstream answers"
        );
        let after = sample(&scrape(&app).await, "keygate_requests_in_flight");
        assert_eq!(after, Some(0.0), "{round}: nothing in flight once answered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_account_labels_appear_only_when_the_operator_turns_them_on() {
    let app = spawn_app_with(
        Engine::Sqlite,
        AppOptions {
            extra_toml: "[metrics]\nper_account_labels = true\n".into(),
            ..AppOptions::default()
        },
    )
    .await;
    let account = app.create_account("billing").await;
    let key = app.create_key(&account, "k", &["recordings:read"]).await;
    assert_eq!(
        call(&app, "GET", "/recordings/1", Some(key.key.expose()))
            .await
            .status,
        200
    );
    let text = scrape(&app).await;
    assert_eq!(
        sample(
            &text,
            r#"keygate_account_requests_total{account="billing",outcome="allowed"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn the_alert_rules_pass_promtool_check_rules_and_their_unit_tests() {
    let path = repo("deploy/prometheus/keygate-alerts.yml");
    let out = promtool(
        &["check", "rules", path.to_str().expect("utf-8 path")],
        None,
    );
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");

    // The rules' own unit tests: each alert fires on the series it is meant for, not before.
    let tests = repo("deploy/prometheus/keygate-alerts.test.yml");
    let out = promtool(
        &["test", "rules", tests.to_str().expect("utf-8 path")],
        None,
    );
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = read("deploy/prometheus/keygate-alerts.yml");
    for alert in [
        "KeygateHighUnauthorizedRate",
        "KeygateHighForbiddenRate",
        "KeygateKeyTableStale",
        "KeygateKeyTableRefreshFailing",
        "KeygateQueueDroppingRecords",
        "KeygateUpstreamErrors",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_alerts_and_metrics_reference_match_a_live_scrape() {
    let app = spawn_app(Engine::Sqlite).await;
    let account = app.create_account("billing").await;
    let key = app.create_key(&account, "k", &["recordings:read"]).await;
    call(&app, "GET", "/recordings/1", Some(key.key.expose())).await;
    call(&app, "GET", "/recordings/1", None).await;
    let text = scrape(&app).await;
    let mut live = families(&text);
    assert!(live.len() >= 20, "{live:?}");

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/keygate-dashboard.json"))
            .expect("the dashboard is valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("each target has an expr");
            queried.extend(metric_names(expr));
        }
    }
    assert!(queried.len() >= 12, "{queried:?}");
    for name in &queried {
        assert!(
            family_of(name, &live).is_some(),
            "the dashboard queries `{name}`, which a live scrape does not have"
        );
    }

    let rules = read("deploy/prometheus/keygate-alerts.yml");
    for name in metric_names(&rules) {
        assert!(
            family_of(&name, &live).is_some(),
            "an alert rule queries `{name}`, which a live scrape does not have"
        );
    }

    // The reference documents every family, including the opt-in per-account one.
    live.insert("keygate_account_requests_total".into());
    let reference = read("docs/reference/metrics.md");
    for name in &live {
        assert!(
            reference.contains(&format!("`{name}`")),
            "docs/reference/metrics.md does not document `{name}`"
        );
    }
    for name in metric_names(&reference) {
        assert!(
            family_of(&name, &live).is_some() || name.starts_with("keygate_requests_total"),
            "docs/reference/metrics.md names `{name}`, which keygate does not export"
        );
    }
}

#[test]
fn the_configuration_reference_covers_every_setting_of_the_example() {
    let example: toml::Table =
        toml::from_str(&read("config.example.toml")).expect("the example is TOML");
    let reference = read("docs/reference/configuration.md");
    let mut checked = 0;
    for (section, value) in &example {
        match value {
            toml::Value::Table(settings) => {
                for setting in settings.keys() {
                    let name = format!("`{section}.{setting}`");
                    assert!(
                        reference.contains(&name),
                        "{name} is not in the configuration reference"
                    );
                    checked += 1;
                }
            }
            toml::Value::Array(routes) => {
                for route in routes {
                    for field in route.as_table().expect("route table").keys() {
                        let name = format!("`{section}[].{field}`");
                        assert!(
                            reference.contains(&name),
                            "{name} is not in the configuration reference"
                        );
                        checked += 1;
                    }
                }
            }
            _ => panic!("config.example.toml: `{section}` is not a section"),
        }
    }
    assert!(checked >= 25, "only {checked} settings found");
}

/// The `keygate.toml: |` block of the ConfigMap, de-indented.
fn configmap_toml(manifest: &str) -> String {
    let mut lines = manifest
        .lines()
        .skip_while(|l| l.trim() != "keygate.toml: |");
    lines.next().expect("the ConfigMap has keygate.toml");
    let body: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .collect();
    body.iter()
        .map(|l| l.get(4..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The number after `key:` on the first line that has it.
fn yaml_number(manifest: &str, key: &str) -> u64 {
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("`{key}` not found in the manifest"))
}

#[test]
fn the_kubernetes_kit_agrees_with_its_own_configuration() {
    let manifest = read("deploy/kubernetes/keygate.yaml");
    let config = Config::from_toml(
        &configmap_toml(&manifest),
        "ConfigMap keygate.toml",
        [(
            "KEYGATE_DATABASE_URL".to_string(),
            "postgres://keygate:secret@db/keygate".to_string(),
        )],
    )
    .expect("the ConfigMap's keygate.toml is a valid configuration");

    let grace = config.proxy.shutdown_grace.as_secs();
    let pre_stop = yaml_number(&manifest, "seconds:");
    let termination = yaml_number(&manifest, "terminationGracePeriodSeconds:");
    assert!(
        termination >= pre_stop + grace,
        "terminationGracePeriodSeconds {termination} must cover the preStop sleep {pre_stop}s and proxy.shutdown_grace {grace}s"
    );
    assert_eq!(
        yaml_number(&manifest, "- containerPort:"),
        u64::from(config.proxy.listen.port()),
        "the first container port is keygate's proxy port"
    );
    let admin_port = config.admin.listen.port().to_string();
    for probe in ["path: /readyz", "path: /healthz"] {
        assert!(manifest.contains(probe), "{probe} probe missing");
    }
    assert!(manifest.contains(&format!("containerPort: {admin_port}")));
    assert!(
        config.proxy.listen.ip().is_unspecified() && config.admin.listen.ip().is_unspecified(),
        "in a pod keygate must listen on the pod address for the Service and the kubelet"
    );
    for needle in [
        "name: KEYGATE_DATABASE_URL",
        "secretKeyRef:",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "kind: Service",
        "targetPort: proxy",
        "requests:",
        "enableServiceLinks: false",
    ] {
        assert!(
            manifest.contains(needle),
            "`{needle}` missing from the manifest"
        );
    }
    // The upstream is only reachable through keygate: it listens on loopback.
    for route in &config.routes {
        assert_eq!(
            route.upstream.authority.host(),
            "127.0.0.1",
            "{}",
            route.name
        );
    }

    let unit = read("deploy/systemd/keygate.service");
    let stop = yaml_number(&unit.replace('=', ": "), "TimeoutStopSec:");
    assert!(
        stop > Config::default().proxy.shutdown_grace.as_secs(),
        "TimeoutStopSec must exceed the default shutdown_grace"
    );
    for needle in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "DynamicUser=yes",
    ] {
        assert!(unit.contains(needle), "`{needle}` missing from the unit");
    }
}

/// The last stage of a Dockerfile: what the image is.
fn final_stage(dockerfile: &str) -> &str {
    let at = dockerfile
        .rfind("\nFROM ")
        .expect("the Dockerfile has a FROM");
    &dockerfile[at..]
}

/// The JSON array of the stage's last `ENTRYPOINT [...]` or `CMD [...]` (the one that counts).
fn dockerfile_array(stage: &str, instruction: &str) -> Vec<String> {
    let text = stage
        .lines()
        .filter_map(|l| l.strip_prefix(instruction)?.strip_prefix(' '))
        .next_back()
        .unwrap_or_else(|| panic!("no {instruction} in the image"));
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{instruction} {text}: not a JSON array (exec form): {e}"))
}

/// The stage's `ENV KEY=VALUE ...` settings, continuation lines joined.
fn dockerfile_env(stage: &str) -> Vec<(String, String)> {
    let joined = stage.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.first() {
                Some(w) if !w.contains('=') => vec![(w.to_string(), words[1..].join(" "))],
                _ => words
                    .iter()
                    .map(|w| {
                        let (k, v) = w.split_once('=').expect("ENV KEY=VALUE");
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect(),
            }
        })
        .collect()
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The lines of the YAML block under `lines[at]`: those after it indented deeper (blank and
/// comment lines left out).
fn yaml_block<'a>(lines: &[&'a str], at: usize) -> Vec<&'a str> {
    let depth = indent(lines[at]);
    lines[at + 1..]
        .iter()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .take_while(|l| indent(l) > depth)
        .copied()
        .collect()
}

/// The lines of the Deployment's container `name` (its `- name:` line first).
fn container<'a>(manifest: &'a str, name: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = manifest.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("- name: {name}"))
        .unwrap_or_else(|| panic!("no container {name}"));
    // The `- ` belongs to the list: the container's keys sit two columns deeper.
    let keys = indent(lines[at]) + 2;
    let mut block = vec![lines[at]];
    block.extend(
        lines[at + 1..]
            .iter()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .take_while(|l| {
                indent(l) >= keys && !(indent(l) == keys && l.trim().starts_with("- "))
            }),
    );
    block
}

/// `key: value` among a container's own keys (not nested ones), quotes removed.
fn yaml_value(lines: &[&str], key: &str) -> Option<String> {
    let keys = indent(lines[0]) + 2;
    lines.iter().find_map(|l| {
        // A key after a list's dash (`- name: keygate`) sits two columns right of the dash.
        let (at, text) = match l.trim_start().strip_prefix("- ") {
            Some(text) => (indent(l) + 2, text),
            None => (indent(l), l.trim_start()),
        };
        let value = text.strip_prefix(key)?.strip_prefix(':')?.trim();
        (at == keys).then(|| value.trim_matches('"').to_string())
    })
}

/// The value under `path` (e.g. `["resources", "limits", "cpu"]`) in a container.
fn yaml_path(lines: &[&str], path: &[&str]) -> Option<String> {
    let (last, parents) = path.split_last().expect("a path");
    let mut scope: Vec<&str> = lines.to_vec();
    for parent in parents {
        let depth = scope.iter().map(|l| indent(l)).min()?;
        let at = scope
            .iter()
            .position(|l| indent(l) <= depth + 2 && l.trim() == format!("{parent}:"))?;
        scope = yaml_block(&scope, at);
    }
    let depth = scope.iter().map(|l| indent(l)).min()?;
    scope.iter().find_map(|l| {
        let v = l.trim().strip_prefix(last)?.strip_prefix(':')?.trim();
        (indent(l) == depth).then(|| v.trim_matches('"').to_string())
    })
}

/// `command:` or `args:` of a container, written as a JSON flow sequence.
fn container_array(lines: &[&str], key: &str) -> Option<Vec<String>> {
    let text = yaml_value(lines, key)?;
    Some(
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{key}: {text}: write it as [\"...\"] ({e})")),
    )
}

/// A container's `env`: literal values, and `secretKeyRef`s read from the manifest's Secret.
fn container_env(manifest: &str, lines: &[&str]) -> Vec<(String, String)> {
    let Some(at) = lines.iter().position(|l| l.trim() == "env:") else {
        return Vec::new();
    };
    let block = yaml_block(lines, at);
    let item = block.iter().map(|l| indent(l)).min().unwrap_or(0);
    let mut env = Vec::new();
    for (i, line) in block.iter().enumerate() {
        let Some(name) = line.trim().strip_prefix("- name:") else {
            continue;
        };
        let entry: Vec<&str> = block[i + 1..]
            .iter()
            .take_while(|l| indent(l) > item)
            .copied()
            .collect();
        let field = |key: &str| {
            entry.iter().find_map(|l| {
                Some(
                    l.trim()
                        .strip_prefix(key)?
                        .trim()
                        .trim_matches('"')
                        .to_string(),
                )
            })
        };
        let value = match field("value:") {
            Some(v) => v,
            None => {
                let key = field("key:").expect("a literal value or a secretKeyRef");
                secret_value(manifest, &key)
            }
        };
        env.push((name.trim().to_string(), value));
    }
    env
}

/// `stringData.<key>` of the manifest's Secret.
fn secret_value(manifest: &str, key: &str) -> String {
    let secret = manifest
        .split("\n---")
        .find(|doc| doc.contains("\nkind: Secret"))
        .expect("the manifest has a Secret");
    secret
        .lines()
        .find_map(|l| Some(l.trim().strip_prefix(key)?.strip_prefix(':')?.trim()))
        .map(|v| serde_json::from_str(v).unwrap_or_else(|_| v.to_string()))
        .unwrap_or_else(|| panic!("the Secret has no {key}"))
}

/// Runs the real binary as a container would: `argv` with its first word replaced by the
/// binary, every configuration path by `config`, and `serve` by `config check`; only `env`.
fn run_as_container(argv: &[String], env: &[(String, String)], config: &Path) -> Output {
    let mut args: Vec<String> = Vec::new();
    let mut rest = argv[1..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--config" => {
                rest.next();
                args.extend(["--config".into(), config.display().to_string()]);
            }
            "serve" => args.extend(["config".into(), "check".into()]),
            _ => args.push(a.clone()),
        }
    }
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| {
            let v = if k == "KEYGATE_CONFIG" {
                config.display().to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        }))
        .output()
        .expect("run keygate")
}

/// The configuration file `argv` (its first `--config`) or else `env` names.
fn config_path(argv: &[String], env: &[(String, String)]) -> String {
    argv.windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1].clone())
        .or_else(|| {
            let var = env.iter().rev().find(|(k, _)| k == "KEYGATE_CONFIG");
            var.map(|(_, path)| path.clone())
        })
        .expect("nothing names a configuration file: keygate would run on its defaults")
}

/// `KEYGATE_<SECTION>_<SETTING>` variables that override a setting `file` sets.
fn overridden(env: &[(String, String)], file: &toml::Table) -> Vec<String> {
    env.iter()
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix("KEYGATE_")?.to_ascii_lowercase();
            file.iter()
                .filter_map(|(section, t)| Some((section, t.as_table()?)))
                .any(|(section, t)| {
                    rest.strip_prefix(section.as_str())
                        .and_then(|k| k.strip_prefix('_'))
                        .is_some_and(|k| t.contains_key(k))
                })
                .then(|| name.clone())
        })
        .collect()
}

#[test]
fn the_image_and_the_pod_start_keygate_on_one_config_file_no_variable_overrides() {
    let dockerfile = read("deploy/Dockerfile");
    let image = final_stage(&dockerfile);
    let entrypoint = dockerfile_array(image, "ENTRYPOINT");
    let image_env = dockerfile_env(image);
    let manifest = read("deploy/kubernetes/keygate.yaml");
    let pod = container(&manifest, "keygate");

    // Kubernetes: `command` replaces the ENTRYPOINT (and drops CMD), `args` replaces CMD.
    let command = container_array(&pod, "command");
    let args = container_array(&pod, "args");
    let cmd = dockerfile_array(image, "CMD");
    let pod_argv: Vec<String> = match &command {
        Some(c) => c.iter().chain(args.iter().flatten()).cloned().collect(),
        None => entrypoint
            .iter()
            .chain(args.as_ref().unwrap_or(&cmd))
            .cloned()
            .collect(),
    };
    let image_argv: Vec<String> = entrypoint.iter().chain(&cmd).cloned().collect();
    let mut pod_env = image_env.clone();
    pod_env.extend(container_env(&manifest, &pod));

    for (what, argv) in [("image", &image_argv), ("pod", &pod_argv)] {
        assert_eq!(
            argv.iter().filter(|a| *a == "serve").count(),
            1,
            "the {what} runs `keygate ... serve`: {argv:?}"
        );
        assert!(argv[0].ends_with("keygate"), "{what}: {argv:?}");
    }

    // The image alone runs on the file it copies to the path it names.
    let path = config_path(&image_argv, &image_env);
    let source = image
        .lines()
        .find_map(|l| l.strip_prefix("COPY ")?.strip_suffix(&format!(" {path}")))
        .unwrap_or_else(|| panic!("the image does not COPY a file to {path}"));
    let baked = read(source);
    let out = run_as_container(&image_argv, &image_env, &repo(source));
    assert!(
        out.status.success(),
        "the image's `{}` exits {}: {}",
        image_argv.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let config = Config::from_toml(&baked, source, image_env.clone()).expect("valid");
    assert!(
        config.proxy.listen.ip().is_unspecified() && config.admin.listen.ip().is_unspecified(),
        "{source}: a container must listen on its own address, not loopback"
    );

    // The pod runs on the ConfigMap, mounted at that path.
    let path = config_path(&pod_argv, &pod_env);
    let dir = Path::new(&path).parent().expect("a directory").display();
    assert!(
        manifest.contains(&format!("mountPath: {dir}\n")),
        "the ConfigMap is not mounted at {dir}"
    );
    assert!(path.ends_with("/keygate.toml"), "{path}");
    let file = crate::cli::write_config(&configmap_toml(&manifest));
    let out = run_as_container(&pod_argv, &pod_env, &file.path);
    assert!(
        out.status.success(),
        "the pod's `{}` exits {}: {}",
        pod_argv.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The environment beats the file: a variable for a setting the file sets wins silently.
    let image_file: toml::Table = baked.parse().expect("toml");
    let configmap: toml::Table = configmap_toml(&manifest).parse().expect("toml");
    for (what, env, file) in [
        ("the image", &image_env, &image_file),
        ("the pod", &pod_env, &configmap),
    ] {
        let names = overridden(env, file);
        assert!(
            names.is_empty(),
            "in {what}, {names:?} override settings its configuration file sets"
        );
    }
}

/// A Kubernetes CPU quantity (`2`, `"1500m"`) in millicores.
fn millicores(q: &str) -> u64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse().expect("millicores"),
        None => (q.parse::<f64>().expect("cores") * 1000.0) as u64,
    }
}

/// A Kubernetes memory quantity (`256Mi`, `1Gi`) in bytes.
fn bytes(q: &str) -> u64 {
    let (n, unit) = q.split_at(q.find(|c: char| c.is_alphabetic()).unwrap_or(q.len()));
    let n: u64 = n.parse().expect("a number");
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => panic!("memory unit {unit}"),
    }
}

#[test]
fn the_pod_sizes_workers_and_argon2_to_its_cpu_limit_and_fits_them_in_its_memory_limit() {
    let manifest = read("deploy/kubernetes/keygate.yaml");
    let toml_text = configmap_toml(&manifest);
    let file: toml::Table = toml_text.parse().expect("toml");
    let config = Config::from_toml(
        &toml_text,
        "ConfigMap keygate.toml",
        [(
            "KEYGATE_DATABASE_URL".to_string(),
            "postgres://keygate:secret@db/keygate".to_string(),
        )],
    )
    .expect("valid");
    let pod = container(&manifest, "keygate");
    let cpu = yaml_path(&pod, &["resources", "limits", "cpu"])
        .expect("keygate has a CPU limit: 0 workers would otherwise mean one per node core");
    let cpus = millicores(&cpu).div_ceil(1000) as usize;

    // 0 means one per core of the node, not of the pod: both must be set.
    for (section, key) in [("proxy", "workers"), ("verification", "max_concurrent")] {
        let set = file[section].get(key).and_then(toml::Value::as_integer);
        assert!(
            set.is_some_and(|n| n > 0),
            "the ConfigMap must set {section}.{key} (0 is one per node core)"
        );
    }
    assert!(
        config.proxy.workers <= cpus,
        "proxy.workers over the CPU limit {cpu}"
    );
    assert!(
        config.verification.max_concurrent <= cpus,
        "verification.max_concurrent over the CPU limit {cpu}"
    );

    // The budget the manifest's comment spells out: running keygate, a table of 100,000 keys,
    // one argon2 memory per verification at once, and every allowed connection.
    let memory = yaml_path(&pod, &["resources", "limits", "memory"]).expect("a memory limit");
    let need = 20 * (1 << 20)
        + 100_000 * 270
        + config.verification.max_concurrent as u64 * u64::from(config.hashing.memory_kib) * 1024
        + config.proxy.limits.max_connections as u64 * 30_000;
    assert!(
        bytes(&memory) >= need,
        "memory limit {memory} under the {} MiB keygate can use",
        need >> 20
    );
}

/// "1.89", "1.89.0" or "1.95-bookworm" as (major, minor, patch).
fn rust_version(text: &str) -> (u32, u32, u32) {
    let numbers = text.split('-').next().unwrap_or(text);
    let mut parts = numbers.split('.').map(|p| {
        p.parse()
            .unwrap_or_else(|_| panic!("not a Rust version: {text}"))
    });
    let major = parts.next().expect("major");
    let minor = parts.next().unwrap_or_else(|| panic!("no minor in {text}"));
    (major, minor, parts.next().unwrap_or(0))
}

#[test]
fn the_dockerfile_compiler_is_new_enough_for_every_locked_crate() {
    // The image builds with `--locked`: a compiler older than any locked crate's rust-version
    // stops `docker build` with "requires rustc X or newer".
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    let declared = manifest["package"]["rust-version"]
        .as_str()
        .expect("Cargo.toml declares package.rust-version");
    let dockerfile = read("deploy/Dockerfile");
    let image = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("the Dockerfile builds FROM an official rust image");
    let image = image.split_whitespace().next().expect("a tag");

    // The crates a Linux build needs, as on this host: without the filter cargo wants every
    // platform's crates (android_system_properties, ...), which a machine that only ever
    // built for Linux does not have offline.
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("run rustc -vV");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names its host");
    assert!(
        host.contains("-linux-"),
        "the image is Linux; so must this check's host be: {host}"
    );
    let metadata = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        metadata.status.success(),
        "{}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).expect("cargo metadata JSON");
    let resolved: BTreeSet<&str> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| n["id"].as_str().expect("id"))
        .collect();
    let (newest, needs) = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| resolved.contains(p["id"].as_str().expect("id")))
        .filter_map(|p| {
            let needs = p["rust_version"].as_str()?;
            Some((
                rust_version(needs),
                format!(
                    "{} {} (rust-version {needs})",
                    p["name"].as_str()?,
                    p["version"].as_str()?
                ),
            ))
        })
        .max()
        .expect("some locked crate declares a rust-version");

    assert!(
        rust_version(declared) >= newest,
        "Cargo.toml's rust-version {declared} is older than what {needs} needs"
    );
    assert!(
        rust_version(image) >= rust_version(declared),
        "deploy/Dockerfile builds with rust:{image}, older than Cargo.toml's rust-version {declared}"
    );
}

/// The test database's URL with a password in it: PostgreSQL on trust auth ignores it, so it
/// reaches the driver and every place that could log it.
fn with_password(url: &str, password: &str) -> String {
    if !url.starts_with("postgres") {
        return url.to_string();
    }
    let (scheme, rest) = url.split_once("://").expect("url");
    let (userinfo, host) = rest
        .split_once('@')
        .expect("the test PostgreSQL URL names a user");
    let user = userinfo.split(':').next().expect("user");
    format!("{scheme}://{user}:{password}@{host}")
}

both_engines! {
    async fn no_log_line_at_trace_level_holds_a_key_its_hash_or_the_database_password(engine: Engine) {
        let db = TestDb::new(engine).await;
        let upstream = Upstream::start().await;
        let password = format!("Pw{}", random_hex(12));
        let url = with_password(&db.url, &password);
        let binary = Binary::start(&url, upstream.addr, "", &["--log-format", "json"], Some("trace")).await;

        let mut cli_logs = String::new();
        let (_, e) = binary.cli(&["account", "create", "billing"]);
        cli_logs.push_str(&e);
        let mut keys = Vec::new();
        for name in ["current", "old"] {
            let (key, e) = binary.create_key("billing", name, "recordings:read");
            cli_logs.push_str(&e);
            keys.push(key);
        }
        let (good, old) = (keys[0].clone(), keys[1].clone());

        let started = Instant::now();
        while binary.get("/recordings/1", &good).await != 200 {
            assert!(started.elapsed() < Duration::from_secs(5), "the new key never worked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(binary.get("/recordings/2", &good).await, 200);
        let started = Instant::now();
        while binary.get("/recordings/1", &old).await != 200 {
            assert!(started.elapsed() < Duration::from_secs(5), "the second key never worked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_, e) = binary.cli(&["key", "revoke", &old[..8]]);
        cli_logs.push_str(&e);
        let started = Instant::now();
        while binary.get("/recordings/1", &old).await != 401 {
            assert!(started.elapsed() < Duration::from_secs(5), "the revoked key kept working");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wrong = forge(&good[..8]);
        assert_eq!(binary.get("/recordings/1", &wrong).await, 401);
        assert_eq!(binary.get("/recordings/1", &wrong).await, 401);
        let mut typo = good.clone();
        typo.replace_range(20..21, if &good[20..21] == "a" { "b" } else { "a" });
        assert_eq!(binary.get("/recordings/1", &typo).await, 401);
        // Let a last_used flush and a few refreshes happen at trace level.
        tokio::time::sleep(Duration::from_millis(400)).await;

        let store = Store::connect(&DatabaseUrl::new(db.url.clone()).expect("url"), 1).await.expect("store");
        let hashes: Vec<String> = store
            .table_rows(i64::MIN)
            .await
            .expect("rows")
            .into_iter()
            .filter_map(|r| r.key_hash)
            .collect();
        store.close().await;
        assert_eq!(hashes.len(), 2);

        let logs = binary.stop() + &cli_logs;
        let lines: Vec<&str> = logs.lines().collect();
        // At this filter every SQL statement is logged (sqlx, debug): the lines that could leak.
        assert!(lines.len() > 30, "trace logging produced only {} lines", lines.len());
        assert!(logs.contains(r#""target":"sqlx::query""#), "no statement was logged:\n{logs}");
        let mut secrets: Vec<(&str, String)> = Vec::new();
        for key in [&good, &old, &wrong, &typo] {
            secrets.push(("a key", key.clone()));
            secrets.push(("a key's secret part", key[9..41].to_string()));
        }
        for hash in &hashes {
            secrets.push(("an argon2 hash", hash.clone()));
            let digest = hash.rsplit('$').next().expect("hash part");
            secrets.push(("an argon2 digest", digest.to_string()));
        }
        if engine == Engine::Postgres {
            secrets.push(("the database password", password.clone()));
        }
        for line in &lines {
            for (what, secret) in &secrets {
                assert!(!line.contains(secret.as_str()), "a log line contains {what}: {line}");
            }
        }

        // The access lines are JSON with every field an operator needs.
        let access: Vec<serde_json::Value> = lines
            .iter()
            .filter(|l| l.contains("keygate::access"))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert!(access.len() >= 6, "{} access lines", access.len());
        let allowed = access
            .iter()
            .find(|v| v["outcome"] == "allowed")
            .expect("an allowed request was logged");
        for field in ["request_id", "route", "method", "status", "outcome", "key_prefix", "account", "auth_us", "upstream_ms"] {
            assert!(!allowed[field].is_null(), "access line without `{field}`: {allowed}");
        }
        assert_eq!(allowed["account"], "billing");
        assert_eq!(allowed["key_prefix"], &good[..8]);
        assert!(access.iter().any(|v| v["reason"] == "revoked"));
    }
}

both_engines! {
    /// A first start on an empty database: the schema is created, the sidecar beats, and
    /// nothing on the way is logged as a warning but the console's setup link. (The first
    /// heartbeat used to race the migrations and warn that its table did not exist.)
    async fn a_first_start_on_an_empty_database_warns_of_nothing_but_the_console_setup(engine: Engine) {
        let db = TestDb::new(engine).await;
        let upstream = Upstream::start().await;
        let binary = Binary::start(&db.url, upstream.addr, "", &[], None).await;
        let store = Store::connect(&DatabaseUrl::new(db.url.clone()).expect("url"), 1).await.expect("store");
        let started = Instant::now();
        while store.heartbeats(0).await.map_or(true, |beats| beats.is_empty()) {
            assert!(started.elapsed() < Duration::from_secs(10), "no heartbeat was recorded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let logs = strip_ansi(&binary.stop());
        assert!(logs.contains("key table loaded"), "{logs}");
        let warnings: Vec<&str> = logs
            .lines()
            // The suite's cheap argon2 cost is warned of, as it should be; a real first start
            // on the example configuration's cost is not.
            .filter(|l| {
                l.contains("WARN")
                    && !l.contains("no console user exists yet")
                    && !l.contains("below OWASP's minimum")
            })
            .collect();
        assert!(warnings.is_empty(), "{warnings:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_reads_as_text_by_default_and_can_be_turned_off() {
    let db = TestDb::new(Engine::Sqlite).await;
    let upstream = Upstream::start().await;

    let on = Binary::start(&db.url, upstream.addr, "", &[], None).await;
    assert_eq!(on.get("/recordings/1", "kgs_nothing").await, 401);
    let logs = strip_ansi(&on.stop());
    let line = logs
        .lines()
        .find(|l| l.contains("keygate::access"))
        .unwrap_or_else(|| panic!("no access line at the default level:\n{logs}"));
    assert!(
        serde_json::from_str::<serde_json::Value>(line).is_err(),
        "text by default: {line}"
    );
    for field in [
        "request_id=",
        "route=\"recordings-read\"",
        "auth_us=",
        "status=401",
        "outcome=\"unauthorized\"",
        "reason=\"malformed\"",
    ] {
        assert!(line.contains(field), "`{field}` missing: {line}");
    }

    let off = Binary::start(
        &db.url,
        upstream.addr,
        "[log]\naccess_log = false",
        &[],
        None,
    )
    .await;
    assert_eq!(off.get("/recordings/1", "kgs_nothing").await, 401);
    let logs = off.stop();
    assert!(logs.contains("keygate started"), "{logs}");
    assert!(
        !logs.contains("keygate::access"),
        "access_log = false still logs requests:\n{logs}"
    );
}

/// Text without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
