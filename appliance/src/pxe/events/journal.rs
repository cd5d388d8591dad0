//! The boot event queue on disk (`DATA/boot-events.journal`), so events queued while the region
//! is away survive a rack restart. Modelled on the DHCP lease journal: one line per record, each
//! ending in a checksum, so a torn or damaged line is dropped, not misread.
//!
//! Lines, each `BODY CHECK` (CHECK the first four bytes of the BLAKE3 of BODY, in hex):
//! - `queue QUEUE_ID NEXT_SEQ`: first, once: the queue's id (`BootEvent::queue_id`) and the
//!   number the next event gets, so numbers are never reused, even with nothing queued.
//! - `event JSON`: an event, as the JSON sent to the region (it holds its own `seq`).
//! - `gone SEQ`: every event numbered up to SEQ left the queue (the region took it, refused it,
//!   or it was dropped for room).
//!
//! Invariants:
//! - Events are appended in `seq` order and leave from the front, so the file read in order,
//!   less what a `gone` covers, is the queue.
//! - Lines are appended only to a file ending at a line boundary: every start, and every
//!   compaction, writes the live queue to a new file (temp file, fsync, rename, fsync dir) and
//!   appends after that; after a failed append nothing is appended until such a rewrite succeeds.
//! - A compaction writes and syncs the new file without the queue's lock ([`write_rewrite`]);
//!   what was appended to the old file meanwhile is carried over, in order, when the new one is
//!   put in its place under the lock ([`Journal::install`]), so the two hold the same queue.
//! - A crash loses at most what was appended since the last fdatasync (the flush task syncs each
//!   second); a process crash alone loses nothing, the writes being in the page cache.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use metalrack_api::machines::{BootEvent, BOOT_EVENT_QUEUE_ID_END};

#[derive(Debug, thiserror::Error)]
pub enum EventJournalError {
    #[error("cannot read the boot event queue {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot move the unreadable boot event queue {path} aside")]
    MoveAside { path: PathBuf, source: std::io::Error },
    #[error("cannot write the boot event queue {path}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Queue { queue_id: u64, next_seq: u64 },
    Event(String),
    Gone { through_seq: u64 },
}

impl Record {
    /// Appends the record's line to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let body = match self {
            Record::Queue { queue_id, next_seq } => format!("queue {queue_id} {next_seq}"),
            // serde_json escapes every control character, so the JSON holds no newline.
            Record::Event(json) => format!("event {json}"),
            Record::Gone { through_seq } => format!("gone {through_seq}"),
        };
        debug_assert!(!body.contains('\n'));
        let check = checksum(&body);
        out.extend_from_slice(format!("{body} {check:08x}\n").as_bytes());
    }

    /// A line (without its newline) back into its record; `None` if torn or damaged.
    pub fn parse(line: &str) -> Option<Record> {
        let (body, check) = line.rsplit_once(' ')?;
        if check.len() != 8 || u32::from_str_radix(check, 16).ok()? != checksum(body) {
            return None;
        }
        let (tag, rest) = body.split_once(' ')?;
        match tag {
            "queue" => {
                let (queue_id, next_seq) = rest.split_once(' ')?;
                Some(Record::Queue { queue_id: queue_id.parse().ok()?, next_seq: next_seq.parse().ok()? })
            }
            "event" => Some(Record::Event(rest.to_owned())),
            "gone" => Some(Record::Gone { through_seq: rest.parse().ok()? }),
            _ => None,
        }
    }
}

/// The length of an event's line: `event `, its JSON, ` ` and eight hex digits, and `\n`.
pub fn event_line_len(json_len: usize) -> usize {
    "event ".len() + json_len + 1 + 8 + 1
}

fn checksum(body: &str) -> u32 {
    let hash = blake3::hash(body.as_bytes());
    let bytes = hash.as_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// What a start found on disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Lines dropped as torn or damaged (a crash while the last one was written tears it).
    pub lines_dropped: usize,
    pub last_line_dropped: bool,
    /// The file had no readable `queue` line first: it was moved aside and a new queue begun.
    pub moved_aside: bool,
}

/// The queue as read from disk: its id, the next number, and the events still queued, in order.
#[derive(Debug)]
pub struct Loaded {
    pub queue_id: u64,
    pub next_seq: u64,
    pub events: Vec<BootEvent>,
    pub report: LoadReport,
}

/// A new queue's id: random, so a rack whose file was lost does not reuse its old ids.
pub fn new_queue_id() -> u64 {
    rand::random_range(1..BOOT_EVENT_QUEUE_ID_END)
}

/// Reads the queue in `path`; a missing file is a new, empty queue.
pub fn load(path: &Path) -> Result<Loaded, EventJournalError> {
    let new_queue = |report| Loaded { queue_id: new_queue_id(), next_seq: 1, events: Vec::new(), report };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(new_queue(LoadReport::default())),
        Err(source) => return Err(EventJournalError::Read { path: path.to_owned(), source }),
    };
    // A line without its newline is torn even if it parses: the newline is written last.
    let mut lines = bytes
        .split_inclusive(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\n").and_then(|line| std::str::from_utf8(line).ok()).and_then(Record::parse))
        .peekable();
    let Some(Some(Record::Queue { queue_id, next_seq })) = lines.next() else {
        // The first line is written only by a rewrite (rename), so this is not a crash's doing:
        // keep the file for a person to look at and start a new queue rather than not at all.
        let aside = path.with_extension("journal.damaged");
        tracing::error!(path = %path.display(), aside = %aside.display(), "boot event queue unreadable; moved aside, starting a new queue");
        std::fs::rename(path, &aside)
            .map_err(|source| EventJournalError::MoveAside { path: path.to_owned(), source })?;
        return Ok(new_queue(LoadReport { moved_aside: true, ..LoadReport::default() }));
    };
    let mut loaded = Loaded { queue_id, next_seq, events: Vec::new(), report: LoadReport::default() };
    let mut gone_through = 0;
    while let Some(record) = lines.next() {
        let is_last = lines.peek().is_none();
        let event = match record {
            Some(Record::Event(json)) => serde_json::from_str::<BootEvent>(&json).ok(),
            Some(Record::Gone { through_seq }) => {
                gone_through = gone_through.max(through_seq);
                continue;
            }
            Some(Record::Queue { .. }) | None => None,
        };
        match event {
            Some(event) => {
                loaded.next_seq = loaded.next_seq.max(event.seq + 1);
                loaded.events.push(event);
            }
            None => {
                loaded.report.lines_dropped += 1;
                loaded.report.last_line_dropped = is_last;
            }
        }
    }
    loaded.events.retain(|event| event.seq > gone_through);
    loaded.next_seq = loaded.next_seq.max(gone_through + 1);
    if loaded.report.lines_dropped > 0 {
        tracing::warn!(
            lines_dropped = loaded.report.lines_dropped,
            last_line_dropped = loaded.report.last_line_dropped,
            path = %path.display(),
            "boot event queue: dropped unreadable lines (a crash while writing tears the last one)"
        );
    }
    Ok(loaded)
}

/// The open file: appends, and rewrites it whole.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// Shared with a sync in progress ([`Journal::begin_sync`]).
    file: Arc<File>,
    /// Bytes in the file, live or not: a rewrite is due when most are not.
    pub file_bytes: u64,
    /// False while the file may end in a torn line (an append failed) or has reached its bound
    /// ([`Journal::stop_appending`]): nothing is appended until a rewrite succeeds.
    pub clean: bool,
    /// Appended to since the last fdatasync.
    dirty: bool,
    /// Whether the last write failed, so that a failing disk is logged once, not per event.
    failing: bool,
}

impl Journal {
    /// Writes `lines` (a `queue` line and the live events) as the whole file, atomically, and
    /// opens it for appending. Blocking.
    pub fn create(path: &Path, lines: &[u8]) -> Result<Journal, EventJournalError> {
        write_whole(path, lines)?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|source| EventJournalError::Write { path: path.to_owned(), source })?;
        Ok(Journal {
            path: path.to_owned(),
            file: Arc::new(file),
            file_bytes: lines.len() as u64,
            clean: true,
            dirty: false,
            failing: false,
        })
    }

    /// Appends whole lines; on failure the file may end torn, so later appends wait for a rewrite.
    pub fn append(&mut self, lines: &[u8]) {
        if !self.clean {
            return;
        }
        match (&*self.file).write_all(lines) {
            Ok(()) => {
                self.file_bytes += lines.len() as u64;
                self.dirty = true;
            }
            Err(e) => {
                self.clean = false;
                self.note_failure(&e);
            }
        }
    }

    /// Makes what was appended durable (one fdatasync), if anything was.
    pub fn sync(&mut self) {
        if let Some(pending) = self.begin_sync() {
            let result = pending.file.sync_data();
            self.finish_sync(pending, result);
        }
    }

    /// The file to fdatasync, if anything was appended since the last sync, for a caller that
    /// syncs it without holding the journal (the queue's lock): an event recorded meanwhile
    /// need not wait for the disk. Counts as synced from now; an append after this is synced
    /// next time. Pass the result to [`Journal::finish_sync`].
    pub fn begin_sync(&mut self) -> Option<PendingSync> {
        if !(self.dirty && self.clean) {
            return None;
        }
        self.dirty = false;
        Some(PendingSync { file: self.file.clone() })
    }

    /// A failed sync leaves the file unclean (rewritten next tick), unless the file was
    /// rewritten meanwhile: the new one was synced whole.
    pub fn finish_sync(&mut self, pending: PendingSync, result: std::io::Result<()>) {
        if let Err(e) = result {
            if Arc::ptr_eq(&pending.file, &self.file) {
                self.clean = false;
                self.note_failure(&e);
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends nothing more until a rewrite: the file has reached its bound. The events stay
    /// queued in memory and the next rewrite writes them.
    pub fn stop_appending(&mut self) {
        self.clean = false;
    }

    /// Puts a rewrite in place (the quick half, under the queue's lock): appends `carry`, what
    /// was appended to the old file since the rewrite's lines were taken, renames the new file
    /// over the old one and appends to it from now on. On failure (of the write begun without
    /// the lock, or of this) the old file stays, the temp file goes, and the failure is logged
    /// once. The caller syncs the directory afterwards ([`sync_dir`]). Returns whether the new
    /// file is in place.
    pub fn install(&mut self, rewrite: Result<Rewrite, EventJournalError>, carry: &[u8]) -> bool {
        let result = rewrite.and_then(|mut rewrite| {
            let error = |source| EventJournalError::Write { path: self.path.clone(), source };
            let placed = rewrite.file.write_all(carry).and_then(|()| std::fs::rename(&rewrite.temp, &self.path));
            if let Err(source) = placed {
                let _ = std::fs::remove_file(&rewrite.temp);
                return Err(error(source));
            }
            rewrite.bytes += carry.len() as u64;
            Ok(rewrite)
        });
        match result {
            Ok(rewrite) => {
                if self.failing {
                    tracing::info!(path = %self.path.display(), "the boot event queue is saved again");
                }
                *self = Journal {
                    path: self.path.clone(),
                    file: Arc::new(rewrite.file),
                    file_bytes: rewrite.bytes,
                    clean: true,
                    // The carried lines are synced with the next tick, like any append.
                    dirty: !carry.is_empty(),
                    failing: false,
                };
                true
            }
            Err(e) => {
                if !self.failing {
                    tracing::error!(error = %metalrack_image_tools::error_chain(&e), "cannot save the boot event queue; it is kept in memory until a rewrite succeeds");
                }
                self.failing = true;
                false
            }
        }
    }

    fn note_failure(&mut self, error: &std::io::Error) {
        if !self.failing {
            tracing::error!(%error, path = %self.path.display(), "cannot append to the boot event queue; it is kept in memory until a rewrite succeeds");
        }
        self.failing = true;
    }
}

/// A sync begun by [`Journal::begin_sync`]: the file, shared.
#[derive(Debug)]
pub struct PendingSync {
    pub file: Arc<File>,
}

/// A new file for the journal at `path`, written and synced beside it, not yet in its place.
#[derive(Debug)]
pub struct Rewrite {
    temp: PathBuf,
    /// Open for writing, at its end.
    file: File,
    bytes: u64,
}

/// Writes `lines` (a `queue` line and the live events) to a temp file beside `path` and syncs
/// it: the slow half of a rewrite, which needs no lock. Blocking: ~10 ms for a full queue, more
/// behind a busy disk.
pub fn write_rewrite(path: &Path, lines: &[u8]) -> Result<Rewrite, EventJournalError> {
    let error = |source| EventJournalError::Write { path: path.to_owned(), source };
    let temp = path.with_extension("journal.tmp");
    let mut file = File::create(&temp).map_err(error)?;
    file.write_all(lines).and_then(|()| file.sync_all()).map_err(error)?;
    Ok(Rewrite { temp, file, bytes: lines.len() as u64 })
}

impl Rewrite {
    /// Gives the rewrite up: its temp file goes.
    pub fn discard(self) {
        drop(self.file);
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// Syncs the directory of `path`, so a rename into it survives a power cut.
pub fn sync_dir(path: &Path) -> Result<(), EventJournalError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| EventJournalError::Write { path: path.to_owned(), source })
}

/// Temp file, fsync, rename, fsync of the directory: the file is the old one or the new one.
fn write_whole(path: &Path, lines: &[u8]) -> Result<(), EventJournalError> {
    let rewrite = write_rewrite(path, lines)?;
    drop(rewrite.file);
    std::fs::rename(&rewrite.temp, path)
        .map_err(|source| EventJournalError::Write { path: path.to_owned(), source })?;
    sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_lines_round_trip_and_damage_is_detected() {
        let event =
            r#"{"queue_id":7,"seq":42,"at_ms":1,"mac":"52:54:00:aa:bb:01","kind":"boot.tftp","message":"a b\nc"}"#;
        for record in [
            Record::Queue { queue_id: 7, next_seq: 43 },
            Record::Event(event.to_owned()),
            Record::Gone { through_seq: 41 },
        ] {
            let mut line = Vec::new();
            record.encode(&mut line);
            let text = std::str::from_utf8(&line).unwrap().strip_suffix('\n').unwrap();
            assert!(!text.contains('\n'));
            assert_eq!(Record::parse(text), Some(record.clone()));
            for cut in 1..text.len() {
                assert_eq!(Record::parse(&text[..cut]), None, "{:?}", &text[..cut]);
            }
            assert_eq!(Record::parse(&text.replacen('4', "5", 1)), None);
        }
        let mut line = Vec::new();
        Record::Event(event.to_owned()).encode(&mut line);
        assert_eq!(line.len(), event_line_len(event.len()));
    }
}
