//! The one place the rack maps files into memory and asks which of their pages are cached (two
//! of the three `unsafe` blocks in the appliance; the third is `sync::partial::start_writeback`,
//! a system call without pointers).

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

/// Most bytes [`resident`] answers for: its answer vector lives on the stack, a byte per page.
pub const RESIDENT_CHECK_BYTES_MAX: usize = 1024 * 1024;

/// Whether every page under `bytes`, a slice of a mapping made by [`map_immutable`], is in the
/// page cache (`mincore`), so that sending it waits for no disk read. `false` when the kernel
/// cannot say, or for more than [`RESIDENT_CHECK_BYTES_MAX`].
///
/// The rack never touches a mapping's pages (they leave by `sendfile`), so for each page this is
/// one lookup in the file's page cache: cheap for a page or two, as costly per page as
/// `madvise(WILLNEED)` for a long range.
pub fn resident(bytes: &[u8]) -> bool {
    const PAGES_MAX: usize = RESIDENT_CHECK_BYTES_MAX / 4096;
    if bytes.is_empty() {
        return true;
    }
    let page = page_size();
    let start = bytes.as_ptr() as usize / page * page;
    let length = bytes.as_ptr() as usize + bytes.len() - start;
    let pages = length.div_ceil(page);
    if pages > PAGES_MAX {
        return false;
    }
    let mut answers = [0u8; PAGES_MAX];
    // SAFETY: `start..start + length` lies inside the mapping `bytes` is a slice of: mappings
    // start on a page boundary, so rounding `bytes`' start down to one stays inside it, and the
    // caller's borrow of `bytes` keeps it mapped for this call. mincore only reads the kernel's
    // page state for that range and writes one byte per page, `pages` ≤ PAGES_MAX, into
    // `answers`.
    #[allow(unsafe_code)]
    let status = unsafe { libc::mincore(start as *mut libc::c_void, length, answers.as_mut_ptr()) };
    status == 0 && answers[..pages].iter().all(|answer| answer & 1 == 1)
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|size| usize::try_from(size).ok())
            .filter(|size| size.is_power_of_two())
            .unwrap_or(4096)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_tells_cached_pages_from_dropped_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![9u8; 1 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        let map = map_immutable(&file).unwrap();
        assert!(resident(&map[100..300_000]), "just written: in the page cache");
        assert!(resident(&map[(1 << 20) - 1..]), "the last page");
        assert!(resident(&map[..0]));
        assert!(!resident(&vec![0u8; RESIDENT_CHECK_BYTES_MAX + 4097]), "beyond the check's bound");
        // Written back, then dropped from the cache: no longer resident.
        file.sync_all().unwrap();
        nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
        assert!(!resident(&map[100..300_000]), "dropped pages reported resident");
        assert!(!resident(&map[(1 << 20) - 1..]), "a dropped last page reported resident");
    }
}
