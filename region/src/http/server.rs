//! The region's listener: accepting connections within a total and a per-source bound, HTTPS and
//! clear HTTP on the one port (told apart by each connection's first byte, so the
//! `http://REGION:5240/MAAS` URL racks register with keeps working), hyper's HTTP/1 with a
//! header-read (and keep-alive idle) timeout, and a shutdown that stops accepting, lets requests
//! in flight finish for at most [`SHUTDOWN_GRACE`], and returns.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::background::Background;
use super::transport::Transport;
use super::{router, AppState, BASE_PATH};

/// Connections open at once. Each costs a task, a socket and hyper's buffers (~10 KiB idle):
/// 4,096 is ~40 MiB, and a site's 1,000 racks keep one or two each.
pub const HTTP_CONNECTIONS_MAX: usize = 4096;

/// Connections open at once from one address: a single host cannot take every slot. Browsers
/// open about six, a rack two (heartbeats and its catalogue poll, plus chunk fetches).
pub const HTTP_CONNECTIONS_PER_SOURCE_MAX: usize = 256;

/// A request's headers must arrive within this; the same timer bounds how long a keep-alive
/// connection may sit idle between requests. Racks send a heartbeat every few seconds on their
/// connection, so theirs stay open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// After the shutdown signal, requests in flight get this long to finish before the region
/// exits anyway (long-polls answer at once; uploads are resumable).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A TLS handshake must finish within this, like a request's headers: a client that opens a
/// connection and stalls holds a slot no longer.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = HEADER_READ_TIMEOUT;

/// The first byte of a TLS connection: the record type of its ClientHello (handshake, 22). An
/// HTTP request starts with a method's letter, so one byte tells the two apart.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Pause after a failed `accept` (out of file descriptors, say) before trying again, so the
/// loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How long a closed connection may keep draining what its client still sends (see
/// [`Lingering`]): long enough for a client to finish sending a refused upload on a LAN and read
/// the answer, short enough that a slot is not held for a client that never stops. nginx's
/// `lingering_time` is 30 s; our refused bodies are small (a few MiB at most before the client
/// gives up).
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// A lingering connection that sends nothing for this long is closed at once (nginx's
/// `lingering_timeout`, 5 s, made shorter: a client still sending a body sends without pauses).
pub const LINGER_IDLE: Duration = Duration::from_secs(1);

/// Open connections, in total and per source address.
#[derive(Debug, Default)]
struct Connections {
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it gives the slot back.
struct Admitted {
    connections: Arc<Connections>,
    source: IpAddr,
}

impl Connections {
    fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Admitted> {
        let mut per_source = self.per_source.lock().expect("connection table lock");
        let total: usize = per_source.values().sum();
        let from_source = per_source.get(&source).copied().unwrap_or(0);
        if total >= HTTP_CONNECTIONS_MAX || from_source >= HTTP_CONNECTIONS_PER_SOURCE_MAX {
            return None;
        }
        *per_source.entry(source).or_default() += 1;
        Some(Admitted { connections: self.clone(), source })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_source = self.connections.per_source.lock().expect("connection table lock");
        if let Some(n) = per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

/// Serves until `shutdown` completes. Prints the bound address on stdout first, so a caller that
/// asked for port 0 learns the real one.
pub async fn serve(
    state: AppState,
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "regiond: listening on http://{local}{BASE_PATH}/")?;
        out.flush()?;
    }
    tracing::info!(%local, "region serving HTTPS and HTTP on one port");
    let acceptor = TlsAcceptor::from(tls);
    let shared = state.shared.clone();
    shared.set_bound_address(local);
    // The racks' requests and the timers, at a lower priority than the admin's requests.
    let background = Background::start()?;
    let on_background = background.handle();
    let summaries = on_background.spawn(crate::state::flush_failure_summaries(shared.clone()));
    let machine_timers = on_background.spawn(crate::machines::run_timers(shared.clone()));
    let heartbeat_flushes = on_background.spawn(crate::racks::run_heartbeat_flushes(shared.clone()));
    let app = router(state, on_background);
    let connections = Arc::new(Connections::default());
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    let mut refused = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(admitted) = connections.admit(peer.ip()) else {
            refused += 1;
            // Summarised: a flood would otherwise write a line per connection.
            if refused.is_power_of_two() {
                tracing::warn!(peer = %peer.ip(), refused, "connection refused: too many open connections");
            }
            continue;
        };
        let (app, http, acceptor, watcher) = (app.clone(), http.clone(), acceptor.clone(), graceful.watcher());
        tokio::spawn(async move {
            let Some(transport) = first_byte_transport(&stream, peer).await else { return };
            let stream = Lingering { stream: Some(stream), admitted: Some(admitted) };
            match transport {
                Transport::Clear => serve_connection(stream, Transport::Clear, peer, app, &http, watcher).await,
                Transport::Tls => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(tls, Transport::Tls, peer, app, &http, watcher).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
    drop(listener);
    shared.begin_closing();
    // Connections still in their TLS handshake are not watched yet; the runtime's end stops them.
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "requests still running at shutdown were cut off");
    }
    summaries.abort();
    machine_timers.abort();
    heartbeat_flushes.abort();
    crate::racks::flush_heartbeats_once(&shared).await;
    crate::state::flush_failure_summaries_once(&shared).await;
    Ok(())
}

/// Which protocol the client speaks, from its first byte (peeked, not consumed); `None` when it
/// sends nothing within [`HEADER_READ_TIMEOUT`] or hangs up.
async fn first_byte_transport(stream: &tokio::net::TcpStream, peer: SocketAddr) -> Option<Transport> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEADER_READ_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => Some(Transport::Tls),
        Ok(Ok(1)) => Some(Transport::Clear),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection failed before its first byte");
            None
        }
        Err(_) => None,
    }
}

/// Serves HTTP/1 on one connection (clear, or TLS after the handshake) until it closes or the
/// shutdown ends it; every request learns its peer and its transport.
async fn serve_connection<I>(
    io: I,
    transport: Transport,
    peer: SocketAddr,
    app: axum::Router,
    http: &hyper::server::conn::http1::Builder,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = app.map_request(move |mut request: axum::http::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(transport);
        request
    });
    let connection = watcher.watch(http.serve_connection(TokioIo::new(io), TowerToHyperService::new(service)));
    if let Err(e) = connection.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A connection that, once hyper is done with it, closes gracefully: it sends FIN, then reads and
/// discards what the client still sends for at most [`LINGER_TIME`] before closing.
///
/// Why: a refused request (413, an early error) ends the connection with the rest of its body
/// unread. Closing a socket with unread data makes the kernel send a reset, and a client still
/// sending its body gets the reset instead of the answer (a `connection reset` where a `413`
/// was due). Draining first lets it finish sending and read the answer, as nginx's lingering
/// close does. The connection keeps its admission slot until it is really closed.
struct Lingering {
    stream: Option<TcpStream>,
    admitted: Option<Admitted>,
}

impl Lingering {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("a lingering connection's stream until it is dropped"))
    }
}

impl AsyncRead for Lingering {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(TcpStream::is_write_vectored)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(stream), Ok(runtime)) = (self.stream.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let admitted = self.admitted.take();
        runtime.spawn(async move {
            linger(stream).await;
            drop(admitted);
        });
    }
}

/// Sends FIN, then discards what arrives until the client closes, pauses [`LINGER_IDLE`], or
/// [`LINGER_TIME`] is over.
async fn linger(mut stream: TcpStream) {
    // A client that closed already gets its FIN and the read below sees the end at once.
    if stream.shutdown().await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut discard = vec![0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match tokio::time::timeout(left.min(LINGER_IDLE), stream.read(&mut discard)).await {
            Ok(Ok(n)) if n > 0 => continue,
            _ => return,
        }
    }
}
