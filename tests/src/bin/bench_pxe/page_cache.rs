//! The page cache of one file: warming it, dropping its pages, and how much of it is resident.

use std::fs::File;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// Reads the whole file, so its pages are in the page cache.
pub fn warm_file(path: &Path) -> Result<()> {
    let mut file = File::open(path)?;
    std::io::copy(&mut file, &mut std::io::sink())?;
    Ok(())
}

/// Drops the file's pages from the page cache (only this file's: the servers' binaries and the
/// rest of the machine stay warm, unlike `echo 3 > /proc/sys/vm/drop_caches`).
pub fn evict_file(path: &Path) -> Result<()> {
    let file = File::open(path)?;
    file.sync_all()?; // dirty pages cannot be dropped
    nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .with_context(|| format!("posix_fadvise(DONTNEED) on {}", path.display()))?;
    Ok(())
}

/// Bytes of the file in the page cache, as `fincore` reports them.
pub fn resident_bytes(path: &Path) -> Result<u64> {
    let output =
        Command::new("fincore").args(["--bytes", "--noheadings", "--raw", "--output", "RES"]).arg(path).output()?;
    ensure!(output.status.success(), "fincore: {}", String::from_utf8_lossy(&output.stderr).trim());
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim().parse().with_context(|| format!("unexpected fincore output {text:?}"))
}
