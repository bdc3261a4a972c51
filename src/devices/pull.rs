//! One pull rule's worker: reads a device resource (HTTP GET or CoAP GET with its ETag, on an
//! interval) or observes it (CoAP Observe, registered again when notifications stop), and
//! publishes it when it changed. An unreachable device is tried again after a doubling wait;
//! its state is in the metrics, and the log says only when it goes down or comes back.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coap_lite::RequestType;
use reqwest::header::{CONTENT_TYPE, ETAG, HeaderMap, HeaderValue, IF_NONE_MATCH};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::coap::{Body, CoapAnswer, CoapSocket, Transmission, is_fresher, token};
use crate::bridge::{Bridge, LastAttempt, Message, Origin, Topic};
use crate::metrics::{PullLabel, RuleLabel};
use crate::policy::Principal;

/// Max-Age of a CoAP representation that names none (RFC 7252 §5.10.5).
const DEFAULT_MAX_AGE: u32 = 60;

/// A pull rule, checked and ready.
#[derive(Debug)]
pub(crate) struct PullRule {
    pub(crate) name: Arc<str>,
    pub(crate) url: reqwest::Url,
    pub(crate) interval: Duration,
    pub(crate) observe: bool,
    pub(crate) topic: Topic,
    pub(crate) retain: bool,
    pub(crate) headers: HeaderMap,
    pub(crate) principal: Principal,
    pub(crate) timeout: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) transmission: Transmission,
    /// The HTTP client: the shared one, or the rule's own with its certificates.
    pub(crate) client: reqwest::Client,
    /// The last read's outcome, for `/rules`.
    pub(crate) last: Mutex<Option<LastAttempt>>,
}

/// What a read found.
enum Read {
    Changed(Message),
    Unchanged,
}

/// A failed read: the status when the device answered, and why.
type Failure = (Option<u16>, String);

/// The worker's state across reads.
struct Puller {
    rule: Arc<PullRule>,
    client: reqwest::Client,
    bridge: Bridge,
    /// The device's validator of the last value read.
    etag: Option<Vec<u8>>,
    /// The gateway's validator of the last value published.
    published: Option<u64>,
    failures: u32,
}

/// Reads or observes the rule's resource until cancelled.
pub(crate) async fn run(
    rule: Arc<PullRule>,
    client: reqwest::Client,
    bridge: Bridge,
    cancel: CancellationToken,
) {
    let mut puller = Puller {
        rule,
        client,
        bridge,
        etag: None,
        published: None,
        failures: 0,
    };
    tokio::select! {
        () = puller.run() => {}
        () = cancel.cancelled() => {}
    }
}

impl Puller {
    async fn run(&mut self) {
        if self.rule.observe {
            loop {
                if !self.observe().await {
                    tokio::time::sleep(self.wait()).await;
                }
            }
        }
        loop {
            let read = if self.rule.url.scheme() == "coap" {
                self.read_coap().await
            } else {
                self.read_http().await
            };
            self.outcome(read).await;
            tokio::time::sleep(self.wait()).await;
        }
    }

    /// The interval, or after failures a doubling wait up to `max_backoff`.
    fn wait(&self) -> Duration {
        let rule = &self.rule;
        if self.failures == 0 {
            return rule.interval;
        }
        rule.interval
            .saturating_mul(1 << (self.failures - 1).min(20))
            .min(rule.max_backoff.max(rule.interval))
    }

    /// Publishes a changed value and keeps the counters, state and log up to date.
    async fn outcome(&mut self, read: Result<(u16, Read), Failure>) {
        let rule = self.rule.clone();
        let metrics = self.bridge.metrics();
        let count = |outcome| {
            metrics
                .pull_reads
                .get_or_create(&PullLabel {
                    rule: rule.name.to_string(),
                    outcome,
                })
                .inc();
        };
        let up = metrics
            .pull_up
            .get_or_create(&RuleLabel {
                rule: rule.name.to_string(),
            })
            .clone();
        match read {
            Ok((status, outcome)) => {
                match outcome {
                    Read::Changed(m) if self.published == Some(m.validator()) => {
                        count("unchanged");
                    }
                    Read::Changed(m) => {
                        let validator = m.validator();
                        match self.bridge.publish(m, &rule.principal).await {
                            Ok(()) => {
                                self.published = Some(validator);
                                count("changed");
                            }
                            Err(e) => {
                                tracing::warn!(rule = %rule.name, error = %e, "a pulled value was not published");
                            }
                        }
                    }
                    Read::Unchanged => count("unchanged"),
                }
                if self.failures > 0 {
                    tracing::info!(rule = %rule.name, "the device answers again");
                }
                self.failures = 0;
                up.set(1);
                note(&rule, Some(status), None);
            }
            Err((status, error)) => {
                count("failed");
                if self.failures == 0 {
                    tracing::warn!(rule = %rule.name, error = %error, "the device does not answer; trying again with backoff");
                }
                self.failures = self.failures.saturating_add(1);
                up.set(0);
                note(&rule, status, Some(error));
            }
        }
    }

    /// One HTTP GET with `If-None-Match`.
    async fn read_http(&mut self) -> Result<(u16, Read), Failure> {
        let rule = &self.rule;
        let mut request = self
            .client
            .get(rule.url.clone())
            .timeout(rule.timeout)
            .headers(rule.headers.clone());
        if let Some(etag) = self
            .etag
            .as_deref()
            .and_then(|e| HeaderValue::from_bytes(e).ok())
        {
            request = request.header(IF_NONE_MATCH, etag);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| (None, e.without_url().to_string()))?;
        let status = response.status().as_u16();
        if status == 304 {
            return Ok((status, Read::Unchanged));
        }
        if !response.status().is_success() {
            return Err((Some(status), format!("the device answered {status}")));
        }
        if let Some(tag) = response.headers().get(ETAG) {
            self.etag = Some(tag.as_bytes().to_vec());
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let limit = self.bridge.max_payload();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| (Some(status), e.without_url().to_string()))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > limit {
                return Err((Some(status), over_limit(limit)));
            }
        }
        Ok((status, Read::Changed(self.value(body.into(), content_type))))
    }

    /// One confirmable CoAP GET with the last ETag (2.03 Valid: unchanged).
    async fn read_coap(&mut self) -> Result<(u16, Read), Failure> {
        let rule = self.rule.clone();
        let deadline = Instant::now() + rule.timeout;
        let mut socket = CoapSocket::connect(&rule.url, rule.transmission)
            .await
            .map_err(|e| (None, e))?;
        let body = Body {
            etag: self.etag.as_deref(),
            ..Body::default()
        };
        let answer = socket
            .call(RequestType::Get, &rule.url, &body, &token(), deadline)
            .await
            .map_err(|e| (None, e))?;
        self.coap_read(answer)
    }

    /// What a CoAP response or notification means: 2.03 unchanged, 2.05 a value.
    fn coap_read(&mut self, answer: CoapAnswer) -> Result<(u16, Read), Failure> {
        match answer.status {
            203 => Ok((203, Read::Unchanged)),
            205 => {
                if answer.etag.is_some() {
                    self.etag = answer.etag;
                }
                if answer.payload.len() > self.bridge.max_payload() {
                    return Err((Some(205), over_limit(self.bridge.max_payload())));
                }
                let message = self.value(answer.payload, answer.content_type);
                Ok((205, Read::Changed(message)))
            }
            status => Err((
                Some(status),
                format!("the device answered {}.{:02}", status / 100, status % 100),
            )),
        }
    }

    /// Registers an observation and publishes its notifications until they stop: an error
    /// notification, a Reset, or nothing within the last one's Max-Age (the device restarted
    /// or forgot the observer). Returns whether to register again at once (notifications
    /// stopped) rather than after the usual wait (a failure, or no Observe support).
    async fn observe(&mut self) -> bool {
        let rule = self.rule.clone();
        let mut socket = match CoapSocket::connect(&rule.url, rule.transmission).await {
            Ok(s) => s,
            Err(e) => {
                self.outcome(Err((None, e))).await;
                return false;
            }
        };
        let token = token();
        let body = Body {
            observe: Some(0),
            ..Body::default()
        };
        let deadline = Instant::now() + rule.timeout;
        let first = match socket
            .call(RequestType::Get, &rule.url, &body, &token, deadline)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                self.outcome(Err((None, e))).await;
                return false;
            }
        };
        let Some(mut sequence) = first.observe else {
            // The device does not support Observe: this was a plain read; try again later.
            let read = self.coap_read(first);
            self.outcome(read).await;
            return false;
        };
        let mut max_age = first.max_age.unwrap_or(DEFAULT_MAX_AGE);
        let read = self.coap_read(first);
        self.outcome(read).await;
        let mut last_at = Instant::now();
        loop {
            // A notification is due before the representation goes stale; some slack for
            // its retransmissions.
            let stale = last_at
                + Duration::from_secs(u64::from(max_age))
                + rule.transmission.ack_timeout * 2;
            let notification = match socket.notification(&token, stale).await {
                Ok(Some(n)) => n,
                Ok(None) => {
                    tracing::debug!(rule = %rule.name, "notifications stopped; registering again");
                    return true;
                }
                Err(e) => {
                    self.outcome(Err((None, e))).await;
                    return false;
                }
            };
            let Some(number) = notification.observe else {
                // A response without Observe ends the observation (RFC 7641 §3.2).
                let read = self.coap_read(notification);
                self.outcome(read).await;
                return false;
            };
            if !is_fresher(sequence, number, last_at.elapsed()) {
                continue;
            }
            sequence = number;
            last_at = Instant::now();
            max_age = notification.max_age.unwrap_or(DEFAULT_MAX_AGE);
            let read = self.coap_read(notification);
            self.outcome(read).await;
        }
    }

    fn value(&self, payload: Bytes, content_type: Option<String>) -> Message {
        let mut message = Message::new(self.rule.topic.clone(), payload, Origin::Device);
        message.content_type = content_type;
        message.retain = self.rule.retain;
        message
    }
}

fn over_limit(limit: usize) -> String {
    format!("the value is over the payload limit of {limit} bytes")
}

fn note(rule: &PullRule, status: Option<u16>, error: Option<String>) {
    let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    *rule.last.lock().unwrap_or_else(PoisonError::into_inner) =
        Some(LastAttempt { status, error, at });
}
