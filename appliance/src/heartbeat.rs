//! The heartbeat loop of `rackd serve`: report health to the region every few seconds, back off
//! (capped) while it is unreachable or refuses, log once per change of state, and pick up a new
//! registration written by `rackd register` without a restart.

use std::time::Duration;

use metalrack_api::HeartbeatRequest;
use metalrack_image_tools::error_chain;
use tokio_util::sync::CancellationToken;

use crate::config::RackConfig;
use crate::data_dir::DataDir;
use crate::region_client::RegionError;
use crate::region_link::RegionLink;
use crate::status::{self, HeartbeatStatus, LinkState};

/// Heartbeat period until the region first says otherwise.
const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);

/// How often a waiting loop looks for a new registration file: a re-registration takes effect
/// within this time, at the cost of one stat() per period.
const REGISTRATION_POLL: Duration = Duration::from_secs(1);

/// The smallest heartbeat period the region can ask for: a misconfigured region cannot make the
/// rack spin.
const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// Each wait is stretched or shrunk by up to this fraction at random, so racks that started
/// together (a site powered on, a region back after an outage) drift apart instead of calling
/// the region in the same instant every few seconds.
const HEARTBEAT_JITTER: f64 = 0.1;

fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(rand::random_range(1.0 - HEARTBEAT_JITTER..=1.0 + HEARTBEAT_JITTER))
}

/// Runs heartbeats until `shutdown` is cancelled. A heartbeat in flight is abandoned then: the
/// next start sends one at once.
pub async fn run(
    data_dir: &DataDir,
    config: &RackConfig,
    link: &RegionLink,
    sync: Option<tokio::sync::watch::Receiver<crate::sync::LocalStatus>>,
    shutdown: CancellationToken,
) {
    let backoff_max = Duration::from_millis(config.retry_backoff_max_ms);
    let registration = link.current().registration.clone();
    tracing::info!(rack = %registration.rack_name, region = %registration.region_url, "rack serving");
    let mut interval = config.heartbeat_interval_ms.map(Duration::from_millis).unwrap_or(HEARTBEAT_INTERVAL_DEFAULT);
    let mut backoff = interval;
    let mut last_state: Option<LinkState> = None;
    let mut last_success_ms = None;
    loop {
        let health = crate::health::collect(data_dir.root());
        let linked = link.current();
        let request = HeartbeatRequest { health, sync: sync.as_ref().map(|s| s.borrow().report.clone()) };
        let result = tokio::select! {
            result = linked.client.heartbeat(&linked.authorization, &request) => result,
            () = shutdown.cancelled() => break,
        };
        let (state, message, wait) = match result {
            Ok(response) => {
                interval = config
                    .heartbeat_interval_ms
                    .map(Duration::from_millis)
                    .unwrap_or(Duration::from_millis(response.heartbeat_interval_ms).max(HEARTBEAT_INTERVAL_MIN));
                backoff = interval;
                last_success_ms = Some(status::now_ms());
                if response.snapshot_wanted {
                    send_snapshot(&linked, sync.as_ref(), &shutdown).await;
                }
                (LinkState::Online, String::new(), interval)
            }
            Err(error) => {
                let state = if error.must_register_again() {
                    LinkState::MustRegisterAgain
                } else if matches!(error, RegionError::Refused { .. }) {
                    LinkState::Refused
                } else {
                    LinkState::RegionUnreachable
                };
                let wait = backoff;
                backoff = (backoff * 2).min(backoff_max);
                (state, error_chain(&error), wait)
            }
        };
        if last_state != Some(state) {
            match state {
                LinkState::Online => {
                    tracing::info!(region = %linked.registration.region_url, "heartbeat: online")
                }
                _ => {
                    tracing::warn!(state = state.label(), reason = %message, "heartbeat failing; retrying with backoff")
                }
            }
            last_state = Some(state);
        }
        let status = HeartbeatStatus {
            pid: std::process::id(),
            state,
            message,
            last_attempt_ms: status::now_ms(),
            last_success_ms,
        };
        if let Err(e) = status::save(data_dir, &status) {
            tracing::warn!(error = %e, "cannot write status file");
        }
        // Wait, but wake early for shutdown or for a new registration.
        let deadline = tokio::time::Instant::now() + jittered(wait);
        loop {
            let step = REGISTRATION_POLL.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                () = shutdown.cancelled() => {
                    tracing::info!("heartbeats stopped");
                    return;
                }
                () = tokio::time::sleep(step) => {}
            }
            if link.refresh() {
                backoff = interval;
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
    }
    tracing::info!("heartbeats stopped");
}

/// Sends what the snapshot in service holds. A failure is only logged: the next heartbeat's
/// answer asks again.
async fn send_snapshot(
    linked: &crate::region_link::Linked,
    sync: Option<&tokio::sync::watch::Receiver<crate::sync::LocalStatus>>,
    shutdown: &CancellationToken,
) {
    let Some(snapshot) = sync.and_then(|s| {
        let status = s.borrow();
        status.report.snapshot_id.clone().map(|snapshot_id| metalrack_api::images::RackSnapshot {
            snapshot_id,
            file_hashes: status.file_hashes.clone(),
        })
    }) else {
        return;
    };
    let n_files = snapshot.file_hashes.len();
    tokio::select! {
        result = linked.client.put_snapshot(&linked.authorization, &snapshot) => match result {
            Ok(()) => tracing::debug!(snapshot = %snapshot.snapshot_id, n_files, "snapshot sent to the region"),
            Err(e) => tracing::warn!(error = %error_chain(&e), "cannot send the snapshot's files; the region will ask again"),
        },
        () = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod jitter_tests {
    use super::*;

    #[test]
    fn waits_are_spread_within_the_jitter() {
        let base = Duration::from_secs(5);
        let waits: Vec<Duration> = (0..1000).map(|_| jittered(base)).collect();
        assert!(waits.iter().all(|w| *w >= base.mul_f64(0.9) && *w <= base.mul_f64(1.1)));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 900, "the waits differ from rack to rack and beat to beat");
    }
}
