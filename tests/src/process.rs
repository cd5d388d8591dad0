//! Child processes the harness starts: long-running daemons, stopped and reaped on drop so that no
//! exit path (a panic included) leaves one running, and short-lived commands checked for success;
//! either of them here or inside a lab's network namespace.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use metalrack_hardware::{Lab, Namespace};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// How long a daemon in its own process group gets after SIGTERM before its group is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// How often [`Daemon::terminate_within`] looks whether the daemon has exited.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// Where and how a daemon is started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spawn<'a> {
    /// Inside this network namespace (its sockets and children stay there).
    pub lab: Option<&'a Namespace>,
    /// In a process group of its own, stopped as a group on drop (SIGTERM, then SIGKILL): a
    /// terminal's Ctrl-C then reaches only the program that started it, which stops it and its
    /// children (nginx's workers). Tests leave it off, so a Ctrl-C on `cargo test` stops all.
    pub own_group: bool,
}

impl<'a> Spawn<'a> {
    pub fn in_lab(lab: &'a Lab) -> Spawn<'a> {
        Spawn::in_namespace(lab.namespace())
    }

    pub fn in_namespace(namespace: &'a Namespace) -> Spawn<'a> {
        Spawn { lab: Some(namespace), own_group: true }
    }
}

/// A long-running child with stdin closed and stderr in `log` (stdout too, unless piped).
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    own_group: bool,
}

impl Daemon {
    /// Starts `command`; with `piped_stdout` its stdout is left for the caller to read (a first
    /// line naming the address), otherwise it goes to `log` too.
    pub fn spawn(name: &str, mut command: Command, log: &Path, piped_stdout: bool, how: Spawn) -> Result<Daemon> {
        let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        command.stdin(Stdio::null()).stderr(log_file.try_clone()?);
        command.stdout(if piped_stdout { Stdio::piped() } else { Stdio::from(log_file) });
        if how.own_group {
            command.process_group(0);
        }
        let child = match how.lab {
            Some(lab) => lab
                .in_namespace(move || command.spawn())
                .with_context(|| format!("cannot run inside network namespace {}", lab.name()))?,
            None => command.spawn(),
        }
        .with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon { name: name.to_owned(), child: Some(child), log: log.to_owned(), own_group: how.own_group })
    }

    /// The process id (with [`Spawn::own_group`], also its process group's id).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Its stdout, when spawned with `piped_stdout` (once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// An error naming the exit status and the log's last lines if the daemon has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else { bail!("{} was stopped", self.name) };
        match child.try_wait()? {
            Some(status) => exited(&self.name, status, &self.log),
            None => Ok(()),
        }
    }

    /// Stops it with SIGKILL, as a crash or a pulled plug would; does nothing when it is stopped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.own_group {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it with SIGTERM and waits for it to exit, which it must do successfully; does
    /// nothing when it is stopped.
    pub fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).with_context(|| format!("SIGTERM to {}", self.name))?;
        let status = child.wait().with_context(|| format!("waiting for {}", self.name))?;
        ensure!(status.success(), "{} exited with {status} on SIGTERM; log:\n{}", self.name, self.log_text());
        Ok(())
    }

    /// Stops it with SIGTERM and waits at most `limit` for it to exit, which it must do
    /// successfully; how long it took. Past `limit` it is killed and that is the error.
    pub fn terminate_within(&mut self, limit: Duration) -> Result<Duration> {
        let Some(child) = self.child.as_mut() else { bail!("{} was stopped", self.name) };
        let start = Instant::now();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).with_context(|| format!("SIGTERM to {}", self.name))?;
        loop {
            if let Some(status) = child.try_wait().with_context(|| format!("waiting for {}", self.name))? {
                let took = start.elapsed();
                self.child = None;
                ensure!(status.success(), "{} exited with {status} on SIGTERM; log:\n{}", self.name, self.log_text());
                return Ok(took);
            }
            if start.elapsed() > limit {
                self.kill();
                bail!("{} still running {limit:?} after SIGTERM (killed)", self.name);
            }
            std::thread::sleep(EXIT_POLL);
        }
    }

    /// The most memory it has had resident at once so far (`VmHWM` in `/proc/PID/status`).
    pub fn peak_resident_bytes(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).with_context(|| format!("no VmHWM in {path}"))?;
        let kib: u64 = line
            .trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("unexpected {line:?} in {path}"))?;
        Ok(kib * 1024)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log, headed by its name.
    pub fn log_tail(&self, n: usize) -> String {
        format!("{} log, last {n} lines:\n{}", self.name, last_lines(&self.log, n))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else { return };
        if self.own_group {
            let group = Pid::from_raw(child.id() as i32);
            let _ = killpg(group, Signal::SIGTERM);
            let until = Instant::now() + TERMINATE_GRACE;
            while Instant::now() < until && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever is left (a worker that outlived its master, a stuck daemon, any test daemon).
        self.kill();
    }
}

/// The error for a daemon `name` that exited with `status`: its last 20 log lines from `log`.
pub fn exited(name: &str, status: ExitStatus, log: &Path) -> Result<()> {
    bail!("{name} exited ({status}); last log lines:\n{}", last_lines(log, 20))
}

/// The last `n` lines of the file at `log` (none if unreadable).
fn last_lines(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(n).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Runs a short-lived `command` to completion with stdin closed (inside `lab` if given); an
/// error unless it succeeds, with its stderr.
pub fn run(mut command: Command, lab: Option<&Lab>) -> Result<Output> {
    let shown = format!("{command:?}");
    command.stdin(Stdio::null());
    let output = match lab {
        Some(lab) => lab
            .in_namespace(move || command.output())
            .with_context(|| format!("cannot run inside network namespace {}", lab.name()))?,
        None => command.output(),
    }
    .with_context(|| format!("cannot run {shown}"))?;
    ensure!(output.status.success(), "{shown} failed ({}): {}", output.status, stderr(&output).trim());
    Ok(output)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts `output` succeeded, naming `what` and its stderr otherwise (for tests).
pub fn assert_success(what: &str, output: &Output) {
    assert!(output.status.success(), "{what} failed ({}): {}", output.status, stderr(output));
}
