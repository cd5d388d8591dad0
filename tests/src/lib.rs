//! Harness for the end-to-end tests and the benchmarks: runs the real `regiond`, `rackd` and
//! `imgtool` binaries (port 0, a temp dir per test), inside a lab's network namespace when asked,
//! and waits for conditions with deadlines instead of sleeping.
//!
//! Map: [`region`] (regiond, admin, secret, push), [`rack`] (register, serve, snapshot),
//! [`rack_client`] (a rack without rackd: register, heartbeat, poll), [`loopback`] (clients
//! from other loopback addresses), [`api`] (the region's JSON API), [`process`] (daemons
//! stopped on drop, checked commands, peak memory),
//! [`lab`] (async code in a namespace), [`proxy`] (a recorder and a man in the middle between rack
//! and region), [`wait`], [`data`] (pseudo-random files), [`binaries`],
//! [`fleet_lab`] (a region, a rack and simulated machines), [`readme`] (the operator guide's
//! commands), [`site`] (a whole simulated site from a scenario file: region, racks, shaped
//! uplinks), [`tftp`] (a TFTP client), [`bench`] (what only the benchmarks share), [`debian_image`] (real Debian images, two
//! versions, built by mmdebstrap and cached by recipe), [`latency`]
//! (named requests timed at an interval: p50/p99/max), [`scale`] (a simulated site of many racks
//! heartbeating and polling, machines, boots). Tests use the short forms that panic with the reason
//! (`Region::start`); the benchmarks the `Result` forms (`Region::launch`), so an error unwinds
//! through their locals and stops everything they started.

pub mod api;
pub mod bench;
pub mod binaries;
pub mod data;
pub mod debian_image;
pub mod deploy_env;
pub mod deploy_lab;
pub mod disk_image;
pub mod fleet_lab;
pub mod lab;
pub mod latency;
pub mod loopback;
pub mod process;
pub mod proxy;
pub mod rack;
pub mod rack_client;
pub mod readme;
pub mod region;
pub mod reports;
pub mod scale;
pub mod site;
pub mod tftp;
pub mod wait;

pub use binaries::binary;
pub use data::{compressible_bytes, random_bytes};
pub use process::{assert_success, stderr, Daemon};
pub use rack::{Rack, FAST_RACK_CONFIG};
pub use region::{regiond, Region, FAST_REGION_CONFIG};
pub use wait::{wait_for, wait_for_or_show, DEADLINE};

/// A port free on 127.0.0.1 right now, for TCP and UDP alike (for servers whose port must be
/// known in advance; the race with other programs is small and shows as a bind error).
pub fn free_port() -> u16 {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    match std::net::UdpSocket::bind(("127.0.0.1", port)) {
        Ok(_) => port,
        Err(_) => free_port(),
    }
}
