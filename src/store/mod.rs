//! The only module that talks to a database. One `Store` over SQLite (the embedded default) or
//! PostgreSQL (many sidecars, one key store). Both schemas use the same column types (Unix
//! milliseconds as 64-bit integers) and `$N` placeholders, which SQLite accepts too, so nearly
//! every query is one text run on either pool; the few that differ (batch updates) say so.
//! Migrations live apart per engine in `migrations/{sqlite,postgres}/`.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::DatabaseUrl;
use crate::keys::{KeyId, KeyKind, KeyRow};

pub use fleet::{Heartbeat, CHANGES_CHANNEL};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// A connection pool to one of the two engines.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// A row the call depends on changed under it (a key revoked while it was being replaced);
    /// nothing was written.
    #[error("{0}")]
    Changed(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Unavailable(e)
    }
}

/// Runs `$body` with `$pool` bound to whichever pool the store holds. The body is compiled once
/// per engine, so the same query text and binds serve both.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match $store {
            Store::Sqlite($pool) => $body,
            Store::Postgres($pool) => $body,
        }
    };
}

/// Inserts one audit entry on `$exec` (a pool or a transaction).
macro_rules! insert_audit {
    ($exec:expr, $a:expr) => {
        sqlx::query(
            "INSERT INTO audit_log (at, actor_type, actor_id, action, key_prefix, scopes, detail, client_addr)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind($a.at)
        .bind(&$a.actor_type)
        .bind(&$a.actor_id)
        .bind(&$a.action)
        .bind(&$a.key_prefix)
        .bind(&$a.scopes)
        .bind(&$a.detail)
        .bind(&$a.client_addr)
        .execute($exec)
    };
}

// After the macros above, which it uses.
mod admin;
mod fleet;
mod gateways;
pub use admin::{
    AuditFilter, AuditRecord, GatewayKey, NewSession, SessionRecord, User, UserChange,
};
pub use gateways::{Gateway, Pairing};

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct Account {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub created_at: i64,
    pub created_by: String,
}

/// A service-account key as lists show it: never the key, never its hash.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct KeyRecord {
    pub id: i64,
    pub account_id: i64,
    pub account_name: String,
    pub prefix: String,
    pub name: String,
    pub scopes: String,
    pub created_at: i64,
    pub created_by: String,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoked_by: Option<String>,
    pub last_used_at: Option<i64>,
    /// The client address of a recent use (recorded with the last-used stamp).
    pub last_client_addr: Option<String>,
    /// The key that replaced this one, when it was rotated with "Create replacement".
    pub replaced_by: Option<i64>,
    /// Auto-retire: revoke once the replacement carried traffic and this key idled this long.
    pub retire_after_idle_ms: Option<i64>,
}

/// A key about to be stored.
#[derive(Debug)]
pub struct NewKey {
    pub account_id: i64,
    pub prefix: String,
    pub key_hash: String,
    pub name: String,
    pub scopes: String,
    pub created_at: i64,
    pub created_by: String,
    pub expires_at: Option<i64>,
}

/// The key a new key replaces: linked to it, given its rotation window, in the new key's
/// transaction.
#[derive(Debug)]
pub struct Replacing {
    pub old_id: i64,
    pub old_expires_at: i64,
    pub retire_after_idle_ms: Option<i64>,
    /// The old key's audit entry (its expiry change).
    pub audit: AuditEntry,
}

/// One audit-log line. `key_prefix` is the first 8 characters of a key, never more.
#[derive(Clone, Debug, Default, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub at: i64,
    pub actor_type: String,
    pub actor_id: Option<String>,
    pub action: String,
    pub key_prefix: Option<String>,
    pub scopes: Option<String>,
    /// A JSON object with the specifics of the change.
    pub detail: String,
    pub client_addr: Option<String>,
}

#[derive(sqlx::FromRow)]
struct TableRow {
    kind: String,
    id: i64,
    prefix: Option<String>,
    key_hash: Option<String>,
    scopes: String,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    updated_at: i64,
    owner_id: i64,
    owner_name: String,
}

impl From<TableRow> for KeyRow {
    fn from(r: TableRow) -> KeyRow {
        KeyRow {
            id: KeyId {
                kind: if r.kind == "g" {
                    KeyKind::Gateway
                } else {
                    KeyKind::ServiceAccount
                },
                id: r.id,
            },
            prefix: r.prefix,
            key_hash: r.key_hash,
            scopes: r.scopes,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            updated_at: r.updated_at,
            owner_id: r.owner_id,
            owner_name: r.owner_name,
        }
    }
}

/// A service-account key's newest use, as the last-used flush writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UseStamp {
    pub id: i64,
    pub at_ms: i64,
    /// The client address of that use.
    pub client: Option<IpAddr>,
}

/// Keys with their last use. Stamps live in `api_key_usage` (migration 0004); the
/// `api_keys` columns of the same names are only written by sidecars of earlier versions
/// (during a rolling upgrade), so the newer of the two is shown.
const KEY_RECORD: &str =
    "SELECT k.id, k.account_id, a.name AS account_name, k.prefix, k.name, k.scopes,
        k.created_at, k.created_by, k.expires_at, k.revoked_at, k.revoked_by,
        CASE WHEN u.last_used_at IS NULL OR k.last_used_at > u.last_used_at
             THEN k.last_used_at ELSE u.last_used_at END AS last_used_at,
        CASE WHEN u.last_used_at IS NULL OR k.last_used_at > u.last_used_at
             THEN k.last_client_addr ELSE u.last_client_addr END AS last_client_addr,
        k.replaced_by, k.retire_after_idle_ms
   FROM api_keys k JOIN service_accounts a ON a.id = k.account_id
   LEFT JOIN api_key_usage u ON u.key_id = k.id";

/// Every key and gateway changed after `$1`, for the in-memory table.
const TABLE_ROWS: &str =
    "SELECT 's' AS kind, k.id, k.prefix, k.key_hash, k.scopes, k.expires_at, k.revoked_at,
            k.updated_at, a.id AS owner_id, a.name AS owner_name
       FROM api_keys k JOIN service_accounts a ON a.id = k.account_id
      WHERE k.updated_at > $1
     UNION ALL
     SELECT 'g' AS kind, g.id, g.prefix, g.api_key_hash, g.scopes, CAST(NULL AS BIGINT), g.unpaired_at,
            g.updated_at, g.id, g.name
       FROM gateways g
      WHERE g.updated_at > $1";

impl Store {
    /// Opens a pool. A SQLite file is created when missing and runs in WAL mode.
    pub async fn connect(url: &DatabaseUrl, max_connections: u32) -> Result<Store, StoreError> {
        if url.is_postgres() {
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url.expose())
                .await?;
            Ok(Store::Postgres(pool))
        } else {
            let options = SqliteConnectOptions::from_str(url.expose())?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await?;
            Ok(Store::Sqlite(pool))
        }
    }

    /// Opens a pool without connecting: `serve` starts even while the database is away and
    /// keeps retrying in the background.
    pub fn connect_lazy(url: &DatabaseUrl, max_connections: u32) -> Result<Store, StoreError> {
        if url.is_postgres() {
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy(url.expose())?;
            Ok(Store::Postgres(pool))
        } else {
            let options = SqliteConnectOptions::from_str(url.expose())?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options);
            Ok(Store::Sqlite(pool))
        }
    }

    /// Applies pending migrations for this engine.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
            Store::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    pub fn engine(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// A round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop))?;
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await)
    }

    /// The database's own clock (Unix ms), the one `updated_at` is stamped with.
    pub async fn now_ms(&self) -> Result<i64, StoreError> {
        let now = match self {
            Store::Sqlite(pool) => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
                )
                .fetch_one(pool)
                .await?
            }
            Store::Postgres(pool) => {
                sqlx::query_scalar::<_, i64>("SELECT keygate_now_ms()")
                    .fetch_one(pool)
                    .await?
            }
        };
        Ok(now)
    }

    // ---- service accounts -------------------------------------------------------------

    pub async fn create_account(
        &self,
        account: &Account,
        audit: &AuditEntry,
    ) -> Result<Account, StoreError> {
        let created = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let created = sqlx::query_as::<_, Account>(
                "INSERT INTO service_accounts (name, description, created_at, created_by)
                 VALUES ($1, $2, $3, $4)
                 RETURNING id, name, description, created_at, created_by",
            )
            .bind(&account.name)
            .bind(&account.description)
            .bind(account.created_at)
            .bind(&account.created_by)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                conflict(e, || {
                    format!("a service account named `{}` already exists", account.name)
                })
            })?;
            insert_audit!(&mut *tx, audit).await?;
            tx.commit().await?;
            created
        });
        Ok(created)
    }

    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let sql = "SELECT id, name, description, created_at, created_by FROM service_accounts ORDER BY name";
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, Account>(sql)
            .fetch_all(pool)
            .await)?)
    }

    pub async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError> {
        let sql = "SELECT id, name, description, created_at, created_by FROM service_accounts WHERE name = $1";
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, Account>(sql)
            .bind(name)
            .fetch_optional(pool)
            .await)?)
    }

    pub async fn account(&self, id: i64) -> Result<Option<Account>, StoreError> {
        let sql = "SELECT id, name, description, created_at, created_by FROM service_accounts WHERE id = $1";
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, Account>(sql)
            .bind(id)
            .fetch_optional(pool)
            .await)?)
    }

    // ---- keys -------------------------------------------------------------------------

    /// Stores a key and its audit entry in one transaction, and, for a replacement, links the
    /// old key to it in the same transaction. A prefix or name already taken is a `Conflict`
    /// (the caller retries a prefix clash with a new key); an old key revoked meanwhile is
    /// `Changed`, and then nothing is written.
    pub async fn insert_key(
        &self,
        key: &NewKey,
        audit: &AuditEntry,
        replacing: Option<&Replacing>,
    ) -> Result<KeyRecord, StoreError> {
        let id: i64 = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO api_keys (account_id, prefix, key_hash, name, scopes, created_at, created_by, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            )
            .bind(key.account_id)
            .bind(&key.prefix)
            .bind(&key.key_hash)
            .bind(&key.name)
            .bind(&key.scopes)
            .bind(key.created_at)
            .bind(&key.created_by)
            .bind(key.expires_at)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| conflict(e, || "prefix or name taken".to_string()))?;
            insert_audit!(&mut *tx, audit).await?;
            if let Some(r) = replacing {
                let linked = sqlx::query(
                    "UPDATE api_keys SET replaced_by = $1, expires_at = $2, retire_after_idle_ms = $3
                      WHERE id = $4 AND revoked_at IS NULL",
                )
                .bind(id)
                .bind(r.old_expires_at)
                .bind(r.retire_after_idle_ms)
                .bind(r.old_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if linked != 1 {
                    // Dropping the transaction rolls the new key back.
                    return Err(StoreError::Changed(
                        "the key was revoked meanwhile; it cannot be replaced".into(),
                    ));
                }
                insert_audit!(&mut *tx, &r.audit).await?;
            }
            tx.commit().await?;
            id
        });
        self.key(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key {id}")))
    }

    pub async fn key(&self, id: i64) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!("{KEY_RECORD} WHERE k.id = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, KeyRecord>(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await)?)
    }

    pub async fn key_by_prefix(&self, prefix: &str) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!("{KEY_RECORD} WHERE k.prefix = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, KeyRecord>(&sql)
            .bind(prefix)
            .fetch_optional(pool)
            .await)?)
    }

    pub async fn key_by_name(
        &self,
        account_id: i64,
        name: &str,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!("{KEY_RECORD} WHERE k.account_id = $1 AND k.name = $2");
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, KeyRecord>(&sql)
            .bind(account_id)
            .bind(name)
            .fetch_optional(pool)
            .await)?)
    }

    /// Keys, newest first; of one account when `account_id` is given.
    pub async fn keys(&self, account_id: Option<i64>) -> Result<Vec<KeyRecord>, StoreError> {
        let sql = format!("{KEY_RECORD} WHERE ($1 IS NULL OR k.account_id = $1) ORDER BY a.name, k.created_at DESC, k.id DESC");
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, KeyRecord>(&sql)
            .bind(account_id)
            .fetch_all(pool)
            .await)?)
    }

    /// Revokes an active key. Revoking an unknown key is `NotFound`; a revoked one, `Conflict`.
    pub async fn revoke_key(
        &self,
        id: i64,
        at: i64,
        by: &str,
        audit: &AuditEntry,
    ) -> Result<KeyRecord, StoreError> {
        let changed = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let n = sqlx::query("UPDATE api_keys SET revoked_at = $1, revoked_by = $2 WHERE id = $3 AND revoked_at IS NULL")
                .bind(at)
                .bind(by)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n == 1 {
                insert_audit!(&mut *tx, audit).await?;
            }
            tx.commit().await?;
            n
        });
        let record = self
            .key(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no key with id {id}")))?;
        if changed == 0 {
            return Err(StoreError::Conflict(format!(
                "key {} is already revoked",
                record.prefix
            )));
        }
        Ok(record)
    }

    /// Sets or clears an active key's expiry.
    pub async fn set_key_expiry(
        &self,
        id: i64,
        expires_at: Option<i64>,
        audit: &AuditEntry,
    ) -> Result<KeyRecord, StoreError> {
        let changed = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let n = sqlx::query(
                "UPDATE api_keys SET expires_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(expires_at)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                insert_audit!(&mut *tx, audit).await?;
            }
            tx.commit().await?;
            n
        });
        let record = self
            .key(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no key with id {id}")))?;
        if changed == 0 {
            return Err(StoreError::Conflict(format!(
                "key {} is revoked; its expiry cannot change",
                record.prefix
            )));
        }
        Ok(record)
    }

    // ---- the key table ----------------------------------------------------------------

    /// Every key and paired-or-unpaired gateway whose change marker is above `since`
    /// (`i64::MIN` for all), for refreshing the in-memory table.
    pub async fn table_rows(&self, since: i64) -> Result<Vec<KeyRow>, StoreError> {
        let mut rows = Vec::new();
        self.each_table_row(since, |row| rows.push(row)).await?;
        Ok(rows)
    }

    /// `table_rows`, handed to `each` one at a time as the database sends them: a whole-table
    /// load never holds every row at once.
    pub async fn each_table_row(
        &self,
        since: i64,
        mut each: impl FnMut(KeyRow),
    ) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            let mut rows = sqlx::query_as::<_, TableRow>(TABLE_ROWS)
                .bind(since)
                .fetch(pool);
            while let Some(row) = rows.try_next().await? {
                each(row.into());
            }
        });
        Ok(())
    }

    // ---- usage ------------------------------------------------------------------------

    /// Writes last uses: keys' stamps with their client addresses into `api_key_usage`, and
    /// gateways' `last_seen_at`, one statement per table, never moving a stamp backwards
    /// (other sidecars may have written a newer one). A stamp and its client address are
    /// written together, so whoever sees a new last use also sees where it came from.
    ///
    /// Stamps are sorted by id, so sidecars flushing overlapping keys at once lock their rows
    /// in the same order (no deadlock), and a key listed twice (an entry replaced by a reload
    /// while its stamp waited) is written once, with its newest use.
    pub async fn stamp_last_used(
        &self,
        keys: &[UseStamp],
        gateways: &[(i64, i64)],
    ) -> Result<(), StoreError> {
        let mut keys = keys.to_vec();
        keys.sort_unstable_by_key(|s| (s.id, std::cmp::Reverse(s.at_ms)));
        keys.dedup_by_key(|s| s.id);
        let mut gateways = gateways.to_vec();
        gateways.sort_unstable_by_key(|&(id, at)| (id, std::cmp::Reverse(at)));
        gateways.dedup_by_key(|&mut (id, _)| id);
        match self {
            Store::Postgres(pool) => {
                if !keys.is_empty() {
                    let ids: Vec<i64> = keys.iter().map(|s| s.id).collect();
                    let ats: Vec<i64> = keys.iter().map(|s| s.at_ms).collect();
                    let clients: Vec<Option<String>> = keys
                        .iter()
                        .map(|s| s.client.map(|ip| ip.to_string()))
                        .collect();
                    sqlx::query(
                        "INSERT INTO api_key_usage AS u (key_id, last_used_at, last_client_addr)
                         SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[])
                         ON CONFLICT (key_id) DO UPDATE
                            SET last_used_at = excluded.last_used_at,
                                last_client_addr = COALESCE(excluded.last_client_addr, u.last_client_addr)
                          WHERE u.last_used_at < excluded.last_used_at",
                    )
                    .bind(ids)
                    .bind(ats)
                    .bind(clients)
                    .execute(pool)
                    .await?;
                }
                if !gateways.is_empty() {
                    let (ids, ats): (Vec<i64>, Vec<i64>) = gateways.into_iter().unzip();
                    sqlx::query(
                        "UPDATE gateways AS t SET last_seen_at = v.at
                           FROM unnest($1::BIGINT[], $2::BIGINT[]) AS v(id, at)
                          WHERE t.id = v.id AND (t.last_seen_at IS NULL OR t.last_seen_at < v.at)",
                    )
                    .bind(ids)
                    .bind(ats)
                    .execute(pool)
                    .await?;
                }
            }
            Store::Sqlite(pool) => {
                if !keys.is_empty() {
                    let rows: Vec<(i64, i64, Option<String>)> = keys
                        .iter()
                        .map(|s| (s.id, s.at_ms, s.client.map(|ip| ip.to_string())))
                        .collect();
                    let json = serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into());
                    // `WHERE true` tells SQLite's parser the ON CONFLICT belongs to the INSERT.
                    sqlx::query(
                        "INSERT INTO api_key_usage (key_id, last_used_at, last_client_addr)
                         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
                           FROM json_each($1) WHERE true
                         ON CONFLICT (key_id) DO UPDATE
                            SET last_used_at = excluded.last_used_at,
                                last_client_addr = COALESCE(excluded.last_client_addr, api_key_usage.last_client_addr)
                          WHERE api_key_usage.last_used_at < excluded.last_used_at",
                    )
                    .bind(json)
                    .execute(pool)
                    .await?;
                }
                if !gateways.is_empty() {
                    let json = serde_json::to_string(&gateways).unwrap_or_else(|_| "[]".into());
                    sqlx::query(
                        "UPDATE gateways SET last_seen_at = v.at
                           FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS at
                                   FROM json_each($1)) AS v
                          WHERE gateways.id = v.id AND (gateways.last_seen_at IS NULL OR gateways.last_seen_at < v.at)",
                    )
                    .bind(json)
                    .execute(pool)
                    .await?;
                }
            }
        }
        Ok(())
    }

    // ---- audit ------------------------------------------------------------------------

    pub async fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            for a in entries {
                insert_audit!(&mut *tx, a).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Audit entries, newest first.
    pub async fn audit(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let sql = "SELECT at, actor_type, actor_id, action, key_prefix, scopes, detail, client_addr
                     FROM audit_log ORDER BY id DESC LIMIT $1";
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, AuditEntry>(sql)
            .bind(limit)
            .fetch_all(pool)
            .await)?)
    }
}

/// Turns a unique-constraint violation into a `Conflict` with `message`.
fn conflict(e: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match e.as_database_error() {
        Some(d) if d.is_unique_violation() => StoreError::Conflict(message()),
        _ => StoreError::Unavailable(e),
    }
}
