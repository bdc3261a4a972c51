//! A DTLS 1.2 PSK client on the same library, sans I/O: a peer for tests and load tools that,
//! unlike OpenSSL's client, can send a Connection ID and so keep its session from a new port.

use std::sync::Arc;

use super::DtlsError;
use super::mbed::{CLIENT_SUITES, Config, Handshake, Read, Role, Ssl};

/// Largest plaintext read from one record.
const READ_BUFFER: usize = 16 * 1024;

/// One client session: datagrams from the server in, datagrams to it and plaintext out.
pub struct Client {
    ssl: Ssl,
    open: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of `identity` with `key` offering TLS_PSK_WITH_AES_128_CCM_8; with
    /// `connection_id` it asks the server for a Connection ID to put in its records (RFC 9146)
    /// and wants none in the server's.
    pub fn psk(identity: &str, key: &[u8], connection_id: bool) -> Result<Self, DtlsError> {
        let mut config = Config::new(Role::Client, &CLIENT_SUITES)?;
        config.client_psk(identity.as_bytes(), key)?;
        if connection_id {
            config.connection_ids(0)?;
        }
        let own_cid = connection_id.then_some(&[][..]);
        let ssl = Ssl::new(&Arc::new(config), &[], own_cid)?;
        Ok(Self { ssl, open: false })
    }

    /// Takes a datagram from the server; false when too many are waiting.
    pub fn receive(&mut self, datagram: &[u8]) -> bool {
        self.ssl.push(datagram)
    }

    /// Steps the handshake with what was received; true once it is done.
    pub fn handshake(&mut self) -> Result<bool, DtlsError> {
        if !self.open {
            match self.ssl.handshake() {
                Handshake::Done => self.open = true,
                Handshake::Waiting => {}
                Handshake::Failed(e) => return Err(e.into()),
            }
        }
        Ok(self.open)
    }

    /// The plaintext of every record received since the last call.
    pub fn read(&mut self) -> Result<Vec<Vec<u8>>, DtlsError> {
        if !self.open {
            return Err(DtlsError::NotOpen);
        }
        let mut buf = vec![0; READ_BUFFER];
        let mut records = Vec::new();
        loop {
            match self.ssl.read(&mut buf) {
                Read::Data(n) => records.push(buf[..n].to_vec()),
                Read::Nothing => return Ok(records),
                Read::Closed => {
                    self.open = false;
                    return Err(DtlsError::NotOpen);
                }
            }
        }
    }

    /// Seals `plaintext` into a record.
    pub fn send(&mut self, plaintext: &[u8]) -> Result<(), DtlsError> {
        if !self.open {
            return Err(DtlsError::NotOpen);
        }
        self.ssl
            .write(plaintext)
            .map_err(|e| DtlsError::Write(e.to_string()))
    }

    /// The datagrams to send to the server, in order.
    pub fn transmit(&mut self) -> Vec<Vec<u8>> {
        self.ssl.take_outgoing()
    }

    /// Whether the server agreed to Connection IDs.
    pub fn has_connection_id(&self) -> bool {
        self.ssl.peer_cid().is_some_and(|cid| !cid.is_empty())
    }
}
