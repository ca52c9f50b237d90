//! keygate's integration tests: one binary, real parts (a real upstream on a real port, real
//! SQLite and PostgreSQL databases, the real `keygate` binary where it matters).

mod harness;

mod cli;
mod hostile;
mod limits;
mod proxy;
mod store;
mod tls;
