//! Stateless cookies (RFC 6347 4.2.1): an HMAC of the client's address and random under a
//! secret that changes every few minutes, so checking one needs nothing remembered per client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::hmac;
use subtle::ConstantTimeEq;

/// Bytes of a cookie.
pub(super) const COOKIE_LEN: usize = 16;
/// How long a cookie's secret lasts; a cookie is good for one to two of these.
const PERIOD: Duration = Duration::from_secs(120);

/// Makes and checks cookies.
pub(super) struct Cookies {
    key: hmac::Key,
    start: Instant,
}

impl std::fmt::Debug for Cookies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cookies")
    }
}

impl Cookies {
    /// Cookies under a fresh random secret.
    pub(super) fn new(now: Instant) -> Self {
        let secret: [u8; 32] = rand::random();
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            start: now,
        }
    }

    fn period(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs() / PERIOD.as_secs()
    }

    fn compute(&self, period: u64, peer: SocketAddr, random: &[u8]) -> [u8; COOKIE_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&period.to_be_bytes());
        match peer.ip() {
            std::net::IpAddr::V4(ip) => ctx.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => ctx.update(&ip.octets()),
        }
        ctx.update(&peer.port().to_be_bytes());
        ctx.update(random);
        let tag = ctx.sign();
        let mut cookie = [0; COOKIE_LEN];
        cookie.copy_from_slice(&tag.as_ref()[..COOKIE_LEN]);
        cookie
    }

    /// The cookie for a ClientHello with `random` from `peer`.
    pub(super) fn make(&self, now: Instant, peer: SocketAddr, random: &[u8]) -> [u8; COOKIE_LEN] {
        self.compute(self.period(now), peer, random)
    }

    /// Whether `cookie` is one this gateway made for `peer` and `random`, in this period or
    /// the one before.
    pub(super) fn check(
        &self,
        now: Instant,
        peer: SocketAddr,
        random: &[u8],
        cookie: &[u8],
    ) -> bool {
        let period = self.period(now);
        let ok = |p: u64| bool::from(self.compute(p, peer, random).ct_eq(cookie));
        ok(period) || (period > 0 && ok(period - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_good_for_its_peer_and_random_for_a_while() {
        let t0 = Instant::now();
        let cookies = Cookies::new(t0);
        let peer: SocketAddr = "192.0.2.1:5000".parse().expect("an address");
        let cookie = cookies.make(t0, peer, &[1; 32]);
        assert!(cookies.check(t0, peer, &[1; 32], &cookie));
        assert!(cookies.check(t0 + PERIOD, peer, &[1; 32], &cookie));
        assert!(!cookies.check(t0 + PERIOD * 2, peer, &[1; 32], &cookie));
        let other: SocketAddr = "192.0.2.1:5001".parse().expect("an address");
        assert!(!cookies.check(t0, other, &[1; 32], &cookie));
        assert!(!cookies.check(t0, peer, &[2; 32], &cookie));
        assert!(!cookies.check(t0, peer, &[1; 32], &cookie[..8]));
        assert!(!Cookies::new(t0).check(t0, peer, &[1; 32], &cookie));
    }
}
