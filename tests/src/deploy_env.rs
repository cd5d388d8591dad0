//! The deploy environment (Debian's cloud kernel, busybox and the static agent), built by
//! `scripts/build-deploy-env` into `target/deploy-env` once per test binary (the script rebuilds
//! only what changed, and keeps the Debian packages it downloaded).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// A first build downloads two Debian packages and builds the agent in release mode: minutes on
/// a 2-core machine.
const BUILD_DEADLINE: Duration = Duration::from_secs(45 * 60);

/// `target/deploy-env` with `kernel` and `initrd`, built if needed.
pub fn deploy_env() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let script = root.join("scripts/build-deploy-env");
        let mut child = Command::new(&script).current_dir(&root).stdin(Stdio::null()).spawn().unwrap();
        let deadline = std::time::Instant::now() + BUILD_DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                panic!("{} did not finish within {BUILD_DEADLINE:?}", script.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(status.success(), "{} failed: {status}", script.display());
        let dir = crate::binaries::target_dir().join("deploy-env");
        assert!(dir.join("kernel").is_file() && dir.join("initrd").is_file(), "{} lacks kernel/initrd", dir.display());
        dir
    })
}
