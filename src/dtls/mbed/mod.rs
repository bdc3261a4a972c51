//! Mbed TLS through its C API, the crate's only `unsafe`: a [`Config`] every session shares
//! (`config.rs`), an [`Ssl`], one session whose "socket" is a queue of datagrams in and out
//! (`ssl.rs`), and AES on the CPU's instructions for it (`aesni.rs`).
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(target_arch = "x86_64")]
mod aesni;
mod config;
mod ssl;

use std::ffi::{c_int, c_uchar, c_void};
use std::sync::Once;

use mbedtls_rs_sys as m;

pub(super) use config::{CertError, Config};
pub(super) use ssl::{Handshake, Read, Ssl};

/// `PSA_ERROR_INSUFFICIENT_ENTROPY` (psa/crypto_values.h), not in the generated bindings.
const PSA_ERROR_INSUFFICIENT_ENTROPY: m::psa_status_t = -148;

/// An error code from Mbed TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Mbed TLS error -0x{:04x}", self.0.unsigned_abs())]
pub struct LibraryError(pub(super) c_int);

fn check(ret: c_int) -> Result<(), LibraryError> {
    if ret == 0 {
        Ok(())
    } else {
        Err(LibraryError(ret))
    }
}

/// Which side of the handshake a [`Config`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Server,
    Client,
}

/// Fills `buf` from the operating system's generator; the library's only randomness.
fn fill_random(buf: &mut [u8]) -> bool {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf).is_ok()
}

/// The library's `f_rng`.
unsafe extern "C" fn random(_: *mut c_void, out: *mut c_uchar, len: usize) -> c_int {
    if len == 0 {
        return 0;
    }
    // SAFETY: the library passes a writable buffer of `len` bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(out, len) };
    if fill_random(buf) {
        0
    } else {
        m::MBEDTLS_ERR_ENTROPY_SOURCE_FAILED
    }
}

/// PSA's random source: the build defines `MBEDTLS_PSA_CRYPTO_EXTERNAL_RNG`, so the library
/// asks the application for it by this name.
///
/// # Safety
/// Called by the library with `output` writable for `size` bytes and `length` writable.
#[unsafe(no_mangle)]
unsafe extern "C" fn mbedtls_psa_external_get_random(
    _: *mut m::mbedtls_psa_external_random_context_t,
    output: *mut u8,
    size: usize,
    length: *mut usize,
) -> m::psa_status_t {
    if size > 0 {
        // SAFETY: the library passes a writable buffer of `size` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(output, size) };
        if !fill_random(buf) {
            return PSA_ERROR_INSUFFICIENT_ENTROPY;
        }
    }
    // SAFETY: the library passes a writable `size_t`.
    unsafe { *length = size };
    0
}

/// Once per process: AES on the CPU's instructions, the wall clock X.509 validity needs, and
/// PSA's state.
fn init() {
    static ONCE: Once = Once::new();
    static CLOCK: m::hook::backend::std::wall_clock::StdWallClock =
        m::hook::backend::std::wall_clock::StdWallClock;
    static TIMER: m::hook::backend::std::timer::StdTimer = m::hook::backend::std::timer::StdTimer;
    ONCE.call_once(|| {
        #[cfg(target_arch = "x86_64")]
        aesni::install();
        // SAFETY: the hooks are set before any library call that reads the time (this runs
        // before the first configuration exists) and point at statics.
        unsafe {
            m::hook::wall_clock::hook_wall_clock(Some(&CLOCK));
            m::hook::timer::hook_timer(Some(&TIMER));
            // Fails only without randomness, which every handshake then reports.
            let _ = m::psa_crypto_init();
        }
    });
}

/// PSK suites first, RFC 7252's mandatory TLS_PSK_WITH_AES_128_CCM_8 at their head; then the
/// certificate suites, RFC 7252's TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 first, and RSA keys'.
pub(super) const SERVER_SUITES: [c_int; 9] = [
    m::MBEDTLS_TLS_PSK_WITH_AES_128_CCM_8 as c_int,
    m::MBEDTLS_TLS_PSK_WITH_AES_128_CCM as c_int,
    m::MBEDTLS_TLS_PSK_WITH_AES_128_GCM_SHA256 as c_int,
    m::MBEDTLS_TLS_PSK_WITH_AES_256_GCM_SHA384 as c_int,
    m::MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 as c_int,
    m::MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 as c_int,
    m::MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 as c_int,
    m::MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 as c_int,
    m::MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 as c_int,
];

/// What a PSK client offers: RFC 7252's suite.
pub(super) const CLIENT_SUITES: [c_int; 1] = [m::MBEDTLS_TLS_PSK_WITH_AES_128_CCM_8 as c_int];
