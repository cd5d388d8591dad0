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
use std::time::Duration;

use metalrack_api::agent::{DeployPhase, EraseMode};
use metalrack_api::machines::{DeployRequest, MachineCreate, MachineState, MachineView, ReleaseRequest};
use metalrack_api::paths;
use metalrack_api::power::{PowerParameters, PowerState};
use metalrack_api::RackState;
use metalrack_hardware::bmc::{BmcConfig, BmcServer, BmcTransport, QemuMachine};
use metalrack_hardware::qemu::{machine_name, GuestReboot};
use metalrack_hardware::{Firmware, Lab, MachineSpec, Nic};
use metalrack_image_tools::chunker::{chunk_file, ChunkerConfig};
use metalrack_tests::api::Api;
use metalrack_tests::disk_image::{bootable_disk_image, MARKER_PREFIX};
use metalrack_tests::{wait_for, Rack, Region, DEADLINE};

const MAC: &str = "52:54:00:dd:00:01";
const DISK_BYTES: u64 = 256 << 20;
const IMAGE_MIB: u64 = 64;
const IMAGE: &str = "test/deployed";

/// One phase under TCG (a boot into the deploy environment and its work, or a boot of the
/// deployed system) takes a minute or two here; allow for a loaded CI machine.
const PHASE_DEADLINE: Duration = Duration::from_secs(420);

#[test]
fn a_machine_is_commissioned_deployed_and_redeployed_through_its_rack_with_redfish_power_also_with_the_region_down() {
    let env = metalrack_tests::deploy_env::deploy_env().to_path_buf();
    let lab = Arc::new(Lab::new([10, 97, 0]).expect("a lab namespace (needs root)"));
    let tap = lab.add_tap().expect("a tap for the machine");
    let inside = lab.clone();
    metalrack_tests::lab::block_on_in(&lab, None, move || async move { scenario(inside, &tap, &env).await })
        .expect("ran inside the lab");
}

async fn wait_state(api: &Api, id: &str, state: MachineState, what: &str) -> MachineView {
    wait_for(what, PHASE_DEADLINE, || async {
        let machine = api.machine(id).await.ok()?;
        assert!(
            !matches!(
                machine.state,
                MachineState::FailedCommissioning | MachineState::FailedDeployment | MachineState::FailedReleasing
            ),
            "{what}: the machine failed: {machine:#?}"
        );
        (machine.state == state).then_some(machine)
    })
    .await
}

/// The serial console of the machine's QEMU (the BMC starts it; its log name is the lab's).
fn serial(log_dir: &Path, lab: &Lab, tap: &str) -> String {
    let path = log_dir.join(format!("{}.serial.log", machine_name(lab, tap)));
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
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

async fn scenario(lab: Arc<Lab>, tap: &str, env: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let api = region.api(&api_key);
    region.push(&api_key, &env.join("kernel"), "metalrack/deploy-env", "kernel", "1");
    region.push(&api_key, &env.join("initrd"), "metalrack/deploy-env", "initrd", "1");
    let v1 = bootable_disk_image(dir.path(), "v1.img", &env.join("kernel"), "v1", IMAGE_MIB, &[]);
    let v2 = bootable_disk_image(dir.path(), "v2.img", &env.join("kernel"), "v2", IMAGE_MIB, &[]);
    region.push(&api_key, &v1, IMAGE, "root-disk", "1");

    let gateway = lab.gateway();
    let pxe = format!(
        "[pxe]\ninterface = \"{}\"\naddress = \"{gateway}\"\nfault_corrupt_one_image_range = true\n\
         [pxe.dhcp]\nmode = \"managed\"\nrange_start = \"10.97.0.100\"\nrange_end = \"10.97.0.150\"\nrouter = \"{gateway}\"\n",
        lab.bridge()
    );
    let mut rack = Rack::new(dir.path(), "rack1");
    rack.register_ok(&region.url, &region.secret());
    rack.serve_with_config(&pxe);
    region.wait_rack_state(&api_key, "rack1", RackState::Online).await;
    wait_for("the deploy environment and the image in the rack's snapshot", DEADLINE, || async {
        let rack = region.racks(&api_key).await.first()?.clone();
        (rack.snapshot_files == 3).then_some(())
    })
    .await;

    // The machine: off, an empty disk, network first then disk, behind a Redfish BMC.
    let logs = dir.path().join("qemu");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(DISK_BYTES).unwrap();
    let spec = MachineSpec {
        firmware: Firmware::Bios,
        nic: Nic::Virtio,
        memory_mib: 512,
        disk: Some(disk.clone()),
        guest_reboot: GuestReboot::Restart,
        ..MachineSpec::new(MAC)
    };
    let mut bmc_config = BmcConfig::new("root", "bmc-password-not-in-logs");
    bmc_config.transport = BmcTransport::Https { names: vec!["127.0.0.1".into()] };
    let bmc = BmcServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        bmc_config,
        QemuMachine::new(lab.clone(), tap, spec, logs.clone()),
    )
    .unwrap();

    let machine = api
        .add_machine(&MachineCreate {
            hostname: "deploy1".into(),
            mac: MAC.into(),
            power: PowerParameters::Redfish {
                address: bmc.url(),
                username: "root".into(),
                password: "bmc-password-not-in-logs".into(),
                system_id: None,
                trust_self_signed: true,
            },
            rack: None,
        })
        .await
        .unwrap();
    let id = machine.id.clone();

    // 1. Commission: the deploy environment reports the hardware, then the machine is off.
    api.machine_action(paths::MACHINE_COMMISSION, &id, &serde_json::json!({})).await.unwrap();
    let ready = wait_state(&api, &id, MachineState::Ready, "commissioning to end Ready").await;
    let inventory = ready.inventory.clone().expect("an inventory");
    let vda = inventory.disks.iter().find(|d| d.name == "vda").expect("the virtio disk");
    assert_eq!(vda.size_bytes, DISK_BYTES, "{inventory:#?}");
    assert!(inventory.nics.iter().any(|n| n.mac == MAC), "{inventory:#?}");
    wait_for("the machine to power itself off after commissioning", PHASE_DEADLINE, || async {
        let state = api.machine(&id).await.ok()?.power_state;
        (state == PowerState::Off).then_some(())
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
    api.machine_action(paths::MACHINE_DEPLOY, &id, &deploy("1")).await.unwrap();
    let deployed = wait_state(&api, &id, MachineState::Deployed, "the deploy of v1 to end Deployed").await;
    let progress = deployed.progress.expect("deploy figures");
    assert_eq!(progress.phase, DeployPhase::Done);
    assert!(progress.chunks_refetched >= 1, "the corrupted chunk was fetched again: {progress:?}");
    let image = std::fs::read(&v1).unwrap();
    let on_disk = std::fs::read(&disk).unwrap();
    assert_eq!(blake3::hash(&on_disk[..image.len()]), blake3::hash(&image), "the disk holds exactly v1");
    wait_for("the deployed v1 system's marker on the console", PHASE_DEADLINE, || async {
        serial(&logs, &lab, tap).contains(&format!("{MARKER_PREFIX}v1")).then_some(())
    })
    .await;

    // 3. Release (the disk keeps v1), then redeploy v2 with the region stopped once it started.
    api.machine_action(paths::MACHINE_RELEASE, &id, &ReleaseRequest { erase: EraseMode::None }).await.unwrap();
    wait_state(&api, &id, MachineState::Ready, "the release to end Ready").await;
    region.push(&api_key, &v2, IMAGE, "root-disk", "2");
    wait_for("v2 in the rack's snapshot", DEADLINE, || async {
        let rack = region.racks(&api_key).await.first()?.clone();
        (rack.snapshot_files == 4).then_some(())
    })
    .await;
    let console_before = serial(&logs, &lab, tap).len();
    api.machine_action(paths::MACHINE_DEPLOY, &id, &deploy("2")).await.unwrap();
    wait_for("the redeploy to start (the agent's first report)", PHASE_DEADLINE, || async {
        let machine = api.machine(&id).await.ok()?;
        (machine.state == MachineState::Deploying && machine.progress.is_some()).then_some(())
    })
    .await;
    region.daemon.terminate().unwrap();
    wait_for("the deployed v2 system's marker, with the region down", PHASE_DEADLINE, || async {
        let console = serial(&logs, &lab, tap);
        console.get(console_before..)?.contains(&format!("{MARKER_PREFIX}v2")).then_some(())
    })
    .await;
    region.restart();
    let deployed = wait_state(&api, &id, MachineState::Deployed, "the region to show v2 Deployed on its return").await;
    let progress = deployed.progress.expect("deploy figures");
    let changed = bytes_changed(&v1, &v2);
    assert!(changed > 0 && changed < (IMAGE_MIB << 20) / 16, "v2 changes a few chunks: {changed} bytes");
    assert_eq!(progress.bytes_written, changed, "only the changed chunks were written: {progress:?}");
    assert_eq!(progress.bytes_fetched, changed, "only the changed chunks were fetched: {progress:?}");
    let image = std::fs::read(&v2).unwrap();
    let on_disk = std::fs::read(&disk).unwrap();
    assert_eq!(blake3::hash(&on_disk[..image.len()]), blake3::hash(&image), "the disk holds exactly v2");
    drop(bmc);
}
