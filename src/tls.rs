//! TLS for the HTTPS and MQTT-over-TLS listeners (rustls): the server certificate from PEM
//! files, optional client certificates, and the handshake with a deadline; and the accept step
//! of every listener the gateway runs itself (HTTP, HTTPS, MQTT over TLS).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;

/// Pause after a failed accept (out of file descriptors, ...), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection on `listener`, with Nagle's algorithm off. A failed accept is logged
/// and retried after a pause; `what` names the listener in the log.
pub async fn accept(listener: &TcpListener, what: &'static str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("tls.{key}: {path}: {reason}")]
    File {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match the certificate, ...).
    #[error("tls: {0}")]
    Rustls(String),
}

/// The TLS side of a listener.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// A connection after its handshake.
pub struct Accepted {
    /// The encrypted stream.
    pub stream: TlsStream<TcpStream>,
    /// The common name of the client's certificate, when it presented one the CA signed.
    pub client_name: Option<String>,
}

impl Tls {
    /// Loads `[tls]`; `None` when it names no certificate (no TLS listener opens).
    pub fn load(config: &TlsConfig) -> Result<Option<Self>, TlsError> {
        let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
            return Ok(None);
        };
        let chain = certificates("cert", cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error("key", key, e))?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match &config.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in certificates("client_ca", path)? {
                    roots
                        .add(ca)
                        .map_err(|e| file_error("client_ca", path, e))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::new(rustls::crypto::ring::default_provider()),
                );
                let verifier = if config.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| TlsError::Rustls(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let server = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        Ok(Some(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
        }))
    }

    /// The same settings, offering these ALPN protocols.
    pub fn with_alpn(&self, protocols: &[&[u8]]) -> Self {
        let mut server = (**self.acceptor.config()).clone();
        server.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
        }
    }

    /// Runs the handshake, giving up after `deadline`.
    pub async fn accept(&self, stream: TcpStream, deadline: Duration) -> io::Result<Accepted> {
        let stream = tokio::time::timeout(deadline, self.acceptor.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let client_name = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| common_name(cert.as_ref()));
        Ok(Accepted {
            stream,
            client_name,
        })
    }
}

/// The subject common name of a DER certificate; also the principal of a `coaps://` client.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, e))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn file_error(key: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        key,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}
