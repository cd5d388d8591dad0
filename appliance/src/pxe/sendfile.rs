//! Zero-copy sending of mapped files: a connection type for hyper whose writes of bytes that
//! lie inside a registered file mapping become `sendfile(2)` from that file.
//!
//! HTTP boot bodies are slices of `mmap`ed snapshot files (`Bytes` over the mapping). Written
//! with `write`, every byte is copied from the mapping into socket buffers, which costs a core
//! at a few GB/s and makes a new client's first byte wait behind the copies for every other
//! stream. hyper only ever hands its connection type byte slices, so this type recognises a
//! slice by its address: a [`Mapping`] registers its address range and file for exactly as long
//! as it is mapped (registered after mapping, unregistered before unmapping), and a write of a
//! slice inside such a range is sent as `sendfile(socket, file, offset)` instead. The file is
//! immutable while mapped (see `mapped.rs`), so the page cache holds the same bytes the mapping
//! shows, and the kernel hands the pages to the socket without copying them.
//!
//! A connection can also be given a stall timeout: a write that finds the socket full and stays
//! blocked that long (the client reads nothing) fails, and the connection is reset.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::priority::{Fresh, Turns};

/// Most bytes one `sendfile` call sends, after which the connection yields to other tasks before
/// sending more. Without it one poll of a stream filled the whole socket buffer (MBs on a fast
/// link) and a new client's first byte waited behind every busy stream's fill. bench_pxe at
/// 256 clients: first byte p50 43 ms at 256 KiB, 25 ms at 64 KiB (nginx 25 ms), for ~10% more
/// CPU per GiB, and throughput still above nginx's.
pub const SENDFILE_CALL_BYTES_MAX: usize = 64 * 1024;

/// Address ranges of live mappings and the files they map.
#[derive(Debug)]
pub struct Registry {
    /// Start address → (end address, file).
    ranges: RwLock<BTreeMap<usize, (usize, Arc<File>)>>,
    /// Bytes every connection sent with `sendfile` (the `/metrics` counter).
    sendfile_bytes: Counter,
}

impl Registry {
    /// A registry counting what it sends in `sendfile_bytes`.
    pub fn new(sendfile_bytes: Counter) -> Registry {
        Registry { ranges: RwLock::default(), sendfile_bytes }
    }

    pub fn sendfile_bytes(&self) -> u64 {
        self.sendfile_bytes.get()
    }

    /// The file and offset behind `bytes`, if they lie wholly inside one live mapping.
    fn find(&self, bytes: &[u8]) -> Option<(Arc<File>, u64)> {
        let start = bytes.as_ptr() as usize;
        let ranges = self.ranges.read().expect("lock");
        let (&base, (end, file)) = ranges.range(..=start).next_back()?;
        (start + bytes.len() <= *end).then(|| (file.clone(), (start - base) as u64))
    }
}

/// A file mapping whose bytes [`SendfileStream`] sends with `sendfile`.
pub struct Mapping {
    map: memmap2::Mmap,
    registry: Arc<Registry>,
}

impl Mapping {
    /// Maps `file` (immutable, see `mapped::map_immutable`) and registers the mapping.
    pub fn new(file: File, registry: Arc<Registry>) -> io::Result<Mapping> {
        let map = super::mapped::map_immutable(&file)?;
        if !map.is_empty() {
            let start = map.as_ptr() as usize;
            registry.ranges.write().expect("lock").insert(start, (start + map.len(), Arc::new(file)));
        }
        Ok(Mapping { map, registry })
    }

    pub fn map(&self) -> &memmap2::Mmap {
        &self.map
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Before `map` is unmapped (fields drop after this): once unmapped, the address range may
        // be reused by another mapping, which must never be taken for this file.
        if !self.map.is_empty() {
            self.registry.ranges.write().expect("lock").remove(&(self.map.as_ptr() as usize));
        }
    }
}

/// A TCP connection that sends registered mapped bytes with `sendfile` and the rest with
/// `writev`.
pub struct SendfileStream {
    stream: TcpStream,
    registry: Arc<Registry>,
    /// Bytes this connection sent with `sendfile`.
    sendfile_bytes: u64,
    /// Set after each `sendfile`: the next one first yields the task (see
    /// [`SENDFILE_CALL_BYTES_MAX`]).
    yield_first: bool,
    /// This connection's claim to go first, released by its first write; through it, the
    /// server's fresh connections, for which the stream steps aside between chunks.
    fresh: Option<Arc<Fresh>>,
    turns: Turns,
    stall: Option<StallTimer>,
    /// `TCP_CORK` is set: while a body's mapped bytes go out, until the next flush (see
    /// [`SendfileStream::cork`]).
    corked: bool,
}

/// Ends a write that stays blocked on a full socket for `timeout`. Cheap for streams that
/// flow: a write that goes through only clears `blocked_since`; the timer is created at the
/// first block and moved only when it fires early (at most once per `timeout` per
/// connection), never re-armed per write.
struct StallTimer {
    timeout: Duration,
    /// When the write now waiting first found the socket full; `None` while writes go through.
    blocked_since: Option<Instant>,
    /// Fires at or before `blocked_since + timeout` (an earlier block's deadline, at worst).
    timer: Option<Pin<Box<Sleep>>>,
    /// Counts connections cut off.
    stalled: Counter,
}

impl StallTimer {
    fn wrote(&mut self) {
        self.blocked_since = None;
    }

    /// The write is blocked on the socket: `Ok` to wait (the timer wakes the task by the
    /// deadline), `Err` once it has waited `timeout`.
    fn poll_blocked(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let now = Instant::now();
        let deadline = *self.blocked_since.get_or_insert(now) + self.timeout;
        let stalled = || io::Error::new(io::ErrorKind::TimedOut, "the client read nothing for the stall timeout");
        if now >= deadline {
            return Err(stalled());
        }
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            // An earlier block's deadline: wait for this one's.
            timer.as_mut().reset(deadline);
            if timer.as_mut().poll(cx).is_ready() {
                return Err(stalled());
            }
        }
        Ok(())
    }
}

impl SendfileStream {
    pub fn new(stream: TcpStream, registry: Arc<Registry>) -> SendfileStream {
        SendfileStream {
            stream,
            registry,
            sendfile_bytes: 0,
            yield_first: false,
            fresh: None,
            turns: Turns::default(),
            stall: None,
            corked: false,
        }
    }

    /// A write blocked on a full socket for `timeout` fails with `TimedOut` (counted in
    /// `stalled`), and the socket is set to reset when closed: its unsent bytes are dropped at
    /// once rather than retried by the kernel for a client that reads nothing.
    pub fn stall_timeout(mut self, timeout: Duration, stalled: Counter) -> SendfileStream {
        self.stall = Some(StallTimer { timeout, blocked_since: None, timer: None, stalled });
        self
    }

    /// Takes part in "new connections first" (see `priority`): `fresh` is released on this
    /// connection's first write, and between chunks the stream steps aside for fresh ones.
    pub fn going_first(mut self, fresh: Arc<Fresh>) -> SendfileStream {
        self.fresh = Some(fresh);
        self
    }

    pub fn sendfile_bytes(&self) -> u64 {
        self.sendfile_bytes
    }

    /// After a write went out: the connection has been answered. After a write blocked on the
    /// socket: whether it has stalled for too long (then the write fails).
    fn wrote(&mut self, cx: &mut Context<'_>, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match &written {
            Poll::Ready(Ok(1..)) => {
                if let Some(fresh) = &self.fresh {
                    fresh.release();
                }
                if let Some(stall) = &mut self.stall {
                    stall.wrote();
                }
            }
            Poll::Pending => {
                if let Some(stall) = &mut self.stall {
                    if let Err(e) = stall.poll_blocked(cx) {
                        stall.stalled.inc();
                        // Reset on close: nothing more is owed to a client that reads nothing.
                        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
                        return Poll::Ready(Err(e));
                    }
                }
            }
            Poll::Ready(_) => {}
        }
        written
    }

    /// Corks the socket while a body's mapped bytes go out and uncorks it at the flush that
    /// follows them, as nginx's `tcp_nopush` does. The socket has `TCP_NODELAY` (for small
    /// responses), so without the cork each `sendfile` ended in a runt segment that went out on
    /// its own: on loopback (MSS 65,483) every 64 KiB call was a full segment and one of 53
    /// bytes. bench_pxe at 64 clients, segments per MiB: 27 uncorked, 19 corked, nginx 21.
    /// hyper flushes after each body piece it has written and at the end of every response, so
    /// a corked socket holds back at most the tail of the piece being written, never a
    /// finished response (and the kernel sends a corked tail after 200 ms regardless).
    fn cork(&mut self, cork: bool) {
        if self.corked != cork {
            // A failure costs only the segment sizes; the bytes go out either way.
            let _ = socket2::SockRef::from(&self.stream).set_tcp_cork(cork);
            self.corked = cork;
        }
    }

    /// One `sendfile` of up to `len` bytes at `offset`, waiting for the socket to be writable.
    fn poll_sendfile(&self, cx: &mut Context<'_>, file: &File, offset: u64, len: usize) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                let mut at = offset as nix::libc::off_t;
                nix::sys::sendfile::sendfile(&self.stream, file, Some(&mut at), len).map_err(io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue, // readiness was stale
                other => return Poll::Ready(other),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.registry.find(buf) {
            Some((file, offset)) => {
                if self.yield_first {
                    let this = &mut *self;
                    // Back from stepping aside for new connections, it sends at once; otherwise
                    // it lets every other ready task run before it sends more.
                    let resumed = match &this.fresh {
                        Some(fresh) => ready!(this.turns.poll_next_chunk(fresh.first_responses(), cx)),
                        None => false,
                    };
                    this.yield_first = false;
                    if !resumed {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                let len = buf.len().min(SENDFILE_CALL_BYTES_MAX);
                self.cork(true);
                let polled = self.poll_sendfile(cx, &file, offset, len);
                let sent = ready!(self.wrote(cx, polled))?;
                self.yield_first = true;
                self.sendfile_bytes += sent as u64;
                self.registry.sendfile_bytes.inc_by(sent as u64);
                Poll::Ready(Ok(sent))
            }
            None => {
                let written = Pin::new(&mut self.stream).poll_write(cx, buf);
                self.wrote(cx, written)
            }
        }
    }

    /// hyper queues its header buffer and the body's `Bytes` as separate slices when the
    /// connection says it writes vectored (otherwise it would copy the body into its own
    /// buffer, and the addresses would be lost). Leading ordinary slices go out with one
    /// `writev`; a mapped slice with `sendfile`. Returns what went out before anything blocked.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let plain = bufs.iter().take_while(|b| self.registry.find(b).is_none()).count();
        if plain > 0 {
            let written = Pin::new(&mut self.stream).poll_write_vectored(cx, &bufs[..plain]);
            return self.wrote(cx, written);
        }
        match bufs.first() {
            Some(first) => self.as_mut().poll_write(cx, first),
            None => Poll::Ready(Ok(0)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.cork(false);
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.cork(false);
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pxe::priority::FirstResponses;
    use std::future::Future;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A registered mapping of a file holding `content` (in the returned temp dir).
    fn mapped(content: &[u8]) -> (tempfile::TempDir, Arc<Registry>, Mapping) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, content).unwrap();
        let registry = Arc::new(Registry::new(Counter::default()));
        let mapping = Mapping::new(File::open(&path).unwrap(), registry.clone()).unwrap();
        (dir, registry, mapping)
    }

    /// A listener that reads one connection to its end: its address, and what it read.
    async fn sink() -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            socket.read_to_end(&mut got).await.unwrap();
            got
        });
        (address, reader)
    }

    #[test]
    fn only_live_mappings_are_found() {
        let (_dir, registry, mapping) = mapped(&[7u8; 10_000]);
        let (_, offset) = registry.find(&mapping.as_ref()[100..200]).unwrap();
        assert_eq!(offset, 100);
        assert!(registry.find(&[1, 2, 3]).is_none(), "ordinary memory");
        assert!(registry.find(&mapping.as_ref()[9_999..]).is_some());
        drop(mapping);
        assert!(registry.ranges.read().unwrap().is_empty(), "unregistered before unmapping");
    }

    #[tokio::test]
    async fn mapped_slices_go_out_by_sendfile_and_arrive_intact() {
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (_dir, registry, mapping) = mapped(&content);
        let (address, reader) = sink().await;
        let mut stream = SendfileStream::new(TcpStream::connect(address).await.unwrap(), registry);
        // A header, then a mapped range in a vectored write, then more of the mapping alone.
        let header = b"HEADER\n".to_vec();
        let body = &mapping.as_ref()[1000..2_000_000];
        let mut slices = [IoSlice::new(&header), IoSlice::new(body)];
        let mut slices: &mut [IoSlice<'_>] = &mut slices;
        while !slices.is_empty() {
            let n = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, slices)).await.unwrap();
            IoSlice::advance_slices(&mut slices, n);
        }
        stream.write_all(&mapping.as_ref()[2_000_000..]).await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(stream.sendfile_bytes(), content.len() as u64 - 1000, "every mapped byte went by sendfile");
        let got = reader.await.unwrap();
        let expected = [header.as_slice(), &content[1000..]].concat();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ");
    }

    /// A body's mapped bytes go out corked, and the flush that follows uncorks the socket, so
    /// the body's last, partial segment leaves at once.
    #[tokio::test]
    async fn mapped_bytes_go_out_corked_until_the_flush() {
        let content: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let (_dir, registry, mapping) = mapped(&content);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        socket.set_nodelay(true).unwrap();
        let (mut reader, _) = listener.accept().await.unwrap();
        let mut stream = SendfileStream::new(socket, registry);
        let cork = |stream: &SendfileStream| socket2::SockRef::from(&stream.stream).tcp_cork().unwrap();

        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert!(!cork(&stream), "headers alone are not corked");
        stream.write_all(&mapping.as_ref()[..100_001]).await.unwrap();
        assert!(cork(&stream), "a body's mapped bytes go out corked");
        stream.flush().await.unwrap();
        assert!(!cork(&stream), "the flush uncorks");
        let mut got = vec![0u8; 19 + 100_001];
        tokio::time::timeout(Duration::from_secs(10), reader.read_exact(&mut got))
            .await
            .expect("the tail arrived")
            .unwrap();
        assert!(got[19..] == content[..100_001]);

        stream.write_all(&mapping.as_ref()[100_001..]).await.unwrap();
        stream.shutdown().await.unwrap();
        assert!(!cork(&stream), "shutting down uncorks");
    }

    /// "New connections first" as a connection sees it: its first write answers it, and a
    /// stream that has sent a chunk waits while another connection is fresh.
    #[tokio::test]
    async fn a_stream_steps_aside_for_a_fresh_connection_until_it_is_answered() {
        let (_dir, registry, mapping) = mapped(&vec![3u8; 1 << 20]);
        let (address, reader) = sink().await;

        let first_responses = Arc::new(FirstResponses::default());
        let mine = Arc::new(first_responses.admit());
        let socket = TcpStream::connect(address).await.unwrap();
        let mut stream = SendfileStream::new(socket, registry).going_first(mine.clone());
        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert_eq!(first_responses.fresh(), 0, "answered by its first write");

        let chunk = &mapping.as_ref()[..SENDFILE_CALL_BYTES_MAX];
        assert_eq!(stream.write(chunk).await.unwrap(), chunk.len());
        // Another connection arrives: the stream's next chunk waits for its answer.
        let other = first_responses.admit();
        let mut next = std::pin::pin!(stream.write(&mapping.as_ref()[SENDFILE_CALL_BYTES_MAX..]));
        for _ in 0..3 {
            let polled = std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "sent while a connection is fresh");
            tokio::task::yield_now().await;
        }
        other.release();
        let sent = tokio::time::timeout(Duration::from_secs(10), next).await.expect("woken").unwrap();
        assert_eq!(sent, SENDFILE_CALL_BYTES_MAX);
        drop(stream);
        assert_eq!(reader.await.unwrap().len(), 19 + 2 * SENDFILE_CALL_BYTES_MAX);
    }
}
