//! The IPMI driver: `ipmitool -I lanplus -C 3` (IPMI 2.0 over LAN) with `chassis power` and
//! `chassis bootdev`. The password reaches ipmitool through `IPMI_PASSWORD` (`-E`), never its
//! command line, which every local user can read in /proc.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use metalrack_api::power::{BootDevice, PowerState};

use super::PowerControl;

/// The program, found on `PATH`; Debian's package `ipmitool`.
pub const IPMITOOL_PROGRAM: &str = "ipmitool";

/// Deadline of one ipmitool run. ipmitool retries a silent BMC itself (lanplus: a handful of
/// retries over about 10 s per step, and a session takes several steps), so a BMC that is merely
/// slow answers well within this; past it the process is killed.
pub const IPMITOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// The most of ipmitool's output quoted in an error.
const OUTPUT_QUOTED_BYTES_MAX: usize = 512;

/// The RMCP+ cipher suite: 3 (RAKP-HMAC-SHA1, HMAC-SHA1-96 integrity, AES-CBC-128
/// confidentiality), which every IPMI 2.0 BMC offers and MAAS uses by default. Named, not
/// negotiated: ipmitool's negotiation asks for the channel's cipher suites first, and a BMC that
/// does not answer that (ipmi_sim, many older boards) costs ~10 s per call before the fallback.
const CIPHER_SUITE: &str = "3";

/// The environment variable `ipmitool -E` reads the password from.
const PASSWORD_VARIABLE: &str = "IPMI_PASSWORD";

#[derive(Debug, thiserror::Error)]
pub enum IpmiError {
    #[error("{program} is not installed (Debian package ipmitool); the IPMI driver needs it")]
    Missing { program: String },
    #[error("cannot run `{command}`")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` did not finish within {}s (IPMITOOL_TIMEOUT)", IPMITOOL_TIMEOUT.as_secs())]
    Timeout { command: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: ExitStatus, stderr: String },
    #[error("`{command}` printed no power state: {stdout:?}")]
    NoPowerState { command: String, stdout: String },
}

/// One BMC over IPMI.
#[derive(Clone)]
pub struct IpmiDriver {
    address: String,
    port: u16,
    username: String,
    password: String,
    program: PathBuf,
}

impl std::fmt::Debug for IpmiDriver {
    // The password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpmiDriver")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("program", &self.program)
            .finish_non_exhaustive()
    }
}

impl IpmiDriver {
    /// A driver for the BMC at `address:port`. The address must have passed
    /// [`metalrack_api::power::PowerParameters::validate`] (it cannot start with `-`).
    pub fn new(address: &str, port: u16, username: &str, password: &str) -> IpmiDriver {
        IpmiDriver {
            address: address.to_string(),
            port,
            username: username.to_string(),
            password: password.to_string(),
            program: PathBuf::from(IPMITOOL_PROGRAM),
        }
    }

    /// The same driver running `program` instead of [`IPMITOOL_PROGRAM`].
    pub fn with_program(self, program: impl Into<PathBuf>) -> IpmiDriver {
        IpmiDriver { program: program.into(), ..self }
    }

    /// Runs `ipmitool … ARGS` and returns its standard output.
    async fn ipmitool(&self, args: &[&str]) -> Result<String, IpmiError> {
        // What the errors show: the subcommand and the BMC, never the password (it is not here).
        let command = format!("{} -H {} -p {} {}", self.program.display(), self.address, self.port, args.join(" "));
        let mut child = tokio::process::Command::new(&self.program);
        child
            .args([
                "-I",
                "lanplus",
                "-C",
                CIPHER_SUITE,
                "-H",
                &self.address,
                "-p",
                &self.port.to_string(),
                "-U",
                &self.username,
                "-E",
            ])
            .args(args)
            .env(PASSWORD_VARIABLE, &self.password)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A timed-out ipmitool is killed when its future is dropped.
            .kill_on_drop(true);
        let child = child.spawn().map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => IpmiError::Missing { program: self.program.display().to_string() },
            _ => IpmiError::Spawn { command: command.clone(), source },
        })?;
        // ipmitool prints a line or two for these subcommands: its output is small by nature.
        let output = tokio::time::timeout(IPMITOOL_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| IpmiError::Timeout { command: command.clone() })?
            .map_err(|source| IpmiError::Spawn { command: command.clone(), source })?;
        if !output.status.success() {
            return Err(IpmiError::Failed { command, status: output.status, stderr: quoted(&output.stderr) });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Output as an error quotes it: lossy UTF-8, trimmed, cut to [`OUTPUT_QUOTED_BYTES_MAX`].
fn quoted(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let text = text.trim();
    let mut end = text.len().min(OUTPUT_QUOTED_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// `Chassis Power is on` / `Chassis Power is off`.
fn parse_power_status(stdout: &str) -> Option<PowerState> {
    stdout.lines().find_map(|line| match line.trim().strip_prefix("Chassis Power is ")? {
        "on" => Some(PowerState::On),
        "off" => Some(PowerState::Off),
        _ => None,
    })
}

impl PowerControl for IpmiDriver {
    type Error = IpmiError;
    const CONFIRMS_POWER: bool = true;

    async fn power_on(&self) -> Result<(), IpmiError> {
        self.ipmitool(&["chassis", "power", "on"]).await.map(|_| ())
    }

    async fn power_off(&self) -> Result<(), IpmiError> {
        self.ipmitool(&["chassis", "power", "off"]).await.map(|_| ())
    }

    async fn power_cycle(&self) -> Result<(), IpmiError> {
        // IPMI refuses a cycle of a machine that is off (the spec leaves it undefined).
        match self.query().await? {
            PowerState::Off => self.power_on().await,
            _ => self.ipmitool(&["chassis", "power", "cycle"]).await.map(|_| ()),
        }
    }

    async fn query(&self) -> Result<PowerState, IpmiError> {
        let args = ["chassis", "power", "status"];
        let stdout = self.ipmitool(&args).await?;
        parse_power_status(&stdout)
            .ok_or_else(|| IpmiError::NoPowerState { command: args.join(" "), stdout: quoted(stdout.as_bytes()) })
    }

    async fn set_next_boot(&self, device: BootDevice) -> Result<(), IpmiError> {
        // Without `options=persistent` the boot flags hold for the next boot only.
        let device = match device {
            BootDevice::Pxe => "pxe",
            BootDevice::Disk => "disk",
        };
        self.ipmitool(&["chassis", "bootdev", device]).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests;
