//! The console in a real headless Chromium (driven through chromedriver), on both engines:
//! the whole rotation procedure an admin follows, and a script-like account name that must
//! render as text. Chromium missing is a failure, never a skip.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use keygate::manage::Role;
use serde_json::json;

use crate::admin_api::{add_user, PASSWORD};
use crate::both_engines;
use crate::harness::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free port with a fresh Chromium profile; stopped on drop.
struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: the console test needs Debian's chromium and chromium-driver (.ci/run installs them)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "chromedriver did not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1440,900",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!("an object literal")
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        Browser {
            client: Some(client),
            driver,
            _profile: profile,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("open")
    }

    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }

    async fn css(&self, selector: &str) -> fantoccini::elements::Element {
        self.c()
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
    }

    /// Signs in on the console at `admin` (its base URL) as `email`, with the test password,
    /// and waits for the page it lands on.
    async fn sign_in(&self, admin: &str, email: &str) {
        self.c()
            .goto(&format!("{admin}/admin/login"))
            .await
            .expect("login page");
        self.css("#email")
            .await
            .send_keys(email)
            .await
            .expect("type");
        self.css("#password")
            .await
            .send_keys(PASSWORD)
            .await
            .expect("type");
        self.css("#submit").await.click().await.expect("log in");
        self.css("#new-account-button").await;
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.c().screenshot().await.expect("screenshot");
        let path = std::env::temp_dir().join(format!("keygate-{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

both_engines! {
    async fn an_admin_rotates_a_key_in_the_console_from_login_to_revocation(engine: Engine) {
        let app = spawn_app(engine).await;
        add_user(&app, "ada@example.com", Role::Admin).await;
        // The integration's current key, issued earlier.
        let account = app.create_account("billing").await;
        let old = app.create_key(&account, "primary", &["recordings:read"]).await;
        assert_eq!(app.get("/recordings/1", Some(old.key.expose())).await.status, 200);
        let admin = format!("http://{}", app.admin_addr);
        let b = Browser::start().await;

        b.sign_in(&admin, "ada@example.com").await;
        assert!(b.c().current_url().await.expect("url").path().ends_with("/admin/service-accounts"));

        // A name that looks like a script is shown as text and never runs.
        let evil = "<script>alert(1)</script>";
        b.css("#new-account-button").await.click().await.expect("open dialog");
        b.css("#account-name").await.send_keys(evil).await.expect("type");
        b.css("#create-account").await.click().await.expect("create");
        assert_eq!(b.css("#account-title").await.text().await.expect("title"), evil);
        assert!(b.c().get_alert_text().await.is_err(), "no alert opened");
        let inline = b.c().execute("return document.querySelectorAll('script:not([src])').length", vec![]).await.expect("js");
        assert_eq!(inline, json!(0));

        // Open the service account; create the new key with the same scope.
        b.c().goto(&format!("{admin}/admin/service-accounts")).await.expect("list");
        b.c().find(Locator::LinkText("billing")).await.expect("account link").click().await.expect("open");
        b.css("#create-key-button").await.click().await.expect("open dialog");
        b.css("#key-name").await.send_keys("primary-2026-12").await.expect("type");
        b.css("input[value='recordings:read']").await.click().await.expect("scope");
        b.css("#submit-key").await.click().await.expect("create key");

        // Read it from the dialog that shows it once.
        let new_key = b.css("#new-key").await.text().await.expect("key text");
        assert!(new_key.starts_with("kgs") && new_key.len() > 40, "{new_key}");
        let shot = b.screenshot(&format!("console-key-dialog-{engine:?}")).await;
        eprintln!("screenshot: {}", shot.display());
        b.css("#close-key").await.click().await.expect("close");

        // The integration switches; Last used fills in on the new key.
        app.wait_for_key(&new_key[..8]).await;
        assert_eq!(app.get("/recordings/1", Some(&new_key)).await.status, 200);
        let account_url = b.c().current_url().await.expect("url");
        assert_eq!(account_url.path(), format!("/admin/service-accounts/{}", account.id), "a reload shows the account, not the form again");
        let row = |prefix: &str| format!("tr[data-prefix='{prefix}']");
        let started = Instant::now();
        loop {
            b.c().goto(account_url.as_str()).await.expect("reload");
            let cell = b.css(&format!("{} td.last-used", row(&new_key[..8]))).await.text().await.expect("text");
            if !cell.starts_with("never") {
                assert!(cell.contains("from 127.0.0.1"), "{cell}");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "Last used did not fill in");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!b.c().source().await.expect("html").contains(&new_key), "the key is shown once only");

        // Revoke the old key, after a confirmation.
        let old_prefix = old.key.prefix().to_string();
        b.css(&format!("{} button.revoke", row(&old_prefix))).await.click().await.expect("revoke");
        let confirm = b.css(&format!("#confirm-revoke-{}", old.record.id)).await;
        assert!(confirm.is_displayed().await.expect("shown"), "a confirmation dialog opens");
        let shot = b.screenshot(&format!("console-revoke-{engine:?}")).await;
        eprintln!("screenshot: {}", shot.display());
        confirm.click().await.expect("confirm");
        // The form posts and the page reloads: poll, since an element found before the reload
        // goes stale.
        let started = Instant::now();
        loop {
            let badge = b.c().find(Locator::Css(&format!("{} .badge", row(&old_prefix)))).await;
            if let Ok(text) = match badge { Ok(e) => e.text().await.map_err(|_| ()), Err(_) => Err(()) } {
                if text == "revoked" {
                    break;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the old key never showed as revoked");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let shot = b.screenshot(&format!("console-after-{engine:?}")).await;
        eprintln!("screenshot: {}", shot.display());

        // The old key gets 401; the new one keeps working.
        let started = Instant::now();
        while app.get("/recordings/1", Some(old.key.expose())).await.status != 401 {
            assert!(started.elapsed() < Duration::from_secs(5), "the revoked key still works");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(app.get("/recordings/1", Some(&new_key)).await.status, 200);

        // The audit log holds prefixes and scopes, and no key.
        b.c().goto(&format!("{admin}/admin/audit")).await.expect("audit page");
        let page = b.css("#audit").await.text().await.expect("audit text");
        let shot = b.screenshot(&format!("console-audit-{engine:?}")).await;
        eprintln!("screenshot: {}", shot.display());
        assert!(page.contains(&new_key[..8]) && page.contains(&old_prefix), "{page}");
        let audit = app.manager.store.audit(100).await.expect("audit");
        let created = audit.iter().find(|a| a.key_prefix.as_deref() == Some(&new_key[..8]) && a.detail.contains("key.created")).expect("creation audited");
        assert_eq!(created.scopes.as_deref(), Some("recordings:read"));
        assert_eq!(created.actor_type, "user");
        let revoked = audit.iter().find(|a| a.key_prefix.as_deref() == Some(old_prefix.as_str()) && a.detail.contains("key.revoked")).expect("revocation audited");
        assert_eq!(revoked.scopes.as_deref(), Some("recordings:read"));
        let everything = format!("{audit:?}{page}");
        assert!(!everything.contains(&new_key) && !everything.contains(&new_key[9..]), "no key in the audit");
        assert!(!everything.contains(old.key.expose()));
        b.close().await;
    }
}

both_engines! {
    async fn operators_see_the_keys_page_with_every_change_button_disabled(engine: Engine) {
        let app = spawn_app(engine).await;
        add_user(&app, "op@example.com", Role::Operator).await;
        let account = app.create_account("billing").await;
        app.create_key(&account, "primary", &["recordings:read"]).await;
        let admin = format!("http://{}", app.admin_addr);
        let b = Browser::start().await;
        b.sign_in(&admin, "op@example.com").await;
        assert!(!b.css("#new-account-button").await.is_enabled().await.expect("state"));
        b.c().goto(&format!("{admin}/admin/service-accounts/{}", account.id)).await.expect("account");
        assert!(!b.css("#create-key-button").await.is_enabled().await.expect("state"));
        let buttons = b.c().find_all(Locator::Css("#keys button")).await.expect("buttons");
        assert_eq!(buttons.len(), 3, "replace, expiry, revoke");
        for button in buttons {
            assert!(!button.is_enabled().await.expect("state"), "a change button is enabled");
        }
        b.close().await;
    }
}

both_engines! {
    async fn create_replacement_in_the_console_shows_old_and_new_side_by_side(engine: Engine) {
        let app = spawn_app(engine).await;
        add_user(&app, "ada@example.com", Role::Owner).await;
        let account = app.create_account("billing").await;
        let old = app.create_key(&account, "primary", &["recordings:read", "tickets:write"]).await;
        assert_eq!(app.get("/recordings/1", Some(old.key.expose())).await.status, 200);
        let admin = format!("http://{}", app.admin_addr);
        let b = Browser::start().await;
        b.sign_in(&admin, "ada@example.com").await;
        b.c().goto(&format!("{admin}/admin/service-accounts/{}", account.id)).await.expect("account");

        let row = format!("tr[data-prefix='{}']", old.key.prefix());
        b.css(&format!("{row} button[data-dialog='replace-{}']", old.record.id)).await.click().await.expect("open");
        let dialog = format!("#replace-{}", old.record.id);
        b.css(&format!("{dialog} select[name='retire_after_idle']")).await.select_by_value("1h").await.expect("select");
        b.css(&format!("{dialog} button[type='submit']")).await.click().await.expect("create replacement");
        let new_key = b.css("#new-key").await.text().await.expect("key");
        b.css("#close-key").await.click().await.expect("close");

        let panel = b.css(".rotation").await.text().await.expect("panel");
        assert!(panel.contains(old.key.prefix().as_str()) && panel.contains(&new_key[..8]), "{panel}");
        assert!(panel.contains("idle for 1h"), "{panel}");
        let status = b.css(&format!("{row} .badge")).await.text().await.expect("status");
        assert_eq!(status, "expiring", "the old key got its window");
        let shot = b.screenshot(&format!("console-replacement-{engine:?}")).await;
        eprintln!("screenshot: {}", shot.display());

        let replaced = app.manager.store.key(old.record.id).await.expect("key").expect("exists");
        let window = replaced.expires_at.expect("expiry") - keygate::clock::system_now_ms();
        assert!((7 * 86_400_000 - 120_000..=7 * 86_400_000).contains(&window), "{window}");
        assert_eq!(replaced.retire_after_idle_ms, Some(3_600_000));
        let new = app.manager.store.key_by_prefix(&new_key[..8]).await.expect("key").expect("exists");
        assert_eq!(new.scopes, "recordings:read tickets:write", "the same scopes");
        app.wait_for_key(&new_key[..8]).await;
        assert_eq!(app.get("/tickets/1", Some(&new_key)).await.status, 200);
        assert_eq!(app.get("/recordings/1", Some(old.key.expose())).await.status, 200, "the old key works inside its window");
        b.close().await;
    }
}

both_engines! {
    async fn an_admin_pairs_re_pairs_and_unpairs_a_gateway_in_the_console(engine: Engine) {
        let app = spawn_app_with(engine, AppOptions {
            extra_toml: "[gateways]\nscopes = [\"recordings:read\"]\n".into(),
            ..AppOptions::default()
        })
        .await;
        add_user(&app, "ada@example.com", Role::Admin).await;
        let admin = format!("http://{}", app.admin_addr);
        let b = Browser::start().await;
        b.sign_in(&admin, "ada@example.com").await;
        b.c().goto(&format!("{admin}/admin/gateways")).await.expect("gateways page");

        // Pair: the key is shown once, in a dialog, and works at once with the configured scope.
        b.css("#pair-gateway-button").await.click().await.expect("open dialog");
        b.css("#gateway-name").await.send_keys("warehouse-7").await.expect("type");
        b.css("#submit-pair").await.click().await.expect("pair");
        let first = b.css("#new-key").await.text().await.expect("key text");
        assert!(first.starts_with("kgg") && first.len() > 40, "{first}");
        let shot = b.screenshot(&format!("console-gateway-paired-{engine:?}")).await;
        eprintln!("screenshot: {}", shot.display());
        b.css("#close-key").await.click().await.expect("close");
        app.wait_for_key(&first[..8]).await;
        assert_eq!(app.get("/recordings/1", Some(&first)).await.status, 200);
        assert_eq!(app.get("/tickets", Some(&first)).await.status, 403, "only the gateway scopes");
        // A reload after Done shows the page again, without the key.
        let url = b.c().current_url().await.expect("url");
        assert_eq!(url.path(), "/admin/gateways", "a reload does not post the form again");
        b.c().goto(url.as_str()).await.expect("reload");
        assert!(!b.c().source().await.expect("html").contains(&first), "the key is shown once only");
        let row = "tr[data-gateway='warehouse-7']";
        assert_eq!(b.css(row).await.attr("data-state").await.expect("attr").as_deref(), Some("paired"));
        assert!(b.css(row).await.text().await.expect("row").contains(&first[..8]));

        // Re-pair: a new key, and the old one stops working in the same step.
        let id = app.manager.store.gateways().await.expect("gateways")[0].id;
        b.css(&format!("{row} button[data-dialog='repair-{id}']")).await.click().await.expect("re-pair");
        b.css(&format!("#confirm-repair-{id}")).await.click().await.expect("confirm");
        let second = b.css("#new-key").await.text().await.expect("key text");
        assert!(second.starts_with("kgg") && second != first, "{second}");
        b.css("#close-key").await.click().await.expect("close");
        app.wait_for_key(&second[..8]).await;
        assert_eq!(app.get("/recordings/1", Some(&second)).await.status, 200);
        let started = Instant::now();
        while app.get("/recordings/1", Some(&first)).await.status != 401 {
            assert!(started.elapsed() < Duration::from_secs(5), "the re-paired gateway's old key still works");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Unpair, after a confirmation: the row shows it, and the key gets 401.
        b.css(&format!("{row} button[data-dialog='unpair-{id}']")).await.click().await.expect("unpair");
        let confirm = b.css(&format!("#confirm-unpair-{id}")).await;
        assert!(confirm.is_displayed().await.expect("shown"), "a confirmation dialog opens");
        confirm.click().await.expect("confirm");
        let started = Instant::now();
        loop {
            let state = match b.c().find(Locator::Css(row)).await {
                Ok(e) => e.attr("data-state").await.ok().flatten(),
                Err(_) => None,
            };
            if state.as_deref() == Some("unpaired") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the gateway never showed as unpaired: {state:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        while app.get("/recordings/1", Some(&second)).await.status != 401 {
            assert!(started.elapsed() < Duration::from_secs(5), "the unpaired gateway's key still works");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let audit = format!("{:?}", app.manager.store.audit(100).await.expect("audit"));
        for action in ["gateway.paired", "gateway.repaired", "gateway.unpaired"] {
            assert!(audit.contains(action), "{action} not audited");
        }
        assert!(!audit.contains(&first) && !audit.contains(&second[9..]), "no key in the audit");
        b.close().await;
    }
}
