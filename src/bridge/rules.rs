//! What `GET /rules` reports: every push and pull rule with its state, as the running rules
//! (behind [`super::Tap`]) describe themselves. Secrets never appear: header values are
//! redacted.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

/// Every configured rule.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct RulesReport {
    /// `[[push]]` rules, in config order.
    pub push: Vec<PushReport>,
    /// `[[pull]]` rules, in config order.
    pub pull: Vec<PullReport>,
}

/// A push rule and its state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PushReport {
    /// The rule's name.
    pub name: String,
    /// The topic filter it pushes.
    pub filter: String,
    /// The URL template.
    pub url: String,
    /// `POST` or `PUT`.
    pub method: String,
    /// `raw` or `envelope`.
    pub body: String,
    /// Header names, each value shown as `<redacted>`.
    pub headers: BTreeMap<String, String>,
    /// Where answers are published, when set.
    pub reply_topic: Option<String>,
    /// Where dead letters are published, when set.
    pub dead_letter_topic: Option<String>,
    /// Whose ACL the rule runs under.
    pub principal: String,
    /// Attempts before a dead letter.
    pub max_attempts: u32,
    /// Age before a dead letter (`1h`).
    pub max_age: String,
    /// Messages waiting in its outbox.
    pub queued: u64,
    /// Messages delivered.
    pub sent: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Attempts made again.
    pub retried: u64,
    /// Messages given up.
    pub dead_letters: u64,
    /// Messages dropped or refused at the outbox bound.
    pub overflow: u64,
    /// The last attempt, when there was one since startup.
    pub last: Option<LastAttempt>,
}

/// A pull rule and its state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PullReport {
    /// The rule's name.
    pub name: String,
    /// The resource read.
    pub url: String,
    /// Where its value is published.
    pub topic: String,
    /// Time between reads (`30s`).
    pub interval: String,
    /// Whether the resource is observed (CoAP Observe) rather than read on the interval.
    pub observe: bool,
    /// Whether values are published retained.
    pub retain: bool,
    /// Header names, each value shown as `<redacted>`.
    pub headers: BTreeMap<String, String>,
    /// Whose ACL the rule runs under.
    pub principal: String,
    /// Reads that published a new value.
    pub changed: u64,
    /// Reads that found the value unchanged (304, or the same value).
    pub unchanged: u64,
    /// Reads that failed.
    pub failed: u64,
    /// The last read, when there was one since startup.
    pub last: Option<LastAttempt>,
}

/// The outcome of a rule's last request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LastAttempt {
    /// The HTTP status, when the device answered.
    pub status: Option<u16>,
    /// Why there was no usable answer.
    pub error: Option<String>,
    /// When (RFC 3339).
    pub at: String,
}
