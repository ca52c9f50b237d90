//! Gateway pairing: the `gateways` rows and their key hashes. Each change is one statement in
//! a transaction with its audit entry, and moves `updated_at` (the 0001 trigger), so every
//! sidecar's table picks it up on its next refresh or NOTIFY.

use serde::Serialize;

use super::{conflict, AuditEntry, Store, StoreError};

/// A gateway as lists show it: its key's prefix while paired, never the key or its hash.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct Gateway {
    pub id: i64,
    pub name: String,
    pub prefix: Option<String>,
    pub scopes: String,
    pub created_at: i64,
    pub created_by: String,
    pub paired_at: Option<i64>,
    pub paired_by: Option<String>,
    pub unpaired_at: Option<i64>,
    pub last_seen_at: Option<i64>,
}

impl Gateway {
    /// Paired: it holds a key that authenticates.
    pub fn is_paired(&self) -> bool {
        self.unpaired_at.is_none() && self.prefix.is_some()
    }
}

/// A new key for a gateway (pair or re-pair): stored as its prefix and argon2 hash.
#[derive(Debug)]
pub struct Pairing {
    pub prefix: String,
    pub key_hash: String,
    pub scopes: String,
    pub at: i64,
    pub by: String,
}

const GATEWAY: &str =
    "SELECT id, name, prefix, scopes, created_at, created_by, paired_at, paired_by,
                              unpaired_at, last_seen_at
                         FROM gateways";

impl Store {
    /// Every gateway, by name.
    pub async fn gateways(&self) -> Result<Vec<Gateway>, StoreError> {
        let sql = format!("{GATEWAY} ORDER BY name");
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, Gateway>(&sql)
            .fetch_all(pool)
            .await)?)
    }

    pub async fn gateway(&self, id: i64) -> Result<Option<Gateway>, StoreError> {
        let sql = format!("{GATEWAY} WHERE id = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, Gateway>(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await)?)
    }

    pub async fn gateway_by_name(&self, name: &str) -> Result<Option<Gateway>, StoreError> {
        let sql = format!("{GATEWAY} WHERE name = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, Gateway>(&sql)
            .bind(name)
            .fetch_optional(pool)
            .await)?)
    }

    /// Which gateway holds `prefix` (paired or not), so a refusal can name its unpair path.
    pub async fn gateway_by_prefix(&self, prefix: &str) -> Result<Option<Gateway>, StoreError> {
        let sql = format!("{GATEWAY} WHERE prefix = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as::<_, Gateway>(&sql)
            .bind(prefix)
            .fetch_optional(pool)
            .await)?)
    }

    /// Creates a paired gateway and its audit entry in one transaction. A name or prefix
    /// already taken is a `Conflict` (the caller tells them apart and retries a prefix clash).
    pub async fn insert_gateway(
        &self,
        name: &str,
        pairing: &Pairing,
        audit: &AuditEntry,
    ) -> Result<Gateway, StoreError> {
        let id: i64 = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO gateways (name, prefix, api_key_hash, scopes, created_at, created_by, paired_at, paired_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $5, $6) RETURNING id",
            )
            .bind(name)
            .bind(&pairing.prefix)
            .bind(&pairing.key_hash)
            .bind(&pairing.scopes)
            .bind(pairing.at)
            .bind(&pairing.by)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| conflict(e, || "name or prefix taken".to_string()))?;
            let mut audit = audit.clone();
            audit.detail = with_gateway_id(&audit.detail, id);
            insert_audit!(&mut *tx, audit).await?;
            tx.commit().await?;
            id
        });
        self.gateway(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no gateway with id {id}")))
    }

    /// Replaces a gateway's key in one statement: the old prefix and hash are gone the moment
    /// it commits, and the gateway is paired again if it was unpaired.
    pub async fn repair_gateway(
        &self,
        id: i64,
        pairing: &Pairing,
        audit: &AuditEntry,
    ) -> Result<Gateway, StoreError> {
        let changed = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let n = sqlx::query(
                "UPDATE gateways SET prefix = $1, api_key_hash = $2, scopes = $3, paired_at = $4,
                        paired_by = $5, unpaired_at = NULL
                  WHERE id = $6",
            )
            .bind(&pairing.prefix)
            .bind(&pairing.key_hash)
            .bind(&pairing.scopes)
            .bind(pairing.at)
            .bind(&pairing.by)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict(e, || "prefix taken".to_string()))?
            .rows_affected();
            if n == 1 {
                insert_audit!(&mut *tx, audit).await?;
            }
            tx.commit().await?;
            n
        });
        if changed == 0 {
            return Err(StoreError::NotFound(format!("no gateway with id {id}")));
        }
        self.gateway(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no gateway with id {id}")))
    }

    /// Unpairs a paired gateway: `unpaired_at` is set and its prefix and hash dropped, so every
    /// table drops its key (the audit entry keeps the prefix). An unpaired gateway is a
    /// `Conflict`.
    pub async fn unpair_gateway(
        &self,
        id: i64,
        at: i64,
        audit: &AuditEntry,
    ) -> Result<Gateway, StoreError> {
        let changed = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let n = sqlx::query(
                "UPDATE gateways SET unpaired_at = $1, prefix = NULL, api_key_hash = NULL
                  WHERE id = $2 AND unpaired_at IS NULL",
            )
            .bind(at)
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
        let gateway = self
            .gateway(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no gateway with id {id}")))?;
        if changed == 0 {
            return Err(StoreError::Conflict(format!(
                "gateway `{}` is already unpaired",
                gateway.name
            )));
        }
        Ok(gateway)
    }
}

/// The pair audit entry learns the gateway's id only from the insert.
fn with_gateway_id(detail: &str, id: i64) -> String {
    match serde_json::from_str::<serde_json::Value>(detail) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("gateway_id".into(), id.into());
            serde_json::Value::Object(map).to_string()
        }
        _ => detail.to_string(),
    }
}
