//! Paced load: `count` slots at a fixed rate, handed out by a thread of its own and taken first
//! come, first served by whichever sender is free. An OS sleep wakes within tens of
//! microseconds of its slot; the runtime's timer rounds to the millisecond and would release
//! the sends of a millisecond together.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// How far behind its time a slot may be handed out before it counts as late.
pub const LATE: Duration = Duration::from_millis(1);

/// The slots of a paced run.
pub struct Schedule {
    slots: Semaphore,
    taken: AtomicU64,
    count: u64,
}

/// A running schedule: the slots, and the thread that hands them out, which ends with the
/// number of slots it handed out late.
pub struct Pacer {
    pub schedule: Arc<Schedule>,
    pub thread: JoinHandle<u64>,
}

impl Schedule {
    /// Hands out `count` slots at `rate` per second from `start`, then one more per sender
    /// (`senders`) to end each of them.
    pub fn start(rate: f64, count: u64, start: Instant, senders: u64) -> std::io::Result<Pacer> {
        let schedule = Arc::new(Self {
            slots: Semaphore::new(0),
            taken: AtomicU64::new(0),
            count,
        });
        let pacing = schedule.clone();
        let thread = std::thread::Builder::new()
            .name("pacer".to_owned())
            .spawn(move || pacing.pace(rate, start, senders))?;
        Ok(Pacer { schedule, thread })
    }

    /// Waits for the next slot and returns its number; `None` once all have been taken.
    pub async fn take(&self) -> Option<u64> {
        self.slots.acquire().await.ok()?.forget();
        let n = self.taken.fetch_add(1, Ordering::Relaxed);
        (n < self.count).then_some(n)
    }

    fn pace(&self, rate: f64, start: Instant, senders: u64) -> u64 {
        let mut late = 0;
        for n in 0..self.count {
            let at = slot_time(start, rate, n);
            let now = Instant::now();
            if now < at {
                std::thread::sleep(at - now);
            } else if now > at + LATE {
                late += 1;
            }
            self.slots.add_permits(1);
        }
        self.slots
            .add_permits(usize::try_from(senders).unwrap_or(usize::MAX));
        late
    }
}

/// When slot `n` of a run at `rate` per second from `start` is due.
pub fn slot_time(start: Instant, rate: f64, n: u64) -> Instant {
    start + Duration::from_secs_f64(n as f64 / rate)
}

impl Pacer {
    /// The number of slots handed out late; call once every sender has ended.
    pub fn late(self) -> u64 {
        self.thread.join().expect("the pacer does not panic")
    }
}
