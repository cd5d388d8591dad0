//! What only the benchmark programs (`bench_sync`, `bench_pxe`) share: free disk space and the
//! load average, which their reports state, and the CPU time a step cost.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

/// Bytes free on the filesystem holding `dir` (`df`).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let output =
        std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output().context("cannot run df")?;
    ensure!(output.status.success(), "df {}: {}", dir.display(), String::from_utf8_lossy(&output.stderr).trim());
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().nth(1).and_then(|l| l.trim().parse().ok()).with_context(|| format!("unexpected df output {text:?}"))
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The unit of `/proc`'s CPU times: `USER_HZ`, which the kernel fixes at 100 for user space on
/// every architecture this runs on (what `getconf CLK_TCK` prints; not asked here, since asking
/// starts a child, whose CPU the children's account below would count).
const USER_HZ: f64 = 100.0;

/// Busy time of the whole box so far: every CPU's user, nice, system, irq and softirq time from
/// the `cpu` line of `/proc/stat` (not idle, not I/O wait, not time the hypervisor stole). The
/// difference over a step is all the work that step made, whichever process or kernel thread
/// did it (the writeback of dirty pages included), plus whatever else ran: a figure for a quiet
/// box.
pub fn box_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    Duration::from_secs_f64(busy_ticks(&stat) as f64 / USER_HZ)
}

/// The busy ticks of `/proc/stat`'s `cpu` line: user, nice, system, irq, softirq.
fn busy_ticks(stat: &str) -> u64 {
    let line = stat.lines().find(|l| l.starts_with("cpu ")).unwrap_or_default();
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum()
}

/// CPU time of the live process `pid` (all its threads), and of the children it has waited
/// for: utime, stime, cutime and cstime of `/proc/PID/stat`. `None` once it is gone.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(Duration::from_secs_f64(process_ticks(&stat)? as f64 / USER_HZ))
}

/// utime + stime + cutime + cstime of a `/proc/PID/stat` line.
fn process_ticks(stat: &str) -> Option<u64> {
    // Fields after the command, which is in parentheses and may hold spaces and parentheses:
    // state is the first, utime the 12th, then stime, cutime, cstime.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields.get(11..15)?.iter().map(|f| f.parse::<u64>().ok()).sum()
}

/// CPU time of every child this process has waited for (`getrusage(RUSAGE_CHILDREN)`): around
/// a tool run that is the only child to end in the meantime, the tool's own CPU.
pub fn waited_children_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(Duration::ZERO, |usage| {
        let time = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
        time(usage.user_time()) + time(usage.system_time())
    })
}

/// Waits until the single-threaded process `pid` has no child left (its children ended and it
/// has waited for them, so their CPU is in its `cutime`), for at most `deadline`.
pub async fn wait_childless(pid: u32, deadline: Duration) -> Result<()> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let started = std::time::Instant::now();
    loop {
        let children = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        if children.trim().is_empty() {
            return Ok(());
        }
        ensure!(started.elapsed() < deadline, "process {pid} still has children {children:?} after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_box_is_busy_in_user_nice_system_irq_and_softirq_time_only() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 20 30 5000 400 6 7 800 0 0\ncpu0 50 10 15 2500 200 3 3 400 0 0\nintr 1 2\n";
        assert_eq!(busy_ticks(stat), 100 + 20 + 30 + 6 + 7);
    }

    #[test]
    fn a_process_cpu_time_adds_its_own_and_its_waited_childrens() {
        // A command holding ") " must not shift the fields.
        let stat = "4242 (a) b) S 1 4242 4242 0 -1 4194560 100 0 0 0 11 22 33 44 20 0 1 0 5 1000 50";
        assert_eq!(process_ticks(stat), Some(11 + 22 + 33 + 44));
        assert_eq!(process_ticks("4242 (short) S 1 2"), None);
    }

    #[test]
    fn this_process_cpu_time_grows_while_it_works() {
        let me = std::process::id();
        let before = process_cpu(me).expect("this process's stat");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut spins = 0u64;
        // Spin until the kernel has charged at least two ticks more (or give up at the deadline).
        while process_cpu(me).expect("this process's stat") < before + Duration::from_millis(20) {
            assert!(std::time::Instant::now() < deadline, "10 s of spinning were not charged as CPU time");
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
        assert!(box_busy() > Duration::ZERO);
    }
}
