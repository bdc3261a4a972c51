//! Mbed TLS through its C API (with `aesni.rs`, the crate's only `unsafe`): a [`Config`] every
//! session shares and an [`Ssl`], one session whose "socket" is a queue of datagrams in and out.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_uchar, c_void};
use std::ptr;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use mbedtls_rs_sys as m;

/// Records larger than this are not written in one datagram.
const MTU: u16 = 1280;
/// Datagrams waiting to be read by the library; more within one turn are dropped.
const MAX_QUEUED: usize = 16;
/// `PSA_ERROR_INSUFFICIENT_ENTROPY` (psa/crypto_values.h), not in the generated bindings.
const PSA_ERROR_INSUFFICIENT_ENTROPY: m::psa_status_t = -148;

/// An error code from Mbed TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Mbed TLS error -0x{:04x}", self.0.unsigned_abs())]
pub struct LibraryError(pub(super) c_int);

fn check(ret: c_int) -> Result<(), LibraryError> {
    if ret == 0 {
        Ok(())
    } else {
        Err(LibraryError(ret))
    }
}

/// Which side of the handshake a [`Config`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Server,
    Client,
}

/// Fills `buf` from the operating system's generator; the library's only randomness.
fn fill_random(buf: &mut [u8]) -> bool {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf).is_ok()
}

/// The library's `f_rng`.
unsafe extern "C" fn random(_: *mut c_void, out: *mut c_uchar, len: usize) -> c_int {
    if len == 0 {
        return 0;
    }
    // SAFETY: the library passes a writable buffer of `len` bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(out, len) };
    if fill_random(buf) {
        0
    } else {
        m::MBEDTLS_ERR_ENTROPY_SOURCE_FAILED
    }
}

/// PSA's random source: the build defines `MBEDTLS_PSA_CRYPTO_EXTERNAL_RNG`, so the library
/// asks the application for it by this name.
///
/// # Safety
/// Called by the library with `output` writable for `size` bytes and `length` writable.
#[unsafe(no_mangle)]
unsafe extern "C" fn mbedtls_psa_external_get_random(
    _: *mut m::mbedtls_psa_external_random_context_t,
    output: *mut u8,
    size: usize,
    length: *mut usize,
) -> m::psa_status_t {
    if size > 0 {
        // SAFETY: the library passes a writable buffer of `size` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(output, size) };
        if !fill_random(buf) {
            return PSA_ERROR_INSUFFICIENT_ENTROPY;
        }
    }
    // SAFETY: the library passes a writable `size_t`.
    unsafe { *length = size };
    0
}

/// Once per process: AES on the CPU's instructions, the wall clock X.509 validity needs, and
/// PSA's state.
fn init() {
    static ONCE: Once = Once::new();
    static CLOCK: m::hook::backend::std::wall_clock::StdWallClock =
        m::hook::backend::std::wall_clock::StdWallClock;
    static TIMER: m::hook::backend::std::timer::StdTimer = m::hook::backend::std::timer::StdTimer;
    ONCE.call_once(|| {
        #[cfg(target_arch = "x86_64")]
        super::aesni::install();
        // SAFETY: the hooks are set before any library call that reads the time (this runs
        // before the first configuration exists) and point at statics.
        unsafe {
            m::hook::wall_clock::hook_wall_clock(Some(&CLOCK));
            m::hook::timer::hook_timer(Some(&TIMER));
            // Fails only without randomness, which every handshake then reports.
            let _ = m::psa_crypto_init();
        }
    });
}

/// A certificate chain parsed by the library.
struct Chain(*mut m::mbedtls_x509_crt);

impl Chain {
    /// Parses PEM (or DER) certificates.
    fn parse(bytes: &[u8]) -> Result<Self, LibraryError> {
        let pem = nul_terminated(bytes);
        // SAFETY: a zeroed crt is what mbedtls_x509_crt_init expects to overwrite; the box is
        // freed in Drop, after mbedtls_x509_crt_free.
        let chain = Self(Box::into_raw(Box::<m::mbedtls_x509_crt>::default()));
        // SAFETY: `chain.0` is a live, initialised crt; `pem` is readable for its length.
        unsafe {
            m::mbedtls_x509_crt_init(chain.0);
            check(m::mbedtls_x509_crt_parse(chain.0, pem.as_ptr(), pem.len()))?;
        }
        Ok(chain)
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from Box::into_raw and was initialised; nothing else frees it.
        unsafe {
            m::mbedtls_x509_crt_free(self.0);
            drop(Box::from_raw(self.0));
        }
    }
}

/// A private key parsed by the library.
struct Key(*mut m::mbedtls_pk_context);

impl Key {
    fn parse(bytes: &[u8]) -> Result<Self, LibraryError> {
        let pem = nul_terminated(bytes);
        let key = Self(Box::into_raw(Box::<m::mbedtls_pk_context>::default()));
        // SAFETY: `key.0` is a live pk context; `pem` is readable for its length; `random`
        // takes no context.
        unsafe {
            m::mbedtls_pk_init(key.0);
            check(m::mbedtls_pk_parse_key(
                key.0,
                pem.as_ptr(),
                pem.len(),
                ptr::null(),
                0,
                Some(random),
                ptr::null_mut(),
            ))?;
        }
        Ok(key)
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from Box::into_raw and was initialised; nothing else frees it.
        unsafe {
            m::mbedtls_pk_free(self.0);
            drop(Box::from_raw(self.0));
        }
    }
}

/// PEM parsers want the terminating NUL counted in the length.
fn nul_terminated(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.extend_from_slice(bytes);
    v.push(0);
    v
}

/// PSK identity -> key, read by the PSK callback.
type Keys = HashMap<Vec<u8>, Vec<u8>>;

/// The library's settings. Built once, then shared (behind an `Arc`) by every session, which
/// keeps a pointer to it: it is never changed once a session exists.
pub(super) struct Config {
    conf: *mut m::mbedtls_ssl_config,
    role: Role,
    /// Read by the PSK callback through the pointer the library holds.
    keys: *mut Keys,
    /// Referenced by `conf`; kept until it is freed.
    suites: Vec<c_int>,
    own: Option<(Chain, Key)>,
    ca: Option<Chain>,
}

// SAFETY: the configuration is only read after it is built (Mbed TLS allows one config to be
// shared by contexts on several threads when it is not modified), and what its pointers reach
// (keys, certificates) is owned by it and immutable too.
unsafe impl Send for Config {}
// SAFETY: as above: nothing reachable through `&Config` is mutated.
unsafe impl Sync for Config {}

impl Config {
    /// DTLS 1.2 defaults for `role`, with `suites` in order of preference.
    pub(super) fn new(role: Role, suites: &[c_int]) -> Result<Self, LibraryError> {
        init();
        let mut suites = suites.to_vec();
        suites.push(0);
        let config = Self {
            conf: Box::into_raw(Box::<m::mbedtls_ssl_config>::default()),
            role,
            keys: Box::into_raw(Box::default()),
            suites,
            own: None,
            ca: None,
        };
        let endpoint = match role {
            Role::Server => m::MBEDTLS_SSL_IS_SERVER,
            Role::Client => m::MBEDTLS_SSL_IS_CLIENT,
        };
        // SAFETY: `config.conf` is a live config, freed only in Drop; `suites` is
        // zero-terminated and lives as long as the config (a Vec's buffer does not move when the
        // Vec does).
        unsafe {
            m::mbedtls_ssl_config_init(config.conf);
            check(m::mbedtls_ssl_config_defaults(
                config.conf,
                endpoint as c_int,
                m::MBEDTLS_SSL_TRANSPORT_DATAGRAM as c_int,
                m::MBEDTLS_SSL_PRESET_DEFAULT as c_int,
            ))?;
            m::mbedtls_ssl_conf_rng(config.conf, Some(random), ptr::null_mut());
            m::mbedtls_ssl_conf_ciphersuites(config.conf, config.suites.as_ptr());
            m::mbedtls_ssl_conf_authmode(config.conf, m::MBEDTLS_SSL_VERIFY_NONE as c_int);
            if role == Role::Server {
                // The gateway checks cookies before a session exists (see `Ssl::new`).
                m::mbedtls_ssl_conf_dtls_cookies(
                    config.conf,
                    Some(no_cookie),
                    Some(cookie_checked),
                    ptr::null_mut(),
                );
            }
        }
        Ok(config)
    }

    /// Records carrying a Connection ID name the session by one `len` bytes long; records with
    /// another session's ID are dropped.
    pub(super) fn connection_ids(&mut self, len: usize) -> Result<(), LibraryError> {
        // SAFETY: `self.conf` is live and not yet shared.
        check(unsafe {
            m::mbedtls_ssl_conf_cid(
                self.conf,
                len,
                m::MBEDTLS_SSL_UNEXPECTED_CID_IGNORE as c_int,
            )
        })
    }

    /// Server: the PSK identities it accepts, with their keys.
    pub(super) fn psks(&mut self, keys: Keys) {
        // SAFETY: `self.keys` came from Box::into_raw and nothing reads it while the config is
        // being built; `self.conf` is live and the callback's context outlives it.
        unsafe {
            *self.keys = keys;
            m::mbedtls_ssl_conf_psk_cb(self.conf, Some(psk_callback), self.keys.cast());
        }
    }

    /// Client: its identity and key.
    pub(super) fn client_psk(&mut self, identity: &[u8], key: &[u8]) -> Result<(), LibraryError> {
        // SAFETY: the library copies both buffers into the config.
        check(unsafe {
            m::mbedtls_ssl_conf_psk(
                self.conf,
                key.as_ptr(),
                key.len(),
                identity.as_ptr(),
                identity.len(),
            )
        })
    }

    /// The server's certificate chain and key (PEM); the error says which of the two failed.
    pub(super) fn certificate(&mut self, chain: &[u8], key: &[u8]) -> Result<(), CertError> {
        let chain = Chain::parse(chain).map_err(CertError::Chain)?;
        let key = Key::parse(key).map_err(CertError::Key)?;
        // SAFETY: both are live and parsed; `chain.0` holds its first certificate inline; the
        // config keeps both until it is freed.
        unsafe {
            check(m::mbedtls_pk_check_pair(
                &(*chain.0).pk,
                key.0,
                Some(random),
                ptr::null_mut(),
            ))
            .map_err(CertError::Key)?;
            check(m::mbedtls_ssl_conf_own_cert(self.conf, chain.0, key.0))
                .map_err(CertError::Key)?;
        }
        self.own = Some((chain, key));
        Ok(())
    }

    /// The CAs client certificates must chain to; `required` fails a certificate handshake
    /// without one.
    pub(super) fn client_ca(&mut self, pem: &[u8], required: bool) -> Result<(), LibraryError> {
        let ca = Chain::parse(pem)?;
        // Optional: a handshake without a client certificate goes on; one whose certificate
        // does not chain to `ca` fails (`refuse_unverified`), and one the library lets through
        // for its other checks is refused by `Ssl::peer_certificate`'s caller.
        let mode = if required {
            m::MBEDTLS_SSL_VERIFY_REQUIRED
        } else {
            m::MBEDTLS_SSL_VERIFY_OPTIONAL
        };
        // SAFETY: `ca.0` stays alive as long as the config (kept in `self.ca`); the callback
        // takes no context.
        unsafe {
            m::mbedtls_ssl_conf_ca_chain(self.conf, ca.0, ptr::null_mut());
            m::mbedtls_ssl_conf_authmode(self.conf, mode as c_int);
            m::mbedtls_ssl_conf_verify(self.conf, Some(refuse_unverified), ptr::null_mut());
        }
        self.ca = Some(ca);
        Ok(())
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        // SAFETY: every session holds an Arc of this config, so none is left; the pointers came
        // from Box::into_raw and are freed once. The chains and key drop after this.
        unsafe {
            m::mbedtls_ssl_config_free(self.conf);
            drop(Box::from_raw(self.conf));
            drop(Box::from_raw(self.keys));
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("role", &self.role)
            .field("certificate", &self.own.is_some())
            .finish_non_exhaustive()
    }
}

/// Which part of a certificate setting the library refused.
#[derive(Debug)]
pub(super) enum CertError {
    Chain(LibraryError),
    Key(LibraryError),
}

/// The PSK callback: looks the identity up, gives the library its key and notes the identity
/// in the session's [`Io`].
unsafe extern "C" fn psk_callback(
    keys: *mut c_void,
    ssl: *mut m::mbedtls_ssl_context,
    identity: *const c_uchar,
    len: usize,
) -> c_int {
    // SAFETY: `keys` is the config's table, alive and unchanged while sessions exist; the
    // identity buffer is readable for `len` bytes.
    let (keys, identity) = unsafe {
        let keys = &*keys.cast::<Keys>();
        let identity = if len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(identity, len)
        };
        (keys, identity)
    };
    let Some(key) = keys.get(identity) else {
        // An unknown identity: the handshake fails with an alert.
        return -1;
    };
    // SAFETY: `ssl` is the session being driven; its user data is the `Io` set in `Ssl::new`,
    // which no Rust reference aliases while the library runs.
    unsafe {
        let ret = m::mbedtls_ssl_set_hs_psk(ssl, key.as_ptr(), key.len());
        if ret != 0 {
            return ret;
        }
        let io = (*ssl).private_user_data.p.cast::<Io>();
        if !io.is_null() {
            (*io).psk_identity = Some(identity.to_vec());
        }
    }
    0
}

/// Fails the handshake, with an alert, on a client certificate the CAs do not vouch for:
/// in optional mode the library would otherwise go on with it.
unsafe extern "C" fn refuse_unverified(
    _: *mut c_void,
    _: *mut m::mbedtls_x509_crt,
    _: c_int,
    flags: *mut u32,
) -> c_int {
    // SAFETY: the library passes the certificate's verification flags, readable.
    if unsafe { *flags } == 0 {
        0
    } else {
        m::MBEDTLS_ERR_X509_FATAL_ERROR
    }
}

/// The library never writes a cookie itself: the gateway answered the first ClientHello.
unsafe extern "C" fn no_cookie(
    _: *mut c_void,
    _: *mut *mut c_uchar,
    _: *mut c_uchar,
    _: *const c_uchar,
    _: usize,
) -> c_int {
    m::MBEDTLS_ERR_SSL_INTERNAL_ERROR
}

/// A session exists only for a ClientHello whose cookie the gateway checked (statelessly,
/// `cookie.rs`), so any non-empty cookie the library sees is one it has checked.
unsafe extern "C" fn cookie_checked(
    _: *mut c_void,
    _: *const c_uchar,
    len: usize,
    _: *const c_uchar,
    _: usize,
) -> c_int {
    if len > 0 { 0 } else { -1 }
}

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
    psk_identity: Option<Vec<u8>>,
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
pub(super) enum Handshake {
    Done,
    Waiting,
    Failed(LibraryError),
}

/// What one read gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    /// A record's plaintext, this long.
    Data(usize),
    /// Nothing (more) to read.
    Nothing,
    /// close_notify, or a fatal error.
    Closed,
}

/// One session.
pub(super) struct Ssl {
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
    pub(super) fn new(
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
    pub(super) fn push(&mut self, datagram: &[u8]) -> bool {
        let io = self.io();
        if io.incoming.len() >= MAX_QUEUED || datagram.is_empty() {
            return false;
        }
        io.incoming.push_back(datagram.to_vec());
        true
    }

    /// The datagrams the library wrote since the last call.
    pub(super) fn take_outgoing(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.io().outgoing)
    }

    /// Steps the handshake with what is queued (or resends a flight when its timer ran out).
    pub(super) fn handshake(&mut self) -> Handshake {
        // SAFETY: a live context, set up in `new`.
        match unsafe { m::mbedtls_ssl_handshake(self.ssl) } {
            0 => Handshake::Done,
            m::MBEDTLS_ERR_SSL_WANT_READ | m::MBEDTLS_ERR_SSL_WANT_WRITE => Handshake::Waiting,
            e => Handshake::Failed(LibraryError(e)),
        }
    }

    /// Opens the next queued record into `buf`.
    pub(super) fn read(&mut self, buf: &mut [u8]) -> Read {
        // SAFETY: a live context; `buf` is writable for its length.
        match unsafe { m::mbedtls_ssl_read(self.ssl, buf.as_mut_ptr(), buf.len()) } {
            n if n > 0 => Read::Data(n.unsigned_abs() as usize),
            m::MBEDTLS_ERR_SSL_WANT_READ | m::MBEDTLS_ERR_SSL_WANT_WRITE => Read::Nothing,
            _ => Read::Closed,
        }
    }

    /// Seals `plaintext` into one record.
    pub(super) fn write(&mut self, plaintext: &[u8]) -> Result<(), LibraryError> {
        // SAFETY: a live context; `plaintext` is readable for its length.
        let n = unsafe { m::mbedtls_ssl_write(self.ssl, plaintext.as_ptr(), plaintext.len()) };
        match usize::try_from(n) {
            Ok(n) if n == plaintext.len() => Ok(()),
            Ok(_) => Err(LibraryError(m::MBEDTLS_ERR_SSL_BAD_INPUT_DATA)),
            Err(_) => Err(LibraryError(n)),
        }
    }

    /// Sends close_notify.
    pub(super) fn close_notify(&mut self) {
        // SAFETY: a live context.
        let _ = unsafe { m::mbedtls_ssl_close_notify(self.ssl) };
    }

    /// The PSK identity the handshake used, if it was a PSK handshake.
    pub(super) fn psk_identity(&mut self) -> Option<Vec<u8>> {
        self.io().psk_identity.clone()
    }

    /// The client certificate (DER) and whether it verified, if one was sent.
    pub(super) fn peer_certificate(&self) -> Option<(Vec<u8>, bool)> {
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
    pub(super) fn peer_cid(&self) -> Option<Vec<u8>> {
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
    pub(super) fn newest_record(&self) -> u64 {
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

/// PSK suites first, RFC 7252's mandatory TLS_PSK_WITH_AES_128_CCM_8 at their head; then the
/// certificate suites, RFC 7252's TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 first, and RSA keys'.
pub(super) const SERVER_SUITES: [c_int; 9] = [
    m::MBEDTLS_TLS_PSK_WITH_AES_128_CCM_8 as c_int,
    m::MBEDTLS_TLS_PSK_WITH_AES_128_CCM as c_int,
    m::MBEDTLS_TLS_PSK_WITH_AES_128_GCM_SHA256 as c_int,
    m::MBEDTLS_TLS_PSK_WITH_AES_256_GCM_SHA384 as c_int,
    m::MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 as c_int,
    m::MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 as c_int,
    m::MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 as c_int,
    m::MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 as c_int,
    m::MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 as c_int,
];

/// What a PSK client offers: RFC 7252's suite.
pub(super) const CLIENT_SUITES: [c_int; 1] = [m::MBEDTLS_TLS_PSK_WITH_AES_128_CCM_8 as c_int];
