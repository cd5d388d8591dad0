//! Wire types of the deploy agent: the jobs the region gives a machine (carried to the rack in
//! its boot table), the task the rack hands the agent over HTTP, the agent's reports (inventory,
//! progress, done) and their limits. The agent talks only to its rack; the rack queues reports
//! for the region with its boot events, so deploys go on while the region is away.
//!
//! Flow: the rack's iPXE script boots the deploy environment with
//! `metalrack.rack=URL metalrack.mac=MAC metalrack.token=TOKEN` on the kernel command line
//! ([`CMDLINE_RACK`], ...); the agent asks `GET {rack}/agent/task?mac=MAC` with
//! `Authorization: Bearer TOKEN` and posts [`AgentReport`]s to `POST {rack}/agent/report?mac=MAC`.

use serde::{Deserialize, Serialize};

/// Kernel command-line parameters the agent reads.
pub const CMDLINE_RACK: &str = "metalrack.rack";
pub const CMDLINE_MAC: &str = "metalrack.mac";
pub const CMDLINE_TOKEN: &str = "metalrack.token";

/// Rack HTTP paths the agent uses (on the rack's HTTP boot port).
pub const AGENT_TASK_PATH: &str = "/agent/task";
pub const AGENT_REPORT_PATH: &str = "/agent/report";

/// Hex characters of a per-job token (16 random bytes).
pub const AGENT_TOKEN_HEX_LEN: usize = 32;

/// Longest machine id, in bytes (the region's ids are 8 characters; room for other forms).
pub const MACHINE_ID_BYTES_MAX: usize = 64;

/// Disks and NICs an inventory lists at most (a machine with more reports the first ones).
pub const INVENTORY_DISKS_MAX: usize = 32;
pub const INVENTORY_NICS_MAX: usize = 32;

/// Longest text field of an inventory (model, serial, name), in bytes of printable ASCII.
pub const INVENTORY_TEXT_BYTES_MAX: usize = 64;

/// Longest failure reason from an agent, in bytes.
pub const AGENT_REASON_BYTES_MAX: usize = 1024;

/// Largest JSON of one [`AgentReport`]: every text field at its longest with each byte escaped
/// (`"` and `\`, 2 bytes; control characters are refused), plus the numbers and names. The rack
/// refuses a larger body before queueing it, and the region's boot-event bound includes it.
pub const AGENT_REPORT_JSON_BYTES_MAX: usize =
    2 * INVENTORY_TEXT_BYTES_MAX * (1 + 3 * INVENTORY_DISKS_MAX + 2 * INVENTORY_NICS_MAX)
        + 128 * (INVENTORY_DISKS_MAX + INVENTORY_NICS_MAX)
        + 2 * AGENT_REASON_BYTES_MAX
        + 512;

/// An image version named by the catalogue's words.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageRef {
    pub image: String,
    pub arch: String,
    pub version: String,
}

/// The deploy environment a rack boots machines into: an image version whose `kernel` and
/// `initrd` files are the environment, and the kernel parameters it boots with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeployEnv {
    #[serde(flatten)]
    pub image: ImageRef,
    pub kernel_params: String,
}

/// How much of a disk a release erases.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EraseMode {
    /// Nothing: the disk keeps the image (a redeploy then writes only what changed).
    #[default]
    None,
    /// The partition tables and the first and last MiB.
    Quick,
    /// Every block: discard where the disk supports it, zeros otherwise.
    Full,
}

/// What the region asks of a machine's agent (in the rack's boot table).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum AgentJob {
    /// Report the inventory, then power off.
    Commission,
    /// Write `file` (a `root-disk` file) of an image version to `disk` (the first disk when
    /// absent), then reboot.
    Deploy {
        #[serde(flatten)]
        image: ImageRef,
        /// The catalogue file kind to write: `root-disk`. `file_kind` on the wire: the job is
        /// flattened into `BootAction::Agent`, whose own tag is `kind`.
        #[serde(rename = "file_kind")]
        kind: String,
        #[serde(default)]
        disk: Option<String>,
    },
    /// Erase the disk as asked, then power off.
    Release {
        erase: EraseMode,
        #[serde(default)]
        disk: Option<String>,
    },
}

/// What the agent gets from `GET /agent/task`: its job, resolved by the rack against its own
/// snapshot (URLs on the rack, sizes and hashes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum AgentTask {
    /// An unknown machine: report the inventory (with no token), then power off.
    Enlist,
    Commission {
        machine_id: String,
    },
    Deploy {
        machine_id: String,
        /// Path on the rack of the file to write (`GET` with `Range`).
        file_path: String,
        /// Path on the rack of the file's manifest (the image-tools wire format).
        manifest_path: String,
        file_len: u64,
        /// BLAKE3 of the whole file, hex.
        file_hash: String,
        #[serde(default)]
        disk: Option<String>,
    },
    Release {
        machine_id: String,
        erase: EraseMode,
        #[serde(default)]
        disk: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    Bios,
    Uefi,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskInventory {
    /// Kernel name: `vda`, `sda`, `nvme0n1`.
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub serial: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NicInventory {
    pub name: String,
    /// Lower-case, colon-separated.
    pub mac: String,
    /// Link speed when the link is up and the driver tells.
    #[serde(default)]
    pub speed_mbps: Option<u32>,
}

/// A machine's hardware as its agent found it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Inventory {
    pub firmware: Firmware,
    pub cpus: u32,
    #[serde(default)]
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub disks: Vec<DiskInventory>,
    pub nics: Vec<NicInventory>,
}

/// Where a deploy is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeployPhase {
    /// Reading the disk at the manifest's chunk places to find what is already there.
    Planning,
    /// Fetching, verifying and writing the chunks that differ.
    Writing,
    /// Flushed; reading the whole image back against the file's hash.
    Verifying,
    /// Written, flushed and verified.
    Done,
}

/// A deploy's figures, as the agent reports them (each report replaces the last).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeployProgress {
    pub phase: DeployPhase,
    /// The image's length.
    pub bytes_total: u64,
    /// Of `bytes_total`, how much is known to be on the disk (skipped or written).
    pub bytes_done: u64,
    /// Chunks fetched from the rack (bytes), counting chunks fetched again after a bad copy.
    pub bytes_fetched: u64,
    /// Bytes written to the disk.
    pub bytes_written: u64,
    /// Bytes the disk already held and were not written.
    pub bytes_skipped: u64,
    /// Chunks that failed verification when fetched and were fetched again.
    pub chunks_refetched: u64,
    /// Recent rate of `bytes_done`.
    pub rate_bytes_per_s: u64,
}

/// What an agent reports to its rack (`POST /agent/report`), and what the rack adds itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "report", rename_all = "snake_case")]
pub enum AgentReport {
    /// Enlist or commission: the machine's hardware.
    Inventory {
        inventory: Inventory,
    },
    Progress {
        progress: DeployProgress,
    },
    /// The image is on the disk, flushed and verified whole; the agent reboots next.
    Deployed {
        progress: DeployProgress,
    },
    /// The disk is erased as asked; the agent powers off next.
    Released,
    Failed {
        reason: String,
    },
    /// Only the rack sends this: the machine asked for its boot script after a deploy and was
    /// told to boot from its disk (the deployed system's first boot).
    BootedLocal,
}

impl AgentReport {
    /// The event kind the rack queues the report under.
    pub fn event_kind(&self) -> &'static str {
        match self {
            AgentReport::Inventory { .. } => "machine.inventory",
            AgentReport::Progress { .. } => "machine.progress",
            AgentReport::Deployed { .. } => "machine.deployed",
            AgentReport::Released => "machine.released",
            AgentReport::Failed { .. } => "machine.failed",
            AgentReport::BootedLocal => "machine.booted_local",
        }
    }

    /// Checks the bounds an agent must keep (so a queued report always fits a batch); the
    /// message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let text = |field: &str, value: &str, max: usize| {
            if value.len() > max {
                return Err(format!("{field} is {} bytes, at most {max}", value.len()));
            }
            if value.chars().any(|c| c.is_control()) {
                return Err(format!("{field} holds control characters"));
            }
            Ok(())
        };
        match self {
            AgentReport::Inventory { inventory } => {
                text("cpu_model", &inventory.cpu_model, INVENTORY_TEXT_BYTES_MAX)?;
                if inventory.disks.len() > INVENTORY_DISKS_MAX || inventory.nics.len() > INVENTORY_NICS_MAX {
                    return Err(format!(
                        "an inventory lists at most {INVENTORY_DISKS_MAX} disks and {INVENTORY_NICS_MAX} NICs"
                    ));
                }
                for disk in &inventory.disks {
                    text("disk name", &disk.name, INVENTORY_TEXT_BYTES_MAX)?;
                    text("disk model", &disk.model, INVENTORY_TEXT_BYTES_MAX)?;
                    text("disk serial", &disk.serial, INVENTORY_TEXT_BYTES_MAX)?;
                }
                for nic in &inventory.nics {
                    text("nic name", &nic.name, INVENTORY_TEXT_BYTES_MAX)?;
                    crate::machines::normalize_mac(&nic.mac)?;
                }
                Ok(())
            }
            AgentReport::Failed { reason } => text("reason", reason, AGENT_REASON_BYTES_MAX),
            AgentReport::Progress { .. }
            | AgentReport::Deployed { .. }
            | AgentReport::Released
            | AgentReport::BootedLocal => Ok(()),
        }
    }
}

/// A report as the rack queues it for the region: which machine and job it belongs to. The
/// region applies it only if `token` is the machine's current job's (a late report of an
/// earlier job changes nothing), except `Inventory` with an empty `machine_id`: an enlistment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineReport {
    #[serde(default)]
    pub machine_id: String,
    #[serde(default)]
    pub token: String,
    #[serde(flatten)]
    pub report: AgentReport,
}

/// Largest JSON of a [`MachineReport`]: the report plus its two short fields.
pub const MACHINE_REPORT_JSON_BYTES_MAX: usize = AGENT_REPORT_JSON_BYTES_MAX + 2 * MACHINE_ID_BYTES_MAX + 64;

/// Parses `key=value` words of a kernel command line into the agent's three parameters.
pub fn parse_cmdline(cmdline: &str) -> (Option<String>, Option<String>, Option<String>) {
    let mut found = (None, None, None);
    for word in cmdline.split_whitespace() {
        if let Some((key, value)) = word.split_once('=') {
            match key {
                CMDLINE_RACK => found.0 = Some(value.to_string()),
                CMDLINE_MAC => found.1 = Some(value.to_string()),
                CMDLINE_TOKEN => found.2 = Some(value.to_string()),
                _ => {}
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worst_text() -> String {
        "\"".repeat(INVENTORY_TEXT_BYTES_MAX)
    }

    #[test]
    fn the_largest_valid_report_serializes_within_its_named_bound() {
        let disk =
            DiskInventory { name: worst_text(), size_bytes: u64::MAX, model: worst_text(), serial: worst_text() };
        let nic = NicInventory { name: worst_text(), mac: "52:54:00:aa:bb:01".into(), speed_mbps: Some(u32::MAX) };
        let report = AgentReport::Inventory {
            inventory: Inventory {
                firmware: Firmware::Uefi,
                cpus: u32::MAX,
                cpu_model: worst_text(),
                memory_bytes: u64::MAX,
                disks: vec![disk; INVENTORY_DISKS_MAX],
                nics: vec![nic; INVENTORY_NICS_MAX],
            },
        };
        report.validate().unwrap();
        let machine = MachineReport {
            machine_id: "m".repeat(MACHINE_ID_BYTES_MAX),
            token: "t".repeat(MACHINE_ID_BYTES_MAX),
            report,
        };
        let len = serde_json::to_vec(&machine).unwrap().len();
        assert!(len <= MACHINE_REPORT_JSON_BYTES_MAX, "{len} > {MACHINE_REPORT_JSON_BYTES_MAX}");
        let failed = AgentReport::Failed { reason: "\\".repeat(AGENT_REASON_BYTES_MAX) };
        failed.validate().unwrap();
        assert!(serde_json::to_vec(&failed).unwrap().len() <= AGENT_REPORT_JSON_BYTES_MAX);
    }

    #[test]
    fn reports_out_of_bounds_are_refused_naming_the_field() {
        let failed = AgentReport::Failed { reason: "x\n".into() };
        assert!(failed.validate().unwrap_err().contains("reason"));
        let inventory = Inventory {
            firmware: Firmware::Bios,
            cpus: 1,
            cpu_model: String::new(),
            memory_bytes: 1,
            disks: vec![],
            nics: vec![NicInventory { name: "eth0".into(), mac: "nope".into(), speed_mbps: None }],
        };
        assert!(AgentReport::Inventory { inventory }.validate().unwrap_err().contains("MAC"));
    }

    #[test]
    fn the_cmdline_gives_the_agent_its_rack_mac_and_token() {
        let (rack, mac, token) =
            parse_cmdline("console=ttyS0 metalrack.rack=http://10.0.0.1:5248 metalrack.mac=52:54:00:aa:bb:01 quiet");
        assert_eq!(rack.as_deref(), Some("http://10.0.0.1:5248"));
        assert_eq!(mac.as_deref(), Some("52:54:00:aa:bb:01"));
        assert_eq!(token, None);
    }

    /// A deploy job inside the rack's boot table: the boot action's tag and the job's fields
    /// must not collide (both were once `kind`), or the catalogue answer is not valid JSON.
    #[test]
    fn an_agent_boot_with_a_deploy_job_round_trips() {
        let boot = crate::machines::BootAction::Agent {
            env: DeployEnv {
                image: ImageRef { image: "metalrack/deploy-env".into(), arch: "amd64".into(), version: "1".into() },
                kernel_params: "console=ttyS0".into(),
            },
            machine_id: "abcd1234".into(),
            token: "0".repeat(AGENT_TOKEN_HEX_LEN),
            job: AgentJob::Deploy {
                image: ImageRef { image: "ubuntu/noble".into(), arch: "amd64".into(), version: "2".into() },
                kind: "root-disk".into(),
                disk: Some("vda".into()),
            },
        };
        let json = serde_json::to_string(&boot).unwrap();
        assert_eq!(serde_json::from_str::<crate::machines::BootAction>(&json).unwrap(), boot, "{json}");
    }

    #[test]
    fn report_json_is_tagged() {
        let json = serde_json::to_string(&MachineReport {
            machine_id: "abc".into(),
            token: "t".into(),
            report: AgentReport::BootedLocal,
        })
        .unwrap();
        assert_eq!(json, r#"{"machine_id":"abc","token":"t","report":"booted_local"}"#);
    }
}
