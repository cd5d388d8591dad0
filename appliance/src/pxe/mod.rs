//! PXE for the machines of the rack, from the local snapshot only: DHCP (managed or proxy),
//! TFTP and HTTP boot, per-MAC iPXE scripts from the local boot table, boot events queued for
//! the region, Prometheus metrics. Nothing here asks the region anything at boot time.

pub mod dhcp;
pub mod events;
pub mod http;
pub mod ipxe;
pub mod mapped;
pub mod metrics;
pub mod priority;
pub mod sendfile;
pub mod tftp;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalrack_api::images::SyncPhase;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DhcpMode, PxeConfig};
use crate::data_dir::DataDir;
use crate::snapshot::boot_table::Machines;
use crate::snapshot::SnapshotStore;

/// How long after our iPXE loader went to a client over TFTP its next DHCP request (the loader
/// itself asking) is answered with the HTTP script instead of the loader again.
pub const LOADER_CHAIN_WINDOW: Duration = Duration::from_secs(120);

/// Loaders clients get by firmware, copied from `loaders_dir` into `DATA/boot`.
pub const LOADERS: [&str; 4] = ["undionly.kpxe", "ipxe.efi", "snponly.efi", "ipxe-arm64.efi"];

#[derive(Debug, thiserror::Error)]
pub enum PxeError {
    #[error("cannot prepare boot files in {path}")]
    BootFiles { path: PathBuf, source: std::io::Error },
    #[error("none of the iPXE loaders ({}) is in {dir}; install Debian's ipxe package or set pxe.loaders_dir", LOADERS.join(", "))]
    NoLoaders { dir: PathBuf },
    #[error("cannot start DHCP on {interface}")]
    Dhcp { interface: String, source: std::io::Error },
    #[error("cannot start TFTP on {address}")]
    Tftp { address: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot start HTTP boot on {address}")]
    Http { address: std::net::SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Events(#[from] events::EventJournalError),
}

/// The sync's phase now, for `/metrics` (a function, so PXE does not depend on `sync`).
pub type SyncPhaseFn = Box<dyn Fn() -> SyncPhase + Send + Sync>;

/// What the PXE services share.
pub struct Pxe {
    pub config: PxeConfig,
    pub data_dir: DataDir,
    /// Read only: the current snapshot's files.
    pub store: SnapshotStore,
    pub boot_files_dir: PathBuf,
    /// BLAKE3 of each loader, for HTTP ETags.
    pub loader_hashes: HashMap<String, String>,
    pub boot_table: tokio::sync::watch::Receiver<Machines>,
    pub sync_phase: SyncPhaseFn,
    pub events: events::EventQueue,
    pub metrics: metrics::Metrics,
    /// Client address → when our loader was last sent to it over TFTP.
    pub loader_sent: Mutex<HashMap<Ipv4Addr, Instant>>,
    /// Client address → MAC, from DHCP, so TFTP and HTTP events name the machine.
    pub macs_by_address: Mutex<HashMap<Ipv4Addr, String>>,
}

impl std::fmt::Debug for Pxe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pxe").field("config", &self.config).field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

impl Pxe {
    /// Base URL of the HTTP boot server as machines reach it.
    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.config.address, self.config.http_listen.port())
    }

    pub fn mac_of(&self, address: Ipv4Addr) -> String {
        self.macs_by_address.lock().expect("lock").get(&address).cloned().unwrap_or_else(|| address.to_string())
    }

    pub fn record(&self, mac: &str, kind: &str, message: String) {
        tracing::debug!(%mac, kind, %message, "boot event");
        self.events.push(mac, kind, message);
    }
}

/// Copies the loaders into `DATA/boot` (the TFTP root) and hashes them.
fn prepare_boot_files(config: &PxeConfig, dir: &Path) -> Result<HashMap<String, String>, PxeError> {
    let fail = |source| PxeError::BootFiles { path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut hashes = HashMap::new();
    for name in LOADERS {
        let source = config.loaders_dir.join(name);
        if let Ok(bytes) = std::fs::read(&source) {
            metalrack_image_tools::private_file::write_private_file(&dir.join(name), &bytes).map_err(fail)?;
            hashes.insert(name.to_owned(), blake3::hash(&bytes).to_hex().to_string());
        }
    }
    if hashes.is_empty() {
        return Err(PxeError::NoLoaders { dir: config.loaders_dir.clone() });
    }
    Ok(hashes)
}

impl Pxe {
    /// Prepares the boot files (loaders copied into `DATA/boot`) and the shared state.
    pub fn prepare(
        config: PxeConfig,
        data_dir: &DataDir,
        store: SnapshotStore,
        boot_table: tokio::sync::watch::Receiver<Machines>,
        sync_phase: SyncPhaseFn,
    ) -> Result<Arc<Pxe>, PxeError> {
        let boot_files_dir = data_dir.boot_files();
        let loader_hashes = prepare_boot_files(&config, &boot_files_dir)?;
        let metrics = metrics::Metrics::new();
        let events = events::EventQueue::open(data_dir, metrics.boot_events.clone())?;
        Ok(Arc::new(Pxe {
            config,
            data_dir: data_dir.clone(),
            store,
            boot_files_dir,
            loader_hashes,
            boot_table,
            sync_phase,
            events,
            metrics,
            loader_sent: Mutex::default(),
            macs_by_address: Mutex::default(),
        }))
    }
}

/// The PXE sockets, bound (so a port in use fails `rackd serve` at start, not later).
#[derive(Debug)]
pub struct Listeners {
    http: tokio::net::TcpListener,
    tftp: tftp::TftpServer,
    dhcp: Vec<(tokio::net::UdpSocket, u16)>,
}

impl Listeners {
    pub fn http_address(&self) -> std::io::Result<std::net::SocketAddr> {
        self.http.local_addr()
    }

    pub fn tftp_address(&self) -> std::io::Result<std::net::SocketAddr> {
        self.tftp.local_addr()
    }
}

/// Binds HTTP boot, TFTP and (unless off) DHCP.
pub async fn bind(pxe: &Arc<Pxe>) -> Result<Listeners, PxeError> {
    let config = &pxe.config;
    let http = http::bind(config).await?;
    let address = http.local_addr().map_err(|source| PxeError::Http { address: config.http_listen, source })?;
    tracing::info!(%address, "HTTP boot listening");
    let tftp = tftp::bind(pxe.clone()).await?;
    let address = tftp.local_addr().map_err(|source| PxeError::Tftp { address: config.tftp.listen, source })?;
    tracing::info!(%address, "TFTP listening");
    let dhcp = if config.dhcp.mode == DhcpMode::Off { Vec::new() } else { dhcp::bind(config)? };
    Ok(Listeners { http, tftp, dhcp })
}

/// Serves DHCP, TFTP, HTTP boot and flushes boot events to the region (retrying up to
/// `retry_backoff_max` apart), each a task in `tasks`, until `shutdown`: then the listeners stop
/// accepting, the lease journal is flushed, and what is in flight finishes (the caller bounds how
/// long it waits). Queued boot events are left for the caller's last flush, and on disk.
pub fn spawn(
    listeners: Listeners,
    pxe: &Arc<Pxe>,
    link: Arc<crate::region_link::RegionLink>,
    retry_backoff_max: Duration,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let Listeners { http, tftp, dhcp } = listeners;
    tasks.spawn(http::serve(http, pxe.clone(), tasks.clone(), shutdown.clone()));
    tasks.spawn(tftp.serve(tasks.clone(), shutdown.clone()));
    for socket in dhcp {
        tasks.spawn(dhcp::serve(socket, pxe.clone(), shutdown.clone()));
    }
    tasks.spawn(events::flush_until_stopped(pxe.clone(), link, retry_backoff_max, shutdown.clone()));
    let config = &pxe.config;
    tracing::info!(interface = %config.interface, address = %config.address, dhcp = ?config.dhcp.mode, "PXE serving");
}
