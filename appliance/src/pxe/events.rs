//! Boot events: queued on the rack (bounded), flushed to the region when it is reachable.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalrack_api::machines::{BootEvent, BOOT_EVENTS_PER_REQUEST_MAX};

use metalrack_image_tools::error_chain;
use tokio_util::sync::CancellationToken;

use super::Pxe;
use crate::region_link::RegionLink;

/// Events kept while the region is unreachable; the oldest are dropped (and counted) beyond it.
/// ~200 bytes each: 2 MB.
pub const BOOT_EVENTS_QUEUED_MAX: usize = 10_000;

/// How often queued events are sent.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct EventQueue {
    queue: Mutex<VecDeque<BootEvent>>,
    pub dropped: AtomicU64,
}

impl EventQueue {
    pub fn push(&self, mac: &str, kind: &str, message: String) {
        let mut queue = self.queue.lock().expect("lock");
        if queue.len() >= BOOT_EVENTS_QUEUED_MAX {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(BootEvent {
            queue_id: 0,
            seq: 0,
            at_ms: crate::status::now_ms(),
            mac: mac.to_owned(),
            kind: kind.to_owned(),
            message,
        });
    }

    pub fn len(&self) -> usize {
        self.queue.lock().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self, n: usize) -> Vec<BootEvent> {
        let mut queue = self.queue.lock().expect("lock");
        let n = n.min(queue.len());
        queue.drain(..n).collect()
    }

    /// Puts events back at the front after a failed send, keeping the bound.
    fn requeue(&self, events: Vec<BootEvent>) {
        let mut queue = self.queue.lock().expect("lock");
        for event in events.into_iter().rev() {
            if queue.len() >= BOOT_EVENTS_QUEUED_MAX {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            queue.push_front(event);
        }
    }
}

/// Sends queued events to the region every second; keeps them while it is away. Returns at
/// `shutdown`; the last flush is the caller's ([`flush`]), once nothing records events any more.
pub async fn flush_until_stopped(pxe: Arc<Pxe>, link: Arc<RegionLink>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(FLUSH_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
        flush(&pxe.events, &link, &shutdown).await;
    }
}

/// Sends what is queued, in batches, until the queue is empty or a send fails (the failed
/// batch goes back to the front) or `stop` is cancelled (the batch in flight goes back too).
/// Returns whether everything was sent.
pub async fn flush(events: &EventQueue, link: &RegionLink, stop: &CancellationToken) -> bool {
    if events.is_empty() {
        return true;
    }
    let linked = link.current();
    while !events.is_empty() {
        let batch = events.take(BOOT_EVENTS_PER_REQUEST_MAX);
        let sent = tokio::select! {
            sent = linked.client.boot_events(&linked.authorization, &batch) => sent,
            () = stop.cancelled() => {
                events.requeue(batch);
                return false;
            }
        };
        if let Err(e) = sent {
            tracing::debug!(error = %error_chain(&e), queued = events.len() + batch.len(), "boot events kept for later");
            events.requeue(batch);
            return false;
        }
    }
    true
}
