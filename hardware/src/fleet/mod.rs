//! The simulated fleet: many machines in one process, each with its own MAC, smoltcp stack,
//! virtual Redfish BMC and simulated disk, sharing one tap into their rack's provisioning
//! network through an in-process switch. Each machine boots as PXE firmware plus the deploy
//! environment would (see [`machine`]), so the rack and region meet real DHCP, TFTP, HTTP and
//! agent traffic from machines that cost a thread and a few MiB each instead of a QEMU.
//!
//! Threads: one per machine (it owns its smoltcp `Interface` and blocks on its switch port's
//! queue between polls), one reading the tap into the switch, and a one-worker tokio runtime for
//! the BMCs. Machines write frames to the tap directly (a tap write is one frame, atomic).
//!
//! Disks: see [`disk`]: a fleet-wide content-addressed block store plus a per-machine extent
//! map, so a deploy's whole-image read-back really runs on every machine while an image
//! deployed to a hundred machines is held once.

pub mod disk;
pub mod http;
pub mod machine;
pub mod net;
pub mod script;
pub mod switch;
#[allow(unsafe_code)]
mod tap;
pub mod tftp;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metalrack_api::agent::DeployProgress;
use metalrack_image_tools::Hash;

use crate::bmc::{BmcConfig, BmcError, BmcServer};
use crate::qemu::{BootOrder, Firmware};
use disk::{BlockStore, SimDisk};
use machine::{FleetPower, MachineShared, Power, Status};
use switch::{Switch, SwitchCounters, Uplink};

/// Machines one fleet simulates at most: each is a thread, a BMC listener and ~2 MiB of
/// socket buffers while it deploys; the seed's scenario runs 100 on one rack.
pub const FLEET_MACHINES_MAX: usize = 512;
/// The IP MTU a fleet accepts: 576 (IPv4's minimum) to 9000 (jumbo frames).
pub const MTU_MIN: usize = 576;
pub const MTU_MAX: usize = 9000;
/// The MTU when the config says 0.
pub const MTU_DEFAULT: usize = 1500;
/// How long the tap reader waits for a frame before it looks at the stop flag.
const TAP_POLL: Duration = Duration::from_millis(100);
/// Largest frame read from the tap (a jumbo frame and its header).
const TAP_FRAME_BYTES_MAX: usize = MTU_MAX + 14;

/// One simulated machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetMachineSpec {
    /// `52:54:00:..`, any case.
    pub mac: String,
    pub firmware: Firmware,
    pub disk_bytes: u64,
    pub hostname: String,
}

/// A fleet to start.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// An existing tap in the calling thread's network namespace, on the rack's network.
    pub tap: String,
    pub machines: Vec<FleetMachineSpec>,
    /// Every machine's BMC: these credentials, transport and system id. Each BMC listens on
    /// its own port of 127.0.0.1 in the calling thread's namespace (where the rack runs).
    pub bmc: BmcConfig,
    /// Where the fleet may keep files (nothing yet: disks are in memory, see [`disk`]).
    pub work_dir: PathBuf,
    /// IP MTU of the machines' interfaces; 0 means [`MTU_DEFAULT`].
    pub mtu: usize,
}

/// Where a machine is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SimPhase {
    #[default]
    Off,
    Dhcp,
    Tftp,
    Script,
    Kernel,
    /// The deploy environment runs its agent (task, inventory, reports).
    Agent,
    Deploying,
    Erasing,
    /// Booted from its disk (the rack's local-boot script, or the BMC's disk boot); stays on.
    BootedLocal,
    /// Booted an image over the network that is not the deploy environment; stays on.
    BootedImage,
    /// The boot or the agent failed; the machine stays on (as the real agent waits).
    Failed {
        reason: String,
    },
}

/// A machine as the fleet sees it now.
#[derive(Debug, Clone)]
pub struct FleetMachineStatus {
    pub mac: String,
    pub hostname: String,
    /// `https://127.0.0.1:PORT` (or `http://`): the Redfish address to give the region.
    pub bmc_url: String,
    /// The Redfish system id (`PowerParameters::Redfish::system_id`).
    pub system_id: Option<String>,
    pub power_on: bool,
    pub phase: SimPhase,
    /// Boots since the fleet started (each power-on and each reboot).
    pub boots: u32,
    pub bytes_tftp: u64,
    pub bytes_http: u64,
    /// The last deploy's figures.
    pub deploy: Option<DeployProgress>,
    /// Phase changes with the time since the fleet started, the last [`machine::PHASE_LOG_MAX`].
    pub phase_log: Vec<(SimPhase, Duration)>,
    /// Bytes of its disk that hold data (not zeros).
    pub disk_bytes_written: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("the fleet has no machines")]
    NoMachines,
    #[error("the fleet has {count} machines, over {FLEET_MACHINES_MAX}")]
    TooManyMachines { count: usize },
    #[error("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")]
    Mac { mac: String },
    #[error("{mac} is a multicast MAC address; machines need unicast ones")]
    MulticastMac { mac: String },
    #[error("MAC {mac} is given to two machines")]
    DuplicateMac { mac: String },
    #[error("the MTU {mtu} is outside {MTU_MIN}..={MTU_MAX}")]
    Mtu { mtu: usize },
    #[error("{tap:?} is not a network interface name")]
    TapName { tap: String },
    #[error("cannot open /dev/net/tun")]
    OpenTun { source: std::io::Error },
    #[error("cannot attach to tap {tap} (does it exist in this namespace, and is it free?)")]
    AttachTap { tap: String, source: std::io::Error },
    #[error("cannot start the BMCs' runtime")]
    Runtime { source: std::io::Error },
    #[error("cannot start the BMC of {mac}")]
    Bmc { mac: String, source: BmcError },
    #[error("cannot start a thread for {what}")]
    Thread { what: String, source: std::io::Error },
}

/// Parses `aa:bb:cc:dd:ee:ff` (any case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

/// The tap as the switch's uplink.
struct TapUplink(Arc<std::fs::File>);

impl Uplink for TapUplink {
    fn send(&self, frame: &[u8]) {
        // A full tap queue drops the frame, as a congested link would; TCP and the protocols'
        // retries recover.
        if let Err(error) = (&*self.0).write(frame) {
            tracing::trace!(%error, "fleet: a frame to the tap was dropped");
        }
    }
}

/// A running fleet.
pub struct Fleet {
    started: Instant,
    stop: Arc<AtomicBool>,
    switch: Arc<Switch>,
    store: BlockStore,
    machines: Vec<(Arc<MachineShared>, BmcServer)>,
    threads: Vec<JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    system_id: String,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("machines", &self.machines.len()).finish_non_exhaustive()
    }
}

impl Fleet {
    /// Call from a thread inside the rack's network namespace (e.g. inside `Lab::in_namespace`):
    /// the tap is opened and the BMC sockets bound there, and the fleet's threads (spawned from
    /// it) stay there. Every machine starts powered off.
    pub fn start(config: FleetConfig) -> Result<Fleet, FleetError> {
        if config.machines.is_empty() {
            return Err(FleetError::NoMachines);
        }
        if config.machines.len() > FLEET_MACHINES_MAX {
            return Err(FleetError::TooManyMachines { count: config.machines.len() });
        }
        let mtu = if config.mtu == 0 { MTU_DEFAULT } else { config.mtu };
        if !(MTU_MIN..=MTU_MAX).contains(&mtu) {
            return Err(FleetError::Mtu { mtu });
        }
        let mut macs = Vec::new();
        for spec in &config.machines {
            let mac = parse_mac(&spec.mac).ok_or_else(|| FleetError::Mac { mac: spec.mac.clone() })?;
            if mac[0] & 1 == 1 {
                return Err(FleetError::MulticastMac { mac: spec.mac.clone() });
            }
            if macs.contains(&mac) {
                return Err(FleetError::DuplicateMac { mac: spec.mac.clone() });
            }
            macs.push(mac);
        }
        let tap = Arc::new(tap::open(&config.tap)?);
        let switch = Arc::new(Switch::new(&macs, Box::new(TapUplink(tap.clone()))));
        let store = BlockStore::new(disk::STORE_BYTES_MAX_DEFAULT);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fleet-bmc")
            .enable_all()
            .build()
            .map_err(|source| FleetError::Runtime { source })?;
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let mut fleet = Fleet {
            started,
            stop: stop.clone(),
            switch: switch.clone(),
            store: store.clone(),
            machines: Vec::new(),
            threads: Vec::new(),
            runtime: None,
            system_id: config.bmc.system_id.clone(),
        };
        for (index, (spec, mac)) in config.machines.iter().zip(&macs).enumerate() {
            let spec = FleetMachineSpec { mac: spec.mac.to_ascii_lowercase(), ..spec.clone() };
            let shared = Arc::new(MachineShared {
                disk: Mutex::new(SimDisk::new(store.clone(), spec.disk_bytes)),
                spec,
                mac: *mac,
                index,
                fleet_started: started,
                power: Mutex::new(Power { on: false, boot: BootOrder::default(), generation: 0 }),
                power_changed: Condvar::new(),
                status: Mutex::new(Status::default()),
                counters: Arc::default(),
                port: switch.port(index),
                stop: stop.clone(),
            });
            let bmc = {
                let _entered = runtime.enter();
                BmcServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config.bmc.clone(), FleetPower(shared.clone()))
                    .map_err(|source| FleetError::Bmc { mac: shared.spec.mac.clone(), source })?
            };
            let (thread_shared, thread_switch) = (shared.clone(), switch.clone());
            let thread = std::thread::Builder::new()
                .name(format!("fleet-{index}"))
                .spawn(move || machine::run(thread_shared, thread_switch, mtu))
                .map_err(|source| FleetError::Thread { what: format!("machine {}", shared.spec.mac), source })?;
            fleet.threads.push(thread);
            fleet.machines.push((shared, bmc));
        }
        let (reader_stop, reader_switch) = (stop.clone(), switch.clone());
        let reader = std::thread::Builder::new()
            .name("fleet-tap".into())
            .spawn(move || read_tap(&tap, &reader_switch, &reader_stop))
            .map_err(|source| FleetError::Thread { what: "the tap reader".into(), source })?;
        fleet.threads.push(reader);
        fleet.runtime = Some(runtime);
        tracing::info!(machines = fleet.machines.len(), tap = %config.tap, mtu, "fleet started");
        Ok(fleet)
    }

    /// Every machine's status, in the config's order.
    pub fn machines(&self) -> Vec<FleetMachineStatus> {
        self.machines
            .iter()
            .map(|(shared, bmc)| {
                let status = shared.status();
                FleetMachineStatus {
                    mac: shared.spec.mac.clone(),
                    hostname: shared.spec.hostname.clone(),
                    bmc_url: bmc.url(),
                    system_id: Some(self.system_id()),
                    power_on: shared.power().on,
                    phase: status.phase.clone(),
                    boots: status.boots,
                    bytes_tftp: shared.counters.bytes_tftp.load(Ordering::Relaxed),
                    bytes_http: shared.counters.bytes_http.load(Ordering::Relaxed),
                    deploy: status.deploy,
                    phase_log: status.phase_log.iter().cloned().collect(),
                    disk_bytes_written: 0,
                }
            })
            .map(|mut status| {
                if let Some((shared, _)) = self.machines.iter().find(|(shared, _)| shared.spec.mac == status.mac) {
                    // Not while a deploy holds the disk: the figure would wait for it to end.
                    if let Ok(disk) = shared.disk.try_lock() {
                        status.disk_bytes_written = disk.bytes_written();
                    }
                }
                status
            })
            .collect()
    }

    fn system_id(&self) -> String {
        self.system_id.clone()
    }

    /// BLAKE3 of the first `len_bytes` of the disk of the machine with `mac` (waits for a
    /// deploy in progress on it to end); `None` for an unknown MAC or a range past the disk.
    pub fn disk_hash(&self, mac: &str, len_bytes: u64) -> Option<Hash> {
        let (shared, _) = self.machines.iter().find(|(shared, _)| shared.spec.mac.eq_ignore_ascii_case(mac))?;
        shared.disk().hash_prefix(len_bytes).ok()
    }

    /// The switch's frame counters.
    pub fn switch_counters(&self) -> SwitchCounters {
        self.switch.counters()
    }

    /// Bytes of distinct blocks the fleet's disks hold together.
    pub fn disk_store_bytes(&self) -> u64 {
        self.store.bytes()
    }

    /// Since the fleet started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops every machine and the BMCs, and joins the threads.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (shared, _) in &self.machines {
            // Under the lock, so a machine between its check of the flag and its wait still
            // gets the notification.
            let _power = shared.power();
            shared.power_changed.notify_all();
            shared.port.wake();
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a fleet thread panicked");
            }
        }
        // The BMCs' tasks end with their runtime.
        self.machines.clear();
        if let Some(runtime) = self.runtime.take() {
            // Not `shutdown_timeout`: a fleet may be dropped inside another runtime (a test's).
            runtime.shutdown_background();
        }
    }
}

/// The tap reader: frames from the rack's network into the switch until the fleet stops.
fn read_tap(tap: &std::fs::File, switch: &Switch, stop: &AtomicBool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut frame = vec![0u8; TAP_FRAME_BYTES_MAX];
    let timeout = PollTimeout::try_from(TAP_POLL.as_millis() as u64).unwrap_or(PollTimeout::MAX);
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => {
                tracing::error!(%error, "fleet: cannot poll the tap; the fleet is cut off");
                return;
            }
        }
        loop {
            match (&*tap).read(&mut frame) {
                Ok(0) => break,
                Ok(len) => switch.from_uplink(&frame[..len]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::error!(%error, "fleet: cannot read the tap; the fleet is cut off");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_in_any_case_and_bad_ones_are_refused() {
        assert_eq!(parse_mac("52:54:00:AA:bb:01"), Some([0x52, 0x54, 0, 0xaa, 0xbb, 1]));
        for bad in
            ["52:54:00:aa:bb", "52:54:00:aa:bb:01:02", "52-54-00-aa-bb-01", "5:54:00:aa:bb:01", "zz:54:00:aa:bb:01"]
        {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    fn config(macs: &[&str]) -> FleetConfig {
        FleetConfig {
            tap: "no-such-tap0".into(),
            machines: macs
                .iter()
                .map(|mac| FleetMachineSpec {
                    mac: mac.to_string(),
                    firmware: Firmware::Bios,
                    disk_bytes: 1 << 20,
                    hostname: "m".into(),
                })
                .collect(),
            bmc: BmcConfig::new("root", "pw"),
            work_dir: std::env::temp_dir(),
            mtu: 0,
        }
    }

    #[test]
    fn a_bad_config_is_refused_before_anything_starts() {
        assert!(matches!(Fleet::start(config(&[])), Err(FleetError::NoMachines)));
        assert!(matches!(
            Fleet::start(config(&["52:54:00:00:00:01", "52:54:00:00:00:01"])),
            Err(FleetError::DuplicateMac { .. })
        ));
        assert!(matches!(Fleet::start(config(&["53:54:00:00:00:01"])), Err(FleetError::MulticastMac { .. })));
        assert!(matches!(Fleet::start(config(&["nope"])), Err(FleetError::Mac { .. })));
        assert!(matches!(
            Fleet::start(FleetConfig { mtu: 100, ..config(&["52:54:00:00:00:01"]) }),
            Err(FleetError::Mtu { .. })
        ));
    }
}
