//! Wall-clock time in Unix milliseconds, the unit every timestamp in keygate's tables uses.
//! Tests swap in a manual clock so that expiry and last-used rules are checked to the
//! millisecond without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where "now" comes from.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The operating system's clock.
    #[default]
    System,
    /// A clock that only moves when told to (tests).
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A manual clock starting at `start_ms`.
    pub fn manual(start_ms: i64) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(start_ms)))
    }

    /// The current time in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => system_now_ms(),
            Clock::Manual(t) => t.load(Ordering::Relaxed),
        }
    }

    /// Sets a manual clock; a no-op on the system clock.
    pub fn set_ms(&self, ms: i64) {
        if let Clock::Manual(t) = self {
            t.store(ms, Ordering::Relaxed);
        }
    }

    /// Moves a manual clock forward; a no-op on the system clock.
    pub fn advance_ms(&self, ms: i64) {
        if let Clock::Manual(t) = self {
            t.fetch_add(ms, Ordering::Relaxed);
        }
    }
}

/// The operating system's time in Unix milliseconds.
pub fn system_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Formats Unix milliseconds as RFC 3339 in UTC with second precision, the form the CLI,
/// the API and the expiry header use.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Parses an RFC 3339 timestamp (any offset) into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            format!("`{s}` is not an RFC 3339 timestamp ({e}); example: 2026-12-01T09:00:00Z")
        })
}

/// The longest duration `parse_duration_ms` accepts: 100 years, so that now plus any
/// duration is a time every engine, RFC 3339 and every client can hold.
const MAX_DURATION_MS: i64 = 36_500 * 86_400_000;

/// Parses a humane duration such as `90s`, `15m`, `7d` into milliseconds, at most 100 years.
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); examples: 30s, 15m, 7d"))?;
    i64::try_from(d.as_millis())
        .ok()
        .filter(|ms| *ms <= MAX_DURATION_MS)
        .ok_or_else(|| format!("`{s}` is longer than 100 years (36500d)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_through_milliseconds() {
        let ms = parse_rfc3339("2026-12-01T09:00:00Z").expect("valid timestamp");
        assert_eq!(rfc3339(ms), "2026-12-01T09:00:00Z");
        assert_eq!(parse_rfc3339("2026-12-01T10:00:00+01:00"), Ok(ms));
        assert!(parse_rfc3339("tomorrow").is_err());
    }

    #[test]
    fn durations_accept_days() {
        assert_eq!(parse_duration_ms("7d"), Ok(7 * 86_400_000));
        assert!(parse_duration_ms("7 fortnights").is_err());
    }

    #[test]
    fn durations_past_100_years_are_refused_not_wrapped() {
        assert_eq!(parse_duration_ms("36500d"), Ok(MAX_DURATION_MS));
        for long in [
            "36501d",
            "9223372036854775s",
            "18446744073709552s",
            "106751991d",
        ] {
            let e = parse_duration_ms(long).expect_err(long);
            assert!(e.contains("longer than 100 years"), "{long}: {e}");
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000);
        c.advance_ms(500);
        assert_eq!(c.now_ms(), 1_500);
        c.set_ms(10);
        assert_eq!(c.now_ms(), 10);
    }
}
