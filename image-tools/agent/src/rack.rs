//! The agent's HTTP side: its task, its reports and the image bytes, all from its rack.
//!
//! Plain HTTP (the rack is on the machine's own network) through a blocking client: the agent
//! does one thing at a time. Every request has timeouts; reports are retried with backoff.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use metalrack_api::agent::{AgentReport, AgentTask, AGENT_REPORT_PATH, AGENT_TASK_PATH};
use metalrack_image_tools::deploy::{ChunkSource, SourceError};
use metalrack_image_tools::manifest::{CHUNKS_MAX, ENTRY_LEN, HEADER_LEN};

/// Largest task JSON the agent reads: a task is a few short strings.
const TASK_JSON_BYTES_MAX: u64 = 64 * 1024;
/// Largest manifest the agent reads: the wire format's own bound (CHUNKS_MAX entries).
const MANIFEST_BYTES_MAX: u64 = HEADER_LEN as u64 + CHUNKS_MAX as u64 * ENTRY_LEN as u64;
/// Largest error body kept for a message.
const ERROR_BODY_BYTES_MAX: u64 = 512;

/// Connecting to the rack on its own network takes milliseconds; 10 s means it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Any single read from the rack: a rack that says nothing for 30 s is treated as gone (the
/// fetch is retried), while a slow but moving transfer of a large range is not cut off.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits between tries of a report or task request: 0.5 s doubling to 15 s.
const RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How long the final reports (inventory, deployed, released, failed) and the task request are
/// tried before the agent gives up: long enough to ride out a rack restart or upgrade.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(600);

/// The agent's rack and its credentials for this job.
pub struct Rack {
    base: String,
    mac: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Rack {
    pub fn new(base: &str, mac: &str, token: Option<String>) -> Rack {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .timeout_recv_response(Some(READ_TIMEOUT))
            .max_redirects(0)
            .build();
        Rack { base: base.trim_end_matches('/').to_string(), mac: mac.to_string(), token, agent: config.into() }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// Asks for the task once.
    fn task_once(&self) -> Result<AgentTask, Attempt> {
        let request = self.authorized(self.agent.get(self.url(AGENT_TASK_PATH)).query("mac", &self.mac));
        let mut response = request.call().map_err(|e| Attempt::Retry(format!("cannot reach the rack: {e}")))?;
        check_status(&mut response)?;
        let body = read_limited(&mut response, TASK_JSON_BYTES_MAX).map_err(Attempt::Retry)?;
        serde_json::from_slice(&body).map_err(|e| Attempt::Fatal(format!("the rack's task is not valid: {e}")))
    }

    /// Asks for the task, retrying while the rack is away.
    pub fn task(&self) -> Result<AgentTask> {
        retrying("ask the rack for a task", || self.task_once())
    }

    fn report_once(&self, report: &AgentReport) -> Result<(), Attempt> {
        let body = serde_json::to_vec(report).map_err(|e| Attempt::Fatal(e.to_string()))?;
        let request = self
            .authorized(self.agent.post(self.url(AGENT_REPORT_PATH)).query("mac", &self.mac))
            .header("Content-Type", "application/json");
        let mut response =
            request.send(&body[..]).map_err(|e| Attempt::Retry(format!("cannot reach the rack: {e}")))?;
        check_status(&mut response)
    }

    /// Sends a report until the rack takes it (bounded by [`RETRY_DEADLINE`]).
    pub fn report(&self, report: &AgentReport) -> Result<()> {
        if let Err(reason) = report.validate() {
            bail!("the agent built a report out of bounds: {reason}");
        }
        retrying(&format!("send the {} report", report.event_kind()), || self.report_once(report))
    }

    /// Sends a report once: progress reports are replaced by the next one, so a lost one is
    /// not worth holding the deploy for.
    pub fn report_best_effort(&self, report: &AgentReport) {
        if let Err(Attempt::Retry(reason) | Attempt::Fatal(reason)) = self.report_once(report) {
            tracing::warn!(%reason, "a progress report did not reach the rack");
        }
    }

    /// Fetches a whole (small) file from the rack: the manifest.
    pub fn manifest(&self, path: &str) -> Result<Vec<u8>> {
        retrying("fetch the manifest", || {
            let mut response = self
                .authorized(self.agent.get(self.url(path)))
                .call()
                .map_err(|e| Attempt::Retry(format!("cannot reach the rack: {e}")))?;
            check_status(&mut response)?;
            read_limited(&mut response, MANIFEST_BYTES_MAX).map_err(Attempt::Retry)
        })
    }

    /// The image file at `path` as a chunk source.
    pub fn source(&self, path: &str) -> HttpSource<'_> {
        HttpSource { rack: self, url: self.url(path) }
    }
}

/// One try's outcome when it failed.
enum Attempt {
    Retry(String),
    Fatal(String),
}

/// 2xx passes; 5xx, 408 and 429 may pass later; anything else will not.
fn check_status(response: &mut ureq::http::Response<ureq::Body>) -> Result<(), Attempt> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = read_limited(response, ERROR_BODY_BYTES_MAX).unwrap_or_default();
    let text: String = String::from_utf8_lossy(&body).chars().filter(|c| !c.is_control()).collect();
    let message = format!("the rack answered {status}: {text}");
    if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
        Err(Attempt::Retry(message))
    } else {
        Err(Attempt::Fatal(message))
    }
}

fn read_limited(response: &mut ureq::http::Response<ureq::Body>, limit: u64) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    response
        .body_mut()
        .as_reader()
        .take(limit + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("the rack's answer broke off: {e}"))?;
    if body.len() as u64 > limit {
        return Err(format!("the rack's answer is over {limit} bytes"));
    }
    Ok(body)
}

fn retrying<T>(what: &str, mut attempt: impl FnMut() -> Result<T, Attempt>) -> Result<T> {
    let started = Instant::now();
    let mut wait = RETRY_BACKOFF_INITIAL;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(Attempt::Fatal(reason)) => bail!("cannot {what}: {reason}"),
            Err(Attempt::Retry(reason)) => {
                if started.elapsed() + wait > RETRY_DEADLINE {
                    return Err(anyhow::anyhow!("{reason}")).context(format!("gave up trying to {what}"));
                }
                tracing::warn!(%reason, ?wait, "cannot {what}; trying again");
                std::thread::sleep(wait);
                wait = (wait * 2).min(RETRY_BACKOFF_MAX);
            }
        }
    }
}

/// The image file on the rack, fetched by `Range` requests.
pub struct HttpSource<'a> {
    rack: &'a Rack,
    url: String,
}

impl ChunkSource for HttpSource<'_> {
    fn fetch(&mut self, start: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if buf.is_empty() {
            return Ok(());
        }
        let last = start + buf.len() as u64 - 1;
        let request =
            self.rack.authorized(self.rack.agent.get(&self.url)).header("Range", format!("bytes={start}-{last}"));
        let mut response =
            request.call().map_err(|e| SourceError::retryable(0, format!("cannot reach the rack: {e}")))?;
        match check_status(&mut response) {
            Ok(()) => {}
            Err(Attempt::Retry(message)) => return Err(SourceError::retryable(0, message)),
            Err(Attempt::Fatal(message)) => return Err(SourceError::fatal(message)),
        }
        // 206 is the answer to a range; a 200 would be the whole file from its start, which is
        // only right when that is what was asked, and then only up to our buffer.
        if response.status().as_u16() != 206 && start != 0 {
            return Err(SourceError::fatal(format!(
                "the rack answered {} to a range request for bytes {start}-{last}",
                response.status()
            )));
        }
        let mut reader = response.body_mut().as_reader();
        let mut received = 0;
        while received < buf.len() {
            match reader.read(&mut buf[received..]) {
                Ok(0) => {
                    return Err(SourceError::retryable(
                        received,
                        format!("the range {start}-{last} ended after {received} bytes"),
                    ))
                }
                Ok(n) => received += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(SourceError::retryable(received, format!("the range {start}-{last} broke off: {e}")))
                }
            }
        }
        Ok(())
    }
}
