//! End to end with real PXE firmware: region and rack inside a lab network namespace, a QEMU
//! machine whose NIC ROM is Debian's iPXE powers on with network boot, gets a lease from the
//! rack, loads our iPXE loader over TFTP, chains to its per-MAC script over HTTP, downloads the
//! kernel and initrd, and fetches the final callback. Then again with the region stopped.

use std::process::Command;
use std::time::Duration;

use metalrack_api::images::SyncPhase;
use metalrack_api::RackState;
use metalrack_hardware::{Firmware, Lab, Machine, MachineSpec, Nic};
use metalrack_tests::{random_bytes, wait_for, Rack, Region, DEADLINE};

const MAC: &str = "52:54:00:aa:bb:01";

/// iPXE under TCG: DHCP, TFTP and two HTTP downloads take well under a minute here; allow for
/// a loaded CI machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);

fn callbacks(events: &[String]) -> usize {
    events.iter().filter(|e| e.starts_with("boot.callback") && e.contains("\"loaded\"")).count()
}

#[test]
fn a_bios_machine_network_boots_from_the_rack_also_with_the_region_down() {
    in_lab(Firmware::Bios, Nic::E1000, true);
}

#[test]
fn a_uefi_machine_network_boots_from_the_rack() {
    assert!(Firmware::Uefi.available(), "OVMF is installed (apt-get install ovmf; scripts/test does it)");
    in_lab(Firmware::Uefi, Nic::Virtio, false);
}

fn in_lab(firmware: Firmware, nic: Nic, also_with_region_down: bool) {
    let lab = Lab::new([10, 99, 0]).expect("a lab namespace (needs root)");
    let tap = lab.add_tap().expect("a tap for the machine");
    let lab_name = lab.name().to_owned();
    let lab = std::sync::Arc::new(lab);
    let inside = lab.clone();
    // Everything runs on a thread inside the namespace: sockets and child processes stay there.
    metalrack_tests::lab::block_on_in(&lab, None, move || async move {
        scenario(&inside, &tap, firmware, nic, also_with_region_down).await
    })
    .expect("ran inside the lab");
    drop(lab);
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&lab_name), "lab removed");
}

async fn scenario(lab: &Lab, tap: &str, firmware: Firmware, nic: Nic, also_with_region_down: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let client = reqwest::Client::new();
    region.boot_machine_from_noble(&api_key, MAC).await;
    for (kind, len, seed) in [("kernel", 1 << 20, 1), ("initrd", 2 << 20, 2)] {
        let file = dir.path().join(kind);
        std::fs::write(&file, random_bytes(len, seed)).unwrap();
        region.push(&api_key, &file, "ubuntu/noble", kind, "1");
    }

    let gateway = lab.gateway();
    let pxe = format!(
        "[pxe]\ninterface = \"{}\"\naddress = \"{gateway}\"\n\
         [pxe.dhcp]\nmode = \"managed\"\nrange_start = \"10.99.0.100\"\nrange_end = \"10.99.0.150\"\nrouter = \"{gateway}\"\n",
        lab.bridge()
    );
    let mut rack = Rack::new(dir.path(), "rack1");
    rack.register_ok(&region.url, &region.secret());
    rack.serve_with_config(&pxe);
    region.wait_rack_state(&api_key, "rack1", RackState::Online).await;
    wait_for("kernel and initrd in the rack's snapshot", DEADLINE, || async {
        let rack = region.racks(&api_key).await.first()?.clone();
        (rack.sync?.phase == SyncPhase::Idle && rack.snapshot_files == 2).then_some(())
    })
    .await;

    // Boot 1: the whole chain, seen from the region's events.
    let logs = dir.path().join("qemu");
    std::fs::create_dir_all(&logs).unwrap();
    let spec = MachineSpec { firmware, nic, memory_mib: 256, ..MachineSpec::new(MAC) };
    let loader = if firmware == Firmware::Bios { "undionly.kpxe" } else { "ipxe.efi" };
    let mut machine = Machine::power_on(lab, tap, &spec, &logs).expect("QEMU starts");
    let events = wait_for("the machine to fetch its final callback", BOOT_DEADLINE, || async {
        let events = region.event_lines(&api_key).await;
        (callbacks(&events) >= 1).then_some(events)
    })
    .await;
    machine.power_off();
    let seen =
        |kind: &str, text: &str| events.iter().any(|e| e.starts_with(kind) && e.contains(MAC) && e.contains(text));
    assert!(seen("boot.dhcp", "DHCP ack: 10.99.0.1"), "DHCP lease: {events:#?}");
    assert!(seen("boot.tftp", loader), "loader over TFTP: {events:#?}");
    assert!(seen("boot.dhcp", "/ipxe/52-54-00-aa-bb-01"), "iPXE sent to its script: {events:#?}");
    assert!(seen("boot.script", "image ubuntu/noble amd64 1"), "script over HTTP: {events:#?}");
    assert!(seen("boot.http", "/images/ubuntu/noble/amd64/1/kernel (1048576 bytes)"), "kernel: {events:#?}");
    assert!(seen("boot.http", "/images/ubuntu/noble/amd64/1/initrd (2097152 bytes)"), "initrd: {events:#?}");
    let metrics = client.get(format!("http://{gateway}:5248/metrics")).send().await.unwrap().text().await.unwrap();
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(counter("metalrack_rack_http_bytes_total") >= (3 << 20) as f64, "{metrics}");
    assert!(counter("metalrack_rack_tftp_bytes_total") > 0.0, "{metrics}");
    assert!(metrics.contains("metalrack_rack_dhcp_packets_total{kind=\"discover\"}"), "{metrics}");

    if !also_with_region_down {
        return;
    }
    // Boot 2 with the region stopped: the rack serves from its snapshot and boot table alone.
    region.daemon.terminate().unwrap();
    let mut machine = Machine::power_on(lab, tap, &spec, &logs).expect("QEMU starts again");
    let before = counter("metalrack_rack_http_bytes_total");
    wait_for("the machine to load kernel and initrd again", BOOT_DEADLINE, || async {
        let metrics = client.get(format!("http://{gateway}:5248/metrics")).send().await.ok()?.text().await.ok()?;
        let bytes: f64 = metrics
            .lines()
            .find(|l| l.starts_with("metalrack_rack_http_bytes_total"))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())?;
        (bytes >= before + (3 << 20) as f64).then_some(())
    })
    .await;
    region.restart();
    wait_for("the second boot's callback, queued while the region was down", BOOT_DEADLINE, || async {
        (callbacks(&region.event_lines(&api_key).await) >= 2).then_some(())
    })
    .await;
    machine.power_off();
}
