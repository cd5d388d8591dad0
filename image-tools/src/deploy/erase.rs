//! Erasing a disk on release: the partition tables (quick) or every byte (full).
//!
//! A full erase writes zeros. BLKDISCARD would be faster on disks that support it, but nix's
//! ioctl macros generate `unsafe fn`s and the workspace denies `unsafe_code`; zeros are correct
//! on every disk, discard is only an optimisation.

use std::io;

use super::execute::RANGE_BYTES_MAX;
use super::{Disk, EraseMode};

/// Bytes a quick erase zeroes at each end: the MBR and the primary GPT (first 34 sectors) and
/// the backup GPT (last 33 sectors) are well inside a MiB, and so are most filesystems'
/// superblocks at the start.
pub const ERASE_QUICK_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    #[error("cannot tell the disk's length")]
    DiskLength { source: io::Error },
    #[error("cannot write zeros at offset {offset}")]
    Write { offset: u64, source: io::Error },
    #[error("cannot flush the disk")]
    Sync { source: io::Error },
}

/// Erases `disk` as `mode` asks, calling `progress` with the bytes zeroed so far and the total.
pub fn erase(disk: &mut dyn Disk, mode: EraseMode, progress: &mut dyn FnMut(u64, u64)) -> Result<(), EraseError> {
    let disk_len = disk.size_bytes().map_err(|source| EraseError::DiskLength { source })?;
    let ranges: Vec<std::ops::Range<u64>> = match mode {
        EraseMode::None => return Ok(()),
        EraseMode::Quick => {
            let head = disk_len.min(ERASE_QUICK_BYTES);
            let tail_start = disk_len.saturating_sub(ERASE_QUICK_BYTES).max(head);
            vec![0..head, tail_start..disk_len]
        }
        EraseMode::Full => std::iter::once(0..disk_len).collect(),
    };
    let total: u64 = ranges.iter().map(|range| range.end - range.start).sum();
    let zeros = vec![0u8; RANGE_BYTES_MAX.min(usize::try_from(total).unwrap_or(usize::MAX))];
    let mut done = 0u64;
    for range in ranges {
        let mut offset = range.start;
        while offset < range.end {
            let len = (range.end - offset).min(zeros.len() as u64) as usize;
            disk.write_at(&zeros[..len], offset).map_err(|source| EraseError::Write { offset, source })?;
            offset += len as u64;
            done += len as u64;
            progress(done, total);
        }
    }
    disk.sync().map_err(|source| EraseError::Sync { source })
}
