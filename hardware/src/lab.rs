//! Network namespaces as racks: a [`Namespace`] is a private network namespace and ways to run
//! processes and threads inside it; a [`Lab`] is one with a bridge and taps for virtual machines.
//!
//! Invariant: the lab changes nothing in the host's namespace. Every `ip` call names the lab's
//! namespace (`ip -n`/`ip netns exec`), so the bridge, its address and the taps exist only there,
//! and dropping the [`Lab`] deletes the namespace with all of them.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::CloneFlags;

use crate::command::{run, CommandError};

/// Names of the namespaces a lab creates start with this, so a leftover one is easy to recognise
/// in `ip netns list`.
pub const NAMESPACE_PREFIX: &str = "mrlab-";

/// The bridge inside every lab; the taps of the lab's machines are its ports.
pub const BRIDGE_NAME: &str = "br0";

/// Prefix length of the lab's subnet: the bridge carries `<subnet_prefix>.1/24`.
pub const SUBNET_PREFIX_LEN: u8 = 24;

/// Taps one lab hands out. Each tap usually carries a QEMU machine running under TCG, and the
/// machines this lab runs on have 2 cores: a test boots a handful at most, so 16 is generous and
/// keeps a runaway loop from creating devices without end.
pub const TAPS_PER_LAB_MAX: u32 = 16;

/// Where `ip netns add` mounts a namespace; [`Lab::in_namespace`] opens it from here.
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "the virtual hardware lab needs root (it creates network namespaces, bridges and taps); \
         run the tests as root"
    )]
    NotRoot,
    #[error("subnet prefix {}.{}.{} cannot be a lab subnet: {reason}", prefix[0], prefix[1], prefix[2])]
    Subnet { prefix: [u8; 3], reason: &'static str },
    #[error("cannot create network namespace {namespace}")]
    CreateNamespace { namespace: String, source: CommandError },
    #[error("cannot bring up lo in network namespace {namespace}")]
    LoopbackUp { namespace: String, source: CommandError },
    #[error("cannot create bridge {BRIDGE_NAME} in network namespace {namespace}")]
    CreateBridge { namespace: String, source: CommandError },
    #[error("cannot give bridge {BRIDGE_NAME} the address {address} in network namespace {namespace}")]
    AddressBridge { namespace: String, address: String, source: CommandError },
    #[error("cannot bring up bridge {BRIDGE_NAME} in network namespace {namespace}")]
    BridgeUp { namespace: String, source: CommandError },
    #[error("network namespace {namespace} already has {max} taps (TAPS_PER_LAB_MAX)")]
    TooManyTaps { namespace: String, max: u32 },
    #[error("cannot create tap {tap} in network namespace {namespace}")]
    CreateTap { namespace: String, tap: String, source: CommandError },
    #[error("cannot add tap {tap} to bridge {BRIDGE_NAME} in network namespace {namespace}")]
    EnslaveTap { namespace: String, tap: String, source: CommandError },
    #[error("cannot bring up tap {tap} in network namespace {namespace}")]
    TapUp { namespace: String, tap: String, source: CommandError },
    #[error("cannot open network namespace file {path}")]
    OpenNamespace { path: PathBuf, source: std::io::Error },
    #[error("cannot start a thread for network namespace {namespace}")]
    SpawnThread { namespace: String, source: std::io::Error },
    #[error("a thread cannot join network namespace {namespace}")]
    JoinNamespace { namespace: String, source: nix::Error },
    #[error("cannot set {setting} in network namespace {namespace}")]
    Sysctl { namespace: String, setting: String, source: CommandError },
}

/// Whether this process runs as root (effective uid 0), which the lab needs.
pub fn have_root() -> bool {
    // /proc/self/status rather than geteuid(): nix gates that behind a feature the workspace
    // does not enable. The `Uid:` line is "real effective saved filesystem".
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|effective| effective == "0")
}

/// A network namespace `mrlab-<6 hex>` with `lo` up and nothing else: what a [`Lab`] is built on,
/// and on its own the region's side of a [`crate::topology::Topology`]. Dropping it deletes the
/// namespace with every device in it, also when a test panics.
pub struct Namespace {
    name: String,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace").field("name", &self.name).finish()
    }
}

impl Namespace {
    /// Creates the namespace and brings up its `lo`.
    pub fn new() -> Result<Namespace, LabError> {
        if !have_root() {
            return Err(LabError::NotRoot);
        }
        let name = format!("{NAMESPACE_PREFIX}{:06x}", rand::random::<u32>() & 0x00ff_ffff);
        run(Command::new("ip").args(["netns", "add", &name]))
            .map_err(|source| LabError::CreateNamespace { namespace: name.clone(), source })?;
        // From here on, dropping `namespace` deletes it if a later step fails.
        let namespace = Namespace { name };
        run(namespace.ip().args(["link", "set", "lo", "up"]))
            .map_err(|source| LabError::LoopbackUp { namespace: namespace.name.clone(), source })?;
        Ok(namespace)
    }

    /// The namespace's name, `mrlab-<6 hex>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`: a command that runs `program` inside the namespace (rackd,
    /// regiond, QEMU, tcpdump…). Add arguments and spawn it as usual; the caller owns the process
    /// and must end it before the namespace is dropped, or the namespace outlives its name.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Sets the sysctl `key` (e.g. `net.ipv4.ip_forward`) to `value` inside the namespace only
    /// (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        let setting = format!("{key}={value}");
        run(self.command("sysctl").args(["-q", "-w", &setting])).map_err(|source| LabError::Sysctl {
            namespace: self.name.clone(),
            setting,
            source,
        })?;
        Ok(())
    }

    /// Runs `f` on a fresh thread that has joined the namespace, and returns its result. Sockets
    /// `f` creates belong to the namespace for their whole life, also when returned and used from
    /// other threads; threads `f` starts are inside too. A panic in `f` is resumed in the caller.
    pub fn in_namespace<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, LabError> {
        let path = PathBuf::from(NETNS_DIR).join(&self.name);
        let namespace_file = File::open(&path).map_err(|source| LabError::OpenNamespace { path, source })?;
        let thread = std::thread::Builder::new()
            .name(format!("{}-thread", self.name))
            // setns changes only the calling thread, and this thread ends after `f`, so no other
            // code ever runs in the namespace by accident.
            .spawn(move || {
                nix::sched::setns(&namespace_file, CloneFlags::CLONE_NEWNET)?;
                drop(namespace_file);
                Ok(f())
            })
            .map_err(|source| LabError::SpawnThread { namespace: self.name.clone(), source })?;
        match thread.join() {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(LabError::JoinNamespace { namespace: self.name.clone(), source }),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// `ip -n NAME`: `ip` acting on the namespace rather than the host.
    pub(crate) fn ip(&self) -> Command {
        let mut command = Command::new("ip");
        command.args(["-n", &self.name]);
        command
    }

    /// `tc -n NAME`: traffic control acting on the namespace rather than the host.
    pub(crate) fn tc(&self) -> Command {
        let mut command = Command::new("tc");
        command.args(["-n", &self.name]);
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // A process still inside keeps the namespace alive, nameless, after `ip netns del`. The
        // lab did not start it, so it does not kill it: it says so, to make the leak visible.
        if let Ok(output) = run(Command::new("ip").args(["netns", "pids", &self.name])) {
            let pids = String::from_utf8_lossy(&output.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
            if !pids.is_empty() {
                eprintln!(
                    "metalrack-hardware: processes {pids} still run in network namespace {}; \
                     it lives on until they exit",
                    self.name
                );
            }
        }
        if let Err(error) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("metalrack-hardware: cannot delete network namespace {}: {error}", self.name);
        }
    }
}

/// One rack: a [`Namespace`] with a bridge [`BRIDGE_NAME`] that carries the gateway address.
/// Dropping it deletes the namespace, also when a test panics.
pub struct Lab {
    namespace: Namespace,
    gateway: Ipv4Addr,
    /// Taps handed out so far; the next tap is `tap<n_taps>`.
    n_taps: AtomicU32,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("name", &self.namespace.name)
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Creates the namespace and its bridge; `[10, 99, 0]` gives a bridge with `10.99.0.1/24`.
    ///
    /// The subnet exists only inside the namespace, so two labs may use the same one.
    pub fn new(subnet_prefix: [u8; 3]) -> Result<Lab, LabError> {
        if !have_root() {
            return Err(LabError::NotRoot);
        }
        check_subnet(subnet_prefix)?;
        let [a, b, c] = subnet_prefix;
        let gateway = Ipv4Addr::new(a, b, c, 1);
        // From here on, dropping `lab` deletes the namespace if a later step fails.
        let lab = Lab { namespace: Namespace::new()?, gateway, n_taps: AtomicU32::new(0) };
        let namespace = || lab.namespace.name.clone();
        // No STP and no forward delay: a port forwards the moment it comes up, so a machine's
        // first DHCPDISCOVER is not dropped while the bridge is "learning".
        run(lab.ip().args(["link", "add", BRIDGE_NAME, "type", "bridge", "stp_state", "0", "forward_delay", "0"]))
            .map_err(|source| LabError::CreateBridge { namespace: namespace(), source })?;
        let address = format!("{gateway}/{SUBNET_PREFIX_LEN}");
        run(lab.ip().args(["addr", "add", &address, "dev", BRIDGE_NAME]))
            .map_err(|source| LabError::AddressBridge { namespace: namespace(), address, source })?;
        run(lab.ip().args(["link", "set", BRIDGE_NAME, "up"]))
            .map_err(|source| LabError::BridgeUp { namespace: namespace(), source })?;
        Ok(lab)
    }

    /// The namespace's name, `mrlab-<6 hex>`.
    pub fn name(&self) -> &str {
        &self.namespace.name
    }

    /// The namespace itself, for what takes any namespace (a lab or a bare one).
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// The bridge that carries the gateway address and the taps: [`BRIDGE_NAME`].
    pub fn bridge(&self) -> &str {
        BRIDGE_NAME
    }

    /// The bridge's address, `<subnet_prefix>.1`: where the rack's servers listen.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Creates `tapN` (mode tap) in the namespace, adds it to the bridge and brings it up; returns
    /// its name, for [`crate::qemu::Machine::power_on`].
    pub fn add_tap(&self) -> Result<String, LabError> {
        let index = self
            .n_taps
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < TAPS_PER_LAB_MAX).then_some(n + 1))
            .map_err(|_| LabError::TooManyTaps { namespace: self.name().to_owned(), max: TAPS_PER_LAB_MAX })?;
        assert!(index < TAPS_PER_LAB_MAX);
        let tap = format!("tap{index}");
        let error_context = || (self.name().to_owned(), tap.clone());

        run(self.ip().args(["tuntap", "add", "dev", &tap, "mode", "tap"])).map_err(|source| {
            let (namespace, tap) = error_context();
            LabError::CreateTap { namespace, tap, source }
        })?;
        run(self.ip().args(["link", "set", &tap, "master", BRIDGE_NAME])).map_err(|source| {
            let (namespace, tap) = error_context();
            LabError::EnslaveTap { namespace, tap, source }
        })?;
        run(self.ip().args(["link", "set", &tap, "up"])).map_err(|source| {
            let (namespace, tap) = error_context();
            LabError::TapUp { namespace, tap, source }
        })?;
        Ok(tap)
    }

    /// `ip netns exec NAME program`: see [`Namespace::command`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.namespace.command(program)
    }

    /// Runs `f` on a fresh thread inside the namespace: see [`Namespace::in_namespace`].
    pub fn in_namespace<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, LabError> {
        self.namespace.in_namespace(f)
    }

    /// `ip -n NAME`: `ip` acting on the namespace rather than the host.
    pub(crate) fn ip(&self) -> Command {
        self.namespace.ip()
    }
}

impl AsRef<Namespace> for Lab {
    fn as_ref(&self) -> &Namespace {
        &self.namespace
    }
}

fn check_subnet(prefix: [u8; 3]) -> Result<(), LabError> {
    let reason = match prefix[0] {
        0 => "0.0.0.0/8 is \"this network\"",
        127 => "127.0.0.0/8 is loopback",
        224..=255 => "224.0.0.0 and above are multicast and reserved",
        _ => return Ok(()),
    };
    Err(LabError::Subnet { prefix, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_check_rejects_special_ranges() {
        assert!(check_subnet([10, 99, 0]).is_ok());
        assert!(check_subnet([192, 168, 7]).is_ok());
        for bad in [[0, 1, 2], [127, 0, 0], [224, 0, 0], [255, 255, 255]] {
            let error = check_subnet(bad).unwrap_err();
            assert!(matches!(error, LabError::Subnet { .. }), "{bad:?}: {error}");
        }
    }

    #[test]
    fn root_check_reads_effective_uid() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let uid_line = status.lines().find(|line| line.starts_with("Uid:")).unwrap();
        let effective = uid_line.split_whitespace().nth(2).unwrap();
        assert_eq!(have_root(), effective == "0");
    }
}
