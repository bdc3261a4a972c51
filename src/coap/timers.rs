//! The endpoint's timers as plain data: deadlines the caller passes in, no runtime timer. A
//! cancelled timer stays in the heap until its time and is skipped then.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

/// Names one armed timer, to cancel it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TimerId(u64);

/// Armed timers of type `T`, earliest first.
#[derive(Debug)]
pub(crate) struct Timers<T> {
    heap: BinaryHeap<Reverse<(Instant, TimerId)>>,
    armed: HashMap<TimerId, T>,
    next: u64,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            armed: HashMap::new(),
            next: 0,
        }
    }
}

impl<T> Timers<T> {
    /// Arms a timer firing at `at`.
    pub(crate) fn insert(&mut self, at: Instant, timer: T) -> TimerId {
        self.next += 1;
        let id = TimerId(self.next);
        self.heap.push(Reverse((at, id)));
        self.armed.insert(id, timer);
        id
    }

    /// Disarms a timer; nothing happens if it fired already.
    pub(crate) fn remove(&mut self, id: TimerId) {
        self.armed.remove(&id);
        // Without armed timers the heap holds only cancelled ones: drop them all at once.
        if self.armed.is_empty() {
            self.heap.clear();
        }
    }

    /// The earliest deadline of an armed timer.
    pub(crate) fn deadline(&mut self) -> Option<Instant> {
        self.skip_cancelled();
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The next timer due at `now`, disarmed.
    pub(crate) fn expired(&mut self, now: Instant) -> Option<T> {
        self.skip_cancelled();
        let Reverse((at, id)) = *self.heap.peek()?;
        if at > now {
            return None;
        }
        self.heap.pop();
        self.armed.remove(&id)
    }

    /// Armed timers.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.armed.len()
    }

    fn skip_cancelled(&mut self) {
        while let Some(Reverse((_, id))) = self.heap.peek() {
            if self.armed.contains_key(id) {
                break;
            }
            self.heap.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timers_fire_in_order_and_cancelled_ones_never() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let a = timers.insert(t0 + Duration::from_secs(2), "a");
        timers.insert(t0 + Duration::from_secs(3), "b");
        timers.insert(t0 + Duration::from_secs(1), "c");
        assert_eq!(timers.deadline(), Some(t0 + Duration::from_secs(1)));
        timers.remove(a);
        assert_eq!(timers.expired(t0), None);
        let now = t0 + Duration::from_secs(5);
        assert_eq!(timers.expired(now), Some("c"));
        assert_eq!(timers.expired(now), Some("b"));
        assert_eq!(timers.expired(now), None);
        assert_eq!((timers.deadline(), timers.len()), (None, 0));
    }
}
