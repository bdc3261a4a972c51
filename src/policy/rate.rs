//! Request rates: one token bucket per principal, or per address for anonymous clients
//! (GCRA, from the governor crate). A client over its rate is told when to come back; the
//! others are not slowed.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Buckets kept before idle ones are forgotten.
const TIDY_ABOVE: usize = 10_000;

/// The buckets of every client.
pub(crate) struct Rates {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl Rates {
    /// `per_second` requests a second, bursts of up to `burst`.
    pub(crate) fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one token from `key`'s bucket, or says in whole seconds (at least one, as
    /// Retry-After and Max-Age count) when one is available.
    pub(crate) fn admit(&self, key: &str) -> Result<(), u64> {
        // A full bucket holds no information: forgetting it loses nothing.
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(4096)
            && self.limiter.len() > TIDY_ABOVE
        {
            self.limiter.retain_recent();
        }
        match self.limiter.check_key(&key.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(whole_seconds(not_until.wait_time_from(self.clock.now()))),
        }
    }
}

/// Rounded up, at least one: a client told 0 would come straight back.
fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_each_key_is_limited_alone() {
        let rates = Rates::new(NonZeroU32::new(1).unwrap(), NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            assert!(rates.admit("a").is_ok());
        }
        assert_eq!(rates.admit("a"), Err(1));
        assert!(rates.admit("b").is_ok());
    }

    #[test]
    fn waits_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(2001)), 3);
    }
}
