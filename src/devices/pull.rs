//! One pull rule's worker: GETs a device resource on an interval with `If-None-Match`, and
//! publishes it when it changed. An unreachable device is read again after a doubling wait; its
//! state is in the metrics, and the log says only when it goes down or comes back.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, ETAG, HeaderMap, HeaderValue, IF_NONE_MATCH};
use tokio_util::sync::CancellationToken;

use crate::bridge::{Bridge, LastAttempt, Message, Origin, Topic};
use crate::metrics::{PullLabel, RuleLabel};
use crate::policy::Principal;

/// A pull rule, checked and ready.
#[derive(Debug)]
pub(crate) struct PullRule {
    pub(crate) name: Arc<str>,
    pub(crate) url: reqwest::Url,
    pub(crate) interval: Duration,
    pub(crate) topic: Topic,
    pub(crate) retain: bool,
    pub(crate) headers: HeaderMap,
    pub(crate) principal: Principal,
    pub(crate) timeout: Duration,
    pub(crate) max_backoff: Duration,
    /// The last read's outcome, for `/rules`.
    pub(crate) last: Mutex<Option<LastAttempt>>,
}

/// What a read found.
enum Read {
    Changed(Message),
    Unchanged,
}

/// Reads the rule's resource until cancelled.
pub(crate) async fn run(
    rule: Arc<PullRule>,
    client: reqwest::Client,
    bridge: Bridge,
    cancel: CancellationToken,
) {
    let label = RuleLabel {
        rule: rule.name.to_string(),
    };
    let metrics = bridge.metrics();
    let count = |outcome| {
        metrics
            .pull_reads
            .get_or_create(&PullLabel {
                rule: rule.name.to_string(),
                outcome,
            })
            .inc();
    };
    let up = metrics.pull_up.get_or_create(&label).clone();
    let mut etag: Option<HeaderValue> = None;
    let mut last: Option<u64> = None;
    let mut failures: u32 = 0;
    loop {
        let read = tokio::select! {
            r = read(&rule, &client, etag.as_ref(), bridge.max_payload()) => r,
            () = cancel.cancelled() => return,
        };
        match read {
            Ok((status, tag, outcome)) => {
                if tag.is_some() {
                    etag = tag;
                }
                match outcome {
                    Read::Changed(message) if last == Some(message.validator()) => {
                        count("unchanged");
                    }
                    Read::Changed(message) => {
                        let validator = message.validator();
                        match bridge.publish(message, &rule.principal).await {
                            Ok(()) => {
                                last = Some(validator);
                                count("changed");
                            }
                            Err(e) => {
                                tracing::warn!(rule = %rule.name, error = %e, "a pulled value was not published");
                            }
                        }
                    }
                    Read::Unchanged => count("unchanged"),
                }
                if failures > 0 {
                    tracing::info!(rule = %rule.name, "the device answers again");
                }
                failures = 0;
                up.set(1);
                note(&rule, Some(status), None);
            }
            Err((status, error)) => {
                count("failed");
                if failures == 0 {
                    tracing::warn!(rule = %rule.name, error = %error, "the device does not answer; reading it again with backoff");
                }
                failures = failures.saturating_add(1);
                up.set(0);
                note(&rule, status, Some(error));
            }
        }
        let wait = if failures == 0 {
            rule.interval
        } else {
            rule.interval
                .saturating_mul(1 << (failures - 1).min(20))
                .min(rule.max_backoff.max(rule.interval))
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
    }
}

type ReadResult = Result<(u16, Option<HeaderValue>, Read), (Option<u16>, String)>;

/// One GET: the status, the ETag, and the value when it is new to the device's validator.
async fn read(
    rule: &PullRule,
    client: &reqwest::Client,
    etag: Option<&HeaderValue>,
    limit: usize,
) -> ReadResult {
    let mut request = client
        .get(rule.url.clone())
        .timeout(rule.timeout)
        .headers(rule.headers.clone());
    if let Some(etag) = etag {
        request = request.header(IF_NONE_MATCH, etag.clone());
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| (None, e.without_url().to_string()))?;
    let status = response.status().as_u16();
    if status == 304 {
        return Ok((status, None, Read::Unchanged));
    }
    if !response.status().is_success() {
        return Err((Some(status), format!("the device answered {status}")));
    }
    let tag = response.headers().get(ETAG).cloned();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| (Some(status), e.without_url().to_string()))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            return Err((
                Some(status),
                format!("the value is over the payload limit of {limit} bytes"),
            ));
        }
    }
    let mut message = Message::new(rule.topic.clone(), Bytes::from(body), Origin::Device);
    message.content_type = content_type;
    message.retain = rule.retain;
    Ok((status, tag, Read::Changed(message)))
}

fn note(rule: &PullRule, status: Option<u16>, error: Option<String>) {
    let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    *rule.last.lock().unwrap_or_else(PoisonError::into_inner) =
        Some(LastAttempt { status, error, at });
}
