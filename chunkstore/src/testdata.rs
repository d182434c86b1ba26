//! Deterministic test data, shared by this crate's unit tests and the end-to-end tests.

/// Deterministic pseudo-random bytes (xorshift): incompressible test data.
#[doc(hidden)]
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
