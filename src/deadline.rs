//! A deadline that moves far more often than it passes: an MQTT connection's keep-alive moves
//! with every packet, a CoAP endpoint's next timer with most datagrams.
//!
//! Its one tokio timer is armed when waited on and, when it fires before a deadline that moved
//! later meanwhile, armed again for that one; only a deadline moved earlier resets it at once.
//! A timer set anew on every move would enter the runtime's timer wheel and leave it again
//! each time.

use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// See the module documentation.
pub(crate) struct Deadline {
    at: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Default for Deadline {
    fn default() -> Self {
        Self {
            at: None,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: None,
        }
    }
}

impl Deadline {
    /// Moves the deadline, or clears it with `None`.
    pub(crate) fn set(&mut self, at: Option<Instant>) {
        self.at = at;
    }

    /// Resolves once the deadline has passed, with the deadline, which is then cleared; never
    /// while there is none.
    pub(crate) async fn passed(&mut self) -> Instant {
        loop {
            let Some(at) = self.at else {
                return std::future::pending().await;
            };
            // A later deadline waits for the timer armed earlier; an earlier one cannot.
            if self.armed.is_none_or(|armed| armed > at) {
                self.timer.as_mut().reset(at);
                self.armed = Some(at);
            }
            self.timer.as_mut().await;
            self.armed = None;
            if Instant::now() >= at {
                self.at = None;
                return at;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn passes_at_the_last_deadline_set_and_not_before() {
        let start = Instant::now();
        let mut deadline = Deadline::default();
        deadline.set(Some(start + Duration::from_secs(1)));
        // Armed for 1 s, then moved on to 3 s: the timer fires at 1 s and waits again.
        let first = tokio::time::timeout(Duration::from_millis(500), deadline.passed()).await;
        assert!(first.is_err(), "passed before its deadline");
        deadline.set(Some(start + Duration::from_secs(3)));
        assert_eq!(deadline.passed().await, start + Duration::from_secs(3));
        assert!(Instant::now() >= start + Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_earlier_passes_early_and_none_never_passes() {
        let start = Instant::now();
        let mut deadline = Deadline::default();
        deadline.set(Some(start + Duration::from_secs(10)));
        let waited = tokio::time::timeout(Duration::from_secs(1), deadline.passed()).await;
        assert!(waited.is_err());
        deadline.set(Some(start + Duration::from_secs(2)));
        assert_eq!(deadline.passed().await, start + Duration::from_secs(2));
        assert!(Instant::now() < start + Duration::from_secs(10));
        // Passed once, the deadline is cleared.
        let again = tokio::time::timeout(Duration::from_secs(60), deadline.passed()).await;
        assert!(again.is_err(), "a cleared deadline passed");
    }
}
