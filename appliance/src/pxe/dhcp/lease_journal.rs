//! Durable DHCP leases: each change is one line appended to a journal by a dedicated writer thread
//! with group commit (one fdatasync covers every change queued meanwhile), and the journal is
//! compacted into a snapshot when it grows. The DHCP loop never waits for the disk: it queues the
//! change and gets a [`Durable`] ticket, and sends the ACK once the ticket resolves.
//!
//! Files, in the data dir:
//! - `dhcp-leases.json`, the snapshot: `{"journal_seq": N, "leases": [...]}`, replaced atomically
//!   (temp file, fsync, rename, fsync dir). A bare JSON array of leases (the lease file before the
//!   journal existed) is read as a snapshot at sequence 0, so an existing lease file carries over.
//! - `dhcp-leases.journal`: the changes since the snapshot, one line each,
//!   `SEQ OP MAC ADDRESS EXPIRES_AT_MS CHECK`, OP being bind, release or decline and CHECK the first
//!   four bytes of the BLAKE3 of the rest of the line in hex, so a torn or damaged line is dropped,
//!   not misread.
//!
//! Invariants:
//! - A ticket resolves `Ok` only once its line is written and fdatasync'd, or a snapshot holding the
//!   change is durable; so an acknowledged lease survives a crash.
//! - Lines are appended only to a journal ending at a line boundary: every start rewrites the
//!   snapshot and empties the journal (dropping a torn last line), and after a failed append the
//!   writer commits by snapshot until one succeeds.
//! - Replay applies only records numbered above the snapshot's `journal_seq`, so a crash between
//!   a snapshot's rename and the journal's truncation applies nothing twice or out of order.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::leases::Lease;
use crate::data_dir::DataDir;

/// Changes queued for the writer at most (~150 bytes each with its ticket: ~600 KiB). A full queue
/// means the disk is slower than the clients: the change is not queued and its ACK not sent (the
/// client retries) rather than the DHCP loop waiting.
pub const JOURNAL_QUEUE_MAX: usize = 4096;

/// The journal is compacted into the snapshot once it holds this many records per live lease...
pub const COMPACT_RECORDS_PER_LEASE: usize = 4;

/// ...and at least this many (~70 bytes each: ~280 KiB), so that a small table is not rewritten
/// every few changes. With the default 4096 leases the journal stays under ~1.2 MiB.
pub const COMPACT_RECORDS_MIN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LeaseStoreError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot move the unreadable {path} aside")]
    MoveAside { path: PathBuf, source: std::io::Error },
    #[error("cannot write the lease snapshot {path}")]
    WriteSnapshot { path: PathBuf, source: std::io::Error },
    #[error("cannot open the lease journal {path}")]
    OpenJournal { path: PathBuf, source: std::io::Error },
    #[error("cannot empty the lease journal {path}")]
    TruncateJournal { path: PathBuf, source: std::io::Error },
    #[error("cannot start the lease journal writer")]
    Spawn { source: std::io::Error },
}

/// The change could not be made durable: its ACK must not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the lease change could not be written to disk")]
pub struct NotDurable;

/// The writer's queue is full (the disk is behind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the lease journal queue is full")]
pub struct QueueFull;

/// One change to the lease table. Each sets one MAC's whole state (bound to an address until a
/// time, or nothing), so the last record of a MAC decides its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Bind { mac: String, address: Ipv4Addr, expires_at_ms: i64 },
    Release { mac: String, address: Ipv4Addr },
    Decline { mac: String, address: Ipv4Addr },
}

impl Record {
    pub fn bind(lease: &Lease) -> Record {
        Record::Bind { mac: lease.mac.clone(), address: lease.address, expires_at_ms: lease.expires_at_ms }
    }

    fn apply(&self, leases: &mut BTreeMap<String, Lease>) {
        match self {
            Record::Bind { mac, address, expires_at_ms } => {
                let lease = Lease { mac: mac.clone(), address: *address, expires_at_ms: *expires_at_ms, bound: true };
                leases.insert(mac.clone(), lease);
            }
            Record::Release { mac, .. } | Record::Decline { mac, .. } => {
                leases.remove(mac);
            }
        }
    }

    /// Appends the record's line, numbered `seq`, to `out`.
    fn encode(&self, seq: u64, out: &mut Vec<u8>) {
        let (op, mac, address, expires_at_ms) = match self {
            Record::Bind { mac, address, expires_at_ms } => ("bind", mac, address, *expires_at_ms),
            Record::Release { mac, address } => ("release", mac, address, 0),
            Record::Decline { mac, address } => ("decline", mac, address, 0),
        };
        // MACs come from `classify` (hex and colons); a space would split the line's fields.
        debug_assert!(!mac.is_empty() && !mac.contains(char::is_whitespace), "MAC {mac:?}");
        let body = format!("{seq} {op} {mac} {address} {expires_at_ms}");
        let check = checksum(&body);
        out.extend_from_slice(format!("{body} {check:08x}\n").as_bytes());
    }

    /// A line (without its newline) back into its number and record; `None` if torn or damaged.
    fn parse(line: &str) -> Option<(u64, Record)> {
        let (body, check) = line.rsplit_once(' ')?;
        if check.len() != 8 || u32::from_str_radix(check, 16).ok()? != checksum(body) {
            return None;
        }
        let mut fields = body.split(' ');
        let seq = fields.next()?.parse().ok()?;
        let op = fields.next()?;
        let mac = fields.next()?.to_owned();
        let address = fields.next()?.parse().ok()?;
        let expires_at_ms = fields.next()?.parse().ok()?;
        if mac.is_empty() || fields.next().is_some() {
            return None;
        }
        let record = match op {
            "bind" => Record::Bind { mac, address, expires_at_ms },
            "release" => Record::Release { mac, address },
            "decline" => Record::Decline { mac, address },
            _ => return None,
        };
        Some((seq, record))
    }
}

fn checksum(body: &str) -> u32 {
    let hash = blake3::hash(body.as_bytes());
    let bytes = hash.as_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

#[derive(Serialize)]
struct SnapshotOut<'a> {
    /// The last record the snapshot holds; replay starts after it.
    journal_seq: u64,
    leases: Vec<&'a Lease>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SnapshotIn {
    Current {
        journal_seq: u64,
        leases: Vec<Lease>,
    },
    /// The lease file before the journal: all bound leases, no sequence.
    Legacy(Vec<Lease>),
}

/// What a start found on disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub snapshot_leases: usize,
    pub records_replayed: usize,
    /// Journal lines dropped as torn or damaged: only the last one, after a crash while it was
    /// written (its change was never acknowledged).
    pub lines_dropped: usize,
    pub last_line_dropped: bool,
}

struct Loaded {
    leases: BTreeMap<String, Lease>,
    /// The highest record number seen, in the snapshot or the journal.
    seq: u64,
    report: LoadReport,
}

/// Reads the snapshot and replays the journal over it.
fn load(snapshot_path: &Path, journal_path: &Path) -> Result<Loaded, LeaseStoreError> {
    let mut leases = BTreeMap::new();
    let mut snapshot_seq = 0;
    let mut report = LoadReport::default();
    match std::fs::read(snapshot_path) {
        Ok(bytes) => match serde_json::from_slice::<SnapshotIn>(&bytes) {
            Ok(SnapshotIn::Current { journal_seq, leases: stored }) => {
                snapshot_seq = journal_seq;
                leases.extend(stored.into_iter().map(|lease| (lease.mac.clone(), lease)));
            }
            Ok(SnapshotIn::Legacy(stored)) => {
                leases.extend(stored.into_iter().filter(|l| l.bound).map(|lease| (lease.mac.clone(), lease)));
            }
            Err(e) => {
                // The snapshot is replaced atomically, so this is not a crash's doing: keep the
                // file for a person to look at, and serve from the journal rather than not at all.
                let aside = snapshot_path.with_extension("json.damaged");
                tracing::error!(
                    error = %e,
                    path = %snapshot_path.display(),
                    aside = %aside.display(),
                    "DHCP lease snapshot unreadable; moved aside, starting from the journal alone"
                );
                std::fs::rename(snapshot_path, &aside)
                    .map_err(|source| LeaseStoreError::MoveAside { path: snapshot_path.to_owned(), source })?;
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(LeaseStoreError::Read { path: snapshot_path.to_owned(), source }),
    }
    report.snapshot_leases = leases.len();
    let mut seq = snapshot_seq;
    let bytes = match std::fs::read(journal_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(LeaseStoreError::Read { path: journal_path.to_owned(), source }),
    };
    // A line without its newline is torn even if it parses: the newline is written last.
    let mut lines = bytes.split_inclusive(|b| *b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let is_last = lines.peek().is_none();
        let record = line.strip_suffix(b"\n").and_then(|line| std::str::from_utf8(line).ok()).and_then(Record::parse);
        match record {
            Some((record_seq, record)) => {
                if record_seq > snapshot_seq {
                    record.apply(&mut leases);
                    report.records_replayed += 1;
                }
                seq = seq.max(record_seq);
            }
            None => {
                report.lines_dropped += 1;
                report.last_line_dropped = is_last;
            }
        }
    }
    if report.lines_dropped > 0 {
        tracing::warn!(
            lines_dropped = report.lines_dropped,
            last_line_dropped = report.last_line_dropped,
            path = %journal_path.display(),
            "DHCP lease journal: dropped unreadable lines (a crash while writing tears the last one; \
             its change was never acknowledged)"
        );
    }
    Ok(Loaded { leases, seq, report })
}

struct Queued {
    record: Record,
    ticket: Option<oneshot::Sender<Result<(), NotDurable>>>,
}

/// Resolves once the change it was issued for is durable, or could not be made so.
#[derive(Debug)]
#[must_use = "an ACK may be sent only once its lease is durable"]
pub struct Durable(oneshot::Receiver<Result<(), NotDurable>>);

impl Future for Durable {
    type Output = Result<(), NotDurable>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A writer that is gone without answering did not make the change durable.
        Pin::new(&mut self.0).poll(cx).map(|answer| answer.unwrap_or(Err(NotDurable)))
    }
}

impl Durable {
    /// Waits on this thread (for code outside the async runtime).
    pub fn wait_blocking(self) -> Result<(), NotDurable> {
        self.0.blocking_recv().unwrap_or(Err(NotDurable))
    }

    /// The answer if there is one yet.
    pub fn try_result(&mut self) -> Option<Result<(), NotDurable>> {
        match self.0.try_recv() {
            Ok(answer) => Some(answer),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(NotDurable)),
        }
    }
}

/// The lease store: what was on disk at start, and the queue to the writer thread. Dropping it
/// lets the writer finish what is queued, and waits for it.
#[derive(Debug)]
pub struct LeaseJournal {
    queue: Option<SyncSender<Queued>>,
    writer: Option<JoinHandle<()>>,
    loaded: Vec<Lease>,
    report: LoadReport,
    #[cfg(test)]
    stall: std::sync::Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued").field("record", &self.record).finish_non_exhaustive()
    }
}

impl LeaseJournal {
    /// Loads the leases in `dir` (snapshot, then the journal replayed over it), writes them back as
    /// a fresh snapshot with an empty journal, and starts the writer. Blocking: call it from a
    /// blocking context.
    pub fn open(data_dir: &DataDir) -> Result<LeaseJournal, LeaseStoreError> {
        LeaseJournal::open_with(data_dir, COMPACT_RECORDS_MIN)
    }

    fn open_with(data_dir: &DataDir, compact_records_min: usize) -> Result<LeaseJournal, LeaseStoreError> {
        let snapshot_path = data_dir.lease_snapshot();
        let journal_path = data_dir.lease_journal();
        let Loaded { leases, seq, report } = load(&snapshot_path, &journal_path)?;
        // Append mode: after the journal is emptied, writes go to its new end.
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .map_err(|source| LeaseStoreError::OpenJournal { path: journal_path.clone(), source })?;
        #[cfg(test)]
        let stall = std::sync::Arc::new(std::sync::Mutex::new(()));
        let mut writer = Writer {
            snapshot_path,
            journal_path,
            journal,
            leases,
            seq,
            records_in_journal: 0,
            compact_records_min,
            journal_clean: false,
            failing: false,
            lines: Vec::new(),
            #[cfg(test)]
            stall: stall.clone(),
        };
        // Start from an empty journal, so nothing is appended after a torn line. The snapshot's
        // directory sync also makes a just-created journal's name durable.
        writer.compact()?;
        let loaded: Vec<Lease> = writer.leases.values().cloned().collect();
        tracing::info!(
            leases = loaded.len(),
            records_replayed = report.records_replayed,
            lines_dropped = report.lines_dropped,
            "DHCP leases loaded"
        );
        let (sender, receiver) = mpsc::sync_channel(JOURNAL_QUEUE_MAX);
        let thread = std::thread::Builder::new()
            .name("dhcp-leases".into())
            .spawn(move || writer.run(receiver))
            .map_err(|source| LeaseStoreError::Spawn { source })?;
        Ok(LeaseJournal {
            queue: Some(sender),
            writer: Some(thread),
            loaded,
            report,
            #[cfg(test)]
            stall,
        })
    }

    /// The leases found at start (once; later calls get none).
    pub fn take_loaded(&mut self) -> Vec<Lease> {
        std::mem::take(&mut self.loaded)
    }

    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// Queues a change nobody waits for (a release or decline: if it is lost, the lease only
    /// comes back until its end).
    pub fn append(&self, record: Record) -> Result<(), QueueFull> {
        self.send(Queued { record, ticket: None })
    }

    /// Queues a change and returns the ticket that resolves once it is durable.
    pub fn append_durable(&self, record: Record) -> Result<Durable, QueueFull> {
        let (sender, receiver) = oneshot::channel();
        self.send(Queued { record, ticket: Some(sender) })?;
        Ok(Durable(receiver))
    }

    fn send(&self, queued: Queued) -> Result<(), QueueFull> {
        let Some(queue) = &self.queue else { return Err(QueueFull) };
        match queue.try_send(queued) {
            Ok(()) => Ok(()),
            // A writer that stopped (it only does when the queue closes) cannot take more either.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(QueueFull),
        }
    }

    /// While a test holds this lock the writer waits before its next commit, as on a slow disk.
    #[cfg(test)]
    pub(crate) fn stall(&self) -> std::sync::Arc<std::sync::Mutex<()>> {
        self.stall.clone()
    }
}

impl Drop for LeaseJournal {
    fn drop(&mut self) {
        // Closing the queue lets the writer commit what is queued and stop; waiting for it means
        // a restart within the process (tests, a reload) reads every change.
        drop(self.queue.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("the DHCP lease journal writer panicked");
            }
        }
    }
}

/// The writer thread's state: the files, and its own copy of the durable leases, from which it
/// writes snapshots without asking the DHCP loop for anything.
struct Writer {
    snapshot_path: PathBuf,
    journal_path: PathBuf,
    journal: File,
    leases: BTreeMap<String, Lease>,
    /// The number of the last record written, to the journal or in a snapshot.
    seq: u64,
    records_in_journal: usize,
    compact_records_min: usize,
    /// False while the journal may end in a torn line (an append or truncation failed): commits
    /// then go to the snapshot until one succeeds.
    journal_clean: bool,
    /// Whether the last commit failed, so that a failing disk is logged once, not per batch.
    failing: bool,
    /// The batch's lines, reused.
    lines: Vec<u8>,
    #[cfg(test)]
    stall: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Writer {
    fn run(mut self, queue: Receiver<Queued>) {
        let mut batch = Vec::new();
        while let Ok(first) = queue.recv() {
            // Group commit: what queued up during the last fdatasync goes out under the next one.
            batch.push(first);
            batch.extend(queue.try_iter().take(JOURNAL_QUEUE_MAX));
            #[cfg(test)]
            let stall = self.stall.clone();
            #[cfg(test)]
            let _stalled = stall.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let result = self.commit(&batch);
            for queued in batch.drain(..) {
                if let Some(ticket) = queued.ticket {
                    // The DHCP loop may have stopped waiting (shutdown): nothing to tell then.
                    let _ = ticket.send(result);
                }
            }
            let compact_at = self.compact_records_min.max(COMPACT_RECORDS_PER_LEASE * self.leases.len());
            if result.is_ok() && self.records_in_journal >= compact_at {
                if let Err(e) = self.compact() {
                    tracing::warn!(
                        error = %metalrack_image_tools::error_chain(&e),
                        "cannot compact the DHCP lease journal; it grows until a compaction succeeds"
                    );
                }
            }
        }
    }

    fn commit(&mut self, batch: &[Queued]) -> Result<(), NotDurable> {
        self.lines.clear();
        for queued in batch {
            self.seq += 1;
            queued.record.encode(self.seq, &mut self.lines);
            queued.record.apply(&mut self.leases);
        }
        if self.journal_clean {
            match self.journal.write_all(&self.lines).and_then(|()| self.journal.sync_data()) {
                Ok(()) => {
                    self.records_in_journal += batch.len();
                    self.recovered();
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        path = %self.journal_path.display(),
                        "cannot append to the DHCP lease journal; writing a snapshot instead"
                    );
                    self.journal_clean = false;
                }
            }
        }
        // The journal may end in a torn line: a snapshot, which holds this batch too, replaces it.
        match self.compact() {
            Ok(()) => {
                self.recovered();
                Ok(())
            }
            Err(e) => {
                if !self.failing {
                    tracing::error!(
                        error = %metalrack_image_tools::error_chain(&e),
                        "DHCP leases cannot be saved; no lease is acknowledged until they can"
                    );
                }
                self.failing = true;
                Err(NotDurable)
            }
        }
    }

    fn recovered(&mut self) {
        if self.failing {
            tracing::info!("DHCP leases are saved again");
        }
        self.failing = false;
    }

    /// Writes every live lease to a new snapshot, then empties the journal.
    fn compact(&mut self) -> Result<(), LeaseStoreError> {
        let now = crate::status::now_ms();
        self.leases.retain(|_, lease| lease.expires_at_ms > now);
        let snapshot = SnapshotOut { journal_seq: self.seq, leases: self.leases.values().collect() };
        let write_error = |source| LeaseStoreError::WriteSnapshot { path: self.snapshot_path.clone(), source };
        let json = serde_json::to_vec_pretty(&snapshot).map_err(|e| write_error(std::io::Error::other(e)))?;
        metalrack_image_tools::private_file::write_private_file(&self.snapshot_path, &json).map_err(write_error)?;
        // The helper syncs the directory but ignores a failure; here it matters: the journal is
        // emptied next, so a rename that is not durable would lose acknowledged leases.
        let dir = self.snapshot_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir).and_then(|dir| dir.sync_all()).map_err(write_error)?;
        // Until the truncation is durable the journal holds records the snapshot has (replay
        // skips them by number) and maybe a torn line: nothing is appended to it meanwhile.
        self.journal_clean = false;
        self.journal
            .set_len(0)
            .and_then(|()| self.journal.sync_all())
            .map_err(|source| LeaseStoreError::TruncateJournal { path: self.journal_path.clone(), source })?;
        self.journal_clean = true;
        self.records_in_journal = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAR: i64 = i64::MAX / 2;

    fn bind(i: u32, expires_at_ms: i64) -> Record {
        Record::Bind { mac: mac(i), address: Ipv4Addr::from(0x0a63_0000 + i), expires_at_ms }
    }

    fn mac(i: u32) -> String {
        format!("02:00:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff)
    }

    fn on_disk(dir: &Path) -> Loaded {
        load(&DataDir::new(dir).lease_snapshot(), &DataDir::new(dir).lease_journal()).unwrap()
    }

    fn journal_lines(dir: &Path) -> usize {
        std::fs::read(DataDir::new(dir).lease_journal()).unwrap().iter().filter(|b| **b == b'\n').count()
    }

    #[test]
    fn record_lines_round_trip_and_damage_is_detected() {
        for record in [bind(7, 1_700_000_000_000), Record::Release { mac: mac(7), address: Ipv4Addr::new(10, 0, 0, 7) }]
        {
            let mut line = Vec::new();
            record.encode(42, &mut line);
            let text = std::str::from_utf8(&line).unwrap().strip_suffix('\n').unwrap();
            assert_eq!(Record::parse(text), Some((42, record.clone())));
            for cut in 1..text.len() {
                assert_eq!(Record::parse(&text[..cut]), None, "{:?}", &text[..cut]);
            }
            let flipped = text.replacen("02:", "03:", 1);
            assert_eq!(Record::parse(&flipped), None);
        }
    }

    #[test]
    fn restart_after_many_binds_reloads_snapshot_and_journal() {
        let dir = tempfile::tempdir().unwrap();
        let mut expected = BTreeMap::new();
        {
            let journal = LeaseJournal::open_with(&DataDir::new(dir.path()), 100).unwrap();
            let mut tickets = Vec::new();
            // Enough rounds that the journal is compacted on the way and holds records after it.
            for round in 0..5i64 {
                for i in 0..250 {
                    let record = if (i + round as u32).is_multiple_of(7) {
                        Record::Release { mac: mac(i), address: Ipv4Addr::UNSPECIFIED }
                    } else {
                        bind(i, FAR + round * 1000 + i64::from(i))
                    };
                    record.apply(&mut expected);
                    tickets.push(journal.append_durable(record).unwrap());
                    // Small batches, so that where compaction falls does not depend on timing.
                    if tickets.len() == 10 {
                        for ticket in tickets.drain(..) {
                            assert_eq!(ticket.wait_blocking(), Ok(()));
                        }
                    }
                }
            }
        }
        let on_disk = on_disk(dir.path());
        assert!(on_disk.report.snapshot_leases > 0 && on_disk.report.records_replayed > 0, "{:?}", on_disk.report);
        let mut reopened = LeaseJournal::open_with(&DataDir::new(dir.path()), 100).unwrap();
        assert_eq!(reopened.report().lines_dropped, 0);
        let loaded: BTreeMap<String, Lease> = reopened.take_loaded().into_iter().map(|l| (l.mac.clone(), l)).collect();
        assert_eq!(loaded, expected);
        assert_eq!(journal_lines(dir.path()), 0, "a start begins with an empty journal");
    }

    #[test]
    fn torn_journal_tail_is_dropped_counted_and_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let journal = LeaseJournal::open(&DataDir::new(dir.path())).unwrap();
            for i in 0..5 {
                journal.append_durable(bind(i, FAR)).unwrap().wait_blocking().unwrap();
            }
        }
        // A crash while the sixth line was being written.
        let mut line = Vec::new();
        bind(5, FAR).encode(6, &mut line);
        let mut file = OpenOptions::new().append(true).open(DataDir::new(dir.path()).lease_journal()).unwrap();
        file.write_all(&line[..line.len() / 2]).unwrap();
        drop(file);

        let mut journal = LeaseJournal::open(&DataDir::new(dir.path())).unwrap();
        assert_eq!(
            journal.report(),
            &LoadReport { snapshot_leases: 0, records_replayed: 5, lines_dropped: 1, last_line_dropped: true }
        );
        assert_eq!(journal.take_loaded().len(), 5);
        // The torn bytes are gone, so new lines are whole.
        journal.append_durable(bind(6, FAR)).unwrap().wait_blocking().unwrap();
        drop(journal);
        let on_disk = on_disk(dir.path());
        assert_eq!(on_disk.report.lines_dropped, 0);
        assert_eq!(on_disk.leases.len(), 6);
    }

    #[test]
    fn compaction_keeps_every_live_lease() {
        let dir = tempfile::tempdir().unwrap();
        let journal = LeaseJournal::open_with(&DataDir::new(dir.path()), 8).unwrap();
        let mut expected = BTreeMap::new();
        let now = crate::status::now_ms();
        for i in 0..300u32 {
            let record = match i % 5 {
                // Already ended: compaction may drop these.
                0 => bind(i % 40, now - 1),
                1 => Record::Decline { mac: mac(i % 40), address: Ipv4Addr::UNSPECIFIED },
                _ => bind(i % 40, FAR + i64::from(i)),
            };
            record.apply(&mut expected);
            journal.append_durable(record).unwrap().wait_blocking().unwrap();
        }
        expected.retain(|_, lease: &mut Lease| lease.expires_at_ms > now);
        // Read while the journal is open, as after a crash.
        let on_disk = on_disk(dir.path());
        assert!(journal_lines(dir.path()) < 300, "compacted");
        let mut live = on_disk.leases;
        live.retain(|_, lease| lease.expires_at_ms > now);
        assert_eq!(live, expected);
        assert!(on_disk.report.snapshot_leases > 0);
    }

    #[test]
    fn replay_skips_records_the_snapshot_holds() {
        // A crash between a snapshot's rename and the journal's truncation: the journal still
        // holds records 1..=3, which the snapshot (at 3) includes; 4 came after.
        let dir = tempfile::tempdir().unwrap();
        let snapshot = r#"{"journal_seq": 3, "leases": [
            {"mac": "02:00:00:00:00:01", "address": "10.99.0.1", "expires_at_ms": 9000000000000, "bound": true}]}"#;
        std::fs::write(DataDir::new(dir.path()).lease_snapshot(), snapshot).unwrap();
        let mut lines = Vec::new();
        bind(1, 8_000_000_000_000).encode(2, &mut lines);
        bind(2, FAR).encode(3, &mut lines);
        Record::Release { mac: mac(2), address: Ipv4Addr::UNSPECIFIED }.encode(4, &mut lines);
        bind(3, FAR).encode(5, &mut lines);
        std::fs::write(DataDir::new(dir.path()).lease_journal(), lines).unwrap();
        let loaded = on_disk(dir.path());
        assert_eq!(loaded.leases.len(), 2);
        assert_eq!(loaded.leases[&mac(1)].expires_at_ms, 9_000_000_000_000, "the older record is not replayed");
        assert!(loaded.leases.contains_key(&mac(3)));
        assert_eq!(loaded.seq, 5);
        assert_eq!(loaded.report.records_replayed, 2);
    }

    #[test]
    fn lease_file_from_before_the_journal_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = r#"[
            {"mac": "52:54:00:aa:bb:01", "address": "10.99.0.100", "expires_at_ms": 9000000000000, "bound": true}]"#;
        std::fs::write(DataDir::new(dir.path()).lease_snapshot(), legacy).unwrap();
        let mut journal = LeaseJournal::open(&DataDir::new(dir.path())).unwrap();
        assert_eq!(journal.take_loaded()[0].address, Ipv4Addr::new(10, 99, 0, 100));
        drop(journal);
        let text = std::fs::read_to_string(DataDir::new(dir.path()).lease_snapshot()).unwrap();
        assert!(text.contains("journal_seq"), "rewritten in the current format: {text}");
    }

    #[test]
    fn ticket_resolves_only_once_the_record_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let journal = LeaseJournal::open(&DataDir::new(dir.path())).unwrap();
        let stall = journal.stall();
        let stalled = stall.lock().unwrap();
        let mut ticket = journal.append_durable(bind(1, FAR)).unwrap();
        // A slow disk: the change is queued, not written, and the ticket does not resolve.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(ticket.try_result(), None);
        assert!(on_disk(dir.path()).leases.is_empty());
        drop(stalled);
        assert_eq!(ticket.wait_blocking(), Ok(()));
        // Read while the journal is still open, as after a crash right after the ACK.
        assert_eq!(on_disk(dir.path()).leases[&mac(1)].expires_at_ms, FAR);
    }

    #[test]
    fn a_full_queue_refuses_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let journal = LeaseJournal::open(&DataDir::new(dir.path())).unwrap();
        let stall = journal.stall();
        let stalled = stall.lock().unwrap();
        let refused = (0..3 * JOURNAL_QUEUE_MAX as u32).find(|i| journal.append(bind(*i, FAR)).is_err());
        assert!(refused.is_some());
        drop(stalled);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let ticket = loop {
            match journal.append_durable(bind(0, FAR)) {
                Ok(ticket) => break ticket,
                Err(QueueFull) => assert!(std::time::Instant::now() < deadline, "the queue never drained"),
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(ticket.wait_blocking(), Ok(()));
    }
}
