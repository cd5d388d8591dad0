//! What the rack reports about itself: version, uptime, CPU load, memory, disk space, addresses.

use std::net::IpAddr;
use std::path::Path;

use metalrack_api::RackHealth;

/// Reads the rack's health now. A figure that cannot be read is reported as zero (and logged at
/// debug level) rather than holding back the heartbeat that says the rack is alive.
pub fn collect(data_dir: &Path) -> RackHealth {
    let (uptime_s, load_1m) = match nix::sys::sysinfo::sysinfo() {
        Ok(info) => (info.uptime().as_secs(), info.load_average().0),
        Err(e) => {
            tracing::debug!(error = %e, "sysinfo failed");
            (0, 0.0)
        }
    };
    let n_cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let (disk_free_bytes, disk_total_bytes) = match nix::sys::statvfs::statvfs(data_dir) {
        Ok(fs) => {
            let unit = fs.fragment_size();
            (fs.blocks_available() * unit, fs.blocks() * unit)
        }
        Err(e) => {
            tracing::debug!(error = %e, "statvfs failed");
            (0, 0)
        }
    };
    let (memory_total_bytes, memory_available_bytes) = match std::fs::read_to_string(MEMINFO) {
        Ok(text) => parse_meminfo(&text),
        Err(e) => {
            tracing::debug!(error = %e, "reading {MEMINFO} failed");
            (0, 0)
        }
    };
    RackHealth {
        memory_total_bytes,
        memory_available_bytes,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s,
        cpu_load: load_1m / n_cpus,
        disk_free_bytes,
        disk_total_bytes,
        addresses: addresses(),
    }
}

/// Where the kernel reports memory.
const MEMINFO: &str = "/proc/meminfo";

/// `MemTotal` and `MemAvailable` of a /proc/meminfo text, in bytes (the file says kB, meaning
/// KiB); a line that is missing or unreadable counts as 0.
fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// The rack's routable addresses as `IFACE ADDRESS`, skipping loopback and IPv6 link-local.
fn addresses() -> Vec<String> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ifaddr in ifaddrs {
        let Some(address) = ifaddr.address else {
            continue;
        };
        let ip: IpAddr = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local_v6 = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if ip.is_loopback() || link_local_v6 {
            continue;
        }
        out.push(format!("{} {ip}", ifaddr.interface_name));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_of_this_machine_is_plausible() {
        let dir = std::env::temp_dir();
        let health = collect(&dir);
        assert!(health.uptime_s > 0);
        assert!(health.disk_total_bytes > 0 && health.disk_free_bytes <= health.disk_total_bytes);
        assert!(health.cpu_load >= 0.0);
        assert!(health.addresses.iter().all(|a| !a.contains(" 127.")));
        assert!(health.memory_total_bytes > 0);
        assert!(health.memory_available_bytes > 0 && health.memory_available_bytes <= health.memory_total_bytes);
    }

    #[test]
    fn meminfo_fields_are_read_in_bytes_and_missing_ones_are_zero() {
        let text = "MemTotal:        8029184 kB\nMemFree:          123456 kB\nMemAvailable:    4014592 kB\n";
        assert_eq!(parse_meminfo(text), (8_029_184 * 1024, 4_014_592 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 1024 kB\n"), (1024 * 1024, 0));
        assert_eq!(parse_meminfo("MemTotal: lots\n"), (0, 0));
    }
}
