//! The loop that takes power requests for this rack's machines from the region (a long-poll of
//! `GET /rack/power`), runs each with the power drivers, and sends back what came of it. BMC
//! networks are rack-local: the region decides, the rack acts. Requests for one machine run in
//! the order they came; different machines' run side by side, at most
//! [`POWER_REQUESTS_RUNNING_MAX`] at once. A request that powers a machine on waits until the
//! boot table holds the change that asked for it (its `boot_generation`), so the machine
//! cannot boot what the rack was told before.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use metalrack_api::power::{PowerAction, PowerRequest, PowerResult, PowerState};
use metalrack_image_tools::error_chain;
use tokio::sync::{watch, Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::region_client::RegionError;
use crate::region_link::RegionLink;
use crate::snapshot::boot_table::Machines;

/// Power requests running at once. A BMC answers in seconds (a Redfish reset, an ipmitool call);
/// 32 at once power a 1,000-machine rack in a few minutes without a thread per machine.
pub const POWER_REQUESTS_RUNNING_MAX: usize = 32;

/// How long the region may hold a poll with nothing to do (its own bound is higher: see
/// `CATALOGUE_POLL_HOLD_MAX`, which the region also applies to this poll).
const POLL_WAIT: Duration = Duration::from_secs(30);

/// How long a request that powers a machine on waits for the boot table to reach its
/// generation. The catalogue poll answers at once when the rack's machines changed (also while
/// a sync runs), so this is normally one round trip; past it the request fails with the reason
/// rather than boot the machine into an old decision. Well under the region's resend interval,
/// so a waiting request is not sent again meanwhile.
pub const BOOT_TABLE_WAIT_MAX: Duration = Duration::from_secs(30);
const _: () = assert!(BOOT_TABLE_WAIT_MAX.as_secs() < metalrack_api::limits::POWER_RESEND_AFTER.as_secs());

/// A request's result is sent again this often until the region takes it (it may be away).
const RESULT_RETRY: Duration = Duration::from_secs(5);

// The poll must end before the region gives up holding it.
const _: () = assert!(POLL_WAIT.as_millis() <= metalrack_api::limits::CATALOGUE_POLL_HOLD_MAX.as_millis());

/// Runs until `shutdown`: polls, runs with `run`, reports. `run` is the drivers
/// (`crate::power::run` in `rackd serve`); `boots` is the boot table's, for its generation.
pub async fn run_until_stopped<R, F>(
    link: Arc<RegionLink>,
    run: R,
    boots: watch::Receiver<Machines>,
    backoff_max: Duration,
    shutdown: CancellationToken,
) where
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
            let mut boots = boots.clone();
            tasks.spawn(async move {
                let _in_order = machine_lock.lock().await;
                // Before taking a running slot: a request waiting here holds none.
                let ready = tokio::select! {
                    ready = boot_table_ready(&mut boots, &request, BOOT_TABLE_WAIT_MAX) => ready,
                    // Unanswered, the region sends it again after its resend interval.
                    () = shutdown.cancelled() => return,
                };
                let Ok(_slot) = running.acquire().await else { return };
                let (id, machine_id) = (request.id, request.machine_id.clone());
                tracing::info!(id, %machine_id, actions = ?request.actions, "power request");
                let result = match ready {
                    Ok(()) => run(request).await,
                    Err(error) => PowerResult {
                        id,
                        machine_id: machine_id.clone(),
                        state: PowerState::Unknown,
                        error: Some(error),
                    },
                };
                if let Some(error) = &result.error {
                    tracing::warn!(id, %machine_id, %error, "power request failed");
                }
                send_result(&link, &result, &shutdown).await;
            });
        }
    }
    tasks.close();
}

/// Whether `request` may run: at once unless it powers the machine on, else once the boot
/// table is of the request's generation (the catalogue that carried the change that asked for
/// it), waiting at most `wait`. The error says why not, for the region's event.
async fn boot_table_ready(
    boots: &mut watch::Receiver<Machines>,
    request: &PowerRequest,
    wait: Duration,
) -> Result<(), String> {
    let powers_on = request.actions.iter().any(|action| matches!(action, PowerAction::On | PowerAction::Cycle));
    if !powers_on || request.boot_generation == 0 {
        return Ok(());
    }
    let needed = request.boot_generation;
    // Timed out, or the table's writer is gone (the rack is stopping), is not reached.
    let reached =
        matches!(tokio::time::timeout(wait, boots.wait_for(|boots| boots.generation >= needed)).await, Ok(Ok(_)));
    if reached {
        return Ok(());
    }
    let have = boots.borrow().generation;
    tracing::warn!(id = request.id, machine_id = %request.machine_id, have, needed, "boot table behind a power-on; not powering on");
    Err(format!(
        "not powered on: this rack's boot table is at generation {have} and did not reach {needed} (the change \
         that asked for the power-on) within {}s, so the machine would have booted what the rack was told before",
        wait.as_secs()
    ))
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

#[cfg(test)]
mod tests {
    use metalrack_api::power::{BootDevice, PowerParameters};

    use super::*;
    use crate::snapshot::boot_table::Boots;

    fn request(actions: Vec<PowerAction>, boot_generation: u64) -> PowerRequest {
        PowerRequest {
            id: 7,
            machine_id: "m1".into(),
            mac: "52:54:00:aa:bb:01".into(),
            parameters: PowerParameters::Manual,
            actions,
            boot_generation,
        }
    }

    fn table(generation: u64) -> Machines {
        Arc::new(Boots { generation, ..Boots::default() })
    }

    /// A power-on waits until the boot table is of its generation (not a moment before), and
    /// fails naming both generations when the table stays behind; other requests never wait.
    #[tokio::test]
    async fn a_power_on_waits_for_its_boot_generation_and_fails_naming_it_when_the_table_stays_behind() {
        let (sender, boots) = watch::channel(table(4));
        let power_on = request(vec![PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::Cycle], 5);
        let mut waiting = boots.clone();
        let wait =
            tokio::spawn(async move { boot_table_ready(&mut waiting, &power_on, Duration::from_secs(60)).await });
        // Behind: still waiting a while later (it would have answered at once).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!wait.is_finished(), "powered on with the boot table one generation behind");
        sender.send_replace(table(5));
        let ready = tokio::time::timeout(Duration::from_secs(10), wait).await.expect("ready once the table caught up");
        assert_eq!(ready.unwrap(), Ok(()));

        let never = request(vec![PowerAction::On], 9);
        let error = boot_table_ready(&mut boots.clone(), &never, Duration::from_millis(200)).await.unwrap_err();
        assert!(error.contains("generation 5") && error.contains("reach 9"), "{error}");

        for other in
            [vec![PowerAction::Off], vec![PowerAction::Query], vec![PowerAction::SetNextBoot(BootDevice::Disk)]]
        {
            let started = std::time::Instant::now();
            assert_eq!(boot_table_ready(&mut boots.clone(), &request(other, 9), Duration::from_secs(60)).await, Ok(()));
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        // A region that names no generation (older than this rack): no wait.
        assert_eq!(
            boot_table_ready(&mut boots.clone(), &request(vec![PowerAction::On], 0), Duration::from_secs(60)).await,
            Ok(())
        );
    }
}
