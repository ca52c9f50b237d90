//! keygate's integration tests: one binary, real parts (a real upstream on a real port, real
//! SQLite and PostgreSQL databases, the real `keygate` binary where it matters).

mod harness;

mod admin_api;
mod cli;
mod console;
mod database_tls;
mod fleet;
mod gateways;
mod hostile;
mod limits;
mod observability;
mod outage;
mod proxy;
mod relay;
mod restart;
mod rotation;
mod store;
mod tls;
