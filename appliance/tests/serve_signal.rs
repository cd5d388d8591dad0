//! The real `rackd serve` binary stops on SIGTERM and on SIGINT: within its shutdown bound, with
//! exit code 0, its sockets closed and its control socket removed.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metalrack_appliance::registration::Registration;
use metalrack_appliance::serve::{EVENTS_LAST_FLUSH_MAX, SHUTDOWN_GRACE};

/// How long a debug build may take to start on a shared machine.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Kills the daemon if a test fails before it exits.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn registered_rack(root: &Path) -> std::path::PathBuf {
    let data_dir = root.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let registration = Registration {
        // Nobody listens there: the rack runs with its region away.
        region_url: "http://127.0.0.1:9/MAAS".into(),
        rack_name: "r1".into(),
        rack_id: "1".into(),
        credential: "c".into(),
        cluster_name: "test".into(),
        registered_at_ms: 0,
        region_certificate_sha256: Some("ab".repeat(32)),
    };
    std::fs::write(data_dir.join("registration.toml"), toml::to_string(&registration).unwrap()).unwrap();
    let loaders = root.join("loaders");
    std::fs::create_dir_all(&loaders).unwrap();
    std::fs::write(loaders.join("undionly.kpxe"), b"pretend loader").unwrap();
    std::fs::write(
        root.join("rack.toml"),
        format!(
            "region_request_timeout_ms = 1000\n\
             [pxe]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\nhttp_listen = \"127.0.0.1:0\"\n\
             loaders_dir = \"{}\"\n[pxe.tftp]\nlisten = \"127.0.0.1:0\"\n[pxe.dhcp]\nmode = \"off\"\n",
            loaders.display()
        ),
    )
    .unwrap();
    data_dir
}

/// `signal` as `kill` names it: TERM, INT.
fn stops_on(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = registered_rack(dir.path());
    let log = dir.path().join("rackd.log");
    let child = Command::new(env!("CARGO_BIN_EXE_rackd"))
        .args(["--data-dir", data_dir.to_str().unwrap(), "serve", "--config"])
        .arg(dir.path().join("rack.toml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // Serving once PXE says so (the control socket is bound before it).
    let started = Instant::now();
    while !log_text().contains("PXE serving") {
        assert!(started.elapsed() < START_DEADLINE, "rackd did not start:\n{}", log_text());
        assert!(daemon.0.try_wait().unwrap().is_none(), "rackd exited:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(data_dir.join("control.sock").exists());

    let sent_at = Instant::now();
    let sent = Command::new("kill").arg(format!("-{signal}")).arg(daemon.0.id().to_string()).status().unwrap();
    assert!(sent.success());
    let bound = SHUTDOWN_GRACE + EVENTS_LAST_FLUSH_MAX;
    let status = loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            break status;
        }
        assert!(sent_at.elapsed() < bound, "rackd still running {bound:?} after SIG{signal}:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "rackd exited with {status} on SIG{signal}:\n{}", log_text());
    let mut text = String::new();
    std::fs::File::open(&log).unwrap().read_to_string(&mut text).unwrap();
    assert!(text.contains("rack stopped"), "{text}");
    assert!(!text.contains("abandoned"), "nothing was in flight:\n{text}");
    assert!(!data_dir.join("control.sock").exists(), "control socket left behind");
}

#[test]
fn sigterm_stops_serve_in_time_with_exit_0() {
    stops_on("TERM");
}

#[test]
fn sigint_stops_serve_in_time_with_exit_0() {
    stops_on("INT");
}
