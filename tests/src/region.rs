//! A region under test: `regiond serve` in its own data dir on a port of its choosing, its
//! administrator and API key, the shared secret, `imgtool push` into its catalogue, and HTTPS to
//! it trusting the certificate it made in `DATA/tls/` (as an operator's `curl --cacert` would).
//!
//! The `Result` forms (`launch`, `add_admin`, `shared_secret`, `push_command`) serve the
//! benchmarks; the short forms (`start`, `create_admin`, `secret`, `push`) panic with the reason,
//! for tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use metalrack_api::paths::BASE_PATH;
use metalrack_api::{EventView, RackState, RackView};
use rustls_pki_types::pem::PemObject;

use crate::api::Api;
use crate::binaries::{binary, locate};
use crate::process::{self, Daemon, Spawn};
use crate::wait::{wait_for, DEADLINE};

/// Region settings for tests: heartbeats every 200 ms, offline after 1.5 s of silence.
pub const FAST_REGION_CONFIG: &str = "rack_heartbeat_interval_ms = 200\nrack_offline_after_ms = 1500\n";

/// Loopback, port 0: the region picks a free port and prints it.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// How long `regiond serve` may take to print the address it listens on.
const LISTENING_DEADLINE: Duration = Duration::from_secs(30);

/// A running region server in its own data dir.
#[derive(Debug)]
pub struct Region {
    pub data_dir: PathBuf,
    /// `http://127.0.0.1:PORT/MAAS`, the URL racks register with.
    pub url: String,
    pub daemon: Daemon,
}

impl Region {
    /// Starts `regiond serve --listen LISTEN --config DATA_DIR.toml` (holding `config`) with
    /// `env` added, and waits for the address it prints first; its log is `DATA_DIR.log`.
    pub fn launch(data_dir: &Path, config: &str, listen: &str, env: &[(&str, &str)], how: Spawn) -> Result<Region> {
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let config_path = data_dir.with_extension("toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(locate("regiond")?);
        command.arg("--data-dir").arg(data_dir).args(["serve", "--listen", listen, "--config"]).arg(&config_path);
        command.envs(env.iter().copied());
        let daemon = Daemon::spawn("regiond", command, &data_dir.with_extension("log"), true, how)?;
        Region::from_started(data_dir, daemon)
    }

    /// The region `daemon` is starting (a `regiond serve` over `data_dir` spawned with its
    /// stdout piped), once it printed the address it listens on.
    pub fn from_started(data_dir: &Path, mut daemon: Daemon) -> Result<Region> {
        // Read the first line on a thread, with a deadline: killing the daemon (on drop) closes
        // the pipe and ends a read that is still blocked.
        let stdout = daemon.take_stdout().context("regiond's stdout is piped")?;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = receiver
            .recv_timeout(LISTENING_DEADLINE)
            .with_context(|| format!("regiond printed no address within {LISTENING_DEADLINE:?}"))?;
        daemon.check_running()?;
        let url = line
            .trim()
            .strip_prefix("regiond: listening on ")
            .with_context(|| format!("unexpected first line from regiond: {line:?}; log:\n{}", daemon.log_text()))?
            .trim_end_matches('/')
            .to_owned();
        Ok(Region { data_dir: data_dir.to_owned(), url, daemon })
    }

    /// Starts a region with [`FAST_REGION_CONFIG`] on a free port.
    pub fn start(data_dir: &Path) -> Region {
        Region::start_with_config(data_dir, FAST_REGION_CONFIG)
    }

    pub fn start_with_config(data_dir: &Path, config: &str) -> Region {
        Region::start_with_env(data_dir, config, &[])
    }

    /// Starts a region with extra environment (fault hooks).
    pub fn start_with_env(data_dir: &Path, config: &str, env: &[(&str, &str)]) -> Region {
        Region::launch(data_dir, config, ANY_PORT, env, Spawn::default()).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Stops the region (SIGTERM) unless stopped already, and starts it again on the same
    /// address with the same config (without the extra environment).
    pub fn restart(&mut self) {
        self.daemon.terminate().unwrap();
        let address = self.url.trim_start_matches("http://").trim_end_matches("/MAAS").to_owned();
        let config = std::fs::read_to_string(self.data_dir.with_extension("toml")).unwrap();
        *self = Region::launch(&self.data_dir, &config, &address, &[], Spawn::default()).unwrap();
    }

    /// The address it listens on, for clients that speak raw TCP.
    pub fn socket_address(&self) -> std::net::SocketAddr {
        let authority = self.url.trim_start_matches("http://").trim_end_matches(BASE_PATH);
        authority.parse().unwrap_or_else(|e| panic!("region URL {}: {e}", self.url))
    }

    /// Runs a `regiond` subcommand against this region's data dir.
    pub fn command(&self, args: &[&str]) -> Output {
        regiond(&self.data_dir, args)
    }

    /// Runs a `regiond` subcommand that must succeed; its stdout, trimmed.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new(locate("regiond")?);
        command.arg("--data-dir").arg(&self.data_dir).args(args);
        let output = process::run(command, None)?;
        Ok(String::from_utf8(output.stdout)?.trim().to_owned())
    }

    /// The shared secret racks register with (`regiond secret show`).
    pub fn shared_secret(&self) -> Result<String> {
        self.run(&["secret", "show"])
    }

    pub fn secret(&self) -> String {
        self.shared_secret().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Creates administrator `username` (`regiond createadmin` with flags) and returns their API
    /// key (`regiond apikey`).
    pub fn add_admin(&self, username: &str, password: &str) -> Result<String> {
        let email = format!("{username}@example.com");
        self.run(&["createadmin", "--username", username, "--password", password, "--email", &email])?;
        let keys = self.run(&["apikey", "--username", username])?;
        Ok(keys.lines().next().context("regiond apikey printed no key")?.to_owned())
    }

    pub fn create_admin(&self, username: &str, password: &str) -> String {
        self.add_admin(username, password).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `https://127.0.0.1:PORT/MAAS`: the same port as [`Region::url`], over TLS (the UI and API).
    pub fn https_url(&self) -> String {
        self.url.replacen("http://", "https://", 1)
    }

    /// The certificate the region serves, `DATA/tls/cert.pem` (made on its first start).
    pub fn certificate_path(&self) -> PathBuf {
        self.data_dir.join("tls/cert.pem")
    }

    /// SHA-256 of the certificate's DER, hex: what racks pin.
    pub fn certificate_sha256(&self) -> String {
        let pem = std::fs::read(self.certificate_path()).expect("the region made its certificate");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("a PEM certificate");
        hex::encode(metalrack_api::certificate_sha256(&der))
    }

    /// SHA-256 of the certificate's public key (SubjectPublicKeyInfo, DER), base64: how Chromium
    /// is told to trust it (`--ignore-certificate-errors-spki-list`).
    pub fn certificate_spki_sha256_base64(&self) -> String {
        use sha2::Digest;
        let key = std::fs::read_to_string(self.data_dir.join("tls/key.pem")).expect("the region made its key");
        let key = rcgen::KeyPair::from_pem(&key).expect("a PEM key");
        base64(&sha2::Sha256::digest(key.public_key_der()))
    }

    /// A raw TLS connection to the region, trusting its certificate and no other: for requests
    /// written by hand (a body announced and never sent, say).
    pub async fn tls_stream(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let pem = std::fs::read(self.certificate_path()).expect("the region made its certificate");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("a PEM certificate")).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(self.socket_address()).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap().to_owned();
        connector.connect(name, tcp).await.expect("a TLS handshake with the region")
    }

    /// An HTTP client builder that trusts this region's certificate and no other; add what the
    /// test needs (cookies, no redirects) and build.
    pub fn https_client_builder(&self) -> reqwest::ClientBuilder {
        let pem = std::fs::read(self.certificate_path()).expect("the region made its certificate");
        let certificate = reqwest::Certificate::from_pem(&pem).expect("a PEM certificate");
        reqwest::Client::builder().tls_built_in_root_certs(false).add_root_certificate(certificate)
    }

    pub fn https_client(&self) -> reqwest::Client {
        self.https_client_builder().build().expect("an HTTPS client")
    }

    /// The API (over HTTPS) as the owner of `api_key`.
    pub fn api(&self, api_key: &str) -> Api {
        Api::new(self.https_client(), &self.https_url(), api_key)
    }

    /// `imgtool push FILE` of `name` amd64 `kind` `version` into this region; run it as suits
    /// (blocking, async with a timeout, inside a lab).
    pub fn push_command(&self, api_key: &str, file: &Path, name: &str, kind: &str, version: &str) -> Result<Command> {
        let mut command = Command::new(locate("imgtool")?);
        command.arg("push").arg(file);
        command.args(["--name", name, "--arch", "amd64", "--kind", kind, "--version", version]);
        // Over HTTPS, trusting the certificate the region made, as an operator with a copy would.
        command.arg("--url").arg(self.https_url()).arg("--ca-cert").arg(self.certificate_path());
        command.args(["--api-key", api_key]);
        Ok(command)
    }

    /// Runs [`Region::push_command`]; panics (with imgtool's error) unless it committed.
    pub fn push(&self, api_key: &str, file: &Path, name: &str, kind: &str, version: &str) -> String {
        let command = self.push_command(api_key, file, name, kind, version).unwrap();
        let output = process::run(command, None).unwrap_or_else(|e| panic!("{e:#}"));
        let text = String::from_utf8(output.stdout).unwrap();
        assert!(text.contains("committed"), "imgtool push did not commit: {text}");
        text
    }

    /// The racks as the API lists them.
    pub async fn racks(&self, api_key: &str) -> Vec<RackView> {
        self.api(api_key).racks().await.unwrap()
    }

    /// Waits until the rack named `name` is in `state`.
    pub async fn wait_rack_state(&self, api_key: &str, name: &str, state: RackState) {
        wait_for(&format!("rack {name} to be {}", state.label()), DEADLINE, || async {
            self.racks(api_key).await.iter().any(|r| r.name == name && r.state == state).then_some(())
        })
        .await
    }

    /// Tells the region that `mac` boots `ubuntu/noble` amd64 version 1 with `console=ttyS0`.
    pub async fn boot_machine_from_noble(&self, api_key: &str, mac: &str) {
        let machine = serde_json::json!({
            "hostname": "node1",
            "boot": { "kind": "image", "image": "ubuntu/noble", "arch": "amd64", "version": "1", "kernel_params": "console=ttyS0" }
        });
        self.api(api_key).put_machine(mac, &machine).await.unwrap();
    }

    /// The region's newest 1000 events.
    pub async fn events(&self, api_key: &str) -> Vec<EventView> {
        self.api(api_key).events().await.unwrap()
    }

    /// Events as `KIND ACTOR: MESSAGE`, newest first.
    pub async fn event_lines(&self, api_key: &str) -> Vec<String> {
        self.events(api_key).await.into_iter().map(|e| format!("{} {}: {}", e.kind, e.actor, e.message)).collect()
    }

    /// Every boot event the region stored, oldest first, read from its database (the API pages
    /// only the newest 1000): for tests that count tens of thousands.
    pub async fn stored_boot_events(&self) -> Vec<StoredBootEvent> {
        let mut db = self.database().await;
        let rows: Vec<(i64, String, String, String)> =
            sqlx::query_as("SELECT id, kind, actor, message FROM events WHERE kind LIKE 'boot.%' ORDER BY id")
                .fetch_all(&mut db)
                .await
                .unwrap();
        rows.into_iter().map(|(id, kind, actor, message)| StoredBootEvent { id, kind, actor, message }).collect()
    }

    /// The rack's ids of the stored boot events, `(rack_id, queue_id, seq)` in the order stored.
    pub async fn stored_boot_event_ids(&self) -> Vec<(Option<String>, Option<i64>, Option<i64>)> {
        let mut db = self.database().await;
        sqlx::query_as("SELECT rack_id, rack_queue_id, rack_seq FROM events WHERE kind LIKE 'boot.%' ORDER BY id")
            .fetch_all(&mut db)
            .await
            .unwrap()
    }

    /// The region's database, read-only (it may be running: SQLite's WAL lets readers in).
    async fn database(&self) -> sqlx::SqliteConnection {
        let url = format!("sqlite://{}?mode=ro", self.data_dir.join("region.db").display());
        <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await.unwrap()
    }

    /// Events as `KIND MESSAGE`, newest first.
    pub async fn event_messages(&self, api_key: &str) -> Vec<String> {
        self.events(api_key).await.into_iter().map(|e| format!("{} {}", e.kind, e.message)).collect()
    }
}

/// A boot event as the region's database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBootEvent {
    pub id: i64,
    pub kind: String,
    pub actor: String,
    pub message: String,
}

/// Runs `regiond --data-dir DATA_DIR ARGS` with stdin closed; its output, whatever the exit.
pub fn regiond(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(binary("regiond"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run regiond")
}

/// Standard base64 with padding (RFC 4648), for the few places a test needs it.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let b = [group[0], group.get(1).copied().unwrap_or(0), group.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648() {
        for (input, expected) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(super::base64(input.as_bytes()), expected);
        }
    }
}
