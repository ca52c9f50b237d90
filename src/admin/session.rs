//! Console sessions: a random token in an HttpOnly, SameSite=Strict cookie, stored server-side
//! only as its BLAKE3 digest; a CSRF token per session; idle expiry; failed-login throttling
//! per email and per client address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use moka::ops::compute::{CompResult, Op};

use super::error::AdminError;
use super::AdminState;
use crate::manage::{Actor, Role};
use crate::store::NewSession;

/// The session cookie's name.
pub const COOKIE: &str = "keygate_session";

/// Failed logins allowed per email and per client address within `THROTTLE_WINDOW`.
const MAX_FAILURES_PER_EMAIL: u32 = 5;
const MAX_FAILURES_PER_ADDR: u32 = 20;
const THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// The logged-in user behind a request.
#[derive(Clone, Debug)]
pub struct CurrentUser {
    pub session_id: i64,
    pub user_id: i64,
    pub email: String,
    pub role: Role,
    pub csrf_token: String,
    pub client_addr: Option<String>,
}

impl CurrentUser {
    /// The audit actor for changes this user makes.
    pub fn actor(&self) -> Actor {
        Actor {
            actor_type: "user",
            actor_id: Some(self.user_id.to_string()),
            client_addr: self.client_addr.clone(),
        }
    }

    /// Refuses operators and viewers: only owners and admins change keys and accounts.
    pub fn require_key_manager(&self) -> Result<(), AdminError> {
        if self.role.manages_keys() {
            Ok(())
        } else {
            Err(AdminError::IssuanceForbidden)
        }
    }

    /// Refuses operators and viewers: only owners and admins pair, unpair and re-pair gateways.
    pub fn require_gateway_manager(&self) -> Result<(), AdminError> {
        if self.role.manages_keys() {
            Ok(())
        } else {
            Err(AdminError::PairingForbidden)
        }
    }

    /// Compares a presented CSRF token with the session's, in constant time.
    pub fn check_csrf(&self, presented: Option<&str>) -> Result<(), AdminError> {
        match presented {
            Some(p) if constant_time_eq(p.as_bytes(), self.csrf_token.as_bytes()) => Ok(()),
            _ => Err(AdminError::Csrf),
        }
    }
}

/// A user for the JSON API: 401 JSON when there is no live session.
pub struct ApiUser(pub CurrentUser);

/// A user for the console: a redirect to the login page when there is no live session.
pub struct ConsoleUser(pub CurrentUser);

impl FromRequestParts<Arc<AdminState>> for ApiUser {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, Self::Rejection> {
        resolve(state, &parts.headers, client_addr(parts))
            .await
            .map(ApiUser)
    }
}

impl FromRequestParts<Arc<AdminState>> for ConsoleUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, Self::Rejection> {
        match resolve(state, &parts.headers, client_addr(parts)).await {
            Ok(user) => Ok(ConsoleUser(user)),
            Err(AdminError::Unauthenticated) => Err(Redirect::to("/admin/login").into_response()),
            Err(e) => Err(e.into_html()),
        }
    }
}

/// The client's address as the admin listener saw it (absent when the router is served
/// without connection info).
pub struct ClientAddr(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(client_addr(parts)))
    }
}

/// The client's address as the admin listener saw it.
pub fn client_addr(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
}

/// Finds the live session named by the request's cookie. An idle session is ended here.
async fn resolve(
    state: &AdminState,
    headers: &HeaderMap,
    client_addr: Option<String>,
) -> Result<CurrentUser, AdminError> {
    let token = cookie(headers, COOKIE).ok_or(AdminError::Unauthenticated)?;
    let Some(s) = state
        .manager
        .store
        .session_by_digest(&digest(token))
        .await?
    else {
        return Err(AdminError::Unauthenticated);
    };
    let now = state.clock.now_ms();
    if s.ended_at.is_some() || s.disabled_at.is_some() {
        return Err(AdminError::Unauthenticated);
    }
    if now - s.last_seen_at >= state.session_idle_timeout.as_millis() as i64 {
        state.manager.store.end_session(s.id, now).await?;
        return Err(AdminError::Unauthenticated);
    }
    state.manager.store.touch_session(s.id, now).await?;
    let role = Role::parse(&s.role).map_err(|_| AdminError::Unauthenticated)?;
    Ok(CurrentUser {
        session_id: s.id,
        user_id: s.user_id,
        email: s.email,
        role,
        csrf_token: s.csrf_token,
        client_addr,
    })
}

/// Starts a new session for `user_id` (a fresh id at every login). Returns the cookie header
/// value and the session's CSRF token.
pub async fn start(
    state: &AdminState,
    user_id: i64,
    client_addr: Option<String>,
) -> Result<(HeaderValue, String), AdminError> {
    let token = random_token();
    let csrf_token = random_token();
    state
        .manager
        .store
        .insert_session(&NewSession {
            token_digest: digest(&token),
            user_id,
            csrf_token: csrf_token.clone(),
            created_at: state.clock.now_ms(),
            client_addr,
        })
        .await?;
    let value = HeaderValue::from_str(&set_cookie(&token, state.secure_cookies))
        .map_err(|_| AdminError::Invalid("cannot build the session cookie".into()))?;
    Ok((value, csrf_token))
}

/// The `Set-Cookie` value for a session token: never readable by scripts, never sent by
/// another site, and `Secure` when `[admin] secure_cookies` says the console is behind TLS.
pub fn set_cookie(token: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={token}; Path=/admin; HttpOnly; SameSite=Strict{secure}")
}

/// A `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(state: &AdminState) -> HeaderValue {
    let value = set_cookie("", state.secure_cookies) + "; Max-Age=0";
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("keygate_session=; Max-Age=0"))
}

/// Failed-login throttling, in memory: counts per email and per client address.
pub struct Throttle {
    by_email: moka::future::Cache<String, u32>,
    by_addr: moka::future::Cache<String, u32>,
}

/// A login attempt, counted against its email's and address's budgets until it succeeds.
pub struct Attempt {
    email: String,
    addr: Option<String>,
}

impl Default for Throttle {
    fn default() -> Self {
        let cache = || {
            moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(THROTTLE_WINDOW)
                .build()
        };
        Throttle {
            by_email: cache(),
            by_addr: cache(),
        }
    }
}

impl Throttle {
    /// Counts a login attempt as a failure before its password is checked, so attempts sent
    /// at once cannot all pass one look at the budget; refuses it when its email or address
    /// has spent its budget. `succeeded` takes the count back.
    ///
    /// The email is counted as the login looks it up (trimmed, any case), so padding it with
    /// spaces or changing its case does not start a fresh budget.
    pub async fn begin(&self, email: &str, addr: Option<&str>) -> Result<Attempt, AdminError> {
        let email = email.trim().to_ascii_lowercase();
        if let Some(a) = addr {
            if !take(&self.by_addr, a, MAX_FAILURES_PER_ADDR).await {
                return Err(AdminError::Throttled);
            }
        }
        if !take(&self.by_email, &email, MAX_FAILURES_PER_EMAIL).await {
            if let Some(a) = addr {
                give_back(&self.by_addr, a).await;
            }
            return Err(AdminError::Throttled);
        }
        Ok(Attempt {
            email,
            addr: addr.map(str::to_string),
        })
    }

    /// A successful login clears its email's failures and takes back its address's count.
    pub async fn succeeded(&self, attempt: Attempt) {
        self.by_email.invalidate(&attempt.email).await;
        if let Some(a) = &attempt.addr {
            give_back(&self.by_addr, a).await;
        }
    }
}

/// Adds one to `key`'s count unless it has reached `budget`; whether it was added. One
/// atomic step per key, whatever runs at the same time.
async fn take(counts: &moka::future::Cache<String, u32>, key: &str, budget: u32) -> bool {
    let result = counts
        .entry_by_ref(key)
        .and_compute_with(|entry| {
            let n = entry.map_or(0, |e| e.into_value());
            std::future::ready(if n >= budget { Op::Nop } else { Op::Put(n + 1) })
        })
        .await;
    matches!(
        result,
        CompResult::Inserted(_) | CompResult::ReplacedWith(_)
    )
}

/// Takes one back from `key`'s count.
async fn give_back(counts: &moka::future::Cache<String, u32>, key: &str) {
    counts
        .entry_by_ref(key)
        .and_compute_with(|entry| {
            std::future::ready(match entry.map(|e| e.into_value()) {
                Some(n) if n > 1 => Op::Put(n - 1),
                Some(_) => Op::Remove,
                None => Op::Nop,
            })
        })
        .await;
}

/// Whether the browser says a request was sent from another site's page (`Sec-Fetch-Site:
/// cross-site`). Login CSRF: such a page must not sign this browser in to an account of the
/// attacker's choosing; there is no session yet whose token the request could carry. A client
/// that does not say is not a browser and is let through.
pub fn cross_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .is_some_and(|site| site.as_bytes().eq_ignore_ascii_case(b"cross-site"))
}

/// 32 random bytes as 64 hex characters.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    // Without randomness no safe session can be made; there is no sensible way to go on.
    getrandom::getrandom(&mut b).expect("the operating system's random generator failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the store keeps of a token: its BLAKE3 digest in hex.
pub fn digest(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; keygate_session=abc"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), None);
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_when_configured() {
        assert_eq!(
            set_cookie("t", false),
            "keygate_session=t; Path=/admin; HttpOnly; SameSite=Strict"
        );
        assert_eq!(
            set_cookie("t", true),
            "keygate_session=t; Path=/admin; HttpOnly; SameSite=Strict; Secure"
        );
    }

    #[test]
    fn tokens_are_random_and_stored_only_as_digests() {
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_ne!(digest(&a), a);
        assert_eq!(digest(&a), digest(&a));
    }

    #[test]
    fn csrf_comparison_needs_the_exact_token() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[tokio::test]
    async fn failed_logins_are_throttled_per_email_as_the_login_reads_it() {
        let t = Throttle::default();
        for _ in 0..MAX_FAILURES_PER_EMAIL {
            t.begin("A@example.com", Some("10.0.0.1"))
                .await
                .expect("within budget");
        }
        for spelling in ["a@example.com", " a@example.com", "\tA@EXAMPLE.com\n"] {
            assert!(matches!(
                t.begin(spelling, Some("10.0.0.2")).await,
                Err(AdminError::Throttled)
            ));
        }
        assert!(t.begin("b@example.com", Some("10.0.0.1")).await.is_ok());
    }

    #[tokio::test]
    async fn failed_logins_are_throttled_per_client_address_across_emails() {
        let t = Throttle::default();
        for i in 0..MAX_FAILURES_PER_ADDR {
            t.begin(&format!("user{i}@example.com"), Some("10.0.0.9"))
                .await
                .expect("within budget");
        }
        assert!(matches!(
            t.begin("fresh@example.com", Some("10.0.0.9")).await,
            Err(AdminError::Throttled)
        ));
        assert!(t
            .begin("fresh@example.com", Some("10.0.0.10"))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn attempts_at_once_get_no_more_than_the_budget() {
        let t = Arc::new(Throttle::default());
        let tries = (0..50).map(|_| {
            let t = t.clone();
            tokio::spawn(async move { t.begin("a@example.com", Some("10.0.0.1")).await.is_ok() })
        });
        let mut admitted = 0;
        for r in futures_util::future::join_all(tries).await {
            admitted += u32::from(r.expect("task"));
        }
        assert_eq!(admitted, MAX_FAILURES_PER_EMAIL);
    }

    #[tokio::test]
    async fn a_success_clears_its_email_and_takes_back_its_address_count() {
        let t = Throttle::default();
        for _ in 0..MAX_FAILURES_PER_EMAIL - 1 {
            t.begin("a@example.com", Some("10.0.0.1"))
                .await
                .expect("within budget");
        }
        let ok = t
            .begin("a@example.com", Some("10.0.0.1"))
            .await
            .expect("last try");
        t.succeeded(ok).await;
        assert_eq!(t.by_email.get("a@example.com").await, None);
        assert_eq!(
            t.by_addr.get("10.0.0.1").await,
            Some(MAX_FAILURES_PER_EMAIL - 1)
        );
    }
}
