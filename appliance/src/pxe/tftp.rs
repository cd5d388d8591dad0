//! TFTP (async-tftp), read-only: the iPXE loaders and the current snapshot's files under
//! `images/`. blksize, windowsize and timeout are negotiated within the configured caps. No path
//! leaves its root: `..`, absolute paths and symlinks pointing out are refused and recorded.

use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_tftp::packet;
use async_tftp::server::{Handler, TftpServer, TftpServerBuilder};
use futures_lite::io::{AsyncRead, Cursor};

use super::{Pxe, PxeError, LOADERS};

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

/// A file being sent: counts bytes and sessions, and frees its session slot when dropped.
pub struct Session {
    data: Cursor<memmap2::Mmap>,
    pxe: Arc<Pxe>,
    active: Arc<AtomicUsize>,
}

impl AsyncRead for Session {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.data).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.pxe.metrics.tftp_bytes.inc_by(*n as u64);
        }
        result
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.pxe.metrics.tftp_sessions_active.dec();
    }
}

struct SnapshotHandler {
    pxe: Arc<Pxe>,
    active: Arc<AtomicUsize>,
}

impl SnapshotHandler {
    fn refuse(&self, client: &SocketAddr, path: &Path, why: &str) {
        self.pxe.metrics.tftp_refused.inc();
        let mac = match client.ip() {
            IpAddr::V4(v4) => self.pxe.mac_of(v4),
            IpAddr::V6(v6) => v6.to_string(),
        };
        tracing::warn!(%client, path = %path.display(), why, "TFTP request refused");
        self.pxe.record(&mac, "boot.refused", format!("TFTP {} refused: {why}", path.display()));
    }
}

impl Handler for SnapshotHandler {
    type Reader = Session;
    type Writer = futures_lite::io::Sink;

    async fn read_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
    ) -> Result<(Session, Option<u64>), packet::Error> {
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.pxe.config.tftp.sessions_max {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.refuse(client, path, "too many TFTP sessions");
            return Err(packet::Error::Msg("server busy, retry".into()));
        }
        let snapshot = self.pxe.layout.current_link();
        let snapshot = snapshot.exists().then_some(snapshot);
        let resolved = resolve(&self.pxe.boot_files_dir, snapshot.as_deref(), path);
        let full = match resolved {
            Ok(full) => full,
            Err(refusal) => {
                self.active.fetch_sub(1, Ordering::SeqCst);
                let (why, error) = match refusal {
                    Refusal::Escape => ("path leaves the TFTP root", packet::Error::PermissionDenied),
                    Refusal::NotFound => ("no such file", packet::Error::FileNotFound),
                };
                self.refuse(client, path, why);
                return Err(error);
            }
        };
        let opened = std::fs::File::open(&full).and_then(|file| {
            // Files are immutable once published (snapshot invariant), so the mapping stays valid.
            super::mapped::map_immutable(&file)
        });
        let map = match opened {
            Ok(map) => map,
            Err(_) => {
                self.active.fetch_sub(1, Ordering::SeqCst);
                self.refuse(client, path, "cannot open file");
                return Err(packet::Error::FileNotFound);
            }
        };
        let len = map.len() as u64;
        if let IpAddr::V4(v4) = client.ip() {
            if LOADERS.iter().any(|l| Path::new(l) == path) {
                self.pxe.loader_sent.lock().expect("lock").insert(v4, Instant::now());
            }
            let mac = self.pxe.mac_of(v4);
            self.pxe.record(&mac, "boot.tftp", format!("TFTP {} ({len} bytes) to {client}", path.display()));
        }
        self.pxe.metrics.tftp_sessions.inc();
        self.pxe.metrics.tftp_sessions_active.inc();
        Ok((Session { data: Cursor::new(map), pxe: self.pxe.clone(), active: self.active.clone() }, Some(len)))
    }

    async fn write_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
        _size: Option<u64>,
    ) -> Result<Self::Writer, packet::Error> {
        self.refuse(client, path, "writes are not allowed");
        Err(packet::Error::IllegalOperation)
    }
}

/// Builds the TFTP server on the configured address with the configured caps.
pub async fn build(pxe: Arc<Pxe>) -> Result<TftpServer<impl Handler>, PxeError> {
    let config = pxe.config.tftp.clone();
    let handler = SnapshotHandler { pxe, active: Arc::default() };
    TftpServerBuilder::with_handler(handler)
        .bind(config.listen)
        .block_size_limit(config.blksize_max)
        .window_size_limit(config.windowsize_max)
        .timeout(Duration::from_millis(config.timeout_ms))
        .build()
        .await
        .map_err(|source| PxeError::Tftp { address: config.listen, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_their_roots() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        let snap = dir.path().join("snap");
        std::fs::create_dir_all(snap.join("ubuntu/amd64/1")).unwrap();
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::write(boot.join("undionly.kpxe"), b"x").unwrap();
        std::fs::write(snap.join("ubuntu/amd64/1/kernel"), b"k").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), boot.join("link-out")).unwrap();

        assert!(resolve(&boot, Some(&snap), Path::new("undionly.kpxe")).is_ok());
        assert!(resolve(&boot, Some(&snap), Path::new("./undionly.kpxe")).is_ok());
        assert!(resolve(&boot, Some(&snap), Path::new("images/ubuntu/amd64/1/kernel")).is_ok());
        assert_eq!(resolve(&boot, Some(&snap), Path::new("../secret")), Err(Refusal::Escape));
        assert_eq!(resolve(&boot, Some(&snap), Path::new("images/../../secret")), Err(Refusal::Escape));
        assert_eq!(resolve(&boot, Some(&snap), Path::new("/etc/passwd")), Err(Refusal::Escape));
        assert_eq!(resolve(&boot, Some(&snap), Path::new("link-out")), Err(Refusal::Escape));
        assert_eq!(resolve(&boot, Some(&snap), Path::new("missing")), Err(Refusal::NotFound));
        assert_eq!(resolve(&boot, None, Path::new("images/ubuntu/amd64/1/kernel")), Err(Refusal::NotFound));
        assert_eq!(resolve(&boot, Some(&snap), Path::new("images/ubuntu")), Err(Refusal::NotFound));
    }
}
