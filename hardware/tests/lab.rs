//! The lab against the real kernel: a namespace with a bridge and taps appears, carries traffic
//! on its gateway address, stays off the host, and is gone after drop.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use metalrack_hardware::have_root;
use metalrack_hardware::lab::{Lab, LabError, TAPS_PER_LAB_MAX};

/// Every receive in these tests; a local round trip takes microseconds.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

fn require_root() {
    assert!(
        have_root(),
        "metalrack-hardware's tests create network namespaces and need root; run `cargo test -p metalrack-hardware` as root"
    );
}

fn namespaces() -> String {
    let output = Command::new("ip").args(["netns", "list"]).output().expect("run `ip netns list`");
    assert!(output.status.success(), "`ip netns list` failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn lists_namespace(list: &str, name: &str) -> bool {
    // Lines are "NAME" or "NAME (id: N)".
    list.lines().any(|line| line.split_whitespace().next() == Some(name))
}

fn ip_in(lab: &Lab, args: &[&str]) -> String {
    let output = Command::new("ip").arg("-n").arg(lab.name()).args(args).output().unwrap();
    assert!(output.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn lab_lives_in_its_own_namespace_and_is_deleted_on_drop() {
    require_root();
    let lab = Lab::new([10, 249, 17]).unwrap();
    let name = lab.name().to_string();
    assert!(name.starts_with("mrlab-") && name.len() == "mrlab-".len() + 6, "{name}");
    assert!(name["mrlab-".len()..].chars().all(|c| c.is_ascii_hexdigit()), "{name}");
    assert!(lists_namespace(&namespaces(), &name), "`ip netns list` lacks {name}:\n{}", namespaces());
    assert_eq!(lab.bridge(), "br0");
    assert_eq!(lab.gateway().octets(), [10, 249, 17, 1]);

    let bridge = ip_in(&lab, &["-o", "addr", "show", "dev", "br0"]);
    assert!(bridge.contains("inet 10.249.17.1/24"), "{bridge}");
    let loopback = ip_in(&lab, &["-o", "link", "show", "dev", "lo"]);
    assert!(loopback.contains(",UP"), "lo is not up: {loopback}");

    let tap = lab.add_tap().unwrap();
    assert_eq!(tap, "tap0");
    let tap_link = ip_in(&lab, &["-d", "-o", "link", "show", "dev", &tap]);
    assert!(tap_link.contains("master br0"), "{tap_link}");
    assert!(tap_link.contains("tun type tap"), "{tap_link}");
    assert!(tap_link.contains(",UP"), "tap not up: {tap_link}");
    assert_eq!(lab.add_tap().unwrap(), "tap1");

    // The gateway answers a UDP round trip inside the namespace…
    let gateway = lab.gateway();
    let (request, reply) = lab
        .in_namespace(move || {
            let server = UdpSocket::bind((gateway, 0)).expect("bind gateway:0 in the namespace");
            let client = UdpSocket::bind(("0.0.0.0", 0)).expect("bind 0.0.0.0:0 in the namespace");
            server.set_read_timeout(Some(RECEIVE_TIMEOUT)).unwrap();
            client.set_read_timeout(Some(RECEIVE_TIMEOUT)).unwrap();
            client.send_to(b"ping", server.local_addr().unwrap()).unwrap();
            let mut buffer = [0u8; 64];
            let (n, from) = server.recv_from(&mut buffer).expect("the gateway receives");
            let request = buffer[..n].to_vec();
            server.send_to(b"pong", from).unwrap();
            let (n, from) = client.recv_from(&mut buffer).expect("the client receives the reply");
            assert_eq!(from, server.local_addr().unwrap());
            (request, buffer[..n].to_vec())
        })
        .unwrap();
    assert_eq!((request.as_slice(), reply.as_slice()), (&b"ping"[..], &b"pong"[..]));

    // …and exists nowhere else: the host has no such address.
    let on_host = UdpSocket::bind(SocketAddr::from((gateway, 0)));
    assert!(on_host.is_err(), "the host can bind {gateway}: the lab's address leaked, or the host has it");

    drop(lab);
    assert!(!lists_namespace(&namespaces(), &name), "{name} still listed after drop:\n{}", namespaces());
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
}

#[test]
fn commands_and_sockets_made_inside_stay_inside() {
    require_root();
    let lab = Lab::new([10, 249, 18]).unwrap();

    let output = lab.command("ip").args(["-o", "addr", "show", "dev", "br0"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("10.249.18.1/24"));

    // A socket made in the namespace and used from this thread still reaches the gateway.
    let gateway = lab.gateway();
    let server = lab.in_namespace(move || UdpSocket::bind((gateway, 0))).unwrap().unwrap();
    let client = lab.in_namespace(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap().unwrap();
    server.set_read_timeout(Some(RECEIVE_TIMEOUT)).unwrap();
    client.send_to(b"hello", server.local_addr().unwrap()).unwrap();
    let mut buffer = [0u8; 16];
    let (n, _) = server.recv_from(&mut buffer).unwrap();
    assert_eq!(&buffer[..n], b"hello");
}

#[test]
fn a_panic_inside_the_namespace_reaches_the_caller() {
    require_root();
    let lab = Lab::new([10, 249, 19]).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lab.in_namespace(|| panic!("boom in the namespace")).unwrap();
    }));
    let payload = result.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom in the namespace"));
}

#[test]
fn taps_are_limited_per_lab() {
    require_root();
    let lab = Lab::new([10, 249, 20]).unwrap();
    for index in 0..TAPS_PER_LAB_MAX {
        assert_eq!(lab.add_tap().unwrap(), format!("tap{index}"));
    }
    let error = lab.add_tap().unwrap_err();
    assert!(matches!(error, LabError::TooManyTaps { max: TAPS_PER_LAB_MAX, .. }), "{error}");
}

#[test]
fn special_subnets_are_refused() {
    require_root();
    let error = Lab::new([127, 0, 0]).unwrap_err();
    assert!(matches!(error, LabError::Subnet { .. }), "{error}");
}
