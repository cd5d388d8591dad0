//! The report: the machine, then one Markdown table per section with ratios against the
//! reference servers (medians, percentiles, and what the servers spent).

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use metalrack_tests::bench::load_average;

use crate::dhcp::DhcpCell;
use crate::http::{ColdCell, HttpSample};
use crate::tftp::TftpCell;
use crate::{note, other_benchmarks, Options, COLD_STREAMS, MIB, PROBE_EVERY, PROBE_URL};

#[derive(Debug, Default)]
pub struct Report {
    pub options: Options,
    pub facts: Vec<(String, String)>,
    pub http: std::collections::BTreeMap<(&'static str, usize), Vec<HttpSample>>,
    pub cold: Vec<ColdCell>,
    /// One reader's throughput over the file just evicted from the page cache.
    pub cold_read_mib_s: Option<f64>,
    pub tftp: Vec<TftpCell>,
    pub dhcp: Vec<DhcpCell>,
    /// Other benchmarks that ran while this one measured (after waiting 20 minutes).
    pub disturbed: Vec<String>,
    /// Other benchmarks seen running right after a measurement.
    pub disturbed_after: Vec<String>,
    pub load_after: String,
}

impl Default for Options {
    fn default() -> Self {
        Options::parse(std::iter::empty()).ok().flatten().expect("defaults are valid")
    }
}

pub fn machine_facts() -> Vec<(String, String)> {
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

pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64().max(1e-9)
}

pub fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "–".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

pub fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("**{:.2}×**", a / b)
    } else {
        "–".into()
    }
}

impl Report {
    pub fn check_disturbance(&mut self) {
        for other in other_benchmarks() {
            if !self.disturbed_after.contains(&other) {
                note(&format!("another benchmark ran during the last measurement: {other}"));
                self.disturbed_after.push(other);
            }
        }
    }

    pub fn to_markdown(&self) -> String {
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
        if let Some(size) = &o.nginx_sendfile_max_chunk {
            let _ = writeln!(
                out,
                "- **diagnostic, not the reference**: nginx with `sendfile_max_chunk {size}` (at most that per `sendfile`, then the other connections)"
            );
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

    pub fn http_table(&self, out: &mut String) {
        let o = &self.options;
        let _ = writeln!(
            out,
            "\n### HTTP fan-out: {} MiB file, loopback, page cache warm\n\n\
             Each cell: the clients loop `GET` of the whole file for {} s after a {} s warm-up; median of {} \
             interleaved runs (TTFB: every request of every run). TTFB: request sent (connect included for a \
             connection's first) → first body byte. CPU per GiB: the server's processes, and the clients' (this \
             program): both ends share the kernel's TCP work on loopback, and how a server paces its writes moves \
             some of it from one side to the other (rackd with the kernel's own socket buffer sizing: its figure \
             fell, its clients' rose by more), so the sum is the like-for-like cost. TCP segments per MiB: every \
             segment sent in the namespace over the cell (both ends: data and acknowledgements).\n",
            o.file_mib, o.seconds, o.warmup, o.runs
        );
        let _ = writeln!(
            out,
            "| clients | rackd MiB/s | nginx MiB/s | rackd ÷ nginx | rackd TTFB p50 / p99 ms | \
             nginx TTFB p50 / p99 ms | TTFB p99 rackd ÷ nginx (lower is better) | TTFB samples rackd / nginx | \
             server CPU s per GiB rackd / nginx | client CPU s per GiB rackd / nginx | server + client rackd ÷ nginx | \
             TCP segments per MiB rackd / nginx | server minor faults per GiB rackd / nginx | errors rackd / nginx |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &clients in &o.clients {
            let samples = |server: &'static str| self.http.get(&(server, clients)).cloned().unwrap_or_default();
            let (r, n) = (samples("rackd"), samples("nginx"));
            let rate = |s: &[HttpSample]| median(s.iter().map(|s| mib_per_s(s.load.bytes, s.load.elapsed)).collect());
            let ttfb = |s: &[HttpSample], p: f64| {
                percentile(&s.iter().flat_map(|s| s.load.ttfb.clone()).collect::<Vec<_>>(), p)
            };
            let count = |s: &[HttpSample]| s.iter().map(|s| s.load.ttfb.len()).sum::<usize>();
            let per_gib = |s: &[HttpSample], value: fn(&HttpSample) -> f64| {
                median(s.iter().map(|s| value(s) / (s.load.bytes as f64 / (1u64 << 30) as f64).max(1e-9)).collect())
            };
            let cpu = |s: &[HttpSample]| per_gib(s, |s| s.usage.cpu_seconds());
            let client_cpu = |s: &[HttpSample]| per_gib(s, |s| s.client_usage.cpu_seconds());
            let both_cpu = |s: &[HttpSample]| per_gib(s, |s| s.usage.cpu_seconds() + s.client_usage.cpu_seconds());
            let segments = |s: &[HttpSample]| per_gib(s, |s| s.segments as f64) / 1024.0;
            let faults = |s: &[HttpSample]| per_gib(s, |s| s.usage.minor_faults as f64);
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
                "| {clients} | {rr:.0} | {nr:.0} | {} | {} / {} | {} / {} | {} | {} / {} | {:.2} / {:.2} | {:.2} / {:.2} | {} | {:.1} / {:.1} | {:.0} / {:.0} | {} / {} |",
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
                client_cpu(&r),
                client_cpu(&n),
                ratio(both_cpu(&r), both_cpu(&n)).replace("**", ""),
                segments(&r),
                segments(&n),
                faults(&r),
                faults(&n),
                errors(&r),
                errors(&n)
            );
        }
    }

    pub fn cold_table(&self, out: &mut String) {
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

    pub fn tftp_table(&self, out: &mut String) {
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
