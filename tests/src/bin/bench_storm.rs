//! `bench_storm`: a deploy storm on one rack (issue 13, "At scale"). N simulated machines
//! (`hardware::fleet`) on one rack deploy one image at once (`hardware/scenarios/storm.toml`:
//! 100 machines, a 1 GiB pseudo-random image, so every machine fetches every byte). Reported:
//! the storm's total time against the rack's HTTP rate to a plain client (`curl` of the same
//! file from the same server, page cache warm: the limit); the rack's, the fleet's and the
//! region's CPU and memory; failures; the bytes on the rack's uplink during the storm (the
//! region's share: events only); and the region's admin API and UI latency (p50/p99/max, sampled
//! every 200 ms) idle, during the storm, and idle again once every machine has booted from its
//! disk; the storm's p99 is compared with the lower of the two idle p99s.
//!
//! With `--pin`, the region runs alone on CPU 1 and everything else (the rack, this process with
//! the fleet) on CPU 0 (`taskset`), so the region has its own core as on the seed's site, where
//! it is a box of its own. "Alone" is made true for the run's length: every other thread on the
//! box that may move is moved off CPU 1, and the kernel's unbound work queues with them, and all
//! are put back at the end ([`CoreForRegion`]). Without that, the scheduler moved other work
//! onto the region's idle core: a `perf sched` record of one storm found half of CPU 1 going to
//! the sandbox's command runner and this process's runtime. With `--fleet-sched-idle` as well,
//! the simulated machines' threads run at `SCHED_IDLE` on CPU 0: they stand in for computers of
//! their own, so they take only the time the rack leaves.
//!
//! The samplers run on a thread of their own, `admin-sampler`, with a runtime and connections of
//! their own ([`spawn_sampler`]); the rest of this process (the site's client waiting for the
//! machines, the fleet) stays on CPU 0. With `--client-realtime` that one thread runs at
//! `SCHED_FIFO` priority 1: it stands in for an administrator's browser on a computer of its
//! own, so a sample is not delayed between its wake-up and its send, or between the answer and
//! its reading. It is light (a request every 200 ms per route). With `--client-cpu 1` (and
//! `--pin`) it runs beside the region: its packets then cross the lab's links in softirq on the
//! region's quiet core, not on CPU 0 behind the rack's traffic.
//!
//! The host has its say on a VM, and the report shows how much. Each sampling round first times
//! a fixed piece of CPU work on the samplers' thread ([`metalrack_tests::latency::reference_work`]:
//! the box's speed), and with `--pin` each sample watches the region's core's steal time in
//! `/proc/stat` (time the hypervisor gave to something else while that vCPU had work): the
//! storm's ratio is also given over the samples during which none was seen, and over those again
//! with each sample divided by the box's speed when it was sent. On the lab's VM the region's
//! core lost 0.0–1.4% to steal in the idle window before a storm (up to 4.6% in the one after)
//! and 1.7–3.2% during storms, in episodes long enough that the 0.9 ms reference work once took
//! 14 ms at `SCHED_FIFO` (docs/PERFORMANCE.md, "What the host does to the region's core").
//!
//! Beside the sampler's figures (measured at the client), the report has the region's own view
//! of each route's latency over the same windows, from its `/metrics` histogram (the bucket that
//! p50 and p99 fall in): a slow answer that the region timed fast was slow in the client or on the
//! way, not in the region.
//!
//! Last, what the region's core did over each window besides the region (`CoreTimes`): its
//! time by kind (user, system, interrupt work, time stolen by the hypervisor) and the interrupts
//! it took. `--pin` moves threads and work queues, but not interrupts whose affinity the kernel
//! manages (on the lab's VM the disk's completions land on CPU 1 and cannot be moved), so this
//! says how much of "its own core" the region really had.
//!
//! Run (root): `cargo build --release -p metalrack-region -p metalrack-appliance -p
//! metalrack-imgtool -p metalrack-tests --bins && target/release/bench_storm [--pin] [--machines
//! N] [--size-mib M] [--idle-s S]`; `--machines 10 --size-mib 10240` is the 10 GiB case.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use metalrack_api::machines::MachineState;
use metalrack_hardware::fleet::SimPhase;
use metalrack_hardware::scenario::Scenario;
use metalrack_tests::api::Api;
use metalrack_tests::latency::{LatencyReport, RequestLatency, RouteHistograms};
use metalrack_tests::scale::{admin_sampler, rack_deep_offset, ui_session_from, ProcessUsage};
use metalrack_tests::site::{machines_to_add, write_stand_in_deploy_env, Site, ADMIN_PASSWORD, ADMIN_USERNAME};
use nix::sched::CpuSet;
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// The API and UI are sampled this often, idle and during the storm.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Commissioning and the storm itself: 100 GiB through simulated machines on two cores.
const DEADLINE: Duration = Duration::from_secs(3600);

/// The region's core under `--pin`.
const REGION_CPU: usize = 1;

/// The kernel's unbound work queues may run on the CPUs of this hex mask.
const WORKQUEUE_CPUMASK: &str = "/sys/devices/virtual/workqueue/cpumask";

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
    /// The simulated machines' threads at `SCHED_IDLE` (see the module's doc).
    #[arg(long)]
    fleet_sched_idle: bool,
    /// The samplers' thread at `SCHED_FIFO` 1 (see the module's doc).
    #[arg(long)]
    client_realtime: bool,
    /// The samplers' thread on this CPU (see the module's doc); with `--pin`, 1 puts it beside
    /// the region.
    #[arg(long)]
    client_cpu: Option<u32>,
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
    let dir_path = dir.path().to_owned();
    Site::run(scenario, move |topology, scenario| async move { storm(topology, scenario, &dir_path, args).await })?
}

async fn storm(
    topology: std::sync::Arc<metalrack_hardware::topology::Topology>,
    scenario: Scenario,
    dir: &Path,
    args: Args,
) -> Result<String> {
    let load_at_start = metalrack_tests::bench::load_average();
    let site = Site::start(topology, scenario, dir).await?;
    let env = write_stand_in_deploy_env(&dir.join("deploy-env"), 1 << 20, 3 << 20)?;
    site.push_deploy_env(&env).await?;
    let image = site.make_images()?.remove(0);
    site.push_image(&image).await?;
    site.sync_all().await?;
    site.wait_synced(&image.blake3, DEADLINE).await?;

    let rack = &site.racks[0];
    let rack_pid = rack.rack.daemon.as_ref().context("rackd runs")?.pid() as u32;
    let region_pid = site.region.daemon.pid() as u32;
    let core = if args.pin {
        pin(region_pid, &REGION_CPU.to_string())?;
        pin(rack_pid, "0")?;
        pin(std::process::id(), "0")?;
        Some(CoreForRegion::claim(REGION_CPU, region_pid)?)
    } else {
        None
    };

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
    if args.fleet_sched_idle {
        fleet_threads_sched_idle()?;
    }
    let to_add = machines_to_add(&rack.name, &fleet);
    let ids: Vec<String> = site.add_machines(&to_add).await?.into_iter().map(|m| m.id).collect();
    site.commission_all(&ids).await?;
    tokio::select! {
        ready = site.wait_all(&ids, MachineState::Ready, DEADLINE) => { ready?; }
        failed = first_failure(&fleet) => return Err(failed.context("commissioning")),
    }

    let api = site.api();
    let core_at_start = CoreTimes::read(REGION_CPU)?;
    let histograms_at_start = RouteHistograms::scrape(&api).await?;
    let (idle, sampler) = spawn_sampler(SamplerSetup {
        api_builder: site.region.https_client_builder(),
        ui_builder: site.region.https_client_builder(),
        region_url: site.region.https_url(),
        api_key: site.api_key.clone(),
        machine_id: ids[0].clone(),
        deep_offset: (ids.len() as u64 / 2).saturating_sub(1),
        rack_deep_offset: rack_deep_offset(site.topology().racks().len()),
        idle: Duration::from_secs(args.idle_s),
        cpu: args.client_cpu,
        realtime: args.client_realtime,
        steal_cpu: args.pin.then_some(REGION_CPU),
    })?;
    let Ok(idle) = idle.await else { return Err(sampler.failed().await) };
    let histograms_idle_end = RouteHistograms::scrape(&api).await?;
    let core_idle_end = CoreTimes::read(REGION_CPU)?;

    let uplink_before = site.uplink_counters()?.remove(0).1;
    let usage = |pid: u32| ProcessUsage::of(pid);
    let (rack_before, region_before, own_before) = (usage(rack_pid)?, usage(region_pid)?, ProcessUsage::own()?);
    let core_storm_start = CoreTimes::read(REGION_CPU)?;
    let sampler = sampler.start_storm();
    let started = Instant::now();
    site.deploy_all(&ids, &image.name).await?;
    let deployed = tokio::select! {
        deployed = wait_deployed(&site, &api, &ids) => deployed,
        failed = first_failure(&fleet) => Err(failed),
    };
    let took = started.elapsed();
    let sampler = sampler.stop_storm();
    let core_storm_end = CoreTimes::read(REGION_CPU)?;
    let region_idle = histograms_idle_end.since(&histograms_at_start);
    let region_storm = RouteHistograms::scrape(&api).await?.since(&histograms_idle_end);
    let (rack_after, region_after, own_after) = (usage(rack_pid)?, usage(region_pid)?, ProcessUsage::own()?);
    let uplink = site.uplink_counters()?.remove(0).1.since(&uplink_before);
    let deployed = deployed?;
    // The second idle window starts once the machines have all booted from their disks: the
    // storm's last power cycles are over.
    wait_fleet_booted_local(&fleet).await?;
    let core_after_start = CoreTimes::read(REGION_CPU)?;
    let (during, idle_after) = sampler.idle_again().await?;
    let core_after_end = CoreTimes::read(REGION_CPU)?;
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
        setup(&args, core.as_ref()),
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
    report += &latency_table(&idle, &during, &idle_after);
    report += "\n";
    report += &region_table(&region_idle, &region_storm);
    report += "\n";
    report += &core_table(&[
        ("idle before", core_idle_end.since(&core_at_start)),
        ("storm", core_storm_end.since(&core_storm_start)),
        ("idle after", core_after_end.since(&core_after_start)),
    ]);
    Ok(report)
}

/// Waits until no machine is waiting for or running a deploy, by the count of each state (one
/// row asked for): a full machine list every second, as `Site::wait_all` polls, would be load
/// on the region during the storm that the idle window does not have. Then one full list
/// confirms that every machine is Deployed.
async fn wait_deployed(site: &Site, api: &Api, ids: &[String]) -> Result<Vec<metalrack_api::machines::MachineView>> {
    let started = Instant::now();
    loop {
        let mut busy = 0;
        for state in [MachineState::Allocated, MachineState::Deploying] {
            let path = format!("{}?state={}&limit=1", metalrack_api::paths::MACHINES, state.as_str());
            let response = api.request(reqwest::Method::GET, &path).send().await?.error_for_status()?;
            busy += response.json::<metalrack_api::machines::MachinePage>().await?.total;
        }
        if busy == 0 {
            return site.wait_all(ids, MachineState::Deployed, Duration::from_secs(10)).await;
        }
        ensure!(started.elapsed() < DEADLINE, "{busy} machines still deploying after {DEADLINE:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until every simulated machine has booted from its disk (the deploy's last step).
async fn wait_fleet_booted_local(fleet: &metalrack_hardware::fleet::Fleet) -> Result<()> {
    let started = Instant::now();
    loop {
        let machines = fleet.machines();
        let not_yet = machines.iter().filter(|m| m.phase != SimPhase::BootedLocal).count();
        if not_yet == 0 {
            return Ok(());
        }
        ensure!(started.elapsed() < Duration::from_secs(120), "{not_yet} machines not booted from disk in 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

/// How the run was placed, for the report's title.
fn setup(args: &Args, core: Option<&CoreForRegion>) -> String {
    let mut parts = Vec::new();
    let pinned = core.map(|core| format!("regiond alone on CPU {REGION_CPU} ({}), the rest on CPU 0", core.describe()));
    parts.extend(pinned);
    if args.fleet_sched_idle {
        parts.push("the machines at SCHED_IDLE".to_owned());
    }
    if args.client_realtime {
        parts.push("the samplers at SCHED_FIFO".to_owned());
    }
    parts.extend(args.client_cpu.map(|cpu| format!("the samplers on CPU {cpu}")));
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// Every thread of this process named `fleet-…` (the simulated machines, their tap reader and
/// BMCs) to `SCHED_IDLE` (`chrt --idle -p 0 TID`).
fn fleet_threads_sched_idle() -> Result<()> {
    let changed = set_own_threads(|comm| comm.starts_with("fleet-"), "chrt", &["--idle", "-p", "0"])?;
    ensure!(changed > 0, "no fleet thread found");
    Ok(())
}

/// `TOOL ARGS TID` (`chrt`, `taskset`) for each thread of this process whose name `select`s;
/// how many.
fn set_own_threads(select: impl Fn(&str) -> bool, tool: &str, policy: &[&str]) -> Result<usize> {
    let mut changed = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?;
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !select(comm.trim_end()) {
            continue;
        }
        let tid = task.file_name().to_string_lossy().to_string();
        run_tool(tool, &[policy, &[tid.as_str()]].concat())?;
        changed += 1;
    }
    Ok(changed)
}

/// The region's own latency per route (its `/metrics` histogram), idle and during the storm:
/// the routes the sampler asks for, then every other route the storm used.
fn region_table(idle: &RouteHistograms, storm: &RouteHistograms) -> String {
    const SAMPLED: [&str; 5] =
        ["/MAAS/api/v1/machines", "/MAAS/api/v1/machines/{machine}", "/MAAS/api/v1/racks", "/MAAS/machines", "/MAAS/"];
    let bound = |h: &RouteHistograms, route: &str, method: &str, q: f64| match h.quantile_bound(route, method, q) {
        Some(d) if d == Duration::MAX => "> 60 s".to_owned(),
        Some(d) => format!("≤ {}", d.as_secs_f64() * 1000.0),
        None => "-".to_owned(),
    };
    let mut table = String::from(
        "The region's own timing (its request histogram; the bucket p50 and p99 fall in, ms):\n\n\
         | route | method | idle requests | idle p50 / p99 | storm requests | storm p50 / p99 |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    let mut routes: Vec<(String, String)> = SAMPLED.iter().map(|r| (r.to_string(), "GET".to_owned())).collect();
    for key in storm.routes() {
        if !routes.contains(&key) && storm.count(&key.0, &key.1) > 0 {
            routes.push(key);
        }
    }
    for (route, method) in routes {
        table += &format!(
            "| {route} | {method} | {} | {} / {} | {} | {} / {} |\n",
            idle.count(&route, &method),
            bound(idle, &route, &method, 0.5),
            bound(idle, &route, &method, 0.99),
            storm.count(&route, &method),
            bound(storm, &route, &method, 0.5),
            bound(storm, &route, &method, 0.99),
        );
    }
    table
}

/// Each request's latency idle before, during and idle after the storm; how far the two idle
/// windows' p99s differ with no storm in either (what this box does by itself); the storm's
/// ratio against the lower of the two idle p99s (the harder test: the box's own drift between
/// the windows does not flatter it). Then the same ratio over the samples during which the
/// region's core lost no time to the hypervisor (with `--pin`), that again with each sample in
/// units of the box's speed when it was sent, and a row for the reference work itself.
fn latency_table(idle: &LatencyReport, during: &LatencyReport, idle_after: &LatencyReport) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut table = String::from(
        "| request | idle before p50 / p99 / max ms | storm p50 / p99 / max ms | idle after p50 / p99 / max ms | \
         p99 idle after ÷ idle before (no storm in either: the box's own spread) | p99 storm ÷ lower idle p99 | the same over samples without steal (samples with: before / storm / after) | the same in units of the box's speed | samples before / storm / after | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let clean_ratio = |before: &RequestLatency, storm: &RequestLatency, after: &RequestLatency| {
        let (Some(b), Some(s), Some(a)) = (before.steal, storm.steal, after.steal) else {
            return "- | -".to_owned();
        };
        let relative = match (b.clean_relative_p99, s.clean_relative_p99, a.clean_relative_p99) {
            (Some(b), Some(s), Some(a)) => format!("{:.2}×", s / b.min(a).max(f64::MIN_POSITIVE)),
            _ => "-".to_owned(),
        };
        format!(
            "{:.2}× ({} / {} / {}) | {relative}",
            ms(s.clean_p99) / ms(b.clean_p99.min(a.clean_p99)).max(0.001),
            b.hit,
            s.hit,
            a.hit
        )
    };
    let row = |request: &RequestLatency, storm: &RequestLatency, after: &RequestLatency| {
        let idle_p99 = request.p99.min(after.p99);
        format!(
            "| {} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {:.2}× | {:.2}× | {} | {} / {} / {} | {} |\n",
            request.name,
            ms(request.p50),
            ms(request.p99),
            ms(request.max),
            ms(storm.p50),
            ms(storm.p99),
            ms(storm.max),
            ms(after.p50),
            ms(after.p99),
            ms(after.max),
            ms(after.p99) / ms(request.p99).max(0.001),
            ms(storm.p99) / ms(idle_p99).max(0.001),
            clean_ratio(request, storm, after),
            request.count,
            storm.count,
            after.count,
            request.errors + storm.errors + after.errors
        )
    };
    for request in &idle.requests {
        let (Some(storm), Some(after)) = (during.get(&request.name), idle_after.get(&request.name)) else { continue };
        table += &row(request, storm, after);
    }
    if let (Some(before), Some(storm), Some(after)) = (&idle.reference, &during.reference, &idle_after.reference) {
        table += &row(before, storm, after);
    }
    table
}

/// What the samplers' thread needs, all of it `Send`: client builders rather than clients, so
/// the connections are made on that thread's runtime and their tasks run there too.
struct SamplerSetup {
    api_builder: reqwest::ClientBuilder,
    ui_builder: reqwest::ClientBuilder,
    region_url: String,
    api_key: String,
    machine_id: String,
    deep_offset: u64,
    rack_deep_offset: u64,
    idle: Duration,
    cpu: Option<u32>,
    realtime: bool,
    /// The region's core, whose steal time each sample watches (with `--pin`).
    steal_cpu: Option<usize>,
}

/// The samplers' thread, sampling the idle window at once and then waiting for the storm.
struct Sampler {
    start_storm: oneshot::Sender<()>,
    stop_storm: oneshot::Sender<()>,
    start_idle: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<AfterIdle>,
}

/// What the samplers' thread returns: the storm's report and the second idle window's.
type AfterIdle = Result<(LatencyReport, LatencyReport)>;

/// The samplers during the storm.
struct StormSampler {
    stop_storm: oneshot::Sender<()>,
    start_idle: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<AfterIdle>,
}

/// The samplers between the storm and the second idle window.
struct AfterSampler {
    start_idle: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<AfterIdle>,
}

/// Starts the admin samplers on a thread of their own (`admin-sampler`), placed by
/// `setup.cpu` and `setup.realtime`, with a current-thread runtime of its own: the placement
/// then applies to the samplers alone, not to this process's other tasks (the site's client
/// polling the machines, which at `SCHED_FIFO` beside the region would preempt it).
fn spawn_sampler(setup: SamplerSetup) -> Result<(oneshot::Receiver<LatencyReport>, Sampler)> {
    let (idle_done, idle) = oneshot::channel();
    let (start_storm, storm_started) = oneshot::channel();
    let (stop_storm, storm_stopped) = oneshot::channel();
    let (start_idle, idle_started) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("admin-sampler".to_owned())
        .spawn(move || sample(setup, idle_done, storm_started, storm_stopped, idle_started))?;
    Ok((idle, Sampler { start_storm, stop_storm, start_idle, thread }))
}

/// The samplers' thread's work: place itself, log in, sample the idle window, the storm, and
/// an idle window again.
fn sample(
    setup: SamplerSetup,
    idle_done: oneshot::Sender<LatencyReport>,
    storm_started: oneshot::Receiver<()>,
    storm_stopped: oneshot::Receiver<()>,
    idle_started: oneshot::Receiver<()>,
) -> AfterIdle {
    let tid = nix::unistd::gettid().to_string();
    if let Some(cpu) = setup.cpu {
        run_tool("taskset", &["-p", "-c", &cpu.to_string(), &tid])?;
    }
    if setup.realtime {
        run_tool("chrt", &["-f", "-p", "1", &tid])?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let api = Api::new(setup.api_builder.build()?, &setup.region_url, &setup.api_key);
        let ui = ui_session_from(setup.ui_builder, &setup.region_url, ADMIN_USERNAME, ADMIN_PASSWORD).await?;
        let mut sampler = admin_sampler(
            SAMPLE_EVERY,
            &api,
            &ui,
            &setup.region_url,
            &setup.machine_id,
            setup.deep_offset,
            setup.rack_deep_offset,
        )
        .reference_work();
        if let Some(cpu) = setup.steal_cpu {
            sampler = sampler.watch_steal(cpu);
        }
        let idle = sampler.clone().run_for(setup.idle).await;
        idle_done.send(idle).map_err(|_| anyhow!("the bench stopped waiting for the idle samples"))?;
        storm_started.await.context("the bench ended before the storm")?;
        let running = sampler.clone().start();
        // Dropped or sent, either way the storm is over.
        let _ = storm_stopped.await;
        let storm = running.stop().await;
        idle_started.await.context("the bench ended before the second idle window")?;
        Ok((storm, sampler.run_for(setup.idle).await))
    })
}

impl Sampler {
    /// Why the thread ended before its idle report.
    async fn failed(self) -> anyhow::Error {
        drop(self.start_storm);
        join(self.thread).await.err().unwrap_or_else(|| anyhow!("the sampler ended without an idle report"))
    }

    fn start_storm(self) -> StormSampler {
        // A thread that already failed reports so when stopped.
        let _ = self.start_storm.send(());
        StormSampler { stop_storm: self.stop_storm, start_idle: self.start_idle, thread: self.thread }
    }
}

impl StormSampler {
    fn stop_storm(self) -> AfterSampler {
        let _ = self.stop_storm.send(());
        AfterSampler { start_idle: self.start_idle, thread: self.thread }
    }
}

impl AfterSampler {
    /// Samples the second idle window; the storm's report and that window's.
    async fn idle_again(self) -> AfterIdle {
        let _ = self.start_idle.send(());
        join(self.thread).await
    }
}

/// Joins a samplers' thread without blocking the runtime.
async fn join(thread: std::thread::JoinHandle<AfterIdle>) -> AfterIdle {
    tokio::task::spawn_blocking(move || thread.join().map_err(|_| anyhow!("the sampler's thread panicked"))?).await?
}

/// What one CPU did, from `/proc/stat` (its time by kind, in clock ticks) and `/proc/interrupts`
/// (the interrupts it took): whether the region's core, during the storm, also served the
/// box (device interrupts it cannot refuse, such as the disk's, whose affinity the kernel
/// manages; softirq work; time the hypervisor gave elsewhere) beside the region.
#[derive(Clone, Copy, Debug)]
struct CoreTimes {
    /// user + nice
    user: u64,
    system: u64,
    /// irq + softirq
    interrupt_work: u64,
    steal: u64,
    /// idle + iowait
    idle: u64,
    /// Interrupts of devices (numbered lines of `/proc/interrupts`).
    device_interrupts: u64,
    /// The rest: the local timer and the inter-processor interrupts (rescheduling, function
    /// calls, TLB shootdowns).
    other_interrupts: u64,
    at: Instant,
}

impl CoreTimes {
    fn read(cpu: usize) -> Result<CoreTimes> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let name = format!("cpu{cpu}");
        let line = stat
            .lines()
            .find(|line| line.split_whitespace().next() == Some(name.as_str()))
            .with_context(|| format!("no {name} line in /proc/stat"))?;
        let ticks: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
        ensure!(ticks.len() >= 8, "short {name} line in /proc/stat: {line:?}");
        let mut times = CoreTimes {
            user: ticks[0] + ticks[1],
            system: ticks[2],
            idle: ticks[3] + ticks[4],
            interrupt_work: ticks[5] + ticks[6],
            steal: ticks[7],
            device_interrupts: 0,
            other_interrupts: 0,
            at: Instant::now(),
        };
        let interrupts = std::fs::read_to_string("/proc/interrupts")?;
        let mut lines = interrupts.lines();
        let header = lines.next().context("empty /proc/interrupts")?;
        let column = header
            .split_whitespace()
            .position(|word| word == name.to_uppercase())
            .with_context(|| format!("no {name} column in /proc/interrupts"))?;
        for line in lines {
            let mut words = line.split_whitespace();
            let Some(label) = words.next() else { continue };
            let Some(Ok(count)) = words.nth(column).map(str::parse::<u64>) else { continue };
            if label.trim_end_matches(':').parse::<u32>().is_ok() {
                times.device_interrupts += count;
            } else {
                times.other_interrupts += count;
            }
        }
        Ok(times)
    }

    /// The difference from `earlier`, as a table row's cells.
    fn since(&self, earlier: &CoreTimes) -> String {
        let seconds = self.at.duration_since(earlier.at).as_secs_f64().max(1e-3);
        let ticks = [
            self.user - earlier.user,
            self.system - earlier.system,
            self.interrupt_work - earlier.interrupt_work,
            self.steal - earlier.steal,
            self.idle - earlier.idle,
        ];
        let total = ticks.iter().sum::<u64>().max(1) as f64;
        let share = |n: u64| format!("{:.1}%", 100.0 * n as f64 / total);
        format!(
            "| {seconds:.0} | {} | {} | {} | {} | {} | {:.0} | {:.0} |",
            share(ticks[0]),
            share(ticks[1]),
            share(ticks[2]),
            share(ticks[3]),
            share(ticks[4]),
            (self.device_interrupts - earlier.device_interrupts) as f64 / seconds,
            (self.other_interrupts - earlier.other_interrupts) as f64 / seconds,
        )
    }
}

/// The region's core over each window.
fn core_table(windows: &[(&str, String)]) -> String {
    let mut table = format!(
        "CPU {REGION_CPU} (the region's core under `--pin`) over each window, from `/proc/stat` and \
         `/proc/interrupts`:\n\n\
         | window | s | user | system | irq + softirq | steal | idle | device interrupts /s | timer and IPIs /s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for (name, cells) in windows {
        table += &format!("| {name} {cells}\n");
    }
    table
}

/// `TOOL ARGS`, which must succeed.
fn run_tool(tool: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(tool).args(args).output().with_context(|| format!("run {tool}"))?;
    ensure!(output.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// While alive, CPU `cpu` is left to the region (and the threads later placed there on
/// purpose): every thread on the box that may move and is allowed on `cpu` is moved off it, and
/// the kernel's unbound work queues with them. Dropped, it puts back what it changed. Per-CPU
/// kernel threads (the CPU's softirq and work queue threads) cannot move and stay.
struct CoreForRegion {
    moved: Vec<(Pid, CpuSet)>,
    stayed: usize,
    workqueue_mask: Option<String>,
}

impl CoreForRegion {
    fn claim(cpu: usize, region_pid: u32) -> Result<CoreForRegion> {
        let mut core = CoreForRegion { moved: Vec::new(), stayed: 0, workqueue_mask: None };
        for process in std::fs::read_dir("/proc")? {
            let process = process?;
            let Ok(pid) = process.file_name().to_string_lossy().parse::<u32>() else { continue };
            if pid == region_pid {
                continue;
            }
            // A process that ends meanwhile has no task list left: nothing to move.
            let Ok(tasks) = std::fs::read_dir(process.path().join("task")) else { continue };
            for task in tasks.flatten() {
                let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() else { continue };
                core.move_off(Pid::from_raw(tid), cpu);
            }
        }
        if let Ok(mask) = std::fs::read_to_string(WORKQUEUE_CPUMASK) {
            let mask = mask.trim().to_owned();
            let old = u64::from_str_radix(&mask, 16).with_context(|| format!("{WORKQUEUE_CPUMASK}: {mask:?}"))?;
            let new = old & !(1 << cpu);
            if new != old && new != 0 {
                std::fs::write(WORKQUEUE_CPUMASK, format!("{new:x}"))
                    .with_context(|| format!("write {WORKQUEUE_CPUMASK}"))?;
                core.workqueue_mask = Some(mask);
            }
        }
        Ok(core)
    }

    /// Moves thread `tid` off `cpu` if it may run there and elsewhere too.
    fn move_off(&mut self, tid: Pid, cpu: usize) {
        let Ok(old) = nix::sched::sched_getaffinity(tid) else { return };
        if !old.is_set(cpu).unwrap_or(false) {
            return;
        }
        let mut new = old;
        if new.unset(cpu).is_err() || !(0..CpuSet::count()).any(|c| new.is_set(c).unwrap_or(false)) {
            self.stayed += 1;
            return;
        }
        match nix::sched::sched_setaffinity(tid, &new) {
            Ok(()) => self.moved.push((tid, old)),
            Err(_) => self.stayed += 1,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} other threads moved off CPU {REGION_CPU}, {} per-CPU ones left{}",
            self.moved.len(),
            self.stayed,
            if self.workqueue_mask.is_some() { ", unbound work queues off it" } else { "" }
        )
    }
}

impl Drop for CoreForRegion {
    fn drop(&mut self) {
        for (tid, old) in &self.moved {
            // A thread that ended meanwhile has nothing to put back.
            let _ = nix::sched::sched_setaffinity(*tid, old);
        }
        if let Some(mask) = &self.workqueue_mask {
            if let Err(e) = std::fs::write(WORKQUEUE_CPUMASK, mask) {
                eprintln!("bench_storm: could not put back {WORKQUEUE_CPUMASK} ({mask}): {e}");
            }
        }
    }
}
