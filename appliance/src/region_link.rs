//! The running rack's link to its region: the one [`RegionClient`] of `rackd serve` (one
//! connection pool, HTTPS pinned to the certificate registration pinned) with the rack's
//! registration, which every task (heartbeat, sync, boot events) uses, and which picks up a
//! registration that `rackd register` replaced without a restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::data_dir::DataDir;
use crate::region_client::{http_client, parse_region_url, tls_url, RegionClient, RegionError, RegionTrust};
use crate::registration::{self, Registration, RegistrationError};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("this rack is not registered; run 'rackd register --url http://REGION:5240/MAAS --secret SECRET' first")]
    NotRegistered,
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error("the saved registration names a bad region URL")]
    RegionUrl { source: RegionError },
}

/// The region to call and the rack's credential for it, as registered.
#[derive(Debug)]
pub struct Linked {
    pub registration: Registration,
    pub client: RegionClient,
    /// The `Authorization` header value for the rack's calls.
    pub authorization: String,
}

#[derive(Debug)]
pub struct RegionLink {
    data_dir: DataDir,
    request_timeout: Duration,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    linked: Arc<Linked>,
    /// The registration file's mtime when it was read: a change means `rackd register` ran.
    modified: Option<SystemTime>,
}

fn modified(data_dir: &DataDir) -> Option<SystemTime> {
    std::fs::metadata(data_dir.registration()).and_then(|m| m.modified()).ok()
}

impl RegionLink {
    /// Builds the link from the saved registration; fails when the rack is not registered.
    pub fn open(data_dir: &DataDir, request_timeout: Duration) -> Result<RegionLink, LinkError> {
        let modified = modified(data_dir);
        let linked = load(data_dir, request_timeout)?;
        Ok(RegionLink {
            data_dir: data_dir.clone(),
            request_timeout,
            current: Mutex::new(Current { linked: Arc::new(linked), modified }),
        })
    }

    /// The registration in use, re-read first if the file changed.
    pub fn current(&self) -> Arc<Linked> {
        self.refresh();
        self.current.lock().expect("lock").linked.clone()
    }

    /// Re-reads the registration if its file changed (one stat). Returns true when a new one is
    /// now in use; a new file that cannot be used is logged and the old registration kept.
    pub fn refresh(&self) -> bool {
        let now_modified = modified(&self.data_dir);
        let mut current = self.current.lock().expect("lock");
        if now_modified == current.modified {
            return false;
        }
        current.modified = now_modified;
        match load(&self.data_dir, self.request_timeout) {
            Ok(linked) => {
                tracing::info!(rack = %linked.registration.rack_name, region = %linked.registration.region_url, "registration changed; using it");
                current.linked = Arc::new(linked);
                true
            }
            Err(e) => {
                tracing::warn!(error = %metalrack_image_tools::error_chain(&e), "new registration file unusable; keeping the old one");
                false
            }
        }
    }
}

/// The saved registration with a client of its own: a new registration may pin another
/// certificate, so the pool is not shared across registrations.
fn load(data_dir: &DataDir, request_timeout: Duration) -> Result<Linked, LinkError> {
    let registration = registration::load(data_dir)?.ok_or(LinkError::NotRegistered)?;
    let pin = registration.certificate_pin()?;
    let url = parse_region_url(&registration.region_url).map_err(|source| LinkError::RegionUrl { source })?;
    let http = http_client(request_timeout, RegionTrust::Pinned(pin));
    Ok(Linked {
        client: RegionClient::with_http(http, &tls_url(&url), request_timeout),
        authorization: registration.authorization(),
        registration,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn write_registration(data_dir: &DataDir, rack_name: &str) {
        let registration = Registration {
            region_url: "http://127.0.0.1:9/MAAS".into(),
            rack_name: rack_name.into(),
            rack_id: "1".into(),
            credential: "c".into(),
            cluster_name: "test".into(),
            registered_at_ms: 0,
            region_certificate_sha256: Some("ab".repeat(32)),
        };
        std::fs::write(data_dir.registration(), toml::to_string(&registration).unwrap()).unwrap();
    }

    #[test]
    fn not_registered_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = RegionLink::open(&DataDir::new(dir.path()), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, LinkError::NotRegistered), "{err}");
    }

    #[test]
    fn a_new_registration_is_picked_up_and_a_broken_one_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path());
        write_registration(&data_dir, "first");
        let link = RegionLink::open(&data_dir, Duration::from_secs(1)).unwrap();
        assert!(!link.refresh(), "nothing changed");
        // A later mtime, as `rackd register` writing the file again gives.
        let later = |data_dir: &DataDir, seconds: u64| {
            let file = std::fs::File::options().write(true).open(data_dir.registration()).unwrap();
            file.set_modified(SystemTime::now() + Duration::from_secs(seconds)).unwrap();
        };
        write_registration(&data_dir, "second");
        later(&data_dir, 10);
        assert_eq!(link.current().registration.rack_name, "second");
        std::fs::write(data_dir.registration(), "not toml").unwrap();
        later(&data_dir, 20);
        assert!(!link.refresh());
        assert_eq!(link.current().registration.rack_name, "second", "the old one is kept");
    }
}
