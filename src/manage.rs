//! Control-plane operations shared by the CLI and the admin API: create accounts, issue keys,
//! revoke them and change their expiry. Input is validated before anything is written, every
//! change is audited in the same transaction, and the audit holds prefixes, never keys.

mod gateway;

use argon2::Argon2;
use serde_json::json;

use crate::clock::{rfc3339, Clock};
use crate::config::HashingConfig;
use crate::keys::{self, KeyKind, KeyPrefix, PlaintextKey, Scope, Scopes};
use crate::store::{
    Account, AuditEntry, KeyRecord, NewKey, Replacing, Store, StoreError, User, UserChange,
};

pub use gateway::{gateway_json, gateway_state, validate_gateway_name, PairedGateway};

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

/// The shortest auto-retire idle time: twice the longest `last_used.flush_interval`.
const MIN_RETIRE_AFTER_IDLE_MS: i64 = 120_000;

/// What a replacement sets on the key it replaces.
#[derive(Debug)]
struct Link {
    expires_at: i64,
    retire_after_idle_ms: Option<i64>,
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
        let description = validate_description(description)?;
        let now = self.clock.now_ms();
        let account = Account {
            id: 0,
            name: name.to_string(),
            description: description.to_string(),
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
        self.issue(account, name, scopes, expires_at, actor, None)
            .await
    }

    /// Issues a key, and with `replacing` links the old key to it in the same transaction:
    /// either both are written or neither is.
    async fn issue(
        &self,
        account: &Account,
        name: &str,
        scopes: &[String],
        expires_at: Option<i64>,
        actor: &Actor,
        replacing: Option<(&KeyRecord, Link)>,
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
            let link = replacing.as_ref().map(|(old, link)| Replacing {
                old_id: old.id,
                old_expires_at: link.expires_at,
                retire_after_idle_ms: link.retire_after_idle_ms,
                audit: self.replacement_audit(actor, old, link, &key.prefix().to_string()),
            });
            match self.store.insert_key(&new, &audit, link.as_ref()).await {
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
        let parsed = parse_prefix(prefix)?;
        if parsed.kind() != KeyKind::ServiceAccount {
            return Err(ManageError::Invalid(format!(
                "`{prefix}` is a gateway key; gateway keys are managed by pairing: use `keygate gateway unpair` or `keygate gateway repair`"
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

    /// Adds a console user. The password is hashed with argon2id off the runtime.
    pub async fn add_user(
        &self,
        email: &str,
        role: Role,
        password: &Password,
        actor: &Actor,
    ) -> Result<User, ManageError> {
        self.insert_user(email, role, password, actor, false).await
    }

    /// The one-time setup: creates the first user as `owner`, only while there is no user.
    pub async fn create_first_owner(
        &self,
        email: &str,
        password: &Password,
        client_addr: Option<String>,
    ) -> Result<User, ManageError> {
        let actor = Actor {
            actor_type: "setup",
            actor_id: None,
            client_addr,
        };
        self.insert_user(email, Role::Owner, password, &actor, true)
            .await
    }

    async fn insert_user(
        &self,
        email: &str,
        role: Role,
        password: &Password,
        actor: &Actor,
        only_if_none: bool,
    ) -> Result<User, ManageError> {
        let email = validate_email(email)?;
        let hash = self.hash_password(password).await?;
        let audit = self.audit(
            actor,
            "user.created",
            None,
            None,
            json!({ "email": email, "role": role.as_str() }),
        );
        Ok(self
            .store
            .insert_user(
                &email,
                &hash,
                role.as_str(),
                self.now_ms(),
                only_if_none,
                &audit,
            )
            .await?)
    }

    /// Disables a console user: its sessions end at once and it can no longer sign in. The
    /// last enabled owner cannot be disabled.
    pub async fn disable_user(&self, email: &str, actor: &Actor) -> Result<User, ManageError> {
        self.change_user(email, UserChange::Disable, actor).await
    }

    /// Lets a disabled user sign in again (its old sessions stay ended).
    pub async fn enable_user(&self, email: &str, actor: &Actor) -> Result<User, ManageError> {
        self.change_user(email, UserChange::Enable, actor).await
    }

    /// Changes a user's role; its open sessions act with the new role from their next request.
    /// The last enabled owner keeps its role until another user is owner.
    pub async fn set_user_role(
        &self,
        email: &str,
        role: Role,
        actor: &Actor,
    ) -> Result<User, ManageError> {
        let change = UserChange::Role(role.as_str().to_string());
        self.change_user(email, change, actor).await
    }

    /// Sets a new password (hashed with argon2id off the runtime); the user's sessions end.
    pub async fn set_user_password(
        &self,
        email: &str,
        password: &Password,
        actor: &Actor,
    ) -> Result<User, ManageError> {
        let hash = self.hash_password(password).await?;
        self.change_user(email, UserChange::PasswordHash(hash), actor)
            .await
    }

    /// A console password's argon2id hash, once it passes the length rule; hashed off the
    /// runtime.
    async fn hash_password(&self, password: &Password) -> Result<String, ManageError> {
        password.validate()?;
        let argon = self.argon.clone();
        let secret = password.0.clone();
        tokio::task::spawn_blocking(move || keys::hash_key(&argon, &secret))
            .await
            .map_err(|e| ManageError::Invalid(format!("hashing failed: {e}")))
    }

    /// One change to a user, audited as `user.updated` naming the change (and a new role).
    async fn change_user(
        &self,
        email: &str,
        change: UserChange,
        actor: &Actor,
    ) -> Result<User, ManageError> {
        let email = email.trim();
        let detail = match &change {
            UserChange::Role(role) => {
                json!({ "change": "user.role_changed", "email": email, "to": role })
            }
            UserChange::Disable => json!({ "change": "user.disabled", "email": email }),
            UserChange::Enable => json!({ "change": "user.enabled", "email": email }),
            UserChange::PasswordHash(_) => {
                json!({ "change": "user.password_changed", "email": email })
            }
        };
        let audit = self.audit(actor, "user.updated", None, None, detail);
        Ok(self
            .store
            .change_user(email, &change, self.now_ms(), &audit)
            .await?)
    }

    /// Checks an email and password. `None` for an unknown email, a disabled user or a wrong
    /// password alike; an unknown email still costs one argon2 run so timing tells nothing.
    pub async fn authenticate(
        &self,
        email: &str,
        password: &Password,
    ) -> Result<Option<User>, ManageError> {
        // Only an email a user could have is looked up: anything else (too long, a NUL, which
        // PostgreSQL refuses as text) fails like an unknown user, after the same argon2 run.
        let found = match validate_email(email) {
            Ok(email) => self.store.user_for_login(&email).await?,
            Err(_) => None,
        };
        let (user, hash) = match found {
            Some((u, h)) if u.disabled_at.is_none() => (Some(u), h),
            _ => (None, dummy_hash(&self.argon)),
        };
        let secret = password.0.clone();
        let ok = tokio::task::spawn_blocking(move || keys::verify_hash(&hash, &secret))
            .await
            .map_err(|e| ManageError::Invalid(format!("verification failed: {e}")))?;
        Ok(user.filter(|_| ok))
    }

    /// Writes one audit entry on its own (logins, failed logins, logouts).
    pub async fn record(
        &self,
        actor: &Actor,
        action: &str,
        detail: serde_json::Value,
    ) -> Result<(), ManageError> {
        let entry = self.audit(actor, action, None, None, detail);
        Ok(self.store.append_audit(&[entry]).await?)
    }

    /// "Create replacement": issues a key with the old key's scopes and, in the same
    /// transaction, sets the old key's `expires_at` (the rotation window, never later than an
    /// expiry it already has) and its optional auto-retire rule.
    pub async fn replace_key(
        &self,
        old: &KeyRecord,
        name: &str,
        window_ms: i64,
        retire_after_idle_ms: Option<i64>,
        actor: &Actor,
    ) -> Result<(IssuedKey, KeyRecord), ManageError> {
        if old.revoked_at.is_some() {
            return Err(ManageError::Conflict(format!(
                "key {} is revoked; it cannot be replaced",
                old.prefix
            )));
        }
        if window_ms <= 0 {
            return Err(ManageError::Invalid(
                "the rotation window must be longer than zero".into(),
            ));
        }
        // Idleness is read from last-used stamps, which every sidecar writes up to
        // `last_used.flush_interval` (at most 60 s) late: a shorter idle time could retire a
        // key that is still carrying traffic.
        if retire_after_idle_ms.is_some_and(|ms| ms < MIN_RETIRE_AFTER_IDLE_MS) {
            return Err(ManageError::Invalid(
                "the auto-retire idle time must be at least 2m: last-used stamps reach the \
                 database up to a minute late"
                    .into(),
            ));
        }
        let account = self
            .store
            .account(old.account_id)
            .await?
            .ok_or_else(|| ManageError::NotFound(format!("no account {}", old.account_id)))?;
        let scopes: Vec<String> = old
            .scopes
            .split_ascii_whitespace()
            .map(str::to_string)
            .collect();
        // The old key's window never outlasts the expiry it already has: a replacement
        // shortens a key's life, never lengthens it, and an expired key stays expired.
        let window_end = self.now_ms().saturating_add(window_ms);
        let link = Link {
            expires_at: old.expires_at.map_or(window_end, |at| at.min(window_end)),
            retire_after_idle_ms,
        };
        let issued = self
            .issue(&account, name, &scopes, None, actor, Some((old, link)))
            .await
            .map_err(|e| match e {
                ManageError::Store(StoreError::Changed(_)) => ManageError::Conflict(format!(
                    "key {} was revoked meanwhile; it cannot be replaced",
                    old.prefix
                )),
                e => e,
            })?;
        let old = self
            .store
            .key(old.id)
            .await?
            .ok_or_else(|| ManageError::NotFound(format!("no key with id {}", old.id)))?;
        Ok((issued, old))
    }

    /// Auto-retire: revokes every replaced key whose replacement has carried traffic and which
    /// has been idle for its chosen time, or whose hard expiry has passed. Returns the prefixes.
    pub async fn retire_idle_keys(&self) -> Result<Vec<String>, ManageError> {
        let now = self.now_ms();
        let actor = Actor {
            actor_type: "system",
            actor_id: Some("auto-retire".into()),
            client_addr: None,
        };
        let mut retired = Vec::new();
        for (old, new) in self.store.retire_candidates().await? {
            let idle_for = old.retire_after_idle_ms.unwrap_or(i64::MAX);
            let new_used = new.last_used_at.is_some() && new.revoked_at.is_none();
            let old_idle = old
                .last_used_at
                .is_none_or(|t| now.saturating_sub(t) >= idle_for);
            let expired = old.expires_at.is_some_and(|at| at <= now);
            if (new_used && old_idle) || expired {
                match self.revoke_key(&old, &actor).await {
                    Ok(_) | Err(ManageError::Conflict(_)) => retired.push(old.prefix.clone()),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(retired)
    }

    /// The old key's audit entry when `new_prefix` replaces it: its expiry change.
    fn replacement_audit(
        &self,
        actor: &Actor,
        old: &KeyRecord,
        link: &Link,
        new_prefix: &str,
    ) -> AuditEntry {
        let stored = Scopes::parse_stored(&old.scopes).unwrap_or_default();
        self.audit(
            actor,
            "user.updated",
            KeyPrefix::parse(&old.prefix).ok(),
            Some(&stored),
            json!({
                "change": "key.expiry_changed",
                "account": old.account_name,
                "key_name": old.name,
                "from": old.expires_at.map(rfc3339),
                "to": rfc3339(link.expires_at),
                "replaced_by": new_prefix,
                "retire_after_idle_ms": link.retire_after_idle_ms,
            }),
        )
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

/// Account names end up in the `X-Keygate-Account` header value: 1–64 printable ASCII
/// characters (0x20–0x7e), no leading or trailing space, so never a control character.
pub fn validate_account_name(name: &str) -> Result<(), ManageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && !name.starts_with(' ')
        && !name.ends_with(' ');
    if ok {
        Ok(())
    } else {
        Err(ManageError::Invalid(
            "an account name must be 1-64 printable ASCII characters without leading or trailing spaces".into(),
        ))
    }
}

/// Console roles. Only `owner` and `admin` change keys and accounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Owner,
    Admin,
    Operator,
    Viewer,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role, ManageError> {
        match s {
            "owner" => Ok(Role::Owner),
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            other => Err(ManageError::Invalid(format!(
                "`{other}` is not a role; use owner, admin, operator or viewer"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// Creating accounts, issuing, revoking and changing the expiry of keys.
    pub fn manages_keys(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// A console password in clear, between reading it and hashing or verifying it. Never shown.
pub struct Password(String);

impl Password {
    pub fn new(s: impl Into<String>) -> Password {
        Password(s.into())
    }

    fn validate(&self) -> Result<(), ManageError> {
        let n = self.0.chars().count();
        if !(10..=256).contains(&n) {
            return Err(ManageError::Invalid(
                "a password must be 10-256 characters long".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A key prefix someone typed (the CLI's argument, an API parameter), or what is wrong with it.
pub fn parse_prefix(typed: &str) -> Result<KeyPrefix, ManageError> {
    KeyPrefix::parse(typed).map_err(|_| {
        ManageError::Invalid(format!(
            "`{}` is not a key prefix (8 characters, e.g. kgsA1b2C)",
            echo_ref(typed)
        ))
    })
}

/// What a message repeats of a key reference someone typed: at most a prefix's 8
/// characters, since people paste whole keys where a prefix belongs, and a key must never be
/// printed, logged or returned after its creation.
pub fn echo_ref(typed: &str) -> String {
    let mut chars = typed.chars();
    let shown: String = chars.by_ref().take(keys::PREFIX_LEN).collect();
    if chars.next().is_some() {
        format!("{shown}…")
    } else {
        shown
    }
}

/// An email address's greatest length in bytes (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

fn validate_email(email: &str) -> Result<String, ManageError> {
    let email = email.trim();
    let ok = email.len() <= MAX_EMAIL_BYTES
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@')
        })
        && email.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(email.to_string())
    } else {
        Err(ManageError::Invalid(format!(
            "`{email}` is not an email address"
        )))
    }
}

/// A hash of a random string, verified against when the email is unknown so that a login
/// for a missing user costs the same argon2 run as one with a wrong password.
fn dummy_hash(argon: &Argon2<'static>) -> String {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY
        .get_or_init(|| keys::hash_key(argon, keys::generate(KeyKind::ServiceAccount).expose()))
        .clone()
}

/// An account's description: free text for people, shown in the console and printed by the
/// CLI, so at most 500 characters and no control characters (no terminal escapes, no NUL,
/// which PostgreSQL refuses as text).
fn validate_description(description: &str) -> Result<&str, ManageError> {
    let description = description.trim();
    if description.chars().count() > 500 || description.chars().any(char::is_control) {
        return Err(ManageError::Invalid(
            "a description must be at most 500 characters, none of them control characters".into(),
        ));
    }
    Ok(description)
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

/// Whether a live key has gone unused (or, never used, has existed) for `stale_after_ms`.
pub fn is_stale(record: &KeyRecord, now_ms: i64, stale_after_ms: i64) -> bool {
    matches!(key_status(record, now_ms), "active" | "expiring")
        && now_ms - record.last_used_at.unwrap_or(record.created_at) >= stale_after_ms
}

/// A key record for JSON output (CLI and API): times as RFC 3339, scopes as a list, and
/// never the key or its hash. `stale` follows `[admin] stale_after`.
pub fn key_json(record: &KeyRecord, now_ms: i64, stale_after_ms: i64) -> serde_json::Value {
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
        "stale": is_stale(record, now_ms, stale_after_ms),
        "last_client_addr": record.last_client_addr,
        "replaced_by": record.replaced_by,
        "retire_after_idle_ms": record.retire_after_idle_ms,
        "kind": "service_account",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_key_reference_is_echoed_no_further_than_a_prefix() {
        let key = keys::generate(KeyKind::ServiceAccount);
        let echoed = echo_ref(key.expose());
        assert_eq!(echoed, format!("{}…", key.prefix()));
        assert!(!echoed.contains(&key.expose()[8..]));
        assert_eq!(echo_ref("kgsA1b2C"), "kgsA1b2C");
        assert_eq!(echo_ref("42"), "42");
    }

    #[test]
    fn descriptions_are_bounded_printable_text() {
        assert_eq!(
            validate_description("  billing exports  ").ok(),
            Some("billing exports")
        );
        assert!(validate_description(&"é".repeat(500)).is_ok());
        for bad in [
            "x".repeat(501),
            "\u{1b}[2Jcleared".into(),
            "a\u{0}b".into(),
            "two\nlines".into(),
        ] {
            assert!(validate_description(&bad).is_err(), "{bad:?}");
        }
    }
}
