//! Requests on `/topics/...`, `/ps/...` and `/.well-known/core`, each mapped onto one bridge
//! call; and the representations that responses and notifications carry.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use coap_lite::{CoapOption, RequestType, ResponseType};

use super::block::{Progress, UploadError, Uploads, slice};
use super::discovery;
use super::endpoint::Source;
use super::request::{Reply, Request};
use super::wire::Block;
use crate::bridge::{
    Bridge, BridgeError, Call, CallError, Listing, Message, Origin, ParamError, Qos, Topic,
    TopicFilter, apply_expiry, content_format_for, content_type_for, fnv1a, parse_flag,
    parse_limit, parse_qos,
};
use crate::policy::{
    Action as Access, AuthError, Denial, Door, Policy, Principal, Readable, Refusal,
};

/// Max-Age of a representation without an expiry: the CoAP default, stated.
const DEFAULT_MAX_AGE: u32 = 60;
/// Content-Format of JSON.
const JSON: u16 = 50;
/// Content-Format of link format.
const LINK_FORMAT: u16 = 40;
/// Largest page of a filter GET.
const LIST_LIMIT: usize = 1000;
/// Largest reply to a call: a reply goes whole in one datagram, since a Block2 follow-up would
/// be a new request, so under what one UDP datagram carries with the header and options.
const MAX_REPLY: usize = 64 * 1024 - 1024;
/// The Uri-Query parameter carrying a bearer token (as in EMQX's CoAP gateway); it travels in
/// clear text without DTLS.
const AUTH: &str = "auth";

/// What the endpoint does with a request.
#[derive(Debug)]
pub(crate) enum Action {
    /// Answer now.
    Reply(Reply),
    /// Register an observation, then answer with `reply` plus the Observe option.
    Observe {
        /// The filter observed.
        filter: TopicFilter,
        /// The topics under it the observer may read.
        scope: Readable,
        /// Block size exponent for its notifications.
        szx: u8,
        /// The registration response.
        reply: Reply,
    },
    /// End the observation with this request's token, then answer.
    Deregister(Reply),
    /// Wait for the broker, then answer.
    Work(Work),
}

/// What waits for the broker, off the endpoint's loop.
#[derive(Debug)]
pub(crate) enum Work {
    /// Publish through the bridge for a principal, then answer `reply` on success.
    Publish(Box<Message>, Reply, Principal),
    /// Clear a retained value through the bridge for a principal.
    Clear(Topic, Principal),
    /// Publish a request for a principal and answer with its reply (`/rpc`).
    Call(Box<Message>, Call, Principal),
}

impl Work {
    /// Whether the answer may take longer than a client waits for an ACK: a call, which waits
    /// for its reply, is then acknowledged first and answered separately.
    pub(crate) fn may_wait(&self) -> bool {
        matches!(self, Work::Call(..))
    }
}

/// A representation of a topic or filter.
#[derive(Debug, Clone)]
pub(crate) struct Representation {
    /// The bytes.
    pub(crate) payload: Bytes,
    /// Its Content-Format, if the table has one.
    pub(crate) format: Option<u16>,
    /// Strong validator.
    pub(crate) etag: u64,
    /// Seconds it stays fresh.
    pub(crate) max_age: u32,
}

impl Representation {
    /// A message as the resource of its topic.
    pub(crate) fn of_message(message: &Message, now: SystemTime) -> Self {
        Self {
            payload: message.payload.clone(),
            format: message.content_type.as_deref().and_then(content_format_for),
            etag: message.validator(),
            max_age: message.remaining_expiry(now).unwrap_or(DEFAULT_MAX_AGE),
        }
    }

    /// Messages as the JSON listing of a filter.
    pub(crate) fn of_listing(messages: &[Arc<Message>], next: Option<String>) -> Self {
        let listing = Listing::new(messages, next, SystemTime::now());
        // Serializing plain strings and numbers cannot fail.
        let payload = Bytes::from(serde_json::to_vec(&listing).unwrap_or_default());
        Self {
            etag: fnv1a(payload.iter()),
            payload,
            format: Some(JSON),
            max_age: DEFAULT_MAX_AGE,
        }
    }

    /// The nothing-retained state of an observed topic: an empty payload.
    pub(crate) fn empty() -> Self {
        Self {
            payload: Bytes::new(),
            format: None,
            etag: 0,
            max_age: DEFAULT_MAX_AGE,
        }
    }

    /// A 2.05 carrying block `block` of this representation (RFC 7959), or 4.02 past the end.
    pub(crate) fn content(&self, block: Option<Block>, max_szx: u8) -> Reply {
        let mut reply = Reply::new(ResponseType::Content);
        if let Some(format) = self.format {
            reply = reply.with_uint(CoapOption::ContentFormat, u32::from(format));
        }
        if !self.payload.is_empty() {
            reply = reply.with(CoapOption::ETag, self.etag.to_be_bytes().to_vec());
        }
        reply = reply.with_uint(CoapOption::MaxAge, self.max_age);
        let whole = self.payload.len()
            <= Block {
                num: 0,
                more: false,
                szx: max_szx,
            }
            .size();
        if whole && block.is_none_or(|b| b.num == 0 && b.size() >= self.payload.len()) {
            reply.payload = self.payload.clone();
            return reply;
        }
        let Some(part) = slice(&self.payload, block, max_szx) else {
            return Reply::error(ResponseType::BadOption, "Block2 asks past the end");
        };
        reply.payload = part.payload;
        if part.block.num == 0 {
            reply = reply.with_uint(CoapOption::Size2, self.payload.len() as u32);
        }
        reply.with(CoapOption::Block2, part.block.encode())
    }
}

/// Maps requests to actions.
#[derive(Clone)]
pub(crate) struct Handler {
    bridge: Bridge,
    max_szx: u8,
}

impl Handler {
    /// A handler over `bridge` sending blocks of at most `16 << max_szx` bytes.
    pub(crate) fn new(bridge: Bridge, max_szx: u8) -> Self {
        Self { bridge, max_szx }
    }

    /// The bridge.
    pub(crate) fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// Decides what to do with a request from `source`.
    pub(crate) fn handle(
        &self,
        req: &Request,
        source: &Source,
        uploads: &mut Uploads,
        now: Instant,
    ) -> Action {
        match self
            .caller(req, source)
            .and_then(|who| self.route(req, &who, source, uploads, now))
        {
            Ok(action) => action,
            Err(reply) => Action::Reply(reply),
        }
    }

    /// The principal of a request (the one its transport authenticated, else `?auth=<token>`,
    /// else anonymous), within its request rate.
    fn caller(&self, req: &Request, source: &Source) -> Result<Principal, Reply> {
        let policy = self.bridge.policy();
        let who = match &source.principal {
            Some(who) => who.clone(),
            None => {
                let token = req.query.iter().find(|(n, _)| n == AUTH).map(|(_, v)| v);
                match token {
                    Some(token) => policy.token(token),
                    None => policy.anonymous(),
                }
                .map_err(|e| {
                    policy.count(Door::Coap, Refusal::Login);
                    let why = match e {
                        AuthError::Required => "credentials are required: add ?auth=<token>",
                        _ => "the token is not valid",
                    };
                    Reply::error(ResponseType::Unauthorized, why)
                })?
            }
        };
        if policy.limits_rate() {
            let addr = source.addr;
            let key = Policy::client_key(&who, || format!("addr:{}", addr.ip()));
            policy.admit(&key).map_err(|secs| {
                policy.count(Door::Coap, Refusal::Rate);
                // Max-Age tells the client when to try again (RFC 8516).
                Reply::error(ResponseType::TooManyRequests, "too many requests")
                    .with_uint(CoapOption::MaxAge, u32::try_from(secs).unwrap_or(u32::MAX))
            })?;
        }
        Ok(who)
    }

    fn route(
        &self,
        req: &Request,
        who: &Principal,
        source: &Source,
        uploads: &mut Uploads,
        now: Instant,
    ) -> Result<Action, Reply> {
        let segments: Vec<&str> = req.path.iter().map(String::as_str).collect();
        let rest = match segments.as_slice() {
            [".well-known", "core"] => return self.discover(req, who, true),
            ["topics" | "ps"] if req.method == RequestType::Get => {
                return self.discover(req, who, false);
            }
            ["topics" | "ps", rest @ ..] => rest.join("/"),
            ["rpc", rest @ ..] => return self.call(req, who, &rest.join("/")),
            _ => {
                return Err(Reply::error(
                    ResponseType::NotFound,
                    "no such resource; topics are under /topics/, calls under /rpc/",
                ));
            }
        };
        match req.method {
            RequestType::Get => self.read(req, who, &rest),
            RequestType::Put | RequestType::Post => {
                self.publish(req, who, &rest, source, uploads, now)
            }
            RequestType::Delete => {
                query(req, &[])?;
                let topic = topic(&rest)?;
                self.allowed(who, Access::Publish, &topic)?;
                Ok(Action::Work(Work::Clear(topic, who.clone())))
            }
            _ => Err(method_not_allowed()),
        }
    }

    /// Refuses what the policy refuses, in CoAP's terms.
    fn allowed(&self, who: &Principal, access: Access, topic: &Topic) -> Result<(), Reply> {
        self.bridge
            .policy()
            .authorize(who, access, topic.as_str())
            .map_err(|d| denied(self.bridge.policy(), d))
    }

    fn discover(&self, req: &Request, who: &Principal, collections: bool) -> Result<Action, Reply> {
        if req.method != RequestType::Get {
            return Err(method_not_allowed());
        }
        let params: Vec<&(String, String)> = req.query.iter().filter(|(n, _)| n != AUTH).collect();
        let filter = match params.as_slice() {
            [] => None,
            [(name, value)] => Some((name.as_str(), value.as_str())),
            _ => {
                return Err(Reply::error(
                    ResponseType::BadRequest,
                    "discovery takes at most one query filter",
                ));
            }
        };
        let body = Bytes::from(discovery::links(&self.bridge, who, collections, filter));
        let repr = Representation {
            etag: fnv1a(body.iter()),
            payload: body,
            format: Some(LINK_FORMAT),
            max_age: DEFAULT_MAX_AGE,
        };
        self.respond(req, &repr).map(Action::Reply)
    }

    fn read(&self, req: &Request, who: &Principal, path: &str) -> Result<Action, Reply> {
        if req.observe == Some(1) {
            // Deregistration ends the observation whatever the answer (RFC 7641 §3.6).
            let reply = match self.read_once(req, who, path) {
                Ok(Action::Reply(reply)) | Err(reply) => reply,
                Ok(other) => return Ok(other),
            };
            return Ok(Action::Deregister(reply));
        }
        self.read_once(req, who, path)
    }

    fn read_once(&self, req: &Request, who: &Principal, path: &str) -> Result<Action, Reply> {
        let filter = TopicFilter::parse(path)
            .map_err(|e| Reply::error(ResponseType::BadRequest, e.to_string()))?;
        // A Block2 follow-up of an observed resource is a plain GET (RFC 7959 §2.4).
        let first_block = req.block2.is_none_or(|b| b.num == 0);
        let registering = req.observe == Some(0) && first_block;
        let observing = registering || req.observe == Some(1);
        let policy = self.bridge.policy();
        let repr = if filter.is_wildcard() {
            let params = query(req, &["limit", "cursor"])?;
            let limit = match params.get("limit") {
                Some(v) => parse_limit(v, LIST_LIMIT).map_err(bad_param)?,
                None => LIST_LIMIT,
            };
            let page = self
                .bridge
                .list(
                    &filter,
                    who,
                    params.get("cursor").map(String::as_str),
                    limit,
                )
                .map_err(|d| denied(policy, d))?;
            Representation::of_listing(&page.messages, page.next)
        } else {
            query(req, &[])?;
            let topic = filter
                .as_topic()
                .ok_or_else(|| Reply::error(ResponseType::BadRequest, "not a topic"))?;
            let retained = self
                .bridge
                .retained(&topic, who)
                .map_err(|d| denied(policy, d))?;
            match retained {
                Some(m) => Representation::of_message(&m, SystemTime::now()),
                None if observing => Representation::empty(),
                None => {
                    return Err(Reply::error(
                        ResponseType::NotFound,
                        format!("nothing is retained on {topic}"),
                    ));
                }
            }
        };
        let reply = self.respond(req, &repr)?;
        let registered = matches!(reply.code, ResponseType::Content | ResponseType::Valid);
        Ok(if registering && registered {
            // Reading a topic above was its authorization; a filter's readable part is asked
            // for only here, so a plain GET is checked once.
            let scope = if filter.is_wildcard() {
                policy
                    .subscription(who, filter.as_str())
                    .map_err(|d| denied(policy, d))?
            } else {
                Readable::All
            };
            Action::Observe {
                filter,
                scope,
                szx: req.block2.map_or(self.max_szx, |b| b.szx.min(self.max_szx)),
                reply,
            }
        } else {
            Action::Reply(reply)
        })
    }

    /// Content negotiation and validation, then the block asked for.
    fn respond(&self, req: &Request, repr: &Representation) -> Result<Reply, Reply> {
        if let (Some(accept), Some(format)) = (req.accept, repr.format)
            && accept != format
        {
            return Err(Reply::error(
                ResponseType::NotAcceptable,
                format!("the representation is Content-Format {format}"),
            ));
        }
        let etag = repr.etag.to_be_bytes();
        if !repr.payload.is_empty() && req.etags.iter().any(|e| e[..] == etag[..]) {
            return Ok(Reply::new(ResponseType::Valid)
                .with(CoapOption::ETag, etag.to_vec())
                .with_uint(CoapOption::MaxAge, repr.max_age));
        }
        Ok(repr.content(req.block2, self.max_szx))
    }

    fn publish(
        &self,
        req: &Request,
        who: &Principal,
        path: &str,
        source: &Source,
        uploads: &mut Uploads,
        now: Instant,
    ) -> Result<Action, Reply> {
        let topic = topic(path)?;
        self.allowed(who, Access::Publish, &topic)?;
        let params = query(req, &["qos", "retain", "expiry"])?;
        let put = req.method == RequestType::Put;
        let retain = match params.get("retain") {
            Some(v) => parse_flag("retain", v).map_err(bad_param)?,
            None => put,
        };
        if put && !retain {
            return Err(Reply::error(
                ResponseType::BadRequest,
                "PUT always retains; use POST to publish without retaining",
            ));
        }
        let content_type = content_type(req)?;
        let max = self.bridge.max_payload();
        if req.size1.is_some_and(|s| s as usize > max) || req.payload.len() > max {
            return Err(too_large(max));
        }
        if put {
            self.check_preconditions(req, &topic)?;
        }
        let mut ok = Reply::new(ResponseType::Changed);
        let payload = match req.block1 {
            None => req.payload.clone(),
            Some(block) => {
                let key = (
                    source.peer,
                    format!("{:?} {path}?{:?}", req.method, req.query),
                );
                match uploads.receive(key, block, &req.payload, now) {
                    Ok(Progress::Continue) => {
                        return Ok(Action::Reply(
                            Reply::new(ResponseType::Continue)
                                .with(CoapOption::Block1, block.encode()),
                        ));
                    }
                    Ok(Progress::Done(body)) => {
                        ok = ok.with(CoapOption::Block1, block.encode());
                        body
                    }
                    Err(e) => return Err(upload_error(e, max)),
                }
            }
        };
        let mut message = Message::new(topic, payload, Origin::Coap);
        message.retain = retain;
        message.content_type = content_type.map(str::to_owned);
        message.qos = match params.get("qos") {
            Some(v) => parse_qos(v).map_err(bad_param)?,
            None => Qos::new(u8::from(req.confirmable)).unwrap_or_default(),
        };
        if let Some(v) = params.get("expiry") {
            apply_expiry(&mut message, v).map_err(bad_param)?;
        }
        Ok(Action::Work(Work::Publish(
            Box::new(message),
            ok,
            who.clone(),
        )))
    }

    /// A request/response call: POST or PUT `/rpc/{topic}`, `?timeout=`, `?qos=`, `?envelope=`,
    /// `?require_subscriber=`.
    fn call(&self, req: &Request, who: &Principal, path: &str) -> Result<Action, Reply> {
        if !matches!(req.method, RequestType::Post | RequestType::Put) {
            return Err(Reply::error(
                ResponseType::MethodNotAllowed,
                "calls take POST or PUT",
            ));
        }
        let topic = topic(path)?;
        self.allowed(who, Access::Publish, &topic)?;
        let params = query(req, &["timeout", "qos", "envelope", "require_subscriber"])?;
        let timeout = self
            .bridge
            .call_timeout(params.get("timeout").map(String::as_str))
            .map_err(bad_param)?;
        let envelope = match params.get("envelope") {
            Some(v) => parse_flag("envelope", v).map_err(bad_param)?,
            None => false,
        };
        if req.block1.is_some() {
            return Err(Reply::error(
                ResponseType::BadOption,
                "a call takes its request in one datagram",
            ));
        }
        let require = match params.get("require_subscriber") {
            Some(v) => parse_flag("require_subscriber", v).map_err(bad_param)?,
            None => false,
        };
        if require {
            match self.bridge.has_subscribers(&topic, who) {
                Ok(Some(true)) => {}
                Ok(Some(false)) => {
                    return Err(Reply::error(
                        ResponseType::NotFound,
                        format!("no MQTT subscriber matches {topic}"),
                    ));
                }
                Ok(None) => {
                    return Err(Reply::error(
                        ResponseType::ServiceUnavailable,
                        "the external broker cannot tell whether anyone subscribes",
                    ));
                }
                Err(_) => {
                    return Err(Reply::error(
                        ResponseType::Forbidden,
                        format!("not allowed to publish to {topic}"),
                    ));
                }
            }
        }
        let max = self.bridge.max_payload();
        if req.payload.len() > max {
            return Err(too_large(max));
        }
        let mut message = Message::new(topic, req.payload.clone(), Origin::Coap);
        message.content_type = content_type(req)?.map(str::to_owned);
        message.qos = match params.get("qos") {
            Some(v) => parse_qos(v).map_err(bad_param)?,
            None => Qos::default(),
        };
        Ok(Action::Work(Work::Call(
            Box::new(message),
            Call { timeout, envelope },
            who.clone(),
        )))
    }

    /// If-Match and If-None-Match on a PUT (RFC 7252 §5.10.8).
    fn check_preconditions(&self, req: &Request, topic: &Topic) -> Result<(), Reply> {
        let current = self.bridge.current(topic);
        let failed = if req.if_none_match {
            current.is_some()
        } else if req.if_match.is_empty() {
            false
        } else {
            current.as_ref().is_none_or(|m| {
                let etag = m.validator().to_be_bytes();
                !req.if_match
                    .iter()
                    .any(|e| e.is_empty() || e[..] == etag[..])
            })
        };
        if failed {
            return Err(Reply::error(
                ResponseType::PreconditionFailed,
                "the retained value does not match the precondition",
            ));
        }
        Ok(())
    }
}

/// Performs a publish, clear or call and maps the outcome to a response.
pub(crate) async fn perform(bridge: &Bridge, work: Work) -> Reply {
    let outcome = match work {
        Work::Call(message, call, who) => {
            return match bridge.call(*message, &who, call).await {
                Ok(reply) => reply_content(&reply),
                Err(CallError::NoReply(_)) => {
                    Reply::error(ResponseType::GatewayTimeout, "no reply within the timeout")
                }
                Err(CallError::Publish(e)) => failed(bridge, e),
                Err(CallError::Closed) => unavailable("the gateway is shutting down"),
            };
        }
        Work::Publish(message, ok, who) => bridge.publish(*message, &who).await.map(|()| ok),
        Work::Clear(topic, who) => match bridge.clear(&topic, Origin::Coap, &who).await {
            Ok(true) => Ok(Reply::new(ResponseType::Deleted)),
            Ok(false) => Ok(Reply::error(
                ResponseType::NotFound,
                format!("nothing is retained on {topic}"),
            )),
            Err(e) => Err(e),
        },
    };
    match outcome {
        Ok(reply) => reply,
        Err(e) => failed(bridge, e),
    }
}

/// A call's reply as a 2.05: its payload whole, and its Content-Format when the table has one.
fn reply_content(reply: &Message) -> Reply {
    if reply.payload.len() > MAX_REPLY {
        return Reply::error(
            ResponseType::BadGateway,
            format!("the reply is over {MAX_REPLY} bytes, more than one datagram carries"),
        );
    }
    let mut content = Reply::new(ResponseType::Content);
    if let Some(format) = reply.content_type.as_deref().and_then(content_format_for) {
        content = content.with_uint(CoapOption::ContentFormat, u32::from(format));
    }
    content.payload = reply.payload.clone();
    content
}

/// A refused or failed bridge call in CoAP's terms.
fn failed(bridge: &Bridge, e: BridgeError) -> Reply {
    match e {
        BridgeError::PayloadTooLarge { limit, .. } => too_large(limit),
        BridgeError::BrokerUnavailable => unavailable("the broker is not available"),
        BridgeError::Storage => Reply::error(
            ResponseType::InternalServerError,
            "the retained value could not be stored",
        ),
        BridgeError::Denied(d) => denied(bridge.policy(), d),
    }
}

/// 4.01 for anonymous clients and 4.03 for others the ACL refuses; 4.00 over a topic limit.
fn denied(policy: &Policy, d: Denial) -> Reply {
    let code = match d {
        Denial::Unauthenticated => ResponseType::Unauthorized,
        Denial::Forbidden(_) => ResponseType::Forbidden,
        Denial::TooLong(_) | Denial::TooDeep(_) => {
            return Reply::error(ResponseType::BadRequest, d.to_string());
        }
    };
    policy.count(Door::Coap, Refusal::Acl);
    let why = match d {
        Denial::Unauthenticated => "this topic needs credentials: add ?auth=<token>".to_owned(),
        other => other.to_string(),
    };
    Reply::error(code, why)
}

/// 5.03 with Max-Age 1: try again in a second (RFC 7252 §5.9.3.4).
pub(crate) fn unavailable(why: &str) -> Reply {
    Reply::error(ResponseType::ServiceUnavailable, why).with_uint(CoapOption::MaxAge, 1)
}

fn too_large(limit: usize) -> Reply {
    Reply::error(
        ResponseType::RequestEntityTooLarge,
        format!("the payload is over the limit of {limit} bytes"),
    )
    .with_uint(CoapOption::Size1, u32::try_from(limit).unwrap_or(u32::MAX))
}

fn upload_error(e: UploadError, limit: usize) -> Reply {
    match e {
        UploadError::Incomplete => Reply::error(
            ResponseType::RequestEntityIncomplete,
            "a block is missing; start again from block 0",
        ),
        UploadError::TooLarge => too_large(limit),
        UploadError::ShortBlock => Reply::error(
            ResponseType::BadRequest,
            "a block other than the last must be full",
        ),
        UploadError::Busy => unavailable("too many block-wise uploads at once"),
    }
}

fn method_not_allowed() -> Reply {
    Reply::error(
        ResponseType::MethodNotAllowed,
        "allowed: GET, PUT, POST, DELETE on topics; GET on discovery",
    )
}

fn bad_param(e: ParamError) -> Reply {
    Reply::error(ResponseType::BadRequest, e.0)
}

/// The content type of the request's Content-Format; 4.15 for one outside the table.
fn content_type(req: &Request) -> Result<Option<&'static str>, Reply> {
    req.content_format
        .map(|n| {
            content_type_for(n).ok_or_else(|| {
                Reply::error(
                    ResponseType::UnsupportedContentFormat,
                    format!("Content-Format {n} is not supported"),
                )
            })
        })
        .transpose()
}

fn topic(path: &str) -> Result<Topic, Reply> {
    Topic::parse(path).map_err(|e| Reply::error(ResponseType::BadRequest, e.to_string()))
}

/// The Uri-Query parameters, refusing names not in `allowed` and repeated names.
fn query(
    req: &Request,
    allowed: &[&str],
) -> Result<std::collections::HashMap<String, String>, Reply> {
    let mut params = std::collections::HashMap::new();
    for (name, value) in req.query.iter().filter(|(n, _)| n != AUTH) {
        if !allowed.contains(&name.as_str()) {
            return Err(Reply::error(
                ResponseType::BadRequest,
                format!("unknown query parameter {name:?}"),
            ));
        }
        if params.insert(name.clone(), value.clone()).is_some() {
            return Err(Reply::error(
                ResponseType::BadRequest,
                format!("query parameter {name:?} is repeated"),
            ));
        }
    }
    Ok(params)
}
