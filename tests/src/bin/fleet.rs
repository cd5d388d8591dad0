//! `fleet`: runs a scenario file (`hardware/scenarios/*.toml`) as a simulated site and prints what
//! happened: the topology in namespaces (the hardware crate's `topology`), the region and one real
//! `rackd` per rack (`metalrack_tests::site`), the images pushed once and synced by every rack
//! over its shaped uplink, then the machines: added with Redfish power, commissioned, deployed
//! (the region stopped meanwhile if the scenario says so). Per rack: sync time, bytes on its
//! uplink and its provisioning network; per machine: phases, bytes, times.
//!
//! The simulated machines are `hardware::fleet`'s: one fleet per rack, on the rack's tap, each
//! machine behind its own virtual Redfish BMC that the rack powers it through.
//!
//! Run (root): `cargo build --workspace --bins && target/debug/fleet run hardware/scenarios/small.toml
//! --ui-listen 127.0.0.1:5240`; `fleet check FILE` checks a scenario without root.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};
use metalrack_api::machines::MachineState;
use metalrack_hardware::scenario::Scenario;
use metalrack_hardware::topology::{Topology, UplinkCounters};
use metalrack_tests::proxy::Forwarder;
use metalrack_tests::site::{
    machines_to_add, write_stand_in_deploy_env, RackFleet, Site, SiteImage, ADMIN_PASSWORD, ADMIN_USERNAME,
};

/// How often the progress display reads the links' counters and the region.
const REFRESH: Duration = Duration::from_millis(250);

/// A sync may take this many times its time at the uplink's rate, plus [`SYNC_DEADLINE_BASE`]
/// (registration of the sync, manifests, the rack's verification and publish).
const SYNC_DEADLINE_FACTOR: u32 = 4;
const SYNC_DEADLINE_BASE: Duration = Duration::from_secs(120);

/// Commissioning or deploying the whole fleet: simulated machines boot in seconds, but a 2-core
/// box runs a rack, a fleet and the region for all of them.
const MACHINES_DEADLINE: Duration = Duration::from_secs(1800);

#[derive(Parser)]
#[command(
    name = "fleet",
    about = "Run a simulated Metalrack site from a scenario file",
    long_about = "Run a simulated Metalrack site from a scenario file (see hardware/scenarios/).\n\n\
        `fleet run` builds the site in network namespaces (the region's, one per rack with its \
        provisioning bridge, veth uplinks shaped with tc), starts regiond and one rackd per rack, \
        pushes the scenario's images once, has every rack sync them, then runs the scenario's \
        deploy on the simulated machines, and prints per rack and per machine what happened. \
        Needs root; changes nothing in the host's network (everything is deleted at the end).\n\n\
        `fleet check` only reads a scenario file and says what it describes."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a scenario file and print what it describes (no root needed).
    Check {
        /// The scenario file (TOML).
        scenario: PathBuf,
    },
    /// Run a scenario and print what happened.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The scenario file (TOML).
    scenario: PathBuf,
    /// Keep everything here (logs, the region's and racks' data, the images); default: a
    /// temporary directory, deleted at the end.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Make the region's UI reachable from this host's namespace at this address (for example
    /// 127.0.0.1:5240) while the scenario runs, to watch the fleet live.
    #[arg(long)]
    ui_listen: Option<SocketAddr>,
    /// After the run, keep the site up until Ctrl-C (to look around in the UI).
    #[arg(long)]
    hold: bool,
    /// Push this deploy environment (a directory with `kernel` and `initrd`, e.g. from
    /// `scripts/build-deploy-env`) instead of a stand-in: simulated machines download and count it
    /// but do not run it, so by default a stand-in of the real one's size is pushed.
    #[arg(long)]
    deploy_env: Option<PathBuf>,
}

/// The stand-in deploy environment's sizes: the real one's order of magnitude.
const STAND_IN_KERNEL_BYTES: usize = 8 << 20;
const STAND_IN_INITRD_BYTES: usize = 16 << 20;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("fleet: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    match Cli::parse().command {
        Command::Check { scenario } => {
            let scenario = Scenario::load(&scenario)?;
            print!("{}", describe(&scenario));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => run_scenario(args),
    }
}

fn describe(scenario: &Scenario) -> String {
    let mut text = format!(
        "scenario {}: {} racks, {} machines ({} deploy at once), uplinks {} Mbit/s\n",
        scenario.name,
        scenario.racks.len(),
        scenario.machine_count(),
        scenario.machines_at_once(),
        scenario.links.uplink_mbit
    );
    for rack in &scenario.racks {
        text += &format!(
            "  rack {}: {} BIOS + {} UEFI machines, disks of {}\n",
            rack.name,
            rack.bios_machines,
            rack.uefi_machines,
            HumanBytes(rack.disk_bytes)
        );
    }
    for image in &scenario.images {
        let size = scenario.image_bytes(&image.name).map_or("?".into(), |b| HumanBytes(b).to_string());
        text += &format!("  image {} ({size})\n", image.name);
    }
    text
}

fn run_scenario(args: RunArgs) -> Result<ExitCode> {
    let scenario = Scenario::load(&args.scenario)?;
    if !metalrack_hardware::have_root() {
        bail!("fleet run needs root (it creates network namespaces, veths and taps)");
    }
    let (_temporary, dir) = match &args.dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let temporary = tempfile::Builder::new().prefix("fleet-").tempdir()?;
            let dir = temporary.path().to_owned();
            (Some(temporary), dir)
        }
    };
    // Bound here, in the host's namespace, before anything runs inside the site's.
    let ui = match args.ui_listen {
        Some(address) => Some(TcpListener::bind(address).with_context(|| format!("--ui-listen {address}"))?),
        None => None,
    };
    let deploy_env = match args.deploy_env {
        Some(dir) => dir,
        None => {
            write_stand_in_deploy_env(&dir.join("stand-in-deploy-env"), STAND_IN_KERNEL_BYTES, STAND_IN_INITRD_BYTES)?
        }
    };
    let deploy_env = Some(deploy_env);
    print!("{}", describe(&scenario));
    let hold = args.hold;
    Site::run(scenario, move |inside, scenario| async move {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let (report, site, forwarder) = tokio::select! {
            result = run_site(inside, scenario, dir, ui, deploy_env) => result?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; everything started was stopped and deleted"),
            _ = terminate.recv() => bail!("terminated; everything started was stopped and deleted"),
        };
        print!("{report}");
        if hold {
            eprintln!("holding the site up; Ctrl-C ends it");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        drop((forwarder, site));
        Ok(())
    })??;
    Ok(ExitCode::SUCCESS)
}

/// Rack `index`'s simulated machines, started on its tap inside its namespace.
fn start_fleet(site: &Site, index: usize) -> Result<Option<Box<dyn RackFleet>>> {
    Ok(Some(Box::new(site.start_fleet(index)?)))
}

async fn run_site(
    topology: Arc<Topology>,
    scenario: Scenario,
    dir: PathBuf,
    ui: Option<TcpListener>,
    deploy_env: Option<PathBuf>,
) -> Result<(String, Site, Option<Forwarder>)> {
    let progress = MultiProgress::new();
    let n_racks = scenario.racks.len();
    let step = |message: String| {
        let bar = progress.add(ProgressBar::new_spinner());
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    };

    let started = Instant::now();
    let bar = step(format!("starting the region and {n_racks} racks"));
    let mut site = Site::start(topology.clone(), scenario.clone(), &dir).await?;
    bar.finish_with_message(format!(
        "region and {n_racks} racks Online after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let forwarder = match ui {
        Some(listener) => {
            let forwarder = Forwarder::start(listener, site.region.socket_address())?;
            // On stderr even when it is not a terminal (the progress display is hidden then).
            progress.suspend(|| {
                eprintln!(
                    "UI: https://{}/MAAS/ (user {ADMIN_USERNAME}, password {ADMIN_PASSWORD:?}; the certificate is the region's own)",
                    forwarder.local
                )
            });
            Some(forwarder)
        }
        None => None,
    };

    let bar = step("making the images".into());
    let images = {
        let (scenario, dir) = (scenario.clone(), dir.clone());
        tokio::task::spawn_blocking(move || metalrack_tests::site::make_images(&scenario, &dir)).await??
    };
    bar.finish_with_message(format!("{} images made", images.len()));

    let before = site.uplink_counters()?;
    let bar = step("pushing the deploy environment and the images".into());
    if let Some(env) = &deploy_env {
        site.push_deploy_env(env).await?;
    }
    for image in &images {
        site.push_image(image).await?;
    }
    bar.finish_with_message("pushed once to the region");
    site.sync_all().await?;
    let synced = watch_sync(&site, &progress, &images, &before).await?;
    let after_sync = site.uplink_counters()?;

    let mut fleets: Vec<(String, Box<dyn RackFleet>)> = Vec::new();
    for (index, rack) in scenario.racks.iter().enumerate() {
        if let Some(fleet) = start_fleet(&site, index)? {
            fleets.push((rack.name.clone(), fleet));
        }
    }
    let machines_note = if fleets.is_empty() {
        "machines: none in this scenario\n".to_owned()
    } else {
        run_deploys(&mut site, &progress, &fleets).await?
    };

    let mut report = format!("\n{} after {:.1} s\n", scenario.name, started.elapsed().as_secs_f64());
    report += &format!(
        "{:<10} {:>15} {:>12} {:>14} {:>14} {:>14} {:>14}\n",
        "rack", "uplink (rack)", "synced (s)", "down (sync)", "up (sync)", "down (total)", "provisioning"
    );
    for (index, rack) in site.racks.iter().enumerate() {
        let network = site.rack_network(&rack.name)?;
        let sync = after_sync[index].1.since(&before[index].1);
        let total = site.topology().uplink_counters(&rack.name)?;
        let provisioning = site.topology().provisioning_counters(&rack.name)?;
        report += &format!(
            "{:<10} {:>15} {:>12.1} {:>14} {:>14} {:>14} {:>14}\n",
            rack.name,
            network.uplink().rack_address.to_string(),
            synced.get(&rack.name).map_or(f64::NAN, Duration::as_secs_f64),
            HumanBytes(sync.down_bytes()).to_string(),
            HumanBytes(sync.up_bytes()).to_string(),
            HumanBytes(total.down_bytes()).to_string(),
            HumanBytes(provisioning.tx_bytes + provisioning.rx_bytes).to_string(),
        );
    }
    let unique: u64 = images.iter().map(|i| i.unique_chunk_bytes).sum();
    report += &format!("images: {} of distinct chunks (what one rack's sync must fetch)\n", HumanBytes(unique));
    report += &machines_note;

    Ok((report, site, forwarder))
}

/// Shows each rack's uplink bytes against what its sync must fetch, until every rack serves
/// every image; when each rack finished, from now.
async fn watch_sync(
    site: &Site,
    progress: &MultiProgress,
    images: &[SiteImage],
    before: &[(String, UplinkCounters)],
) -> Result<HashMap<String, Duration>> {
    let expected: u64 = images.iter().map(|i| i.unique_chunk_bytes).sum();
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}")?
        .progress_chars("=> ");
    let bars: Vec<ProgressBar> = site
        .racks
        .iter()
        .map(|r| {
            let bar = progress.add(ProgressBar::new(expected).with_style(style.clone()));
            bar.set_prefix(r.name.clone());
            bar
        })
        .collect();
    let at_rate = Duration::from_secs_f64(expected as f64 * 8.0 / (f64::from(site.scenario.links.uplink_mbit) * 1e6));
    let deadline = at_rate * SYNC_DEADLINE_FACTOR + SYNC_DEADLINE_BASE;
    let api = site.api();
    let started = Instant::now();
    let mut synced = HashMap::new();
    while synced.len() < site.racks.len() {
        if started.elapsed() > deadline {
            bail!("the racks did not all sync within {deadline:?} ({} of {} did)", synced.len(), site.racks.len());
        }
        for ((rack, bar), (_, base)) in site.racks.iter().zip(&bars).zip(before) {
            let now = site.topology().uplink_counters(&rack.name)?;
            bar.set_position(now.since(base).down_bytes().min(expected));
            if synced.contains_key(&rack.name) {
                continue;
            }
            let mut all = true;
            for image in images {
                all &= api.rack_serves_file(&rack.name, &image.blake3).await.unwrap_or(false);
            }
            if all {
                let took = started.elapsed();
                bar.finish_with_message(format!("synced in {:.1} s", took.as_secs_f64()));
                synced.insert(rack.name.clone(), took);
            }
        }
        tokio::time::sleep(REFRESH).await;
    }
    Ok(synced)
}

/// Adds every fleet's machines, commissions them, deploys the scenario's image on
/// `machines_at_once` of them (the region stopped once they started, if asked), and reports.
async fn run_deploys(
    site: &mut Site,
    progress: &MultiProgress,
    fleets: &[(String, Box<dyn RackFleet>)],
) -> Result<String> {
    let mut to_add = Vec::new();
    for (rack, fleet) in fleets {
        to_add.extend(machines_to_add(rack, fleet.as_ref()));
    }
    let bar = progress.add(ProgressBar::new_spinner());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("adding and commissioning {} machines", to_add.len()));
    let started = Instant::now();
    let ids: Vec<String> = site.add_machines(&to_add).await?.into_iter().map(|m| m.id).collect();
    site.commission_all(&ids).await?;
    site.wait_all(&ids, MachineState::Ready, MACHINES_DEADLINE).await?;
    let commissioned = started.elapsed();

    let deploying: Vec<String> = ids.iter().take(site.scenario.machines_at_once() as usize).cloned().collect();
    bar.set_message(format!("deploying {} machines", deploying.len()));
    let started = Instant::now();
    site.deploy_all(&deploying, &site.scenario.deploy.image.clone()).await?;
    if site.scenario.deploy.stop_region_after_start {
        site.wait_all(&deploying, MachineState::Deploying, MACHINES_DEADLINE).await?;
        site.stop_region()?;
        bar.set_message("deploying with the region stopped");
        // The fleet's own view says when every disk is written and verified.
        let hostnames: Vec<String> = to_add.iter().take(deploying.len()).map(|m| m.hostname.clone()).collect();
        metalrack_tests::wait::try_wait_for("every deploy to end", MACHINES_DEADLINE, REFRESH, || async {
            let done = fleets
                .iter()
                .flat_map(|(_, f)| f.machines())
                .filter(|m| hostnames.contains(&m.hostname) && m.deployed)
                .count();
            Ok((done == hostnames.len()).then_some(()))
        })
        .await?;
        site.start_region()?;
    }
    site.wait_all(&deploying, MachineState::Deployed, MACHINES_DEADLINE).await?;
    let deployed = started.elapsed();
    bar.finish_with_message(format!("{} machines Deployed", deploying.len()));

    let mut report = format!(
        "machines: {} commissioned in {:.1} s; {} deployed in {:.1} s\n",
        ids.len(),
        commissioned.as_secs_f64(),
        deploying.len(),
        deployed.as_secs_f64()
    );
    report += &format!("{:<14} {:>10} {:>6} {:>12} {:>12}  phases\n", "machine", "phase", "boots", "tftp", "http");
    for (_, fleet) in fleets {
        for machine in fleet.machines() {
            let phases: Vec<String> =
                machine.phase_log.iter().map(|(phase, took)| format!("{phase} {:.1}s", took.as_secs_f64())).collect();
            report += &format!(
                "{:<14} {:>10} {:>6} {:>12} {:>12}  {}\n",
                machine.hostname,
                machine.phase,
                machine.boots,
                HumanBytes(machine.bytes_tftp).to_string(),
                HumanBytes(machine.bytes_http).to_string(),
                phases.join(", ")
            );
        }
    }
    Ok(report)
}
