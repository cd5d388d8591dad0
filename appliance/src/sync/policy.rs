//! The sync policy's decisions, without clocks or I/O: given the catalogue, the local snapshot,
//! the time (a monotonic instant for delays, the local minute of day for windows) and what has
//! been seen so far, whether to sync now, wait, or rest. The controller in `sync/mod.rs` reads
//! the clocks and does the I/O; everything here is a function of its arguments.

use std::time::Duration;

use metalrack_api::images::{in_window, parse_hhmm, SyncPolicy, SyncPolicyKind};
use tokio::time::Instant;

/// Retry delays after a failed sync or an unreachable region, doubling up to the max: a region
/// back from an outage is asked again within 2 s, a broken one at most every 5 minutes.
pub const RETRY_MIN: Duration = Duration::from_secs(2);
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// How soon a closed window is looked at again: a window opens within this of its start time,
/// at the cost of one catalogue poll per period.
pub const WINDOW_RECHECK: Duration = Duration::from_secs(30);

/// The facts a decision rests on, gathered by the controller.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    pub policy: &'a SyncPolicy,
    /// The catalogue's files differ from the snapshot in service.
    pub differs: bool,
    /// The rack has a snapshot in service at all.
    pub has_snapshot: bool,
    /// "Sync now" was asked (by the region's counter or `rackd sync --now`) and not yet acted on.
    pub requested: bool,
}

/// What the controller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Sync {
        /// The sync runs because it was asked for: it ignores the window and is not paused by it.
        requested: bool,
    },
    Wait {
        message: String,
        /// When to decide again; `None`: only a change (catalogue, request) can make it sync.
        recheck: Option<Duration>,
    },
    UpToDate,
}

/// What the policy remembers between decisions.
#[derive(Debug, Clone)]
pub struct PolicyState {
    /// The catalogue revision last seen (-1: none yet).
    seen_revision: i64,
    /// When the catalogue last changed: the auto policy's delay counts from here, so each new
    /// change restarts it (debounce: a burst of uploads gives one sync).
    change_seen_at: Instant,
    /// After a failure, no automatic attempt before this.
    not_before: Option<Instant>,
    /// The next retry delay.
    retry: Duration,
}

impl PolicyState {
    pub fn new(now: Instant) -> PolicyState {
        PolicyState { seen_revision: -1, change_seen_at: now, not_before: None, retry: RETRY_MIN }
    }

    pub fn seen_revision(&self) -> i64 {
        self.seen_revision
    }

    /// The delay to wait before retrying something that failed (without doubling it).
    pub fn retry(&self) -> Duration {
        self.retry
    }

    /// Notes a catalogue; a new revision restarts the auto policy's delay.
    pub fn catalogue_seen(&mut self, revision: i64, now: Instant) {
        if revision != self.seen_revision {
            self.change_seen_at = now;
        }
        self.seen_revision = revision;
    }

    /// The region could not be asked: returns how long to wait, and backs off further.
    pub fn poll_failed(&mut self) -> Duration {
        let wait = self.retry;
        self.retry = (self.retry * 2).min(RETRY_MAX);
        wait
    }

    /// A sync failed: no automatic attempt for the returned delay, and backs off further.
    pub fn sync_failed(&mut self, now: Instant) -> Duration {
        let wait = self.poll_failed();
        self.not_before = Some(now + wait);
        wait
    }

    /// A snapshot was published: retries start small again.
    pub fn sync_succeeded(&mut self) {
        self.retry = RETRY_MIN;
        self.not_before = None;
    }

    pub fn decide(&self, situation: Situation, now: Instant, minute_of_day: u32) -> Decision {
        let Situation { policy, differs, has_snapshot, requested } = situation;
        if !differs {
            return Decision::UpToDate;
        }
        if requested {
            return Decision::Sync { requested: true };
        }
        if let Some(not_before) = self.not_before {
            if now < not_before {
                return Decision::Wait {
                    message: "retrying after a failed sync".into(),
                    recheck: Some(not_before - now),
                };
            }
        }
        match policy.policy {
            SyncPolicyKind::Auto => {
                // A rack with no snapshot at all has nothing to serve: no reason to wait.
                let due = self.change_seen_at + Duration::from_millis(policy.delay_ms);
                if !has_snapshot || now >= due {
                    Decision::Sync { requested: false }
                } else {
                    Decision::Wait {
                        message: format!("auto policy: syncing {} s after the last change", (due - now).as_secs()),
                        recheck: Some(due - now),
                    }
                }
            }
            SyncPolicyKind::Window => {
                if window_open(policy, minute_of_day) {
                    Decision::Sync { requested: false }
                } else {
                    Decision::Wait {
                        message: format!("window policy: waiting for {}–{}", policy.window_start, policy.window_end),
                        recheck: Some(WINDOW_RECHECK),
                    }
                }
            }
            SyncPolicyKind::Manual => {
                Decision::Wait { message: "manual policy: waiting for 'sync now'".into(), recheck: None }
            }
        }
    }
}

/// Whether the window of a window policy is open at `minute_of_day` (local time). A window
/// that does not parse is never open: the region validates windows, so this is a damaged one.
pub fn window_open(policy: &SyncPolicy, minute_of_day: u32) -> bool {
    match (parse_hhmm(&policy.window_start), parse_hhmm(&policy.window_end)) {
        (Ok(start), Ok(end)) => in_window(start, end, minute_of_day),
        _ => false,
    }
}

/// Whether a running sync may go on at `minute_of_day`: a window policy's sync pauses when its
/// window closes, unless it was asked for.
pub fn may_continue(policy: &SyncPolicy, requested: bool, minute_of_day: u32) -> bool {
    requested || policy.policy != SyncPolicyKind::Window || window_open(policy, minute_of_day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn hhmm(h: u32, m: u32) -> u32 {
        h * 60 + m
    }

    fn policy(kind: SyncPolicyKind) -> SyncPolicy {
        SyncPolicy {
            policy: kind,
            delay_ms: 60_000,
            window_start: "22:00".into(),
            window_end: "02:00".into(),
            bandwidth_bytes_per_s: 0,
        }
    }

    fn situation(policy: &SyncPolicy) -> Situation<'_> {
        Situation { policy, differs: true, has_snapshot: true, requested: false }
    }

    fn syncs(decision: &Decision) -> bool {
        matches!(decision, Decision::Sync { .. })
    }

    #[test]
    fn nothing_to_do_when_the_snapshot_matches() {
        let t0 = Instant::now();
        let auto = policy(SyncPolicyKind::Auto);
        let state = PolicyState::new(t0);
        let same = Situation { differs: false, requested: true, ..situation(&auto) };
        assert_eq!(state.decide(same, t0 + Duration::from_secs(3600), 0), Decision::UpToDate);
    }

    #[test]
    fn auto_waits_its_delay_after_a_change() {
        let t0 = Instant::now();
        let auto = policy(SyncPolicyKind::Auto);
        let mut state = PolicyState::new(t0);
        state.catalogue_seen(7, t0);
        match state.decide(situation(&auto), t0 + Duration::from_secs(20), 0) {
            Decision::Wait { recheck, .. } => assert_eq!(recheck, Some(Duration::from_secs(40))),
            other => panic!("{other:?}"),
        }
        assert!(syncs(&state.decide(situation(&auto), t0 + Duration::from_secs(60), 0)));
    }

    #[test]
    fn a_second_change_restarts_the_delay() {
        let t0 = Instant::now();
        let auto = policy(SyncPolicyKind::Auto);
        let mut state = PolicyState::new(t0);
        state.catalogue_seen(7, t0);
        state.catalogue_seen(8, t0 + Duration::from_secs(50));
        // 60 s after the first change, only 10 s after the second: still waiting.
        let at = t0 + Duration::from_secs(60);
        match state.decide(situation(&auto), at, 0) {
            Decision::Wait { recheck, .. } => assert_eq!(recheck, Some(Duration::from_secs(50))),
            other => panic!("{other:?}"),
        }
        // The same revision seen again (another long-poll answer) does not restart it.
        state.catalogue_seen(8, t0 + Duration::from_secs(100));
        assert!(syncs(&state.decide(situation(&auto), t0 + Duration::from_secs(110), 0)));
    }

    #[test]
    fn auto_without_a_snapshot_syncs_at_once() {
        let t0 = Instant::now();
        let auto = policy(SyncPolicyKind::Auto);
        let mut state = PolicyState::new(t0);
        state.catalogue_seen(1, t0);
        let empty = Situation { has_snapshot: false, ..situation(&auto) };
        assert_eq!(state.decide(empty, t0, 0), Decision::Sync { requested: false });
    }

    #[test]
    fn a_window_that_wraps_midnight() {
        let t0 = Instant::now();
        let window = policy(SyncPolicyKind::Window);
        let state = PolicyState::new(t0);
        for open in [hhmm(22, 0), hhmm(23, 59), hhmm(0, 0), hhmm(1, 59)] {
            assert!(syncs(&state.decide(situation(&window), t0, open)), "open at minute {open}");
        }
        for closed in [hhmm(2, 0), hhmm(12, 0), hhmm(21, 59)] {
            match state.decide(situation(&window), t0, closed) {
                Decision::Wait { recheck, .. } => assert_eq!(recheck, Some(WINDOW_RECHECK)),
                other => panic!("closed at minute {closed}: {other:?}"),
            }
        }
    }

    #[test]
    fn manual_never_syncs_by_itself() {
        let t0 = Instant::now();
        let manual = policy(SyncPolicyKind::Manual);
        let mut state = PolicyState::new(t0);
        state.catalogue_seen(3, t0);
        for later in [0, 60, 86_400 * 30] {
            let decision = state.decide(situation(&manual), t0 + Duration::from_secs(later), hhmm(23, 0));
            assert!(matches!(decision, Decision::Wait { recheck: None, .. }), "{decision:?}");
        }
        let empty = Situation { has_snapshot: false, ..situation(&manual) };
        assert!(!syncs(&state.decide(empty, t0, 0)), "not even without a snapshot");
    }

    #[test]
    fn sync_now_overrides_delay_window_manual_and_retry() {
        let t0 = Instant::now();
        let mut state = PolicyState::new(t0);
        state.catalogue_seen(1, t0);
        state.sync_failed(t0);
        for kind in [SyncPolicyKind::Auto, SyncPolicyKind::Window, SyncPolicyKind::Manual] {
            let policy = policy(kind);
            let asked = Situation { requested: true, ..situation(&policy) };
            // Inside the auto delay, outside the window (noon), right after a failure.
            assert_eq!(state.decide(asked, t0, hhmm(12, 0)), Decision::Sync { requested: true }, "{kind:?}");
        }
    }

    #[test]
    fn a_failure_holds_automatic_syncs_back_with_doubling_delays() {
        let t0 = Instant::now();
        let auto = policy(SyncPolicyKind::Auto);
        let mut state = PolicyState::new(t0);
        let empty = Situation { has_snapshot: false, ..situation(&auto) };
        assert_eq!(state.sync_failed(t0), RETRY_MIN);
        assert!(!syncs(&state.decide(empty, t0 + RETRY_MIN / 2, 0)));
        assert!(syncs(&state.decide(empty, t0 + RETRY_MIN, 0)));
        assert_eq!(state.sync_failed(t0), RETRY_MIN * 2);
        for _ in 0..20 {
            state.sync_failed(t0);
        }
        assert_eq!(state.retry(), RETRY_MAX);
        state.sync_succeeded();
        assert_eq!(state.retry(), RETRY_MIN);
        assert!(syncs(&state.decide(empty, t0, 0)));
    }

    #[test]
    fn a_window_sync_pauses_when_the_window_ends() {
        let window = policy(SyncPolicyKind::Window);
        assert!(may_continue(&window, false, hhmm(1, 59)));
        assert!(!may_continue(&window, false, hhmm(2, 0)), "the window 22:00–02:00 has ended");
        assert!(may_continue(&window, true, hhmm(2, 0)), "a requested sync runs to its end");
        assert!(may_continue(&policy(SyncPolicyKind::Auto), false, hhmm(12, 0)), "only windows pause");
    }

    #[test]
    fn a_damaged_window_is_never_open() {
        let mut window = policy(SyncPolicyKind::Window);
        window.window_start = "25:00".into();
        assert!((0..24 * 60).all(|minute| !window_open(&window, minute)));
    }
}
