//! BLAKE3 content hashes: the name of every chunk, tree and pack.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

/// The largest chunk a zero chunk can be: FastCDC's largest maximum (16 MiB).
const MAX_ZERO_CHUNK: u32 = 16 << 20;

impl Hash {
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Hash(out))
    }

    /// The hash of `len` zero bytes (memoized: a sparse file's holes are long runs of the
    /// same zero chunk, which readers need not fetch: its hash says what it holds).
    pub fn of_zeros(len: u32) -> Hash {
        static KNOWN: std::sync::Mutex<Vec<(u32, Hash)>> = std::sync::Mutex::new(Vec::new());
        let known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, h)) = known.iter().find(|(l, _)| *l == len) {
            return *h;
        }
        drop(known);
        let h = Hash::of(&vec![0u8; len as usize]);
        let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
        // A handful of lengths in practice (the zero chunk of each chunking setting; `is_zeros`
        // keeps its powers of two apart).
        if known.len() >= 32 {
            known.remove(0);
        }
        known.push((len, h));
        h
    }

    /// Whether this is the hash of a chunk of `len` zero bytes. Only lengths that are powers
    /// of two are recognised (a hole's chunks are the chunker's maximum, 256 KiB by default):
    /// a check costs a lookup, never hashing a new length on the read path.
    pub fn is_zeros(&self, len: u32) -> bool {
        // A length from the store is not trusted: past the largest chunk, never zeros.
        if !len.is_power_of_two() || len > MAX_ZERO_CHUNK {
            return false;
        }
        // One slot per power of two, filled once: no lock on the read path.
        const SLOTS: usize = MAX_ZERO_CHUNK.trailing_zeros() as usize + 1;
        static POW2: [std::sync::OnceLock<Hash>; SLOTS] =
            [const { std::sync::OnceLock::new() }; SLOTS];
        *self == *POW2[len.trailing_zeros() as usize].get_or_init(|| Hash::of_zeros(len))
    }

    /// Short form for messages.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.short())
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = Hash::of(b"owfs");
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_ne!(Hash::of(b"a"), Hash::of(b"b"));
    }
}
