//! The hostile-request table: raw HTTP/1.1 bytes over TCP and raw or `h2`-crate HTTP/2 frames
//! against keygate on a real port, each row asserting what the client gets and what reaches
//! the recording upstream (nothing, exactly one well-formed request, or one whose body was
//! cut off). `docs/security.md` is generated from this table and a test keeps the two in step
//! (`KEYGATE_BLESS=1 cargo test --test it hostile` rewrites it).
//!
//! After the table, hostile upstreams: raw response bytes an upstream could send, and what
//! the client gets instead (over HTTP/1.1 and HTTP/2).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// What the client sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Client {
    /// These responses, in order (100 included when sent).
    Statuses(Vec<u16>),
    /// The connection closed without any response.
    Closed,
    /// HTTP/2: the stream was reset (RST_STREAM) or the connection sent GOAWAY.
    Reset,
}

/// What reaches the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Up {
    Nothing,
    /// Exactly one well-formed request for this target, with a complete body of this length.
    One(String, u64),
    /// Nothing complete: at most one head whose body ended in an error (the upstream exchange
    /// was abandoned mid-body); never a further request.
    Aborted,
    /// Several well-formed requests (pipelining), by target.
    Many(Vec<String>),
}

#[derive(Clone, Debug)]
pub enum Wire {
    H1(Vec<u8>),
    /// Raw HTTP/2 frames: literal header fields and optional DATA.
    H2Raw(Vec<(String, String)>, Option<Vec<u8>>),
    /// Through the `h2` crate's client: headers, body.
    H2(Vec<(String, String)>, Option<Vec<u8>>),
}

pub struct Case {
    pub group: &'static str,
    pub what: String,
    pub wire: Wire,
    pub client: Client,
    pub up: Up,
    pub why: &'static str,
}

const KEY: &str = "{KEY}";

fn st(s: &[u16]) -> Client {
    Client::Statuses(s.to_vec())
}

fn one(target: &str) -> Up {
    Up::One(target.to_string(), 0)
}

fn head(method: &str, target: &str, extra: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer {KEY}\r\n{extra}\r\n")
}

fn get(target: &str, extra: &str) -> Vec<u8> {
    head("GET", target, extra).into_bytes()
}

fn h1(s: impl Into<String>) -> Wire {
    Wire::H1(s.into().into_bytes())
}

fn case(
    group: &'static str,
    what: impl Into<String>,
    wire: Wire,
    client: Client,
    up: Up,
    why: &'static str,
) -> Case {
    Case {
        group,
        what: what.into(),
        wire,
        client,
        up,
        why,
    }
}

/// The table. Every row is one request (or one connection's worth of bytes).
pub fn cases() -> Vec<Case> {
    let mut t = Vec::new();
    smuggling(&mut t);
    paths(&mut t);
    spoofing(&mut t);
    headers(&mut t);
    bodies(&mut t);
    http2(&mut t);
    t
}

const CL_TE: &str = "hyper drops Content-Length when Transfer-Encoding is present (RFC 9112 §6.3), decodes chunked and closes the connection after the response, so keygate cannot see the pair to refuse it; nothing after the chunked body is ever read as a request and the upstream gets one re-framed request";

fn smuggling(t: &mut Vec<Case>) {
    let g = "smuggling";
    let post = |extra: &str, body: &str| h1(head("POST", "/recordings/1", extra) + body);
    const REFRAME: &str = "hyper parses strictly; keygate re-frames the body, so an upstream cannot read a second request into it";
    t.push(case(
        g,
        "Content-Length and Transfer-Encoding: chunked",
        post(
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\n",
        ),
        st(&[200]),
        Up::One("/recordings/1".into(), 0),
        CL_TE,
    ));
    t.push(case(
        g,
        "Transfer-Encoding: chunked then Content-Length",
        post(
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
            "0\r\n\r\n",
        ),
        st(&[200]),
        Up::One("/recordings/1".into(), 0),
        CL_TE,
    ));
    t.push(case(g, "Content-Length: 0 with Transfer-Encoding: chunked and a smuggled GET", post("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", &format!("0\r\n\r\nGET /tickets/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer {KEY}\r\n\r\n")), st(&[200]), Up::One("/recordings/1".into(), 0), "the classic CL.TE desync: the body is read as chunked (empty), the connection is closed after the response, and the smuggled GET is never read (the table's final count proves it never reaches the upstream)"));
    t.push(case(
        g,
        "two different Content-Length headers",
        post("Content-Length: 3\r\nContent-Length: 4\r\n", "abcd"),
        st(&[400]),
        Up::Nothing,
        "hyper refuses conflicting lengths",
    ));
    t.push(case(
        g,
        "two equal Content-Length headers",
        post("Content-Length: 4\r\nContent-Length: 4\r\n", "abcd"),
        st(&[200]),
        Up::One("/recordings/1".into(), 4),
        "equal values are one length (RFC 9110 §8.6); forwarded with a single Content-Length",
    ));
    t.push(case(
        g,
        "comma-listed Content-Length: 4, 4",
        post("Content-Length: 4, 4\r\n", "abcd"),
        st(&[400]),
        Up::Nothing,
        "a list is refused outright by hyper, even with equal members",
    ));
    t.push(case(
        g,
        "comma-listed Content-Length: 3, 4",
        post("Content-Length: 3, 4\r\n", "abcd"),
        st(&[400]),
        Up::Nothing,
        "conflicting list: refused by hyper",
    ));
    for (v, why) in [
        ("+4", "a sign is not a digit"),
        ("-1", "negative length"),
        ("0x4", "hex is not a length"),
        ("4 4", "space inside the number"),
        ("4a", "trailing garbage"),
        ("99999999999999999999999", "overflows u64"),
        ("", "empty value"),
    ] {
        t.push(case(
            g,
            format!("Content-Length: `{v}`"),
            post(&format!("Content-Length: {v}\r\n"), "abcd"),
            st(&[400]),
            Up::Nothing,
            why,
        ));
    }
    for (v, client, up, why) in [
        ("chunked, identity", st(&[400]), Up::Nothing, "chunked is not the final coding (RFC 9112 §6.3)"),
        ("identity", st(&[400]), Up::Nothing, "identity is not a transfer coding any more"),
        ("gzip, chunked", st(&[400]), Up::Nothing, "keygate removes Transfer-Encoding, so a gzip coding would reach the upstream as a plain body: refused"),
        ("chunked, chunked", st(&[400]), Up::Nothing, "chunked twice"),
        ("xchunked", st(&[400]), Up::Nothing, "unknown coding"),
        ("CHUNKED", st(&[200]), Up::One("/recordings/1".into(), 4), "codings are case-insensitive; one chunked body, re-framed"),
    ] {
        t.push(case(g, format!("Transfer-Encoding: `{v}`"), post(&format!("Transfer-Encoding: {v}\r\n"), "4\r\nabcd\r\n0\r\n\r\n"), client, up, why));
    }
    t.push(case(
        g,
        "Transfer-Encoding twice (chunked, chunked)",
        post(
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "4\r\nabcd\r\n0\r\n\r\n",
        ),
        st(&[400]),
        Up::Nothing,
        "two header lines are a list (RFC 9110 §5.3): chunked twice",
    ));
    t.push(case(
        g,
        "`Transfer-Encoding : chunked` (space before colon)",
        post("Transfer-Encoding : chunked\r\n", "4\r\nabcd\r\n0\r\n\r\n"),
        st(&[400]),
        Up::Nothing,
        "RFC 9112 §5.1: whitespace before the colon must be rejected",
    ));
    t.push(case(
        g,
        "`Transfer-Encoding:\\x0bchunked` (vertical tab)",
        post(
            "Transfer-Encoding:\x0bchunked\r\n",
            "4\r\nabcd\r\n0\r\n\r\n",
        ),
        st(&[400]),
        Up::Nothing,
        "not optional whitespace",
    ));
    t.push(case(g, "HTTP/1.0 request with Transfer-Encoding: chunked", h1(format!("POST /recordings/1 HTTP/1.0\r\nHost: kg\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")), st(&[400]), Up::Nothing, "chunked does not exist in HTTP/1.0 (RFC 9112 §6.1)"));
    for (chunk, why) in [
        ("zz\r\nabcd\r\n0\r\n\r\n", "chunk size is not hex"),
        ("-4\r\nabcd\r\n0\r\n\r\n", "negative chunk size"),
        ("0x4\r\nabcd\r\n0\r\n\r\n", "0x prefix"),
        (
            "ffffffffffffffffff\r\nabcd\r\n0\r\n\r\n",
            "chunk size overflows",
        ),
        ("4\r\nabcdef\r\n0\r\n\r\n", "chunk longer than its size"),
        ("4\nabcd\n0\n\n", "bare LF in chunk framing"),
        (" 4\r\nabcd\r\n0\r\n\r\n", "space before the chunk size"),
    ] {
        t.push(case(g, format!("malformed chunk: {why}"), post("Transfer-Encoding: chunked\r\n", chunk), st(&[400]), Up::Aborted, "the head was authorised; the body fails while being forwarded, so the upstream exchange is abandoned (at most the head and a cut-off body reach it) and the client gets 400; no second request"));
    }
    t.push(case(
        g,
        "chunk extension `4;ext=1`",
        post(
            "Transfer-Encoding: chunked\r\n",
            "4;ext=1\r\nabcd\r\n0\r\n\r\n",
        ),
        st(&[200]),
        Up::One("/recordings/1".into(), 4),
        "extensions are parsed and dropped; the upstream gets a fresh chunking",
    ));
    t.push(case(g, "malformed chunk without a key", h1("POST /recordings/1 HTTP/1.1\r\nHost: kg\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n"), st(&[401]), Up::Nothing, "refused on the head; the body is never read"));
    t.push(case(
        g,
        "obs-fold continuation line",
        Wire::H1(get("/recordings/1", "X-A: a\r\n b\r\n")),
        st(&[400]),
        Up::Nothing,
        "RFC 9112 §5.2: a server may reject obs-fold; hyper does",
    ));
    t.push(case(
        g,
        "obs-fold on Authorization",
        h1(format!(
            "GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer\r\n {KEY}\r\n\r\n"
        )),
        st(&[400]),
        Up::Nothing,
        "a folded credential is refused, never unfolded",
    ));
    t.push(case(g, "bare LF line endings", h1(format!("GET /recordings/1 HTTP/1.1\nHost: kg\nAuthorization: Bearer {KEY}\n\n")), st(&[200]), one("/recordings/1"), "RFC 9112 §2.2 allows a recipient to accept bare LF; keygate re-serialises with CRLF, so the upstream sees exactly the headers keygate checked"));
    t.push(case(
        g,
        "bare CR inside a header value",
        Wire::H1(get(
            "/recordings/1",
            "X-A: a\rTransfer-Encoding: chunked\r\n",
        )),
        st(&[400]),
        Up::Nothing,
        "a lone CR is not a line end and not a valid value byte",
    ));
    t.push(case(
        g,
        "NUL inside a header value",
        Wire::H1(get("/recordings/1", "X-A: a\0b\r\n")),
        st(&[400]),
        Up::Nothing,
        "invalid field value",
    ));
    t.push(case(
        g,
        "space inside a header name",
        Wire::H1(get("/recordings/1", "X A: b\r\n")),
        st(&[400]),
        Up::Nothing,
        "invalid field name",
    ));
    t.push(case(
        g,
        "header line without a colon",
        Wire::H1(get("/recordings/1", "XA\r\n")),
        st(&[400]),
        Up::Nothing,
        "invalid field line",
    ));
    t.push(case(
        g,
        "HTTP/1.2 version",
        h1(format!(
            "GET /recordings/1 HTTP/1.2\r\nHost: kg\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        )),
        st(&[400]),
        Up::Nothing,
        "unknown minor version refused by hyper",
    ));
    t.push(case(
        g,
        "two spaces in the request line",
        h1(format!(
            "GET  /recordings/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        )),
        st(&[400]),
        Up::Nothing,
        "request line must be single-space separated",
    ));
    t.push(case(g, "pipelined: a GET with a Content-Length body that looks like a second request", h1(head("GET", "/recordings/1", "Content-Length: 45\r\n") + "GET /tickets/1 HTTP/1.1\r\nHost: kg\r\nX-A: b\r\n\r\n"), st(&[200]), Up::One("/recordings/1".into(), 45), "the bytes are a body (declared length) and reach the upstream as a body, framed by length: no second request"));
    t.push(case(
        g,
        "pipelined: two requests in one write, the second without a key",
        h1(head("GET", "/recordings/1", "") + "GET /tickets/1 HTTP/1.1\r\nHost: kg\r\n\r\n"),
        st(&[200, 401]),
        one("/recordings/1"),
        "each request is checked on its own",
    ));
    t.push(case(g, "pipelined: GET with a body, then a second keyed request on the same connection", h1(head("GET", "/recordings/1", "Content-Length: 5\r\n") + "hello" + &head("GET", "/recordings/2", "")), st(&[200, 200]), Up::Many(vec!["/recordings/1".into(), "/recordings/2".into()]), "a GET body cannot poison the pooled upstream connection: both requests arrive intact, in order"));
    t.push(case(
        g,
        "pipelined: HEAD with a body, then a second request",
        h1(head("HEAD", "/recordings/1", "Content-Length: 5\r\n")
            + "hello"
            + &head("GET", "/recordings/3", "")),
        st(&[200, 200]),
        Up::Many(vec!["/recordings/1".into(), "/recordings/3".into()]),
        "a HEAD body is framed by length and cannot desync the upstream connection",
    ));
    let _ = REFRAME;
}

fn paths(t: &mut Vec<Case>) {
    let g = "paths";
    let bad = [
        (
            "//recordings/1",
            "empty first segment: some upstreams collapse `//`, some do not",
        ),
        ("/recordings//1", "empty segment"),
        ("/recordings/./1", "dot segment"),
        ("/./recordings/1", "leading dot segment"),
        (
            "/recordings/../tickets/1",
            "dot-dot: the checked route is not the one the upstream would serve",
        ),
        ("/../recordings/1", "dot-dot above the root"),
        ("/tickets/../recordings/1", "dot-dot into another route"),
        ("/recordings/1/..", "trailing dot-dot"),
        ("/recordings/1/.", "trailing dot"),
        (
            "/recordings/..;/tickets",
            "Tomcat path parameter on dot-dot",
        ),
        ("/recordings/%2e%2e/tickets", "encoded dot-dot"),
        ("/recordings/%2E%2E/tickets", "encoded dot-dot, upper case"),
        ("/recordings/.%2e/tickets", "half-encoded dot-dot"),
        ("/recordings/%2e/1", "encoded dot"),
        ("/recordings%2f1", "encoded slash"),
        ("/recordings%2F1", "encoded slash, upper case"),
        ("/recordings/..%2ftickets", "dot-dot with encoded slash"),
        ("/recordings%5c1", "encoded backslash"),
        (
            "/recordings/%5c..%5ctickets",
            "encoded backslashes around dot-dot",
        ),
        (
            "/recordings\\1",
            "backslash: Windows upstreams treat it as a separator",
        ),
        ("/recordings/\\..\\tickets", "backslash dot-dot"),
        ("/recordings/%C0%AE%C0%AE/tickets", "overlong UTF-8 dot-dot"),
        ("/recordings/%C0%AF", "overlong UTF-8 slash"),
        ("/recordings/%E0%80%AE", "three-byte overlong dot"),
        ("/recordings/%80", "stray continuation byte"),
        ("/recordings/%ff", "invalid UTF-8 byte"),
        (
            "/recordings/%41",
            "encoded unreserved letter: the upstream may decode it, keygate will not guess",
        ),
        ("/recordings/%7e", "encoded tilde (unreserved)"),
        ("/recordings/1%00", "encoded NUL"),
        ("/recordings/1%0a", "encoded LF"),
        ("/recordings/1%0d%0a", "encoded CRLF"),
        ("/recordings/%zz", "bad percent-encoding"),
        ("/recordings/%4", "truncated percent-encoding"),
        ("/recordings/%u002e", "IIS %u encoding"),
        ("*", "asterisk-form"),
    ];
    for (p, why) in bad {
        t.push(case(
            g,
            format!("`GET {p}`"),
            Wire::H1(get(p, "")),
            st(&[400]),
            Up::Nothing,
            why,
        ));
    }
    t.push(case(
        g,
        "raw NUL byte in the path",
        Wire::H1(get("/recordings/1\0", "")),
        st(&[400]),
        Up::Nothing,
        "not a valid request target",
    ));
    t.push(case(
        g,
        "raw UTF-8 bytes in the path",
        Wire::H1(get("/recordings/caf\u{e9}", "")),
        st(&[400]),
        Up::Nothing,
        "request targets are ASCII; keygate will not pick an encoding",
    ));
    t.push(case(
        g,
        "tab in the path",
        Wire::H1(get("/recordings/1\t", "")),
        st(&[400]),
        Up::Nothing,
        "control character",
    ));
    t.push(case(
        g,
        "path without a leading slash",
        Wire::H1(get("recordings/1", "")),
        st(&[400]),
        Up::Nothing,
        "origin-form must start with /",
    ));
    t.push(case(
        g,
        "`/Recordings/1` (routes are case-sensitive)",
        Wire::H1(get("/Recordings/1", "")),
        st(&[404]),
        Up::Nothing,
        "no route: a case-insensitive upstream never sees it",
    ));
    t.push(case(
        g,
        "`/RECORDINGS/1`",
        Wire::H1(get("/RECORDINGS/1", "")),
        st(&[404]),
        Up::Nothing,
        "no route",
    ));
    t.push(case(
        g,
        "`/recordings;/1` (parameter on the route segment)",
        Wire::H1(get("/recordings;/1", "")),
        st(&[404]),
        Up::Nothing,
        "not the /recordings segment, so no route; a Tomcat upstream would have read /recordings/1",
    ));
    t.push(case(
        g,
        "`/recordingsX/1`",
        Wire::H1(get("/recordingsX/1", "")),
        st(&[404]),
        Up::Nothing,
        "prefixes match whole segments",
    ));
    for (p, why) in [
        (
            "/recordings/1;jsessionid=x",
            "a path parameter is forwarded byte for byte",
        ),
        ("/recordings/...", "three dots are an ordinary segment"),
        (
            "/recordings/.hidden",
            "a dot-file name is an ordinary segment",
        ),
        ("/recordings/a%20b", "encoded space is not ambiguous"),
        ("/recordings/%E2%82%AC", "valid encoded UTF-8"),
        (
            "/recordings/1?x=../../tickets",
            "the query is not the path; forwarded unchanged",
        ),
        (
            "/recordings/1?%2f%2e%2e",
            "encodings in the query are the upstream's business",
        ),
    ] {
        t.push(case(
            g,
            format!("`GET {p}`"),
            Wire::H1(get(p, "")),
            st(&[200]),
            one(p),
            why,
        ));
    }
    t.push(case(g, "fragment `/recordings/1#x`", Wire::H1(get("/recordings/1#x", "")), st(&[200]), one("/recordings/1"), "the fragment is dropped while parsing the target, before the path is checked; the upstream gets exactly the checked path"));
    t.push(case(
        g,
        "absolute-form `http://kg/recordings/1`",
        Wire::H1(get("http://kg/recordings/1", "")),
        st(&[200]),
        one("/recordings/1"),
        "the authority matches Host; the upstream gets origin-form with the same path",
    ));
    t.push(case(
        g,
        "absolute-form naming another host",
        Wire::H1(get("http://evil.example/recordings/1", "")),
        st(&[400]),
        Up::Nothing,
        "Host and target disagree: ambiguous",
    ));
    t.push(case(
        g,
        "absolute-form with dot-dot",
        Wire::H1(get("http://kg/recordings/../tickets", "")),
        st(&[400]),
        Up::Nothing,
        "same path rules as origin-form",
    ));
    t.push(case(
        g,
        "authority-form `GET kg:80`",
        Wire::H1(get("kg:80", "")),
        st(&[400]),
        Up::Nothing,
        "authority-form is only for CONNECT",
    ));
    t.push(case(
        g,
        "`CONNECT kg:443`",
        h1(format!(
            "CONNECT kg:443 HTTP/1.1\r\nHost: kg:443\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        )),
        st(&[400]),
        Up::Nothing,
        "no tunnels",
    ));
    t.push(case(
        g,
        "very long path (20 KiB)",
        Wire::H1(get(&format!("/recordings/{}", "a".repeat(20 * 1024)), "")),
        st(&[431]),
        Up::Nothing,
        "the head exceeds proxy.max_header_bytes",
    ));
}

fn spoofing(t: &mut Vec<Case>) {
    let g = "identity headers";
    let names = [
        "X-Keygate-Account",
        "X-Keygate-Key-Prefix",
        "X-Keygate-Scopes",
        "X-Keygate-Admin",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "X-Real-IP",
        "Forwarded",
    ];
    for name in names {
        let spellings = [
            name.to_string(),
            name.to_ascii_uppercase(),
            name.replace('-', "_"),
            name.replace('-', "."),
            name.to_ascii_lowercase().replacen('-', "_", 1),
        ];
        let mut seen = Vec::new();
        for s in spellings {
            if seen.contains(&s) {
                continue;
            }
            seen.push(s.clone());
            t.push(case(g, format!("`{s}: spoofed`"), Wire::H1(get("/recordings/1", &format!("{s}: spoofed\r\n"))), st(&[200]), one("/recordings/1"), "every spelling a CGI-style upstream merges is removed; keygate's own values are set"));
        }
    }
}

fn headers(t: &mut Vec<Case>) {
    let g = "headers";
    for (c, why) in [
        (
            "X-Keygate-Account",
            "nominating an identity header must not make a later hop delete it",
        ),
        ("x-keygate-scopes, close", "a list, with close"),
        (
            "X-Forwarded-For",
            "forwarding headers are set after stripping",
        ),
        (
            "Authorization",
            "the key header named as hop-by-hop: the key is still checked and still removed",
        ),
        ("X-Request-Id", "the request id is set after stripping"),
        ("Host", "Host is set to the upstream after stripping"),
    ] {
        t.push(case(
            g,
            format!("`Connection: {c}`"),
            Wire::H1(get("/recordings/1", &format!("Connection: {c}\r\n"))),
            st(&[200]),
            one("/recordings/1"),
            why,
        ));
    }
    t.push(case(
        g,
        "`Connection: keep-alive`, then `Connection: X-Secret, close` on a second line",
        Wire::H1(get(
            "/recordings/1",
            "Connection: keep-alive\r\nConnection: X-Secret, close\r\nX-Secret: leak\r\n",
        )),
        st(&[200]),
        one("/recordings/1"),
        "several lines are one list (RFC 9110 §5.3): a header named on any of them is removed",
    ));
    t.push(case(
        g,
        "`Connection: X-Secret, close, \\xe9` (a non-ASCII token)",
        Wire::H1({
            let mut raw = get("/recordings/1", "");
            raw.truncate(raw.len() - 2);
            raw.extend_from_slice(b"Connection: X-Secret, close, \xe9\r\nX-Secret: leak\r\n\r\n");
            raw
        }),
        st(&[200]),
        one("/recordings/1"),
        "the list is split as bytes: a token that is not a field name is skipped, the others still honoured",
    ));
    t.push(case(g, "two Authorization headers", h1(format!("GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer {KEY}\r\nAuthorization: Bearer {KEY}\r\n\r\n")), st(&[400]), Up::Nothing, "ambiguous credentials"));
    t.push(case(
        g,
        "Authorization and X-Api-Key",
        Wire::H1(get("/recordings/1", &format!("X-Api-Key: {KEY}\r\n"))),
        st(&[400]),
        Up::Nothing,
        "a key in both headers",
    ));
    t.push(case(g, "two X-Api-Key headers", h1(format!("GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nX-Api-Key: {KEY}\r\nX-Api-Key: {KEY}\r\n\r\n")), st(&[400]), Up::Nothing, "ambiguous credentials"));
    t.push(case(
        g,
        "`X_Api_Key` alongside Authorization",
        Wire::H1(get("/recordings/1", &format!("X_Api_Key: {KEY}\r\n"))),
        st(&[200]),
        one("/recordings/1"),
        "not a key header for keygate; removed so a CGI upstream cannot read a second key",
    ));
    t.push(case(
        g,
        "`Authorization: Bearer k, k`",
        h1(format!(
            "GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer {KEY}, {KEY}\r\n\r\n"
        )),
        st(&[401]),
        Up::Nothing,
        "not one key",
    ));
    t.push(case(
        g,
        "`authorization: bearer` (lower case)",
        h1(format!(
            "GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nauthorization: bearer {KEY}\r\n\r\n"
        )),
        st(&[200]),
        one("/recordings/1"),
        "the scheme is case-insensitive (RFC 9110 §11.1)",
    ));
    t.push(case(
        g,
        "`Authorization: Bearer\\tkey` (tab)",
        h1(format!(
            "GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer\t{KEY}\r\n\r\n"
        )),
        st(&[401]),
        Up::Nothing,
        "not the Bearer syntax: no key",
    ));
    t.push(case(
        g,
        "X-Api-Key with a non-UTF-8 byte",
        Wire::H1(
            format!("GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nX-Api-Key: {KEY}")
                .into_bytes()
                .into_iter()
                .chain(*b"\xff\r\n\r\n")
                .collect(),
        ),
        st(&[401]),
        Up::Nothing,
        "not visible ASCII: malformed",
    ));
    t.push(case(
        g,
        "Authorization with a non-ASCII byte",
        Wire::H1(
            b"GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer kgs\xc3\xa9\r\n\r\n"
                .to_vec(),
        ),
        st(&[401]),
        Up::Nothing,
        "malformed",
    ));
    t.push(case(
        g,
        "X-Api-Key with trailing junk",
        h1(format!(
            "GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nX-Api-Key: {KEY}x\r\n\r\n"
        )),
        st(&[401]),
        Up::Nothing,
        "length and checksum fail",
    ));
    t.push(case(
        g,
        "one 20 KiB header",
        Wire::H1(get(
            "/recordings/1",
            &format!("X-Big: {}\r\n", "a".repeat(20 * 1024)),
        )),
        st(&[431]),
        Up::Nothing,
        "proxy.max_header_bytes",
    ));
    t.push(case(
        g,
        "101 headers",
        Wire::H1(get(
            "/recordings/1",
            &(0..101)
                .map(|i| format!("X-H{i}: v\r\n"))
                .collect::<String>(),
        )),
        st(&[431]),
        Up::Nothing,
        "proxy.max_headers",
    ));
    t.push(case(
        g,
        "90 headers",
        Wire::H1(get(
            "/recordings/1",
            &(0..90)
                .map(|i| format!("X-H{i}: v\r\n"))
                .collect::<String>(),
        )),
        st(&[200]),
        one("/recordings/1"),
        "under the cap: forwarded",
    ));
    t.push(case(g, "two Host headers", h1(format!("GET /recordings/1 HTTP/1.1\r\nHost: kg\r\nHost: evil\r\nAuthorization: Bearer {KEY}\r\n\r\n")), st(&[400]), Up::Nothing, "RFC 9112 §3.2"));
    t.push(case(
        g,
        "no Host header",
        h1(format!(
            "GET /recordings/1 HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        )),
        st(&[400]),
        Up::Nothing,
        "RFC 9112 §3.2: an HTTP/1.1 request without Host gets 400",
    ));
    t.push(case(
        g,
        "HTTP/1.0 request without Host",
        h1(format!(
            "GET /recordings/1 HTTP/1.0\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        )),
        st(&[200]),
        one("/recordings/1"),
        "HTTP/1.0 may omit Host; keygate sets Host to the upstream's authority",
    ));
    for (host, why) in [
        ("a.com, b.com", "a list is not a host"),
        (
            "evil.com/x?y@z",
            "not a uri-host[:port]: it would reach the upstream as X-Forwarded-Host",
        ),
        ("user@kg", "userinfo is not part of Host"),
        ("kg:http", "the port is not a number"),
        ("", "an empty Host names no host"),
    ] {
        t.push(case(
            g,
            format!("`Host: {host}`"),
            h1(format!(
                "GET /recordings/1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n\r\n"
            )),
            st(&[400]),
            Up::Nothing,
            why,
        ));
    }
    t.push(case(
        g,
        "`Host: [::1]:8080`",
        h1(format!(
            "GET /recordings/1 HTTP/1.1\r\nHost: [::1]:8080\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        )),
        st(&[200]),
        one("/recordings/1"),
        "an IP literal with a port is a valid Host",
    ));
    t.push(case(
        g,
        "`Upgrade: websocket`",
        Wire::H1(get(
            "/recordings/1",
            "Connection: Upgrade\r\nUpgrade: websocket\r\n",
        )),
        st(&[400]),
        Up::Nothing,
        "keygate tunnels nothing: an Upgrade is refused, never half-honoured",
    ));
    t.push(case(g, "`Upgrade: h2c`", Wire::H1(get("/recordings/1", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n")), st(&[400]), Up::Nothing, "same"));
    t.push(case(
        g,
        "`TE: trailers` and `Proxy-Connection: keep-alive`",
        Wire::H1(get(
            "/recordings/1",
            "TE: trailers\r\nProxy-Connection: keep-alive\r\nKeep-Alive: 5\r\n",
        )),
        st(&[200]),
        one("/recordings/1"),
        "hop-by-hop: removed",
    ));
    t.push(case(
        g,
        "client X-Request-Id with a newline-free but odd value",
        Wire::H1(get("/recordings/1", "X-Request-Id: a b\r\n")),
        st(&[200]),
        one("/recordings/1"),
        "not a token: replaced by a fresh id",
    ));
    t.push(case(
        g,
        "lower-case method `get`",
        h1(format!(
            "get /recordings/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        )),
        st(&[404]),
        Up::Nothing,
        "methods are case-sensitive; `get` is not GET, and the route allows GET and HEAD only",
    ));
}

fn bodies(t: &mut Vec<Case>) {
    let g = "bodies";
    t.push(case(
        g,
        "POST with a body and no key",
        h1("POST /recordings/1 HTTP/1.1\r\nHost: kg\r\nContent-Length: 5\r\n\r\nhello"),
        st(&[401]),
        Up::Nothing,
        "the body is never read or forwarded",
    ));
    t.push(case(g, "POST with Expect: 100-continue and no key", h1("POST /recordings/1 HTTP/1.1\r\nHost: kg\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"), st(&[401]), Up::Nothing, "no 100 Continue before the key is checked"));
    t.push(case(g, "POST with Expect: 100-continue and a key without the scope", h1("POST /tickets/1 HTTP/1.1\r\nHost: kg\r\nX-Api-Key: {READONLY}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"), st(&[403]), Up::Nothing, "no 100 Continue before the scope is checked"));
    t.push(case(g, "POST with Expect: 100-continue and a valid key", h1(head("POST", "/recordings/1", "Content-Length: 5\r\nExpect: 100-continue\r\n") + "hello"), st(&[100, 200]), Up::One("/recordings/1".into(), 5), "100 Continue only once keygate reads the body to forward it; Expect itself is not forwarded"));
    t.push(case(
        g,
        "POST with a chunked body and a valid key",
        h1(
            head("POST", "/recordings/1", "Transfer-Encoding: chunked\r\n")
                + "2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
        ),
        st(&[200]),
        Up::One("/recordings/1".into(), 5),
        "de-chunked and re-framed",
    ));
    t.push(case(g, "chunked body with trailers naming identity headers", h1(head("POST", "/recordings/1", "Transfer-Encoding: chunked\r\nTrailer: X-Keygate-Account\r\n") + "5\r\nhello\r\n0\r\nX-Keygate-Account: root\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"), st(&[200]), Up::One("/recordings/1".into(), 5), "request trailers are dropped: an upstream that merges them into headers cannot be spoofed after the checks"));
    t.push(case(g, "POST with a body to a route without the scope", h1("POST /recordings/1 HTTP/1.1\r\nHost: kg\r\nX-Api-Key: {READONLY}\r\nContent-Length: 5\r\n\r\nhello"), st(&[403]), Up::Nothing, "refused before the body is read"));
    t.push(case(g, "wrong key with a large declared body", h1("POST /recordings/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer {FORGED}\r\nContent-Length: 1000000\r\n\r\nabc"), st(&[401]), Up::Nothing, "keygate answers without waiting for the body"));
    t.push(case(
        g,
        "GET with a body (Content-Length)",
        Wire::H1(
            get("/recordings/1", "Content-Length: 5\r\n")
                .into_iter()
                .chain(*b"hello")
                .collect(),
        ),
        st(&[200]),
        Up::One("/recordings/1".into(), 5),
        "forwarded with its declared length: the pooled upstream connection stays in sync",
    ));
    t.push(case(
        g,
        "DELETE with a chunked body on an all-methods route",
        h1(
            head("DELETE", "/tickets/9", "Transfer-Encoding: chunked\r\n")
                + "3\r\nabc\r\n0\r\n\r\n",
        ),
        st(&[200]),
        Up::One("/tickets/9".into(), 3),
        "re-framed",
    ));
}

fn http2(t: &mut Vec<Case>) {
    let g = "HTTP/2";
    let base = |path: &str| -> Vec<(String, String)> {
        vec![
            (":method".into(), "GET".into()),
            (":scheme".into(), "http".into()),
            (":authority".into(), "kg".into()),
            (":path".into(), path.into()),
            ("authorization".into(), format!("Bearer {KEY}")),
        ]
    };
    let with = |extra: (&str, &str)| {
        let mut h = base("/recordings/1");
        h.push((extra.0.into(), extra.1.into()));
        h
    };
    for (name, value) in [
        ("connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("keep-alive", "5"),
        ("proxy-connection", "keep-alive"),
        ("te", "gzip"),
    ] {
        t.push(case(
            g,
            format!("connection-specific header `{name}: {value}`"),
            Wire::H2Raw(with((name, value)), None),
            Client::Reset,
            Up::Nothing,
            "RFC 9113 §8.2.2: malformed; the stream is reset",
        ));
    }
    t.push(case(
        g,
        "upper-case header name",
        Wire::H2Raw(with(("X-Upper", "1")), None),
        Client::Reset,
        Up::Nothing,
        "RFC 9113 §8.2.1: malformed",
    ));
    t.push(case(
        g,
        "missing :path",
        Wire::H2Raw(
            base("/recordings/1")
                .into_iter()
                .filter(|(n, _)| n != ":path")
                .collect(),
            None,
        ),
        Client::Reset,
        Up::Nothing,
        "malformed",
    ));
    t.push(case(
        g,
        "`te: trailers`",
        Wire::H2(with(("te", "trailers")), None),
        st(&[200]),
        one("/recordings/1"),
        "the one TE value HTTP/2 allows; not forwarded",
    ));
    t.push(case(g, "content-length 10 with 5 bytes of DATA", Wire::H2Raw({ let mut h = base("/tickets/1"); h[0].1 = "POST".into(); h.push(("content-length".into(), "10".into())); h }, Some(b"hello".to_vec())), Client::Reset, Up::Aborted, "RFC 9113 §8.1.1: the lie shows at end of stream; the forwarded body fails and the upstream exchange is abandoned"));
    t.push(case(
        g,
        "content-length 3 with 5 bytes of DATA",
        Wire::H2Raw(
            {
                let mut h = base("/tickets/1");
                h[0].1 = "POST".into();
                h.push(("content-length".into(), "3".into()));
                h
            },
            Some(b"hello".to_vec()),
        ),
        Client::Reset,
        Up::Aborted,
        "the excess shows on the DATA frame; the forwarded body fails",
    ));
    t.push(case(
        g,
        "content-length that lies, without a key",
        Wire::H2Raw(
            {
                let mut h = base("/tickets/1");
                h[0].1 = "POST".into();
                h.retain(|(n, _)| n != "authorization");
                h.push(("content-length".into(), "10".into()));
                h
            },
            Some(b"hello".to_vec()),
        ),
        Client::Reset,
        Up::Nothing,
        "refused with 401 before the body; the body error resets the stream",
    ));
    t.push(case(
        g,
        ":path with dot-dot",
        Wire::H2(base("/recordings/../tickets/1"), None),
        st(&[400]),
        Up::Nothing,
        "same path rules as HTTP/1.1",
    ));
    t.push(case(
        g,
        ":path with an encoded slash",
        Wire::H2(base("/recordings%2f1"), None),
        st(&[400]),
        Up::Nothing,
        "same path rules",
    ));
    t.push(case(
        g,
        "two authorization fields",
        Wire::H2(
            {
                let mut h = base("/recordings/1");
                h.push(("authorization".into(), format!("Bearer {KEY}")));
                h
            },
            None,
        ),
        st(&[400]),
        Up::Nothing,
        "ambiguous credentials",
    ));
    t.push(case(
        g,
        "spoofed `x_keygate_account`",
        Wire::H2(with(("x_keygate_account", "root")), None),
        st(&[200]),
        one("/recordings/1"),
        "removed as in HTTP/1.1",
    ));
    t.push(case(
        g,
        "`host` that disagrees with `:authority`",
        Wire::H2Raw(with(("host", "evil.example")), None),
        st(&[400]),
        Up::Nothing,
        "RFC 9113 §8.3.1: which one names the resource is ambiguous, as with HTTP/1.1's absolute form",
    ));
    t.push(case(
        g,
        "`host` equal to `:authority`",
        Wire::H2Raw(with(("host", "kg")), None),
        st(&[200]),
        one("/recordings/1"),
        "the two agree",
    ));
    t.push(case(
        g,
        "two `cookie` fields",
        Wire::H2(
            {
                let mut h = with(("cookie", "a=1"));
                h.push(("cookie".into(), "b=2".into()));
                h
            },
            None,
        ),
        st(&[200]),
        one("/recordings/1"),
        "RFC 9113 §8.2.3: joined into one `cookie: a=1; b=2` for the HTTP/1.1 upstream",
    ));
    t.push(case(
        g,
        "a keyed GET",
        Wire::H2(base("/recordings/1"), None),
        st(&[200]),
        one("/recordings/1"),
        "baseline",
    ));
}

/// What one row did.
#[derive(Debug)]
struct Seen {
    client: Client,
}

fn fill(s: &[u8], keys: &Keys) -> Vec<u8> {
    let text = String::from_utf8_lossy(s);
    if !text.contains('{') {
        return s.to_vec();
    }
    // Byte-safe replacement: the placeholders are ASCII.
    let mut out = s.to_vec();
    for (ph, v) in [
        ("{KEY}", keys.full.as_str()),
        ("{READONLY}", keys.readonly.as_str()),
        ("{FORGED}", keys.forged.as_str()),
    ] {
        while let Some(i) = out.windows(ph.len()).position(|w| w == ph.as_bytes()) {
            out.splice(i..i + ph.len(), v.bytes());
        }
    }
    out
}

struct Keys {
    full: String,
    readonly: String,
    forged: String,
}

fn fill_str(s: &str, keys: &Keys) -> String {
    String::from_utf8(fill(s.as_bytes(), keys)).expect("ascii")
}

async fn run_h1(addr: SocketAddr, raw: &[u8], want: usize, head_request: bool) -> Seen {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw).await.expect("write");
    let mut buf = Vec::new();
    let mut statuses = Vec::new();
    let mut closed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        // Parse every complete response in the buffer.
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head_text = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head_text
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let len: usize = head_text
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let body = if status == 100 || (head_request && statuses.is_empty() && status == 200) {
                0
            } else {
                len
            };
            if buf.len() < end + 4 + body {
                break;
            }
            buf.drain(..end + 4 + body);
            statuses.push(status);
        }
        if statuses.iter().filter(|s| **s != 100).count() >= want || closed {
            break;
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed = true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    Seen {
        client: if statuses.is_empty() {
            Client::Closed
        } else {
            Client::Statuses(statuses)
        },
    }
}

fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, first: u8, mut n: usize) {
    let max = (1usize << prefix_bits) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128 + 128) as u8);
        n /= 128;
    }
    out.push(n as u8);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Raw HTTP/2: every field as a literal without indexing, so nothing the h2 client library
/// would refuse to send is filtered out.
async fn run_h2_raw(addr: SocketAddr, fields: &[(String, String)], data: Option<&[u8]>) -> Seen {
    let mut block = Vec::new();
    for (n, v) in fields {
        block.push(0);
        hpack_int(&mut block, 7, 0, n.len());
        block.extend_from_slice(n.as_bytes());
        hpack_int(&mut block, 7, 0, v.len());
        block.extend_from_slice(v.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out.extend(frame(
        1,
        0x4 | if data.is_none() { 0x1 } else { 0 },
        1,
        &block,
    ));
    if let Some(d) = data {
        out.extend(frame(0, 0x1, 1, d));
    }
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(&out).await.expect("write");
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let payload: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                // SETTINGS: acknowledge.
                4 if flags & 1 == 0 => {
                    let _ = stream.write_all(&frame(4, 1, 0, &[])).await;
                }
                1 => {
                    let status = match payload.first() {
                        Some(b) if b & 0x80 != 0 => match b & 0x7f {
                            8 => 200,
                            9 => 204,
                            12 => 400,
                            13 => 404,
                            14 => 500,
                            _ => 0,
                        },
                        _ => 0,
                    };
                    return Seen {
                        client: Client::Statuses(vec![status]),
                    };
                }
                3 | 7 => {
                    return Seen {
                        client: Client::Reset,
                    }
                }
                _ => {}
            }
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => {
                return Seen {
                    client: Client::Closed,
                }
            }
        }
    }
}

async fn run_h2(addr: SocketAddr, fields: &[(String, String)], data: Option<&[u8]>) -> Seen {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let mut req = http::Request::builder();
    for (n, v) in fields {
        match n.as_str() {
            ":method" => req = req.method(v.as_str()),
            ":path" => req = req.uri(format!("http://kg{v}")),
            ":scheme" | ":authority" => {}
            _ => req = req.header(n.as_str(), v.as_str()),
        }
    }
    let req = req.body(()).expect("request");
    let outcome = async {
        let (response, mut body) = client.send_request(req, data.is_none())?;
        if let Some(d) = data {
            body.send_data(Bytes::copy_from_slice(d), true)?;
        }
        let response = response.await?;
        Ok::<_, h2::Error>(response.status().as_u16())
    }
    .await;
    driver.abort();
    Seen {
        client: match outcome {
            Ok(s) => Client::Statuses(vec![s]),
            Err(_) => Client::Reset,
        },
    }
}

/// Checks a forwarded request is well formed: ours and only ours identity headers, no key, no
/// hop-by-hop header, no `X-Secret` (rows send it nominated by `Connection`), at most one
/// `Cookie` field (rows send several only over HTTP/2, and then they are one list; a row's
/// cookies are `a=1` and `b=2`).
fn assert_well_formed(r: &Recorded, target: &str, body_len: u64) -> Result<(), String> {
    let mut problems = Vec::new();
    if r.uri != target {
        problems.push(format!("target {} != {target}", r.uri));
    }
    if r.body_len != body_len || r.body_error {
        problems.push(format!(
            "body {} bytes (error: {}) != {body_len}",
            r.body_len, r.body_error
        ));
    }
    if r.trailers.is_some() {
        problems.push("trailers reached the upstream".into());
    }
    let one = |name: &str, want: &str| -> Option<String> {
        let values: Vec<_> = r.headers.get_all(name).iter().collect();
        (values.len() != 1 || values[0] != want).then(|| format!("{name}: {values:?} != {want}"))
    };
    problems.extend(one("x-keygate-account", "hostile"));
    problems.extend(one(
        "x-keygate-scopes",
        "recordings:read recordings:write tickets:write",
    ));
    problems.extend(one("x-forwarded-for", "127.0.0.1"));
    problems.extend(one("x-forwarded-proto", "http"));
    for name in r.headers.keys() {
        let n = name.as_str().replace(['_', '.'], "-").to_ascii_lowercase();
        let ours = [
            "x-keygate-account",
            "x-keygate-key-prefix",
            "x-keygate-scopes",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-request-id",
        ];
        let reserved = n.starts_with("x-keygate-")
            || n.starts_with("x-forwarded-")
            || n == "forwarded"
            || n == "x-real-ip"
            || n == "x-api-key";
        if reserved && !ours.contains(&name.as_str()) {
            problems.push(format!("spoofable header {name} reached the upstream"));
        }
        if [
            "upgrade",
            "te",
            "trailer",
            "keep-alive",
            "proxy-connection",
            "expect",
            "authorization",
        ]
        .contains(&name.as_str())
        {
            problems.push(format!("{name} reached the upstream"));
        }
    }
    if r.headers.get_all("content-length").iter().count() > 1 {
        problems.push("several content-length".into());
    }
    if r.headers.contains_key("x-secret") {
        problems.push("x-secret, nominated by Connection, reached the upstream".into());
    }
    let cookies: Vec<_> = r.headers.get_all("cookie").iter().collect();
    if !(cookies.is_empty() || cookies == ["a=1; b=2"]) {
        problems.push(format!("cookie fields {cookies:?} != [\"a=1; b=2\"]"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_request_gets_the_tabled_answer_and_reaches_the_upstream_as_tabled() {
    let app = spawn_app_with(
        Engine::Sqlite,
        AppOptions {
            extra_toml:
                "[verification]\nprefix_failure_budget = 1000\nclient_failure_budget = 1000\n"
                    .into(),
            ..AppOptions::default()
        },
    )
    .await;
    let account = app.create_account("hostile").await;
    let full = app
        .create_key(
            &account,
            "full",
            &["recordings:read", "recordings:write", "tickets:write"],
        )
        .await;
    let readonly = app.create_key(&account, "ro", &["recordings:read"]).await;
    let keys = Keys {
        full: full.key.expose().to_string(),
        readonly: readonly.key.expose().to_string(),
        forged: crate::proxy::forge(&full.key.expose()[..8], &"x".repeat(32)),
    };
    let table = cases();
    assert!(table.len() >= 150, "the table has {} rows", table.len());
    let mut failures = Vec::new();
    for (i, c) in table.iter().enumerate() {
        let before = app.upstream.count();
        let seen = match &c.wire {
            Wire::H1(raw) => {
                let want = match &c.client {
                    Client::Statuses(s) => s.iter().filter(|s| **s != 100).count(),
                    _ => 1,
                };
                run_h1(
                    app.proxy_addr,
                    &fill(raw, &keys),
                    want,
                    raw.starts_with(b"HEAD"),
                )
                .await
            }
            Wire::H2Raw(fields, data) => {
                let fields: Vec<_> = fields
                    .iter()
                    .map(|(n, v)| (n.clone(), fill_str(v, &keys)))
                    .collect();
                run_h2_raw(app.proxy_addr, &fields, data.as_deref()).await
            }
            Wire::H2(fields, data) => {
                let fields: Vec<_> = fields
                    .iter()
                    .map(|(n, v)| (n.clone(), fill_str(v, &keys)))
                    .collect();
                run_h2(app.proxy_addr, &fields, data.as_deref()).await
            }
        };
        // Let an aborted upstream exchange land in the log.
        let expected_up = match &c.up {
            Up::Nothing => 0,
            Up::One(..) => 1,
            Up::Aborted => 0,
            Up::Many(v) => v.len(),
        };
        let settle = tokio::time::Instant::now() + Duration::from_millis(500);
        while app.upstream.count() - before < expected_up && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got: Vec<Recorded> = app.upstream.requests()[before..].to_vec();
        let mut problems = Vec::new();
        if seen.client != c.client {
            problems.push(format!(
                "client got {:?}, table says {:?}",
                seen.client, c.client
            ));
        }
        match &c.up {
            Up::Nothing if !got.is_empty() => problems.push(format!(
                "{} request(s) reached the upstream: {:?}",
                got.len(),
                got.iter().map(|r| &r.uri).collect::<Vec<_>>()
            )),
            Up::Nothing => {}
            Up::One(target, len) => {
                if got.len() != 1 {
                    problems.push(format!("{} requests reached the upstream", got.len()));
                } else if let Err(e) = assert_well_formed(&got[0], target, *len) {
                    problems.push(e);
                }
            }
            Up::Aborted => {
                if got.len() > 1 || got.iter().any(|r| !r.body_error) {
                    problems.push(format!(
                        "wanted at most one aborted request, got {:?}",
                        got.iter()
                            .map(|r| (&r.uri, r.body_error))
                            .collect::<Vec<_>>()
                    ));
                }
            }
            Up::Many(targets) => {
                let uris: Vec<_> = got.iter().map(|r| r.uri.clone()).collect();
                if &uris != targets {
                    problems.push(format!("upstream saw {uris:?}"));
                }
                for r in &got {
                    if let Err(e) = assert_well_formed(r, &r.uri, r.body_len) {
                        problems.push(e);
                    }
                }
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "row {i} [{}] {}: {}",
                c.group,
                c.what,
                problems.join("; ")
            ));
        }
    }
    // Nothing arrives late (a smuggled request would).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let expected_total: usize = table
        .iter()
        .map(|c| match &c.up {
            Up::Nothing => 0,
            Up::One(..) => 1,
            Up::Aborted => 0,
            Up::Many(v) => v.len(),
        })
        .sum();
    let aborted = app
        .upstream
        .requests()
        .iter()
        .filter(|r| r.body_error)
        .count();
    if app.upstream.count() - aborted != expected_total {
        failures.push(format!(
            "the upstream saw {} requests in all, the table accounts for {expected_total}",
            app.upstream.count()
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
}

// Hostile upstreams: an upstream that answers with bytes a client must not be handed as they
// are. Each answers every request with fixed bytes and closes the connection.

/// An upstream that reads a request head and answers it with `response`, byte for byte.
async fn raw_upstream(response: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// keygate with a route `/raw` to an upstream answering `response`, and a key for it.
async fn behind_raw_upstream(response: &'static [u8]) -> (TestApp, String) {
    let upstream = raw_upstream(response).await;
    let app = spawn_app_with(
        Engine::Sqlite,
        AppOptions {
            extra_toml: format!(
                "[[routes]]\nname = \"raw\"\npath_prefix = \"/raw\"\nupstream = \"http://{upstream}\"\nscope = \"recordings:read\"\n"
            ),
            ..AppOptions::default()
        },
    )
    .await;
    let account = app.create_account("raw").await;
    let key = app.create_key(&account, "k", &["recordings:read"]).await;
    (app, key.key.expose().to_string())
}

/// The same GET over HTTP/1.1 and over HTTP/2.
async fn get_both_ways(app: &TestApp, key: &str) -> [TestResponse; 2] {
    let req = || {
        Request::get(app.url("/raw/1"))
            .header("authorization", format!("Bearer {key}"))
            .body(empty())
            .expect("request")
    };
    [
        send_with(&client(), req()).await,
        send_with(&h2_client(), req()).await,
    ]
}

/// The client's whole HTTP/1.1 exchange, as text.
async fn raw_exchange(app: &TestApp, key: &str) -> String {
    let mut stream = TcpStream::connect(app.proxy_addr).await.expect("connect");
    let head = format!(
        "GET /raw/1 HTTP/1.1\r\nHost: kg\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let got = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("keygate closes the connection after the response");
    String::from_utf8_lossy(&got).into_owned()
}

/// `keygate_upstream_errors_total{kind="request"}` for the `raw` route.
async fn unrelayable_count(app: &TestApp) -> Option<String> {
    let text = app.admin_get("/metrics").await.text();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(r#"keygate_upstream_errors_total{kind="request",route="raw"} "#)
        })
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_named_on_any_connection_line_never_reach_the_client() {
    let (app, key) = behind_raw_upstream(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: X-Hidden-A\r\nX-Hidden-A: 1\r\n\
          Connection: X-Hidden-B, \xe9\r\nX-Hidden-B: 1\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    for (r, over) in get_both_ways(&app, &key).await.iter().zip(["h1", "h2"]) {
        assert_eq!(r.status, 200, "{over}");
        assert_eq!(r.body, "ok", "{over}");
        for hidden in ["x-hidden-a", "x-hidden-b", "connection"] {
            assert!(!r.headers.contains_key(hidden), "{over}: {hidden} passed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_response_with_content_length_and_chunking_reaches_the_client_whole() {
    let (app, key) = behind_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    for (r, over) in get_both_ways(&app, &key).await.iter().zip(["h1", "h2"]) {
        assert_eq!(r.status, 200, "{over}");
        assert_eq!(r.body, "hello world", "{over}");
        assert!(!r.headers.contains_key("content-length"), "{over}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_response_with_a_transfer_coding_other_than_chunked_gets_the_client_a_502() {
    let (app, key) = behind_raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
          5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n",
    )
    .await;
    for (r, over) in get_both_ways(&app, &key).await.iter().zip(["h1", "h2"]) {
        assert_eq!(r.status, 502, "{over}: {:?}", r.body);
    }
    assert_eq!(unrelayable_count(&app).await.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_http_1_0_is_relayed_as_http_1_1() {
    let (app, key) = behind_raw_upstream(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let exchange = raw_exchange(&app, &key).await;
    assert!(exchange.starts_with("HTTP/1.1 200 OK\r\n"), "{exchange}");
    assert!(exchange.ends_with("\r\n\r\nok"), "{exchange}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_status_past_599_gets_the_client_a_502() {
    let (app, key) =
        behind_raw_upstream(b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok").await;
    for (r, over) in get_both_ways(&app, &key).await.iter().zip(["h1", "h2"]) {
        assert_eq!(r.status, 502, "{over}");
    }
    assert_eq!(unrelayable_count(&app).await.as_deref(), Some("2"));
}

/// The table as Markdown, for docs/security.md.
pub fn render() -> String {
    let mut out = String::new();
    let table = cases();
    let _ = writeln!(
        out,
        "{} rows, generated from `tests/it/hostile.rs`.\n",
        table.len()
    );
    let mut group = "";
    for (i, c) in table.iter().enumerate() {
        if c.group != group {
            group = c.group;
            let _ = writeln!(out, "\n### {group}\n");
            let _ = writeln!(out, "| # | request | client gets | upstream gets | why |");
            let _ = writeln!(out, "|---|---|---|---|---|");
        }
        let wire = match c.wire {
            Wire::H1(_) => "",
            Wire::H2Raw(..) | Wire::H2(..) => " (h2)",
        };
        let client = match &c.client {
            Client::Statuses(s) => s
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(" then "),
            Client::Closed => "connection closed".into(),
            Client::Reset => "stream reset".into(),
        };
        let up = match &c.up {
            Up::Nothing => "nothing".to_string(),
            Up::One(t, 0) => format!("one request `{t}`"),
            Up::One(t, n) => format!("one request `{t}`, {n}-byte body"),
            Up::Aborted => "nothing complete (at most the head, body cut off)".to_string(),
            Up::Many(v) => format!(
                "{} requests: {}",
                v.len(),
                v.iter()
                    .map(|t| format!("`{t}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let what = c.what.replace('|', "\\|");
        let _ = writeln!(
            out,
            "| {} | {what}{wire} | {client} | {up} | {} |",
            i + 1,
            c.why.replace('|', "\\|")
        );
    }
    out
}

const BEGIN: &str = "<!-- hostile-table:begin -->";
const END: &str = "<!-- hostile-table:end -->";

#[test]
fn docs_security_md_lists_every_row_of_the_hostile_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/security.md");
    let doc = std::fs::read_to_string(path).expect("docs/security.md exists");
    let (start, end) = (
        doc.find(BEGIN).expect("begin marker") + BEGIN.len(),
        doc.find(END).expect("end marker"),
    );
    let want = format!("\n{}\n", render());
    if std::env::var_os("KEYGATE_BLESS").is_some() {
        let updated = format!("{}{want}{}", &doc[..start], &doc[end..]);
        std::fs::write(path, updated).expect("write docs/security.md");
        return;
    }
    assert!(
        doc[start..end] == want,
        "docs/security.md is out of step with tests/it/hostile.rs; run KEYGATE_BLESS=1 cargo test --test it docs_security_md"
    );
}
