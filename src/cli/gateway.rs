//! `keygate gateway pair|unpair|repair|list`: gateways and their keys, changed only by pairing.

use clap::Subcommand;

use crate::clock::rfc3339;
use crate::config::Config;
use crate::manage::{gateway_json, gateway_state, Actor, Manager, PairedGateway};

use super::{print_table, CliError};

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Pair a new gateway. Its key (scopes from `[gateways] scopes`) is printed once.
    Pair {
        /// A unique name for the gateway (e.g. `warehouse-7`).
        name: String,
        /// Print `{"id","name","prefix","key","scopes","state"}`.
        #[arg(long)]
        json: bool,
    },
    /// Unpair a gateway: its key gets 401 on every sidecar after the next table refresh.
    Unpair { name: String },
    /// Issue a new key for a gateway; the old one stops working in the same step.
    Repair {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List gateways with prefix, state and last seen (never a key).
    List {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: GatewayCommand, manager: &Manager, config: &Config) -> Result<(), CliError> {
    let scopes = &config.gateways.scopes;
    match cmd {
        GatewayCommand::Pair { name, json } => {
            let paired = manager.pair_gateway(&name, scopes, &Actor::cli()).await?;
            print_key(&paired, "paired", json)?;
        }
        GatewayCommand::Repair { name, json } => {
            let gateway = manager.gateway_named(&name).await?;
            let paired = manager
                .repair_gateway(&gateway, scopes, &Actor::cli())
                .await?;
            print_key(&paired, "re-paired", json)?;
            if !json {
                if let Some(old) = &gateway.prefix {
                    outln!("The old key {old}… no longer works.")?;
                }
            }
        }
        GatewayCommand::Unpair { name } => {
            let gateway = manager.gateway_named(&name).await?;
            manager.unpair_gateway(&gateway, &Actor::cli()).await?;
            outln!(
                "unpaired gateway `{}`: key {}… is refused after the next table refresh",
                gateway.name,
                gateway.prefix.as_deref().unwrap_or("-")
            )?;
        }
        GatewayCommand::List { json } => {
            let gateways = manager.store.gateways().await?;
            if json {
                let v: Vec<_> = gateways.iter().map(gateway_json).collect();
                outln!("{}", serde_json::Value::from(v))?;
            } else {
                let opt = |t: Option<i64>| t.map(rfc3339).unwrap_or_else(|| "-".into());
                let rows: Vec<Vec<String>> = gateways
                    .iter()
                    .map(|g| {
                        vec![
                            g.id.to_string(),
                            g.name.clone(),
                            g.prefix.clone().unwrap_or_else(|| "-".into()),
                            gateway_state(g).to_string(),
                            g.scopes.clone(),
                            opt(g.paired_at),
                            opt(g.last_seen_at),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "NAME",
                        "PREFIX",
                        "STATE",
                        "SCOPES",
                        "PAIRED",
                        "LAST SEEN",
                    ],
                    &rows,
                )?;
            }
        }
    }
    Ok(())
}

fn print_key(paired: &PairedGateway, verb: &str, json: bool) -> Result<(), CliError> {
    let g = &paired.gateway;
    if json {
        let v = serde_json::json!({
            "id": g.id,
            "name": g.name,
            "prefix": g.prefix,
            "key": paired.key.expose(),
            "scopes": g.scopes.split_ascii_whitespace().collect::<Vec<_>>(),
            "state": gateway_state(g),
        });
        outln!("{v}")?;
    } else {
        outln!("{verb} gateway `{}`", g.name)?;
        outln!("  prefix   {}", g.prefix.as_deref().unwrap_or("-"))?;
        outln!("  scopes   {}", g.scopes)?;
        outln!()?;
        outln!("  {}", paired.key.expose())?;
        outln!()?;
        outln!("Copy the key now and install it on the gateway: it is shown only this once.")?;
    }
    Ok(())
}
