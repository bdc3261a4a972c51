//! One DTLS session: the library's state over an in-memory datagram queue, so it reads what the
//! transport hands it and writes records the transport sends; no socket inside.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use openssl::ssl::{ErrorCode, Ssl, SslStream};

use super::DtlsError;
use super::context::Context;
use crate::policy::Principal;

/// Records larger than this are not written in one datagram.
const MTU: u32 = 1280;
/// Datagrams waiting to be read by the library; more within one turn are dropped.
const MAX_QUEUED: usize = 16;
/// Largest plaintext the transport reads from one record.
const READ_BUFFER: usize = 16 * 1024 + 256;

/// The library's datagram "socket": what came in, what goes out.
#[derive(Debug, Default)]
pub(super) struct Pipe {
    incoming: VecDeque<Vec<u8>>,
    outgoing: Vec<Vec<u8>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(datagram) = self.incoming.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // A datagram longer than the buffer is cut, as a UDP socket would.
        let n = datagram.len().min(buf.len());
        buf[..n].copy_from_slice(&datagram[..n]);
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

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
    stream: SslStream<Pipe>,
    open: bool,
    pub(super) principal: Option<Principal>,
    pub(super) last_seen: Instant,
    pub(super) started: Instant,
}

impl Session {
    /// A session for a ClientHello whose cookie the gateway checked: `first` is the hello as
    /// it was before the cookie, replayed so the library is where the client thinks it is;
    /// the hello itself is fed next, with [`Self::input`].
    pub(super) fn accept(
        ctx: &Context,
        addr: SocketAddr,
        cookie: &[u8],
        first: Vec<u8>,
        now: Instant,
    ) -> Result<Self, DtlsError> {
        let mut ssl = Ssl::new(&ctx.ssl)?;
        ssl.set_mtu(MTU)?;
        ssl.set_ex_data(ctx.cookie, cookie.to_vec());
        let mut stream = SslStream::new(ssl, Pipe::default())?;
        stream.get_mut().incoming.push_back(first);
        let mut session = Self {
            addr,
            stream,
            open: false,
            principal: None,
            last_seen: now,
            started: now,
        };
        session.drive(ctx);
        // The library's own HelloVerifyRequest: the client has had the gateway's already.
        session.stream.get_mut().outgoing.clear();
        Ok(session)
    }

    /// Feeds a datagram; plaintext records go to `plaintext`.
    pub(super) fn input(
        &mut self,
        ctx: &Context,
        datagram: &[u8],
        scratch: &mut Vec<u8>,
        plaintext: &mut Vec<Vec<u8>>,
    ) -> Step {
        let pipe = self.stream.get_mut();
        if pipe.incoming.len() < MAX_QUEUED {
            pipe.incoming.push_back(datagram.to_vec());
        }
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
            match self.stream.ssl_read(scratch) {
                Ok(n) => plaintext.push(scratch[..n].to_vec()),
                Err(e) if e.code() == ErrorCode::WANT_READ => return step,
                // close_notify, or a fatal error.
                Err(_) => return Step::Closed,
            }
        }
    }

    fn drive(&mut self, ctx: &Context) -> Step {
        if self.open {
            return Step::Open;
        }
        match self.stream.accept() {
            Ok(()) => {
                self.open = true;
                self.principal = ctx.principal(self.stream.ssl());
                Step::Opened
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => Step::Handshaking,
            Err(_) => Step::Closed,
        }
    }

    /// Seals `plaintext` into a record for the client.
    pub(super) fn write(&mut self, plaintext: &[u8]) -> Result<(), DtlsError> {
        if !self.open {
            return Err(DtlsError::NotOpen);
        }
        self.stream
            .ssl_write(plaintext)
            .map(drop)
            .map_err(|e| DtlsError::Write(e.to_string()))
    }

    /// Sends close_notify.
    pub(super) fn close(&mut self) {
        if self.open {
            let _ = self.stream.shutdown();
        }
    }

    /// Whether the handshake is done.
    pub(super) fn is_open(&self) -> bool {
        self.open
    }

    /// The records the library wrote since the last call.
    pub(super) fn take_outgoing(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.stream.get_mut().outgoing)
    }
}
