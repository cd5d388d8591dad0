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
//! terminal's Ctrl-C reaches only this program, which then stops them: [`Daemon`] sends the group
//! SIGTERM, then SIGKILL, and reaps. Locals are declared labs first, then the temp dir, then the
//! daemons, so they drop in the right order. Every wait has a deadline and every load loop is
//! bounded in time.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use dhcproto::v4::{Architecture, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use metalrack_hardware::Lab;
use metalrack_tests::bench::{exited, free_bytes, load_average, Binaries};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

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

/// Set by Ctrl-C or SIGTERM; every wait and every measurement checks it and returns an error,
/// so the run unwinds through its locals and cleans up.
static CANCELLED: AtomicBool = AtomicBool::new(false);

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

/// Turns Ctrl-C and SIGTERM into [`CANCELLED`] (instead of dying with everything still running).
fn watch_signals() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async {
            let Ok(mut terminate) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            eprintln!("bench_pxe: interrupted; stopping everything it started");
            CANCELLED.store(true, Ordering::SeqCst);
        });
    });
}

fn check_cancelled() -> Result<()> {
    ensure!(!CANCELLED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// `future`, or an error as soon as the run is cancelled.
async fn cancellable<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        result = future => result,
        _ = async {
            while !CANCELLED.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } => Err(anyhow!("interrupted")),
    }
}

/// Sleeps `duration` in short steps, returning early with an error if the run is cancelled.
fn sleep_checked(duration: Duration) -> Result<()> {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        check_cancelled()?;
        std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
    }
    check_cancelled()
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
    let binaries = Binaries::locate()?;
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
    let region = Region::start(&rack_lab, &binaries, &w.join("region"))?;
    note(&format!("writing the test files ({} MiB and {} MiB, pseudo-random)", options.file_mib, options.tftp_mib));
    let big_source = w.join("big.raw");
    let tftp_source = w.join("tftp.raw");
    write_random_file(&big_source, options.file_mib * MIB, 1)?;
    write_random_file(&tftp_source, options.tftp_mib * MIB, 2)?;
    note("pushing them to the region (imgtool push)");
    push(&rack_lab, &binaries, &region, &big_source, BIG_KIND)?;
    push(&rack_lab, &binaries, &region, &tftp_source, TFTP_KIND)?;
    std::fs::remove_file(&big_source)?;
    std::fs::remove_file(&tftp_source)?;

    // The rack: PXE on the lab's bridge, DHCP managed; it syncs both files at once (no snapshot).
    let mut rack = RackProcess::start(&rack_lab, &binaries, &region, w)?;
    note("waiting for the rack to sync the files into its snapshot");
    let big_file = rack.snapshot_file(BIG_KIND);
    let tftp_file = rack.snapshot_file(TFTP_KIND);
    wait_until("the rack's snapshot to hold both files", Duration::from_secs(20 * 60), || {
        rack.daemon.check_running()?;
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
    let nginx = Nginx::start(&rack_lab, w, &big_file, &script)?;
    let dnsmasq = Dnsmasq::start(&reference_lab, w, &tftp_file)?;
    // Let the rack finish what follows a sync (garbage collection, the report to the region).
    sleep_checked(Duration::from_secs(3))?;

    let rackd_target = Target { name: "rackd", addr: http_addr, group: rack.daemon.pid() };
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
                ("rackd", &rack_lab, rack_server, rack.daemon.pid()),
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
        for (name, lab, group) in
            [("rackd", &rack_lab, rack.daemon.pid()), ("dnsmasq", &reference_lab, dnsmasq.daemon.pid())]
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

/// Polls `check` every 100 ms until it is true, fails, or `deadline` passes.
fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !check()? {
        check_cancelled()?;
        ensure!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
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
    lab.in_namespace(move || -> Result<T> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(CLIENT_THREADS)
            .enable_all()
            .build()
            .context("cannot start a tokio runtime")?;
        runtime.block_on(cancellable(make()))
    })
    .with_context(|| format!("cannot run inside network namespace {}", lab.name()))?
}

/// Runs a short-lived command inside `lab` to completion.
fn output_in(lab: &Lab, mut command: Command) -> Result<Output> {
    let shown = format!("{command:?}");
    let output = lab
        .in_namespace(move || command.stdin(Stdio::null()).output())
        .with_context(|| format!("cannot run inside network namespace {}", lab.name()))?
        .with_context(|| format!("cannot run {shown}"))?;
    ensure!(
        output.status.success(),
        "{shown} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output)
}

/// A long-running child in its own process group, stopped (group SIGTERM, then SIGKILL) and
/// reaped when dropped, so no exit path leaves it or its children (nginx's workers) running.
#[derive(Debug)]
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `command` inside `lab` with stdin closed, stderr (and stdout unless `piped`) to `log`.
    fn spawn_in(lab: &Lab, name: &str, mut command: Command, log: &Path, piped: bool) -> Result<Daemon> {
        let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        command.stdin(Stdio::null()).stderr(log_file.try_clone()?);
        command.stdout(if piped { Stdio::piped() } else { Stdio::from(log_file) });
        // Its own group: a Ctrl-C at the terminal reaches only bench_pxe, which stops it.
        command.process_group(0);
        let child = lab
            .in_namespace(move || command.spawn())
            .with_context(|| format!("cannot run inside network namespace {}", lab.name()))?
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon { name: name.to_owned(), child, log: log.to_owned() })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => exited(&self.name, status, &self.log),
            None => Ok(()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let group = Pid::from_raw(self.pid());
        let _ = killpg(group, Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (a worker that outlived its master, a stuck daemon).
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time and page faults of a process group, from `/proc/PID/stat` of its members.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    cpu_ticks: u64,
    minor_faults: u64,
    major_faults: u64,
}

impl Usage {
    fn of_group(group: i32) -> Usage {
        let mut usage = Usage::default();
        let Ok(entries) = std::fs::read_dir("/proc") else { return usage };
        for entry in entries.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            if let Some((member_group, member)) = Usage::parse(&stat) {
                if member_group == group as u64 {
                    usage.minor_faults += member.minor_faults;
                    usage.major_faults += member.major_faults;
                    usage.cpu_ticks += member.cpu_ticks;
                }
            }
        }
        usage
    }

    /// This process, all its threads.
    fn of_self() -> Usage {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        Usage::parse(&stat).map(|(_, usage)| usage).unwrap_or_default()
    }

    /// A `/proc/PID/stat` line: the process group and the usage.
    fn parse(stat: &str) -> Option<(u64, Usage)> {
        // Fields after the command name (which may hold spaces), from field 3 (state) on.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<u64> = rest.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
        (fields.len() > 12).then(|| {
            (fields[1], Usage { minor_faults: fields[6], major_faults: fields[8], cpu_ticks: fields[10] + fields[11] })
        })
    }

    fn since(self, before: Usage) -> Usage {
        Usage {
            cpu_ticks: self.cpu_ticks.saturating_sub(before.cpu_ticks),
            minor_faults: self.minor_faults.saturating_sub(before.minor_faults),
            major_faults: self.major_faults.saturating_sub(before.major_faults),
        }
    }

    fn cpu_seconds(self) -> f64 {
        self.cpu_ticks as f64 / clock_ticks_per_second()
    }
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

// ---------------------------------------------------------------------------------------------
// Region, rack and the reference servers.

struct Region {
    url: String,
    key: String,
    secret: String,
    _daemon: Daemon,
}

impl Region {
    fn start(lab: &Lab, binaries: &Binaries, data_dir: &Path) -> Result<Region> {
        std::fs::create_dir_all(data_dir)?;
        let config = data_dir.with_extension("toml");
        std::fs::write(&config, "rack_heartbeat_interval_ms = 5000\n")?;
        let mut command = Command::new(&binaries.regiond);
        command.arg("--data-dir").arg(data_dir).args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(&config);
        let mut daemon = Daemon::spawn_in(lab, "regiond", command, &data_dir.with_extension("log"), true)?;
        // Its first stdout line names the address; read it on a thread, with a deadline.
        let stdout = daemon.child.stdout.take().context("regiond's stdout is piped")?;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = receiver.recv_timeout(Duration::from_secs(30)).context("regiond printed no address within 30 s")?;
        daemon.check_running()?;
        let url = line
            .trim()
            .strip_prefix("regiond: listening on ")
            .with_context(|| format!("unexpected first line from regiond: {line:?}"))?
            .trim_end_matches('/')
            .to_owned();
        let regiond = |args: &[&str]| -> Result<String> {
            let output = Command::new(&binaries.regiond)
                .arg("--data-dir")
                .arg(data_dir)
                .args(args)
                .stdin(Stdio::null())
                .output()?;
            ensure!(output.status.success(), "regiond {args:?}: {}", String::from_utf8_lossy(&output.stderr).trim());
            Ok(String::from_utf8(output.stdout)?.trim().to_owned())
        };
        regiond(&["createadmin", "--username", "bench", "--password", "bench password 1", "--email", "b@example.com"])?;
        let key = regiond(&["apikey", "--username", "bench"])?.lines().next().context("no API key")?.to_owned();
        let secret = regiond(&["secret", "show"])?;
        Ok(Region { url, key, secret, _daemon: daemon })
    }
}

fn push(lab: &Lab, binaries: &Binaries, region: &Region, file: &Path, kind: &str) -> Result<()> {
    let mut command = Command::new(&binaries.imgtool);
    command.arg("push").arg(file).args(["--name", IMAGE, "--arch", "amd64", "--kind", kind, "--version", "1"]);
    command.args(["--url", &region.url, "--api-key", &region.key]);
    let output = output_in(lab, command)?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(text.contains("committed"), "imgtool push did not commit: {text}");
    Ok(())
}

struct RackProcess {
    dir: PathBuf,
    daemon: Daemon,
}

impl RackProcess {
    /// Registers the rack and starts `rackd serve` with PXE on the lab's bridge: HTTP boot on
    /// port 5248, TFTP on 69, DHCP managed with a pool of 4081 addresses; the rest defaults.
    fn start(lab: &Lab, binaries: &Binaries, region: &Region, work: &Path) -> Result<RackProcess> {
        let dir = work.join("rack");
        let mut register = Command::new(&binaries.rackd);
        register.arg("--data-dir").arg(&dir);
        register.args(["register", "--url", &region.url, "--secret", &region.secret, "--name", "bench"]);
        output_in(lab, register)?;
        let loaders = work.join("loaders");
        std::fs::create_dir_all(&loaders)?;
        // A stand-in loader: rackd only needs one to start, and nothing here boots.
        std::fs::write(loaders.join("undionly.kpxe"), vec![0x55u8; 70_000])?;
        let [a, b, _] = RACK_LAB;
        let config = dir.with_extension("toml");
        std::fs::write(
            &config,
            format!(
                "retry_backoff_max_ms = 400\n\
                 [pxe]\ninterface = \"{bridge}\"\naddress = \"{gateway}\"\nhttp_listen = \"0.0.0.0:{RACKD_HTTP_PORT}\"\n\
                 loaders_dir = \"{loaders}\"\n\
                 [pxe.tftp]\nlisten = \"0.0.0.0:69\"\n\
                 [pxe.dhcp]\nmode = \"managed\"\nsubnet_mask = \"255.255.240.0\"\n\
                 range_start = \"{a}.{b}.16.10\"\nrange_end = \"{a}.{b}.31.250\"\nrouter = \"{a}.{b}.16.1\"\n",
                bridge = lab.bridge(),
                gateway = lab.gateway(),
                loaders = loaders.display()
            ),
        )?;
        let mut command = Command::new(&binaries.rackd);
        command.arg("--data-dir").arg(&dir).args(["serve", "--config"]).arg(&config);
        let daemon = Daemon::spawn_in(lab, "rackd", command, &dir.with_extension("log"), false)?;
        Ok(RackProcess { dir, daemon })
    }

    fn snapshot_file(&self, kind: &str) -> PathBuf {
        self.dir.join("images/current").join(IMAGE).join("amd64/1").join(kind)
    }
}

struct Nginx {
    daemon: Daemon,
}

impl Nginx {
    /// nginx on 127.0.0.1:8080 in the rack's lab: the big file (hard link) and the probe script
    /// at the same URLs as rackd; a master and 2 workers (`worker_processes auto` on 2 cores),
    /// `sendfile on`, logs and temp paths in the work dir.
    fn start(lab: &Lab, work: &Path, big_file: &Path, script: &[u8]) -> Result<Nginx> {
        let root = work.join("www");
        let dir = work.join("nginx");
        let big = root.join(BIG_URL.trim_start_matches('/'));
        let probe = root.join(PROBE_URL.trim_start_matches('/'));
        for path in [&big, &probe] {
            std::fs::create_dir_all(path.parent().context("a parent")?)?;
        }
        std::fs::create_dir_all(&dir)?;
        // The same inode as rackd serves: same bytes, same page-cache pages.
        std::fs::hard_link(big_file, &big)?;
        std::fs::write(&probe, script)?;
        let d = dir.display();
        // `user root`: the snapshot files are the rack's (mode 0600); workers must read them.
        let text = format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\nuser root root;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000;\n\
             default_type application/octet-stream;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{ listen 127.0.0.1:{NGINX_PORT} backlog=1024; root {}; }}\n}}\n",
            root.display()
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, text)?;
        let mut command = Command::new("nginx");
        command.arg("-p").arg(&dir).arg("-c").arg(&conf).arg("-e").arg(dir.join("error.log"));
        let mut daemon = Daemon::spawn_in(lab, "nginx", command, &dir.join("stderr.log"), false)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], NGINX_PORT));
        let started = Instant::now();
        loop {
            daemon.check_running()?;
            let answer = in_lab(lab, move || async move { fetch_small(addr, PROBE_URL).await });
            if let Ok((body, _)) = answer {
                ensure!(body == script, "nginx serves something else at {PROBE_URL}");
                break;
            }
            ensure!(started.elapsed() < Duration::from_secs(10), "nginx did not answer within 10 s");
            sleep_checked(Duration::from_millis(100))?;
        }
        Ok(Nginx { daemon })
    }
}

struct Dnsmasq {
    daemon: Daemon,
}

impl Dnsmasq {
    /// dnsmasq in the reference lab: TFTP (the same file) and DHCP on its bridge with
    /// the same pool, lease time and lease limit as rackd; no DNS, no ping before an offer (rackd
    /// does not ping either), routine DHCP/TFTP logging off (rackd logs neither).
    fn start(lab: &Lab, work: &Path, tftp_file: &Path) -> Result<Dnsmasq> {
        let dir = work.join("dnsmasq");
        let root = dir.join("tftp");
        let file = root.join(TFTP_PATH);
        std::fs::create_dir_all(file.parent().context("a parent")?)?;
        // dnsmasq running as root serves only world-readable files, and the rack's are 0600: a
        // copy (the same bytes, warm in the page cache like the original) rather than a link.
        std::fs::copy(tftp_file, &file)?;
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        warm_file(&file)?;
        let [a, b, _] = REFERENCE_LAB;
        let mut command = Command::new("dnsmasq");
        command.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--log-facility=-",
            "--pid-file=",
            "--user=root",
            "--port=0",
        ]);
        command.arg(format!("--interface={}", lab.bridge()));
        command.args(["--enable-tftp", "--tftp-max=256", "--quiet-tftp"]);
        command.arg(format!("--tftp-root={}", root.display()));
        command.arg(format!("--dhcp-range={a}.{b}.16.10,{a}.{b}.31.250,255.255.240.0,1h"));
        command.arg(format!("--dhcp-option=option:router,{a}.{b}.16.1"));
        command.arg(format!("--dhcp-leasefile={}", dir.join("leases").display()));
        command.args(["--dhcp-lease-max=4096", "--dhcp-authoritative", "--no-ping", "--quiet-dhcp"]);
        command.arg("--dhcp-boot=undionly.kpxe");
        let log = dir.join("dnsmasq.log");
        let mut daemon = Daemon::spawn_in(lab, "dnsmasq", command, &log, false)?;
        wait_until("dnsmasq to start", Duration::from_secs(10), || {
            daemon.check_running()?;
            Ok(std::fs::read_to_string(&log).unwrap_or_default().contains("TFTP root is"))
        })?;
        Ok(Dnsmasq { daemon })
    }
}

// ---------------------------------------------------------------------------------------------
// Test data and the page cache.

/// Deterministic pseudo-random bytes (xorshift64), so files neither compress nor dedupe.
fn write_random_file(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buffer = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        check_cancelled()?;
        for word in buffer.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buffer.len() as u64) as usize;
        out.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// Reads the whole file, so its pages are in the page cache.
fn warm_file(path: &Path) -> Result<()> {
    let mut file = File::open(path)?;
    std::io::copy(&mut file, &mut std::io::sink())?;
    Ok(())
}

/// Drops the file's pages from the page cache (only this file's: the servers' binaries and the
/// rest of the machine stay warm, unlike `echo 3 > /proc/sys/vm/drop_caches`).
fn evict_file(path: &Path) -> Result<()> {
    let file = File::open(path)?;
    file.sync_all()?; // dirty pages cannot be dropped
    nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .with_context(|| format!("posix_fadvise(DONTNEED) on {}", path.display()))?;
    Ok(())
}

/// Bytes of the file in the page cache, as `fincore` reports them.
fn resident_bytes(path: &Path) -> Result<u64> {
    let output =
        Command::new("fincore").args(["--bytes", "--noheadings", "--raw", "--output", "RES"]).arg(path).output()?;
    ensure!(output.status.success(), "fincore: {}", String::from_utf8_lossy(&output.stderr).trim());
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim().parse().with_context(|| format!("unexpected fincore output {text:?}"))
}

// ---------------------------------------------------------------------------------------------
// HTTP load client: hyper's HTTP/1.1 connection, one per client, requests in a loop.

#[derive(Debug, Clone, Copy)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Process group of the server, for its CPU time and page faults.
    group: i32,
}

#[derive(Default)]
struct LoadShared {
    bytes: AtomicU64,
    completed: AtomicU64,
    ttfb: Mutex<Vec<Duration>>,
}

#[derive(Debug, Default, Clone)]
struct LoadResult {
    bytes: u64,
    completed: u64,
    elapsed: Duration,
    ttfb: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

type Connection = (http1::SendRequest<Empty<Bytes>>, http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>);

async fn connect(addr: SocketAddr) -> Result<Connection> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(http1::handshake(TokioIo::new(stream)).await?)
}

fn get(path: &str) -> Result<hyper::Request<Empty<Bytes>>> {
    Ok(hyper::Request::get(path).header(hyper::header::HOST, "bench").body(Empty::new())?)
}

/// One `GET` on a new connection; the whole body and the time from connecting to its end.
async fn fetch_small(addr: SocketAddr, path: &str) -> Result<(Bytes, Duration)> {
    let started = Instant::now();
    let (mut sender, connection) = connect(addr).await?;
    let request = async {
        let response = sender.send_request(get(path)?).await?;
        ensure!(response.status() == hyper::StatusCode::OK, "GET {path}: {}", response.status());
        Ok(response.into_body().collect().await?.to_bytes())
    };
    tokio::select! {
        body = request => Ok((body?, started.elapsed())),
        closed = connection => Err(anyhow!("connection closed before the response ({closed:?})")),
    }
}

/// A client: connects, then `GET`s `path` again and again (or once), reading and discarding
/// every body. TTFB runs from sending the request (from connecting, for a connection's first)
/// to the first body byte.
async fn client(addr: SocketAddr, path: Arc<str>, shared: Arc<LoadShared>, once: bool) -> Result<()> {
    let started = Instant::now();
    let (mut sender, connection) = connect(addr).await?;
    let requests = async {
        let mut request_started = started;
        loop {
            sender.ready().await?;
            let response = sender.send_request(get(&path)?).await?;
            ensure!(response.status() == hyper::StatusCode::OK, "GET {path}: {}", response.status());
            let expected: Option<u64> = response
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let mut body = response.into_body();
            let mut got = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    if got == 0 && !data.is_empty() {
                        shared.ttfb.lock().expect("lock").push(request_started.elapsed());
                    }
                    got += data.len() as u64;
                    shared.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            ensure!(expected.is_none_or(|len| len == got), "GET {path}: {got} bytes of {expected:?}");
            shared.completed.fetch_add(1, Ordering::Relaxed);
            if once {
                return Ok(());
            }
            request_started = Instant::now();
        }
    };
    tokio::select! {
        result = requests => result,
        closed = connection => Err(anyhow!("the server closed the connection ({closed:?})")),
    }
}

/// `clients` clients for `limit` (looping), or until each has fetched `path` once (`once`).
async fn http_load(addr: SocketAddr, path: &str, clients: usize, limit: Duration, once: bool) -> LoadResult {
    let shared = Arc::new(LoadShared::default());
    let path: Arc<str> = Arc::from(path);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let mut set = JoinSet::new();
    for _ in 0..clients {
        set.spawn(tokio::time::timeout_at(deadline, client(addr, path.clone(), shared.clone(), once)));
    }
    let mut result = LoadResult::default();
    let mut fail = |message: String| {
        result.errors += 1;
        result.first_error.get_or_insert(message);
    };
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => fail(format!("{e:#}")),
            // The end of the measured time: how every looping client stops.
            Ok(Err(_)) if !once => {}
            Ok(Err(_)) => fail(format!("not done within {limit:?}")),
            Err(e) => fail(e.to_string()),
        }
    }
    result.elapsed = started.elapsed();
    result.bytes = shared.bytes.load(Ordering::Relaxed);
    result.completed = shared.completed.load(Ordering::Relaxed);
    result.ttfb = std::mem::take(&mut *shared.ttfb.lock().expect("lock"));
    result
}

#[derive(Debug, Clone, Default)]
struct HttpSample {
    load: LoadResult,
    usage: Usage,
}

/// One cell: warm-up, then the measured time, with the server's CPU time over the latter.
fn http_cell(lab: &Lab, target: &Target, clients: usize, options: &Options) -> Result<HttpSample> {
    let Target { addr, group, .. } = *target;
    let (warmup, seconds) = (Duration::from_secs(options.warmup), Duration::from_secs(options.seconds));
    in_lab(lab, move || async move {
        if !warmup.is_zero() {
            let load = http_load(addr, BIG_URL, clients, warmup, false).await;
            if let Some(e) = load.first_error {
                bail!("warm-up with {clients} clients: {} errors, first: {e}", load.errors);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = Usage::of_group(group);
        let load = http_load(addr, BIG_URL, clients, seconds, false).await;
        let usage = Usage::of_group(group).since(before);
        Ok(HttpSample { load, usage })
    })
}

#[derive(Debug, Clone, Default)]
struct ColdCell {
    server: &'static str,
    cold: bool,
    resident_before: u64,
    streams: LoadResult,
    probes: Vec<Duration>,
    probes_failed: usize,
    usage: Usage,
}

/// 16 clients `GET` the big file once each while a probe `GET`s the small script every 10 ms,
/// each on a new connection (a fixed schedule, so a stalled server shows in every probe that
/// waits on it, not just one).
fn cold_cell(lab: &Lab, target: &Target, streams: usize) -> Result<ColdCell> {
    let Target { addr, group, .. } = *target;
    in_lab(lab, move || async move {
        let before = Usage::of_group(group);
        let stop = Arc::new(AtomicBool::new(false));
        let prober = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut probes = JoinSet::new();
                let mut tick = tokio::time::interval(PROBE_EVERY);
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    probes.spawn(tokio::time::timeout(Duration::from_secs(60), fetch_small(addr, PROBE_URL)));
                }
                let (mut latencies, mut failed) = (Vec::new(), 0);
                while let Some(joined) = probes.join_next().await {
                    match joined {
                        Ok(Ok(Ok((_, latency)))) => latencies.push(latency),
                        _ => failed += 1,
                    }
                }
                (latencies, failed)
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let load = http_load(addr, BIG_URL, streams, ONCE_DEADLINE, true).await;
        stop.store(true, Ordering::SeqCst);
        let (probes, probes_failed) = prober.await?;
        let usage = Usage::of_group(group).since(before);
        Ok(ColdCell { streams: load, probes, probes_failed, usage, ..ColdCell::default() })
    })
}

// ---------------------------------------------------------------------------------------------
// TFTP client (RFC 1350 with the RFC 2347/2348/7440 options): one socket per transfer, an ACK
// per window; every block is compared with the file.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Granted {
    blksize: usize,
    window: usize,
}

async fn tftp_fetch(server: SocketAddr, path: &str, blksize: u16, window: u16, expected: &[u8]) -> Result<Granted> {
    let socket = UdpSocket::bind("0.0.0.0:0").await?;
    let mut rrq = vec![0, 1];
    for part in [path, "octet", "blksize", &blksize.to_string(), "windowsize", &window.to_string()] {
        rrq.extend_from_slice(part.as_bytes());
        rrq.push(0);
    }
    socket.send_to(&rrq, server).await?;
    let mut buf = vec![0u8; 65_536];
    let mut granted = Granted { blksize: 512, window: 1 };
    let mut next_block: u16 = 1;
    let mut received = 0usize;
    let mut in_window = 0usize;
    let mut peer: Option<SocketAddr> = None;
    let mut silences = 0;
    // After a gap, one ACK says where to resume; more would only repeat it.
    let mut gap_reported = false;
    let ack = |block: u16| [0u8, 4, (block >> 8) as u8, block as u8];
    loop {
        let (n, from) = match tokio::time::timeout(TFTP_SILENCE, socket.recv_from(&mut buf)).await {
            Ok(received) => received?,
            Err(_) => {
                silences += 1;
                ensure!(silences <= TFTP_SILENCES_MAX, "no answer for {TFTP_SILENCES_MAX} s at block {next_block}");
                match peer {
                    Some(peer) => {
                        socket.send_to(&ack(next_block.wrapping_sub(1)), peer).await?;
                    }
                    None => {
                        socket.send_to(&rrq, server).await?;
                    }
                }
                in_window = 0;
                gap_reported = false;
                continue;
            }
        };
        if *peer.get_or_insert(from) != from {
            continue; // not our transfer's server port
        }
        silences = 0;
        let packet = &buf[..n];
        ensure!(n >= 4, "short packet ({n} bytes)");
        match u16::from_be_bytes([packet[0], packet[1]]) {
            5 => {
                let code = u16::from_be_bytes([packet[2], packet[3]]);
                bail!("error {code}: {}", String::from_utf8_lossy(&packet[4..n - 1]));
            }
            6 if received == 0 && next_block == 1 => {
                let fields: Vec<String> =
                    packet[2..].split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).to_ascii_lowercase()).collect();
                for pair in fields.chunks(2) {
                    if let [name, value] = pair {
                        match name.as_str() {
                            "blksize" => granted.blksize = value.parse().context("OACK blksize")?,
                            "windowsize" => granted.window = value.parse().context("OACK windowsize")?,
                            _ => {}
                        }
                    }
                }
                socket.send_to(&ack(0), from).await?;
            }
            3 => {
                let block = u16::from_be_bytes([packet[2], packet[3]]);
                let payload = &packet[4..];
                if block == next_block {
                    ensure!(payload.len() <= granted.blksize, "block {block} has {} bytes", payload.len());
                    let end = received + payload.len();
                    ensure!(
                        end <= expected.len() && expected[received..end] == *payload,
                        "block {block} differs from the file"
                    );
                    received = end;
                    in_window += 1;
                    gap_reported = false;
                    let last = payload.len() < granted.blksize;
                    if last || in_window == granted.window {
                        socket.send_to(&ack(block), from).await?;
                        in_window = 0;
                    }
                    next_block = next_block.wrapping_add(1);
                    if last {
                        ensure!(received == expected.len(), "{received} bytes of {}", expected.len());
                        return Ok(granted);
                    }
                } else if !gap_reported {
                    // Lost or reordered: acknowledge what we have; the server resends from there.
                    socket.send_to(&ack(next_block.wrapping_sub(1)), from).await?;
                    in_window = 0;
                    gap_reported = true;
                }
            }
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Default)]
struct TftpCell {
    server: &'static str,
    window: u16,
    bytes: u64,
    elapsed: Duration,
    transfers: usize,
    failed: usize,
    first_error: Option<String>,
    granted: Vec<Granted>,
    usage: Usage,
    /// This program's own CPU time over the cell: the clients' share of the 2 cores.
    client_usage: Usage,
}

fn tftp_cell(
    lab: &Lab,
    server: SocketAddr,
    group: i32,
    clients: usize,
    window: u16,
    expected: Arc<Vec<u8>>,
) -> Result<TftpCell> {
    in_lab(lab, move || async move {
        let before = Usage::of_group(group);
        let client_before = Usage::of_self();
        let started = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..clients {
            let expected = expected.clone();
            set.spawn(tokio::time::timeout(ONCE_DEADLINE, async move {
                tftp_fetch(server, TFTP_PATH, 1468, window, &expected).await
            }));
        }
        let mut cell = TftpCell { transfers: clients, ..TftpCell::default() };
        while let Some(joined) = set.join_next().await {
            let outcome = match joined {
                Ok(Ok(Ok(granted))) => Ok(granted),
                Ok(Ok(Err(e))) => Err(format!("{e:#}")),
                Ok(Err(_)) => Err(format!("not done within {ONCE_DEADLINE:?}")),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(granted) => {
                    cell.bytes += expected.len() as u64;
                    if !cell.granted.contains(&granted) {
                        cell.granted.push(granted);
                    }
                }
                Err(e) => {
                    cell.failed += 1;
                    cell.first_error.get_or_insert(e);
                }
            }
        }
        cell.elapsed = started.elapsed();
        cell.usage = Usage::of_group(group).since(before);
        cell.client_usage = Usage::of_self().since(client_before);
        Ok(cell)
    })
}

// ---------------------------------------------------------------------------------------------
// DHCP client: one socket on port 68 of the lab's bridge; replies are told apart by xid.

type Pending = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Message>>>>;

fn dhcp_socket(interface: &str) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    socket.bind_device(Some(interface.as_bytes()))?;
    socket.set_recv_buffer_size(4 << 20)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into()).context("binding 0.0.0.0:68")?;
    Ok(UdpSocket::from_std(socket.into())?)
}

/// A PXE BIOS client's DISCOVER or REQUEST, broadcast flag set (as firmware does).
fn dhcp_packet(mac: [u8; 6], xid: u32, kind: MessageType, chosen: Option<(Ipv4Addr, Ipv4Addr)>) -> Result<Vec<u8>> {
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut message = Message::new_with_id(xid, unspecified, unspecified, unspecified, unspecified, &mac);
    message.set_flags(Flags::default().set_broadcast());
    let opts = message.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()));
    opts.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(0)));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::BootfileName,
        OptionCode::TFTPServerName,
    ]));
    if let Some((address, server)) = chosen {
        opts.insert(DhcpOption::RequestedIpAddress(address));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    Ok(message.to_vec()?)
}

/// Broadcasts `packet` until a reply `wanted` arrives (at most [`DHCP_TRIES`] times).
async fn dhcp_ask(
    socket: &UdpSocket,
    packet: &[u8],
    replies: &mut mpsc::UnboundedReceiver<Message>,
    wanted: impl Fn(&Message) -> bool,
    what: &str,
) -> Result<Message> {
    for _ in 0..DHCP_TRIES {
        socket.send_to(packet, (Ipv4Addr::BROADCAST, 67)).await?;
        let deadline = tokio::time::Instant::now() + DHCP_REPLY_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, replies.recv()).await {
                Ok(Some(message)) if wanted(&message) => return Ok(message),
                Ok(Some(_)) => continue, // a late answer to an earlier step or try
                Ok(None) => bail!("the receiver stopped"),
                Err(_) => break,
            }
        }
    }
    bail!("no {what} after {DHCP_TRIES} tries")
}

fn kind_is(kinds: &'static [MessageType]) -> impl Fn(&Message) -> bool {
    move |message| message.opts().msg_type().is_some_and(|kind| kinds.contains(&kind))
}

/// One client's DISCOVER→OFFER→REQUEST→ACK. A NAK (the offered address went to another client
/// meanwhile) restarts it from DISCOVER with a new xid, as RFC 2131 has clients do; returns the
/// number of NAKs.
async fn dhcp_exchange(socket: &UdpSocket, pending: &Pending, index: usize) -> Result<u32> {
    let i = index as u32;
    // Locally administered, distinct by the last two bytes, scattered by the middle three (like
    // NICs of different makes: dnsmasq's first choice of address is a hash of the MAC, and
    // consecutive MACs in flight together would all be offered the same address).
    let scatter = (u64::from(i) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes();
    let mac = [0x02, scatter[0], scatter[1], scatter[2], (i >> 8) as u8, i as u8];
    let mut naks = 0;
    loop {
        let xid = 0x4d52_0000u32.wrapping_add(i.wrapping_mul(7919)).wrapping_add(naks << 24);
        let (sender, mut replies) = mpsc::unbounded_channel();
        pending.lock().expect("lock").insert(xid, sender);
        let result = async {
            let discover = dhcp_packet(mac, xid, MessageType::Discover, None)?;
            let offer = dhcp_ask(socket, &discover, &mut replies, kind_is(&[MessageType::Offer]), "OFFER").await?;
            let server = match offer.opts().get(OptionCode::ServerIdentifier) {
                Some(DhcpOption::ServerIdentifier(id)) => *id,
                _ => offer.siaddr(),
            };
            let request = dhcp_packet(mac, xid, MessageType::Request, Some((offer.yiaddr(), server)))?;
            let answer =
                dhcp_ask(socket, &request, &mut replies, kind_is(&[MessageType::Ack, MessageType::Nak]), "ACK").await?;
            if answer.opts().msg_type() == Some(MessageType::Nak) {
                return Ok(None);
            }
            ensure!(
                answer.yiaddr() == offer.yiaddr(),
                "ACK for {} after an OFFER of {}",
                answer.yiaddr(),
                offer.yiaddr()
            );
            Ok(Some(offer.yiaddr()))
        }
        .await;
        pending.lock().expect("lock").remove(&xid);
        match result? {
            Some(_) => return Ok(naks),
            None => {
                naks += 1;
                ensure!(naks < DHCP_NAKS_MAX, "{naks} NAKs in a row");
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct DhcpCell {
    server: &'static str,
    exchanges: usize,
    naks: u32,
    /// When each exchange ended, from the start: the rate early and late in the run.
    finished_at: Vec<Duration>,
    failed: usize,
    first_error: Option<String>,
    elapsed: Duration,
    latencies: Vec<Duration>,
    usage: Usage,
}

fn dhcp_cell(lab: &Lab, group: i32, clients: usize, inflight: usize) -> Result<DhcpCell> {
    let interface = lab.bridge().to_owned();
    in_lab(lab, move || async move {
        let socket = Arc::new(dhcp_socket(&interface)?);
        let pending: Pending = Arc::default();
        let receiver = {
            let (socket, pending) = (socket.clone(), pending.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1500];
                loop {
                    let Ok((n, _)) = socket.recv_from(&mut buf).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let Ok(message) = Message::decode(&mut Decoder::new(&buf[..n])) else { continue };
                    if message.opcode() == Opcode::BootReply {
                        if let Some(sender) = pending.lock().expect("lock").get(&message.xid()) {
                            let _ = sender.send(message);
                        }
                    }
                }
            })
        };
        let before = Usage::of_group(group);
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..inflight {
            let (socket, pending, next) = (socket.clone(), pending.clone(), next.clone());
            set.spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= clients {
                        return outcomes;
                    }
                    let began = Instant::now();
                    let outcome = dhcp_exchange(&socket, &pending, index)
                        .await
                        .map(|naks| (began.elapsed(), started.elapsed(), naks));
                    outcomes.push(outcome.map_err(|e| format!("{e:#}")));
                }
            });
        }
        let mut cell = DhcpCell { exchanges: clients, ..DhcpCell::default() };
        while let Some(joined) = set.join_next().await {
            for outcome in joined? {
                match outcome {
                    Ok((latency, finished_at, naks)) => {
                        cell.latencies.push(latency);
                        cell.finished_at.push(finished_at);
                        cell.naks += naks;
                    }
                    Err(e) => {
                        cell.failed += 1;
                        cell.first_error.get_or_insert(e);
                    }
                }
            }
        }
        cell.elapsed = started.elapsed();
        cell.usage = Usage::of_group(group).since(before);
        receiver.abort();
        Ok(cell)
    })
}

// ---------------------------------------------------------------------------------------------
// The report.

#[derive(Debug, Default)]
struct Report {
    options: Options,
    facts: Vec<(String, String)>,
    http: std::collections::BTreeMap<(&'static str, usize), Vec<HttpSample>>,
    cold: Vec<ColdCell>,
    /// One reader's throughput over the file just evicted from the page cache.
    cold_read_mib_s: Option<f64>,
    tftp: Vec<TftpCell>,
    dhcp: Vec<DhcpCell>,
    /// Other benchmarks that ran while this one measured (after waiting 20 minutes).
    disturbed: Vec<String>,
    /// Other benchmarks seen running right after a measurement.
    disturbed_after: Vec<String>,
    load_after: String,
}

impl Default for Options {
    fn default() -> Self {
        Options::parse(std::iter::empty()).ok().flatten().expect("defaults are valid")
    }
}

fn machine_facts() -> Vec<(String, String)> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        .and_then(|v| v.trim_end_matches(" kB").parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1 << 20) as f64))
        .unwrap_or_default();
    let version = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .map(|o| {
                let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
                String::from_utf8_lossy(&text).lines().next().unwrap_or_default().to_owned()
            })
            .unwrap_or_default()
    };
    vec![
        ("CPU".into(), format!("{cpu}, {cores} cores")),
        ("memory".into(), memory),
        ("kernel".into(), read("/proc/sys/kernel/osrelease").trim().to_owned()),
        ("nginx".into(), version("nginx", "-v")),
        ("dnsmasq".into(), version("dnsmasq", "--version")),
        ("load average at start".into(), load_average()),
    ]
}

fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "–".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("**{:.2}×**", a / b)
    } else {
        "–".into()
    }
}

impl Report {
    fn check_disturbance(&mut self) {
        for other in other_benchmarks() {
            if !self.disturbed_after.contains(&other) {
                note(&format!("another benchmark ran during the last measurement: {other}"));
                self.disturbed_after.push(other);
            }
        }
    }

    fn to_markdown(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(out, "### Machine\n");
        for (name, value) in &self.facts {
            let _ = writeln!(out, "- {name}: {value}");
        }
        let _ = writeln!(out, "- load average at end: {}", self.load_after);
        let mut others = self.disturbed.clone();
        others.extend(self.disturbed_after.iter().map(|o| format!("{o} (seen right after a measurement)")));
        if !others.is_empty() {
            let _ = writeln!(out, "- **disturbed**: another benchmark ran during this one: {}", others.join("; "));
        }
        if !self.http.is_empty() {
            self.http_table(&mut out);
        }
        if !self.cold.is_empty() {
            self.cold_table(&mut out);
        }
        if !self.tftp.is_empty() {
            self.tftp_table(&mut out);
        }
        if !self.dhcp.is_empty() {
            let _ = writeln!(
                out,
                "\n### DHCP: {} distinct MACs, DISCOVER→OFFER→REQUEST→ACK, {} exchanges in flight\n",
                o.dhcp_clients, o.dhcp_inflight
            );
            let _ = writeln!(
                out,
                "A NAK restarts the client from DISCOVER (new xid); the exchange counts once, when ACKed. \
                 Early/late: the rate over the first and the last quarter of the exchanges to finish.\n"
            );
            let _ = writeln!(
                out,
                "| server | exchanges/s | early / late exchanges/s | exchange p50 ms | p99 ms | NAKs (restarted) | \
                 failed | wall s | server CPU s | vs dnsmasq |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            let rate = |c: &DhcpCell| c.latencies.len() as f64 / c.elapsed.as_secs_f64().max(1e-9);
            let reference = self.dhcp.iter().find(|c| c.server == "dnsmasq").map(rate).unwrap_or(f64::NAN);
            for c in &self.dhcp {
                let mut done = c.finished_at.clone();
                done.sort();
                let quarter = done.len() / 4;
                let (early, late) = if quarter > 0 {
                    let span = |a: Duration, b: Duration| (b.saturating_sub(a)).as_secs_f64().max(1e-9);
                    (
                        quarter as f64 / span(Duration::ZERO, done[quarter - 1]),
                        quarter as f64 / span(done[done.len() - quarter - 1], done[done.len() - 1]),
                    )
                } else {
                    (f64::NAN, f64::NAN)
                };
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {:.0} / {:.0} | {} | {} | {} | {} of {}{} | {:.1} | {:.1} | {} |",
                    c.server,
                    rate(c),
                    early,
                    late,
                    ms(percentile(&c.latencies, 50.0)),
                    ms(percentile(&c.latencies, 99.0)),
                    c.naks,
                    c.failed,
                    c.exchanges,
                    c.first_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default(),
                    c.elapsed.as_secs_f64(),
                    c.usage.cpu_seconds(),
                    ratio(rate(c), reference)
                );
            }
        }
        out
    }

    fn http_table(&self, out: &mut String) {
        let o = &self.options;
        let _ = writeln!(
            out,
            "\n### HTTP fan-out: {} MiB file, loopback, page cache warm\n\n\
             Each cell: the clients loop `GET` of the whole file for {} s after a {} s warm-up; median of {} \
             interleaved runs (TTFB: every request of every run). TTFB: request sent (connect included for a \
             connection's first) → first body byte.\n",
            o.file_mib, o.seconds, o.warmup, o.runs
        );
        let _ = writeln!(
            out,
            "| clients | rackd MiB/s | nginx MiB/s | rackd ÷ nginx | rackd TTFB p50 / p99 ms | \
             nginx TTFB p50 / p99 ms | TTFB p99 rackd ÷ nginx (lower is better) | TTFB samples rackd / nginx | \
             server CPU s per GiB rackd / nginx | server minor faults per GiB rackd / nginx | errors rackd / nginx |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &clients in &o.clients {
            let samples = |server: &'static str| self.http.get(&(server, clients)).cloned().unwrap_or_default();
            let (r, n) = (samples("rackd"), samples("nginx"));
            let rate = |s: &[HttpSample]| median(s.iter().map(|s| mib_per_s(s.load.bytes, s.load.elapsed)).collect());
            let ttfb = |s: &[HttpSample], p: f64| {
                percentile(&s.iter().flat_map(|s| s.load.ttfb.clone()).collect::<Vec<_>>(), p)
            };
            let count = |s: &[HttpSample]| s.iter().map(|s| s.load.ttfb.len()).sum::<usize>();
            let per_gib = |s: &[HttpSample], value: fn(&Usage) -> f64| {
                median(
                    s.iter().map(|s| value(&s.usage) / (s.load.bytes as f64 / (1u64 << 30) as f64).max(1e-9)).collect(),
                )
            };
            let cpu = |s: &[HttpSample]| per_gib(s, |u| u.cpu_seconds());
            let faults = |s: &[HttpSample]| per_gib(s, |u| u.minor_faults as f64);
            let errors = |s: &[HttpSample]| {
                let n: usize = s.iter().map(|s| s.load.errors).sum();
                let first = s.iter().find_map(|s| s.load.first_error.clone());
                format!("{n}{}", first.map(|e| format!(" ({e})")).unwrap_or_default())
            };
            let (rr, nr) = (rate(&r), rate(&n));
            let (rt, nt) = (ttfb(&r, 99.0), ttfb(&n, 99.0));
            let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
            let _ = writeln!(
                out,
                "| {clients} | {rr:.0} | {nr:.0} | {} | {} / {} | {} / {} | {} | {} / {} | {:.2} / {:.2} | {:.0} / {:.0} | {} / {} |",
                ratio(rr, nr),
                ms(ttfb(&r, 50.0)),
                ms(rt),
                ms(ttfb(&n, 50.0)),
                ms(nt),
                ratio(secs(rt), secs(nt)).replace("**", ""),
                count(&r),
                count(&n),
                cpu(&r),
                cpu(&n),
                faults(&r),
                faults(&n),
                errors(&r),
                errors(&n)
            );
        }
    }

    fn cold_table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n### Cold page cache: {COLD_STREAMS} clients `GET` the {} MiB file once each; meanwhile `GET {PROBE_URL}` \
             starts every {} ms on a new connection\n\n\
             \"cold\": the file's pages dropped first (`POSIX_FADV_DONTNEED`); \"resident\" is what `fincore` saw just \
             before. Probe latency: connect → whole response. One reader alone reads the evicted file at \
             {:.0} MiB/s on this machine.\n",
            self.options.file_mib,
            PROBE_EVERY.as_millis(),
            self.cold_read_mib_s.unwrap_or(f64::NAN)
        );
        let _ = writeln!(
            out,
            "| server | cache | resident before MiB | {COLD_STREAMS} streams done in s | MiB/s | probe p50 ms | probe p99 ms | \
             probe max ms | probes (failed) | server major faults | errors |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for c in &self.cold {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} | {:.0} | {} | {} | {} | {} ({}) | {} | {}{} |",
                c.server,
                if c.cold { "cold" } else { "warm" },
                c.resident_before / MIB,
                c.streams.elapsed.as_secs_f64(),
                mib_per_s(c.streams.bytes, c.streams.elapsed),
                ms(percentile(&c.probes, 50.0)),
                ms(percentile(&c.probes, 99.0)),
                ms(percentile(&c.probes, 100.0)),
                c.probes.len(),
                c.probes_failed,
                c.usage.major_faults,
                c.streams.errors,
                c.streams.first_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
            );
        }
        let p99 = |server: &str, cold: bool| {
            self.cold
                .iter()
                .find(|c| c.server == server && c.cold == cold)
                .and_then(|c| percentile(&c.probes, 99.0))
                .map_or(f64::NAN, |d| d.as_secs_f64())
        };
        let _ = writeln!(
            out,
            "\nProbe p99, cold ÷ warm: rackd {}, nginx {}.",
            ratio(p99("rackd", true), p99("rackd", false)),
            ratio(p99("nginx", true), p99("nginx", false))
        );
    }

    fn tftp_table(&self, out: &mut String) {
        let o = &self.options;
        let _ = writeln!(
            out,
            "\n### TFTP: {} clients each fetch a {} MiB file, blksize 1468 asked\n\n\
             Throughput: bytes of completed transfers ÷ time until the last one ended. Every block is compared \
             with the file. Granted: blksize/windowsize from the server's OACK. Client CPU: this program's, over \
             the cell (the 2 cores are shared by server and clients).\n",
            o.tftp_clients, o.tftp_mib
        );
        let _ = writeln!(
            out,
            "| windowsize asked | rackd MiB/s | dnsmasq MiB/s | rackd ÷ dnsmasq | granted rackd / dnsmasq | \
             failed transfers rackd / dnsmasq | wall s rackd / dnsmasq | server CPU s rackd / dnsmasq | \
             client CPU s rackd / dnsmasq |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---|---|---:|---:|---:|");
        for window in [1u16, 16] {
            let find = |server: &str| self.tftp.iter().find(|c| c.server == server && c.window == window);
            let (Some(r), Some(d)) = (find("rackd"), find("dnsmasq")) else { continue };
            let rate = |c: &TftpCell| mib_per_s(c.bytes, c.elapsed);
            let granted = |c: &TftpCell| {
                c.granted.iter().map(|g| format!("{}/{}", g.blksize, g.window)).collect::<Vec<_>>().join(",")
            };
            let failed = |c: &TftpCell| {
                format!(
                    "{} of {}{}",
                    c.failed,
                    c.transfers,
                    c.first_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                )
            };
            let _ = writeln!(
                out,
                "| {window} | {:.0} | {:.0} | {} | {} / {} | {} / {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} |",
                rate(r),
                rate(d),
                ratio(rate(r), rate(d)),
                granted(r),
                granted(d),
                failed(r),
                failed(d),
                r.elapsed.as_secs_f64(),
                d.elapsed.as_secs_f64(),
                r.usage.cpu_seconds(),
                d.usage.cpu_seconds(),
                r.client_usage.cpu_seconds(),
                d.client_usage.cpu_seconds()
            );
        }
    }
}
