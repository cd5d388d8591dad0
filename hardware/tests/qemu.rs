//! A QEMU machine in a lab network-boots with real iPXE firmware: its DHCPDISCOVER, carrying its
//! MAC, reaches a socket in the lab's namespace and names iPXE on the expected firmware.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use metalrack_hardware::qemu::{parse_mac, Firmware, Machine, MachineSpec, Nic, QemuError};
use metalrack_hardware::{have_root, Lab};

/// From power-on to the first DHCPDISCOVER under TCG; LAB.md saw a whole PXE chain in 2 minutes.
const DISCOVER_DEADLINE: Duration = Duration::from_secs(120);
/// One receive; short, so the loop notices a QEMU that died instead of waiting out the deadline.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(2);

const BOOTP_SERVER_PORT: u16 = 67;
const BOOTREQUEST: u8 = 1;
const DHCP_MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
const DHCP_OPTION_PAD: u8 = 0;
const DHCP_OPTION_END: u8 = 255;
const DHCP_OPTION_MESSAGE_TYPE: u8 = 53;
const DHCP_OPTION_USER_CLASS: u8 = 77;
const DHCP_OPTION_CLIENT_ARCHITECTURE: u8 = 93;
const DHCPDISCOVER: u8 = 1;
const ARCHITECTURE_BIOS: u16 = 0;
const ARCHITECTURE_EFI_X86_64: u16 = 7;

fn require_root() {
    assert!(
        have_root(),
        "metalrack-hardware's tests create network namespaces and run QEMU on taps; run `cargo test -p metalrack-hardware` as root"
    );
}

/// What the test reads from a DHCP request: enough to tell a DISCOVER from iPXE on the expected
/// firmware.
#[derive(Debug, Default, PartialEq, Eq)]
struct DhcpRequest {
    message_type: Option<u8>,
    /// Option 77; iPXE sends "iPXE", which a firmware's own PXE stack does not.
    user_class: Option<Vec<u8>>,
    /// Option 93: 0 for BIOS, 7 for x86-64 UEFI (RFC 4578).
    client_architecture: Option<u16>,
}

/// The options of a BOOTP request from `mac`, or `None` when `packet` is not one.
fn parse_dhcp_request(packet: &[u8], mac: [u8; 6]) -> Option<DhcpRequest> {
    if packet.len() < 240 || packet[0] != BOOTREQUEST || packet[28..34] != mac || packet[236..240] != DHCP_MAGIC_COOKIE
    {
        return None;
    }
    let mut request = DhcpRequest::default();
    let mut options = &packet[240..];
    while let [code, rest @ ..] = options {
        match *code {
            DHCP_OPTION_PAD => options = rest,
            DHCP_OPTION_END => break,
            _ => {
                let [len, rest @ ..] = rest else { return None };
                let value = rest.get(..usize::from(*len))?;
                match (*code, value) {
                    (DHCP_OPTION_MESSAGE_TYPE, [message_type]) => request.message_type = Some(*message_type),
                    (DHCP_OPTION_USER_CLASS, _) => request.user_class = Some(value.to_vec()),
                    (DHCP_OPTION_CLIENT_ARCHITECTURE, [high, low]) => {
                        request.client_architecture = Some(u16::from_be_bytes([*high, *low]))
                    }
                    _ => {}
                }
                options = &rest[usize::from(*len)..];
            }
        }
    }
    Some(request)
}

/// Powers on a machine per `spec` in a fresh lab and waits for its DHCPDISCOVER; returns how long
/// that took.
fn discover_from(subnet: [u8; 3], spec: MachineSpec) -> Duration {
    require_root();
    let mac = parse_mac(&spec.mac).unwrap();
    let lab = Lab::new(subnet).unwrap();
    let tap = lab.add_tap().unwrap();
    // The DHCP server's socket exists before the machine, so no DISCOVER can slip past.
    let server = lab
        .in_namespace(|| {
            let socket = UdpSocket::bind(("0.0.0.0", BOOTP_SERVER_PORT))?;
            socket.set_broadcast(true)?;
            socket.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
            std::io::Result::Ok(socket)
        })
        .unwrap()
        .expect("bind 0.0.0.0:67 in the lab");
    let log_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut machine = Machine::power_on(&lab, &tap, &spec, log_dir.path()).unwrap();

    let mut buffer = [0u8; 1500];
    let mut n_other_packets = 0;
    loop {
        assert!(
            started.elapsed() < DISCOVER_DEADLINE,
            "no DHCPDISCOVER from {} within {DISCOVER_DEADLINE:?} ({n_other_packets} other packets); QEMU log:\n{}",
            spec.mac,
            machine.qemu_log()
        );
        assert!(machine.is_running(), "QEMU exited before a DHCPDISCOVER; QEMU log:\n{}", machine.qemu_log());
        match server.recv_from(&mut buffer) {
            Ok((n, _)) => match parse_dhcp_request(&buffer[..n], mac) {
                Some(request) if request.message_type == Some(DHCPDISCOVER) => {
                    let expected_architecture = match spec.firmware {
                        Firmware::Bios => ARCHITECTURE_BIOS,
                        Firmware::Uefi => ARCHITECTURE_EFI_X86_64,
                    };
                    assert_eq!(request.user_class.as_deref(), Some(&b"iPXE"[..]), "the DISCOVER is not iPXE's");
                    assert_eq!(request.client_architecture, Some(expected_architecture), "wrong firmware");
                    break;
                }
                _ => n_other_packets += 1,
            },
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("receive on 0.0.0.0:67: {e}"),
        }
    }
    let elapsed = started.elapsed();
    eprintln!("DHCPDISCOVER from {} ({:?}, {:?}) after {elapsed:?}", spec.mac, spec.firmware, spec.nic);

    let pid = machine.pid();
    machine.power_off();
    assert!(!machine.is_running());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "QEMU (pid {pid}) still exists after power_off");
    elapsed
}

#[test]
fn bios_e1000_machine_sends_dhcpdiscover_with_its_mac() {
    let spec = MachineSpec {
        firmware: Firmware::Bios,
        nic: Nic::E1000,
        memory_mib: 256,
        ..MachineSpec::new("52:54:00:12:34:56")
    };
    discover_from([10, 249, 30], spec);
}

#[test]
fn uefi_virtio_machine_sends_dhcpdiscover_with_its_mac() {
    assert!(Firmware::Uefi.available(), "OVMF is missing: install the ovmf package");
    let spec = MachineSpec {
        firmware: Firmware::Uefi,
        nic: Nic::Virtio,
        memory_mib: 256,
        ..MachineSpec::new("52:54:00:65:43:21")
    };
    discover_from([10, 249, 31], spec);
}

#[test]
fn a_tap_that_is_not_the_labs_is_refused() {
    require_root();
    let lab = Lab::new([10, 249, 32]).unwrap();
    let log_dir = tempfile::tempdir().unwrap();
    let error = Machine::power_on(&lab, "tap7", &MachineSpec::default(), log_dir.path()).unwrap_err();
    assert!(matches!(error, QemuError::TapMissing { .. }), "{error}");
}

#[test]
fn qemu_failing_at_startup_is_an_error_with_its_stderr() {
    require_root();
    let lab = Lab::new([10, 249, 33]).unwrap();
    let tap = lab.add_tap().unwrap();
    let log_dir = tempfile::tempdir().unwrap();
    let _first = Machine::power_on(&lab, &tap, &MachineSpec::default(), log_dir.path()).unwrap();
    // A tap carries one machine: QEMU refuses the second with "Device or resource busy".
    let second_dir = tempfile::tempdir().unwrap();
    let error = Machine::power_on(&lab, &tap, &MachineSpec::new("52:54:00:00:00:02"), second_dir.path()).unwrap_err();
    let QemuError::Exited { command, stderr, .. } = &error else { panic!("expected Exited, got {error:?}") };
    assert!(command.contains("qemu-system-x86_64"), "{command}");
    assert!(stderr.contains(&tap), "{stderr}");
}

#[test]
fn bad_specs_are_refused_before_qemu_starts() {
    require_root();
    let lab = Lab::new([10, 249, 34]).unwrap();
    let tap = lab.add_tap().unwrap();
    let log_dir = tempfile::tempdir().unwrap();
    let bad_mac = MachineSpec::new("01:00:5e:00:00:01");
    assert!(matches!(Machine::power_on(&lab, &tap, &bad_mac, log_dir.path()), Err(QemuError::Mac { .. })));
    let huge = MachineSpec { memory_mib: 1 << 20, ..MachineSpec::default() };
    assert!(matches!(Machine::power_on(&lab, &tap, &huge, log_dir.path()), Err(QemuError::Memory { .. })));
}

#[test]
fn parse_dhcp_request_reads_a_discover() {
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let mut packet = vec![0u8; 240];
    packet[0] = BOOTREQUEST;
    packet[28..34].copy_from_slice(&mac);
    packet[236..240].copy_from_slice(&DHCP_MAGIC_COOKIE);
    packet.extend_from_slice(&[DHCP_OPTION_PAD, DHCP_OPTION_MESSAGE_TYPE, 1, DHCPDISCOVER]);
    packet.extend_from_slice(&[DHCP_OPTION_CLIENT_ARCHITECTURE, 2, 0, 7, DHCP_OPTION_USER_CLASS, 4]);
    packet.extend_from_slice(b"iPXE");
    packet.push(DHCP_OPTION_END);
    let expected = DhcpRequest {
        message_type: Some(DHCPDISCOVER),
        user_class: Some(b"iPXE".to_vec()),
        client_architecture: Some(ARCHITECTURE_EFI_X86_64),
    };
    assert_eq!(parse_dhcp_request(&packet, mac), Some(expected));
    assert_eq!(parse_dhcp_request(&packet, [0x52, 0x54, 0, 0, 0, 1]), None, "another MAC");
    assert_eq!(parse_dhcp_request(&packet[..239], mac), None, "truncated");
    packet[0] = 2;
    assert_eq!(parse_dhcp_request(&packet, mac), None, "a reply");
}
