//! The library's server settings: PSK identities and their keys, the certificate and the CAs of
//! client certificates, the cipher suites, and the cookie callbacks that repeat the gateway's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::nid::Nid;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions, SslRef,
    SslVerifyMode, SslVersion,
};

use super::DtlsError;
use crate::policy::Principal;

/// PSK suites first, RFC 7252's mandatory TLS_PSK_WITH_AES_128_CCM_8 at their head; then the
/// certificate suites, RFC 7252's TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 first, and RSA keys'.
const CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256:\
    PSK-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:\
    ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384";

/// One PSK identity.
#[derive(Clone)]
pub struct Psk {
    /// The identity the client sends.
    pub identity: String,
    /// The key.
    pub key: Vec<u8>,
    /// The principal ACL rules name.
    pub principal: String,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Psk")
            .field("identity", &self.identity)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

/// The server certificate and what client certificates to take.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CAs that sign client certificates; a client certificate's CN is its principal.
    pub client_ca: Option<PathBuf>,
    /// Whether a certificate handshake needs a client certificate.
    pub require_client_cert: bool,
}

/// PSK identity -> (key, principal name).
type Keys = Arc<HashMap<Vec<u8>, (Vec<u8>, Arc<str>)>>;

/// The library's context and what the transport asks of it afterwards.
pub(super) struct Context {
    pub(super) ssl: SslContext,
    /// The cookie the gateway checked before the session existed.
    pub(super) cookie: Index<Ssl, Vec<u8>>,
    keys: Keys,
}

impl Context {
    pub(super) fn new(psks: &[Psk], certificate: Option<&Certificate>) -> Result<Self, DtlsError> {
        let keys: HashMap<Vec<u8>, (Vec<u8>, Arc<str>)> = psks
            .iter()
            .map(|p| {
                let entry = (p.key.clone(), Arc::from(p.principal.as_str()));
                (p.identity.as_bytes().to_vec(), entry)
            })
            .collect();
        let keys = Arc::new(keys);
        let cookie = Ssl::new_ex_index::<Vec<u8>>()?;
        let mut b = SslContext::builder(SslMethod::dtls_server())?;
        b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        b.set_cipher_list(CIPHERS)?;
        b.set_options(
            SslOptions::COOKIE_EXCHANGE | SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET,
        );
        b.set_mode(SslMode::RELEASE_BUFFERS);
        b.set_cookie_generate_cb(move |ssl, out| copy_cookie(ssl, cookie, out));
        b.set_cookie_verify_cb(move |ssl, given| {
            ssl.ex_data(cookie).is_some_and(|c| c.as_slice() == given)
        });
        if !keys.is_empty() {
            let table = keys.clone();
            b.set_psk_server_callback(move |_, identity, out| {
                let key = identity.and_then(|id| table.get(id)).map(|(key, _)| key);
                match key {
                    Some(key) if key.len() <= out.len() => {
                        out[..key.len()].copy_from_slice(key);
                        Ok(key.len())
                    }
                    // An unknown identity: the handshake fails with an alert.
                    _ => Err(ErrorStack::get()),
                }
            });
        }
        if let Some(c) = certificate {
            certificate_files(&mut b, c)?;
        }
        Ok(Self {
            ssl: b.build(),
            cookie,
            keys,
        })
    }

    /// Who completed the handshake on `ssl`: the principal of its PSK identity, or its client
    /// certificate's common name; `None` for a certificate handshake without one.
    pub(super) fn principal(&self, ssl: &SslRef) -> Option<Principal> {
        if let Some(identity) = ssl.psk_identity() {
            let (_, name) = self.keys.get(identity)?;
            return Some(Principal::Named(name.clone()));
        }
        let cert = ssl.peer_certificate()?;
        let cn = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
        let name = cn.data().to_string().ok()?;
        Some(Principal::Named(Arc::from(name.as_str())))
    }
}

fn copy_cookie(
    ssl: &mut SslRef,
    cookie: Index<Ssl, Vec<u8>>,
    out: &mut [u8],
) -> Result<usize, ErrorStack> {
    let given = ssl.ex_data(cookie).ok_or_else(ErrorStack::get)?;
    let n = given.len().min(out.len());
    out[..n].copy_from_slice(&given[..n]);
    Ok(n)
}

fn certificate_files(b: &mut SslContextBuilder, c: &Certificate) -> Result<(), DtlsError> {
    b.set_certificate_chain_file(&c.cert)
        .map_err(|e| file("tls.cert", &c.cert, &e))?;
    b.set_private_key_file(&c.key, SslFiletype::PEM)
        .map_err(|e| file("tls.key", &c.key, &e))?;
    b.check_private_key()
        .map_err(|e| file("tls.key", &c.key, &e))?;
    if let Some(ca) = &c.client_ca {
        b.set_ca_file(ca)
            .map_err(|e| file("tls.client_ca", ca, &e))?;
        let mut mode = SslVerifyMode::PEER;
        if c.require_client_cert {
            mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
        }
        b.set_verify(mode);
    }
    Ok(())
}

fn file(key: &'static str, path: &std::path::Path, e: &ErrorStack) -> DtlsError {
    DtlsError::File {
        key,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}
