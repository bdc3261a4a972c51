//! One session: the library's context over an in-memory queue of datagrams, its timer, and what
//! the handshake and the records give.

use std::collections::VecDeque;
use std::ffi::{c_int, c_uchar, c_void};
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mbedtls_rs_sys as m;

use super::{Config, LibraryError, Role, check};

/// Records larger than this are not written in one datagram.
const MTU: u16 = 1280;
/// Datagrams waiting to be read by the library; more within one turn are dropped.
const MAX_QUEUED: usize = 16;

/// The library's handshake timer (RFC 6347 4.2.4 resends): an intermediate and a final delay.
#[derive(Debug)]
struct Timer {
    started: Instant,
    intermediate: Duration,
    fin: Option<Duration>,
}

/// What the library's callbacks reach: the datagrams, the timer, the PSK identity used.
#[derive(Debug)]
pub(super) struct Io {
    incoming: VecDeque<Vec<u8>>,
    outgoing: Vec<Vec<u8>>,
    timer: Timer,
    /// Set by the PSK callback.
    pub(super) psk_identity: Option<Vec<u8>>,
}

unsafe extern "C" fn send(io: *mut c_void, buf: *const c_uchar, len: usize) -> c_int {
    // SAFETY: `io` is the session's Io (set in `Ssl::new`), not otherwise borrowed while the
    // library runs; `buf` is readable for `len` bytes, and a record is never empty.
    unsafe {
        let io = &mut *io.cast::<Io>();
        io.outgoing
            .push(std::slice::from_raw_parts(buf, len).to_vec());
    }
    c_int::try_from(len).unwrap_or(c_int::MAX)
}

unsafe extern "C" fn recv(io: *mut c_void, buf: *mut c_uchar, len: usize) -> c_int {
    // SAFETY: as in `send`; `buf` is writable for `len` bytes.
    unsafe {
        let io = &mut *io.cast::<Io>();
        let Some(datagram) = io.incoming.pop_front() else {
            return m::MBEDTLS_ERR_SSL_WANT_READ;
        };
        // A datagram longer than the buffer is cut, as a UDP socket would.
        let n = datagram.len().min(len);
        ptr::copy_nonoverlapping(datagram.as_ptr(), buf, n);
        c_int::try_from(n).unwrap_or(c_int::MAX)
    }
}

unsafe extern "C" fn set_timer(io: *mut c_void, intermediate_ms: u32, fin_ms: u32) {
    // SAFETY: as in `send`.
    let io = unsafe { &mut *io.cast::<Io>() };
    io.timer = Timer {
        started: Instant::now(),
        intermediate: Duration::from_millis(intermediate_ms.into()),
        fin: (fin_ms > 0).then(|| Duration::from_millis(fin_ms.into())),
    };
}

unsafe extern "C" fn get_timer(io: *mut c_void) -> c_int {
    // SAFETY: as in `send`.
    let io = unsafe { &*io.cast::<Io>() };
    let Some(fin) = io.timer.fin else {
        return -1;
    };
    let elapsed = io.timer.started.elapsed();
    if elapsed >= fin {
        2
    } else if elapsed >= io.timer.intermediate {
        1
    } else {
        0
    }
}

/// Where a handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::dtls) enum Handshake {
    Done,
    Waiting,
    Failed(LibraryError),
}

/// What one read gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::dtls) enum Read {
    /// A record's plaintext, this long.
    Data(usize),
    /// Nothing (more) to read.
    Nothing,
    /// close_notify, or a fatal error.
    Closed,
}

/// One session.
pub(in crate::dtls) struct Ssl {
    ssl: *mut m::mbedtls_ssl_context,
    io: *mut Io,
    /// The session points at the config; it lives as long.
    _config: Arc<Config>,
}

// SAFETY: the context and its Io are owned by this value alone (the library's pointers to them
// are reached only through calls made via `&mut self`); the config is Sync.
unsafe impl Send for Ssl {}

impl Ssl {
    /// A session under `config`. A server names the client by `transport_id` and, with
    /// `own_cid`, asks it to send that Connection ID; a client with `own_cid` (which may be
    /// empty) offers Connection IDs.
    pub(in crate::dtls) fn new(
        config: &Arc<Config>,
        transport_id: &[u8],
        own_cid: Option<&[u8]>,
    ) -> Result<Self, LibraryError> {
        let io = Box::into_raw(Box::new(Io {
            incoming: VecDeque::new(),
            outgoing: Vec::new(),
            timer: Timer {
                started: Instant::now(),
                intermediate: Duration::ZERO,
                fin: None,
            },
            psk_identity: None,
        }));
        let this = Self {
            ssl: Box::into_raw(Box::<m::mbedtls_ssl_context>::default()),
            io,
            _config: config.clone(),
        };
        // SAFETY: `this.ssl` is a live context freed only in Drop; the config outlives it (the
        // Arc); `io` lives as long as the context and is reached only by the callbacks and by
        // `&mut self` methods between library calls.
        unsafe {
            m::mbedtls_ssl_init(this.ssl);
            check(m::mbedtls_ssl_setup(this.ssl, config.conf))?;
            m::mbedtls_ssl_set_bio(this.ssl, io.cast(), Some(send), Some(recv), None);
            m::mbedtls_ssl_set_timer_cb(this.ssl, io.cast(), Some(set_timer), Some(get_timer));
            m::mbedtls_ssl_set_mtu(this.ssl, MTU);
            // What mbedtls_ssl_set_user_data_p (a header-only function) does.
            (*this.ssl).private_user_data.p = io.cast();
            if config.role == Role::Server {
                check(m::mbedtls_ssl_set_client_transport_id(
                    this.ssl,
                    transport_id.as_ptr(),
                    transport_id.len(),
                ))?;
            }
            if let Some(cid) = own_cid {
                check(m::mbedtls_ssl_set_cid(
                    this.ssl,
                    m::MBEDTLS_SSL_CID_ENABLED as c_int,
                    cid.as_ptr(),
                    cid.len(),
                ))?;
            }
        }
        Ok(this)
    }

    fn io(&mut self) -> &mut Io {
        // SAFETY: the library is not running (we hold `&mut self`), so nothing else uses it.
        unsafe { &mut *self.io }
    }

    /// Queues a datagram for the library to read; false when the queue is full.
    pub(in crate::dtls) fn push(&mut self, datagram: &[u8]) -> bool {
        let io = self.io();
        if io.incoming.len() >= MAX_QUEUED || datagram.is_empty() {
            return false;
        }
        io.incoming.push_back(datagram.to_vec());
        true
    }

    /// The datagrams the library wrote since the last call.
    pub(in crate::dtls) fn take_outgoing(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.io().outgoing)
    }

    /// Steps the handshake with what is queued (or resends a flight when its timer ran out).
    pub(in crate::dtls) fn handshake(&mut self) -> Handshake {
        // SAFETY: a live context, set up in `new`.
        match unsafe { m::mbedtls_ssl_handshake(self.ssl) } {
            0 => Handshake::Done,
            m::MBEDTLS_ERR_SSL_WANT_READ | m::MBEDTLS_ERR_SSL_WANT_WRITE => Handshake::Waiting,
            e => Handshake::Failed(LibraryError(e)),
        }
    }

    /// Opens the next queued record into `buf`.
    pub(in crate::dtls) fn read(&mut self, buf: &mut [u8]) -> Read {
        // SAFETY: a live context; `buf` is writable for its length.
        match unsafe { m::mbedtls_ssl_read(self.ssl, buf.as_mut_ptr(), buf.len()) } {
            n if n > 0 => Read::Data(n.unsigned_abs() as usize),
            m::MBEDTLS_ERR_SSL_WANT_READ | m::MBEDTLS_ERR_SSL_WANT_WRITE => Read::Nothing,
            _ => Read::Closed,
        }
    }

    /// Seals `plaintext` into one record.
    pub(in crate::dtls) fn write(&mut self, plaintext: &[u8]) -> Result<(), LibraryError> {
        // SAFETY: a live context; `plaintext` is readable for its length.
        let n = unsafe { m::mbedtls_ssl_write(self.ssl, plaintext.as_ptr(), plaintext.len()) };
        match usize::try_from(n) {
            Ok(n) if n == plaintext.len() => Ok(()),
            Ok(_) => Err(LibraryError(m::MBEDTLS_ERR_SSL_BAD_INPUT_DATA)),
            Err(_) => Err(LibraryError(n)),
        }
    }

    /// Sends close_notify.
    pub(in crate::dtls) fn close_notify(&mut self) {
        // SAFETY: a live context.
        let _ = unsafe { m::mbedtls_ssl_close_notify(self.ssl) };
    }

    /// The PSK identity the handshake used, if it was a PSK handshake.
    pub(in crate::dtls) fn psk_identity(&mut self) -> Option<Vec<u8>> {
        self.io().psk_identity.clone()
    }

    /// The client certificate (DER) and whether it verified, if one was sent.
    pub(in crate::dtls) fn peer_certificate(&self) -> Option<(Vec<u8>, bool)> {
        // SAFETY: a live context; the certificate it returns lives as long as the session, and
        // its raw buffer is readable for its length; it is copied before returning.
        unsafe {
            let crt = m::mbedtls_ssl_get_peer_cert(self.ssl);
            if crt.is_null() || (*crt).raw.p.is_null() {
                return None;
            }
            let der = std::slice::from_raw_parts((*crt).raw.p, (*crt).raw.len).to_vec();
            Some((der, m::mbedtls_ssl_get_verify_result(self.ssl) == 0))
        }
    }

    /// The Connection ID the peer asked for, once negotiated (possibly empty); `None` when the
    /// session does not use Connection IDs.
    pub(in crate::dtls) fn peer_cid(&self) -> Option<Vec<u8>> {
        let mut enabled: c_int = 0;
        let mut cid = [0u8; m::MBEDTLS_SSL_CID_OUT_LEN_MAX as usize];
        let mut len = 0usize;
        // SAFETY: a live context; the out-parameters are writable and `cid` is as long as the
        // library's largest Connection ID.
        let ret = unsafe {
            m::mbedtls_ssl_get_peer_cid(self.ssl, &mut enabled, cid.as_mut_ptr(), &mut len)
        };
        (ret == 0 && enabled == m::MBEDTLS_SSL_CID_ENABLED as c_int).then(|| cid[..len].to_vec())
    }

    /// The highest record sequence number that has authenticated in this epoch: the top of
    /// the anti-replay window (there is no accessor for it).
    pub(in crate::dtls) fn newest_record(&self) -> u64 {
        // SAFETY: a live context; a plain integer field.
        unsafe { (*self.ssl).private_in_window_top }
    }
}

impl Drop for Ssl {
    fn drop(&mut self) {
        // SAFETY: both came from Box::into_raw and are freed once, the context first as it
        // points at the Io.
        unsafe {
            m::mbedtls_ssl_free(self.ssl);
            drop(Box::from_raw(self.ssl));
            drop(Box::from_raw(self.io));
        }
    }
}
