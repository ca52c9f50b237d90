//! `keygate user add|list|disable|enable|set-role|set-password`: console users. Passwords come
//! from stdin, never the command line.

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
    /// Disable a user: its console sessions end now and it can no longer sign in.
    Disable {
        #[arg(long)]
        email: String,
    },
    /// Let a disabled user sign in again.
    Enable {
        #[arg(long)]
        email: String,
    },
    /// Change a user's role; open sessions use the new role from their next request.
    SetRole {
        #[arg(long)]
        email: String,
        /// owner, admin, operator or viewer.
        #[arg(long)]
        role: String,
    },
    /// Set a user's password (its console sessions end).
    SetPassword {
        #[arg(long)]
        email: String,
        /// Read the password from standard input (the only way to pass it).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
}

/// One line of standard input, without the newline that ends it.
fn password_from_stdin() -> Result<Password, CliError> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    // One trailing newline is how `echo` and here-strings end a line, not part of it.
    let line = input
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(&input);
    Ok(Password::new(line))
}

pub async fn run(cmd: UserCommand, manager: &Manager) -> Result<(), CliError> {
    match cmd {
        UserCommand::Add { email, role, .. } => {
            let role = Role::parse(&role)?;
            let password = password_from_stdin()?;
            let user = manager
                .add_user(&email, role, &password, &Actor::cli())
                .await?;
            outln!(
                "added user {} with role {} (id {})",
                user.email,
                user.role,
                user.id
            )?;
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
                outln!("{}", serde_json::Value::from(v))?;
            } else {
                let rows: Vec<Vec<String>> = users
                    .iter()
                    .map(|u| {
                        vec![
                            u.id.to_string(),
                            u.email.clone(),
                            u.role.clone(),
                            rfc3339(u.created_at),
                            match u.disabled_at {
                                Some(at) => format!("disabled {}", rfc3339(at)),
                                None => "active".into(),
                            },
                        ]
                    })
                    .collect();
                print_table(&["ID", "EMAIL", "ROLE", "CREATED", "STATUS"], &rows)?;
            }
        }
        UserCommand::Disable { email } => {
            let user = manager.disable_user(&email, &Actor::cli()).await?;
            outln!(
                "disabled user {}; its console sessions have ended",
                user.email
            )?;
        }
        UserCommand::Enable { email } => {
            let user = manager.enable_user(&email, &Actor::cli()).await?;
            outln!("enabled user {}", user.email)?;
        }
        UserCommand::SetRole { email, role } => {
            let role = Role::parse(&role)?;
            let user = manager.set_user_role(&email, role, &Actor::cli()).await?;
            outln!("user {} now has role {}", user.email, user.role)?;
        }
        UserCommand::SetPassword { email, .. } => {
            let password = password_from_stdin()?;
            let user = manager
                .set_user_password(&email, &password, &Actor::cli())
                .await?;
            outln!(
                "set a new password for {}; its console sessions have ended",
                user.email
            )?;
        }
    }
    Ok(())
}
