//! Cuts a byte stream into content-defined chunks (FastCDC 2020) and hashes them (BLAKE3).
//!
//! Content-defined boundaries depend only on the bytes near them, so an insertion or deletion
//! moves the boundaries around it and leaves every other chunk — and its hash — unchanged:
//! a new image version shares most chunks with the previous one.
//!
//! Memory is O(`max_len`) whatever the input size: fastcdc's `StreamCDC` keeps one
//! `max_len` window, each chunk is handed to the caller and dropped, and the whole-file hash is
//! computed on the way. Only the chunk list grows (36 bytes per chunk: ~6 MiB for 10 GiB at the
//! default 64 KiB average).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use fastcdc::v2020;

use crate::manifest::{ChunkRef, Manifest, CHUNKS_MAX, CHUNK_LEN_MAX};
use crate::Hash;

/// Chunk size bounds in bytes. The same file chunked with the same config always yields the
/// same chunks; two versions of an image share chunks only if chunked with the same config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerConfig {
    pub min_len: u32,
    pub avg_len: u32,
    pub max_len: u32,
}

impl Default for ChunkerConfig {
    /// 16 KiB / 64 KiB / 256 KiB: chunks small enough that a changed package costs a few of
    /// them, large enough that a 10 GiB image is ~160 Ki chunks (a 6 MiB manifest) and
    /// per-chunk costs (a hash lookup, a store file, a frame header) stay small.
    fn default() -> Self {
        ChunkerConfig { min_len: 16 * 1024, avg_len: 64 * 1024, max_len: 256 * 1024 }
    }
}

impl ChunkerConfig {
    /// Checks the bounds against fastcdc's allowed ranges (it panics outside them), their
    /// order, and the manifest's chunk length limit.
    pub fn validate(&self) -> Result<(), ChunkError> {
        let in_range = |name: &str, value: u32, min: u32, max: u32| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ChunkError::Config { reason: format!("{name} is {value} bytes, must be in {min}..={max}") })
            }
        };
        in_range("minimum chunk length", self.min_len, v2020::MINIMUM_MIN, v2020::MINIMUM_MAX)?;
        in_range("average chunk length", self.avg_len, v2020::AVERAGE_MIN, v2020::AVERAGE_MAX)?;
        in_range("maximum chunk length", self.max_len, v2020::MAXIMUM_MIN, v2020::MAXIMUM_MAX.min(CHUNK_LEN_MAX))?;
        if !(self.min_len <= self.avg_len && self.avg_len <= self.max_len) {
            return Err(ChunkError::Config {
                reason: format!(
                    "chunk lengths must satisfy minimum <= average <= maximum, got {} / {} / {}",
                    self.min_len, self.avg_len, self.max_len
                ),
            });
        }
        Ok(())
    }
}

/// Chunks everything `reader` yields, calling `on_chunk` with each chunk in order, and
/// returns the manifest (chunk list, total length, whole-stream hash).
///
/// Errors if the stream needs more than [`CHUNKS_MAX`] chunks at this config: the manifest
/// could not list them.
pub fn chunk_reader<R: Read>(
    reader: R,
    config: ChunkerConfig,
    mut on_chunk: impl FnMut(&ChunkRef, &[u8]) -> std::io::Result<()>,
) -> Result<Manifest, ChunkError> {
    config.validate()?;
    let chunker = v2020::StreamCDC::new(RetryInterrupted(reader), config.min_len, config.avg_len, config.max_len);
    let mut file_hasher = blake3::Hasher::new();
    let mut file_len: u64 = 0;
    let mut chunks = Vec::new();
    for result in chunker {
        let chunk = result.map_err(|e| ChunkError::Read { source: e.into() })?;
        if chunks.len() == CHUNKS_MAX as usize {
            return Err(ChunkError::Config {
                reason: format!(
                    "the input needs more than {CHUNKS_MAX} chunks (the manifest's limit) at an average of {} \
                     bytes; choose larger chunk lengths",
                    config.avg_len
                ),
            });
        }
        // StreamCDC never yields more than max_len, which validate() bounded by CHUNK_LEN_MAX.
        assert!(!chunk.data.is_empty() && chunk.data.len() <= config.max_len as usize);
        let chunk_ref = ChunkRef { hash: Hash::of(&chunk.data), len: chunk.data.len() as u32 };
        file_hasher.update(&chunk.data);
        file_len += u64::from(chunk_ref.len);
        on_chunk(&chunk_ref, &chunk.data).map_err(|source| ChunkError::Callback { source })?;
        chunks.push(chunk_ref);
    }
    Ok(Manifest { file_len, file_hash: Hash(*file_hasher.finalize().as_bytes()), chunks })
}

/// Chunks the file at `path`, calling `progress` with the bytes done so far after each chunk.
pub fn chunk_file(path: &Path, config: ChunkerConfig, mut progress: impl FnMut(u64)) -> Result<Manifest, ChunkError> {
    config.validate()?;
    let file = File::open(path).map_err(|source| ChunkError::Open { path: path.to_owned(), source })?;
    // No BufReader: StreamCDC reads straight into its own max_len window.
    let mut done: u64 = 0;
    chunk_reader(file, config, |chunk, _data| {
        done += u64::from(chunk.len);
        progress(done);
        Ok(())
    })
}

/// Retries reads interrupted by a signal, which `StreamCDC` would report as errors.
struct RetryInterrupted<R>(R);

impl<R: Read> Read for RetryInterrupted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                result => return result,
            }
        }
    }
}

/// Why chunking failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunker configuration: {reason}")]
    Config { reason: String },
    #[error("cannot open {}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot read the input")]
    Read { source: std::io::Error },
    #[error("cannot process a chunk")]
    Callback { source: std::io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Deterministic pseudo-random bytes (xorshift64*): incompressible, like real image data,
    /// and the same on every run.
    pub(crate) fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            bytes.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }

    fn chunk_bytes(bytes: &[u8], config: ChunkerConfig) -> (Manifest, Vec<Vec<u8>>) {
        let mut pieces = Vec::new();
        let manifest = chunk_reader(bytes, config, |_, data| {
            pieces.push(data.to_vec());
            Ok(())
        })
        .unwrap();
        (manifest, pieces)
    }

    const MIB: usize = 1024 * 1024;

    #[test]
    fn test_default_config() {
        let config = ChunkerConfig::default();
        assert_eq!((config.min_len, config.avg_len, config.max_len), (16384, 65536, 262144));
        config.validate().unwrap();
    }

    #[test]
    fn test_validate_rejects() {
        let bad = [
            ChunkerConfig { min_len: 63, ..ChunkerConfig::default() },
            ChunkerConfig { avg_len: 255, min_len: 64, ..ChunkerConfig::default() },
            ChunkerConfig { max_len: CHUNK_LEN_MAX + 1, ..ChunkerConfig::default() },
            ChunkerConfig { min_len: 64 * 1024, avg_len: 32 * 1024, max_len: 256 * 1024 },
            ChunkerConfig { min_len: 16 * 1024, avg_len: 512 * 1024, max_len: 256 * 1024 },
        ];
        for config in bad {
            assert!(matches!(config.validate(), Err(ChunkError::Config { .. })), "{config:?}");
            assert!(matches!(chunk_reader(&b"x"[..], config, |_, _| Ok(())), Err(ChunkError::Config { .. })));
        }
        let largest = ChunkerConfig { min_len: 1024 * 1024, avg_len: 4 * MIB as u32, max_len: CHUNK_LEN_MAX };
        largest.validate().unwrap();
    }

    #[test]
    fn test_reproduces_input_and_hashes() {
        let input = pseudo_random_bytes(3 * MIB + 12345, 1);
        let (manifest, pieces) = chunk_bytes(&input, ChunkerConfig::default());
        assert_eq!(pieces.concat(), input);
        assert_eq!(manifest.file_len, input.len() as u64);
        assert_eq!(manifest.file_hash, Hash::of(&input));
        assert_eq!(manifest.chunks.len(), pieces.len());
        for ((offset, chunk), piece) in manifest.chunk_offsets().zip(&pieces) {
            assert_eq!(chunk.hash, Hash::of(piece));
            assert_eq!(chunk.len as usize, piece.len());
            assert_eq!(&input[offset as usize..][..piece.len()], &piece[..]);
        }
        // All chunks but the last respect the bounds; the average is in the right ballpark.
        let config = ChunkerConfig::default();
        for chunk in &manifest.chunks[..manifest.chunks.len() - 1] {
            assert!((config.min_len..=config.max_len).contains(&chunk.len), "{chunk:?}");
        }
        assert!((20..=100).contains(&manifest.chunks.len()), "{} chunks", manifest.chunks.len());
        assert_eq!(Manifest::parse(&manifest.to_bytes()), Ok(manifest));
    }

    #[test]
    fn test_empty_input() {
        let (manifest, pieces) = chunk_bytes(b"", ChunkerConfig::default());
        assert!(pieces.is_empty());
        assert_eq!(manifest, Manifest { file_len: 0, file_hash: Hash::of(b""), chunks: vec![] });
    }

    #[test]
    fn test_small_input_is_one_chunk() {
        let (manifest, pieces) = chunk_bytes(b"hello", ChunkerConfig::default());
        assert_eq!(pieces, vec![b"hello".to_vec()]);
        assert_eq!(manifest.chunks, vec![ChunkRef { hash: Hash::of(b"hello"), len: 5 }]);
    }

    #[test]
    fn test_zeros_cut_at_max_len() {
        let config = ChunkerConfig::default();
        let (manifest, _) = chunk_bytes(&vec![0u8; 4 * config.max_len as usize], config);
        let expected = ChunkRef { hash: Hash::of(&vec![0u8; config.max_len as usize]), len: config.max_len };
        assert_eq!(manifest.chunks, vec![expected; 4]);
    }

    #[test]
    fn test_boundaries_stable_under_insertion() {
        let original = pseudo_random_bytes(4 * MIB, 2);
        let insert_at = original.len() / 2;
        let mut edited = original.clone();
        edited.splice(insert_at..insert_at, pseudo_random_bytes(100, 3));

        let config = ChunkerConfig::default();
        let (before, _) = chunk_bytes(&original, config);
        let (after, _) = chunk_bytes(&edited, config);

        // Every chunk that ends before the insertion point is untouched.
        let n_before_insertion = before
            .chunk_offsets()
            .take_while(|(offset, chunk)| offset + u64::from(chunk.len) <= insert_at as u64)
            .count();
        assert!(n_before_insertion > 10, "only {n_before_insertion} chunks before the insertion");
        assert_eq!(before.chunks[..n_before_insertion], after.chunks[..n_before_insertion]);

        let old_hashes: HashSet<Hash> = before.chunks.iter().map(|c| c.hash).collect();
        let n_shared = after.chunks.iter().filter(|c| old_hashes.contains(&c.hash)).count();
        assert!(
            n_shared * 10 >= after.chunks.len() * 9,
            "only {n_shared} of {} chunks shared after a 100-byte insertion",
            after.chunks.len()
        );
        assert_ne!(before.file_hash, after.file_hash);
    }

    #[test]
    fn test_read_error() {
        /// Yields some bytes, then fails.
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let result = chunk_reader(Failing(100_000), ChunkerConfig::default(), |_, _| Ok(()));
        match result {
            Err(ChunkError::Read { source }) => assert_eq!(source.to_string(), "disk on fire"),
            other => panic!("expected a read error, got {other:?}"),
        }
    }

    #[test]
    fn test_interrupted_reads_are_retried() {
        /// Interrupts every other read.
        struct Interrupting<'a>(&'a [u8], bool);
        impl Read for Interrupting<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.1 = !self.1;
                if self.1 {
                    return Err(std::io::ErrorKind::Interrupted.into());
                }
                self.0.read(buf)
            }
        }
        let input = pseudo_random_bytes(MIB, 4);
        let manifest = chunk_reader(Interrupting(&input, false), ChunkerConfig::default(), |_, _| Ok(())).unwrap();
        assert_eq!(manifest.file_hash, Hash::of(&input));
    }

    #[test]
    fn test_callback_error_stops() {
        let input = pseudo_random_bytes(MIB, 5);
        let mut calls = 0;
        let result = chunk_reader(&input[..], ChunkerConfig::default(), |_, _| {
            calls += 1;
            Err(std::io::Error::other("store full"))
        });
        assert!(matches!(result, Err(ChunkError::Callback { .. })));
        assert_eq!(calls, 1);
    }

    /// An input with what real images have besides incompressible data: long runs of zeros
    /// (sparse space, cut at `max_len`), a short repeated pattern, a repeated 4 KiB block (the
    /// same file copied many times), and random data between them so boundaries fall at
    /// every kind of transition.
    fn structured_bytes() -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(pseudo_random_bytes(300_001, 20));
        bytes.extend(vec![0u8; MIB + 17]);
        bytes.extend(b"metalrack ".iter().cycle().take(700 * 1024 + 3));
        bytes.extend(pseudo_random_bytes(MIB - 5, 21));
        let block = pseudo_random_bytes(4096, 22);
        for _ in 0..200 {
            bytes.extend_from_slice(&block);
        }
        bytes.extend(vec![0u8; 300 * 1024 + 1]);
        bytes.extend(pseudo_random_bytes(5000, 23));
        bytes
    }

    /// The hash of a manifest's encoding: chunk boundaries, chunk hashes, length and file hash
    /// in one value.
    fn manifest_digest(manifest: &Manifest) -> String {
        Hash::of(&manifest.to_bytes()).to_hex()
    }

    /// Boundaries and hashes recorded with the `StreamCDC` chunker of commit `cbaca9d`, before
    /// any speed work. A chunker that moves one boundary or changes one hash makes every
    /// manifest differ from the ones already pushed, so no chunk would be shared with images
    /// chunked before: every path (stream, file) must reproduce these exactly.
    const RECORDED: [(&str, u64, usize, &str); 3] = [
        ("random, default config", 5_247_201, 62, "5eaeb956e7ed80c8167a75dc2fb7ea2ba39b672173f51d12a921e84c8963b767"),
        (
            "structured, default config",
            4_245_369,
            28,
            "bc08fa6270fb2b9de23fca583b5cd56f63a6682709f1dc99f215ec25f648f6c4",
        ),
        (
            "structured, small chunks",
            4_245_369,
            592,
            "b2c90f32977745fca733e6187aada3f55acbe5bf72984142c330b8f32946f090",
        ),
    ];

    fn recorded_inputs() -> [(Vec<u8>, ChunkerConfig); 3] {
        let small = ChunkerConfig { min_len: 1024, avg_len: 4096, max_len: 16384 };
        [
            (pseudo_random_bytes(5 * MIB + 4321, 12), ChunkerConfig::default()),
            (structured_bytes(), ChunkerConfig::default()),
            (structured_bytes(), small),
        ]
    }

    #[test]
    fn test_boundaries_match_recorded_fixture() {
        let dir = tempfile::tempdir().unwrap();
        for ((name, file_len, n_chunks, digest), (input, config)) in RECORDED.iter().zip(recorded_inputs()) {
            let (from_stream, _) = chunk_bytes(&input, config);
            let path = dir.path().join("input.raw");
            std::fs::write(&path, &input).unwrap();
            let from_file = chunk_file(&path, config, |_| {}).unwrap();
            for (path_name, manifest) in [("stream", &from_stream), ("file", &from_file)] {
                assert_eq!(
                    (manifest.file_len, manifest.chunks.len(), manifest_digest(manifest).as_str()),
                    (*file_len, *n_chunks, *digest),
                    "{name}, {path_name} path"
                );
            }
        }
    }

    #[test]
    fn test_chunk_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let input = pseudo_random_bytes(MIB + 7, 6);
        std::fs::write(&path, &input).unwrap();
        let mut reports = Vec::new();
        let manifest = chunk_file(&path, ChunkerConfig::default(), |done| reports.push(done)).unwrap();
        assert_eq!(manifest.file_hash, Hash::of(&input));
        assert_eq!(reports.len(), manifest.chunks.len());
        assert_eq!(reports.last(), Some(&(input.len() as u64)));
        assert!(reports.windows(2).all(|w| w[0] < w[1]));

        let missing = dir.path().join("missing.raw");
        match chunk_file(&missing, ChunkerConfig::default(), |_| {}) {
            Err(ChunkError::Open { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected an open error, got {other:?}"),
        }
    }
}
