//! Wire types of machines: their lifecycle as the API shows and changes it, their boot
//! decisions (what the rack serves each MAC), and the boot events racks report.

use serde::{Deserialize, Serialize};

use crate::agent::{AgentJob, DeployEnv, DeployProgress, EraseMode, ImageRef, Inventory, MachineReport};
use crate::power::{PowerParameters, PowerState, PowerView};

/// Boot events one request may carry; a rack with more queued sends several requests, each also
/// within [`BOOT_EVENTS_BATCH_BYTES_MAX`] of JSON, each field within its `*_BYTES_MAX`.
pub use crate::limits::{
    BOOT_EVENTS_BATCH_BYTES_MAX, BOOT_EVENTS_PER_REQUEST_MAX, BOOT_EVENT_JSON_BYTES_MAX, BOOT_EVENT_KIND_BYTES_MAX,
    BOOT_EVENT_MAC_BYTES_MAX, BOOT_EVENT_MESSAGE_BYTES_MAX,
};

/// What a machine boots into next.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BootAction {
    /// Unknown or new machine: the enlistment script.
    Enlist,
    /// Boot from the local disk.
    Local,
    /// Network-boot the kernel and initrd of an image version.
    Image { image: String, arch: String, version: String, kernel_params: String },
    /// Boot the deploy environment to run a job (commission, deploy, release).
    Agent {
        env: DeployEnv,
        machine_id: String,
        /// The job's token, which the agent shows the rack and the rack's reports carry.
        token: String,
        #[serde(flatten)]
        job: AgentJob,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineBoot {
    /// Lower-case, colon-separated.
    pub mac: String,
    pub hostname: String,
    pub boot: BootAction,
}

/// `PUT /api/v1/machines/{mac}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MachineUpdate {
    #[serde(default)]
    pub hostname: String,
    pub boot: BootAction,
}

/// One step of a machine's boot as the rack saw it (DHCP, TFTP file, HTTP file, script).
///
/// `(queue_id, seq)` names the event among all a rack ever sent: the region stores each name
/// once per rack, so a batch sent again (its answer was lost) is not stored twice. 0 and 0 are
/// events from racks older than these ids, stored as they come.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootEvent {
    /// The rack's event queue that numbered the event: random (below 2^53, so it survives a
    /// JSON number and a signed 64-bit column), chosen when the queue's file is created. A rack
    /// whose data dir was wiped starts a new queue and numbers from 1 again without colliding
    /// with what it sent before.
    #[serde(default)]
    pub queue_id: u64,
    /// 1, 2, 3, ... in the order the rack saw the events; never reused within `queue_id`.
    #[serde(default)]
    pub seq: u64,
    pub at_ms: i64,
    pub mac: String,
    /// `boot.dhcp`, `boot.tftp`, `boot.http`, `boot.script`, `boot.callback`, `boot.refused`,
    /// and for a machine report `machine.*` ([`crate::agent::AgentReport::event_kind`]).
    pub kind: String,
    pub message: String,
    /// What an agent (or the rack on its behalf) reported; absent for plain boot events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<MachineReport>,
}

/// A machine's place in its lifecycle (MAAS's states and words).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// Enlisted or added; not yet commissioned.
    New,
    Commissioning,
    FailedCommissioning,
    /// Commissioned, powered off, free to deploy.
    Ready,
    /// Reserved for a deploy that waits for a slot on its rack.
    Allocated,
    Deploying,
    FailedDeployment,
    Deployed,
    Releasing,
    FailedReleasing,
    /// Taken out of service by an operator, with a reason.
    Broken,
}

impl MachineState {
    pub const ALL: [MachineState; 11] = [
        MachineState::New,
        MachineState::Commissioning,
        MachineState::FailedCommissioning,
        MachineState::Ready,
        MachineState::Allocated,
        MachineState::Deploying,
        MachineState::FailedDeployment,
        MachineState::Deployed,
        MachineState::Releasing,
        MachineState::FailedReleasing,
        MachineState::Broken,
    ];

    /// The word in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::New => "new",
            MachineState::Commissioning => "commissioning",
            MachineState::FailedCommissioning => "failed_commissioning",
            MachineState::Ready => "ready",
            MachineState::Allocated => "allocated",
            MachineState::Deploying => "deploying",
            MachineState::FailedDeployment => "failed_deployment",
            MachineState::Deployed => "deployed",
            MachineState::Releasing => "releasing",
            MachineState::FailedReleasing => "failed_releasing",
            MachineState::Broken => "broken",
        }
    }

    pub fn parse(text: &str) -> Option<MachineState> {
        MachineState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// How the UI shows it: `Failed deployment`.
    pub fn label(self) -> &'static str {
        match self {
            MachineState::New => "New",
            MachineState::Commissioning => "Commissioning",
            MachineState::FailedCommissioning => "Failed commissioning",
            MachineState::Ready => "Ready",
            MachineState::Allocated => "Allocated",
            MachineState::Deploying => "Deploying",
            MachineState::FailedDeployment => "Failed deployment",
            MachineState::Deployed => "Deployed",
            MachineState::Releasing => "Releasing",
            MachineState::FailedReleasing => "Failed releasing",
            MachineState::Broken => "Broken",
        }
    }
}

/// A machine as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineView {
    /// The region's id: 8 lower-case letters and digits.
    pub id: String,
    pub hostname: String,
    /// The MAC it boots from.
    pub mac: String,
    pub state: MachineState,
    /// Why it is in that state (a failure's last event, a broken machine's reason).
    pub status_message: String,
    pub rack_id: Option<String>,
    pub rack_name: Option<String>,
    pub power: Option<PowerView>,
    pub power_state: PowerState,
    pub power_checked_at_ms: Option<i64>,
    /// The image deployed or being deployed, and the disk.
    pub image: Option<ImageRef>,
    pub disk: Option<String>,
    /// While deploying: the agent's last figures.
    pub progress: Option<DeployProgress>,
    /// Allocated and waiting for a deploy slot on its rack: 1 for the next to start.
    pub queue_position: Option<u32>,
    pub inventory: Option<Inventory>,
    /// The bare boot decision an operator set with `PUT /machines/{mac}` (served while no job
    /// runs), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootAction>,
    pub updated_at_ms: i64,
    /// The last time its state changed.
    pub state_changed_at_ms: i64,
}

/// One page of the machine list (`GET /machines?state=&offset=&limit=`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachinePage {
    pub machines: Vec<MachineView>,
    /// Machines matching the filter, on every page.
    pub total: u64,
}

/// Machines one list page holds at most (the default page is 100).
pub const MACHINE_PAGE_MAX: u32 = 1000;

/// `POST /machines`: an operator adds a machine by its MAC and power settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MachineCreate {
    #[serde(default)]
    pub hostname: String,
    pub mac: String,
    pub power: PowerParameters,
    /// The rack (id or name) whose network the machine boots from; may be left out when there
    /// is one rack.
    #[serde(default)]
    pub rack: Option<String>,
}

/// `PATCH /machines/{id}`: change what an operator may change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MachineEdit {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub power: Option<PowerParameters>,
    #[serde(default)]
    pub rack: Option<String>,
}

/// `POST /machines/{id}/deploy`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub image: String,
    pub arch: String,
    /// The newest version when absent.
    #[serde(default)]
    pub version: Option<String>,
    /// The first disk of the inventory when absent.
    #[serde(default)]
    pub disk: Option<String>,
}

/// `POST /machines/{id}/release`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    #[serde(default)]
    pub erase: EraseMode,
}

/// `POST /machines/{id}/mark-broken`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BrokenRequest {
    pub reason: String,
}

/// `POST /machines/{id}/power`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PowerCommand {
    On,
    Off,
    Cycle,
    Query,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PowerCommandRequest {
    pub action: PowerCommand,
}

/// Largest `queue_id` (exclusive): 2^53, the largest integer every JSON reader keeps exact.
pub const BOOT_EVENT_QUEUE_ID_END: u64 = 1 << 53;

/// Normalises a MAC address to `aa:bb:cc:dd:ee:ff`; accepts `:` or `-` separators.
pub fn normalize_mac(text: &str) -> Result<String, String> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(format!("{text:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)"));
    }
    Ok(parts.join(":").to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(normalize_mac("52-54-00-AA-bb-01").unwrap(), "52:54:00:aa:bb:01");
        assert!(normalize_mac("52:54:00:aa:bb").is_err() && normalize_mac("zz:54:00:aa:bb:01").is_err());
    }

    #[test]
    fn boot_events_from_racks_without_ids_still_parse() {
        let event: BootEvent =
            serde_json::from_str(r#"{"at_ms": 1, "mac": "52:54:00:aa:bb:01", "kind": "boot.tftp", "message": "m"}"#)
                .unwrap();
        assert_eq!((event.queue_id, event.seq), (0, 0));
    }

    /// The bound a rack batches by is only sound if no event serializes longer than the named
    /// maximum: the worst case is text made of bytes JSON escapes as `\u00XX`.
    #[test]
    fn the_largest_event_serializes_within_its_named_bound() {
        let escaped = |len: usize| "\u{1}".repeat(len);
        let event = BootEvent {
            queue_id: BOOT_EVENT_QUEUE_ID_END - 1,
            seq: u64::MAX,
            at_ms: i64::MIN,
            mac: escaped(BOOT_EVENT_MAC_BYTES_MAX),
            kind: escaped(BOOT_EVENT_KIND_BYTES_MAX),
            message: escaped(BOOT_EVENT_MESSAGE_BYTES_MAX),
            report: None,
        };
        let len = serde_json::to_vec(&event).unwrap().len();
        assert!(len <= BOOT_EVENT_JSON_BYTES_MAX, "{len} > {BOOT_EVENT_JSON_BYTES_MAX}");
    }

    #[test]
    fn boot_action_json() {
        let json = serde_json::to_string(&BootAction::Local).unwrap();
        assert_eq!(json, r#"{"kind":"local"}"#);
    }
}
