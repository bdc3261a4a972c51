//! The topic ACL: rules of principal × topic filter × access, with `%u` standing for the
//! principal's name, as in Mosquitto's acl_file. With no rules at all, everything is allowed.

use std::borrow::Cow;

use super::Principal;
use crate::topic::matches;

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) read: bool,
    pub(crate) write: bool,
    /// A deny rule: it refuses both, whatever other rules grant.
    pub(crate) deny: bool,
}

/// Whom a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Who {
    /// Every principal, anonymous included (`%u` rules skip anonymous).
    Everyone,
    /// Clients without credentials.
    Anonymous,
    /// One user or token name.
    Named(String),
}

/// One rule.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) who: Who,
    pub(crate) pattern: String,
    pub(crate) grant: Grant,
}

/// The topics a subscription may deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readable {
    /// Every topic the filter matches.
    All,
    /// Only the topics matched by these narrower filters.
    Part(Vec<String>),
    /// What `0` admits, except the topics these deny patterns match.
    Except(Box<Readable>, Vec<String>),
    /// None: the subscription is refused.
    Nothing,
}

impl Readable {
    /// Whether a message on `topic`, already matched by the subscription's filter, may be
    /// delivered.
    pub fn admits(&self, topic: &str) -> bool {
        match self {
            Self::All => true,
            Self::Part(filters) => filters.iter().any(|f| matches(f, topic)),
            Self::Except(base, denied) => {
                base.admits(topic) && !denied.iter().any(|d| matches(d, topic))
            }
            Self::Nothing => false,
        }
    }
}

/// The rules, in the order written: a deny rule that matches refuses, whatever the order;
/// otherwise any rule that grants is enough.
#[derive(Debug, Default)]
pub(crate) struct Acl {
    rules: Vec<Rule>,
}

impl Acl {
    pub(crate) fn new(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    /// Whether any rule restricts anything: without rules everything is allowed.
    pub(crate) fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// The patterns that grant `who` write (or read) access, `%u` substituted.
    fn patterns<'a>(
        &'a self,
        who: &'a Principal,
        write: bool,
    ) -> impl Iterator<Item = Cow<'a, str>> + 'a {
        self.matching(who, move |grant| {
            !grant.deny && if write { grant.write } else { grant.read }
        })
    }

    /// The patterns of the deny rules that apply to `who`.
    fn denied<'a>(&'a self, who: &'a Principal) -> impl Iterator<Item = Cow<'a, str>> + 'a {
        self.matching(who, |grant| grant.deny)
    }

    fn matching<'a>(
        &'a self,
        who: &'a Principal,
        wanted: impl Fn(&Grant) -> bool + 'a,
    ) -> impl Iterator<Item = Cow<'a, str>> + 'a {
        self.rules.iter().filter_map(move |rule| {
            let applies = match (&rule.who, who) {
                (Who::Everyone, _) | (Who::Anonymous, Principal::Anonymous) => true,
                (Who::Named(n), Principal::Named(m)) => n.as_str() == &**m,
                _ => false,
            };
            if !applies || !wanted(&rule.grant) {
                return None;
            }
            if !rule.pattern.contains("%u") {
                return Some(Cow::Borrowed(rule.pattern.as_str()));
            }
            // A name holding a separator or a wildcard would widen the pattern: such a rule
            // does not apply, as in Mosquitto.
            match who {
                Principal::Named(name) if !name.contains(['/', '+', '#']) => {
                    Some(Cow::Owned(rule.pattern.replace("%u", name)))
                }
                _ => None,
            }
        })
    }

    /// Whether `who` may publish to `topic`.
    pub(crate) fn may_write(&self, who: &Principal, topic: &str) -> bool {
        self.is_open()
            || !self.denied(who).any(|d| matches(&d, topic))
                && self.patterns(who, true).any(|p| matches(&p, topic))
    }

    /// Whether `who` may read messages of `topic`.
    pub(crate) fn may_read(&self, who: &Principal, topic: &str) -> bool {
        self.is_open()
            || !self.denied(who).any(|d| matches(&d, topic))
                && self.patterns(who, false).any(|p| matches(&p, topic))
    }

    /// The part of `filter` that `who` may read.
    pub(crate) fn readable(&self, who: &Principal, filter: &str) -> Readable {
        if self.is_open() {
            return Readable::All;
        }
        let mut denied = Vec::new();
        for d in self.denied(who) {
            if covers(&d, filter) {
                return Readable::Nothing;
            }
            if intersect(&d, filter).is_some() {
                denied.push(d.into_owned());
            }
        }
        match self.granted(who, filter) {
            Readable::Nothing => Readable::Nothing,
            base if denied.is_empty() => base,
            base => Readable::Except(Box::new(base), denied),
        }
    }

    /// The part of `filter` the grants of `who` cover, before deny rules.
    fn granted(&self, who: &Principal, filter: &str) -> Readable {
        let mut parts: Vec<String> = Vec::new();
        for pattern in self.patterns(who, false) {
            match intersect(&pattern, filter) {
                Some(i) if i == filter => return Readable::All,
                Some(i) => parts.push(i),
                None => {}
            }
        }
        // A part inside another part adds nothing but duplicate deliveries.
        let mut kept: Vec<String> = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let redundant = parts
                .iter()
                .enumerate()
                .any(|(j, other)| j != i && covers(other, part) && (!covers(part, other) || j < i));
            if !redundant {
                kept.push(part.clone());
            }
        }
        if kept.is_empty() {
            Readable::Nothing
        } else {
            Readable::Part(kept)
        }
    }
}

/// The filter matching exactly the topics both filters match, when there are any.
pub(crate) fn intersect(a: &str, b: &str) -> Option<String> {
    let dollar = |x: &str| x.starts_with('$');
    let wild = |x: &str| x.starts_with(['+', '#']);
    if (dollar(a) && wild(b)) || (dollar(b) && wild(a)) {
        return None;
    }
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.split('/').collect(), b.split('/').collect());
    let mut out: Vec<&str> = Vec::with_capacity(la.len().max(lb.len()));
    let mut i = 0;
    loop {
        match (la.get(i), lb.get(i)) {
            (Some(&"#"), _) => {
                out.extend_from_slice(&lb[i.min(lb.len())..]);
                break;
            }
            (_, Some(&"#")) => {
                out.extend_from_slice(&la[i.min(la.len())..]);
                break;
            }
            (None, None) => break,
            (Some(_), None) | (None, Some(_)) => return None,
            (Some(&x), Some(&y)) => {
                if x == "+" {
                    out.push(y);
                } else if y == "+" || x == y {
                    out.push(x);
                } else {
                    return None;
                }
            }
        }
        i += 1;
    }
    Some(out.join("/"))
}

/// Whether every topic `inner` matches is matched by `outer`.
pub(crate) fn covers(outer: &str, inner: &str) -> bool {
    intersect(outer, inner).is_some_and(|i| i == inner)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn rule(who: Who, pattern: &str, read: bool, write: bool) -> Rule {
        Rule {
            who,
            pattern: pattern.to_owned(),
            grant: Grant {
                read,
                write,
                deny: false,
            },
        }
    }

    fn deny(who: Who, pattern: &str) -> Rule {
        Rule {
            who,
            pattern: pattern.to_owned(),
            grant: Grant {
                read: false,
                write: false,
                deny: true,
            },
        }
    }

    #[test]
    fn a_deny_rule_refuses_whatever_grants() {
        let acl = Acl::new(vec![
            rule(Who::Everyone, "#", true, true),
            deny(Who::Everyone, "test/nosubscribe"),
            deny(Who::Anonymous, "private/#"),
        ]);
        let anon = Principal::Anonymous;
        assert!(acl.may_write(&anon, "test/x"));
        assert!(!acl.may_write(&anon, "test/nosubscribe"));
        assert!(!acl.may_read(&anon, "test/nosubscribe"));
        assert!(!acl.may_read(&anon, "private/a"));
        assert!(
            acl.may_read(&alice(), "private/a"),
            "deny rules apply to whom they name"
        );
        assert_eq!(acl.readable(&anon, "test/nosubscribe"), Readable::Nothing);
        assert_eq!(acl.readable(&anon, "private/#"), Readable::Nothing);
        let wide = acl.readable(&anon, "test/+");
        assert!(wide.admits("test/x"));
        assert!(!wide.admits("test/nosubscribe"), "{wide:?}");
        assert_eq!(acl.readable(&anon, "other/#"), Readable::All);
    }

    fn alice() -> Principal {
        Principal::Named(Arc::from("alice"))
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("#", "a//b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("+/+", "/x"));
    }

    #[test]
    fn intersections() {
        assert_eq!(intersect("#", "home/+/t").as_deref(), Some("home/+/t"));
        assert_eq!(
            intersect("home/#", "+/kitchen/#").as_deref(),
            Some("home/kitchen/#")
        );
        assert_eq!(intersect("+/x", "a/+").as_deref(), Some("a/x"));
        assert_eq!(intersect("a/#", "a").as_deref(), Some("a"));
        assert_eq!(intersect("a/b", "a/c"), None);
        assert_eq!(intersect("a/+", "a"), None);
        assert_eq!(intersect("#", "$SYS/#"), None);
        assert!(covers("home/#", "home/+/temp"));
        assert!(covers("a/#", "a"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("home/+/temp", "home/#"));
    }

    #[test]
    fn rules_apply_to_their_principal_with_substitution() {
        let acl = Acl::new(vec![
            rule(Who::Named("alice".into()), "home/#", true, true),
            rule(Who::Everyone, "devices/%u/#", true, true),
            rule(Who::Anonymous, "public/#", true, false),
        ]);
        assert!(acl.may_write(&alice(), "home/x"));
        assert!(acl.may_write(&alice(), "devices/alice/t"));
        assert!(!acl.may_write(&alice(), "devices/bob/t"));
        assert!(!acl.may_write(&alice(), "public/x"));
        assert!(acl.may_read(&Principal::Anonymous, "public/x"));
        assert!(!acl.may_write(&Principal::Anonymous, "public/x"));
        assert!(!acl.may_read(&Principal::Anonymous, "devices/%u/x"));
        let odd = Principal::Named(Arc::from("a/b"));
        assert!(!acl.may_read(&odd, "devices/a/b/x"));
        assert!(Acl::default().may_write(&Principal::Anonymous, "x"));
    }

    #[test]
    fn a_subscription_is_narrowed_to_what_may_be_read() {
        let acl = Acl::new(vec![
            rule(Who::Everyone, "home/+/temp", true, false),
            rule(Who::Everyone, "home/#", false, true),
            rule(Who::Everyone, "home/kitchen/temp", true, false),
            rule(Who::Everyone, "office/#", true, false),
        ]);
        let who = Principal::Anonymous;
        assert_eq!(acl.readable(&who, "office/a"), Readable::All);
        assert_eq!(acl.readable(&who, "home/+/temp"), Readable::All);
        assert_eq!(
            acl.readable(&who, "#"),
            Readable::Part(vec!["home/+/temp".into(), "office/#".into()])
        );
        assert_eq!(acl.readable(&who, "garden/#"), Readable::Nothing);
    }
}
