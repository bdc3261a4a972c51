//! Who is asking and what they may do: identities, one topic ACL, topic limits and request
//! rates. One [`Policy`] serves every door: the HTTP middleware, the CoAP handler and the MQTT
//! codec ask it the same questions and get the same answers.

mod acl;
mod identity;
mod rate;
mod verifier;

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use acl::Readable;
pub(crate) use acl::intersect;
pub use identity::hash_password;

/// Where the replies to `/rpc` requests are published, one fresh topic per request. No
/// principal may read these topics, whatever the ACL grants: a reply goes only to the request
/// that waits for it, inside the gateway. Publishing to them follows the ACL.
pub const REPLY_PREFIX: &str = "rpc/replies/";
/// The filter of every reply topic.
const REPLY_FILTER: &str = "rpc/replies/#";

use crate::config::{AclAccess, AuthConfig, LimitsConfig};
use crate::topic::TopicFilter;

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A client without credentials.
    Anonymous,
    /// A user, a token's name, or a TLS client certificate's common name.
    Named(Arc<str>),
}

impl Principal {
    /// The name, or `None` for anonymous.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Anonymous => None,
            Self::Named(n) => Some(n),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name().unwrap_or("anonymous"))
    }
}

/// Why a client was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials, and anonymous access is off.
    #[error("credentials are required")]
    Required,
    /// The user name or password is wrong.
    #[error("the user name or password is wrong")]
    BadPassword,
    /// The token is not known.
    #[error("the token is not valid")]
    BadToken,
}

/// Why a user name and password were not let in: refused, or not checked because too many
/// password checks are waiting already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// The credentials were checked, or needed no check, and are refused.
    #[error(transparent)]
    Refused(#[from] AuthError),
    /// Not checked: the line of password checks is full. Worth retrying in a second.
    #[error("the gateway is busy checking other logins, try again shortly")]
    Busy,
}

/// What a client wants to do with a topic or filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publish to a topic (or clear its retained value).
    Publish,
    /// Read a topic's retained value.
    Read,
}

/// Why a topic or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The ACL does not grant it, and the client gave no credentials.
    #[error("this needs credentials")]
    Unauthenticated,
    /// The ACL does not grant it to this principal.
    #[error("{0} may not do this on this topic")]
    Forbidden(String),
    /// Longer than `limits.max_topic_length`.
    #[error("the topic is longer than {0} bytes")]
    TooLong(usize),
    /// More levels than `limits.max_topic_levels`.
    #[error("the topic has more than {0} levels")]
    TooDeep(usize),
}

/// The protocol a client came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// MQTT, plain or over TLS.
    Mqtt = 0,
    /// HTTP, plain or over TLS.
    Http = 1,
    /// CoAP.
    Coap = 2,
}

/// What a refusal was for, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Failed login: missing or wrong credentials.
    Login = 0,
    /// The ACL refused an action.
    Acl = 1,
    /// Over the request rate.
    Rate = 2,
}

const DOORS: [(Door, &str); 3] = [
    (Door::Mqtt, "mqtt"),
    (Door::Http, "http"),
    (Door::Coap, "coap"),
];
const REFUSALS: [(Refusal, &str); 3] = [
    (Refusal::Login, "login"),
    (Refusal::Acl, "acl"),
    (Refusal::Rate, "rate"),
];

/// A cheap, cloneable handle to the policy.
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Inner>,
}

struct Inner {
    identities: identity::Identities,
    acl: acl::Acl,
    allow_anonymous: bool,
    max_topic_length: usize,
    max_topic_levels: usize,
    rates: Option<rate::Rates>,
    refusals: [[AtomicU64; 3]; 3],
}

impl Policy {
    /// Builds the policy from checked config sections.
    pub fn new(auth: &AuthConfig, limits: &LimitsConfig) -> Self {
        let mut identities = identity::Identities::default();
        for user in &auth.users {
            identities.add_user(&user.name, &user.password_hash);
        }
        for token in &auth.tokens {
            identities.add_token(&token.name, &token.token);
        }
        let rules = auth
            .acl
            .iter()
            .map(|r| acl::Rule {
                who: match r.user.as_str() {
                    "*" => acl::Who::Everyone,
                    "anonymous" => acl::Who::Anonymous,
                    name => acl::Who::Named(name.to_owned()),
                },
                pattern: r.topic.clone(),
                grant: acl::Grant {
                    read: matches!(r.access, AclAccess::Read | AclAccess::ReadWrite),
                    write: matches!(r.access, AclAccess::Write | AclAccess::ReadWrite),
                    deny: r.access == AclAccess::Deny,
                },
            })
            .collect();
        let allow_anonymous = auth.allow_anonymous.unwrap_or(identities.is_empty());
        let rates = NonZeroU32::new(limits.rate).map(|rate| {
            let burst = NonZeroU32::new(limits.burst).unwrap_or(rate);
            rate::Rates::new(rate, burst)
        });
        Self {
            inner: Arc::new(Inner {
                identities,
                acl: acl::Acl::new(rules),
                allow_anonymous,
                max_topic_length: limits.max_topic_length,
                max_topic_levels: limits.max_topic_levels,
                rates,
                refusals: Default::default(),
            }),
        }
    }

    /// A policy that lets everyone do everything, with the default topic limits.
    pub fn open() -> Self {
        Self::new(&AuthConfig::default(), &LimitsConfig::default())
    }

    /// Whether no identity and no ACL rule is configured: the Mosquitto 2 default posture,
    /// where a listener on a non-loopback address deserves a warning.
    pub fn is_unprotected(&self) -> bool {
        self.inner.allow_anonymous && self.inner.acl.is_open()
    }

    /// The principal of a client that sent no credentials.
    pub fn anonymous(&self) -> Result<Principal, AuthError> {
        if self.inner.allow_anonymous {
            Ok(Principal::Anonymous)
        } else {
            Err(AuthError::Required)
        }
    }

    /// The principal of a TLS client certificate the configured CA signed: its common name.
    pub fn certificate(&self, common_name: &str) -> Principal {
        Principal::Named(Arc::from(common_name))
    }

    /// The principal of a bearer token. A gateway with no user or token configured that lets
    /// anonymous clients in takes any token as anonymous, as it does a user name and password.
    pub fn token(&self, token: &str) -> Result<Principal, AuthError> {
        if self.is_open() {
            return Ok(Principal::Anonymous);
        }
        self.inner.identities.token(token.as_bytes())
    }

    /// Logs in with a user name and password, or with a token as the password of its name.
    /// With no user or token configured, anonymous access on, the client is let in as
    /// anonymous, as Mosquitto does with `allow_anonymous true`; with identities configured,
    /// wrong credentials are refused, never taken as anonymous. Credentials checked before are
    /// answered at once; new ones wait for the one argon2 verifier that every door shares
    /// (tens of milliseconds and more, blocking the thread: call it where blocking is allowed)
    /// or, when too many checks wait already, are refused at once as [`LoginError::Busy`].
    pub fn login(&self, user: &str, password: &[u8]) -> Result<Principal, LoginError> {
        match self.login_cached(user, password) {
            Some(verdict) => verdict,
            None => self.inner.identities.verify(user, password),
        }
    }

    /// What [`Policy::login`] answers when that needs no argon2, without blocking; `None` when
    /// it does and `login` must run where blocking is allowed.
    pub fn login_cached(
        &self,
        user: &str,
        password: &[u8],
    ) -> Option<Result<Principal, LoginError>> {
        if self.is_open() {
            return Some(Ok(Principal::Anonymous));
        }
        if self.inner.identities.is_empty() {
            // No one to log in as, and anonymous access off: nothing can match.
            return Some(Err(AuthError::BadPassword.into()));
        }
        let verdict = self.inner.identities.cached(user, password)?;
        Some(verdict.map_err(LoginError::from))
    }

    /// Whether anyone is let in whatever credentials they bring: no user or token to check
    /// them against, and anonymous access on.
    fn is_open(&self) -> bool {
        self.inner.allow_anonymous && self.inner.identities.is_empty()
    }

    /// Checks a topic or filter against the length and depth limits.
    pub fn check_topic(&self, topic: &str) -> Result<(), Denial> {
        if topic.len() > self.inner.max_topic_length {
            return Err(Denial::TooLong(self.inner.max_topic_length));
        }
        // Counting separators stops early: a long topic of slashes costs no more than its limit.
        let levels = 1 + topic
            .bytes()
            .filter(|&b| b == b'/')
            .take(self.inner.max_topic_levels)
            .count();
        if levels > self.inner.max_topic_levels {
            return Err(Denial::TooDeep(self.inner.max_topic_levels));
        }
        Ok(())
    }

    /// Whether `who` may do `action` on `topic`; the topic limits are checked first.
    pub fn authorize(&self, who: &Principal, action: Action, topic: &str) -> Result<(), Denial> {
        self.check_topic(topic)?;
        let allowed = match action {
            Action::Publish => self.inner.acl.may_write(who, topic),
            Action::Read if topic.starts_with(REPLY_PREFIX) => return Err(reserved(who)),
            Action::Read => self.inner.acl.may_read(who, topic),
        };
        if allowed { Ok(()) } else { Err(deny(who)) }
    }

    /// The part of `filter` that `who` may subscribe to; refused when no readable topic can
    /// match it.
    pub fn subscription(&self, who: &Principal, filter: &str) -> Result<Readable, Denial> {
        self.check_topic(filter)?;
        if acl::covers(REPLY_FILTER, filter) {
            return Err(reserved(who));
        }
        let readable = self.inner.acl.readable(who, filter);
        if matches!(readable, Readable::Nothing) {
            return Err(deny(who));
        }
        if acl::intersect(REPLY_FILTER, filter).is_none() {
            return Ok(readable);
        }
        Ok(match readable {
            Readable::Except(base, mut denied) => {
                denied.push(REPLY_FILTER.to_owned());
                Readable::Except(base, denied)
            }
            base => Readable::Except(Box::new(base), vec![REPLY_FILTER.to_owned()]),
        })
    }

    /// The rate bucket of a client: its principal's name, or what `anonymous` makes (an
    /// address, a client id) for a client without one.
    pub fn client_key(who: &Principal, anonymous: impl FnOnce() -> String) -> String {
        match who {
            Principal::Named(name) => format!("user:{name}"),
            Principal::Anonymous => anonymous(),
        }
    }

    /// Whether requests are rate-limited at all; when not, callers need no bucket key.
    pub fn limits_rate(&self) -> bool {
        self.inner.rates.is_some()
    }

    /// Takes one request from the bucket of `key`, or says in whole seconds (at least one)
    /// when to come back.
    pub fn admit(&self, key: &str) -> Result<(), u64> {
        match &self.inner.rates {
            Some(rates) => rates.admit(key),
            None => Ok(()),
        }
    }
}

impl Policy {
    /// Counts a refusal at a door.
    pub fn count(&self, door: Door, refusal: Refusal) {
        self.inner.refusals[door as usize][refusal as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every refusal count, as (protocol, reason, count).
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        DOORS.iter().flat_map(move |&(door, d)| {
            REFUSALS.iter().map(move |&(refusal, r)| {
                let n =
                    self.inner.refusals[door as usize][refusal as usize].load(Ordering::Relaxed);
                (d, r, n)
            })
        })
    }
}

fn deny(who: &Principal) -> Denial {
    match who {
        Principal::Anonymous => Denial::Unauthenticated,
        Principal::Named(name) => Denial::Forbidden(name.to_string()),
    }
}

/// The refusal to read a reply topic: no credentials would help, so it is never "needs
/// credentials".
fn reserved(who: &Principal) -> Denial {
    Denial::Forbidden(who.to_string())
}

/// Checks a password hash from the config file.
pub fn check_hash(hash: &str) -> Result<(), String> {
    identity::check_hash(hash)
}

/// Checks an ACL pattern: a topic filter in which `%u` stands for the principal's name.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    TopicFilter::parse(pattern)
        .map(drop)
        .map_err(|e| format!("{pattern:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TokenEntry, UserEntry};

    fn policy(allow_anonymous: Option<bool>, users: &[(&str, &str)]) -> Policy {
        let auth = AuthConfig {
            allow_anonymous,
            users: users
                .iter()
                .map(|&(name, password)| UserEntry {
                    name: name.to_owned(),
                    password_hash: hash_password(password).unwrap(),
                })
                .collect(),
            ..AuthConfig::default()
        };
        Policy::new(&auth, &LimitsConfig::default())
    }

    #[test]
    fn reply_topics_are_never_readable() {
        let open = Policy::open();
        let alice = Principal::Named(Arc::from("alice"));
        for who in [&Principal::Anonymous, &alice] {
            let topic = "rpc/replies/0123";
            assert!(open.authorize(who, Action::Read, topic).is_err());
            assert!(open.authorize(who, Action::Publish, topic).is_ok());
            for filter in ["rpc/replies/#", "rpc/replies/+", topic] {
                assert!(open.subscription(who, filter).is_err(), "{filter}");
            }
            for filter in ["#", "rpc/#", "+/replies/+"] {
                let readable = open.subscription(who, filter).unwrap();
                assert!(!readable.admits(topic), "{filter}");
                assert!(readable.admits("rpc/other"), "{filter}");
            }
            assert_eq!(open.subscription(who, "home/#"), Ok(Readable::All));
            assert!(open.authorize(who, Action::Read, "rpc/reply").is_ok());
        }
    }

    #[test]
    fn an_open_gateway_takes_credentials_as_anonymous() {
        for open in [Policy::open(), policy(Some(true), &[])] {
            assert_eq!(open.login("someone", b"secret"), Ok(Principal::Anonymous));
            assert_eq!(open.login("", &[0xff]), Ok(Principal::Anonymous));
            assert_eq!(
                open.login_cached("someone", b"secret"),
                Some(Ok(Principal::Anonymous))
            );
            assert_eq!(open.token("whatever"), Ok(Principal::Anonymous));
            assert_eq!(open.anonymous(), Ok(Principal::Anonymous));
        }
        let shut = policy(Some(false), &[]);
        let wrong = Err(LoginError::Refused(AuthError::BadPassword));
        assert_eq!(shut.login("someone", b"secret"), wrong);
        assert_eq!(shut.token("whatever"), Err(AuthError::BadToken));
        assert_eq!(shut.anonymous(), Err(AuthError::Required));
    }

    #[test]
    fn with_identities_wrong_credentials_are_refused_not_downgraded() {
        let alice = || Ok(Principal::Named(Arc::from("alice")));
        let wrong = Err(LoginError::Refused(AuthError::BadPassword));
        let mut with_token = AuthConfig {
            allow_anonymous: Some(true),
            ..AuthConfig::default()
        };
        with_token.tokens.push(TokenEntry {
            name: "sensor".to_owned(),
            token: "tok-0123456789abcdef".to_owned(),
        });
        let tokens_only = Policy::new(&with_token, &LimitsConfig::default());
        assert_eq!(tokens_only.login("someone", b"secret"), wrong);
        assert_eq!(tokens_only.token("whatever"), Err(AuthError::BadToken));
        for users in [
            policy(Some(true), &[("alice", "s3cret")]),
            policy(None, &[("alice", "s3cret")]),
        ] {
            assert_eq!(users.login_cached("alice", b"s3cret"), None);
            assert_eq!(users.login("alice", b"s3cret"), alice());
            assert_eq!(users.login_cached("alice", b"s3cret"), Some(alice()));
            assert_eq!(users.login("alice", b"wrong"), wrong);
            assert_eq!(users.login("alice", &[0xff, 0x00]), wrong);
            assert_eq!(users.login("nobody", b"s3cret"), wrong);
            assert_eq!(users.login_cached("alice", b"wrong"), Some(wrong.clone()));
            assert_eq!(users.token("whatever"), Err(AuthError::BadToken));
        }
    }
}
