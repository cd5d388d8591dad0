//! HTTP boot on port 5248 (axum on hyper): snapshot files and loaders streamed zero-copy from
//! mmap with Range, HEAD, ETag (the content hash) and Last-Modified; per-MAC iPXE scripts;
//! callbacks; Prometheus metrics. A semaphore bounds concurrent streams, and a count per client
//! address the streams one address holds; a client that stops reading loses its connection
//! after the stall timeout. A `Range` of more than [`RANGE_PARTS_MAX`] parts is refused (416)
//! before it is parsed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper::body::Incoming;
use metalrack_api::machines::normalize_mac;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::mapped;
use super::metrics::{KindLabel, Metrics};
use super::priority::{FirstResponses, FRESH_FOR};
use super::sendfile::{Mapping, Registry, SendfileStream};
use super::tftp::{resolve, Refusal};
use super::{Pxe, PxeError};
use crate::config::PxeConfig;

/// Bytes handed to the socket per body frame: large enough for few wakeups, small enough that
/// a page-fault stall on a cold file is short.
const STREAM_PIECE_BYTES: usize = 512 * 1024;

/// How far ahead of the sender the kernel is asked to read a file in (madvise WILLNEED, which
/// starts the reads and returns at once), so the async workers rarely fault on a cold page.
/// The window is advised in steps of [`READAHEAD_STEP_BYTES`], each only when its first or last
/// page is not cached (see [`read_ahead`]).
const READAHEAD_BYTES: usize = 8 * 1024 * 1024;

/// Most bytes one readahead advice covers, and the least a stream waits to have unadvised in its
/// window before it asks again: one check of the page cache per step. Advising all 8 MiB up front
/// cost every new request ~115 µs with the file cached (the kernel looks up each page), which
/// made the last of a burst of new connections wait for all the others' advice; a cached file
/// now costs two page lookups per step, and a cold one a step's reads at a time.
const READAHEAD_STEP_BYTES: usize = 2 * 1024 * 1024;

/// The range to advise before a stream sends a piece ending at `piece_end`, in a body ending at
/// `end`, when its advice so far reaches `advised`: the next step of the window ahead of the
/// piece once a whole step of it is unadvised, or once the window reaches the body's end. Pure,
/// so that its promises are checked without a file (see the tests): the piece itself is always
/// advised, no advice reaches past the window, and a body of N bytes takes about N ÷ step
/// advices.
fn next_advice(offset: usize, piece_end: usize, advised: usize, end: usize) -> Option<std::ops::Range<usize>> {
    let window_end = (piece_end + READAHEAD_BYTES).min(end);
    let from = advised.max(offset);
    let unadvised = window_end.saturating_sub(from);
    let due = unadvised >= READAHEAD_STEP_BYTES || (window_end == end && unadvised > 0);
    due.then(|| from..from + unadvised.min(READAHEAD_STEP_BYTES))
}

/// Asks the kernel to read `map[from..to]` in ahead of the sender, unless the range's first and
/// last pages are already in the page cache. The advice looks up every page of the range, which
/// was 8–12% of the rack's CPU while serving a cached file to 64–256 clients (bench_pxe, perf),
/// for nothing; two one-page `mincore` calls cost two lookups. Readahead fills a file in order,
/// so a range whose ends are cached is cached in between unless the kernel has evicted pages
/// from its middle; those are then read by `sendfile` itself, with the kernel's own readahead.
fn read_ahead(map: &Mapping, from: usize, to: usize, metrics: &Metrics) {
    if from >= to {
        return;
    }
    let bytes = map.map();
    if mapped::resident(&bytes[from..from + 1]) && mapped::resident(&bytes[to - 1..to]) {
        return;
    }
    let _ = bytes.advise_range(memmap2::Advice::WillNeed, from, to - from);
    metrics.http_readahead_bytes.inc_by((to - from) as u64);
}

/// A mapping shared by the body (as `Bytes`, sent by `sendfile` from its range) and the
/// readahead hints.
struct SharedMap(Arc<Mapping>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref().as_ref()
    }
}

#[derive(Clone)]
struct HttpState {
    pxe: Arc<Pxe>,
    streams: Arc<Semaphore>,
    streams_by_client: Arc<StreamsByClient>,
    maps: Arc<MapCache>,
    hashes: Arc<SnapshotHashes>,
}

/// Streams running per client address (`http_streams_per_client_max`). An entry lives as long
/// as its address has a stream, so the table holds at most `http_streams_max` entries.
#[derive(Debug, Default)]
struct StreamsByClient {
    counts: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One stream counted against its client's address until dropped.
struct ClientStream {
    table: Arc<StreamsByClient>,
    address: std::net::IpAddr,
}

impl StreamsByClient {
    /// Counts a stream for `address`, or `None` if it has `max` running.
    fn try_acquire(self: &Arc<Self>, address: std::net::IpAddr, max: usize) -> Option<ClientStream> {
        // An IPv4 client of a dual-stack listener is ::ffff:a.b.c.d; count it as a.b.c.d.
        let address = address.to_canonical();
        let mut counts = self.counts.lock().expect("lock");
        let count = counts.entry(address).or_default();
        if *count >= max {
            if *count == 0 {
                counts.remove(&address);
            }
            return None;
        }
        *count += 1;
        Some(ClientStream { table: self.clone(), address })
    }
}

impl Drop for ClientStream {
    /// Under the lock: a panic here would poison it and stop HTTP boot, so a broken count (a
    /// bug) is only asserted in debug builds.
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().expect("lock");
        let count = counts.get_mut(&self.address);
        debug_assert!(count.as_ref().is_some_and(|c| **c > 0), "a stream of {} was not counted", self.address);
        if let Some(count) = count {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Parts a `Range` header may list. Only single ranges are served (several would need
/// multipart bodies, which nothing that boots asks for), and up to this many the header is
/// parsed and validated and the full body sent (200), as RFC 9110 allows. More are refused with
/// 416 after counting commas, before parsing: the parser checks every pair of parts for overlap,
/// so the ~30000 parts that fit in hyper's 400 KiB header buffer cost ~0.5 s of a worker thread
/// per request. (A longer header never reaches us: hyper answers 431 and closes.)
pub const RANGE_PARTS_MAX: usize = 16;

/// Mappings kept between requests. Mapping and unmapping a 1 GiB file per request costs ~10 ms
/// of page-table work and re-faults every page; files named by their content hash never change,
/// so a mapping can be shared by every request for that hash.
const MAPPINGS_CACHED_MAX: usize = 64;

struct MapCache {
    /// Content hash → mapping and when it was last used.
    maps: std::sync::Mutex<std::collections::HashMap<String, (Arc<Mapping>, std::time::Instant)>>,
    /// Live mappings, so connections send their bytes with `sendfile`.
    registry: Arc<Registry>,
}

impl MapCache {
    /// The shared mapping for content `hash`, or a fresh one (cached when the hash is known).
    fn get_or_map(&self, hash: Option<&str>, file: std::fs::File) -> std::io::Result<Arc<Mapping>> {
        if let Some(hash) = hash {
            if let Some((map, used)) = self.maps.lock().expect("lock").get_mut(hash) {
                *used = std::time::Instant::now();
                return Ok(map.clone());
            }
        }
        // Snapshot files never change once published, so the mapping is stable (layout invariant).
        let map = Arc::new(Mapping::new(file, self.registry.clone())?);
        let _ = map.map().advise(memmap2::Advice::Sequential);
        if let Some(hash) = hash {
            let mut maps = self.maps.lock().expect("lock");
            if maps.len() >= MAPPINGS_CACHED_MAX {
                // Drop the least recently used; streams still holding it keep it alive.
                if let Some(oldest) = maps.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) {
                    maps.remove(&oldest);
                }
            }
            maps.insert(hash.to_owned(), (map.clone(), std::time::Instant::now()));
        }
        Ok(map)
    }
}

/// Connections the kernel completes and queues before `accept` (the kernel caps it at
/// `net.core.somaxconn`). tokio's `bind` uses 128: when a rack of machines powers on at once,
/// or 256 bench clients connect while others stream, the queue overflowed, SYNs were dropped and
/// those clients' first byte came after the 1 s SYN retransmit (p99 1.1-1.2 s at 256 clients).
pub const LISTEN_BACKLOG: u32 = 4096;

pub async fn bind(config: &PxeConfig) -> Result<tokio::net::TcpListener, PxeError> {
    let address = config.http_listen;
    let socket = if address.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
    socket
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(address)?;
            socket.listen(LISTEN_BACKLOG)
        })
        .map_err(|source| PxeError::Http { address, source })
}

pub fn router(pxe: Arc<Pxe>) -> (Router, Arc<Registry>) {
    let maps = Arc::new(MapCache {
        maps: std::sync::Mutex::default(),
        registry: Arc::new(Registry::new(pxe.metrics.http_sendfile_bytes.clone())),
    });
    let registry = maps.registry.clone();
    let state = HttpState {
        streams: Arc::new(Semaphore::new(pxe.config.http_streams_max)),
        streams_by_client: Arc::default(),
        pxe,
        maps,
        hashes: Arc::default(),
    };
    let router = Router::new()
        .route("/boot/{*path}", get(boot_file).head(boot_file))
        .route("/images/{*path}", get(image_file).head(image_file))
        .route("/ipxe/{mac}", get(ipxe_script))
        .route("/callback/{mac}", get(callback))
        .route("/metrics", get(metrics))
        .with_state(state.clone())
        .merge(super::agent::router(state.pxe.clone()));
    (router, registry)
}

/// Socket send buffer per connection (SO_SNDBUF; the kernel doubles it).
const SEND_BUFFER_BYTES: usize = 512 * 1024;

/// A client that has not sent its request headers within this long is cut off (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves HTTP/1.1 on `listener` until `shutdown`. Not `axum::serve`: each connection is a
/// [`SendfileStream`], so file bodies leave by `sendfile`. Connections are tasks in `tasks`; at
/// shutdown each finishes the response it is sending and closes (hyper's graceful shutdown).
pub async fn serve(listener: tokio::net::TcpListener, pxe: Arc<Pxe>, tasks: TaskTracker, shutdown: CancellationToken) {
    let stall_timeout = Duration::from_millis(pxe.config.http_stall_timeout_ms);
    let stalled = pxe.metrics.http_stalled.clone();
    let (router, registry) = router(pxe);
    let runtime = tokio::runtime::Handle::current();
    let first_responses = Arc::new(FirstResponses::default());
    // Accepting on its own thread: on the runtime, the accept task queued behind every busy
    // stream, and the last of a burst of new clients waited for several rounds of them.
    let listener = match listener.into_std().and_then(|l| l.set_nonblocking(false).map(|()| l)) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "HTTP boot server cannot take its listener");
            return;
        }
    };
    // A second descriptor of the listening socket: shutting it down wakes the blocked accept.
    let waker = match listener.try_clone() {
        Ok(waker) => waker,
        Err(e) => {
            tracing::error!(error = %e, "HTTP boot server cannot take its listener");
            return;
        }
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let accept_stopping = stopping.clone();
    let accept_shutdown = shutdown.clone();
    let accepting = std::thread::Builder::new().name("http-accept".into()).spawn(move || loop {
        let accepted = listener.accept();
        if accept_stopping.load(Ordering::Acquire) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, usually: back off instead of spinning.
                tracing::warn!(error = %e, "HTTP boot accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let router = router.clone();
        let registry = registry.clone();
        // Registered with the runtime here, before its task is spawned: the readiness of the
        // request that is probably already on its way is then known by the task's first poll.
        let stream = {
            let _entered = runtime.enter();
            match stream.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(stream)) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "HTTP boot connection could not be registered");
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER_BYTES);
        let fresh = Arc::new(first_responses.admit());
        let shutdown = accept_shutdown.clone();
        let stalled = stalled.clone();
        tasks.spawn_on(
            async move {
                let stream = SendfileStream::new(stream, registry)
                    .going_first(fresh.clone())
                    .stall_timeout(stall_timeout, stalled);
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = hyper::service::service_fn(move |mut request: axum::http::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    router.clone().oneshot(request)
                });
                let serving = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(io, service);
                let mut serving = std::pin::pin!(serving);
                // Unanswered after FRESH_FOR, it stops going first (see `priority`).
                let served = tokio::select! {
                    served = &mut serving => served,
                    () = tokio::time::sleep(FRESH_FOR) => {
                        fresh.release();
                        tokio::select! {
                            served = &mut serving => served,
                            () = shutdown.cancelled() => {
                                serving.as_mut().graceful_shutdown();
                                serving.await
                            }
                        }
                    }
                    () = shutdown.cancelled() => {
                        serving.as_mut().graceful_shutdown();
                        serving.await
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "HTTP boot connection ended with an error");
                }
            },
            &runtime,
        );
    });
    let accepting = match accepting {
        Ok(accepting) => accepting,
        Err(e) => {
            tracing::error!(error = %e, "HTTP boot server cannot start its accept thread");
            return;
        }
    };
    shutdown.cancelled().await;
    stopping.store(true, Ordering::Release);
    // On Linux, shutdown(2) of a listening socket makes a blocked accept return (EINVAL).
    if let Err(e) = socket2::SockRef::from(&waker).shutdown(std::net::Shutdown::Both) {
        tracing::warn!(error = %e, "cannot wake the HTTP boot accept thread");
    }
    match tokio::task::spawn_blocking(move || accepting.join()).await {
        Ok(Ok(())) => tracing::debug!("HTTP boot stopped accepting"),
        _ => tracing::error!("the HTTP boot accept thread failed"),
    }
}

fn mac_of_peer(pxe: &Pxe, peer: &SocketAddr) -> String {
    match peer.ip() {
        std::net::IpAddr::V4(v4) => pxe.mac_of(v4),
        other => other.to_string(),
    }
}

async fn boot_file(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(path): UrlPath<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let etag = state.pxe.loader_hashes.get(&path).cloned();
    let request = FileRequest { peer, method, headers, label: format!("/boot/{path}") };
    resolve_and_send(&state, None, &PathBuf::from(&path), etag, request).await
}

async fn image_file(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(path): UrlPath<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let snapshot = state.pxe.store.current_link();
    // Snapshot files are hard links to `files/<hash>`: the name is the content hash.
    let etag = state.hashes.etag(&state.pxe, &path);
    let request = FileRequest { peer, method, headers, label: format!("/images/{path}") };
    let requested = Path::new("images").join(&path);
    resolve_and_send(&state, snapshot.exists().then_some(snapshot.as_path()), &requested, etag, request).await
}

/// What a file request brings besides its path.
struct FileRequest {
    peer: SocketAddr,
    method: Method,
    headers: HeaderMap,
    /// The URL path, for events.
    label: String,
}

/// Confines `requested` to its root (loaders, or `images/` in the snapshot) and sends the file,
/// or refuses with an event.
async fn resolve_and_send(
    state: &HttpState,
    snapshot: Option<&Path>,
    requested: &Path,
    etag: Option<String>,
    request: FileRequest,
) -> Response {
    let FileRequest { peer, method, headers, label } = request;
    match resolve(&state.pxe.boot_files_dir, snapshot, requested) {
        Ok(full) => send_file(state, &peer, &full, etag, &method, &headers, &label).await,
        Err(refusal) => refused(state, &peer, &label, refusal),
    }
}

type HashesByPath = std::collections::HashMap<PathBuf, String>;

/// Content hashes of the current snapshot's files by path, read from `snapshot.json` once per
/// published snapshot (keyed by where `current` points), not once per request.
#[derive(Default)]
struct SnapshotHashes {
    /// (where `current` pointed, path → content hash).
    cached: std::sync::Mutex<Option<(PathBuf, Arc<HashesByPath>)>>,
}

impl SnapshotHashes {
    fn etag(&self, pxe: &Pxe, path: &str) -> Option<String> {
        let target = std::fs::read_link(pxe.store.current_link()).ok()?;
        let mut cached = self.cached.lock().expect("lock");
        if cached.as_ref().is_none_or(|(t, _)| *t != target) {
            let meta = pxe.store.current().ok()??;
            let hashes = meta
                .files
                .iter()
                .filter_map(|f| Some((crate::snapshot::relative_path(f).ok()?, f.file_hash.clone())))
                .collect();
            *cached = Some((target, Arc::new(hashes)));
        }
        cached.as_ref()?.1.get(Path::new(path)).cloned()
    }
}

fn refused(state: &HttpState, peer: &SocketAddr, path: &str, refusal: Refusal) -> Response {
    let mac = mac_of_peer(&state.pxe, peer);
    let (status, why) = match refusal {
        Refusal::Escape => (StatusCode::FORBIDDEN, "path leaves the boot root"),
        Refusal::NotFound => (StatusCode::NOT_FOUND, "no such file in the current snapshot"),
    };
    state.pxe.record(&mac, "boot.refused", format!("HTTP {path} refused: {why}"));
    (status, format!("{why}\n")).into_response()
}

/// One streamed file: the permits and the active-stream gauge are released when the body ends
/// or the client goes away.
struct StreamGuard {
    _permit: OwnedSemaphorePermit,
    _client: ClientStream,
    pxe: Arc<Pxe>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.pxe.metrics.http_streams_active.dec();
    }
}

async fn send_file(
    state: &HttpState,
    peer: &SocketAddr,
    full: &Path,
    etag: Option<String>,
    method: &Method,
    headers: &HeaderMap,
    label: &str,
) -> Response {
    let Ok(permit) = state.streams.clone().try_acquire_owned() else {
        Metrics::count(&state.pxe.metrics.http_refused, "busy");
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], "too many boot streams; retry\n")
            .into_response();
    };
    let per_client_max = state.pxe.config.http_streams_per_client_max;
    let Some(client) = state.streams_by_client.try_acquire(peer.ip(), per_client_max) else {
        Metrics::count(&state.pxe.metrics.http_refused, "client_streams");
        let why = format!("{per_client_max} boot streams from your address are running; retry when one ends\n");
        return (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "1")], why).into_response();
    };
    let file = match std::fs::File::open(full) {
        Ok(file) => file,
        Err(_) => return (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    };
    let metadata = file.metadata().ok();
    let len = metadata.as_ref().map(|m| m.len()).unwrap_or(0);
    let etag = etag.map(|hash| format!("\"{hash}\""));
    let last_modified = metadata.and_then(|m| m.modified().ok()).map(httpdate);
    if let (Some(tag), Some(presented)) = (&etag, headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok())) {
        if presented.split(',').any(|t| t.trim() == tag || t.trim() == "*") {
            return StatusCode::NOT_MODIFIED.into_response();
        }
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(text) if range_parts(text) > RANGE_PARTS_MAX => {
            Metrics::count(&state.pxe.metrics.http_refused, "range_parts");
            return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))])
                .into_response();
        }
        Some(text) => match http_range_header::parse_range_header(text).and_then(|r| r.validate(len)) {
            Ok(ranges) if ranges.len() == 1 => Some(ranges[0].clone()),
            // Several ranges would need multipart bodies; nothing that boots asks for them.
            Ok(_) => None,
            Err(_) => {
                return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))])
                    .into_response()
            }
        },
    };
    let (start, end) = match &range {
        Some(r) => (*r.start(), *r.end() + 1),
        None => (0, len),
    };
    let mut response = Response::builder()
        .status(if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK })
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if let Some(r) = &range {
        response = response.header(header::CONTENT_RANGE, format!("bytes {}-{}/{len}", r.start(), r.end()));
    }
    if let Some(tag) = &etag {
        response = response.header(header::ETAG, tag);
    }
    if let Some(date) = &last_modified {
        response = response.header(header::LAST_MODIFIED, date);
    }
    let mac = mac_of_peer(&state.pxe, peer);
    if method == Method::HEAD || len == 0 {
        return response.body(Body::empty()).expect("valid response");
    }
    let map = match state.maps.get_or_map(etag.as_deref(), file) {
        Ok(map) => map,
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "cannot map file\n").into_response(),
    };
    let bytes = Bytes::from_owner(SharedMap(map.clone()));
    if range.is_some() && label.starts_with("/images/") && state.pxe.fault_armed.swap(false, Ordering::Relaxed) {
        // The test fault hook: this one response carries a flipped byte, from a copy.
        let mut copy = bytes.slice(start as usize..end as usize).to_vec();
        let middle = copy.len() / 2;
        copy[middle] ^= 0x5a;
        tracing::warn!(%label, start, end, "fault hook: corrupted one byte of this response");
        return response.body(Body::from(copy)).expect("valid response");
    }
    state.pxe.metrics.http_streams.inc();
    state.pxe.metrics.http_streams_active.inc();
    if range.is_none() {
        // A deploy agent's ranged fetches (hundreds per image) are counted in the metrics, not
        // logged one by one; the agent reports its own progress.
        state.pxe.record(&mac, "boot.http", format!("HTTP {label} ({} bytes) to {peer}", end - start));
    }
    let guard = Arc::new(StreamGuard { _permit: permit, _client: client, pxe: state.pxe.clone() });
    let pxe = state.pxe.clone();
    // State: the next offset to send, and how far the kernel has been asked to read ahead.
    let stream = futures_util::stream::unfold((start as usize, start as usize), move |(offset, advised)| {
        let bytes = bytes.clone();
        let guard = guard.clone();
        let pxe = pxe.clone();
        let map = map.clone();
        async move {
            let end = end as usize;
            if offset >= end {
                drop(guard);
                return None;
            }
            let piece_end = (offset + STREAM_PIECE_BYTES).min(end);
            let advised_end = match next_advice(offset, piece_end, advised, end) {
                Some(range) => {
                    read_ahead(&map, range.start, range.end, &pxe.metrics);
                    range.end
                }
                None => advised,
            };
            let piece = bytes.slice(offset..piece_end);
            pxe.metrics.http_bytes.inc_by(piece.len() as u64);
            Some((Ok::<Bytes, std::io::Error>(piece), (piece_end, advised_end)))
        }
    });
    response.body(Body::from_stream(stream)).expect("valid response")
}

/// The parts a `Range` value lists, counted without parsing them (one pass over bytes hyper
/// has already bounded).
fn range_parts(value: &str) -> usize {
    value.bytes().filter(|&b| b == b',').count() + 1
}

fn httpdate(t: std::time::SystemTime) -> String {
    // RFC 7231 IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT".
    let ts = jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    ts.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

async fn ipxe_script(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(mac): UrlPath<String>,
) -> Response {
    let Ok(mac) = normalize_mac(&mac) else {
        return (StatusCode::BAD_REQUEST, "expected /ipxe/aa-bb-cc-dd-ee-ff\n").into_response();
    };
    let boots = state.pxe.boot_table.borrow().clone();
    let machine = boots.machine(&mac);
    let (script, what) = if super::agent::booted_local_after_deploy(&state.pxe, &boots, &mac) {
        (super::ipxe::local_script(&state.pxe.base_url(), &mac), "local (deploy finished here)".to_string())
    } else {
        let script = super::ipxe::script(&state.pxe.base_url(), &mac, machine, boots.deploy_env.as_ref());
        let what = machine.map(|m| describe_boot(&m.boot)).unwrap_or_else(|| "enlist (unknown MAC)".into());
        (script, what)
    };
    state.pxe.record(&mac, "boot.script", format!("iPXE script to {peer}: {what}"));
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"))], script).into_response()
}

/// A boot decision in a few words (no tokens: events are shown to operators).
fn describe_boot(boot: &metalrack_api::machines::BootAction) -> String {
    use metalrack_api::machines::BootAction;
    match boot {
        BootAction::Enlist => "enlist".into(),
        BootAction::Local => "local".into(),
        BootAction::Image { image, arch, version, .. } => format!("image {image} {arch} {version}"),
        BootAction::Agent { job, .. } => format!("deploy environment: {job:?}"),
    }
}

#[derive(serde::Deserialize)]
struct CallbackQuery {
    #[serde(default)]
    event: String,
}

async fn callback(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(mac): UrlPath<String>,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let Ok(mac) = normalize_mac(&mac) else {
        return (StatusCode::BAD_REQUEST, "expected /callback/aa-bb-cc-dd-ee-ff\n").into_response();
    };
    let event: String = query.event.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
    state.pxe.record(&mac, "boot.callback", format!("machine reported {event:?} from {peer}"));
    "ok\n".into_response()
}

async fn metrics(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.pxe.config.metrics_bearer_token {
        let sent =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let allowed = sent.is_some_and(|sent| {
            use subtle::ConstantTimeEq;
            sent.len() == token.len() && bool::from(sent.as_bytes().ct_eq(token.as_bytes()))
        });
        if !allowed {
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "metrics need a bearer token\n")
                .into_response();
        }
    }
    let phase = format!("{:?}", (state.pxe.sync_phase)()).to_lowercase();
    for name in ["idle", "waiting", "syncing", "paused", "failed"] {
        state.pxe.metrics.sync_phase.get_or_create(&KindLabel { kind: name.into() }).set(i64::from(name == phase));
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.pxe.metrics.encode())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// The HTTP boot server in-process on 127.0.0.1:0 with `extra` config keys, serving
    /// `/boot/big` (`big_len` bytes, sparse); stopped when dropped.
    struct Server {
        _dir: tempfile::TempDir,
        pxe: Arc<Pxe>,
        address: SocketAddr,
        shutdown: CancellationToken,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn server(extra: &str, big_len: u64) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = crate::data_dir::DataDir::new(dir.path());
        let config: PxeConfig = toml::from_str(&format!(
            "interface = \"lo\"\naddress = \"127.0.0.1\"\nhttp_listen = \"127.0.0.1:0\"\n{extra}\n\
             [dhcp]\nmode = \"off\"\n"
        ))
        .unwrap();
        let boot_files_dir = data_dir.boot_files();
        std::fs::create_dir_all(&boot_files_dir).unwrap();
        std::fs::File::create(boot_files_dir.join("big")).unwrap().set_len(big_len).unwrap();
        let pxe = Pxe::for_test(config, data_dir, tokio::sync::watch::channel(Arc::default()).1);
        let listener = bind(&pxe.config).await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, pxe.clone(), TaskTracker::new(), shutdown.clone()));
        Server { _dir: dir, pxe, address, shutdown }
    }

    /// Every wait in these tests ends by this.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// Connects from `source` (any 127.0.0.0/8 address) with a small receive buffer, so a
    /// client that stops reading fills the connection within a few MiB; sends `GET path` with
    /// `headers`; reads the response head and no more than a few KiB of body. Returns the
    /// head and the connection, for reading on or for holding unread.
    async fn get(source: &str, server: SocketAddr, path: &str, headers: &str) -> (String, TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        let mut stream = socket.connect(server).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: rack\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let (head, _) = read_head(&mut stream).await;
        (head, stream)
    }

    /// Reads a response head from `stream`, within the deadline: the head, and the body bytes
    /// read with it.
    async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
        tokio::time::timeout(DEADLINE, async {
            let mut read = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&read[..end]).into_owned();
                    return (head, read.split_off(end + 4));
                }
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before a response: {:?}", String::from_utf8_lossy(&read));
                read.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("a response head within the deadline")
    }

    fn status(head: &str) -> u16 {
        head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("no status: {head}"))
    }

    /// Reads `stream` until it ends (EOF or reset), within the deadline; the bytes read.
    async fn read_to_end_or_reset(stream: &mut TcpStream) -> u64 {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        tokio::time::timeout(DEADLINE, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n as u64,
                }
            }
        })
        .await
        .expect("the connection ended within the deadline");
        total
    }

    proptest::proptest! {
        /// Walking a body piece by piece as the stream does: every piece is advised before it
        /// is sent, no advice covers more than a step or reaches past the window ahead of its
        /// piece, advice ranges follow one another without gaps or overlaps, and a body takes
        /// at most one advice per step of its length, plus one.
        #[test]
        fn readahead_steps_cover_each_piece_before_it_is_sent(
            start in 0usize..(64 << 20),
            len in 1usize..(64 << 20),
        ) {
            let end = start + len;
            let (mut offset, mut advised, mut advices) = (start, start, 0usize);
            while offset < end {
                let piece_end = (offset + STREAM_PIECE_BYTES).min(end);
                if let Some(range) = next_advice(offset, piece_end, advised, end) {
                    proptest::prop_assert_eq!(range.start, advised.max(start));
                    proptest::prop_assert!(range.end > range.start);
                    proptest::prop_assert!(range.len() <= READAHEAD_STEP_BYTES);
                    proptest::prop_assert!(range.end <= (piece_end + READAHEAD_BYTES).min(end));
                    advised = range.end;
                    advices += 1;
                }
                proptest::prop_assert!(advised >= piece_end, "piece {offset}..{piece_end} sent unadvised (advice to {advised})");
                offset = piece_end;
            }
            proptest::prop_assert_eq!(advised, end);
            proptest::prop_assert!(advices <= len.div_ceil(READAHEAD_STEP_BYTES) + 1, "{advices} advices for {len} bytes");
        }
    }

    /// A file whose pages are in the page cache goes out without readahead advice (which would
    /// only look each page up); the same file dropped from the page cache is advised ahead of
    /// the sender.
    #[tokio::test]
    async fn readahead_is_asked_only_for_a_file_not_in_the_page_cache() {
        const FILE_BYTES: usize = 4 << 20;
        let server = server("", 0).await;
        let path = crate::data_dir::DataDir::new(server._dir.path()).boot_files().join("cached");
        std::fs::write(&path, vec![7u8; FILE_BYTES]).unwrap();
        let fetch = || async {
            let mut stream = TcpStream::connect(server.address).await.unwrap();
            stream.write_all(b"GET /boot/cached HTTP/1.1\r\nHost: rack\r\nConnection: close\r\n\r\n").await.unwrap();
            let (head, body) = read_head(&mut stream).await;
            assert_eq!(status(&head), 200, "{head}");
            body.len() as u64 + read_to_end_or_reset(&mut stream).await
        };
        let advised = || server.pxe.metrics.http_readahead_bytes.get();

        // Just written: every page is in the page cache.
        assert_eq!(fetch().await, FILE_BYTES as u64);
        assert_eq!(advised(), 0, "a cached file was advised");

        // Written back and dropped from the cache: the sender's window is advised.
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
        assert_eq!(fetch().await, FILE_BYTES as u64);
        assert!(advised() >= STREAM_PIECE_BYTES as u64, "a file not in the cache was advised {} bytes", advised());
    }

    /// Responses that end on a partial segment arrive whole at once, one after the other on a
    /// kept-alive connection: the socket is corked while a body goes out (see
    /// `SendfileStream::cork`), and a tail left corked would wait the kernel's 200 ms each time.
    #[tokio::test]
    async fn bodies_sent_corked_end_without_waiting_for_the_cork_timer() {
        const FILE_BYTES: u64 = 100_001; // not a whole number of segments on any link
        const REQUESTS: u32 = 20;
        let server = server("", FILE_BYTES).await;
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        let started = std::time::Instant::now();
        for _ in 0..REQUESTS {
            stream.write_all(b"GET /boot/big HTTP/1.1\r\nHost: rack\r\n\r\n").await.unwrap();
            let (head, mut body) = read_head(&mut stream).await;
            assert_eq!(status(&head), 200, "{head}");
            let mut buf = [0u8; 64 * 1024];
            while body.len() < FILE_BYTES as usize {
                let n =
                    tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await.expect("within the deadline").unwrap();
                assert!(n > 0, "closed mid-response");
                body.extend_from_slice(&buf[..n]);
            }
            assert_eq!(body.len(), FILE_BYTES as usize, "more than the body");
        }
        // Uncorked at each response's end this takes milliseconds; a tail left corked costs
        // 200 ms a response, 4 s for all.
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(2), "{REQUESTS} responses took {elapsed:?}");
    }

    /// Clients that request a large file and stop reading hold every stream slot; after the
    /// stall timeout (1 s here) their connections are reset and a new client is served.
    #[tokio::test]
    async fn clients_that_stop_reading_lose_their_streams_after_the_stall_timeout() {
        let stall = Duration::from_millis(1000);
        let server = server("http_streams_max = 2\nhttp_stall_timeout_ms = 1000", 256 << 20).await;
        let mut stalled = Vec::new();
        for source in ["127.0.0.2", "127.0.0.3"] {
            let (head, stream) = get(source, server.address, "/boot/big", "").await;
            assert_eq!(status(&head), 200, "{head}");
            stalled.push(stream); // never read again
        }
        let started = std::time::Instant::now();
        let (head, _) = get("127.0.0.4", server.address, "/boot/big", "").await;
        assert_eq!(status(&head), 503, "both slots are held: {head}");
        let margin = Duration::from_secs(3);
        loop {
            let (head, _) = get("127.0.0.4", server.address, "/boot/big", "").await;
            if status(&head) == 200 {
                break;
            }
            assert!(
                started.elapsed() < stall + margin,
                "clients that read nothing still hold every stream after {:?}: {head}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The first reset freed the slot just used; the second follows within the margin too.
        while server.pxe.metrics.http_stalled.get() < 2 {
            assert!(started.elapsed() < stall + margin, "only one stalled stream was reset");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(server.pxe.metrics.http_stalled.get(), 2);
        for mut stream in stalled {
            let read = read_to_end_or_reset(&mut stream).await;
            assert!(read < 64 << 20, "the stalled connection ended after {read} bytes, not the whole file");
        }
    }

    /// One address cannot take every stream: past `http_streams_per_client_max` it gets 429
    /// while another address is served, and a stream that ends frees its address's slot.
    #[tokio::test]
    async fn streams_per_client_address_are_limited_and_other_addresses_are_served() {
        let server = server("http_streams_max = 16\nhttp_streams_per_client_max = 2", 256 << 20).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let (head, stream) = get("127.0.0.2", server.address, "/boot/big", "").await;
            assert_eq!(status(&head), 200, "{head}");
            held.push(stream);
        }
        let (head, _) = get("127.0.0.2", server.address, "/boot/big", "").await;
        assert_eq!(status(&head), 429, "a third stream to 127.0.0.2 was not refused: {head}");
        assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
        let (head, _other) = get("127.0.0.3", server.address, "/boot/big", "").await;
        assert_eq!(status(&head), 200, "another address is served: {head}");
        // 127.0.0.2 hangs up one stream: its slot is free again once the server notices.
        drop(held.remove(0));
        let started = std::time::Instant::now();
        loop {
            let (head, _) = get("127.0.0.2", server.address, "/boot/big", "").await;
            if status(&head) == 200 {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "the slot of a closed stream was never freed: {head}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let clients = server.pxe.metrics.http_refused.get_or_create(&KindLabel { kind: "client_streams".into() });
        assert!(clients.get() >= 1);
        // Every client hangs up: every stream ends.
        drop((held, _other));
        let started = std::time::Instant::now();
        while server.pxe.metrics.http_streams_active.get() > 0 {
            assert!(started.elapsed() < DEADLINE, "streams still running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `Range: bytes=0-0,2-2,...` with thousands of parts is refused with 416 without being
    /// parsed (the parser compares every pair of parts); a few parts still get the whole body
    /// (200), one part 206. A header beyond hyper's buffer is refused by hyper with 431.
    #[tokio::test]
    async fn a_range_of_thousands_of_parts_is_refused_cheaply() {
        let len = 1u64 << 20;
        let server = server("", len).await;
        let parts = |n: u64| (0..n).map(|i| format!("{}-{}", 2 * i, 2 * i)).collect::<Vec<_>>().join(",");
        let started = std::time::Instant::now();
        let (head, _) =
            get("127.0.0.2", server.address, "/boot/big", &format!("Range: bytes={}\r\n", parts(20_000))).await;
        let took = started.elapsed();
        assert_eq!(status(&head), 416, "20000 parts (answered in {took:?}): {head}");
        assert!(head.to_lowercase().contains(&format!("content-range: bytes */{len}")), "{head}");

        let (head, _) = get("127.0.0.2", server.address, "/boot/big", &format!("Range: bytes={}\r\n", parts(16))).await;
        assert_eq!(status(&head), 200, "a few parts: the whole body: {head}");
        assert!(head.to_lowercase().contains(&format!("content-length: {len}")), "{head}");
        let (head, _) = get("127.0.0.2", server.address, "/boot/big", "Range: bytes=10-19\r\n").await;
        assert_eq!(status(&head), 206, "{head}");

        // ~700 KB of header: hyper stops reading at its buffer limit and answers 431.
        let (head, _) =
            get("127.0.0.2", server.address, "/boot/big", &format!("Range: bytes={}\r\n", parts(60_000))).await;
        assert_eq!(status(&head), 431, "{head}");
    }

    /// A rack of machines powering on at once connects faster than a busy server accepts: the
    /// kernel must queue them all rather than drop SYNs (a dropped SYN costs the client 1 s).
    #[tokio::test]
    async fn hundreds_of_simultaneous_connections_are_queued_not_dropped() {
        let config: PxeConfig = toml::from_str(
            r#"
            interface = "lo"
            address = "127.0.0.1"
            http_listen = "127.0.0.1:0"
            [dhcp]
            mode = "proxy"
            "#,
        )
        .unwrap();
        let listener = bind(&config).await.unwrap();
        let address = listener.local_addr().unwrap();
        // Nobody accepts: every connection has to wait in the queue.
        let started = std::time::Instant::now();
        let connects = (0..512).map(|_| tokio::net::TcpStream::connect(address));
        let streams = futures_util::future::try_join_all(connects).await.unwrap();
        assert_eq!(streams.len(), 512);
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "some SYNs were dropped and retried after 1 s: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn metrics_with_a_token_configured_answer_only_that_token() {
        let open = server("", 1).await;
        let (head, _) = get("127.0.0.1", open.address, "/metrics", "").await;
        assert_eq!(status(&head), 200, "without a token, /metrics is open (as Prometheus expects)");

        let guarded = server("metrics_bearer_token = \"s3cret-token\"", 1).await;
        let (head, _) = get("127.0.0.1", guarded.address, "/metrics", "").await;
        assert_eq!(status(&head), 401, "{head}");
        let (head, _) = get("127.0.0.1", guarded.address, "/metrics", "Authorization: Bearer wrong\r\n").await;
        assert_eq!(status(&head), 401, "{head}");
        let (head, _) = get("127.0.0.1", guarded.address, "/metrics", "Authorization: Bearer s3cret-token\r\n").await;
        assert_eq!(status(&head), 200, "{head}");
    }
}
