//! A site in network namespaces: the region's namespace, one [`Lab`] per rack (its provisioning
//! bridge on a subnet of its own and ONE tap for that rack's simulated fleet), and per rack a veth
//! pair to the region's namespace shaped like a top-of-rack uplink (`tc` tbf, each direction), with
//! byte counters on every link.
//!
//! Invariants: the topology changes nothing in the host's namespace (every `ip`/`tc` call names a
//! namespace of its own; dropping it deletes them all); the region's namespace does not forward
//! (`net.ipv4.ip_forward = 0`), so nothing (deploy traffic included) crosses from one rack to
//! another; IPv6 is off in every namespace, so the counters hold only the site's own IPv4 traffic.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::command::{run, CommandError};
use crate::lab::{Lab, LabError, Namespace};

/// Racks one topology builds. Each rack is a namespace with a rackd and a fleet process; the
/// machines this runs on have 2 cores, and the seed's site has 3: 16 leaves room for benchmarks
/// and keeps the per-rack address plan (`172.30.<rack>.0/30`, `10.77.<rack>.0/24`) simple.
pub const RACKS_MAX: usize = 16;

/// The uplink of rack `i` is `172.30.<i>.0/30`: the region's end `.1`, the rack's end `.2`.
pub const UPLINK_PREFIX: [u8; 2] = [172, 30];

/// The provisioning network of rack `i` is `10.77.<i>.0/24`, its bridge `.1`.
pub const PROVISIONING_PREFIX: [u8; 2] = [10, 77];

/// The rack's end of its uplink, in the rack's namespace.
pub const UPLINK_DEVICE: &str = "uplink";

/// Lowest and highest rate a shaped link may have. Below 1 Mbit/s a sync of even the deploy
/// environment takes minutes; 100 Gbit/s is more than a veth carries on this hardware anyway.
pub const LINK_MBIT_MIN: u32 = 1;
pub const LINK_MBIT_MAX: u32 = 100_000;

/// Smallest token bucket of a shaped link. A veth hands tbf GSO packets of up to 64 KiB, and a
/// packet larger than the bucket is cut into segments first (CPU for nothing): twice that fits.
const TBF_BURST_BYTES_MIN: u64 = 128 * 1024;

/// The bucket holds this long at the link's rate when that is more than the minimum: a burst of
/// one millisecond is what a switch port's buffer absorbs, and keeps the rate exact over seconds.
const TBF_BURST_MS: u64 = 1;

/// How long a packet may wait in a shaped link's queue before tbf drops it: 100 ms at the rate,
/// the buffer of a deep-buffered top-of-rack port; TCP sees drops, as it would on a real uplink.
const TBF_LATENCY_MS: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("a topology has 1 to {RACKS_MAX} racks, not {n}")]
    RackCount { n: usize },
    #[error("link {link}: {mbit} Mbit/s is outside {LINK_MBIT_MIN}..={LINK_MBIT_MAX}")]
    Rate { link: String, mbit: u32 },
    #[error("cannot create the region's network namespace")]
    RegionNamespace { source: Box<LabError> },
    #[error("cannot create the network namespace of rack {rack}")]
    RackNamespace { rack: String, source: Box<LabError> },
    #[error("cannot set up network namespace {namespace}")]
    Sysctl { namespace: String, source: Box<LabError> },
    #[error("cannot create the tap of rack {rack}'s fleet")]
    Tap { rack: String, source: Box<LabError> },
    #[error("cannot create the uplink (veth {region_device} ↔ {UPLINK_DEVICE}) of rack {rack}")]
    CreateUplink { rack: String, region_device: String, source: Box<CommandError> },
    #[error("cannot give {device} the address {address} in network namespace {namespace}")]
    Address { namespace: String, device: String, address: String, source: Box<CommandError> },
    #[error("cannot bring up {device} in network namespace {namespace}")]
    LinkUp { namespace: String, device: String, source: Box<CommandError> },
    #[error("cannot route rack {rack}'s default traffic to the region's end of its uplink")]
    DefaultRoute { rack: String, source: Box<CommandError> },
    #[error("cannot shape {device} to {mbit} Mbit/s in network namespace {namespace}")]
    Shape { namespace: String, device: String, mbit: u32, source: Box<CommandError> },
    #[error("cannot read the counters of {device} in network namespace {namespace}")]
    ReadCounters { namespace: String, device: String, source: Box<CommandError> },
    #[error("unexpected counters of {device} in network namespace {namespace}: {reason}")]
    ParseCounters { namespace: String, device: String, reason: String },
    #[error("no rack {rack} in this topology")]
    NoRack { rack: String },
}

/// One rack of a [`TopologySpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackLinks {
    pub name: String,
    /// The uplink's rate, each direction.
    pub uplink_mbit: u32,
    /// The rate of the fleet's tap towards the machines (what the rack sends them), or unshaped.
    pub provisioning_mbit: Option<u32>,
}

/// What to build: the racks, in order (rack `i` gets the `i`th subnets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySpec {
    pub racks: Vec<RackLinks>,
}

/// A rack's uplink: a veth pair between the region's namespace and the rack's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// The region's end, in the region's namespace: `rack<i>`.
    pub region_device: String,
    /// The region's address on it: what the rack registers with.
    pub region_address: Ipv4Addr,
    /// The rack's address on it (its end is [`UPLINK_DEVICE`]).
    pub rack_address: Ipv4Addr,
    /// The rate each direction.
    pub rate_mbit: u32,
}

/// One rack's network: its namespace with the provisioning bridge, the fleet's tap, its uplink.
#[derive(Debug)]
pub struct RackNetwork {
    name: String,
    lab: Lab,
    tap: String,
    uplink: Uplink,
    provisioning_mbit: Option<u32>,
}

impl RackNetwork {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The rack's namespace: rackd serves PXE on its bridge ([`Lab::bridge`], [`Lab::gateway`]);
    /// the fleet starts with [`Lab::in_namespace`].
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The one tap of this rack's fleet, a port of the bridge.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    pub fn uplink(&self) -> &Uplink {
        &self.uplink
    }

    pub fn provisioning_mbit(&self) -> Option<u32> {
        self.provisioning_mbit
    }
}

/// Bytes and packets through one network device since it was created, as the kernel counts them
/// (Ethernet frames without the FCS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

impl DeviceCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &DeviceCounters) -> DeviceCounters {
        DeviceCounters {
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
        }
    }
}

/// Both ends of a rack's uplink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UplinkCounters {
    /// The region's end: `tx` went down to the rack, `rx` came up from it.
    pub region_end: DeviceCounters,
    /// The rack's end: `rx` came down from the region, `tx` went up to it.
    pub rack_end: DeviceCounters,
}

impl UplinkCounters {
    /// Bytes that crossed from the region to the rack (what the rack received).
    pub fn down_bytes(&self) -> u64 {
        self.rack_end.rx_bytes
    }

    /// Bytes that crossed from the rack to the region (what the region received).
    pub fn up_bytes(&self) -> u64 {
        self.region_end.rx_bytes
    }

    pub fn since(&self, earlier: &UplinkCounters) -> UplinkCounters {
        UplinkCounters {
            region_end: self.region_end.since(&earlier.region_end),
            rack_end: self.rack_end.since(&earlier.rack_end),
        }
    }
}

/// The site's namespaces and links; dropping it deletes them (racks first, then the region's).
#[derive(Debug)]
pub struct Topology {
    racks: Vec<RackNetwork>,
    region: Namespace,
}

impl Topology {
    /// Builds the region's namespace and every rack's; see the module's invariants.
    pub fn build(spec: &TopologySpec) -> Result<Topology, TopologyError> {
        let n = spec.racks.len();
        if n == 0 || n > RACKS_MAX {
            return Err(TopologyError::RackCount { n });
        }
        for rack in &spec.racks {
            check_rate(&format!("{} uplink", rack.name), rack.uplink_mbit)?;
            if let Some(mbit) = rack.provisioning_mbit {
                check_rate(&format!("{} provisioning", rack.name), mbit)?;
            }
        }
        let region = Namespace::new().map_err(|source| TopologyError::RegionNamespace { source: Box::new(source) })?;
        isolate(&region)?;
        let mut topology = Topology { racks: Vec::with_capacity(n), region };
        for (index, links) in spec.racks.iter().enumerate() {
            let rack = topology.add_rack(index, links)?;
            topology.racks.push(rack);
        }
        Ok(topology)
    }

    fn add_rack(&self, index: usize, links: &RackLinks) -> Result<RackNetwork, TopologyError> {
        let rack = || links.name.clone();
        let i = u8::try_from(index).expect("RACKS_MAX fits a byte");
        let [p0, p1] = PROVISIONING_PREFIX;
        let lab = Lab::new([p0, p1, i])
            .map_err(|source| TopologyError::RackNamespace { rack: rack(), source: Box::new(source) })?;
        isolate(lab.namespace())?;
        let tap = lab.add_tap().map_err(|source| TopologyError::Tap { rack: rack(), source: Box::new(source) })?;

        let [u0, u1] = UPLINK_PREFIX;
        let uplink = Uplink {
            region_device: format!("rack{index}"),
            region_address: Ipv4Addr::new(u0, u1, i, 1),
            rack_address: Ipv4Addr::new(u0, u1, i, 2),
            rate_mbit: links.uplink_mbit,
        };
        // One command creates both ends, the rack's straight in the rack's namespace, so no end
        // ever exists in the host's.
        run(self.region.ip().args(["link", "add", &uplink.region_device, "type", "veth", "peer", "name"]).args([
            UPLINK_DEVICE,
            "netns",
            lab.name(),
        ]))
        .map_err(|source| TopologyError::CreateUplink {
            rack: rack(),
            region_device: uplink.region_device.clone(),
            source: Box::new(source),
        })?;
        let ends = [
            (&self.region, uplink.region_device.as_str(), uplink.region_address),
            (lab.namespace(), UPLINK_DEVICE, uplink.rack_address),
        ];
        for (namespace, device, address) in ends {
            let address = format!("{address}/30");
            run(namespace.ip().args(["addr", "add", &address, "dev", device])).map_err(|source| {
                TopologyError::Address {
                    namespace: namespace.name().to_owned(),
                    device: device.to_owned(),
                    address,
                    source: Box::new(source),
                }
            })?;
            shape(namespace, device, uplink.rate_mbit)?;
            run(namespace.ip().args(["link", "set", device, "up"])).map_err(|source| TopologyError::LinkUp {
                namespace: namespace.name().to_owned(),
                device: device.to_owned(),
                source: Box::new(source),
            })?;
        }
        // The rack's way out is its uplink, as on a real site; with the region not forwarding,
        // that is also what proves no packet reaches another rack.
        run(lab.namespace().ip().args(["route", "add", "default", "via", &uplink.region_address.to_string()]))
            .map_err(|source| TopologyError::DefaultRoute { rack: rack(), source: Box::new(source) })?;
        if let Some(mbit) = links.provisioning_mbit {
            shape(lab.namespace(), &tap, mbit)?;
        }
        Ok(RackNetwork { name: links.name.clone(), lab, tap, uplink, provisioning_mbit: links.provisioning_mbit })
    }

    /// The region's namespace: regiond runs here and reaches rack `i` at its uplink's
    /// `rack_address`; racks reach it at `region_address`.
    pub fn region(&self) -> &Namespace {
        &self.region
    }

    pub fn racks(&self) -> &[RackNetwork] {
        &self.racks
    }

    pub fn rack(&self, name: &str) -> Result<&RackNetwork, TopologyError> {
        self.racks.iter().find(|r| r.name == name).ok_or_else(|| TopologyError::NoRack { rack: name.to_owned() })
    }

    /// Both ends of rack `name`'s uplink, now.
    pub fn uplink_counters(&self, name: &str) -> Result<UplinkCounters, TopologyError> {
        let rack = self.rack(name)?;
        Ok(UplinkCounters {
            region_end: device_counters(&self.region, &rack.uplink.region_device)?,
            rack_end: device_counters(rack.lab.namespace(), UPLINK_DEVICE)?,
        })
    }

    /// The fleet's tap of rack `name`, now: `tx` went to the machines, `rx` came from them.
    pub fn provisioning_counters(&self, name: &str) -> Result<DeviceCounters, TopologyError> {
        let rack = self.rack(name)?;
        device_counters(rack.lab.namespace(), &rack.tap)
    }
}

fn check_rate(link: &str, mbit: u32) -> Result<(), TopologyError> {
    if (LINK_MBIT_MIN..=LINK_MBIT_MAX).contains(&mbit) {
        Ok(())
    } else {
        Err(TopologyError::Rate { link: link.to_owned(), mbit })
    }
}

/// No forwarding (a namespace's default, set anyway: it is what keeps racks apart) and no IPv6
/// (its neighbour discovery would add bytes to every link's counters).
fn isolate(namespace: &Namespace) -> Result<(), TopologyError> {
    for (key, value) in [
        ("net.ipv4.ip_forward", "0"),
        ("net.ipv6.conf.all.disable_ipv6", "1"),
        ("net.ipv6.conf.default.disable_ipv6", "1"),
    ] {
        namespace.sysctl(key, value).map_err(|source| TopologyError::Sysctl {
            namespace: namespace.name().to_owned(),
            source: Box::new(source),
        })?;
    }
    Ok(())
}

/// The token bucket of a link at `mbit`, in bytes.
fn burst_bytes(mbit: u32) -> u64 {
    let bytes_per_ms = u64::from(mbit) * 1_000_000 / 8 / 1000;
    (bytes_per_ms * TBF_BURST_MS).max(TBF_BURST_BYTES_MIN)
}

/// Limits what `device` sends to `mbit` (tbf as its root qdisc).
fn shape(namespace: &Namespace, device: &str, mbit: u32) -> Result<(), TopologyError> {
    let mut command: Command = namespace.tc();
    command.args(["qdisc", "add", "dev", device, "root", "tbf"]).args([
        "rate".to_owned(),
        format!("{mbit}mbit"),
        "burst".to_owned(),
        burst_bytes(mbit).to_string(),
        "latency".to_owned(),
        format!("{TBF_LATENCY_MS}ms"),
    ]);
    run(&mut command).map_err(|source| TopologyError::Shape {
        namespace: namespace.name().to_owned(),
        device: device.to_owned(),
        mbit,
        source: Box::new(source),
    })?;
    Ok(())
}

/// `ip -j -s -n NS link show DEV`'s byte and packet counters.
pub fn device_counters(namespace: &Namespace, device: &str) -> Result<DeviceCounters, TopologyError> {
    let output = run(namespace.ip().args(["-j", "-s", "link", "show", "dev", device])).map_err(|source| {
        TopologyError::ReadCounters {
            namespace: namespace.name().to_owned(),
            device: device.to_owned(),
            source: Box::new(source),
        }
    })?;
    parse_counters(&output.stdout).map_err(|reason| TopologyError::ParseCounters {
        namespace: namespace.name().to_owned(),
        device: device.to_owned(),
        reason,
    })
}

fn parse_counters(json: &[u8]) -> Result<DeviceCounters, String> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let stats = value.get(0).and_then(|link| link.get("stats64")).ok_or("no stats64 in the answer")?;
    let number = |direction: &str, key: &str| {
        stats
            .get(direction)
            .and_then(|d| d.get(key))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("no stats64.{direction}.{key}"))
    };
    Ok(DeviceCounters {
        rx_bytes: number("rx", "bytes")?,
        tx_bytes: number("tx", "bytes")?,
        rx_packets: number("rx", "packets")?,
        tx_packets: number("tx", "packets")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_from_ip_json() {
        let json = br#"[{"ifindex":2,"ifname":"uplink","stats64":{"rx":{"bytes":90,"packets":1,"errors":0},
            "tx":{"bytes":1234,"packets":7,"errors":0}}}]"#;
        let counters = parse_counters(json).unwrap();
        assert_eq!(counters, DeviceCounters { rx_bytes: 90, tx_bytes: 1234, rx_packets: 1, tx_packets: 7 });
        assert!(parse_counters(br#"[{"ifname":"x"}]"#).unwrap_err().contains("stats64"));
        assert!(parse_counters(b"garbage").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn burst_holds_a_gso_packet_and_a_millisecond_at_rate() {
        assert_eq!(burst_bytes(80), TBF_BURST_BYTES_MIN);
        assert_eq!(burst_bytes(10_000), 1_250_000);
    }

    #[test]
    fn rates_outside_the_range_are_refused_before_anything_is_built() {
        let spec = |mbit| TopologySpec {
            racks: vec![RackLinks { name: "r".into(), uplink_mbit: mbit, provisioning_mbit: None }],
        };
        assert!(matches!(Topology::build(&spec(0)), Err(TopologyError::Rate { mbit: 0, .. })));
        assert!(matches!(Topology::build(&TopologySpec { racks: vec![] }), Err(TopologyError::RackCount { n: 0 })));
    }
}
