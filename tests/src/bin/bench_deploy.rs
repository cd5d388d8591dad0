//! `bench_deploy`: power-on to Deployed for a 1 GiB bootable image in the lab, per phase, and a
//! redeploy after a small change, on one QEMU machine (TCG) behind the lab's Redfish BMC; beside
//! it, `curl` fetching the same image file from the rack's HTTP boot server in the same
//! namespace (the rack's rate to a plain client, the ceiling for the image stream).
//!
//! Phases are read off the region's event log (the rack flushes its queued events every second,
//! and the region stamps them on arrival: each phase boundary is known to about ±1 s):
//! power (deploy asked → the BMC did it), firmware+DHCP (→ first DHCP answer), loaders (→ the
//! iPXE script for the deploy environment), kernel+initrd (→ the agent took its task), image
//! stream (→ the agent reported the image written and verified), reboot (→ the region shows
//! Deployed: the machine asked for its script and was sent to its disk).
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench_deploy [--size-mib N]`
//! (root; builds the deploy environment with scripts/build-deploy-env if needed).

use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Instant;

use metalrack_api::agent::EraseMode;
use metalrack_api::machines::{DeployRequest, MachineState, ReleaseRequest};
use metalrack_api::{paths, EventView};
use metalrack_hardware::Lab;
use metalrack_tests::deploy_lab::{DeployLab, DeployLabSpec};
use metalrack_tests::disk_image::bootable_disk_image;

const MAC: &str = "52:54:00:dd:00:02";
const IMAGE: &str = "bench/deployed";

fn main() -> ExitCode {
    let mut size_mib: u64 = 1024;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, value] = args.as_slice() {
        if flag == "--size-mib" {
            size_mib = value.parse().expect("--size-mib N");
        }
    }
    let env = metalrack_tests::deploy_env::deploy_env().to_path_buf();
    let lab = Arc::new(Lab::new([10, 96, 0]).expect("a lab namespace (needs root)"));
    let tap = lab.add_tap().expect("a tap");
    let inside = lab.clone();
    metalrack_tests::lab::block_on_in(&lab, None, move || async move { run(inside, &tap, &env, size_mib).await })
        .expect("ran inside the lab");
    ExitCode::SUCCESS
}

/// Seconds from `start` to the first event after it matching `kind` and `text`.
fn at(events: &[EventView], from_ms: i64, kind: &str, text: &str) -> Option<i64> {
    events.iter().find(|e| e.at_ms >= from_ms && e.kind == kind && e.message.contains(text)).map(|e| e.at_ms)
}

async fn deploy_phases(site: &DeployLab, version: &str) -> (Vec<(&'static str, f64)>, f64) {
    let before = site.api().events().await.unwrap().iter().map(|e| e.id).max().unwrap_or(0);
    let started = Instant::now();
    let request =
        DeployRequest { image: IMAGE.into(), arch: "amd64".into(), version: Some(version.into()), disk: None };
    site.act(paths::MACHINE_DEPLOY, &request).await;
    site.wait_state(MachineState::Deployed, "the deploy to end Deployed").await;
    let total_s = started.elapsed().as_secs_f64();
    let events = site.events_after(before).await;
    let start = events.first().map(|e| e.at_ms).expect("events of the deploy");
    let marks = [
        ("power", at(&events, start, "machine.power_result", "power cycle")),
        ("firmware + DHCP", at(&events, start, "boot.dhcp", "DHCP ack")),
        ("loaders + script", at(&events, start, "boot.script", "deploy environment")),
        ("kernel + initrd + agent start", at(&events, start, "boot.agent", "took its task")),
        ("image stream (plan, write, verify)", at(&events, start, "machine.deployed", "")),
        ("reboot to the disk", at(&events, start, "machine.booted_local", "")),
    ];
    let mut phases = Vec::new();
    let mut previous = start;
    for (name, mark) in marks {
        let mark = mark.unwrap_or_else(|| panic!("no event for phase {name}: {events:#?}"));
        phases.push((name, (mark - previous) as f64 / 1000.0));
        previous = mark;
    }
    (phases, total_s)
}

async fn run(lab: Arc<Lab>, tap: &str, env: &Path, size_mib: u64) {
    let dir = tempfile::tempdir().unwrap();
    // A bootable image holding `size_mib` of incompressible data in a file, so the stream is real.
    let payload = metalrack_tests::random_bytes(((size_mib - 48) << 20) as usize, 7);
    let v1 = bootable_disk_image(dir.path(), "v1.img", &env.join("kernel"), "v1", size_mib, &[("payload", &payload)]);
    let v2 = bootable_disk_image(dir.path(), "v2.img", &env.join("kernel"), "v2", size_mib, &[("payload", &payload)]);
    drop(payload);
    let spec = DeployLabSpec {
        env,
        dir: dir.path(),
        mac: MAC,
        disk_bytes: (size_mib + 256) << 20,
        memory_mib: 512,
        pxe_extra: "",
    };
    let site = DeployLab::start(&lab, tap, &spec).await;
    site.push_image(&v1, IMAGE, "1").await;
    site.act(paths::MACHINE_COMMISSION, &serde_json::json!({})).await;
    site.wait_state(MachineState::Ready, "commissioning").await;

    // The rack's HTTP rate to curl in the same namespace, same file, page cache warm.
    let url = format!("http://{}:5248/images/{IMAGE}/amd64/1/root-disk", lab.gateway());
    let curl = |out: &str| {
        let output = Command::new("curl")
            .args(["-s", "-o", out, "-w", "%{speed_download} %{size_download}", &url])
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let mut words = text.split_whitespace();
        let speed: f64 = words.next().and_then(|w| w.parse().ok()).expect("curl's speed");
        let size: f64 = words.next().and_then(|w| w.parse().ok()).expect("curl's size");
        assert_eq!(size as u64, std::fs::metadata(&v1).unwrap().len(), "curl got the whole file");
        speed
    };
    curl("/dev/null");
    let curl_null = curl("/dev/null");
    let curl_file_path = dir.path().join("curl.out");
    let curl_file = curl(curl_file_path.to_str().unwrap());
    let _ = std::fs::remove_file(&curl_file_path);

    let (first, first_total) = deploy_phases(&site, "1").await;
    let first_progress = site.machine().await.unwrap().progress.unwrap();
    site.act(paths::MACHINE_RELEASE, &ReleaseRequest { erase: EraseMode::None }).await;
    site.wait_state(MachineState::Ready, "the release").await;
    site.push_image(&v2, IMAGE, "2").await;
    let (again, again_total) = deploy_phases(&site, "2").await;
    let again_progress = site.machine().await.unwrap().progress.unwrap();

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("\n## Deploy of a {size_mib} MiB image (QEMU TCG, 1 vCPU, virtio disk and NIC)\n");
    println!("| phase | first deploy (s) | redeploy after a small change (s) |");
    println!("|---|---:|---:|");
    for ((name, a), (_, b)) in first.iter().zip(&again) {
        println!("| {name} | {a:.1} | {b:.1} |");
    }
    println!("| **deploy asked → Deployed** | **{first_total:.1}** | **{again_total:.1}** |");
    let stream_s = first[4].1;
    println!(
        "\nFirst deploy: {:.0} MiB fetched, {:.0} MiB written, {:.0} MiB skipped (already zeros on the new disk), \
         {} chunks fetched again; image stream phase {:.1} s = {:.1} MiB/s of image.",
        mib(first_progress.bytes_fetched),
        mib(first_progress.bytes_written),
        mib(first_progress.bytes_skipped),
        first_progress.chunks_refetched,
        stream_s,
        size_mib as f64 / stream_s
    );
    println!(
        "Redeploy: {:.2} MiB fetched, {:.2} MiB written, {:.0} MiB skipped.",
        mib(again_progress.bytes_fetched),
        mib(again_progress.bytes_written),
        mib(again_progress.bytes_skipped)
    );
    println!(
        "The rack's HTTP rate to curl in the same namespace, same file: {:.0} MiB/s to /dev/null, {:.0} MiB/s to a file.",
        curl_null / (1 << 20) as f64,
        curl_file / (1 << 20) as f64
    );
}
