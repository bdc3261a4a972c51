//! rumqttd leaves Nagle's algorithm on for the connections it accepts. Every small packet it
//! writes while an earlier one is unacknowledged then waits for the client's delayed ACK, up to
//! 40 ms on Linux: a QoS 1 PUBACK, or a delivery to a subscriber that only listens. rumqttd
//! binds its listening socket itself and offers no hook on accepted sockets, but Linux copies
//! `TCP_NODELAY` from a listening socket into every connection it accepts. So once rumqttd has
//! bound, the gateway finds that socket among its own descriptors and sets the option there.
//!
//! A descriptor number is reached safely through a pidfd of this process (`pidfd_getfd`, Linux
//! 5.6 or later), which yields a duplicate that refers to the same socket. Where that is refused
//! (an older kernel, or a seccomp profile that allows it only with `CAP_SYS_PTRACE`), clients
//! are served as before, with the delays, and a warning says why.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use rustix::net::sockopt;
use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

/// Sets `TCP_NODELAY` on this process's socket listening on `addr`, so that every connection
/// it accepts from now on has it. Fails when there is no such socket or it cannot be reached.
pub(crate) fn set_on_listener(addr: SocketAddr) -> io::Result<()> {
    let listener = find_socket(|socket| {
        sockopt::socket_acceptconn(socket).unwrap_or(false) && local_addr(socket) == Some(addr)
    })?
    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no socket listens there"))?;
    sockopt::set_tcp_nodelay(&listener, true)?;
    Ok(())
}

/// The first of this process's sockets that `wanted` accepts, as a duplicate descriptor.
fn find_socket(wanted: impl Fn(&OwnedFd) -> bool) -> io::Result<Option<OwnedFd>> {
    let me = pidfd_open(getpid(), PidfdFlags::empty())?;
    let mut reached = false;
    let mut refused = None;
    for entry in fs::read_dir("/proc/self/fd")?.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let is_socket = fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str().as_bytes().starts_with(b"socket:"));
        if !is_socket {
            continue;
        }
        match pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) {
            Ok(socket) if wanted(&socket) => return Ok(Some(socket)),
            Ok(_) => reached = true,
            // Closed since the directory was read.
            Err(rustix::io::Errno::BADF) => {}
            Err(e) => refused = Some(e),
        }
    }
    match refused {
        Some(e) if !reached => Err(e.into()),
        _ => Ok(None),
    }
}

fn local_addr(socket: &OwnedFd) -> Option<SocketAddr> {
    rustix::net::getsockname(socket)
        .ok()
        .and_then(|addr| SocketAddr::try_from(addr).ok())
}

/// Whether the connection this process accepted from `peer` has `TCP_NODELAY`.
#[cfg(test)]
pub(crate) fn accepted_has_nodelay(peer: SocketAddr) -> bool {
    let accepted = find_socket(|socket| {
        rustix::net::getpeername(socket)
            .ok()
            .flatten()
            .and_then(|addr| SocketAddr::try_from(addr).ok())
            == Some(peer)
    })
    .expect("the process's sockets can be read")
    .expect("a connection from that peer");
    sockopt::tcp_nodelay(&accepted).expect("TCP_NODELAY can be read")
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    #[test]
    fn connections_accepted_after_it_is_set_have_nodelay() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();

        let before = TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(!accepted.nodelay().unwrap(), "Linux's default is Nagle on");

        set_on_listener(addr).unwrap();
        let after = TcpStream::connect(addr).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, after.local_addr().unwrap());
        assert!(accepted.nodelay().unwrap());
        assert!(accepted_has_nodelay(peer), "found by its peer, as tests do");
        drop(before);
    }

    #[test]
    fn an_address_nobody_listens_on_is_reported() {
        let unused = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let err = set_on_listener(unused).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
