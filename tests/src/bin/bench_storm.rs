//! `bench_storm`: a deploy storm on one rack (issue 13, "At scale"). N simulated machines
//! (`hardware::fleet`) on one rack deploy one image at once (`hardware/scenarios/storm.toml`:
//! 100 machines, a 1 GiB pseudo-random image, so every machine fetches every byte). Reported:
//! the storm's total time against the rack's HTTP rate to a plain client (`curl` of the same
//! file from the same server, page cache warm: the limit); the rack's, the fleet's and the
//! region's CPU and memory; failures; the bytes on the rack's uplink during the storm (the
//! region's share: events only); and the region's admin API and UI latency (p50/p99/max, sampled
//! every 200 ms) idle, then during the storm.
//!
//! With `--pin`, the region runs alone on CPU 1 and everything else (the rack, this process with
//! the fleet and the samplers) on CPU 0 (`taskset`), so the region has its own core as on the
//! seed's site, where it is a box of its own.
//!
//! Run (root): `cargo build --release -p metalrack-region -p metalrack-appliance -p
//! metalrack-imgtool -p metalrack-tests --bins && target/release/bench_storm [--pin] [--machines
//! N] [--size-mib M] [--idle-s S]`; `--machines 10 --size-mib 10240` is the 10 GiB case.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use metalrack_api::machines::MachineState;
use metalrack_hardware::fleet::SimPhase;
use metalrack_hardware::scenario::Scenario;
use metalrack_tests::latency::LatencyReport;
use metalrack_tests::scale::{admin_sampler, rack_deep_offset, ui_session, ProcessUsage};
use metalrack_tests::site::{machines_to_add, Site, ADMIN_PASSWORD, ADMIN_USERNAME};

/// The API and UI are sampled this often, idle and during the storm.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Commissioning and the storm itself: 100 GiB through simulated machines on two cores.
const DEADLINE: Duration = Duration::from_secs(3600);

/// The rack's HTTP boot port.
const RACK_HTTP_PORT: u16 = 5248;

#[derive(Parser)]
#[command(
    name = "bench_storm",
    about = "A deploy storm on one rack: simulated machines, the region's latency meanwhile"
)]
struct Args {
    /// Machines on the rack, all deploying at once.
    #[arg(long, default_value_t = 100)]
    machines: u32,
    /// The image's size.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Seconds the idle latency is sampled for.
    #[arg(long, default_value_t = 20)]
    idle_s: u64,
    /// The region alone on CPU 1, everything else on CPU 0.
    #[arg(long)]
    pin: bool,
    /// Where the site lives (a temp dir under it).
    #[arg(long, default_value = "/tmp")]
    work_dir: std::path::PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("bench_storm: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hardware/scenarios/storm.toml");
    let mut scenario = Scenario::load(&path)?;
    scenario.racks[0].bios_machines = args.machines;
    scenario.racks[0].uefi_machines = 0;
    scenario.racks[0].disk_bytes = scenario.racks[0].disk_bytes.max(args.size_mib << 20);
    scenario.region.deploys_per_rack_max = args.machines;
    scenario.images[0].synthetic.as_mut().context("the storm's image is synthetic")?.size_bytes = args.size_mib << 20;
    let dir = tempfile::Builder::new().prefix("bench_storm").tempdir_in(&args.work_dir)?;
    let topology = Site::build_topology(&scenario)?;
    let dir_path = dir.path().to_owned();
    Site::block_on(&topology.clone(), move || async move { storm(topology, scenario, &dir_path, args).await })?
}

async fn storm(
    topology: std::sync::Arc<metalrack_hardware::topology::Topology>,
    scenario: Scenario,
    dir: &Path,
    args: Args,
) -> Result<String> {
    let load_at_start = metalrack_tests::bench::load_average();
    let site = Site::start(topology, scenario, dir).await?;
    let env = dir.join("deploy-env");
    std::fs::create_dir_all(&env)?;
    std::fs::write(env.join("kernel"), metalrack_tests::random_bytes(1 << 20, 1))?;
    std::fs::write(env.join("initrd"), metalrack_tests::random_bytes(3 << 20, 2))?;
    site.push_deploy_env(&env).await?;
    let image = site.make_images()?.remove(0);
    site.push_image(&image).await?;
    site.sync_all().await?;
    site.wait_synced(&image.blake3, DEADLINE).await?;

    let rack = &site.racks[0];
    let rack_pid = rack.rack.daemon.as_ref().context("rackd runs")?.pid() as u32;
    let region_pid = site.region.daemon.pid() as u32;
    if args.pin {
        pin(region_pid, "1")?;
        pin(rack_pid, "0")?;
        pin(std::process::id(), "0")?;
    }

    // The limit: the rack's HTTP rate to a plain client, same file, page cache warm.
    let network = site.rack_network(&rack.name)?;
    let url = format!("http://{}:{RACK_HTTP_PORT}/images/{}/amd64/1/root-disk", network.lab().gateway(), image.name);
    let curl = |url: String| -> Result<f64> {
        let output = network
            .lab()
            .command("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", &url])
            .output()?;
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let words: Vec<f64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        ensure!(words.len() == 2 && words[1] as u64 == image.bytes, "curl of {url}: {text:?}");
        Ok(words[0])
    };
    curl(url.clone())?;
    let curl_rate = curl(url.clone())?.max(curl(url)?);

    let fleet = site.start_fleet(0)?;
    let to_add = machines_to_add(&rack.name, &fleet);
    let ids: Vec<String> = site.add_machines(&to_add).await?.into_iter().map(|m| m.id).collect();
    site.commission_all(&ids).await?;
    tokio::select! {
        ready = site.wait_all(&ids, MachineState::Ready, DEADLINE) => { ready?; }
        failed = first_failure(&fleet) => return Err(failed.context("commissioning")),
    }

    let api = site.api();
    let ui = ui_session(&site.region, ADMIN_USERNAME, ADMIN_PASSWORD).await?;
    let region_url = site.region.https_url();
    let rack_deep_offset = rack_deep_offset(site.topology().racks().len());
    let sampler = || {
        admin_sampler(
            SAMPLE_EVERY,
            &api,
            &ui,
            &region_url,
            &ids[0],
            (ids.len() as u64 / 2).saturating_sub(1),
            rack_deep_offset,
        )
    };
    let idle = sampler().run_for(Duration::from_secs(args.idle_s)).await;

    let uplink_before = site.uplink_counters()?.remove(0).1;
    let usage = |pid: u32| ProcessUsage::of(pid);
    let (rack_before, region_before, own_before) = (usage(rack_pid)?, usage(region_pid)?, ProcessUsage::own()?);
    let running = sampler().start();
    let started = Instant::now();
    site.deploy_all(&ids, &image.name).await?;
    let deployed = tokio::select! {
        deployed = site.wait_all(&ids, MachineState::Deployed, DEADLINE) => deployed,
        failed = first_failure(&fleet) => Err(failed),
    };
    let took = started.elapsed();
    let during = running.stop().await;
    let (rack_after, region_after, own_after) = (usage(rack_pid)?, usage(region_pid)?, ProcessUsage::own()?);
    let uplink = site.uplink_counters()?.remove(0).1.since(&uplink_before);
    let deployed = deployed?;
    let hash = metalrack_image_tools::Hash::from_hex(&image.blake3)?;
    let mut bad_disks = Vec::new();
    for machine in fleet.machines() {
        if fleet.disk_hash(&machine.mac, image.bytes) != Some(hash) {
            bad_disks.push(machine.hostname.clone());
        }
    }
    if !bad_disks.is_empty() {
        bail!("disks not holding the image: {bad_disks:?}");
    }

    let n = ids.len() as f64;
    let mib = image.bytes as f64 / f64::from(1 << 20);
    let aggregate = n * mib / took.as_secs_f64();
    let curl_mib = curl_rate / f64::from(1 << 20);
    let cpu = |after: &ProcessUsage, before: &ProcessUsage| (after.cpu - before.cpu).as_secs_f64();
    let mut report = format!(
        "## Deploy storm: {} machines × {mib:.0} MiB from one rack{}\n\n\
         load average at the start: {load_at_start}; at the end: {}\n\n\
         | | |\n|---|---|\n\
         | machines Deployed, disks verified | {} of {} |\n\
         | storm: deploy asked → last Deployed | {:.1} s |\n\
         | aggregate image bytes to the machines | {aggregate:.0} MiB/s |\n\
         | the rack's HTTP rate to one `curl -o /dev/null` (the limit) | {curl_mib:.0} MiB/s |\n\
         | storm ÷ curl | {:.2}× |\n\
         | rackd CPU during the storm | {:.1} s ({:.2} s per GiB sent) |\n\
         | rackd RSS at the end / peak | {} / {} MiB |\n\
         | fleet (this process) CPU during the storm | {:.1} s |\n\
         | fleet RSS at the end / peak | {} / {} MiB |\n\
         | regiond CPU during the storm | {:.1} s |\n\
         | regiond RSS at the end / peak | {} / {} MiB |\n\
         | uplink during the storm, region → rack / rack → region | {} / {} bytes |\n\n",
        ids.len(),
        if args.pin { " (regiond alone on CPU 1, the rest on CPU 0)" } else { "" },
        metalrack_tests::bench::load_average(),
        deployed.len(),
        ids.len(),
        took.as_secs_f64(),
        aggregate / curl_mib,
        cpu(&rack_after, &rack_before),
        cpu(&rack_after, &rack_before) / (n * mib / 1024.0),
        rack_after.rss_bytes >> 20,
        rack_after.peak_rss_bytes >> 20,
        cpu(&own_after, &own_before),
        own_after.rss_bytes >> 20,
        own_after.peak_rss_bytes >> 20,
        cpu(&region_after, &region_before),
        region_after.rss_bytes >> 20,
        region_after.peak_rss_bytes >> 20,
        uplink.down_bytes(),
        uplink.up_bytes(),
    );
    report += &latency_table(&idle, &during);
    Ok(report)
}

/// Returns once a simulated machine shows a failure (the region would only see it stall).
async fn first_failure(fleet: &metalrack_hardware::fleet::Fleet) -> anyhow::Error {
    loop {
        if let Some(failed) = fleet.machines().into_iter().find(|m| matches!(m.phase, SimPhase::Failed { .. })) {
            return anyhow::anyhow!("{} failed: {:?}", failed.hostname, failed.phase);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `taskset -a -p -c CPUS PID`: every thread of `pid` (and those it starts later) on `cpus`.
fn pin(pid: u32, cpus: &str) -> Result<()> {
    let status = Command::new("taskset").args(["-a", "-p", "-c", cpus, &pid.to_string()]).output()?;
    ensure!(status.status.success(), "taskset of {pid}: {}", String::from_utf8_lossy(&status.stderr));
    Ok(())
}

/// Idle and storm latency side by side, with the p99 ratio.
fn latency_table(idle: &LatencyReport, during: &LatencyReport) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut table = String::from(
        "| request | idle p50 / p99 / max ms | storm p50 / p99 / max ms | p99 storm ÷ idle | samples idle / storm | errors idle / storm |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for request in &idle.requests {
        let Some(storm) = during.get(&request.name) else { continue };
        table += &format!(
            "| {} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {:.2}× | {} / {} | {} / {} |\n",
            request.name,
            ms(request.p50),
            ms(request.p99),
            ms(request.max),
            ms(storm.p50),
            ms(storm.p99),
            ms(storm.max),
            ms(storm.p99) / ms(request.p99).max(0.001),
            request.count,
            storm.count,
            request.errors,
            storm.errors
        );
    }
    table
}
