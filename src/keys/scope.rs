//! Scopes: the permissions a key carries and a route requires (`recordings:read`).

use std::fmt;

/// One validated scope: 1–64 characters of `A-Z a-z 0-9 : . _ -`, starting with a letter or digit.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Scope(Box<str>);

impl Scope {
    pub fn new(s: &str) -> Result<Scope, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b));
        if ok {
            Ok(Scope(s.into()))
        } else {
            Err(format!("`{s}` is not a scope: use 1-64 characters of A-Z a-z 0-9 : . _ - (e.g. recordings:read)"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A key's scopes: sorted, without duplicates.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    pub fn new(mut scopes: Vec<Scope>) -> Scopes {
        scopes.sort();
        scopes.dedup();
        Scopes(scopes)
    }

    /// Parses the stored form: scopes separated by spaces.
    pub fn parse_stored(s: &str) -> Result<Scopes, String> {
        s.split_ascii_whitespace()
            .map(Scope::new)
            .collect::<Result<Vec<_>, _>>()
            .map(Scopes::new)
    }

    /// The stored and header form: scopes separated by single spaces (as OAuth's `scope`).
    pub fn joined(&self) -> String {
        self.0
            .iter()
            .map(Scope::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn contains(&self, scope: &Scope) -> bool {
        // Few scopes per key: a linear scan beats hashing.
        self.0.iter().any(|s| s == scope)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_sorted_deduplicated_and_round_trip() {
        let s = Scopes::parse_stored("b:write a:read  b:write").expect("valid");
        assert_eq!(s.joined(), "a:read b:write");
        assert!(s.contains(&Scope::new("a:read").expect("valid")));
        assert!(!s.contains(&Scope::new("a:write").expect("valid")));
    }

    #[test]
    fn bad_scopes_are_refused() {
        for bad in ["", " ", "-x", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(Scope::new(bad).is_err(), "{bad:?}");
        }
        assert!(Scopes::parse_stored("ok bad/one").is_err());
    }
}
