//! Header rules on arbitrary header lists: key extraction never panics, and stripping is
//! idempotent and leaves no spelling of an identity or forwarding header.
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Lines of `name:value`.
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let source = keygate::proxy::extract_key(&headers).ok().map(|(s, _)| s);
    keygate::proxy::strip_request(&mut headers, source);
    let once = headers.clone();
    keygate::proxy::strip_request(&mut headers, source);
    assert_eq!(once, headers);
    for name in headers.keys() {
        let n = name.as_str().replace(['_', '.'], "-");
        assert!(
            !(n.starts_with("x-keygate-") || n.starts_with("x-forwarded-") || n == "forwarded"),
            "{name} survived"
        );
    }
});
