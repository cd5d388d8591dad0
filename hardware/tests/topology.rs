//! A site's topology against the real kernel: racks reach the region over their uplinks and never
//! each other, the counters count what crossed, the shaping holds the rate, the host's namespace
//! gains nothing, and everything is gone after drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use metalrack_hardware::have_root;
use metalrack_hardware::topology::{RackLinks, Topology, TopologySpec, UPLINK_DEVICE};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn spec(uplink_mbit: u32) -> TopologySpec {
    TopologySpec {
        racks: ["rack1", "rack2"]
            .iter()
            .map(|name| RackLinks { name: (*name).into(), uplink_mbit, provisioning_mbit: Some(1000) })
            .collect(),
    }
}

fn host_links() -> String {
    let output = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn racks_reach_the_region_over_shaped_counted_uplinks_but_never_each_other_and_nothing_outlives_drop() {
    assert!(have_root(), "needs root (network namespaces)");
    let links_before = host_links();
    let topology = Topology::build(&spec(80)).unwrap();
    let names: Vec<String> = std::iter::once(topology.region().name().to_owned())
        .chain(topology.racks().iter().map(|r| r.lab().name().to_owned()))
        .collect();
    assert_eq!(host_links(), links_before, "the host's namespace gained no device");

    // The region listens on every address of its namespace; rack1 sends it 4 MiB.
    let region_address = topology.racks()[0].uplink().region_address;
    let listener = topology.region().in_namespace(|| TcpListener::bind("0.0.0.0:0")).unwrap().unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).unwrap();
        received.len()
    });
    let before = topology.uplink_counters("rack1").unwrap();
    let payload_bytes = 4usize << 20;
    let started = Instant::now();
    let sent = topology.racks()[0]
        .lab()
        .in_namespace(move || {
            let mut stream = TcpStream::connect_timeout(&SocketAddr::from((region_address, port)), CONNECT_TIMEOUT)?;
            stream.write_all(&vec![0x5a; payload_bytes])?;
            stream.shutdown(std::net::Shutdown::Write)?;
            std::io::Result::Ok(())
        })
        .unwrap();
    sent.unwrap();
    assert_eq!(receiver.join().unwrap(), payload_bytes);
    let took = started.elapsed();
    let crossed = topology.uplink_counters("rack1").unwrap().since(&before);
    assert!(crossed.up_bytes() >= payload_bytes as u64, "{crossed:?}");
    assert!(crossed.up_bytes() < payload_bytes as u64 * 11 / 10, "{crossed:?}");
    assert_eq!(crossed.up_bytes(), crossed.rack_end.tx_bytes, "both ends count the same frames");
    // 4 MiB at 80 Mbit/s is 0.42 s; the bucket lets 128 KiB through at once.
    let floor = Duration::from_secs_f64((payload_bytes - (128 << 10)) as f64 * 8.0 / 80e6);
    assert!(took >= floor, "the uplink's rate held: {took:?} for {payload_bytes} bytes");
    assert_eq!(topology.uplink_counters("rack2").unwrap().rack_end.rx_bytes, 0, "rack2 saw none of it");

    // rack2 cannot reach rack1's end of its uplink, nor rack1's provisioning bridge.
    let rack1_addresses = [topology.racks()[0].uplink().rack_address, topology.racks()[0].lab().gateway()];
    let attempts = topology.racks()[1]
        .lab()
        .in_namespace(move || {
            rack1_addresses.map(|address| TcpStream::connect_timeout(&SocketAddr::from((address, 22)), CONNECT_TIMEOUT))
        })
        .unwrap();
    for attempt in attempts {
        assert!(attempt.is_err(), "a rack reached another rack: {attempt:?}");
    }
    assert_eq!(
        metalrack_hardware::topology::device_counters(topology.racks()[0].lab().namespace(), UPLINK_DEVICE)
            .unwrap()
            .rx_bytes,
        topology.uplink_counters("rack1").unwrap().down_bytes()
    );

    drop(topology);
    let list = String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    for name in names {
        assert!(!list.contains(&name), "{name} outlived the topology: {list}");
    }
}
