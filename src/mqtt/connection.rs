//! One client connection, whatever it came in by (TCP, TLS, WebSocket): reads its CONNECT,
//! authenticates, joins the router through a local link, then carries packets between the
//! socket, the [`Session`] and the router until one side ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol as r;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::flow::{Blocked, Flow};
use super::message::{Inbound, MqttPublish};
use super::session::{End, Out, Session, code};
use super::sessions::{PendingWill, Sessions, Start};
use super::settings::Settings;
use super::wire::{
    Answer, ConnAck, Connect, Decoder, Disconnect, Packet, Version, encode, encoded_len,
};
use crate::deadline::Deadline;
use crate::policy::{AuthError, Door, LoginError, Principal, Refusal};

/// Builds a router link for a client id: `(tx, rx)`, or why the router refused.
pub(super) type LinkFactory =
    Arc<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx), String> + Send + Sync>;

/// What every connection of one gateway shares.
pub(crate) struct Front {
    pub(super) settings: Arc<Settings>,
    pub(super) sessions: Arc<Sessions>,
    pub(super) links: LinkFactory,
    /// Where client publishes go besides the router: the gateway's store, streams and outbox.
    pub(super) bridge: Arc<dyn Inbound>,
    pub(super) connect_timeout: Duration,
    pub(super) max_clients: usize,
    pub(super) clients: AtomicUsize,
    pub(super) origins: AtomicU64,
}

/// A connection that flow control counts behind, with everything written and nothing from the
/// router for this long, twice over with no new publish to its filters, has had all the
/// router holds for it (see [`Session::idle`]). Long enough that a router thread kept off the
/// CPU by a busy machine is not taken for one with nothing more to send: the counts err toward
/// waiting only in rare cases (expired messages, a subscription made while its filter was
/// busy), and then a publisher waits this long twice.
const IDLE: Duration = Duration::from_millis(250);
/// Decoded packets handled before the socket's writes are flushed.
const BATCH: usize = 256;

/// Why a connection ended, for the log line.
#[derive(Debug)]
enum Closed {
    Io(std::io::Error),
    Refused(&'static str),
    Violation(u8, &'static str),
    /// Closed without a word: what MQTT 3.1.1, or Mosquitto, does for this violation.
    Dropped(&'static str),
    Client,
    TakenOver,
    Shutdown,
    KeepAlive,
    RouterGone,
}

/// Serves one client connection until it ends.
pub(crate) async fn serve<S>(
    front: Arc<Front>,
    door: &'static str,
    stream: S,
    peer: SocketAddr,
    certified: Option<String>,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn {
        stream,
        read: BytesMut::with_capacity(4096),
        write: BytesMut::with_capacity(4096),
        decoder: Decoder::new(front.settings.max_packet),
        version: Version::V311,
    };
    let connect = tokio::select! {
        c = tokio::time::timeout(front.connect_timeout, conn.first()) => c,
        () = cancel.cancelled() => return,
    };
    let connect = match connect {
        Ok(Ok(connect)) => connect,
        Ok(Err(closed)) => {
            log_close(door, peer, None, &closed);
            return;
        }
        Err(_) => {
            crate::refused::log(door, peer, &"no CONNECT in time");
            return;
        }
    };
    conn.version = connect.version;
    let client_id = connect.client_id.clone();
    let closed = run(&front, &mut conn, *connect, certified, cancel).await;
    log_close(door, peer, Some(&client_id), &closed);
    // An orderly end: FIN on TCP, TLS close_notify, a WebSocket Close frame; then what the
    // client still sends (its own Close frame) is read until it closes too, so that its last
    // writes do not meet a reset.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        conn.stream.shutdown().await?;
        let mut rest = [0u8; 512];
        while conn.stream.read(&mut rest).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// One line per ended connection: at info level (rate-limited, see `crate::refused`) when the
/// gateway refused or cut off the client, at debug level otherwise.
fn log_close(door: &'static str, peer: SocketAddr, client_id: Option<&str>, closed: &Closed) {
    let client = client_id.unwrap_or("");
    let refused = |why: &dyn std::fmt::Display| {
        crate::refused::log(door, peer, &format_args!("client id {client:?}: {why}"));
    };
    match closed {
        Closed::Client | Closed::Shutdown => {
            tracing::debug!(%peer, client, "MQTT client disconnected");
        }
        Closed::Io(e) => tracing::debug!(%peer, client, error = %e, "MQTT connection lost"),
        Closed::TakenOver => tracing::info!(%peer, client, "MQTT session taken over"),
        Closed::KeepAlive => refused(&"missed its keep-alive"),
        Closed::Refused(why) => refused(&format_args!("refused: {why}")),
        Closed::Dropped(why) => refused(&format_args!("closed for a protocol violation: {why}")),
        Closed::Violation(code, why) => refused(&format_args!(
            "disconnected with reason 0x{code:02x}: {why}"
        )),
        Closed::RouterGone => tracing::warn!(%peer, client, "MQTT session ended by the router"),
    }
}

struct Conn<S> {
    stream: S,
    read: BytesMut,
    write: BytesMut,
    decoder: Decoder,
    version: Version,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Reads until the first packet, which must be a CONNECT.
    async fn first(&mut self) -> Result<Box<Connect>, Closed> {
        loop {
            match self.decoder.decode(&mut self.read) {
                Ok(Some(Packet::Connect(connect))) => return Ok(connect),
                Ok(Some(_)) => return Err(Closed::Refused("the first packet is not CONNECT")),
                Ok(None) => {}
                Err(e) => {
                    self.answer(&e.answer).await;
                    return Err(Closed::Refused(e.detail));
                }
            }
            let n = self
                .stream
                .read_buf(&mut self.read)
                .await
                .map_err(Closed::Io)?;
            if n == 0 {
                return Err(Closed::Refused("closed before its CONNECT"));
            }
        }
    }

    async fn answer(&mut self, answer: &Answer) {
        answer.encode(&mut self.write);
        let _ = self.flush().await;
    }

    fn push(&mut self, packet: &Packet) {
        encode(packet, self.version, &mut self.write);
    }

    /// Writes what is buffered.
    async fn flush(&mut self) -> std::io::Result<()> {
        while !self.write.is_empty() {
            if self.stream.write_buf(&mut self.write).await? == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
        }
        self.stream.flush().await
    }
}

/// Refuses a CONNECT with `v5` as its MQTT 5 reason code (and its 3.1.1 return code).
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    v5: u8,
    why: &'static str,
) -> Closed {
    let code = if conn.version == Version::V5 {
        v5
    } else {
        match v5 {
            0x85 => 2,
            0x86 => 4,
            0x87 | 0x8C => 5,
            // Server unavailable: busy, over quota, or the router refused.
            _ => 3,
        }
    };
    conn.push(&Packet::ConnAck(Box::new(ConnAck {
        code,
        ..ConnAck::default()
    })));
    let _ = conn.flush().await;
    Closed::Refused(why)
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    front: &Arc<Front>,
    conn: &mut Conn<S>,
    mut connect: Connect,
    certified: Option<String>,
    cancel: CancellationToken,
) -> Closed {
    let settings = &front.settings;
    let v5 = connect.version == Version::V5;
    if connect.authentication_method.is_some() {
        return refuse(conn, 0x8C, "unsupported authentication method").await;
    }
    let mut assigned = None;
    if connect.client_id.is_empty() {
        if !connect.clean_start && !v5 || connect.version == Version::V31 {
            return refuse(conn, 0x85, "empty client id with a persistent session").await;
        }
        let id = format!("auto-{:016x}", rand::random::<u64>());
        connect.client_id = id.clone();
        assigned = Some(id);
    }
    let principal = match login(settings, &connect, certified).await {
        Ok(p) => p,
        Err(e) => {
            settings.policy.count(Door::Mqtt, Refusal::Login);
            let (code, why) = match e {
                LoginError::Refused(AuthError::Required) => (0x87, "credentials required"),
                LoginError::Refused(_) => (0x86, "bad user name or password"),
                LoginError::Busy => (0x89, "too many logins being checked"),
            };
            return refuse(conn, code, why).await;
        }
    };
    if let Some(will) = &connect.will {
        let denied = will.topic.starts_with("$SYS")
            || settings
                .policy
                .authorize(&principal, crate::policy::Action::Publish, &will.topic)
                .is_err();
        if denied {
            settings.policy.count(Door::Mqtt, Refusal::Acl);
            return refuse(conn, 0x87, "the will's topic is not writable").await;
        }
    }
    if front.clients.fetch_add(1, Ordering::AcqRel) >= front.max_clients {
        front.clients.fetch_sub(1, Ordering::AcqRel);
        return refuse(conn, 0x97, "too many clients").await;
    }
    let _slot = Slot(&front.clients);

    // As Mosquitto's max_keepalive: at the largest value every keep-alive is granted, none
    // included; below it, a client asking for more or for none is given the maximum.
    let keep_alive = match (connect.keep_alive, settings.max_keep_alive) {
        (_, u16::MAX) => connect.keep_alive,
        (0, max) => max,
        (asked, max) => asked.min(max),
    };
    let mut ack = ConnAck::default();
    if v5 {
        ack.assigned_client_identifier = assigned;
        ack.topic_alias_maximum = Some(settings.topic_alias_max);
        ack.receive_maximum = Some(settings.receive_maximum);
        ack.maximum_packet_size = u32::try_from(settings.max_packet).ok();
        // Retained messages, wildcards, subscription identifiers and shared subscriptions are
        // all available: the properties' defaults, so they are not sent.
        if keep_alive != connect.keep_alive {
            ack.server_keep_alive = Some(keep_alive);
        }
    }
    // MQTT 5 §3.1.2.24: a CONNACK larger than the client takes cannot be sent at all.
    let fits = connect.maximum_packet_size.is_none_or(|max| {
        encoded_len(&Packet::ConnAck(Box::new(ack.clone())), connect.version) <= max as usize
    });
    if !fits {
        return Closed::Refused("its Maximum Packet Size is smaller than the CONNACK");
    }
    // MQTT 3.1.1 sessions are kept for ever unless clean; MQTT 5 ones for their expiry.
    let mut session_expiry: Option<u32> = if v5 {
        Some(connect.session_expiry.unwrap_or(0))
    } else if connect.clean_start {
        Some(0)
    } else {
        None
    };
    // rumqttd's one clean flag means both "start afresh" and "forget at the end". A client
    // resuming a session it will not keep gets the session (clean off), and the router's part
    // is ended when the connection is.
    let router_clean = connect.clean_start && session_expiry == Some(0);
    let start = front
        .sessions
        .begin(&connect.client_id, connect.clean_start)
        .await;
    let Start {
        generation,
        kick,
        gone,
        kept,
        reap_first,
    } = start;
    if reap_first {
        front
            .sessions
            .reap(&router_client_id(&connect.client_id))
            .await;
    }
    let session_present = kept.is_some();
    let router_id = router_client_id(&connect.client_id);
    let links = front.links.clone();
    let link = tokio::task::spawn_blocking(move || links(&router_id, router_clean)).await;
    let (mut tx, mut rx) = match link {
        Ok(Ok(link)) => link,
        _ => {
            let _ = gone.send(true);
            front
                .sessions
                .end(&connect.client_id, generation, None, None);
            return refuse(conn, 0x88, "the router refused the session").await;
        }
    };
    // MQTT 3.1 has no Session Present flag: the byte is reserved.
    ack.session_present = session_present && connect.version != Version::V31;
    conn.push(&Packet::ConnAck(Box::new(ack)));
    settings.stats.connected();
    let origin = front.origins.fetch_add(1, Ordering::Relaxed) + 1;
    let mut session = Session::new(
        settings.clone(),
        connect.version,
        principal,
        &connect.client_id,
        origin,
        connect.receive_maximum,
        connect.maximum_packet_size,
        connect.topic_alias_maximum,
        kept.unwrap_or_default(),
    );
    if session_expiry == Some(0) {
        session.ends_with_connection();
    }
    let mut resumed = Out::default();
    session.resume(&mut resumed);
    for packet in resumed.client.drain(..) {
        conn.push(&packet);
    }
    let mut will = connect.will.take().map(|w| PendingWill {
        delay: w.delay_interval.unwrap_or(0),
        publish: MqttPublish {
            topic: w.topic.into(),
            payload: w.payload,
            qos: w.qos as u8,
            retain: w.retain,
            content_type: w.properties.content_type,
            user_properties: w.properties.user_properties,
            response_topic: w.properties.response_topic,
            correlation_data: w.properties.correlation_data,
            expiry_secs: w.properties.message_expiry_interval,
        },
    });

    let mut joined = Joined {
        front,
        conn: &mut *conn,
        session: &mut session,
        tx: &mut tx,
        rx: &mut rx,
    };
    let closed = joined.pump(keep_alive, &kick, &cancel).await;
    // What the router forwarded that was not written yet stays with a kept session (the
    // router counts it delivered): its QoS 1/2 messages go out on resumption.
    let mut leftover = Out::default();
    while let Some(Ok(Some(notification))) = rx.next().now_or_never() {
        session.router(notification, &mut leftover);
    }
    let (publish_will, reason) = match &closed {
        Closed::Client => (false, None),
        Closed::Violation(code, _) => (true, Some(*code)),
        Closed::TakenOver => (true, Some(0x8E)),
        Closed::Shutdown => (false, Some(0x8B)),
        Closed::KeepAlive => (true, Some(0x8D)),
        Closed::RouterGone => (true, Some(code::UNSPECIFIED)),
        Closed::Io(_) | Closed::Refused(_) | Closed::Dropped(_) => (true, None),
    };
    if let Some(End::Client {
        with_will,
        session_expiry: new_expiry,
    }) = &session.ended
    {
        // A DISCONNECT drops the will, unless it is 0x04 (disconnect with will message).
        if !*with_will {
            will = None;
        }
        if let (Some(e), true) = (new_expiry, v5) {
            session_expiry = Some(*e);
        }
    }
    if let (Some(reason), true) = (reason, v5) {
        conn.push(&Packet::Disconnect(Disconnect {
            reason,
            ..Disconnect::default()
        }));
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.flush()).await;
    // The router's side ends with a DISCONNECT: it keeps its session state when not clean.
    let bye = r::Packet::Disconnect(
        r::Disconnect {
            reason_code: r::DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    let _ = tx.send(bye).now_or_never();
    let shutting_down = matches!(closed, Closed::Shutdown);
    let will = if publish_will
        || matches!(
            session.ended,
            Some(End::Client {
                with_will: true,
                ..
            })
        ) {
        will
    } else {
        None
    };
    let kept = match session_expiry {
        Some(0) => None,
        other => Some((session.keep(), other)),
    };
    if kept.is_none() && !router_clean {
        front
            .sessions
            .reap(&router_client_id(&connect.client_id))
            .await;
    }
    settings.stats.disconnected(kept.is_some());
    front.sessions.end(
        &connect.client_id,
        generation,
        kept,
        will.filter(|_| !shutting_down),
    );
    let _ = gone.send(true);
    closed
}

/// Gives the client slot back when the connection ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn login(
    settings: &Settings,
    connect: &Connect,
    certified: Option<String>,
) -> Result<Principal, LoginError> {
    let policy = &settings.policy;
    if let Some(name) = certified {
        return Ok(policy.certificate(&name));
    }
    let Some(user) = connect.username.clone() else {
        return Ok(policy.anonymous()?);
    };
    let password = connect.password.clone().unwrap_or_default();
    if let Some(verdict) = policy.login_cached(&user, &password) {
        return verdict;
    }
    // argon2 runs on a blocking thread, within the policy's one bound for every door.
    let policy = policy.clone();
    tokio::task::spawn_blocking(move || policy.login(&user, &password))
        .await
        .unwrap_or(Err(LoginError::Busy))
}

/// The router's name for a client id: rumqttd drops, without a word, clients whose id holds
/// one of `/ + # $`; they are escaped one-to-one.
fn router_client_id(id: &str) -> String {
    if !id.contains(['+', '$', '#', '/', '%']) {
        return id.to_owned();
    }
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        match c {
            '+' | '$' | '#' | '/' | '%' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// A connection whose session has joined the router: what its loop works with.
struct Joined<'a, S> {
    front: &'a Arc<Front>,
    conn: &'a mut Conn<S>,
    session: &'a mut Session,
    tx: &'a mut LinkTx,
    rx: &'a mut LinkRx,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Joined<'_, S> {
    async fn pump(
        &mut self,
        keep_alive: u16,
        kick: &CancellationToken,
        cancel: &CancellationToken,
    ) -> Closed {
        let settings = self.front.settings.clone();
        // MQTT §3.1.2.10: one and a half keep-alive periods without a packet end the connection.
        let grace = Duration::from_millis(u64::from(keep_alive) * 1500);
        let mut deadline = Deadline::default();
        if keep_alive > 0 {
            deadline.set(Some(Instant::now() + grace));
        }
        let mut paused_until: Option<Instant> = None;
        let mut blocked: Option<Blocked> = None;
        let mut out = Out::default();
        let mut idle_at = Deadline::default();
        // Bytes that came with the CONNECT may hold whole packets already.
        let mut buffered = !self.conn.read.is_empty();
        loop {
            if let Some(reader) = out.blocked.take() {
                blocked = Some(Blocked::new(reader));
            }
            if buffered && paused_until.is_none() && blocked.is_none() {
                match self.handle_input(&mut out).await {
                    Ok(Input::Drained) => buffered = false,
                    Ok(Input::More) => {}
                    Ok(Input::Pause(secs)) => {
                        paused_until = Some(Instant::now() + Duration::from_secs(secs));
                    }
                    Err(closed) => return closed,
                }
            }
            if let Some(reader) = out.blocked.take() {
                blocked = Some(Blocked::new(reader));
            }
            if let Err(e) = self.conn.flush().await {
                return Closed::Io(e);
            }
            let may_read = paused_until.is_none() && blocked.is_none();
            let reading = !buffered && may_read;
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Closed::Shutdown,
                () = kick.cancelled() => return Closed::TakenOver,
                next = self.rx.next() => {
                    match next {
                        Ok(Some(notification)) => {
                            self.session.router(notification, &mut out);
                            // Take what else the router has ready without waiting.
                            for _ in 0..BATCH {
                                match self.rx.next().now_or_never() {
                                    Some(Ok(Some(n))) => self.session.router(n, &mut out),
                                    _ => break,
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(_) => return Closed::RouterGone,
                    }
                    if let Some(closed) = self.apply(&mut out).await {
                        return closed;
                    }
                    idle_at.set(self.session.behind().then(|| Instant::now() + IDLE));
                }
                read = self.conn.stream.read_buf(&mut self.conn.read), if reading => {
                    match read {
                        Ok(0) => return Closed::Io(std::io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => out.tally.bytes_in += n as u64,
                        Err(e) => return Closed::Io(e),
                    }
                    if keep_alive > 0 {
                        deadline.set(Some(Instant::now() + grace));
                    }
                    buffered = true;
                }
                _ = deadline.passed() => return Closed::KeepAlive,
                () = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {
                    paused_until = None;
                }
                () = wait_for(&mut blocked, &settings.flow), if blocked.is_some() => blocked = None,
                // More whole packets may be buffered: handled once the router had its turn.
                () = std::future::ready(()), if buffered && may_read => {}
                _ = idle_at.passed() => {
                    idle_at.set(self.session.idle().then(|| Instant::now() + IDLE));
                }
            }
        }
    }
}

/// Waits until the subscriber a publisher waits for lets it go on.
async fn wait_for(blocked: &mut Option<Blocked>, flow: &Flow) {
    if let Some(blocked) = blocked {
        blocked.settle(flow).await;
    }
}

/// What reading the buffered bytes came to.
enum Input {
    /// Every whole packet was handled.
    Drained,
    /// A batch was handled and more may be buffered.
    More,
    /// The client is over its publish rate: read nothing more for this many seconds.
    Pause(u64),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Joined<'_, S> {
    /// Decodes and handles up to a batch of buffered packets, then carries out what they asked.
    async fn handle_input(&mut self, out: &mut Out) -> Result<Input, Closed> {
        let mut handled = 0;
        let mut input = Input::More;
        while handled < BATCH {
            match self.conn.decoder.decode(&mut self.conn.read) {
                Ok(Some(packet)) => {
                    handled += 1;
                    self.session.client(packet, out);
                }
                Ok(None) => {
                    input = Input::Drained;
                    break;
                }
                Err(e) => {
                    out.end = Some(match e.answer {
                        Answer::Disconnect(reason) => End::Violation(reason, e.detail),
                        _ => End::Close(e.detail),
                    });
                }
            }
            if out.end.is_some() {
                break;
            }
            if let Some(secs) = out.pause.take() {
                input = Input::Pause(secs);
                break;
            }
            if out.blocked.is_some() {
                break;
            }
        }
        out.tally.packets_in += handled as u64;
        match self.apply(out).await {
            Some(closed) => Err(closed),
            None => Ok(input),
        }
    }

    /// Carries out what the session asked for; `Some` when the connection must end.
    async fn apply(&mut self, out: &mut Out) -> Option<Closed> {
        out.tally.packets_out += out.client.len() as u64;
        let before = self.conn.write.len();
        out.copies.clear();
        for packet in out.client.drain(..) {
            encode(&packet, self.conn.version, &mut self.conn.write);
        }
        out.tally.bytes_out += (self.conn.write.len() - before) as u64;
        self.front.settings.add(&mut out.tally);
        // `out`'s vectors are drained, never taken: a batch of router packets is some 100 KB
        // that would otherwise be grown from nothing and freed again for every batch.
        if let Some(last) = out.router.pop() {
            let mut buffer = self.tx.buffer();
            // While the buffer holds packets, the event that announced the first is still
            // queued and the router takes these with it: no event per packet.
            let announced = !buffer.is_empty();
            buffer.extend(out.router.drain(..));
            if announced {
                buffer.push_back(last);
            } else {
                drop(buffer);
                // `send` queues the packet and signals the router on its bounded queue, which
                // the router drains without ever waiting on a connection.
                if !matches!(self.tx.send(last).now_or_never(), Some(Ok(_))) {
                    return Some(Closed::RouterGone);
                }
            }
        }
        if !out.bridge.is_empty() {
            // Taken here, in this task: the socket is not read meanwhile, so a publisher
            // faster than the gateway's store and outbox is slowed down by them.
            self.front.bridge.take(&mut out.bridge);
        }
        if std::mem::take(&mut out.wake_router) && self.rx.wake().await.is_err() {
            return Some(Closed::RouterGone);
        }
        match out.end.take() {
            None => None,
            Some(end) => {
                let closed = match &end {
                    End::Client { .. } => Closed::Client,
                    End::Violation(code, why) => Closed::Violation(*code, why),
                    End::Close(why) => Closed::Dropped(why),
                };
                self.session.ended = Some(end);
                Some(closed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_the_router_refuses_are_escaped_one_to_one() {
        assert_eq!(router_client_id("plain-id"), "plain-id");
        assert_eq!(router_client_id("a/b+c#$%"), "a%2Fb%2Bc%23%24%25");
        assert_ne!(router_client_id("a/b"), router_client_id("a%2Fb"));
    }
}
