//! The rack's registration with a region: the challenge–response exchange, and the
//! `registration.toml` file (mode 0600) that holds the rack id and credential.

use std::path::PathBuf;

use metalrack_api::{registration_proof, validate_rack_name, ChallengeRequest, RegisterRequest, Secret, SecretError};
use metalrack_image_tools::private_file::write_private_file;
use serde::{Deserialize, Serialize};

use crate::data_dir::DataDir;
use crate::region_client::{parse_region_url, RegionClient, RegionError};

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub region_url: String,
    pub rack_name: String,
    pub rack_id: String,
    pub credential: String,
    pub cluster_name: String,
    pub registered_at_ms: i64,
}

impl std::fmt::Debug for Registration {
    // The credential never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("region_url", &self.region_url)
            .field("rack_name", &self.rack_name)
            .field("rack_id", &self.rack_id)
            .finish_non_exhaustive()
    }
}

impl Registration {
    pub fn authorization(&self) -> String {
        metalrack_api::rack_authorization(&self.rack_id, &self.credential)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("invalid secret")]
    Secret { source: SecretError },
    #[error("invalid rack name: {reason}")]
    Name { reason: String },
    #[error("cannot read this machine's hostname for the rack name; pass --name")]
    Hostname { source: nix::Error },
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("the region sent a challenge nonce that is not hex")]
    BadNonce,
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is damaged; run 'rackd register' again")]
    Parse { path: PathBuf, source: toml::de::Error },
}

/// The saved registration, or `None` when this rack has not registered.
pub fn load(data_dir: &DataDir) -> Result<Option<Registration>, RegistrationError> {
    let path = data_dir.registration();
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map(Some).map_err(|source| RegistrationError::Parse { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RegistrationError::Read { path, source }),
    }
}

fn save(data_dir: &DataDir, registration: &Registration) -> Result<(), RegistrationError> {
    let path = data_dir.registration();
    let write = |source| RegistrationError::Write { path: path.clone(), source };
    std::fs::create_dir_all(data_dir.root()).map_err(write)?;
    let text = toml::to_string(registration).expect("a registration serializes");
    write_private_file(&path, text.as_bytes()).map_err(write)
}

/// This machine's hostname, the default rack name.
pub fn default_rack_name() -> Result<String, RegistrationError> {
    let name = nix::unistd::gethostname().map_err(|source| RegistrationError::Hostname { source })?;
    Ok(name.to_string_lossy().split('.').next().unwrap_or_default().to_owned())
}

/// Registers with the region at `url` and saves the registration in `data_dir`. Everything is
/// checked before the first request and nothing is written unless the region accepts the rack.
pub async fn register(
    url: &str,
    secret: &str,
    rack_name: &str,
    data_dir: &DataDir,
    timeout: std::time::Duration,
) -> Result<Registration, RegistrationError> {
    let region_url = parse_region_url(url)?;
    let secret = Secret::parse(secret).map_err(|source| RegistrationError::Secret { source })?;
    validate_rack_name(rack_name).map_err(|reason| RegistrationError::Name { reason })?;
    let client = RegionClient::new(&region_url, timeout);
    let challenge = client.challenge(&ChallengeRequest { name: rack_name.to_owned() }).await?;
    let nonce = hex::decode(&challenge.nonce).map_err(|_| RegistrationError::BadNonce)?;
    let proof = hex::encode(registration_proof(&secret, &nonce, rack_name));
    let response =
        client.register(&RegisterRequest { name: rack_name.to_owned(), nonce: challenge.nonce, proof }).await?;
    let registration = Registration {
        region_url: region_url.to_string(),
        rack_name: rack_name.to_owned(),
        rack_id: response.rack_id,
        credential: response.credential,
        cluster_name: response.cluster_name,
        registered_at_ms: crate::status::now_ms(),
    };
    save(data_dir, &registration)?;
    Ok(registration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_credential() {
        let registration = Registration {
            region_url: "http://r/MAAS".into(),
            rack_name: "a".into(),
            rack_id: "1".into(),
            credential: "topsecretcredential".into(),
            cluster_name: "c".into(),
            registered_at_ms: 0,
        };
        assert!(!format!("{registration:?}").contains("topsecret"));
    }

    #[tokio::test]
    async fn bad_input_fails_before_any_request_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path().join("rack"));
        let timeout = std::time::Duration::from_secs(1);
        let secret = "00112233445566778899aabbccddeeff";
        let err = register("nonsense", secret, "r1", &data_dir, timeout).await.unwrap_err();
        assert!(matches!(err, RegistrationError::Region(RegionError::BadUrl { .. })), "{err}");
        let err = register("http://127.0.0.1:1/MAAS", "abc", "r1", &data_dir, timeout).await.unwrap_err();
        assert!(matches!(err, RegistrationError::Secret { .. }), "{err}");
        let err = register("http://127.0.0.1:1/MAAS", secret, "bad name", &data_dir, timeout).await.unwrap_err();
        assert!(matches!(err, RegistrationError::Name { .. }), "{err}");
        assert!(!data_dir.root().exists());
    }
}
