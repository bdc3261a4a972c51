//! Listeners on one or several addresses (the loopback default is two), and the startup lines
//! that say where the gateway listens and how to open it up.

use std::future::Future;
use std::net::SocketAddr;

use super::GatewayError;
use crate::config::{Config, DefaultBind};
use crate::policy::Policy;

/// Binds `protocol` on each of `addrs` with `bind`. After the first, a port 0 becomes the
/// port the first got, and an IPv6 address the host cannot bind (no IPv6) is skipped: only the
/// default loopback pair has more than one address.
pub(super) async fn bind_all<T, F, Fut>(
    protocol: &'static str,
    addrs: Vec<SocketAddr>,
    bind: F,
    bound_addr: impl Fn(&T) -> Option<SocketAddr>,
) -> Result<Vec<T>, GatewayError>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    let mut bound: Vec<T> = Vec::with_capacity(addrs.len());
    for mut addr in addrs {
        let first_port = bound.first().and_then(&bound_addr).map(|a| a.port());
        if let (0, Some(port)) = (addr.port(), first_port) {
            addr.set_port(port);
        }
        match bind(addr).await {
            Ok(listener) => bound.push(listener),
            Err(e)
                if first_port.is_some()
                    && addr.is_ipv6()
                    && e.kind() != std::io::ErrorKind::AddrInUse =>
            {
                tracing::debug!(protocol, %addr, error = %e, "no IPv6 loopback; IPv4 only");
            }
            Err(source) => {
                return Err(GatewayError::Bind {
                    protocol,
                    addr,
                    source,
                });
            }
        }
    }
    Ok(bound)
}

/// The line that tells a person what to open, and, on the loopback default, how to open up.
pub(super) fn announce(config: &Config, http_addrs: &[SocketAddr]) {
    let base = http_addrs
        .first()
        .map(|&addr| format!("http://{}", crate::probe::reachable(addr)))
        .unwrap_or_default();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        explorer = %format!("{base}/"),
        docs = %format!("{base}/docs"),
        "topicgate {} ready: open {base}/ to explore the topics, {base}/docs for the API",
        env!("CARGO_PKG_VERSION"),
    );
    let defaulted = config.http.addr.is_none()
        || config.coap.addr.is_none()
        || (config.mqtt.given_addr.is_none() && config.broker.url.is_empty());
    if defaulted && config.default_bind() == DefaultBind::Loopback {
        tracing::info!(
            "only this machine can connect: with no [auth] and no address given, the listeners \
             bind loopback; to open them up, configure [auth] (docs/security.md) or give \
             addresses, e.g. --http-addr 0.0.0.0:8080 --mqtt-addr 0.0.0.0:1883 \
             --coap-addr 0.0.0.0:5683 (env TOPICGATE_HTTP_ADDR etc., or `addr` in [http], \
             [mqtt], [coap])"
        );
    }
}

/// Mosquitto 2's default posture: with no identities and no ACL anyone may do anything, which
/// is worth a warning on every listener other machines can reach.
pub(super) fn warn_if_open(policy: &Policy, protocol: &'static str, addr: SocketAddr) {
    if policy.is_unprotected() && !addr.ip().is_loopback() {
        tracing::warn!(
            protocol,
            %addr,
            "anonymous clients may publish and read every topic on this listener: \
             configure [auth] users or tokens and an ACL (docs/security.md)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_loopback_pair_shares_one_port_and_ipv6_is_optional() {
        let addrs = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
        let bound = bind_all("HTTP", addrs, tokio::net::TcpListener::bind, |l| {
            l.local_addr().ok()
        })
        .await
        .expect("IPv4 loopback binds");
        let addrs: Vec<SocketAddr> = bound.iter().map(|l| l.local_addr().unwrap()).collect();
        assert!(addrs[0].ip().is_loopback() && addrs[0].port() != 0);
        // Where the host has IPv6, [::1] gets the port 127.0.0.1 got; else it is left out.
        assert!(addrs.len() <= 2);
        if let Some(v6) = addrs.get(1) {
            assert!(v6.is_ipv6());
            assert_eq!(v6.port(), addrs[0].port());
        }
    }
}
