//! Deterministic pseudo-random bytes for tests and benchmarks: incompressible like the data of
//! real images, and the same on every run, so a failure reproduces and every benchmark run
//! measures the same content. One generator for the workspace (tests of every crate, the
//! benchmarks' gigabyte files), not one per test module.

/// xorshift64* (Vigna): fast enough for the benchmarks' gigabyte files; zstd finds nothing to
/// compress in its output, and content-defined cuts fall in it as in real data.
#[derive(Debug, Clone)]
pub struct Random(u64);

impl Random {
    /// The seed is spread over the state (and the state is never 0), so that small seeds such as
    /// 0, 1, 2 give unrelated streams.
    pub fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A generator started from `state` as it is, for data recorded before [`Random::new`]
    /// spread its seed (the chunker's recorded boundaries are of such a stream). Not 0, where
    /// xorshift stays.
    pub fn from_state(state: u64) -> Random {
        assert_ne!(state, 0, "xorshift from 0 gives only zeros");
        Random(state)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buffer: &mut [u8]) {
        for word in buffer.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    Random::new(seed).fill(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_bytes_and_others_do_not() {
        assert_eq!(random_bytes(1000, 7), random_bytes(1000, 7));
        assert_eq!(random_bytes(1000, 7)[..999], random_bytes(999, 7)[..], "a prefix of the longer run");
        let streams: Vec<Vec<u8>> = (0..4).map(|seed| random_bytes(4096, seed)).collect();
        for (i, a) in streams.iter().enumerate() {
            for b in &streams[i + 1..] {
                let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
                assert!(same < 64, "seeds give related streams: {same} of 4096 bytes equal");
            }
        }
    }

    #[test]
    fn the_bytes_do_not_compress() {
        let bytes = random_bytes(1 << 20, 3);
        let compressed = zstd::bulk::compress(&bytes, 3).unwrap();
        assert!(compressed.len() >= bytes.len(), "compressed to {} of {}", compressed.len(), bytes.len());
    }
}
