//! Boot events: queued on the rack (bounded), flushed to the region when it is reachable.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalrack_api::machines::{BootEvent, BOOT_EVENTS_PER_REQUEST_MAX};

use super::Pxe;

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

/// Sends queued events to the region every second; keeps them while it is away.
pub async fn flush_forever(pxe: Arc<Pxe>) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        if pxe.events.is_empty() {
            continue;
        }
        let Ok(Some(registration)) = crate::registration::load(&pxe.data_dir) else { continue };
        let Ok(url) = crate::region_client::parse_region_url(&registration.region_url) else { continue };
        let client = crate::region_client::RegionClient::new(&url, Duration::from_secs(10));
        while !pxe.events.is_empty() {
            let batch = pxe.events.take(BOOT_EVENTS_PER_REQUEST_MAX);
            if let Err(e) = client.boot_events(&registration.authorization(), &batch).await {
                tracing::debug!(error = %crate::heartbeat::error_chain(&e), queued = pxe.events.len() + batch.len(), "boot events kept for later");
                pxe.events.requeue(batch);
                break;
            }
        }
    }
}
