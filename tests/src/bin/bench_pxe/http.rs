//! The HTTP load client (hyper's HTTP/1.1, one connection per client, requests in a loop) and
//! its two cells: fan-out with the page cache warm (1.), and the cold-cache probe (2.).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use metalrack_hardware::Lab;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::usage::{tcp_segments_sent, Usage};
use crate::{in_lab, Options, BIG_URL, ONCE_DEADLINE, PROBE_EVERY, PROBE_URL};

#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Process group of the server, for its CPU time and page faults.
    pub group: i32,
}

#[derive(Default)]
pub struct LoadShared {
    pub bytes: AtomicU64,
    pub completed: AtomicU64,
    pub ttfb: Mutex<Vec<Duration>>,
}

#[derive(Debug, Default, Clone)]
pub struct LoadResult {
    pub bytes: u64,
    pub completed: u64,
    pub elapsed: Duration,
    pub ttfb: Vec<Duration>,
    pub errors: usize,
    pub first_error: Option<String>,
}

pub type Connection = (http1::SendRequest<Empty<Bytes>>, http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>);

pub async fn connect(addr: SocketAddr) -> Result<Connection> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(http1::handshake(TokioIo::new(stream)).await?)
}

pub fn get(path: &str) -> Result<hyper::Request<Empty<Bytes>>> {
    Ok(hyper::Request::get(path).header(hyper::header::HOST, "bench").body(Empty::new())?)
}

/// One `GET` on a new connection; the whole body and the time from connecting to its end.
pub async fn fetch_small(addr: SocketAddr, path: &str) -> Result<(Bytes, Duration)> {
    let started = Instant::now();
    let (mut sender, connection) = connect(addr).await?;
    let request = async {
        let response = sender.send_request(get(path)?).await?;
        ensure!(response.status() == hyper::StatusCode::OK, "GET {path}: {}", response.status());
        Ok(response.into_body().collect().await?.to_bytes())
    };
    tokio::select! {
        body = request => Ok((body?, started.elapsed())),
        closed = connection => Err(anyhow!("connection closed before the response ({closed:?})")),
    }
}

/// A client: connects, then `GET`s `path` again and again (or once), reading and discarding
/// every body. TTFB runs from sending the request (from connecting, for a connection's first)
/// to the first body byte.
pub async fn client(addr: SocketAddr, path: Arc<str>, shared: Arc<LoadShared>, once: bool) -> Result<()> {
    let started = Instant::now();
    let (mut sender, connection) = connect(addr).await?;
    let requests = async {
        let mut request_started = started;
        loop {
            sender.ready().await?;
            let response = sender.send_request(get(&path)?).await?;
            ensure!(response.status() == hyper::StatusCode::OK, "GET {path}: {}", response.status());
            let expected: Option<u64> = response
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let mut body = response.into_body();
            let mut got = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    if got == 0 && !data.is_empty() {
                        shared.ttfb.lock().expect("lock").push(request_started.elapsed());
                    }
                    got += data.len() as u64;
                    shared.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            ensure!(expected.is_none_or(|len| len == got), "GET {path}: {got} bytes of {expected:?}");
            shared.completed.fetch_add(1, Ordering::Relaxed);
            if once {
                return Ok(());
            }
            request_started = Instant::now();
        }
    };
    tokio::select! {
        result = requests => result,
        closed = connection => Err(anyhow!("the server closed the connection ({closed:?})")),
    }
}

/// `clients` clients for `limit` (looping), or until each has fetched `path` once (`once`).
pub async fn http_load(addr: SocketAddr, path: &str, clients: usize, limit: Duration, once: bool) -> LoadResult {
    let shared = Arc::new(LoadShared::default());
    let path: Arc<str> = Arc::from(path);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let mut set = JoinSet::new();
    for _ in 0..clients {
        set.spawn(tokio::time::timeout_at(deadline, client(addr, path.clone(), shared.clone(), once)));
    }
    let mut result = LoadResult::default();
    let mut fail = |message: String| {
        result.errors += 1;
        result.first_error.get_or_insert(message);
    };
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => fail(format!("{e:#}")),
            // The end of the measured time: how every looping client stops.
            Ok(Err(_)) if !once => {}
            Ok(Err(_)) => fail(format!("not done within {limit:?}")),
            Err(e) => fail(e.to_string()),
        }
    }
    result.elapsed = started.elapsed();
    result.bytes = shared.bytes.load(Ordering::Relaxed);
    result.completed = shared.completed.load(Ordering::Relaxed);
    result.ttfb = std::mem::take(&mut *shared.ttfb.lock().expect("lock"));
    result
}

#[derive(Debug, Clone, Default)]
pub struct HttpSample {
    pub load: LoadResult,
    pub usage: Usage,
    /// This program's CPU time over the cell: the clients'. Both ends share the kernel's TCP
    /// work on loopback, and the split moves with how the server paces its writes, so the
    /// server's figure alone is not like for like (see `report`).
    pub client_usage: Usage,
    /// TCP segments sent in the lab's namespace over the cell, both ends: how many packets the
    /// server cut its bytes into (a runt after every write, without a cork) plus the acks.
    pub segments: u64,
}

/// One cell: warm-up, then the measured time, with the server's and the clients' CPU time and
/// the namespace's TCP segments over the latter.
pub fn http_cell(lab: &Lab, target: &Target, clients: usize, options: &Options) -> Result<HttpSample> {
    let Target { addr, group, .. } = *target;
    let (warmup, seconds) = (Duration::from_secs(options.warmup), Duration::from_secs(options.seconds));
    in_lab(lab, move || async move {
        if !warmup.is_zero() {
            let load = http_load(addr, BIG_URL, clients, warmup, false).await;
            if let Some(e) = load.first_error {
                bail!("warm-up with {clients} clients: {} errors, first: {e}", load.errors);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (before, client_before) = (Usage::of_group(group), Usage::of_self());
        let segments_before = tcp_segments_sent();
        let load = http_load(addr, BIG_URL, clients, seconds, false).await;
        let usage = Usage::of_group(group).since(before);
        let client_usage = Usage::of_self().since(client_before);
        let segments = tcp_segments_sent().saturating_sub(segments_before);
        Ok(HttpSample { load, usage, client_usage, segments })
    })
}

#[derive(Debug, Clone, Default)]
pub struct ColdCell {
    pub server: &'static str,
    pub cold: bool,
    pub resident_before: u64,
    pub streams: LoadResult,
    pub probes: Vec<Duration>,
    pub probes_failed: usize,
    pub usage: Usage,
}

/// 16 clients `GET` the big file once each while a probe `GET`s the small script every 10 ms,
/// each on a new connection (a fixed schedule, so a stalled server shows in every probe that
/// waits on it, not just one).
pub fn cold_cell(lab: &Lab, target: &Target, streams: usize) -> Result<ColdCell> {
    let Target { addr, group, .. } = *target;
    in_lab(lab, move || async move {
        let before = Usage::of_group(group);
        let stop = Arc::new(AtomicBool::new(false));
        let prober = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut probes = JoinSet::new();
                let mut tick = tokio::time::interval(PROBE_EVERY);
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    probes.spawn(tokio::time::timeout(Duration::from_secs(60), fetch_small(addr, PROBE_URL)));
                }
                let (mut latencies, mut failed) = (Vec::new(), 0);
                while let Some(joined) = probes.join_next().await {
                    match joined {
                        Ok(Ok(Ok((_, latency)))) => latencies.push(latency),
                        _ => failed += 1,
                    }
                }
                (latencies, failed)
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let load = http_load(addr, BIG_URL, streams, ONCE_DEADLINE, true).await;
        stop.store(true, Ordering::SeqCst);
        let (probes, probes_failed) = prober.await?;
        let usage = Usage::of_group(group).since(before);
        Ok(ColdCell { streams: load, probes, probes_failed, usage, ..ColdCell::default() })
    })
}
