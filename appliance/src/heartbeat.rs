//! The heartbeat loop of `rackd serve`: report health to the region every few seconds, back off
//! (capped) while it is unreachable or refuses, log once per change of state, and pick up a new
//! registration written by `rackd register` without a restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use metalrack_api::HeartbeatRequest;

use crate::config::RackConfig;
use crate::region_client::{parse_region_url, RegionClient, RegionError};
use crate::registration::{self, Registration, RegistrationError};
use crate::status::{self, HeartbeatStatus, LinkState};

/// Heartbeat period until the region first says otherwise.
const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);

/// How often a waiting loop looks for a new registration file: a re-registration takes effect
/// within this time, at the cost of one stat() per period.
const REGISTRATION_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("this rack is not registered; run 'rackd register --url http://REGION:5240/MAAS --secret SECRET' first")]
    NotRegistered,
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error("the saved registration names a bad region URL")]
    RegionUrl { source: RegionError },
}

struct Link {
    registration: Registration,
    client: RegionClient,
    registration_modified: Option<SystemTime>,
}

impl Link {
    fn load(data_dir: &Path, timeout: Duration) -> Result<Link, ServeError> {
        let registration = registration::load(data_dir)?.ok_or(ServeError::NotRegistered)?;
        let url = parse_region_url(&registration.region_url).map_err(|source| ServeError::RegionUrl { source })?;
        Ok(Link {
            client: RegionClient::new(&url, timeout),
            registration,
            registration_modified: modified(&registration::registration_path(data_dir)),
        })
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Runs heartbeats until `shutdown` completes.
pub async fn run(
    data_dir: &Path,
    config: &RackConfig,
    sync: Option<tokio::sync::watch::Receiver<crate::sync::LocalStatus>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let timeout = Duration::from_millis(config.region_request_timeout_ms);
    let backoff_max = Duration::from_millis(config.retry_backoff_max_ms);
    let mut link = Link::load(data_dir, timeout)?;
    tracing::info!(rack = %link.registration.rack_name, region = %link.registration.region_url, "rack serving");
    let mut interval = config.heartbeat_interval_ms.map(Duration::from_millis).unwrap_or(HEARTBEAT_INTERVAL_DEFAULT);
    let mut backoff = interval;
    let mut last_state: Option<LinkState> = None;
    let mut last_success_ms = None;
    tokio::pin!(shutdown);
    loop {
        let health = crate::health::collect(data_dir);
        let result = link
            .client
            .heartbeat(
                &link.registration.authorization(),
                &HeartbeatRequest { health, sync: sync.as_ref().map(|s| s.borrow().report.clone()) },
            )
            .await;
        let (state, message, wait) = match result {
            Ok(response) => {
                interval = config
                    .heartbeat_interval_ms
                    .map(Duration::from_millis)
                    .unwrap_or(Duration::from_millis(response.heartbeat_interval_ms.max(100)));
                backoff = interval;
                last_success_ms = Some(status::now_ms());
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
                    tracing::info!(region = %link.registration.region_url, "heartbeat: online")
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
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let step = REGISTRATION_POLL.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                _ = &mut shutdown => {
                    tracing::info!("rack stopping");
                    return Ok(());
                }
                _ = tokio::time::sleep(step) => {}
            }
            let path = registration::registration_path(data_dir);
            if modified(&path) != link.registration_modified {
                match Link::load(data_dir, timeout) {
                    Ok(new) => {
                        tracing::info!(rack = %new.registration.rack_name, region = %new.registration.region_url, "registration changed; using it");
                        link = new;
                        backoff = interval;
                        break;
                    }
                    Err(e) => {
                        link.registration_modified = modified(&path);
                        tracing::warn!(error = %error_chain(&e), "new registration file unusable; keeping the old one");
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
    }
}

pub use metalrack_image_tools::error_chain;
