//! One simulated machine's life on its own thread: it waits for power, boots as its firmware
//! would (PXE: DHCP with the PXE options, the loader over TFTP, iPXE's DHCP and script over
//! HTTP, kernel and initrd), then does what the deploy environment's agent does, through the
//! same library and the same wire contract, and powers off or reboots. A power-off through its
//! BMC ends whatever it was doing at the next network wait.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use metalrack_api::agent::{
    parse_cmdline, AgentReport, AgentTask, DeployPhase, DeployProgress, DiskInventory, Inventory, NicInventory,
    AGENT_REPORT_PATH, AGENT_TASK_PATH,
};
use metalrack_image_tools::deploy::{self, ChunkSource, ExecuteOptions, SourceError};
use metalrack_image_tools::manifest::{Manifest, CHUNKS_MAX, ENTRY_LEN, HEADER_LEN};
use smoltcp::wire::DhcpOption;

use super::disk::SimDisk;
use super::net::{Counters, HttpClient, Net, NetError, Sink};
use super::script::{Script, Step};
use super::switch::{Port, Switch};
use super::{FleetMachineSpec, SimPhase};
use crate::bmc::{MachineError, PoweredMachine};
use crate::qemu::{BootFrom, BootOrder, Firmware};

/// Phase changes a machine's log keeps (the oldest go first).
pub const PHASE_LOG_MAX: usize = 64;
/// A DHCP exchange must end within this (PXE ROMs give up after about a minute).
const DHCP_TIMEOUT: Duration = Duration::from_secs(60);
/// Times iPXE is handed the loader again instead of its script before the boot counts as a loop.
const LOADER_ROUNDS_MAX: u32 = 3;
/// Scripts chained in one boot before it counts as a loop (the rack's scripts chain after a
/// failed fetch, with a 10 s sleep).
const CHAINS_MAX: u32 = 32;
/// Largest script, task and report answer read whole.
const SCRIPT_BYTES_MAX: u64 = 64 * 1024;
const TASK_JSON_BYTES_MAX: u64 = 64 * 1024;
/// Largest manifest: the wire format's own bound.
const MANIFEST_BYTES_MAX: u64 = HEADER_LEN as u64 + CHUNKS_MAX as u64 * ENTRY_LEN as u64;
/// TFTP block size asked for: a 1500-byte MTU less the IP, UDP and TFTP headers.
const TFTP_HEADERS_BYTES: usize = 20 + 8 + 4;
/// Progress reports go to the rack about this often (and at each phase change), as the agent's.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Final reports and the task request are tried this long while the rack is away.
const REPORT_RETRY_DEADLINE: Duration = Duration::from_secs(300);
const RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// What the simulated hardware reports besides its spec.
const SIM_CPUS: u32 = 4;
const SIM_MEMORY_BYTES: u64 = 8 << 30;

/// Option 60 and 93 of each firmware, as real PXE ROMs send them.
const BIOS_CLASS: &[u8] = b"PXEClient:Arch:00000:UNDI:002001";
const UEFI_CLASS: &[u8] = b"PXEClient:Arch:00007:UNDI:003016";
const BIOS_ARCH: &[u8] = &[0, 0];
const UEFI_ARCH: &[u8] = &[0, 7];
/// iPXE's user class (option 77).
const IPXE_USER_CLASS: &[u8] = b"iPXE";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the machine lost power")]
    Aborted,
    /// A bug in the simulator (or a library it runs) on this machine's path: the machine shows
    /// it as a failure with the panic's message, and its thread lives on for the next power-on,
    /// instead of a machine that silently never boots again.
    #[error("the simulator panicked: {message}")]
    Panicked { message: String },
    #[error("DHCP ({stage})")]
    Dhcp { stage: &'static str, source: NetError },
    #[error("the DHCP answer ({stage}) names no boot file")]
    NoBootFile { stage: &'static str },
    #[error("cannot load the boot loader {file:?}")]
    Loader { file: String, source: NetError },
    #[error("iPXE got the loader {rounds} times instead of its script: a boot loop")]
    LoaderLoop { rounds: u32 },
    #[error("cannot fetch the iPXE script {url}")]
    FetchScript { url: String, source: NetError },
    #[error("the iPXE script from {url} is not usable")]
    Script { url: String, source: super::script::ScriptError },
    #[error("the iPXE script ended without booting anything")]
    ScriptEnded,
    #[error("the script chained {CHAINS_MAX} times")]
    ChainLoop,
    #[error("the script boots {name:?}, which it never fetched")]
    BootUnfetched { name: String },
    #[error("the deploy environment's command line names no rack (metalrack.rack) or MAC")]
    Cmdline,
    #[error("the agent cannot {step}")]
    Agent { step: &'static str, source: NetError },
    #[error("the agent's {what} is not valid: {reason}")]
    AgentData { what: &'static str, reason: String },
    #[error("the manifest is not the task's file")]
    TaskManifest { source: deploy::TaskManifestError },
    #[error("the deploy failed")]
    Deploy { source: deploy::DeployError },
    #[error("the erase failed")]
    Erase { source: deploy::EraseError },
}

impl BootError {
    /// A failure of the firmware's part of the boot (DHCP, the loader, iPXE's script and files),
    /// which firmware retries; the deploy environment's failures are reported and wait instead.
    fn firmware_retries(&self) -> bool {
        matches!(
            self,
            BootError::Dhcp { .. }
                | BootError::NoBootFile { .. }
                | BootError::Loader { .. }
                | BootError::LoaderLoop { .. }
                | BootError::FetchScript { .. }
                | BootError::Script { .. }
                | BootError::ScriptEnded
                | BootError::ChainLoop
                | BootError::BootUnfetched { .. }
        )
    }

    fn from_net(error: NetError, wrap: impl FnOnce(NetError) -> BootError) -> BootError {
        match error {
            NetError::Aborted => BootError::Aborted,
            other => wrap(other),
        }
    }
}

/// What a boot ended in.
enum Outcome {
    PowerOff,
    Reboot,
    /// Up and idle until power goes (booted from disk, or failed and waiting for an operator).
    StayOn,
}

/// Power and boot order, as the BMC sets them.
#[derive(Debug)]
pub struct Power {
    pub on: bool,
    pub boot: BootOrder,
    /// Bumped by every power change: a boot whose generation is old has lost power.
    pub generation: u64,
}

/// What the fleet and the status readers share with a machine's thread.
pub struct MachineShared {
    pub spec: FleetMachineSpec,
    pub mac: [u8; 6],
    pub index: usize,
    pub fleet_started: Instant,
    pub power: Mutex<Power>,
    pub power_changed: Condvar,
    pub status: Mutex<Status>,
    pub counters: Arc<Counters>,
    pub disk: Mutex<SimDisk>,
    pub port: Arc<Port>,
    pub stop: Arc<AtomicBool>,
}

/// A machine's status as [`super::FleetMachineStatus`] shows it.
#[derive(Debug, Default)]
pub struct Status {
    pub phase: SimPhase,
    pub boots: u32,
    pub deploy: Option<DeployProgress>,
    pub phase_log: VecDeque<(SimPhase, Duration)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MachineShared {
    pub fn power(&self) -> MutexGuard<'_, Power> {
        lock(&self.power)
    }

    pub fn status(&self) -> MutexGuard<'_, Status> {
        lock(&self.status)
    }

    pub fn disk(&self) -> MutexGuard<'_, SimDisk> {
        lock(&self.disk)
    }

    fn set_phase(&self, phase: SimPhase) {
        let mut status = self.status();
        if status.phase == phase {
            return;
        }
        if status.phase_log.len() == PHASE_LOG_MAX {
            status.phase_log.pop_front();
        }
        status.phase_log.push_back((phase.clone(), self.fleet_started.elapsed()));
        tracing::debug!(mac = %self.spec.mac, ?phase, "fleet machine phase");
        status.phase = phase;
    }

    fn wake(&self) {
        self.power_changed.notify_all();
        self.port.wake();
    }
}

/// The BMC's side of a machine.
pub struct FleetPower(pub Arc<MachineShared>);

impl PoweredMachine for FleetPower {
    fn power_on(&mut self, boot: BootOrder) -> Result<(), MachineError> {
        let mut power = self.0.power();
        if !power.on {
            power.on = true;
            power.boot = boot;
            power.generation += 1;
        }
        drop(power);
        self.0.wake();
        Ok(())
    }

    fn power_off(&mut self) -> Result<(), MachineError> {
        let mut power = self.0.power();
        if power.on {
            power.on = false;
            power.generation += 1;
        }
        drop(power);
        self.0.wake();
        Ok(())
    }

    fn is_on(&mut self) -> bool {
        self.0.power().on
    }
}

/// The machine's thread: one power-on at a time until the fleet stops.
pub fn run(shared: Arc<MachineShared>, switch: Arc<Switch>, mtu: usize) {
    let mut last_generation = shared.power().generation;
    loop {
        let (generation, boot) = {
            let mut power = shared.power();
            while !(shared.stop.load(Ordering::Relaxed) || power.on && power.generation != last_generation) {
                power = shared.power_changed.wait(power).unwrap_or_else(PoisonError::into_inner);
            }
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            (power.generation, power.boot)
        };
        last_generation = generation;
        let stop = shared.stop.clone();
        let watched = shared.clone();
        let aborted: super::net::Aborted = Arc::new(move || {
            stop.load(Ordering::Relaxed) || watched.power.lock().map_or(true, |power| power.generation != generation)
        });
        // The first boot of this power-on follows the BMC's order (a Once override included);
        // the guest's own reboots follow the persistent order.
        let mut device = boot.once.unwrap_or(boot.first);
        let mut firmware_failures = 0;
        loop {
            shared.status().boots += 1;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                boot_once(&shared, &switch, mtu, device, &aborted)
            }))
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                Err(BootError::Panicked { message })
            });
            match outcome {
                Ok(Outcome::Reboot) => {
                    device = boot.first;
                    continue;
                }
                Ok(Outcome::PowerOff) => {
                    let mut power = shared.power();
                    if power.generation == generation {
                        power.on = false;
                        power.generation += 1;
                        last_generation = power.generation;
                    }
                    drop(power);
                    shared.set_phase(SimPhase::Off);
                }
                Ok(Outcome::StayOn) => {
                    wait_for_power_loss(&shared, generation);
                    shared.set_phase(SimPhase::Off);
                }
                Err(BootError::Aborted) => shared.set_phase(SimPhase::Off),
                Err(error) if error.firmware_retries() && firmware_failures + 1 < BOOT_ATTEMPTS_MAX => {
                    firmware_failures += 1;
                    let reason = metalrack_image_tools::error_chain(&error);
                    tracing::info!(mac = %shared.spec.mac, %reason, "a simulated machine's network boot failed; retrying");
                    std::thread::sleep(BOOT_RETRY_PAUSE);
                    if aborted() {
                        shared.set_phase(SimPhase::Off);
                        break;
                    }
                    continue;
                }
                Err(error) => {
                    let reason = metalrack_image_tools::error_chain(&error);
                    tracing::warn!(mac = %shared.spec.mac, %reason, "a simulated machine's boot failed");
                    shared.set_phase(SimPhase::Failed { reason });
                    wait_for_power_loss(&shared, generation);
                    shared.set_phase(SimPhase::Off);
                }
            }
            break;
        }
    }
}

/// Network boots a machine makes in a row before it shows the failure and waits for an operator,
/// as PXE firmware retries: a rack booting a hundred machines at once may answer one too late.
const BOOT_ATTEMPTS_MAX: u32 = 3;

/// Pause before a retried network boot.
const BOOT_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Stays up (idle) until the power of `generation` goes or the fleet stops.
fn wait_for_power_loss(shared: &MachineShared, generation: u64) {
    let mut power = shared.power();
    // The guard is what `aborted()` would lock: read the generation through it.
    while !shared.stop.load(Ordering::Relaxed) && power.generation == generation {
        power = shared.power_changed.wait(power).unwrap_or_else(PoisonError::into_inner);
    }
}

fn pxe_options(firmware: Firmware, ipxe: bool) -> &'static [DhcpOption<'static>] {
    const BIOS: [DhcpOption<'static>; 2] =
        [DhcpOption { kind: 60, data: BIOS_CLASS }, DhcpOption { kind: 93, data: BIOS_ARCH }];
    const UEFI: [DhcpOption<'static>; 2] =
        [DhcpOption { kind: 60, data: UEFI_CLASS }, DhcpOption { kind: 93, data: UEFI_ARCH }];
    const BIOS_IPXE: [DhcpOption<'static>; 3] = [
        DhcpOption { kind: 60, data: BIOS_CLASS },
        DhcpOption { kind: 93, data: BIOS_ARCH },
        DhcpOption { kind: 77, data: IPXE_USER_CLASS },
    ];
    const UEFI_IPXE: [DhcpOption<'static>; 3] = [
        DhcpOption { kind: 60, data: UEFI_CLASS },
        DhcpOption { kind: 93, data: UEFI_ARCH },
        DhcpOption { kind: 77, data: IPXE_USER_CLASS },
    ];
    match (firmware, ipxe) {
        (Firmware::Bios, false) => &BIOS,
        (Firmware::Uefi, false) => &UEFI,
        (Firmware::Bios, true) => &BIOS_IPXE,
        (Firmware::Uefi, true) => &UEFI_IPXE,
    }
}

/// One boot from `device`, from reset to what it ended in.
fn boot_once(
    shared: &Arc<MachineShared>,
    switch: &Arc<Switch>,
    mtu: usize,
    device: BootFrom,
    aborted: &super::net::Aborted,
) -> Result<Outcome, BootError> {
    if device == BootFrom::Disk && !shared.disk().is_blank() {
        shared.set_phase(SimPhase::BootedLocal);
        return Ok(Outcome::StayOn);
    }
    // An empty disk has nothing to boot: the firmware goes on to the network, as real ones do.
    let mut net = Net::new(switch.clone(), shared.index, mtu, aborted.clone(), shared.counters.clone());
    shared.set_phase(SimPhase::Dhcp);
    let firmware = shared.spec.firmware;
    let stage = "firmware";
    let lease = net
        .dhcp(pxe_options(firmware, false), DHCP_TIMEOUT)
        .map_err(|e| BootError::from_net(e, |source| BootError::Dhcp { stage, source }))?;
    let blksize = u16::try_from(mtu.saturating_sub(TFTP_HEADERS_BYTES)).unwrap_or(u16::MAX).min(65464);
    let mut boot_file = lease.boot_file;
    let mut next_server = lease.next_server;
    let mut rounds = 0;
    while !boot_file.starts_with("http://") {
        if boot_file.is_empty() {
            return Err(BootError::NoBootFile { stage: if rounds == 0 { "firmware" } else { "iPXE" } });
        }
        rounds += 1;
        if rounds > LOADER_ROUNDS_MAX {
            return Err(BootError::LoaderLoop { rounds: LOADER_ROUNDS_MAX });
        }
        shared.set_phase(SimPhase::Tftp);
        net.tftp_read(next_server, &boot_file, blksize)
            .map_err(|e| BootError::from_net(e, |source| BootError::Loader { file: boot_file.clone(), source }))?;
        // The loader runs: iPXE asks DHCP again, saying it is iPXE.
        shared.set_phase(SimPhase::Dhcp);
        let stage = "iPXE";
        let lease = net
            .dhcp(pxe_options(firmware, true), DHCP_TIMEOUT)
            .map_err(|e| BootError::from_net(e, |source| BootError::Dhcp { stage, source }))?;
        boot_file = lease.boot_file;
        next_server = lease.next_server;
    }
    let kernel = run_scripts(shared, &mut net, boot_file)?;
    let Some(cmdline) = kernel else {
        // `exit`: the firmware boots the local disk (the rack's answer to a deployed machine).
        shared.set_phase(SimPhase::BootedLocal);
        return Ok(Outcome::StayOn);
    };
    let (rack, mac, token) = parse_cmdline(&cmdline);
    let Some(rack) = rack else {
        // An image that is not the deploy environment: it runs, and that is all we simulate.
        shared.set_phase(SimPhase::BootedImage);
        return Ok(Outcome::StayOn);
    };
    let mac = mac.ok_or(BootError::Cmdline)?;
    // The kernel starts: a new network stack, and Linux's own DHCP (no PXE options).
    drop(net);
    let mut net = Net::new(switch.clone(), shared.index, mtu, aborted.clone(), shared.counters.clone());
    shared.set_phase(SimPhase::Agent);
    let stage = "deploy environment";
    net.dhcp(&[], DHCP_TIMEOUT).map_err(|e| BootError::from_net(e, |source| BootError::Dhcp { stage, source }))?;
    let agent = Agent { shared, net: RefCell::new(net), rack, mac, token, client: RefCell::new(HttpClient::new()) };
    agent.run()
}

/// Runs the script at `url` and what it chains to; `Some(cmdline)` when it boots a kernel,
/// `None` when it exits to the local disk.
fn run_scripts(shared: &MachineShared, net: &mut Net, mut url: String) -> Result<Option<String>, BootError> {
    let mut client = HttpClient::new();
    let mut chains = 0;
    'chain: loop {
        chains += 1;
        if chains > CHAINS_MAX {
            return Err(BootError::ChainLoop);
        }
        shared.set_phase(SimPhase::Script);
        let mut text = Vec::new();
        client
            .request(net, "GET", &url, &[], &[], &mut Sink::Collect { into: &mut text, limit: SCRIPT_BYTES_MAX })
            .map_err(|e| BootError::from_net(e, |source| BootError::FetchScript { url: url.clone(), source }))?;
        let text = String::from_utf8_lossy(&text);
        let mut script = Script::parse(&text).map_err(|source| BootError::Script { url: url.clone(), source })?;
        let mut images: Vec<(String, String)> = Vec::new();
        loop {
            let step = script.next_step().map_err(|source| BootError::Script { url: url.clone(), source })?;
            match step {
                None => return Err(BootError::ScriptEnded),
                Some(Step::Fetch(fetch)) => {
                    if fetch.name.is_some() {
                        shared.set_phase(SimPhase::Kernel);
                    }
                    let mut bytes = 0u64;
                    let result = client.request(net, "GET", &fetch.url, &[], &[], &mut Sink::Count(&mut bytes));
                    if let Err(NetError::Aborted) = result {
                        return Err(BootError::Aborted);
                    }
                    if result.is_ok() {
                        if let Some(name) = fetch.name {
                            images.push((name, fetch.args));
                        }
                    }
                    script.fetched(result.is_ok()).map_err(|source| BootError::Script { url: url.clone(), source })?;
                }
                Some(Step::Sleep(seconds)) => {
                    net.sleep(Duration::from_secs(seconds)).map_err(|_| BootError::Aborted)?;
                }
                Some(Step::Boot(name)) => {
                    let cmdline = images.iter().find(|(image, _)| *image == name).map(|(_, args)| args.clone());
                    client.close(net);
                    return cmdline.map(Some).ok_or(BootError::BootUnfetched { name });
                }
                Some(Step::Chain(next)) => {
                    url = next;
                    continue 'chain;
                }
                Some(Step::Exit) => {
                    client.close(net);
                    return Ok(None);
                }
            }
        }
    }
}

/// The deploy environment's agent, on the simulated machine's stack.
struct Agent<'a> {
    shared: &'a Arc<MachineShared>,
    net: RefCell<Net>,
    rack: String,
    mac: String,
    token: Option<String>,
    /// Tasks and reports; the image ranges have their own connection.
    client: RefCell<HttpClient>,
}

impl Agent<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}{path}?mac={}", self.rack.trim_end_matches('/'), self.mac)
    }

    fn bearer(&self) -> Option<String> {
        self.token.as_ref().map(|token| format!("Bearer {token}"))
    }

    fn headers<'h>(&self, bearer: &'h Option<String>, json: bool) -> Vec<(&'static str, &'h str)> {
        let mut headers = Vec::new();
        if let Some(bearer) = bearer {
            headers.push(("Authorization", bearer.as_str()));
        }
        if json {
            headers.push(("Content-Type", "application/json"));
        }
        headers
    }

    /// Tries `attempt` with backoff while it fails in a way that may pass.
    fn retrying<T>(
        &self,
        step: &'static str,
        mut attempt: impl FnMut() -> Result<T, NetError>,
    ) -> Result<T, BootError> {
        let started = Instant::now();
        let mut wait = RETRY_BACKOFF_INITIAL;
        loop {
            match attempt() {
                Ok(value) => return Ok(value),
                Err(NetError::Aborted) => return Err(BootError::Aborted),
                Err(error) if !error.retryable() || started.elapsed() + wait > REPORT_RETRY_DEADLINE => {
                    return Err(BootError::Agent { step, source: error })
                }
                Err(error) => {
                    tracing::debug!(mac = %self.mac, %error, "{step}: trying again");
                    self.net.borrow_mut().sleep(wait).map_err(|_| BootError::Aborted)?;
                    wait = (wait * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
    }

    fn get(&self, url: &str, limit: u64) -> Result<Vec<u8>, NetError> {
        let bearer = self.bearer();
        let mut body = Vec::new();
        let mut sink = Sink::Collect { into: &mut body, limit };
        self.client.borrow_mut().request(
            &mut self.net.borrow_mut(),
            "GET",
            url,
            &self.headers(&bearer, false),
            &[],
            &mut sink,
        )?;
        Ok(body)
    }

    fn report_once(&self, report: &AgentReport) -> Result<(), NetError> {
        let body = serde_json::to_vec(report).expect("reports serialise");
        let bearer = self.bearer();
        let mut ignored = Vec::new();
        let mut sink = Sink::Collect { into: &mut ignored, limit: 4096 };
        let url = self.url(AGENT_REPORT_PATH);
        self.client.borrow_mut().request(
            &mut self.net.borrow_mut(),
            "POST",
            &url,
            &self.headers(&bearer, true),
            &body,
            &mut sink,
        )?;
        Ok(())
    }

    fn report(&self, report: &AgentReport) -> Result<(), BootError> {
        if let Err(reason) = report.validate() {
            return Err(BootError::AgentData { what: "report", reason });
        }
        self.retrying("send its report", || self.report_once(report))
    }

    fn run(&self) -> Result<Outcome, BootError> {
        let task_url = self.url(AGENT_TASK_PATH);
        let body = self.retrying("ask the rack for a task", || self.get(&task_url, TASK_JSON_BYTES_MAX))?;
        let task: AgentTask =
            serde_json::from_slice(&body).map_err(|e| BootError::AgentData { what: "task", reason: e.to_string() })?;
        match self.do_task(&task) {
            Ok(outcome) => Ok(outcome),
            Err(BootError::Aborted) => Err(BootError::Aborted),
            Err(error) => {
                // As the real agent: report why, then wait for the operator.
                let reason = deploy::failure_reason(&metalrack_image_tools::error_chain(&error));
                if let Err(report_error) = self.report(&AgentReport::Failed { reason }) {
                    tracing::warn!(mac = %self.mac, error = %report_error, "the failure report did not reach the rack");
                }
                Err(error)
            }
        }
    }

    fn do_task(&self, task: &AgentTask) -> Result<Outcome, BootError> {
        match task {
            AgentTask::Enlist | AgentTask::Commission { .. } => {
                self.report(&AgentReport::Inventory { inventory: self.inventory() })?;
                Ok(Outcome::PowerOff)
            }
            AgentTask::Deploy { file_path, manifest_path, file_len, file_hash, .. } => {
                self.shared.set_phase(SimPhase::Deploying);
                let manifest_url = format!("{}{manifest_path}", self.rack.trim_end_matches('/'));
                let bytes = self.retrying("fetch the manifest", || self.get(&manifest_url, MANIFEST_BYTES_MAX))?;
                let manifest = Manifest::parse(&bytes)
                    .map_err(|e| BootError::AgentData { what: "manifest", reason: e.to_string() })?;
                deploy::check_task_manifest(&manifest, *file_len, file_hash)
                    .map_err(|source| BootError::TaskManifest { source })?;
                let progress = self.deploy(file_path, &manifest)?;
                self.report(&AgentReport::Deployed { progress })?;
                Ok(Outcome::Reboot)
            }
            AgentTask::Release { erase, .. } => {
                self.shared.set_phase(SimPhase::Erasing);
                let mut disk = self.shared.disk();
                deploy::erase(&mut *disk, *erase, &mut |_, _| {}).map_err(|source| BootError::Erase { source })?;
                drop(disk);
                self.report(&AgentReport::Released)?;
                Ok(Outcome::PowerOff)
            }
        }
    }

    fn deploy(&self, file_path: &str, manifest: &Manifest) -> Result<DeployProgress, BootError> {
        let url = format!("{}{file_path}", self.rack.trim_end_matches('/'));
        let mut source = RackSource { agent: self, client: HttpClient::new(), url, bearer: self.bearer() };
        let mut last_sent: Option<(Instant, DeployPhase)> = None;
        let mut progress = |progress: &DeployProgress| {
            self.shared.status().deploy = Some(*progress);
            let due = match last_sent {
                None => true,
                Some((at, phase)) => phase != progress.phase || at.elapsed() >= PROGRESS_INTERVAL,
            };
            if due {
                last_sent = Some((Instant::now(), progress.phase));
                // Best effort: the next report replaces a lost one.
                if let Err(error) = self.report_once(&AgentReport::Progress { progress: *progress }) {
                    tracing::debug!(mac = %self.mac, %error, "a progress report did not reach the rack");
                }
            }
        };
        let mut disk = self.shared.disk();
        let result = deploy::deploy(manifest, &mut source, &mut *disk, &ExecuteOptions::default(), &mut progress);
        drop(disk);
        source.client.close(&mut self.net.borrow_mut());
        if self.net.borrow().is_aborted() {
            return Err(BootError::Aborted);
        }
        result.map_err(|source| BootError::Deploy { source })
    }

    /// A plausible inventory from the machine's spec.
    fn inventory(&self) -> Inventory {
        let spec = &self.shared.spec;
        let serial: String = spec.mac.replace(':', "");
        Inventory {
            firmware: match spec.firmware {
                Firmware::Bios => metalrack_api::agent::Firmware::Bios,
                Firmware::Uefi => metalrack_api::agent::Firmware::Uefi,
            },
            cpus: SIM_CPUS,
            cpu_model: "Metalrack simulated CPU".into(),
            memory_bytes: SIM_MEMORY_BYTES,
            disks: vec![DiskInventory {
                name: "vda".into(),
                size_bytes: spec.disk_bytes,
                model: "Metalrack simulated disk".into(),
                serial: format!("SIM{serial}"),
            }],
            nics: vec![NicInventory { name: "eth0".into(), mac: spec.mac.clone(), speed_mbps: Some(10_000) }],
        }
    }
}

/// The image on the rack, fetched by `Range` over the machine's own connection.
struct RackSource<'a, 'b> {
    agent: &'a Agent<'b>,
    client: HttpClient,
    url: String,
    bearer: Option<String>,
}

impl ChunkSource for RackSource<'_, '_> {
    fn fetch(&mut self, start: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if buf.is_empty() {
            return Ok(());
        }
        let last = start + buf.len() as u64 - 1;
        let range = format!("bytes={start}-{last}");
        let mut headers = vec![("Range", range.as_str())];
        if let Some(bearer) = &self.bearer {
            headers.push(("Authorization", bearer.as_str()));
        }
        let mut filled = 0;
        let mut net = self.agent.net.borrow_mut();
        let result = self.client.request(
            &mut net,
            "GET",
            &self.url,
            &headers,
            &[],
            &mut Sink::Exact { buf, filled: &mut filled },
        );
        match result {
            // A 200 is the whole file from its start: right only when that is what was asked,
            // and then the length check of the sink already held.
            Ok(206) => Ok(()),
            Ok(status) if start == 0 => {
                let _ = status;
                Ok(())
            }
            Ok(status) => Err(SourceError::fatal(format!("the rack answered {status} to a range request for {range}"))),
            Err(error) if error.retryable() => Err(SourceError::retryable(filled, error.to_string())),
            Err(error) => Err(SourceError::fatal(error.to_string())),
        }
    }
}
