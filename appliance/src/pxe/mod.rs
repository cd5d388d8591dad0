//! PXE for the machines of the rack, from the local snapshot only: DHCP (managed or proxy),
//! TFTP and HTTP boot, per-MAC iPXE scripts from the local boot table, boot events queued for
//! the region, Prometheus metrics. Nothing here asks the region anything at boot time.

pub mod agent;
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
use crate::snapshot::boot_table::{DeploysDone, Machines};
use crate::snapshot::SnapshotStore;

/// How long after our iPXE loader went to a client over TFTP its next DHCP request (the loader
/// itself asking) is answered with the HTTP script instead of the loader again.
pub const LOADER_CHAIN_WINDOW: Duration = Duration::from_secs(120);

/// Clients remembered as having just fetched our loader. Default-sized racks boot a few
/// thousand machines (`leases_max` 4096); 16384 entries cost ~0.6 MiB. Only spoofed TFTP
/// requests from many addresses fill it, and then the oldest are forgotten: such a client's
/// next DHCP request gets the loader once more instead of its script (one extra download).
pub const LOADER_SENT_CLIENTS_MAX: usize = 16_384;

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
    /// Deploys the agent reported finished here, which the region may not know yet.
    pub deploys_done: DeploysDone,
    /// The test fault hook (`fault_corrupt_one_image_range`), disarmed once used.
    pub fault_armed: std::sync::atomic::AtomicBool,
    pub sync_phase: SyncPhaseFn,
    pub events: events::EventQueue,
    pub metrics: metrics::Metrics,
    /// Clients our loader was recently sent to over TFTP.
    pub loader_sent: Mutex<LoaderSent>,
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

/// Client address → when our loader was last sent to it over TFTP, for at most
/// [`LOADER_SENT_CLIENTS_MAX`] clients; entries older than [`LOADER_CHAIN_WINDOW`] say nothing
/// and are pruned first.
#[derive(Debug, Default)]
pub struct LoaderSent {
    sent_at: HashMap<Ipv4Addr, Instant>,
}

impl LoaderSent {
    /// Our loader went to `address` at `now`.
    pub fn record(&mut self, address: Ipv4Addr, now: Instant) {
        if !self.sent_at.contains_key(&address) {
            make_room(&mut self.sent_at, LOADER_SENT_CLIENTS_MAX, now, LOADER_CHAIN_WINDOW, |sent| *sent);
        }
        self.sent_at.insert(address, now);
        assert!(self.sent_at.len() <= LOADER_SENT_CLIENTS_MAX);
    }

    /// Whether our loader went to `address` within [`LOADER_CHAIN_WINDOW`] before `now`.
    pub fn just_sent(&self, address: Ipv4Addr, now: Instant) -> bool {
        self.sent_at.get(&address).is_some_and(|sent| now.saturating_duration_since(*sent) < LOADER_CHAIN_WINDOW)
    }

    pub fn len(&self) -> usize {
        self.sent_at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent_at.is_empty()
    }
}

/// Makes room for one more entry in a per-client table that may hold `max`: once full, drops
/// the entries not seen for `stale_after` before `now` (they no longer change any answer), and if more
/// than three quarters remain, the least recently seen down to three quarters. A flood of
/// distinct clients (spoofed MACs or addresses) then keeps the table at `max`, and each O(n)
/// pass frees at least `max / 4` entries, so the cost per new client stays O(1) on average
/// (checking the whole table on every insert made a flood quadratic).
pub fn make_room<K: Eq + std::hash::Hash, V>(
    table: &mut HashMap<K, V>,
    max: usize,
    now: Instant,
    stale_after: Duration,
    last_seen: impl Fn(&V) -> Instant,
) {
    assert!(max > 0, "a table with room for nothing");
    if table.len() < max {
        return;
    }
    table.retain(|_, value| now.saturating_duration_since(last_seen(value)) < stale_after);
    let keep = max - max / 4 - 1;
    if table.len() > keep {
        let mut seen: Vec<Instant> = table.values().map(&last_seen).collect();
        let excess = table.len() - keep;
        let (_, &mut cutoff, _) = seen.select_nth_unstable(excess - 1);
        table.retain(|_, value| last_seen(value) > cutoff);
    }
    assert!(table.len() < max, "room made for one more");
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
            fault_armed: std::sync::atomic::AtomicBool::new(config.fault_corrupt_one_image_range),
            config,
            data_dir: data_dir.clone(),
            store,
            boot_files_dir,
            loader_hashes,
            boot_table,
            deploys_done: DeploysDone::open(data_dir),
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
    tasks.spawn(forget_finished_deploys(pxe.clone(), shutdown.clone()));
    let config = &pxe.config;
    tracing::info!(interface = %config.interface, address = %config.address, dhcp = ?config.dhcp.mode, "PXE serving");
}

#[cfg(test)]
impl Pxe {
    /// The shared state for a test server: `boot_files_dir` is `DATA/boot` (the caller fills
    /// it), nothing prepared, no loader hashes.
    pub fn for_test(
        config: PxeConfig,
        data_dir: DataDir,
        boot_table: tokio::sync::watch::Receiver<Machines>,
    ) -> Arc<Pxe> {
        let store = SnapshotStore::open(&data_dir).expect("snapshot store");
        let metrics = metrics::Metrics::new();
        let events = events::EventQueue::open(&data_dir, metrics.boot_events.clone()).expect("event queue");
        Arc::new(Pxe {
            fault_armed: std::sync::atomic::AtomicBool::new(config.fault_corrupt_one_image_range),
            config,
            boot_files_dir: data_dir.boot_files(),
            deploys_done: DeploysDone::open(&data_dir),
            data_dir,
            store,
            loader_hashes: HashMap::new(),
            boot_table,
            sync_phase: Box::new(Default::default),
            events,
            metrics,
            loader_sent: Mutex::default(),
            macs_by_address: Mutex::default(),
        })
    }
}

/// Forgets finished deploys once the region's table has moved on from them (see
/// [`DeploysDone::prune`]), at each new table.
async fn forget_finished_deploys(pxe: Arc<Pxe>, shutdown: CancellationToken) {
    let mut table = pxe.boot_table.clone();
    loop {
        let boots = table.borrow_and_update().clone();
        pxe.deploys_done.prune(&boots);
        tokio::select! {
            changed = table.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_room_drops_stale_entries_first_then_the_least_recently_seen() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut table: HashMap<u32, Instant> = (0..8).map(|i| (i, at(u64::from(i)))).collect();
        make_room(&mut table, 8, at(10), Duration::from_secs(5), |seen| *seen);
        // Seen at 0..=5 are stale at 10; 6 and 7 stay.
        assert_eq!(table.keys().copied().collect::<std::collections::BTreeSet<_>>(), [6, 7].into());
        let mut table: HashMap<u32, Instant> = (0..8).map(|i| (i, at(u64::from(i)))).collect();
        make_room(&mut table, 8, at(7), Duration::from_secs(60), |seen| *seen);
        // Nothing stale: the oldest go until 8 - 2 - 1 = 5 remain.
        assert_eq!(table.keys().copied().collect::<std::collections::BTreeSet<_>>(), [3, 4, 5, 6, 7].into());
        let mut small: HashMap<u32, Instant> = (0..3).map(|i| (i, at(0))).collect();
        make_room(&mut small, 8, at(100), Duration::from_secs(1), |seen| *seen);
        assert_eq!(small.len(), 3, "not full: nothing dropped");
    }

    #[test]
    fn the_loader_table_forgets_after_the_chain_window_and_stays_bounded() {
        let start = Instant::now();
        let address = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
        let mut sent = LoaderSent::default();
        sent.record(address(1), start);
        assert!(sent.just_sent(address(1), start + LOADER_CHAIN_WINDOW / 2));
        assert!(!sent.just_sent(address(1), start + LOADER_CHAIN_WINDOW));
        assert!(!sent.just_sent(address(2), start));
        for i in 0..100_000 {
            sent.record(address(i), start + Duration::from_millis(u64::from(i)));
            assert!(sent.len() <= LOADER_SENT_CLIENTS_MAX);
        }
        let end = start + Duration::from_millis(100_000);
        assert!(sent.just_sent(address(99_999), end), "the latest are kept");
        assert!(!sent.just_sent(address(0), end), "the oldest were forgotten");
    }
}
