//! The loop that takes power requests for this rack's machines from the region (a long-poll of
//! `GET /rack/power`), runs each with the power drivers, and sends back what came of it. BMC
//! networks are rack-local: the region decides, the rack acts. Requests for one machine run in
//! the order they came; different machines' run side by side, at most
//! [`POWER_REQUESTS_RUNNING_MAX`] at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use metalrack_api::power::{PowerRequest, PowerResult};
use metalrack_image_tools::error_chain;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::region_client::RegionError;
use crate::region_link::RegionLink;

/// Power requests running at once. A BMC answers in seconds (a Redfish reset, an ipmitool call);
/// 32 at once power a 1,000-machine rack in a few minutes without a thread per machine.
pub const POWER_REQUESTS_RUNNING_MAX: usize = 32;

/// How long the region may hold a poll with nothing to do (its own bound is higher: see
/// `CATALOGUE_POLL_HOLD_MAX`, which the region also applies to this poll).
const POLL_WAIT: Duration = Duration::from_secs(30);

/// A request's result is sent again this often until the region takes it (it may be away).
const RESULT_RETRY: Duration = Duration::from_secs(5);

// The poll must end before the region gives up holding it.
const _: () = assert!(POLL_WAIT.as_millis() <= metalrack_api::limits::CATALOGUE_POLL_HOLD_MAX.as_millis());

/// Runs until `shutdown`: polls, runs with `run`, reports. `run` is the drivers
/// (`crate::power::run` in `rackd serve`).
pub async fn run_until_stopped<R, F>(link: Arc<RegionLink>, run: R, backoff_max: Duration, shutdown: CancellationToken)
where
    R: Fn(PowerRequest) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = PowerResult> + Send + 'static,
{
    let running = Arc::new(Semaphore::new(POWER_REQUESTS_RUNNING_MAX));
    let per_machine: Arc<std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>> = Arc::default();
    let tasks = TaskTracker::new();
    let mut backoff = Duration::from_millis(500);
    loop {
        let linked = link.current();
        let polled = tokio::select! {
            polled = linked.client.power_requests(&linked.authorization, POLL_WAIT) => polled,
            () = shutdown.cancelled() => break,
        };
        let requests = match polled {
            Ok(requests) => {
                backoff = Duration::from_millis(500);
                requests
            }
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "power request poll failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
        };
        for request in requests {
            let machine_lock = {
                let mut locks = per_machine.lock().expect("lock");
                // Locks nobody holds or waits for are dropped, so the map stays as small as
                // the requests in flight.
                locks.retain(|_, lock| Arc::strong_count(lock) > 1);
                locks.entry(request.machine_id.clone()).or_default().clone()
            };
            let (run, running, link, shutdown) = (run.clone(), running.clone(), link.clone(), shutdown.clone());
            tasks.spawn(async move {
                let _in_order = machine_lock.lock().await;
                let Ok(_slot) = running.acquire().await else { return };
                let (id, machine_id) = (request.id, request.machine_id.clone());
                tracing::info!(id, %machine_id, actions = ?request.actions, "power request");
                let result = run(request).await;
                if let Some(error) = &result.error {
                    tracing::warn!(id, %machine_id, %error, "power request failed");
                }
                send_result(&link, &result, &shutdown).await;
            });
        }
    }
    tasks.close();
}

/// Sends `result` until the region takes it or `shutdown`.
async fn send_result(link: &RegionLink, result: &PowerResult, shutdown: &CancellationToken) {
    loop {
        let linked = link.current();
        match linked.client.power_result(&linked.authorization, result).await {
            Ok(()) => return,
            // Refused for what it holds (the machine is gone, say): sending it again won't help.
            // A refused credential or a busy region are worth waiting out.
            Err(e @ RegionError::Refused { status, .. })
                if status.is_client_error() && ![401, 403, 408, 429].contains(&status.as_u16()) =>
            {
                tracing::warn!(id = result.id, error = %error_chain(&e), "the region refused a power result; dropped");
                return;
            }
            Err(e) => tracing::debug!(id = result.id, error = %error_chain(&e), "cannot send a power result yet"),
        }
        tokio::select! {
            () = tokio::time::sleep(RESULT_RETRY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
