//! Devices that only serve: `[[push]]` rules send matching messages to HTTP and CoAP endpoints
//! through a durable outbox, `[[pull]]` rules read or observe device resources into topics.
//! Rules are checked at startup; each runs on a task of its own, push rules on threads of
//! their own.

mod coap;
mod outbox;
mod plain;
mod pull;
mod push;
mod record;
mod report;
mod retry;
mod shared;
mod template;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::{Bridge, Durable, Message, RulesReport, Tap, Topic, TopicFilter};
use crate::config::{Config, PullRule as PullConfig, PushMethod, PushRule as PushConfig};
use crate::metrics::{Metrics, RuleLabel};
use crate::policy::{Action, Policy, Principal};

pub use outbox::OutboxError;
pub use shared::{Lease, Sharing, Subscribe};
pub use template::TemplateError;

use self::coap::Transmission;
use self::outbox::{Bound, Outbox};
use self::template::{TopicTemplate, UrlTemplate, resolve_headers};

/// URL schemes a rule may call.
const SCHEMES: &[&str] = &["http", "https", "coap"];

/// Why the rules cannot run.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// A rule is invalid; the message names it.
    #[error("invalid config: {kind} rule `{name}`: {reason}")]
    Rule {
        /// `push` or `pull`.
        kind: &'static str,
        /// The rule's name (or its position when it has none).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The outbox on disk cannot be used.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The HTTP client cannot be built (no TLS roots, for one).
    #[error("cannot make the HTTP client of push and pull rules: {0}")]
    Client(String),
}

/// The push and pull rules with their outbox, opened and checked, not yet running.
pub struct Devices {
    push: Vec<Arc<push::PushRule>>,
    pull: Vec<Arc<pull::PullRule>>,
    outbox: Arc<Outbox>,
}

/// The running rules: the bridge's [`Tap`], and the outbox to close at shutdown.
pub struct Running {
    devices: Devices,
    metrics: Arc<Metrics>,
    /// Push rules take their messages from shared subscriptions, not from every message the
    /// gateway accepts.
    shared: bool,
    /// Where the push workers run.
    threads: PushThreads,
}

/// The push workers' own runtime. A rule's worker is one task that drives all of its
/// connections, woken by each answer; on the gateway's runtime every such wake-up could wake
/// the other worker thread too, and the pushes shared their queues with the HTTP and MQTT
/// connections. On threads of their own they do neither: on the MQTT → push path at 20,000
/// messages/s the gateway spent about a quarter less CPU per message (`bench/README.md`).
struct PushThreads {
    /// Shut down, without waiting, once the workers have stopped (or when the gateway goes).
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl PushThreads {
    /// Threads for `rules` push rules: one per rule, at most half the machine's cores, at
    /// least one; none without rules. Should the runtime not start, the workers run on the
    /// gateway's own.
    fn start(rules: usize) -> Self {
        let runtime = (rules > 0)
            .then(|| {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads((cores / 2).clamp(1, rules))
                    .thread_name("push")
                    .enable_all()
                    .build()
                    .inspect_err(
                        |e| tracing::warn!(error = %e, "push workers run on the gateway's threads"),
                    )
                    .ok()
            })
            .flatten();
        Self {
            runtime: Mutex::new(runtime),
        }
    }

    /// Runs `task` on the push threads, tracked by `tracker`.
    fn spawn<F>(&self, tracker: &TaskTracker, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &*self.lock() {
            Some(runtime) => drop(runtime.spawn(tracker.track_future(task))),
            None => drop(tracker.spawn(task)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<tokio::runtime::Runtime>> {
        self.runtime
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stop(&self) {
        let runtime = self.lock().take();
        // Never blocks, so it may run on a runtime's thread.
        if let Some(runtime) = runtime {
            runtime.shutdown_background();
        }
    }
}

impl Drop for PushThreads {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Devices {
    /// Checks every rule against the config and the ACL, and opens the outbox under the data
    /// dir with what an earlier run left in it.
    pub fn open(config: &Config, policy: &Policy, metrics: &Metrics) -> Result<Self, DevicesError> {
        let transmission = Transmission {
            ack_timeout: config.coap.ack_timeout,
            max_retransmit: config.coap.max_retransmit,
            block_size: config.coap.block_size,
        };
        let shared = client_builder()
            .build()
            .map_err(|e| DevicesError::Client(e.to_string()))?;
        let mut names = std::collections::HashSet::new();
        let mut push = Vec::new();
        for (i, rule) in config.push.iter().enumerate() {
            let fail = |reason: String| DevicesError::Rule {
                kind: "push",
                name: display_name(&rule.name, i),
                reason,
            };
            if !names.insert(rule.name.clone()) {
                return Err(fail("another rule has this name".to_owned()));
            }
            push.push(Arc::new(
                push_rule(rule, policy, transmission, &shared).map_err(fail)?,
            ));
        }
        // A dead letter a rule would push again would go round for ever.
        for rule in &push {
            if let Some(topic) = &rule.dead_letter_topic
                && let Some(other) = push.iter().find(|r| r.filter.matches(topic))
            {
                return Err(DevicesError::Rule {
                    kind: "push",
                    name: rule.name.to_string(),
                    reason: format!(
                        "`dead_letter_topic` {topic} matches the filter of push rule `{}`",
                        other.name
                    ),
                });
            }
        }
        let mut pull = Vec::new();
        for (i, rule) in config.pull.iter().enumerate() {
            let fail = |reason: String| DevicesError::Rule {
                kind: "pull",
                name: display_name(&rule.name, i),
                reason,
            };
            if !names.insert(rule.name.clone()) {
                return Err(fail("another rule has this name".to_owned()));
            }
            pull.push(Arc::new(
                pull_rule(rule, policy, transmission, &shared).map_err(fail)?,
            ));
        }
        let lanes = config
            .push
            .iter()
            .zip(&push)
            .map(|(c, rule)| {
                let label = RuleLabel {
                    rule: rule.name.to_string(),
                };
                let bound = Bound {
                    max_queued: c.max_queued,
                    when_full: c.when_full,
                    // Room for every request in flight and as many waiting behind them.
                    window: (2 * c.in_flight).max(outbox::MIN_WINDOW),
                    overflow: metrics.push_overflow.get_or_create(&label).clone(),
                    depth: metrics.push_queued.get_or_create(&label).clone(),
                };
                let scope = policy
                    .subscription(&rule.principal, rule.filter.as_str())
                    .unwrap_or(crate::policy::Readable::Nothing);
                (rule.name.clone(), rule.filter.clone(), scope, bound)
            })
            .collect();
        let outbox = Arc::new(Outbox::open(&config.data_dir, lanes)?);
        Ok(Self { push, pull, outbox })
    }

    /// Attaches the outbox to the bridge and starts one task per rule on `tracker`. With
    /// `sharing` (in front of an external broker) each push rule is fed by its shared
    /// subscription and each pull rule runs while this gateway holds its lease.
    pub fn start(
        self,
        bridge: &Bridge,
        sharing: Option<Sharing>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Arc<Running> {
        let threads = PushThreads::start(self.push.len());
        for (rule, lane) in self.push.iter().zip(self.outbox.lanes()) {
            let worker = push::Worker {
                rule: rule.clone(),
                lane: lane.clone(),
                client: rule.client.clone(),
                bridge: bridge.clone(),
            };
            threads.spawn(tracker, worker.run(cancel.clone()));
        }
        for rule in &self.pull {
            let (rule, client, bridge) = (rule.clone(), rule.client.clone(), bridge.clone());
            match &sharing {
                None => tracker.spawn(pull::run(rule, client, bridge, cancel.clone())),
                Some(sharing) => {
                    let held = (sharing.lease)(shared::lease_topic(&rule.name));
                    tracker.spawn(shared::leased(rule, client, bridge, held, cancel.clone()))
                }
            };
        }
        if let Some(sharing) = &sharing {
            for (lane, rule) in self.push.iter().enumerate() {
                let deliveries = (sharing.subscribe)(shared::push_group(&rule.name), &rule.filter);
                tracker.spawn(shared::intake(
                    self.outbox.clone(),
                    lane,
                    deliveries,
                    cancel.clone(),
                ));
            }
        }
        if !self.push.is_empty() || !self.pull.is_empty() {
            tracing::info!(
                push = self.push.len(),
                pull = self.pull.len(),
                "device rules running"
            );
        }
        let running = Arc::new(Running {
            devices: self,
            metrics: bridge.metrics().clone(),
            shared: sharing.is_some(),
            threads,
        });
        bridge.attach(running.clone());
        running
    }
}

impl Running {
    /// Commits what the outbox holds and closes it, and stops the push threads; call once
    /// every task has stopped.
    pub async fn close(&self) {
        self.devices.outbox.close().await;
        self.threads.stop();
    }
}

impl Tap for Running {
    fn offer(&self, message: &Arc<Message>) -> Option<Durable> {
        if self.shared {
            return None;
        }
        self.devices.outbox.offer(message)
    }

    fn report(&self) -> RulesReport {
        let d = &self.devices;
        report::report(&d.push, &d.pull, d.outbox.lanes(), &self.metrics)
    }
}

fn display_name(name: &str, i: usize) -> String {
    if name.is_empty() {
        format!("#{}", i + 1)
    } else {
        name.to_owned()
    }
}

fn principal(name: Option<&str>) -> Principal {
    match name {
        None | Some("anonymous") => Principal::Anonymous,
        Some(name) => Principal::Named(Arc::from(name)),
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn push_rule(
    c: &PushConfig,
    policy: &Policy,
    transmission: Transmission,
    shared: &reqwest::Client,
) -> Result<push::PushRule, String> {
    check_name(&c.name)?;
    let filter = TopicFilter::parse(&c.filter).map_err(|e| format!("`filter` {e}"))?;
    let url = UrlTemplate::parse(&c.url, SCHEMES).map_err(|e| e.to_string())?;
    let tls = [&c.ca_cert, &c.client_cert, &c.client_key];
    if c.url.starts_with("coap:") && (!c.headers.is_empty() || tls.iter().any(|k| k.is_some())) {
        return Err(
            "`headers` and certificates are HTTP's: a coap:// endpoint takes none".to_owned(),
        );
    }
    let client = client_for(shared, tls)?;
    let headers = resolve_headers(&c.headers, env_var).map_err(|e| e.to_string())?;
    let reply_topic = c
        .reply_topic
        .as_deref()
        .map(TopicTemplate::parse)
        .transpose()
        .map_err(|e| format!("`reply_topic` {e}"))?;
    let levels = filter.levels().count();
    let named = url
        .max_level()
        .max(reply_topic.as_ref().map_or(0, TopicTemplate::max_level));
    // `#` matches topics of any depth; otherwise a level past the filter's never exists.
    if named > levels && !filter.as_str().ends_with('#') {
        return Err(format!(
            "{{{named}}} names a topic level that `filter` {filter} (of {levels} levels) never has"
        ));
    }
    if let Some(reply) = &reply_topic
        && crate::policy::intersect(reply.as_filter().as_str(), filter.as_str()).is_some()
    {
        return Err(format!(
            "`reply_topic` {} can match `filter` {filter}: answers would be pushed again",
            reply.as_str()
        ));
    }
    let dead_letter_topic = c
        .dead_letter_topic
        .as_deref()
        .map(Topic::parse)
        .transpose()
        .map_err(|e| format!("`dead_letter_topic` {e}"))?;
    let who = principal(c.principal.as_deref());
    policy
        .subscription(&who, filter.as_str())
        .map_err(|e| format!("`filter` {filter}: principal {who}: {e}"))?;
    if let Some(topic) = &dead_letter_topic {
        policy
            .authorize(&who, Action::Publish, topic.as_str())
            .map_err(|e| format!("`dead_letter_topic` {topic}: principal {who}: {e}"))?;
    }
    if c.max_attempts == 0 {
        return Err("`max_attempts` must be at least 1".to_owned());
    }
    if !(1..=1024).contains(&c.in_flight) {
        return Err("`in_flight` must be from 1 to 1024".to_owned());
    }
    if c.max_queued == 0 {
        return Err("`max_queued` must be at least 1".to_owned());
    }
    if c.timeout.is_zero() || c.max_age.is_zero() {
        return Err("`timeout` and `max_age` must be longer than 0s".to_owned());
    }
    if c.backoff > c.max_backoff {
        return Err("`backoff` must not be longer than `max_backoff`".to_owned());
    }
    let plain = plain::Plain::for_origin(url.origin());
    Ok(push::PushRule {
        name: Arc::from(c.name.as_str()),
        filter,
        url,
        method: match c.method {
            PushMethod::POST => reqwest::Method::POST,
            PushMethod::PUT => reqwest::Method::PUT,
        },
        body: c.body,
        headers,
        reply_topic,
        dead_letter_topic,
        principal: who,
        max_attempts: c.max_attempts,
        max_age: c.max_age,
        timeout: c.timeout,
        backoff: c.backoff,
        max_backoff: c.max_backoff,
        in_flight: c.in_flight,
        transmission,
        plain,
        client,
        last: Mutex::new(None),
    })
}

fn pull_rule(
    c: &PullConfig,
    policy: &Policy,
    transmission: Transmission,
    shared: &reqwest::Client,
) -> Result<pull::PullRule, String> {
    check_name(&c.name)?;
    let template = UrlTemplate::parse(&c.url, SCHEMES).map_err(|e| e.to_string())?;
    let url = reqwest::Url::parse(&c.url)
        .ok()
        .filter(|_| template.max_level() == 0 && !c.url.contains('{'))
        .ok_or_else(|| format!("`url` {:?} takes no placeholders", c.url))?;
    let topic = Topic::parse(&c.topic).map_err(|e| format!("`topic` {e}"))?;
    let coap = url.scheme() == "coap";
    if c.observe && !coap {
        return Err("`observe` needs a coap:// URL".to_owned());
    }
    let tls = [&c.ca_cert, &c.client_cert, &c.client_key];
    if coap && (!c.headers.is_empty() || tls.iter().any(|k| k.is_some())) {
        return Err(
            "`headers` and certificates are HTTP's: a coap:// resource takes none".to_owned(),
        );
    }
    let client = client_for(shared, tls)?;
    let headers = resolve_headers(&c.headers, env_var).map_err(|e| e.to_string())?;
    let who = principal(c.principal.as_deref());
    policy
        .authorize(&who, Action::Publish, topic.as_str())
        .map_err(|e| format!("`topic` {topic}: principal {who}: {e}"))?;
    if c.interval.is_zero() || c.timeout.is_zero() {
        return Err("`interval` and `timeout` must be longer than 0s".to_owned());
    }
    Ok(pull::PullRule {
        name: Arc::from(c.name.as_str()),
        url,
        interval: c.interval,
        observe: c.observe,
        topic,
        retain: c.retain,
        headers,
        principal: who,
        timeout: c.timeout,
        max_backoff: c.max_backoff,
        transmission,
        client,
        last: Mutex::new(None),
    })
}

/// Appends to an answer's `body` what of `chunk` fits within `limit` bytes; false when some
/// of it did not fit, and the rest of the answer is not to be read.
fn append_within(body: &mut Vec<u8>, chunk: &[u8], limit: usize) -> bool {
    let room = limit.saturating_sub(body.len());
    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    chunk.len() <= room
}

/// What the gateway calls itself in its requests.
const USER_AGENT: &str = concat!("topicgate/", env!("CARGO_PKG_VERSION"));

/// A client that calls only configured URLs: redirects are not followed.
fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
}

/// The shared client, or, for a rule with `ca_cert` or a client certificate
/// (`[ca_cert, client_cert, client_key]`), a client of its own.
fn client_for(
    shared: &reqwest::Client,
    [ca, cert, key]: [&Option<PathBuf>; 3],
) -> Result<reqwest::Client, String> {
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(shared.clone());
    }
    let read = |name: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("`{name}` {}: {e}", path.display()))
    };
    let mut builder = client_builder();
    if let Some(ca) = ca {
        let certs = reqwest::Certificate::from_pem_bundle(&read("ca_cert", ca)?)
            .map_err(|e| format!("`ca_cert` {}: {e}", ca.display()))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    match (cert, key) {
        (Some(cert), Some(key)) => {
            let mut pem = read("client_cert", cert)?;
            pem.push(b'\n');
            pem.extend(read("client_key", key)?);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| format!("`client_cert` and `client_key`: {e}"))?;
            builder = builder.identity(identity);
        }
        (None, None) => {}
        _ => return Err("`client_cert` and `client_key` go together".to_owned()),
    }
    builder.build().map_err(|e| e.to_string())
}

/// Names appear in metric labels, `/rules` and the outbox's keys.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("`name` must be 1 to 64 letters, digits, `-`, `_` or `.`".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_TOML;
    use std::time::Duration;

    #[tokio::test]
    async fn push_workers_run_on_their_own_threads_under_the_gateways_tracker() {
        let tracker = TaskTracker::new();
        let none = PushThreads::start(0);
        assert!(none.lock().is_none());
        let threads = PushThreads::start(3);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stop = CancellationToken::new();
        let cancelled = stop.clone();
        threads.spawn(&tracker, async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
            cancelled.cancelled().await;
        });
        assert_eq!(rx.await.unwrap().as_deref(), Some("push"));
        // The gateway waits for the worker as for its own tasks.
        tracker.close();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), tracker.wait())
                .await
                .is_err()
        );
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .unwrap();
        // Stopped from a task of another runtime, without blocking it.
        threads.stop();
        assert!(threads.lock().is_none());
    }

    /// The commented block of the documented config that starts with the line `start`.
    fn example(start: &str) -> String {
        DEFAULT_TOML
            .lines()
            .skip_while(|l| *l != start)
            .take_while(|l| *l != "#")
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_documented_examples_are_valid_rules() {
        let text = format!("{}\n{}\n", example("# [[push]]"), example("# [[pull]]"));
        let config = Config::parse(&text, std::path::Path::new("example")).unwrap();
        assert_eq!(config.push[0].name, "plugs");
        assert_eq!(config.pull[0].name, "temp-7");
        let env = |_: &str| Some("token".to_owned());
        for rule in &config.push {
            UrlTemplate::parse(&rule.url, SCHEMES).unwrap();
            resolve_headers(&rule.headers, env).unwrap();
        }
        // Without the secrets and files a real deployment has.
        let mut open = config.clone();
        assert!(open.push[0].client_cert.is_some() && open.pull[0].ca_cert.is_some());
        open.push[0].headers.clear();
        open.pull[0].headers.clear();
        (
            open.push[0].ca_cert,
            open.push[0].client_cert,
            open.push[0].client_key,
        ) = (None, None, None);
        open.pull[0].ca_cert = None;
        let policy = Policy::open();
        let transmission = Transmission {
            ack_timeout: Duration::from_secs(2),
            max_retransmit: 4,
            block_size: 1024,
        };
        let shared = client_builder().build().unwrap();
        push_rule(&open.push[0], &policy, transmission, &shared).unwrap();
        pull_rule(&open.pull[0], &policy, transmission, &shared).unwrap();
    }
}
