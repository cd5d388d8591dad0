//! The reference servers: nginx (or, without it, python3's http.server) serving v1 to `curl`,
//! and an rsync daemon serving each scenario's v2 to `rsync`, both on free loopback ports.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use metalrack_tests::process::{Daemon, Spawn};

use crate::edits::Scenario;
use crate::tools::{b3sum, free_port, run_tool, settle, wait_listening, HttpKind};
use crate::POLL;

pub struct HttpServer {
    port: u16,
    _daemon: Daemon,
}

impl HttpServer {
    /// Serves `file` as `/image.raw` from a private docroot on a free loopback port.
    pub async fn start(kind: HttpKind, work: &Path, file: &Path) -> Result<HttpServer> {
        let root = work.join("www");
        let dir = work.join("http");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&dir)?;
        // A hard link: the same bytes (and page-cache pages) as the rack syncs, no extra disk.
        std::fs::hard_link(file, root.join("image.raw"))?;
        let port = free_port()?;
        let command = match kind {
            HttpKind::Nginx => {
                let conf = dir.join("nginx.conf");
                let d = dir.display();
                // One process (no master) so that killing it stops everything; temp paths and
                // logs inside the work dir so nothing outside it is touched.
                let text = format!(
                    "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                     error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
                     http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
                     default_type application/octet-stream;\n\
                     client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                     fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                     server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
                    root.display()
                );
                std::fs::write(&conf, text)?;
                let mut command = std::process::Command::new("nginx");
                command.arg("-p").arg(&dir).arg("-c").arg(&conf).arg("-e").arg(dir.join("error.log"));
                command
            }
            HttpKind::PythonHttpServer => {
                let mut command = std::process::Command::new("python3");
                command.args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"]);
                command.arg(&root);
                command
            }
        };
        let mut daemon = Daemon::spawn("http server", command, &dir.join("server.log"), false, Spawn::default())?;
        wait_listening(&mut daemon, port).await?;
        Ok(HttpServer { port, _daemon: daemon })
    }

    /// `curl -o OUT` (or `-o /dev/null`) of the file; checks the size, returns the wall time.
    pub async fn curl(&self, out: Option<&Path>, size: u64) -> Result<Duration> {
        let url = format!("http://127.0.0.1:{}/image.raw", self.port);
        let out = out.map_or_else(|| PathBuf::from("/dev/null"), Path::to_owned);
        let args: [OsString; 7] = [
            "-sS".into(),
            "--fail".into(),
            "-o".into(),
            out.into(),
            "-w".into(),
            "%{size_download}".into(),
            url.into(),
        ];
        let (output, elapsed) = run_tool(Path::new("curl"), &args).await?;
        let got: u64 = String::from_utf8_lossy(&output.stdout).trim().parse().context("curl's size_download")?;
        ensure!(got == size, "curl fetched {got} bytes, expected {size}");
        Ok(elapsed)
    }
}

#[derive(Debug, Clone, Default)]
pub struct RsyncSample {
    pub wall: Duration,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub literal: u64,
}

/// `rsync --daemon` on a free loopback port with one read-only module per scenario, each dir
/// holding that scenario's v2 as `image.raw`.
pub struct RsyncDaemon {
    work: PathBuf,
    port: u16,
    _daemon: Daemon,
}

impl RsyncDaemon {
    pub fn start(work: &Path, scenarios: &[Scenario]) -> Result<RsyncDaemon> {
        let dir = work.join("rsyncd");
        std::fs::create_dir_all(&dir)?;
        // Running as root, the daemon would drop to `nobody`, who cannot read the 0700 temp
        // dir: stay root. No chroot: the module paths are plain dirs of ours.
        let mut conf = format!("use chroot = no\nuid = root\ngid = root\nlog file = {}/rsyncd.log\n", dir.display());
        for scenario in scenarios {
            let module = dir.join(format!("src-{}", scenario.key));
            std::fs::create_dir_all(&module)?;
            write!(conf, "[{}]\npath = {}\nread only = yes\n", scenario.key, module.display())?;
        }
        let conf_path = dir.join("rsyncd.conf");
        std::fs::write(&conf_path, conf)?;
        let port = free_port()?;
        let mut command = std::process::Command::new("rsync");
        command.arg("--daemon").arg("--no-detach").arg(format!("--config={}", conf_path.display()));
        command.args(["--address=127.0.0.1", &format!("--port={port}")]);
        let mut daemon = Daemon::spawn("rsync daemon", command, &dir.join("daemon.log"), false, Spawn::default())?;
        // Blocking wait is fine here: nothing else runs yet and it takes milliseconds.
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            daemon.check_running()?;
            ensure!(start.elapsed() < Duration::from_secs(10), "rsync daemon did not listen on {port}");
            std::thread::sleep(POLL);
        }
        Ok(RsyncDaemon { work: work.to_owned(), port, _daemon: daemon })
    }

    /// Where scenario `key`'s v2 must be written for the daemon to serve it.
    pub fn source_file(&self, key: &str) -> PathBuf {
        self.work.join("rsyncd").join(format!("src-{key}")).join("image.raw")
    }

    /// Puts a fresh copy of `v1` in place as `image.raw` (untimed) and pulls scenario `key`'s v2
    /// over it. `-I` so rsync never skips the file on size and time; `--no-whole-file` forces
    /// its delta algorithm; `--stats` reports the bytes that crossed the socket.
    pub async fn pull(&self, key: &str, v1: &Path, v2_hash: &str, check: bool) -> Result<RsyncSample> {
        let dest_dir = self.work.join("rsync-dest");
        std::fs::create_dir_all(&dest_dir)?;
        let dest = dest_dir.join("image.raw");
        std::fs::copy(v1, &dest)?;
        settle().await?;
        let source = format!("rsync://127.0.0.1:{}/{key}/image.raw", self.port);
        let args: [OsString; 5] =
            ["-I".into(), "--no-whole-file".into(), "--stats".into(), source.into(), (&dest).into()];
        let (output, wall) = run_tool(Path::new("rsync"), &args).await?;
        let stats = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| -> Result<u64> {
            let line =
                stats.lines().find_map(|l| l.strip_prefix(name)).with_context(|| format!("no {name:?} in {stats}"))?;
            let digits: String = line
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(|c| c.is_ascii_digit() || *c == ',')
                .filter(|c| *c != ',')
                .collect();
            digits.parse().with_context(|| format!("{name:?} in {stats}"))
        };
        let sample = RsyncSample {
            wall,
            bytes_sent: field("Total bytes sent:")?,
            bytes_received: field("Total bytes received:")?,
            literal: field("Literal data:")?,
        };
        if check {
            let (got, _) = b3sum(&dest, None).await?;
            ensure!(got == v2_hash, "rsync's result hashes to {got}, not v2's {v2_hash}");
        }
        std::fs::remove_file(&dest)?;
        Ok(sample)
    }
}
