//! The rack's registration with a region: the challenge–response exchange that pins the
//! region's TLS certificate, and the `registration.toml` file (mode 0600) that holds the rack id,
//! credential and pin.
//!
//! 1. Challenge, over the URL as given (clear for `http://`): a nonce and the fingerprint of the
//!    region's certificate. Nothing secret is sent, and nothing received is believed yet.
//! 2. Register, over HTTPS pinned to that fingerprint: the proof (HMAC under the secret over
//!    nonce, fingerprint and name). The region refuses it if the fingerprint is not its own, and
//!    answers with the credential and its own HMAC over the same fingerprint, which the rack
//!    checks: a man in the middle who put his certificate into the challenge can make neither.
//! 3. Only then is the registration, pin included, saved.

use std::path::PathBuf;

use metalrack_api::{
    registration_proof, validate_rack_name, verify_region_proof, ChallengeRequest, RegisterRequest, Secret,
    SecretError, CERTIFICATE_SHA256_LEN_BYTES, REGISTRATION_PROOF_VERSION,
};
use metalrack_image_tools::private_file::write_private_file;
use serde::{Deserialize, Serialize};

use crate::data_dir::DataDir;
use crate::region_client::{parse_region_url, tls_url, RegionClient, RegionError, RegionTrust};

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub region_url: String,
    pub rack_name: String,
    pub rack_id: String,
    pub credential: String,
    pub cluster_name: String,
    pub registered_at_ms: i64,
    /// SHA-256 of the region's TLS certificate (hex), covered by both HMACs at registration:
    /// every later call goes to a region that presents exactly this certificate. Absent from
    /// registrations made before the region served TLS, which must register again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_certificate_sha256: Option<String>,
}

impl std::fmt::Debug for Registration {
    // The credential never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("region_url", &self.region_url)
            .field("rack_name", &self.rack_name)
            .field("rack_id", &self.rack_id)
            .field("region_certificate_sha256", &self.region_certificate_sha256)
            .finish_non_exhaustive()
    }
}

impl Registration {
    pub fn authorization(&self) -> String {
        metalrack_api::rack_authorization(&self.rack_id, &self.credential)
    }

    /// The pinned certificate's fingerprint.
    pub fn certificate_pin(&self) -> Result<[u8; CERTIFICATE_SHA256_LEN_BYTES], RegistrationError> {
        let hex = self.region_certificate_sha256.as_deref().ok_or(RegistrationError::NoCertificatePin)?;
        parse_fingerprint(hex).ok_or(RegistrationError::BadCertificatePin)
    }
}

fn parse_fingerprint(text: &str) -> Option<[u8; CERTIFICATE_SHA256_LEN_BYTES]> {
    hex::decode(text).ok()?.try_into().ok()
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
    #[error(
        "the region at {url} offers no TLS certificate to pin (a regiond older than this rackd?); upgrade the \
         region, then register again"
    )]
    RegionWithoutTls { url: String },
    #[error("the region sent a certificate fingerprint that is not {CERTIFICATE_SHA256_LEN_BYTES} bytes of hex")]
    BadFingerprint,
    #[error(
        "the answer from {url} is not signed with the shared secret: something between this rack and the region \
         (a man in the middle?) answered in its place or changed the region's certificate; nothing was saved"
    )]
    RegionNotAuthenticated { url: String },
    #[error(
        "this rack registered before the region served TLS and has no certificate to trust; run 'rackd register \
         --url http://REGION:5240/MAAS --secret SECRET' again"
    )]
    NoCertificatePin,
    #[error("the pinned certificate fingerprint in the registration is damaged; run 'rackd register' again")]
    BadCertificatePin,
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
    // 1. The challenge, as the operator's URL says; over https:// its certificate is not checked
    //    yet, since only the HMACs below can say which one is the region's.
    let challenge = RegionClient::new(&region_url, timeout, RegionTrust::NothingYet)
        .challenge(&ChallengeRequest { name: rack_name.to_owned() })
        .await?;
    let nonce = hex::decode(&challenge.nonce).map_err(|_| RegistrationError::BadNonce)?;
    let fingerprint_hex = challenge
        .certificate_sha256
        .ok_or_else(|| RegistrationError::RegionWithoutTls { url: region_url.to_string() })?;
    let fingerprint = parse_fingerprint(&fingerprint_hex).ok_or(RegistrationError::BadFingerprint)?;
    // 2. The proof, over TLS to that certificate only: the credential in the answer never
    //    crosses in clear, and reaches only whoever holds the certificate's key.
    let secure_url = tls_url(&region_url);
    let client = RegionClient::new(&secure_url, timeout, RegionTrust::Pinned(fingerprint));
    let proof = hex::encode(registration_proof(&secret, &nonce, &fingerprint, rack_name));
    let request = RegisterRequest {
        name: rack_name.to_owned(),
        nonce: challenge.nonce,
        proof,
        proof_version: REGISTRATION_PROOF_VERSION,
    };
    let response = client.register(&request).await?;
    let region_proof = hex::decode(&response.region_proof).unwrap_or_default();
    if !verify_region_proof(&secret, &nonce, &fingerprint, rack_name, &response.rack_id, &region_proof) {
        return Err(RegistrationError::RegionNotAuthenticated { url: secure_url.to_string() });
    }
    // 3. Saved with its pin.
    let registration = Registration {
        region_url: region_url.to_string(),
        rack_name: rack_name.to_owned(),
        rack_id: response.rack_id,
        credential: response.credential,
        cluster_name: response.cluster_name,
        registered_at_ms: crate::status::now_ms(),
        region_certificate_sha256: Some(fingerprint_hex),
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
            region_certificate_sha256: None,
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

    #[test]
    fn a_registration_from_before_tls_loads_and_asks_to_register_again() {
        let old = "region_url = \"http://r:5240/MAAS\"\nrack_name = \"a\"\nrack_id = \"1\"\ncredential = \"c\"\n\
                   cluster_name = \"x\"\nregistered_at_ms = 0\n";
        let registration: Registration = toml::from_str(old).unwrap();
        let err = registration.certificate_pin().unwrap_err();
        assert!(matches!(err, RegistrationError::NoCertificatePin), "{err}");
        assert!(err.to_string().contains("rackd register"), "{err}");
    }
}
