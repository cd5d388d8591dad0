//! The queue on disk (restart, torn tail, bounds) and the sending (batches, splitting, keeping
//! on failure) against a pretend region: no network.

use std::io::Write;
use std::sync::Mutex;

use metalrack_api::machines::{BOOT_EVENTS_BATCH_BYTES_MAX, BOOT_EVENTS_PER_REQUEST_MAX};
use reqwest::StatusCode;

use super::*;

fn open(dir: &std::path::Path) -> (EventQueue, EventCounters) {
    let counters = EventCounters::default();
    (EventQueue::open(&DataDir::new(dir), counters.clone()).unwrap(), counters)
}

fn dropped(counters: &EventCounters, kind: &str) -> u64 {
    counters.dropped.get_or_create(&KindLabel { kind: kind.to_owned() }).get()
}

fn push_n(queue: &EventQueue, range: std::ops::Range<usize>) {
    for i in range {
        queue.push("52:54:00:aa:bb:01", "boot.tftp", format!("event {i}"));
    }
}

/// A ~1 KiB event numbered `i`.
fn push_large(queue: &EventQueue, i: usize) {
    queue.push("52:54:00:aa:bb:01", "boot.refused", format!("{i:>1000}"));
}

/// A queue whose file is due for a rewrite (20,000 events queued, the first 19,990 taken by the
/// region), its file's path and size.
fn queue_due_for_a_rewrite(dir: &std::path::Path) -> (Arc<EventQueue>, std::path::PathBuf, u64) {
    let (queue, _) = open(dir);
    push_n(&queue, 0..20_000);
    queue.remove_through(19_990, Removal::Sent);
    let path = DataDir::new(dir).boot_events();
    let before = std::fs::metadata(&path).unwrap().len();
    (Arc::new(queue), path, before)
}

fn messages(queue: &EventQueue) -> Vec<String> {
    queue.snapshot().into_iter().map(|e| e.message).collect()
}

fn expected(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("event {i}")).collect()
}

fn refused(status: u16) -> RegionError {
    RegionError::Refused {
        url: "http://region/MAAS".into(),
        status: StatusCode::from_u16(status).unwrap(),
        message: "no".into(),
        code: None,
    }
}

#[test]
fn a_restart_keeps_the_queue_in_order_and_numbers_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _) = open(dir.path());
    push_n(&queue, 0..1000);
    let first = queue.snapshot();
    let queue_id = first[0].queue_id;
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=1000).collect::<Vec<_>>());
    // The region took the first 300 (a `gone` line), the tick synced.
    queue.remove_through(300, Removal::Sent);
    queue.maintain();
    drop(queue);

    let (queue, _) = open(dir.path());
    assert_eq!(messages(&queue), expected(300..1000));
    push_n(&queue, 1000..1001);
    let last = queue.snapshot().pop().unwrap();
    assert_eq!((last.queue_id, last.seq), (queue_id, 1001), "same queue, next number");
    // Everything sent: an empty queue still remembers its numbers.
    queue.remove_through(1001, Removal::Sent);
    queue.maintain();
    drop(queue);
    let (queue, _) = open(dir.path());
    assert!(queue.is_empty());
    push_n(&queue, 0..1);
    assert_eq!(queue.snapshot()[0].seq, 1002);
}

#[test]
fn a_torn_last_line_is_dropped_counted_and_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _) = open(dir.path());
    push_n(&queue, 0..5);
    drop(queue);
    // A crash while a sixth event was being written.
    let path = DataDir::new(dir.path()).boot_events();
    let mut line = Vec::new();
    Record::Event(r#"{"queue_id":1,"seq":6,"at_ms":0,"mac":"m","kind":"boot.tftp","message":"event 5"}"#.into())
        .encode(&mut line);
    let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(&line[..line.len() / 2]).unwrap();
    drop(file);

    let (queue, counters) = open(dir.path());
    assert_eq!(messages(&queue), expected(0..5));
    assert_eq!(dropped(&counters, "unreadable"), 1);
    // The torn bytes are gone: a new event is a whole line, read back after another restart.
    push_n(&queue, 5..6);
    drop(queue);
    let (queue, counters) = open(dir.path());
    assert_eq!(messages(&queue), expected(0..6));
    assert_eq!(dropped(&counters, "unreadable"), 0);
}

#[test]
fn a_damaged_file_is_moved_aside_and_a_new_queue_begun() {
    let dir = tempfile::tempdir().unwrap();
    let path = DataDir::new(dir.path()).boot_events();
    std::fs::write(&path, b"not a queue\n").unwrap();
    let (queue, _) = open(dir.path());
    assert!(queue.is_empty());
    assert!(path.with_extension("journal.damaged").exists());
}

#[test]
fn the_count_bound_drops_the_oldest_and_counts_them_also_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, counters) = open(dir.path());
    push_n(&queue, 0..BOOT_EVENTS_QUEUED_MAX + 10);
    assert_eq!(queue.len(), BOOT_EVENTS_QUEUED_MAX);
    assert_eq!(dropped(&counters, "queue_full"), 10);
    assert_eq!(counters.queued.get(), BOOT_EVENTS_QUEUED_MAX as i64);
    let file_bytes = std::fs::metadata(DataDir::new(dir.path()).boot_events()).unwrap().len();
    assert!(file_bytes <= FILE_BYTES_MAX, "{file_bytes}");
    queue.maintain();
    drop(queue);
    let (queue, counters) = open(dir.path());
    assert_eq!(queue.len(), BOOT_EVENTS_QUEUED_MAX);
    assert_eq!(dropped(&counters, "queue_full"), 0, "the drops were on disk already");
    let events = queue.snapshot();
    assert_eq!(events[0].message, "event 10");
    assert_eq!(events.last().unwrap().message, format!("event {}", BOOT_EVENTS_QUEUED_MAX + 9));
}

#[test]
fn the_byte_bound_holds_for_large_events_and_the_file_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, counters) = open(dir.path());
    let path = DataDir::new(dir.path()).boot_events();
    let mut file_bytes_max = 0;
    // ~1 KiB events: the byte bound binds long before the count bound, and keeps binding while
    // the queue turns over twice (with no tick to rewrite the file).
    let n = 3 * BOOT_EVENTS_QUEUED_BYTES_MAX / 1024;
    for i in 0..n {
        push_large(&queue, i);
        if i % 512 == 0 {
            file_bytes_max = file_bytes_max.max(std::fs::metadata(&path).unwrap().len());
        }
    }
    let state = queue.state.lock().unwrap();
    assert!(state.bytes <= BOOT_EVENTS_QUEUED_BYTES_MAX);
    assert!(state.bytes > BOOT_EVENTS_QUEUED_BYTES_MAX - 2048, "filled up to the bound: {}", state.bytes);
    let kept = state.events.len();
    drop(state);
    assert_eq!(dropped(&counters, "queue_full") as usize, n - kept);
    assert!(file_bytes_max <= FILE_BYTES_MAX, "{file_bytes_max}");
    assert_eq!(queue.snapshot().last().unwrap().message.trim(), (n - 1).to_string());
}

#[test]
fn fields_are_cut_to_the_wire_lengths_when_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, counters) = open(dir.path());
    let name = "é".repeat(600);
    queue.push(&"m".repeat(100), "boot.refused", format!("TFTP {name} refused: no such file"));
    queue.push("52:54:00:aa:bb:01", "boot.tftp", "short".into());
    let events = queue.snapshot();
    let event = &events[0];
    assert!(event.message.len() <= BOOT_EVENT_MESSAGE_BYTES_MAX && event.message.ends_with(TRUNCATION_MARK));
    assert!(event.message.starts_with("TFTP éé"));
    assert_eq!(event.mac.len(), BOOT_EVENT_MAC_BYTES_MAX);
    assert_eq!(events[1].message, "short");
    assert_eq!(counters.truncated.get(), 1);
}

/// A pretend region: records what it took, refuses by a rule, and checks every body is within
/// the wire's bounds.
#[derive(Default)]
struct Region {
    took: Mutex<Vec<BootEvent>>,
    requests: Mutex<usize>,
}

impl Region {
    fn send(&self, body: &str, answer: impl Fn(&[BootEvent]) -> Result<(), RegionError>) -> Result<(), RegionError> {
        *self.requests.lock().unwrap() += 1;
        assert!(body.len() <= BOOT_EVENTS_BATCH_BYTES_MAX, "{} bytes", body.len());
        let events: Vec<BootEvent> = serde_json::from_str(body).unwrap();
        assert!(!events.is_empty() && events.len() <= BOOT_EVENTS_PER_REQUEST_MAX);
        answer(&events)?;
        self.took.lock().unwrap().extend(events);
        Ok(())
    }

    fn messages(&self) -> Vec<String> {
        self.took.lock().unwrap().iter().map(|e| e.message.clone()).collect()
    }
}

#[tokio::test]
async fn batches_are_within_the_bounds_and_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, counters) = open(dir.path());
    // Sizes from tiny to the largest a field allows, escaped text included.
    for i in 0..3000 {
        let message = match i % 4 {
            0 => format!("event {i}"),
            1 => format!("event {i} {}", "x".repeat(900)),
            2 => format!("event {i} {}", "\u{1}".repeat(2000)),
            _ => format!("event {i} {}", "\"".repeat(500)),
        };
        queue.push("52:54:00:aa:bb:01", "boot.tftp", message);
    }
    let region = Region::default();
    let never = CancellationToken::new();
    assert!(flush_with(&queue, |body| std::future::ready(region.send(&body, |_| Ok(()))), &never).await);
    let took = region.took.lock().unwrap().clone();
    assert_eq!(took.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=3000).collect::<Vec<_>>());
    assert!(*region.requests.lock().unwrap() > 3000 / BOOT_EVENTS_PER_REQUEST_MAX, "the byte bound split them");
    assert_eq!(counters.sent.get(), 3000);
    assert!(queue.is_empty());
}

#[tokio::test]
async fn one_refused_event_is_dropped_and_counted_and_the_rest_arrive_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, counters) = open(dir.path());
    push_n(&queue, 0..500);
    queue.push("52:54:00:aa:bb:01", "boot.tftp", "poison".into());
    push_n(&queue, 500..1000);
    let region = Region::default();
    let refuse_poison = |events: &[BootEvent]| match events.iter().any(|e| e.message == "poison") {
        true => Err(refused(400)),
        false => Ok(()),
    };
    let never = CancellationToken::new();
    assert!(flush_with(&queue, |body| std::future::ready(region.send(&body, refuse_poison)), &never).await);
    assert_eq!(region.messages(), expected(0..1000));
    assert_eq!(dropped(&counters, "refused"), 1);
    assert_eq!(counters.sent.get(), 1000);
    let requests = *region.requests.lock().unwrap();
    assert!(requests < 40, "{requests} requests for one bad event");
    // Gone on disk too: a restart does not send it again.
    drop(queue);
    let (queue, _) = open(dir.path());
    assert!(queue.is_empty());
}

#[tokio::test]
async fn failures_that_are_not_about_the_events_keep_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, counters) = open(dir.path());
    push_n(&queue, 0..10);
    let before = queue.snapshot();
    let never = CancellationToken::new();
    let no_answer = || RegionError::NoAnswer { url: "http://region/MAAS".into(), after: Duration::from_secs(1) };
    let not_a_region = || RegionError::NotARegion { url: "http://region/MAAS".into(), status: StatusCode::BAD_REQUEST };
    for error in [no_answer(), refused(500), refused(503), refused(401), refused(404), not_a_region()] {
        let description = error.to_string();
        let mut error = Some(error);
        let sent = flush_with(&queue, |_| std::future::ready(Err(error.take().expect("tried once"))), &never).await;
        assert!(!sent, "{description}");
        assert_eq!(queue.snapshot(), before, "{description}");
    }
    assert_eq!(dropped(&counters, "refused"), 0);
}

#[tokio::test]
async fn a_batch_whose_answer_was_lost_is_sent_again_with_the_same_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _) = open(dir.path());
    push_n(&queue, 0..10);
    let region = Region::default();
    let never = CancellationToken::new();
    // The region stored the batch, but the answer never came.
    let lost = |body: String| {
        let _ = region.send(&body, |_| Ok(()));
        std::future::ready(Err(RegionError::NoAnswer { url: "r".into(), after: Duration::from_secs(1) }))
    };
    assert!(!flush_with(&queue, lost, &never).await);
    assert!(flush_with(&queue, |body| std::future::ready(region.send(&body, |_| Ok(()))), &never).await);
    let took = region.took.lock().unwrap().clone();
    assert_eq!(took.len(), 20);
    assert_eq!(took[..10], took[10..], "the same events, ids and all: the region keeps one of each");
}

#[tokio::test]
async fn a_stop_while_sending_keeps_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _) = open(dir.path());
    push_n(&queue, 0..10);
    let stop = CancellationToken::new();
    stop.cancel();
    assert!(!flush_with(&queue, |_| std::future::pending(), &stop).await);
    assert_eq!(queue.len(), 10);
}

/// The tick's fdatasync runs without the queue's lock: an event recorded while the disk is slow
/// to sync is queued at once (it used to wait for the sync, holding up the PXE service that
/// recorded it), and the next tick makes it durable.
#[test]
fn an_event_recorded_while_the_journal_syncs_does_not_wait_for_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _) = open(dir.path());
    let queue = Arc::new(queue);
    push_n(&queue, 0..1);
    let (syncing_tx, syncing) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let maintaining = {
        let queue = queue.clone();
        std::thread::spawn(move || {
            queue.maintain_with(
                |file| {
                    syncing_tx.send(()).unwrap();
                    // A slow disk: the sync takes until the test lets it go (or 10 s).
                    let _ = released.recv_timeout(Duration::from_secs(10));
                    file.sync_data()
                },
                || (),
            )
        })
    };
    syncing.recv_timeout(Duration::from_secs(10)).expect("the sync started");
    let (pushed_tx, pushed) = std::sync::mpsc::channel();
    let pusher = {
        let queue = queue.clone();
        std::thread::spawn(move || {
            push_n(&queue, 1..2);
            pushed_tx.send(()).unwrap();
        })
    };
    let waited = pushed.recv_timeout(Duration::from_secs(5));
    release.send(()).unwrap();
    maintaining.join().unwrap();
    pusher.join().unwrap();
    assert!(waited.is_ok(), "the event waited for the sync");
    queue.maintain();
    drop(queue);
    let (queue, _) = open(dir.path());
    assert_eq!(messages(&queue), expected(0..2), "both events are in the file after the next tick");
}

/// A rewrite (compaction) writes its file without the queue's lock: events recorded and removed
/// meanwhile are queued at once (they used to wait for the whole write and its fsync), and they
/// are in the new file, in order, after the rename.
#[test]
fn events_recorded_while_a_rewrite_is_written_do_not_wait_and_are_in_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, path, before) = queue_due_for_a_rewrite(dir.path());
    let (written_tx, written) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let maintaining = {
        let queue = queue.clone();
        std::thread::spawn(move || {
            queue.maintain_with(
                |file| file.sync_data(),
                || {
                    written_tx.send(()).unwrap();
                    // A slow disk: the rewrite's write takes until the test lets it go.
                    let _ = released.recv_timeout(Duration::from_secs(10));
                },
            )
        })
    };
    written.recv_timeout(Duration::from_secs(10)).expect("the rewrite was written");
    let (pushed_tx, pushed) = std::sync::mpsc::channel();
    let pusher = {
        let queue = queue.clone();
        std::thread::spawn(move || {
            push_n(&queue, 20_000..20_005);
            // One of them, and the rest before it, leave while the rewrite is held.
            queue.remove_through(19_995, Removal::Sent);
            pushed_tx.send(()).unwrap();
        })
    };
    let waited = pushed.recv_timeout(Duration::from_secs(5));
    release.send(()).unwrap();
    maintaining.join().unwrap();
    pusher.join().unwrap();
    assert!(waited.is_ok(), "the events waited for the rewrite");
    let after = std::fs::metadata(&path).unwrap().len();
    assert!(after < before / 100, "the file was rewritten: {before} -> {after} bytes");
    assert!(!path.with_extension("journal.tmp").exists());
    // Appends go to the new file: one more event, then a restart reads the queue back.
    push_n(&queue, 20_005..20_006);
    drop(Arc::into_inner(queue).expect("the threads are done"));
    let (queue, _) = open(dir.path());
    assert_eq!(messages(&queue), expected(19_995..20_006));
}

/// An append that would take the file past its bound is not made, and the next tick rewrites
/// the file with every queued event: nothing is lost and the file never passes the bound, with
/// no rewrite on the thread that queues.
#[test]
fn a_file_at_its_bound_stops_taking_appends_until_the_tick_rewrites_it() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _) = open(dir.path());
    let path = DataDir::new(dir.path()).boot_events();
    // ~1 KiB events with no tick: the byte bound drops the oldest, and the file fills with
    // their lines and the `gone` lines until it reaches its bound.
    let n = 3 * BOOT_EVENTS_QUEUED_BYTES_MAX / 1024;
    for i in 0..n {
        push_large(&queue, i);
    }
    let file_bytes = std::fs::metadata(&path).unwrap().len();
    assert!(file_bytes <= FILE_BYTES_MAX, "{file_bytes}");
    assert!(file_bytes > FILE_BYTES_MAX - 4096, "filled to the bound: {file_bytes}");
    assert!(!queue.state.lock().unwrap().journal.clean, "appends stopped");
    queue.maintain();
    assert!(queue.state.lock().unwrap().journal.clean, "the tick's rewrite starts appends again");
    let queued = queue.snapshot();
    drop(queue);
    let (queue, _) = open(dir.path());
    assert_eq!(queue.snapshot(), queued, "every queued event is in the rewritten file");
    assert_eq!(queued.last().unwrap().message.trim(), (n - 1).to_string());
}

/// A rewrite during which more than [`CARRY_BYTES_MAX`] arrives is given up: the old file, which
/// took every append meanwhile, stays and holds the queue (a later tick rewrites it when due).
#[test]
fn a_rewrite_outrun_by_new_events_is_given_up_and_the_old_file_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, path, before) = queue_due_for_a_rewrite(dir.path());
    let n = CARRY_BYTES_MAX / 1000 + 100;
    let maintaining = {
        let queue = queue.clone();
        std::thread::spawn(move || {
            // The hook runs between the write and the install, on this thread: push there.
            queue.maintain_with(
                |file| file.sync_data(),
                || {
                    for i in 0..n {
                        push_large(&queue, i);
                    }
                },
            )
        })
    };
    maintaining.join().unwrap();
    let grown = std::fs::metadata(&path).unwrap().len();
    assert!(grown > before + CARRY_BYTES_MAX as u64, "the old file stayed and took the appends: {before} -> {grown}");
    assert!(!path.with_extension("journal.tmp").exists(), "the given-up rewrite's file is gone");
    let queued = queue.snapshot();
    assert_eq!(queued.last().unwrap().message.trim(), (n - 1).to_string());
    drop(Arc::into_inner(queue).expect("the thread is done"));
    let (queue, _) = open(dir.path());
    assert_eq!(queue.snapshot(), queued, "the old file holds the queue");
}
