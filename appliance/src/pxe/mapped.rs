//! The one place the rack maps files into memory (one of the two `unsafe` blocks in the appliance;
//! the other is `sync::partial::start_writeback`, a system call without pointers).

use std::fs::File;

/// Maps a file of the image store read-only.
///
/// Only for files that never change once written: published snapshot files (hard links to
/// `files/<hash>`, renamed into place after verification and never written again) and the boot
/// loaders copied at start-up. Garbage collection unlinks such files but never truncates or
/// rewrites them, and an unlinked file stays valid for existing mappings on Linux.
pub fn map_immutable(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: memmap2 requires that the file is not modified (truncated or written) while
    // mapped; the store invariant above guarantees that for every path this is called on.
    #[allow(unsafe_code)]
    unsafe {
        memmap2::Mmap::map(file)
    }
}
