//! Test data: deterministic pseudo-random bytes, so files neither compress nor share chunks by
//! accident, a failure reproduces, and every benchmark run measures the same content; and
//! synthetic disk images with a real image's structure (free space, files found twice), for the
//! fleet's scenarios.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};

/// Bytes a file is written in, between calls of the caller's check.
const WRITE_PIECE_BYTES: usize = 4 << 20;

pub use metalrack_image_tools::testdata::{random_bytes, Random};

/// `len` bytes of text-like content from `seed`: words of an image's files (paths, code, zeros)
/// in a pseudo-random order, so it compresses as a real image's files do (`zstd -3` to about a
/// third) yet no two chunks are alike.
pub fn compressible_bytes(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"/usr/lib/x86_64-linux-gnu/",
        b"libc.so.6 ",
        b"kernel ",
        b"\0\0\0\0\0\0\0\0",
        b"config=y\n",
        b"mov %rax, ",
        b"0x7f45 ",
        b"GLIBC_2.34 ",
    ];
    let mut random = Random::new(seed);
    let mut bytes = Vec::with_capacity(len + 32);
    while bytes.len() < len {
        let r = random.next_u64();
        bytes.extend_from_slice(WORDS[(r % 8) as usize]);
        // One random byte in three words: compressible, not a repeating pattern.
        if r.is_multiple_of(3) {
            bytes.push((r >> 32) as u8);
        }
    }
    bytes.truncate(len);
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

/// Smallest and largest "file" of a synthetic image: a real root filesystem's files that matter
/// for chunking are libraries and binaries of tens of KiB to a few MiB; pieces longer than the
/// chunker's largest chunk (256 KiB) let a repeated file share whole chunks with its first copy.
const SYNTHETIC_FILE_BYTES_MIN: u64 = 64 << 10;
const SYNTHETIC_FILE_BYTES_MAX: u64 = 2 << 20;

/// Files of a synthetic image that later pieces may repeat: their seeds and lengths (16 bytes
/// each), not their bytes, which are generated again from the seed.
const SYNTHETIC_FILES_REMEMBERED_MAX: usize = 4096;

/// Writes a synthetic disk image of `len` bytes from `seed` to `path`: a sequence of pieces of
/// 64 KiB to 2 MiB (4 KiB aligned, as a filesystem's blocks), each a run of zeros with
/// probability `zero_percent`, a copy of an earlier piece with probability `duplicate_percent`,
/// else fresh pseudo-random bytes (compressed data: what most of an image is). The same
/// arguments give the same bytes. `between` is called before each piece (a runner's "was I
/// interrupted?").
pub fn write_synthetic_image(
    path: &Path,
    len: u64,
    seed: u64,
    zero_percent: u8,
    duplicate_percent: u8,
    mut between: impl FnMut() -> Result<()>,
) -> Result<()> {
    let mut plan = Random::new(seed);
    let mut out = BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let mut buffer = vec![0u8; SYNTHETIC_FILE_BYTES_MAX as usize];
    let mut files: Vec<(u64, u64)> = Vec::new();
    let mut written = 0u64;
    while written < len {
        between()?;
        let span = SYNTHETIC_FILE_BYTES_MAX - SYNTHETIC_FILE_BYTES_MIN;
        let piece = ((SYNTHETIC_FILE_BYTES_MIN + plan.next_u64() % span) & !4095).min(len - written);
        let draw = plan.next_u64() % 100;
        let piece = if draw < u64::from(zero_percent) {
            buffer[..piece as usize].fill(0);
            piece
        } else if draw < u64::from(zero_percent) + u64::from(duplicate_percent) && !files.is_empty() {
            let (file_seed, file_len) = files[(plan.next_u64() % files.len() as u64) as usize];
            let n = file_len.min(len - written);
            Random::new(file_seed).fill(&mut buffer[..n as usize]);
            n
        } else {
            let file_seed = plan.next_u64();
            if files.len() < SYNTHETIC_FILES_REMEMBERED_MAX {
                files.push((file_seed, piece));
            }
            Random::new(file_seed).fill(&mut buffer[..piece as usize]);
            piece
        };
        out.write_all(&buffer[..piece as usize])?;
        written += piece;
    }
    out.flush()?;
    Ok(())
}

/// Bytes of `path`'s distinct chunks as the region cuts them: what a rack that has none of them
/// must fetch to sync the file.
pub fn unique_chunk_bytes(path: &Path) -> Result<u64> {
    use metalrack_image_tools::chunker::{chunk_file, ChunkerConfig};
    let manifest =
        chunk_file(path, ChunkerConfig::default(), |_| {}).with_context(|| format!("chunking {}", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    Ok(manifest.chunks.iter().filter(|c| seen.insert(c.hash)).map(|c| u64::from(c.len)).sum())
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

    #[test]
    fn a_synthetic_image_repeats_itself_as_asked_and_the_same_seed_gives_the_same_image() {
        let dir = tempfile::tempdir().unwrap();
        let len = 32u64 << 20;
        let (a, b, plain) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("plain"));
        write_synthetic_image(&a, len, 3, 10, 20, || Ok(())).unwrap();
        write_synthetic_image(&b, len, 3, 10, 20, || Ok(())).unwrap();
        write_synthetic_image(&plain, len, 3, 0, 0, || Ok(())).unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().len(), len);
        assert_eq!(file_blake3(&a), file_blake3(&b));
        let unique = unique_chunk_bytes(&a).unwrap();
        // About 30% repeats (zeros and copies); allow for the draw.
        assert!(unique > len / 2 && unique < len * 90 / 100, "{unique} of {len} bytes are unique");
        assert_eq!(unique_chunk_bytes(&plain).unwrap(), len, "no zeros and no copies: nothing repeats");
    }
}
