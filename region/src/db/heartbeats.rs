//! Rack heartbeats not yet written: each rack's latest (last seen, health, sync report, remote
//! address) in memory, written for all racks in one transaction per
//! [`crate::config::HEARTBEAT_FLUSH_INTERVAL`] instead of one commit per heartbeat.
//!
//! Why: 1,000 racks heartbeating every 5 s were ~200 commits a second, each flushed to disk and
//! serialized by SQLite, and the admin API's reads queued behind them (docs/PERFORMANCE.md,
//! "Scale"). A heartbeat only moves `last_seen_ms` forward and replaces the health, so only the
//! latest of each rack needs writing. Readers of a rack (`Store::rack`, `Store::racks`) see the
//! pending entry over the stored row, so nothing that reads a rack's state or health lags.

use std::collections::HashMap;

use metalrack_api::images::SyncReport;
use metalrack_api::RackHealth;

/// Racks with a heartbeat pending at once. Only authenticated racks heartbeat, so the buffer
/// holds at most one entry per registered rack; this bounds it even if racks were registered
/// without limit. 100,000 entries of ~1 KiB each is ~100 MiB, far beyond the 1,000 racks a site
/// is sized for. A heartbeat arriving when the buffer is full is written through at once (the
/// old, slower path), so nothing is lost.
pub const HEARTBEATS_PENDING_MAX: usize = 100_000;

/// One rack's latest heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingHeartbeat {
    pub seen_ms: i64,
    pub health: RackHealth,
    /// `None` keeps the sync report stored before (a rack that sent none this time).
    pub sync: Option<SyncReport>,
    pub remote_address: String,
    /// Increases with every heartbeat put in the buffer, so a flush removes only the entries it
    /// wrote and not a newer one that arrived while it was writing.
    stamp: u64,
}

impl PendingHeartbeat {
    pub fn new(seen_ms: i64, health: RackHealth, sync: Option<SyncReport>, remote_address: String) -> Self {
        PendingHeartbeat { seen_ms, health, sync, remote_address, stamp: 0 }
    }
}

/// What [`HeartbeatBuffer::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Kept for the next flush.
    Buffered,
    /// The buffer is full ([`HEARTBEATS_PENDING_MAX`]) and holds nothing for this rack: the
    /// caller writes the heartbeat itself.
    Full,
}

/// Each rack's latest unwritten heartbeat, by rack id.
#[derive(Debug, Default)]
pub struct HeartbeatBuffer {
    pending: HashMap<String, PendingHeartbeat>,
    next_stamp: u64,
}

impl HeartbeatBuffer {
    /// Keeps `heartbeat` as the rack's latest, replacing an older pending one. A sync report
    /// of `None` keeps the pending one's (as the stored row's is kept when written).
    pub fn put(&mut self, rack_id: &str, mut heartbeat: PendingHeartbeat) -> Put {
        if self.pending.len() >= HEARTBEATS_PENDING_MAX && !self.pending.contains_key(rack_id) {
            return Put::Full;
        }
        self.next_stamp += 1;
        heartbeat.stamp = self.next_stamp;
        if let Some(older) = self.pending.get_mut(rack_id) {
            if heartbeat.sync.is_none() {
                heartbeat.sync = older.sync.take();
            }
            *older = heartbeat;
        } else {
            self.pending.insert(rack_id.to_owned(), heartbeat);
        }
        Put::Buffered
    }

    /// The rack's pending heartbeat, if any.
    pub fn get(&self, rack_id: &str) -> Option<&PendingHeartbeat> {
        self.pending.get(rack_id)
    }

    /// Forgets the rack's pending heartbeat: it was written through, or the rack registered
    /// again (its row's `last_seen_ms` is reset and an old heartbeat must not bring it back).
    pub fn forget(&mut self, rack_id: &str) {
        self.pending.remove(rack_id);
    }

    /// A copy of every pending heartbeat, to write. The entries stay until [`Self::written`]:
    /// readers keep seeing them while the write runs, and a failed write keeps them for the
    /// next try.
    pub fn to_write(&self) -> Vec<(String, PendingHeartbeat)> {
        self.pending.iter().map(|(id, h)| (id.clone(), h.clone())).collect()
    }

    /// Removes the entries a successful write stored, except those replaced by a newer
    /// heartbeat since [`Self::to_write`] (those wait for the next flush).
    pub fn written(&mut self, written: &[(String, PendingHeartbeat)]) {
        for (id, heartbeat) in written {
            if self.pending.get(id).is_some_and(|h| h.stamp == heartbeat.stamp) {
                self.pending.remove(id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(version: &str) -> RackHealth {
        RackHealth { version: version.into(), ..Default::default() }
    }

    fn heartbeat(seen_ms: i64, version: &str) -> PendingHeartbeat {
        PendingHeartbeat::new(seen_ms, health(version), None, "10.0.0.1".into())
    }

    #[test]
    fn the_latest_heartbeat_of_a_rack_wins_and_racks_are_kept_apart() {
        let mut buffer = HeartbeatBuffer::default();
        assert_eq!(buffer.put("a", heartbeat(1, "1")), Put::Buffered);
        assert_eq!(buffer.put("a", heartbeat(2, "2")), Put::Buffered);
        assert_eq!(buffer.put("b", heartbeat(3, "3")), Put::Buffered);
        assert_eq!(buffer.len(), 2);
        assert_eq!(buffer.get("a").unwrap().seen_ms, 2);
        assert_eq!(buffer.get("a").unwrap().health.version, "2");
        assert_eq!(buffer.get("b").unwrap().seen_ms, 3);
    }

    #[test]
    fn a_heartbeat_without_a_sync_report_keeps_the_pending_report() {
        let mut buffer = HeartbeatBuffer::default();
        let report = SyncReport { snapshot_id: Some("s1".into()), ..Default::default() };
        buffer.put("a", PendingHeartbeat::new(1, health("1"), Some(report.clone()), "x".into()));
        buffer.put("a", heartbeat(2, "1"));
        assert_eq!(buffer.get("a").unwrap().sync.as_ref(), Some(&report));
    }

    #[test]
    fn a_successful_write_drains_what_it_wrote() {
        let mut buffer = HeartbeatBuffer::default();
        buffer.put("a", heartbeat(1, "1"));
        buffer.put("b", heartbeat(1, "1"));
        let batch = buffer.to_write();
        assert_eq!(batch.len(), 2);
        buffer.written(&batch);
        assert!(buffer.is_empty());
        assert!(buffer.to_write().is_empty());
    }

    #[test]
    fn a_failed_write_keeps_the_entries_and_newer_heartbeats_replace_them() {
        let mut buffer = HeartbeatBuffer::default();
        buffer.put("a", heartbeat(1, "1"));
        let failed = buffer.to_write();
        // The write failed: `written` is not called. A newer heartbeat arrives meanwhile.
        drop(failed);
        buffer.put("a", heartbeat(2, "2"));
        let retry = buffer.to_write();
        assert_eq!(retry.len(), 1);
        assert_eq!(retry[0].1.seen_ms, 2);
        buffer.written(&retry);
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_heartbeat_arriving_during_a_write_stays_for_the_next_flush() {
        let mut buffer = HeartbeatBuffer::default();
        buffer.put("a", heartbeat(1, "1"));
        let batch = buffer.to_write();
        buffer.put("a", heartbeat(2, "2"));
        buffer.written(&batch);
        assert_eq!(buffer.get("a").unwrap().seen_ms, 2);
    }

    #[test]
    fn a_full_buffer_refuses_new_racks_but_still_replaces_pending_ones() {
        let mut buffer = HeartbeatBuffer::default();
        for i in 0..HEARTBEATS_PENDING_MAX {
            assert_eq!(buffer.put(&i.to_string(), heartbeat(1, "1")), Put::Buffered);
        }
        assert_eq!(buffer.put("new", heartbeat(2, "2")), Put::Full);
        assert!(buffer.get("new").is_none());
        assert_eq!(buffer.put("0", heartbeat(2, "2")), Put::Buffered);
        assert_eq!(buffer.get("0").unwrap().seen_ms, 2);
    }

    #[test]
    fn forgetting_a_rack_drops_its_pending_heartbeat() {
        let mut buffer = HeartbeatBuffer::default();
        buffer.put("a", heartbeat(1, "1"));
        buffer.forget("a");
        assert!(buffer.get("a").is_none());
    }
}
