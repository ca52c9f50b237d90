//! Routing: the longest `path_prefix` that matches the path on a segment boundary and allows
//! the method wins. No match means 404 and nothing reaches an upstream.

use http::Method;

use crate::config::{AuditMode, RouteConfig, Upstream};
use crate::keys::Scope;

/// One configured route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// Position in the configuration file, for per-route metric handles.
    pub index: usize,
    prefix: String,
    methods: Vec<Method>,
    pub upstream: Upstream,
    /// The `Host` header sent upstream, built once.
    pub upstream_host: http::HeaderValue,
    pub scope: Scope,
    pub audit: AuditMode,
}

/// Routes ordered longest prefix first.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Re-points each route's metrics `index` at its position in `names`, the routes the
    /// metrics were built for at start. A route added since gets an index past the end, which
    /// the metrics count as unrouted rather than under another route's name.
    pub fn indexed_by(mut self, names: &[RouteConfig]) -> Router {
        for route in &mut self.routes {
            route.index = names
                .iter()
                .position(|n| n.name == route.name)
                .unwrap_or(usize::MAX);
        }
        self
    }

    pub fn new(config: &[RouteConfig]) -> Router {
        let mut routes: Vec<Route> = config
            .iter()
            .enumerate()
            .map(|(index, r)| Route {
                name: r.name.clone(),
                index,
                prefix: r.path_prefix.clone(),
                methods: r.methods.clone(),
                upstream: r.upstream.clone(),
                upstream_host: http::HeaderValue::from_str(r.upstream.authority.as_str())
                    .unwrap_or_else(|_| http::HeaderValue::from_static("")),
                scope: r.scope.clone(),
                audit: r.audit,
            })
            .collect();
        // Stable: among equal prefixes (different methods) the file's order is kept.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Router { routes }
    }

    /// A copy for one proxy worker. The header value and authority every forwarded request
    /// clones get buffers of their own: a plain clone would share their reference counts, and
    /// with them a cache line, with every other worker.
    pub fn detached(&self) -> Router {
        let routes = self
            .routes
            .iter()
            .map(|r| Route {
                name: r.name.clone(),
                index: r.index,
                prefix: r.prefix.clone(),
                methods: r.methods.clone(),
                upstream: Upstream {
                    scheme: r.upstream.scheme.clone(),
                    authority: http::uri::Authority::from_maybe_shared(
                        bytes::Bytes::copy_from_slice(r.upstream.authority.as_str().as_bytes()),
                    )
                    .unwrap_or_else(|_| r.upstream.authority.clone()),
                },
                upstream_host: super::headers::unshared(&r.upstream_host),
                scope: r.scope.clone(),
                audit: r.audit,
            })
            .collect();
        Router { routes }
    }

    /// The route for `method` and `path` (the path without its query).
    pub fn find(&self, method: &Method, path: &str) -> Option<&Route> {
        self.position(method, path).map(|at| self.route(at))
    }

    /// `find`'s route as its position, for `route` (the pipeline keeps positions, not
    /// references, so what it decided can move into the forwarding future).
    pub fn position(&self, method: &Method, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.matches(method, path))
    }

    /// The route at `position` (from this router's `position`).
    pub fn route(&self, position: usize) -> &Route {
        &self.routes[position]
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Route {
    fn matches(&self, method: &Method, path: &str) -> bool {
        let prefix_ok = self.prefix == "/"
            || (path.starts_with(&self.prefix)
                && matches!(path.as_bytes().get(self.prefix.len()), None | Some(b'/')));
        prefix_ok && (self.methods.is_empty() || self.methods.contains(method))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(toml: &str) -> Router {
        Router::new(
            &Config::from_toml(toml, "test", std::iter::empty())
                .expect("valid config")
                .routes,
        )
    }

    const ROUTES: &str = r#"
        [[routes]]
        name = "root"
        path_prefix = "/"
        upstream = "http://127.0.0.1:1"
        scope = "any"
        [[routes]]
        name = "rec-read"
        path_prefix = "/recordings"
        methods = ["GET", "HEAD"]
        upstream = "http://127.0.0.1:2"
        scope = "recordings:read"
        [[routes]]
        name = "rec-write"
        path_prefix = "/recordings/"
        methods = ["POST"]
        upstream = "http://127.0.0.1:2"
        scope = "recordings:write"
        [[routes]]
        name = "export"
        path_prefix = "/recordings/export"
        upstream = "http://127.0.0.1:3"
        scope = "recordings:export"
    "#;

    fn name(r: &Router, m: Method, p: &str) -> Option<String> {
        r.find(&m, p).map(|r| r.name.clone())
    }

    #[test]
    fn the_longest_matching_prefix_with_the_method_wins() {
        let r = router(ROUTES);
        assert_eq!(
            name(&r, Method::GET, "/recordings/42").as_deref(),
            Some("rec-read")
        );
        assert_eq!(
            name(&r, Method::POST, "/recordings/42").as_deref(),
            Some("rec-write")
        );
        assert_eq!(
            name(&r, Method::GET, "/recordings/export/7").as_deref(),
            Some("export")
        );
        assert_eq!(
            name(&r, Method::GET, "/recordings").as_deref(),
            Some("rec-read")
        );
        assert_eq!(
            name(&r, Method::DELETE, "/recordings/42").as_deref(),
            Some("root")
        );
    }

    #[test]
    fn reloaded_routes_keep_their_metric_slots_by_name() {
        let start = Config::from_toml(ROUTES, "test", std::iter::empty())
            .expect("valid")
            .routes;
        let mut reloaded = start.clone();
        reloaded.reverse();
        reloaded[0].name = "brand-new".into();
        let r = Router::new(&reloaded).indexed_by(&start);
        let index = |name: &str| r.routes.iter().find(|x| x.name == name).map(|x| x.index);
        assert_eq!(index("root"), Some(0));
        assert_eq!(index("rec-write"), Some(2));
        assert_eq!(index("brand-new"), Some(usize::MAX));
    }

    #[test]
    fn a_detached_copy_routes_alike_on_buffers_of_its_own() {
        let shared = router(ROUTES);
        let copy = shared.detached();
        for (a, b) in shared.routes.iter().zip(&copy.routes) {
            assert_eq!((&a.name, a.index, &a.scope), (&b.name, b.index, &b.scope));
            assert_eq!(a.upstream.to_string(), b.upstream.to_string());
            assert_eq!(a.upstream_host, b.upstream_host);
            assert_ne!(
                a.upstream_host.as_bytes().as_ptr(),
                b.upstream_host.as_bytes().as_ptr()
            );
            assert_ne!(
                a.upstream.authority.as_str().as_ptr(),
                b.upstream.authority.as_str().as_ptr()
            );
        }
        assert_eq!(
            name(&copy, Method::POST, "/recordings/42").as_deref(),
            Some("rec-write")
        );
    }

    #[test]
    fn prefixes_match_whole_segments_only() {
        let r = router(ROUTES);
        assert_eq!(
            name(&r, Method::GET, "/recordingsX").as_deref(),
            Some("root")
        );
        assert_eq!(
            name(&r, Method::GET, "/recordings/exporter").as_deref(),
            Some("rec-read")
        );
    }

    #[test]
    fn without_a_root_route_unmatched_paths_find_nothing() {
        let r = router(&ROUTES.replacen("path_prefix = \"/\"\n", "path_prefix = \"/other\"\n", 1));
        assert_eq!(name(&r, Method::GET, "/tickets"), None);
        assert_eq!(name(&r, Method::GET, "/"), None);
        assert_eq!(
            name(&r, Method::GET, "/Recordings/1"),
            None,
            "routes are case-sensitive"
        );
    }
}
