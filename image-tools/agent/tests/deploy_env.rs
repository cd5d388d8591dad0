//! The deploy environment built by `scripts/build-deploy-env` boots in QEMU (TCG, user
//! networking), runs the agent, which commissions the virtual machine against a test rack on
//! the host and powers it off; and two builds give identical bytes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{wait_child, TestRack, TOKEN};
use metalrack_api::agent::{AgentReport, AgentTask};

/// A fresh build compiles the static agent in release mode and downloads two packages.
const BUILD_DEADLINE: Duration = Duration::from_secs(45 * 60);
/// Seen: the environment reaches the agent in about 3 s under TCG; the inventory and power off
/// follow at once. Generous for a loaded CI machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const GUEST_MAC: &str = "52:54:00:12:34:56";
const DISK_BYTES: u64 = 8 * 1024 * 1024;

/// The target directory this test runs from (`target/debug/deps/deploy_env-*`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// Runs scripts/build-deploy-env once per test binary (it rebuilds only what changed) and
/// returns target/deploy-env.
fn built_env() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-deploy-env");
        let mut child = Command::new(&script).stdin(Stdio::null()).spawn().unwrap();
        let status = wait_child(&mut child, BUILD_DEADLINE)
            .unwrap_or_else(|| panic!("{} did not finish within {BUILD_DEADLINE:?}", script.display()));
        assert!(status.success(), "{} failed: {status}", script.display());
        let dir = target_dir().join("deploy-env");
        assert!(dir.join("kernel").is_file() && dir.join("initrd").is_file(), "{} lacks kernel/initrd", dir.display());
        dir
    })
}

/// Boots the environment in QEMU with an empty virtio disk of [`DISK_BYTES`] and a virtio NIC
/// on user networking, talking to `rack`; waits for QEMU to exit by itself. Returns the disk's
/// bytes and the console.
fn boot(rack: &TestRack) -> (Vec<u8>, String) {
    let env = built_env();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(DISK_BYTES).unwrap();
    let serial = dir.path().join("serial.log");
    // QEMU's user network puts the host at 10.0.2.2.
    let append = format!(
        "console=ttyS0 panic=-1 metalrack.rack=http://10.0.2.2:{} metalrack.mac={GUEST_MAC} metalrack.token={TOKEN}",
        rack.addr.port()
    );
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "512", "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(env.join("kernel"))
        .arg("-initrd")
        .arg(env.join("initrd"))
        .args(["-append", &append])
        .args(["-netdev", "user,id=n0", "-device", &format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}")])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
    let status = wait_child(&mut qemu, BOOT_DEADLINE);
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("QEMU did not exit within {BOOT_DEADLINE:?}; console:\n{console}"));
    assert!(status.success(), "QEMU exited with {status}; console:\n{console}");
    (std::fs::read(&disk).unwrap(), console)
}

#[test]
fn the_deploy_environment_boots_in_qemu_commissions_the_machine_and_powers_it_off() {
    let rack = TestRack::start("0.0.0.0:0");
    *rack.state.task.lock().unwrap() = Some(AgentTask::Commission { machine_id: "m1".into() });
    let (_, console) = boot(&rack);
    assert!(console.contains("reboot: Power down"), "the agent powered off (not a panic); console:\n{console}");
    let reports = rack.state.reports.lock().unwrap().clone();
    let [(AgentReport::Inventory { inventory }, auth, mac)] = &reports[..] else {
        panic!("one Inventory report expected, got {reports:?}; console:\n{console}")
    };
    assert_eq!(auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
    assert_eq!(mac, GUEST_MAC);
    assert!(
        inventory.disks.iter().any(|disk| disk.name == "vda" && disk.size_bytes == DISK_BYTES),
        "the virtio disk with its exact size: {inventory:?}"
    );
    assert!(inventory.nics.iter().any(|nic| nic.mac == GUEST_MAC), "the NIC QEMU was given: {inventory:?}");
    assert!(inventory.cpus >= 1 && inventory.memory_bytes > 0, "{inventory:?}");
}

#[test]
fn the_deploy_environment_writes_an_image_to_the_virtio_disk_and_reboots() {
    let rack = TestRack::start("0.0.0.0:0");
    let image = common::random_bytes(3 * 1024 * 1024 + 12_345, 9);
    rack.serve_image(&image);
    let (disk, console) = boot(&rack);
    assert!(console.contains("reboot: Restarting system"), "the agent rebooted; console:\n{console}");
    assert!(disk[..image.len()] == image[..], "the virtio disk holds the image; console:\n{console}");
    assert!(disk[image.len()..].iter().all(|&byte| byte == 0), "nothing written past the image");
    let reports = rack.reports();
    match reports.last() {
        Some(AgentReport::Deployed { progress }) => assert_eq!(progress.bytes_written, image.len() as u64),
        other => panic!("the last report is not Deployed: {other:?}; console:\n{console}"),
    }
}

#[test]
fn two_builds_of_the_deploy_environment_are_identical() {
    let env = built_env();
    let target = target_dir();
    let host_agent = std::fs::read_dir(&target)
        .unwrap()
        .filter_map(|entry| Some(entry.ok()?.path().join("release/metalrack-agent")))
        .find(|path| path.is_file())
        .expect("the static agent built by scripts/build-deploy-env");
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for name in ["a", "b"] {
        let out = dir.path().join(name);
        let status = Command::new(target.join("debug/imgtool"))
            .args(["deploy-env", "build", "--out"])
            .arg(&out)
            .arg("--agent")
            .arg(&host_agent)
            .arg("--cache")
            .arg(target.join("deploy-env-cache"))
            .status()
            .unwrap();
        assert!(status.success());
        outputs.push((std::fs::read(out.join("kernel")).unwrap(), std::fs::read(out.join("initrd")).unwrap()));
    }
    assert!(outputs[0] == outputs[1], "two builds differ");
    let initrd = &outputs[0].1;
    assert!(initrd == &std::fs::read(env.join("initrd")).unwrap(), "the script's build is the same");
    assert!(initrd.starts_with(b"070701"), "an uncompressed newc archive");
}
