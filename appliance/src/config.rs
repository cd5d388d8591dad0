//! The rack's configuration file (TOML): every setting, its unit and its default.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RackConfig {
    /// Heartbeat period. Unset (the default): the period the region asks for in its answers, so
    /// one region setting governs every rack.
    pub heartbeat_interval_ms: Option<u64>,
    /// Longest wait between attempts while the region is unreachable or refuses the rack. Retries
    /// back off from the heartbeat period up to this. Default 60000 ms: a region back from an
    /// outage sees every rack within a minute, and 1000 racks retry at most ~17 times a second.
    pub retry_backoff_max_ms: u64,
    /// Deadline for any one request to the region (a long-poll gets this plus the time the
    /// region may hold it; a chunk stream this long to start, then a deadline per read).
    /// Default 10000 ms.
    pub region_request_timeout_ms: u64,
    /// Threads of the async runtime that serves everything. Default 0: one per core the rack
    /// may use (`available_parallelism`), since DHCP, TFTP and HTTP boot spread over them.
    pub worker_threads: usize,
    /// PXE services for the machines of this rack. Absent: the rack serves no PXE.
    pub pxe: Option<PxeConfig>,
}

/// PXE: DHCP, TFTP and HTTP boot on the rack's provisioning network.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PxeConfig {
    /// The provisioning interface (DHCP binds to it), e.g. "eth1".
    pub interface: String,
    /// This rack's address on that network: machines reach TFTP and HTTP boot here.
    pub address: Ipv4Addr,
    /// HTTP boot server. Default 0.0.0.0:5248 (MAAS' rack port).
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// Streams the HTTP boot server sends at once; more get 503. Default 1024: each costs a
    /// socket and a mapping, no buffer (files are mmapped).
    #[serde(default = "default_http_streams_max")]
    pub http_streams_max: usize,
    /// Streams one client address may hold at once; more get 429. Default 8: a booting machine
    /// fetches one file at a time (iPXE: kernel, then initrd), and 8 leaves room for retries while
    /// an abandoned stream runs out; one address can then hold at most 8 of `http_streams_max`.
    #[serde(default = "default_http_streams_per_client_max")]
    pub http_streams_per_client_max: usize,
    /// A stream whose client has read nothing for this long (the socket stayed full) is closed
    /// (with a reset, which frees its socket buffers) and its slot freed. Default 30000 ms: iPXE
    /// and firmware read as fast as the link allows; a client silent this long is gone or is
    /// holding a slot on purpose. Since the socket only takes more once a third of its ~1 MiB
    /// buffer is read, a client must also read ~340 KiB per stall timeout to keep its stream.
    #[serde(default = "default_http_stall_timeout_ms")]
    pub http_stall_timeout_ms: u64,
    /// When set, `/metrics` answers only requests with `Authorization: Bearer TOKEN` (Prometheus:
    /// `authorization: { credentials: TOKEN }`). Default unset: the counters are open to anyone
    /// who reaches the HTTP boot port, which on the provisioning network means every machine.
    #[serde(default)]
    pub metrics_bearer_token: Option<String>,
    /// Where Debian's `ipxe` package put the iPXE loaders; copied into the rack's boot files.
    #[serde(default = "default_loaders_dir")]
    pub loaders_dir: PathBuf,
    #[serde(default)]
    pub tftp: TftpConfig,
    pub dhcp: DhcpConfig,
    /// Testing only: flip one byte of the first ranged response for an image file (what a
    /// deploy agent fetches), to prove agents verify every chunk before writing it. Default off.
    #[serde(default)]
    pub fault_corrupt_one_image_range: bool,
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5248))
}
fn default_http_streams_max() -> usize {
    1024
}
fn default_http_streams_per_client_max() -> usize {
    8
}
fn default_http_stall_timeout_ms() -> u64 {
    30_000
}
fn default_loaders_dir() -> PathBuf {
    PathBuf::from("/usr/lib/ipxe")
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TftpConfig {
    /// Default 0.0.0.0:69, where PXE firmware looks.
    pub listen: SocketAddr,
    /// Largest block size granted (RFC 2348). Default 1468: fills a 1500-byte Ethernet frame.
    pub blksize_max: u16,
    /// Largest window granted (RFC 7440). Default 16 blocks in flight.
    pub windowsize_max: u16,
    /// Retransmission timeout when the client asks for none. Default 3000 ms.
    pub timeout_ms: u64,
    /// Largest `timeout` option (RFC 2349) granted. A client asking for more gets an OACK
    /// without the option (RFC 2349 forbids answering another value) and the transfer runs on
    /// `timeout_ms`. Default 10 s: a vanished client then holds its slot for at most
    /// (RETRANSMITS_MAX + 1) × 10 s = 60 s; the client-chosen 255 s held it for 25 minutes.
    pub timeout_s_max: u8,
    /// Transfers at once; more are refused. Default 256: 256 × 16 × 1468 ≈ 6 MiB in flight.
    pub sessions_max: usize,
    /// Transfers to one client address at once; more are refused with an ERROR. Default 4:
    /// firmware fetches one file at a time, and some abort a first request (to learn `tsize`)
    /// and ask again from a new port; one address can then hold at most 4 of `sessions_max`.
    pub sessions_per_client_max: usize,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 69)),
            blksize_max: 1468,
            windowsize_max: 16,
            timeout_ms: 3000,
            timeout_s_max: 10,
            sessions_max: 256,
            sessions_per_client_max: 4,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DhcpMode {
    /// Full DHCP server: leases from `range_start`..=`range_end`.
    Managed,
    /// proxyDHCP beside an existing DHCP server: PXE options only, no addresses.
    Proxy,
    Off,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DhcpConfig {
    pub mode: DhcpMode,
    /// Managed mode: the subnet mask handed out.
    #[serde(default = "default_netmask")]
    pub subnet_mask: Ipv4Addr,
    pub range_start: Option<Ipv4Addr>,
    pub range_end: Option<Ipv4Addr>,
    pub router: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns_servers: Vec<Ipv4Addr>,
    /// Default 3600 s.
    #[serde(default = "default_lease_time")]
    pub lease_time_s: u32,
    /// Leases kept at most (each ~100 bytes, persisted). Default 4096.
    #[serde(default = "default_leases_max")]
    pub leases_max: usize,
    /// Packets handled per client (MAC) per second; more are dropped and counted. Default 20:
    /// firmware retries a few times a second at most.
    #[serde(default = "default_packets_per_s")]
    pub packets_per_s_per_client: u32,
    #[serde(default)]
    pub reservations: Vec<Reservation>,
}

fn default_netmask() -> Ipv4Addr {
    Ipv4Addr::new(255, 255, 255, 0)
}
fn default_lease_time() -> u32 {
    3600
}
fn default_leases_max() -> usize {
    4096
}
fn default_packets_per_s() -> u32 {
    20
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    pub mac: String,
    pub address: Ipv4Addr,
}

impl Default for RackConfig {
    fn default() -> Self {
        RackConfig {
            heartbeat_interval_ms: None,
            retry_backoff_max_ms: 60_000,
            region_request_timeout_ms: 10_000,
            worker_threads: 0,
            pxe: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is invalid")]
    Parse { path: String, source: toml::de::Error },
    #[error("config file {path}: {problem}")]
    Invalid { path: String, problem: &'static str },
}

impl RackConfig {
    /// The runtime's worker threads: `worker_threads`, or one per available core for 0.
    pub fn runtime_worker_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }

    pub fn load(path: &Path) -> Result<RackConfig, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: name.clone(), source })?;
        let config: RackConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: name.clone(), source })?;
        if config.heartbeat_interval_ms == Some(0) {
            return Err(ConfigError::Invalid { path: name, problem: "heartbeat_interval_ms must be above 0" });
        }
        if config.region_request_timeout_ms == 0 || config.retry_backoff_max_ms == 0 {
            return Err(ConfigError::Invalid {
                path: name,
                problem: "region_request_timeout_ms and retry_backoff_max_ms must be above 0",
            });
        }
        if let Some(pxe) = &config.pxe {
            pxe.check().map_err(|problem| ConfigError::Invalid { path: name, problem })?;
        }
        Ok(config)
    }
}

impl PxeConfig {
    fn check(&self) -> Result<(), &'static str> {
        if self.dhcp.mode == DhcpMode::Managed {
            match (self.dhcp.range_start, self.dhcp.range_end) {
                (Some(start), Some(end)) if u32::from(start) <= u32::from(end) => {}
                _ => return Err("pxe.dhcp: managed mode needs range_start <= range_end"),
            }
        }
        if self.tftp.blksize_max < 512 || self.tftp.windowsize_max == 0 {
            return Err("pxe.tftp: blksize_max is at least 512 and windowsize_max at least 1");
        }
        if self.tftp.timeout_s_max == 0 || self.tftp.sessions_per_client_max == 0 {
            return Err("pxe.tftp: timeout_s_max and sessions_per_client_max must be above 0");
        }
        if self.http_streams_per_client_max == 0 || self.http_stall_timeout_ms == 0 {
            return Err("pxe: http_streams_per_client_max and http_stall_timeout_ms must be above 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/rack.toml");
        assert_eq!(RackConfig::load(&path).unwrap(), RackConfig::default());
    }

    #[test]
    fn shipped_pxe_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/rack-pxe.toml");
        let config = RackConfig::load(&path).unwrap();
        let pxe = config.pxe.expect("a [pxe] section");
        assert_eq!(pxe.tftp, TftpConfig::default());
        assert_eq!(pxe.http_streams_per_client_max, default_http_streams_per_client_max());
        assert_eq!(pxe.http_stall_timeout_ms, default_http_stall_timeout_ms());
        assert_eq!(pxe.dhcp.mode, DhcpMode::Managed);
        assert_eq!(pxe.dhcp.reservations.len(), 1);
    }

    #[test]
    fn managed_dhcp_needs_a_range() {
        let text = "[pxe]\ninterface = \"eth1\"\naddress = \"10.0.0.1\"\n[pxe.dhcp]\nmode = \"managed\"\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rack.toml");
        std::fs::write(&path, text).unwrap();
        assert!(RackConfig::load(&path).unwrap_err().to_string().contains("range"));
    }

    #[test]
    fn worker_threads_default_to_the_cores() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(RackConfig::default().runtime_worker_threads(), cores);
        let config: RackConfig = toml::from_str("worker_threads = 3").unwrap();
        assert_eq!(config.runtime_worker_threads(), 3);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<RackConfig>("heartbeat_ms = 5").is_err());
    }
}
