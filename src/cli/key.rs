//! `keygate key create|list|revoke|expire`.

use clap::{ArgGroup, Subcommand};

use crate::clock::{parse_duration_ms, parse_rfc3339, rfc3339};
use crate::config::Config;
use crate::manage::{key_json, key_status, Actor, Manager};

use super::{print_table, CliError};

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Issue a key. It is printed once and never again.
    #[command(group(ArgGroup::new("expiry").args(["expires_at", "expires_in"])))]
    Create {
        /// The service account the key belongs to.
        #[arg(long)]
        account: String,
        /// A name for the key, unique within the account (e.g. `ci-2026-11`).
        #[arg(long)]
        name: String,
        /// A scope the key grants; repeat for several.
        #[arg(long = "scope", required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
        /// When the key stops working (RFC 3339, e.g. 2026-12-31T00:00:00Z).
        #[arg(long, value_name = "RFC3339", allow_hyphen_values = true)]
        expires_at: Option<String>,
        /// When the key stops working, from now (e.g. 7d, 12h).
        #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
        expires_in: Option<String>,
        /// Print `{"id","prefix","key","scopes","expires_at"}`.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never the keys themselves).
    List {
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key now. Every sidecar refuses it after its next table refresh.
    Revoke { prefix: String },
    /// Set when a key stops working (a rotation grace window).
    #[command(group(ArgGroup::new("when").args(["at", "in_", "never"]).required(true)))]
    Expire {
        prefix: String,
        /// An RFC 3339 time; a past time expires the key at once.
        #[arg(long, value_name = "RFC3339", allow_hyphen_values = true)]
        at: Option<String>,
        /// A duration from now, e.g. 7d.
        #[arg(long = "in", value_name = "DURATION", allow_hyphen_values = true)]
        in_: Option<String>,
        /// Remove the expiry.
        #[arg(long)]
        never: bool,
    },
}

pub async fn run(cmd: KeyCommand, manager: &Manager, config: &Config) -> Result<(), CliError> {
    let now = manager.now_ms();
    match cmd {
        KeyCommand::Create {
            account,
            name,
            scopes,
            expires_at,
            expires_in,
            json,
        } => {
            let expires_at = expiry(expires_at.as_deref(), expires_in.as_deref(), now)?;
            let account = manager.account_named(&account).await?;
            let known = config.route_scopes();
            for s in &scopes {
                if !known.is_empty() && !known.iter().any(|k| k.as_str() == s) {
                    eprintln!("warning: no configured route requires scope `{s}`");
                }
            }
            let issued = manager
                .issue_key(&account, &name, &scopes, expires_at, &Actor::cli())
                .await?;
            let r = &issued.record;
            if json {
                let v = serde_json::json!({
                    "id": r.id,
                    "prefix": r.prefix,
                    "key": issued.key.expose(),
                    "scopes": r.scopes.split_ascii_whitespace().collect::<Vec<_>>(),
                    "expires_at": r.expires_at.map(rfc3339),
                });
                outln!("{v}")?;
            } else {
                outln!(
                    "created key `{}` for service account `{}`",
                    r.name,
                    r.account_name
                )?;
                outln!("  prefix   {}", r.prefix)?;
                outln!("  scopes   {}", r.scopes)?;
                outln!(
                    "  expires  {}",
                    r.expires_at.map(rfc3339).unwrap_or_else(|| "never".into())
                )?;
                outln!()?;
                outln!("  {}", issued.key.expose())?;
                outln!()?;
                outln!("Copy the key now: it is shown only this once.")?;
            }
        }
        KeyCommand::List { account, json } => {
            let account_id = match account {
                Some(name) => Some(manager.account_named(&name).await?.id),
                None => None,
            };
            let keys = manager.store.keys(account_id).await?;
            if json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|k| key_json(k, now, config.admin.stale_after.as_millis() as i64))
                    .collect();
                outln!("{}", serde_json::Value::from(v))?;
            } else {
                let opt = |t: Option<i64>| t.map(rfc3339).unwrap_or_else(|| "-".into());
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.to_string(),
                            k.prefix.clone(),
                            k.name.clone(),
                            k.account_name.clone(),
                            k.scopes.clone(),
                            rfc3339(k.created_at),
                            opt(k.last_used_at),
                            opt(k.expires_at),
                            opt(k.revoked_at),
                            key_status(k, now).to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "PREFIX",
                        "NAME",
                        "ACCOUNT",
                        "SCOPES",
                        "CREATED",
                        "LAST USED",
                        "EXPIRES",
                        "REVOKED",
                        "STATUS",
                    ],
                    &rows,
                )?;
            }
        }
        KeyCommand::Revoke { prefix } => {
            let record = manager.key_by_prefix(&prefix).await?;
            let revoked = manager.revoke_key(&record, &Actor::cli()).await?;
            outln!(
                "revoked key {} (`{}` of `{}`); sidecars refuse it within one table refresh ({:?})",
                revoked.prefix,
                revoked.name,
                revoked.account_name,
                config.database.refresh_interval
            )?;
        }
        KeyCommand::Expire {
            prefix,
            at,
            in_,
            never,
        } => {
            let expires_at = if never {
                None
            } else {
                expiry(at.as_deref(), in_.as_deref(), now)?
            };
            let record = manager.key_by_prefix(&prefix).await?;
            let updated = manager
                .set_expiry(&record, expires_at, &Actor::cli())
                .await?;
            match updated.expires_at {
                Some(at) => outln!("key {} expires at {}", updated.prefix, rfc3339(at))?,
                None => outln!("key {} no longer expires", updated.prefix)?,
            }
        }
    }
    Ok(())
}

fn expiry(at: Option<&str>, within: Option<&str>, now: i64) -> Result<Option<i64>, CliError> {
    match (at, within) {
        (Some(at), _) => parse_rfc3339(at).map(Some).map_err(CliError::Failed),
        (None, Some(d)) => parse_duration_ms(d)
            .map(|d| Some(now + d))
            .map_err(CliError::Failed),
        (None, None) => Ok(None),
    }
}
