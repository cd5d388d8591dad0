//! Each rack's recent health, kept in memory from its heartbeats for the controllers page's
//! charts: CPU load, memory and disk in use, and sync lag. Bounded per rack and in racks; lost
//! on restart (the charts start again with the next heartbeats), which is why it needs no table.
//!
//! **Sync lag** is how long the rack's current snapshot has been behind the catalogue: 0 while
//! the snapshot was built from the catalogue's current revision; otherwise the time since the
//! first heartbeat that showed it behind (so it starts within one heartbeat interval of the
//! change, and grows while a sync waits for its delay, its window, or an operator). The
//! catalogue's revisions carry no time, which is why it is measured from heartbeats.

use std::collections::{HashMap, VecDeque};

use metalrack_api::images::SyncReport;
use metalrack_api::RackHealth;

/// Samples kept per rack: 120 heartbeats are 10 minutes at the default 5 s interval. A sample
/// is ~48 bytes, so ~6 KiB per rack.
pub const HEALTH_SAMPLES_MAX: usize = 120;

/// Racks with a history kept: 2,048 × ~6 KiB ≈ 12 MiB at most. Past it, the rack whose last
/// heartbeat is oldest (most likely gone) is forgotten.
pub const RACKS_TRACKED_MAX: usize = 2048;

/// One heartbeat's figures. Fractions are 0.0–1.0; `None` when the rack did not report the
/// figure (a rack older than the memory fields, a disk it could not read, a rack not syncing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthSample {
    pub at_ms: i64,
    /// One-minute load per CPU, as the rack reports it (may exceed 1.0).
    pub cpu_load: f64,
    pub memory_used: Option<f64>,
    pub disk_used: Option<f64>,
    pub sync_lag_ms: Option<i64>,
}

#[derive(Debug, Default)]
struct RackHistory {
    samples: VecDeque<HealthSample>,
    /// When a heartbeat first showed the rack's snapshot behind the catalogue; `None` while
    /// it is current.
    behind_since_ms: Option<i64>,
}

/// The histories of every rack, by rack id.
#[derive(Debug, Default)]
pub struct HealthHistory {
    racks: HashMap<String, RackHistory>,
}

impl HealthHistory {
    /// Records a heartbeat received at `now_ms` while the catalogue was at `catalogue_revision`.
    pub fn record(
        &mut self,
        rack_id: &str,
        now_ms: i64,
        health: &RackHealth,
        sync: Option<&SyncReport>,
        catalogue_revision: i64,
    ) {
        if !self.racks.contains_key(rack_id) && self.racks.len() >= RACKS_TRACKED_MAX {
            let stalest = self
                .racks
                .iter()
                .min_by_key(|(_, history)| history.samples.back().map_or(i64::MIN, |s| s.at_ms))
                .map(|(id, _)| id.clone());
            if let Some(id) = stalest {
                self.racks.remove(&id);
            }
        }
        let history = self.racks.entry(rack_id.to_owned()).or_default();
        let sync_lag_ms = sync.map(|report| {
            // Revision 0 is the catalogue before its first commit: a rack without a snapshot
            // (revision -1) lacks nothing then.
            if report.snapshot_revision >= catalogue_revision || catalogue_revision == 0 {
                history.behind_since_ms = None;
                0
            } else {
                now_ms - *history.behind_since_ms.get_or_insert(now_ms)
            }
        });
        if history.samples.len() == HEALTH_SAMPLES_MAX {
            history.samples.pop_front();
        }
        history.samples.push_back(HealthSample {
            at_ms: now_ms,
            cpu_load: health.cpu_load.max(0.0),
            memory_used: used_fraction(health.memory_available_bytes, health.memory_total_bytes),
            disk_used: used_fraction(health.disk_free_bytes, health.disk_total_bytes),
            sync_lag_ms,
        });
    }

    /// A rack's samples, oldest first (empty for a rack not heard from since the region started).
    pub fn samples(&self, rack_id: &str) -> Vec<HealthSample> {
        self.racks.get(rack_id).map(|h| h.samples.iter().copied().collect()).unwrap_or_default()
    }
}

/// `1 - free/total`, or `None` when the total is unknown (0).
fn used_fraction(free: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| 1.0 - (free.min(total) as f64 / total as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(memory_available_bytes: u64) -> RackHealth {
        RackHealth {
            cpu_load: 0.5,
            disk_free_bytes: 25,
            disk_total_bytes: 100,
            memory_total_bytes: 1000,
            memory_available_bytes,
            ..RackHealth::default()
        }
    }

    fn report(snapshot_revision: i64) -> SyncReport {
        SyncReport { snapshot_revision, ..SyncReport::default() }
    }

    #[test]
    fn a_sample_holds_the_used_fractions_and_unknown_totals_are_none() {
        let mut history = HealthHistory::default();
        history.record("r1", 1_000, &health(250), None, 0);
        history.record("r1", 2_000, &RackHealth::default(), None, 0);
        let samples = history.samples("r1");
        assert_eq!(samples[0].memory_used, Some(0.75));
        assert_eq!(samples[0].disk_used, Some(0.75));
        assert_eq!(samples[0].sync_lag_ms, None, "a rack that reports no sync has no lag");
        assert_eq!(samples[1].memory_used, None, "a rack older than the memory fields reports 0 of 0");
        assert!(history.samples("r2").is_empty());
    }

    #[test]
    fn sync_lag_counts_from_the_first_heartbeat_behind_and_ends_when_the_rack_catches_up() {
        let mut history = HealthHistory::default();
        let lag = |history: &HealthHistory| history.samples("r1").last().unwrap().sync_lag_ms;
        history.record("r1", 1_000, &health(0), Some(&report(3)), 3);
        assert_eq!(lag(&history), Some(0));
        history.record("r1", 6_000, &health(0), Some(&report(3)), 4);
        assert_eq!(lag(&history), Some(0), "behind since this heartbeat");
        history.record("r1", 11_000, &health(0), Some(&report(3)), 5);
        assert_eq!(lag(&history), Some(5_000), "a second change does not restart the clock");
        history.record("r1", 16_000, &health(0), Some(&report(5)), 5);
        assert_eq!(lag(&history), Some(0));
        history.record("r1", 21_000, &health(0), Some(&report(5)), 6);
        assert_eq!(lag(&history), Some(0), "a new change starts a new clock");
        history.record("r2", 1_000, &health(0), Some(&report(-1)), 0);
        history.record("r2", 6_000, &health(0), Some(&report(-1)), 0);
        assert_eq!(history.samples("r2")[1].sync_lag_ms, Some(0), "an empty catalogue: nothing to lag behind");
    }

    #[test]
    fn history_is_bounded_per_rack_and_in_racks() {
        let mut history = HealthHistory::default();
        for i in 0..HEALTH_SAMPLES_MAX as i64 + 5 {
            history.record("r1", i, &health(0), None, 0);
        }
        let samples = history.samples("r1");
        assert_eq!(samples.len(), HEALTH_SAMPLES_MAX);
        assert_eq!(samples[0].at_ms, 5, "the oldest went first");
        for i in 0..RACKS_TRACKED_MAX {
            history.record(&format!("rack{i}"), 1_000 + i as i64, &health(0), None, 0);
        }
        assert_eq!(history.racks.len(), RACKS_TRACKED_MAX);
        assert!(history.samples("r1").is_empty(), "the rack heard from longest ago was forgotten");
        assert!(!history.samples("rack0").is_empty());
    }
}
