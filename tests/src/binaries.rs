//! Where the workspace binaries the harness runs are: next to the running executable (a
//! benchmark in `target/PROFILE/`) or one level up (a test in `target/PROFILE/deps/`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// The path of workspace binary `name`, built by `cargo build --workspace --bins` (with
/// `--release` for the benchmarks); an error saying so when it is missing.
pub fn locate(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let dir = exe.parent().context("this executable has no directory")?;
    for candidate in [Some(dir), dir.parent()].into_iter().flatten() {
        let path = candidate.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "{name} is missing from {}: run `cargo build --workspace --bins` first (with --release for the benchmarks)",
        dir.display()
    )
}

/// The cargo target directory this test runs from (`target/`): the directory above the
/// profile's (`target/debug/deps/TEST` → `target`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("this executable's path");
    exe.ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .unwrap_or_else(|| panic!("{} is not inside a cargo target directory", exe.display()))
        .to_path_buf()
}

/// [`locate`] for tests: panics with the reason.
pub fn binary(name: &str) -> PathBuf {
    locate(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The workspace binaries a benchmark runs, found before it starts anything.
#[derive(Debug)]
pub struct Binaries {
    pub regiond: PathBuf,
    pub rackd: PathBuf,
    pub imgtool: PathBuf,
}

impl Binaries {
    pub fn locate() -> Result<Binaries> {
        Ok(Binaries { regiond: locate("regiond")?, rackd: locate("rackd")?, imgtool: locate("imgtool")? })
    }
}
