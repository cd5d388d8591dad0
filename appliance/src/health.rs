//! What the rack reports about itself: version, uptime, CPU load, disk space, addresses.

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
    RackHealth {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s,
        cpu_load: load_1m / n_cpus,
        disk_free_bytes,
        disk_total_bytes,
        addresses: addresses(),
    }
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
    }
}
