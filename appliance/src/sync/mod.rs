//! Keeping the rack's image snapshot in step with the region's catalogue: learn of changes by
//! long-poll, decide by policy (auto after a delay, a time window, or manual), run the sync, and
//! publish progress for heartbeats, `rackd sync` and `rackd status`.

pub mod bases;
pub mod engine;
pub mod layout;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metalrack_api::images::{in_window, parse_hhmm, RackCatalogue, SyncPhase, SyncPolicy, SyncPolicyKind, SyncReport};
use metalrack_api::machines::MachineBoot;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use self::engine::{RateLimiter, RunOutcome, SyncRun};
use self::layout::{Layout, SnapshotMeta};
use crate::heartbeat::error_chain;
use crate::region_client::{parse_region_url, RegionClient};

/// How long one catalogue long-poll waits when nothing is due sooner.
const LONG_POLL: Duration = Duration::from_secs(30);

/// Retry delays after a failed sync or an unreachable region, doubling up to the max.
const RETRY_MIN: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// What `rackd sync` reads over the control socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalStatus {
    pub report: SyncReport,
    /// Sync runs finished (published, nothing to do, or failed) since `rackd serve` started.
    pub completed_runs: u64,
}

/// Handles shared between the sync task, heartbeats and the control socket.
#[derive(Debug, Clone)]
pub struct SyncHandle {
    pub status: watch::Receiver<LocalStatus>,
    pub trigger: Arc<Notify>,
    /// The machines' boot decisions, as last received from the region (kept on disk, so
    /// machines boot with the region away, also after a rack restart).
    pub boot_table: watch::Receiver<Arc<Vec<MachineBoot>>>,
}

/// File holding the boot table.
pub fn boot_table_path(data_dir: &Path) -> PathBuf {
    data_dir.join("boot-table.json")
}

fn load_boot_table(data_dir: &Path) -> Vec<MachineBoot> {
    std::fs::read(boot_table_path(data_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PersistentState {
    /// The region's "sync now" counter value last acted on.
    handled_requested: i64,
}

fn state_path(layout: &Layout) -> PathBuf {
    layout.root.join("sync-state.json")
}

fn report_for(meta: Option<&SnapshotMeta>) -> SyncReport {
    SyncReport {
        snapshot_id: meta.map(|m| m.id.clone()),
        snapshot_revision: meta.map(|m| m.revision).unwrap_or(-1),
        file_hashes: meta.map(|m| m.files.iter().map(|f| f.file_hash.clone()).collect()).unwrap_or_default(),
        ..SyncReport::default()
    }
}

/// Minutes since local midnight, by the rack's time zone.
fn local_minute_of_day() -> u32 {
    let now = jiff::Zoned::now();
    now.hour() as u32 * 60 + now.minute() as u32
}

fn window_open(policy: &SyncPolicy) -> bool {
    match (parse_hhmm(&policy.window_start), parse_hhmm(&policy.window_end)) {
        (Ok(start), Ok(end)) => in_window(start, end, local_minute_of_day()),
        _ => false,
    }
}

fn differs(current: Option<&SnapshotMeta>, catalogue: &RackCatalogue) -> bool {
    match current {
        Some(meta) => meta.files != catalogue.files,
        None => !catalogue.files.is_empty(),
    }
}

/// Starts the sync task. Returns its handle; the task ends when `shutdown` fires.
pub fn start(data_dir: PathBuf, shutdown: Arc<Notify>) -> Result<SyncHandle, layout::LayoutError> {
    let layout = Layout::open(&data_dir)?;
    let current = layout.current()?;
    let (status_tx, status_rx) =
        watch::channel(LocalStatus { report: report_for(current.as_ref()), completed_runs: 0 });
    let trigger = Arc::new(Notify::new());
    let task_trigger = trigger.clone();
    let (boot_table_tx, boot_table_rx) = watch::channel(Arc::new(load_boot_table(&data_dir)));
    tokio::spawn(async move {
        let mut controller = Controller {
            data_dir,
            layout,
            status: status_tx,
            trigger: task_trigger,
            boot_table: boot_table_tx,
            retry: RETRY_MIN,
            not_before: None,
        };
        tokio::select! {
            _ = controller.run() => {}
            _ = shutdown.notified() => {}
        }
    });
    Ok(SyncHandle { status: status_rx, trigger, boot_table: boot_table_rx })
}

struct Controller {
    data_dir: PathBuf,
    layout: Layout,
    status: watch::Sender<LocalStatus>,
    trigger: Arc<Notify>,
    boot_table: watch::Sender<Arc<Vec<MachineBoot>>>,
    retry: Duration,
    /// After a failure, no automatic attempt before this.
    not_before: Option<tokio::time::Instant>,
}

enum Decision {
    Sync { requested: bool },
    Wait { message: String, recheck: Duration },
    UpToDate,
}

impl Controller {
    fn set_report(&self, update: impl FnOnce(&mut SyncReport)) {
        self.status.send_modify(|s| update(&mut s.report));
    }

    fn load_state(&self) -> PersistentState {
        std::fs::read(state_path(&self.layout)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save_state(&self, state: &PersistentState) {
        let json = serde_json::to_vec(state).expect("state serializes");
        if let Err(e) = metalrack_image_tools::private_file::write_private_file(&state_path(&self.layout), &json) {
            tracing::warn!(error = %e, "cannot save sync state");
        }
    }

    async fn run(&mut self) {
        let mut state = self.load_state();
        let mut seen_revision = -1i64;
        let mut seen_requested = state.handled_requested;
        let mut change_seen_at = tokio::time::Instant::now();
        let mut local_request = false;
        let mut recheck = Duration::ZERO;
        let mut catalogue: Option<RackCatalogue> = None;
        loop {
            let Some((client, authorization)) = self.link() else {
                self.set_report(|r| r.message = "not registered".into());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = self.trigger.notified() => local_request = true,
                }
                continue;
            };
            let wait = if catalogue.is_none() { Duration::ZERO } else { recheck.min(LONG_POLL) };
            tokio::select! {
                result = client.catalogue(&authorization, seen_revision, seen_requested, wait) => match result {
                    Ok(new) => {
                        if new.revision != seen_revision {
                            change_seen_at = tokio::time::Instant::now();
                        }
                        seen_revision = new.revision;
                        seen_requested = new.sync_requested;
                        self.update_boot_table(&new.machines);
                        catalogue = Some(new);
                    }
                    Err(e) => {
                        tracing::debug!(error = %error_chain(&e), "catalogue poll failed");
                        // Keep serving from the snapshot; ask again later.
                        tokio::select! {
                            _ = tokio::time::sleep(self.retry) => {}
                            _ = self.trigger.notified() => local_request = true,
                        }
                        self.retry = (self.retry * 2).min(RETRY_MAX);
                        if catalogue.is_none() {
                            continue;
                        }
                    }
                },
                _ = self.trigger.notified() => local_request = true,
            }
            let Some(target) = catalogue.clone() else { continue };
            let current = match self.layout.current() {
                Ok(current) => current,
                Err(e) => {
                    self.fail(&error_chain(&e));
                    recheck = self.retry;
                    continue;
                }
            };
            let requested = local_request || target.sync_requested > state.handled_requested;
            match self.decide(&target, current.as_ref(), requested, change_seen_at) {
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
                    recheck = next;
                }
                Decision::Sync { requested } => {
                    recheck = self.sync(&client, &authorization, &target, requested).await;
                    if requested {
                        self.finish_request(&mut state, &target, &mut local_request);
                    }
                }
            }
        }
    }

    fn update_boot_table(&self, machines: &[MachineBoot]) {
        if self.boot_table.borrow().as_slice() == machines {
            return;
        }
        let json = serde_json::to_vec_pretty(machines).expect("boot table serializes");
        if let Err(e) = metalrack_image_tools::private_file::write_private_file(&boot_table_path(&self.data_dir), &json)
        {
            tracing::warn!(error = %e, "cannot save the boot table; serving it from memory");
        }
        tracing::info!(n_machines = machines.len(), "boot table updated");
        self.boot_table.send_replace(Arc::new(machines.to_vec()));
    }

    fn finish_request(&self, state: &mut PersistentState, target: &RackCatalogue, local_request: &mut bool) {
        *local_request = false;
        if target.sync_requested > state.handled_requested {
            state.handled_requested = target.sync_requested;
            self.save_state(state);
        }
        self.status.send_modify(|s| s.completed_runs += 1);
    }

    fn link(&self) -> Option<(RegionClient, String)> {
        let registration = crate::registration::load(&self.data_dir).ok()??;
        let url = parse_region_url(&registration.region_url).ok()?;
        let client = RegionClient::new(&url, Duration::from_secs(10));
        Some((client, registration.authorization()))
    }

    fn decide(
        &self,
        target: &RackCatalogue,
        current: Option<&SnapshotMeta>,
        requested: bool,
        change_seen_at: tokio::time::Instant,
    ) -> Decision {
        if !differs(current, target) {
            return Decision::UpToDate;
        }
        if requested {
            return Decision::Sync { requested: true };
        }
        let now = tokio::time::Instant::now();
        if let Some(not_before) = self.not_before {
            if now < not_before {
                return Decision::Wait { message: "retrying after a failed sync".into(), recheck: not_before - now };
            }
        }
        let policy = &target.policy;
        match policy.policy {
            SyncPolicyKind::Auto => {
                // A rack with no snapshot at all has nothing to serve: no reason to wait.
                let due = change_seen_at + Duration::from_millis(policy.delay_ms);
                if current.is_none() || now >= due {
                    Decision::Sync { requested: false }
                } else {
                    Decision::Wait {
                        message: format!("auto policy: syncing {} s after the last change", (due - now).as_secs()),
                        recheck: due - now,
                    }
                }
            }
            SyncPolicyKind::Window => {
                if window_open(policy) {
                    Decision::Sync { requested: false }
                } else {
                    Decision::Wait {
                        message: format!("window policy: waiting for {}–{}", policy.window_start, policy.window_end),
                        recheck: Duration::from_secs(30),
                    }
                }
            }
            SyncPolicyKind::Manual => {
                Decision::Wait { message: "manual policy: waiting for 'sync now'".into(), recheck: LONG_POLL }
            }
        }
    }

    /// Runs one sync; returns how soon to look again.
    async fn sync(
        &mut self,
        client: &RegionClient,
        authorization: &str,
        target: &RackCatalogue,
        requested: bool,
    ) -> Duration {
        let limiter = RateLimiter::new(target.policy.bandwidth_bytes_per_s);
        let status = self.status.clone();
        let progress: engine::ProgressFn = Arc::new(move |done, total| {
            status.send_modify(|s| {
                s.report.bytes_done = done;
                s.report.bytes_total = total;
            })
        });
        let policy = target.policy.clone();
        let may_continue = move || requested || policy.policy != SyncPolicyKind::Window || window_open(&policy);
        self.set_report(|r| {
            r.phase = SyncPhase::Syncing;
            r.message.clear();
            r.bytes_done = 0;
            r.bytes_total = 0;
        });
        tracing::info!(revision = target.revision, n_files = target.files.len(), "sync starting");
        let sync = SyncRun {
            layout: &self.layout,
            client,
            authorization,
            limiter: limiter.as_ref(),
            progress,
            may_continue: &may_continue,
        };
        match sync.run(target).await {
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
                self.retry = RETRY_MIN;
                self.not_before = None;
                let mut report = report_for(Some(&meta));
                report.last_sync = Some(figures);
                self.status.send_modify(|s| {
                    s.report = report;
                    if !requested {
                        s.completed_runs += 1;
                    }
                });
                Duration::ZERO
            }
            Ok(RunOutcome::Paused) => {
                tracing::info!("sync window closed; sync paused, resumes in the next window");
                self.set_report(|r| {
                    r.phase = SyncPhase::Paused;
                    r.message = format!("window closed; resumes at {}", target.policy.window_start);
                });
                Duration::from_secs(30)
            }
            Err(e) => {
                let reason = error_chain(&e);
                self.fail(&reason);
                if !requested {
                    self.status.send_modify(|s| s.completed_runs += 1);
                }
                self.not_before = Some(tokio::time::Instant::now() + self.retry);
                let wait = self.retry;
                self.retry = (self.retry * 2).min(RETRY_MAX);
                wait
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

/// Path of the rack's control socket (used by `rackd sync`).
pub fn control_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}
