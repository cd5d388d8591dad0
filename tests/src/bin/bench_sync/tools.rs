//! The reference tools and how the benchmark runs them: checking they are installed, the
//! machine summary the report starts with, timed tool runs (killed if the run is abandoned), and
//! waiting for a reference daemon to listen.

use std::ffi::OsString;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use metalrack_tests::bench::load_average;
use metalrack_tests::process::Daemon;

use crate::{note, POLL};

/// Bound on any one tool run (a push, a chunking, an rsync of the whole file): only a hang
/// trips it, even for images of tens of GiB on a loaded machine.
const TOOL_DEADLINE: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HttpKind {
    #[default]
    Nginx,
    /// Only when nginx is not installed; much slower, and the table says so.
    PythonHttpServer,
}

/// Checks the reference tools are installed, naming the install command for any that is not.
pub fn check_tools() -> Result<HttpKind> {
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

/// The device and type of the filesystem holding `dir` (`df`), and for ext4 whether it has a
/// journal: without one, ext4 will not reuse an inode freed in the last minutes and looks up
/// each such inode when allocating, so creating many files (the region's chunks) soon after
/// deleting many costs far more CPU (docs/PERFORMANCE.md, "The region's chunk store").
pub fn filesystem_summary(dir: &Path) -> String {
    let df = std::process::Command::new("df").arg("--output=source,fstype").arg(dir).output();
    let Some((source, fstype)) = df.ok().and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let line = text.lines().nth(1)?.to_owned();
        let (source, fstype) = line.split_once(char::is_whitespace)?;
        Some((source.to_owned(), fstype.trim().to_owned()))
    }) else {
        return "?".into();
    };
    let device = source.rsplit('/').next().unwrap_or_default();
    let journal = if fstype != "ext4" || !Path::new("/proc/fs/ext4").join(device).is_dir() {
        ""
    } else if has_jbd2_journal(device) {
        " (journal)"
    } else {
        " (no journal: files freed in the last minutes slow down creating new ones)"
    };
    format!("{source} {fstype}{journal}")
}

/// Whether ext4 on `device` has a journal: the journal's thread shows as `/proc/fs/jbd2/DEVICE-8`.
fn has_jbd2_journal(device: &str) -> bool {
    let prefix = format!("{device}-");
    std::fs::read_dir("/proc/fs/jbd2")
        .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&prefix)))
        .unwrap_or(false)
}

/// What the figures depend on: cores, memory, the work dir's filesystem, the tools' versions,
/// and the load when the run started.
pub fn machine_summary(work_dir: &Path, http_kind: HttpKind) -> String {
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
    let filesystem = filesystem_summary(work_dir);
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
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts connections on 127.0.0.1:`port`, while `daemon` still runs.
pub async fn wait_listening(daemon: &mut Daemon, port: u16) -> Result<()> {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        daemon.check_running()?;
        ensure!(start.elapsed() < Duration::from_secs(10), "{} did not listen on port {port} within 10 s", daemon.name);
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Runs a short-lived tool to completion; it is killed if the run is abandoned (Ctrl-C).
pub async fn run_tool(program: &Path, args: &[OsString]) -> Result<(std::process::Output, Duration)> {
    run_tool_in(None, program, args).await
}

/// [`run_tool`] in the directory `cwd` (for tools that put temp files in their current dir).
pub async fn run_tool_in(
    cwd: Option<&Path>,
    program: &Path,
    args: &[OsString],
) -> Result<(std::process::Output, Duration)> {
    let started = Instant::now();
    let mut command = tokio::process::Command::new(program);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let output = command.args(args).stdin(Stdio::null()).kill_on_drop(true).output();
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
pub async fn settle() -> Result<()> {
    run_tool(Path::new("sync"), &[]).await.map(|_| ())
}

/// `sync FILE`: flushes one file to the disk (coreutils calls `fsync` on it); how long it took.
/// Added to a tool that writes without flushing, it makes the tool's time like for like with
/// Metalrack's, which flushes before it calls a copy done.
pub async fn fsync_file(file: &Path) -> Result<Duration> {
    Ok(run_tool(Path::new("sync"), &[file.into()]).await?.1)
}

/// Blocks of the disk speed measurement: large, so that `O_DIRECT` keeps the device busy.
const DIRECT_BLOCK_BYTES: u64 = 64 * 1024 * 1024;

/// The disk's sequential write speed, in the same run as the tools it is set beside: `dd
/// if=SRC of=DEST bs=64M oflag=direct` over the whole 64 MiB blocks of `src` (read once before,
/// so from the page cache), bypassing the page cache, so each block is on the device when `dd`
/// goes on. No flushed copy of `src` can be faster than the device takes its bytes; returns the
/// time that speed gives for all of `src` (`None` if it is smaller than a block). `dest` is
/// removed after.
pub async fn disk_write_time(src: &Path, dest: &Path, size: u64) -> Result<Option<Duration>> {
    let blocks = size / DIRECT_BLOCK_BYTES;
    if blocks == 0 {
        return Ok(None);
    }
    let _ = std::fs::remove_file(dest);
    settle().await?;
    let mut input = OsString::from("if=");
    input.push(src);
    let mut output = OsString::from("of=");
    output.push(dest);
    let args: [OsString; 6] = [
        input,
        output,
        format!("bs={DIRECT_BLOCK_BYTES}").into(),
        format!("count={blocks}").into(),
        "oflag=direct".into(),
        "status=none".into(),
    ];
    let (_, wall) = run_tool(Path::new("dd"), &args).await?;
    std::fs::remove_file(dest)?;
    Ok(Some(wall.mul_f64(size as f64 / (blocks * DIRECT_BLOCK_BYTES) as f64)))
}

/// `b3sum FILE`: the file's BLAKE3 hex hash, and how long it took.
pub async fn b3sum(file: &Path, threads: Option<u32>) -> Result<(String, Duration)> {
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
