//! Hash maps for the operators that keep their state in hash maps instead of arrangements.
//!
//! Their keys are small integers and tuples of them, hashed millions of times a second, and never
//! chosen by an attacker in a way that matters (a skewed table costs time, not correctness; ids
//! come from our own ad servers' logs). SipHash, the standard library's default, spends most of a
//! lookup hashing them; this is the multiply-rotate hash rustc uses for its own tables.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Folds each word in with a multiply (as `rustc-hash` does); the final rotation brings the
/// multiply's well-mixed high bits down to where a table takes its bucket index from.
#[derive(Clone, Copy, Default)]
pub struct FastHasher(u64);

const SEED: u64 = 0xf135_7aea_2e62_a9c5;

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.write_u64(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.write_u64(u64::from_le_bytes(last) ^ (rest.len() as u64) << 59);
    }
    fn write_u8(&mut self, word: u8) {
        self.write_u64(u64::from(word));
    }
    fn write_u16(&mut self, word: u16) {
        self.write_u64(u64::from(word));
    }
    fn write_u32(&mut self, word: u32) {
        self.write_u64(u64::from(word));
    }
    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(SEED).rotate_left(20);
    }
    fn write_u128(&mut self, word: u128) {
        self.write_u64(word as u64);
        self.write_u64((word >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::FastMap;

    /// Dense ids (ads numbered 0..n, minutes in a row) must spread over a table's buckets: the
    /// low bits, which pick the bucket, and the high seven, which the table compares first.
    #[test]
    fn dense_keys_spread_over_buckets() {
        let map: FastMap<(u32, u64), ()> = FastMap::default();
        let hasher = map.hasher();
        let mut low = vec![0u32; 1024];
        let mut high = vec![0u32; 128];
        for minute in 0..16u32 {
            for ad in 0..4096u64 {
                let hash = hasher.hash_one((minute, ad));
                low[(hash & 1023) as usize] += 1;
                high[(hash >> 57) as usize] += 1;
            }
        }
        // 65536 keys: 64 per low bucket and 512 per high tag on average.
        assert!(low.iter().all(|&n| (16..=160).contains(&n)), "{low:?}");
        assert!(high.iter().all(|&n| (256..=900).contains(&n)), "{high:?}");
    }
}
