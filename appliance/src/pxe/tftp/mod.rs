//! TFTP, read-only: the iPXE loaders and the current snapshot's files under `images/`. blksize,
//! windowsize (RFC 7440) and timeout are negotiated within the configured caps (a timeout above
//! its cap is left out of the OACK), tsize is answered. One client address runs at most
//! `sessions_per_client_max` transfers. No path leaves its root: `..`, absolute paths and symlinks pointing out are
//! refused and recorded. Writes are refused.
//!
//! The listener on port 69 only parses requests (malformed datagrams are dropped and counted)
//! and hands each read to its own task with its own socket (`session.rs`), so transfers spread
//! over the runtime's worker threads and one slow client stalls nobody. A window of blocks goes
//! out in one system call, straight from the file's mapping (`send.rs`).
//!
//! This replaced the async-tftp crate, which ran every session on one async-executor thread
//! and sent one `sendto` per block: at 64 clients the rack's TFTP saturated one core at
//! dnsmasq's speed. Its packet types are private, so neither the data path nor the wire format
//! could be reused; [`wire`] is ours, smoltcp-style.

mod send;
mod session;
pub mod transfer;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::send::SendPath;
use self::session::{Negotiated, Sent};
use self::wire::{ErrorCode, Mode, Options, Repr};
use super::metrics::Metrics;
use super::{Pxe, PxeError, LOADERS};

pub use self::session::{negotiate, RETRANSMITS_MAX};

/// Longest request read on port 69. RFC 2347 keeps a request with its options within 512
/// bytes; a longer datagram is truncated by the kernel and then fails to parse.
const REQUEST_LEN_MAX: usize = 1024;

/// After the listening socket reports an error (rare: out of memory, a closed interface), wait
/// this long before reading again so a persistent error cannot spin a core.
const LISTEN_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Escape,
    NotFound,
}

/// Maps a requested name to a file: `images/...` from the current snapshot, anything else from
/// the boot files (loaders). Canonicalizes, so a symlink pointing outside its root is caught.
pub fn resolve(boot_files: &Path, snapshot: Option<&Path>, requested: &Path) -> Result<PathBuf, Refusal> {
    let mut components = requested.components().peekable();
    if components.clone().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(Refusal::Escape); // `..`, an absolute path, or a prefix
    }
    while components.peek() == Some(&Component::CurDir) {
        components.next();
    }
    let rest: PathBuf = components.collect();
    let (root, relative) = match rest.strip_prefix("images") {
        Ok(inside) => (snapshot.ok_or(Refusal::NotFound)?.to_owned(), inside.to_owned()),
        Err(_) => (boot_files.to_owned(), rest),
    };
    let root = root.canonicalize().map_err(|_| Refusal::NotFound)?;
    let full = root.join(&relative).canonicalize().map_err(|_| Refusal::NotFound)?;
    if !full.starts_with(&root) {
        return Err(Refusal::Escape);
    }
    if !full.is_file() {
        return Err(Refusal::NotFound);
    }
    Ok(full)
}

/// The TFTP service: the socket on port 69 and what its sessions share.
#[derive(Debug)]
pub struct TftpServer {
    socket: UdpSocket,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    pxe: Arc<Pxe>,
    /// One permit per running transfer (`sessions_max`); a request finding none is refused.
    sessions: Arc<Semaphore>,
    /// Clients with a transfer running, and how many each address has: a retransmitted RRQ
    /// (the OACK was slow or lost) must not start a second transfer to the same port, and one
    /// address holds at most `sessions_per_client_max` of the `sessions_max` slots. Entries
    /// live as long as their session (a request refused for lack of a slot removes its own), so
    /// both tables hold at most `sessions_max` entries.
    peers: Mutex<Peers>,
    /// Sessions bind here (port 0): the listener's address, so replies leave from it.
    session_ip: IpAddr,
    send_path: SendPath,
}

/// The clients with a transfer running (see `Shared::peers`).
#[derive(Debug, Default)]
struct Peers {
    ports: HashSet<SocketAddr>,
    sessions_by_address: HashMap<IpAddr, usize>,
}

/// Why a request from a client gets no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerRefusal {
    /// A transfer to the same address and port is running (a retransmitted RRQ).
    Repeated,
    /// The address has `sessions_per_client_max` transfers running.
    AddressFull,
}

impl Peers {
    /// Counts a session for `peer`, or says why not.
    fn admit(&mut self, peer: SocketAddr, per_address_max: usize) -> Result<(), PeerRefusal> {
        if self.ports.contains(&peer) {
            return Err(PeerRefusal::Repeated);
        }
        let sessions = self.sessions_by_address.entry(peer.ip()).or_default();
        if *sessions >= per_address_max {
            return Err(PeerRefusal::AddressFull);
        }
        *sessions += 1;
        self.ports.insert(peer);
        Ok(())
    }

    /// Called from a guard's `drop`, under the lock: a broken count is a bug, but a panic here
    /// would poison the lock and stop TFTP, so it is only asserted in debug builds.
    fn release(&mut self, peer: SocketAddr) {
        let removed = self.ports.remove(&peer);
        debug_assert!(removed, "released a session that was not counted: {peer}");
        let address = peer.ip();
        if let Some(sessions) = self.sessions_by_address.get_mut(&address) {
            *sessions = sessions.saturating_sub(1);
            if *sessions == 0 {
                self.sessions_by_address.remove(&address);
            }
        }
        debug_assert_eq!(self.sessions_by_address.values().sum::<usize>(), self.ports.len());
    }
}

/// Binds the TFTP socket on the configured address.
pub async fn bind(pxe: Arc<Pxe>) -> Result<TftpServer, PxeError> {
    bind_with(pxe, SendPath::Gso).await
}

async fn bind_with(pxe: Arc<Pxe>, send_path: SendPath) -> Result<TftpServer, PxeError> {
    let address = pxe.config.tftp.listen;
    let socket = UdpSocket::bind(address).await.map_err(|source| PxeError::Tftp { address, source })?;
    let sessions = Arc::new(Semaphore::new(pxe.config.tftp.sessions_max));
    let shared = Shared { pxe, sessions, peers: Mutex::default(), session_ip: address.ip(), send_path };
    Ok(TftpServer { socket, shared: Arc::new(shared) })
}

impl TftpServer {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answers requests until `shutdown`. Transfers are tasks in `tasks`: at shutdown those
    /// running go on to their end (the caller bounds how long it waits for them).
    pub async fn serve(self, tasks: TaskTracker, shutdown: CancellationToken) {
        let mut buf = [0u8; REQUEST_LEN_MAX];
        loop {
            let received = tokio::select! {
                received = self.socket.recv_from(&mut buf) => received,
                () = shutdown.cancelled() => break,
            };
            match received {
                Ok((len, peer)) => self.shared.handle_request(&self.socket, &buf[..len], peer, &tasks),
                Err(error) => {
                    tracing::warn!(%error, "TFTP socket cannot receive");
                    tokio::time::sleep(LISTEN_ERROR_PAUSE).await;
                }
            }
        }
        tracing::debug!("TFTP stopped accepting");
    }
}

/// Frees a client's entry in `Shared::peers` when its session ends, however it ends.
struct PeerGuard {
    shared: Arc<Shared>,
    peer: SocketAddr,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        self.shared.peers.lock().expect("lock").release(self.peer);
    }
}

/// Counts a running transfer in the active gauge for as long as it lives.
struct ActiveGuard<'m>(&'m Metrics);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.tftp_sessions_active.dec();
    }
}

/// A read request, owned so its session task can keep it.
#[derive(Debug)]
struct ReadRequest {
    filename: String,
    mode: Mode,
    options: Options,
}

impl Shared {
    fn drop_packet(&self, peer: SocketAddr, kind: &str, error: &dyn std::fmt::Display) {
        Metrics::count(&self.pxe.metrics.tftp_dropped, kind);
        tracing::debug!(%peer, kind, %error, "TFTP packet dropped");
    }

    /// Handles one datagram to port 69. Never waits: transfers run in their own tasks, and a
    /// refusal sent from here is one non-blocking send that is dropped if the socket is full.
    fn handle_request(self: &Arc<Self>, listener: &UdpSocket, bytes: &[u8], peer: SocketAddr, tasks: &TaskTracker) {
        let request = match wire::parse(bytes) {
            Ok(request) => request,
            Err(error) => return self.drop_packet(peer, "malformed", &error),
        };
        let (filename, mode, options) = match request {
            Repr::ReadRequest { filename, mode, options } => (filename, mode, options),
            Repr::WriteRequest { filename, .. } => {
                self.refuse(peer, Path::new(filename), "writes are not allowed");
                return reply_error(listener, peer, ErrorCode::IllegalOperation, "read-only server");
            }
            other => return self.drop_packet(peer, "not_a_request", &format_args!("{other:?}")),
        };
        let admitted = self.peers.lock().expect("lock").admit(peer, self.pxe.config.tftp.sessions_per_client_max);
        match admitted {
            Ok(()) => {}
            Err(PeerRefusal::Repeated) => {
                return self.drop_packet(peer, "repeated_request", &format_args!("transfer to {peer} running"));
            }
            Err(PeerRefusal::AddressFull) => {
                self.refuse(peer, Path::new(filename), "too many TFTP sessions from this address");
                return reply_error(listener, peer, ErrorCode::NotDefined, "too many transfers from your address");
            }
        }
        let guard = PeerGuard { shared: self.clone(), peer };
        let Ok(permit) = self.sessions.clone().try_acquire_owned() else {
            self.refuse(peer, Path::new(filename), "too many TFTP sessions");
            return reply_error(listener, peer, ErrorCode::NotDefined, "server busy, retry");
        };
        let request = ReadRequest { filename: filename.to_owned(), mode, options };
        tasks.spawn(self.clone().run_session(peer, request, permit, guard));
    }

    fn refuse(&self, client: SocketAddr, path: &Path, why: &str) {
        self.pxe.metrics.tftp_refused.inc();
        let mac = match client.ip() {
            IpAddr::V4(v4) => self.pxe.mac_of(v4),
            IpAddr::V6(v6) => v6.to_string(),
        };
        // The name is the client's choice: no control characters reach the log.
        let shown = path.to_string_lossy();
        let shown = metalrack_image_tools::log_safe::escape_control(&shown);
        tracing::warn!(%client, path = %shown, why, "TFTP request refused");
        self.pxe.record(&mac, "boot.refused", format!("TFTP {shown} refused: {why}"));
    }

    /// Finds and maps the requested file, or says why not (with the error to send).
    fn open(&self, client: SocketAddr, request: &ReadRequest) -> Result<memmap2::Mmap, (ErrorCode, &'static str)> {
        let path = Path::new(&request.filename);
        if request.mode == Mode::Mail {
            self.refuse(client, path, "mail mode");
            return Err((ErrorCode::IllegalOperation, "mail mode is not supported"));
        }
        let snapshot = self.pxe.store.current_link();
        let snapshot = snapshot.exists().then_some(snapshot);
        let full = match resolve(&self.pxe.boot_files_dir, snapshot.as_deref(), path) {
            Ok(full) => full,
            Err(Refusal::Escape) => {
                self.refuse(client, path, "path leaves the TFTP root");
                return Err((ErrorCode::AccessViolation, "access violation"));
            }
            Err(Refusal::NotFound) => {
                self.refuse(client, path, "no such file");
                return Err((ErrorCode::FileNotFound, "file not found"));
            }
        };
        // Files are immutable once published (snapshot invariant), so the mapping stays valid.
        let opened = std::fs::File::open(&full).and_then(|file| super::mapped::map_immutable(&file));
        let map = opened.map_err(|_| {
            self.refuse(client, path, "cannot open file");
            (ErrorCode::FileNotFound, "file not found")
        })?;
        if let IpAddr::V4(v4) = client.ip() {
            if LOADERS.iter().any(|l| Path::new(l) == path) {
                self.pxe.loader_sent.lock().expect("lock").record(v4, Instant::now());
            }
            let mac = self.pxe.mac_of(v4);
            let len = map.len();
            self.pxe.record(&mac, "boot.tftp", format!("TFTP {} ({len} bytes) to {client}", path.display()));
        }
        Ok(map)
    }

    /// One transfer, start to end, in its own task.
    async fn run_session(
        self: Arc<Self>,
        peer: SocketAddr,
        request: ReadRequest,
        _permit: OwnedSemaphorePermit,
        _guard: PeerGuard,
    ) {
        let socket = match session_socket(self.session_ip, peer).await {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%peer, %error, "cannot open a TFTP session socket");
                return Metrics::count(&self.pxe.metrics.tftp_failed, "socket");
            }
        };
        let map = match self.open(peer, &request) {
            Ok(map) => map,
            Err((code, message)) => return session::send_error(&socket, peer, code, message).await,
        };
        let metrics = &self.pxe.metrics;
        metrics.tftp_sessions.inc();
        metrics.tftp_sessions_active.inc();
        let _active = ActiveGuard(metrics);
        let negotiated: Negotiated = negotiate(&request.options, &self.pxe.config.tftp, map.len() as u64);
        let started = Instant::now();
        let mut sent = Sent::default();
        let outcome = session::transfer(&socket, peer, &map, negotiated, self.send_path, &mut sent, |bytes| {
            metrics.tftp_bytes.inc_by(bytes);
        })
        .await;
        metrics.tftp_retransmits.inc_by(sent.retransmits);
        let (blksize, windowsize, elapsed) = (negotiated.blksize, negotiated.windowsize, started.elapsed());
        match outcome {
            Ok(()) => tracing::debug!(
                %peer, file = request.filename, bytes = map.len(), blksize, windowsize,
                retransmits = sent.retransmits, ?elapsed, "TFTP transfer done"
            ),
            Err(error) => {
                Metrics::count(&metrics.tftp_failed, error.kind());
                if let session::SessionError::IllegalOperation { .. } = error {
                    session::send_error(&socket, peer, ErrorCode::IllegalOperation, "expected an ACK").await;
                }
                tracing::info!(
                    %peer, file = request.filename, error = %error, sent_bytes = sent.fresh_bytes,
                    retransmits = sent.retransmits, ?elapsed, "TFTP transfer failed"
                );
            }
        }
    }
}

/// A new UDP socket for one transfer, on a fresh port and connected to the client, so the
/// kernel hands it only that client's packets and reports the client's port closing.
async fn session_socket(ip: IpAddr, peer: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
    socket.connect(peer).await?;
    Ok(socket)
}

/// An ERROR from port 69 for a request that gets no session (a write, or no slot left).
/// Non-blocking and never retried: a flood of such requests costs one send each at most.
fn reply_error(listener: &UdpSocket, peer: SocketAddr, code: ErrorCode, message: &str) {
    let bytes = Repr::Error { code, message }.to_bytes();
    if let Err(error) = listener.try_send_to(&bytes, peer) {
        tracing::debug!(%peer, %error, "cannot send TFTP error");
    }
}

#[cfg(test)]
mod tests;
