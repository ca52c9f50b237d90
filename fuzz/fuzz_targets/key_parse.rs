//! Key parsing on arbitrary bytes: never panics, and anything accepted has the key's shape.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = keygate::keys::parse(text) {
        assert_eq!(text.len(), keygate::keys::KEY_LEN);
        assert_eq!(parsed.prefix.as_str(), &text[..keygate::keys::PREFIX_LEN]);
    }
    let _ = keygate::keys::KeyPrefix::parse(text);
});
