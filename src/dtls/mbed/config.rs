//! The library's settings, shared by every session: role, suites, PSKs, certificate and client
//! CAs, Connection IDs, and the callbacks that answer for them.

use std::collections::HashMap;
use std::ffi::{c_int, c_uchar, c_void};
use std::ptr;

use mbedtls_rs_sys as m;

use super::ssl::Io;
use super::{LibraryError, Role, check, init, random};

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
pub(in crate::dtls) struct Config {
    pub(super) conf: *mut m::mbedtls_ssl_config,
    pub(super) role: Role,
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
    pub(in crate::dtls) fn new(role: Role, suites: &[c_int]) -> Result<Self, LibraryError> {
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
    pub(in crate::dtls) fn connection_ids(&mut self, len: usize) -> Result<(), LibraryError> {
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
    pub(in crate::dtls) fn psks(&mut self, keys: Keys) {
        // SAFETY: `self.keys` came from Box::into_raw and nothing reads it while the config is
        // being built; `self.conf` is live and the callback's context outlives it.
        unsafe {
            *self.keys = keys;
            m::mbedtls_ssl_conf_psk_cb(self.conf, Some(psk_callback), self.keys.cast());
        }
    }

    /// Client: its identity and key.
    pub(in crate::dtls) fn client_psk(
        &mut self,
        identity: &[u8],
        key: &[u8],
    ) -> Result<(), LibraryError> {
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
    pub(in crate::dtls) fn certificate(
        &mut self,
        chain: &[u8],
        key: &[u8],
    ) -> Result<(), CertError> {
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
    pub(in crate::dtls) fn client_ca(
        &mut self,
        pem: &[u8],
        required: bool,
    ) -> Result<(), LibraryError> {
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
pub(in crate::dtls) enum CertError {
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
