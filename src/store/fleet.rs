//! Store queries for the fleet: sidecar heartbeats and the change marker of one key, so an
//! operator can see on how many live sidecars a change has taken effect.

use serde::Serialize;
use sqlx::postgres::PgListener;

use super::{Store, StoreError};

/// The PostgreSQL channel the 0003 triggers announce key and gateway changes on.
pub const CHANGES_CHANNEL: &str = "keygate_changes";

/// One sidecar's latest heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Heartbeat {
    pub id: String,
    pub host: String,
    pub version: String,
    pub started_at: i64,
    pub seen_at: i64,
    /// The newest change (`updated_at`) the sidecar's key table has applied.
    pub watermark: i64,
    /// How long ago the sidecar's table last matched the database; `None` before its first load.
    pub table_age_ms: Option<i64>,
    pub keys: i64,
}

impl Store {
    /// Records (inserts or replaces) a sidecar's heartbeat.
    pub async fn record_heartbeat(&self, beat: &Heartbeat) -> Result<(), StoreError> {
        let sql = "INSERT INTO sidecars (id, host, version, started_at, seen_at, watermark, table_age_ms, keys)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                   ON CONFLICT (id) DO UPDATE SET host = excluded.host, version = excluded.version,
                       started_at = excluded.started_at, seen_at = excluded.seen_at,
                       watermark = excluded.watermark, table_age_ms = excluded.table_age_ms,
                       keys = excluded.keys";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(&beat.id)
            .bind(&beat.host)
            .bind(&beat.version)
            .bind(beat.started_at)
            .bind(beat.seen_at)
            .bind(beat.watermark)
            .bind(beat.table_age_ms)
            .bind(beat.keys)
            .execute(pool)
            .await
            .map(drop))?;
        Ok(())
    }

    /// Removes a sidecar's heartbeat (on a graceful stop).
    pub async fn remove_heartbeat(&self, id: &str) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query(
            "DELETE FROM sidecars WHERE id = $1"
        )
        .bind(id)
        .execute(pool)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Forgets sidecars not seen since `before` (crashed ones never remove their own row).
    pub async fn prune_heartbeats(&self, before: i64) -> Result<u64, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query(
            "DELETE FROM sidecars WHERE seen_at < $1"
        )
        .bind(before)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?)
    }

    /// Heartbeats seen at or after `since` (Unix ms), newest first.
    pub async fn heartbeats(&self, since: i64) -> Result<Vec<Heartbeat>, StoreError> {
        let sql = "SELECT id, host, version, started_at, seen_at, watermark, table_age_ms, keys
                     FROM sidecars WHERE seen_at >= $1 ORDER BY seen_at DESC, id";
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, Heartbeat>(sql)
            .bind(since)
            .fetch_all(pool)
            .await)?)
    }

    /// The change marker of the key (a service account's or a gateway's) with `prefix`, if there
    /// is one.
    pub async fn key_change_marker(&self, prefix: &str) -> Result<Option<i64>, StoreError> {
        let sql = "SELECT updated_at FROM api_keys WHERE prefix = $1
                   UNION ALL SELECT updated_at FROM gateways WHERE prefix = $1";
        Ok(on_pool!(self, |pool| sqlx::query_scalar::<_, i64>(sql)
            .bind(prefix)
            .fetch_optional(pool)
            .await)?)
    }

    /// A listener on [`CHANGES_CHANNEL`]; `None` on SQLite, which has no notifications.
    pub async fn listen_for_changes(&self) -> Result<Option<PgListener>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(pool) => {
                let mut listener = PgListener::connect_with(pool).await?;
                listener.listen(CHANGES_CHANNEL).await?;
                Ok(Some(listener))
            }
        }
    }
}
