//! The real agent binary against a test rack on loopback: deploys, redeploys, bad chunks in
//! transit, and commissioning this host.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{random_bytes, run_agent, TestRack, TOKEN};
use metalrack_api::agent::{AgentReport, AgentTask, DeployPhase, EraseMode};

const DEADLINE: Duration = Duration::from_secs(120);
const IMAGE_BYTES: usize = 6 * 1024 * 1024;

fn deployed(reports: &[AgentReport]) -> metalrack_api::agent::DeployProgress {
    match reports.last() {
        Some(AgentReport::Deployed { progress }) => *progress,
        other => panic!("the last report is not Deployed: {other:?} (all: {reports:?})"),
    }
}

#[test]
fn a_deploy_to_an_empty_file_writes_the_image_and_reports_progress_then_deployed() {
    let rack = TestRack::start("127.0.0.1:0");
    let image = random_bytes(IMAGE_BYTES, 1);
    rack.serve_image(&image);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::write(&disk, b"").unwrap();
    let status = run_agent(&rack, &["--disk", disk.to_str().unwrap()], DEADLINE);
    assert!(status.success(), "{status}");
    assert!(std::fs::read(&disk).unwrap() == image, "the disk file equals the image");
    let reports = rack.reports();
    assert!(matches!(reports.first(), Some(AgentReport::Progress { .. })), "{reports:?}");
    let done = deployed(&reports);
    assert_eq!(done.phase, DeployPhase::Done);
    assert_eq!((done.bytes_written, done.bytes_done, done.bytes_skipped), (IMAGE_BYTES as u64, IMAGE_BYTES as u64, 0));
    assert_eq!(rack.state.bytes_served.load(Ordering::SeqCst), IMAGE_BYTES as u64);
    // Every request carried the job's token, and reports name the machine's MAC.
    let bearer = format!("Bearer {TOKEN}");
    assert!(rack.state.task_auth.lock().unwrap().iter().all(|auth| auth.as_deref() == Some(bearer.as_str())));
    for (_, auth, mac) in rack.state.reports.lock().unwrap().iter() {
        assert_eq!((auth.as_deref(), mac.as_str()), (Some(bearer.as_str()), "52:54:00:aa:bb:01"));
    }
}

#[test]
fn a_redeploy_fetches_and_writes_only_the_chunks_that_changed() {
    let rack = TestRack::start("127.0.0.1:0");
    let v1 = random_bytes(IMAGE_BYTES, 2);
    rack.serve_image(&v1);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::write(&disk, b"").unwrap();
    assert!(run_agent(&rack, &["--disk", disk.to_str().unwrap()], DEADLINE).success());

    let mut v2 = v1.clone();
    for at in [100_000, 3_000_000, 5_500_000] {
        v2[at..at + 200].iter_mut().for_each(|byte| *byte = byte.wrapping_add(1));
    }
    let manifest = rack.serve_image(&v2);
    let changed: u64 = manifest
        .chunk_offsets()
        .filter(|(offset, chunk)| {
            let range = *offset as usize..*offset as usize + chunk.len as usize;
            v1[range.clone()] != v2[range]
        })
        .map(|(_, chunk)| u64::from(chunk.len))
        .sum();
    assert!(changed > 0 && changed < IMAGE_BYTES as u64 / 4, "a few chunks changed: {changed} bytes");
    rack.state.bytes_served.store(0, Ordering::SeqCst);
    rack.state.reports.lock().unwrap().clear();
    assert!(run_agent(&rack, &["--disk", disk.to_str().unwrap()], DEADLINE).success());
    assert!(std::fs::read(&disk).unwrap() == v2, "the disk file equals v2");
    assert_eq!(rack.state.bytes_served.load(Ordering::SeqCst), changed, "only the changed chunks were served");
    let done = deployed(&rack.reports());
    assert_eq!(done.bytes_written, changed);
    assert_eq!(done.bytes_skipped, IMAGE_BYTES as u64 - changed);
}

#[test]
fn a_chunk_corrupted_in_transit_is_fetched_again_and_the_deploy_is_right() {
    let rack = TestRack::start("127.0.0.1:0");
    let image = random_bytes(IMAGE_BYTES, 3);
    rack.serve_image(&image);
    *rack.state.corrupt_once.lock().unwrap() = Some(4_000_000);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::write(&disk, b"").unwrap();
    assert!(run_agent(&rack, &["--disk", disk.to_str().unwrap()], DEADLINE).success());
    assert!(std::fs::read(&disk).unwrap() == image, "the disk file equals the image");
    assert!(rack.state.corrupt_once.lock().unwrap().is_none(), "the rack did serve the bad byte");
    let done = deployed(&rack.reports());
    assert!(done.chunks_refetched >= 1, "{done:?}");
    assert_eq!(done.bytes_written, IMAGE_BYTES as u64);
}

#[test]
fn a_connection_dropped_mid_range_resumes_at_the_first_chunk_not_written() {
    let rack = TestRack::start("127.0.0.1:0");
    let image = random_bytes(IMAGE_BYTES, 5);
    let manifest = rack.serve_image(&image);
    // Mid-chunk, past several whole chunks of the first 4 MiB range.
    let drop_after = 1_000_000 + 12_345;
    *rack.state.drop_once_after.lock().unwrap() = Some(drop_after);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::write(&disk, b"").unwrap();
    assert!(run_agent(&rack, &["--disk", disk.to_str().unwrap()], DEADLINE).success());
    assert!(std::fs::read(&disk).unwrap() == image, "the disk file equals the image");
    assert!(rack.state.drop_once_after.lock().unwrap().is_none(), "the rack did drop a range");
    // Fetched twice: only the part of the chunk that was cut in two.
    let cut_chunk_start = manifest
        .chunk_offsets()
        .map(|(offset, _)| offset)
        .take_while(|&offset| offset <= drop_after as u64)
        .last()
        .unwrap();
    let served = rack.state.bytes_served.load(Ordering::SeqCst);
    // Every byte sent before the drop arrives on loopback, so exactly the cut chunk's first
    // part is fetched twice; a restart from the range's start would fetch `drop_after` twice.
    assert_eq!(served, IMAGE_BYTES as u64 + (drop_after as u64 - cut_chunk_start), "cut chunk at {cut_chunk_start}");
    let done = deployed(&rack.reports());
    assert_eq!((done.bytes_written, done.chunks_refetched), (IMAGE_BYTES as u64, 0));
}

#[test]
fn a_task_the_agent_cannot_do_is_reported_as_failed_with_the_reason() {
    let rack = TestRack::start("127.0.0.1:0");
    rack.serve_image(&random_bytes(100_000, 4));
    // The manifest does not match the task's file hash.
    if let Some(AgentTask::Deploy { file_hash, .. }) = rack.state.task.lock().unwrap().as_mut() {
        *file_hash = "00".repeat(32);
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::write(&disk, b"").unwrap();
    let status = run_agent(&rack, &["--disk", disk.to_str().unwrap()], DEADLINE);
    assert_eq!(status.code(), Some(2));
    let reports = rack.reports();
    let [AgentReport::Failed { reason }] = &reports[..] else { panic!("{reports:?}") };
    assert!(reason.contains("the manifest describes a file"), "{reason}");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 0, "nothing was written");
}

#[test]
fn a_release_with_quick_erase_zeroes_both_ends_of_the_disk_and_reports_released() {
    let rack = TestRack::start("127.0.0.1:0");
    *rack.state.task.lock().unwrap() =
        Some(AgentTask::Release { machine_id: "m1".into(), erase: EraseMode::Quick, disk: None });
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let len = 4 * 1024 * 1024;
    std::fs::write(&disk, vec![0xaa; len]).unwrap();
    assert!(run_agent(&rack, &["--disk", disk.to_str().unwrap()], DEADLINE).success());
    let after = std::fs::read(&disk).unwrap();
    let mib = 1024 * 1024;
    assert!(after[..mib].iter().chain(&after[len - mib..]).all(|&b| b == 0));
    assert!(after[mib..len - mib].iter().all(|&b| b == 0xaa));
    assert_eq!(rack.reports(), [AgentReport::Released]);
}

#[test]
fn commissioning_this_host_reports_its_cpus_memory_and_nics() {
    let rack = TestRack::start("127.0.0.1:0");
    *rack.state.task.lock().unwrap() = Some(AgentTask::Commission { machine_id: "m1".into() });
    let nics_before = host_nics();
    assert!(run_agent(&rack, &[], DEADLINE).success());
    let nics_after = host_nics();
    let reports = rack.reports();
    let [AgentReport::Inventory { inventory }] = &reports[..] else { panic!("{reports:?}") };
    assert!(inventory.cpus >= 1 && inventory.memory_bytes > 0, "{inventory:?}");
    // NICs present before and after the run (other tests may add some meanwhile) are listed
    // with their MACs.
    for (name, mac) in nics_before.iter().filter(|nic| nics_after.contains(nic)) {
        assert!(
            inventory.nics.iter().any(|nic| &nic.name == name && &nic.mac == mac),
            "{name} {mac} missing from {:?}",
            inventory.nics
        );
    }
    assert!(!inventory.nics.is_empty());
}

/// This host's NICs with an Ethernet address, from /sys/class/net.
fn host_nics() -> Vec<(String, String)> {
    let mut nics = Vec::new();
    for entry in std::fs::read_dir("/sys/class/net").unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let mac = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap_or_default();
        let mac = mac.trim().to_string();
        if name != "lo" && mac.len() == 17 {
            nics.push((name, mac));
        }
    }
    nics
}
