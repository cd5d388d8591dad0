//! The rack's side of 2. and 3.: pushing a version, starting a rack that syncs at once, and
//! timing a sync from the event that made it due to the file on the rack's disk and in the API.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use metalrack_api::images::{SyncFigures, SyncPhase, SyncPolicy, SyncPolicyKind};
use metalrack_tests::api::Api;
use metalrack_tests::bench::box_busy;
use metalrack_tests::process::Spawn;
use metalrack_tests::rack::Rack;
use metalrack_tests::region::Region;
use metalrack_tests::wait::try_wait_for;

use crate::tools::{run_tool, settle};
use crate::{deadline_for, IMAGE, POLL};

/// Retries back off to at most 400 ms; the rest defaults.
const RACK_CONFIG: &str = "retry_backoff_max_ms = 400\n";

/// `imgtool push FILE` as version `version` of [`IMAGE`]; returns when the region committed it.
pub async fn push(region: &Region, api_key: &str, file: &Path, version: &str) -> Result<()> {
    let command = region.push_command(api_key, file, IMAGE, "root-disk", version)?;
    let args: Vec<OsString> = command.get_args().map(OsString::from).collect();
    let (output, _) = run_tool(Path::new(command.get_program()), &args).await?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(text.contains("committed"), "imgtool push did not commit: {text}");
    Ok(())
}

/// Registers rack `name` (data dir under `root`), sets its policy to auto with no delay, and
/// starts `rackd serve`.
pub async fn start_rack(region: &Region, api: &Api, secret: &str, root: &Path, name: &str) -> Result<Rack> {
    let mut rack = Rack::new(root, name);
    rack.register_checked(&region.url, secret, None)?;
    // Policy before `serve`, so the first catalogue the rack reads already says "now".
    let id = api.rack(name).await?.id;
    let policy = SyncPolicy { policy: SyncPolicyKind::Auto, delay_ms: 0, ..SyncPolicy::default() };
    api.set_sync_policy(&id, &policy).await?;
    rack.launch(RACK_CONFIG, Spawn::default())?;
    Ok(rack)
}

#[derive(Debug, Clone, Default)]
pub struct SyncSample {
    pub figures: SyncFigures,
    /// From the event that made the sync due (push commit, or `rackd serve` for a new rack) to
    /// the file in the rack's published snapshot on its disk.
    pub wall_from_start: Duration,
    /// The same, to the region's API showing the file hash in the rack's snapshot (heartbeat lag).
    pub wall_to_api: Duration,
    /// The box's busy time ([`box_busy`]) when the file was on the rack's disk: the caller
    /// subtracts its own reading from the step's start.
    pub box_busy_at_disk: Duration,
}

/// Waits for the rack to publish `file` with `file_hash`, timing from now; returns its figures.
pub async fn wait_synced(api: &Api, rack: &Rack, file: &Path, file_hash: &str, size: u64) -> Result<SyncSample> {
    let started = Instant::now();
    try_wait_for(&format!("rack {} to publish {}", rack.name, file.display()), deadline_for(size), POLL, || async {
        Ok(file.exists().then_some(()))
    })
    .await?;
    let (on_disk, box_busy_at_disk) = (started.elapsed(), box_busy());
    let view =
        try_wait_for(&format!("the region to show {} synced", rack.name), Duration::from_secs(30), POLL, || async {
            // The Images view first: once it shows the file served, the rack view read after it
            // holds the heartbeat that named the new snapshot, with that sync's figures.
            let serves = api.rack_serves_file(&rack.name, file_hash).await?;
            let view = api.rack(&rack.name).await?;
            let sync = view.sync.clone().unwrap_or_default();
            if sync.phase == SyncPhase::Failed {
                bail!("rack {} sync failed: {}", rack.name, sync.message);
            }
            Ok((serves && sync.phase == SyncPhase::Idle).then_some(view))
        })
        .await?;
    let figures = view.sync.and_then(|s| s.last_sync).context("a synced rack reports its last sync")?;
    Ok(SyncSample { figures, wall_from_start: on_disk, wall_to_api: started.elapsed(), box_busy_at_disk })
}

#[derive(Debug, Clone, Default)]
pub struct RackDeltaSample {
    pub sync: SyncSample,
    /// Bytes the rack received and sent for the sync (manifest, chunk streams, requests).
    pub protocol_bytes: u64,
    pub push: Duration,
}

/// Pushes `v2` and times the rack's sync of it from the commit.
pub async fn delta_sync(
    region: &Region,
    api: &Api,
    rack: &Rack,
    v2: &Path,
    v2_hash: &str,
    version: &str,
) -> Result<RackDeltaSample> {
    let size = std::fs::metadata(v2)?.len();
    settle().await?;
    let started = Instant::now();
    push(region, &api.key, v2, version).await?;
    let push_time = started.elapsed();
    // `imgtool push` exits once the region answered the commit: the sync is due from here.
    let sync = wait_synced(api, rack, &rack.snapshot_file(IMAGE, version, "root-disk"), v2_hash, size).await?;
    // What the rack measured crossing the network for this sync: the manifest (a delta against
    // v1's) and the chunk streams it received (frames and deltas), plus the requests it sent.
    // HTTP headers, heartbeats and long-polls (a few KB) are not counted.
    let protocol_bytes = sync.figures.bytes_received + sync.figures.bytes_sent;
    Ok(RackDeltaSample { sync, protocol_bytes, push: push_time })
}

/// Back to "the rack has v1 only": the region drops `version` and its chunks, and this waits
/// for the rack to drop the file and be idle again.
pub async fn drop_version(api: &Api, rack: &Rack, version: &str, v1_hash: &str, size: u64) -> Result<()> {
    api.delete_version(IMAGE, version).await?;
    try_wait_for("the rack to drop the deleted version", deadline_for(size), POLL, || async {
        let view = api.rack(&rack.name).await?;
        let sync = view.sync.unwrap_or_default();
        let only_v1 = view.snapshot_files == 1 && api.rack_serves_file(&rack.name, v1_hash).await?;
        Ok((sync.phase == SyncPhase::Idle && only_v1).then_some(()))
    })
    .await
}
