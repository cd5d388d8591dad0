//! Keeping the rack's image snapshot in step with the region's catalogue: learn of changes by
//! long-poll, decide by policy (`policy`: auto after a delay, a time window, or manual), run the
//! sync (`engine`, with `fetch` and `partial`), write the boot table the catalogue carries (also
//! while a sync runs: the poll goes on beside it), and publish progress for heartbeats,
//! `rackd sync` and `rackd status`. This module is the I/O around the decisions: it reads the
//! clocks and the region, `policy` only decides.

pub mod bases;
pub mod engine;
pub mod fetch;
pub mod partial;
pub mod policy;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metalrack_api::images::{RackCatalogue, SyncPhase, SyncReport};
use metalrack_image_tools::error_chain;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::engine::{ProgressFn, RunOutcome, SyncRun};
use self::fetch::{RateLimiter, Source};
use self::policy::{Decision, PolicyState, Situation};
use crate::data_dir::DataDir;
use crate::region_link::{Linked, RegionLink};
use crate::snapshot::boot_table::BootTable;
use crate::snapshot::{SnapshotMeta, SnapshotStore};

/// How long one catalogue long-poll waits when nothing is due sooner.
const LONG_POLL: Duration = Duration::from_secs(30);
// The region holds a poll at most its own maximum; asking for longer would wake the rack at
// the region's pace, not ours.
const _: () = assert!(LONG_POLL.as_secs() <= metalrack_api::limits::CATALOGUE_POLL_HOLD_MAX.as_secs());

/// A catalogue poll that failed during a sync is tried again after this, doubling up to
/// [`FOLLOW_RETRY_MAX`] (the sync's own fetches meanwhile say whether the region is there).
const FOLLOW_RETRY_MIN: Duration = Duration::from_millis(500);
const FOLLOW_RETRY_MAX: Duration = Duration::from_secs(30);

/// At shutdown a running sync gets this long to stop at a chunk boundary by itself (writing its
/// progress log); then it is dropped, which the partial files are built to survive. Shorter than
/// `serve::SHUTDOWN_GRACE`, so the sync is done before the daemon gives up waiting.
const SYNC_STOP_GRACE: Duration = Duration::from_secs(2);

/// What `rackd sync` reads over the control socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalStatus {
    pub report: SyncReport,
    /// File hashes of the snapshot in service, for the region when it asks (heartbeats only
    /// name the snapshot).
    #[serde(default)]
    pub file_hashes: Vec<String>,
    /// Sync runs finished (published, nothing to do, or failed) since `rackd serve` started.
    pub completed_runs: u64,
}

/// Handles shared between the sync task, heartbeats and the control socket.
#[derive(Debug, Clone)]
pub struct SyncHandle {
    pub status: watch::Receiver<LocalStatus>,
    pub trigger: Arc<Notify>,
}

/// What the sync has acted on, kept across restarts (`DATA/images/sync-state.json`).
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PersistentState {
    /// The region's "sync now" counter value last acted on.
    handled_requested: i64,
}

impl PersistentState {
    /// The saved state; a missing or damaged file is the default (at worst one "sync now" is
    /// acted on twice).
    fn load(path: &Path) -> PersistentState {
        std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save(&self, path: &Path) {
        let json = serde_json::to_vec(self).expect("state serializes");
        if let Err(e) = metalrack_image_tools::private_file::write_private_file(path, &json) {
            tracing::warn!(error = %e, "cannot save sync state");
        }
    }
}

/// The report for a rack serving `meta` (or nothing), before any sync ran.
fn report_for(meta: Option<&SnapshotMeta>) -> SyncReport {
    SyncReport {
        snapshot_id: meta.map(|m| m.id.clone()),
        snapshot_revision: meta.map(|m| m.revision).unwrap_or(-1),
        ..SyncReport::default()
    }
}

/// The file hashes of the snapshot `meta` (none without one).
fn file_hashes_of(meta: Option<&SnapshotMeta>) -> Vec<String> {
    meta.map(|m| m.files.iter().map(|f| f.file_hash.clone()).collect()).unwrap_or_default()
}

/// Minutes since local midnight, by the rack's time zone.
fn local_minute_of_day() -> u32 {
    let now = jiff::Zoned::now();
    now.hour() as u32 * 60 + now.minute() as u32
}

fn differs(current: Option<&SnapshotMeta>, catalogue: &RackCatalogue) -> bool {
    match current {
        Some(meta) => meta.files != catalogue.files,
        None => !catalogue.files.is_empty(),
    }
}

/// The sync task: build it with [`Controller::new`], run it with [`Controller::run`].
pub struct Controller {
    store: SnapshotStore,
    state_path: PathBuf,
    link: Arc<RegionLink>,
    status: watch::Sender<LocalStatus>,
    trigger: Arc<Notify>,
    boot_table: BootTable,
}

impl Controller {
    /// The controller and the handle others watch it by. `boot_table` is written from each
    /// catalogue; PXE reads it through its own subscription.
    pub fn new(
        data_dir: &DataDir,
        store: SnapshotStore,
        boot_table: BootTable,
        link: Arc<RegionLink>,
    ) -> Result<(Controller, SyncHandle), crate::snapshot::SnapshotError> {
        let current = store.current()?;
        let (status, status_rx) = watch::channel(LocalStatus {
            report: report_for(current.as_ref()),
            file_hashes: file_hashes_of(current.as_ref()),
            completed_runs: 0,
        });
        let trigger = Arc::new(Notify::new());
        let handle = SyncHandle { status: status_rx, trigger: trigger.clone() };
        let controller = Controller { store, state_path: data_dir.sync_state(), link, status, trigger, boot_table };
        Ok((controller, handle))
    }

    fn set_report(&self, update: impl FnOnce(&mut SyncReport)) {
        self.status.send_modify(|s| update(&mut s.report));
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::select! {
            () = self.run_until_stopped(&shutdown) => {}
            () = shutdown.cancelled() => {}
        }
        tracing::info!("sync stopped");
    }

    async fn run_until_stopped(&self, shutdown: &CancellationToken) {
        let mut state = PersistentState::load(&self.state_path);
        let mut policy = PolicyState::new(Instant::now());
        let mut seen_requested = state.handled_requested;
        let mut local_request = false;
        let mut recheck = Duration::ZERO;
        let mut catalogue: Option<RackCatalogue> = None;
        loop {
            let linked = self.link.current();
            let wait = if catalogue.is_none() { Duration::ZERO } else { recheck.min(LONG_POLL) };
            let changes_seen = catalogue.as_ref().map(|c| c.changes_seen);
            let poll = linked.client.catalogue(
                &linked.authorization,
                policy.seen_revision(),
                seen_requested,
                changes_seen,
                wait,
            );
            tokio::select! {
                result = poll => match result {
                    Ok(new) => {
                        policy.catalogue_seen(new.revision, Instant::now());
                        seen_requested = new.sync_requested;
                        self.take_boots(&new);
                        catalogue = Some(new);
                    }
                    Err(e) => {
                        tracing::debug!(error = %error_chain(&e), "catalogue poll failed");
                        // Keep serving from the snapshot; ask again later.
                        tokio::select! {
                            () = tokio::time::sleep(policy.poll_failed()) => {}
                            () = self.trigger.notified() => local_request = true,
                        }
                        if catalogue.is_none() {
                            continue;
                        }
                    }
                },
                () = self.trigger.notified() => local_request = true,
            }
            let Some(target) = catalogue.clone() else { continue };
            let current = match self.store.current() {
                Ok(current) => current,
                Err(e) => {
                    self.fail(&error_chain(&e));
                    recheck = policy.retry();
                    continue;
                }
            };
            let requested = local_request || target.sync_requested > state.handled_requested;
            let situation = Situation {
                policy: &target.policy,
                differs: differs(current.as_ref(), &target),
                has_snapshot: current.is_some(),
                requested,
            };
            match policy.decide(situation, Instant::now(), local_minute_of_day()) {
                Decision::UpToDate => {
                    self.set_report(|r| {
                        r.phase = SyncPhase::Idle;
                        r.message.clear();
                    });
                    if requested {
                        self.finish_request(&mut state, &target, &mut local_request);
                    }
                    recheck = LONG_POLL;
                }
                Decision::Wait { message, recheck: next } => {
                    self.set_report(|r| {
                        r.phase = SyncPhase::Waiting;
                        r.message = message;
                    });
                    recheck = next.unwrap_or(LONG_POLL);
                }
                Decision::Sync { requested } => {
                    let mut latest = target.clone();
                    recheck = self.sync(&linked, &target, &mut latest, requested, &mut policy, shutdown).await;
                    if shutdown.is_cancelled() {
                        return;
                    }
                    if requested {
                        self.finish_request(&mut state, &target, &mut local_request);
                    }
                    // What the sync heard meanwhile is decided on next (a newer revision syncs
                    // again; a new request is acted on).
                    policy.catalogue_seen(latest.revision, Instant::now());
                    seen_requested = latest.sync_requested;
                    catalogue = Some(latest);
                }
            }
        }
    }

    /// Takes the machines' boot decisions a catalogue carries into the boot table.
    fn take_boots(&self, catalogue: &RackCatalogue) {
        self.boot_table.update(&catalogue.machines, catalogue.deploy_env.as_ref(), catalogue.boot_generation);
    }

    /// One catalogue long-poll while a sync runs, so that machines' boot decisions reach the
    /// boot table during a sync too (a 10 GiB image over a capped uplink takes hours, and a
    /// machine deployed meanwhile would boot what the rack was told before). `latest` is the
    /// newest catalogue heard; a failed poll waits `retry` (doubling up to [`FOLLOW_RETRY_MAX`]).
    async fn follow_catalogue(&self, linked: &Linked, latest: &mut RackCatalogue, retry: &mut Duration) {
        let poll = linked.client.catalogue(
            &linked.authorization,
            latest.revision,
            latest.sync_requested,
            Some(latest.changes_seen),
            LONG_POLL,
        );
        match poll.await {
            Ok(new) => {
                self.take_boots(&new);
                *latest = new;
                *retry = FOLLOW_RETRY_MIN;
            }
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "catalogue poll during a sync failed");
                tokio::time::sleep(*retry).await;
                *retry = (*retry * 2).min(FOLLOW_RETRY_MAX);
            }
        }
    }

    fn finish_request(&self, state: &mut PersistentState, target: &RackCatalogue, local_request: &mut bool) {
        *local_request = false;
        if target.sync_requested > state.handled_requested {
            state.handled_requested = target.sync_requested;
            state.save(&self.state_path);
        }
        self.status.send_modify(|s| s.completed_runs += 1);
    }

    /// Runs one sync; returns how soon to look again.
    async fn sync(
        &self,
        linked: &Linked,
        target: &RackCatalogue,
        latest: &mut RackCatalogue,
        requested: bool,
        policy: &mut PolicyState,
        shutdown: &CancellationToken,
    ) -> Duration {
        let limiter = RateLimiter::new(target.policy.bandwidth_bytes_per_s);
        let status = self.status.clone();
        let progress: ProgressFn = Arc::new(move |done, total| {
            status.send_modify(|s| {
                s.report.bytes_done = done;
                s.report.bytes_total = total;
            })
        });
        let sync_policy = target.policy.clone();
        let stopping = shutdown.clone();
        let may_continue =
            move || !stopping.is_cancelled() && policy::may_continue(&sync_policy, requested, local_minute_of_day());
        self.set_report(|r| {
            r.phase = SyncPhase::Syncing;
            r.message.clear();
            r.bytes_done = 0;
            r.bytes_total = 0;
        });
        tracing::info!(revision = target.revision, n_files = target.files.len(), "sync starting");
        let sync = SyncRun {
            store: &self.store,
            source: Source { client: &linked.client, authorization: &linked.authorization },
            limiter: limiter.as_ref(),
            progress,
            may_continue: &may_continue,
        };
        let run = sync.run(target);
        let mut run = std::pin::pin!(run);
        let mut follow_retry = FOLLOW_RETRY_MIN;
        let outcome = loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                () = self.follow_catalogue(linked, latest, &mut follow_retry) => {}
                () = shutdown.cancelled() => match tokio::time::timeout(SYNC_STOP_GRACE, &mut run).await {
                    Ok(outcome) => break outcome,
                    Err(_) => {
                        tracing::info!("rack stopping: sync abandoned; its verified chunks are kept for the next start");
                        return Duration::ZERO;
                    }
                },
            }
        };
        match outcome {
            Ok(RunOutcome::Published { meta, figures }) => {
                tracing::info!(
                    snapshot = %meta.id,
                    chunks_fetched = figures.chunks_fetched,
                    bytes_fetched = figures.bytes_fetched,
                    bytes_received = figures.bytes_received,
                    bytes_reused = figures.bytes_reused,
                    chunks_refetched = figures.chunks_refetched,
                    duration_ms = figures.duration_ms,
                    "sync done; snapshot published"
                );
                policy.sync_succeeded();
                let mut report = report_for(Some(&meta));
                report.last_sync = Some(figures);
                let file_hashes = file_hashes_of(Some(&meta));
                self.status.send_modify(|s| {
                    s.report = report;
                    s.file_hashes = file_hashes;
                    if !requested {
                        s.completed_runs += 1;
                    }
                });
                Duration::ZERO
            }
            Ok(RunOutcome::Paused) if shutdown.is_cancelled() => {
                tracing::info!("rack stopping: sync paused; it resumes at the next start");
                Duration::ZERO
            }
            Ok(RunOutcome::Paused) => {
                tracing::info!("sync window closed; sync paused, resumes in the next window");
                self.set_report(|r| {
                    r.phase = SyncPhase::Paused;
                    r.message = format!("window closed; resumes at {}", target.policy.window_start);
                });
                policy::WINDOW_RECHECK
            }
            Err(e) => {
                let reason = error_chain(&e);
                self.fail(&reason);
                if !requested {
                    self.status.send_modify(|s| s.completed_runs += 1);
                }
                policy.sync_failed(Instant::now())
            }
        }
    }

    fn fail(&self, reason: &str) {
        tracing::warn!(%reason, "sync failed; the current snapshot keeps serving");
        self.set_report(|r| {
            r.phase = SyncPhase::Failed;
            r.message = reason.to_owned();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalrack_api::images::CatalogueFile;

    fn file(hash: char) -> CatalogueFile {
        CatalogueFile {
            image: "img".into(),
            arch: "amd64".into(),
            version: "1".into(),
            kind: "kernel".into(),
            manifest_id: "m".repeat(64),
            file_hash: hash.to_string().repeat(64),
            file_len: 3,
            n_chunks: 1,
        }
    }

    fn catalogue(files: Vec<CatalogueFile>) -> RackCatalogue {
        RackCatalogue {
            revision: 1,
            sync_requested: 0,
            policy: Default::default(),
            files,
            machines: Vec::new(),
            deploy_env: None,
            changes_seen: 0,
            boot_generation: 0,
        }
    }

    #[test]
    fn sync_state_survives_a_restart_and_a_damaged_file_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sync-state.json");
        assert_eq!(PersistentState::load(&path), PersistentState::default(), "no file yet");
        PersistentState { handled_requested: 7 }.save(&path);
        assert_eq!(PersistentState::load(&path).handled_requested, 7);
        std::fs::write(&path, b"{\"handled_req").unwrap();
        assert_eq!(PersistentState::load(&path), PersistentState::default());
    }

    #[test]
    fn the_report_names_the_snapshot_in_service() {
        let empty = report_for(None);
        assert_eq!((empty.snapshot_id, empty.snapshot_revision), (None, -1));
        let meta = SnapshotMeta { id: "r3-x".into(), revision: 3, created_at_ms: 0, files: vec![file('a'), file('b')] };
        let report = report_for(Some(&meta));
        assert_eq!(report.snapshot_id.as_deref(), Some("r3-x"));
        assert_eq!(report.snapshot_revision, 3);
        assert_eq!(file_hashes_of(Some(&meta)), vec!["a".repeat(64), "b".repeat(64)]);
        assert!(file_hashes_of(None).is_empty());
        assert_eq!(report.phase, SyncPhase::Idle);
    }

    #[test]
    fn only_other_files_are_a_difference() {
        let meta = SnapshotMeta { id: "r1".into(), revision: 1, created_at_ms: 0, files: vec![file('a')] };
        assert!(!differs(Some(&meta), &catalogue(vec![file('a')])));
        assert!(differs(Some(&meta), &catalogue(vec![file('b')])));
        assert!(differs(None, &catalogue(vec![file('a')])));
        assert!(!differs(None, &catalogue(Vec::new())), "nothing to serve and nothing offered");
    }
}
