//! One DTLS session: the library's state over an in-memory datagram queue, so it reads what the
//! transport hands it and writes records the transport sends; no socket inside.

use std::net::SocketAddr;
use std::time::Instant;

use super::DtlsError;
use super::context::{CID_LEN, Context};
use super::mbed::{Handshake, Read, Ssl};
use crate::policy::Principal;

/// Largest plaintext the transport reads from one record.
const READ_BUFFER: usize = 16 * 1024 + 256;

/// Where a session stands after being driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Still handshaking.
    Handshaking,
    /// The handshake completed in this step.
    Opened,
    /// Open, nothing new.
    Open,
    /// Over: closed by the peer, or failed.
    Closed,
}

/// One session with one client address.
pub(super) struct Session {
    pub(super) addr: SocketAddr,
    ssl: Ssl,
    open: bool,
    /// The Connection ID its client puts in its records once it agreed to (RFC 9146).
    pub(super) cid: [u8; CID_LEN],
    pub(super) principal: Option<Principal>,
    pub(super) last_seen: Instant,
    pub(super) started: Instant,
}

impl Session {
    /// A session for a ClientHello whose cookie the gateway checked, asking the client to send
    /// `cid` in its records; the hello itself is fed next, with [`Self::input`].
    pub(super) fn accept(
        ctx: &Context,
        addr: SocketAddr,
        cid: [u8; CID_LEN],
        now: Instant,
    ) -> Result<Self, DtlsError> {
        let ssl = Ssl::new(&ctx.config, addr.to_string().as_bytes(), Some(&cid))?;
        Ok(Self {
            addr,
            ssl,
            open: false,
            cid,
            principal: None,
            last_seen: now,
            started: now,
        })
    }

    /// Feeds a datagram; plaintext records go to `plaintext`.
    pub(super) fn input(
        &mut self,
        ctx: &Context,
        datagram: &[u8],
        scratch: &mut Vec<u8>,
        plaintext: &mut Vec<Vec<u8>>,
    ) -> Step {
        self.ssl.push(datagram);
        self.drive_and_read(ctx, scratch, plaintext)
    }

    /// Drives the handshake (the library resends its last flight when its timer ran out) or
    /// reads what is queued.
    /// `scratch` is the transport's read buffer, kept between calls.
    pub(super) fn drive_and_read(
        &mut self,
        ctx: &Context,
        scratch: &mut Vec<u8>,
        plaintext: &mut Vec<Vec<u8>>,
    ) -> Step {
        let step = self.drive(ctx);
        if !self.open {
            return step;
        }
        scratch.resize(READ_BUFFER, 0);
        loop {
            match self.ssl.read(scratch) {
                Read::Data(n) => plaintext.push(scratch[..n].to_vec()),
                Read::Nothing => return step,
                Read::Closed => return Step::Closed,
            }
        }
    }

    fn drive(&mut self, ctx: &Context) -> Step {
        if self.open {
            return Step::Open;
        }
        match self.ssl.handshake() {
            Handshake::Done => match ctx.principal(&mut self.ssl) {
                Ok(principal) => {
                    self.open = true;
                    self.principal = principal;
                    Step::Opened
                }
                Err(_) => Step::Closed,
            },
            Handshake::Waiting => Step::Handshaking,
            Handshake::Failed(_) => Step::Closed,
        }
    }

    /// Seals `plaintext` into a record for the client.
    pub(super) fn write(&mut self, plaintext: &[u8]) -> Result<(), DtlsError> {
        if !self.open {
            return Err(DtlsError::NotOpen);
        }
        self.ssl
            .write(plaintext)
            .map_err(|e| DtlsError::Write(e.to_string()))
    }

    /// Sends close_notify.
    pub(super) fn close(&mut self) {
        if self.open {
            self.ssl.close_notify();
        }
    }

    /// Whether the handshake is done.
    pub(super) fn is_open(&self) -> bool {
        self.open
    }

    /// The highest record sequence number that authenticated so far.
    pub(super) fn newest_record(&self) -> u64 {
        self.ssl.newest_record()
    }

    /// The records the library wrote since the last call.
    pub(super) fn take_outgoing(&mut self) -> Vec<Vec<u8>> {
        self.ssl.take_outgoing()
    }
}
