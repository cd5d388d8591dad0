//! The virtual BMC drives a real QEMU: a Redfish power on starts the process (with a one-time
//! network boot on its command line), a `ForceOff` ends it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metalrack_hardware::bmc::{BmcConfig, BmcServer, QemuMachine};
use metalrack_hardware::qemu::{machine_name, running_command_line, MachineSpec, Nic};
use metalrack_hardware::{have_root, Lab};
use serde_json::{json, Value};

const USER: &str = "admin";
const PASSWORD: &str = "qemu-bmc-password";
/// QEMU is killed and reaped inside the BMC's call, so its /proc entry is gone within moments.
const PROCESS_GONE_DEADLINE: Duration = Duration::from_secs(10);

async fn redfish(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = client.request(method, url).basic_auth(USER, Some(PASSWORD));
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redfish_power_on_starts_qemu_with_a_one_time_network_boot_and_force_off_stops_it() {
    assert!(have_root(), "this test creates a network namespace and runs QEMU on a tap: run it as root");
    let lab = Arc::new(Lab::new([10, 249, 40]).unwrap());
    let tap = lab.add_tap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let spec = MachineSpec { nic: Nic::Virtio, disk: Some(disk), ..MachineSpec::new("52:54:00:40:00:01") };
    let machine = QemuMachine::new(lab.clone(), tap.clone(), spec, dir.path().join("logs"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = BmcServer::start(listener, BmcConfig::new(USER, PASSWORD), machine).unwrap();
    let system = format!("{}/redfish/v1/Systems/1", server.url());
    let reset_url = format!("{system}/Actions/ComputerSystem.Reset");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let qemu_name = machine_name(&lab, &tap);
    assert_eq!(running_command_line(&qemu_name), None);

    let patch = json!({ "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" } });
    assert_eq!(redfish(&client, reqwest::Method::PATCH, &system, Some(patch)).await.status(), 200);
    let on = redfish(&client, reqwest::Method::POST, &reset_url, Some(json!({ "ResetType": "On" }))).await;
    assert_eq!(on.status(), 204, "{}", on.text().await.unwrap());

    let command_line = running_command_line(&qemu_name).expect("QEMU runs after the Redfish power on");
    assert!(command_line.contains("-boot order=nc,once=n"), "{command_line}");
    assert!(!command_line.contains("-no-reboot"), "a BMC's machine reboots like hardware: {command_line}");
    let state: Value = redfish(&client, reqwest::Method::GET, &system, None).await.json().await.unwrap();
    assert_eq!(state["PowerState"], "On");
    assert_eq!(state["Boot"]["BootSourceOverrideEnabled"], "Disabled", "the power on consumed Once");

    let off = redfish(&client, reqwest::Method::POST, &reset_url, Some(json!({ "ResetType": "ForceOff" }))).await;
    assert_eq!(off.status(), 204);
    let deadline = Instant::now() + PROCESS_GONE_DEADLINE;
    while running_command_line(&qemu_name).is_some() {
        assert!(Instant::now() < deadline, "QEMU still runs {PROCESS_GONE_DEADLINE:?} after ForceOff");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state: Value = redfish(&client, reqwest::Method::GET, &system, None).await.json().await.unwrap();
    assert_eq!(state["PowerState"], "Off");
    assert!(Path::new(&dir.path().join("logs")).is_dir(), "QEMU's logs are where the machine was told");
    drop(server);
}
