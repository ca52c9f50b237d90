//! Route matching on arbitrary paths: never panics, and a match is on a segment boundary of
//! the route's prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const ROUTES: &str = r#"
[[routes]]
name = "rec"
path_prefix = "/recordings"
methods = ["GET"]
upstream = "http://127.0.0.1:1"
scope = "a"
[[routes]]
name = "export"
path_prefix = "/recordings/export"
upstream = "http://127.0.0.1:1"
scope = "b"
[[routes]]
name = "tickets"
path_prefix = "/tickets/"
upstream = "http://127.0.0.1:1"
scope = "c"
"#;

fuzz_target!(|data: &[u8]| {
    static ROUTER: OnceLock<keygate::proxy::Router> = OnceLock::new();
    let router = ROUTER.get_or_init(|| {
        let config = keygate::config::Config::from_toml(ROUTES, "fuzz", std::iter::empty())
            .expect("valid routes");
        keygate::proxy::Router::new(&config.routes)
    });
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(route) = router.find(&http::Method::GET, path) {
        let prefix = match route.name.as_str() {
            "rec" => "/recordings",
            "export" => "/recordings/export",
            _ => "/tickets",
        };
        assert!(
            path == prefix || path.starts_with(&format!("{prefix}/")),
            "{path}"
        );
        if path.starts_with("/recordings/export/") || path == "/recordings/export" {
            assert_eq!(route.name, "export", "longest prefix wins");
        }
    }
});
