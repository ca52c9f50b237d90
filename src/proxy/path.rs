//! Path canonicality. keygate authorises the exact bytes it forwards, so a path that an
//! upstream could read differently (`//`, dot segments, encoded `/` `\` `.`, encoded unreserved
//! characters, NUL, invalid or overlong UTF-8) is refused with 400 instead of being "fixed" in a
//! way the upstream might not share. Envoy's four path-confusion CVEs are the reason.

/// Why a path is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with /")]
    NotAbsolute,
    #[error("empty path segment (//)")]
    EmptySegment,
    #[error("dot segment (/./ or /../)")]
    DotSegment,
    #[error("backslash in path")]
    Backslash,
    #[error("control character, space or fragment in path")]
    Forbidden,
    #[error("bad percent-encoding")]
    BadEncoding,
    #[error("percent-encoded character that must appear literally")]
    AmbiguousEncoding,
    #[error("path does not decode to valid UTF-8")]
    InvalidUtf8,
}

/// Checks that `path` (without the query) is canonical; see the module notes. One pass over
/// the bytes: every request's path goes through it.
pub fn canonical_path(path: &[u8]) -> Result<(), PathError> {
    if path.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut has_non_ascii_escape = false;
    let (mut dot_segment, mut empty_segment) = (false, false);
    // The current segment starts after its `/`; its name ends at its first `;` (Tomcat-style
    // path parameters make `..;x` mean `..`).
    let mut segment = 1;
    let mut name_end = None;
    let mut i = 1;
    while i <= path.len() {
        let c = path.get(i).copied().unwrap_or(b'/');
        match c {
            b'/' => {
                let name = &path[segment..name_end.unwrap_or(i)];
                dot_segment |= name == b"." || name == b"..";
                empty_segment |= i < path.len() && i == segment;
                segment = i + 1;
                name_end = None;
            }
            b';' => {
                name_end.get_or_insert(i);
            }
            b'\\' => return Err(PathError::Backslash),
            b'#' | b' ' | 0..=0x1f | 0x7f..=0xff => return Err(PathError::Forbidden),
            b'%' => {
                has_non_ascii_escape |= escaped(path, i)? >= 0x80;
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    if dot_segment {
        return Err(PathError::DotSegment);
    }
    if empty_segment {
        return Err(PathError::EmptySegment);
    }
    if has_non_ascii_escape {
        decodes_to_utf8(path)?;
    }
    Ok(())
}

/// Whether `path`'s escapes decode to UTF-8: overlong encodings (%C0%AE for '.') and stray
/// continuation bytes fail here.
fn decodes_to_utf8(path: &[u8]) -> Result<(), PathError> {
    std::str::from_utf8(&percent_decode(path))
        .map(drop)
        .map_err(|_| PathError::InvalidUtf8)
}

/// The byte the escape at `path[at]` (a `%`) stands for, when it may be escaped: an escape of
/// an unreserved character, `/`, `\\` or a control character could be read two ways.
fn escaped(path: &[u8], at: usize) -> Result<u8, PathError> {
    let (Some(h), Some(l)) = (
        path.get(at + 1).and_then(hex),
        path.get(at + 2).and_then(hex),
    ) else {
        return Err(PathError::BadEncoding);
    };
    let byte = h << 4 | l;
    if byte.is_ascii_alphanumeric() || b"-._~/\\".contains(&byte) || byte < 0x20 || byte == 0x7f {
        return Err(PathError::AmbiguousEncoding);
    }
    Ok(byte)
}

fn hex(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn percent_decode(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%' {
            if let (Some(h), Some(l)) =
                (path.get(i + 1).and_then(hex), path.get(i + 2).and_then(hex))
            {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(path[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The first, three-pass version, kept as the oracle the one-pass version must agree with.
    pub(crate) fn three_pass(path: &[u8]) -> Result<(), PathError> {
        if path.first() != Some(&b'/') {
            return Err(PathError::NotAbsolute);
        }
        let mut has_non_ascii_escape = false;
        let mut i = 0;
        while i < path.len() {
            let c = path[i];
            match c {
                b'\\' => return Err(PathError::Backslash),
                b'#' | b' ' | 0..=0x1f | 0x7f..=0xff => return Err(PathError::Forbidden),
                b'%' => {
                    has_non_ascii_escape |= escaped(path, i)? >= 0x80;
                    i += 3;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        for segment in path[1..].split(|&b| b == b'/') {
            // Tomcat-style path parameters make `..;x` mean `..`.
            let name = segment.split(|&b| b == b';').next().unwrap_or(segment);
            if name == b"." || name == b".." {
                return Err(PathError::DotSegment);
            }
        }
        if path.windows(2).any(|w| w == b"//") {
            return Err(PathError::EmptySegment);
        }
        if has_non_ascii_escape {
            decodes_to_utf8(path)?;
        }
        Ok(())
    }

    #[test]
    fn ordinary_paths_are_canonical() {
        for ok in [
            "/",
            "/api",
            "/api/v1/recordings/42",
            "/a/b.c/d..e",
            "/files/%20x",
            "/%E2%82%AC",
            "/a;b",
            "/.well-known/x",
        ] {
            assert_eq!(canonical_path(ok.as_bytes()), Ok(()), "{ok}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases: &[(&[u8], PathError)] = &[
            (b"api", PathError::NotAbsolute),
            (b"//api", PathError::EmptySegment),
            (b"/api//x", PathError::EmptySegment),
            (b"/api/./x", PathError::DotSegment),
            (b"/api/../admin", PathError::DotSegment),
            (b"/api/..", PathError::DotSegment),
            (b"/api/..;/admin", PathError::DotSegment),
            (b"/api/%2e%2e/admin", PathError::AmbiguousEncoding),
            (b"/api%2fadmin", PathError::AmbiguousEncoding),
            (b"/api%5cadmin", PathError::AmbiguousEncoding),
            (b"/%61pi", PathError::AmbiguousEncoding),
            (b"/api\\admin", PathError::Backslash),
            (b"/api%00", PathError::AmbiguousEncoding),
            (b"/api\0", PathError::Forbidden),
            (b"/api#frag", PathError::Forbidden),
            (b"/api%zz", PathError::BadEncoding),
            (b"/api%4", PathError::BadEncoding),
            (b"/%C0%AE%C0%AE/admin", PathError::InvalidUtf8),
            (b"/%80", PathError::InvalidUtf8),
            (b"/caf\xc3\xa9", PathError::Forbidden),
        ];
        for (path, want) in cases {
            assert_eq!(
                canonical_path(path),
                Err(*want),
                "{}",
                String::from_utf8_lossy(path)
            );
        }
    }
}
