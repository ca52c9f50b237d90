//! Control-plane queries for the admin console: users, server-side sessions, the audit log
//! with filters, and the rotation link between a key and its replacement.

use serde::Serialize;

use super::{conflict, AuditEntry, KeyRecord, Store, StoreError, KEY_RECORD};

/// A console user. The password hash stays in the store layer (see `user_password_hash`).
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub role: String,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

/// One change to a console user (`Store::change_user`).
#[derive(Clone, Debug)]
pub enum UserChange {
    Role(String),
    Disable,
    Enable,
    /// A new argon2id hash of the password.
    PasswordHash(String),
}

/// A paired gateway's key as the console lists it (managed by pairing, not here).
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct GatewayKey {
    pub id: i64,
    pub name: String,
    pub prefix: String,
    pub scopes: String,
    pub paired_at: Option<i64>,
    pub last_seen_at: Option<i64>,
}

/// A session about to be stored: only the digest of the cookie token is kept.
#[derive(Debug)]
pub struct NewSession {
    pub token_digest: String,
    pub user_id: i64,
    pub csrf_token: String,
    pub created_at: i64,
    pub client_addr: Option<String>,
}

/// A live session with its user, as every console and API request resolves it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct SessionRecord {
    pub id: i64,
    pub user_id: i64,
    pub email: String,
    pub role: String,
    pub csrf_token: String,
    pub last_seen_at: i64,
    pub ended_at: Option<i64>,
    pub disabled_at: Option<i64>,
}

/// One stored audit entry with its id (the pagination cursor).
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    pub actor_type: String,
    pub actor_id: Option<String>,
    pub action: String,
    pub key_prefix: Option<String>,
    pub scopes: Option<String>,
    pub detail: String,
    pub client_addr: Option<String>,
}

/// Which audit entries to read, newest first. `before_id` pages backwards.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub actor_type: Option<String>,
    pub action: Option<String>,
    pub key_prefix: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

const SESSION: &str =
    "SELECT s.id, s.user_id, u.email, u.role, s.csrf_token, s.last_seen_at, s.ended_at, u.disabled_at
       FROM sessions s JOIN users u ON u.id = s.user_id";

impl Store {
    // ---- users ------------------------------------------------------------------------

    pub async fn user_count(&self) -> Result<i64, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM users"
        )
        .fetch_one(pool)
        .await)?)
    }

    /// Stores a user and its audit entry in one transaction. With `only_if_none`, the insert
    /// happens only while there is no user at all (the one-time setup link), else `Conflict`.
    pub async fn insert_user(
        &self,
        email: &str,
        password_hash: &str,
        role: &str,
        now_ms: i64,
        only_if_none: bool,
        audit: &AuditEntry,
    ) -> Result<User, StoreError> {
        let user = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            // Emails are one address whatever their case: the login finds them without case.
            // The setup adds a user only while there is none. Both checks are in the one
            // statement that writes, not a read and then a write: on SQLite a transaction that
            // reads first cannot take the write lock once another connection has written
            // (SQLITE_BUSY_SNAPSHOT, which no busy timeout waits out).
            let user = sqlx::query_as::<_, User>(
                "INSERT INTO users (email, password_hash, role, created_at)
                 SELECT $1, $2, $3, $4
                  WHERE NOT EXISTS (SELECT 1 FROM users WHERE lower(email) = lower($1))
                    AND NOT ($5 AND EXISTS (SELECT 1 FROM users))
                 RETURNING id, email, role, created_at, disabled_at",
            )
            .bind(email)
            .bind(password_hash)
            .bind(role)
            .bind(now_ms)
            .bind(only_if_none)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| conflict(e, || format!("a user with email `{email}` already exists")))?
            .ok_or_else(|| {
                StoreError::Conflict(if only_if_none {
                    "setup is already complete: a user exists".into()
                } else {
                    format!(
                        "a user with email `{email}` already exists (emails are compared without case)"
                    )
                })
            })?;
            let mut audit = audit.clone();
            // The setup link has no actor yet: the new owner is its own actor.
            if audit.actor_type == "setup" {
                audit.actor_id = Some(user.id.to_string());
            }
            insert_audit!(&mut *tx, audit).await?;
            tx.commit().await?;
            user
        });
        Ok(user)
    }

    /// Applies one change to the user with `email` and stores `audit` for it, in one
    /// transaction. Disabling a user or changing its password ends its sessions at once. A
    /// change that would leave no enabled `owner` is refused (`Conflict`) and changes nothing,
    /// as is one that would change nothing.
    pub async fn change_user(
        &self,
        email: &str,
        change: &UserChange,
        now_ms: i64,
        audit: &AuditEntry,
    ) -> Result<User, StoreError> {
        // Two owners demoted at once from two terminals must not both succeed: SQLite takes
        // its one write lock at the start; PostgreSQL locks the enabled owners' rows first.
        let (begin, lock_owners) = match self {
            Store::Sqlite(_) => ("BEGIN IMMEDIATE", None),
            Store::Postgres(_) => (
                "BEGIN",
                Some(
                    "SELECT id FROM users WHERE role = 'owner' AND disabled_at IS NULL FOR UPDATE",
                ),
            ),
        };
        let user = on_pool!(self, |pool| {
            let mut tx = pool.begin_with(begin).await?;
            if let Some(lock) = lock_owners {
                sqlx::query(lock).execute(&mut *tx).await?;
            }
            let before = sqlx::query_as::<_, User>(
                "SELECT id, email, role, created_at, disabled_at FROM users
                  WHERE lower(email) = lower($1) ORDER BY id LIMIT 1",
            )
            .bind(email)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no console user with email `{email}`")))?;
            let unchanged =
                |what: String| Err(StoreError::Conflict(format!("user `{email}` {what}")));
            let update = match change {
                UserChange::Role(role) if before.role == *role => {
                    return unchanged(format!("already has role {role}"))
                }
                UserChange::Disable if before.disabled_at.is_some() => {
                    return unchanged("is already disabled".into())
                }
                UserChange::Enable if before.disabled_at.is_none() => {
                    return unchanged("is not disabled".into())
                }
                UserChange::Role(role) => {
                    sqlx::query("UPDATE users SET role = $1 WHERE id = $2").bind(role)
                }
                UserChange::Disable => {
                    sqlx::query("UPDATE users SET disabled_at = $1 WHERE id = $2").bind(now_ms)
                }
                UserChange::PasswordHash(hash) => {
                    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2").bind(hash)
                }
                UserChange::Enable => {
                    sqlx::query("UPDATE users SET disabled_at = NULL WHERE id = $1")
                }
            };
            update.bind(before.id).execute(&mut *tx).await?;
            if matches!(change, UserChange::Disable | UserChange::PasswordHash(_)) {
                sqlx::query(
                    "UPDATE sessions SET ended_at = $1 WHERE user_id = $2 AND ended_at IS NULL",
                )
                .bind(now_ms)
                .bind(before.id)
                .execute(&mut *tx)
                .await?;
            }
            let was_owner = before.role == "owner" && before.disabled_at.is_none();
            if was_owner && matches!(change, UserChange::Role(_) | UserChange::Disable) {
                let owners: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM users WHERE role = 'owner' AND disabled_at IS NULL",
                )
                .fetch_one(&mut *tx)
                .await?;
                if owners == 0 {
                    return Err(StoreError::Conflict(format!(
                        "user `{email}` is the last enabled owner; make another user owner first"
                    )));
                }
            }
            insert_audit!(&mut *tx, audit).await?;
            let after = sqlx::query_as::<_, User>(
                "SELECT id, email, role, created_at, disabled_at FROM users WHERE id = $1",
            )
            .bind(before.id)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            after
        });
        Ok(user)
    }

    pub async fn users(&self) -> Result<Vec<User>, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, User>(
            "SELECT id, email, role, created_at, disabled_at FROM users ORDER BY email"
        )
        .fetch_all(pool)
        .await)?)
    }

    /// A user and its password hash, for login.
    pub async fn user_for_login(&self, email: &str) -> Result<Option<(User, String)>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            id: i64,
            email: String,
            role: String,
            created_at: i64,
            disabled_at: Option<i64>,
            password_hash: String,
        }
        let row = on_pool!(self, |pool| {
            sqlx::query_as::<_, Row>(
                "SELECT id, email, role, created_at, disabled_at, password_hash FROM users
              WHERE lower(email) = lower($1) ORDER BY id LIMIT 1",
            )
            .bind(email)
            .fetch_optional(pool)
            .await
        })?;
        Ok(row.map(|r| {
            (
                User {
                    id: r.id,
                    email: r.email,
                    role: r.role,
                    created_at: r.created_at,
                    disabled_at: r.disabled_at,
                },
                r.password_hash,
            )
        }))
    }

    // ---- sessions ---------------------------------------------------------------------

    pub async fn insert_session(&self, s: &NewSession) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            sqlx::query(
            "INSERT INTO sessions (token_digest, user_id, csrf_token, created_at, last_seen_at, client_addr)
             VALUES ($1, $2, $3, $4, $4, $5)"
        )
        .bind(&s.token_digest)
        .bind(s.user_id)
        .bind(&s.csrf_token)
        .bind(s.created_at)
        .bind(&s.client_addr)
        .execute(pool)
        .await
        .map(drop)
        })?;
        Ok(())
    }

    pub async fn session_by_digest(
        &self,
        digest: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let sql = format!("{SESSION} WHERE s.token_digest = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, SessionRecord>(
            &sql
        )
        .bind(digest)
        .fetch_optional(pool)
        .await)?)
    }

    pub async fn touch_session(&self, id: i64, now_ms: i64) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query(
            "UPDATE sessions SET last_seen_at = $1 WHERE id = $2 AND last_seen_at < $1"
        )
        .bind(now_ms)
        .bind(id)
        .execute(pool)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Ends a session (logout, idle expiry); an ended session never resolves again.
    pub async fn end_session(&self, id: i64, now_ms: i64) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query(
            "UPDATE sessions SET ended_at = $1 WHERE id = $2 AND ended_at IS NULL"
        )
        .bind(now_ms)
        .bind(id)
        .execute(pool)
        .await
        .map(drop))?;
        Ok(())
    }

    // ---- audit ------------------------------------------------------------------------

    /// Audit entries matching `f`, newest first.
    pub async fn audit_page(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let sql =
            "SELECT id, at, actor_type, actor_id, action, key_prefix, scopes, detail, client_addr
                     FROM audit_log
                    WHERE ($1 IS NULL OR actor_type = $1)
                      AND ($2 IS NULL OR action = $2)
                      AND ($3 IS NULL OR key_prefix = $3)
                      AND ($4 IS NULL OR at >= $4)
                      AND ($5 IS NULL OR at < $5)
                      AND ($6 IS NULL OR id < $6)
                    ORDER BY id DESC LIMIT $7";
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, AuditRecord>(
            sql
        )
        .bind(&f.actor_type)
        .bind(&f.action)
        .bind(&f.key_prefix)
        .bind(f.since_ms)
        .bind(f.until_ms)
        .bind(f.before_id)
        .bind(f.limit)
        .fetch_all(pool)
        .await)?)
    }

    /// Appends many audit entries with multi-row inserts (1,000 rows per statement) in one
    /// transaction: what the proxied-request audit writer needs to keep up with traffic.
    pub async fn append_audit_batch(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            for chunk in entries.chunks(1_000) {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO audit_log (at, actor_type, actor_id, action, key_prefix, scopes, detail, client_addr) ",
                );
                q.push_values(chunk, |mut row, a| {
                    row.push_bind(a.at)
                        .push_bind(&a.actor_type)
                        .push_bind(&a.actor_id)
                        .push_bind(&a.action)
                        .push_bind(&a.key_prefix)
                        .push_bind(&a.scopes)
                        .push_bind(&a.detail)
                        .push_bind(&a.client_addr);
                });
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    // ---- gateways ---------------------------------------------------------------------

    /// Keys held by paired gateways, for the keys list (read-only here).
    pub async fn gateway_keys(&self) -> Result<Vec<GatewayKey>, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, GatewayKey>(
            "SELECT id, name, prefix, scopes, paired_at, last_seen_at FROM gateways
              WHERE prefix IS NOT NULL AND unpaired_at IS NULL ORDER BY name"
        )
        .fetch_all(pool)
        .await)?)
    }

    // ---- rotation ---------------------------------------------------------------------

    /// Active keys that have a replacement and an auto-retire rule, with their replacements.
    /// Every sidecar asks every `database.refresh_interval`; the 0005 partial index keeps that
    /// to the candidates instead of a read of every key.
    pub async fn retire_candidates(&self) -> Result<Vec<(KeyRecord, KeyRecord)>, StoreError> {
        let sql = retire_candidates_sql();
        let old = on_pool!(self, |pool| sqlx::query_as::<_, KeyRecord>(&sql)
            .fetch_all(pool)
            .await)?;
        let mut pairs = Vec::with_capacity(old.len());
        for o in old {
            if let Some(new) = self.key(o.replaced_by.unwrap_or_default()).await? {
                pairs.push((o, new));
            }
        }
        Ok(pairs)
    }

    /// The engine's plan for `retire_candidates`' query, as text, so tests can check that it
    /// uses the 0005 index. PostgreSQL is asked with sequential scans off: on a test's small
    /// table it would rightly read the whole table, and the question is whether the index
    /// can serve the query.
    #[doc(hidden)]
    pub async fn retire_candidates_plan(&self) -> Result<String, StoreError> {
        let sql = retire_candidates_sql();
        let lines: Vec<String> = match self {
            Store::Sqlite(pool) => {
                let rows: Vec<(i64, i64, i64, String)> =
                    sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                        .fetch_all(pool)
                        .await?;
                rows.into_iter().map(|(_, _, _, detail)| detail).collect()
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SET LOCAL enable_seqscan = off")
                    .execute(&mut *tx)
                    .await?;
                let plan = sqlx::query_scalar(&format!("EXPLAIN {sql}"))
                    .fetch_all(&mut *tx)
                    .await?;
                tx.rollback().await?;
                plan
            }
        };
        Ok(lines.join("\n"))
    }
}

fn retire_candidates_sql() -> String {
    format!(
        "{KEY_RECORD} WHERE k.replaced_by IS NOT NULL AND k.revoked_at IS NULL
                      AND k.retire_after_idle_ms IS NOT NULL"
    )
}
