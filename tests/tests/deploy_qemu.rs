//! Machines end to end with real firmware, a real BMC protocol and a real disk: a QEMU machine
//! with an empty virtio disk behind the lab's virtual Redfish BMC (HTTPS, self-signed), on a
//! rack's provisioning network inside a lab namespace. Through the region's API it is added with
//! Redfish power, commissioned (the deploy environment reports its inventory and powers off),
//! deployed (the agent streams a bootable disk image from the rack, verifying every chunk, one of
//! them corrupted in transit by the rack's fault hook), and boots the deployed system from its
//! disk; then released and redeployed with a new version while the region is stopped: the agent
//! fetches and writes only the chunks that changed, and the region shows Deployed once it is back.

use std::path::Path;
use std::sync::Arc;

use metalrack_api::agent::{DeployPhase, EraseMode};
use metalrack_api::machines::{DeployRequest, MachineState, ReleaseRequest};
use metalrack_api::paths;
use metalrack_api::power::PowerState;
use metalrack_hardware::Lab;
use metalrack_image_tools::chunker::{chunk_file, ChunkerConfig};
use metalrack_tests::deploy_lab::{DeployLab, DeployLabSpec, PHASE_DEADLINE};
use metalrack_tests::disk_image::{bootable_disk_image, MARKER_PREFIX};
use metalrack_tests::wait_for;

const MAC: &str = "52:54:00:dd:00:01";
const DISK_BYTES: u64 = 256 << 20;
const IMAGE_MIB: u64 = 64;
const IMAGE: &str = "test/deployed";

#[test]
fn a_machine_is_commissioned_deployed_and_redeployed_through_its_rack_with_redfish_power_also_with_the_region_down() {
    let env = metalrack_tests::deploy_env::deploy_env().to_path_buf();
    let lab = Arc::new(Lab::new([10, 97, 0]).expect("a lab namespace (needs root)"));
    let tap = lab.add_tap().expect("a tap for the machine");
    let inside = lab.clone();
    metalrack_tests::lab::block_on_in(&lab, None, move || async move { scenario(inside, &tap, &env).await })
        .expect("ran inside the lab");
}

/// Bytes of `new`'s chunks (as the region cuts them) that differ from what `old` holds at the
/// same places: what a redeploy of `new` over `old` must fetch and write, no more.
fn bytes_changed(old: &Path, new: &Path) -> u64 {
    let old = std::fs::read(old).unwrap();
    let manifest = chunk_file(new, ChunkerConfig::default(), |_| {}).unwrap();
    let new_bytes = std::fs::read(new).unwrap();
    manifest
        .chunk_offsets()
        .filter(|(offset, chunk)| {
            let range = *offset as usize..*offset as usize + chunk.len as usize;
            old.get(range.clone()) != Some(&new_bytes[range])
        })
        .map(|(_, chunk)| u64::from(chunk.len))
        .sum()
}

fn assert_disk_holds(disk: &Path, image: &Path) {
    let image = std::fs::read(image).unwrap();
    let on_disk = std::fs::read(disk).unwrap();
    assert_eq!(blake3::hash(&on_disk[..image.len()]), blake3::hash(&image), "the disk holds exactly the image");
}

async fn scenario(lab: Arc<Lab>, tap: &str, env: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let v1 = bootable_disk_image(dir.path(), "v1.img", &env.join("kernel"), "v1", IMAGE_MIB, &[]);
    let v2 = bootable_disk_image(dir.path(), "v2.img", &env.join("kernel"), "v2", IMAGE_MIB, &[]);
    let spec = DeployLabSpec {
        env,
        dir: dir.path(),
        mac: MAC,
        disk_bytes: DISK_BYTES,
        memory_mib: 512,
        pxe_extra: "fault_corrupt_one_image_range = true",
    };
    let mut site = DeployLab::start(&lab, tap, &spec).await;
    site.push_image(&v1, IMAGE, "1").await;

    // 1. Commission: the deploy environment reports the hardware, then the machine is off.
    site.act(paths::MACHINE_COMMISSION, &serde_json::json!({})).await;
    let ready = site.wait_state(MachineState::Ready, "commissioning to end Ready").await;
    let inventory = ready.inventory.clone().expect("an inventory");
    let vda = inventory.disks.iter().find(|d| d.name == "vda").expect("the virtio disk");
    assert_eq!(vda.size_bytes, DISK_BYTES, "{inventory:#?}");
    assert!(inventory.nics.iter().any(|n| n.mac == MAC), "{inventory:#?}");
    wait_for("the machine to power itself off after commissioning", PHASE_DEADLINE, || async {
        (site.machine().await?.power_state == PowerState::Off).then_some(())
    })
    .await;

    // 2. Deploy v1, one chunk corrupted in transit: the disk holds exactly the image and the
    // machine boots it from its disk.
    let deploy = |version: &str| DeployRequest {
        image: IMAGE.into(),
        arch: "amd64".into(),
        version: Some(version.into()),
        disk: None,
    };
    site.act(paths::MACHINE_DEPLOY, &deploy("1")).await;
    let deployed = site.wait_state(MachineState::Deployed, "the deploy of v1 to end Deployed").await;
    let progress = deployed.progress.expect("deploy figures");
    assert_eq!(progress.phase, DeployPhase::Done);
    assert!(progress.chunks_refetched >= 1, "the corrupted chunk was fetched again: {progress:?}");
    assert_disk_holds(&site.disk, &v1);
    wait_for("the deployed v1 system's marker on the console", PHASE_DEADLINE, || async {
        site.serial().contains(&format!("{MARKER_PREFIX}v1")).then_some(())
    })
    .await;

    // 3. Release (the disk keeps v1), then redeploy v2 with the region stopped once it started.
    site.act(paths::MACHINE_RELEASE, &ReleaseRequest { erase: EraseMode::None }).await;
    site.wait_state(MachineState::Ready, "the release to end Ready").await;
    site.push_image(&v2, IMAGE, "2").await;
    site.act(paths::MACHINE_DEPLOY, &deploy("2")).await;
    wait_for("the redeploy to start (the agent's first report)", PHASE_DEADLINE, || async {
        let machine = site.machine().await?;
        (machine.state == MachineState::Deploying && machine.progress.is_some()).then_some(())
    })
    .await;
    site.region.daemon.terminate().unwrap();
    wait_for("the deployed v2 system's marker, with the region down", PHASE_DEADLINE, || async {
        site.serial().contains(&format!("{MARKER_PREFIX}v2")).then_some(())
    })
    .await;
    site.region.restart();
    let deployed = site.wait_state(MachineState::Deployed, "the region to show v2 Deployed on its return").await;
    let progress = deployed.progress.expect("deploy figures");
    let changed = bytes_changed(&v1, &v2);
    assert!(changed > 0 && changed < (IMAGE_MIB << 20) / 16, "v2 changes a few chunks: {changed} bytes");
    assert_eq!(progress.bytes_written, changed, "only the changed chunks were written: {progress:?}");
    assert_eq!(progress.bytes_fetched, changed, "only the changed chunks were fetched: {progress:?}");
    assert_disk_holds(&site.disk, &v2);
}
