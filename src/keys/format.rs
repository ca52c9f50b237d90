//! The key format: `kgs` or `kgg` (service account or gateway), five random characters, `_`,
//! 32 random characters, and a 6-character CRC32 checksum, all base62:
//!
//! ```text
//! kgsA1b2C_q8ZrT0pLm3VxYw9KdE2sHf7JuN4cB6aR1xWz9
//! └──────┘ └──────────────────────────────┘└────┘
//!  prefix            secret (190 bits)      CRC32
//! ```
//!
//! The first 8 characters are the public prefix (unique, shown in lists, logs and audit). The
//! checksum rejects typos and random strings before any lookup, and the fixed shape lets secret
//! scanners find leaked keys with `\bkg[sg][0-9A-Za-z]{5}_[0-9A-Za-z]{38}\b`.

use std::fmt;

/// Length of the public prefix, the marker included.
pub const PREFIX_LEN: usize = 8;
const MARKER_LEN: usize = 3;
const SECRET_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
const BODY_LEN: usize = PREFIX_LEN + 1 + SECRET_LEN;
/// Length of a whole key.
pub const KEY_LEN: usize = BODY_LEN + CHECKSUM_LEN;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Which bytes are in `ALPHABET`.
const IN_ALPHABET: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = true;
        i += 1;
    }
    table
};

/// What a key belongs to, told apart by its marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {
    ServiceAccount,
    Gateway,
}

impl KeyKind {
    pub fn marker(self) -> &'static str {
        match self {
            KeyKind::ServiceAccount => "kgs",
            KeyKind::Gateway => "kgg",
        }
    }

    fn from_marker(m: &[u8]) -> Option<KeyKind> {
        match m {
            b"kgs" => Some(KeyKind::ServiceAccount),
            b"kgg" => Some(KeyKind::Gateway),
            _ => None,
        }
    }
}

/// The public first 8 characters of a key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyPrefix([u8; PREFIX_LEN]);

/// Hashed as one word: every request looks its prefix up at least once.
impl std::hash::Hash for KeyPrefix {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_le_bytes(self.0));
    }
}

/// A map keyed by prefix, with a fast hasher seeded per process. Every request looks a prefix
/// up (a flood of unknown keys is nothing but lookups), and only prefixes keygate generated
/// are ever inserted, so std's collision-resistant SipHash buys nothing here for ~200
/// instructions a request.
pub type PrefixMap<V> = std::collections::HashMap<KeyPrefix, V, foldhash::fast::RandomState>;

impl KeyPrefix {
    /// Parses a prefix as shown in lists (`kgsA1b2C`).
    pub fn parse(s: &str) -> Result<KeyPrefix, ParseError> {
        let b = s.as_bytes();
        if b.len() != PREFIX_LEN {
            return Err(ParseError::Length);
        }
        KeyKind::from_marker(&b[..MARKER_LEN]).ok_or(ParseError::Marker)?;
        if !b.iter().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ParseError::Charset);
        }
        let mut p = [0u8; PREFIX_LEN];
        p.copy_from_slice(b);
        Ok(KeyPrefix(p))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from checked ASCII.
        std::str::from_utf8(&self.0).unwrap_or("????????")
    }

    pub fn kind(&self) -> KeyKind {
        KeyKind::from_marker(&self.0[..MARKER_LEN]).unwrap_or(KeyKind::ServiceAccount)
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPrefix({})", self.as_str())
    }
}

/// A whole key in clear. It exists only between generation and the one response that shows
/// it; `Debug` and `Display` show the prefix alone.
pub struct PlaintextKey(String);

impl PlaintextKey {
    /// The whole key, for the single place that shows it and for hashing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn prefix(&self) -> KeyPrefix {
        // A generated key always parses.
        let mut p = [0u8; PREFIX_LEN];
        p.copy_from_slice(&self.0.as_bytes()[..PREFIX_LEN]);
        KeyPrefix(p)
    }
}

impl fmt::Debug for PlaintextKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlaintextKey({}…)", self.prefix())
    }
}

impl fmt::Display for PlaintextKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", self.prefix())
    }
}

/// A well-formed key borrowed from a request.
#[derive(Clone, Copy)]
pub struct ParsedKey<'a> {
    pub kind: KeyKind,
    pub prefix: KeyPrefix,
    text: &'a str,
}

impl<'a> ParsedKey<'a> {
    /// The whole key; only for hashing and digesting.
    pub fn secret_text(&self) -> &'a str {
        self.text
    }

    /// The whole key, copied out of the request without an allocation (`parse` admits only
    /// keys of exactly `KEY_LEN` ASCII characters); only for hashing.
    pub fn secret_bytes(&self) -> [u8; KEY_LEN] {
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(self.text.as_bytes());
        bytes
    }
}

impl fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ParsedKey({}…)", self.prefix)
    }
}

/// Why a string is not a key. Only logs and metrics see it; clients get a plain 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("wrong length")]
    Length,
    #[error("unknown type marker")]
    Marker,
    #[error("characters outside base62")]
    Charset,
    #[error("checksum mismatch")]
    Checksum,
}

/// Whether `b` starts with something shaped like a key: a marker, base62, `_`, base62, the
/// pattern secret scanners match. The checksum is not checked: a key with a typo in it is
/// still a leaked key.
pub fn starts_with_key_shape(b: &[u8]) -> bool {
    let base62 = |part: &[u8]| part.iter().all(|&c| IN_ALPHABET[c as usize]);
    b.len() >= KEY_LEN
        && KeyKind::from_marker(&b[..MARKER_LEN]).is_some()
        && base62(&b[MARKER_LEN..PREFIX_LEN])
        && b[PREFIX_LEN] == b'_'
        && base62(&b[PREFIX_LEN + 1..KEY_LEN])
}

/// Checks shape and checksum. Costs a CRC32 over 41 bytes; touches no table.
pub fn parse(s: &str) -> Result<ParsedKey<'_>, ParseError> {
    let b = s.as_bytes();
    if b.len() != KEY_LEN {
        return Err(ParseError::Length);
    }
    let kind = KeyKind::from_marker(&b[..MARKER_LEN]).ok_or(ParseError::Marker)?;
    // A table lookup per byte, folded without a branch: every request's key goes through
    // this, and a flood of junk keys is nothing but this.
    let base62 = |part: &[u8]| {
        part.iter()
            .fold(true, |ok, &c| ok & IN_ALPHABET[c as usize])
    };
    let charset_ok =
        b[PREFIX_LEN] == b'_' && base62(&b[..PREFIX_LEN]) & base62(&b[PREFIX_LEN + 1..]);
    if !charset_ok {
        return Err(ParseError::Charset);
    }
    if checksum(&b[..BODY_LEN]) != b[BODY_LEN..] {
        return Err(ParseError::Checksum);
    }
    let mut p = [0u8; PREFIX_LEN];
    p.copy_from_slice(&b[..PREFIX_LEN]);
    Ok(ParsedKey {
        kind,
        prefix: KeyPrefix(p),
        text: s,
    })
}

/// A new key of `kind` from the operating system's CSPRNG.
pub fn generate(kind: KeyKind) -> PlaintextKey {
    let mut body = [0u8; BODY_LEN];
    body[..MARKER_LEN].copy_from_slice(kind.marker().as_bytes());
    fill_base62(&mut body[MARKER_LEN..PREFIX_LEN]);
    body[PREFIX_LEN] = b'_';
    fill_base62(&mut body[PREFIX_LEN + 1..]);
    let mut key = String::with_capacity(KEY_LEN);
    key.extend(body.iter().map(|&c| c as char));
    key.extend(checksum(&body).iter().map(|&c| c as char));
    PlaintextKey(key)
}

/// Fills `out` with uniformly random base62 characters (rejection sampling, no modulo bias).
fn fill_base62(out: &mut [u8]) {
    let mut filled = 0;
    let mut buf = [0u8; 64];
    while filled < out.len() {
        // The OS generator failing is unrecoverable: no key may be made without it.
        getrandom::getrandom(&mut buf).expect("the operating system's random generator failed");
        for &r in &buf {
            if filled == out.len() {
                break;
            }
            if r < 248 {
                out[filled] = ALPHABET[(r % 62) as usize];
                filled += 1;
            }
        }
    }
}

/// `body` (prefix, `_`, secret) with its checksum appended. The checksum is public by design,
/// so anyone can build a well-formed key; tests and benches use this to play that attacker.
pub fn with_checksum(body: &str) -> String {
    let sum = checksum(body.as_bytes());
    let mut key = String::with_capacity(body.len() + CHECKSUM_LEN);
    key.push_str(body);
    key.extend(sum.iter().map(|&c| c as char));
    key
}

fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_with_their_kind_and_prefix() {
        for kind in [KeyKind::ServiceAccount, KeyKind::Gateway] {
            let key = generate(kind);
            assert_eq!(key.expose().len(), KEY_LEN);
            let parsed = parse(key.expose()).expect("a generated key parses");
            assert_eq!(parsed.kind, kind);
            assert_eq!(parsed.prefix, key.prefix());
            assert_eq!(parsed.prefix.as_str(), &key.expose()[..PREFIX_LEN]);
            assert!(key.expose().starts_with(kind.marker()));
        }
    }

    #[test]
    fn one_changed_character_fails_the_checksum() {
        let key = generate(KeyKind::ServiceAccount);
        let mut bytes = key.expose().as_bytes().to_vec();
        bytes[20] = if bytes[20] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(bytes).expect("ascii");
        assert_eq!(parse(&typo).map(|_| ()), Err(ParseError::Checksum));
    }

    #[test]
    fn malformed_strings_are_rejected_by_shape() {
        let key = generate(KeyKind::ServiceAccount);
        let k = key.expose();
        assert_eq!(parse("").map(|_| ()), Err(ParseError::Length));
        assert_eq!(parse(&k[1..]).map(|_| ()), Err(ParseError::Length));
        assert_eq!(
            parse(&format!("xyz{}", &k[3..])).map(|_| ()),
            Err(ParseError::Marker)
        );
        assert_eq!(
            parse(&format!("{}-{}", &k[..8], &k[9..])).map(|_| ()),
            Err(ParseError::Charset)
        );
        assert_eq!(
            parse(&format!("{}é{}", &k[..10], &k[12..])).map(|_| ()),
            Err(ParseError::Charset)
        );
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let key = generate(KeyKind::ServiceAccount);
        let secret = &key.expose()[PREFIX_LEN + 1..];
        for shown in [
            format!("{key:?}"),
            format!("{key}"),
            format!("{:?}", parse(key.expose())),
        ] {
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains(key.prefix().as_str()));
        }
    }

    #[test]
    fn prefixes_parse_and_reject_bad_shapes() {
        let key = generate(KeyKind::Gateway);
        let p = KeyPrefix::parse(&key.expose()[..8]).expect("prefix parses");
        assert_eq!(p.kind(), KeyKind::Gateway);
        assert!(KeyPrefix::parse("kgsAB").is_err());
        assert!(KeyPrefix::parse("abcdefgh").is_err());
        assert!(KeyPrefix::parse("kgsAB_CD").is_err());
    }
}
