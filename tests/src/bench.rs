//! What only the benchmark programs (`bench_sync`, `bench_pxe`) share: free disk space and the
//! load average, which their reports state.

use std::path::Path;

use anyhow::{ensure, Context, Result};

/// Bytes free on the filesystem holding `dir` (`df`).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let output =
        std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output().context("cannot run df")?;
    ensure!(output.status.success(), "df {}: {}", dir.display(), String::from_utf8_lossy(&output.stderr).trim());
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().nth(1).and_then(|l| l.trim().parse().ok()).with_context(|| format!("unexpected df output {text:?}"))
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
