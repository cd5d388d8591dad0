//! The reference servers: nginx beside rackd in the rack's lab (the same file at the same URLs),
//! and dnsmasq in the reference lab (TFTP of the same bytes, DHCP with the same pool).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use metalrack_hardware::Lab;
use metalrack_tests::process::{Daemon, Spawn};

use crate::cancel::{sleep_checked, wait_until};
use crate::http::fetch_small;
use crate::page_cache::warm_file;
use crate::{in_lab, BIG_URL, NGINX_PORT, PROBE_URL, REFERENCE_LAB, TFTP_PATH};

pub struct Nginx {
    pub daemon: Daemon,
}

impl Nginx {
    /// nginx on 127.0.0.1:8080 in the rack's lab: the big file (hard link) and the probe script
    /// at the same URLs as rackd; a master and 2 workers (`worker_processes auto` on 2 cores),
    /// `sendfile on`, logs and temp paths in the work dir; with `sendfile_max_chunk`, that
    /// directive too (a diagnostic: the reference leaves nginx's default).
    pub fn start(
        lab: &Lab,
        work: &Path,
        big_file: &Path,
        script: &[u8],
        sendfile_max_chunk: Option<&str>,
    ) -> Result<Nginx> {
        let root = work.join("www");
        let dir = work.join("nginx");
        let big = root.join(BIG_URL.trim_start_matches('/'));
        let probe = root.join(PROBE_URL.trim_start_matches('/'));
        for path in [&big, &probe] {
            std::fs::create_dir_all(path.parent().context("a parent")?)?;
        }
        std::fs::create_dir_all(&dir)?;
        // The same inode as rackd serves: same bytes, same page-cache pages.
        std::fs::hard_link(big_file, &big)?;
        std::fs::write(&probe, script)?;
        let d = dir.display();
        let max_chunk = sendfile_max_chunk.map_or(String::new(), |size| format!("  sendfile_max_chunk {size};\n"));
        // `user root`: the snapshot files are the rack's (mode 0600); workers must read them.
        let text = format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\nuser root root;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n{max_chunk}  tcp_nopush on;\n  keepalive_requests 100000;\n\
             default_type application/octet-stream;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{ listen 127.0.0.1:{NGINX_PORT} backlog=1024; root {}; }}\n}}\n",
            root.display()
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, text)?;
        let mut command = Command::new("nginx");
        command.arg("-p").arg(&dir).arg("-c").arg(&conf).arg("-e").arg(dir.join("error.log"));
        let mut daemon = Daemon::spawn("nginx", command, &dir.join("stderr.log"), false, Spawn::in_lab(lab))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], NGINX_PORT));
        let started = Instant::now();
        loop {
            daemon.check_running()?;
            let answer = in_lab(lab, move || async move { fetch_small(addr, PROBE_URL).await });
            if let Ok((body, _)) = answer {
                ensure!(body == script, "nginx serves something else at {PROBE_URL}");
                break;
            }
            ensure!(started.elapsed() < Duration::from_secs(10), "nginx did not answer within 10 s");
            sleep_checked(Duration::from_millis(100))?;
        }
        Ok(Nginx { daemon })
    }
}

pub struct Dnsmasq {
    pub daemon: Daemon,
}

impl Dnsmasq {
    /// dnsmasq in the reference lab: TFTP (the same file) and DHCP on its bridge with
    /// the same pool, lease time and lease limit as rackd; no DNS, no ping before an offer (rackd
    /// does not ping either), routine DHCP/TFTP logging off (rackd logs neither).
    pub fn start(lab: &Lab, work: &Path, tftp_file: &Path) -> Result<Dnsmasq> {
        let dir = work.join("dnsmasq");
        let root = dir.join("tftp");
        let file = root.join(TFTP_PATH);
        std::fs::create_dir_all(file.parent().context("a parent")?)?;
        // dnsmasq running as root serves only world-readable files, and the rack's are 0600: a
        // copy (the same bytes, warm in the page cache like the original) rather than a link.
        std::fs::copy(tftp_file, &file)?;
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        warm_file(&file)?;
        let [a, b, _] = REFERENCE_LAB;
        let mut command = Command::new("dnsmasq");
        command.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--log-facility=-",
            "--pid-file=",
            "--user=root",
            "--port=0",
        ]);
        command.arg(format!("--interface={}", lab.bridge()));
        command.args(["--enable-tftp", "--tftp-max=256", "--quiet-tftp"]);
        command.arg(format!("--tftp-root={}", root.display()));
        command.arg(format!("--dhcp-range={a}.{b}.16.10,{a}.{b}.31.250,255.255.240.0,1h"));
        command.arg(format!("--dhcp-option=option:router,{a}.{b}.16.1"));
        command.arg(format!("--dhcp-leasefile={}", dir.join("leases").display()));
        command.args(["--dhcp-lease-max=4096", "--dhcp-authoritative", "--no-ping", "--quiet-dhcp"]);
        command.arg("--dhcp-boot=undionly.kpxe");
        let log = dir.join("dnsmasq.log");
        let mut daemon = Daemon::spawn("dnsmasq", command, &log, false, Spawn::in_lab(lab))?;
        wait_until("dnsmasq to start", Duration::from_secs(10), || {
            daemon.check_running()?;
            Ok(std::fs::read_to_string(&log).unwrap_or_default().contains("TFTP root is"))
        })?;
        Ok(Dnsmasq { daemon })
    }
}
