//! The IPMI driver against OpenIPMI's `ipmi_sim` (a BMC simulator speaking IPMI 2.0 over UDP),
//! whose chassis control runs a small script that keeps the power state and boot device in
//! files, as a machine's board would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use metalrack_api::power::{PowerAction, PowerParameters, PowerRequest};

use super::super::run;
use super::*;

const USER: &str = "rackadmin";
/// IPMI 2.0 passwords are at most 20 bytes.
const PASSWORD: &str = "ipmi-pw-not-logged";
/// From spawning ipmi_sim to its LAN port bound: it reads two small files first.
const SIM_READY_DEADLINE: Duration = Duration::from_secs(30);

/// ipmi_sim's chassis control: `SCRIPT MC get power|boot…` prints `name:value` lines,
/// `SCRIPT MC set NAME VALUE…` stores values; each call is logged.
const CHASSIS_CONTROL: &str = r#"#!/bin/sh
dir=$(dirname "$0")
echo "$*" >> "$dir/chassis.log"
shift
op=$1
shift
case $op in
get)
  for name in "$@"; do
    case $name in
      power) echo "power:$(cat "$dir/power" 2>/dev/null || echo 0)" ;;
      boot) echo "boot:$(cat "$dir/boot" 2>/dev/null || echo default)" ;;
    esac
  done ;;
set)
  while [ $# -ge 2 ]; do echo "$2" > "$dir/$1"; shift 2; done ;;
esac
"#;

/// The BMC's management controller as ipmi_sim needs it described (OpenIPMI's example values: a
/// BMC at 0x20 with chassis support).
const EMULATION_COMMANDS: &str = "mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
";

/// A running ipmi_sim on 127.0.0.1; killed on drop.
struct IpmiSim {
    dir: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl IpmiSim {
    fn start() -> IpmiSim {
        let dir = tempfile::tempdir().unwrap();
        // A port free now; ipmi_sim binds it a moment later (nothing else on this machine takes
        // random high UDP ports in between).
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let script = dir.path().join("chassis-control.sh");
        std::fs::write(&script, CHASSIS_CONTROL).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let lan_conf = format!(
            "name \"metalrack-test\"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_admin md5 md2 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control \"{script} 0x20\"
  user 2 true \"{USER}\" \"{PASSWORD}\" admin 10 md5 md2 straight
",
            script = script.display()
        );
        std::fs::write(dir.path().join("lan.conf"), lan_conf).unwrap();
        std::fs::write(dir.path().join("cmd.emu"), EMULATION_COMMANDS).unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        let log = std::fs::File::create(dir.path().join("ipmi_sim.log")).unwrap();
        let child = std::process::Command::new("ipmi_sim")
            .current_dir(dir.path())
            .args(["-c", "lan.conf", "-f", "cmd.emu", "-s", "state", "-n"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ipmi_sim runs (Debian package openipmi; scripts/test installs it)");
        let sim = IpmiSim { dir, port, child };
        sim.wait_until_bound();
        sim
    }

    /// Waits until the simulator's UDP port shows in /proc/net/udp.
    fn wait_until_bound(&self) {
        let needle = format!(":{:04X} ", self.port);
        let deadline = Instant::now() + SIM_READY_DEADLINE;
        loop {
            let table = std::fs::read_to_string("/proc/net/udp").unwrap();
            if table
                .lines()
                .any(|line| line.split_whitespace().nth(1).is_some_and(|local| format!("{local} ").ends_with(&needle)))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim did not bind 127.0.0.1:{} within {SIM_READY_DEADLINE:?}: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("ipmi_sim.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default().trim().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn request(&self, password: &str, actions: Vec<PowerAction>) -> PowerRequest {
        PowerRequest {
            boot_generation: 0,
            id: 9,
            machine_id: "machine-ipmi".into(),
            mac: "52:54:00:00:00:09".into(),
            parameters: PowerParameters::Ipmi {
                address: "127.0.0.1".into(),
                port: self.port,
                username: USER.into(),
                password: password.into(),
            },
            actions,
        }
    }
}

#[tokio::test]
async fn power_and_boot_device_go_through_ipmitool_to_the_simulated_bmc() {
    let sim = IpmiSim::start();
    let result = run(&sim.request(PASSWORD, vec![PowerAction::Query])).await;
    assert_eq!((result.state, result.error), (PowerState::Off, None));

    let actions = vec![PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::On, PowerAction::Query];
    let result = run(&sim.request(PASSWORD, actions)).await;
    assert_eq!((result.state, result.error), (PowerState::On, None));
    assert_eq!(sim.file("power"), "1", "the board was told to power on");
    let log = sim.file("chassis.log");
    assert!(log.contains("set boot pxe"), "{log}");

    let result =
        run(&sim.request(PASSWORD, vec![PowerAction::SetNextBoot(BootDevice::Disk), PowerAction::Cycle])).await;
    assert_eq!((result.state, result.error), (PowerState::On, None));
    let log = sim.file("chassis.log");
    // ipmi_sim's chassis control knows none/pxe/default: a disk boot is the default device.
    assert!(log.contains("set boot default"), "{log}");

    let result = run(&sim.request(PASSWORD, vec![PowerAction::Off, PowerAction::Query])).await;
    assert_eq!((result.state, result.error), (PowerState::Off, None));
    assert_eq!(sim.file("power"), "0");

    let result = run(&sim.request(PASSWORD, vec![PowerAction::Cycle, PowerAction::Query])).await;
    assert_eq!((result.state, result.error), (PowerState::On, None), "a cycle of a machine that is off powers it on");
}

#[tokio::test]
async fn a_wrong_password_fails_without_showing_it() {
    let sim = IpmiSim::start();
    let result = run(&sim.request("wrong-ipmi-password", vec![PowerAction::On])).await;
    let error = result.error.unwrap();
    assert!(error.contains("power action on failed"), "{error}");
    assert!(error.contains("ipmitool"), "{error}");
    assert!(!error.contains("wrong-ipmi-password"), "{error}");
    assert_eq!(sim.file("power"), "", "the board was never told anything");
}

#[tokio::test]
async fn a_missing_ipmitool_is_a_clear_error() {
    let driver = IpmiDriver::new("127.0.0.1", 623, USER, PASSWORD).with_program(Path::new("/nonexistent/ipmitool"));
    let error = driver.query().await.unwrap_err();
    assert!(matches!(error, IpmiError::Missing { .. }), "{error}");
    assert!(error.to_string().contains("Debian package ipmitool"), "{error}");
}

#[test]
fn power_status_is_read_from_ipmitools_line() {
    assert_eq!(parse_power_status("Chassis Power is on\n"), Some(PowerState::On));
    assert_eq!(parse_power_status("Chassis Power is off\n"), Some(PowerState::Off));
    assert_eq!(parse_power_status("Unable to get Chassis Power Status\n"), None);
    assert!(!format!("{:?}", IpmiDriver::new("h", 623, "u", PASSWORD)).contains(PASSWORD));
}
