//! Storage behaviour, run on SQLite and PostgreSQL alike.

use keygate::clock::Clock;
use keygate::config::{DatabaseUrl, HashingConfig};
use keygate::keys::{KeyKind, KeyTable};
use keygate::manage::{Actor, ManageError, Manager};
use keygate::store::{Store, UseStamp};

use crate::both_engines;
use crate::harness::*;

const CHEAP: HashingConfig = HashingConfig {
    memory_kib: 1024,
    iterations: 1,
    parallelism: 1,
};

/// A stamp without a client address.
fn stamp(id: i64, at_ms: i64) -> UseStamp {
    UseStamp {
        id,
        at_ms,
        client: None,
    }
}

async fn manager(db: &TestDb) -> Manager {
    let store = Store::connect(&DatabaseUrl::new(db.url.clone()).expect("url"), 2)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    Manager::new(store, CHEAP, Clock::System).expect("manager")
}

both_engines! {
    async fn migrations_apply_once_and_are_idempotent(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        m.store.migrate().await.expect("second migrate is a no-op");
        assert!(m.store.accounts().await.expect("accounts").is_empty());
    }
}

both_engines! {
    async fn account_names_are_unique_and_validated(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        m.create_account("billing", "invoices", &Actor::cli()).await.expect("create");
        let dup = m.create_account("billing", "", &Actor::cli()).await.expect_err("must fail");
        assert!(matches!(dup, ManageError::Conflict(_)), "{dup}");
        for bad in ["", "line\nbreak", "tab\there", " leading", "trailing ", "é", &"x".repeat(65)] {
            let e = m.create_account(bad, "", &Actor::cli()).await.expect_err("must fail");
            assert!(matches!(e, ManageError::Invalid(_)), "{bad:?}: {e}");
        }
        // Printable ASCII is allowed: the console escapes it, the header carries it as is.
        m.create_account("<b>ops & co</b>", "", &Actor::cli()).await.expect("printable ASCII");
        assert_eq!(m.store.accounts().await.expect("list").len(), 2, "nothing half-written");
    }
}

both_engines! {
    async fn keys_are_stored_hashed_and_listed_without_secrets(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        let issued = m
            .issue_key(&account, "primary", &["b:write".into(), "a:read".into()], None, &Actor::cli())
            .await
            .expect("issue");
        assert_eq!(issued.record.prefix, &issued.key.expose()[..8]);
        assert_eq!(issued.record.scopes, "a:read b:write");
        let rows = m.store.table_rows(i64::MIN).await.expect("rows");
        assert_eq!(rows.len(), 1);
        let hash = rows[0].key_hash.clone().expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains(&issued.key.expose()[9..]));
        assert!(keygate::keys::verify_hash(&hash, issued.key.expose()));
        let listed = serde_json::to_string(&m.store.keys(None).await.expect("keys")).expect("json");
        assert!(!listed.contains(&issued.key.expose()[9..]) && !listed.contains("argon2"));
    }
}

both_engines! {
    async fn bad_key_requests_change_nothing(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        m.issue_key(&account, "primary", &["a:read".into()], None, &Actor::cli()).await.expect("issue");
        let dup = m.issue_key(&account, "primary", &["a:read".into()], None, &Actor::cli()).await.expect_err("must fail");
        assert!(matches!(dup, ManageError::Conflict(_)), "{dup}");
        let bad_scope = m.issue_key(&account, "x", &["no spaces please".into()], None, &Actor::cli()).await.expect_err("must fail");
        assert!(matches!(bad_scope, ManageError::Invalid(_)));
        let no_scope = m.issue_key(&account, "y", &[], None, &Actor::cli()).await.expect_err("must fail");
        assert!(matches!(no_scope, ManageError::Invalid(_)));
        let past = m.issue_key(&account, "z", &["a:read".into()], Some(1_000), &Actor::cli()).await.expect_err("must fail");
        assert!(matches!(past, ManageError::Invalid(_)));
        assert_eq!(m.store.keys(None).await.expect("keys").len(), 1);
        assert_eq!(m.store.audit(100).await.expect("audit").iter().filter(|a| a.action == "user.updated").count(), 1);
    }
}

both_engines! {
    async fn revocation_reaches_the_table_through_an_incremental_refresh(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let clock = Clock::System;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        let a = m.issue_key(&account, "a", &["x:y".into()], None, &Actor::cli()).await.expect("a");
        let b = m.issue_key(&account, "b", &["x:y".into()], None, &Actor::cli()).await.expect("b");
        let table = KeyTable::new();
        keygate::sync::load(&m.store, &table, &clock).await.expect("load");
        assert_eq!(table.len(), 2);

        m.revoke_key(&a.record, &Actor::cli()).await.expect("revoke");
        let again = m.revoke_key(&a.record, &Actor::cli()).await.expect_err("must fail");
        assert!(matches!(again, ManageError::Conflict(_)), "{again}");
        let changed = keygate::sync::refresh(&m.store, &table, &clock).await.expect("refresh").changed;
        assert_eq!(changed, 1, "only the revoked key changed");
        let entry = table.lookup(&a.key.prefix()).expect("still known, as revoked");
        assert_eq!(entry.state(clock.now_ms()), keygate::keys::KeyState::Revoked);
        assert_eq!(table.lookup(&b.key.prefix()).expect("b").state(clock.now_ms()), keygate::keys::KeyState::Active);
        assert_eq!(keygate::sync::refresh(&m.store, &table, &clock).await.expect("refresh").changed, 0, "nothing new");
    }
}

both_engines! {
    async fn a_refresh_does_not_read_an_old_burst_of_changes_again(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let clock = Clock::System;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        let mut keys = Vec::new();
        for i in 0..20 {
            keys.push(m.issue_key(&account, &format!("k{i}"), &["x:y".into()], None, &Actor::cli()).await.expect("key"));
        }
        // A bulk import ten minutes ago: the newest change in the database is that old.
        let sql = "UPDATE api_keys SET updated_at = updated_at - 600000";
        match &m.store {
            keygate::store::Store::Sqlite(p) => { sqlx::query(sql).execute(p).await.expect("age"); }
            keygate::store::Store::Postgres(p) => { sqlx::query(sql).execute(p).await.expect("age"); }
        }
        let table = KeyTable::new();
        keygate::sync::load(&m.store, &table, &clock).await.expect("load");
        assert_eq!(table.len(), 20);
        // The load settled everything stamped before it began (less the overlap): the
        // import's rows, all older than the newest change minus the overlap, are not read again.
        let refreshed = keygate::sync::refresh(&m.store, &table, &clock).await.expect("refresh");
        assert_eq!(refreshed, keygate::sync::Refreshed { read: 0, changed: 0 });

        // A change now is read (and one refresh later, still within the overlap, read again
        // but not applied twice).
        m.revoke_key(&keys[3].record, &Actor::cli()).await.expect("revoke");
        let refreshed = keygate::sync::refresh(&m.store, &table, &clock).await.expect("refresh");
        assert_eq!(refreshed, keygate::sync::Refreshed { read: 1, changed: 1 });
        assert_eq!(table.lookup(&keys[3].key.prefix()).expect("entry").state(clock.now_ms()), keygate::keys::KeyState::Revoked);
        let refreshed = keygate::sync::refresh(&m.store, &table, &clock).await.expect("refresh");
        assert_eq!(refreshed, keygate::sync::Refreshed { read: 1, changed: 0 });
    }
}

both_engines! {
    async fn expiry_changes_are_picked_up_and_audited(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        let k = m.issue_key(&account, "k", &["x:y".into()], None, &Actor::cli()).await.expect("k");
        let table = KeyTable::new();
        keygate::sync::load(&m.store, &table, &Clock::System).await.expect("load");
        let at = m.now_ms() + 7 * 86_400_000;
        let updated = m.set_expiry(&k.record, Some(at), &Actor::cli()).await.expect("expire");
        assert_eq!(updated.expires_at, Some(at));
        keygate::sync::refresh(&m.store, &table, &Clock::System).await.expect("refresh");
        assert_eq!(table.lookup(&k.key.prefix()).expect("entry").expires_at(), Some(at));
        let audit = m.store.audit(10).await.expect("audit");
        assert_eq!(audit[0].action, "user.updated");
        assert!(audit[0].detail.contains("key.expiry_changed"));
        assert_eq!(audit[0].key_prefix.as_deref(), Some(k.key.prefix().as_str()));
        assert_eq!(audit[0].scopes.as_deref(), Some("x:y"));
    }
}

both_engines! {
    async fn last_used_never_moves_backwards(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        let k = m.issue_key(&account, "k", &["x:y".into()], None, &Actor::cli()).await.expect("k");
        let id = k.record.id;
        m.store.stamp_last_used(&[stamp(id, 2_000)], &[]).await.expect("stamp");
        // Another sidecar with an older observation flushes later.
        m.store.stamp_last_used(&[stamp(id, 1_000)], &[]).await.expect("stamp");
        assert_eq!(m.store.key(id).await.expect("key").expect("row").last_used_at, Some(2_000));
        m.store.stamp_last_used(&[stamp(id, 3_000)], &[]).await.expect("stamp");
        assert_eq!(m.store.key(id).await.expect("key").expect("row").last_used_at, Some(3_000));
        // A stamp is not a change that matters to authentication: no refresh churn.
        let table = KeyTable::new();
        keygate::sync::load(&m.store, &table, &Clock::System).await.expect("load");
        let watermark = table.watermark();
        m.store.stamp_last_used(&[stamp(id, 4_000)], &[]).await.expect("stamp");
        assert!(m.store.table_rows(watermark).await.expect("rows").is_empty());
    }
}

both_engines! {
    async fn one_flush_stamps_many_keys_in_one_statement(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(m.issue_key(&account, &format!("k{i}"), &["x:y".into()], None, &Actor::cli()).await.expect("k").record.id);
        }
        let stamps: Vec<UseStamp> = ids.iter().map(|id| stamp(*id, 10_000 + id)).collect();
        m.store.stamp_last_used(&stamps, &[]).await.expect("stamp");
        for key in m.store.keys(None).await.expect("keys") {
            assert_eq!(key.last_used_at, Some(10_000 + key.id));
        }
    }
}

both_engines! {
    async fn a_stamp_and_its_client_address_are_written_together_and_only_forwards(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        let id = m.issue_key(&account, "k", &["x:y".into()], None, &Actor::cli()).await.expect("k").record.id;
        let from = |at_ms: i64, ip: &str| UseStamp { id, at_ms, client: Some(ip.parse().expect("ip")) };
        let seen = |m: &Manager| {
            let store = m.store.clone();
            async move {
                let k = store.key(id).await.expect("key").expect("row");
                (k.last_used_at, k.last_client_addr)
            }
        };
        // One key twice in a batch (an entry replaced by a reload while its stamp waited):
        // written once, with the newest use.
        m.store.stamp_last_used(&[from(2_000, "10.0.0.2"), from(3_000, "2001:db8::3"), from(1_000, "10.0.0.1")], &[]).await.expect("stamp");
        assert_eq!(seen(&m).await, (Some(3_000), Some("2001:db8::3".into())));
        // An older use seen by another sidecar moves neither the stamp nor the address.
        m.store.stamp_last_used(&[from(2_500, "10.0.0.9")], &[]).await.expect("stamp");
        assert_eq!(seen(&m).await, (Some(3_000), Some("2001:db8::3".into())));
        // A newer use without an address keeps the address known.
        m.store.stamp_last_used(&[stamp(id, 4_000)], &[]).await.expect("stamp");
        assert_eq!(seen(&m).await, (Some(4_000), Some("2001:db8::3".into())));
    }
}

both_engines! {
    async fn stamps_written_by_sidecars_of_earlier_versions_still_show(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        let id = m.issue_key(&account, "k", &["x:y".into()], None, &Actor::cli()).await.expect("k").record.id;
        // Before migration 0004 stamps lived on api_keys; a sidecar not yet upgraded still
        // writes them there during a rolling upgrade.
        let legacy = |at: i64, ip: &'static str| {
            let store = m.store.clone();
            async move {
                let sql = "UPDATE api_keys SET last_used_at = $1, last_client_addr = $2 WHERE id = $3";
                match &store {
                    Store::Sqlite(p) => { sqlx::query(sql).bind(at).bind(ip).bind(id).execute(p).await.expect("legacy"); }
                    Store::Postgres(p) => { sqlx::query(sql).bind(at).bind(ip).bind(id).execute(p).await.expect("legacy"); }
                }
            }
        };
        legacy(5_000, "10.0.0.5").await;
        let k = m.store.key(id).await.expect("key").expect("row");
        assert_eq!((k.last_used_at, k.last_client_addr.as_deref()), (Some(5_000), Some("10.0.0.5")));
        m.store.stamp_last_used(&[UseStamp { id, at_ms: 6_000, client: Some("10.0.0.6".parse().expect("ip")) }], &[]).await.expect("stamp");
        let k = m.store.key(id).await.expect("key").expect("row");
        assert_eq!((k.last_used_at, k.last_client_addr.as_deref()), (Some(6_000), Some("10.0.0.6")));
        legacy(7_000, "10.0.0.7").await;
        let k = m.store.keys(None).await.expect("keys").remove(0);
        assert_eq!((k.last_used_at, k.last_client_addr.as_deref()), (Some(7_000), Some("10.0.0.7")));
    }
}

both_engines! {
    async fn the_audit_log_holds_prefixes_and_scopes_never_keys(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let account = m.create_account("billing", "", &Actor::cli()).await.expect("account");
        let k = m.issue_key(&account, "k", &["a:read".into()], None, &Actor::cli()).await.expect("k");
        m.revoke_key(&k.record, &Actor::cli()).await.expect("revoke");
        let audit = m.store.audit(10).await.expect("audit");
        let dump = serde_json::to_string(&audit).expect("json");
        assert!(!dump.contains(k.key.expose()) && !dump.contains(&k.key.expose()[9..]));
        let key_entries: Vec<_> = audit.iter().filter(|a| a.key_prefix.is_some()).collect();
        assert_eq!(key_entries.len(), 2);
        for a in key_entries {
            assert_eq!(a.key_prefix.as_deref(), Some(&k.key.expose()[..8]));
            assert_eq!(a.scopes.as_deref(), Some("a:read"));
            assert_eq!(a.actor_type, "cli");
        }
        assert!(audit[0].detail.contains("key.revoked"));
    }
}

both_engines! {
    async fn gateway_keys_load_into_the_table_by_their_own_marker(engine: Engine) {
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let key = keygate::keys::generate(KeyKind::Gateway);
        let sql = "INSERT INTO gateways (name, prefix, api_key_hash, scopes, created_at, created_by, paired_at)
                   VALUES ($1, $2, $3, $4, 1, 'test', 1)";
        let hash = keygate::keys::hash_key(&keygate::keys::hasher(CHEAP).expect("params"), key.expose());
        match &m.store {
            Store::Sqlite(p) => { sqlx::query(sql).bind("gw-1").bind(key.prefix().as_str()).bind(&hash).bind("alerts:write").execute(p).await.expect("insert"); }
            Store::Postgres(p) => { sqlx::query(sql).bind("gw-1").bind(key.prefix().as_str()).bind(&hash).bind("alerts:write").execute(p).await.expect("insert"); }
        }
        let table = KeyTable::new();
        keygate::sync::load(&m.store, &table, &Clock::System).await.expect("load");
        let entry = table.lookup(&key.prefix()).expect("gateway key loaded");
        assert_eq!(entry.id().kind, KeyKind::Gateway);
        assert_eq!(entry.owner.name(), "gw-1");
        assert_eq!(table.count_by_kind(), (0, 1));
    }
}

both_engines! {
    async fn the_auto_retire_sweep_reads_only_its_candidates(engine: Engine) {
        // Every sidecar runs the sweep every refresh interval: it must be served by the
        // partial index on retiring keys, never by a read of every key.
        let db = TestDb::new(engine).await;
        let m = manager(&db).await;
        let plan = m.store.retire_candidates_plan().await.expect("plan");
        assert!(plan.contains("api_keys_retiring"), "the sweep's plan:\n{plan}");
    }
}
