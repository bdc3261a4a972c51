//! The endpoint on a UDP socket: one task receives datagrams, sleeps until the endpoint's next
//! deadline, waits for live messages and finished jobs, feeds each to the [`Endpoint`] and
//! sends what it answers. A UDP peer is its address.

use std::time::Instant;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::endpoint::{Endpoint, Peer, Source};
use super::shell::{Jobs, follow, next_live, tick_time};
use crate::bridge::Bridge;
use crate::config::CoapConfig;
use crate::deadline::Deadline;

/// Serves on `socket` until `cancel`, then lets running jobs finish and tells every observer
/// the endpoint is going away.
pub(crate) async fn run(
    socket: UdpSocket,
    config: &CoapConfig,
    bridge: Bridge,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let mut endpoint = Endpoint::new(config, bridge);
    let mut jobs = Jobs::new(endpoint.bridge().clone(), tracker);
    let mut deadline = Deadline::default();
    // The largest UDP payload; a longer datagram cannot arrive.
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, addr)) => endpoint.receive(&Source::udp(addr), &buf[..len], Instant::now()),
                // An ICMP error from an earlier send surfaces here; the socket is fine.
                Err(e) => tracing::debug!(error = %e, "CoAP receive error"),
            },
            received = next_live(endpoint.live()) => endpoint.on_live(received, Instant::now()),
            at = deadline.passed() => endpoint.tick(tick_time(at)),
            Some((id, reply)) = jobs.next() => endpoint.completed(id, reply, Instant::now()),
        }
        flush(&socket, &mut endpoint, &jobs, &mut deadline).await;
    }
    // Jobs still waiting for the broker finish and are answered; the socket is no longer read.
    tracing::debug!(
        jobs = endpoint.jobs_running(),
        "CoAP endpoint finishing its jobs"
    );
    jobs.close();
    loop {
        tokio::select! {
            done = jobs.next() => match done {
                Some((id, reply)) => endpoint.completed(id, reply, Instant::now()),
                None => break,
            },
            at = deadline.passed() => endpoint.tick(tick_time(at)),
        }
        flush(&socket, &mut endpoint, &jobs, &mut deadline).await;
    }
    endpoint.close();
    flush(&socket, &mut endpoint, &jobs, &mut deadline).await;
}

/// Sends what the endpoint has to send, starts its jobs and follows its deadline.
async fn flush(socket: &UdpSocket, endpoint: &mut Endpoint, jobs: &Jobs, deadline: &mut Deadline) {
    while let Some(transmit) = endpoint.poll_transmit() {
        let Peer::Udp(addr) = transmit.peer else {
            continue;
        };
        if let Err(e) = socket.send_to(&transmit.bytes, addr).await {
            tracing::debug!(error = %e, %addr, "CoAP send failed");
        }
    }
    jobs.start(endpoint);
    follow(deadline, endpoint);
}
