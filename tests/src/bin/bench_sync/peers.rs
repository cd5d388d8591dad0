//! The reference servers: nginx (or, without it, python3's http.server) serving v1 to `curl`,
//! and an rsync daemon serving each scenario's v2 to `rsync`, both on free loopback ports.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use metalrack_tests::process::{Daemon, Spawn};

use crate::tools::{b3sum, free_port, run_tool, settle, wait_listening, HttpKind};

pub struct HttpServer {
    port: u16,
    /// nginx's access log (`$bytes_sent $body_bytes_sent $request_length` per request), when
    /// asked for; [`HttpServer::served`] reads what was added since its last call.
    access_log: Option<PathBuf>,
    access_log_read: u64,
    _daemon: Daemon,
}

/// What an HTTP server answered, from its access log: bytes on the wire at the HTTP level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    pub requests: u64,
    /// Response bytes with their headers (`$bytes_sent`).
    pub bytes_sent: u64,
    /// Response bodies only (`$body_bytes_sent`).
    pub body_bytes_sent: u64,
    /// Request bytes with their headers (`$request_length`).
    pub request_bytes: u64,
}

impl Served {
    /// Both directions, headers included: what crossed the connection above TCP.
    pub fn wire_bytes(&self) -> u64 {
        self.bytes_sent + self.request_bytes
    }
}

impl HttpServer {
    /// Serves `file` as `/image.raw` from a private docroot on a free loopback port.
    pub async fn start(kind: HttpKind, work: &Path, file: &Path) -> Result<HttpServer> {
        let root = work.join("www");
        std::fs::create_dir_all(&root)?;
        // A hard link: the same bytes (and page-cache pages) as the rack syncs, no extra disk.
        std::fs::hard_link(file, root.join("image.raw"))?;
        HttpServer::spawn(kind, &work.join("http"), &root, false).await
    }

    /// nginx serving the dir `root` (static files, Range requests as nginx answers them), logging
    /// each request's bytes so that [`HttpServer::served`] can count a client's bytes on the wire.
    /// `dir` holds its config and logs.
    pub async fn start_logged(dir: &Path, root: &Path) -> Result<HttpServer> {
        HttpServer::spawn(HttpKind::Nginx, dir, root, true).await
    }

    async fn spawn(kind: HttpKind, dir: &Path, root: &Path, log_bytes: bool) -> Result<HttpServer> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let access_log = log_bytes.then(|| dir.join("access.log"));
        let command = match kind {
            HttpKind::Nginx => {
                let conf = dir.join("nginx.conf");
                let d = dir.display();
                // The log line is written when the request ends (no `buffer=`), so it is in the
                // file once the client has exited.
                let access = match &access_log {
                    Some(log) => format!(
                        "log_format bytes '$bytes_sent $body_bytes_sent $request_length $status';\n  \
                         access_log {} bytes;",
                        log.display()
                    ),
                    None => "access_log off;".to_owned(),
                };
                // One process (no master) so that killing it stops everything; temp paths and
                // logs inside the work dir so nothing outside it is touched.
                let text = format!(
                    "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                     error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
                     http {{\n  {access}\n  sendfile on;\n  tcp_nopush on;\n\
                     default_type application/octet-stream;\n\
                     client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                     fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                     server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
                    root.display()
                );
                std::fs::write(&conf, text)?;
                let mut command = std::process::Command::new("nginx");
                command.arg("-p").arg(dir).arg("-c").arg(&conf).arg("-e").arg(dir.join("error.log"));
                command
            }
            HttpKind::PythonHttpServer => {
                ensure!(!log_bytes, "counting bytes on the wire needs nginx: apt-get install nginx-light");
                let mut command = std::process::Command::new("python3");
                command.args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"]);
                command.arg(root);
                command
            }
        };
        let mut daemon = Daemon::spawn("http server", command, &dir.join("server.log"), false, Spawn::default())?;
        wait_listening(&mut daemon, port).await?;
        Ok(HttpServer { port, access_log, access_log_read: 0, _daemon: daemon })
    }

    /// `http://127.0.0.1:PORT/{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// What was served since the last call (needs [`HttpServer::start_logged`]). Every request
    /// must have succeeded: a 4xx/5xx means a peer was misconfigured, not a figure.
    pub fn served(&mut self) -> Result<Served> {
        let log = self.access_log.as_ref().context("this server does not log bytes")?;
        let text = std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
        let new = &text[self.access_log_read as usize..];
        self.access_log_read = text.len() as u64;
        let mut served = Served::default();
        for line in String::from_utf8_lossy(new).lines() {
            let fields: Vec<u64> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("access log line {line:?}"))?;
            let [bytes_sent, body, request, status] = fields[..] else { bail!("access log line {line:?}") };
            ensure!(status < 400, "nginx answered {status} (access log line {line:?})");
            served.requests += 1;
            served.bytes_sent += bytes_sent;
            served.body_bytes_sent += body;
            served.request_bytes += request;
        }
        Ok(served)
    }

    /// `curl -o OUT` (or `-o /dev/null`) of the file; checks the size, returns the wall time.
    pub async fn curl(&self, out: Option<&Path>, size: u64) -> Result<Duration> {
        let url = self.url("image.raw");
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

/// `rsync --daemon` on a free loopback port, its config and logs in `dir`, serving `modules`
/// (name, directory, writable; the directories are created); returns once it listens.
pub async fn spawn_rsync_daemon(dir: &Path, modules: &[(&str, PathBuf, bool)]) -> Result<(u16, Daemon)> {
    std::fs::create_dir_all(dir)?;
    // Running as root, the daemon would drop to `nobody`, who cannot read the 0700 temp
    // dir: stay root. No chroot: the module paths are plain dirs of ours.
    let mut conf = format!("use chroot = no\nuid = root\ngid = root\nlog file = {}/rsyncd.log\n", dir.display());
    for (name, path, writable) in modules {
        std::fs::create_dir_all(path)?;
        write!(conf, "[{name}]\npath = {}\nread only = {}\n", path.display(), if *writable { "no" } else { "yes" })?;
    }
    let conf_path = dir.join("rsyncd.conf");
    std::fs::write(&conf_path, conf)?;
    let port = free_port()?;
    let mut command = std::process::Command::new("rsync");
    command.arg("--daemon").arg("--no-detach").arg(format!("--config={}", conf_path.display()));
    command.args(["--address=127.0.0.1", &format!("--port={port}")]);
    let mut daemon = Daemon::spawn("rsync daemon", command, &dir.join("daemon.log"), false, Spawn::default())?;
    wait_listening(&mut daemon, port).await?;
    Ok((port, daemon))
}

/// `rsync --daemon` on a free loopback port with one read-only module per scenario, each dir
/// holding that scenario's v2 as `image.raw`.
pub struct RsyncDaemon {
    work: PathBuf,
    port: u16,
    _daemon: Daemon,
}

impl RsyncDaemon {
    /// One module per key in `keys` (`src-KEY/image.raw`, written by the caller).
    pub async fn start(work: &Path, keys: &[&str]) -> Result<RsyncDaemon> {
        let dir = work.join("rsyncd");
        let modules: Vec<(&str, PathBuf, bool)> =
            keys.iter().map(|key| (*key, dir.join(format!("src-{key}")), false)).collect();
        let (port, daemon) = spawn_rsync_daemon(&dir, &modules).await?;
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
