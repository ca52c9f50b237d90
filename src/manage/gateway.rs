//! Gateway pairing for the CLI, the API and the console: pair (a new gateway and its key),
//! re-pair (a new key; the old one stops working in the same statement) and unpair. Each is
//! audited as `gateway.paired`, `gateway.repaired` or `gateway.unpaired` with the gateway id
//! and the key prefix, in the same transaction.

use serde_json::json;

use super::{Actor, ManageError, Manager};
use crate::clock::rfc3339;
use crate::keys::{self, KeyKind, KeyPrefix, PlaintextKey, Scopes};
use crate::store::{Gateway, Pairing, StoreError};

/// A gateway with its freshly issued key: the one copy of the key in clear.
#[derive(Debug)]
pub struct PairedGateway {
    pub gateway: Gateway,
    pub key: PlaintextKey,
}

impl Manager {
    /// Pairs a new gateway named `name`; its key carries `scopes` (`[gateways] scopes`).
    pub async fn pair_gateway(
        &self,
        name: &str,
        scopes: &Scopes,
        actor: &Actor,
    ) -> Result<PairedGateway, ManageError> {
        validate_gateway_name(name)?;
        require_scopes(scopes)?;
        if self.store.gateway_by_name(name).await?.is_some() {
            return Err(name_taken(name));
        }
        // A prefix clash (5 random base62 characters) is rare; a new key resolves it.
        for _ in 0..5 {
            let (key, pairing) = self.new_pairing(scopes, actor).await?;
            let audit = self.audit(
                actor,
                "gateway.paired",
                Some(key.prefix()),
                Some(scopes),
                json!({ "gateway": name }),
            );
            match self.store.insert_gateway(name, &pairing, &audit).await {
                Ok(gateway) => return Ok(PairedGateway { gateway, key }),
                Err(StoreError::Conflict(_)) => {
                    if self.store.gateway_by_name(name).await?.is_some() {
                        return Err(name_taken(name));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ManageError::Conflict(
            "could not find a free key prefix; try again".into(),
        ))
    }

    /// Issues a new key for `gateway` (paired or unpaired) with the configured `scopes`. The
    /// old key stops working in the same step; the gateway is paired afterwards.
    pub async fn repair_gateway(
        &self,
        gateway: &Gateway,
        scopes: &Scopes,
        actor: &Actor,
    ) -> Result<PairedGateway, ManageError> {
        require_scopes(scopes)?;
        for _ in 0..5 {
            let (key, pairing) = self.new_pairing(scopes, actor).await?;
            let audit = self.audit(
                actor,
                "gateway.repaired",
                Some(key.prefix()),
                Some(scopes),
                json!({
                    "gateway": gateway.name,
                    "gateway_id": gateway.id,
                    "old_prefix": gateway.prefix,
                }),
            );
            match self
                .store
                .repair_gateway(gateway.id, &pairing, &audit)
                .await
            {
                Ok(gateway) => return Ok(PairedGateway { gateway, key }),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ManageError::Conflict(
            "could not find a free key prefix; try again".into(),
        ))
    }

    /// Unpairs `gateway`: its key is refused everywhere on the next table refresh.
    pub async fn unpair_gateway(
        &self,
        gateway: &Gateway,
        actor: &Actor,
    ) -> Result<Gateway, ManageError> {
        let scopes = Scopes::parse_stored(&gateway.scopes).unwrap_or_default();
        let audit = self.audit(
            actor,
            "gateway.unpaired",
            gateway
                .prefix
                .as_deref()
                .and_then(|p| KeyPrefix::parse(p).ok()),
            Some(&scopes),
            json!({ "gateway": gateway.name, "gateway_id": gateway.id }),
        );
        Ok(self
            .store
            .unpair_gateway(gateway.id, self.clock.now_ms(), &audit)
            .await?)
    }

    pub async fn gateway_named(&self, name: &str) -> Result<Gateway, ManageError> {
        self.store
            .gateway_by_name(name)
            .await?
            .ok_or_else(|| ManageError::NotFound(format!("no gateway named `{name}`")))
    }

    pub async fn gateway(&self, id: i64) -> Result<Gateway, ManageError> {
        self.store
            .gateway(id)
            .await?
            .ok_or_else(|| ManageError::NotFound(format!("no gateway with id {id}")))
    }

    /// A `kgg` key and its hash (argon2 off the runtime), ready to store.
    async fn new_pairing(
        &self,
        scopes: &Scopes,
        actor: &Actor,
    ) -> Result<(PlaintextKey, Pairing), ManageError> {
        let key = keys::generate(KeyKind::Gateway);
        let argon = self.argon.clone();
        let secret = key.expose().to_owned();
        let key_hash = tokio::task::spawn_blocking(move || keys::hash_key(&argon, &secret))
            .await
            .map_err(|e| ManageError::Invalid(format!("hashing failed: {e}")))?;
        let pairing = Pairing {
            prefix: key.prefix().to_string(),
            key_hash,
            scopes: scopes.joined(),
            at: self.clock.now_ms(),
            by: actor.label(),
        };
        Ok((key, pairing))
    }
}

/// `paired` or `unpaired`, as lists show it.
pub fn gateway_state(gateway: &Gateway) -> &'static str {
    if gateway.is_paired() {
        "paired"
    } else {
        "unpaired"
    }
}

/// A gateway for JSON output (CLI and API): times as RFC 3339, scopes as a list, the key's
/// prefix, and never the key or its hash.
pub fn gateway_json(g: &Gateway) -> serde_json::Value {
    json!({
        "id": g.id,
        "name": g.name,
        "prefix": g.prefix,
        "state": gateway_state(g),
        "scopes": g.scopes.split_ascii_whitespace().collect::<Vec<_>>(),
        "created_at": rfc3339(g.created_at),
        "created_by": g.created_by,
        "paired_at": g.paired_at.map(rfc3339),
        "paired_by": g.paired_by,
        "unpaired_at": g.unpaired_at.map(rfc3339),
        "last_seen_at": g.last_seen_at.map(rfc3339),
        "kind": "gateway",
    })
}

/// Gateway names are sent upstream as the `X-Keygate-Account` header value, like account
/// names: 1–64 printable ASCII characters, no leading or trailing space.
pub fn validate_gateway_name(name: &str) -> Result<(), ManageError> {
    super::validate_account_name(name).map_err(|_| {
        ManageError::Invalid(
            "a gateway name must be 1-64 printable ASCII characters without leading or trailing spaces".into(),
        )
    })
}

fn require_scopes(scopes: &Scopes) -> Result<(), ManageError> {
    if scopes.is_empty() {
        return Err(ManageError::Invalid(
            "no scopes are configured for gateways: set [gateways] scopes in the configuration first"
                .into(),
        ));
    }
    Ok(())
}

fn name_taken(name: &str) -> ManageError {
    ManageError::Conflict(format!("a gateway named `{name}` already exists"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_names_are_header_safe() {
        assert!(validate_gateway_name("warehouse-7").is_ok());
        for bad in ["", " edge", "edge ", "two\nlines", &"x".repeat(65)] {
            let e = validate_gateway_name(bad).expect_err(bad);
            assert!(e.to_string().starts_with("a gateway name"), "{e}");
        }
    }

    #[test]
    fn pairing_needs_configured_scopes() {
        let e = require_scopes(&Scopes::default()).expect_err("empty");
        assert!(e.to_string().contains("[gateways] scopes"), "{e}");
    }
}
