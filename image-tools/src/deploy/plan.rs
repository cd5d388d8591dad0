//! The plan of a deploy: which of the manifest's chunks the disk lacks at their place.
//!
//! Reading is cheaper than fetching and writing: a redeploy of a new image version over the
//! old one writes only the chunks that changed, and a deploy that was cut short picks up
//! where it stopped.

use super::{DeployError, DeployPhase, DeployProgress, Disk, Tracker};
use crate::manifest::Manifest;
use crate::Hash;

/// A chunk to write: its index in the manifest, its place in the file, its length and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedChunk {
    pub index: u32,
    pub offset: u64,
    pub len: u32,
    pub hash: Hash,
}

/// The chunks to write, in file order, and what the disk already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub to_write: Vec<PlannedChunk>,
    pub bytes_to_write: u64,
    pub bytes_skipped: u64,
}

/// Reads the disk at every chunk's place and keeps the chunks whose bytes differ.
pub fn plan(manifest: &Manifest, disk: &dyn Disk) -> Result<Plan, DeployError> {
    plan_tracked(manifest, disk, &mut Tracker::new(manifest.file_len), &mut |_| {})
}

pub(crate) fn plan_tracked(
    manifest: &Manifest,
    disk: &dyn Disk,
    tracker: &mut Tracker,
    progress: &mut dyn FnMut(&DeployProgress),
) -> Result<Plan, DeployError> {
    let disk_len = disk.size_bytes().map_err(|source| DeployError::DiskLength { source })?;
    if disk_len < manifest.file_len {
        return Err(DeployError::DiskTooSmall { disk_len, file_len: manifest.file_len });
    }
    tracker.progress.phase = DeployPhase::Planning;
    tracker.report(progress);
    // One buffer of the longest chunk (at most CHUNK_LEN_MAX), reused for every read.
    let longest = manifest.chunks.iter().map(|chunk| chunk.len).max().unwrap_or(0);
    let mut buf = vec![0u8; longest as usize];
    let mut plan = Plan { to_write: Vec::new(), bytes_to_write: 0, bytes_skipped: 0 };
    for (index, (offset, chunk)) in manifest.chunk_offsets().enumerate() {
        let bytes = &mut buf[..chunk.len as usize];
        disk.read_at(bytes, offset).map_err(|source| DeployError::ReadDisk { offset, source })?;
        if Hash::of(bytes) == chunk.hash {
            plan.bytes_skipped += u64::from(chunk.len);
            tracker.progress.bytes_skipped += u64::from(chunk.len);
            tracker.progress.bytes_done += u64::from(chunk.len);
            tracker.report(progress);
        } else {
            plan.bytes_to_write += u64::from(chunk.len);
            // The manifest holds at most CHUNKS_MAX (< 2^32) chunks.
            plan.to_write.push(PlannedChunk { index: index as u32, offset, len: chunk.len, hash: chunk.hash });
        }
    }
    Ok(plan)
}
