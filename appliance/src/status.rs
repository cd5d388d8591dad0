//! The heartbeat status `rackd serve` leaves in `status.json` for `rackd status` to read.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::data_dir::DataDir;

/// How the rack's link to its region stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Online,
    RegionUnreachable,
    /// The region refused the rack's credential: the secret changed or the rack was replaced.
    MustRegisterAgain,
    /// The region refused the heartbeat for another reason.
    Refused,
}

impl LinkState {
    pub fn label(self) -> &'static str {
        match self {
            LinkState::Online => "online",
            LinkState::RegionUnreachable => "region unreachable",
            LinkState::MustRegisterAgain => "must register again",
            LinkState::Refused => "refused by the region",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    pub pid: u32,
    pub state: LinkState,
    /// The region's or the network's words for the last failure; empty when online.
    pub message: String,
    pub last_attempt_ms: i64,
    pub last_success_ms: Option<i64>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn save(data_dir: &DataDir, status: &HeartbeatStatus) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(status).expect("status serializes");
    metalrack_image_tools::private_file::write_private_file(&data_dir.status(), &json)
}

/// The last status written, or `None` if `rackd serve` never ran here (or the file is unreadable:
/// status is advisory and a damaged file is replaced by the next heartbeat).
pub fn load(data_dir: &DataDir) -> Option<HeartbeatStatus> {
    let bytes = std::fs::read(data_dir.status()).ok()?;
    serde_json::from_slice(&bytes).ok()
}
