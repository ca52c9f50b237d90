//! Header rules: where the key comes from, what is stripped before forwarding (the key,
//! hop-by-hop headers per RFC 9110 §7.6.1, anything nominated by `Connection`, and every
//! client-sent spelling of keygate's identity headers and of `X-Forwarded-*`), and what is set.

use std::net::IpAddr;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::Version;

/// Which header carried the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    Authorization,
    XApiKey,
}

/// A credential problem found while reading headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialError {
    /// No key at all.
    Missing,
    /// A key header that is not valid visible ASCII, or an empty bearer token.
    Malformed,
    /// Several Authorization or X-Api-Key headers, or a key in both: refused with 400.
    Ambiguous,
}

pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_KEYGATE_ACCOUNT: HeaderName = HeaderName::from_static("x-keygate-account");
pub static X_KEYGATE_KEY_PREFIX: HeaderName = HeaderName::from_static("x-keygate-key-prefix");
pub static X_KEYGATE_SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
/// On responses: when the caller's key expires (RFC 3339), while it has an expiry ahead.
pub static X_KEYGATE_KEY_EXPIRES_AT: HeaderName =
    HeaderName::from_static("x-keygate-key-expires-at");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// One pass over a request's headers: everything the framing checks, the key extraction and
/// the strip need. A lookup by name hashes the name and probes the map; a request carries a
/// handful of headers, so reading each once (a match on its name) is cheaper than the dozen
/// lookups the pipeline would otherwise make, and it says whether any header needs removing.
#[derive(Default)]
pub struct Scan<'h> {
    authorization: Option<&'h HeaderValue>,
    authorizations: u8,
    api_key: Option<&'h HeaderValue>,
    api_keys: u8,
    /// The first `Host`, and how many there are.
    pub host: Option<&'h HeaderValue>,
    pub hosts: u8,
    /// The first `Transfer-Encoding`, and how many there are.
    pub transfer_encoding: Option<&'h HeaderValue>,
    pub transfer_encodings: u8,
    pub content_length: bool,
    pub upgrade: bool,
    /// How many `Cookie` fields there are (an HTTP/2 client may send one per cookie).
    cookies: u8,
    /// The first `X-Request-Id`.
    pub request_id: Option<&'h HeaderValue>,
    /// A hop-by-hop header is present.
    hop_by_hop: bool,
    /// A client-sent spelling of a reserved header (other than `x-api-key`) is present.
    reserved: bool,
}

impl<'h> Scan<'h> {
    pub fn of(headers: &'h HeaderMap) -> Scan<'h> {
        let mut scan = Scan::default();
        for (name, value) in headers {
            match name.as_str() {
                "host" => {
                    scan.host.get_or_insert(value);
                    scan.hosts = scan.hosts.saturating_add(1);
                }
                "x-api-key" => {
                    scan.api_key.get_or_insert(value);
                    scan.api_keys = scan.api_keys.saturating_add(1);
                }
                "authorization" => {
                    scan.authorization.get_or_insert(value);
                    scan.authorizations = scan.authorizations.saturating_add(1);
                }
                "content-length" => scan.content_length = true,
                "transfer-encoding" => {
                    scan.transfer_encoding.get_or_insert(value);
                    scan.transfer_encodings = scan.transfer_encodings.saturating_add(1);
                    scan.hop_by_hop = true;
                }
                "upgrade" => {
                    scan.upgrade = true;
                    scan.hop_by_hop = true;
                }
                "x-request-id" => {
                    scan.request_id.get_or_insert(value);
                }
                "cookie" => scan.cookies = scan.cookies.saturating_add(1),
                other if is_hop_by_hop(other) => scan.hop_by_hop = true,
                other if is_reserved(other) => scan.reserved = true,
                _ => {}
            }
        }
        scan
    }

    /// Finds the key: `Authorization: Bearer <key>` or `X-Api-Key: <key>`. An Authorization
    /// header with another scheme is not a key and is left for the upstream. The token is not
    /// checked here beyond being UTF-8: `keys::parse` admits only the key's own characters.
    pub fn key(&self) -> Result<(KeySource, &'h str), CredentialError> {
        let mut found: Option<(KeySource, &str)> = None;
        if let Some(value) = self.authorization {
            if self.authorizations > 1 {
                return Err(CredentialError::Ambiguous);
            }
            let bytes = value.as_bytes();
            if bytes.len() >= 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ") {
                found = Some((KeySource::Authorization, token(&bytes[7..])?));
            }
        }
        if let Some(value) = self.api_key {
            if self.api_keys > 1 || found.is_some() {
                return Err(CredentialError::Ambiguous);
            }
            found = Some((KeySource::XApiKey, token(value.as_bytes())?));
        }
        found.ok_or(CredentialError::Missing)
    }

    /// What `Strip::apply` must remove (or join), for a key that came from `key_source` on a
    /// request that arrived over `version`.
    pub fn strip(&self, key_source: Option<KeySource>, version: Version) -> Strip {
        Strip {
            authorization: key_source == Some(KeySource::Authorization),
            api_key: self.api_keys > 0,
            hop_by_hop: self.hop_by_hop,
            reserved: self.reserved,
            join_cookies: self.cookies > 1 && version == Version::HTTP_2,
        }
    }
}

/// A credential's text without the spaces around it; empty or not UTF-8 is malformed.
fn token(bytes: &[u8]) -> Result<&str, CredentialError> {
    let start = bytes.iter().position(|&b| b != b' ').unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ')
        .map_or(start, |i| i + 1);
    match std::str::from_utf8(&bytes[start..end]) {
        Ok(text) if !text.is_empty() => Ok(text),
        _ => Err(CredentialError::Malformed),
    }
}

/// Is `value` a valid `Host`: a uri-host with an optional port (RFC 9110 §7.2, RFC 3986
/// §3.2.2), without userinfo? The usual host, a name or IPv4 address (letters, digits, `-`,
/// `.`) with an optional numeric port, is checked in one pass without allocating; any other
/// (an IP literal, a name with sub-delims) is left to `http`'s `Authority` parser, which
/// copies it.
pub fn valid_host(value: &[u8]) -> bool {
    let name = value
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
        .unwrap_or(value.len());
    match value.get(name) {
        None => name > 0,
        Some(b':') if name > 0 => valid_port(&value[name + 1..]),
        Some(_) => other_host(value),
    }
}

/// A port: 1–5 digits, at most 65535.
fn valid_port(p: &[u8]) -> bool {
    (1..=5).contains(&p.len())
        && p.iter().all(u8::is_ascii_digit)
        && p.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65_535
}

/// `valid_host` for a host that is not a plain name or IPv4 address.
fn other_host(value: &[u8]) -> bool {
    // A port follows the last `:`, unless that colon is inside an IP literal `[..]`.
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        Some(i) if !value[..i].contains(&b':') || value[..i].ends_with(b"]") => {
            (&value[..i], Some(&value[i + 1..]))
        }
        _ => (value, None),
    };
    port.is_none_or(valid_port)
        && !host.is_empty()
        && !host.contains(&b'@')
        && Authority::try_from(host).is_ok()
}

/// Finds the key in `headers` (see `Scan::key`).
pub fn extract_key(headers: &HeaderMap) -> Result<(KeySource, &str), CredentialError> {
    Scan::of(headers).key()
}

/// Is `name` one of ours or a forwarding header, in any spelling a CGI-style upstream would
/// merge with it (`X_Keygate_Account`, `x.keygate.account`)?
fn is_reserved(name: &str) -> bool {
    // Every reserved name starts with `x` or `f`: most names are turned away on one byte.
    if !matches!(name.as_bytes().first(), Some(b'x' | b'X' | b'f' | b'F')) {
        return false;
    }
    let normalised = |b: u8| match b {
        b'_' | b'.' => b'-',
        b => b.to_ascii_lowercase(),
    };
    let starts =
        |p: &str| name.len() >= p.len() && name.bytes().take(p.len()).map(normalised).eq(p.bytes());
    starts("x-keygate-")
        || starts("x-forwarded-")
        || starts("x-real-ip")
        || (name.len() == "forwarded".len() && starts("forwarded"))
        || (name.len() == "x-request-id".len() && starts("x-request-id") && name != "x-request-id")
        || (name.len() == "x-api-key".len() && starts("x-api-key"))
}

/// What to remove from a request before it goes upstream, as a `Scan` found it: the key
/// header, hop-by-hop and `Connection`-nominated headers, and client-sent identity and
/// forwarding headers; and an HTTP/2 client's `Cookie` fields to join. Most requests need
/// only the key header removed.
#[derive(Clone, Copy, Debug)]
pub struct Strip {
    authorization: bool,
    api_key: bool,
    hop_by_hop: bool,
    reserved: bool,
    join_cookies: bool,
}

impl Strip {
    pub fn apply(self, headers: &mut HeaderMap) {
        if self.hop_by_hop {
            strip_hop_by_hop(headers);
        }
        if self.join_cookies {
            join_cookies(headers);
        }
        if self.authorization {
            headers.remove(header::AUTHORIZATION);
        }
        if self.api_key {
            headers.remove(&X_API_KEY);
        }
        if self.reserved {
            let doomed: Vec<HeaderName> = headers
                .keys()
                .filter(|n| is_reserved(n.as_str()))
                .cloned()
                .collect();
            for name in doomed {
                headers.remove(&name);
            }
        }
    }
}

/// Removes from a request everything the upstream must not see (see `Strip`).
pub fn strip_request(headers: &mut HeaderMap, key_source: Option<KeySource>, version: Version) {
    Scan::of(headers).strip(key_source, version).apply(headers);
}

/// An HTTP/2 client may send each cookie as a field of its own; the upstream speaks HTTP/1.1,
/// where they must be one field joined with "; " (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut joined = BytesMut::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Valid field values joined by "; " are a valid field value.
    if let Ok(value) = HeaderValue::from_maybe_shared(joined.freeze()) {
        headers.insert(header::COOKIE, value);
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `Proxy-Connection` and `Keep-Alive`).
/// `Expect` is handled here too: keygate answers it itself by reading the body only after
/// the key is accepted. A match on the name's text compiles to a length switch and a compare
/// or two.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "expect"
    )
}

/// Removes hop-by-hop headers and those nominated by `Connection` (requests and responses).
/// Every `Connection` line counts (several lines are one list, RFC 9110 §5.3), and each is
/// split as bytes: a token that is not a field name (a non-ASCII byte, say) is skipped, and
/// never stops the rest of the list from being honoured.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The nominated headers first, while the Connection lines are there to read. Each line is
    // cloned (a reference count) so the map can change while its tokens are read, and each
    // token is removed by its text: no name is allocated.
    let mut line = 0;
    while let Some(value) = headers
        .get_all(header::CONNECTION)
        .iter()
        .nth(line)
        .cloned()
    {
        line += 1;
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            // `Connection` itself goes with the other hop-by-hop headers below: removing it
            // now would lose the lines still to be read.
            if let Ok(name) = std::str::from_utf8(token) {
                if !name.eq_ignore_ascii_case("connection") {
                    // A token that is not a valid name finds nothing.
                    headers.remove(name);
                }
            }
        }
    }
    // A request or response carries a handful of headers: one scan of them is cheaper than
    // ten lookups (and finding none allocates nothing).
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n.as_str()))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// An upstream response keygate will not relay: its `Transfer-Encoding` is not a lone
/// `chunked`. hyper has decoded the chunking, and the `Transfer-Encoding` goes as hop-by-hop,
/// so another coding (`gzip, chunked`) would reach the client as if it were the content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedTransferCoding;

/// Readies an upstream's response for the client: hop-by-hop headers go, and so does any
/// `X-Keygate-Key-Expires-At` of the upstream's own (only keygate sets it). A response framed
/// by chunking loses its `Content-Length` too: the body is re-framed, and a length sent beside
/// `Transfer-Encoding` is not the body's (RFC 9112 §6.3). One pass finds all of it; most
/// responses carry none of it.
pub fn strip_response(headers: &mut HeaderMap) -> Result<(), UnsupportedTransferCoding> {
    let (mut hop_by_hop, mut expires, mut length) = (false, false, false);
    let (mut codings, mut chunked) = (0u8, false);
    for (name, value) in headers.iter() {
        match name.as_str() {
            "transfer-encoding" => {
                codings = codings.saturating_add(1);
                chunked = value.as_bytes().eq_ignore_ascii_case(b"chunked");
                hop_by_hop = true;
            }
            "content-length" => length = true,
            name if is_hop_by_hop(name) => hop_by_hop = true,
            name => expires |= name == X_KEYGATE_KEY_EXPIRES_AT.as_str(),
        }
    }
    if codings > 1 || (codings == 1 && !chunked) {
        return Err(UnsupportedTransferCoding);
    }
    if codings == 1 && length {
        headers.remove(header::CONTENT_LENGTH);
    }
    if hop_by_hop {
        strip_hop_by_hop(headers);
    }
    if expires {
        headers.remove(&X_KEYGATE_KEY_EXPIRES_AT);
    }
    Ok(())
}

/// What keygate adds to an allowed request. Values that do not change per request (the
/// client address per connection, the upstream host per route, the identity per key) are
/// built once by their owners and cloned here, which only bumps a reference count.
pub struct Forwarding<'a> {
    /// The client address, as `X-Forwarded-For` carries it.
    pub client_ip: &'a HeaderValue,
    pub proto: &'static str,
    pub original_host: Option<HeaderValue>,
    pub upstream_host: &'a HeaderValue,
    pub identity: [&'a HeaderValue; 3],
    pub request_id: &'a HeaderValue,
}

/// Sets identity, forwarding and request-id headers (after `strip_request`).
pub fn set_forwarding(headers: &mut HeaderMap, f: Forwarding<'_>) {
    // Room for all of them at once: one growth of the map at most, not one per insert.
    headers.reserve(8);
    headers.insert(&X_KEYGATE_ACCOUNT, f.identity[0].clone());
    headers.insert(&X_KEYGATE_KEY_PREFIX, f.identity[1].clone());
    headers.insert(&X_KEYGATE_SCOPES, f.identity[2].clone());
    headers.insert(&X_FORWARDED_FOR, f.client_ip.clone());
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(f.proto));
    if let Some(host) = f.original_host {
        headers.insert(&X_FORWARDED_HOST, host);
    }
    headers.insert(header::HOST, f.upstream_host.clone());
    headers.insert(&X_REQUEST_ID, f.request_id.clone());
}

/// `value` in a buffer of its own. A clone shares the original's reference count, and with it
/// a cache line, with every thread that clones it too; a proxy worker keeps such copies of the
/// values every request it serves clones (the route's upstream host, a busy key's identity).
pub fn unshared(value: &HeaderValue) -> HeaderValue {
    HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone())
}

/// `X-Forwarded-For`'s value for a client address (an IPv4-mapped IPv6 address as IPv4).
pub fn client_ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_bytes(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        assert_eq!(
            extract_key(&map(&[("authorization", b"Bearer abc")])),
            Ok((KeySource::Authorization, "abc"))
        );
        assert_eq!(
            extract_key(&map(&[("authorization", b"bearer  abc ")])),
            Ok((KeySource::Authorization, "abc"))
        );
        assert_eq!(
            extract_key(&map(&[("x-api-key", b"abc")])),
            Ok((KeySource::XApiKey, "abc"))
        );
        assert_eq!(
            extract_key(&map(&[
                ("authorization", b"Basic dXNlcg=="),
                ("x-api-key", b"abc")
            ])),
            Ok((KeySource::XApiKey, "abc")),
            "another Authorization scheme is the upstream's business"
        );
    }

    #[test]
    fn missing_malformed_and_ambiguous_credentials_are_told_apart() {
        assert_eq!(extract_key(&map(&[])), Err(CredentialError::Missing));
        assert_eq!(
            extract_key(&map(&[("authorization", b"Basic x")])),
            Err(CredentialError::Missing)
        );
        assert_eq!(
            extract_key(&map(&[("authorization", b"Bearer ")])),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            extract_key(&map(&[("x-api-key", b"k\xffey")])),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            extract_key(&map(&[
                ("authorization", b"Bearer a"),
                ("authorization", b"Bearer b")
            ])),
            Err(CredentialError::Ambiguous)
        );
        assert_eq!(
            extract_key(&map(&[("authorization", b"Bearer a"), ("x-api-key", b"a")])),
            Err(CredentialError::Ambiguous)
        );
        assert_eq!(
            extract_key(&map(&[("x-api-key", b"a"), ("x-api-key", b"b")])),
            Err(CredentialError::Ambiguous)
        );
    }

    #[test]
    fn spoofed_identity_and_hop_by_hop_headers_are_stripped() {
        let mut h = map(&[
            ("authorization", b"Bearer k"),
            ("x-keygate-account", b"root"),
            ("X_Keygate_Account", b"root"),
            ("x.keygate.scopes", b"admin"),
            ("X-KEYGATE-KEY-PREFIX", b"kgsAAAAA"),
            ("x-forwarded-for", b"10.0.0.1"),
            ("x_forwarded_for", b"10.0.0.1"),
            ("forwarded", b"for=1.2.3.4"),
            ("x_request_id", b"spoof"),
            ("connection", b"close, x-secret-hop"),
            ("x-secret-hop", b"1"),
            ("keep-alive", b"timeout=5"),
            ("transfer-encoding", b"chunked"),
            ("upgrade", b"websocket"),
            ("te", b"trailers"),
            ("accept", b"*/*"),
            ("x-request-id", b"abc"),
        ]);
        strip_request(&mut h, Some(KeySource::Authorization), Version::HTTP_11);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, vec!["accept", "x-request-id"]);
    }

    #[test]
    fn every_connection_line_nominates_and_a_bad_token_spoils_only_itself() {
        // RFC 9110 §5.3: the lines are one list, whichever line names a header.
        let mut h = map(&[
            ("connection", b"keep-alive"),
            ("connection", b"X-Secret, close"),
            ("connection", b"X-Other, \xe9, x-third"),
            ("x-secret", b"leak"),
            ("x-other", b"leak"),
            ("x-third", b"leak"),
            ("accept", b"*/*"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);

        let mut h = map(&[
            ("connection", b"X-Secret, close, \xe9"),
            ("x-secret", b"leak"),
            ("accept", b"*/*"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
    }

    #[test]
    fn an_http2_clients_cookie_fields_are_joined_for_the_http1_upstream() {
        let fields = [
            ("cookie", &b"a=1"[..]),
            ("accept", b"*/*"),
            ("cookie", b"b=2"),
            ("cookie", b"c=3"),
        ];
        let mut h = map(&fields);
        strip_request(&mut h, None, Version::HTTP_2);
        assert_eq!(
            h.get_all("cookie").iter().collect::<Vec<_>>(),
            ["a=1; b=2; c=3"]
        );
        // An HTTP/1.1 client's fields are forwarded as they came.
        let mut h = map(&fields);
        strip_request(&mut h, None, Version::HTTP_11);
        assert_eq!(h.get_all("cookie").iter().count(), 3);
    }

    #[test]
    fn a_host_is_a_uri_host_with_an_optional_port_and_nothing_else() {
        for ok in [
            "kg",
            "api.example.com",
            "api.example.com:8443",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "my_host.internal",
            "xn--bcher-kva.example",
            "a.com,b.com",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "a.com, b.com",
            "evil.com/x?y@z",
            "user@kg",
            "user:pw@kg:80",
            "kg:",
            "kg:http",
            "kg:65536",
            "kg:123456",
            "kg:80:80",
            "::1",
            "[::1",
            "kg/x",
            "kg?x",
            "kg#x",
            "k g",
            "k%41g",
            "caf\u{e9}.example",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
        // The quick check admits only what `http`'s parser admits too.
        for quick in ["kg", "a-b.c", "1.2.3.4", "..", "-"] {
            assert!(valid_host(quick.as_bytes()), "{quick}");
            assert!(Authority::try_from(quick).is_ok(), "{quick}");
        }
    }

    #[test]
    fn a_response_framed_by_chunking_loses_its_content_length_and_other_codings_are_refused() {
        let mut h = map(&[
            ("content-length", b"2"),
            ("transfer-encoding", b"chunked"),
            ("content-type", b"text/plain"),
        ]);
        assert_eq!(strip_response(&mut h), Ok(()));
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["content-type"]
        );
        for codings in [
            &[&b"gzip, chunked"[..]][..],
            &[b"gzip"],
            &[b"chunked, identity"],
            &[b"gzip", b"chunked"],
            &[b"chunked", b"chunked"],
        ] {
            let mut h = HeaderMap::new();
            for c in codings {
                h.append(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_bytes(c).expect("value"),
                );
            }
            assert_eq!(
                strip_response(&mut h),
                Err(UnsupportedTransferCoding),
                "{codings:?}"
            );
        }
    }

    #[test]
    fn the_hop_by_hop_matcher_knows_exactly_the_listed_names() {
        let listed = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
            "expect",
        ];
        for name in listed {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            "host",
            "accept",
            "x-api-key",
            "content-length",
            "tex",
            "connections",
        ] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn an_x_api_key_is_stripped_and_other_authorization_kept() {
        let mut h = map(&[
            ("authorization", b"Basic dXNlcg=="),
            ("x-api-key", b"k"),
            ("X_Api_Key", b"k"),
        ]);
        strip_request(&mut h, Some(KeySource::XApiKey), Version::HTTP_11);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["authorization"]
        );
    }

    #[test]
    fn a_response_loses_hop_by_hop_headers_and_an_upstream_expiry_claim() {
        let mut h = map(&[
            ("content-type", b"text/plain"),
            ("connection", b"keep-alive, x-hop"),
            ("x-hop", b"1"),
            ("x-keygate-key-expires-at", b"2099-01-01T00:00:00Z"),
            ("x-keygate-account", b"upstream-says"),
        ]);
        strip_response(&mut h).expect("relayable");
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, vec!["content-type", "x-keygate-account"]);

        let mut plain = map(&[("content-type", b"text/plain"), ("content-length", b"2")]);
        let before = plain.clone();
        strip_response(&mut plain).expect("relayable");
        assert_eq!(plain, before);
    }

    #[test]
    fn one_scan_finds_framing_host_and_request_id() {
        let h = map(&[
            ("host", b"a.example"),
            ("host", b"b.example"),
            ("transfer-encoding", b"gzip"),
            ("transfer-encoding", b"chunked"),
            ("content-length", b"3"),
            ("upgrade", b"websocket"),
            ("x-request-id", b"r-1"),
        ]);
        let scan = Scan::of(&h);
        assert_eq!(scan.hosts, 2);
        assert_eq!(
            scan.host.map(HeaderValue::as_bytes),
            Some(&b"a.example"[..])
        );
        assert_eq!(scan.transfer_encodings, 2);
        assert_eq!(
            scan.transfer_encoding.map(HeaderValue::as_bytes),
            Some(&b"gzip"[..])
        );
        assert!(scan.content_length && scan.upgrade);
        assert_eq!(
            scan.request_id.map(HeaderValue::as_bytes),
            Some(&b"r-1"[..])
        );

        let quiet = map(&[("host", b"a.example"), ("x-api-key", b"k")]);
        let scan = Scan::of(&quiet);
        assert_eq!(scan.hosts, 1);
        assert!(!scan.content_length && !scan.upgrade && scan.request_id.is_none());
        assert_eq!(scan.transfer_encodings, 0);
    }

    #[test]
    fn forwarding_headers_are_set_after_stripping() {
        let mut h = HeaderMap::new();
        let identity = [
            &HeaderValue::from_static("billing"),
            &HeaderValue::from_static("kgsAAAAA"),
            &HeaderValue::from_static("a b"),
        ];
        let rid = HeaderValue::from_static("r1");
        set_forwarding(
            &mut h,
            Forwarding {
                client_ip: &client_ip_value("::ffff:127.0.0.1".parse().expect("ip")),
                proto: "http",
                original_host: Some(HeaderValue::from_static("api.example")),
                upstream_host: &HeaderValue::from_static("127.0.0.1:9000"),
                identity,
                request_id: &rid,
            },
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(h["host"], "127.0.0.1:9000");
        assert_eq!(h["x-keygate-scopes"], "a b");
    }
}
