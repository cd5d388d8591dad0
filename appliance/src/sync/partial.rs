//! Crash-safe building of one file: the bytes go to `.HASH.partial`, and the indices of the
//! chunks written to `.HASH.progress`. The log is only a hint: on resume every listed chunk is
//! read back and hashed before it is trusted, so neither file needs a flush until the whole file
//! is verified, and a crash at any point (a torn log entry, a torn chunk) costs at most the
//! chunks not yet verified, which are fetched again.
//!
//! The whole-file check happens while the file fills: as soon as every byte of a 1 MiB block
//! is written (fetched, copied or kept from a previous run), the block is read back from the
//! file and hashed (`metalrack_image_tools::block_hash`), so `finish` only merges the blocks'
//! values into the file's BLAKE3 hash instead of reading and hashing the whole file again.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use metalrack_image_tools::block_hash::{self, BlockCoverage, BlockHasher, BLOCK_LEN};
use metalrack_image_tools::manifest::Manifest;
use metalrack_image_tools::verify::VerifyError;
use metalrack_image_tools::Hash;

use crate::snapshot::SnapshotStore;

/// Bytes of one progress-log entry: a chunk index, u32 little-endian.
const PROGRESS_ENTRY_LEN: usize = 4;

/// Read-back buffers (a block each) a file keeps between calls of
/// [`PartialFile::hash_ready_blocks`]: one per caller at once, which are the sync's fetches in
/// flight (asserted in `engine`). Kept because a fresh buffer is zeroed before each read, and
/// that was 1 MiB of `memset` per 1 MiB synced (3.6% of the rack's CPU in a first sync).
pub const READ_BUFFERS_KEPT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PartialError {
    #[error("cannot {what} {path}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("file {file_hash} does not verify after assembly")]
    Verify { file_hash: String, source: VerifyError },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PartialError {
    let path = path.to_owned();
    move |source| PartialError::Io { what, path, source }
}

/// Where a chunk can be copied from: a complete local file and an offset in it.
#[derive(Debug, Clone)]
pub struct ChunkSource {
    pub file: Arc<PathBuf>,
    pub offset: u64,
}

/// A run of consecutive chunks found consecutively in one source file: (source, source offset,
/// out offset, length). One `copy_file_range` per run.
type CopyRun = (Arc<PathBuf>, u64, u64, u64);

/// One file being built.
#[derive(Debug)]
pub struct PartialFile {
    file_hash: String,
    partial: PathBuf,
    target: PathBuf,
    progress_path: PathBuf,
    file: File,
    /// Indices written since the last flush of the log.
    progress: Mutex<Vec<u8>>,
    progress_file: Mutex<File>,
    pub manifest: Manifest,
    /// (chunk index, offset) of the chunks still to fetch, ascending.
    pub missing: Vec<(usize, u64)>,
    /// Bytes copied from local files.
    pub reused: u64,
    /// The whole-file hash as the blocks fill.
    hashing: Mutex<FileHashing>,
    /// At most [`READ_BUFFERS_KEPT`].
    read_buffers: Mutex<Vec<Vec<u8>>>,
}

/// Which chunks are in the file and which blocks of it are hashed.
#[derive(Debug)]
struct FileHashing {
    /// Offset of each chunk in the file (from the manifest, never from the caller: a chunk
    /// written at a wrong place leaves its own block incomplete or wrong, which the hash finds).
    offsets: Vec<u64>,
    written: Vec<bool>,
    coverage: BlockCoverage,
    hasher: BlockHasher,
    /// Blocks complete but not yet read back and hashed.
    ready: Vec<usize>,
}

impl FileHashing {
    fn new(manifest: &Manifest, offsets: Vec<u64>) -> FileHashing {
        let mut ready = Vec::new();
        if manifest.file_len == 0 {
            ready.push(0); // an empty file's one block has no bytes to wait for
        }
        FileHashing {
            written: vec![false; offsets.len()],
            offsets,
            coverage: BlockCoverage::new(manifest.file_len),
            hasher: BlockHasher::new(manifest.file_len),
            ready,
        }
    }

    /// Notes chunk `index` (of `len` bytes) as in the file; its blocks that this completes
    /// become ready to hash. A chunk noted again is ignored.
    fn chunk_written(&mut self, index: usize, len: u32) {
        if std::mem::replace(&mut self.written[index], true) {
            return;
        }
        let start = self.offsets[index];
        let ready = &mut self.ready;
        self.coverage.written(start..start + u64::from(len), |block| ready.push(block));
    }
}

impl PartialFile {
    /// Opens or resumes the partial file of `file_hash`: keeps the chunks a previous run wrote
    /// (each re-hashed), copies the chunks local files have (`local`), and lists the rest to fetch.
    pub fn open(
        store: &SnapshotStore,
        file_hash: &str,
        manifest: Manifest,
        local: &HashMap<Hash, ChunkSource>,
    ) -> Result<PartialFile, PartialError> {
        let partial = store.partial_path(file_hash);
        let progress_path = store.progress_path(file_hash);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(io_error("open", &partial))?;
        file.set_len(manifest.file_len).map_err(io_error("size", &partial))?;
        let offsets: Vec<u64> = manifest.chunk_offsets().map(|(offset, _)| offset).collect();
        let done = verified_chunks(&file, &manifest, &offsets, &std::fs::read(&progress_path).unwrap_or_default());
        let mut hashing = FileHashing::new(&manifest, offsets.clone());
        let mut log: Vec<u8> =
            done.iter().enumerate().filter(|(_, d)| **d).flat_map(|(i, _)| (i as u32).to_le_bytes()).collect();
        let mut open_sources: HashMap<Arc<PathBuf>, File> = HashMap::new();
        let mut reused = 0u64;
        let mut missing = Vec::new();
        let mut run: Option<CopyRun> = None;
        let mut flush = |run: &mut Option<CopyRun>| -> Result<(), PartialError> {
            if let Some((source, source_offset, out_offset, len)) = run.take() {
                if !open_sources.contains_key(&source) {
                    let f = File::open(source.as_path()).map_err(io_error("open", source.as_path()))?;
                    open_sources.insert(source.clone(), f);
                }
                copy_range(&open_sources[&source], source_offset, &file, out_offset, len)
                    .map_err(io_error("copy into", &partial))?;
                reused += len;
            }
            Ok(())
        };
        for (i, chunk) in manifest.chunks.iter().enumerate() {
            let (out_offset, len) = (offsets[i], u64::from(chunk.len));
            if done[i] {
                flush(&mut run)?;
                hashing.chunk_written(i, chunk.len);
                continue;
            }
            match local.get(&chunk.hash) {
                Some(src) => {
                    hashing.chunk_written(i, chunk.len);
                    let extends = matches!(&run, Some((f, s, o, l))
                        if Arc::ptr_eq(f, &src.file) && s + l == src.offset && o + l == out_offset);
                    if extends {
                        if let Some(r) = run.as_mut() {
                            r.3 += len;
                        }
                    } else {
                        flush(&mut run)?;
                        run = Some((src.file.clone(), src.offset, out_offset, len));
                    }
                    log.extend_from_slice(&(i as u32).to_le_bytes());
                }
                None => {
                    flush(&mut run)?;
                    missing.push((i, out_offset));
                }
            }
        }
        flush(&mut run)?;
        // The log is rewritten with only what was verified or copied: a damaged tail goes.
        let mut progress_file = File::create(&progress_path).map_err(io_error("create", &progress_path))?;
        progress_file.write_all(&log).map_err(io_error("write", &progress_path))?;
        Ok(PartialFile {
            file_hash: file_hash.to_owned(),
            target: store.file_path(file_hash),
            partial,
            progress_path,
            file,
            progress: Mutex::new(Vec::new()),
            progress_file: Mutex::new(progress_file),
            manifest,
            missing,
            reused,
            hashing: Mutex::new(hashing),
            read_buffers: Mutex::new(Vec::new()),
        })
    }

    /// Writes a verified chunk at its place and notes it for the progress log and the hash.
    pub fn write_chunk(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), PartialError> {
        self.file.write_all_at(data, offset).map_err(io_error("write", &self.partial))?;
        self.progress.lock().expect("lock").extend_from_slice(&index.to_le_bytes());
        // The manifest's length and offset, not the caller's: bytes written elsewhere or short
        // leave their block's hash wrong, which `finish` refuses.
        let len = self.manifest.chunks[index as usize].len;
        self.hashing.lock().expect("lock").chunk_written(index as usize, len);
        Ok(())
    }

    /// Reads back and hashes the blocks whose bytes are all written. Called after each piece of
    /// writes, so the whole-file hash grows with the file; concurrent callers take disjoint
    /// blocks (each is hashed once), and hash outside the lock.
    pub fn hash_ready_blocks(&self) -> Result<(), PartialError> {
        let ready = std::mem::take(&mut self.hashing.lock().expect("lock").ready);
        if ready.is_empty() {
            return Ok(());
        }
        let file_len = self.manifest.file_len;
        let kept = self.read_buffers.lock().expect("lock").pop();
        let mut buffer = kept.unwrap_or_else(|| Vec::with_capacity(BLOCK_LEN as usize));
        let mut values = Vec::with_capacity(ready.len());
        for block in ready {
            let start = block as u64 * BLOCK_LEN;
            let len = (file_len - start).min(BLOCK_LEN) as usize;
            // Zeroes only what the buffer never held (a kept buffer is usually a full block).
            buffer.resize(len, 0);
            self.file.read_exact_at(&mut buffer, start).map_err(io_error("read back", &self.partial))?;
            values.push((block, block_hash::hash_block(file_len, block, &buffer)));
        }
        let mut kept = self.read_buffers.lock().expect("lock");
        if kept.len() < READ_BUFFERS_KEPT {
            kept.push(buffer);
        }
        drop(kept);
        let mut hashing = self.hashing.lock().expect("lock");
        for &(block, value) in &values {
            hashing.hasher.insert(block, value);
        }
        drop(hashing);
        // Checked blocks go to the disk now, while the rest arrives, so the flush in `finish`
        // finds little left to write (a file the size of the page cache's dirty limit would
        // otherwise be written back all at once, at the end).
        for (block, _) in values {
            let start = block as u64 * BLOCK_LEN;
            start_writeback(&self.file, start, (file_len - start).min(BLOCK_LEN));
        }
        Ok(())
    }

    /// Appends the chunks written since the last call to the progress log.
    pub fn flush_progress(&self) -> Result<(), PartialError> {
        let pending = std::mem::take(&mut *self.progress.lock().expect("lock"));
        if !pending.is_empty() {
            let mut log = self.progress_file.lock().expect("lock");
            log.write_all(&pending).map_err(io_error("write", &self.progress_path))?;
        }
        Ok(())
    }

    /// Flushes the file, checks its whole-file hash (from its blocks, read back from the file
    /// as they filled) and length against its manifest, and renames it into place.
    ///
    /// The chunks were each checked on arrival (or on resume); this checks what the file holds:
    /// a chunk written at a wrong place, a copied chunk whose source rotted, a byte never
    /// written, all change the file's hash. A hash that matches means the file is the one the
    /// catalogue names (by that hash), which is what is published.
    pub fn finish(self) -> Result<(), PartialError> {
        if let Err(source) = self.check() {
            // Start this file over: what is on disk is not what was verified on arrival.
            let _ = std::fs::remove_file(&self.progress_path);
            let _ = std::fs::remove_file(&self.partial);
            return Err(PartialError::Verify { file_hash: self.file_hash, source });
        }
        // The bytes just checked are the ones this flush writes: nothing else writes the file.
        self.file.sync_all().map_err(io_error("sync", &self.partial))?;
        std::fs::rename(&self.partial, &self.target).map_err(io_error("rename", &self.partial))?;
        let _ = std::fs::remove_file(&self.progress_path);
        Ok(())
    }
}

impl PartialFile {
    /// The file's length and whole-file hash against the manifest.
    fn check(&self) -> Result<(), VerifyError> {
        let read_error = |source| VerifyError::Read { path: self.partial.clone(), source };
        let actual_len = self.file.metadata().map_err(read_error)?.len();
        if actual_len != self.manifest.file_len {
            return Err(VerifyError::Length { expected: self.manifest.file_len, actual: actual_len });
        }
        self.hash_ready_blocks().map_err(|e| match e {
            PartialError::Io { source, .. } => read_error(source),
            PartialError::Verify { source, .. } => source,
        })?;
        let hashing = self.hashing.lock().expect("lock");
        if (0..hashing.hasher.n_blocks()).any(|b| !hashing.hasher.has_block(b)) {
            // Some chunk was never written: the engine's bookkeeping is wrong.
            let index = hashing.written.iter().position(|w| !w).unwrap_or_default();
            let offset = hashing.offsets.get(index).copied().unwrap_or_default();
            return Err(VerifyError::Chunk { index, offset });
        }
        let actual = hashing.hasher.finalize().expect("every block is hashed");
        if actual != self.manifest.file_hash {
            return Err(VerifyError::FileHash { expected: self.manifest.file_hash, actual });
        }
        Ok(())
    }
}

/// Starts writing `len` bytes at `offset` of `file` back to the disk without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Only a head start: durability comes from the
/// `fsync` in `finish`, so a failure here is logged and otherwise ignored.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: a system call on a file descriptor this `File` owns and keeps open for the call;
    // it takes no pointers, so it cannot touch this process's memory.
    #[allow(unsafe_code)]
    let result = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range failed; the final fsync does it all");
    }
}

/// Which chunks the progress `log` lists AND the partial `file` holds intact. An entry that is
/// cut short, out of range or repeated is skipped; a listed chunk whose bytes do not hash to the
/// manifest's (torn by a crash) is not trusted.
fn verified_chunks(file: &File, manifest: &Manifest, offsets: &[u64], log: &[u8]) -> Vec<bool> {
    let mut done = vec![false; manifest.chunks.len()];
    let mut buf = Vec::new();
    for entry in log.chunks_exact(PROGRESS_ENTRY_LEN) {
        let i = u32::from_le_bytes(entry.try_into().expect("4 bytes")) as usize;
        if i >= done.len() || done[i] {
            continue;
        }
        let chunk = manifest.chunks[i];
        buf.resize(chunk.len as usize, 0);
        if file.read_exact_at(&mut buf, offsets[i]).is_ok() && Hash::of(&buf) == chunk.hash {
            done[i] = true;
        }
    }
    done
}

/// Copies `len` bytes between files in the kernel (reflink-capable filesystems share extents).
fn copy_range(src: &File, mut src_offset: u64, dst: &File, mut dst_offset: u64, mut len: u64) -> std::io::Result<()> {
    while len > 0 {
        let mut off_in = src_offset as i64;
        let mut off_out = dst_offset as i64;
        let n = nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), len as usize)
            .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source file shorter than its manifest",
            ));
        }
        src_offset += n as u64;
        dst_offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalrack_image_tools::manifest::ChunkRef;

    const CHUNK: usize = 4096;
    const N_CHUNKS: usize = 4;

    /// A file of four distinct chunks and its manifest.
    fn content() -> (Vec<u8>, Manifest) {
        let data: Vec<u8> = (0..CHUNK * N_CHUNKS).map(|i| (i / CHUNK * 37 + i % 251) as u8).collect();
        let chunks = data.chunks(CHUNK).map(|c| ChunkRef { hash: Hash::of(c), len: c.len() as u32 }).collect();
        let manifest = Manifest { file_len: data.len() as u64, file_hash: Hash::of(&data), chunks };
        (data, manifest)
    }

    fn fixture() -> (tempfile::TempDir, SnapshotStore, Vec<u8>, Manifest, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(&crate::data_dir::DataDir::new(dir.path())).unwrap();
        let (data, manifest) = content();
        let file_hash = manifest.file_hash.to_hex();
        (dir, store, data, manifest, file_hash)
    }

    fn missing_indices(partial: &PartialFile) -> Vec<usize> {
        partial.missing.iter().map(|&(i, _)| i).collect()
    }

    fn write(partial: &PartialFile, data: &[u8], index: usize) {
        let offset = (index * CHUNK) as u64;
        partial.write_chunk(index as u32, offset, &data[index * CHUNK..(index + 1) * CHUNK]).unwrap();
    }

    #[test]
    fn a_resume_after_a_crash_keeps_the_verified_chunks() {
        let (_dir, store, data, manifest, hash) = fixture();
        let first = PartialFile::open(&store, &hash, manifest.clone(), &HashMap::new()).unwrap();
        assert_eq!(missing_indices(&first), vec![0, 1, 2, 3]);
        write(&first, &data, 0);
        write(&first, &data, 2);
        first.flush_progress().unwrap();
        drop(first); // the crash: nothing finished, nothing renamed

        let resumed = PartialFile::open(&store, &hash, manifest, &HashMap::new()).unwrap();
        assert_eq!(missing_indices(&resumed), vec![1, 3]);
        write(&resumed, &data, 1);
        write(&resumed, &data, 3);
        resumed.finish().unwrap();
        assert_eq!(std::fs::read(store.file_path(&hash)).unwrap(), data);
        assert!(!store.partial_path(&hash).exists() && !store.progress_path(&hash).exists());
    }

    #[test]
    fn a_damaged_progress_log_trusts_nothing_unverified() {
        let (_dir, store, data, manifest, hash) = fixture();
        let first = PartialFile::open(&store, &hash, manifest.clone(), &HashMap::new()).unwrap();
        write(&first, &data, 0);
        first.flush_progress().unwrap();
        drop(first);
        // After the honest entry: garbage (an index far out of range), an entry for chunk 3 that
        // was never written (its bytes are zeros), a repeat, and a torn last entry.
        let mut log = std::fs::read(store.progress_path(&hash)).unwrap();
        log.extend_from_slice(&u32::MAX.to_le_bytes());
        log.extend_from_slice(&3u32.to_le_bytes());
        log.extend_from_slice(&0u32.to_le_bytes());
        log.extend_from_slice(&[1, 0]);
        std::fs::write(store.progress_path(&hash), &log).unwrap();

        let resumed = PartialFile::open(&store, &hash, manifest, &HashMap::new()).unwrap();
        assert_eq!(missing_indices(&resumed), vec![1, 2, 3]);
        // The log is rewritten with the verified entry only.
        assert_eq!(std::fs::read(store.progress_path(&hash)).unwrap(), 0u32.to_le_bytes());
    }

    #[test]
    fn a_torn_chunk_is_detected_and_fetched_again() {
        let (_dir, store, data, manifest, hash) = fixture();
        let first = PartialFile::open(&store, &hash, manifest.clone(), &HashMap::new()).unwrap();
        for index in 0..N_CHUNKS {
            write(&first, &data, index);
        }
        first.flush_progress().unwrap();
        drop(first);
        // A crash tore chunk 2: the log lists it, but half its bytes never reached the disk.
        let partial = std::fs::OpenOptions::new().write(true).open(store.partial_path(&hash)).unwrap();
        partial.write_all_at(&[0u8; CHUNK / 2], (2 * CHUNK + CHUNK / 4) as u64).unwrap();

        let resumed = PartialFile::open(&store, &hash, manifest, &HashMap::new()).unwrap();
        assert_eq!(missing_indices(&resumed), vec![2]);
        write(&resumed, &data, 2);
        resumed.finish().unwrap();
        assert_eq!(std::fs::read(store.file_path(&hash)).unwrap(), data);
    }

    #[test]
    fn chunks_a_local_file_has_are_copied_not_fetched() {
        let (dir, store, data, manifest, hash) = fixture();
        // A local file holding chunks 1 and 2 back to back (one copy run).
        let local_path = Arc::new(dir.path().join("old"));
        std::fs::write(local_path.as_path(), &data[CHUNK..3 * CHUNK]).unwrap();
        let local: HashMap<Hash, ChunkSource> = [(1, 0), (2, CHUNK as u64)]
            .into_iter()
            .map(|(i, offset)| (manifest.chunks[i].hash, ChunkSource { file: local_path.clone(), offset }))
            .collect();
        let partial = PartialFile::open(&store, &hash, manifest, &local).unwrap();
        assert_eq!(missing_indices(&partial), vec![0, 3]);
        assert_eq!(partial.reused, 2 * CHUNK as u64);
        write(&partial, &data, 0);
        write(&partial, &data, 3);
        partial.finish().unwrap();
        assert_eq!(std::fs::read(store.file_path(&hash)).unwrap(), data);
    }

    /// Chunks of 48 KiB in a file of a bit over 3 MiB: four hash blocks, chunks across their
    /// boundaries, a short last block.
    fn multi_block_content() -> (Vec<u8>, Manifest) {
        const LEN: usize = 48 * 1024;
        let data: Vec<u8> = (0..3 * BLOCK_LEN as usize + 5000).map(|i| (i / LEN * 131 + i % 253) as u8).collect();
        let chunks = data.chunks(LEN).map(|c| ChunkRef { hash: Hash::of(c), len: c.len() as u32 }).collect();
        let manifest = Manifest { file_len: data.len() as u64, file_hash: Hash::of(&data), chunks };
        (data, manifest)
    }

    #[test]
    fn a_file_written_out_of_order_across_blocks_verifies_as_it_fills() {
        let (_dir, store, _, _, _) = fixture();
        let (data, manifest) = multi_block_content();
        let hash = manifest.file_hash.to_hex();
        let offsets: Vec<(usize, u64, u32)> =
            manifest.chunk_offsets().enumerate().map(|(i, (offset, c))| (i, offset, c.len)).collect();
        let partial = PartialFile::open(&store, &hash, manifest, &HashMap::new()).unwrap();
        // Odd chunks, then even ones backwards, hashing ready blocks after each, as batches that
        // finish out of order do.
        let order = offsets.iter().skip(1).step_by(2).chain(offsets.iter().step_by(2).rev());
        for &(index, offset, len) in order {
            let bytes = &data[offset as usize..offset as usize + len as usize];
            partial.write_chunk(index as u32, offset, bytes).unwrap();
            partial.hash_ready_blocks().unwrap();
        }
        partial.finish().unwrap();
        assert_eq!(std::fs::read(store.file_path(&hash)).unwrap(), data);
    }

    #[test]
    fn a_chunk_written_at_a_wrong_place_is_refused() {
        let (_dir, store, data, manifest, hash) = fixture();
        let partial = PartialFile::open(&store, &hash, manifest, &HashMap::new()).unwrap();
        for index in [0, 1, 3] {
            write(&partial, &data, index);
        }
        // Chunk 2's bytes, reported as chunk 2, but written over chunk 1.
        partial.write_chunk(2, CHUNK as u64, &data[2 * CHUNK..3 * CHUNK]).unwrap();
        let err = partial.finish().unwrap_err();
        assert!(matches!(err, PartialError::Verify { .. }), "{err}");
        assert!(!store.partial_path(&hash).exists() && !store.file_path(&hash).exists());
    }

    #[test]
    fn a_copied_chunk_whose_local_source_rotted_is_refused() {
        let (dir, store, data, manifest, hash) = fixture();
        // The local file claims chunk 1, but one of its bytes changed on disk since.
        let local_path = Arc::new(dir.path().join("old"));
        let mut rotted = data[CHUNK..2 * CHUNK].to_vec();
        rotted[100] ^= 0x40;
        std::fs::write(local_path.as_path(), &rotted).unwrap();
        let local = HashMap::from([(manifest.chunks[1].hash, ChunkSource { file: local_path, offset: 0 })]);
        let partial = PartialFile::open(&store, &hash, manifest, &local).unwrap();
        assert_eq!(missing_indices(&partial), vec![0, 2, 3]);
        for index in [0, 2, 3] {
            write(&partial, &data, index);
        }
        let err = partial.finish().unwrap_err();
        assert!(matches!(err, PartialError::Verify { .. }), "{err}");
        assert!(!store.file_path(&hash).exists());
    }

    #[test]
    fn a_file_that_does_not_verify_is_started_over() {
        let (_dir, store, data, manifest, hash) = fixture();
        let partial = PartialFile::open(&store, &hash, manifest, &HashMap::new()).unwrap();
        for index in 0..N_CHUNKS - 1 {
            write(&partial, &data, index);
        }
        // Chunk 3 never written: the file holds zeros there.
        assert!(matches!(partial.finish().unwrap_err(), PartialError::Verify { .. }));
        assert!(!store.partial_path(&hash).exists() && !store.file_path(&hash).exists());
    }
}
