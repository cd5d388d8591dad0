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
//!    the same file from nginx (`sendfile on`) on loopback (to `/dev/null`, to a file, and to a
//!    file then flushed, as the rack flushes; beside the disk's own write speed), and its bytes
//!    on the wire against `zstd -3` of the whole file (chunks that compress travel compressed).
//!
//! `--debian full|small` measures instead the update of a real Debian image against casync,
//! rsync and zsync ([`realimg`]).
//!
//! `--input FILE` measures a given file (a real image, which compresses) instead of the
//! pseudo-random one; `--first-sync-only` skips 1. and 2.; `--push-only` measures only `imgtool
//! push` of a new image against `rsync -W` into an rsync daemon, and the push's memory ([`push`]).
//!
//! It builds nothing: `cargo build --release --workspace --bins && target/release/bench_sync
//! [--size-mib 2048] [--work-dir DIR] [--runs 3]`; `regiond`, `rackd` and `imgtool` are taken
//! from the directory of this executable.
//!
//! What it owns, and cleans up on success, error, panic and Ctrl-C alike: one temp dir under
//! `--work-dir` (every file it writes, the region's and the racks' data dirs included) and every
//! process it starts (one `regiond`, its `rackd`s, an rsync daemon, nginx, and the short-lived
//! tools). Daemons are the harness's `Daemon`s, which kill and reap on drop; tools run with
//! `kill_on_drop`; the temp dir is a `TempDir` dropped last. Every wait has a deadline.
//!
//! Code map: this file (options, the run's order), [`tools`] (the reference tools, timed runs),
//! [`edits`] (the test files and the two edits), [`chunking`] (1.), [`sync`] (pushes and the
//! rack's syncs, 2. and 3.), [`peers`] (nginx and the rsync daemon), [`report`] (the table).
//! The region and racks are the harness's (`metalrack_tests`), started as the tests start them.

mod chunking;
mod edits;
mod peers;
mod push;
mod realimg;
mod report;
mod sync;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use metalrack_tests::bench::{box_busy, free_bytes, load_average};
use metalrack_tests::binaries::Binaries;
use metalrack_tests::data::write_random_file;
use metalrack_tests::debian_image::Profile;
use metalrack_tests::process::Spawn;
use metalrack_tests::region::{Region, ANY_PORT};

use chunking::measure_chunking;
use edits::{insert_bytes, insert_offset, scatter_blocks, Edit, Scenario};
use peers::{HttpServer, RsyncDaemon};
use report::{DeltaSamples, Report};
use sync::{delta_sync, drop_version, push, start_rack, wait_synced};
use tools::{b3sum, check_tools, disk_write_time, fsync_file, machine_summary, settle};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Where `--debian` keeps the images it built: outside /tmp, as they take minutes to build.
const DEFAULT_IMAGE_CACHE: &str = "/var/tmp/metalrack-debian-images";

/// `--debian`'s bound on one casync or zsync run: 4x the slowest seen on the 2 GiB images
/// (casync, 71 s under load), so only a peer stuck in a pathological case (zsync on the small
/// images' zero blocks ran past 11 minutes) is cut, and the run still ends in reasonable time.
const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(300);

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

/// Heartbeats every 200 ms, so the region's view of a rack's sync lags by at most that.
const REGION_CONFIG: &str = "rack_heartbeat_interval_ms = 200\nrack_offline_after_ms = 30000\n";

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
            result = async {
                match &options.debian {
                    Some(debian) => realimg::run(debian).await,
                    None => run(&options).await,
                }
            } => result,
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
usage: bench_sync [--size-mib N] [--input FILE] [--first-sync-only] [--work-dir DIR] [--runs N]
  --size-mib N   size of the test image in MiB (default 2048)
  --input FILE   measure a copy of FILE instead of a pseudo-random image (--size-mib ignored)
  --first-sync-only  skip 1. (chunk + hash) and 2. (delta syncs)
  --push-only    only imgtool push of a new image against rsync -W into an rsync daemon, with
                 the peak memory of imgtool and regiond (needs about 3x the image size free)
  --no-rsync     with --push-only: no rsync runs (for a push too large for a third copy)
  --keep-work-dir  with --push-only: leave the work dir (its path is printed) instead of
                 deleting it, so that a run right after does not create its files among
                 thousands just freed (slow on ext4 without a journal); delete it later
  --work-dir DIR where the temp work dir goes (default /tmp); needs about 9x the image size free
  --runs N       repetitions of each timed measurement; medians are reported (default 3)
  --debian full|small  instead: real Debian images (built by mmdebstrap, cached), the update
                 v1 -> v2 against casync, rsync --no-whole-file and zsync, and v1's first sync
  --image-cache DIR  where --debian keeps its images, one dir per recipe key
                 (default /var/tmp/metalrack-debian-images)
  --peers LIST   --debian's peers, comma-separated (default casync,rsync,zsync)
  --summary FILE --debian writes its figures as JSON there
  --peer-timeout-s N  --debian stops a casync or zsync run after N s and reports it
                 unfinished (default 300)
Build first: cargo build --release --workspace --bins";

#[derive(Debug)]
struct Options {
    size_mib: u64,
    input: Option<PathBuf>,
    first_sync_only: bool,
    push_only: bool,
    no_rsync: bool,
    keep_work_dir: bool,
    work_dir: PathBuf,
    runs: usize,
    debian: Option<realimg::RealImageOptions>,
}

impl Options {
    /// `None` when only `--help` was asked for.
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>> {
        let mut options = Options {
            size_mib: 2048,
            input: None,
            first_sync_only: false,
            push_only: false,
            no_rsync: false,
            keep_work_dir: false,
            work_dir: PathBuf::from("/tmp"),
            runs: 3,
            debian: None,
        };
        let mut profile = None;
        let mut cache_dir = PathBuf::from(DEFAULT_IMAGE_CACHE);
        let mut peers = realimg::Peer::ALL.to_vec();
        let mut summary = None;
        let mut peer_timeout = DEFAULT_PEER_TIMEOUT;
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--size-mib" => options.size_mib = value()?.parse().context("--size-mib")?,
                "--input" => options.input = Some(PathBuf::from(value()?)),
                "--first-sync-only" => options.first_sync_only = true,
                "--push-only" => options.push_only = true,
                "--no-rsync" => options.no_rsync = true,
                "--keep-work-dir" => options.keep_work_dir = true,
                "--work-dir" => options.work_dir = PathBuf::from(value()?),
                "--runs" => options.runs = value()?.parse().context("--runs")?,
                "--debian" => profile = Some(Profile::parse(&value()?)?),
                "--image-cache" => cache_dir = PathBuf::from(value()?),
                "--peers" => peers = realimg::Peer::parse_list(&value()?)?,
                "--summary" => summary = Some(PathBuf::from(value()?)),
                "--peer-timeout-s" => peer_timeout = Duration::from_secs(value()?.parse().context("--peer-timeout-s")?),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        if let Some(profile) = profile {
            ensure!(options.runs >= 1, "--runs must be at least 1");
            options.debian = Some(realimg::RealImageOptions {
                profile,
                cache_dir,
                peers,
                work_dir: options.work_dir.clone(),
                runs: options.runs,
                peer_timeout,
                summary,
            });
            return Ok(Some(options));
        }
        if let Some(input) = &options.input {
            let len = std::fs::metadata(input).with_context(|| format!("--input {}", input.display()))?.len();
            options.size_mib = len.div_ceil(MIB);
        }
        // Below 16 MiB a file is a few hundred chunks and the figures say nothing.
        ensure!(options.size_mib >= 16, "the image must be at least 16 MiB");
        ensure!(options.runs >= 1, "--runs must be at least 1");
        Ok(Some(options))
    }
}

// ---------------------------------------------------------------------------------------------
// The run: everything it starts lives in locals of this function, so leaving it by any path
// (return, `?`, panic, or being dropped on Ctrl-C) kills the processes and then removes the dir.

async fn run(options: &Options) -> Result<String> {
    if options.push_only {
        return push::run(options).await;
    }
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

    let v1 = w.join("v1.raw");
    let size = match &options.input {
        Some(input) => {
            note(&format!("copying {} as v1", input.display()));
            std::fs::copy(input, &v1).with_context(|| format!("copying {}", input.display()))?
        }
        None => {
            note("writing v1 (pseudo-random, incompressible)");
            write_random_file(&v1, size, 1, || Ok(()))?;
            size
        }
    };
    report.size = size;
    let v1_hash = b3sum(&v1, None).await?.0;
    note("zstd -3 of v1 (the yardstick for bytes on the wire)");
    report.zstd3_bytes = zstd3_len(&v1)?;

    // 1. Chunk + hash throughput.
    if !options.first_sync_only {
        note("1. imgtool chunk vs b3sum");
        report.chunking = measure_chunking(&binaries, &v1, &v1_hash, &w.join("v1.manifest"), runs).await?;
    }

    // The region and one admin; the HTTP server serving v1 to curl.
    let region = Region::launch(&w.join("region"), REGION_CONFIG, ANY_PORT, &[], Spawn::default())?;
    let api = region.api(&region.add_admin("bench", "bench password 1")?);
    let secret = region.shared_secret()?;
    let http = HttpServer::start(http_kind, w, &v1).await?;

    // 3. First sync (before the deltas: a delta needs a rack that has v1).
    note("3. first sync vs curl");
    settle().await?;
    let push_started = Instant::now();
    push(&region, &api.key, &v1, "1").await?;
    report.push_v1_secs = push_started.elapsed().as_secs_f64();
    let mut rack = None;
    for run in 0..runs {
        let name = if run == 0 { "bench".to_owned() } else { format!("first-sync-{run}") };
        settle().await?;
        let busy_from = box_busy();
        let mut candidate = start_rack(&region, &api, &secret, w, &name).await?;
        // Timed from `rackd serve`: a rack with no snapshot syncs as soon as it reads the catalogue.
        let file = candidate.snapshot_file(IMAGE, "1", "root-disk");
        let sample = wait_synced(&api, &candidate, &file, &v1_hash, size).await?;
        report.first_sync_busy.push(sample.box_busy_at_disk.saturating_sub(busy_from));
        report.first_sync.push(sample);
        if run == 0 {
            rack = Some(candidate);
        } else {
            // Extra racks only give more samples; free their disk at once.
            candidate.daemon.take();
            let dir = &candidate.data_dir;
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    let rack = rack.expect("runs >= 1");
    for _ in 0..runs {
        settle().await?;
        report.curl_null.push(http.curl(None, size).await?);
        let out = w.join("curl.out");
        settle().await?;
        let busy_from = box_busy();
        let curl = http.curl(Some(&out), size).await?;
        let busy_curl = box_busy();
        let flush = fsync_file(&out).await?;
        report.curl_file_busy.push(busy_curl - busy_from);
        report.curl_file_flushed_busy.push(box_busy() - busy_from);
        report.curl_file.push(curl);
        report.curl_file_flushed.push(curl + flush);
        std::fs::remove_file(&out)?;
        report.disk_write.extend(disk_write_time(&v1, &w.join("direct.out"), size).await?);
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
    let rsyncd = RsyncDaemon::start(w, &scenarios.iter().map(|s| s.key).collect::<Vec<_>>()).await?;
    let scenarios = if options.first_sync_only { &scenarios[..0] } else { &scenarios[..] };
    for scenario in scenarios {
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
            samples.rack.push(delta_sync(&region, &api, &rack, &v2, &v2_hash, &version).await?);
            // Back to "the rack has v1 only" for the next run: the region drops the version and
            // its chunks, the rack drops the file.
            drop_version(&api, &rack, &version, &v1_hash, size).await?;
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

/// Bytes of `file` compressed as `zstd -3 FILE` does (one frame, level 3, one thread).
fn zstd3_len(file: &std::path::Path) -> Result<u64> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    zstd::stream::copy_encode(input, &mut count, 3).context("zstd -3")?;
    Ok(count.0)
}

pub(crate) fn note(message: &str) {
    eprintln!("bench_sync: {message}");
}

/// Generous bound on any one sync of `size` bytes: 1 minute plus 10 s per 100 MiB (10 MiB/s),
/// far slower than anything seen, so only a hang trips it.
fn deadline_for(size: u64) -> Duration {
    Duration::from_secs(60 + size / (10 * MIB))
}
