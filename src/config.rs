//! Typed configuration: the documented default file, strict parsing that names the bad key, and
//! validation. Flags and environment variables are applied on top by `main`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The documented default configuration, printed by `topicgate print-config`.
pub const DEFAULT_TOML: &str = include_str!("../config/topicgate.toml");

/// Default ports of the MQTT, HTTP and CoAP listeners.
pub const MQTT_PORT: u16 = 1883;
/// Default HTTP port.
pub const HTTP_PORT: u16 = 8080;
/// Default CoAP port.
pub const COAP_PORT: u16 = 5683;
/// Default CoAP-over-DTLS port.
pub const COAPS_PORT: u16 = 5684;

/// Largest payload any protocol allows: MQTT's maximum remaining length less room for headers.
const MAX_PAYLOAD_CEILING: usize = 256 * 1024 * 1024 - 128 * 1024;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where state is kept.
    pub data_dir: PathBuf,
    /// Log line format.
    pub log_format: LogFormat,
    /// Time allowed for a graceful shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Time between `/readyz` turning 503 and the listeners closing, on SIGINT/SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_drain: Duration,
    /// Largest payload on every protocol, bytes.
    #[serde(deserialize_with = "size")]
    pub max_payload: usize,
    /// The embedded broker.
    pub mqtt: MqttConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// The CoAP endpoint.
    pub coap: CoapConfig,
    /// The bridge between the broker and the adapters.
    pub bridge: BridgeConfig,
    /// Request/response over HTTP and CoAP (`/rpc`).
    pub rpc: RpcConfig,
    /// An external broker to use instead of the embedded one.
    pub broker: BrokerConfig,
    /// Users, tokens and the topic ACL.
    pub auth: AuthConfig,
    /// Limits every protocol applies.
    pub limits: LimitsConfig,
    /// Certificates of the TLS listeners.
    pub tls: TlsConfig,
    /// `[[push]]`: messages matching a filter sent to device endpoints.
    pub push: Vec<PushRule>,
    /// `[[pull]]`: device resources read into topics.
    pub pull: Vec<PullRule>,
}

/// `[auth]`: identities and the one topic ACL every protocol enforces.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether clients without credentials are let in; unset: only when no user or token is
    /// configured.
    pub allow_anonymous: Option<bool>,
    /// Users with argon2 password hashes.
    pub users: Vec<UserEntry>,
    /// Static bearer tokens.
    pub tokens: Vec<TokenEntry>,
    /// ACL rules; with none, every principal may do everything.
    pub acl: Vec<AclEntry>,
    /// DTLS pre-shared keys of CoAP devices.
    pub psk: Vec<PskEntry>,
}

/// `[[auth.psk]]`: one DTLS PSK identity.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PskEntry {
    /// The PSK identity the device sends in its handshake.
    pub identity: String,
    /// The key, as text (what `coap-client -k` takes); `${VAR}` alone reads it from the
    /// environment at startup.
    pub key: String,
    /// The principal ACL rules name; unset, the identity.
    pub name: Option<String>,
}

impl fmt::Debug for PskEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("PskEntry")
            .field("identity", &self.identity)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PskEntry {
    /// The principal's name.
    pub fn principal(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.identity)
    }

    /// The key's bytes, read from the environment for `${VAR}`; the error says why not.
    pub fn key_bytes(&self) -> Result<Vec<u8>, String> {
        let key = match self
            .key
            .strip_prefix("${")
            .and_then(|rest| rest.strip_suffix('}'))
        {
            Some(var) => std::env::var(var)
                .map_err(|_| format!("uses ${{{var}}}, which is not set in the environment"))?,
            None => self.key.clone(),
        };
        if key.len() < 8 || key.len() > 64 {
            return Err("must be 8 to 64 bytes".to_owned());
        }
        Ok(key.into_bytes())
    }
}

/// `[[auth.users]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// The user name (MQTT user name, HTTP Basic user).
    pub name: String,
    /// An argon2 PHC string, as printed by `topicgate passwd`.
    pub password_hash: String,
}

/// `[[auth.tokens]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The principal the token stands for; ACL rules name it.
    pub name: String,
    /// The token (HTTP `Authorization: Bearer`, CoAP `?auth=`), at least 16 characters.
    pub token: String,
}

/// `[[auth.acl]]`: one rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclEntry {
    /// A user or token name, `anonymous`, or `*` for everyone.
    pub user: String,
    /// A topic filter; `%u` stands for the principal's name.
    pub topic: String,
    /// `read`, `write` or `readwrite`.
    pub access: AclAccess,
}

/// What an ACL rule grants, in Mosquitto's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclAccess {
    /// Read retained values, subscribe, stream, observe.
    #[serde(alias = "subscribe")]
    Read,
    /// Publish and clear.
    #[serde(alias = "publish")]
    Write,
    /// Both.
    ReadWrite,
    /// Neither, whatever other rules grant: deny rules are checked first.
    Deny,
}

/// `[limits]`: limits every protocol applies, each answered in its own terms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest topic name or filter, bytes.
    pub max_topic_length: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Requests (HTTP requests, CoAP requests, MQTT publishes) a second per principal, or per
    /// address for anonymous HTTP and CoAP clients; 0 turns the limit off.
    pub rate: u32,
    /// Requests allowed in a burst above the rate.
    pub burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_topic_length: 65_535,
            max_topic_levels: 128,
            rate: 10_000,
            burst: 20_000,
        }
    }
}

/// `[tls]`: the certificate of the HTTPS and MQTT-over-TLS listeners; they open only when
/// `cert` and `key` are set.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM file with the server's private key.
    pub key: Option<PathBuf>,
    /// PEM file with the CAs that sign client certificates; set, a client may authenticate
    /// with a certificate whose common name becomes its user name.
    pub client_ca: Option<PathBuf>,
    /// Whether a client certificate is required (only with `client_ca`).
    pub require_client_cert: bool,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[mqtt]`: the embedded broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// TCP listener address as given (file, env or flag); unset, see [`Config::mqtt_addrs`].
    #[serde(rename = "addr")]
    pub given_addr: Option<SocketAddr>,
    /// Most concurrent client connections.
    pub max_connections: usize,
    /// Time allowed between accept and CONNECT.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Receive Maximum announced to MQTT 5 clients: QoS 2 publishes awaiting PUBREL at once.
    pub max_inflight: usize,
    /// Size of one in-memory log segment, bytes.
    #[serde(deserialize_with = "size")]
    pub segment_size: usize,
    /// Segments kept per subscribed filter.
    pub segment_count: usize,
    /// MQTT over TLS listener address, opened when `[tls]` has a certificate.
    pub tls_addr: SocketAddr,
    /// Longest keep-alive granted, seconds: an MQTT 5 client asking for more (or for none) is
    /// told this one in the CONNACK's Server Keep Alive.
    pub max_keepalive: u16,
    /// How often the `$SYS` topics are published; 0 turns them off.
    #[serde(with = "humantime_serde")]
    pub sys_interval: Duration,
}

/// `[http]`: the HTTP API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// TCP listener address as given; unset, see [`Config::http_addrs`].
    pub addr: Option<SocketAddr>,
    /// Time limit of a non-streaming request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Default and largest page of a wildcard GET.
    pub list_limit: usize,
    /// Interval of SSE heartbeat comments.
    #[serde(with = "humantime_serde")]
    pub sse_heartbeat: Duration,
    /// Messages a stream may fall behind before it is told it lagged.
    pub sse_buffer: usize,
    /// Messages kept for `Last-Event-ID` resumption.
    pub sse_history: usize,
    /// Bytes of topics, payloads and metadata those messages may hold; the oldest go first.
    #[serde(deserialize_with = "size")]
    pub sse_history_bytes: usize,
    /// HTTPS listener address, opened when `[tls]` has a certificate.
    pub tls_addr: SocketAddr,
    /// Most connections per listener; more wait to be accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and to start the next request on an
    /// idle connection.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Most event streams open at once.
    pub max_streams: usize,
    /// Most event streams open at once for one principal (anonymous: one address).
    pub max_streams_per_client: usize,
    /// The longest `?wait=` a long-polling GET may ask for; more is refused (400).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Cross-origin requests from browsers; off while `origins` is empty.
    pub cors: CorsConfig,
}

/// `[http.cors]`: which web origins may call the API from a browser, with which methods and
/// request headers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed (`scheme://host[:port]`), or `"*"` for any; empty turns CORS off.
    pub origins: Vec<String>,
    /// Methods a preflight may ask for.
    pub methods: Vec<String>,
    /// Request headers a preflight may ask for (case-insensitive), or `"*"` for any.
    pub headers: Vec<String>,
    /// How long a browser may cache a preflight's answer.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            origins: Vec::new(),
            methods: ["GET", "POST", "PUT", "DELETE"].map(str::to_owned).to_vec(),
            headers: [
                "authorization",
                "content-type",
                "if-none-match",
                "last-event-id",
            ]
            .map(str::to_owned)
            .to_vec(),
            max_age: Duration::from_secs(600),
        }
    }
}

/// `[coap]`: the CoAP endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapConfig {
    /// UDP socket address as given; unset, see [`Config::coap_addrs`].
    pub addr: Option<SocketAddr>,
    /// RFC 7252 ACK_TIMEOUT: first wait for the ACK of a confirmable notification.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// RFC 7252 MAX_RETRANSMIT: resends of an unacknowledged notification before the observer
    /// is dropped.
    pub max_retransmit: u8,
    /// Most concurrent observations per CoAP socket; a registration beyond it gets 5.03.
    pub max_observers: usize,
    /// Largest block of a block-wise transfer, bytes: 16, 32, ... 1024.
    #[serde(deserialize_with = "size")]
    pub block_size: usize,
    /// Responses remembered to answer duplicate requests.
    pub dedup_capacity: usize,
    /// Most concurrent block-wise uploads.
    pub max_uploads: usize,
    /// Most publishes waiting for the broker; beyond it requests get 5.03.
    pub max_pending: usize,
    /// CoAP over DTLS socket address, opened when `[[auth.psk]]` or `[tls]` names a key.
    pub dtls_addr: SocketAddr,
    /// Most DTLS sessions at once, handshakes included.
    pub dtls_max_sessions: usize,
    /// Most DTLS handshakes in progress at once.
    pub dtls_max_handshakes: usize,
    /// Most DTLS handshakes in progress at once from one IP address.
    pub dtls_max_handshakes_per_address: usize,
    /// Time a DTLS handshake may take.
    #[serde(with = "humantime_serde")]
    pub dtls_handshake_timeout: Duration,
    /// A DTLS session that received nothing for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub dtls_idle_timeout: Duration,
}

/// `[broker]`: an external MQTT broker or cluster to front instead of running the embedded one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `mqtt://host[:port]`; empty runs the embedded broker.
    pub url: String,
    /// User name for the broker.
    pub username: Option<String>,
    /// Password for the broker.
    pub password: Option<String>,
    /// MQTT keep-alive of the gateway's connection.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Longest wait between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl BrokerConfig {
    /// Host and port of the external broker, or `None` for the embedded one.
    pub fn endpoint(&self) -> Result<Option<(String, u16)>, String> {
        if self.url.is_empty() {
            return Ok(None);
        }
        let rest = self
            .url
            .strip_prefix("mqtt://")
            .ok_or("must start with mqtt:// (TLS is not supported yet)")?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("has a bad port {p:?}"))?,
            ),
            _ => (rest, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') || host.contains('@') {
            return Err("must be mqtt://host or mqtt://host:port".to_owned());
        }
        Ok(Some((host.to_owned(), port)))
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// `[bridge]`: between the broker and the adapters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// Client publishes queued between the broker and the gateway.
    pub link_buffer: usize,
}

/// `[rpc]`: how long `/rpc` requests wait for their reply.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcConfig {
    /// The wait when the request gives no `?timeout=`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The longest `?timeout=` a request may ask for; more is refused (400 / 4.00).
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(60),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            log_format: LogFormat::Text,
            shutdown_grace: Duration::from_secs(5),
            shutdown_drain: Duration::ZERO,
            max_payload: 1024 * 1024,
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            coap: CoapConfig::default(),
            bridge: BridgeConfig::default(),
            rpc: RpcConfig::default(),
            broker: BrokerConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            tls: TlsConfig::default(),
            push: Vec::new(),
            pull: Vec::new(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            given_addr: None,
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(5),
            max_inflight: 100,
            segment_size: 1024 * 1024,
            segment_count: 3,
            tls_addr: SocketAddr::from(([0, 0, 0, 0], 8883)),
            max_keepalive: 65535,
            sys_interval: Duration::from_secs(10),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: None,
            request_timeout: Duration::from_secs(30),
            list_limit: 1000,
            sse_heartbeat: Duration::from_secs(15),
            sse_buffer: 1024,
            sse_history: 10_000,
            sse_history_bytes: 64 * 1024 * 1024,
            tls_addr: SocketAddr::from(([0, 0, 0, 0], 8443)),
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            max_streams: 10_000,
            max_streams_per_client: 100,
            max_wait: Duration::from_secs(60),
            cors: CorsConfig::default(),
        }
    }
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            addr: None,
            ack_timeout: Duration::from_secs(2),
            max_retransmit: 4,
            max_observers: 10_000,
            block_size: 1024,
            dedup_capacity: 10_000,
            max_uploads: 64,
            max_pending: 1024,
            dtls_addr: SocketAddr::from(([0, 0, 0, 0], COAPS_PORT)),
            dtls_max_sessions: 10_000,
            dtls_max_handshakes: 256,
            dtls_max_handshakes_per_address: 16,
            dtls_handshake_timeout: Duration::from_secs(10),
            dtls_idle_timeout: Duration::from_secs(600),
        }
    }
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self { link_buffer: 4096 }
    }
}

/// `[[push]]`: every message matching `filter` is sent to `url` through the durable outbox.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRule {
    /// Names the rule in metrics, `/rules`, errors and the outbox.
    pub name: String,
    /// The topic filter whose messages are pushed.
    pub filter: String,
    /// The endpoint (`http`, `https` or `coap`); `{1}`, `{2}`… (topic levels) and `{payload}`
    /// fill its path and query.
    pub url: String,
    /// `POST` or `PUT`.
    #[serde(default)]
    pub method: PushMethod,
    /// What the request carries.
    #[serde(default)]
    pub body: PushBody,
    /// Request headers; `${VAR}` in a value is read from the environment at startup.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Where the device's answer is published; `{1}`, `{2}`… are topic levels.
    #[serde(default)]
    pub reply_topic: Option<String>,
    /// Where a message that cannot be delivered is published, with the last answer.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Whose ACL the rule reads its filter and publishes its replies under; unset: anonymous.
    #[serde(default)]
    pub principal: Option<String>,
    /// Attempts before a message becomes a dead letter.
    #[serde(default = "push_defaults::max_attempts")]
    pub max_attempts: u32,
    /// Age at which a message still undelivered becomes a dead letter.
    #[serde(default = "push_defaults::max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Time allowed for one request, answer included.
    #[serde(default = "push_defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// First wait after a failure; doubles up to `max_backoff`, with jitter.
    #[serde(default = "push_defaults::backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Longest wait between attempts (a longer `Retry-After` is still honoured).
    #[serde(default = "push_defaults::max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Most messages waiting in the rule's outbox.
    #[serde(default = "push_defaults::max_queued")]
    pub max_queued: usize,
    /// What a message finds at the bound.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Requests the rule has in flight at once, each for a different topic: messages on one
    /// topic go one after the other, in order.
    #[serde(default = "push_defaults::in_flight")]
    pub in_flight: usize,
    /// PEM file of CAs that sign the endpoint's certificate, trusted besides the system's.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// PEM file of a client certificate chain to present to an HTTPS endpoint.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

/// The request method of a push rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum PushMethod {
    /// `POST`.
    #[default]
    #[serde(alias = "post")]
    POST,
    /// `PUT`.
    #[serde(alias = "put")]
    PUT,
}

/// What a push request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushBody {
    /// The payload, with its content type as `Content-Type`.
    #[default]
    Raw,
    /// The JSON envelope of the HTTP API's event streams.
    Envelope,
}

/// What happens to a message for a full outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// The oldest waiting message is dropped to make room (counted).
    #[default]
    DropOldest,
    /// The new message is not queued (counted).
    Refuse,
}

mod push_defaults {
    use std::time::Duration;
    pub(super) fn max_attempts() -> u32 {
        10
    }
    pub(super) fn max_age() -> Duration {
        Duration::from_secs(3600)
    }
    pub(super) fn timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn backoff() -> Duration {
        Duration::from_millis(500)
    }
    pub(super) fn max_backoff() -> Duration {
        Duration::from_secs(60)
    }
    pub(super) fn max_queued() -> usize {
        10_000
    }
    pub(super) fn in_flight() -> usize {
        32
    }
    pub(super) fn interval() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn retain() -> bool {
        true
    }
}

/// `[[pull]]`: a device resource (HTTP, or CoAP read or observed) published to `topic` when it
/// changes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRule {
    /// Names the rule in metrics, `/rules` and errors.
    pub name: String,
    /// The resource to GET.
    pub url: String,
    /// Time between reads (with `observe`: before registering again with a device that
    /// does not support Observe).
    #[serde(default = "push_defaults::interval", with = "humantime_serde")]
    pub interval: Duration,
    /// `coap://` only: register with CoAP Observe (RFC 7641) instead of reading on the
    /// interval, and register again when notifications stop.
    #[serde(default)]
    pub observe: bool,
    /// Where a new value is published.
    pub topic: String,
    /// Whether it is published retained.
    #[serde(default = "push_defaults::retain")]
    pub retain: bool,
    /// Request headers; `${VAR}` in a value is read from the environment at startup.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Whose ACL the rule publishes under; unset: anonymous.
    #[serde(default)]
    pub principal: Option<String>,
    /// Time allowed for one request, answer included.
    #[serde(default = "push_defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest wait between reads of an unreachable device; waits start at `interval` and
    /// double.
    #[serde(default = "push_defaults::max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// PEM file of CAs that sign the endpoint's certificate, trusted besides the system's.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// PEM file of a client certificate chain to present to an HTTPS endpoint.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

/// A configuration that cannot be used, with the file, key or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a wrong key or value.
    #[error("config file {path}{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// ` line N` when known.
        line: LineRef,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value parses but cannot work.
    #[error("invalid config: `{key}` {reason}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// A line number for messages, printed as ` line N`, or nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineRef(Option<usize>);

impl fmt::Display for LineRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, " line {n}"),
            None => Ok(()),
        }
    }
}

impl AuthConfig {
    /// Whether nothing is configured that keeps anyone out: anonymous clients may publish and
    /// read every topic.
    pub fn is_open(&self) -> bool {
        let anonymous = self
            .allow_anonymous
            .unwrap_or(self.users.is_empty() && self.tokens.is_empty());
        anonymous && self.acl.is_empty()
    }
}

/// Where listeners bind when no address is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultBind {
    /// Loopback only: nothing in `[auth]` keeps anyone out (as Mosquitto 2 with no listener).
    Loopback,
    /// Every interface: `[auth]` asks for credentials or an ACL.
    Everywhere,
}

impl Config {
    /// Where listeners with no address given bind.
    pub fn default_bind(&self) -> DefaultBind {
        if self.auth.is_open() {
            DefaultBind::Loopback
        } else {
            DefaultBind::Everywhere
        }
    }

    /// The addresses the MQTT listener binds: the one given, else [`Self::listen_addrs`].
    pub fn mqtt_addrs(&self) -> Vec<SocketAddr> {
        self.listen_addrs(self.mqtt.given_addr, MQTT_PORT)
    }

    /// The addresses the HTTP listener binds.
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.listen_addrs(self.http.addr, HTTP_PORT)
    }

    /// The addresses the CoAP socket binds.
    pub fn coap_addrs(&self) -> Vec<SocketAddr> {
        self.listen_addrs(self.coap.addr, COAP_PORT)
    }

    /// A listener's addresses: the one given, used as is; else with an open `[auth]` IPv4 and
    /// IPv6 loopback on `port` (a binder skips `[::1]` where the host has no IPv6 and gives it
    /// the port the first bound, for port 0); else every interface on `port`.
    pub fn listen_addrs(&self, given: Option<SocketAddr>, port: u16) -> Vec<SocketAddr> {
        match (given, self.default_bind()) {
            (Some(addr), _) => vec![addr],
            (None, DefaultBind::Loopback) => vec![
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
            ],
            (None, DefaultBind::Everywhere) => {
                vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)]
            }
        }
    }

    /// Reads `path`, or returns the defaults when there is none; then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = match path {
            None => Self::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(&text, path)?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            ConfigError::Parse {
                path: origin.to_owned(),
                line: LineRef(line),
                message: e.message().trim().replace('\n', " "),
            }
        })
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.shutdown_drain > Duration::from_secs(300) {
            return invalid("shutdown_drain", "must be at most 5m");
        }
        if self.max_payload == 0 || self.max_payload > MAX_PAYLOAD_CEILING {
            return invalid("max_payload", "must be between 1 byte and 255.8 MiB");
        }
        if self.mqtt.max_connections == 0 {
            return invalid("mqtt.max_connections", "must be at least 1");
        }
        if self.mqtt.connect_timeout.is_zero() || self.mqtt.connect_timeout.as_millis() > 65_535 {
            return invalid("mqtt.connect_timeout", "must be between 1ms and 65s");
        }
        if self.mqtt.max_inflight == 0 {
            return invalid("mqtt.max_inflight", "must be at least 1");
        }
        if self.mqtt.segment_size < 1024 {
            return invalid("mqtt.segment_size", "must be at least 1KiB");
        }
        if self.mqtt.segment_count == 0 {
            return invalid("mqtt.segment_count", "must be at least 1");
        }
        if self.http.list_limit == 0 {
            return invalid("http.list_limit", "must be at least 1");
        }
        if self.http.sse_heartbeat.is_zero() {
            return invalid("http.sse_heartbeat", "must be longer than 0s");
        }
        if self.http.request_timeout.is_zero() {
            return invalid("http.request_timeout", "must be longer than 0s");
        }
        if self.http.max_wait.is_zero() || self.http.max_wait > Duration::from_secs(3600) {
            return invalid("http.max_wait", "must be between 1ms and 1h");
        }
        for origin in &self.http.cors.origins {
            if origin != "*" && !valid_origin(origin) {
                return invalid(
                    "http.cors.origins",
                    "each must be \"*\" or scheme://host[:port], without a path",
                );
            }
        }
        for method in &self.http.cors.methods {
            if !is_token(method) {
                return invalid("http.cors.methods", "each must be an HTTP method");
            }
        }
        for name in &self.http.cors.headers {
            if name != "*" && !is_token(name) {
                return invalid("http.cors.headers", "each must be a header name or \"*\"");
            }
        }
        if self.http.sse_buffer == 0 {
            return invalid("http.sse_buffer", "must be at least 1");
        }
        if self.http.sse_history_bytes < self.max_payload {
            return invalid(
                "http.sse_history_bytes",
                "must be at least max_payload: it also bounds what a stream that falls behind can still get",
            );
        }
        if self.coap.ack_timeout.is_zero() || self.coap.ack_timeout > Duration::from_secs(60) {
            return invalid("coap.ack_timeout", "must be between 1ms and 60s");
        }
        if self.coap.max_retransmit > 10 {
            return invalid("coap.max_retransmit", "must be at most 10");
        }
        if !(16..=1024).contains(&self.coap.block_size) || !self.coap.block_size.is_power_of_two() {
            return invalid(
                "coap.block_size",
                "must be 16, 32, 64, 128, 256, 512 or 1024",
            );
        }
        if self.coap.max_observers == 0 {
            return invalid("coap.max_observers", "must be at least 1");
        }
        if self.coap.dedup_capacity == 0 {
            return invalid("coap.dedup_capacity", "must be at least 1");
        }
        if self.coap.dtls_max_sessions == 0 {
            return invalid("coap.dtls_max_sessions", "must be at least 1");
        }
        if self.coap.dtls_max_handshakes_per_address == 0 {
            return invalid("coap.dtls_max_handshakes_per_address", "must be at least 1");
        }
        if self.coap.dtls_max_handshakes == 0 {
            return invalid("coap.dtls_max_handshakes", "must be at least 1");
        }
        if self.coap.dtls_handshake_timeout.is_zero() {
            return invalid("coap.dtls_handshake_timeout", "must be more than 0");
        }
        if self.coap.dtls_idle_timeout < Duration::from_secs(1) {
            return invalid("coap.dtls_idle_timeout", "must be at least 1s");
        }
        self.validate_psk()?;
        if self.coap.max_pending == 0 {
            return invalid("coap.max_pending", "must be at least 1");
        }
        if let Err(reason) = self.broker.endpoint() {
            return Err(ConfigError::Invalid {
                key: "broker.url",
                reason,
            });
        }
        // rumqttc, which the gateway connects with, refuses less than 5 s.
        if self.broker.keep_alive < Duration::from_secs(5)
            || self.broker.keep_alive > Duration::from_secs(65_535)
        {
            return invalid("broker.keep_alive", "must be between 5s and 65535s");
        }
        if self.broker.max_backoff.is_zero() {
            return invalid("broker.max_backoff", "must be longer than 0s");
        }
        if self.broker.password.is_some() && self.broker.username.is_none() {
            return invalid("broker.password", "needs broker.username");
        }
        if self.bridge.link_buffer == 0 {
            return invalid("bridge.link_buffer", "must be at least 1");
        }
        if self.rpc.max_timeout.is_zero() || self.rpc.max_timeout > Duration::from_secs(3600) {
            return invalid("rpc.max_timeout", "must be between 1ms and 1h");
        }
        if self.rpc.timeout.is_zero() || self.rpc.timeout > self.rpc.max_timeout {
            return invalid(
                "rpc.timeout",
                "must be longer than 0s and at most rpc.max_timeout",
            );
        }
        if self.http.max_connections == 0 {
            return invalid("http.max_connections", "must be at least 1");
        }
        if self.http.header_timeout.is_zero() {
            return invalid("http.header_timeout", "must be longer than 0s");
        }
        if self.http.max_streams == 0 || self.http.max_streams_per_client == 0 {
            return invalid(
                "http.max_streams",
                "and http.max_streams_per_client must be at least 1",
            );
        }
        if !(1..=65_535).contains(&self.limits.max_topic_length) {
            return invalid("limits.max_topic_length", "must be between 1 and 65535");
        }
        if self.limits.max_topic_levels == 0 {
            return invalid("limits.max_topic_levels", "must be at least 1");
        }
        if self.limits.rate > 0 && self.limits.burst == 0 {
            return invalid("limits.burst", "must be at least 1 when limits.rate is set");
        }
        self.validate_auth()?;
        self.validate_tls()
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let mut names = std::collections::HashSet::new();
        for user in &self.auth.users {
            check_name(&user.name).or_else(|r| invalid("auth.users.name", r))?;
            if !names.insert(user.name.as_str()) {
                return invalid(
                    "auth.users.name",
                    format!("{:?} is listed twice", user.name),
                );
            }
            crate::policy::check_hash(&user.password_hash).or_else(|r| {
                invalid(
                    "auth.users.password_hash",
                    format!("of {:?} {r}", user.name),
                )
            })?;
        }
        let mut tokens = std::collections::HashSet::new();
        for token in &self.auth.tokens {
            check_name(&token.name).or_else(|r| invalid("auth.tokens.name", r))?;
            if token.token.chars().count() < 16 || token.token.contains(char::is_whitespace) {
                return invalid(
                    "auth.tokens.token",
                    format!(
                        "of {:?} must be at least 16 characters without spaces",
                        token.name
                    ),
                );
            }
            if !tokens.insert(token.token.as_str()) {
                return invalid("auth.tokens.token", "is used twice".to_owned());
            }
        }
        for rule in &self.auth.acl {
            if rule.user.is_empty() {
                return invalid("auth.acl.user", "is empty".to_owned());
            }
            crate::policy::check_pattern(&rule.topic).or_else(|r| invalid("auth.acl.topic", r))?;
        }
        Ok(())
    }

    fn validate_psk(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for entry in &self.auth.psk {
            let invalid = |reason: String| {
                Err(ConfigError::Invalid {
                    key: "auth.psk",
                    reason: format!("identity {:?}: {reason}", entry.identity),
                })
            };
            if entry.identity.is_empty() || entry.identity.len() > 128 {
                return invalid("the identity must be 1 to 128 bytes".to_owned());
            }
            if !seen.insert(entry.identity.as_str()) {
                return invalid("is given twice".to_owned());
            }
            if entry.principal().is_empty() {
                return invalid("name must not be empty".to_owned());
            }
            if let Err(reason) = entry.key_bytes() {
                return invalid(format!("key {reason}"));
            }
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return invalid("tls.key", "is needed with tls.cert"),
            (None, Some(_)) => return invalid("tls.cert", "is needed with tls.key"),
            (None, None) if self.tls.client_ca.is_some() => {
                return invalid("tls.client_ca", "needs tls.cert and tls.key");
            }
            _ => {}
        }
        if self.tls.require_client_cert && self.tls.client_ca.is_none() {
            return invalid("tls.require_client_cert", "needs tls.client_ca");
        }
        Ok(())
    }
}

/// A user or token name: not empty, not a reserved word, no wildcard or separator.
/// An origin as browsers send it: `scheme://host[:port]`, nothing after.
fn valid_origin(origin: &str) -> bool {
    origin.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' '])
    })
}

/// An HTTP token (RFC 9110 5.6.2): what method and header names are made of.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "anonymous" || name == "*" {
        return Err(format!("{name:?} cannot be used as a name"));
    }
    if name.contains(['/', '+', '#', '\0', ':']) {
        return Err(format!(
            "{name:?} may not contain '/', '+', '#', ':' or U+0000"
        ));
    }
    Ok(())
}

/// Parses `"512KiB"`, `"1MiB"`, `"1000"` or an integer into bytes.
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected a number of bytes like \"1MiB\""))?;
    let factor: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" | "k" | "kB" => 1024,
        "MiB" | "M" | "MB" => 1024 * 1024,
        "GiB" | "G" | "GB" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {text:?}: use B, KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => usize::try_from(n).map_err(serde::de::Error::custom),
        Raw::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_file_is_exactly_the_defaults() {
        let parsed = Config::parse(DEFAULT_TOML, Path::new("config/topicgate.toml"))
            .expect("the default config parses");
        assert_eq!(parsed, Config::default());
        parsed.validate().expect("the defaults are valid");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse(
            "[http]\naddr = \"127.0.0.1:1\"\nbogus = 1\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("x.toml line 3"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn listeners_bind_loopback_until_auth_or_an_address_says_otherwise() {
        let mut c = Config::default();
        let loopback: Vec<SocketAddr> = vec![
            "127.0.0.1:8080".parse().unwrap(),
            "[::1]:8080".parse().unwrap(),
        ];
        assert_eq!(c.http_addrs(), loopback);
        assert_eq!(c.mqtt_addrs()[0], "127.0.0.1:1883".parse().unwrap());
        assert_eq!(c.coap_addrs()[1], "[::1]:5683".parse().unwrap());
        c.http.addr = Some("0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.http_addrs(), vec!["0.0.0.0:9000".parse().unwrap()]);
        c.auth.tokens.push(TokenEntry {
            name: "t".to_owned(),
            token: "0123456789abcdef".to_owned(),
        });
        assert_eq!(c.coap_addrs(), vec!["0.0.0.0:5683".parse().unwrap()]);
        let file = Config::parse("[mqtt]\naddr = \"[::1]:1884\"\n", Path::new("x")).unwrap();
        assert_eq!(file.mqtt_addrs(), vec!["[::1]:1884".parse().unwrap()]);
    }

    #[test]
    fn the_docker_image_config_binds_every_interface() {
        let text = include_str!("../config/docker.toml");
        let c = Config::parse(text, Path::new("config/docker.toml")).expect("it parses");
        c.validate().expect("it is valid");
        assert_eq!(c.mqtt_addrs(), vec!["0.0.0.0:1883".parse().unwrap()]);
        assert_eq!(c.http_addrs(), vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(c.coap_addrs(), vec!["0.0.0.0:5683".parse().unwrap()]);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1MiB"), Ok(1024 * 1024));
        assert_eq!(parse_size("512 KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn invalid_values_name_their_key() {
        let c = Config {
            max_payload: 0,
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`max_payload`"), "{err}");
        let mut c = Config::default();
        c.rpc.timeout = Duration::from_secs(90);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`rpc.timeout`"), "{err}");
        c.rpc.max_timeout = Duration::ZERO;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`rpc.max_timeout`"), "{err}");
        // Below what the broker client takes, refused at startup rather than raised quietly.
        let mut c = Config::default();
        c.broker.keep_alive = Duration::from_secs(2);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`broker.keep_alive`"), "{err}");
        let mut c = Config::default();
        c.http.sse_history_bytes = c.max_payload - 1;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`http.sse_history_bytes`"), "{err}");
    }

    #[test]
    fn psk_entries_are_checked_and_keys_never_shown() {
        let text = r#"
            [[auth.psk]]
            identity = "sensor-7"
            key = "${TOPICGATE_TEST_UNSET_PSK}"
        "#;
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("`auth.psk`") && err.contains("TOPICGATE_TEST_UNSET_PSK"),
            "{err}"
        );
        let text = "[[auth.psk]]\nidentity = \"a\"\nkey = \"short\"\nname = \"kitchen\"\n";
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.auth.psk.push(PskEntry {
            identity: "a".to_owned(),
            key: "secret-key-1234".to_owned(),
            name: Some("kitchen".to_owned()),
        });
        c.validate().expect("a good entry");
        assert_eq!(c.auth.psk[0].principal(), "kitchen");
        assert!(!format!("{c:?}").contains("secret-key-1234"));
        c.auth.psk.push(c.auth.psk[0].clone());
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn long_poll_and_cors_settings_are_checked() {
        let text = r#"
            [http]
            max_wait = "2m"
            [http.cors]
            origins = ["https://dash.example", "http://localhost:3000"]
            headers = ["*"]
        "#;
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.http.max_wait, Duration::from_secs(120));
        assert_eq!(c.http.cors.origins.len(), 2);
        assert_eq!(c.http.cors.methods, CorsConfig::default().methods);
        for (tweak, key) in [
            (
                (|c: &mut Config| c.http.max_wait = Duration::ZERO) as fn(&mut Config),
                "`http.max_wait`",
            ),
            (
                |c| c.http.cors.origins = vec!["https://dash.example/app".to_owned()],
                "`http.cors.origins`",
            ),
            (
                |c| c.http.cors.origins = vec!["dash.example".to_owned()],
                "`http.cors.origins`",
            ),
            (
                |c| c.http.cors.methods = vec!["GET POST".to_owned()],
                "`http.cors.methods`",
            ),
            (
                |c| c.http.cors.headers = vec!["x:y".to_owned()],
                "`http.cors.headers`",
            ),
        ] {
            let mut c = Config::default();
            tweak(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn broker_urls_name_host_and_port() {
        let endpoint = |url: &str| {
            BrokerConfig {
                url: url.to_owned(),
                ..BrokerConfig::default()
            }
            .endpoint()
        };
        assert_eq!(endpoint(""), Ok(None));
        assert_eq!(
            endpoint("mqtt://broker.local"),
            Ok(Some(("broker.local".to_owned(), 1883)))
        );
        assert_eq!(
            endpoint("mqtt://10.0.0.5:1884/"),
            Ok(Some(("10.0.0.5".to_owned(), 1884)))
        );
        assert_eq!(
            endpoint("mqtt://[::1]:1885"),
            Ok(Some(("::1".to_owned(), 1885)))
        );
        assert!(endpoint("mqtts://broker").is_err());
        assert!(endpoint("mqtt://broker:port").is_err());
        assert!(endpoint("mqtt://user@broker").is_err());
        assert!(endpoint("mqtt://").is_err());
        let c = Config {
            broker: BrokerConfig {
                url: "tcp://x".to_owned(),
                ..BrokerConfig::default()
            },
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`broker.url`"), "{err}");
    }
}
