//! The one argon2 verifier behind every door: a fixed number of slots, each with a memory
//! buffer kept for the next check, and a bounded line of checks waiting for a slot.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use argon2::password_hash::Salt;
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use subtle::ConstantTimeEq;

/// Password hashes computed at once, whichever door asked. One, because each needs a buffer of
/// its hash's `m` KiB (9 MiB for the parameters `topicgate passwd` uses) that is kept for the
/// next: memory stays at one buffer, and a flood of guesses takes at most one core of the two
/// a small gateway has. Good credentials are remembered, so only first logins wait here.
pub(crate) const SLOTS: usize = 1;

/// Checks that may wait for a slot; one more is refused at once as busy. At 20–40 ms a hash,
/// the last of them waits about two seconds, well inside a client's connect timeout.
pub(crate) const QUEUE: usize = 64;

/// Every slot is taken and the line of waiting checks is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy;

/// A stored password hash, parsed once from its PHC string.
#[derive(Debug)]
pub(crate) struct Hashed {
    argon2: Argon2<'static>,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl Hashed {
    /// Parses an argon2 PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
    pub(crate) fn parse(phc: &str) -> Result<Self, String> {
        let parsed = PasswordHash::new(phc).map_err(|e| format!("is not a PHC string: {e}"))?;
        let algorithm = Algorithm::try_from(parsed.algorithm).map_err(|_| {
            format!(
                "uses {}; only argon2 hashes are accepted (make one with `topicgate passwd`)",
                parsed.algorithm
            )
        })?;
        let version = parsed
            .version
            .map_or(Ok(Version::default()), Version::try_from)
            .map_err(|e| format!("has an unknown argon2 version: {e}"))?;
        let params =
            Params::try_from(&parsed).map_err(|e| format!("has bad argon2 parameters: {e}"))?;
        let salt = parsed.salt.ok_or("has no salt")?;
        // A PHC salt is at most 64 base64 characters, 48 bytes.
        let mut buf = [0u8; Salt::MAX_LENGTH];
        let salt = salt
            .decode_b64(&mut buf)
            .map_err(|e| format!("has a bad salt: {e}"))?
            .to_vec();
        let hash = parsed.hash.ok_or("has no hash")?.as_bytes().to_vec();
        Ok(Self {
            argon2: Argon2::new(algorithm, version, params),
            salt,
            hash,
        })
    }

    /// A hash no password matches that costs as much to check as this one.
    pub(crate) fn decoy(&self) -> Self {
        Self {
            argon2: self.argon2.clone(),
            salt: b"topicgate-decoy!".to_vec(),
            hash: vec![0; self.hash.len()],
        }
    }

    /// The argon2 parameters of this hash.
    #[cfg(test)]
    pub(crate) fn params(&self) -> &Params {
        self.argon2.params()
    }

    /// argon2 blocks (KiB) a check of this hash needs.
    fn blocks(&self) -> usize {
        self.argon2.params().block_count()
    }
}

/// The slots, their buffers and the line waiting for them.
#[derive(Debug)]
pub(crate) struct Verifier {
    state: Mutex<State>,
    freed: Condvar,
    queue: usize,
}

#[derive(Debug)]
struct State {
    /// Buffers of the free slots; a check takes one and gives it back.
    idle: Vec<Vec<Block>>,
    /// Checks waiting for a slot.
    waiting: usize,
    /// Checks holding a slot, and the most there ever were (for tests and their assertions).
    running: usize,
    most_running: usize,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new(SLOTS, QUEUE)
    }
}

impl Verifier {
    /// A verifier with `slots` slots and room for `queue` waiting checks. Buffers are allocated
    /// by a slot's first check, so a gateway no one logs in to by password never pays for them.
    pub(crate) fn new(slots: usize, queue: usize) -> Self {
        Self {
            state: Mutex::new(State {
                idle: (0..slots.max(1)).map(|_| Vec::new()).collect(),
                waiting: 0,
                running: 0,
                most_running: 0,
            }),
            freed: Condvar::new(),
            queue,
        }
    }

    /// Takes a slot, waiting (blocking the thread) while the line is not full; refused at once
    /// when it is.
    pub(crate) fn slot(&self) -> Result<Slot<'_>, Busy> {
        let mut state = self.lock();
        // Once in the line, a check stays in it until a slot is free.
        let mut queued = false;
        let buffer = loop {
            if let Some(buffer) = state.idle.pop() {
                break buffer;
            }
            if !queued {
                if state.waiting >= self.queue {
                    return Err(Busy);
                }
                state.waiting += 1;
                queued = true;
            }
            state = self
                .freed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        };
        if queued {
            state.waiting -= 1;
        }
        state.running += 1;
        state.most_running = state.most_running.max(state.running);
        Ok(Slot {
            verifier: self,
            buffer,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks waiting for a slot now.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// The most checks that ever held a slot at once.
    #[cfg(test)]
    pub(crate) fn most_running(&self) -> usize {
        self.lock().most_running
    }
}

/// A held slot: its buffer goes back, and a waiting check is woken, when it is dropped.
pub(crate) struct Slot<'a> {
    verifier: &'a Verifier,
    buffer: Vec<Block>,
}

impl Slot<'_> {
    /// Whether `password` hashes to `hashed`, compared in constant time. A hash with a larger
    /// `m` than this slot's buffer grows the buffer, which is then kept: hashes come from the
    /// config file, so the pool never holds more than its slots times the largest `m` there.
    pub(crate) fn verify(&mut self, hashed: &Hashed, password: &[u8]) -> bool {
        let blocks = hashed.blocks();
        if self.buffer.len() < blocks {
            self.buffer.resize(blocks, Block::default());
        }
        let mut out = vec![0u8; hashed.hash.len()];
        hashed
            .argon2
            .hash_password_into_with_memory(
                password,
                &hashed.salt,
                &mut out,
                &mut self.buffer[..blocks],
            )
            .is_ok_and(|()| out.ct_eq(&hashed.hash).into())
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.verifier.lock();
        state.idle.push(std::mem::take(&mut self.buffer));
        state.running -= 1;
        drop(state);
        self.verifier.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};

    use super::*;

    fn hash_with(m: u32, t: u32, p: u32, password: &str) -> String {
        let salt = SaltString::generate(&mut OsRng);
        let params = Params::new(m, t, p, None).unwrap();
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    /// Waits, without sleeping, until `done` holds; panics after a deadline.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn hashes_of_any_size_verify_in_one_slot() {
        let verifier = Verifier::new(1, 4);
        let small = Hashed::parse(&hash_with(64, 1, 1, "pw")).unwrap();
        let large = Hashed::parse(&hash_with(4096, 1, 2, "pw")).unwrap();
        let mut slot = verifier.slot().unwrap();
        assert!(slot.verify(&small, b"pw"));
        // Larger than the buffer so far: the buffer grows and stays grown.
        assert!(slot.verify(&large, b"pw"));
        assert_eq!(slot.buffer.len(), 4096);
        assert!(!slot.verify(&large, b"pW"));
        // Smaller again: the front of the buffer serves.
        assert!(slot.verify(&small, b"pw"));
        assert!(!slot.verify(&small, b"p"));
        assert!(!slot.verify(&small, &[0xff, 0xfe]));
        drop(slot);
        assert_eq!(verifier.lock().idle[0].len(), 4096);
    }

    #[test]
    fn no_more_than_the_slots_hash_at_once() {
        let verifier = Arc::new(Verifier::new(2, 64));
        let hashed = Arc::new(Hashed::parse(&hash_with(2048, 2, 1, "pw")).unwrap());
        let threads: Vec<_> = (0..12)
            .map(|i| {
                let (verifier, hashed) = (verifier.clone(), hashed.clone());
                std::thread::spawn(move || {
                    let password: &[u8] = if i % 2 == 0 { b"pw" } else { b"wrong" };
                    verifier.slot().unwrap().verify(&hashed, password) == (i % 2 == 0)
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap());
        }
        let most = verifier.most_running();
        assert!((1..=2).contains(&most), "{most} checks ran at once");
        assert_eq!(verifier.lock().idle.len(), 2);
    }

    #[test]
    fn a_full_line_is_refused_at_once() {
        let verifier = Arc::new(Verifier::new(1, 2));
        let hashed = Arc::new(Hashed::parse(&hash_with(64, 1, 1, "pw")).unwrap());
        let held = verifier.slot().unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (verifier, hashed) = (verifier.clone(), hashed.clone());
                std::thread::spawn(move || verifier.slot().map(|mut s| s.verify(&hashed, b"pw")))
            })
            .collect();
        until("two checks wait", || verifier.waiting() == 2);
        assert!(matches!(verifier.slot(), Err(Busy)));
        drop(held);
        for w in waiters {
            assert_eq!(w.join().unwrap(), Ok(true));
        }
        assert_eq!(verifier.waiting(), 0);
        assert!(verifier.slot().is_ok());
    }
}
