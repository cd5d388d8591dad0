//! Writing an image to a disk from its manifest: plan (what the disk already holds), execute
//! (fetch, verify, write what differs), finish (flush and read the whole image back), erase.
//!
//! No network stack here: the caller fetches bytes through a [`ChunkSource`] (HTTP in the
//! agent, smoltcp in the simulated fleet) and writes through a [`Disk`] (a block device or a
//! regular file, or memory in tests). Invariants: nothing is written to the disk that did not
//! hash to the manifest's chunk at that place; memory is one range buffer whatever the image.

mod erase;
mod execute;
mod plan;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

pub use erase::{erase, EraseError, ERASE_QUICK_BYTES};
pub use execute::{execute, finish, ExecuteOptions, RetryPolicy, RANGE_BYTES_MAX};
pub use metalrack_api::agent::{DeployPhase, DeployProgress, EraseMode};
pub use plan::{plan, Plan};

use crate::manifest::Manifest;
use crate::Hash;

/// Where the bytes of the image come from: `fetch` fills `buf` with the image's bytes
/// `[start, start + buf.len())`.
pub trait ChunkSource {
    /// On failure, `SourceError::received` says how many leading bytes of `buf` did arrive (a
    /// connection dropped mid-range), so the caller keeps the whole chunks among them.
    fn fetch(&mut self, start: u64, buf: &mut [u8]) -> Result<(), SourceError>;
}

/// Why a fetch failed, and whether trying again may help (a dropped connection, a 5xx) or not
/// (a 404, a refused token).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// Leading bytes of the buffer that hold the right offsets' data (never more than asked).
    pub received: usize,
    pub retryable: bool,
    pub message: String,
}

impl SourceError {
    pub fn retryable(received: usize, message: impl Into<String>) -> SourceError {
        SourceError { received, retryable: true, message: message.into() }
    }

    pub fn fatal(message: impl Into<String>) -> SourceError {
        SourceError { received: 0, retryable: false, message: message.into() }
    }
}

/// The disk an image goes to: positioned reads and writes, so no shared cursor.
pub trait Disk {
    /// The disk's length in bytes.
    fn size_bytes(&self) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the writes durable (fsync).
    fn sync(&mut self) -> io::Result<()>;
}

/// A block device or a regular file.
impl Disk for File {
    fn size_bytes(&self) -> io::Result<u64> {
        // A block device's metadata says 0; seeking to its end gives its size. Positioned I/O
        // elsewhere means the moved cursor matters to nobody.
        let mut file = self;
        file.seek(SeekFrom::End(0))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

/// A disk in memory, for tests and the simulated fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryDisk(pub Vec<u8>);

impl Disk for MemoryDisk {
    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = memory_range(self.0.len(), offset, buf.len())?;
        buf.copy_from_slice(&self.0[range]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let range = memory_range(self.0.len(), offset, buf.len())?;
        self.0[range].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn memory_range(disk_len: usize, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
    usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(len)?))
        .filter(|range| range.end <= disk_len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the end of the memory disk"))
}

/// Why a deploy failed, one variant per step.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("cannot tell the disk's length")]
    DiskLength { source: io::Error },
    #[error("the disk holds {disk_len} bytes, the image needs {file_len}")]
    DiskTooSmall { disk_len: u64, file_len: u64 },
    #[error("cannot read the disk at offset {offset}")]
    ReadDisk { offset: u64, source: io::Error },
    #[error("cannot fetch image bytes {start}..{end}")]
    Fetch { start: u64, end: u64, source: SourceError },
    #[error("gave up fetching image bytes {start}..{end} after {failures} failures in a row")]
    FetchGaveUp { start: u64, end: u64, failures: u32, source: SourceError },
    #[error("chunk {index} (offset {offset}) failed verification {attempts} times: the source serves bad data")]
    ChunkCorrupt { index: u32, offset: u64, attempts: u32 },
    #[error("cannot write the disk at offset {offset}")]
    WriteDisk { offset: u64, source: io::Error },
    #[error("cannot flush the disk")]
    Sync { source: io::Error },
    #[error("the disk's first {file_len} bytes hash to {actual}, the image is {expected}")]
    ReadBackHash { file_len: u64, expected: Hash, actual: Hash },
}

/// Why a manifest fetched for a deploy task is not the task's file.
#[derive(Debug, thiserror::Error)]
pub enum TaskManifestError {
    #[error("the task's file hash {file_hash:?} is not a hash")]
    TaskHash { file_hash: String, source: crate::HashParseError },
    #[error(
        "the manifest describes a file of {manifest_len} bytes with hash {manifest_hash}, the task one of {task_len} bytes with hash {task_hash}"
    )]
    Mismatch { manifest_len: u64, manifest_hash: Hash, task_len: u64, task_hash: Hash },
}

/// Checks that `manifest` describes the file a deploy task names (`file_len`, `file_hash` in
/// hex): a deploy agent and the simulated fleet call this before writing anything.
pub fn check_task_manifest(manifest: &Manifest, file_len: u64, file_hash: &str) -> Result<(), TaskManifestError> {
    let task_hash = Hash::from_hex(file_hash)
        .map_err(|source| TaskManifestError::TaskHash { file_hash: file_hash.chars().take(80).collect(), source })?;
    if manifest.file_len != file_len || manifest.file_hash != task_hash {
        return Err(TaskManifestError::Mismatch {
            manifest_len: manifest.file_len,
            manifest_hash: manifest.file_hash,
            task_len: file_len,
            task_hash,
        });
    }
    Ok(())
}

/// A failure as an agent reports it (`AgentReport::Failed`): control characters blanked, cut
/// on a character boundary to the wire contract's bound.
pub fn failure_reason(text: &str) -> String {
    let clean: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let mut end = clean.len().min(metalrack_api::agent::AGENT_REASON_BYTES_MAX);
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    clean[..end].to_string()
}

/// Plans, executes and finishes a deploy of `manifest`'s file onto `disk`: the disk then holds
/// the file in its first `file_len` bytes, verified whole. Returns the final figures.
pub fn deploy(
    manifest: &Manifest,
    source: &mut dyn ChunkSource,
    disk: &mut dyn Disk,
    options: &ExecuteOptions,
    progress: &mut dyn FnMut(&DeployProgress),
) -> Result<DeployProgress, DeployError> {
    let mut tracker = Tracker::new(manifest.file_len);
    let plan = plan::plan_tracked(manifest, disk, &mut tracker, progress)?;
    execute::execute_tracked(manifest, &plan, source, disk, options, &mut tracker, progress)?;
    execute::finish_tracked(manifest, disk, options, &mut tracker, progress)?;
    Ok(tracker.progress)
}

/// How often the rate is recomputed: a second smooths out per-chunk jitter.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// The running figures and the rate window.
pub(crate) struct Tracker {
    pub(crate) progress: DeployProgress,
    window_start: Instant,
    window_bytes_done: u64,
    started: Instant,
}

impl Tracker {
    pub(crate) fn new(bytes_total: u64) -> Tracker {
        let now = Instant::now();
        Tracker {
            progress: DeployProgress {
                phase: DeployPhase::Planning,
                bytes_total,
                bytes_done: 0,
                bytes_fetched: 0,
                bytes_written: 0,
                bytes_skipped: 0,
                chunks_refetched: 0,
                rate_bytes_per_s: 0,
            },
            window_start: now,
            window_bytes_done: 0,
            started: now,
        }
    }

    /// Updates the rate and tells the caller.
    pub(crate) fn report(&mut self, progress: &mut dyn FnMut(&DeployProgress)) {
        let now = Instant::now();
        let window = now.duration_since(self.window_start);
        if window >= RATE_WINDOW {
            self.progress.rate_bytes_per_s = per_second(self.progress.bytes_done - self.window_bytes_done, window);
            self.window_start = now;
            self.window_bytes_done = self.progress.bytes_done;
        } else if now.duration_since(self.started) < RATE_WINDOW {
            // The first second: the average so far beats a zero.
            self.progress.rate_bytes_per_s = per_second(self.progress.bytes_done, now.duration_since(self.started));
        }
        progress(&self.progress);
    }
}

fn per_second(bytes: u64, elapsed: Duration) -> u64 {
    let micros = elapsed.as_micros().max(1);
    u64::try_from(u128::from(bytes) * 1_000_000 / micros).unwrap_or(u64::MAX)
}
