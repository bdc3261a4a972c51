//! When a push is tried again: exponential backoff with jitter, and `Retry-After`.

use std::time::{Duration, SystemTime};

/// The wait before attempt `attempts + 1`: `base` doubled per failure up to `max`, then a
/// random point in its upper half, so that many rules failing together spread out.
pub(crate) fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let doubled = base.saturating_mul(1 << attempts.saturating_sub(1).min(20));
    let full = doubled.min(max);
    full / 2 + full.mul_f64(rand::random::<f64>() / 2.0)
}

/// `Retry-After` in seconds or as an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value.trim()).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(1));
        for (attempts, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let wait = backoff(base, max, attempts);
            let full = Duration::from_millis(full);
            assert!(wait >= full / 2 && wait <= full, "{attempts}: {wait:?}");
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        let wait = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
