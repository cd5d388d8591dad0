//! CPU time and page faults of a server's process group (and of this program), read from
//! `/proc/PID/stat`: what serving cost the server, beside what the clients saw.

use std::process::Command;

/// CPU time and page faults of a process group, from `/proc/PID/stat` of its members.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub cpu_ticks: u64,
    pub minor_faults: u64,
    pub major_faults: u64,
}

impl Usage {
    pub fn of_group(group: i32) -> Usage {
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
    pub fn of_self() -> Usage {
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

    pub fn since(self, before: Usage) -> Usage {
        Usage {
            cpu_ticks: self.cpu_ticks.saturating_sub(before.cpu_ticks),
            minor_faults: self.minor_faults.saturating_sub(before.minor_faults),
            major_faults: self.major_faults.saturating_sub(before.major_faults),
        }
    }

    pub fn cpu_seconds(self) -> f64 {
        self.cpu_ticks as f64 / clock_ticks_per_second()
    }
}

/// TCP segments sent in the calling thread's network namespace so far (`OutSegs` of
/// `/proc/thread-self/net/snmp`; on loopback, every segment of both ends); 0 if unreadable.
pub fn tcp_segments_sent() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "OutSegs")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
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
