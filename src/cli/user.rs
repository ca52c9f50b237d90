//! `keygate user add|list`: console users. Passwords come from stdin, never the command line.

use std::io::Read;

use clap::Subcommand;

use crate::clock::rfc3339;
use crate::manage::{Actor, Manager, Password, Role};

use super::{print_table, CliError};

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a console user.
    Add {
        #[arg(long)]
        email: String,
        /// owner, admin, operator or viewer.
        #[arg(long)]
        role: String,
        /// Read the password from standard input (the only way to pass it).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List console users (never their password hashes).
    List {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: UserCommand, manager: &Manager) -> Result<(), CliError> {
    match cmd {
        UserCommand::Add { email, role, .. } => {
            let role = Role::parse(&role)?;
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            // One trailing newline is how `echo` and here-strings end a line, not part of it.
            let line = input
                .strip_suffix('\n')
                .map(|l| l.strip_suffix('\r').unwrap_or(l))
                .unwrap_or(&input);
            let user = manager
                .add_user(&email, role, &Password::new(line), &Actor::cli())
                .await?;
            println!(
                "added user {} with role {} (id {})",
                user.email, user.role, user.id
            );
        }
        UserCommand::List { json } => {
            let users = manager.store.users().await?;
            if json {
                let v: Vec<_> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({
                            "id": u.id,
                            "email": u.email,
                            "role": u.role,
                            "created_at": rfc3339(u.created_at),
                            "disabled_at": u.disabled_at.map(rfc3339),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::from(v));
            } else {
                let rows: Vec<Vec<String>> = users
                    .iter()
                    .map(|u| {
                        vec![
                            u.id.to_string(),
                            u.email.clone(),
                            u.role.clone(),
                            rfc3339(u.created_at),
                        ]
                    })
                    .collect();
                print_table(&["ID", "EMAIL", "ROLE", "CREATED"], &rows);
            }
        }
    }
    Ok(())
}
