//! The one `info` line of a refused or closed client, whatever its protocol: its address and the
//! reason, at most [`PER_SECOND`] lines a second for the process; the rest are counted and told
//! as "suppressed N similar" with the next line let through, so a flood cannot fill the disk.

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusal lines logged in one second at most.
pub const PER_SECOND: u32 = 20;

static LIMITER: Limiter = Limiter::new(PER_SECOND);

/// Logs that the client at `peer`, speaking `protocol` (`http`, `https`, `coap`, `mqtt`...),
/// was refused or closed, and why; rate-limited.
pub fn log(protocol: &'static str, peer: SocketAddr, reason: &dyn Display) {
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    match LIMITER.admit(Instant::now()) {
        Admit::Log { suppressed: 0 } => {}
        Admit::Log { suppressed } => {
            tracing::info!(
                suppressed,
                "suppressed {suppressed} similar lines of refused clients"
            );
        }
        Admit::Suppress => return,
    }
    tracing::info!(protocol, %peer, reason = %reason, "client refused");
}

/// A fixed one-second window of at most `per_second` admissions.
#[derive(Debug)]
pub struct Limiter {
    per_second: u32,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

/// Whether a line may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it, after a summary of the `suppressed` lines dropped before it, if any.
    Log {
        /// Lines dropped since the last one written.
        suppressed: u64,
    },
    /// Drop it; it is counted.
    Suppress,
}

impl Limiter {
    /// A limiter of `per_second` lines a second.
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: Mutex::new(Window {
                start: None,
                admitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// Decides about one line at `now`.
    pub fn admit(&self, now: Instant) -> Admit {
        // A poisoned lock only means another thread panicked while counting: keep counting.
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = w
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if fresh {
            w.start = Some(now);
            w.admitted = 0;
        }
        if w.admitted < self.per_second {
            w.admitted += 1;
            Admit::Log {
                suppressed: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed += 1;
            Admit::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_rate_and_summarised_after() {
        let limiter = Limiter::new(3);
        let t0 = Instant::now();
        let decisions: Vec<Admit> = (0..10).map(|_| limiter.admit(t0)).collect();
        assert_eq!(
            decisions.iter().filter(|d| **d == Admit::Suppress).count(),
            7
        );
        assert_eq!(decisions[0], Admit::Log { suppressed: 0 });
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(limiter.admit(later), Admit::Log { suppressed: 7 });
        assert_eq!(limiter.admit(later), Admit::Log { suppressed: 0 });
    }
}
