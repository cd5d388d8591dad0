//! Executing a plan: fetch the chunks to write in coalesced ranges, verify each chunk against
//! the manifest, write it; then flush and read the whole image back.
//!
//! A chunk that fails verification is fetched again alone (a few times) and never written
//! unverified. A failed fetch keeps the whole chunks that did arrive (verified and written),
//! then resumes from the first chunk not yet written, with backoff, a bound on failures in a
//! row and a deadline without progress.

use std::time::{Duration, Instant};

use super::plan::{Plan, PlannedChunk};
use super::{ChunkSource, DeployError, DeployPhase, DeployProgress, Disk, SourceError, Tracker};
use crate::manifest::Manifest;
use crate::Hash;

/// Longest range fetched at once, and so the buffer a deploy holds: 4 MiB is a few dozen
/// default chunks per request (request overhead stays small) at a memory cost that fits the
/// smallest deploy environment. A single chunk longer than this (up to CHUNK_LEN_MAX) is
/// fetched alone, so the buffer is at most max(RANGE_BYTES_MAX, longest chunk).
pub const RANGE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Times one chunk is fetched again after failing verification before the deploy fails: a
/// source that keeps serving bad bytes for a chunk will not get better.
const CHUNK_REFETCHES_MAX: u32 = 3;

/// How a deploy retries a source that fails.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Failed fetches in a row (no chunk written between them) before giving up.
    pub failures_max: u32,
    /// The first wait after a failure; doubled after each one in a row, up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// The longest time without a chunk written before giving up, whatever the count.
    pub stall_deadline: Duration,
}

impl Default for RetryPolicy {
    /// 10 failures with waits of 0.2 s doubling to 10 s (about 40 s in all) ride out a rack
    /// restart; 5 minutes without progress means the rack is gone and the operator should know.
    fn default() -> Self {
        RetryPolicy {
            failures_max: 10,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            stall_deadline: Duration::from_secs(300),
        }
    }
}

/// Knobs of a deploy (tests use small ranges and short waits).
#[derive(Debug, Clone, Copy)]
pub struct ExecuteOptions {
    /// Longest coalesced range; [`RANGE_BYTES_MAX`] unless a test wants many ranges.
    pub range_bytes_max: usize,
    pub retry: RetryPolicy,
}

impl Default for ExecuteOptions {
    fn default() -> Self {
        ExecuteOptions { range_bytes_max: RANGE_BYTES_MAX, retry: RetryPolicy::default() }
    }
}

/// Executes `plan` (from [`super::plan`]) without progress reports: for callers that planned
/// separately.
pub fn execute(
    manifest: &Manifest,
    plan: &Plan,
    source: &mut dyn ChunkSource,
    disk: &mut dyn Disk,
    options: &ExecuteOptions,
) -> Result<DeployProgress, DeployError> {
    let mut tracker = Tracker::new(manifest.file_len);
    tracker.progress.bytes_skipped = plan.bytes_skipped;
    tracker.progress.bytes_done = plan.bytes_skipped;
    execute_tracked(manifest, plan, source, disk, options, &mut tracker, &mut |_| {})?;
    Ok(tracker.progress)
}

/// Flushes the disk and checks its first `file_len` bytes against the file's hash.
pub fn finish(manifest: &Manifest, disk: &mut dyn Disk, options: &ExecuteOptions) -> Result<(), DeployError> {
    finish_tracked(manifest, disk, options, &mut Tracker::new(manifest.file_len), &mut |_| {})
}

/// Consecutive chunks in the file, fetched with one request.
fn ranges(to_write: &[PlannedChunk], range_bytes_max: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut range_len = 0u64;
    for (position, chunk) in to_write.iter().enumerate() {
        if position > start {
            let previous = &to_write[position - 1];
            let adjacent = previous.offset + u64::from(previous.len) == chunk.offset;
            if !adjacent || range_len + u64::from(chunk.len) > range_bytes_max as u64 {
                ranges.push(start..position);
                start = position;
                range_len = 0;
            }
        }
        range_len += u64::from(chunk.len);
    }
    if start < to_write.len() {
        ranges.push(start..to_write.len());
    }
    ranges
}

/// Failures in a row and the time of the last chunk written.
struct Retry {
    policy: RetryPolicy,
    failures: u32,
    last_progress: Instant,
}

impl Retry {
    fn progressed(&mut self) {
        self.failures = 0;
        self.last_progress = Instant::now();
    }

    /// Waits before the next try, or says why there is none.
    fn after_failure(&mut self, error: SourceError, start: u64, end: u64) -> Result<(), DeployError> {
        if !error.retryable {
            return Err(DeployError::Fetch { start, end, source: error });
        }
        self.failures += 1;
        if self.failures > self.policy.failures_max || self.last_progress.elapsed() > self.policy.stall_deadline {
            return Err(DeployError::FetchGaveUp { start, end, failures: self.failures, source: error });
        }
        let doublings = (self.failures - 1).min(16);
        let wait = self.policy.backoff_initial.saturating_mul(1 << doublings).min(self.policy.backoff_max);
        tracing::warn!(start, end, failures = self.failures, ?wait, error = %error.message, "fetch failed; retrying");
        std::thread::sleep(wait);
        Ok(())
    }
}

pub(crate) fn execute_tracked(
    manifest: &Manifest,
    plan: &Plan,
    source: &mut dyn ChunkSource,
    disk: &mut dyn Disk,
    options: &ExecuteOptions,
    tracker: &mut Tracker,
    progress: &mut dyn FnMut(&DeployProgress),
) -> Result<(), DeployError> {
    assert!(options.range_bytes_max > 0, "range_bytes_max must be positive");
    tracker.progress.phase = DeployPhase::Writing;
    tracker.report(progress);
    let ranges = ranges(&plan.to_write, options.range_bytes_max);
    let range_len = |range: &std::ops::Range<usize>| -> usize {
        plan.to_write[range.clone()].iter().map(|chunk| chunk.len as usize).sum()
    };
    let longest = ranges.iter().map(range_len).max().unwrap_or(0);
    let mut buf = vec![0u8; longest];
    let mut retry = Retry { policy: options.retry, failures: 0, last_progress: Instant::now() };
    for range in &ranges {
        let chunks = &plan.to_write[range.clone()];
        let range_offset = chunks[0].offset;
        let buf = &mut buf[..range_len(range)];
        // `cursor`: the first chunk of the range not yet written; `cursor_rel` its place in buf.
        let mut cursor = 0;
        let mut cursor_rel = 0usize;
        while cursor < chunks.len() {
            let want = &mut buf[cursor_rel..];
            let want_len = want.len();
            let (received, failure) = match source.fetch(range_offset + cursor_rel as u64, want) {
                Ok(()) => (want_len, None),
                Err(error) => (error.received.min(want_len), Some(error)),
            };
            tracker.progress.bytes_fetched += received as u64;
            let received_end = cursor_rel + received;
            let cursor_before = cursor;
            while cursor < chunks.len() && cursor_rel + chunks[cursor].len as usize <= received_end {
                let chunk = chunks[cursor];
                let slot = &mut buf[cursor_rel..cursor_rel + chunk.len as usize];
                if Hash::of(slot) != chunk.hash {
                    refetch_alone(chunk, slot, source, &mut retry, tracker)?;
                }
                write_verified(disk, chunk, slot, manifest)?;
                tracker.progress.bytes_written += u64::from(chunk.len);
                tracker.progress.bytes_done += u64::from(chunk.len);
                tracker.report(progress);
                cursor += 1;
                cursor_rel += chunk.len as usize;
            }
            if cursor > cursor_before {
                retry.progressed();
            }
            if let Some(error) = failure {
                let end = range_offset + buf.len() as u64;
                retry.after_failure(error, range_offset + cursor_rel as u64, end)?;
            }
        }
    }
    Ok(())
}

/// Fetches one chunk again until it verifies, at most [`CHUNK_REFETCHES_MAX`] times.
fn refetch_alone(
    chunk: PlannedChunk,
    slot: &mut [u8],
    source: &mut dyn ChunkSource,
    retry: &mut Retry,
    tracker: &mut Tracker,
) -> Result<(), DeployError> {
    let end = chunk.offset + u64::from(chunk.len);
    for attempt in 1..=CHUNK_REFETCHES_MAX {
        tracing::warn!(
            index = chunk.index,
            offset = chunk.offset,
            attempt,
            "chunk failed verification; fetching it again"
        );
        tracker.progress.chunks_refetched += 1;
        loop {
            match source.fetch(chunk.offset, slot) {
                Ok(()) => break,
                Err(error) => {
                    tracker.progress.bytes_fetched += error.received.min(slot.len()) as u64;
                    retry.after_failure(error, chunk.offset, end)?;
                }
            }
        }
        tracker.progress.bytes_fetched += u64::from(chunk.len);
        if Hash::of(slot) == chunk.hash {
            return Ok(());
        }
    }
    Err(DeployError::ChunkCorrupt { index: chunk.index, offset: chunk.offset, attempts: CHUNK_REFETCHES_MAX })
}

/// Writes a chunk that was just verified; the assertion keeps the invariant on the write side.
fn write_verified(
    disk: &mut dyn Disk,
    chunk: PlannedChunk,
    bytes: &[u8],
    manifest: &Manifest,
) -> Result<(), DeployError> {
    debug_assert_eq!(Hash::of(bytes), manifest.chunks[chunk.index as usize].hash);
    disk.write_at(bytes, chunk.offset).map_err(|source| DeployError::WriteDisk { offset: chunk.offset, source })
}

pub(crate) fn finish_tracked(
    manifest: &Manifest,
    disk: &mut dyn Disk,
    options: &ExecuteOptions,
    tracker: &mut Tracker,
    progress: &mut dyn FnMut(&DeployProgress),
) -> Result<(), DeployError> {
    tracker.progress.phase = DeployPhase::Verifying;
    tracker.report(progress);
    disk.sync().map_err(|source| DeployError::Sync { source })?;
    let mut hasher = blake3::Hasher::new();
    let piece_len = options.range_bytes_max.min(usize::try_from(manifest.file_len).unwrap_or(usize::MAX));
    let mut buf = vec![0u8; piece_len];
    let mut offset = 0u64;
    while offset < manifest.file_len {
        let len = (manifest.file_len - offset).min(piece_len as u64) as usize;
        disk.read_at(&mut buf[..len], offset).map_err(|source| DeployError::ReadDisk { offset, source })?;
        hasher.update(&buf[..len]);
        offset += len as u64;
    }
    let actual = Hash(*hasher.finalize().as_bytes());
    if actual != manifest.file_hash {
        return Err(DeployError::ReadBackHash { file_len: manifest.file_len, expected: manifest.file_hash, actual });
    }
    tracker.progress.phase = DeployPhase::Done;
    tracker.report(progress);
    Ok(())
}
