//! `bench_pxe`: measures the rack's PXE services side by side with the standard servers on this
//! machine, in one run, and prints the figures and their ratios as a Markdown table
//! (`docs/PERFORMANCE.md`, section "PXE serving", holds a run's results and how to read them).
//!
//! 1. HTTP fan-out: 1, 16, 64 and 256 concurrent clients each loop `GET` of a 1 GiB snapshot
//!    file for a fixed time after a warm-up, page cache warm: aggregate throughput and p99 time to
//!    first byte, rackd's HTTP boot server against nginx (`sendfile on`) serving the same file (a
//!    hard link: same inode, same page-cache pages) at the same URL.
//! 2. Cold page cache: the file's pages are dropped (`POSIX_FADV_DONTNEED`, checked with
//!    `fincore`), 16 clients `GET` it once each, and a small request (`/ipxe/MAC`; nginx serves a
//!    file holding the same script at the same URL) starts every 10 ms on a new connection. Its
//!    latency shows whether page faults on the cold file stall the server's workers. The same
//!    again with the cache warm.
//! 3. TFTP: 64 clients each fetch a 30 MiB snapshot file, blksize 1468, windowsize 1 and 16,
//!    rackd against dnsmasq; every block is compared with the file; failed transfers are counted.
//! 4. DHCP: DISCOVER→OFFER→REQUEST→ACK for 2000 distinct MACs, 32 exchanges in flight, rackd
//!    (managed mode) against dnsmasq.
//!
//! Where: both want ports 67 and 69 and a bridge, so rackd (with the region it is registered
//! with) runs in one lab network namespace and dnsmasq in another, each with the bridge `br0`;
//! nginx runs beside rackd on that namespace's loopback. The clients are this program's own
//! (tokio, hyper, dhcproto), on threads that joined the namespaces ([`Lab::in_namespace`]).
//!
//! It builds nothing: `cargo build --release --workspace --bins && target/release/bench_pxe`;
//! `regiond`, `rackd` and `imgtool` are taken from the directory of this executable. It needs
//! root (network namespaces), nginx (`apt-get install nginx-light`) and dnsmasq (`apt-get install
//! dnsmasq-base`). Before each section it waits while another benchmark (`bench_sync`) runs.
//!
//! What it owns, and cleans up on success, error, panic and Ctrl-C/SIGTERM alike: one temp dir
//! under `--work-dir` (every file it writes), two network namespaces (`mrlab-*`, deleted when
//! their [`Lab`] is dropped), and every process it starts, each in its own process group so a
//! terminal's Ctrl-C reaches only this program, which then stops them: the harness's `Daemon`
//! sends the group SIGTERM, then SIGKILL, and reaps. Locals are declared labs first, then the
//! temp dir, then the daemons, so they drop in the right order. Every wait has a deadline and
//! every load loop is bounded in time.
//!
//! Code map: this file (options, the run's order, waiting for quiet), [`cancel`] (Ctrl-C and
//! SIGTERM), [`rack`] (region, push, rackd with PXE in the lab), [`peers`] (nginx, dnsmasq),
//! [`page_cache`], the clients and their cells [`http`] (1. and 2.), [`tftp`] (3.), [`dhcp`] (4.),
//! [`usage`] (servers' CPU time and faults), [`report`] (the tables). The region and rack are
//! the harness's (`metalrack_tests`), started inside the lab.

mod cancel;
mod dhcp;
mod http;
mod page_cache;
mod peers;
mod rack;
mod report;
mod tftp;
mod usage;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use metalrack_hardware::Lab;
use metalrack_tests::bench::{free_bytes, load_average};
use metalrack_tests::binaries::Binaries;
use metalrack_tests::data::write_random_file;
use metalrack_tests::lab::block_on_in;
use metalrack_tests::process::Spawn;
use metalrack_tests::region::{Region, ANY_PORT};

use cancel::{cancellable, check_cancelled, sleep_checked, wait_until, watch_signals};
use dhcp::dhcp_cell;
use http::{cold_cell, fetch_small, http_cell, Target};
use page_cache::{evict_file, resident_bytes, warm_file};
use peers::{Dnsmasq, Nginx};
use rack::{push, start_rack};
use report::{machine_facts, mib_per_s, Report};
use tftp::tftp_cell;

const MIB: u64 = 1 << 20;

/// The image both snapshot files belong to, and where they appear under `/images/` (HTTP) and
/// `images/` (TFTP) on the rack.
const IMAGE: &str = "bench/pxe";
const BIG_KIND: &str = "root-disk";
const TFTP_KIND: &str = "initrd";
const BIG_URL: &str = "/images/bench/pxe/amd64/1/root-disk";
const TFTP_PATH: &str = "images/bench/pxe/amd64/1/initrd";
/// The small request of the cold-cache test: an unknown MAC gets the enlistment script.
const PROBE_URL: &str = "/ipxe/52-54-00-aa-bb-01";

/// The rack's lab and the reference lab: `<prefix>.1/24` on `br0`. A second address, `.16.1/20`,
/// gives both DHCP servers a pool of 4081 addresses in a subnet of the interface: 2000 clients
/// fill it half, as a pool sized with room to spare would be.
const RACK_LAB: [u8; 3] = [10, 77, 0];
const REFERENCE_LAB: [u8; 3] = [10, 78, 0];

/// Heartbeats every 5 s (the default): the region plays no part in what is measured.
const REGION_CONFIG: &str = "rack_heartbeat_interval_ms = 5000\n";

/// rackd's HTTP boot port (MAAS' rack port) and nginx's, both inside the rack's lab.
const RACKD_HTTP_PORT: u16 = 5248;
const NGINX_PORT: u16 = 8080;

/// Threads of each client runtime: the machine's 2 cores, like rackd's 2 async workers and
/// nginx's 2 worker processes, so a server that spends less CPU per byte shows it as throughput.
const CLIENT_THREADS: usize = 2;

/// Streams and probe period of the cold-cache test.
const COLD_STREAMS: usize = 16;
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// Bound on the cold/warm runs (16 × 1 GiB once each) and on one TFTP cell.
const ONCE_DEADLINE: Duration = Duration::from_secs(300);

/// TFTP client: retransmit (the last ACK, or the RRQ) after this much silence; give up after
/// this many silences in a row.
const TFTP_SILENCE: Duration = Duration::from_secs(1);
const TFTP_SILENCES_MAX: u32 = 10;

/// DHCP client: each step is sent up to this many times, waiting this long for the reply.
const DHCP_TRIES: u32 = 4;
const DHCP_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// A client NAKed this many times in a row counts as failed.
const DHCP_NAKS_MAX: u32 = 5;

/// While another benchmark runs, look again this often, for at most this long.
const QUIET_POLL: Duration = Duration::from_secs(30);
const QUIET_WAIT_MAX: Duration = Duration::from_secs(20 * 60);
const OTHER_BENCHMARKS: [&str; 1] = ["bench_sync"];

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_pxe: {e:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    watch_signals();
    match run(&options) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_pxe: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
const USAGE: &str = "\
usage: bench_pxe [options]
  --work-dir DIR       where the temp work dir goes (default /tmp); needs about 5x --file-mib free
  --file-mib N         size of the HTTP test file in MiB (default 1024)
  --clients LIST       HTTP client counts (default 1,16,64,256)
  --seconds N          measured seconds per HTTP cell (default 10)
  --warmup N           warm-up seconds before each HTTP cell (default 2)
  --runs N             repetitions of each HTTP cell, interleaved; medians reported (default 3)
  --tftp-mib N         size of the TFTP test file in MiB (default 30)
  --tftp-clients N     concurrent TFTP transfers (default 64)
  --dhcp-clients N     distinct MACs for DHCP (default 2000)
  --dhcp-inflight N    DHCP exchanges in flight (default 32)
  --only LIST          sections to run, of http,cold,tftp,dhcp (default all)
  --no-wait            do not wait while another benchmark (bench_sync) runs
  --nginx-sendfile-max-chunk SIZE  a diagnostic, not the reference: nginx sends at most SIZE
                       (nginx syntax: 64k, 2m) per sendfile call and then serves the other
                       connections before it goes on, as rackd does in its turns (nginx 1.22's
                       default is 2m; the reference runs leave it)
Needs root, nginx (apt-get install nginx-light) and dnsmasq (apt-get install dnsmasq-base).
Build first: cargo build --release --workspace --bins";

#[derive(Debug, Clone)]
struct Options {
    work_dir: PathBuf,
    file_mib: u64,
    clients: Vec<usize>,
    seconds: u64,
    warmup: u64,
    runs: usize,
    tftp_mib: u64,
    tftp_clients: usize,
    dhcp_clients: usize,
    dhcp_inflight: usize,
    sections: Vec<String>,
    wait_quiet: bool,
    nginx_sendfile_max_chunk: Option<String>,
}

impl Options {
    /// `None` when only `--help` was asked for.
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>> {
        let mut options = Options {
            work_dir: PathBuf::from("/tmp"),
            file_mib: 1024,
            clients: vec![1, 16, 64, 256],
            seconds: 10,
            warmup: 2,
            runs: 3,
            tftp_mib: 30,
            tftp_clients: 64,
            dhcp_clients: 2000,
            dhcp_inflight: 32,
            sections: ["http", "cold", "tftp", "dhcp"].map(String::from).to_vec(),
            wait_quiet: true,
            nginx_sendfile_max_chunk: None,
        };
        let list = |text: String| -> Vec<String> { text.split(',').map(|s| s.trim().to_owned()).collect() };
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--work-dir" => options.work_dir = PathBuf::from(value()?),
                "--file-mib" => options.file_mib = value()?.parse().context("--file-mib")?,
                "--clients" => {
                    options.clients =
                        list(value()?).iter().map(|c| c.parse()).collect::<Result<_, _>>().context("--clients")?
                }
                "--seconds" => options.seconds = value()?.parse().context("--seconds")?,
                "--warmup" => options.warmup = value()?.parse().context("--warmup")?,
                "--runs" => options.runs = value()?.parse().context("--runs")?,
                "--tftp-mib" => options.tftp_mib = value()?.parse().context("--tftp-mib")?,
                "--tftp-clients" => options.tftp_clients = value()?.parse().context("--tftp-clients")?,
                "--dhcp-clients" => options.dhcp_clients = value()?.parse().context("--dhcp-clients")?,
                "--dhcp-inflight" => options.dhcp_inflight = value()?.parse().context("--dhcp-inflight")?,
                "--only" => options.sections = list(value()?),
                "--no-wait" => options.wait_quiet = false,
                "--nginx-sendfile-max-chunk" => {
                    let size = value()?;
                    let digits = size.trim_end_matches(['k', 'm']);
                    ensure!(
                        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
                        "--nginx-sendfile-max-chunk takes nginx's size syntax: 64k, 512k, 2m"
                    );
                    options.nginx_sendfile_max_chunk = Some(size);
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        for section in &options.sections {
            ensure!(["http", "cold", "tftp", "dhcp"].contains(&section.as_str()), "unknown section {section:?}");
        }
        ensure!(options.file_mib >= 16, "--file-mib must be at least 16");
        ensure!(options.tftp_mib >= 1, "--tftp-mib must be at least 1");
        ensure!(options.seconds >= 1 && options.runs >= 1, "--seconds and --runs must be at least 1");
        ensure!(
            !options.clients.is_empty() && options.clients.iter().all(|c| (1..=1000).contains(c)),
            "--clients: 1..=1000 each"
        );
        ensure!((1..=256).contains(&options.tftp_clients), "--tftp-clients: 1..=256 (rackd's sessions_max)");
        // The pools hold 4081 addresses; the lease tables 4096.
        ensure!((1..=2000).contains(&options.dhcp_clients), "--dhcp-clients: 1..=2000");
        ensure!((1..=256).contains(&options.dhcp_inflight), "--dhcp-inflight: 1..=256");
        Ok(Some(options))
    }

    fn runs(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }
}

fn note(message: &str) {
    eprintln!("bench_pxe: {message}");
}

// ---------------------------------------------------------------------------------------------
// The run. Everything it starts lives in locals of this function, declared so that they drop in
// reverse: daemons, then the temp dir, then the namespaces; any exit path cleans up.

fn run(options: &Options) -> Result<String> {
    // Every binary is there before anything starts.
    Binaries::locate()?;
    check_tools()?;
    ensure!(metalrack_hardware::have_root(), "bench_pxe needs root (network namespaces, ports 67 and 69)");
    let needed = 5 * options.file_mib * MIB;
    let free = free_bytes(&options.work_dir)?;
    ensure!(
        free >= needed,
        "{} has {} MiB free; a {} MiB file needs about {} MiB (try a smaller --file-mib or another --work-dir)",
        options.work_dir.display(),
        free / MIB,
        options.file_mib,
        needed / MIB
    );
    let mut report = Report { options: options.clone(), facts: machine_facts(), ..Report::default() };

    let rack_lab = Lab::new(RACK_LAB).context("creating the rack's lab namespace")?;
    let reference_lab = Lab::new(REFERENCE_LAB).context("creating the reference lab namespace")?;
    let work = tempfile::Builder::new()
        .prefix("bench-pxe.")
        .tempdir_in(&options.work_dir)
        .with_context(|| format!("cannot create a work dir in {}", options.work_dir.display()))?;
    let w = work.path();
    note(&format!(
        "work dir {}, namespaces {} (rackd, nginx) and {} (dnsmasq)",
        w.display(),
        rack_lab.name(),
        reference_lab.name()
    ));
    for (lab, prefix) in [(&rack_lab, RACK_LAB), (&reference_lab, REFERENCE_LAB)] {
        let address = format!("{}.{}.16.1/20", prefix[0], prefix[1]);
        let status =
            Command::new("ip").args(["-n", lab.name(), "addr", "add", &address, "dev", lab.bridge()]).status()?;
        ensure!(status.success(), "cannot add {address} to {} in {}", lab.bridge(), lab.name());
    }

    // The region, one admin, and the two files pushed as one image version.
    let region = Region::launch(&w.join("region"), REGION_CONFIG, ANY_PORT, &[], Spawn::in_lab(&rack_lab))?;
    let api_key = region.add_admin("bench", "bench password 1")?;
    let secret = region.shared_secret()?;
    note(&format!("writing the test files ({} MiB and {} MiB, pseudo-random)", options.file_mib, options.tftp_mib));
    let big_source = w.join("big.raw");
    let tftp_source = w.join("tftp.raw");
    write_random_file(&big_source, options.file_mib * MIB, 1, check_cancelled)?;
    write_random_file(&tftp_source, options.tftp_mib * MIB, 2, check_cancelled)?;
    note("pushing them to the region (imgtool push)");
    push(&rack_lab, &region, &api_key, &big_source, BIG_KIND)?;
    push(&rack_lab, &region, &api_key, &tftp_source, TFTP_KIND)?;
    std::fs::remove_file(&big_source)?;
    std::fs::remove_file(&tftp_source)?;

    // The rack: PXE on the lab's bridge, DHCP managed; it syncs both files at once (no snapshot).
    let mut rack = start_rack(&rack_lab, &region, &secret, w)?;
    let rack_group = rack.daemon.as_ref().context("rackd runs")?.pid();
    note("waiting for the rack to sync the files into its snapshot");
    let big_file = rack.snapshot_file(IMAGE, "1", BIG_KIND);
    let tftp_file = rack.snapshot_file(IMAGE, "1", TFTP_KIND);
    wait_until("the rack's snapshot to hold both files", Duration::from_secs(20 * 60), || {
        rack.daemon.as_mut().context("rackd runs")?.check_running()?;
        Ok(big_file.exists() && tftp_file.exists())
    })?;
    let http_addr = SocketAddr::from(([127, 0, 0, 1], RACKD_HTTP_PORT));
    let script = in_lab(&rack_lab, move || async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match fetch_small(http_addr, PROBE_URL).await {
                Ok((body, _)) => return Ok(body),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("rackd's HTTP boot server does not answer"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })?;
    ensure!(script.starts_with(b"#!ipxe"), "unexpected script from rackd: {:?}", String::from_utf8_lossy(&script));
    let big_len = std::fs::metadata(&big_file)?.len();
    ensure!(big_len == options.file_mib * MIB, "the rack's file is {big_len} bytes");

    // The reference servers, on the same bytes: nginx beside rackd, dnsmasq in its own lab.
    let nginx = Nginx::start(&rack_lab, w, &big_file, &script, options.nginx_sendfile_max_chunk.as_deref())?;
    let dnsmasq = Dnsmasq::start(&reference_lab, w, &tftp_file)?;
    // Let the rack finish what follows a sync (garbage collection, the report to the region).
    sleep_checked(Duration::from_secs(3))?;

    let rackd_target = Target { name: "rackd", addr: http_addr, group: rack_group };
    let nginx_target =
        Target { name: "nginx", addr: SocketAddr::from(([127, 0, 0, 1], NGINX_PORT)), group: nginx.daemon.pid() };

    if options.runs("http") {
        wait_quiet(options, &mut report)?;
        note("1. HTTP fan-out, page cache warm");
        warm_file(&big_file)?;
        for run in 0..options.runs {
            for &clients in &options.clients {
                // Alternate who goes first, so a drift in the machine's load hits both alike.
                let order = if run % 2 == 0 { [&rackd_target, &nginx_target] } else { [&nginx_target, &rackd_target] };
                for target in order {
                    check_cancelled()?;
                    note(&format!("   run {}/{}: {} with {clients} clients", run + 1, options.runs, target.name));
                    let sample = http_cell(&rack_lab, target, clients, options)?;
                    report.http.entry((target.name, clients)).or_default().push(sample);
                    report.check_disturbance();
                }
            }
        }
    }

    if options.runs("cold") {
        wait_quiet(options, &mut report)?;
        note("2. cold page cache: 16 streams once each, a small request every 10 ms");
        // What "cold" costs on this disk: one reader, the whole file, right after eviction.
        evict_file(&big_file)?;
        let started = Instant::now();
        warm_file(&big_file)?;
        report.cold_read_mib_s = Some(mib_per_s(big_len, started.elapsed()));
        for target in [&rackd_target, &nginx_target] {
            for cold in [true, false] {
                check_cancelled()?;
                note(&format!("   {} with the cache {}", target.name, if cold { "cold" } else { "warm" }));
                if cold {
                    evict_file(&big_file)?;
                } else {
                    warm_file(&big_file)?;
                }
                let resident = resident_bytes(&big_file)?;
                let mut cell = cold_cell(&rack_lab, target, COLD_STREAMS)?;
                cell.server = target.name;
                cell.cold = cold;
                cell.resident_before = resident;
                report.cold.push(cell);
                report.check_disturbance();
            }
        }
    }

    if options.runs("tftp") {
        wait_quiet(options, &mut report)?;
        note(&format!("3. TFTP: {} clients × {} MiB", options.tftp_clients, options.tftp_mib));
        let expected = Arc::new(std::fs::read(&tftp_file)?);
        let rack_server = SocketAddr::from((lab_gateway(RACK_LAB), 69));
        let reference_server = SocketAddr::from((lab_gateway(REFERENCE_LAB), 69));
        for window in [1u16, 16] {
            for (name, lab, server, group) in [
                ("rackd", &rack_lab, rack_server, rack_group),
                ("dnsmasq", &reference_lab, reference_server, dnsmasq.daemon.pid()),
            ] {
                check_cancelled()?;
                note(&format!("   {name}, windowsize {window}"));
                let mut cell = tftp_cell(lab, server, group, options.tftp_clients, window, expected.clone())?;
                cell.server = name;
                cell.window = window;
                report.tftp.push(cell);
                report.check_disturbance();
            }
        }
    }

    if options.runs("dhcp") {
        wait_quiet(options, &mut report)?;
        note(&format!("4. DHCP: {} MACs, {} exchanges in flight", options.dhcp_clients, options.dhcp_inflight));
        for (name, lab, group) in [("rackd", &rack_lab, rack_group), ("dnsmasq", &reference_lab, dnsmasq.daemon.pid())]
        {
            check_cancelled()?;
            note(&format!("   {name}"));
            let mut cell = dhcp_cell(lab, group, options.dhcp_clients, options.dhcp_inflight)?;
            cell.server = name;
            report.dhcp.push(cell);
            report.check_disturbance();
        }
    }
    report.load_after = load_average();

    // Orderly shutdown; on the error paths the same happens by drop.
    drop((dnsmasq, nginx, rack, region));
    let table = report.to_markdown();
    work.close().context("removing the work dir")?;
    drop((reference_lab, rack_lab));
    Ok(table)
}
/// Other benchmarks running now (`pid command`), this process excluded.
fn other_benchmarks() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // By program name (`comm`), so a `grep bench_sync` or an editor on its source is no benchmark.
        let Ok(name) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
        if OTHER_BENCHMARKS.contains(&name.trim()) {
            let raw = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let command = String::from_utf8_lossy(&raw).replace('\0', " ").trim().to_owned();
            found.push(format!("{pid} {command}"));
        }
    }
    found
}

/// Waits (polling every 30 s, at most 20 minutes) while another benchmark runs, so the two do
/// not disturb each other's numbers. Past the limit it goes on and the report says so.
fn wait_quiet(options: &Options, report: &mut Report) -> Result<()> {
    if !options.wait_quiet {
        return Ok(());
    }
    let start = Instant::now();
    loop {
        let others = other_benchmarks();
        if others.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= QUIET_WAIT_MAX {
            note(&format!("another benchmark still runs after {QUIET_WAIT_MAX:?}; measuring anyway"));
            report.disturbed.extend(others);
            return Ok(());
        }
        note(&format!("waiting for another benchmark to finish: {}", others.join("; ")));
        sleep_checked(QUIET_POLL)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Tools, processes, namespaces.

fn check_tools() -> Result<()> {
    for (program, arg, install) in [
        ("nginx", "-v", "apt-get install nginx-light"),
        ("dnsmasq", "--version", "apt-get install dnsmasq-base"),
        ("fincore", "--version", "apt-get install util-linux"),
        ("ip", "-V", "apt-get install iproute2"),
    ] {
        let present = Command::new(program)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ensure!(present, "{program} is not installed: {install}");
    }
    Ok(())
}

fn lab_gateway(prefix: [u8; 3]) -> Ipv4Addr {
    Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 1)
}

/// Runs `make()` to completion on a thread inside `lab`, on a tokio runtime of
/// [`CLIENT_THREADS`] workers (spawned from that thread, so they are inside too); stops early
/// with an error when the run is cancelled.
fn in_lab<T, F, Fut>(lab: &Lab, make: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    block_on_in(lab, Some(CLIENT_THREADS), move || cancellable(make()))?
}
