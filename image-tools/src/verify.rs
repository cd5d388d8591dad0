//! Checks a file against its manifest: length, every chunk's hash in order, the whole-file hash.
//!
//! Streams through a fixed buffer, so memory does not depend on the file or chunk size. Each
//! byte is hashed twice (its chunk, the whole file); the first bad chunk ends the check, since
//! that is what an operator needs to know and a damaged disk may be slow to read further.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind};
use std::path::{Path, PathBuf};

use crate::manifest::Manifest;
use crate::Hash;

/// Read buffer: 1 MiB keeps syscalls per GiB low (~1 000) at a fixed, small memory cost.
const READ_BUFFER_LEN: usize = 1024 * 1024;

/// Verifies the file at `path` against `manifest`, calling `progress` with the bytes checked
/// so far after each chunk.
pub fn verify_file(path: &Path, manifest: &Manifest, mut progress: impl FnMut(u64)) -> Result<(), VerifyError> {
    let file = File::open(path).map_err(|source| VerifyError::Open { path: path.to_owned(), source })?;
    let read_error = |source| VerifyError::Read { path: path.to_owned(), source };
    // Fail fast on a plain length mismatch. Only for regular files: a block device reports 0
    // here and is checked by the stream alone.
    let metadata = file.metadata().map_err(read_error)?;
    if metadata.is_file() && metadata.len() != manifest.file_len {
        return Err(VerifyError::Length { expected: manifest.file_len, actual: metadata.len() });
    }

    let mut reader = BufReader::with_capacity(READ_BUFFER_LEN, file);
    let mut file_hasher = blake3::Hasher::new();
    for (index, (offset, chunk)) in manifest.chunk_offsets().enumerate() {
        let mut chunk_hasher = blake3::Hasher::new();
        let mut remaining = u64::from(chunk.len);
        while remaining > 0 {
            let buffered = fill_buf(&mut reader).map_err(read_error)?;
            if buffered.is_empty() {
                let actual = offset + u64::from(chunk.len) - remaining;
                return Err(VerifyError::Length { expected: manifest.file_len, actual });
            }
            let n = buffered.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
            chunk_hasher.update(&buffered[..n]);
            file_hasher.update(&buffered[..n]);
            reader.consume(n);
            remaining -= n as u64;
        }
        if Hash(*chunk_hasher.finalize().as_bytes()) != chunk.hash {
            return Err(VerifyError::Chunk { index, offset });
        }
        progress(offset + u64::from(chunk.len));
    }
    // The file may have grown since the length check, or be a stream without one.
    if !fill_buf(&mut reader).map_err(read_error)?.is_empty() {
        let extra = std::io::copy(&mut reader, &mut std::io::sink()).map_err(read_error)?;
        return Err(VerifyError::Length { expected: manifest.file_len, actual: manifest.file_len + extra });
    }
    let actual = Hash(*file_hasher.finalize().as_bytes());
    if actual != manifest.file_hash {
        return Err(VerifyError::FileHash { expected: manifest.file_hash, actual });
    }
    Ok(())
}

/// `BufRead::fill_buf`, retrying reads interrupted by a signal.
fn fill_buf(reader: &mut BufReader<File>) -> std::io::Result<&[u8]> {
    loop {
        match reader.fill_buf() {
            // `buffer()` rather than the fill's own borrow: returning a borrow from inside a
            // loop is rejected by the current borrow checker.
            Ok(_) => return Ok(reader.buffer()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Why a file does not match its manifest, or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot open {}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot read {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("file is {actual} bytes, the manifest says {expected}")]
    Length { expected: u64, actual: u64 },
    #[error("chunk {index} (at byte offset {offset}) does not match the manifest")]
    Chunk { index: usize, offset: u64 },
    #[error("whole-file hash is {actual}, the manifest says {expected}")]
    FileHash { expected: Hash, actual: Hash },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::{chunk_reader, ChunkerConfig};
    use crate::manifest::ChunkRef;
    use crate::testdata::random_bytes;

    /// Small chunks so a test file of a few hundred KiB has many of them.
    const SMALL_CHUNKS: ChunkerConfig = ChunkerConfig { min_len: 1024, avg_len: 4096, max_len: 16384 };

    fn write_and_chunk(dir: &Path, data: &[u8]) -> (PathBuf, Manifest) {
        let path = dir.join("image.raw");
        std::fs::write(&path, data).unwrap();
        let manifest = chunk_reader(data, SMALL_CHUNKS, |_, _| Ok(())).unwrap();
        (path, manifest)
    }

    #[test]
    fn test_ok() {
        let dir = tempfile::tempdir().unwrap();
        let data = random_bytes(300_000, 1);
        let (path, manifest) = write_and_chunk(dir.path(), &data);
        assert!(manifest.chunks.len() > 20);
        let mut reports = Vec::new();
        verify_file(&path, &manifest, |done| reports.push(done)).unwrap();
        assert_eq!(reports.len(), manifest.chunks.len());
        assert_eq!(reports.last(), Some(&(data.len() as u64)));
    }

    #[test]
    fn test_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, manifest) = write_and_chunk(dir.path(), b"");
        verify_file(&path, &manifest, |_| {}).unwrap();
    }

    #[test]
    fn test_flipped_byte_names_its_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let data = random_bytes(300_000, 1);
        let (path, manifest) = write_and_chunk(dir.path(), &data);
        for flip_at in [0, 1234, 150_000, data.len() - 1] {
            let mut damaged = data.clone();
            damaged[flip_at] ^= 0x01;
            std::fs::write(&path, &damaged).unwrap();
            let (expected_index, (expected_offset, _)) = manifest
                .chunk_offsets()
                .enumerate()
                .find(|(_, (offset, chunk))| (*offset..offset + u64::from(chunk.len)).contains(&(flip_at as u64)))
                .unwrap();
            match verify_file(&path, &manifest, |_| {}) {
                Err(VerifyError::Chunk { index, offset }) => {
                    assert_eq!((index, offset), (expected_index, expected_offset), "flip at {flip_at}");
                }
                other => panic!("flip at {flip_at}: expected a chunk error, got {other:?}"),
            }
        }
    }

    #[test]
    fn test_length_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let data = random_bytes(50_000, 1);
        let (path, manifest) = write_and_chunk(dir.path(), &data);
        std::fs::write(&path, &data[..49_999]).unwrap();
        assert!(matches!(
            verify_file(&path, &manifest, |_| {}),
            Err(VerifyError::Length { expected: 50_000, actual: 49_999 })
        ));
        let mut longer = data.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(matches!(
            verify_file(&path, &manifest, |_| {}),
            Err(VerifyError::Length { expected: 50_000, actual: 50_001 })
        ));
    }

    #[test]
    fn test_file_hash_mismatch() {
        // Chunks all match but the manifest's whole-file hash is wrong: still an error.
        let dir = tempfile::tempdir().unwrap();
        let data = random_bytes(20_000, 1);
        let (path, mut manifest) = write_and_chunk(dir.path(), &data);
        manifest.file_hash = Hash([0; 32]);
        match verify_file(&path, &manifest, |_| {}) {
            Err(VerifyError::FileHash { expected, actual }) => {
                assert_eq!(expected, Hash([0; 32]));
                assert_eq!(actual, Hash::of(&data));
            }
            other => panic!("expected a file hash error, got {other:?}"),
        }
    }

    #[test]
    fn test_chunk_larger_than_read_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let data = random_bytes(READ_BUFFER_LEN * 2 + 10, 1);
        let path = dir.path().join("image.raw");
        std::fs::write(&path, &data).unwrap();
        let manifest = Manifest {
            file_len: data.len() as u64,
            file_hash: Hash::of(&data),
            chunks: vec![
                ChunkRef { hash: Hash::of(&data[..10]), len: 10 },
                ChunkRef { hash: Hash::of(&data[10..]), len: (data.len() - 10) as u32 },
            ],
        };
        verify_file(&path, &manifest, |_| {}).unwrap();
    }

    #[test]
    fn test_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Manifest { file_len: 0, file_hash: Hash::of(b""), chunks: vec![] };
        assert!(matches!(verify_file(&dir.path().join("nope"), &manifest, |_| {}), Err(VerifyError::Open { .. })));
    }
}
