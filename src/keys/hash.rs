//! argon2id hashing of keys (and console passwords), and the compact form the key table holds
//! hashes in. Verification is slow by design (about 20 ms at OWASP settings), so callers run it
//! on the blocking pool, never on the runtime.

use std::borrow::Cow;
use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64ct::{Base64Unpadded, Encoding};

use crate::config::HashingConfig;

/// An argon2id hasher with the configured cost, or why the parameters are unusable.
pub fn hasher(cfg: HashingConfig) -> Result<Argon2<'static>, String> {
    let params =
        Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None).map_err(|e| {
            format!(
                "invalid argon2 parameters (memory_kib={}, iterations={}, parallelism={}): {e}",
                cfg.memory_kib, cfg.iterations, cfg.parallelism
            )
        })?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes `secret` with a fresh random salt into a PHC string (`$argon2id$v=19$m=...`).
pub fn hash_key(argon: &Argon2<'_>, secret: &str) -> String {
    let mut salt = [0u8; 16];
    // Without randomness no safe hash can be made; there is no sensible way to go on.
    getrandom::getrandom(&mut salt).expect("the operating system's random generator failed");
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt length");
    argon
        .hash_password(secret.as_bytes(), &salt)
        .expect("hashing with validated parameters and a valid salt cannot fail")
        .to_string()
}

/// Checks `secret` against a PHC string, with the parameters stored in it. The final comparison
/// is constant-time (done by the `password-hash` crate). A malformed stored hash never matches.
pub fn verify_hash(phc: &str, secret: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A stored hash as the key table holds it. A PHC string in the shape keygate writes
/// (`$argon2id$v=19$m=M,t=T,p=P$SALT$OUTPUT` with a 16-byte salt and a 32-byte output: 97 bytes
/// of text at the OWASP settings) is kept as its three numbers and raw bytes, 60 bytes with no
/// allocation of its own, and rendered back into the identical text when argon2 runs, so
/// verification sees exactly what the database holds. Anything else is kept as text.
#[derive(Clone, PartialEq, Eq)]
pub enum StoredHash {
    Argon2id {
        m: u32,
        t: u32,
        p: u32,
        salt: [u8; 16],
        output: [u8; 32],
    },
    Phc(Box<str>),
}

const ARGON2ID_V19: &str = "$argon2id$v=19$m=";

impl StoredHash {
    pub fn new(phc: &str) -> StoredHash {
        StoredHash::compact(phc).unwrap_or_else(|| StoredHash::Phc(phc.into()))
    }

    /// The PHC string, byte for byte as stored.
    pub fn phc(&self) -> Cow<'_, str> {
        match self {
            StoredHash::Phc(text) => Cow::Borrowed(text),
            StoredHash::Argon2id {
                m,
                t,
                p,
                salt,
                output,
            } => {
                let (mut s, mut o) = ([0u8; 22], [0u8; 43]);
                // Both buffers are exactly the unpadded Base64 length of their input.
                let salt = Base64Unpadded::encode(salt, &mut s).unwrap_or_default();
                let output = Base64Unpadded::encode(output, &mut o).unwrap_or_default();
                Cow::Owned(format!("{ARGON2ID_V19}{m},t={t},p={p}${salt}${output}"))
            }
        }
    }

    /// The compact form, only when rendering it gives back exactly `phc` (canonical decimals
    /// and Base64, these parameters in this order and no others), so that verification cannot
    /// differ. The `password-hash` crate argon2 itself uses does the parsing.
    fn compact(phc: &str) -> Option<StoredHash> {
        let parsed = PasswordHash::new(phc).ok()?;
        if parsed.algorithm.as_str() != "argon2id" || parsed.version != Some(19) {
            return None;
        }
        let (mut salt, mut output) = ([0u8; 16], [0u8; 32]);
        if parsed.salt?.decode_b64(&mut salt).ok()?.len() != salt.len() {
            return None;
        }
        let hash = parsed.hash?;
        if hash.len() != output.len() {
            return None;
        }
        output.copy_from_slice(hash.as_bytes());
        let param = |name| parsed.params.get_decimal(name);
        let compact = StoredHash::Argon2id {
            m: param("m")?,
            t: param("t")?,
            p: param("p")?,
            salt,
            output,
        };
        (compact.phc() == phc).then_some(compact)
    }
}

impl fmt::Debug for StoredHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoredHash::Argon2id { m, t, p, .. } => write!(f, "Argon2id(m={m},t={t},p={p}, ..)"),
            StoredHash::Phc(_) => f.write_str("Phc(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: HashingConfig = HashingConfig {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    };

    #[test]
    fn a_hash_verifies_its_own_secret_only() {
        let argon = hasher(CHEAP).expect("valid params");
        let phc = hash_key(&argon, "kgsAAAAA_secret");
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        assert!(verify_hash(&phc, "kgsAAAAA_secret"));
        assert!(!verify_hash(&phc, "kgsAAAAA_secreT"));
        assert!(!verify_hash("not a hash", "kgsAAAAA_secret"));
    }

    #[test]
    fn two_hashes_of_one_secret_differ_by_salt() {
        let argon = hasher(CHEAP).expect("valid params");
        assert_ne!(hash_key(&argon, "x"), hash_key(&argon, "x"));
    }

    #[test]
    fn keygates_own_hashes_are_held_compactly_and_render_back_identically() {
        let argon = hasher(CHEAP).expect("valid params");
        for _ in 0..50 {
            let phc = hash_key(&argon, "kgsAAAAA_secret");
            let stored = StoredHash::new(&phc);
            assert!(matches!(stored, StoredHash::Argon2id { .. }), "{phc}");
            assert_eq!(stored.phc(), phc);
            assert!(verify_hash(&stored.phc(), "kgsAAAAA_secret"));
        }
        let owasp = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc";
        assert!(matches!(
            StoredHash::new(owasp),
            StoredHash::Argon2id {
                m: 19456,
                t: 2,
                p: 1,
                ..
            }
        ));
        assert_eq!(StoredHash::new(owasp).phc(), owasp);
    }

    #[test]
    fn any_other_stored_text_is_kept_as_it_is() {
        let salt = "c29tZXNhbHRzb21lc2FsdA";
        let out = "CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc";
        for phc in [
            String::new(),
            "not a hash".into(),
            "$argon2id$placeholder".into(),
            format!("$argon2i$v=19$m=19456,t=2,p=1${salt}${out}"),
            format!("$argon2id$v=16$m=19456,t=2,p=1${salt}${out}"),
            format!("$argon2id$m=19456,t=2,p=1${salt}${out}"),
            format!("$argon2id$v=19$m=019456,t=2,p=1${salt}${out}"),
            format!("$argon2id$v=19$m=+19456,t=2,p=1${salt}${out}"),
            format!("$argon2id$v=19$m=99999999999,t=2,p=1${salt}${out}"),
            format!("$argon2id$v=19$m=19456,t=2,p=1,keyid=AAAA${salt}${out}"),
            format!("$argon2id$v=19$t=2,m=19456,p=1${salt}${out}"),
            format!("$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ${out}"),
            format!(
                "$argon2id$v=19$m=19456,t=2,p=1${salt}$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPP"
            ),
            format!("$argon2id$v=19$m=19456,t=2,p=1${salt}B${out}"),
            format!("$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdB${out}"),
            format!("$argon2id$v=19$m=19456,t=2,p=1${salt}${out}$"),
            format!("$argon2id$v=19$m=19456,t=2,p=1${salt}=${out}"),
        ] {
            let stored = StoredHash::new(&phc);
            assert!(matches!(stored, StoredHash::Phc(_)), "{phc}");
            assert_eq!(stored.phc(), phc);
        }
    }

    #[test]
    fn unusable_parameters_are_explained() {
        let err = hasher(HashingConfig {
            memory_kib: 1,
            iterations: 0,
            parallelism: 1,
        })
        .expect_err("must fail");
        assert!(err.contains("memory_kib=1"), "{err}");
    }
}
