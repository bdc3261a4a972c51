//! One push rule's worker: takes its outbox's oldest message, sends it until the endpoint
//! answers 2xx, gives up (dead letter) after `max_attempts`, `max_age` or a 4xx other than
//! 408/429, then publishes the answer to the message's Response Topic and the rule's reply
//! topic. One message at a time, so a rule keeps its order and never holds up another rule.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::coap::{Body, CoapSocket, Transmission};
use super::outbox::{Entry, Lane};
use super::plain::Plain;
use super::retry::{backoff, parse_retry_after};
use super::template::{TopicTemplate, UrlTemplate};
use crate::bridge::{
    Bridge, Envelope, LastAttempt, Message, Origin, Topic, TopicFilter, is_textual,
};
use crate::config::PushBody;
use crate::metrics::{Metrics, RuleLabel};
use crate::policy::Principal;

/// A push rule, checked and ready.
#[derive(Debug)]
pub(crate) struct PushRule {
    pub(crate) name: Arc<str>,
    pub(crate) filter: TopicFilter,
    pub(crate) url: UrlTemplate,
    pub(crate) method: reqwest::Method,
    pub(crate) body: PushBody,
    pub(crate) headers: HeaderMap,
    pub(crate) reply_topic: Option<TopicTemplate>,
    pub(crate) dead_letter_topic: Option<Topic>,
    pub(crate) principal: Principal,
    pub(crate) max_attempts: u32,
    pub(crate) max_age: Duration,
    pub(crate) timeout: Duration,
    pub(crate) backoff: Duration,
    pub(crate) max_backoff: Duration,
    /// Requests at once, each for another topic.
    pub(crate) in_flight: usize,
    /// The CoAP retransmission parameters, for `coap://` endpoints.
    pub(crate) transmission: Transmission,
    /// The connections of an `http://` rule with no proxy; otherwise `client` serves.
    pub(crate) plain: Option<Plain>,
    /// The HTTP client: the shared one, or the rule's own with its certificates.
    pub(crate) client: reqwest::Client,
    /// The last attempt's outcome, for `/rules`.
    pub(crate) last: Mutex<Option<LastAttempt>>,
}

/// An endpoint's answer.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    body: Bytes,
    content_type: Option<String>,
    retry_after: Option<Duration>,
    /// `mqtt-user-NAME` headers of an HTTP answer, as the HTTP API takes them in.
    user_properties: Vec<(String, String)>,
}

impl Answer {
    /// An HTTP answer: its status, what its headers say, and its body as read.
    fn from_parts(status: u16, headers: &HeaderMap, body: Bytes) -> Self {
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let user_properties = headers
            .iter()
            .filter_map(|(name, value)| {
                let name = name.as_str().strip_prefix("mqtt-user-")?;
                Some((name.to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect();
        Self {
            status,
            body,
            content_type,
            retry_after,
            user_properties,
        }
    }
}

/// Most finished entries a worker keeps before it takes them off the disk, and the longest it
/// keeps one: each batch wakes the outbox's writer thread once, which, per delivery, cost about
/// a tenth of a rule's CPU. The longest stays well under the wait of a new entry for its write
/// (the writer's `LINGER`): an entry reported delivered within it is never written, and one
/// reported later has been written and is removed again.
const ERASE_BATCH: usize = 128;
const ERASE_WITHIN: Duration = Duration::from_millis(1);

/// How a message left the outbox.
enum Outcome {
    Delivered(Answer),
    Dead {
        reason: &'static str,
        attempts: u32,
        answer: Option<Answer>,
        error: Option<String>,
    },
}

/// The rule's counters.
struct Counters {
    sent: Counter,
    failed: Counter,
    retried: Counter,
    dead: Counter,
    latency: Histogram,
}

/// What a worker needs besides its rule.
pub(crate) struct Worker {
    pub(crate) rule: Arc<PushRule>,
    pub(crate) lane: Arc<Lane>,
    pub(crate) client: reqwest::Client,
    pub(crate) bridge: Bridge,
}

impl Worker {
    /// Delivers the rule's messages until cancelled; what is left stays in the outbox.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let label = RuleLabel {
            rule: self.rule.name.to_string(),
        };
        let metrics: &Metrics = self.bridge.metrics();
        let counters = Counters {
            sent: metrics.push_sent.get_or_create(&label).clone(),
            failed: metrics.push_failed.get_or_create(&label).clone(),
            retried: metrics.push_retried.get_or_create(&label).clone(),
            dead: metrics.push_dead_letters.get_or_create(&label).clone(),
            latency: metrics.push_latency.get_or_create(&label).clone(),
        };
        // Up to `in_flight` deliveries at once, one per topic; cancelled, what is in flight is
        // still in the outbox and is sent again after the restart.
        let mut running = FuturesUnordered::new();
        let mut done = Vec::new();
        // Finished entries not yet taken off the disk, and when the oldest of them must be.
        let mut unerased = Vec::new();
        let erase_by = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(erase_by);
        loop {
            tokio::select! {
                entry = self.lane.next(self.rule.in_flight) => {
                    running.push(self.handle(entry, &counters));
                }
                Some(seq) = running.next(), if !running.is_empty() => {
                    // Every delivery finished by now leaves the queue at once.
                    done.push(seq);
                    while let Some(Some(seq)) = running.next().now_or_never() {
                        done.push(seq);
                    }
                    self.lane.remove(&done);
                    if unerased.is_empty() {
                        erase_by.as_mut().reset(tokio::time::Instant::now() + ERASE_WITHIN);
                    }
                    unerased.append(&mut done);
                }
                () = &mut erase_by, if !unerased.is_empty() => {}
                () = cancel.cancelled() => {
                    self.lane.erase(unerased);
                    return;
                }
            }
            // Off the disk in batches while deliveries keep going; at once when they stop.
            if !unerased.is_empty()
                && (running.is_empty() || unerased.len() >= ERASE_BATCH || erase_by.is_elapsed())
            {
                self.lane.erase(std::mem::take(&mut unerased));
            }
        }
    }

    /// Delivers one entry, or gives it up; returns its sequence number, for the caller to take
    /// it out of the outbox.
    async fn handle(&self, entry: Entry, counters: &Counters) -> u64 {
        let outcome = self.deliver(&entry, counters).await;
        match outcome {
            Outcome::Delivered(answer) => {
                counters.sent.inc();
                self.reply(&entry.message, &answer).await;
            }
            Outcome::Dead {
                reason,
                attempts,
                answer,
                error,
            } => {
                counters.dead.inc();
                if let Some(answer) = &answer {
                    self.reply(&entry.message, answer).await;
                }
                self.dead_letter(&entry, reason, attempts, answer.as_ref(), error)
                    .await;
            }
        }
        entry.seq
    }

    /// Sends `entry` until it is delivered or given up.
    async fn deliver(&self, entry: &Entry, counters: &Counters) -> Outcome {
        let rule = &self.rule;
        let mut attempts = 0;
        let (mut answer, mut error) = (None, None);
        let target = match rule.url.fill_target(&entry.message) {
            Ok(target) => target,
            Err(e) => {
                return Outcome::Dead {
                    reason: "unaddressable",
                    attempts,
                    answer,
                    error: Some(e.to_string()),
                };
            }
        };
        loop {
            let age = entry.taken_at.elapsed().unwrap_or(Duration::ZERO);
            let reason = if age >= rule.max_age {
                Some("max_age")
            } else if entry.message.is_expired(SystemTime::now()) {
                Some("expired")
            } else if attempts >= rule.max_attempts {
                Some("max_attempts")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Outcome::Dead {
                    reason,
                    attempts,
                    answer,
                    error,
                };
            }
            if attempts > 0 {
                counters.retried.inc();
            }
            attempts += 1;
            let started = Instant::now();
            let retry_after = match self.send(&entry.message, &target).await {
                Ok(a) => {
                    counters.latency.observe(started.elapsed().as_secs_f64());
                    self.note(Some(a.status), None);
                    if (200..300).contains(&a.status) {
                        return Outcome::Delivered(a);
                    }
                    counters.failed.inc();
                    if (400..500).contains(&a.status) && a.status != 408 && a.status != 429 {
                        return Outcome::Dead {
                            reason: "refused",
                            attempts,
                            answer: Some(a),
                            error: None,
                        };
                    }
                    let retry_after = a.retry_after;
                    (answer, error) = (Some(a), None);
                    retry_after
                }
                Err(e) => {
                    counters.failed.inc();
                    self.note(None, Some(e.clone()));
                    error = Some(e);
                    None
                }
            };
            if attempts >= rule.max_attempts {
                continue;
            }
            let left = rule.max_age.saturating_sub(age + started.elapsed());
            let wait = retry_after
                .unwrap_or_else(|| backoff(rule.backoff, rule.max_backoff, attempts))
                .min(left);
            tokio::time::sleep(wait).await;
        }
    }

    /// One request for `target` (the path and query) and its answer, the body read up to the
    /// payload limit.
    async fn send(&self, message: &Message, target: &str) -> Result<Answer, String> {
        let rule = &self.rule;
        let limit = self.bridge.max_payload();
        if let Some(plain) = &rule.plain {
            let (headers, body) = self.request_parts(message);
            let sent = plain.send(rule.method.clone(), target, headers, body, limit);
            let reply = tokio::time::timeout(rule.timeout, sent)
                .await
                .map_err(|_| "operation timed out".to_owned())??;
            return Ok(Answer::from_parts(
                reply.status.as_u16(),
                &reply.headers,
                reply.body,
            ));
        }
        let url = rule.url.url(target).map_err(|e| e.to_string())?;
        if url.scheme() == "coap" {
            return self.send_coap(message, &url).await;
        }
        let (headers, body) = self.request_parts(message);
        // The URL may carry the payload: errors are reported without it.
        let mut response = self
            .client
            .request(rule.method.clone(), url)
            .timeout(rule.timeout)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| e.without_url().to_string())?
        {
            if !super::append_within(&mut body, &chunk, limit) {
                break;
            }
        }
        Ok(Answer::from_parts(
            response.status().as_u16(),
            response.headers(),
            Bytes::from(body),
        ))
    }

    /// The headers and body of the request for `message`: the rule's headers, then the
    /// message's content type and user properties (`mqtt-user-NAME`), which replace a rule's
    /// header of the same name.
    fn request_parts(&self, message: &Message) -> (HeaderMap, Bytes) {
        let mut headers = self.rule.headers.clone();
        match self.rule.body {
            PushBody::Raw => {
                if let Some(ct) = message
                    .content_type
                    .as_deref()
                    .and_then(|ct| HeaderValue::from_str(ct).ok())
                {
                    headers.insert(CONTENT_TYPE, ct);
                }
                // User properties go as the HTTP API takes them in: `mqtt-user-NAME: VALUE`.
                let mut users = HeaderMap::new();
                for (name, value) in &message.user_properties {
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(format!("mqtt-user-{name}").as_bytes()),
                        HeaderValue::from_str(value),
                    ) {
                        users.append(name, value);
                    }
                }
                for name in users.keys() {
                    headers.remove(name);
                }
                for (name, value) in &users {
                    headers.append(name, value.clone());
                }
                (headers, message.payload.clone())
            }
            PushBody::Envelope => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                let envelope = message.envelope_json(SystemTime::now());
                (headers, Bytes::from(envelope.into_bytes()))
            }
        }
    }

    /// One confirmable CoAP request and its response (piggybacked or separate), resent on the
    /// RFC 7252 schedule within the rule's `timeout`.
    async fn send_coap(&self, message: &Message, url: &reqwest::Url) -> Result<Answer, String> {
        let rule = &self.rule;
        let method = match rule.method {
            reqwest::Method::PUT => coap_lite::RequestType::Put,
            _ => coap_lite::RequestType::Post,
        };
        let envelope;
        let body = match rule.body {
            PushBody::Raw => Body {
                payload: &message.payload,
                content_type: message.content_type.as_deref(),
                ..Body::default()
            },
            PushBody::Envelope => {
                envelope = message.envelope_json(SystemTime::now());
                Body {
                    payload: envelope.as_bytes(),
                    content_type: Some("application/json"),
                    ..Body::default()
                }
            }
        };
        let deadline = tokio::time::Instant::now() + rule.timeout;
        let mut socket = CoapSocket::connect(url, rule.transmission).await?;
        let a = socket
            .send(method, url, &body, &super::coap::token(), deadline)
            .await?;
        let mut payload = a.payload;
        payload.truncate(self.bridge.max_payload());
        Ok(Answer {
            // 4.29 and 5.03 say with Max-Age when to come back (RFC 8516, RFC 7252 §5.9.3.4).
            retry_after: matches!(a.status, 429 | 503)
                .then_some(a.max_age)
                .flatten()
                .map(|s| Duration::from_secs(u64::from(s))),
            status: a.status,
            body: payload,
            content_type: a.content_type,
            user_properties: Vec::new(),
        })
    }

    /// Publishes `answer` to the message's Response Topic (with its Correlation Data) and to
    /// the rule's reply topic.
    async fn reply(&self, message: &Message, answer: &Answer) {
        let rule = &self.rule;
        let targets = message
            .response_topic
            .as_deref()
            .and_then(|t| Topic::parse(t).ok())
            .into_iter()
            .chain(
                rule.reply_topic
                    .as_ref()
                    .and_then(|t| t.fill(&message.topic)),
            );
        for topic in targets {
            // An answer the rule would push again would go round for ever.
            if rule.filter.matches(&topic) {
                tracing::warn!(rule = %rule.name, %topic, "not publishing an answer to a topic the rule itself pushes");
                continue;
            }
            let mut reply = Message::new(topic, answer.body.clone(), Origin::Device);
            reply.content_type.clone_from(&answer.content_type);
            reply.correlation_data.clone_from(&message.correlation_data);
            reply.qos = message.qos;
            reply.user_properties = vec![("status".to_owned(), answer.status.to_string())];
            reply
                .user_properties
                .extend(answer.user_properties.iter().cloned());
            if let Err(e) = self.bridge.publish(reply, &rule.principal).await {
                tracing::warn!(rule = %rule.name, error = %e, "the device's answer was not published");
            }
        }
    }

    async fn dead_letter(
        &self,
        entry: &Entry,
        reason: &'static str,
        attempts: u32,
        answer: Option<&Answer>,
        error: Option<String>,
    ) {
        let rule = &self.rule;
        let Some(topic) = rule.dead_letter_topic.clone() else {
            tracing::warn!(rule = %rule.name, topic = %entry.message.topic, reason, "a message was given up and the rule has no dead_letter_topic");
            return;
        };
        let body = answer.map(|a| {
            let textual = a.content_type.as_deref().is_none_or(is_textual);
            match std::str::from_utf8(&a.body) {
                Ok(text) if textual => (text.to_owned(), "utf8"),
                _ => {
                    use base64::Engine;
                    let encoded = base64::engine::general_purpose::STANDARD.encode(&a.body);
                    (encoded, "base64")
                }
            }
        });
        let letter = DeadLetter {
            rule: &rule.name,
            reason,
            attempts,
            status: answer.map(|a| a.status),
            body: body.as_ref().map(|b| b.0.as_str()),
            body_encoding: body.as_ref().map(|b| b.1),
            content_type: answer.and_then(|a| a.content_type.as_deref()),
            error: error.as_deref(),
            message: entry.message.envelope(SystemTime::now()),
        };
        // why: a DeadLetter holds only strings, numbers and lists, which always serialize.
        let json = serde_json::to_vec(&letter).expect("a dead letter serializes");
        let mut message = Message::new(topic, json, Origin::Device);
        message.content_type = Some("application/json".to_owned());
        message.qos = entry.message.qos;
        if let Err(e) = self.bridge.publish(message, &rule.principal).await {
            tracing::warn!(rule = %rule.name, error = %e, "a dead letter was not published");
        }
    }

    fn note(&self, status: Option<u16>, error: Option<String>) {
        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        *self
            .rule
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(LastAttempt { status, error, at });
    }
}

/// What a dead-letter topic receives.
#[derive(Serialize)]
struct DeadLetter<'a> {
    rule: &'a str,
    /// `max_attempts`, `max_age`, `expired` (MQTT message expiry), `refused` (a 4xx) or
    /// `unaddressable` (a value would make a `.` or `..` path segment of the URL).
    reason: &'static str,
    attempts: u32,
    status: Option<u16>,
    body: Option<&'a str>,
    body_encoding: Option<&'static str>,
    content_type: Option<&'a str>,
    error: Option<&'a str>,
    message: Envelope,
}
