//! `bench_sync`: measures Metalrack's image pipeline side by side with the standard tools on
//! this machine, in one run, and prints the figures and their ratios as a Markdown table
//! (`docs/PERFORMANCE.md` holds a run's results and how to read them).
//!
//! 1. Chunk + hash throughput: `imgtool chunk FILE -o M` against `b3sum FILE` (and `b3sum
//!    --num-threads 1`), page cache warm, median of `--runs`.
//! 2. Delta sync to a rack holding the previous version, for (a) 5% of the bytes changed in
//!    scattered 4 KiB blocks and (b) 1 MiB inserted at 100 MiB: bytes on the wire and wall time
//!    of the rack's sync (policy auto, delay 0) against `rsync --no-whole-file` pulling from an
//!    rsync daemon on loopback into a copy of the previous version.
//! 3. First sync: the rack's throughput (file bytes / its sync duration) against `curl` fetching
//!    the same file from nginx (`sendfile on`) on loopback.
//!
//! It builds nothing: `cargo build --release --workspace --bins && target/release/bench_sync
//! [--size-mib 2048] [--work-dir DIR] [--runs 3]`; `regiond`, `rackd` and `imgtool` are taken
//! from the directory of this executable.
//!
//! What it owns, and cleans up on success, error, panic and Ctrl-C alike: one temp dir under
//! `--work-dir` (every file it writes, the region's and the racks' data dirs included) and every
//! process it starts (one `regiond`, its `rackd`s, an rsync daemon, nginx, and the short-lived
//! tools). Daemons are guarded by [`Daemon`], which kills and reaps on drop; tools run with
//! `kill_on_drop`; the temp dir is a `TempDir` dropped last. Every wait has a deadline.
//!
//! It does not use the test harness's `Region`/`Rack`: `metalrack_tests::binary` looks for the
//! binaries two levels above the executable (right for tests in `target/PROFILE/deps/`), which
//! for this binary in `target/release/` is `target/`, where they are not.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use metalrack_api::images::{ImageView, SyncFigures, SyncPhase, SyncPolicy, SyncPolicyKind};
use metalrack_api::RackView;
use metalrack_tests::bench::{exited, free_bytes, load_average, Binaries};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The image every scenario pushes; versions differ per scenario and run.
const IMAGE: &str = "bench/raw";

/// Scenario (a): this fraction of the file's 4 KiB blocks is overwritten with new random bytes.
const SCATTERED_FRACTION: f64 = 0.05;
const SCATTERED_BLOCK: u64 = 4 * KIB;
/// Scenario (b): this many new bytes are inserted at `INSERT_AT` (or mid-file if smaller).
const INSERT_LEN: u64 = MIB;
const INSERT_AT: u64 = 100 * MIB;

/// How often waits look again. Short, because the wall time of a sync is read off these polls.
const POLL: Duration = Duration::from_millis(20);

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_sync: {e:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // One thread is enough to drive the children, and leaves the 2 cores to what is measured.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let result = runtime.block_on(async {
        tokio::select! {
            result = run(&options) => result,
            // Dropping `run` drops its daemons and temp dir: Ctrl-C leaves nothing behind.
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    match result {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_sync: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "\
usage: bench_sync [--size-mib N] [--work-dir DIR] [--runs N]
  --size-mib N   size of the test image in MiB (default 2048)
  --work-dir DIR where the temp work dir goes (default /tmp); needs about 9x the image size free
  --runs N       repetitions of each timed measurement; medians are reported (default 3)
Build first: cargo build --release --workspace --bins";

#[derive(Debug)]
struct Options {
    size_mib: u64,
    work_dir: PathBuf,
    runs: usize,
}

impl Options {
    /// `None` when only `--help` was asked for.
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>> {
        let mut options = Options { size_mib: 2048, work_dir: PathBuf::from("/tmp"), runs: 3 };
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--size-mib" => options.size_mib = value()?.parse().context("--size-mib")?,
                "--work-dir" => options.work_dir = PathBuf::from(value()?),
                "--runs" => options.runs = value()?.parse().context("--runs")?,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        // Below 16 MiB a file is a few hundred chunks and the figures say nothing.
        ensure!(options.size_mib >= 16, "--size-mib must be at least 16");
        ensure!(options.runs >= 1, "--runs must be at least 1");
        Ok(Some(options))
    }
}

// ---------------------------------------------------------------------------------------------
// The run: everything it starts lives in locals of this function, so leaving it by any path
// (return, `?`, panic, or being dropped on Ctrl-C) kills the processes and then removes the dir.

async fn run(options: &Options) -> Result<String> {
    let binaries = Binaries::locate()?;
    let http_kind = check_tools()?;
    let size = options.size_mib * MIB;
    let runs = options.runs;

    // Peak use: v1 + one v2 input, the region's store (v1 + a delta), the rack's v1 + v2 +
    // fetched chunks, a second rack during first-sync runs, rsync's copy and its temp file.
    let needed = 9 * size + GIB;
    let free = free_bytes(&options.work_dir)?;
    ensure!(
        free >= needed,
        "{} has {} MiB free; a {} MiB run needs about {} MiB (try a smaller --size-mib or another --work-dir)",
        options.work_dir.display(),
        free / MIB,
        options.size_mib,
        needed / MIB
    );
    let work = tempfile::Builder::new()
        .prefix("bench-sync.")
        .tempdir_in(&options.work_dir)
        .with_context(|| format!("cannot create a work dir in {}", options.work_dir.display()))?;
    let w = work.path();
    note(&format!("work dir {}, image {} MiB, {runs} runs", w.display(), options.size_mib));

    let machine = machine_summary(w, http_kind);
    let mut report = Report { size, runs, http_kind, machine, ..Report::default() };

    note("writing v1 (pseudo-random, incompressible)");
    let v1 = w.join("v1.raw");
    write_random_file(&v1, size, 1)?;
    let v1_hash = b3sum(&v1, None).await?.0;

    // 1. Chunk + hash throughput.
    note("1. imgtool chunk vs b3sum");
    report.chunking = measure_chunking(&binaries, &v1, &v1_hash, &w.join("v1.manifest"), runs).await?;

    // The region and one admin; the HTTP server serving v1 to curl.
    let region = Region::start(&binaries, &w.join("region")).await?;
    let api = region.api();
    let http = HttpServer::start(http_kind, w, &v1).await?;

    // 3. First sync (before the deltas: a delta needs a rack that has v1).
    note("3. first sync vs curl");
    settle().await?;
    let push_started = Instant::now();
    push(&binaries, &region, &api.key, &v1, "1").await?;
    report.push_v1_secs = push_started.elapsed().as_secs_f64();
    let mut rack = None;
    for run in 0..runs {
        let name = if run == 0 { "bench".to_owned() } else { format!("first-sync-{run}") };
        settle().await?;
        let mut candidate = RackProcess::start(&binaries, &region, &api, w, &name).await?;
        // Timed from `rackd serve`: a rack with no snapshot syncs as soon as it reads the catalogue.
        report.first_sync.push(wait_synced(&api, &candidate, &snapshot_file(&candidate, "1"), &v1_hash, size).await?);
        if run == 0 {
            rack = Some(candidate);
        } else {
            // Extra racks only give more samples; free their disk at once.
            candidate.daemon.take();
            std::fs::remove_dir_all(&candidate.dir).with_context(|| format!("removing {}", candidate.dir.display()))?;
        }
    }
    let rack = rack.expect("runs >= 1");
    for _ in 0..runs {
        settle().await?;
        report.curl_null.push(http.curl(None, size).await?);
        let out = w.join("curl.out");
        settle().await?;
        report.curl_file.push(http.curl(Some(&out), size).await?);
        std::fs::remove_file(&out)?;
    }

    // 2. Delta syncs.
    let scenarios = [
        Scenario {
            key: "a",
            title: format!(
                "{:.0}% of bytes changed in scattered {} KiB blocks",
                SCATTERED_FRACTION * 100.0,
                SCATTERED_BLOCK / KIB
            ),
            make: Edit::Scattered,
        },
        Scenario {
            key: "b",
            title: format!("{} MiB inserted at {} MiB", INSERT_LEN / MIB, insert_offset(size) / MIB),
            make: Edit::Insert,
        },
    ];
    let rsyncd = RsyncDaemon::start(w, &scenarios)?;
    for scenario in &scenarios {
        note(&format!("2{}. delta sync vs rsync: {}", scenario.key, scenario.title));
        let v2 = rsyncd.source_file(scenario.key);
        match scenario.make {
            Edit::Scattered => scatter_blocks(&v1, &v2, 2)?,
            Edit::Insert => insert_bytes(&v1, &v2, insert_offset(size), INSERT_LEN, 3)?,
        }
        let v2_hash = b3sum(&v2, None).await?.0;
        let mut samples = DeltaSamples { title: scenario.title.clone(), ..DeltaSamples::default() };
        for run in 0..runs {
            samples.rsync.push(rsyncd.pull(scenario.key, &v1, &v2_hash, run == 0).await?);
            let version = format!("{}-{}", scenario.key, run + 1);
            samples.rack.push(delta_sync(&binaries, &region, &api, &rack, &v2, &v2_hash, &version).await?);
            // Back to "the rack has v1 only" for the next run: the region drops the version and
            // its chunks, the rack drops the file.
            api.delete_version(&version).await?;
            wait_for("the rack to drop the deleted version", deadline_for(size), || async {
                let view = api.rack(&rack.name).await?;
                let sync = view.sync.unwrap_or_default();
                Ok((sync.phase == SyncPhase::Idle && sync.file_hashes == [v1_hash.clone()]).then_some(()))
            })
            .await?;
        }
        std::fs::remove_file(&v2)?;
        report.deltas.push(samples);
    }

    // Orderly shutdown; on the error paths the same happens by drop.
    drop((rsyncd, http, rack, region));
    report.load_at_end = load_average();
    let table = report.to_markdown();
    work.close().context("removing the work dir")?;
    Ok(table)
}

fn note(message: &str) {
    eprintln!("bench_sync: {message}");
}

/// Generous bound on any one sync of `size` bytes: 1 minute plus 10 s per 100 MiB (10 MiB/s),
/// far slower than anything seen, so only a hang trips it.
fn deadline_for(size: u64) -> Duration {
    Duration::from_secs(60 + size / (10 * MIB))
}

/// Bound on any one tool run (a push, a chunking, an rsync of the whole file): only a hang
/// trips it, even for images of tens of GiB on a loaded machine.
const TOOL_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// Polls `check` every [`POLL`] until it yields a value, fails, or `deadline` passes.
async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        ensure!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tools and processes.

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum HttpKind {
    #[default]
    Nginx,
    /// Only when nginx is not installed; much slower, and the table says so.
    PythonHttpServer,
}

/// Checks the reference tools are installed, naming the install command for any that is not.
fn check_tools() -> Result<HttpKind> {
    let present = |program: &str, arg: &str| {
        std::process::Command::new(program)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for (program, install) in
        [("b3sum", "cargo install b3sum"), ("rsync", "apt-get install rsync"), ("curl", "apt-get install curl")]
    {
        ensure!(present(program, "--version"), "{program} is not installed: {install}");
    }
    if present("nginx", "-v") {
        return Ok(HttpKind::Nginx);
    }
    note("nginx not found (apt-get install nginx-light); falling back to python3 -m http.server");
    ensure!(present("python3", "--version"), "neither nginx nor python3 is installed: apt-get install nginx-light");
    Ok(HttpKind::PythonHttpServer)
}

/// What the figures depend on: cores, memory, the work dir's filesystem, the tools' versions,
/// and the load when the run started.
fn machine_summary(work_dir: &Path, http_kind: HttpKind) -> String {
    let first_line = |program: &str, arg: &str| {
        let output = std::process::Command::new(program).arg(arg).output().ok();
        // nginx prints its version on stderr.
        let text =
            output.map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)));
        text.and_then(|t| t.lines().next().map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")))
            .unwrap_or_else(|| "?".into())
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix(" kB")?.parse::<u64>().ok())
        })
        .map_or(0.0, |kib| kib as f64 / (1 << 20) as f64);
    let df = std::process::Command::new("df").arg("--output=source,fstype").arg(work_dir).output();
    let filesystem = df
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "?".into());
    let server = match http_kind {
        HttpKind::Nginx => first_line("nginx", "-v"),
        HttpKind::PythonHttpServer => first_line("python3", "--version"),
    };
    format!(
        "Machine: {cores} cores, {memory_gib:.1} GiB RAM, work dir on {filesystem}; {}, {}, {}, {server}; load average at the start {}",
        first_line("b3sum", "--version"),
        first_line("rsync", "--version"),
        first_line("curl", "--version"),
        load_average()
    )
}

/// A port on 127.0.0.1 free right now. Daemons that cannot bind port 0 and report it get one of
/// these; the small race with other programs is checked by waiting for *our* daemon to answer.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts connections on 127.0.0.1:`port`, while `daemon` still runs.
async fn wait_listening(daemon: &mut Daemon, port: u16) -> Result<()> {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        daemon.check_running()?;
        ensure!(start.elapsed() < Duration::from_secs(10), "{} did not listen on port {port} within 10 s", daemon.name);
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// A long-running child, killed and reaped when dropped, so no exit path leaves it running.
#[derive(Debug)]
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `command` with stdin closed and stderr (and stdout unless already set) to `log`.
    fn spawn(name: &str, mut command: std::process::Command, log: &Path) -> Result<Daemon> {
        let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        command.stdin(Stdio::null()).stderr(log_file.try_clone()?);
        let child = command.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon { name: name.to_owned(), child, log: log.to_owned() })
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a short-lived tool to completion; it is killed if the run is abandoned (Ctrl-C).
async fn run_tool(program: &Path, args: &[OsString]) -> Result<(std::process::Output, Duration)> {
    let started = Instant::now();
    let output = tokio::process::Command::new(program).args(args).stdin(Stdio::null()).kill_on_drop(true).output();
    let output = tokio::time::timeout(TOOL_DEADLINE, output)
        .await
        .with_context(|| format!("{} did not finish within {TOOL_DEADLINE:?}", program.display()))?
        .with_context(|| format!("cannot run {}", program.display()))?;
    let elapsed = started.elapsed();
    ensure!(
        output.status.success(),
        "{} {:?} failed ({}): {}",
        program.display(),
        args,
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok((output, elapsed))
}

/// Flushes dirty pages (`sync`) before a timed step, so that writeback of files just written
/// (a fresh copy of v1, a pushed image) does not land in the middle of the measurement.
async fn settle() -> Result<()> {
    run_tool(Path::new("sync"), &[]).await.map(|_| ())
}

/// `b3sum FILE`: the file's BLAKE3 hex hash, and how long it took.
async fn b3sum(file: &Path, threads: Option<u32>) -> Result<(String, Duration)> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some(n) = threads {
        args.extend(["--num-threads".into(), n.to_string().into()]);
    }
    args.push(file.into());
    let (output, elapsed) = run_tool(Path::new("b3sum"), &args).await?;
    let text = String::from_utf8(output.stdout)?;
    let hash = text.split_whitespace().next().context("b3sum printed nothing")?.to_owned();
    Ok((hash, elapsed))
}

// ---------------------------------------------------------------------------------------------
// Test data: deterministic pseudo-random bytes, so files neither compress nor dedupe by accident
// and every run measures the same content.

/// xorshift64*: fast (the files are gigabytes) and good enough to look incompressible.
struct Random(u64);

impl Random {
    fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        for word in buffer.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
    }
}

fn write_random_file(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut random = Random::new(seed);
    let mut out = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut buffer = vec![0u8; 4 * MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(buffer.len() as u64) as usize;
        random.fill(&mut buffer[..n]);
        out.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Scenario (a): `v1` with a random 5% of its aligned 4 KiB blocks replaced by new bytes.
fn scatter_blocks(v1: &Path, out: &Path, seed: u64) -> Result<()> {
    std::fs::copy(v1, out).with_context(|| format!("copying {} to {}", v1.display(), out.display()))?;
    let n_blocks = std::fs::metadata(v1)?.len() / SCATTERED_BLOCK;
    let n_changed = (n_blocks as f64 * SCATTERED_FRACTION).ceil() as u64;
    // A partial Fisher–Yates shuffle picks distinct blocks, spread uniformly over the file.
    let mut random = Random::new(seed);
    let mut blocks: Vec<u64> = (0..n_blocks).collect();
    for i in 0..n_changed {
        let j = i + random.next_u64() % (n_blocks - i);
        blocks.swap(i as usize, j as usize);
    }
    let mut changed = blocks[..n_changed as usize].to_vec();
    changed.sort_unstable();
    let file = std::fs::OpenOptions::new().write(true).open(out)?;
    let mut block = vec![0u8; SCATTERED_BLOCK as usize];
    for index in changed {
        random.fill(&mut block);
        file.write_all_at(&block, index * SCATTERED_BLOCK)?;
    }
    Ok(())
}

/// Scenario (b): `v1` with `len` new bytes inserted at `at`.
fn insert_bytes(v1: &Path, out: &Path, at: u64, len: u64, seed: u64) -> Result<()> {
    let mut input = BufReader::with_capacity(4 * MIB as usize, File::open(v1)?);
    let mut output = BufWriter::with_capacity(4 * MIB as usize, File::create(out)?);
    std::io::copy(&mut (&mut input).take(at), &mut output)?;
    let mut inserted = vec![0u8; len as usize];
    Random::new(seed).fill(&mut inserted);
    output.write_all(&inserted)?;
    std::io::copy(&mut input, &mut output)?;
    output.flush()?;
    Ok(())
}

/// Where (b) inserts: at 100 MiB, or mid-file in files too small for that.
fn insert_offset(size: u64) -> u64 {
    if size > 2 * INSERT_AT {
        INSERT_AT
    } else {
        size / 2
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Chunking.

#[derive(Debug, Default)]
struct ChunkingSamples {
    imgtool: Vec<Duration>,
    b3sum: Vec<Duration>,
    b3sum_one_thread: Vec<Duration>,
    n_chunks: u64,
}

async fn measure_chunking(
    binaries: &Binaries,
    file: &Path,
    file_hash: &str,
    manifest: &Path,
    runs: usize,
) -> Result<ChunkingSamples> {
    // Warm the page cache (the file was just written, but make it explicit), untimed.
    b3sum(file, None).await?;
    let mut samples = ChunkingSamples::default();
    let args: [OsString; 4] = ["chunk".into(), file.into(), "-o".into(), manifest.into()];
    // Interleaved, so a burst of load from the other user of the machine hits all three alike.
    for _ in 0..runs {
        settle().await?;
        let (output, elapsed) = run_tool(&binaries.imgtool, &args).await?;
        samples.imgtool.push(elapsed);
        // "M: N chunks, B bytes (..), file hash H": the same BLAKE3 of the whole file as b3sum.
        let text = String::from_utf8_lossy(&output.stdout);
        ensure!(text.trim_end().ends_with(file_hash), "imgtool chunk's file hash differs from b3sum's: {text}");
        samples.n_chunks = text
            .split(": ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected imgtool chunk output {text:?}"))?;
        samples.b3sum.push(b3sum(file, None).await?.1);
        samples.b3sum_one_thread.push(b3sum(file, Some(1)).await?.1);
    }
    Ok(samples)
}

// ---------------------------------------------------------------------------------------------
// The region, its API, and the rack.

struct Region {
    url: String,
    key: String,
    secret: String,
    _daemon: Daemon,
}

impl Region {
    async fn start(binaries: &Binaries, data_dir: &Path) -> Result<Region> {
        std::fs::create_dir_all(data_dir)?;
        // Heartbeats every 200 ms, so the region's view of a rack's sync lags by at most that.
        let config = data_dir.with_extension("toml");
        std::fs::write(&config, "rack_heartbeat_interval_ms = 200\nrack_offline_after_ms = 30000\n")?;
        let mut command = std::process::Command::new(&binaries.regiond);
        command.arg("--data-dir").arg(data_dir).args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(&config);
        command.stdout(Stdio::piped());
        let mut daemon = Daemon::spawn("regiond", command, &data_dir.with_extension("log"))?;
        // Its first stdout line names the address it bound; read it off the runtime thread, with
        // a deadline (killing the daemon on drop closes the pipe and ends the blocked read).
        let stdout = daemon.child.stdout.take().expect("stdout is piped");
        let first_line = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await
        .context("regiond printed no address within 30 s")???;
        daemon.check_running()?;
        let url = first_line
            .trim()
            .strip_prefix("regiond: listening on ")
            .with_context(|| format!("unexpected first line from regiond: {first_line:?}"))?
            .trim_end_matches('/')
            .to_owned();
        let regiond = |args: &[&str]| -> Result<String> {
            let output = std::process::Command::new(&binaries.regiond)
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

    fn api(&self) -> Api {
        Api { http: reqwest::Client::new(), base: format!("{}/api/v1", self.url), key: self.key.clone() }
    }
}

/// The region's JSON API as the admin.
struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.bearer_auth(&self.key).send().await?;
        let status = response.status();
        ensure!(status.is_success(), "region API: {status}: {}", response.text().await.unwrap_or_default());
        Ok(response)
    }

    async fn rack(&self, name: &str) -> Result<RackView> {
        let racks: Vec<RackView> = self.send(self.http.get(format!("{}/racks", self.base))).await?.json().await?;
        racks.into_iter().find(|r| r.name == name).with_context(|| format!("rack {name} is not listed"))
    }

    async fn set_policy(&self, rack_id: &str, policy: &SyncPolicy) -> Result<()> {
        self.send(self.http.put(format!("{}/racks/{rack_id}/sync-policy", self.base)).json(policy)).await?;
        Ok(())
    }

    async fn image(&self) -> Result<ImageView> {
        let images: Vec<ImageView> = self.send(self.http.get(format!("{}/images", self.base))).await?.json().await?;
        images.into_iter().find(|i| i.name == IMAGE).with_context(|| format!("image {IMAGE} is not listed"))
    }

    async fn delete_version(&self, version: &str) -> Result<()> {
        let image = self.image().await?;
        self.send(self.http.delete(format!("{}/images/{}/versions/{version}", self.base, image.id))).await?;
        Ok(())
    }
}

/// `imgtool push FILE` as version `version` of [`IMAGE`]; returns when the region committed it.
async fn push(binaries: &Binaries, region: &Region, api_key: &str, file: &Path, version: &str) -> Result<()> {
    let mut args: Vec<OsString> = vec!["push".into(), file.into()];
    for (flag, value) in [
        ("--name", IMAGE),
        ("--arch", "amd64"),
        ("--kind", "root-disk"),
        ("--version", version),
        ("--url", &region.url),
        ("--api-key", api_key),
    ] {
        args.extend([flag.into(), value.into()]);
    }
    let (output, _) = run_tool(&binaries.imgtool, &args).await?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(text.contains("committed"), "imgtool push did not commit: {text}");
    Ok(())
}

/// A registered rack running `rackd serve`, policy auto with no delay.
struct RackProcess {
    name: String,
    dir: PathBuf,
    daemon: Option<Daemon>,
}

impl RackProcess {
    async fn start(binaries: &Binaries, region: &Region, api: &Api, root: &Path, name: &str) -> Result<RackProcess> {
        let dir = root.join(format!("rack-{name}"));
        let output = std::process::Command::new(&binaries.rackd)
            .arg("--data-dir")
            .arg(&dir)
            .args(["register", "--url", &region.url, "--secret", &region.secret, "--name", name])
            .stdin(Stdio::null())
            .output()?;
        ensure!(output.status.success(), "rackd register: {}", String::from_utf8_lossy(&output.stderr).trim());
        // Policy before `serve`, so the first catalogue the rack reads already says "now".
        let id = api.rack(name).await?.id;
        api.set_policy(&id, &SyncPolicy { policy: SyncPolicyKind::Auto, delay_ms: 0, ..SyncPolicy::default() }).await?;
        let config = dir.with_extension("toml");
        std::fs::write(&config, "retry_backoff_max_ms = 400\n")?;
        let mut command = std::process::Command::new(&binaries.rackd);
        command.arg("--data-dir").arg(&dir).args(["serve", "--config"]).arg(&config).stdout(Stdio::null());
        let daemon = Daemon::spawn(&format!("rackd {name}"), command, &dir.with_extension("log"))?;
        Ok(RackProcess { name: name.to_owned(), dir, daemon: Some(daemon) })
    }
}

/// Where the rack's current snapshot shows version `version` of [`IMAGE`].
fn snapshot_file(rack: &RackProcess, version: &str) -> PathBuf {
    rack.dir.join("images/current").join(IMAGE).join("amd64").join(version).join("root-disk")
}

#[derive(Debug, Clone, Default)]
struct SyncSample {
    figures: SyncFigures,
    /// From the event that made the sync due (push commit, or `rackd serve` for a new rack) to
    /// the file in the rack's published snapshot on its disk.
    wall_from_start: Duration,
    /// The same, to the region's API showing the file hash in the rack's snapshot (heartbeat lag).
    wall_to_api: Duration,
}

/// Waits for the rack to publish `file` with `file_hash`, timing from now; returns its figures.
async fn wait_synced(api: &Api, rack: &RackProcess, file: &Path, file_hash: &str, size: u64) -> Result<SyncSample> {
    let started = Instant::now();
    wait_for(&format!("rack {} to publish {}", rack.name, file.display()), deadline_for(size), || async {
        Ok(file.exists().then_some(()))
    })
    .await?;
    let on_disk = started.elapsed();
    let view = wait_for(&format!("the region to show {} synced", rack.name), Duration::from_secs(30), || async {
        let view = api.rack(&rack.name).await?;
        let sync = view.sync.clone().unwrap_or_default();
        if sync.phase == SyncPhase::Failed {
            bail!("rack {} sync failed: {}", rack.name, sync.message);
        }
        let synced = sync.phase == SyncPhase::Idle && sync.file_hashes.iter().any(|h| h == file_hash);
        Ok(synced.then_some(view))
    })
    .await?;
    let figures = view.sync.and_then(|s| s.last_sync).context("a synced rack reports its last sync")?;
    Ok(SyncSample { figures, wall_from_start: on_disk, wall_to_api: started.elapsed() })
}

#[derive(Debug, Clone, Default)]
struct RackDeltaSample {
    sync: SyncSample,
    /// Bytes the rack received and sent for the sync (manifest, chunk streams, requests).
    protocol_bytes: u64,
    push: Duration,
}

/// Pushes `v2` and times the rack's sync of it from the commit.
async fn delta_sync(
    binaries: &Binaries,
    region: &Region,
    api: &Api,
    rack: &RackProcess,
    v2: &Path,
    v2_hash: &str,
    version: &str,
) -> Result<RackDeltaSample> {
    let size = std::fs::metadata(v2)?.len();
    settle().await?;
    let started = Instant::now();
    push(binaries, region, &api.key, v2, version).await?;
    let push_time = started.elapsed();
    // `imgtool push` exits once the region answered the commit: the sync is due from here.
    let sync = wait_synced(api, rack, &snapshot_file(rack, version), v2_hash, size).await?;
    // What the rack measured crossing the network for this sync: the manifest (a delta against
    // v1's) and the chunk streams it received (frames and deltas), plus the requests it sent.
    // HTTP headers, heartbeats and long-polls (a few KB) are not counted.
    let protocol_bytes = sync.figures.bytes_received + sync.figures.bytes_sent;
    Ok(RackDeltaSample { sync, protocol_bytes, push: push_time })
}

// ---------------------------------------------------------------------------------------------
// The reference servers: nginx for curl, an rsync daemon for rsync.

struct HttpServer {
    port: u16,
    _daemon: Daemon,
}

impl HttpServer {
    /// Serves `file` as `/image.raw` from a private docroot on a free loopback port.
    async fn start(kind: HttpKind, work: &Path, file: &Path) -> Result<HttpServer> {
        let root = work.join("www");
        let dir = work.join("http");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&dir)?;
        // A hard link: the same bytes (and page-cache pages) as the rack syncs, no extra disk.
        std::fs::hard_link(file, root.join("image.raw"))?;
        let port = free_port()?;
        let command = match kind {
            HttpKind::Nginx => {
                let conf = dir.join("nginx.conf");
                let d = dir.display();
                // One process (no master) so that killing it stops everything; temp paths and
                // logs inside the work dir so nothing outside it is touched.
                let text = format!(
                    "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                     error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
                     http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
                     default_type application/octet-stream;\n\
                     client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                     fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                     server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
                    root.display()
                );
                std::fs::write(&conf, text)?;
                let mut command = std::process::Command::new("nginx");
                command.arg("-p").arg(&dir).arg("-c").arg(&conf).arg("-e").arg(dir.join("error.log"));
                command
            }
            HttpKind::PythonHttpServer => {
                let mut command = std::process::Command::new("python3");
                command.args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"]);
                command.arg(&root).stdout(Stdio::null());
                command
            }
        };
        let mut daemon = Daemon::spawn("http server", command, &dir.join("server.log"))?;
        wait_listening(&mut daemon, port).await?;
        Ok(HttpServer { port, _daemon: daemon })
    }

    /// `curl -o OUT` (or `-o /dev/null`) of the file; checks the size, returns the wall time.
    async fn curl(&self, out: Option<&Path>, size: u64) -> Result<Duration> {
        let url = format!("http://127.0.0.1:{}/image.raw", self.port);
        let out = out.map_or_else(|| PathBuf::from("/dev/null"), Path::to_owned);
        let args: [OsString; 7] = [
            "-sS".into(),
            "--fail".into(),
            "-o".into(),
            out.into(),
            "-w".into(),
            "%{size_download}".into(),
            url.into(),
        ];
        let (output, elapsed) = run_tool(Path::new("curl"), &args).await?;
        let got: u64 = String::from_utf8_lossy(&output.stdout).trim().parse().context("curl's size_download")?;
        ensure!(got == size, "curl fetched {got} bytes, expected {size}");
        Ok(elapsed)
    }
}

enum Edit {
    Scattered,
    Insert,
}

struct Scenario {
    key: &'static str,
    title: String,
    make: Edit,
}

#[derive(Debug, Clone, Default)]
struct RsyncSample {
    wall: Duration,
    bytes_sent: u64,
    bytes_received: u64,
    literal: u64,
}

/// `rsync --daemon` on a free loopback port with one read-only module per scenario, each dir
/// holding that scenario's v2 as `image.raw`.
struct RsyncDaemon {
    work: PathBuf,
    port: u16,
    _daemon: Daemon,
}

impl RsyncDaemon {
    fn start(work: &Path, scenarios: &[Scenario]) -> Result<RsyncDaemon> {
        let dir = work.join("rsyncd");
        std::fs::create_dir_all(&dir)?;
        // Running as root, the daemon would drop to `nobody`, who cannot read the 0700 temp
        // dir: stay root. No chroot: the module paths are plain dirs of ours.
        let mut conf = format!("use chroot = no\nuid = root\ngid = root\nlog file = {}/rsyncd.log\n", dir.display());
        for scenario in scenarios {
            let module = dir.join(format!("src-{}", scenario.key));
            std::fs::create_dir_all(&module)?;
            write!(conf, "[{}]\npath = {}\nread only = yes\n", scenario.key, module.display())?;
        }
        let conf_path = dir.join("rsyncd.conf");
        std::fs::write(&conf_path, conf)?;
        let port = free_port()?;
        let mut command = std::process::Command::new("rsync");
        command.arg("--daemon").arg("--no-detach").arg(format!("--config={}", conf_path.display()));
        command.args(["--address=127.0.0.1", &format!("--port={port}")]).stdout(Stdio::null());
        let mut daemon = Daemon::spawn("rsync daemon", command, &dir.join("daemon.log"))?;
        // Blocking wait is fine here: nothing else runs yet and it takes milliseconds.
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            daemon.check_running()?;
            ensure!(start.elapsed() < Duration::from_secs(10), "rsync daemon did not listen on {port}");
            std::thread::sleep(POLL);
        }
        Ok(RsyncDaemon { work: work.to_owned(), port, _daemon: daemon })
    }

    /// Where scenario `key`'s v2 must be written for the daemon to serve it.
    fn source_file(&self, key: &str) -> PathBuf {
        self.work.join("rsyncd").join(format!("src-{key}")).join("image.raw")
    }

    /// Puts a fresh copy of `v1` in place as `image.raw` (untimed) and pulls scenario `key`'s v2
    /// over it. `-I` so rsync never skips the file on size and time; `--no-whole-file` forces
    /// its delta algorithm; `--stats` reports the bytes that crossed the socket.
    async fn pull(&self, key: &str, v1: &Path, v2_hash: &str, check: bool) -> Result<RsyncSample> {
        let dest_dir = self.work.join("rsync-dest");
        std::fs::create_dir_all(&dest_dir)?;
        let dest = dest_dir.join("image.raw");
        std::fs::copy(v1, &dest)?;
        settle().await?;
        let source = format!("rsync://127.0.0.1:{}/{key}/image.raw", self.port);
        let args: [OsString; 5] =
            ["-I".into(), "--no-whole-file".into(), "--stats".into(), source.into(), (&dest).into()];
        let (output, wall) = run_tool(Path::new("rsync"), &args).await?;
        let stats = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| -> Result<u64> {
            let line =
                stats.lines().find_map(|l| l.strip_prefix(name)).with_context(|| format!("no {name:?} in {stats}"))?;
            let digits: String = line
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(|c| c.is_ascii_digit() || *c == ',')
                .filter(|c| *c != ',')
                .collect();
            digits.parse().with_context(|| format!("{name:?} in {stats}"))
        };
        let sample = RsyncSample {
            wall,
            bytes_sent: field("Total bytes sent:")?,
            bytes_received: field("Total bytes received:")?,
            literal: field("Literal data:")?,
        };
        if check {
            let (got, _) = b3sum(&dest, None).await?;
            ensure!(got == v2_hash, "rsync's result hashes to {got}, not v2's {v2_hash}");
        }
        std::fs::remove_file(&dest)?;
        Ok(sample)
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

#[derive(Debug, Default)]
struct DeltaSamples {
    title: String,
    rack: Vec<RackDeltaSample>,
    rsync: Vec<RsyncSample>,
}

#[derive(Debug, Default)]
struct Report {
    size: u64,
    runs: usize,
    http_kind: HttpKind,
    /// Cores, memory, filesystem, tool versions, load at the start.
    machine: String,
    load_at_end: String,
    chunking: ChunkingSamples,
    push_v1_secs: f64,
    first_sync: Vec<SyncSample>,
    curl_null: Vec<Duration>,
    curl_file: Vec<Duration>,
    deltas: Vec<DeltaSamples>,
}

fn median<T: Copy + PartialOrd>(values: impl IntoIterator<Item = T>) -> T {
    let mut values: Vec<T> = values.into_iter().collect();
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    values[values.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// MiB/s for `bytes` in `seconds`.
fn rate(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MIB as f64 / seconds
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
}

impl Report {
    fn to_markdown(&self) -> String {
        let mut out = String::new();
        self.write_markdown(&mut out).expect("writing to a String cannot fail");
        out
    }

    fn write_markdown(&self, out: &mut String) -> std::fmt::Result {
        let size = self.size;
        let c = &self.chunking;
        let (t_chunk, t_b3, t_b3_1) = (
            median(c.imgtool.iter().map(|d| secs(*d))),
            median(c.b3sum.iter().map(|d| secs(*d))),
            median(c.b3sum_one_thread.iter().map(|d| secs(*d))),
        );
        let server = match self.http_kind {
            HttpKind::Nginx => "nginx (sendfile on)",
            HttpKind::PythonHttpServer => "python3 -m http.server (nginx unavailable)",
        };
        writeln!(out, "\n## bench_sync: {} MiB image, medians of {} runs\n", size / MIB, self.runs)?;
        writeln!(out, "{}; load average at the end {}.\n", self.machine, self.load_at_end)?;
        writeln!(out, "Ratios are Metalrack / reference: for bytes and times below 1 is better, for throughput above 1 is better.\n")?;
        writeln!(out, "| # | Measurement | Metalrack | Reference | Ratio |")?;
        writeln!(out, "|---|---|---|---|---|")?;
        writeln!(
            out,
            "| 1 | chunk + hash, warm cache | `imgtool chunk`: {t_chunk:.2} s, {:.0} MiB/s ({} chunks) | `b3sum`: {t_b3:.2} s, {:.0} MiB/s | {:.2}× throughput |",
            rate(size, t_chunk), c.n_chunks, rate(size, t_b3), t_b3 / t_chunk
        )?;
        writeln!(
            out,
            "| 1 | same, b3sum on one thread | | `b3sum --num-threads 1`: {t_b3_1:.2} s, {:.0} MiB/s | {:.2}× throughput |",
            rate(size, t_b3_1), t_b3_1 / t_chunk
        )?;
        for (delta, key) in self.deltas.iter().zip(["2a", "2b"]) {
            let fetched = median(delta.rack.iter().map(|s| s.sync.figures.bytes_fetched));
            let protocol = median(delta.rack.iter().map(|s| s.protocol_bytes));
            let chunks = median(delta.rack.iter().map(|s| s.sync.figures.chunks_fetched));
            let reused = median(delta.rack.iter().map(|s| s.sync.figures.bytes_reused));
            let rsync_bytes = median(delta.rsync.iter().map(|s| s.bytes_sent + s.bytes_received));
            let literal = median(delta.rsync.iter().map(|s| s.literal));
            let duration = median(delta.rack.iter().map(|s| s.sync.figures.duration_ms)) as f64 / 1000.0;
            let wall = median(delta.rack.iter().map(|s| secs(s.sync.wall_from_start)));
            let wall_api = median(delta.rack.iter().map(|s| secs(s.sync.wall_to_api)));
            let rsync_wall = median(delta.rsync.iter().map(|s| secs(s.wall)));
            writeln!(
                out,
                "| {key} | {}: bytes on the wire | received + sent {} ({protocol} B: manifest delta, chunk deltas and frames, requests) for {} of new chunks ({fetched} B, {chunks} chunks; {} reused) | rsync sent + received {} ({rsync_bytes} B; literal data {}) | **{:.3}×** |",
                delta.title, mib(protocol), mib(fetched), mib(reused), mib(rsync_bytes), mib(literal),
                protocol as f64 / rsync_bytes as f64
            )?;
            writeln!(
                out,
                "| {key} | {}: wall time | `duration_ms` {duration:.2} s; commit → snapshot on rack disk {wall:.2} s (→ region API {wall_api:.2} s) | rsync {rsync_wall:.2} s | {:.2}× (commit → disk {:.2}×) |",
                delta.title, duration / rsync_wall, wall / rsync_wall
            )?;
        }
        let duration = median(self.first_sync.iter().map(|s| s.figures.duration_ms as f64 / 1000.0));
        let sync_rate = rate(size, duration);
        // The snapshot is published before the rack clears its fetched chunks; `duration_ms`
        // (and the region's view) include that clean-up, the file on disk does not.
        let published = median(self.first_sync.iter().map(|s| secs(s.wall_from_start)));
        let (t_null, t_file) =
            (median(self.curl_null.iter().map(|d| secs(*d))), median(self.curl_file.iter().map(|d| secs(*d))));
        writeln!(
            out,
            "| 3 | first sync | rack `duration_ms` {duration:.2} s, {sync_rate:.0} MiB/s (snapshot on disk after {published:.2} s, {:.0} MiB/s) | `curl -o /dev/null` from {server}: {t_null:.2} s, {:.0} MiB/s | {:.3}× throughput (to snapshot on disk {:.3}×) |",
            rate(size, published), rate(size, t_null), t_null / duration, t_null / published
        )?;
        writeln!(
            out,
            "| 3 | first sync, curl writing a file | | `curl -o FILE` (same disk, no fsync): {t_file:.2} s, {:.0} MiB/s | {:.3}× throughput |",
            rate(size, t_file), t_file / duration
        )?;

        writeln!(out, "\n### Samples\n")?;
        let list = |values: &[f64]| values.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(", ");
        let secs_of = |ds: &[Duration]| ds.iter().map(|d| secs(*d)).collect::<Vec<_>>();
        writeln!(
            out,
            "- imgtool chunk s: {}; b3sum s: {}; b3sum 1 thread s: {}",
            list(&secs_of(&c.imgtool)),
            list(&secs_of(&c.b3sum)),
            list(&secs_of(&c.b3sum_one_thread))
        )?;
        writeln!(out, "- push of v1 (chunk + upload of every chunk): {:.2} s", self.push_v1_secs)?;
        for s in &self.first_sync {
            let f = &s.figures;
            writeln!(
                out,
                "- first sync: duration_ms {}, {} chunks, {} B fetched; rackd start → snapshot on disk {:.2} s, → region API {:.2} s",
                f.duration_ms, f.chunks_fetched, f.bytes_fetched, secs(s.wall_from_start), secs(s.wall_to_api)
            )?;
        }
        writeln!(
            out,
            "- curl -o /dev/null s: {}; curl -o FILE s: {}",
            list(&secs_of(&self.curl_null)),
            list(&secs_of(&self.curl_file))
        )?;
        for (delta, key) in self.deltas.iter().zip(["2a", "2b"]) {
            for s in &delta.rack {
                let f = &s.sync.figures;
                writeln!(
                    out,
                    "- {key} rack: push {:.2} s; duration_ms {}; fetched {} B in {} chunks; reused {} B; on the wire {} B; commit → disk {:.2} s, → API {:.2} s",
                    secs(s.push), f.duration_ms, f.bytes_fetched, f.chunks_fetched, f.bytes_reused, s.protocol_bytes, secs(s.sync.wall_from_start), secs(s.sync.wall_to_api)
                )?;
            }
            for s in &delta.rsync {
                writeln!(
                    out,
                    "- {key} rsync: {:.2} s; sent {} B, received {} B, literal {} B",
                    secs(s.wall),
                    s.bytes_sent,
                    s.bytes_received,
                    s.literal
                )?;
            }
        }
        Ok(())
    }
}
