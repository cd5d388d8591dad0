//! Boot events: recorded by the PXE services, kept in a bounded queue on disk so that neither a
//! region outage nor a rack restart loses them ([`journal`]), and sent to the region in order,
//! in batches bounded by count and bytes ([`batch`]).
//!
//! Each event is numbered when queued (`queue_id`, `seq`: see `BootEvent`), its fields cut to
//! the wire's named lengths, and serialized once: that JSON is what the file holds and what the
//! region receives, so a batch's size is counted exactly. An event leaves the queue only when the
//! region took it, or refused it alone:
//! - a batch the region refuses for what it holds (400, 422, or a 413 from anything on the way)
//!   is split in halves, and those again, until the one event it will not take is found; that
//!   one is dropped, logged and counted (`boot_events_dropped{kind="refused"}`), the rest go on;
//! - anything else (no answer, 5xx, a credential refused) keeps every event for a retry, with
//!   backoff up to `retry_backoff_max_ms`;
//! - a batch whose answer was lost is sent again; the region stores each id once.
//!
//! When the queue is full the oldest events are dropped for the new, counted
//! (`boot_events_dropped{kind="queue_full"}`) and summarised in the log once a second.

mod batch;
mod journal;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalrack_api::agent::MachineReport;
use metalrack_api::machines::{
    BootEvent, BOOT_EVENT_KIND_BYTES_MAX, BOOT_EVENT_MAC_BYTES_MAX, BOOT_EVENT_MESSAGE_BYTES_MAX,
};
use metalrack_image_tools::error_chain;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

pub use self::batch::{truncate_field, TRUNCATION_MARK};
use self::batch::{Refused, Splitter};
pub use self::journal::{EventJournalError, LoadReport};
use self::journal::{Journal, Record};
use super::metrics::KindLabel;
use super::Pxe;
use crate::data_dir::DataDir;
use crate::region_client::RegionError;
use crate::region_link::RegionLink;

/// Events kept while the region is unreachable; beyond it the oldest are dropped and counted. A
/// machine's boot makes ~7 events (two DHCP, a TFTP loader, a script, kernel and initrd over
/// HTTP, a callback): 50,000 hold a whole 1,000-machine rack rebooting seven times over.
pub const BOOT_EVENTS_QUEUED_MAX: usize = 50_000;

/// Bytes of queued events at most, as their lines on disk (~170 bytes for a typical event, at
/// most ~7 KiB for one of escaped text). The queue is held in memory too: ≤ 8 MiB there, and
/// ≤ 2 × 8 MiB + [`REWRITE_GARBAGE_BYTES_MIN`] of file (see [`FILE_BYTES_MAX`]).
pub const BOOT_EVENTS_QUEUED_BYTES_MAX: usize = 8 * 1024 * 1024;

/// The file is rewritten (live events only) once the lines of events gone outweigh the live
/// ones and are at least this many: a rack that sends as it goes rewrites a near-empty file every
/// ~6,000 events, a full queue is rewritten every ~8 MiB of new events.
const REWRITE_GARBAGE_BYTES_MIN: u64 = 1024 * 1024;

/// Largest file: an append that would pass it is not made, and the file waits for the next
/// tick's rewrite (at most [`FLUSH_EVERY`] away: the disk's tick does not wait for the region).
/// The events are queued in memory meanwhile, as they are between two syncs.
const FILE_BYTES_MAX: u64 = 2 * BOOT_EVENTS_QUEUED_BYTES_MAX as u64 + REWRITE_GARBAGE_BYTES_MIN;

/// Lines appended while a rewrite is written without the lock, carried into the new file. A
/// disk stalled for long enough under a flood of events would pass it; then that rewrite is
/// given up (the old file, appended to all along, stays) and the next tick tries again.
const CARRY_BYTES_MAX: usize = BOOT_EVENTS_QUEUED_BYTES_MAX;

/// How often the queue is synced to disk (one fdatasync), rewritten if due, and sent if the
/// backoff allows: the most a power cut loses, and the soonest a returning region hears.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The rack's counters for boot events, shared with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct EventCounters {
    pub queued: Gauge,
    pub sent: Counter,
    /// By reason: `queue_full`, `refused`, `unreadable` (a torn or damaged line at start).
    pub dropped: Family<KindLabel, Counter>,
    pub truncated: Counter,
}

impl EventCounters {
    fn dropped(&self, kind: &str, n: u64) {
        self.dropped.get_or_create(&KindLabel { kind: kind.to_owned() }).inc_by(n);
    }
}

/// An event in the queue: its number and the JSON it is sent as.
#[derive(Debug)]
struct Queued {
    seq: u64,
    json: String,
}

impl Queued {
    fn line_len(&self) -> usize {
        journal::event_line_len(self.json.len())
    }
}

#[derive(Debug)]
struct State {
    queue_id: u64,
    next_seq: u64,
    events: VecDeque<Queued>,
    /// Σ `line_len` of `events`: at most [`BOOT_EVENTS_QUEUED_BYTES_MAX`].
    bytes: usize,
    journal: Journal,
    /// Dropped for room since the last summary in the log.
    dropped_full_unreported: u64,
    /// Lines to append, reused.
    lines: Vec<u8>,
    /// While a rewrite is written without the lock: what was appended since its lines were
    /// taken, for the new file. `None` once past [`CARRY_BYTES_MAX`] (that rewrite is given up).
    carry: Option<Vec<u8>>,
}

impl State {
    /// Appends lines to the file (unless it is at its bound) and to a rewrite's carry.
    fn append(&mut self, lines: &[u8]) {
        if let Some(carry) = &mut self.carry {
            if carry.len() + lines.len() <= CARRY_BYTES_MAX {
                carry.extend_from_slice(lines);
            } else {
                self.carry = None;
            }
        }
        if self.journal.file_bytes + lines.len() as u64 > FILE_BYTES_MAX {
            self.journal.stop_appending();
        }
        self.journal.append(lines);
    }

    /// Drops events from the front through `seq`; returns how many.
    fn remove_through(&mut self, seq: u64) -> u64 {
        let mut removed = 0;
        while self.events.front().is_some_and(|front| front.seq <= seq) {
            let front = self.events.pop_front().expect("checked");
            self.bytes -= front.line_len();
            removed += 1;
        }
        removed
    }
}

/// The whole file for a queue: a `queue` line, then each live event.
fn file_lines(queue_id: u64, next_seq: u64, events: &VecDeque<Queued>) -> Vec<u8> {
    let mut lines = Vec::with_capacity(events.iter().map(Queued::line_len).sum::<usize>() + 64);
    Record::Queue { queue_id, next_seq }.encode(&mut lines);
    for queued in events {
        Record::Event(queued.json.clone()).encode(&mut lines);
    }
    lines
}

/// The boot event queue: in memory, mirrored to `DATA/boot-events.journal`.
#[derive(Debug)]
pub struct EventQueue {
    state: Mutex<State>,
    counters: EventCounters,
    /// Held through [`EventQueue::maintain`]: one rewrite at a time owns the carry.
    maintaining: Mutex<()>,
}

/// Why events left the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    Sent,
    Refused,
}

impl EventQueue {
    /// Opens the queue in the data dir (loading what a previous run left, within the bounds) and
    /// rewrites its file, so appends start on a line boundary. Blocking.
    pub fn open(data_dir: &DataDir, counters: EventCounters) -> Result<EventQueue, EventJournalError> {
        let path = data_dir.boot_events();
        let loaded = journal::load(&path)?;
        counters.dropped("unreadable", loaded.report.lines_dropped as u64);
        let (mut events, mut bytes, mut dropped) = (VecDeque::with_capacity(loaded.events.len()), 0, 0);
        for event in loaded.events {
            let queued =
                Queued { seq: event.seq, json: serde_json::to_string(&event).expect("a BootEvent serializes") };
            bytes += queued.line_len();
            events.push_back(queued);
            // A file from a version with larger bounds: the oldest go, as when queueing.
            while events.len() > BOOT_EVENTS_QUEUED_MAX || bytes > BOOT_EVENTS_QUEUED_BYTES_MAX {
                bytes -= events.pop_front().expect("over a bound, so not empty").line_len();
                dropped += 1;
            }
        }
        counters.dropped("queue_full", dropped);
        let journal = Journal::create(&path, &file_lines(loaded.queue_id, loaded.next_seq, &events))?;
        counters.queued.set(events.len() as i64);
        tracing::info!(
            queued = events.len(),
            queue_id = loaded.queue_id,
            next_seq = loaded.next_seq,
            lines_dropped = loaded.report.lines_dropped,
            "boot event queue loaded"
        );
        let state = State {
            queue_id: loaded.queue_id,
            next_seq: loaded.next_seq,
            events,
            bytes,
            journal,
            dropped_full_unreported: 0,
            lines: Vec::new(),
            carry: None,
        };
        Ok(EventQueue { state: Mutex::new(state), counters, maintaining: Mutex::new(()) })
    }

    /// Queues an event: numbered, its fields cut to the wire's lengths, appended to the file (one
    /// write to the page cache; the flush task syncs). When full, the oldest make room.
    pub fn push(&self, mac: &str, kind: &str, message: String) {
        self.push_event(mac, kind, message, None);
    }

    /// Queues a machine's report (checked against its bounds by the caller: see
    /// `AgentReport::validate`) as an event of its kind, in order with the boot events.
    pub fn push_report(&self, mac: &str, message: String, report: MachineReport) {
        let kind = report.report.event_kind();
        self.push_event(mac, kind, message, Some(report));
    }

    fn push_event(&self, mac: &str, kind: &str, message: String, report: Option<MachineReport>) {
        let mut event = BootEvent {
            queue_id: 0,
            seq: 0,
            at_ms: crate::status::now_ms(),
            mac: mac.to_owned(),
            kind: kind.to_owned(),
            message,
            report,
        };
        // Not short-circuited: every field is cut.
        let truncated = truncate_field(&mut event.mac, BOOT_EVENT_MAC_BYTES_MAX)
            | truncate_field(&mut event.kind, BOOT_EVENT_KIND_BYTES_MAX)
            | truncate_field(&mut event.message, BOOT_EVENT_MESSAGE_BYTES_MAX);
        if truncated {
            self.counters.truncated.inc();
        }
        let mut state = self.state.lock().expect("lock");
        let state = &mut *state;
        event.queue_id = state.queue_id;
        event.seq = state.next_seq;
        state.next_seq += 1;
        let queued = Queued { seq: event.seq, json: serde_json::to_string(&event).expect("a BootEvent serializes") };
        let mut dropped_through = None;
        while state.events.len() >= BOOT_EVENTS_QUEUED_MAX
            || state.bytes + queued.line_len() > BOOT_EVENTS_QUEUED_BYTES_MAX
        {
            let front_seq = state.events.front().expect("one event is within the bounds alone").seq;
            let dropped = state.remove_through(front_seq);
            state.dropped_full_unreported += dropped;
            self.counters.dropped("queue_full", dropped);
            dropped_through = Some(front_seq);
        }
        state.lines.clear();
        if let Some(through_seq) = dropped_through {
            Record::Gone { through_seq }.encode(&mut state.lines);
        }
        Record::Event(queued.json.clone()).encode(&mut state.lines);
        state.bytes += queued.line_len();
        state.events.push_back(queued);
        let lines = std::mem::take(&mut state.lines);
        state.append(&lines);
        state.lines = lines;
        self.counters.queued.set(state.events.len() as i64);
    }

    pub fn len(&self) -> usize {
        self.state.lock().expect("lock").events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The events queued, oldest first, as they will be sent.
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<BootEvent> {
        let state = self.state.lock().expect("lock");
        state.events.iter().map(|q| serde_json::from_str(&q.json).expect("our own JSON parses")).collect()
    }

    /// The next batch from the front, as (seq, JSON) pairs, within the count and byte bounds.
    fn peek_batch(&self) -> Vec<(u64, String)> {
        let state = self.state.lock().expect("lock");
        let n = batch::batch_len(state.events.iter().map(|q| q.json.len()));
        state.events.iter().take(n).map(|q| (q.seq, q.json.clone())).collect()
    }

    /// Events through `seq` have left (the region took them, or refused the one): forget them
    /// and say so in the file.
    fn remove_through(&self, seq: u64, why: Removal) {
        let mut state = self.state.lock().expect("lock");
        let removed = state.remove_through(seq);
        match why {
            Removal::Sent => {
                self.counters.sent.inc_by(removed);
            }
            Removal::Refused => self.counters.dropped("refused", removed),
        }
        let mut line = Vec::new();
        Record::Gone { through_seq: seq }.encode(&mut line);
        state.append(&line);
        self.counters.queued.set(state.events.len() as i64);
    }

    /// The disk's housekeeping, each tick: one fdatasync of what was appended, a rewrite when
    /// most of the file is events gone (or appends stopped), and the summary of events dropped
    /// for room. Blocking.
    pub fn maintain(&self) {
        self.maintain_with(|file| file.sync_data(), || ());
    }

    /// [`EventQueue::maintain`] with the fdatasync given and a hook between a rewrite's two
    /// halves, so a test can hold either. Neither the sync nor the rewrite's write runs under
    /// the queue's lock: the PXE services record events on their serving threads, and an
    /// fdatasync behind a busy disk (tens of ms while images stream) would hold each of them up.
    fn maintain_with(&self, sync: impl FnOnce(&std::fs::File) -> std::io::Result<()>, rewrite_written: impl FnOnce()) {
        let _one_at_a_time = self.maintaining.lock().expect("lock");
        let pending = self.state.lock().expect("lock").journal.begin_sync();
        if let Some(pending) = pending {
            let result = sync(&pending.file);
            self.state.lock().expect("lock").journal.finish_sync(pending, result);
        }
        let due = {
            let mut state = self.state.lock().expect("lock");
            let live = state.bytes as u64;
            let garbage = state.journal.file_bytes.saturating_sub(live);
            let due = !state.journal.clean || garbage >= live.max(REWRITE_GARBAGE_BYTES_MIN);
            due.then(|| {
                state.carry = Some(Vec::new());
                (state.journal.path().to_owned(), file_lines(state.queue_id, state.next_seq, &state.events))
            })
        };
        if let Some((path, lines)) = due {
            let written = journal::write_rewrite(&path, &lines);
            drop(lines);
            rewrite_written();
            let mut state = self.state.lock().expect("lock");
            let installed = match state.carry.take() {
                Some(carry) => state.journal.install(written, &carry),
                None => {
                    // Too much arrived meanwhile: the old file, appended to all along, stays.
                    if let Ok(rewrite) = written {
                        rewrite.discard();
                    }
                    false
                }
            };
            drop(state);
            if installed {
                // Without it a power cut could bring back the old file, which lacks only what
                // was appended since the rename: what an unsynced append risks anyway.
                if let Err(e) = journal::sync_dir(&path) {
                    tracing::warn!(error = %metalrack_image_tools::error_chain(&e), "cannot sync the boot event queue's directory");
                }
            }
        }
        let mut state = self.state.lock().expect("lock");
        if state.dropped_full_unreported > 0 {
            tracing::warn!(
                dropped = state.dropped_full_unreported,
                queued = state.events.len(),
                bytes = state.bytes,
                events_max = BOOT_EVENTS_QUEUED_MAX,
                bytes_max = BOOT_EVENTS_QUEUED_BYTES_MAX,
                "boot event queue full (the region has been unreachable); the oldest events were dropped"
            );
            state.dropped_full_unreported = 0;
        }
    }
}

impl Drop for EventQueue {
    fn drop(&mut self) {
        if let Ok(state) = self.state.get_mut() {
            state.journal.sync();
        }
    }
}

/// Sends queued events to the region each [`FLUSH_EVERY`], backing off up to `backoff_max`
/// while it fails; keeps them while the region is away. Beside it, on a tick of its own, syncs
/// and rewrites the file ([`EventQueue::maintain`]). Returns at `shutdown`; the last flush is
/// the caller's ([`flush`]), once nothing records events any more.
pub async fn flush_until_stopped(
    pxe: Arc<Pxe>,
    link: Arc<RegionLink>,
    backoff_max: Duration,
    shutdown: CancellationToken,
) {
    // The disk's tick on its own, so that a region slow to answer does not hold up the syncs
    // and rewrites (an append past the file's bound waits for the next of them).
    let disk = async {
        loop {
            tokio::select! {
                () = tokio::time::sleep(FLUSH_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
            let for_disk = pxe.clone();
            let _ = tokio::task::spawn_blocking(move || for_disk.events.maintain()).await;
        }
    };
    let send = async {
        let mut backoff = FLUSH_EVERY;
        let mut retry_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(FLUSH_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
            if tokio::time::Instant::now() < retry_at {
                continue;
            }
            if flush(&pxe.events, &link, &shutdown).await {
                backoff = FLUSH_EVERY;
            } else {
                retry_at = tokio::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(backoff_max.max(FLUSH_EVERY));
            }
        }
    };
    tokio::join!(disk, send);
}

/// Sends what is queued, in batches, until the queue is empty, or a send fails for a reason
/// other than what the batch holds, or `stop` is cancelled. Nothing leaves the queue unless the
/// region answered for it, so cancelling this (dropping the future) loses nothing. Returns
/// whether everything was sent.
pub async fn flush(events: &EventQueue, link: &RegionLink, stop: &CancellationToken) -> bool {
    if events.is_empty() {
        return true;
    }
    let linked = link.current();
    flush_with(events, |body| linked.client.boot_events(&linked.authorization, body), stop).await
}

/// [`flush`] with the sending given, so the splitting can be tested without a region.
async fn flush_with<F, Fut>(events: &EventQueue, mut send: F, stop: &CancellationToken) -> bool
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(), RegionError>>,
{
    loop {
        let batch = events.peek_batch();
        if batch.is_empty() {
            return true;
        }
        let mut splitter = Splitter::new(batch.len());
        while let Some(part) = splitter.next() {
            let part = &batch[part];
            let body = batch_body(part);
            let sent = tokio::select! {
                sent = send(body) => sent,
                () = stop.cancelled() => return false,
            };
            let last_seq = part.last().expect("parts are not empty").0;
            match sent {
                Ok(()) => {
                    splitter.accepted();
                    events.remove_through(last_seq, Removal::Sent);
                }
                Err(e) if refused_for_content(&e) => {
                    if let Refused::Drop(_) = splitter.refused() {
                        tracing::warn!(
                            error = %error_chain(&e),
                            event = %part[0].1,
                            "the region refused a boot event; dropped it and sending the rest"
                        );
                        events.remove_through(last_seq, Removal::Refused);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %error_chain(&e), queued = events.len(), "boot events kept for later");
                    return false;
                }
            }
        }
    }
}

/// The JSON array of events, from their JSON as queued.
fn batch_body(events: &[(u64, String)]) -> String {
    let mut body = String::with_capacity(batch::body_bytes(events.iter().map(|(_, json)| json.len())));
    body.push('[');
    for (i, (_, json)) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(json);
    }
    body.push(']');
    debug_assert_eq!(body.len(), batch::body_bytes(events.iter().map(|(_, json)| json.len())));
    body
}

/// Whether the region refused a batch for what it holds, so that a part of it may be taken:
/// its own 400 or 422 (a region says why in JSON), or a 413 from it or a proxy on the way.
/// Anything else (a refused credential, a URL that is not a region, 5xx) is about the link, not
/// the events, and keeps them.
fn refused_for_content(error: &RegionError) -> bool {
    match error {
        RegionError::Refused { status, .. } => matches!(status.as_u16(), 400 | 413 | 422),
        RegionError::NotARegion { status, .. } => status.as_u16() == 413,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
