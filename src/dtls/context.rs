//! The library's server settings: PSK identities and their keys, the certificate and the CAs of
//! client certificates, the cipher suites and Connection IDs, and who a finished handshake names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::DtlsError;
use super::mbed::{CertError, Config, LibraryError, Role, SERVER_SUITES, Ssl};
use crate::policy::Principal;

/// The length of the Connection ID each session asks its client to send (RFC 9146).
pub(super) const CID_LEN: usize = 8;

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

/// The library's configuration and the principal of each PSK identity.
pub(super) struct Context {
    pub(super) config: Arc<Config>,
    principals: HashMap<Vec<u8>, Arc<str>>,
}

impl Context {
    pub(super) fn new(psks: &[Psk], certificate: Option<&Certificate>) -> Result<Self, DtlsError> {
        let mut config = Config::new(Role::Server, &SERVER_SUITES)?;
        config.connection_ids(CID_LEN)?;
        if !psks.is_empty() {
            let keys = psks
                .iter()
                .map(|p| (p.identity.as_bytes().to_vec(), p.key.clone()))
                .collect();
            config.psks(keys);
        }
        if let Some(c) = certificate {
            let chain = read("tls.cert", &c.cert)?;
            let key = read("tls.key", &c.key)?;
            config.certificate(&chain, &key).map_err(|e| match e {
                CertError::Chain(e) => file("tls.cert", &c.cert, e),
                CertError::Key(e) => file("tls.key", &c.key, e),
            })?;
            if let Some(ca) = &c.client_ca {
                let pem = read("tls.client_ca", ca)?;
                config
                    .client_ca(&pem, c.require_client_cert)
                    .map_err(|e| file("tls.client_ca", ca, e))?;
            }
        }
        let principals = psks
            .iter()
            .map(|p| {
                let name = Arc::from(p.principal.as_str());
                (p.identity.as_bytes().to_vec(), name)
            })
            .collect();
        Ok(Self {
            config: Arc::new(config),
            principals,
        })
    }

    /// Who completed the handshake on `ssl`: the principal of its PSK identity, or its client
    /// certificate's common name; `Ok(None)` for a certificate handshake without one, `Err` for
    /// a client certificate that does not verify.
    pub(super) fn principal(&self, ssl: &mut Ssl) -> Result<Option<Principal>, Unverified> {
        if let Some(identity) = ssl.psk_identity() {
            let name = self.principals.get(&identity).cloned();
            return Ok(name.map(Principal::Named));
        }
        match ssl.peer_certificate() {
            None => Ok(None),
            Some((_, false)) => Err(Unverified),
            Some((der, true)) => {
                let cn = crate::tls::common_name(&der);
                Ok(cn.map(|name| Principal::Named(Arc::from(name.as_str()))))
            }
        }
    }
}

/// A client certificate that the CAs do not vouch for (the library lets an optional one
/// through; the gateway does not).
#[derive(Debug, Clone, Copy)]
pub(super) struct Unverified;

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, DtlsError> {
    std::fs::read(path).map_err(|e| DtlsError::File {
        key,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn file(key: &'static str, path: &Path, e: LibraryError) -> DtlsError {
    DtlsError::File {
        key,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}
