//! The request pipeline, in the order the module notes list.

use std::future::{ready, Future, Ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::future::{BoxFuture, Either};

use http::header::{HeaderMap, HeaderValue};
use http::uri::{Parts, PathAndQuery};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use super::body::{DataOnly, IdleTimeout, ProxyBody};
use super::error::{AuthFailure, Rejection};
use super::headers::{
    set_forwarding, strip_response, valid_host, CredentialError, Forwarding, Scan, Strip,
    X_KEYGATE_KEY_EXPIRES_AT, X_REQUEST_ID,
};
use super::path::canonical_path;
use super::route::{Route, Router};
use super::upstream::{self, Answer, Dedicated, OutboundBody, QueuedAnswer, SendError, Sending};
use super::worker_keys::Found;
#[cfg(feature = "bench-passthrough")]
use super::worker_keys::LocalKey;
use super::{ProxyState, Worker};
use crate::audit::ProxiedRequest;
use crate::keys::{self, KeyPrefix, KeyState, ParsedKey, Recall, Unremembered, VerifyError};
use crate::metrics::{AuthReason, Outcome, UpstreamFailure};

/// The client connection a request arrived on, and the upstream side serving it.
pub(super) struct Conn {
    /// The proxy worker serving the connection: the shared state, its upstream client and its
    /// copies of the keys in use.
    pub worker: Arc<Worker>,
    /// The routes for this request, loaded once as it arrives: a SIGHUP swap affects later
    /// requests, never one half-way through.
    pub router: Arc<Router>,
    /// This connection's own upstream connection (HTTP/1 clients).
    pub own: Arc<Dedicated>,
    pub peer: SocketAddr,
    /// `peer`'s address as `X-Forwarded-For` carries it, built once per connection.
    pub peer_ip: HeaderValue,
    /// Whether the client connection is TLS.
    pub tls: bool,
}

/// What the pipeline learnt about a request, for the access log and the metrics.
#[derive(Default)]
struct Trail {
    /// The route's position in the connection's router.
    route: Option<usize>,
    prefix: Option<KeyPrefix>,
    entry: Option<Found>,
}

/// An admitted request: where it goes, whose key carried it, what to strip from it, and when
/// it was decided. `conclude` checks the route's scope before it is forwarded. Owned, so the
/// forwarding future can hold it beside the request.
struct Grant {
    /// The route's position in the connection's router.
    route: usize,
    entry: Found,
    strip: Strip,
    /// The client's `Host`, for `X-Forwarded-Host` (taken by `outbound`).
    host: Option<HeaderValue>,
    now_ms: i64,
}

/// Steps 1–5 up to verification: the key, and the grant it claims (route and live entry).
struct Admitted<'r> {
    key: ParsedKey<'r>,
    grant: Grant,
}

/// What every response takes from its request once the pipeline is done with it.
struct Finish {
    request_id: HeaderValue,
    method: Method,
    trail: Trail,
    auth_time: Duration,
}

impl Finish {
    /// Once the request is authorised or refused: the time that took, observed, and when.
    fn decided(
        state: &ProxyState,
        started: Instant,
        request_id: HeaderValue,
        method: Method,
        trail: Trail,
    ) -> (Finish, Instant) {
        let now = Instant::now();
        let auth_time = now - started;
        state.metrics.observe_auth(auth_time);
        let finish = Finish {
            request_id,
            method,
            trail,
            auth_time,
        };
        (finish, now)
    }
}

/// Runs one request through the pipeline. Never fails: every error is a response.
///
/// Refusals and warm keys are decided before any future exists: a refusal is a ready
/// response and never builds or polls the forwarding future (−700 instructions per 401). The
/// forwarding future (`Forward`, 712 bytes) is not boxed: boxing it saved no instructions on
/// a forwarded request. A key its entry has not verified takes a boxed future of its own,
/// which keeps the verification's state out of every other request's future; it starts from
/// what steps 1–5 found here, so they run once whatever the key.
pub(super) fn handle(
    conn: Conn,
    req: Request<Incoming>,
) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
    let started = Instant::now();
    let state = &*conn.worker.state;
    let scan = Scan::of(req.headers());
    let request_id = request_id(scan.request_id);
    let mut trail = Trail::default();
    let decided = match admit(state, &conn, &req, &scan, &mut trail) {
        Err(rejection) => Err(rejection),
        Ok(admitted) => match state
            .verifier
            .recall(admitted.grant.entry.entry(), &admitted.key)
        {
            // The warm path: this key's entry already verified this secret.
            Recall::Remembered => conclude(&conn, admitted.grant, &mut trail),
            Recall::Unremembered(key) => {
                let grant = admitted.grant;
                let verifying: BoxFuture<'static, _> = Box::pin(verify_and_forward(
                    conn, req, request_id, started, trail, grant, key,
                ));
                return Either::Right(verifying);
            }
        },
    };
    let (finish, authorised_at) =
        Finish::decided(state, started, request_id, req.method().clone(), trail);
    match decided {
        Ok(grant) => Either::Left(start_forward(conn, req, grant, finish, authorised_at)),
        Err(rejection) => Either::Left(Either::Left(ready(refuse(
            &conn,
            rejection,
            finish,
            emptied(req),
        )))),
    }
}

/// The pipeline for a key its entry has not verified, from where `handle` left it: the
/// verification (step 5), then as `handle`. A function returning an `async move` block, not
/// an `async fn`: an `async fn` stores its arguments and the locals they are moved into side
/// by side, so the request would be carried twice.
#[allow(clippy::manual_async_fn)] // not an `async fn` on purpose: see above
fn verify_and_forward(
    conn: Conn,
    req: Request<Incoming>,
    request_id: HeaderValue,
    started: Instant,
    mut trail: Trail,
    grant: Grant,
    key: Unremembered,
) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
    async move {
        let state = &*conn.worker.state;
        let authorised = {
            // In flight until the verdict; `Forward` counts the rest.
            let _in_flight = state.metrics.in_flight();
            match verify(state, &conn, &grant, key).await {
                Ok(()) => conclude(&conn, grant, &mut trail),
                Err(rejection) => Err(rejection),
            }
        };
        let (finish, authorised_at) =
            Finish::decided(state, started, request_id, req.method().clone(), trail);
        match authorised {
            Ok(grant) => start_forward(conn, req, grant, finish, authorised_at).await,
            Err(rejection) => refuse(&conn, rejection, finish, emptied(req)),
        }
    }
}

/// The request's header map, emptied, for the refusal of that request. hyper reads each
/// request's headers into the map of the response it wrote before, so a refusal that keeps
/// the request's map allocates no map of its own and frees none (a key flood is all refusals).
fn emptied(mut req: Request<Incoming>) -> HeaderMap {
    let mut headers = std::mem::take(req.headers_mut());
    headers.clear();
    headers
}

/// Steps 7 and 8's first half, before any future exists: the request as the upstream gets
/// it, handed to the upstream side; then the future that waits for the answer. Or the refusal
/// when it cannot be sent.
fn start_forward(
    conn: Conn,
    req: Request<Incoming>,
    mut grant: Grant,
    mut finish: Finish,
    authorised_at: Instant,
) -> Either<Ready<Response<ProxyBody>>, impl Future<Output = Response<ProxyBody>> + Send + 'static>
{
    let state = &*conn.worker.state;
    let route = conn.router.route(grant.route);
    match outbound(state, &conn, route, &mut grant, req, &finish.request_id) {
        Ok(out) => Either::Right(send(
            conn,
            out,
            authorised_at,
            grant,
            Ending::Counted(finish),
        )),
        Err(rejection) => {
            finish.trail.entry = Some(grant.entry);
            Either::Left(ready(refuse(&conn, rejection, finish, HeaderMap::new())))
        }
    }
}

/// Step 8's first half: hands the request to the upstream side, and returns the future that
/// waits for the answer.
fn send(
    conn: Conn,
    out: Outbound,
    authorised_at: Instant,
    grant: Grant,
    ending: Ending,
) -> Forward<
    impl Future<Output = QueuedAnswer> + Send + 'static,
    impl Future<Output = Answer> + Send + 'static,
> {
    let route = conn.router.route(grant.route);
    let sending =
        conn.worker
            .client
            .send(&conn.own, route, out.dedicated, out.request, authorised_at);
    Forward::new(conn, sending, out.audited, authorised_at, grant, ending)
}

/// How a forwarded request's response is finished.
enum Ending {
    /// Counted, logged and given its request id (`complete`).
    Counted(Finish),
    /// Given its request id only (the bench-only pass-through).
    #[cfg(feature = "bench-passthrough")]
    Bare(HeaderValue),
}

pin_project! {
    /// Steps 8–9 once the request is with the upstream side: its response as the client gets
    /// it. A hand-written future, not an `async` block: a block keeps what it captures for its
    /// whole life and moves what it awaits into a slot of its own, so the request in `sending`
    /// would be carried twice. This holds it once; hyper moves this future into place for
    /// every request.
    struct Forward<Q, P> {
        conn: Conn,
        audited: Audited,
        authorised_at: Instant,
        // Taken when the response is ready.
        done: Option<(Grant, Ending)>,
        #[pin]
        sending: Sending<Q, P>,
    }

    impl<Q, P> PinnedDrop for Forward<Q, P> {
        fn drop(this: Pin<&mut Self>) {
            this.conn.worker.state.metrics.left_flight();
        }
    }
}

impl<Q, P> Forward<Q, P> {
    fn new(
        conn: Conn,
        sending: Sending<Q, P>,
        audited: Audited,
        authorised_at: Instant,
        grant: Grant,
        ending: Ending,
    ) -> Forward<Q, P> {
        // In flight until the future is dropped, answered or not.
        conn.worker.state.metrics.entered_flight();
        Forward {
            conn,
            audited,
            authorised_at,
            done: Some((grant, ending)),
            sending,
        }
    }
}

impl<Q, P> Future for Forward<Q, P>
where
    Q: Future<Output = QueuedAnswer>,
    P: Future<Output = Answer>,
{
    type Output = Response<ProxyBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<ProxyBody>> {
        let this = self.project();
        let conn = &*this.conn;
        // Only `None` once answered: hyper never polls a finished future.
        let Some(route) = this.done.as_ref().map(|(g, _)| conn.router.route(g.route)) else {
            return Poll::Pending;
        };
        let response = ready!(this.sending.poll_response(
            cx,
            &conn.worker.client,
            &conn.own,
            &route.upstream.authority,
        ));
        let Some((grant, ending)) = this.done.take() else {
            return Poll::Pending;
        };
        let state = &*conn.worker.state;
        let result = answer(
            state,
            conn,
            route,
            &grant,
            response,
            this.audited.take(),
            *this.authorised_at,
        );
        Poll::Ready(match ending {
            Ending::Counted(mut finish) => {
                let upstream_ms = if state.access_log {
                    this.authorised_at.elapsed().as_millis() as u64
                } else {
                    0
                };
                finish.trail.entry = Some(grant.entry);
                match result {
                    Ok(response) => {
                        complete(conn, response, Outcome::Allowed, "-", finish, upstream_ms)
                    }
                    Err(rejection) => {
                        refuse_after(conn, rejection, finish, upstream_ms, HeaderMap::new())
                    }
                }
            }
            #[cfg(feature = "bench-passthrough")]
            Ending::Bare(request_id) => match result {
                Ok(mut response) => {
                    response.headers_mut().insert(&X_REQUEST_ID, request_id);
                    response
                }
                Err(rejection) => rejection.into_response(),
            },
        })
    }
}

/// A refusal's response, counted and logged, for a request that never went upstream; it is
/// built in `headers`.
fn refuse(
    conn: &Conn,
    rejection: Rejection,
    finish: Finish,
    headers: HeaderMap,
) -> Response<ProxyBody> {
    refuse_after(conn, rejection, finish, 0, headers)
}

fn refuse_after(
    conn: &Conn,
    rejection: Rejection,
    finish: Finish,
    upstream_ms: u64,
    headers: HeaderMap,
) -> Response<ProxyBody> {
    let (outcome, reason) = (counted(&rejection), rejection.reason());
    complete(
        conn,
        rejection.into_response_in(headers),
        outcome,
        reason,
        finish,
        upstream_ms,
    )
}

/// Counts and logs the request, and tells the client its request id.
fn complete(
    conn: &Conn,
    mut response: Response<ProxyBody>,
    outcome: Outcome,
    reason: &str,
    finish: Finish,
    upstream_ms: u64,
) -> Response<ProxyBody> {
    let state = &*conn.worker.state;
    let trail = &finish.trail;
    let route = trail.route.map(|at| conn.router.route(at));
    let status = response.status().as_u16();
    state
        .metrics
        .request(route.map(|r| r.index), &finish.method, outcome, status);
    if let Some(entry) = &trail.entry {
        state
            .metrics
            .account_request(entry.entry().owner.name(), outcome);
    }
    log_access(
        state,
        &finish.request_id,
        &finish.method,
        route,
        trail,
        status,
        outcome_label(outcome),
        reason,
        finish.auth_time.as_micros() as u64,
        upstream_ms,
    );
    response
        .headers_mut()
        .insert(&X_REQUEST_ID, finish.request_id);
    response
}

/// Bench-only: route and forward with a fixed identity, skipping steps 3–6 (and shaped as
/// `handle`: the route is found and the request rewritten before the future exists).
#[cfg(feature = "bench-passthrough")]
pub(super) fn passthrough(
    conn: Conn,
    req: Request<Incoming>,
) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
    static ENTRY: std::sync::OnceLock<Arc<LocalKey>> = std::sync::OnceLock::new();
    let state = &*conn.worker.state;
    let Some(at) = conn.router.position(req.method(), req.uri().path()) else {
        return Either::Left(ready(Rejection::NoRoute.into_response()));
    };
    let entry = ENTRY.get_or_init(|| {
        let row = keys::KeyRow {
            id: keys::KeyId {
                kind: keys::KeyKind::ServiceAccount,
                id: 0,
            },
            prefix: Some("kgsBENCH".into()),
            key_hash: Some("-".into()),
            scopes: "bench".into(),
            expires_at: None,
            revoked_at: None,
            updated_at: 0,
            owner_id: 0,
            owner_name: "bench".into(),
        };
        Arc::new(LocalKey::new(Arc::new(
            keys::KeyEntry::from_row(row).expect("a valid bench entry"),
        )))
    });
    let scan = Scan::of(req.headers());
    let request_id = request_id(scan.request_id);
    let source = scan.key().ok().map(|(source, _)| source);
    let mut grant = Grant {
        route: at,
        entry: Found::Local(entry.clone()),
        strip: scan.strip(source, req.version()),
        host: scan.host.cloned(),
        now_ms: state.clock.now_ms(),
    };
    // As `start_forward` forwards.
    let sent = Instant::now();
    let route = conn.router.route(at);
    let out = match outbound(state, &conn, route, &mut grant, req, &request_id) {
        Ok(out) => out,
        Err(rejection) => return Either::Left(ready(rejection.into_response())),
    };
    Either::Right(send(conn, out, sent, grant, Ending::Bare(request_id)))
}

/// Steps 1–5 short of verifying the secret: everything that can refuse a request without
/// waiting.
fn admit<'r>(
    state: &ProxyState,
    conn: &Conn,
    req: &'r Request<Incoming>,
    scan: &Scan<'r>,
    trail: &mut Trail,
) -> Result<Admitted<'r>, Rejection> {
    let now_ms = state.clock.now_ms();
    match state.table.synced_at() {
        None => return Err(Rejection::NotReady),
        Some(at) if state.max_staleness_ms.is_some_and(|max| now_ms - at > max) => {
            return Err(Rejection::Stale)
        }
        Some(_) => {}
    }
    // An upstream or a middlebox may frame a request with both Content-Length and
    // Transfer-Encoding differently, so refuse it (RFC 9112 §6.3). hyper's HTTP/1.1 parser
    // already drops the Content-Length in that case (and closes the connection after the
    // response), so this is a guard for any other way such a request could arrive.
    if scan.transfer_encodings > 0 && scan.content_length {
        return Err(Rejection::BadRequest(
            "content_length_with_transfer_encoding",
        ));
    }
    check_framing(req, scan)?;
    if req.method() == Method::CONNECT {
        return Err(Rejection::BadRequest("connect_not_supported"));
    }
    let path = req.uri().path();
    canonical_path(path.as_bytes()).map_err(|_| Rejection::BadRequest("non_canonical_path"))?;

    let route = conn
        .router
        .position(req.method(), path)
        .ok_or(Rejection::NoRoute)?;
    trail.route = Some(route);

    let (source, text) = scan.key().map_err(|e| match e {
        CredentialError::Missing => Rejection::Unauthorized(AuthFailure::Missing),
        CredentialError::Malformed => Rejection::Unauthorized(AuthFailure::Malformed),
        CredentialError::Ambiguous => Rejection::BadRequest("ambiguous_credentials"),
    })?;
    let key = keys::parse(text).map_err(|_| Rejection::Unauthorized(AuthFailure::Malformed))?;
    trail.prefix = Some(key.prefix);

    // The table's current entry (or this worker's copy of it, while the table is unchanged).
    let found = conn
        .worker
        .keys
        .find(&state.table, &key.prefix)
        .ok_or(Rejection::Unauthorized(AuthFailure::Unknown))?;
    // Revocation and expiry come from the live table before any cache is consulted.
    match found.entry().state(now_ms) {
        KeyState::Active => {}
        KeyState::Revoked => return Err(Rejection::Unauthorized(AuthFailure::Revoked)),
        KeyState::Expired => return Err(Rejection::Unauthorized(AuthFailure::Expired)),
    }
    Ok(Admitted {
        key,
        grant: Grant {
            route,
            entry: found,
            strip: scan.strip(Some(source), req.version()),
            host: scan.host.cloned(),
            now_ms,
        },
    })
}

/// Step 5 for a secret this entry has not verified: the shared caches, then argon2.
async fn verify(
    state: &ProxyState,
    conn: &Conn,
    grant: &Grant,
    key: Unremembered,
) -> Result<(), Rejection> {
    state
        .verifier
        .verify_unremembered(grant.entry.entry(), key, conn.peer.ip())
        .await
        .map(drop)
        .map_err(|e| match e {
            VerifyError::Mismatch => Rejection::Unauthorized(AuthFailure::Unknown),
            VerifyError::Busy => Rejection::Busy,
            // Round up: never tell a client to come back before the window ends.
            VerifyError::Throttled(wait) => {
                Rejection::Throttled(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            }
        })
}

/// Step 6, once the secret verified: the scope check.
fn conclude(conn: &Conn, mut grant: Grant, trail: &mut Trail) -> Result<Grant, Rejection> {
    grant.entry = conn.worker.keys.keep(grant.entry);
    let scope = &conn.router.route(grant.route).scope;
    if !grant.entry.entry().scopes().contains(scope) {
        trail.entry = Some(grant.entry);
        return Err(Rejection::Forbidden(scope.clone()));
    }
    Ok(grant)
}

/// What hyper accepts but an upstream or a middlebox could read differently: refused.
fn check_framing(req: &Request<Incoming>, scan: &Scan<'_>) -> Result<(), Rejection> {
    // keygate removes Transfer-Encoding and re-frames the body; any coding but a lone
    // `chunked` (e.g. `gzip, chunked`) would change the bytes the upstream reads.
    if let Some(v) = scan.transfer_encoding {
        if scan.transfer_encodings > 1 || !v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(Rejection::BadRequest("unsupported_transfer_encoding"));
        }
    }
    // Several Host headers, an invalid one, or none on HTTP/1.1 (RFC 9112 §3.2: 400; HTTP/1.0
    // may omit it, HTTP/2 carries `:authority`). A Host that disagrees with an absolute-form
    // target or with HTTP/2's `:authority` (RFC 9113 §8.3.1): which one names the resource
    // is ambiguous.
    if scan.hosts > 1 {
        return Err(Rejection::BadRequest("ambiguous_host"));
    }
    match scan.host {
        Some(host) if !valid_host(host.as_bytes()) => {
            return Err(Rejection::BadRequest("invalid_host"))
        }
        None if req.version() == Version::HTTP_11 => {
            return Err(Rejection::BadRequest("missing_host"))
        }
        _ => {}
    }
    if let (Some(host), Some(authority)) = (scan.host, req.uri().authority()) {
        if host.as_bytes() != authority.as_str().as_bytes() {
            return Err(Rejection::BadRequest("ambiguous_host"));
        }
    }
    // Tunnels are not supported: an Upgrade is refused rather than silently dropped, so
    // nothing can switch protocols behind keygate's back.
    if scan.upgrade {
        return Err(Rejection::BadRequest("upgrade_not_supported"));
    }
    Ok(())
}

/// The method and path to audit, when the route audits the method.
type Audited = Option<(Method, String)>;

/// What `outbound` prepared.
struct Outbound {
    request: Request<OutboundBody>,
    audited: Audited,
    /// Whether the request goes on the client connection's own upstream connection.
    dedicated: bool,
}

/// Step 7: the request as the upstream gets it. Also records the use (step 9's stamp).
fn outbound(
    state: &ProxyState,
    conn: &Conn,
    route: &Route,
    grant: &mut Grant,
    req: Request<Incoming>,
    request_id: &HeaderValue,
) -> Result<Outbound, Rejection> {
    let (mut parts, body) = req.into_parts();
    let original_host = grant.host.take().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });

    grant.strip.apply(&mut parts.headers);
    let upstream = &route.upstream;
    set_forwarding(
        &mut parts.headers,
        Forwarding {
            client_ip: &conn.peer_ip,
            proto: if conn.tls { "https" } else { "http" },
            original_host,
            upstream_host: &route.upstream_host,
            identity: grant.entry.identity(),
            request_id,
        },
    );
    // An HTTP/1 client connection sends one request at a time: it gets an upstream connection
    // of its own, and the request goes in origin form (`/path?query`, RFC 9112 §3.2.1; the
    // Host header names the upstream). HTTP/2 multiplexes, so its requests share the worker's
    // pool, as do `https://` routes' requests, and the pool takes the absolute form.
    let dedicated = parts.version != Version::HTTP_2 && upstream.scheme == http::uri::Scheme::HTTP;
    let mut uri = Parts::default();
    if !dedicated {
        uri.scheme = Some(upstream.scheme.clone());
        uri.authority = Some(upstream.authority.clone());
    }
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.uri = Uri::from_parts(uri).map_err(|_| Rejection::BadRequest("bad_request_target"))?;
    // keygate speaks HTTP/1.1 to upstreams, whatever the client spoke.
    parts.version = Version::HTTP_11;

    state
        .usage
        .record_from(grant.entry.entry(), grant.now_ms, Some(conn.peer.ip()));
    // Only audited requests pay for copying the path.
    let audited = route
        .audit
        .covers(&parts.method)
        .then(|| (parts.method.clone(), parts.uri.path().to_owned()));
    let request = Request::from_parts(
        parts,
        IdleTimeout::new(DataOnly::new(body), state.idle_timeout),
    );
    Ok(Outbound {
        request,
        audited,
        dedicated,
    })
}

/// Steps 8–9 once the upstream answered (or failed): the response as the client gets it.
fn answer(
    state: &ProxyState,
    conn: &Conn,
    route: &Route,
    grant: &Grant,
    response: Result<Response<Incoming>, SendError>,
    audited: Audited,
    sent: Instant,
) -> Result<Response<ProxyBody>, Rejection> {
    let response = response.map_err(|e| match e {
        SendError::Upstream(failure) => {
            state.metrics.upstream_error(route.index, failure);
            upstream::rejection(failure)
        }
        SendError::ClientBody => Rejection::BadRequest("bad_request_body"),
    })?;
    state.metrics.observe_upstream(route.index, sent.elapsed());
    // keygate asked for no upgrade and tunnels nothing: a 101 is an upstream fault. hyper's
    // client accepts any three digits, but a status past 599 means nothing to a client.
    let status = response.status().as_u16();
    if status == 101 || status > 599 {
        return Err(unrelayable(
            state,
            route,
            "upstream answered with a status keygate cannot relay",
            status,
        ));
    }
    let (mut parts, body) = response.into_parts();
    if strip_response(&mut parts.headers).is_err() {
        return Err(unrelayable(
            state,
            route,
            "upstream framed its response with a transfer coding other than chunked",
            status,
        ));
    }
    // An intermediary sends its own HTTP version, not the upstream's (RFC 9110 §6.2): hyper
    // writes an HTTP/1.1 client's response with the version the response carries (an
    // HTTP/1.0 client's always as HTTP/1.0; HTTP/2 ignores it).
    parts.version = Version::HTTP_11;
    let now_ms = grant.now_ms;
    if let Some((method, path)) = audited {
        state.audit.push(ProxiedRequest {
            at_ms: now_ms,
            entry: grant.entry.entry().clone(),
            method,
            path,
            status: parts.status.as_u16(),
            client: conn.peer.ip(),
        });
    }
    // Tell the caller when its key stops working while it is inside an expiry window (an
    // upstream's own value of the header is gone already).
    if let (Some(value), Some(at)) = (
        grant.entry.expires_header(),
        grant.entry.entry().expires_at(),
    ) {
        if at > now_ms {
            parts
                .headers
                .insert(&X_KEYGATE_KEY_EXPIRES_AT, value.clone());
        }
    }
    Ok(Response::from_parts(
        parts,
        ProxyBody::Upstream(IdleTimeout::new(body, state.idle_timeout)),
    ))
}

/// An upstream response keygate will not relay (see `answer`): counted and logged as an
/// upstream failure after the head, like a head hyper could not parse, and a 502.
fn unrelayable(state: &ProxyState, route: &Route, why: &'static str, status: u16) -> Rejection {
    state
        .metrics
        .upstream_error(route.index, UpstreamFailure::Request);
    tracing::warn!(route = %route.name, status, "{why}");
    Rejection::BadGateway
}

/// The client's `X-Request-Id` when it is a sane token, else a fresh one.
fn request_id(client: Option<&HeaderValue>) -> HeaderValue {
    if let Some(v) = client {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    // Random per thread, then counting: unique without a counter shared between workers.
    thread_local! {
        static NEXT: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
        /// Room for this thread's next ids. Each id is a slice of one buffer: making it
        /// allocates nothing and cloning it (into the upstream request) counts a reference,
        /// where an id in a buffer of its own would allocate twice, for its bytes and then
        /// for a shared header at its first clone.
        static ROOM: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
    }
    let (base, n) = NEXT.with(|next| {
        let (mut base, n) = next.get();
        if base == 0 {
            let mut b = [0u8; 8];
            let _ = getrandom::getrandom(&mut b);
            base = u64::from_le_bytes(b) | 1;
        }
        next.set((base, n.wrapping_add(1)));
        (base, n)
    });
    let mut buf = [0u8; REQUEST_ID_LEN];
    hex_into(&mut buf[..16], base);
    hex_into(&mut buf[16..], n);
    let id = ROOM.with(|room| {
        let mut room = room.borrow_mut();
        if room.capacity() < REQUEST_ID_LEN {
            *room = BytesMut::with_capacity(REQUEST_ID_LEN * 128);
        }
        room.extend_from_slice(&buf);
        room.split_to(REQUEST_ID_LEN).freeze()
    });
    HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("-"))
}

/// A generated request id: 32 hex digits.
const REQUEST_ID_LEN: usize = 32;

fn hex_into(out: &mut [u8], mut n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[allow(clippy::too_many_arguments)]
fn log_access(
    state: &ProxyState,
    request_id: &HeaderValue,
    method: &Method,
    route: Option<&Route>,
    trail: &Trail,
    status: u16,
    outcome: &str,
    reason: &str,
    auth_us: u64,
    upstream_ms: u64,
) {
    if !state.access_log {
        return;
    }
    tracing::info!(
        target: "keygate::access",
        request_id = request_id.to_str().unwrap_or("-"),
        route = route.map_or("-", |r| r.name.as_str()),
        method = method.as_str(),
        status,
        outcome,
        reason,
        key_prefix = trail.prefix.as_ref().map(KeyPrefix::as_str).unwrap_or("-"),
        account = trail
            .entry
            .as_ref()
            .map(|e| e.entry().owner.name())
            .unwrap_or("-"),
        auth_us,
        upstream_ms,
        "request"
    );
}

/// How a refusal is counted.
fn counted(rejection: &Rejection) -> Outcome {
    match rejection {
        Rejection::BadRequest(_) => Outcome::BadRequest,
        Rejection::NoRoute => Outcome::NotFound,
        Rejection::Unauthorized(f) => Outcome::Unauthorized(match f {
            AuthFailure::Missing => AuthReason::Missing,
            AuthFailure::Malformed => AuthReason::Malformed,
            AuthFailure::Unknown => AuthReason::Unknown,
            AuthFailure::Revoked => AuthReason::Revoked,
            AuthFailure::Expired => AuthReason::Expired,
        }),
        Rejection::Forbidden(_) => Outcome::Forbidden,
        Rejection::NotReady | Rejection::Stale => Outcome::NotReady,
        Rejection::Busy => Outcome::Busy,
        Rejection::Throttled(_) => Outcome::Throttled,
        Rejection::BadGateway => Outcome::UpstreamError(UpstreamFailure::Request),
        Rejection::GatewayTimeout => Outcome::UpstreamError(UpstreamFailure::Timeout),
    }
}

/// The access log's `outcome` field: the same words as the metric's label.
fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allowed => "allowed",
        Outcome::Unauthorized(_) => "unauthorized",
        Outcome::Forbidden => "forbidden",
        Outcome::NotFound => "not_found",
        Outcome::UpstreamError(_) => "upstream_error",
        Outcome::BadRequest => "bad_request",
        Outcome::Busy => "busy",
        Outcome::NotReady => "not_ready",
        Outcome::Throttled => "throttled",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn generated_request_ids_are_distinct_hex_across_many_buffers_and_outlive_them() {
        // 1,000 ids span several buffers of 128; every id stays intact while later ones are
        // carved from new buffers.
        let ids: Vec<HeaderValue> = (0..1000).map(|_| request_id(None)).collect();
        let distinct: HashSet<&[u8]> = ids.iter().map(|id| id.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            assert_eq!(id.len(), REQUEST_ID_LEN);
            assert!(
                id.as_bytes().iter().all(|b| b.is_ascii_hexdigit()),
                "{id:?}"
            );
        }
        let (base, first) = ids[0].as_bytes().split_at(16);
        let (same_base, last) = ids[999].as_bytes().split_at(16);
        assert_eq!(base, same_base, "one random base per thread");
        let count = |hex: &[u8]| u64::from_str_radix(std::str::from_utf8(hex).expect("hex"), 16);
        assert_eq!(count(last).expect("n") - count(first).expect("n"), 999);
    }

    #[test]
    fn a_sane_client_request_id_is_kept_and_anything_else_replaced() {
        let kept = HeaderValue::from_static("trace-123");
        assert_eq!(request_id(Some(&kept)), "trace-123");
        for bad in [
            HeaderValue::from_static(""),
            HeaderValue::from_static("has space"),
            HeaderValue::from_bytes(&[b'a'; 129]).expect("value"),
        ] {
            assert_eq!(request_id(Some(&bad)).len(), REQUEST_ID_LEN, "{bad:?}");
        }
    }
}
