//! `bench_scale`: one region against a large site (issue 13, "At scale"): 1,000 simulated racks
//! (`metalrack_tests::scale`, each a `RackClient` from its own loopback address 127.1.x.y) that
//! register by challenge and proof, heartbeat at the interval the region asks for and hold a
//! catalogue and a power long-poll as `rackd` does, and 10,000 machines (manual power) added
//! through the API spread over the racks, booting at a fleet's rate. Measured:
//!
//! 1. registration of every rack (time, refusals) and adding the machines (rate), with no rack
//!    traffic, and then a batch of machines added while every rack holds its polls (each add
//!    wakes every rack's catalogue poll);
//! 2. the admin requests' p50/p99/max (`metalrack_tests::latency`) idle (the site's data in,
//!    no rack traffic) and loaded (every rack heartbeating and polling, boots going on);
//! 3. every rack Online through the loaded window (looked at each second);
//! 4. the whole machine list paged by 100 (every machine once) and its time;
//! 5. the region's CPU (utime + stime from `/proc/PID/stat`) and memory (VmRSS, VmHWM) over the
//!    loaded window, and this simulator's CPU, to tell a figure bound by the simulator from one
//!    bound by the region.
//!
//! Run: `cargo build --release -p metalrack-region --bin regiond && cargo build --release -p
//! metalrack-tests --bin bench_scale && target/release/bench_scale [--racks 1000] [--machines
//! 10000] [--window-s 60] [--boots-per-s 3]`. It starts one `regiond` (from the directory of
//! this executable) in a temp dir and kills it on any exit.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use metalrack_tests::bench::load_average;
use metalrack_tests::latency::{LatencyReport, SAMPLE_INTERVAL_DEFAULT};
use metalrack_tests::process::Spawn;
use metalrack_tests::region::ANY_PORT;
use metalrack_tests::scale::{
    add_machines, admin_sampler, machine_list_paged, machine_mac, rack_deep_offset, racks_not_online, register_racks,
    run_boots, run_racks, ui_session, FleetCounters, ProcessUsage,
};
use metalrack_tests::Region;

/// The region's defaults, written out: heartbeats every 5 s (1,000 racks send 200 a second),
/// offline after 30 s of silence.
const REGION_CONFIG: &str = "rack_heartbeat_interval_ms = 5000\nrack_offline_after_ms = 30000\n";

/// How long every rack may take to show Online once it heartbeats: one heartbeat interval
/// (the racks spread their first heartbeats over it) and margin.
const ONLINE_DEADLINE: Duration = Duration::from_secs(60);

/// The p99 the issue asks of the admin API under this load.
const ADMIN_P99_GOAL: Duration = Duration::from_millis(50);

/// File descriptors: the region holds a connection per heartbeat client and per poll (3 per
/// rack), and so does this process; both start from this process's limit.
const FILES_PER_RACK: u64 = 4;
const FILES_MARGIN: u64 = 1024;

/// The machines added while every rack holds its polls are added for at most this long: before
/// the fix each add cost every rack a catalogue answer, and 1,000 racks made it seconds an add.
const HERD_WINDOW: Duration = Duration::from_secs(30);

const PASSWORD: &str = "bench-scale-password";

const USAGE: &str = "\
usage: bench_scale [--racks N] [--machines N] [--window-s S] [--boots-per-s R] [--herd-machines N]
  --racks N          simulated racks (default 1000)
  --machines N       machines, spread over the racks (default 10000)
  --window-s S       seconds each latency window lasts (default 60)
  --boots-per-s R    machine boots a second while loaded (default 3: a rolling reboot of
                     10,000 machines in an hour is 2.8 a second)
  --herd-machines N  machines added while every rack holds its polls (default 100)
Build first: cargo build --release -p metalrack-region --bin regiond";

#[derive(Debug)]
struct Options {
    racks: usize,
    machines: usize,
    window: Duration,
    boots_per_s: f64,
    herd_machines: usize,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>> {
        let mut options = Options {
            racks: 1000,
            machines: 10_000,
            window: Duration::from_secs(60),
            boots_per_s: 3.0,
            herd_machines: 100,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--racks" => options.racks = value()?.parse().context("--racks")?,
                "--machines" => options.machines = value()?.parse().context("--machines")?,
                "--window-s" => options.window = Duration::from_secs(value()?.parse().context("--window-s")?),
                "--boots-per-s" => options.boots_per_s = value()?.parse().context("--boots-per-s")?,
                "--herd-machines" => options.herd_machines = value()?.parse().context("--herd-machines")?,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        ensure!(options.racks >= 1 && options.racks <= 60_000, "--racks must be 1 to 60000 (127.1.0.1 onwards)");
        ensure!(options.machines >= 200, "--machines must be at least 200 (two pages and a deep one)");
        ensure!(options.boots_per_s > 0.0, "--boots-per-s must be above 0");
        ensure!(options.herd_machines + 200 <= options.machines, "--herd-machines must leave at least 200 machines");
        Ok(Some(options))
    }
}

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_scale: {e:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // One thread for the whole simulated site: it leaves the other core to the region, and its
    // CPU time (reported) says when the simulator, not the region, is the bound.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let result = runtime.block_on(async {
        tokio::select! {
            result = run(&options) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    match result {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_scale: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises this process's open-file limit (inherited by the region) to what the site needs.
fn raise_file_limit(racks: usize) -> Result<String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let needed = racks as u64 * FILES_PER_RACK + FILES_MARGIN;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= needed {
        return Ok(format!("RLIMIT_NOFILE {soft} (enough for {needed})"));
    }
    ensure!(hard >= needed, "RLIMIT_NOFILE hard limit {hard} is below the {needed} this site needs");
    setrlimit(Resource::RLIMIT_NOFILE, needed, hard)?;
    Ok(format!("RLIMIT_NOFILE raised from {soft} to {needed}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// CPU used between two readings, as a share of one core over `wall`.
fn cpu_share(before: ProcessUsage, after: ProcessUsage, wall: Duration) -> f64 {
    (after.cpu - before.cpu).as_secs_f64() / wall.as_secs_f64() * 100.0
}

async fn run(options: &Options) -> Result<String> {
    let mut out = String::new();
    let files = raise_file_limit(options.racks)?;
    let dir = tempfile::tempdir()?;
    let region = Region::launch(&dir.path().join("region"), REGION_CONFIG, ANY_PORT, &[], Spawn::default())?;
    let pid = region.daemon.pid() as u32;
    let api_key = region.add_admin("admin", PASSWORD)?;
    let api = region.api(&api_key);
    let ui = ui_session(&region, "admin", PASSWORD).await?;
    eprintln!("bench_scale: region up at {}; {files}", region.url);

    // 1. The site's data, with no rack traffic yet.
    let started = Instant::now();
    let racks = register_racks(&region, options.racks).await?;
    let registration = started.elapsed();
    eprintln!("bench_scale: {} racks registered in {registration:.1?}", racks.len());
    let base_machines = options.machines - options.herd_machines;
    let started = Instant::now();
    let machine_ids = add_machines(&api, &racks, base_machines).await?;
    let adding = started.elapsed();
    eprintln!("bench_scale: {base_machines} machines added in {adding:.1?}");
    let deep_offset = (base_machines as u64 / 100 - 1) * 100;
    let sampler = admin_sampler(
        SAMPLE_INTERVAL_DEFAULT,
        &api,
        &ui,
        &region.https_url(),
        &machine_ids[0],
        deep_offset,
        rack_deep_offset(racks.len()),
    );

    // 2. Idle: the data in, no rack traffic.
    let region_before = ProcessUsage::of(pid)?;
    let idle = sampler.clone().run_for(options.window.min(Duration::from_secs(20))).await;
    let idle_usage = ProcessUsage::of(pid)?;
    eprintln!("bench_scale: idle\n{idle}");

    // The racks start: every one heartbeats and holds its two polls.
    let counters = Arc::new(FleetCounters::default());
    let rack_tasks = run_racks(&racks, &counters);
    let started = Instant::now();
    loop {
        let offline = racks_not_online(&api).await?;
        if offline.is_empty() {
            break;
        }
        ensure!(
            started.elapsed() < ONLINE_DEADLINE,
            "{} racks not Online after {ONLINE_DEADLINE:?}, e.g. {:?}; {}",
            offline.len(),
            &offline[..offline.len().min(5)],
            counters.summary()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let all_online = started.elapsed();
    eprintln!("bench_scale: every rack Online {all_online:.1?} after they started");
    // Wait until every rack holds its catalogue poll (its first answer is immediate).
    let started = Instant::now();
    while counters.catalogue_answers.load(Ordering::Relaxed) < racks.len() {
        ensure!(started.elapsed() < ONLINE_DEADLINE, "not every rack polls: {}", counters.summary());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 1b. Machines added while every rack holds its catalogue poll: each add wakes them all.
    let answers_before = counters.catalogue_answers.load(Ordering::Relaxed);
    let region_herd_before = ProcessUsage::of(pid)?;
    let started = Instant::now();
    let herd_ids = add_machines_from(&api, &racks, base_machines, options.herd_machines, HERD_WINDOW).await?;
    let herd = started.elapsed();
    let machines = base_machines + herd_ids.len();
    let herd_answers = counters.catalogue_answers.load(Ordering::Relaxed) - answers_before;
    let herd_cpu = cpu_share(region_herd_before, ProcessUsage::of(pid)?, herd);
    eprintln!(
        "bench_scale: {} machines added while polls are held in {herd:.1?}, {herd_answers} catalogue answers",
        herd_ids.len()
    );

    // 2b. Loaded: heartbeats, polls, boots; racks looked at each second.
    let boots = run_boots(&racks, machines, options.boots_per_s, &counters);
    let max_offline = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (api, max_offline) = (api.clone(), max_offline.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(offline) = racks_not_online(&api).await {
                    max_offline.fetch_max(offline.len(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let failures_before = counters.failures();
    let (region_loaded_before, own_before) = (ProcessUsage::of(pid)?, ProcessUsage::own()?);
    let started = Instant::now();
    let loaded = sampler.clone().run_for(options.window).await;
    let loaded_wall = started.elapsed();
    let (region_loaded, own_loaded) = (ProcessUsage::of(pid)?, ProcessUsage::own()?);
    watcher.abort();
    let failures_loaded = counters.failures() - failures_before;
    eprintln!("bench_scale: loaded\n{loaded}\n{}", counters.summary());

    // 4. The whole list, paged by 100, while the site runs.
    let started = Instant::now();
    let (hostnames, total) = machine_list_paged(&api, 100).await?;
    let paging = started.elapsed();
    ensure!(total == machines as u64, "the list's total is {total}, not {machines}");
    let mut sorted = hostnames.clone();
    sorted.sort();
    sorted.dedup();
    ensure!(
        hostnames.len() == machines && sorted.len() == machines,
        "paging gave {} hostnames, {} distinct, of {machines} machines",
        hostnames.len(),
        sorted.len()
    );
    let offline_at_end = racks_not_online(&api).await?;
    drop(boots);
    drop(rack_tasks);

    // The report.
    use std::fmt::Write;
    let n_racks = options.racks;
    writeln!(out, "\n## Scale: {n_racks} racks and {machines} machines against one region\n")?;
    writeln!(out, "Load average at the end: {} (2 cores). {files}.\n", load_average())?;
    writeln!(
        out,
        "Registration: {n_racks} racks in {:.1} s ({:.0}/s, 16 at once, none refused). Machines added with no rack \
         traffic: {base_machines} in {:.1} s ({:.0}/s, 8 at once). Every rack Online {:.1} s after they started.",
        registration.as_secs_f64(),
        n_racks as f64 / registration.as_secs_f64(),
        adding.as_secs_f64(),
        base_machines as f64 / adding.as_secs_f64(),
        all_online.as_secs_f64()
    )?;
    writeln!(
        out,
        "Machines added one at a time while every rack holds its catalogue poll: {} in {:.1} s ({:.1}/s); the \
         racks' polls were answered {herd_answers} times meanwhile; region CPU {herd_cpu:.0} % of a core.\n",
        herd_ids.len(),
        herd.as_secs_f64(),
        herd_ids.len() as f64 / herd.as_secs_f64()
    )?;
    writeln!(out, "{}", side_by_side(&idle, &loaded))?;
    writeln!(
        out,
        "Loaded window: {:.0} s, {} boots/s of {} events each; {}; failures in the window {failures_loaded}; \
         racks not Online at worst {} (at the end {}).\n",
        loaded_wall.as_secs_f64(),
        options.boots_per_s,
        metalrack_tests::scale::EVENTS_PER_BOOT,
        counters.summary(),
        max_offline.load(Ordering::Relaxed),
        offline_at_end.len()
    )?;
    writeln!(
        out,
        "| process | CPU idle (% of a core) | CPU loaded (% of a core) | RSS after (MiB) | peak RSS (MiB) |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    writeln!(
        out,
        "| regiond | {:.0} | {:.0} | {:.0} | {:.0} |",
        cpu_share(region_before, idle_usage, idle.window),
        cpu_share(region_loaded_before, region_loaded, loaded_wall),
        mib(region_loaded.rss_bytes),
        mib(region_loaded.peak_rss_bytes)
    )?;
    writeln!(
        out,
        "| bench_scale (the racks, the sampler) | | {:.0} | {:.0} | {:.0} |\n",
        cpu_share(own_before, own_loaded, loaded_wall),
        mib(own_loaded.rss_bytes),
        mib(own_loaded.peak_rss_bytes)
    )?;
    writeln!(
        out,
        "The whole list paged by 100: {} pages in {:.1} s ({:.1} ms a page), every machine once.",
        machines.div_ceil(100),
        paging.as_secs_f64(),
        paging.as_secs_f64() * 1000.0 / machines.div_ceil(100) as f64
    )?;
    let worst = loaded.worst_p99();
    writeln!(
        out,
        "Goal: admin p99 under {} ms loaded: {} (worst p99 {:.1} ms).",
        ADMIN_P99_GOAL.as_millis(),
        if worst < ADMIN_P99_GOAL { "met" } else { "NOT met" },
        worst.as_secs_f64() * 1000.0
    )?;
    ensure!(loaded.failures().is_empty(), "admin requests failed under load: {:?}\n{out}", loaded.failures());
    ensure!(offline_at_end.is_empty(), "racks not Online at the end: {:?}\n{out}", offline_at_end);
    Ok(out)
}

/// Adds `count` machines numbered from `first` (so they follow the ones added before), one at a
/// time, stopping early once `window` has passed.
async fn add_machines_from(
    api: &metalrack_tests::api::Api,
    racks: &[metalrack_tests::rack_client::RackClient],
    first: usize,
    count: usize,
    window: Duration,
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(count);
    let started = Instant::now();
    for i in first..first + count {
        if started.elapsed() > window {
            break;
        }
        let create = metalrack_api::machines::MachineCreate {
            hostname: format!("node{i:05}"),
            mac: machine_mac(i),
            power: metalrack_api::power::PowerParameters::Manual,
            rack: Some(racks[i % racks.len()].rack_id.clone()),
        };
        ids.push(api.add_machine(&create).await.with_context(|| format!("adding machine {i}"))?.id);
    }
    Ok(ids)
}

/// One table: each request's p50/p99/max idle and loaded.
fn side_by_side(idle: &LatencyReport, loaded: &LatencyReport) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut table = String::from(
        "| request | idle p50 (ms) | idle p99 (ms) | loaded p50 (ms) | loaded p99 (ms) | loaded max (ms) | samples idle/loaded | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (a, b) in idle.requests.iter().zip(&loaded.requests) {
        table.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{} | {} |\n",
            a.name,
            ms(a.p50),
            ms(a.p99),
            ms(b.p50),
            ms(b.p99),
            ms(b.max),
            a.count,
            b.count,
            a.errors + b.errors
        ));
    }
    table
}
