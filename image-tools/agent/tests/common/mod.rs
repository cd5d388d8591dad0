//! A test rack: the agent's side of the rack's HTTP (task, reports, the image file with
//! `Range`, its manifest) on a real socket, recording what the agent asked and reported.

#![allow(dead_code)] // Each test file uses part of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metalrack_api::agent::{AgentReport, AgentTask};
use metalrack_image_tools::chunker::{chunk_slice, ChunkerConfig};
use metalrack_image_tools::manifest::Manifest;

pub const FILE_PATH: &str = "/files/root-disk";
pub const MANIFEST_PATH: &str = "/files/root-disk.manifest";
pub const TOKEN: &str = "0123456789abcdef0123456789abcdef";

#[derive(Default)]
pub struct RackState {
    pub task: Mutex<Option<AgentTask>>,
    pub image: Mutex<Vec<u8>>,
    pub manifest: Mutex<Vec<u8>>,
    /// Reports with the `Authorization` header and `mac` they came with.
    pub reports: Mutex<Vec<(AgentReport, Option<String>, String)>>,
    pub task_auth: Mutex<Vec<Option<String>>>,
    pub bytes_served: AtomicU64,
    /// Offset of a byte to flip the first time a range covering it is served.
    pub corrupt_once: Mutex<Option<u64>>,
    /// Bytes after which the next range response longer than that breaks off (the connection
    /// drops mid-range), once.
    pub drop_once_after: Mutex<Option<usize>>,
}

pub struct TestRack {
    pub addr: SocketAddr,
    pub state: Arc<RackState>,
    _runtime: tokio::runtime::Runtime,
}

#[derive(serde::Deserialize)]
struct MacQuery {
    mac: String,
}

impl TestRack {
    /// Serves on `bind` (`127.0.0.1:0`, or `0.0.0.0:0` for a QEMU guest).
    pub fn start(bind: &str) -> TestRack {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let state = Arc::new(RackState::default());
        let listener = runtime.block_on(tokio::net::TcpListener::bind(bind)).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/agent/task", get(task))
            .route("/agent/report", post(report))
            .route(FILE_PATH, get(file))
            .route(MANIFEST_PATH, get(manifest))
            .with_state(state.clone());
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestRack { addr, state, _runtime: runtime }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `image` and its manifest; the task is a deploy of it.
    pub fn serve_image(&self, image: &[u8]) -> Manifest {
        let manifest = chunk_slice(image, ChunkerConfig::default(), |_| {}).unwrap();
        *self.state.image.lock().unwrap() = image.to_vec();
        *self.state.manifest.lock().unwrap() = manifest.to_bytes();
        *self.state.task.lock().unwrap() = Some(AgentTask::Deploy {
            machine_id: "m1".into(),
            file_path: FILE_PATH.into(),
            manifest_path: MANIFEST_PATH.into(),
            file_len: manifest.file_len,
            file_hash: manifest.file_hash.to_hex(),
            disk: None,
        });
        manifest
    }

    pub fn reports(&self) -> Vec<AgentReport> {
        self.state.reports.lock().unwrap().iter().map(|(report, _, _)| report.clone()).collect()
    }
}

async fn task(State(state): State<Arc<RackState>>, Query(_query): Query<MacQuery>, headers: HeaderMap) -> Response {
    state.task_auth.lock().unwrap().push(auth(&headers));
    match state.task.lock().unwrap().clone() {
        Some(task) => axum::Json(task).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn report(
    State(state): State<Arc<RackState>>,
    Query(query): Query<MacQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let Ok(report) = serde_json::from_slice::<AgentReport>(&body) else { return StatusCode::BAD_REQUEST };
    state.reports.lock().unwrap().push((report, auth(&headers), query.mac));
    StatusCode::ACCEPTED
}

fn auth(headers: &HeaderMap) -> Option<String> {
    headers.get(header::AUTHORIZATION).map(|value| value.to_str().unwrap().to_string())
}

async fn manifest(State(state): State<Arc<RackState>>) -> Vec<u8> {
    state.manifest.lock().unwrap().clone()
}

async fn file(State(state): State<Arc<RackState>>, headers: HeaderMap) -> Response {
    let image = state.image.lock().unwrap().clone();
    let len = image.len() as u64;
    let Some(range) = headers.get(header::RANGE) else {
        state.bytes_served.fetch_add(len, Ordering::SeqCst);
        return image.into_response();
    };
    let ranges = http_range_header::parse_range_header(range.to_str().unwrap())
        .and_then(|parsed| parsed.validate(len).map_err(|_| http_range_header::RangeUnsatisfiableError::ZeroSuffix));
    let Ok(ranges) = ranges else { return StatusCode::RANGE_NOT_SATISFIABLE.into_response() };
    let [range] = &ranges[..] else { return StatusCode::RANGE_NOT_SATISFIABLE.into_response() };
    let (start, end) = (*range.start(), *range.end());
    let mut body = image[start as usize..=end as usize].to_vec();
    let mut corrupt = state.corrupt_once.lock().unwrap();
    if let Some(at) = *corrupt {
        if (start..=end).contains(&at) {
            body[(at - start) as usize] ^= 0xff;
            *corrupt = None;
        }
    }
    drop(corrupt);
    let content_range = [(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))];
    let drop_after = state.drop_once_after.lock().unwrap().take_if(|after| *after < body.len());
    if let Some(after) = drop_after {
        // The headers promise the whole range; the body stops after `after` bytes with an
        // error, which makes the server drop the connection.
        state.bytes_served.fetch_add(after as u64, Ordering::SeqCst);
        let first = Bytes::copy_from_slice(&body[..after]);
        let stream = futures_util::stream::iter([
            Ok(first),
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "dropped by the test rack")),
        ]);
        let mut response =
            (StatusCode::PARTIAL_CONTENT, content_range, axum::body::Body::from_stream(stream)).into_response();
        response.headers_mut().insert(header::CONTENT_LENGTH, body.len().into());
        return response;
    }
    state.bytes_served.fetch_add(body.len() as u64, Ordering::SeqCst);
    (StatusCode::PARTIAL_CONTENT, content_range, body).into_response()
}

/// The agent binary built with this package.
pub fn agent_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metalrack-agent"))
}

/// Runs the agent against `rack` with `--no-power` and the extra arguments; waits for it to
/// exit, killing it after `deadline`.
pub fn run_agent(rack: &TestRack, extra: &[&str], deadline: Duration) -> ExitStatus {
    let mut child = Command::new(agent_binary())
        .args(["--rack", &rack.url(), "--mac", "52:54:00:aa:bb:01", "--token", TOKEN, "--no-power"])
        .args(extra)
        .spawn()
        .unwrap();
    wait_child(&mut child, deadline).unwrap_or_else(|| panic!("the agent did not finish within {deadline:?}"))
}

/// Waits for `child` to exit within `deadline`; kills it and returns None otherwise.
pub fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().ok();
    child.wait().ok();
    None
}

pub use metalrack_image_tools::testdata::random_bytes;
