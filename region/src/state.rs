//! What every domain shares: the database, the config, the data dir, and the change feed that
//! racks' catalogue long-polls wait on.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::RegionConfig;
use crate::db::{Store, StoreError};
use crate::metrics::{RegionMetrics, DROPPED_RECORD_FAILED};

/// Name of the setting holding the cluster's name, and its value until someone sets it.
pub const CLUSTER_NAME_SETTING: &str = "cluster_name";
pub const CLUSTER_NAME_DEFAULT: &str = "metalrack";

/// Changes racks must hear of: those for every rack and those for one rack's machines.
#[derive(Debug, Default)]
pub struct ChangeCounts {
    all: u64,
    /// One entry per rack that had a machine change since the region started: bounded by the
    /// racks table (a deleted rack's entry stays, 8 bytes and its id).
    per_rack: HashMap<String, u64>,
}

impl ChangeCounts {
    /// The changes rack `rack_id` must hear of so far: it moves with every change for all racks
    /// and every change to this rack's machines, and with nothing else. Racks send it back with
    /// their next poll (`RackCatalogue::changes_seen`).
    pub fn for_rack(&self, rack_id: &str) -> u64 {
        self.all + self.per_rack.get(rack_id).copied().unwrap_or(0)
    }
}

/// Cheap to clone: every field is shared.
#[derive(Clone, Debug)]
pub struct Shared {
    pub store: Store,
    pub config: Arc<RegionConfig>,
    data_dir: Arc<PathBuf>,
    /// Counts of the changes racks must hear about (catalogue, machines, sync requests,
    /// policies), for every rack and per rack; every change wakes the watchers, and a rack's
    /// poll answers only when its own count moved.
    changes: Arc<watch::Sender<ChangeCounts>>,
    /// Bumped when a power request is queued for any rack: racks' power long-polls wake and
    /// look for theirs (one cheap query each; far rarer than heartbeats).
    power_requests: Arc<watch::Sender<u64>>,
    /// When this region process started: the stall timer measures from it at the earliest, so
    /// a region that was down does not fail every job on its return.
    started_at_ms: i64,
    /// Set when the region begins to shut down: long-polls answer at once so shutdown need not
    /// wait for them.
    closing: Arc<AtomicBool>,
    /// Refusals of strangers (failed logins, registrations with a wrong secret) counted
    /// between summaries, so they cannot flood the event log.
    failures: Arc<Mutex<FailureCounts>>,
    /// The address the region serves on, once bound (port 0 becomes a real port).
    bound: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    /// Prometheus metrics: counted by the HTTP layer and the domains, served at `/metrics`.
    pub metrics: Arc<RegionMetrics>,
}

impl Shared {
    pub fn new(store: Store, config: RegionConfig, data_dir: PathBuf) -> Shared {
        Shared {
            store,
            config: Arc::new(config),
            data_dir: Arc::new(data_dir),
            changes: Arc::new(watch::channel(ChangeCounts::default()).0),
            power_requests: Arc::new(watch::channel(0).0),
            started_at_ms: crate::util::now_ms(),
            closing: Arc::default(),
            failures: Arc::default(),
            bound: Arc::default(),
            metrics: Arc::default(),
        }
    }

    /// Records the address the listener got; called once by the server.
    pub fn set_bound_address(&self, address: std::net::SocketAddr) {
        let _ = self.bound.set(address);
    }

    /// The URL racks reach this region at, for the register command the UI shows: the
    /// configured `public_url`, or else built from the bound address (this machine's hostname
    /// when listening on every address) — never from a request's `Host` header, which whoever
    /// sends the request chooses.
    pub fn region_url(&self) -> String {
        if let Some(url) = &self.config.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        let address = self.bound.get().copied().unwrap_or(self.config.listen);
        let host = if address.ip().is_unspecified() {
            nix::unistd::gethostname()
                .ok()
                .and_then(|name| name.into_string().ok())
                .unwrap_or_else(|| "localhost".to_owned())
        } else {
            match address.ip() {
                IpAddr::V6(ip) => format!("[{ip}]"),
                IpAddr::V4(ip) => ip.to_string(),
            }
        };
        format!("http://{host}:{}{}", address.port(), metalrack_api::paths::BASE_PATH)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Wakes every rack's catalogue long-poll: a change every rack must hear of.
    pub fn notify_change(&self) {
        self.changes.send_modify(|counts| counts.all += 1);
    }

    /// A change to machines of `racks`: only those racks' polls answer. `None` stands for a
    /// machine of no rack, which every rack serves. Before racks were told apart, each machine
    /// added woke every rack's poll: with 1,000 racks, 1,000 catalogue answers per machine.
    pub fn notify_rack_change(&self, racks: &[Option<&str>]) {
        self.changes.send_modify(|counts| {
            if racks.iter().any(Option::is_none) {
                counts.all += 1;
                return;
            }
            for rack_id in racks.iter().flatten() {
                *counts.per_rack.entry((*rack_id).to_owned()).or_default() += 1;
            }
        });
    }

    /// A receiver that sees every change after this call ([`ChangeCounts::for_rack`] says
    /// whether it concerns a rack).
    pub fn watch_changes(&self) -> watch::Receiver<ChangeCounts> {
        self.changes.subscribe()
    }

    /// Wakes every rack's power long-poll.
    pub fn notify_power(&self) {
        self.power_requests.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every [`Shared::notify_power`] after this call.
    pub fn watch_power(&self) -> watch::Receiver<u64> {
        self.power_requests.subscribe()
    }

    pub fn started_at_ms(&self) -> i64 {
        self.started_at_ms
    }

    /// Tells long-polls to answer now: the region is stopping.
    pub fn begin_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.notify_change();
        self.notify_power();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Records an event; a failure to record it is logged, not returned, for the callers whose
    /// own work already succeeded and must not be reported as failed because of the log.
    pub async fn record_event_or_log(&self, kind: &str, actor: &str, message: &str) {
        if let Err(e) = self.store.record_event(kind, actor, message).await {
            self.metrics.count_dropped(DROPPED_RECORD_FAILED, 1);
            tracing::error!(error = %metalrack_image_tools::error_chain(&e), kind, "cannot record event");
        }
    }

    /// Counts a refusal of a stranger. The first from a source in a summary interval is
    /// recorded at once with `first_message` (the audit log shows an attempt promptly); the rest
    /// are summarised by [`flush_failure_summaries_once`] as one event per source.
    pub async fn note_failure(&self, kind: FailureKind, source: IpAddr, subject: &str, first_message: &str) {
        let first = self.failures.lock().expect("failure counts lock").note(kind, source, subject);
        if first {
            self.record_event_or_log(kind.event_kind(), subject, first_message).await;
        }
    }

    pub async fn cluster_name(&self) -> Result<String, StoreError> {
        Ok(self.store.setting(CLUSTER_NAME_SETTING).await?.unwrap_or_else(|| CLUSTER_NAME_DEFAULT.into()))
    }
}

/// How often summaries of refused strangers are written.
pub const FAILURE_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Sources counted separately between two summaries; past it, refusals are counted under "other
/// sources", so a spread-out flood costs one entry, not one per address (~100 bytes each).
pub const FAILURE_SOURCES_MAX: usize = 1024;

/// Names (usernames, rack names) a summary lists per source; the rest are only counted.
const FAILURE_SUBJECTS_SHOWN_MAX: usize = 5;

/// Longest name a summary shows, in characters: a stranger chooses it.
const FAILURE_SUBJECT_CHARS_MAX: usize = 64;

/// What was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    Login,
    Registration,
}

impl FailureKind {
    fn event_kind(self) -> &'static str {
        match self {
            FailureKind::Login => "user.login_failed",
            FailureKind::Registration => "rack.refused",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            FailureKind::Login => "failed logins",
            FailureKind::Registration => "registrations refused (wrong secret)",
        }
    }

    fn subjects(self) -> &'static str {
        match self {
            FailureKind::Login => "usernames",
            FailureKind::Registration => "rack names",
        }
    }
}

#[derive(Debug, Default)]
struct FailureCount {
    /// Refusals after the first (which was recorded when it happened).
    n_more: u64,
    subjects: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct FailureCounts {
    by_source: HashMap<(FailureKind, IpAddr), FailureCount>,
    /// Refusals from sources past [`FAILURE_SOURCES_MAX`].
    other_sources: HashMap<FailureKind, u64>,
}

impl FailureCounts {
    /// Returns whether this is the source's first refusal of this kind since the last summary.
    fn note(&mut self, kind: FailureKind, source: IpAddr, subject: &str) -> bool {
        let full = self.by_source.len() >= FAILURE_SOURCES_MAX;
        match self.by_source.get_mut(&(kind, source)) {
            Some(count) => {
                count.n_more += 1;
                if count.subjects.len() < FAILURE_SUBJECTS_SHOWN_MAX {
                    count.subjects.insert(subject.chars().take(FAILURE_SUBJECT_CHARS_MAX).collect());
                }
                false
            }
            None if full => {
                *self.other_sources.entry(kind).or_default() += 1;
                false
            }
            None => {
                self.by_source.insert((kind, source), FailureCount::default());
                true
            }
        }
    }

    /// The summaries to write, as (event kind, message); the counts start again.
    fn take_summaries(&mut self, interval: Duration) -> Vec<(&'static str, String)> {
        let minutes = interval.as_secs().div_ceil(60);
        let period = if minutes == 1 { "the last minute".to_owned() } else { format!("the last {minutes} minutes") };
        let mut summaries: Vec<_> = self
            .by_source
            .drain()
            .filter(|(_, count)| count.n_more > 0)
            .map(|((kind, source), count)| {
                let subjects: Vec<_> = count.subjects.into_iter().collect();
                let message = format!(
                    "{} more {} from {source} in {period} ({}: {:?})",
                    count.n_more,
                    kind.plural(),
                    kind.subjects(),
                    subjects
                );
                (kind.event_kind(), message)
            })
            .collect();
        for (kind, n) in self.other_sources.drain() {
            summaries.push((kind.event_kind(), format!("{n} {} from other sources in {period}", kind.plural())));
        }
        summaries.sort();
        summaries
    }
}

/// Writes the refusal summaries every [`FAILURE_SUMMARY_INTERVAL`]; runs until aborted.
pub async fn flush_failure_summaries(shared: Shared) {
    let mut interval = tokio::time::interval(FAILURE_SUMMARY_INTERVAL);
    interval.tick().await;
    loop {
        interval.tick().await;
        flush_failure_summaries_once(&shared).await;
    }
}

/// Writes the refusals counted since the last summary as events, one per source and kind.
pub async fn flush_failure_summaries_once(shared: &Shared) {
    let summaries = shared.failures.lock().expect("failure counts lock").take_summaries(FAILURE_SUMMARY_INTERVAL);
    for (kind, message) in summaries {
        tracing::warn!(kind, %message, "refusals summarised");
        shared.record_event_or_log(kind, "region", &message).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_to_one_racks_machines_moves_only_that_racks_count_and_a_rackless_one_moves_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let shared = Shared::new(store, RegionConfig::default(), dir.path().to_owned());
        let mut changes = shared.watch_changes();
        let count = |rack: &str| shared.watch_changes().borrow().for_rack(rack);
        let (a0, b0) = (count("a"), count("b"));
        shared.notify_rack_change(&[Some("a")]);
        assert!(changes.has_changed().unwrap(), "every change wakes the watchers");
        changes.borrow_and_update();
        assert_eq!((count("a"), count("b")), (a0 + 1, b0), "only rack a's count moved");
        // A machine moved from a to b concerns both.
        shared.notify_rack_change(&[Some("a"), Some("b")]);
        assert_eq!((count("a"), count("b")), (a0 + 2, b0 + 1));
        // A machine of no rack is served by every rack, one never seen before included.
        shared.notify_rack_change(&[Some("a"), None]);
        assert_eq!((count("a"), count("b"), count("c")), (a0 + 3, b0 + 2, 1));
        shared.notify_change();
        assert_eq!((count("a"), count("b"), count("c")), (a0 + 4, b0 + 3, 2));
    }

    #[test]
    fn refusals_are_recorded_once_per_source_then_summarised() {
        let mut counts = FailureCounts::default();
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        let b: IpAddr = "10.0.0.6".parse().unwrap();
        assert!(counts.note(FailureKind::Login, a, "admin"));
        for _ in 0..36 {
            assert!(!counts.note(FailureKind::Login, a, "root"));
        }
        assert!(counts.note(FailureKind::Login, b, "admin"), "another source is a first refusal too");
        assert!(counts.note(FailureKind::Registration, a, "rack1"), "another kind is counted apart");
        let summaries = counts.take_summaries(FAILURE_SUMMARY_INTERVAL);
        assert_eq!(
            summaries,
            vec![(
                "user.login_failed",
                "36 more failed logins from 10.0.0.5 in the last minute (usernames: [\"root\"])".to_owned()
            )],
            "sources with only their first refusal need no summary"
        );
        assert!(counts.note(FailureKind::Login, a, "admin"), "after a summary the count starts again");
    }

    #[test]
    fn sources_past_the_limit_are_counted_together() {
        let mut counts = FailureCounts::default();
        for i in 0..FAILURE_SOURCES_MAX as u32 + 10 {
            counts.note(FailureKind::Login, IpAddr::from(std::net::Ipv4Addr::from(i)), &"x".repeat(1000));
        }
        assert_eq!(counts.by_source.len(), FAILURE_SOURCES_MAX);
        let summaries = counts.take_summaries(FAILURE_SUMMARY_INTERVAL);
        assert_eq!(
            summaries,
            vec![("user.login_failed", "10 failed logins from other sources in the last minute".to_owned())]
        );
    }
}
