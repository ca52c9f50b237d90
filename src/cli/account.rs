//! `keygate account create|list`.

use clap::Subcommand;

use crate::clock::rfc3339;
use crate::manage::{Actor, Manager};

use super::{print_table, CliError};

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Create a service account.
    Create {
        name: String,
        /// What the account is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List service accounts.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: AccountCommand, manager: &Manager) -> Result<(), CliError> {
    match cmd {
        AccountCommand::Create { name, description } => {
            let account = manager
                .create_account(&name, &description, &Actor::cli())
                .await?;
            outln!(
                "created service account `{}` (id {})",
                account.name,
                account.id
            )?;
        }
        AccountCommand::List { json } => {
            let accounts = manager.store.accounts().await?;
            if json {
                let v: Vec<_> = accounts
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "id": a.id,
                            "name": a.name,
                            "description": a.description,
                            "created_at": rfc3339(a.created_at),
                            "created_by": a.created_by,
                        })
                    })
                    .collect();
                outln!("{}", serde_json::Value::from(v))?;
            } else {
                let rows: Vec<Vec<String>> = accounts
                    .iter()
                    .map(|a| {
                        vec![
                            a.id.to_string(),
                            a.name.clone(),
                            rfc3339(a.created_at),
                            a.description.clone(),
                        ]
                    })
                    .collect();
                print_table(&["ID", "NAME", "CREATED", "DESCRIPTION"], &rows)?;
            }
        }
    }
    Ok(())
}
