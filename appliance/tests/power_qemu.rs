//! The rack's power requests end in a real machine: rackd's Redfish driver, over HTTPS with the
//! BMC's self-signed certificate, asks the lab's virtual BMC for a one-time network boot and a
//! power on, and QEMU starts with that boot order; a power off ends QEMU.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metalrack_api::power::{BootDevice, PowerAction, PowerParameters, PowerRequest, PowerState};
use metalrack_appliance::power::run;
use metalrack_hardware::bmc::{BmcConfig, BmcServer, BmcTransport, QemuMachine};
use metalrack_hardware::qemu::{machine_name, running_command_line, MachineSpec, Nic};
use metalrack_hardware::{have_root, Lab};

/// QEMU is killed and reaped inside the BMC's call, so its /proc entry is gone within moments.
const PROCESS_GONE_DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redfish_power_request_boots_a_qemu_machine_from_the_network_once_and_powers_it_off() {
    assert!(have_root(), "this test creates a network namespace and runs QEMU on a tap: run it as root");
    let lab = Arc::new(Lab::new([10, 249, 41]).unwrap());
    let tap = lab.add_tap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let spec = MachineSpec { nic: Nic::Virtio, disk: Some(disk), ..MachineSpec::new("52:54:00:41:00:01") };
    let machine = QemuMachine::new(lab.clone(), tap.clone(), spec, dir.path().join("logs"));
    let config = BmcConfig {
        transport: BmcTransport::Https { names: vec!["127.0.0.1".into()] },
        ..BmcConfig::new("rack", "bmc-password")
    };
    let server = BmcServer::bind("127.0.0.1:0".parse().unwrap(), config, machine).unwrap();
    let qemu_name = machine_name(&lab, &tap);
    let request = |actions| PowerRequest {
        boot_generation: 0,
        id: 1,
        machine_id: "machine-qemu".into(),
        mac: "52:54:00:41:00:01".into(),
        parameters: PowerParameters::Redfish {
            address: server.url(),
            username: "rack".into(),
            password: "bmc-password".into(),
            system_id: None,
            trust_self_signed: true,
        },
        actions,
    };

    let result =
        run(&request(vec![PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::On, PowerAction::Query])).await;
    assert_eq!((result.state, result.error), (PowerState::On, None));
    let command_line = running_command_line(&qemu_name).expect("QEMU runs after the power request");
    assert!(command_line.contains("-boot order=nc,once=n"), "{command_line}");

    let result = run(&request(vec![PowerAction::Off, PowerAction::Query])).await;
    assert_eq!((result.state, result.error), (PowerState::Off, None));
    let deadline = Instant::now() + PROCESS_GONE_DEADLINE;
    while running_command_line(&qemu_name).is_some() {
        assert!(Instant::now() < deadline, "QEMU still runs {PROCESS_GONE_DEADLINE:?} after the power off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
