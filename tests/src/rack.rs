//! A rack appliance under test: its data dir, `rackd register` with a region, `rackd serve` with
//! a config of the caller's (a `[pxe]` section, fast retries), and where its snapshot shows a file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::Result;

use crate::binaries::{binary, locate};
use crate::process::{self, assert_success, Daemon, Spawn};

/// Rack settings for tests: retries back off to at most 400 ms, region requests time out in 2 s.
pub const FAST_RACK_CONFIG: &str = "retry_backoff_max_ms = 400\nregion_request_timeout_ms = 2000\n";

/// A rack appliance's data dir, and its `rackd serve` once started.
#[derive(Debug)]
pub struct Rack {
    /// `ROOT/rack-NAME`; its config is `ROOT/rack-NAME.toml`, its log `ROOT/rack-NAME.log`.
    pub data_dir: PathBuf,
    pub name: String,
    pub daemon: Option<Daemon>,
}

impl Rack {
    pub fn new(root: &Path, name: &str) -> Rack {
        Rack { data_dir: root.join(format!("rack-{name}")), name: name.to_owned(), daemon: None }
    }

    /// `rackd --data-dir DATA_DIR ARGS`, to run as suits.
    pub fn command_for(&self, args: &[&str]) -> Result<Command> {
        let mut command = Command::new(locate("rackd")?);
        command.arg("--data-dir").arg(&self.data_dir).args(args);
        Ok(command)
    }

    /// Runs a `rackd` subcommand with stdin closed; its output, whatever the exit.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(binary("rackd"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run rackd")
    }

    /// `rackd register` with the region at `url`; its output, whatever the exit.
    pub fn register(&self, url: &str, secret: &str) -> Output {
        self.command(&["register", "--url", url, "--secret", secret, "--name", &self.name])
    }

    /// `rackd register` that must succeed (inside `lab` if given).
    pub fn register_checked(&self, url: &str, secret: &str, lab: Option<&metalrack_hardware::Lab>) -> Result<()> {
        let command = self.command_for(&["register", "--url", url, "--secret", secret, "--name", &self.name])?;
        process::run(command, lab).map(|_| ())
    }

    pub fn register_ok(&self, url: &str, secret: &str) {
        assert_success(&format!("register {}", self.name), &self.register(url, secret));
    }

    /// Starts `rackd serve --config DATA_DIR.toml` holding `config` (exactly; tests add theirs
    /// to [`FAST_RACK_CONFIG`]).
    pub fn launch(&mut self, config: &str, how: Spawn) -> Result<()> {
        let config_path = self.data_dir.with_extension("toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(locate("rackd")?);
        command.arg("--data-dir").arg(&self.data_dir).args(["serve", "--config"]).arg(&config_path);
        let log = self.data_dir.with_extension("log");
        self.daemon = Some(Daemon::spawn(&format!("rackd {}", self.name), command, &log, false, how)?);
        Ok(())
    }

    pub fn serve(&mut self) {
        self.serve_with_config("");
    }

    /// Starts `rackd serve` with `extra` TOML (e.g. a `[pxe]` section) after the fast defaults.
    pub fn serve_with_config(&mut self, extra: &str) {
        self.launch(&format!("{FAST_RACK_CONFIG}{extra}"), Spawn::default()).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// `rackd status`'s output.
    pub fn status(&self) -> String {
        String::from_utf8(self.command(&["status"]).stdout).unwrap()
    }

    /// Where the rack's current snapshot shows the `kind` file of `image` amd64 `version`.
    pub fn snapshot_file(&self, image: &str, version: &str, kind: &str) -> PathBuf {
        self.data_dir.join("images/current").join(image).join("amd64").join(version).join(kind)
    }
}
