//! Property tests (proptest) for the parsers that see hostile input first: key parsing, path
//! canonicality, route matching and header rules. Beyond "never panics", each states what must
//! hold for every input.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use proptest::prelude::*;

use super::headers::{extract_key, strip_request, KeySource};
use super::path::canonical_path;
use super::path::tests::three_pass;
use super::route::Router;
use crate::config::Config;
use crate::keys::{generate, parse, KeyKind, KEY_LEN};

/// Path-ish bytes: heavy on the characters that make paths ambiguous.
fn path_bytes() -> impl Strategy<Value = Vec<u8>> {
    let atoms = prop_oneof![
        Just(b"/".to_vec()),
        Just(b".".to_vec()),
        Just(b"..".to_vec()),
        Just(b"%2e".to_vec()),
        Just(b"%2F".to_vec()),
        Just(b"%5c".to_vec()),
        Just(b"%".to_vec()),
        Just(b"\\".to_vec()),
        Just(b";".to_vec()),
        Just(b"%C0%AE".to_vec()),
        Just(b"%E2%82%AC".to_vec()),
        "[a-z0-9]{1,4}".prop_map(String::into_bytes),
        any::<u8>().prop_map(|b| vec![b]),
    ];
    prop::collection::vec(atoms, 0..12).prop_map(|v| v.concat())
}

fn reserved_like_name() -> impl Strategy<Value = String> {
    let base = prop_oneof![
        Just("x-keygate-account"),
        Just("x-keygate-scopes"),
        Just("x-forwarded-for"),
        Just("x-forwarded-host"),
        Just("forwarded"),
        Just("x-real-ip"),
        Just("x-api-key"),
        Just("x-request-id"),
        Just("x-other"),
        Just("accept"),
    ];
    (base, prop::collection::vec(0u8..3, 20)).prop_map(|(name, choice)| {
        name.bytes()
            .zip(choice.iter().cycle())
            .map(|(b, c)| match (b, c) {
                (b'-', 1) => '_',
                (b'-', 2) => '.',
                (b, _) => b as char,
            })
            .collect()
    })
}

fn normalised(name: &str) -> String {
    name.replace(['_', '.'], "-").to_ascii_lowercase()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_generated_key_always_parses_to_its_own_prefix(gateway in any::<bool>()) {
        let kind = if gateway { KeyKind::Gateway } else { KeyKind::ServiceAccount };
        let key = generate(kind);
        let parsed = parse(key.expose()).expect("a generated key parses");
        prop_assert_eq!(parsed.kind, kind);
        prop_assert_eq!(parsed.prefix, key.prefix());
    }

    #[test]
    fn key_parsing_never_panics_and_accepts_only_the_key_shape(s in "\\PC{0,60}|kg[sg][0-9A-Za-z_]{43}") {
        if let Ok(parsed) = parse(&s) {
            prop_assert_eq!(s.len(), KEY_LEN);
            prop_assert!(s.starts_with("kgs") || s.starts_with("kgg"));
            prop_assert_eq!(parsed.prefix.as_str(), &s[..8]);
        }
    }

    #[test]
    fn a_single_changed_character_breaks_the_checksum(pos in 9usize..41, c in "[0-9A-Za-z]") {
        let key = generate(KeyKind::ServiceAccount);
        let mut s = key.expose().to_string();
        prop_assume!(&s[pos..pos + 1] != c.as_str());
        s.replace_range(pos..pos + 1, &c);
        prop_assert!(parse(&s).is_err());
    }

    #[test]
    fn an_accepted_path_is_unambiguous(path in path_bytes()) {
        if canonical_path(&path).is_ok() {
            prop_assert_eq!(path[0], b'/');
            let text = std::str::from_utf8(&path).expect("accepted paths are ASCII");
            prop_assert!(!text.contains("//"));
            prop_assert!(!text.contains('\\'));
            let lower = text.to_ascii_lowercase();
            for bad in ["%2e", "%2f", "%5c", "%00"] {
                prop_assert!(!lower.contains(bad), "{text}");
            }
            for segment in text[1..].split('/') {
                let name = segment.split(';').next().unwrap_or(segment);
                prop_assert!(name != "." && name != "..", "{text}");
            }
        }
    }

    #[test]
    fn the_one_pass_path_check_agrees_with_the_three_pass_one(path in path_bytes()) {
        prop_assert_eq!(canonical_path(&path), three_pass(&path), "{}", String::from_utf8_lossy(&path));
    }

    #[test]
    fn paths_of_plain_segments_are_accepted(segments in prop::collection::vec("[a-zA-Z0-9_~-][a-zA-Z0-9._~-]{0,8}", 0..6)) {
        let path = format!("/{}", segments.join("/"));
        prop_assume!(segments.iter().all(|s| s != "." && s != ".."));
        prop_assert_eq!(canonical_path(path.as_bytes()), Ok(()));
    }

    #[test]
    fn the_route_found_is_the_longest_matching_prefix(
        prefixes in prop::collection::btree_set("(/[a-c]{1,2}){1,3}", 1..5),
        path in "(/[a-c]{1,2}){0,4}",
    ) {
        let toml: String = prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| format!("[[routes]]\nname = \"r{i}\"\npath_prefix = \"{p}\"\nupstream = \"http://127.0.0.1:1\"\nscope = \"s\"\n"))
            .collect();
        let config = Config::from_toml(&toml, "prop", std::iter::empty()).expect("valid routes");
        let router = Router::new(&config.routes);
        let path = if path.is_empty() { "/".to_string() } else { path };
        let on_boundary = |p: &str| path == p || path.starts_with(&format!("{p}/"));
        let best = prefixes.iter().filter(|p| on_boundary(p)).max_by_key(|p| p.len());
        let found = router.find(&Method::GET, &path).map(|r| r.name.clone());
        let want = best.map(|b| format!("r{}", prefixes.iter().position(|p| p == b).expect("present")));
        prop_assert_eq!(found, want);
    }

    #[test]
    fn stripping_is_idempotent_and_leaves_no_spoofable_header(
        names in prop::collection::vec(reserved_like_name(), 0..8),
        connection in prop::option::of(reserved_like_name()),
    ) {
        let mut headers = HeaderMap::new();
        for n in &names {
            headers.append(HeaderName::from_bytes(n.as_bytes()).expect("token"), HeaderValue::from_static("spoof"));
        }
        if let Some(c) = &connection {
            headers.insert(http::header::CONNECTION, HeaderValue::from_str(c).expect("ascii"));
        }
        let _ = extract_key(&headers);
        strip_request(&mut headers, Some(KeySource::Authorization), http::Version::HTTP_11);
        let once = headers.clone();
        strip_request(&mut headers, Some(KeySource::Authorization), http::Version::HTTP_11);
        prop_assert_eq!(&once, &headers);
        for name in headers.keys() {
            let n = normalised(name.as_str());
            let spoofable = n.starts_with("x-keygate-") || n.starts_with("x-forwarded-") || n == "forwarded" || n == "x-real-ip" || n == "x-api-key";
            prop_assert!(!spoofable, "{name} survived");
            prop_assert!(n != "x-request-id" || name.as_str() == "x-request-id");
        }
        prop_assert!(!headers.contains_key(http::header::CONNECTION));
        if let Some(c) = &connection {
            prop_assert!(!headers.contains_key(c.as_str()), "{c} named in Connection survived");
        }
    }

    #[test]
    fn key_extraction_never_panics(values in prop::collection::vec((0usize..3, prop::collection::vec(any::<u8>(), 0..60)), 0..4)) {
        let mut headers = HeaderMap::new();
        for (which, bytes) in values {
            let name = ["authorization", "x-api-key", "x-other"][which];
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                headers.append(name, v);
            }
        }
        if let Ok((_, key)) = extract_key(&headers) {
            prop_assert!(!key.is_empty());
            prop_assert!(!key.starts_with(' ') && !key.ends_with(' '));
        }
    }
}
