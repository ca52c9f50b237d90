//! Control-plane operations shared by the CLI and the admin API: create accounts, issue keys,
//! revoke them and change their expiry. Input is validated before anything is written, every
//! change is audited in the same transaction, and the audit holds prefixes, never keys.

use argon2::Argon2;
use serde_json::json;

use crate::clock::{rfc3339, Clock};
use crate::config::HashingConfig;
use crate::keys::{self, KeyKind, KeyPrefix, PlaintextKey, Scope, Scopes};
use crate::store::{Account, AuditEntry, KeyRecord, NewKey, Store, StoreError};

/// Who is making a change, for `created_by`/`revoked_by` and the audit log.
#[derive(Clone, Debug)]
pub struct Actor {
    /// `cli` or `user`.
    pub actor_type: &'static str,
    pub actor_id: Option<String>,
    pub client_addr: Option<String>,
}

impl Actor {
    /// The local operator running the CLI, named by `$USER` when set.
    pub fn cli() -> Actor {
        Actor {
            actor_type: "cli",
            actor_id: std::env::var("USER").ok().filter(|u| !u.is_empty()),
            client_addr: None,
        }
    }

    /// `cli:alice`, `user:3`: what `created_by` and `revoked_by` hold.
    pub fn label(&self) -> String {
        match &self.actor_id {
            Some(id) => format!("{}:{id}", self.actor_type),
            None => self.actor_type.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ManageError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => ManageError::Conflict(m),
            StoreError::NotFound(m) => ManageError::NotFound(m),
            other => ManageError::Store(other),
        }
    }
}

/// A freshly issued key: the record and the one copy of the key in clear.
#[derive(Debug)]
pub struct IssuedKey {
    pub record: KeyRecord,
    pub key: PlaintextKey,
}

pub struct Manager {
    pub store: Store,
    argon: Argon2<'static>,
    clock: Clock,
}

impl Manager {
    pub fn new(store: Store, hashing: HashingConfig, clock: Clock) -> Result<Manager, ManageError> {
        let argon = keys::hasher(hashing).map_err(ManageError::Invalid)?;
        Ok(Manager {
            store,
            argon,
            clock,
        })
    }

    pub async fn create_account(
        &self,
        name: &str,
        description: &str,
        actor: &Actor,
    ) -> Result<Account, ManageError> {
        validate_account_name(name)?;
        let now = self.clock.now_ms();
        let account = Account {
            id: 0,
            name: name.to_string(),
            description: description.trim().to_string(),
            created_at: now,
            created_by: actor.label(),
        };
        let audit = self.audit(
            actor,
            "service_account.created",
            None,
            None,
            json!({ "account": name }),
        );
        Ok(self.store.create_account(&account, &audit).await?)
    }

    pub async fn account_named(&self, name: &str) -> Result<Account, ManageError> {
        self.store
            .account_by_name(name)
            .await?
            .ok_or_else(|| ManageError::NotFound(format!("no service account named `{name}`")))
    }

    /// Issues a key for `account`. `expires_at` must lie in the future.
    pub async fn issue_key(
        &self,
        account: &Account,
        name: &str,
        scopes: &[String],
        expires_at: Option<i64>,
        actor: &Actor,
    ) -> Result<IssuedKey, ManageError> {
        let name = validate_key_name(name)?;
        let scopes = parse_scopes(scopes)?;
        let now = self.clock.now_ms();
        if let Some(at) = expires_at {
            if at <= now {
                return Err(ManageError::Invalid(format!(
                    "expires_at {} is not in the future",
                    rfc3339(at)
                )));
            }
        }
        if self.store.key_by_name(account.id, name).await?.is_some() {
            return Err(ManageError::Conflict(format!(
                "service account `{}` already has a key named `{name}`",
                account.name
            )));
        }
        // A prefix clash (5 random base62 characters) is rare; a new key resolves it.
        for _ in 0..5 {
            let key = keys::generate(KeyKind::ServiceAccount);
            let argon = self.argon.clone();
            let secret = key.expose().to_owned();
            let key_hash = tokio::task::spawn_blocking(move || keys::hash_key(&argon, &secret))
                .await
                .map_err(|e| ManageError::Invalid(format!("hashing failed: {e}")))?;
            let new = NewKey {
                account_id: account.id,
                prefix: key.prefix().to_string(),
                key_hash,
                name: name.to_string(),
                scopes: scopes.joined(),
                created_at: now,
                created_by: actor.label(),
                expires_at,
            };
            let audit = self.audit(
                actor,
                "user.updated",
                Some(key.prefix()),
                Some(&scopes),
                json!({
                    "change": "key.created",
                    "account": account.name,
                    "key_name": name,
                    "expires_at": expires_at.map(rfc3339),
                }),
            );
            match self.store.insert_key(&new, &audit).await {
                Ok(record) => return Ok(IssuedKey { record, key }),
                Err(StoreError::Conflict(_)) => {
                    if self.store.key_by_name(account.id, name).await?.is_some() {
                        return Err(ManageError::Conflict(format!(
                            "service account `{}` already has a key named `{name}`",
                            account.name
                        )));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ManageError::Conflict(
            "could not find a free key prefix; try again".into(),
        ))
    }

    /// The key with `prefix` (as shown in lists).
    pub async fn key_by_prefix(&self, prefix: &str) -> Result<KeyRecord, ManageError> {
        let parsed = KeyPrefix::parse(prefix).map_err(|_| {
            ManageError::Invalid(format!(
                "`{prefix}` is not a key prefix (8 characters, e.g. kgsA1b2C)"
            ))
        })?;
        if parsed.kind() != KeyKind::ServiceAccount {
            return Err(ManageError::Invalid(format!(
                "`{prefix}` is a gateway key; gateway keys are managed by pairing (unpair or re-pair the gateway)"
            )));
        }
        self.store
            .key_by_prefix(prefix)
            .await?
            .ok_or_else(|| ManageError::NotFound(format!("no key with prefix `{prefix}`")))
    }

    /// Revokes a key at once. It is refused everywhere on the next table refresh.
    pub async fn revoke_key(
        &self,
        record: &KeyRecord,
        actor: &Actor,
    ) -> Result<KeyRecord, ManageError> {
        let prefix = KeyPrefix::parse(&record.prefix).ok();
        let scopes = Scopes::parse_stored(&record.scopes).unwrap_or_default();
        let audit = self.audit(
            actor,
            "user.updated",
            prefix,
            Some(&scopes),
            json!({ "change": "key.revoked", "account": record.account_name, "key_name": record.name }),
        );
        Ok(self
            .store
            .revoke_key(record.id, self.clock.now_ms(), &actor.label(), &audit)
            .await?)
    }

    /// Sets (or with `None` clears) when a key stops working. A time in the past expires it now.
    pub async fn set_expiry(
        &self,
        record: &KeyRecord,
        expires_at: Option<i64>,
        actor: &Actor,
    ) -> Result<KeyRecord, ManageError> {
        let prefix = KeyPrefix::parse(&record.prefix).ok();
        let scopes = Scopes::parse_stored(&record.scopes).unwrap_or_default();
        let audit = self.audit(
            actor,
            "user.updated",
            prefix,
            Some(&scopes),
            json!({
                "change": "key.expiry_changed",
                "account": record.account_name,
                "key_name": record.name,
                "from": record.expires_at.map(rfc3339),
                "to": expires_at.map(rfc3339),
            }),
        );
        Ok(self
            .store
            .set_key_expiry(record.id, expires_at, &audit)
            .await?)
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn audit(
        &self,
        actor: &Actor,
        action: &str,
        prefix: Option<KeyPrefix>,
        scopes: Option<&Scopes>,
        detail: serde_json::Value,
    ) -> AuditEntry {
        AuditEntry {
            at: self.clock.now_ms(),
            actor_type: actor.actor_type.to_string(),
            actor_id: actor.actor_id.clone(),
            action: action.to_string(),
            key_prefix: prefix.map(|p| p.to_string()),
            scopes: scopes.map(Scopes::joined),
            detail: detail.to_string(),
            client_addr: actor.client_addr.clone(),
        }
    }
}

/// Account names end up in the `X-Keygate-Account` header: 1–64 of `A-Z a-z 0-9 _ . -`.
pub fn validate_account_name(name: &str) -> Result<(), ManageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ManageError::Invalid(format!(
            "`{name}` is not a valid account name: use 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"
        )))
    }
}

fn validate_key_name(name: &str) -> Result<&str, ManageError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ManageError::Invalid(
            "a key name must be 1-100 printable characters".into(),
        ));
    }
    Ok(name)
}

fn parse_scopes(scopes: &[String]) -> Result<Scopes, ManageError> {
    if scopes.is_empty() {
        return Err(ManageError::Invalid(
            "a key needs at least one scope".into(),
        ));
    }
    scopes
        .iter()
        .map(|s| Scope::new(s.trim()).map_err(ManageError::Invalid))
        .collect::<Result<Vec<_>, _>>()
        .map(Scopes::new)
}

/// A key's status as lists show it: `revoked`, `expired`, `expiring` (an expiry is set and
/// still ahead: the key is inside its rotation window) or `active`.
pub fn key_status(record: &KeyRecord, now_ms: i64) -> &'static str {
    match (record.revoked_at, record.expires_at) {
        (Some(_), _) => "revoked",
        (None, Some(at)) if at <= now_ms => "expired",
        (None, Some(_)) => "expiring",
        (None, None) => "active",
    }
}

/// A key record for JSON output (CLI and API): times as RFC 3339, scopes as a list, and
/// never the key or its hash.
pub fn key_json(record: &KeyRecord, now_ms: i64) -> serde_json::Value {
    json!({
        "id": record.id,
        "prefix": record.prefix,
        "name": record.name,
        "account": record.account_name,
        "account_id": record.account_id,
        "scopes": record.scopes.split_ascii_whitespace().collect::<Vec<_>>(),
        "created_at": rfc3339(record.created_at),
        "created_by": record.created_by,
        "last_used_at": record.last_used_at.map(rfc3339),
        "expires_at": record.expires_at.map(rfc3339),
        "revoked_at": record.revoked_at.map(rfc3339),
        "revoked_by": record.revoked_by,
        "status": key_status(record, now_ms),
    })
}
