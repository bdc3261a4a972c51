//! Identities from the config file: users with argon2 password hashes, and static bearer
//! tokens. Checked credentials are remembered (as a SHA-256 digest), good and bad alike, so a
//! client repeating them, or a flood repeating one guess, pays for argon2 once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Params, Version};
use sha2::{Digest, Sha256};

use super::verifier::{Hashed, Verifier};
use super::{AuthError, LoginError, Principal};

/// Credentials remembered at most, in each of the two memories; a full one is cleared.
const CACHE_CAPACITY: usize = 4096;

/// A hash checked against when the user does not exist, so that the time taken does not tell
/// whether a user name is known; once a user is configured, one with that user's parameters.
const DECOY: &str =
    "$argon2id$v=19$m=9216,t=4,p=1$c2FsdHNhbHRzYWx0$ZmFrZWhhc2hmYWtlaGFzaGZha2VoYXNoZmFrZWhhc2g";

/// The argon2id parameters `topicgate passwd` uses (memory KiB, passes, lanes): one of the
/// configurations OWASP's Password Storage Cheat Sheet lists as equally strong (with 19 MiB and
/// 2 passes, or 12 MiB and 3), the one with the least memory for its cost in time, since the
/// memory of a check is what a flood of guesses makes a small gateway hold.
const PARAMS: (u32, u32, u32) = (9216, 4, 1);

/// Users and tokens, and the verifier their passwords are checked by.
#[derive(Debug)]
pub(crate) struct Identities {
    /// Each user's name and parsed hash; `None` for a hash that does not parse (config
    /// validation refuses those), which matches no password.
    users: HashMap<String, (Arc<str>, Option<Hashed>)>,
    tokens: HashMap<[u8; 32], Arc<str>>,
    decoy: Option<Hashed>,
    verifier: Verifier,
    /// Digests of credentials that passed, with whom they name.
    verified: Mutex<HashMap<[u8; 32], Arc<str>>>,
    /// Digests of credentials that failed. Answering those at once tells a client no more than
    /// it was told the first time (that these credentials are wrong); and since identities do
    /// not change while the gateway runs, a failed pair cannot become right.
    failed: Mutex<HashSet<[u8; 32]>>,
}

impl Default for Identities {
    fn default() -> Self {
        Self::with_verifier(Verifier::default())
    }
}

impl Identities {
    /// No identities yet, checked by `verifier`.
    pub(crate) fn with_verifier(verifier: Verifier) -> Self {
        Self {
            users: HashMap::new(),
            tokens: HashMap::new(),
            decoy: Hashed::parse(DECOY).ok(),
            verifier,
            verified: Mutex::default(),
            failed: Mutex::default(),
        }
    }

    /// Adds a user; `hash` must already be a valid PHC string.
    pub(crate) fn add_user(&mut self, name: &str, hash: &str) {
        let hashed = Hashed::parse(hash).ok();
        if self.users.is_empty()
            && let Some(hashed) = &hashed
        {
            self.decoy = Some(hashed.decoy());
        }
        self.users
            .insert(name.to_owned(), (Arc::from(name), hashed));
    }

    /// Adds a static bearer token standing for `name`.
    pub(crate) fn add_token(&mut self, name: &str, token: &str) {
        self.tokens
            .insert(digest(&[token.as_bytes()]), Arc::from(name));
    }

    /// Whether any user or token is configured.
    pub(crate) fn is_empty(&self) -> bool {
        self.users.is_empty() && self.tokens.is_empty()
    }

    /// The principal a token stands for.
    pub(crate) fn token(&self, token: &[u8]) -> Result<Principal, AuthError> {
        self.tokens
            .get(&digest(&[token]))
            .map(|name| Principal::Named(name.clone()))
            .ok_or(AuthError::BadToken)
    }

    /// The verdict on a user name and password when it needs no hashing: credentials checked
    /// before, or a token given as the password of its name. `None` when argon2 must run.
    pub(crate) fn cached(
        &self,
        user: &str,
        password: &[u8],
    ) -> Option<Result<Principal, AuthError>> {
        let key = credentials(user, password);
        if let Some(name) = lock(&self.verified).get(&key) {
            return Some(Ok(Principal::Named(name.clone())));
        }
        if lock(&self.failed).contains(&key) {
            return Some(Err(AuthError::BadPassword));
        }
        if !self.users.contains_key(user)
            && let Ok(Principal::Named(name)) = self.token(password)
            && &*name == user
        {
            return Some(Ok(Principal::Named(name)));
        }
        None
    }

    /// Checks a user's password, or a token given as the password of the token's name. A first
    /// check runs argon2 in the verifier's slot, blocking the thread while it waits for one
    /// and while it hashes (tens of milliseconds): call it off the async threads.
    pub(crate) fn verify(&self, user: &str, password: &[u8]) -> Result<Principal, LoginError> {
        if let Some(verdict) = self.cached(user, password) {
            return Ok(verdict?);
        }
        let mut slot = self.verifier.slot().map_err(|_| LoginError::Busy)?;
        // A check of the same credentials may have finished while this one waited: a flood
        // repeating one guess then costs one hash, not one per waiting copy.
        if let Some(verdict) = self.cached(user, password) {
            return Ok(verdict?);
        }
        let user_hash = self.users.get(user);
        let matched = match user_hash {
            Some((name, Some(hashed))) => slot.verify(hashed, password).then(|| name.clone()),
            // An unknown user (or an unparsable hash) costs as much as a wrong password.
            _ => {
                if let Some(decoy) = &self.decoy {
                    slot.verify(decoy, password);
                }
                None
            }
        };
        drop(slot);
        let key = credentials(user, password);
        match matched {
            Some(name) => {
                remember(
                    &self.verified,
                    |m| m.len(),
                    |m| {
                        m.insert(key, name.clone());
                    },
                );
                Ok(Principal::Named(name))
            }
            None => {
                remember(
                    &self.failed,
                    |s| s.len(),
                    |s| {
                        s.insert(key);
                    },
                );
                Err(AuthError::BadPassword.into())
            }
        }
    }
}

/// Adds to a memory of credentials, clearing it first when it is full.
fn remember<T: Default>(memory: &Mutex<T>, len: impl Fn(&T) -> usize, add: impl FnOnce(&mut T)) {
    let mut memory = lock(memory);
    if len(&memory) >= CACHE_CAPACITY {
        *memory = T::default();
    }
    add(&mut memory);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The key of a user name and password: the name's length goes first, so that no other split
/// of the same bytes into a name and a password has the same key.
fn credentials(user: &str, password: &[u8]) -> [u8; 32] {
    let len = (user.len() as u64).to_le_bytes();
    digest(&[&len, user.as_bytes(), password])
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Hashes a password for the config file: argon2id with the crate's recommended parameters
/// and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    let (m, t, p) = PARAMS;
    let params = Params::new(m, t, p, None).map_err(|e| e.to_string())?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks that `hash` is an argon2 PHC string the verifier can use.
pub(crate) fn check_hash(hash: &str) -> Result<(), String> {
    Hashed::parse(hash).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Result<Principal, LoginError> {
        Ok(Principal::Named(Arc::from(name)))
    }

    #[test]
    fn new_hashes_hold_9_mib_and_unknown_users_cost_what_the_configured_ones_do() {
        let hash = hash_password("pw").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=9216,t=4,p=1$"), "{hash}");
        let mut ids = Identities::default();
        let old = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$ZmFrZWhhc2hmYWtlaGFzaGZha2VoYXNoZmFrZWhhc2g";
        ids.add_user("old", old);
        let decoy = ids.decoy.as_ref().unwrap();
        assert_eq!(decoy.params(), Hashed::parse(old).unwrap().params());
        assert_eq!(
            ids.verify("nobody", b"pw"),
            Err(AuthError::BadPassword.into())
        );
    }

    #[test]
    fn passwords_and_tokens_verify() {
        let hash = hash_password("s3cret").unwrap();
        check_hash(&hash).unwrap();
        assert!(check_hash("$pbkdf2$x").is_err());
        assert!(check_hash("$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaA").is_err());
        assert!(check_hash("plain").is_err());
        check_hash(DECOY).unwrap();
        let mut ids = Identities::default();
        assert!(ids.decoy.is_some());
        ids.add_user("alice", &hash);
        ids.add_token("sensor", "tok-0123456789abcdef");
        assert!(ids.cached("alice", b"s3cret").is_none());
        assert_eq!(ids.verify("alice", b"s3cret"), named("alice"));
        assert_eq!(
            ids.cached("alice", b"s3cret"),
            Some(Ok(Principal::Named(Arc::from("alice"))))
        );
        let wrong = Err(LoginError::Refused(AuthError::BadPassword));
        assert_eq!(ids.verify("alice", b"wrong"), wrong);
        assert_eq!(ids.verify("alice", b"s3cret\xff"), wrong);
        assert_eq!(ids.verify("alice", &[0xc3, 0x28]), wrong);
        assert_eq!(ids.verify("bob", b"s3cret"), wrong);
        assert_eq!(
            ids.token(b"tok-0123456789abcdef").unwrap(),
            Principal::Named(Arc::from("sensor"))
        );
        assert_eq!(
            ids.verify("sensor", b"tok-0123456789abcdef"),
            named("sensor")
        );
        assert_eq!(ids.verify("other", b"tok-0123456789abcdef"), wrong);
        assert_eq!(ids.token(b"nope"), Err(AuthError::BadToken));
    }

    #[test]
    fn checked_credentials_are_answered_without_argon2() {
        // No room to wait: whatever needs a hash while the slot is held is refused as busy.
        let mut ids = Identities::with_verifier(Verifier::new(1, 0));
        ids.add_user("alice", &hash_password("s3cret").unwrap());
        let wrong = Err(LoginError::Refused(AuthError::BadPassword));
        assert_eq!(ids.verify("alice", b"s3cret"), named("alice"));
        assert_eq!(ids.verify("alice", b"guess"), wrong);
        assert_eq!(ids.verify("mallory", b"guess"), wrong);
        let held = ids.verifier.slot().unwrap();
        assert_eq!(ids.verify("alice", b"s3cret"), named("alice"));
        assert_eq!(ids.verify("alice", b"guess"), wrong);
        assert_eq!(ids.verify("mallory", b"guess"), wrong);
        assert_eq!(ids.verify("alice", b"other guess"), Err(LoginError::Busy));
        assert_eq!(ids.verify("mallory", b"other guess"), Err(LoginError::Busy));
        drop(held);
        // A busy answer is not remembered as a failure.
        assert_eq!(ids.cached("alice", b"other guess"), None);
        // The user name's length is part of the key: another split of the same bytes is
        // another pair of credentials.
        assert_eq!(ids.cached("alice\0s3", b"cret"), None);
    }

    #[test]
    fn the_memory_of_failures_is_bounded() {
        let mut ids = Identities::default();
        ids.add_user("alice", &hash_password("s3cret").unwrap());
        for i in 0..CACHE_CAPACITY + 10 {
            remember(
                &ids.failed,
                |s| s.len(),
                |s| {
                    s.insert(credentials("alice", format!("guess {i}").as_bytes()));
                },
            );
        }
        assert!(lock(&ids.failed).len() <= CACHE_CAPACITY);
    }
}
