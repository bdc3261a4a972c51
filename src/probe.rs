//! `topicgate healthcheck`: one GET of `/healthz` over a plain socket, so that a container image
//! without curl can check the gateway it runs.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Why the gateway is not healthy, as far as the probe can tell.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No connection, or it broke or timed out.
    #[error("cannot reach http://{addr}/healthz: {source}")]
    Io {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gateway answered, but not 200.
    #[error("http://{addr}/healthz answered {status:?}")]
    Status {
        /// The address tried.
        addr: SocketAddr,
        /// The status line received.
        status: String,
    },
}

/// The address a client on this machine uses to reach a listener bound to `addr`: the
/// loopback address of the same family when it is bound to every interface.
pub fn reachable(mut addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
        IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
        _ => {}
    }
    addr
}

/// GETs `/healthz` from the HTTP listener bound to `addr`; `Ok` on a 200 within `timeout`.
pub fn healthz(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    let addr = reachable(addr);
    let io = |source| ProbeError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    // The status line is all that matters, and it fits in the first segment.
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() && !head[..n].contains(&b'\n') {
        match stream.read(&mut head[n..]).map_err(io)? {
            0 => break,
            read => n += read,
        }
    }
    let text = String::from_utf8_lossy(&head[..n]);
    let status = text.lines().next().unwrap_or_default().to_owned();
    if status.starts_with("HTTP/1.1 200 ") || status.starts_with("HTTP/1.0 200 ") {
        Ok(())
    } else {
        Err(ProbeError::Status { addr, status })
    }
}
