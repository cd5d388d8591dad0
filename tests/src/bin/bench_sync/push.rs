//! `--push-only`: `imgtool push` of a new image against `rsync -W` of the same file into an rsync
//! daemon module on loopback (issue 12, goal 2), and the peak memory of `imgtool` and `regiond`
//! during the push.
//!
//! Each run, interleaved: rsync into a fresh destination (the previous copy removed, untimed),
//! once as is and once with `--fsync` (the region flushes before a version joins the catalogue:
//! that is the like-for-like peer), the disk's write speed (`dd oflag=direct`: no flushed copy
//! is faster), then `imgtool push` as a new version into a region that lacks every chunk. For
//! pseudo-random data each run writes new bytes (untimed), so nothing is deleted in between: the
//! region's filesystem (ext4 here) makes a new file slow to allocate for a while after many were
//! freed, which deleting the last version's ~32,000 chunk files seconds before the push cost the
//! region (docs/PERFORMANCE.md, "The region's chunk store"). An `--input` image is pushed again
//! after its previous version was deleted and collected. Both tools read the same file, warm in
//! the page cache; `sync` before each. Memory is sampled from `/proc/PID/status` every
//! [`RSS_POLL`], CPU read from `/proc` around each step.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use metalrack_tests::bench::{box_busy, free_bytes, load_average, process_cpu, wait_childless, waited_children_cpu};
use metalrack_tests::data::write_random_file;
use metalrack_tests::process::{Daemon, Spawn};
use metalrack_tests::region::{Region, ANY_PORT};

use crate::peers::spawn_rsync_daemon;
use crate::report::{median, secs};
use crate::tools::{disk_write_time, filesystem_summary, run_tool, settle};
use crate::{note, Options, GIB, IMAGE, MIB, REGION_CONFIG};

/// How often the memory of `imgtool` and `regiond` is read during a push: often enough to see
/// a peak that lasts a batch (tens of ms).
const RSS_POLL: Duration = Duration::from_millis(5);

/// Memory of a process from `/proc/PID/status`, in KiB: total resident, and its anonymous part
/// (heap and stacks: what the process allocated, as opposed to file pages it maps).
#[derive(Debug, Clone, Copy, Default)]
struct Rss {
    total_kib: u64,
    anon_kib: u64,
}

fn rss(pid: u32) -> Option<Rss> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|l| l.strip_prefix(name))?.split_whitespace().next()?.parse().ok()
    };
    Some(Rss { total_kib: field("VmRSS:")?, anon_kib: field("RssAnon:")? })
}

#[derive(Debug, Default)]
struct PushSample {
    wall: Duration,
    /// `imgtool push`'s own account of its time: chunking, sending, commit (seconds).
    phases: [f64; 3],
    imgtool_peak: Rss,
    region_before: Rss,
    region_peak: Rss,
    cpu: StepCpu,
}

/// What a step cost in CPU: its own processes (the tool and the daemon it talks to), and the
/// whole box over the step (the kernel's writeback threads and interrupts included).
#[derive(Debug, Default, Clone, Copy)]
struct StepCpu {
    processes: Duration,
    box_busy: Duration,
}

/// The readings a [`StepCpu`] is measured from: taken before a step that runs one tool as this
/// process's child against the server `server_pid`.
struct CpuMeter {
    server_pid: u32,
    children: Duration,
    server: Duration,
    busy: Duration,
}

impl CpuMeter {
    fn start(server_pid: u32) -> CpuMeter {
        CpuMeter {
            server_pid,
            children: waited_children_cpu(),
            server: process_cpu(server_pid).unwrap_or_default(),
            busy: box_busy(),
        }
    }

    /// The whole box's busy time since the start.
    fn box_busy(&self) -> Duration {
        box_busy() - self.busy
    }

    /// The CPU of the tool (once waited for) and of the server since the start.
    fn processes(&self) -> Duration {
        (waited_children_cpu() - self.children)
            + process_cpu(self.server_pid).unwrap_or_default().saturating_sub(self.server)
    }
}

/// How long the rsync daemon may take to reap the connection's process after the client ends.
const REAP_DEADLINE: Duration = Duration::from_secs(10);

/// Runs `imgtool push` of `file` as `version`, sampling memory; checks it committed.
async fn timed_push(region: &Region, api_key: &str, file: &Path, version: &str) -> Result<PushSample> {
    let command = region.push_command(api_key, file, IMAGE, "root-disk", version)?;
    let region_pid = region.daemon.pid() as u32;
    let mut sample = PushSample { region_before: rss(region_pid).unwrap_or_default(), ..PushSample::default() };
    sample.region_peak = sample.region_before;
    let meter = CpuMeter::start(region_pid);
    let started = Instant::now();
    let mut child = tokio::process::Command::from(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting imgtool push")?;
    let pid = child.id().context("imgtool's pid")?;
    let deadline = started + Duration::from_secs(1800);
    loop {
        if let Some(now) = rss(pid) {
            sample.imgtool_peak.total_kib = sample.imgtool_peak.total_kib.max(now.total_kib);
            sample.imgtool_peak.anon_kib = sample.imgtool_peak.anon_kib.max(now.anon_kib);
        }
        if let Some(now) = rss(region_pid) {
            sample.region_peak.total_kib = sample.region_peak.total_kib.max(now.total_kib);
            sample.region_peak.anon_kib = sample.region_peak.anon_kib.max(now.anon_kib);
        }
        if child.try_wait()?.is_some() {
            break;
        }
        ensure!(Instant::now() < deadline, "imgtool push did not finish in 30 minutes");
        tokio::time::sleep(RSS_POLL).await;
    }
    sample.wall = started.elapsed();
    let output = child.wait_with_output().await?;
    // imgtool has been waited for: its CPU is in this process's children's account.
    sample.cpu = StepCpu { processes: meter.processes(), box_busy: meter.box_busy() };
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && text.contains("committed"),
        "imgtool push did not commit: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    sample.phases = phases(&text).with_context(|| format!("imgtool push printed no phase times: {text}"))?;
    Ok(sample)
}

/// The phase times of `imgtool push`'s summary line: "(chunking 1.2 s, sending 8.0 s, commit
/// 1.5 s)".
fn phases(summary: &str) -> Option<[f64; 3]> {
    let times = ["(chunking ", ", sending ", ", commit "].map(|label| {
        let rest = &summary[summary.find(label)? + label.len()..];
        rest.split_once(" s")?.0.parse::<f64>().ok()
    });
    let [Some(chunking), Some(sending), Some(commit)] = times else { return None };
    Some([chunking, sending, commit])
}

/// An rsync daemon with one writable module, `push`, on a free loopback port.
struct RsyncTarget {
    port: u16,
    module_dir: std::path::PathBuf,
    _daemon: Daemon,
}

impl RsyncTarget {
    async fn start(work: &Path) -> Result<RsyncTarget> {
        let dir = work.join("rsyncd-push");
        let module_dir = dir.join("push");
        let (port, daemon) = spawn_rsync_daemon(&dir, &[("push", module_dir.clone(), true)]).await?;
        Ok(RsyncTarget { port, module_dir, _daemon: daemon })
    }

    /// `rsync -W FILE rsync://…/push/image.raw` into an empty module, with `--fsync` if
    /// `flush` (the daemon then flushes the file before it finishes, as the region flushes its
    /// chunks before a version joins the catalogue); returns the wall time and the CPU of the
    /// client and the daemon (which forks a process per connection and reaps it).
    async fn push(&self, file: &Path, size: u64, flush: bool) -> Result<(Duration, StepCpu)> {
        let dest = self.module_dir.join("image.raw");
        let _ = std::fs::remove_file(&dest);
        settle().await?;
        let target = format!("rsync://127.0.0.1:{}/push/image.raw", self.port);
        let mut args: Vec<OsString> = vec!["-W".into()];
        if flush {
            args.push("--fsync".into());
        }
        args.extend([file.into(), target.into()]);
        let daemon_pid = self._daemon.pid() as u32;
        let meter = CpuMeter::start(daemon_pid);
        let (_, wall) = run_tool(Path::new("rsync"), &args).await?;
        let busy = meter.box_busy();
        wait_childless(daemon_pid, REAP_DEADLINE).await?;
        let cpu = StepCpu { processes: meter.processes(), box_busy: busy };
        let got = std::fs::metadata(&dest).context("rsync's copy")?.len();
        ensure!(got == size, "rsync wrote {got} bytes, expected {size}");
        std::fs::remove_file(&dest)?;
        Ok((wall, cpu))
    }
}

/// The `--push-only` run; returns its Markdown table.
pub async fn run(options: &Options) -> Result<String> {
    let size = options.size_mib * MIB;
    // The image, the region's copies (one per run for new bytes each run), and rsync's copy.
    let region_copies = if options.input.is_some() { 1 } else { options.runs as u64 };
    let needed = size + region_copies * size + if options.no_rsync { 0 } else { size } + GIB;
    let free = free_bytes(&options.work_dir)?;
    ensure!(free >= needed, "{} has {} MiB free; needs {} MiB", options.work_dir.display(), free / MIB, needed / MIB);
    let work = tempfile::Builder::new().prefix("bench-push.").tempdir_in(&options.work_dir)?;
    let w = work.path();
    let load_at_start = load_average();
    let file = w.join("image.raw");
    let size = match &options.input {
        Some(input) => std::fs::copy(input, &file).with_context(|| format!("copying {}", input.display()))?,
        None => {
            note("writing the image (pseudo-random, incompressible)");
            write_random_file(&file, size, 1, || Ok(()))?;
            size
        }
    };
    let region = Region::launch(&w.join("region"), REGION_CONFIG, ANY_PORT, &[], Spawn::default())?;
    let api = region.api(&region.add_admin("bench", "bench password 1")?);
    let rsync = if options.no_rsync { None } else { Some(RsyncTarget::start(w).await?) };
    // Warm the page cache with the file, as both tools will find it.
    run_tool(Path::new("cat"), &[file.clone().into()]).await?;
    let (mut rsync_walls, mut rsync_flushed, mut disk_writes, mut pushes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut rsync_cpu, mut rsync_flushed_cpu) = (Vec::new(), Vec::new());
    for run in 0..options.runs {
        if run > 0 && options.input.is_none() {
            note(&format!("run {}: writing new bytes into the image", run + 1));
            write_random_file(&file, size, 1 + run as u64, || Ok(()))?;
            run_tool(Path::new("cat"), &[file.clone().into()]).await?;
        }
        if let Some(rsync) = &rsync {
            note(&format!("run {}: rsync -W, rsync -W --fsync, dd oflag=direct", run + 1));
            let (wall, cpu) = rsync.push(&file, size, false).await?;
            rsync_walls.push(wall);
            rsync_cpu.push(cpu);
            let (wall, cpu) = rsync.push(&file, size, true).await?;
            rsync_flushed.push(wall);
            rsync_flushed_cpu.push(cpu);
            disk_writes.extend(disk_write_time(&file, &w.join("direct.out"), size).await?);
        }
        note(&format!("run {}: imgtool push", run + 1));
        settle().await?;
        let version = format!("push-{}", run + 1);
        pushes.push(timed_push(&region, &api.key, &file, &version).await?);
        if options.input.is_some() {
            // The same bytes again: the region must lack every chunk again.
            api.delete_version(IMAGE, &version).await?;
        }
    }
    let load_at_end = load_average();
    drop((rsync, region));
    let mut out = String::new();
    let name = options.input.as_ref().map_or_else(|| "pseudo-random".to_owned(), |p| p.display().to_string());
    writeln!(
        out,
        "Push of {name}, {size} bytes, {} runs; work dir on {}; load average {load_at_start} → {load_at_end}\n",
        options.runs,
        filesystem_summary(&options.work_dir)
    )?;
    writeln!(out, "| Measurement | imgtool push | rsync -W | Ratio (throughput) |")?;
    writeln!(out, "|---|---|---|---|")?;
    let push_secs: Vec<f64> = pushes.iter().map(|p| secs(p.wall)).collect();
    let push_median = median(push_secs.iter().copied());
    let mib_s = |s: f64| size as f64 / MIB as f64 / s;
    if rsync_walls.is_empty() {
        writeln!(out, "| wall time (median) | {push_median:.2} s, {:.0} MiB/s | – | – |", mib_s(push_median))?;
    } else {
        let rsync_median = median(rsync_walls.iter().map(|d| secs(*d)));
        writeln!(
            out,
            "| wall time (median) | {push_median:.2} s, {:.0} MiB/s | {rsync_median:.2} s, {:.0} MiB/s | **{:.2}×** |",
            mib_s(push_median),
            mib_s(rsync_median),
            rsync_median / push_median
        )?;
        let flushed_median = median(rsync_flushed.iter().map(|d| secs(*d)));
        writeln!(
            out,
            "| wall time, rsync flushing (`--fsync`) | | {flushed_median:.2} s, {:.0} MiB/s | **{:.2}×** |",
            mib_s(flushed_median),
            flushed_median / push_median
        )?;
        if !disk_writes.is_empty() {
            let disk_median = median(disk_writes.iter().map(|d| secs(*d)));
            writeln!(
                out,
                "| the disk: the best a flushing writer can reach against `rsync -W` | | `dd oflag=direct bs=64M` (the device's write speed): {disk_median:.2} s, {:.0} MiB/s | ≤ {:.2}× |",
                mib_s(disk_median),
                rsync_median / disk_median
            )?;
        }
    }
    let phase = |i: usize| median(pushes.iter().map(|p| p.phases[i]));
    writeln!(
        out,
        "| where the push's time went (imgtool's own account, medians) | chunking {:.1} s, sending {:.1} s, commit {:.1} s | | |",
        phase(0),
        phase(1),
        phase(2)
    )?;
    // What each way of copying costs the box in CPU, beside its wall time: on a box of two
    // cores shared by both ends, a copy that needs more CPU than the cores give cannot be
    // faster, whatever it waits on.
    let gib = size as f64 / GIB as f64;
    let per_gib = |cpus: &[StepCpu], which: fn(&StepCpu) -> Duration| median(cpus.iter().map(|c| secs(which(c)) / gib));
    let push_cpu: Vec<StepCpu> = pushes.iter().map(|p| p.cpu).collect();
    let push_processes = per_gib(&push_cpu, |c| c.processes);
    let push_box = per_gib(&push_cpu, |c| c.box_busy);
    if rsync_cpu.is_empty() {
        writeln!(
            out,
            "| CPU s per GiB (medians): imgtool + regiond; the whole box | {push_processes:.2}; {push_box:.2} | – | – |"
        )?;
    }
    for (label, cpus) in [("rsync -W", &rsync_cpu), ("rsync -W --fsync", &rsync_flushed_cpu)] {
        if cpus.is_empty() {
            continue;
        }
        let (processes, whole_box) = (per_gib(cpus, |c| c.processes), per_gib(cpus, |c| c.box_busy));
        writeln!(
            out,
            "| CPU s per GiB (median), the processes: imgtool + regiond, {label}'s client + daemon | {push_processes:.2} | {processes:.2} | {:.2}× |",
            processes / push_processes
        )?;
        writeln!(
            out,
            "| CPU s per GiB (median), the whole box over the step: {label} | {push_box:.2} | {whole_box:.2} | {:.2}× |",
            whole_box / push_box
        )?;
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let worst = |f: fn(&PushSample) -> u64| pushes.iter().map(f).max().unwrap_or(0);
    writeln!(
        out,
        "| imgtool peak RSS (all runs) | {:.1} MiB ({:.1} MiB anonymous) | | |",
        mib(worst(|p| p.imgtool_peak.total_kib)),
        mib(worst(|p| p.imgtool_peak.anon_kib))
    )?;
    writeln!(
        out,
        "| regiond RSS growth during a push (worst run) | +{:.1} MiB (+{:.1} MiB anonymous) | | |",
        mib(worst(|p| p.region_peak.total_kib.saturating_sub(p.region_before.total_kib))),
        mib(worst(|p| p.region_peak.anon_kib.saturating_sub(p.region_before.anon_kib)))
    )?;
    let list = |ds: &[Duration]| ds.iter().map(|d| secs(*d)).collect::<Vec<_>>();
    writeln!(
        out,
        "\nSamples (s): imgtool push {push_secs:.2?}; rsync -W {:.2?}; rsync -W --fsync {:.2?}; dd oflag=direct (for the whole file) {:.2?}",
        list(&rsync_walls),
        list(&rsync_flushed),
        list(&disk_writes)
    )?;
    let cpu_list = |cpus: &[StepCpu]| {
        cpus.iter().map(|c| format!("{:.2}/{:.2}", secs(c.processes), secs(c.box_busy))).collect::<Vec<_>>().join(", ")
    };
    writeln!(
        out,
        "CPU s (processes/box): imgtool push {}; rsync -W {}; rsync -W --fsync {}",
        cpu_list(&push_cpu),
        cpu_list(&rsync_cpu),
        cpu_list(&rsync_flushed_cpu)
    )?;
    if options.keep_work_dir {
        note(&format!("work dir kept: {}", work.keep().display()));
    } else {
        work.close()?;
    }
    Ok(out)
}
