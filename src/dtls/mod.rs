//! DTLS 1.2 server transport over Mbed TLS, sans I/O: datagrams and ticks in, datagrams and
//! plaintext out. It answers ClientHellos statelessly with cookies, bounds handshakes and
//! sessions, expires idle ones, names each session's principal and follows a session to a new
//! address by its Connection ID. It knows nothing of what the plaintext says.

mod client;
mod context;
mod cookie;
pub mod hello;
mod mbed;
mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

pub use client::Client;
pub use context::{Certificate, Psk};
pub use mbed::LibraryError;

use crate::metrics::DtlsMeters;
use crate::policy::Principal;
use context::{CID_LEN, Context};
use cookie::Cookies;
use session::{Session, Step};

/// Why the transport cannot start, or a record cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum DtlsError {
    /// A certificate or key file is unusable.
    #[error("{key}: {path}: {reason}")]
    File {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// What the library said.
        reason: String,
    },
    /// The library refused a setting.
    #[error("dtls: {0}")]
    Library(#[from] LibraryError),
    /// The session's handshake has not completed.
    #[error("the session is not open")]
    NotOpen,
    /// The library could not seal a record.
    #[error("cannot write a record: {0}")]
    Write(String),
}

/// RFC 9146's record content type `tls12_cid`: a record that names its session by Connection ID.
const CONTENT_CID: u8 = 25;
/// Where the Connection ID starts in such a record: after type, version, epoch and sequence.
const CID_AT: usize = 11;

/// A session's number, never reused while the transport runs.
pub type SessionId = u64;

/// What the transport is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PSK identities.
    pub psks: Vec<Psk>,
    /// The certificate, for certificate handshakes.
    pub certificate: Option<Certificate>,
    /// Most sessions at once, handshakes included.
    pub max_sessions: usize,
    /// Most handshakes in progress at once.
    pub max_handshakes: usize,
    /// Most handshakes in progress at once from one IP address, so that one host cannot take
    /// every handshake slot.
    pub max_handshakes_per_address: usize,
    /// A handshake not done within this is dropped.
    pub handshake_timeout: Duration,
    /// A session that received nothing for this long is dropped.
    pub idle_timeout: Duration,
}

/// What the transport asks its shell to do, or tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `bytes` to `to`.
    Transmit {
        /// The client's address.
        to: SocketAddr,
        /// One datagram.
        bytes: Vec<u8>,
    },
    /// A record's plaintext from an open session.
    Received {
        /// The session.
        session: SessionId,
        /// The client's current address.
        from: SocketAddr,
        /// Who the handshake authenticated; `None` for a certificate handshake without a
        /// client certificate.
        principal: Option<Principal>,
        /// The plaintext.
        bytes: Vec<u8>,
    },
    /// A session ended (closed, failed, idle, replaced); nothing more comes from it.
    Closed {
        /// The session.
        session: SessionId,
    },
}

/// The DTLS server side of one UDP socket.
pub struct Transport {
    settings: Settings,
    context: Context,
    cookies: Cookies,
    sessions: HashMap<SessionId, Session>,
    by_addr: HashMap<SocketAddr, SessionId>,
    /// Sessions by the Connection ID their client sends, so a record finds its session from
    /// any address.
    by_cid: HashMap<[u8; CID_LEN], SessionId>,
    handshakes: usize,
    /// Handshakes in progress by the client's IP address; an address with none has no entry.
    handshaking: HashMap<IpAddr, usize>,
    next_id: SessionId,
    meters: DtlsMeters,
    /// The read buffer every session's records are opened into.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("sessions", &self.sessions.len())
            .field("handshakes", &self.handshakes)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A transport with no session yet.
    pub fn new(settings: Settings, meters: DtlsMeters, now: Instant) -> Result<Self, DtlsError> {
        let context = Context::new(&settings.psks, settings.certificate.as_ref())?;
        Ok(Self {
            settings,
            context,
            cookies: Cookies::new(now),
            sessions: HashMap::new(),
            by_addr: HashMap::new(),
            by_cid: HashMap::new(),
            handshakes: 0,
            handshaking: HashMap::new(),
            next_id: 1,
            meters,
            scratch: Vec::new(),
        })
    }

    /// Sessions held, handshakes included.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Handshakes in progress.
    pub fn handshakes(&self) -> usize {
        self.handshakes
    }

    /// Takes one datagram from `from`.
    pub fn receive(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Vec<Output>,
    ) {
        if let Some(id) = self.by_connection_id(datagram) {
            self.drive(id, now, from, Some(datagram), out);
            return;
        }
        let known = self.by_addr.get(&from).copied();
        if let Some(id) = known {
            // A ClientHello on an open session's address is a client that starts again
            // (RFC 6347 4.2.8): it gets a cookie exchange, and replaces the session once done.
            let restart = self.sessions.get(&id).is_some_and(Session::is_open)
                && hello::is_epoch0_handshake(datagram);
            if !restart {
                self.drive(id, now, from, Some(datagram), out);
                return;
            }
        }
        let Some(ch) = hello::parse(datagram) else {
            return;
        };
        if !self.cookies.check(now, from, ch.random, ch.cookie) {
            let cookie = self.cookies.make(now, from, ch.random);
            self.meters.hello_verify.inc();
            out.push(Output::Transmit {
                to: from,
                bytes: hello::verify_request(&ch, &cookie),
            });
            return;
        }
        let from_here = self.handshaking.get(&from.ip()).copied().unwrap_or(0);
        if self.handshakes >= self.settings.max_handshakes
            || from_here >= self.settings.max_handshakes_per_address
            || self.sessions.len() >= self.settings.max_sessions
        {
            self.meters.handshake("refused");
            return;
        }
        let cid = self.new_connection_id();
        let Ok(session) = Session::accept(&self.context, from, cid, now) else {
            self.meters.handshake("failed");
            return;
        };
        if let Some(old) = known {
            self.meters.ended("replaced");
            self.remove(old, out);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.sessions.insert(id, session);
        self.by_addr.insert(from, id);
        self.by_cid.insert(cid, id);
        self.handshakes += 1;
        *self.handshaking.entry(from.ip()).or_default() += 1;
        self.meters.handshakes.set(self.handshakes as i64);
        self.meters.sessions.set(self.sessions.len() as i64);
        self.drive(id, now, from, Some(datagram), out);
    }

    /// Seals `plaintext` for `session` and queues it for its current address; false when the
    /// session is gone or not open.
    pub fn send(&mut self, session: SessionId, plaintext: &[u8], out: &mut Vec<Output>) -> bool {
        let Some(s) = self.sessions.get_mut(&session) else {
            return false;
        };
        let ok = s.write(plaintext).is_ok();
        let to = s.addr;
        out.extend(
            s.take_outgoing()
                .into_iter()
                .map(|bytes| Output::Transmit { to, bytes }),
        );
        ok
    }

    /// Drops handshakes past their deadline and idle sessions, and lets handshakes resend
    /// their last flight. Returns when to call it next.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Output>) -> Option<Instant> {
        let (hs, idle) = (self.settings.handshake_timeout, self.settings.idle_timeout);
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        let mut pending = Vec::new();
        for (&id, s) in &self.sessions {
            let deadline = if s.is_open() {
                s.last_seen + idle
            } else {
                s.started + hs
            };
            if deadline <= now {
                expired.push((id, s.is_open()));
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
                if !s.is_open() {
                    pending.push(id);
                }
            }
        }
        for (id, open) in expired {
            if open {
                self.meters.ended("idle");
            } else {
                self.meters.handshake("timeout");
                if let Some(s) = self.sessions.get(&id) {
                    crate::refused::log("coaps", s.addr, &"DTLS handshake not finished in time");
                }
            }
            self.remove(id, out);
        }
        for id in pending {
            if let Some(addr) = self.sessions.get(&id).map(|s| s.addr) {
                self.drive(id, now, addr, None, out);
            }
        }
        if !self.sessions.is_empty() {
            // Handshake flights are resent on the library's own timer, about a second.
            next = Some(next.map_or(now + Duration::from_secs(1), |n| {
                n.min(now + Duration::from_secs(1))
            }));
        }
        next
    }

    /// Ends every session with close_notify.
    pub fn close_all(&mut self, out: &mut Vec<Output>) {
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.close();
            }
            self.remove(id, out);
        }
    }

    /// Feeds `datagram` (from `from`) to session `id`, or lets it resend a flight.
    fn drive(
        &mut self,
        id: SessionId,
        now: Instant,
        from: SocketAddr,
        datagram: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let mut plaintext = Vec::new();
        let was_open = s.is_open();
        let newest = s.newest_record();
        let step = match datagram {
            Some(d) => s.input(&self.context, d, &mut self.scratch, &mut plaintext),
            None => s.drive_and_read(&self.context, &mut self.scratch, &mut plaintext),
        };
        // Only what authenticates keeps a session: a forged datagram from its address does not.
        if !plaintext.is_empty() || step == Step::Opened {
            s.last_seen = now;
        }
        // The client moved (RFC 9146 6): the session follows only a record that opened, was
        // no replay and is the newest yet, so a forged or replayed one cannot take it away.
        if from != s.addr && !plaintext.is_empty() && s.newest_record() > newest {
            let old = std::mem::replace(&mut s.addr, from);
            if self.by_addr.get(&old) == Some(&id) {
                self.by_addr.remove(&old);
            }
            self.by_addr.insert(from, id);
            self.meters.address_changes.inc();
        }
        let (to, principal) = (s.addr, s.principal.clone());
        out.extend(
            s.take_outgoing()
                .into_iter()
                .map(|bytes| Output::Transmit { to, bytes }),
        );
        for bytes in plaintext {
            out.push(Output::Received {
                session: id,
                from: to,
                principal: principal.clone(),
                bytes,
            });
        }
        match step {
            Step::Opened => {
                self.handshake_over(to.ip());
                self.meters.handshakes.set(self.handshakes as i64);
                self.meters.handshake("ok");
            }
            Step::Closed => {
                if was_open {
                    self.meters.ended("closed");
                } else {
                    self.meters.handshake("failed");
                    crate::refused::log("coaps", to, &"DTLS handshake failed");
                }
                self.remove(id, out);
            }
            Step::Handshaking | Step::Open => {}
        }
    }

    fn remove(&mut self, id: SessionId, out: &mut Vec<Output>) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        if self.by_addr.get(&s.addr) == Some(&id) {
            self.by_addr.remove(&s.addr);
        }
        self.by_cid.remove(&s.cid);
        if s.is_open() {
            out.push(Output::Closed { session: id });
        } else {
            self.handshake_over(s.addr.ip());
        }
        self.meters.handshakes.set(self.handshakes as i64);
        self.meters.sessions.set(self.sessions.len() as i64);
    }
}

impl Transport {
    /// The session a record with a Connection ID names, if it is one of ours.
    fn by_connection_id(&self, datagram: &[u8]) -> Option<SessionId> {
        if datagram.first() != Some(&CONTENT_CID) {
            return None;
        }
        let cid = datagram.get(CID_AT..CID_AT + CID_LEN)?;
        self.by_cid.get(cid).copied()
    }

    /// A random Connection ID no session has.
    fn new_connection_id(&self) -> [u8; CID_LEN] {
        loop {
            let cid: [u8; CID_LEN] = rand::random();
            if !self.by_cid.contains_key(&cid) {
                return cid;
            }
        }
    }

    /// A handshake from `ip` ended, opened or not.
    fn handshake_over(&mut self, ip: IpAddr) {
        self.handshakes -= 1;
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.handshaking.entry(ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests;
