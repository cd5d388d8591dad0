//! metalrack-agent: the deploy environment's program. It asks its rack for a task, does it
//! (report the inventory, write an image, erase the disk), reports, then powers off or reboots.
//!
//! On failure it reports why and waits: a machine that reboot-loops into the deploy
//! environment would hammer its rack and hide the reason from whoever looks at its console.

mod inventory;
mod rack;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use metalrack_api::agent::{parse_cmdline, AgentReport, AgentTask, DeployPhase};
use metalrack_api::machines::normalize_mac;
use metalrack_image_tools::deploy::{self, Disk, ExecuteOptions};
use metalrack_image_tools::manifest::Manifest;

use crate::rack::Rack;

/// Progress reports go to the rack about this often (and at each phase change).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// The deploy agent. In the deploy environment it takes everything from the kernel command
/// line (`metalrack.rack=URL metalrack.mac=MAC metalrack.token=TOKEN`); the flags override it
/// for tests and operators.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The rack's HTTP base URL, e.g. `http://10.0.0.1:5248`.
    #[arg(long)]
    rack: Option<String>,
    /// This machine's MAC address (the NIC it booted from).
    #[arg(long)]
    mac: Option<String>,
    /// The job's token (sent as `Authorization: Bearer`); none for an enlistment.
    #[arg(long)]
    token: Option<String>,
    /// The disk to write or erase (a block device or a regular file), whatever the task says.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Do not power off or reboot when done, and exit on failure instead of waiting.
    #[arg(long)]
    no_power: bool,
    /// Where the kernel command line is read from.
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
}

/// What to do once the job is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PowerAfter {
    Off,
    Reboot,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // The console is often a serial log read as text.
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let no_power = args.no_power;
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("metalrack-agent: {error:#}");
            if no_power {
                return ExitCode::from(2);
            }
            wait_forever(&format!("{error:#}"))
        }
    }
}

fn run(args: Args) -> Result<()> {
    let (rack_url, mac, token) = parameters(&args)?;
    let rack = Rack::new(&rack_url, &mac, token);
    tracing::info!(rack = %rack_url, %mac, "asking the rack for a task");
    let task = rack.task()?;
    tracing::info!(?task, "task");
    match do_task(&rack, &task, &args) {
        Ok(after) => {
            if args.no_power {
                tracing::info!(?after, "done; not touching the power (--no-power)");
                return Ok(());
            }
            power(after)
        }
        Err(error) => {
            let reason = deploy::failure_reason(&format!("{error:#}"));
            tracing::error!(%reason, "the task failed");
            if let Err(report_error) = rack.report(&AgentReport::Failed { reason }) {
                tracing::error!(error = %format!("{report_error:#}"), "the failure report did not reach the rack");
            }
            Err(error)
        }
    }
}

/// The rack URL, MAC and token from the flags, else the kernel command line.
fn parameters(args: &Args) -> Result<(String, String, Option<String>)> {
    let cmdline = if args.rack.is_some() && args.mac.is_some() {
        String::new()
    } else {
        std::fs::read_to_string(&args.cmdline).with_context(|| format!("cannot read {}", args.cmdline.display()))?
    };
    let (rack, mac, token) = parse_cmdline(&cmdline);
    // PXELINUX-style `BOOTIF=01-aa-bb-cc-dd-ee-ff` names the boot NIC when metalrack.mac is absent.
    let bootif = cmdline.split_whitespace().find_map(|word| word.strip_prefix("BOOTIF=01-")).map(str::to_string);
    let Some(rack) = args.rack.clone().or(rack) else {
        bail!("no rack URL: pass --rack or boot with metalrack.rack=URL");
    };
    let Some(mac) = args.mac.clone().or(mac).or(bootif) else {
        bail!("no MAC address: pass --mac or boot with metalrack.mac=MAC");
    };
    let mac = normalize_mac(&mac).map_err(anyhow::Error::msg)?;
    Ok((rack, mac, args.token.clone().or(token).filter(|token| !token.is_empty())))
}

fn do_task(rack: &Rack, task: &AgentTask, args: &Args) -> Result<PowerAfter> {
    match task {
        AgentTask::Enlist | AgentTask::Commission { .. } => {
            let inventory = inventory::gather().context("cannot gather the inventory")?;
            tracing::info!(?inventory, "inventory");
            rack.report(&AgentReport::Inventory { inventory })?;
            Ok(PowerAfter::Off)
        }
        AgentTask::Deploy { file_path, manifest_path, file_len, file_hash, disk, .. } => {
            let manifest = manifest(rack, manifest_path, *file_len, file_hash)?;
            let path = disk_path(args, disk.as_deref())?;
            let mut disk = open_disk(&path, manifest.file_len)?;
            let progress = deploy_to(rack, file_path, &manifest, &mut disk)
                .with_context(|| format!("cannot deploy to {}", path.display()))?;
            rack.report(&AgentReport::Deployed { progress })?;
            Ok(PowerAfter::Reboot)
        }
        AgentTask::Release { erase, disk, .. } => {
            let path = disk_path(args, disk.as_deref())?;
            let mut disk = open_disk(&path, 0)?;
            tracing::info!(disk = %path.display(), ?erase, "erasing");
            deploy::erase(&mut disk, *erase, &mut |_, _| {})
                .with_context(|| format!("cannot erase {}", path.display()))?;
            rack.report(&AgentReport::Released)?;
            Ok(PowerAfter::Off)
        }
    }
}

/// The manifest, checked against what the task says of the file.
fn manifest(rack: &Rack, path: &str, file_len: u64, file_hash: &str) -> Result<Manifest> {
    let bytes = rack.manifest(path)?;
    let manifest = Manifest::parse(&bytes).context("the rack's manifest is not valid")?;
    deploy::check_task_manifest(&manifest, file_len, file_hash)?;
    Ok(manifest)
}

/// The disk: the flag's, else the task's (a name under /dev or a path), else the first disk
/// of the inventory.
fn disk_path(args: &Args, task_disk: Option<&str>) -> Result<PathBuf> {
    if let Some(path) = &args.disk {
        return Ok(path.clone());
    }
    if let Some(disk) = task_disk.filter(|disk| !disk.is_empty()) {
        return Ok(if disk.starts_with('/') { PathBuf::from(disk) } else { PathBuf::from("/dev").join(disk) });
    }
    let inventory = inventory::gather().context("cannot list the disks")?;
    let first = inventory.disks.first().context("this machine has no disk")?;
    Ok(PathBuf::from("/dev").join(&first.name))
}

/// Opens the disk for reading and writing. A regular file (a disk in tests) shorter than
/// `len_min` is extended: a block device has its size, a file has the size it is given.
fn open_disk(path: &std::path::Path, len_min: u64) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open the disk {}", path.display()))?;
    let metadata = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?;
    if metadata.is_file() && metadata.len() < len_min {
        file.set_len(len_min).with_context(|| format!("cannot extend {}", path.display()))?;
    }
    Ok(file)
}

fn deploy_to(
    rack: &Rack,
    file_path: &str,
    manifest: &Manifest,
    disk: &mut dyn Disk,
) -> Result<metalrack_api::agent::DeployProgress> {
    let mut source = rack.source(file_path);
    let mut last_sent: Option<(Instant, DeployPhase)> = None;
    let mut progress = |progress: &metalrack_api::agent::DeployProgress| {
        let due = match last_sent {
            None => true,
            Some((at, phase)) => phase != progress.phase || at.elapsed() >= PROGRESS_INTERVAL,
        };
        if due {
            last_sent = Some((Instant::now(), progress.phase));
            tracing::info!(?progress, "progress");
            rack.report_best_effort(&AgentReport::Progress { progress: *progress });
        }
    };
    let result = deploy::deploy(manifest, &mut source, disk, &ExecuteOptions::default(), &mut progress)?;
    tracing::info!(progress = ?result, "deployed and verified");
    Ok(result)
}

/// Powers off or reboots, after flushing every filesystem. Only in the deploy environment (the
/// agent is PID 1 or its child): on any other machine it would be a nasty surprise.
fn power(after: PowerAfter) -> Result<()> {
    let pid = nix::unistd::getpid().as_raw();
    let parent = nix::unistd::getppid().as_raw();
    if pid != 1 && parent != 1 {
        bail!("not in the deploy environment (neither PID 1 nor its child): refusing to {after:?}; pass --no-power");
    }
    nix::unistd::sync();
    let mode = match after {
        PowerAfter::Off => nix::sys::reboot::RebootMode::RB_POWER_OFF,
        PowerAfter::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
    };
    tracing::info!(?after, "powering");
    match nix::sys::reboot::reboot(mode) {
        Err(errno) => Err(errno).with_context(|| format!("cannot {after:?}")),
        Ok(never) => match never {},
    }
}

/// Stays up after a failure (PID 1 must not exit: the kernel would panic and the machine
/// reboot into the deploy environment again), reminding the console why.
fn wait_forever(reason: &str) -> ExitCode {
    loop {
        eprintln!("metalrack-agent: failed: {reason}; waiting for the operator");
        std::thread::sleep(Duration::from_secs(600));
    }
}

#[cfg(test)]
mod tests {
    use metalrack_api::agent::AGENT_REASON_BYTES_MAX;

    use super::*;

    #[test]
    fn a_long_reason_is_trimmed_on_a_character_boundary_without_control_characters() {
        let reason = deploy::failure_reason(&format!("a\nb{}", "é".repeat(AGENT_REASON_BYTES_MAX)));
        assert!(reason.len() <= AGENT_REASON_BYTES_MAX);
        assert!(reason.starts_with("a b"));
        AgentReport::Failed { reason }.validate().unwrap();
    }

    #[test]
    fn flags_override_the_cmdline_and_bootif_names_the_mac() {
        let dir = tempfile::tempdir().unwrap();
        let cmdline = dir.path().join("cmdline");
        std::fs::write(&cmdline, "quiet metalrack.rack=http://r:1 BOOTIF=01-52-54-00-AA-BB-01 metalrack.token=t\n")
            .unwrap();
        let args = Args::parse_from(["agent", "--cmdline", cmdline.to_str().unwrap()]);
        let (rack, mac, token) = parameters(&args).unwrap();
        assert_eq!((rack.as_str(), mac.as_str(), token.as_deref()), ("http://r:1", "52:54:00:aa:bb:01", Some("t")));
        let args = Args::parse_from(["agent", "--rack", "http://x", "--mac", "52:54:00:00:00:02"]);
        assert_eq!(parameters(&args).unwrap(), ("http://x".into(), "52:54:00:00:00:02".into(), None));
    }
}
