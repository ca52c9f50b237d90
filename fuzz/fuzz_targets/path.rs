//! Path canonicality on arbitrary bytes: never panics, and an accepted path has no empty or
//! dot segment, no backslash and no encoded `.`, `/`, `\` or NUL.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if keygate::proxy::canonical_path(data).is_ok() {
        let text = std::str::from_utf8(data).expect("accepted paths are ASCII");
        assert!(text.starts_with('/'));
        assert!(!text.contains("//") && !text.contains('\\'));
        let lower = text.to_ascii_lowercase();
        for bad in ["%2e", "%2f", "%5c", "%00"] {
            assert!(!lower.contains(bad), "{text}");
        }
        for segment in text[1..].split('/') {
            let name = segment.split(';').next().unwrap_or(segment);
            assert!(name != "." && name != "..", "{text}");
        }
    }
});
