//! `bench_fleet`: per-machine deploy throughput over smoltcp from one rack, with N simulated
//! machines deploying a pseudo-random image (every byte fetched, nothing skipped) at once, and
//! the CPU it took: this process (the fleet: smoltcp stacks, verification, the read-back) and
//! rackd (DHCP/TFTP/HTTP), measured from the deploy request to the last Deployed.
//!
//! Run: `cargo build -p metalrack-tests --bin bench_fleet && target/debug/bench_fleet
//! --machines N --size-mib M` (root). Debug builds of the workspace compile dependencies with
//! opt-level 1; say which build a figure comes from.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use metalrack_api::machines::{DeployRequest, MachineState};
use metalrack_api::paths;
use metalrack_hardware::fleet::{FleetMachineSpec, SimPhase};
use metalrack_hardware::{Firmware, Lab};
use metalrack_tests::fleet_lab::FleetLab;

const IMAGE: &str = "bench/fleet";
const DEADLINE: Duration = Duration::from_secs(1800);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut machines = 1usize;
    let mut size_mib = 256u64;
    for pair in args.chunks(2) {
        match pair {
            [flag, value] if flag == "--machines" => machines = value.parse().expect("--machines N"),
            [flag, value] if flag == "--size-mib" => size_mib = value.parse().expect("--size-mib M"),
            _ => {
                eprintln!("usage: bench_fleet [--machines N] [--size-mib M]");
                return ExitCode::from(2);
            }
        }
    }
    let lab = Arc::new(Lab::new([10, 92, 0]).expect("a lab namespace (needs root)"));
    let tap = lab.add_tap().expect("a tap");
    let inside = lab.clone();
    let result =
        metalrack_tests::lab::block_on_in(
            &lab,
            None,
            move || async move { run(&inside, &tap, machines, size_mib).await },
        );
    match result.and_then(|inner| inner) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench_fleet: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|t| t.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|t| t.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

async fn run(lab: &Lab, tap: &str, n: usize, size_mib: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let size = size_mib << 20;
    let specs = (0..n)
        .map(|index| FleetMachineSpec {
            mac: format!("52:54:00:b0:{:02x}:{:02x}", index / 256, index % 256),
            firmware: if index % 2 == 0 { Firmware::Bios } else { Firmware::Uefi },
            disk_bytes: size + (64 << 20),
            hostname: format!("bench{index}"),
        })
        .collect();
    let site = FleetLab::start(lab, tap, dir.path(), specs).await?;
    let image = dir.path().join("image.raw");
    metalrack_tests::data::write_random_file(&image, size, 11, || Ok(()))?;
    site.push_image(&image, IMAGE, "1").await?;
    site.act_all(paths::MACHINE_COMMISSION, &serde_json::json!({})).await?;
    site.wait_all(MachineState::Ready, "commissioning", DEADLINE).await?;
    site.wait_fleet("every machine off", DEADLINE, |m| !m.power_on).await;

    let rackd = site.rack.daemon.as_ref().context("rackd runs")?.pid().to_string();
    let (fleet_cpu, rack_cpu) = (cpu_seconds("self"), cpu_seconds(&rackd));
    let started = Instant::now();
    let request = DeployRequest { image: IMAGE.into(), arch: "amd64".into(), version: Some("1".into()), disk: None };
    site.act_all(paths::MACHINE_DEPLOY, &request).await?;
    site.wait_all(MachineState::Deployed, "the deploys", DEADLINE).await?;
    let wall = started.elapsed();
    let (fleet_cpu, rack_cpu) = (cpu_seconds("self") - fleet_cpu, cpu_seconds(&rackd) - rack_cpu);
    let statuses =
        site.wait_fleet("every machine booted from disk", DEADLINE, |m| m.phase == SimPhase::BootedLocal).await;
    println!("bench_fleet: {n} machine(s), {size_mib} MiB pseudo-random image, MTU 1500, one rack");
    let mut rates = Vec::new();
    for machine in &statuses {
        let log = &machine.phase_log;
        let start = log.iter().rposition(|(phase, _)| *phase == SimPhase::Deploying).context("no deploy phase")?;
        let (_, at) = log[start];
        let end = log.get(start + 1).map_or(at, |(_, end)| *end);
        let seconds = (end - at).as_secs_f64();
        let rate = size as f64 / seconds / 1e6;
        rates.push(rate);
        println!(
            "  {} deploy phase {seconds:.1} s ({rate:.1} MB/s incl. manifest, verify, read-back), {} bytes over HTTP",
            machine.mac, machine.bytes_http
        );
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "  per machine MB/s: min {:.1} median {:.1} max {:.1}; aggregate {:.1} MB/s over {:.1} s (request → all Deployed)",
        rates[0],
        rates[rates.len() / 2],
        rates[rates.len() - 1],
        (n as u64 * size) as f64 / wall.as_secs_f64() / 1e6,
        wall.as_secs_f64()
    );
    println!(
        "  CPU during the deploys: fleet process {fleet_cpu:.1} s, rackd {rack_cpu:.1} s ({:.0}% and {:.0}% of one core); switch {:?}",
        fleet_cpu / wall.as_secs_f64() * 100.0,
        rack_cpu / wall.as_secs_f64() * 100.0,
        site.fleet.switch_counters()
    );
    println!("  load average {}", metalrack_tests::bench::load_average());
    Ok(())
}
