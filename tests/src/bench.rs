//! What the benchmark programs (`bench_sync`, `bench_pxe`) share: finding the release binaries,
//! free disk space, the load average, and reporting a daemon that died with its log's tail.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use anyhow::{bail, ensure, Context, Result};

/// The workspace binaries a benchmark runs.
#[derive(Debug)]
pub struct Binaries {
    pub regiond: PathBuf,
    pub rackd: PathBuf,
    pub imgtool: PathBuf,
}

impl Binaries {
    /// The workspace binaries next to this executable (`target/release/` in the documented use).
    /// (The harness's `crate::binary` looks one level higher, right for test binaries.)
    pub fn locate() -> Result<Binaries> {
        let exe = std::env::current_exe().context("cannot find this executable's path")?;
        let dir = exe.parent().context("this executable has no directory")?;
        let find = |name: &str| {
            let path = dir.join(name);
            ensure!(
                path.is_file(),
                "{} is missing: run `cargo build --release --workspace --bins` first",
                path.display()
            );
            Ok(path)
        };
        Ok(Binaries { regiond: find("regiond")?, rackd: find("rackd")?, imgtool: find("imgtool")? })
    }
}

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

/// The error for a daemon `name` that exited with `status`: its last 20 log lines from `log`.
pub fn exited(name: &str, status: ExitStatus, log: &Path) -> Result<()> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    bail!("{name} exited ({status}); last log lines:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
}
