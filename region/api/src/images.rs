//! Wire types of the image catalogue: uploads from tools, the catalogue racks sync, their sync
//! policy and their sync reports, and what the Images page and API list.

use serde::{Deserialize, Serialize};

/// The kinds of file an image version holds.
pub const FILE_KINDS: [&str; 4] = ["kernel", "initrd", "root-disk", "squashfs"];

/// Longest image name (`ubuntu/jammy`, `custom/windows-2016`), arch, or version string.
pub const IMAGE_NAME_LEN_MAX: usize = 128;

/// Checks an image name: 1–128 characters of letters, digits, `/`, `-`, `_`, `.`, `+`; no empty
/// segments and no `..`, because racks use names as directory paths.
pub fn validate_image_name(name: &str) -> Result<(), String> {
    validate_token("image name", name, true)
}

/// Checks an arch or version: like a name, without `/`.
pub fn validate_image_token(what: &str, value: &str) -> Result<(), String> {
    validate_token(what, value, false)
}

fn validate_token(what: &str, value: &str, slashes: bool) -> Result<(), String> {
    if value.is_empty() || value.len() > IMAGE_NAME_LEN_MAX {
        return Err(format!("an {what} has 1 to {IMAGE_NAME_LEN_MAX} characters"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+') || (slashes && c == '/');
    if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        return Err(format!("an {what} may not hold {c:?}"));
    }
    if value.split('/').any(|segment| segment.is_empty() || segment == "." || segment == "..") {
        return Err(format!("{value:?} is not a valid {what}: empty, '.' or '..' segment"));
    }
    Ok(())
}

pub fn validate_kind(kind: &str) -> Result<(), String> {
    if FILE_KINDS.contains(&kind) {
        Ok(())
    } else {
        Err(format!("unknown kind {kind:?}; one of {}", FILE_KINDS.join(", ")))
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SyncPolicyKind {
    /// Sync `delay_ms` after the last catalogue change (debounced).
    #[default]
    Auto,
    /// Sync only between `window_start` and `window_end`, rack local time.
    Window,
    /// Sync only when asked (UI, API, `rackd sync`).
    Manual,
}

/// How and when a rack syncs; set per rack on the region.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SyncPolicy {
    pub policy: SyncPolicyKind,
    pub delay_ms: u64,
    /// `HH:MM`, rack local time. A window may span midnight (22:00–02:00).
    pub window_start: String,
    pub window_end: String,
    /// 0 = no cap.
    pub bandwidth_bytes_per_s: u64,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy {
            policy: SyncPolicyKind::Auto,
            delay_ms: 300_000,
            window_start: "04:00".into(),
            window_end: "06:00".into(),
            bandwidth_bytes_per_s: 0,
        }
    }
}

/// Minutes after midnight of an `HH:MM` time.
pub fn parse_hhmm(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a time of day as HH:MM");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || text.len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// True when `minute_of_day` lies in `[start, end)`, a window that may wrap past midnight.
pub fn in_window(start: u32, end: u32, minute_of_day: u32) -> bool {
    if start <= end {
        (start..end).contains(&minute_of_day)
    } else {
        minute_of_day >= start || minute_of_day < end
    }
}

impl SyncPolicy {
    pub fn validate(&self) -> Result<(), String> {
        let start = parse_hhmm(&self.window_start)?;
        let end = parse_hhmm(&self.window_end)?;
        if start == end {
            return Err("the sync window is empty: start equals end".into());
        }
        if self.delay_ms > 7 * 24 * 3600 * 1000 {
            return Err("delay_ms is at most a week".into());
        }
        Ok(())
    }
}

/// One file of the catalogue as a rack sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CatalogueFile {
    pub image: String,
    pub arch: String,
    pub version: String,
    pub kind: String,
    /// BLAKE3 of the manifest bytes, hex: how to fetch the manifest.
    pub manifest_id: String,
    /// BLAKE3 of the file, hex.
    pub file_hash: String,
    pub file_len: u64,
    pub n_chunks: u64,
}

/// The catalogue long-poll answer: everything a rack needs to decide whether and what to sync.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RackCatalogue {
    pub revision: i64,
    /// Raised by "sync now"; the rack syncs when this exceeds the value it last handled.
    pub sync_requested: i64,
    pub policy: SyncPolicy,
    pub files: Vec<CatalogueFile>,
    /// Boot decisions for the machines this rack serves (all known machines, for now).
    #[serde(default)]
    pub machines: Vec<crate::machines::MachineBoot>,
    /// The deploy environment unknown machines boot into to enlist; absent while the catalogue
    /// holds none (they then wait in a loop for an operator, as before).
    #[serde(default)]
    pub deploy_env: Option<crate::agent::DeployEnv>,
    /// The region's count of changes to what this rack is told (its machines, boot decisions,
    /// and what every rack is told), as of this answer: the rack sends it back (`changes=`) and
    /// the next poll answers at once if it moved, so a change made while the rack was between
    /// two polls is not missed; a change to another rack's machines does not move it. It is not
    /// the catalogue `revision`, which would make every machine change look like new images.
    #[serde(default)]
    pub changes_seen: u64,
    /// The rack's boot generation, read before `machines`: they hold every change up to it
    /// (see `PowerRequest::boot_generation`). 0 from older regions.
    #[serde(default)]
    pub boot_generation: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SyncPhase {
    /// The snapshot matches the catalogue.
    #[default]
    Idle,
    /// Behind the catalogue, waiting for the policy (delay, window, or a manual request).
    Waiting,
    Syncing,
    /// Stopped at the end of the sync window; resumes in the next.
    Paused,
    Failed,
}

/// Media type of a manifest the region sends as a delta payload against the manifest the rack
/// named as `?base=` (`metalrack_image_tools::delta`; the tag byte says delta or raw).
pub const MANIFEST_DELTA_TYPE: &str = "application/vnd.metalrack.manifest-delta";

/// The figures of a finished sync.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncFigures {
    pub chunks_fetched: u64,
    /// Bytes of the fetched chunks (as decoded).
    pub bytes_fetched: u64,
    /// Bytes the rack received for this sync: manifests and chunk streams as they crossed the
    /// network (frames and deltas; HTTP headers not counted).
    #[serde(default)]
    pub bytes_received: u64,
    /// Bytes the rack sent asking for them (chunk request bodies).
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes copied from files the rack already had instead of fetched.
    pub bytes_reused: u64,
    /// Chunks that arrived damaged (hash mismatch) and were fetched again.
    pub chunks_refetched: u64,
    pub duration_ms: u64,
    pub finished_at_ms: i64,
}

/// A rack's sync state, sent with each heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncReport {
    pub snapshot_id: Option<String>,
    /// Catalogue revision the current snapshot was built from.
    pub snapshot_revision: i64,
    pub phase: SyncPhase,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Why the last sync failed, or what it waits for.
    pub message: String,
    pub last_sync: Option<SyncFigures>,
}

/// `PUT /rack/snapshot`: the file hashes a rack's current snapshot holds. Heartbeats name only
/// the snapshot's id, so they stay small whatever the catalogue's size; the rack sends this when
/// its heartbeat's answer says the region does not know that id yet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RackSnapshot {
    pub snapshot_id: String,
    pub file_hashes: Vec<String>,
}

/// Answer to a manifest upload: which chunks the region still lacks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UploadResponse {
    pub upload_id: String,
    pub manifest_id: String,
    pub n_chunks: u64,
    /// Indices (into the manifest) of the first occurrence of each chunk the region lacks.
    pub missing: Vec<u32>,
    pub missing_bytes: u64,
    /// Largest body the region accepts for one chunk batch.
    pub batch_bytes_max: u64,
    /// Whether the region takes chunk batches whose frames carry payloads (a tag byte, then the
    /// chunk raw or as a plain zstd frame, see `metalrack_image_tools::delta`) when the batch is
    /// posted with [`UPLOAD_PAYLOADS_QUERY`]. Regions that predate it leave it out (false):
    /// clients then send raw frames, which every region takes.
    #[serde(default)]
    pub chunk_payloads: bool,
}

/// Query string marking a chunk batch whose frames carry payloads (see
/// [`UploadResponse::chunk_payloads`]); without it every frame is the chunk itself.
pub const UPLOAD_PAYLOADS_QUERY: &str = "payloads=true";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChunksStored {
    pub stored: u64,
    pub already_present: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CommitResponse {
    pub image: String,
    pub arch: String,
    pub version: String,
    pub kind: String,
    pub file_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeleteVersionResponse {
    pub chunks_removed: u64,
    pub reclaimed_bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VersionSyncStatus {
    Synced,
    Syncing,
    Behind,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RackSyncView {
    pub rack_id: String,
    pub rack_name: String,
    pub status: VersionSyncStatus,
    pub percent: Option<f64>,
    pub bytes_to_go: Option<u64>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileView {
    pub kind: String,
    pub file_hash: String,
    pub file_len: u64,
    pub n_chunks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VersionView {
    pub version: String,
    pub created_at_ms: i64,
    pub size_bytes: u64,
    pub n_chunks: u64,
    pub files: Vec<FileView>,
    pub racks: Vec<RackSyncView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageView {
    pub id: String,
    pub name: String,
    pub arch: String,
    pub versions: Vec<VersionView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_times() {
        assert_eq!(parse_hhmm("04:30"), Ok(270));
        assert!(parse_hhmm("24:00").is_err() && parse_hhmm("4:30").is_err() && parse_hhmm("ab:cd").is_err());
        assert!(in_window(240, 360, 300) && !in_window(240, 360, 360) && !in_window(240, 360, 100));
        assert!(in_window(1320, 120, 1400) && in_window(1320, 120, 60) && !in_window(1320, 120, 600));
    }

    #[test]
    fn image_names() {
        assert!(validate_image_name("ubuntu/jammy").is_ok());
        assert!(validate_image_name("custom/windows-2016").is_ok());
        for bad in ["", "../etc", "a//b", "/abs", "a/./b", "sp ace", "a\\b"] {
            assert!(validate_image_name(bad).is_err(), "{bad}");
        }
        assert!(validate_image_token("version", "20261125.1").is_ok());
        assert!(validate_image_token("version", "a/b").is_err());
        assert!(validate_kind("root-disk").is_ok() && validate_kind("disk").is_err());
    }

    #[test]
    fn default_policy_is_valid() {
        assert!(SyncPolicy::default().validate().is_ok());
        let empty = SyncPolicy { window_end: "04:00".into(), ..Default::default() };
        assert!(empty.validate().is_err());
    }
}
