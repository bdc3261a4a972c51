//! Identities from the config file: users with argon2 password hashes, and static bearer
//! tokens. Verified passwords are remembered (as a SHA-256 digest), so a client that sends the
//! same credentials on every request pays for argon2 once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use sha2::{Digest, Sha256};

use super::{AuthError, Principal};

/// Verified credentials remembered at most; the memory is cleared when it is full.
const CACHE_CAPACITY: usize = 4096;

/// A hash checked against when the user does not exist, so that the time taken does not tell
/// whether a user name is known.
const DECOY: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$ZmFrZWhhc2hmYWtlaGFzaGZha2VoYXNoZmFrZWhhc2g";

/// Users and tokens.
#[derive(Debug, Default)]
pub(crate) struct Identities {
    users: HashMap<String, (Arc<str>, String)>,
    tokens: HashMap<[u8; 32], Arc<str>>,
    verified: Mutex<HashMap<[u8; 32], Arc<str>>>,
}

impl Identities {
    /// Adds a user; `hash` must already be a valid PHC string.
    pub(crate) fn add_user(&mut self, name: &str, hash: &str) {
        self.users
            .insert(name.to_owned(), (Arc::from(name), hash.to_owned()));
    }

    /// Adds a static bearer token standing for `name`.
    pub(crate) fn add_token(&mut self, name: &str, token: &str) {
        self.tokens.insert(digest(&[token]), Arc::from(name));
    }

    /// Whether any user or token is configured.
    pub(crate) fn is_empty(&self) -> bool {
        self.users.is_empty() && self.tokens.is_empty()
    }

    /// The principal a token stands for.
    pub(crate) fn token(&self, token: &str) -> Result<Principal, AuthError> {
        self.tokens
            .get(&digest(&[token]))
            .map(|name| Principal::Named(name.clone()))
            .ok_or(AuthError::BadToken)
    }

    /// Whether these credentials were verified before (a cheap check).
    pub(crate) fn known(&self, user: &str, password: &str) -> Option<Principal> {
        let key = digest(&[user, "\0", password]);
        let verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        verified.get(&key).map(|n| Principal::Named(n.clone()))
    }

    /// Checks a user's password, or a token given as the password of the token's name.
    /// Takes tens of milliseconds on a first check (argon2): call it off the async threads.
    pub(crate) fn verify(&self, user: &str, password: &str) -> Result<Principal, AuthError> {
        if let Some(p) = self.known(user, password) {
            return Ok(p);
        }
        let name = match self.users.get(user) {
            Some((name, hash)) if check(hash, password) => name.clone(),
            Some(_) => return Err(AuthError::BadPassword),
            None => {
                // A token sent as the password of its own name is accepted too.
                if let Ok(Principal::Named(name)) = self.token(password)
                    && &*name == user
                {
                    return Ok(Principal::Named(name));
                }
                check(DECOY, password);
                return Err(AuthError::BadPassword);
            }
        };
        let key = digest(&[user, "\0", password]);
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= CACHE_CAPACITY {
            verified.clear();
        }
        verified.insert(key, name.clone());
        Ok(Principal::Named(name))
    }
}

fn check(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// Hashes a password for the config file: argon2id with the crate's recommended parameters
/// and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks that `hash` is a PHC string argon2 can verify against.
pub(crate) fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("is not a PHC string: {e}"))?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "uses {}; only argon2 hashes are accepted (make one with `topicgate passwd`)",
            parsed.algorithm
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_verify() {
        let hash = hash_password("s3cret").unwrap();
        check_hash(&hash).unwrap();
        assert!(check_hash("$pbkdf2$x").is_err());
        assert!(check_hash("plain").is_err());
        check_hash(DECOY).unwrap();
        let mut ids = Identities::default();
        ids.add_user("alice", &hash);
        ids.add_token("sensor", "tok-0123456789abcdef");
        assert!(ids.known("alice", "s3cret").is_none());
        assert_eq!(
            ids.verify("alice", "s3cret").unwrap(),
            Principal::Named(Arc::from("alice"))
        );
        assert!(ids.known("alice", "s3cret").is_some());
        assert_eq!(ids.verify("alice", "wrong"), Err(AuthError::BadPassword));
        assert_eq!(ids.verify("bob", "s3cret"), Err(AuthError::BadPassword));
        assert_eq!(
            ids.token("tok-0123456789abcdef").unwrap(),
            Principal::Named(Arc::from("sensor"))
        );
        assert!(ids.verify("sensor", "tok-0123456789abcdef").is_ok());
        assert!(ids.verify("other", "tok-0123456789abcdef").is_err());
        assert_eq!(ids.token("nope"), Err(AuthError::BadToken));
    }
}
