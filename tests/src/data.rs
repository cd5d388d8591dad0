//! Test data: deterministic pseudo-random bytes, so files neither compress nor share chunks by
//! accident, a failure reproduces, and every benchmark run measures the same content.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};

/// Bytes a file is written in, between calls of the caller's check.
const WRITE_PIECE_BYTES: usize = 4 << 20;

/// xorshift64*: fast (benchmark files are gigabytes) and good enough to look incompressible.
#[derive(Debug, Clone)]
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
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

/// Writes `len` pseudo-random bytes from `seed` to `path`, calling `between` before each 4 MiB
/// (a benchmark's "was I interrupted?"), so writing gigabytes stops early when asked.
pub fn write_random_file(path: &Path, len: u64, seed: u64, mut between: impl FnMut() -> Result<()>) -> Result<()> {
    let mut random = Random::new(seed);
    let mut out = BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let mut buffer = vec![0u8; WRITE_PIECE_BYTES];
    let mut left = len;
    while left > 0 {
        between()?;
        let n = left.min(buffer.len() as u64) as usize;
        random.fill(&mut buffer[..n]);
        out.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// BLAKE3 of a file, hex, read in 1 MiB pieces (files of gigabytes too).
pub fn file_blake3(path: &Path) -> String {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).unwrap();
        if n == 0 {
            return hasher.finalize().to_hex().to_string();
        }
        hasher.update(&buffer[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_and_a_file_matches_the_bytes() {
        assert_eq!(random_bytes(1000, 7), random_bytes(1000, 7));
        assert_ne!(random_bytes(1000, 7), random_bytes(1000, 8));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = WRITE_PIECE_BYTES + 13;
        write_random_file(&path, len as u64, 5, || Ok(())).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), random_bytes(len, 5));
    }
}
