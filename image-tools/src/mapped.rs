//! The one place the image library maps files into memory (its only `unsafe` blocks).

use std::fs::File;
use std::ops::Range;

/// Maps a file the caller is about to read once, read-only, to chunk and hash it without
/// copying it through a buffer.
///
/// Used by [`crate::chunker::chunk_file`] on the file a user names (`imgtool chunk`, `imgtool
/// push`), which this process does not own: if another process truncates the file meanwhile,
/// touching the lost pages raises SIGBUS and the process dies; if it writes to the file, the
/// manifest describes a mix of old and new bytes (as a `read()`-based chunker would) and fails
/// verification later. `b3sum` and ripgrep make the same trade for the same speed.
pub(crate) fn map_for_reading(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: memmap2 requires that the file is not modified while mapped. It is not ours to
    // lock; the consequences of a concurrent writer are bounded as described above (a crash or
    // a manifest that fails verification), and the mapping never outlives `chunk_file`.
    #[allow(unsafe_code)]
    unsafe {
        memmap2::Mmap::map(file)
    }
}

/// Drops this process's page table entries for `range` of a mapping made by
/// [`map_for_reading`], which the caller has finished reading: the pages stay in the page cache
/// (shared, reclaimable) but no longer count in the process's resident set. Without it, chunking
/// a 10 GiB image showed a 10 GiB RSS (`VmHWM`) for `imgtool push`, though none of it was
/// allocated. `range` must start on a page boundary; a failure only leaves the pages counted.
pub(crate) fn release(map: &memmap2::Mmap, range: Range<usize>) {
    if range.is_empty() {
        return;
    }
    // SAFETY: `map` is a shared, read-only file mapping (`Mmap::map`). On such a mapping
    // MADV_DONTNEED only unmaps the pages from this process; the next access faults the same
    // page-cache page back in, so every byte a live borrow of the mapping shows is unchanged
    // (under the same no-concurrent-writer assumption as the mapping itself). The zero-filled
    // pages memmap2 warns about happen only on private or anonymous mappings.
    #[allow(unsafe_code)]
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len()) };
}
