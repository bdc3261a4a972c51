//! The state of every rule for `GET /rules`: settings, counters and the last outcome, with
//! header values redacted.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

use super::outbox::Lane;
use super::{pull, push};
use crate::bridge::{PullReport, PushReport, RulesReport};
use crate::config::PushBody;
use crate::metrics::{Metrics, PullLabel, RuleLabel};

pub(crate) fn report(
    push: &[Arc<push::PushRule>],
    pull: &[Arc<pull::PullRule>],
    lanes: &[Arc<Lane>],
    metrics: &Metrics,
) -> RulesReport {
    let push = push
        .iter()
        .zip(lanes)
        .map(|(rule, lane)| {
            let label = RuleLabel {
                rule: rule.name.to_string(),
            };
            let count = |family: &prometheus_client::metrics::family::Family<
                RuleLabel,
                prometheus_client::metrics::counter::Counter,
            >| family.get_or_create(&label).get();
            PushReport {
                name: rule.name.to_string(),
                filter: rule.filter.to_string(),
                url: rule.url.display(),
                method: rule.method.to_string(),
                body: match rule.body {
                    PushBody::Raw => "raw",
                    PushBody::Envelope => "envelope",
                }
                .to_owned(),
                headers: redacted(rule.headers.keys().map(|k| k.as_str())),
                reply_topic: rule.reply_topic.as_ref().map(|t| t.as_str().to_owned()),
                dead_letter_topic: rule.dead_letter_topic.as_ref().map(ToString::to_string),
                principal: rule.principal.to_string(),
                max_attempts: rule.max_attempts,
                max_age: humantime::format_duration(rule.max_age).to_string(),
                queued: lane.depth() as u64,
                sent: count(&metrics.push_sent),
                failed: count(&metrics.push_failed),
                retried: count(&metrics.push_retried),
                dead_letters: count(&metrics.push_dead_letters),
                overflow: count(&metrics.push_overflow),
                last: rule
                    .last
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            }
        })
        .collect();
    let pull = pull
        .iter()
        .map(|rule| {
            let reads = |outcome| {
                metrics
                    .pull_reads
                    .get_or_create(&PullLabel {
                        rule: rule.name.to_string(),
                        outcome,
                    })
                    .get()
            };
            PullReport {
                name: rule.name.to_string(),
                url: rule.url.to_string(),
                topic: rule.topic.to_string(),
                interval: humantime::format_duration(rule.interval).to_string(),
                observe: rule.observe,
                retain: rule.retain,
                headers: redacted(rule.headers.keys().map(|k| k.as_str())),
                principal: rule.principal.to_string(),
                changed: reads("changed"),
                unchanged: reads("unchanged"),
                failed: reads("failed"),
                last: rule
                    .last
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            }
        })
        .collect();
    RulesReport { push, pull }
}

fn redacted<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, String> {
    names
        .map(|n| (n.to_owned(), "<redacted>".to_owned()))
        .collect()
}
