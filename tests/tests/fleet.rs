//! The simulated fleet end to end: three simulated machines (BIOS and UEFI firmware mixed) on
//! one tap of a rack's provisioning network, each behind its own virtual Redfish BMC (HTTPS,
//! self-signed), are commissioned and then deployed at once through the region's API. Every
//! step is the real one: the rack's DHCP, TFTP and HTTP answer smoltcp clients, the region
//! powers the machines through the rack's Redfish driver, and each machine's agent deploys with
//! the deploy library (every chunk verified, the whole image read back) onto its simulated disk.

use std::sync::Arc;
use std::time::Duration;

use metalrack_api::agent::DeployPhase;
use metalrack_api::machines::{DeployRequest, MachineState};
use metalrack_api::paths;
use metalrack_api::power::PowerState;
use metalrack_hardware::fleet::{FleetMachineSpec, SimPhase};
use metalrack_hardware::{Firmware, Lab};
use metalrack_tests::fleet_lab::{structured_image, FleetLab};
use metalrack_tests::wait_for;

const DISK_BYTES: u64 = 64 << 20;
const IMAGE_BYTES: usize = 24 << 20;
const IMAGE: &str = "test/fleet";
/// Each phase of three simulated machines takes seconds; allow for a loaded CI machine.
const PHASE_DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn three_simulated_machines_on_one_tap_are_commissioned_deployed_at_once_and_boot_from_their_disks() {
    let lab = Arc::new(Lab::new([10, 93, 0]).expect("a lab namespace (needs root)"));
    let tap = lab.add_tap().expect("a tap for the fleet");
    let inside = lab.clone();
    metalrack_tests::lab::block_on_in(&lab, None, move || async move { scenario(&inside, &tap).await })
        .expect("ran inside the lab");
}

async fn scenario(lab: &Lab, tap: &str) {
    let dir = tempfile::tempdir().unwrap();
    let firmwares = [Firmware::Bios, Firmware::Uefi, Firmware::Bios];
    let machines = firmwares
        .iter()
        .enumerate()
        .map(|(index, firmware)| FleetMachineSpec {
            mac: format!("52:54:00:f1:00:{:02x}", index + 1),
            firmware: *firmware,
            disk_bytes: DISK_BYTES,
            hostname: format!("sim{}", index + 1),
        })
        .collect();
    let site = FleetLab::start(lab, tap, dir.path(), machines).await.unwrap();
    let image = dir.path().join("image.raw");
    structured_image(&image, IMAGE_BYTES, 7).unwrap();
    site.push_image(&image, IMAGE, "1").await.unwrap();

    // 1. Commission all: each reports its inventory (from its spec) and powers off.
    site.act_all(paths::MACHINE_COMMISSION, &serde_json::json!({})).await.unwrap();
    let ready = site.wait_all(MachineState::Ready, "commissioning to end Ready", PHASE_DEADLINE).await.unwrap();
    for (machine, firmware) in ready.iter().zip(firmwares) {
        let inventory = machine.inventory.clone().expect("an inventory");
        assert_eq!(inventory.disks[0].size_bytes, DISK_BYTES, "{inventory:#?}");
        assert!(inventory.nics.iter().any(|nic| nic.mac == machine.mac), "{inventory:#?}");
        let expected = match firmware {
            Firmware::Bios => metalrack_api::agent::Firmware::Bios,
            Firmware::Uefi => metalrack_api::agent::Firmware::Uefi,
        };
        assert_eq!(inventory.firmware, expected);
    }
    let commissioned = site.wait_fleet("every machine off after commissioning", PHASE_DEADLINE, |m| !m.power_on).await;
    for machine in &commissioned {
        assert!(machine.bytes_tftp > 0, "the loader came over TFTP: {machine:#?}");
        assert!(machine.phase_log.iter().any(|(phase, _)| *phase == SimPhase::Agent), "{machine:#?}");
    }
    wait_for("the region to see every machine off", PHASE_DEADLINE, || async {
        let machines = site.api().machines().await.ok()?;
        machines.iter().all(|m| m.power_state == PowerState::Off).then_some(())
    })
    .await;

    // 2. Deploy all at once: each ends Deployed with its disk holding exactly the image, then
    // PXE-boots and is sent to its disk.
    let deploy = DeployRequest { image: IMAGE.into(), arch: "amd64".into(), version: Some("1".into()), disk: None };
    site.act_all(paths::MACHINE_DEPLOY, &deploy).await.unwrap();
    let deployed = site.wait_all(MachineState::Deployed, "the deploys to end Deployed", PHASE_DEADLINE).await.unwrap();
    let expected = metalrack_image_tools::Hash::of(&std::fs::read(&image).unwrap());
    for machine in &deployed {
        let progress = machine.progress.expect("deploy figures");
        assert_eq!(progress.phase, DeployPhase::Done, "{machine:#?}");
        assert_eq!(progress.bytes_total, IMAGE_BYTES as u64);
        let on_disk = site.fleet.disk_hash(&machine.mac, IMAGE_BYTES as u64).expect("the machine's disk");
        assert_eq!(on_disk, expected, "{}'s disk holds exactly the image", machine.mac);
    }
    let booted = site
        .wait_fleet("every machine booted from its disk", PHASE_DEADLINE, |m| m.phase == SimPhase::BootedLocal)
        .await;
    for machine in &booted {
        assert!(machine.power_on, "{machine:#?}");
        assert!(machine.bytes_http >= IMAGE_BYTES as u64, "the image came over HTTP: {machine:#?}");
    }
    // The image's repeated and zero pieces are stored once for all three disks.
    assert!(site.fleet.disk_store_bytes() < IMAGE_BYTES as u64, "{}", site.fleet.disk_store_bytes());
    let counters = site.fleet.switch_counters();
    assert!(counters.frames_from_uplink > 0 && counters.frames_to_uplink > 0, "{counters:?}");
}
