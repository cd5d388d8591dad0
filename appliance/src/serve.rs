//! `rackd serve`, assembled: what the tasks share is built here once (the data dir's paths, the
//! region link, the snapshot store, the boot table, the sync handle, the PXE state), every task
//! is spawned into one tracker, and one cancellation token stops them all.
//!
//! Shutdown (SIGTERM, SIGINT): the listeners stop accepting (DHCP, TFTP, HTTP boot, control
//! socket), heartbeats and sync stop, work in flight gets [`SHUTDOWN_GRACE`] to finish and is
//! abandoned after (partial image files are built to survive that), the DHCP lease journal
//! commits what is queued, and queued boot events get one last try to reach the region
//! ([`EVENTS_LAST_FLUSH_MAX`]). Then `rackd serve` exits 0.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RackConfig;
use crate::control::ControlError;
use crate::data_dir::DataDir;
use crate::pxe::{Pxe, PxeError};
use crate::region_link::{LinkError, RegionLink};
use crate::snapshot::boot_table::BootTable;
use crate::snapshot::{SnapshotError, SnapshotStore};

/// How long work in flight (a boot stream, a TFTP transfer, a sync writing its chunks, a
/// heartbeat) may take to finish after the signal. A service manager's stop timeout is longer
/// (systemd: 90 s), so the rack exits by itself, and a machine mid-boot retries anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The last try to hand queued boot events to the region, after the tasks stopped: short, as
/// the region may be the reason they are queued.
pub const EVENTS_LAST_FLUSH_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot open the snapshot store")]
    Snapshot {
        #[from]
        source: SnapshotError,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Pxe(#[from] PxeError),
}

/// A started rack: every socket bound, every task running.
#[derive(Debug)]
pub struct Daemon {
    tasks: TaskTracker,
    stop: CancellationToken,
    link: Arc<RegionLink>,
    pxe: Option<Arc<Pxe>>,
    http_address: Option<SocketAddr>,
    tftp_address: Option<SocketAddr>,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Tasks still running when [`SHUTDOWN_GRACE`] ran out (abandoned).
    pub tasks_abandoned: usize,
    /// Boot events that could not be handed to the region (kept on disk for the next start).
    pub events_unsent: usize,
}

/// Binds everything and starts the tasks. Fails (before any task runs) when the rack is not
/// registered or a socket cannot be bound.
pub async fn start(data_dir: &DataDir, config: &RackConfig) -> Result<Daemon, ServeError> {
    let link = Arc::new(RegionLink::open(data_dir, Duration::from_millis(config.region_request_timeout_ms))?);
    let store = SnapshotStore::open(data_dir)?;
    let boot_table = BootTable::open(data_dir);
    let boot_table_reader = boot_table.subscribe();
    let power_boots = boot_table.subscribe();
    let (controller, sync) = crate::sync::Controller::new(data_dir, store.clone(), boot_table, link.clone())?;
    let control = crate::control::bind(data_dir.control_socket())?;
    let pxe = match &config.pxe {
        Some(pxe_config) => {
            let status = sync.status.clone();
            let sync_phase = Box::new(move || status.borrow().report.phase);
            let pxe = Pxe::prepare(pxe_config.clone(), data_dir, store, boot_table_reader, sync_phase)?;
            let listeners = crate::pxe::bind(&pxe).await?;
            Some((pxe, listeners))
        }
        None => None,
    };
    // Everything is bound: nothing below fails.
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (http_address, tftp_address, pxe) = match pxe {
        Some((pxe, listeners)) => {
            let addresses = (listeners.http_address().ok(), listeners.tftp_address().ok());
            let retry_backoff_max = Duration::from_millis(config.retry_backoff_max_ms);
            crate::pxe::spawn(listeners, &pxe, link.clone(), retry_backoff_max, &tasks, &stop);
            (addresses.0, addresses.1, Some(pxe))
        }
        None => (None, None, None),
    };
    tasks.spawn(controller.run(stop.clone()));
    let control_stop = stop.clone();
    let control_sync = sync.clone();
    tasks.spawn(async move {
        if let Err(e) = crate::control::serve(control, control_sync, control_stop).await {
            tracing::error!(error = %metalrack_image_tools::error_chain(&e), "control socket stopped");
        }
    });
    // Power requests from the region, run with the drivers (BMC networks are rack-local).
    let power_backoff_max = Duration::from_millis(config.retry_backoff_max_ms);
    let power_run = |request: metalrack_api::power::PowerRequest| async move { crate::power::run(&request).await };
    tasks.spawn(crate::power_requests::run_until_stopped(
        link.clone(),
        power_run,
        power_boots,
        power_backoff_max,
        stop.clone(),
    ));
    let (heartbeat_dir, heartbeat_config, heartbeat_link, heartbeat_stop) =
        (data_dir.clone(), config.clone(), link.clone(), stop.clone());
    tasks.spawn(async move {
        let status = Some(sync.status.clone());
        crate::heartbeat::run(&heartbeat_dir, &heartbeat_config, &heartbeat_link, status, heartbeat_stop).await
    });
    Ok(Daemon { tasks, stop, link, pxe, http_address, tftp_address })
}

/// Runs `rackd serve` until `shutdown` completes, then stops as the module says.
pub async fn run(
    data_dir: &DataDir,
    config: &RackConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    start(data_dir, config).await?.run_until(shutdown).await;
    Ok(())
}

impl Daemon {
    /// Where HTTP boot listens (with PXE).
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.http_address
    }

    /// Where TFTP listens (with PXE).
    pub fn tftp_address(&self) -> Option<SocketAddr> {
        self.tftp_address
    }

    /// Serves until `shutdown` completes, then stops every task (see the module).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Stopped {
        shutdown.await;
        tracing::info!("rack stopping");
        self.stop.cancel();
        self.tasks.close();
        let tasks_abandoned = match tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                tracing::warn!(tasks = self.tasks.len(), grace = ?SHUTDOWN_GRACE, "work in flight abandoned at shutdown");
                self.tasks.len()
            }
        };
        let events_unsent = match &self.pxe {
            Some(pxe) => {
                let never = CancellationToken::new();
                let last_try = crate::pxe::events::flush(&pxe.events, &self.link, &never);
                let _ = tokio::time::timeout(EVENTS_LAST_FLUSH_MAX, last_try).await;
                let unsent = pxe.events.len();
                if unsent > 0 {
                    tracing::warn!(events = unsent, "boot events not handed to the region are kept for the next start");
                }
                unsent
            }
            None => 0,
        };
        tracing::info!("rack stopped");
        Stopped { tasks_abandoned, events_unsent }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Instant;

    use super::*;

    /// A registered rack in a temp dir, its region unreachable (a closed port), with PXE on
    /// loopback ports chosen by the kernel and DHCP off.
    fn rack() -> (tempfile::TempDir, DataDir, RackConfig) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path().join("data"));
        std::fs::create_dir_all(data_dir.root()).unwrap();
        crate::region_link::tests::write_registration(&data_dir, "r1");
        let loaders = dir.path().join("loaders");
        std::fs::create_dir_all(&loaders).unwrap();
        std::fs::write(loaders.join("undionly.kpxe"), b"pretend loader").unwrap();
        let config: RackConfig = toml::from_str(&format!(
            "region_request_timeout_ms = 1000\n\
             [pxe]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\nhttp_listen = \"127.0.0.1:0\"\n\
             loaders_dir = \"{}\"\n[pxe.tftp]\nlisten = \"127.0.0.1:0\"\n[pxe.dhcp]\nmode = \"off\"\n",
            loaders.display()
        ))
        .unwrap();
        (dir, data_dir, config)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_stops_within_the_grace_with_every_task_done() {
        let (_dir, data_dir, config) = rack();
        let daemon = start(&data_dir, &config).await.unwrap();
        let http = daemon.http_address().unwrap();
        // Serving: a loader over HTTP on a connection kept open (an idle keep-alive client must
        // not hold the shutdown up), and the control socket answers.
        let mut client = std::net::TcpStream::connect(http).unwrap();
        client.set_read_timeout(Some(SHUTDOWN_GRACE * 2)).unwrap();
        client.write_all(b"GET /boot/undionly.kpxe HTTP/1.1\r\nHost: rack\r\n\r\n").unwrap();
        // Headers and body may come in separate reads (the body leaves by sendfile).
        let mut head = Vec::new();
        let mut response = vec![0u8; 4096];
        while !head.ends_with(b"pretend loader") {
            let n = client.read(&mut response).unwrap();
            assert!(n > 0, "connection closed early: {}", String::from_utf8_lossy(&head));
            head.extend_from_slice(&response[..n]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
        let control = data_dir.control_socket();
        let status = crate::control::call(&control, hyper::Method::GET, "/status").await.unwrap();
        assert_eq!(status.completed_runs, 0);

        let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
        let stopping = tokio::spawn(daemon.run_until(async move {
            let _ = signalled.await;
        }));
        let sent_at = Instant::now();
        signal.send(()).unwrap();
        let stopped = tokio::time::timeout(SHUTDOWN_GRACE + EVENTS_LAST_FLUSH_MAX, stopping)
            .await
            .expect("serve stops within its bound")
            .unwrap();
        let took = sent_at.elapsed();
        assert_eq!(stopped.tasks_abandoned, 0, "every task ended by itself");
        assert!(took < SHUTDOWN_GRACE, "nothing was in flight, yet stopping took {took:?}");
        // The region is unreachable: the boot event of the loader fetch stays unsent.
        assert_eq!(stopped.events_unsent, 1);
        // Nothing accepts any more, the kept-open connection was closed, the socket file is gone.
        assert_eq!(client.read(&mut response).unwrap(), 0, "the idle connection is closed");
        assert!(std::net::TcpStream::connect(http).is_err(), "HTTP boot still accepts");
        assert!(!control.exists(), "the control socket is removed");
    }

    #[tokio::test]
    async fn an_unregistered_rack_does_not_start() {
        let (_dir, data_dir, config) = rack();
        std::fs::remove_file(data_dir.registration()).unwrap();
        let err = start(&data_dir, &config).await.unwrap_err();
        assert!(matches!(err, ServeError::Link(LinkError::NotRegistered)), "{err}");
        assert!(!data_dir.control_socket().exists(), "nothing bound");
    }
}
