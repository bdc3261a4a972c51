//! AES for Mbed TLS on the CPU's AES instructions, through the crate's AES hook: the crate builds
//! Mbed TLS without `MBEDTLS_AESNI_C`, so without this every record runs table-based AES.

use std::arch::x86_64::{
    __m128i, _mm_aesdec_si128, _mm_aesdeclast_si128, _mm_aesenc_si128, _mm_aesenclast_si128,
    _mm_aesimc_si128, _mm_aeskeygenassist_si128, _mm_loadu_si128, _mm_shuffle_epi32,
    _mm_slli_si128, _mm_storeu_si128, _mm_xor_si128,
};

use m::MbedtlsError;
use m::hook::WorkArea;
use m::hook::aes::{AesBlock, MbedtlsAes, SoftAesState};
use mbedtls_rs_sys as m;

/// Installs the hook when the CPU has AES-NI; otherwise Mbed TLS keeps its own AES. Called once,
/// before any AES context exists.
pub(super) fn install() {
    static AESNI: AesNi = AesNi;
    if std::arch::is_x86_feature_detected!("aes") {
        // SAFETY: called once from `init`, before the first configuration, so before any
        // AES context is initialised under the other implementation; `AESNI` is a static.
        unsafe { m::hook::aes::hook_aes(Some(&AESNI)) };
    }
}

// The state must fit the work area Mbed TLS reserves in each AES context, with room to align it.
const _: () = assert!(
    std::mem::size_of::<Option<State>>() + 16 <= m::MBEDTLS_AES_ALT_WORK_AREA_SIZE as usize
);

/// Round keys for one direction, as the AES instructions take them.
#[derive(Clone, Copy)]
struct Keys {
    rounds: [__m128i; 15],
    /// 10, 12 or 14.
    nr: usize,
    decrypt: bool,
}

/// What a context's work area holds: plain data, which Mbed TLS copies with `memcpy`.
#[allow(clippy::large_enum_variant)] // emplaced in a fixed-size area, never moved by value
enum State {
    Ni(Keys),
    /// 192-bit keys, which no suite the gateway offers uses.
    Soft(SoftAesState),
}

fn bad_input() -> MbedtlsError {
    MbedtlsError::new(m::MBEDTLS_ERR_AES_BAD_INPUT_DATA)
}

/// The hook: every entry point runs only once `install` has seen AES-NI.
struct AesNi;

impl AesNi {
    fn set_key(memory: &mut [u8], key: &[u8], decrypt: bool) -> Result<(), MbedtlsError> {
        let state = match key.len() {
            // SAFETY: the hook is installed only on a CPU with AES-NI.
            16 | 32 => State::Ni(unsafe { expand(key, decrypt) }),
            24 if decrypt => State::Soft(SoftAesState::new_dec(key)?),
            24 => State::Soft(SoftAesState::new_enc(key)?),
            _ => return Err(MbedtlsError::new(m::MBEDTLS_ERR_AES_INVALID_KEY_LENGTH)),
        };
        // SAFETY: `init` emplaced an `Option<State>`; State has alignment 16, which the work
        // area allows.
        *unsafe { memory.cast_mut::<Option<State>>() } = Some(state);
        Ok(())
    }

    fn crypt(memory: &mut [u8], block: &mut AesBlock, decrypt: bool) -> Result<(), MbedtlsError> {
        // SAFETY: as in `set_key`.
        match unsafe { memory.cast_mut::<Option<State>>() } {
            Some(State::Ni(keys)) if keys.decrypt == decrypt => {
                // SAFETY: the hook is installed only on a CPU with AES-NI.
                unsafe { crypt_block(keys, block) };
                Ok(())
            }
            Some(State::Soft(soft)) if decrypt => soft.decrypt(block),
            Some(State::Soft(soft)) => soft.encrypt(block),
            // Not keyed, or keyed for the other direction, as Mbed TLS's own AES refuses.
            _ => Err(bad_input()),
        }
    }
}

impl MbedtlsAes for AesNi {
    fn init(&self, memory: &mut [u8]) {
        // SAFETY: the work area holds nothing initialised yet (Mbed TLS calls init first).
        unsafe { memory.cast_mut_maybe::<Option<State>>() }.write(None);
    }

    fn free(&self, memory: &mut [u8]) {
        // The state is plain data: nothing to drop, only the keys to wipe.
        memory.fill(0);
    }

    fn set_enc_key(&self, memory: &mut [u8], key: &[u8]) -> Result<(), MbedtlsError> {
        Self::set_key(memory, key, false)
    }

    fn set_dec_key(&self, memory: &mut [u8], key: &[u8]) -> Result<(), MbedtlsError> {
        Self::set_key(memory, key, true)
    }

    fn encrypt(&self, memory: &mut [u8], block: &mut AesBlock) -> Result<(), MbedtlsError> {
        Self::crypt(memory, block, false)
    }

    fn decrypt(&self, memory: &mut [u8], block: &mut AesBlock) -> Result<(), MbedtlsError> {
        Self::crypt(memory, block, true)
    }
}

/// One step of the key schedule: `previous` words folded, xored with the broadcast `assist`.
#[target_feature(enable = "aes,sse2")]
fn fold(previous: __m128i, assist: __m128i) -> __m128i {
    let mut k = previous;
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    _mm_xor_si128(k, assist)
}

/// The round keys of a 128- or 256-bit key (FIPS 197 5.2), turned for the equivalent inverse
/// cipher (5.3.5) when `decrypt`.
///
/// # Safety
/// The CPU has AES-NI.
#[target_feature(enable = "aes,sse2")]
unsafe fn expand(key: &[u8], decrypt: bool) -> Keys {
    // SAFETY: an all-zero __m128i is a valid value.
    let mut rk: [__m128i; 15] = unsafe { std::mem::zeroed() };
    // SAFETY: `key` is 16 or 32 bytes long (checked by the caller): every load reads 16 bytes
    // inside it.
    let load = |at: usize| unsafe { _mm_loadu_si128(key[at..at + 16].as_ptr().cast()) };
    let nr = if key.len() == 16 {
        rk[0] = load(0);
        macro_rules! round128 {
            ($i:expr, $rcon:expr) => {
                let assist =
                    _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1]));
                rk[$i] = fold(rk[$i - 1], assist);
            };
        }
        round128!(1, 0x01);
        round128!(2, 0x02);
        round128!(3, 0x04);
        round128!(4, 0x08);
        round128!(5, 0x10);
        round128!(6, 0x20);
        round128!(7, 0x40);
        round128!(8, 0x80);
        round128!(9, 0x1b);
        round128!(10, 0x36);
        10
    } else {
        rk[0] = load(0);
        rk[1] = load(16);
        // Each step makes two round keys; the last makes one.
        macro_rules! round256 {
            (@first $i:expr, $rcon:expr) => {
                let assist =
                    _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1]));
                rk[$i] = fold(rk[$i - 2], assist);
            };
            ($i:expr, $rcon:expr) => {
                round256!(@first $i, $rcon);
                let assist = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(rk[$i]));
                rk[$i + 1] = fold(rk[$i - 1], assist);
            };
        }
        round256!(2, 0x01);
        round256!(4, 0x02);
        round256!(6, 0x04);
        round256!(8, 0x08);
        round256!(10, 0x10);
        round256!(12, 0x20);
        round256!(@first 14, 0x40);
        14
    };
    if decrypt {
        rk[..=nr].reverse();
        for k in &mut rk[1..nr] {
            *k = _mm_aesimc_si128(*k);
        }
    }
    Keys {
        rounds: rk,
        nr,
        decrypt,
    }
}

/// Encrypts or decrypts (as the keys were made) one block in place.
///
/// # Safety
/// The CPU has AES-NI.
#[target_feature(enable = "aes,sse2")]
unsafe fn crypt_block(keys: &Keys, block: &mut AesBlock) {
    let rk = &keys.rounds;
    // SAFETY: a block is 16 bytes, read and written unaligned.
    let mut s = unsafe { _mm_loadu_si128(block.as_ptr().cast()) };
    s = _mm_xor_si128(s, rk[0]);
    for k in &rk[1..keys.nr] {
        s = if keys.decrypt {
            _mm_aesdec_si128(s, *k)
        } else {
            _mm_aesenc_si128(s, *k)
        };
    }
    s = if keys.decrypt {
        _mm_aesdeclast_si128(s, rk[keys.nr])
    } else {
        _mm_aesenclast_si128(s, rk[keys.nr])
    };
    // SAFETY: as above.
    unsafe { _mm_storeu_si128(block.as_mut_ptr().cast(), s) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn run(key: &[u8], block: &AesBlock, decrypt: bool) -> AesBlock {
        let aes = AesNi;
        let mut area = [0u128; 32];
        // SAFETY: a u128 array is plain bytes, 16-aligned like the C work area.
        let memory = unsafe { std::slice::from_raw_parts_mut(area.as_mut_ptr().cast(), 512) };
        aes.init(memory);
        let mut out = *block;
        if decrypt {
            aes.set_dec_key(memory, key).expect("key");
            aes.decrypt(memory, &mut out).expect("decrypt");
        } else {
            aes.set_enc_key(memory, key).expect("key");
            aes.encrypt(memory, &mut out).expect("encrypt");
        }
        aes.free(memory);
        out
    }

    #[test]
    fn matches_fips_197_and_mbed_tls_own_aes() {
        if !std::arch::is_x86_feature_detected!("aes") {
            return;
        }
        let plain: AesBlock = hex("00112233445566778899aabbccddeeff")
            .try_into()
            .expect("16");
        // FIPS 197 appendix C.1 and C.3.
        for (key, cipher) in [
            (
                "000102030405060708090a0b0c0d0e0f",
                "69c4e0d86a7b0430d8cdb78070b4c55a",
            ),
            (
                "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
                "8ea2b7ca516745bfeafc49904b496089",
            ),
        ] {
            let (key, cipher) = (hex(key), hex(cipher));
            assert_eq!(run(&key, &plain, false).to_vec(), cipher);
            let cipher: AesBlock = cipher.try_into().expect("16");
            assert_eq!(run(&key, &cipher, true), plain);
        }
        // Random keys and blocks against Mbed TLS's software AES.
        for _ in 0..200 {
            let key_len = if rand::random::<bool>() { 16 } else { 32 };
            let key: Vec<u8> = (0..key_len).map(|_| rand::random()).collect();
            let block: AesBlock = rand::random();
            let mut soft = SoftAesState::new_enc(&key).expect("key");
            let mut want = block;
            soft.encrypt(&mut want).expect("encrypt");
            assert_eq!(run(&key, &block, false), want);
            assert_eq!(run(&key, &want, true), block);
        }
    }
}
