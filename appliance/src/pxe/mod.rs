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

use metalrack_api::machines::MachineBoot;
use tokio::sync::watch;

use crate::config::{DhcpMode, PxeConfig};
use crate::sync::layout::Layout;
use crate::sync::LocalStatus;

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
}

/// What the PXE services share.
#[derive(Debug)]
pub struct Pxe {
    pub config: PxeConfig,
    pub data_dir: PathBuf,
    pub layout: Layout,
    pub boot_files_dir: PathBuf,
    /// BLAKE3 of each loader, for HTTP ETags.
    pub loader_hashes: HashMap<String, String>,
    pub boot_table: watch::Receiver<Arc<Vec<MachineBoot>>>,
    pub sync_status: watch::Receiver<LocalStatus>,
    pub events: events::EventQueue,
    pub metrics: metrics::Metrics,
    /// Client address → when our loader was last sent to it over TFTP.
    pub loader_sent: Mutex<HashMap<Ipv4Addr, Instant>>,
    /// Client address → MAC, from DHCP, so TFTP and HTTP events name the machine.
    pub macs_by_address: Mutex<HashMap<Ipv4Addr, String>>,
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

/// Starts DHCP, TFTP, HTTP boot and the event flusher. They run until the process exits.
pub async fn start(
    config: PxeConfig,
    data_dir: PathBuf,
    boot_table: watch::Receiver<Arc<Vec<MachineBoot>>>,
    sync_status: watch::Receiver<LocalStatus>,
) -> Result<Arc<Pxe>, PxeError> {
    let boot_files_dir = data_dir.join("boot");
    let loader_hashes = prepare_boot_files(&config, &boot_files_dir)?;
    let layout = Layout::open(&data_dir).map_err(|e| PxeError::BootFiles {
        path: data_dir.join("images"),
        source: std::io::Error::other(e.to_string()),
    })?;
    let pxe = Arc::new(Pxe {
        config: config.clone(),
        data_dir: data_dir.clone(),
        layout,
        boot_files_dir,
        loader_hashes,
        boot_table,
        sync_status,
        events: events::EventQueue::default(),
        metrics: metrics::Metrics::new(),
        loader_sent: Mutex::default(),
        macs_by_address: Mutex::default(),
    });
    let http = http::bind(&config).await?;
    tracing::info!(address = %http.local_addr().map_err(|source| PxeError::Http { address: config.http_listen, source })?, "HTTP boot listening");
    tokio::spawn(http::serve(http, pxe.clone()));
    let tftp = tftp::bind(pxe.clone()).await?;
    let tftp_address = config.tftp.listen;
    tracing::info!(address = %tftp.local_addr().map_err(|source| PxeError::Tftp { address: tftp_address, source })?, "TFTP listening");
    tokio::spawn(tftp.serve());
    if config.dhcp.mode != DhcpMode::Off {
        let servers = dhcp::bind(&config)?;
        for socket in servers {
            tokio::spawn(dhcp::serve(socket, pxe.clone()));
        }
    }
    tokio::spawn(events::flush_forever(pxe.clone()));
    tracing::info!(interface = %config.interface, address = %config.address, dhcp = ?config.dhcp.mode, "PXE serving");
    Ok(pxe)
}
