//! Harness for end-to-end tests: runs the real `regiond` and `rackd` binaries on port 0 in a temp
//! dir per test, and waits for conditions with deadlines instead of sleeping.

pub mod bench;
pub mod tftp;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use metalrack_api::{RackState, RackView};

/// A test's patience for anything that should happen within a few heartbeats.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Path of a workspace binary, built by `cargo build --workspace` (the README's test command does
/// it before `cargo test`). Tests run from `target/PROFILE/deps/`, the binaries sit one level up.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target/PROFILE dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

/// Polls `condition` until it returns `Some`, or panics naming `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when dropped, so a failing test leaves nothing running.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Stops the process with SIGKILL, as a crash or a pulled plug would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for it to exit; does nothing when it is stopped.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let status = child.wait().expect("wait for daemon");
            assert!(status.success(), "daemon exited with {status} on SIGTERM; log:\n{}", self.log_text());
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running region server in its own data dir.
#[derive(Debug)]
pub struct Region {
    pub data_dir: PathBuf,
    /// `http://127.0.0.1:PORT/MAAS`, the URL racks register with.
    pub url: String,
    pub daemon: Daemon,
}

/// Region settings for tests: heartbeats every 200 ms, offline after 1.5 s of silence.
pub const FAST_REGION_CONFIG: &str = "rack_heartbeat_interval_ms = 200\nrack_offline_after_ms = 1500\n";

impl Region {
    /// Starts `regiond serve` on 127.0.0.1:0 and waits for the address it prints.
    pub fn start(data_dir: &Path) -> Region {
        Region::start_with_config(data_dir, FAST_REGION_CONFIG)
    }

    /// Stops the region (SIGTERM) unless stopped already, and starts it again on the same address.
    pub fn restart(&mut self) {
        self.daemon.terminate();
        let address = self.url.trim_start_matches("http://").trim_end_matches("/MAAS").to_owned();
        let config = std::fs::read_to_string(self.data_dir.with_extension("toml")).unwrap();
        *self = Region::spawn(&self.data_dir, &config, &address, &[]);
    }

    pub fn start_with_config(data_dir: &Path, config: &str) -> Region {
        Region::spawn(data_dir, config, "127.0.0.1:0", &[])
    }

    /// Starts a region with extra environment (fault hooks).
    pub fn start_with_env(data_dir: &Path, config: &str, env: &[(&str, &str)]) -> Region {
        Region::spawn(data_dir, config, "127.0.0.1:0", env)
    }

    fn spawn(data_dir: &Path, config: &str, listen: &str, env: &[(&str, &str)]) -> Region {
        std::fs::create_dir_all(data_dir).unwrap();
        let config_path = data_dir.with_extension("toml");
        std::fs::write(&config_path, config).unwrap();
        let log = data_dir.with_extension("log");
        let mut child = Command::new(binary("regiond"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", listen, "--config"])
            .arg(&config_path)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start regiond");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read regiond's first line");
        let daemon = Daemon { child: Some(child), log };
        let url = line
            .trim()
            .strip_prefix("regiond: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; log:\n{}", daemon.log_text()))
            .trim_end_matches('/')
            .to_owned();
        Region { data_dir: data_dir.to_owned(), url, daemon }
    }

    /// Runs a `regiond` subcommand against this region's data dir.
    pub fn command(&self, args: &[&str]) -> Output {
        regiond(&self.data_dir, args)
    }

    pub fn secret(&self) -> String {
        let output = self.command(&["secret", "show"]);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// Creates an administrator and returns their API key.
    pub fn create_admin(&self, username: &str, password: &str) -> String {
        let email = format!("{username}@example.com");
        let output = self.command(&["createadmin", "--username", username, "--password", password, "--email", &email]);
        assert!(output.status.success(), "createadmin failed: {}", String::from_utf8_lossy(&output.stderr));
        let output = self.command(&["apikey", "--username", username]);
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().lines().next().expect("an API key").to_owned()
    }

    /// The racks as the API lists them.
    pub async fn racks(&self, api_key: &str) -> Vec<RackView> {
        let response = reqwest::Client::new()
            .get(format!("{}/api/v1/racks", self.url))
            .bearer_auth(api_key)
            .send()
            .await
            .expect("GET racks");
        assert!(response.status().is_success(), "GET racks: {}", response.status());
        response.json().await.expect("racks JSON")
    }

    /// Waits until the rack named `name` is in `state`.
    pub async fn wait_rack_state(&self, api_key: &str, name: &str, state: RackState) {
        wait_for(&format!("rack {name} to be {}", state.label()), DEADLINE, || async {
            self.racks(api_key).await.iter().any(|r| r.name == name && r.state == state).then_some(())
        })
        .await
    }

    /// Events as `KIND ACTOR: MESSAGE`, newest first.
    /// `imgtool push FILE` of `name` amd64 `kind` `version`; panics (with imgtool's error) if it fails.
    pub fn push(&self, api_key: &str, file: &Path, name: &str, kind: &str, version: &str) -> String {
        let output = Command::new(binary("imgtool"))
            .arg("push")
            .arg(file)
            .args(["--name", name, "--arch", "amd64", "--kind", kind, "--version", version])
            .args(["--url", &self.url, "--api-key", api_key])
            .output()
            .expect("run imgtool");
        assert!(output.status.success(), "imgtool push failed: {}", stderr(&output));
        String::from_utf8(output.stdout).unwrap()
    }

    /// Tells the region that `mac` boots `ubuntu/noble` amd64 version 1 with `console=ttyS0`.
    pub async fn boot_machine_from_noble(&self, api_key: &str, mac: &str) {
        let machine = serde_json::json!({
            "hostname": "node1",
            "boot": { "kind": "image", "image": "ubuntu/noble", "arch": "amd64", "version": "1", "kernel_params": "console=ttyS0" }
        });
        let response = reqwest::Client::new()
            .put(format!("{}/api/v1/machines/{}", self.url, mac.replace(':', "-")))
            .bearer_auth(api_key)
            .json(&machine)
            .send()
            .await
            .expect("PUT machine");
        assert_eq!(response.status(), reqwest::StatusCode::NO_CONTENT);
    }

    /// The region's newest 1000 events.
    pub async fn events(&self, api_key: &str) -> Vec<metalrack_api::EventView> {
        let response = reqwest::Client::new()
            .get(format!("{}/api/v1/events?limit=1000", self.url))
            .bearer_auth(api_key)
            .send()
            .await
            .expect("GET events");
        response.json().await.expect("events JSON")
    }

    pub async fn event_lines(&self, api_key: &str) -> Vec<String> {
        self.events(api_key).await.into_iter().map(|e| format!("{} {}: {}", e.kind, e.actor, e.message)).collect()
    }

    pub async fn event_messages(&self, api_key: &str) -> Vec<String> {
        self.events(api_key).await.into_iter().map(|e| format!("{} {}", e.kind, e.message)).collect()
    }
}

pub fn regiond(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(binary("regiond"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run regiond")
}

/// A rack appliance's data dir, and its `rackd serve` once started.
#[derive(Debug)]
pub struct Rack {
    pub data_dir: PathBuf,
    pub name: String,
    pub daemon: Option<Daemon>,
}

/// Rack settings for tests: retries back off to at most 400 ms.
pub const FAST_RACK_CONFIG: &str = "retry_backoff_max_ms = 400\nregion_request_timeout_ms = 2000\n";

impl Rack {
    pub fn new(root: &Path, name: &str) -> Rack {
        Rack { data_dir: root.join(format!("rack-{name}")), name: name.to_owned(), daemon: None }
    }

    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(binary("rackd"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run rackd")
    }

    pub fn register(&self, url: &str, secret: &str) -> Output {
        self.command(&["register", "--url", url, "--secret", secret, "--name", &self.name])
    }

    pub fn register_ok(&self, url: &str, secret: &str) {
        let output = self.register(url, secret);
        assert!(output.status.success(), "register {} failed: {}", self.name, String::from_utf8_lossy(&output.stderr));
    }

    pub fn serve(&mut self) {
        self.serve_with_config("");
    }

    /// Starts `rackd serve` with `extra` TOML (e.g. a `[pxe]` section) after the fast defaults.
    pub fn serve_with_config(&mut self, extra: &str) {
        let config = self.data_dir.with_extension("toml");
        std::fs::write(&config, format!("{FAST_RACK_CONFIG}{extra}")).unwrap();
        let log = self.data_dir.with_extension("log");
        let child = Command::new(binary("rackd"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start rackd");
        self.daemon = Some(Daemon { child: Some(child), log });
    }

    pub fn status(&self) -> String {
        String::from_utf8(self.command(&["status"]).stdout).unwrap()
    }
}

/// Deterministic pseudo-random bytes (xorshift), so test files neither compress nor share
/// chunks by accident, and a failure reproduces.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A port free on 127.0.0.1 right now (for servers whose port must be known in advance).
pub fn free_port() -> u16 {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    // The same number must be free for UDP too (TFTP).
    match std::net::UdpSocket::bind(("127.0.0.1", port)) {
        Ok(_) => port,
        Err(_) => free_port(),
    }
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
