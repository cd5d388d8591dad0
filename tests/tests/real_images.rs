//! A real Debian image's update, small enough for `./scripts/test`: `bench_sync --debian small`
//! builds (or reuses, cached by recipe under the target dir) a minbase Debian system as two
//! 256 MiB ext4 images, v2 = v1 with one package installed, then measures Metalrack's update of
//! a rack holding v1 against `rsync --no-whole-file` from an rsync daemon. The bench checks that
//! the rack's file and rsync's result hash to v2; this test checks that Metalrack moved fewer
//! bytes. It keeps the full benchmark's code (docs/PERFORMANCE.md, "Real Debian images") from
//! rotting. Needs root, `mmdebstrap`, `e2fsprogs`, `rsync`, `b3sum` and the Debian mirror
//! (scripts/test installs the packages); an unreachable mirror fails the test, saying so.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Building the small images takes about 2 minutes the first time (two mmdebstrap runs sharing
/// their downloads), seconds when cached; the sync itself about 20 s in a debug build. Only a
/// hang trips this.
const BENCH_DEADLINE: Duration = Duration::from_secs(10 * 60);

#[test]
fn metalrack_moves_fewer_bytes_than_rsync_for_a_real_debian_update() {
    let work = tempfile::tempdir().unwrap();
    let summary_path = work.path().join("summary.json");
    // Cached across test runs by recipe key (the dir name holds it), like the full benchmark's.
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("debian-images");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bench_sync"))
        .args(["--debian", "small", "--peers", "rsync", "--runs", "1"])
        .arg("--image-cache")
        .arg(&cache)
        .arg("--work-dir")
        .arg(work.path())
        .arg("--summary")
        .arg(&summary_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bench_sync runs");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > BENCH_DEADLINE {
            let _ = child.kill();
            panic!("bench_sync --debian small did not finish within {BENCH_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "bench_sync --debian small failed ({status}):\n{stderr}\n{stdout}");
    println!("{stdout}");

    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    let scenario = &summary["scenarios"][0];
    let metalrack = scenario["metalrack"][0]["wire_bytes"].as_u64().expect("Metalrack's bytes");
    let rsync = scenario["peers"]["rsync"][0]["wire_bytes"].as_u64().expect("rsync's bytes");
    let first_sync = summary["first_sync_metalrack_bytes"].as_u64().unwrap();
    let v1 = summary["v1_bytes"].as_u64().unwrap();
    // The update is one small package (`less`, ~150 KiB installed) and dpkg's state.
    assert!(metalrack > 0, "the update moved something");
    assert!(metalrack < rsync, "Metalrack moved {metalrack} B, rsync --no-whole-file {rsync} B:\n{stdout}");
    // A first sync of a real image travels compressed: well under the file's size.
    assert!(first_sync < v1 / 2, "first sync moved {first_sync} B of a {v1} B image");
}
