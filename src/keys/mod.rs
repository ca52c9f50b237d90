//! Keys without I/O: the key format and its checksum, argon2id hashing, scopes, the in-memory
//! key table, and verification with its cache. Nothing here touches a database or a socket.

mod format;
mod hash;
mod scope;
mod table;
mod throttle;
mod verify;

pub use format::{
    generate, parse, starts_with_key_shape, with_checksum, KeyKind, KeyPrefix, ParseError,
    ParsedKey, PlaintextKey, PrefixMap, KEY_LEN, PREFIX_LEN,
};
pub use hash::{hash_key, hasher, verify_hash};
pub use scope::{Scope, Scopes};
pub use table::{KeyEntry, KeyId, KeyRow, KeyState, KeyTable, Owner, TableLoad};
pub use verify::{Recall, Unremembered, Verified, Verifier, VerifyError};
