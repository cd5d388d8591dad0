//! The one place the image library maps files into memory (its only `unsafe`).

use std::fs::File;

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
