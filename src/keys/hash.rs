//! argon2id hashing of keys (and console passwords). Verification is slow by design (about
//! 20 ms at OWASP settings), so callers run it on the blocking pool, never on the runtime.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

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
