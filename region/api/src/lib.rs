//! The wire contract between the region, its racks and tools: JSON request and response types,
//! endpoint paths, the limits both sides must respect, the registration proof, and the header
//! formats. Both sides compile against this one crate so they cannot drift apart.

pub mod agent;
pub mod images;
pub mod limits;
pub mod machines;
pub mod paths;
pub mod power;
#[cfg(feature = "tls-client")]
pub mod tls_pin;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Path prefix of the JSON API on the region, below the region URL (`http://HOST:5240/MAAS`).
pub const API_PREFIX: &str = "/api/v1";

/// A shared secret is exactly this many hex characters (16 random bytes).
pub const SECRET_HEX_LEN: usize = 32;

/// A rack name is shown in the UI and used in the registration proof; keep it short and printable.
pub const RACK_NAME_LEN_MAX: usize = 63;

/// Random bytes in a registration challenge nonce.
pub const NONCE_LEN_BYTES: usize = 32;

/// Error code in [`ErrorBody::code`] telling a rack its credential belongs to an old secret.
pub const CODE_REREGISTER: &str = "register_again";

/// The region's shared secret, validated: 32 hex characters.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a secret is exactly {SECRET_HEX_LEN} hex characters, this one has {found}")]
    Length { found: usize },
    #[error("a secret holds only hex characters 0-9 and a-f, found {found:?} at position {position}")]
    NotHex { found: char, position: usize },
}

impl Secret {
    /// Parses a secret as an operator types it: surrounding whitespace (a trailing newline from
    /// `echo > secret`) is ignored, upper-case hex is accepted and stored lower-case.
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        let trimmed = text.trim();
        let found = trimmed.chars().count();
        if found != SECRET_HEX_LEN {
            return Err(SecretError::Length { found });
        }
        if let Some((position, found)) = trimmed.chars().enumerate().find(|(_, c)| !c.is_ascii_hexdigit()) {
            return Err(SecretError::NotHex { found, position });
        }
        Ok(Secret(trimmed.to_ascii_lowercase()))
    }

    /// Builds a secret from 16 random bytes.
    pub fn from_bytes(bytes: [u8; SECRET_HEX_LEN / 2]) -> Secret {
        Secret(hex::encode(bytes))
    }

    /// The secret as hex, for the secret file and for `regiond secret show` only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    // Secrets never reach logs, even through a stray `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Checks a rack name: 1 to 63 characters of letters, digits, `-`, `_` and `.`.
pub fn validate_rack_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > RACK_NAME_LEN_MAX {
        return Err(format!("a rack name has 1 to {RACK_NAME_LEN_MAX} characters, {name:?} has {}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("a rack name holds letters, digits, '-', '_' and '.', {name:?} holds {c:?}"));
    }
    Ok(())
}

/// The registration proof this crate computes and the region accepts. Version 2 covers the
/// region's TLS certificate; version 1 (rackd before TLS) covered only the nonce and the name and
/// is refused with a message saying to upgrade rackd.
pub const REGISTRATION_PROOF_VERSION: u32 = 2;

/// Bytes of a certificate fingerprint: SHA-256 of the certificate's DER encoding.
pub const CERTIFICATE_SHA256_LEN_BYTES: usize = 32;

/// Prefixes that keep the rack's proof and the region's answer apart: neither can be replayed
/// as the other.
const RACK_PROOF_LABEL: &[u8] = b"metalrack rack proof v2\0";
const REGION_PROOF_LABEL: &[u8] = b"metalrack region proof v2\0";

/// The fingerprint a rack pins: SHA-256 of the region's certificate (DER), the same value
/// `openssl x509 -in cert.pem -outform der | sha256sum` prints.
pub fn certificate_sha256(certificate_der: &[u8]) -> [u8; CERTIFICATE_SHA256_LEN_BYTES] {
    use sha2::Digest;
    Sha256::digest(certificate_der).into()
}

/// The rack's registration proof: HMAC-SHA256 keyed by the secret over `label ‖ nonce ‖
/// certificate fingerprint ‖ rack name`. Binding the name stops a captured proof from
/// registering a rack under another name; binding the fingerprint tells the region which
/// certificate the rack was shown, so one substituted on the way is refused.
pub fn registration_proof(
    secret: &Secret,
    nonce: &[u8],
    certificate_sha256: &[u8; CERTIFICATE_SHA256_LEN_BYTES],
    rack_name: &str,
) -> [u8; 32] {
    rack_proof_mac(secret, nonce, certificate_sha256, rack_name).finalize().into_bytes().into()
}

/// Checks a registration proof in constant time.
pub fn verify_registration_proof(
    secret: &Secret,
    nonce: &[u8],
    certificate_sha256: &[u8; CERTIFICATE_SHA256_LEN_BYTES],
    rack_name: &str,
    proof: &[u8],
) -> bool {
    rack_proof_mac(secret, nonce, certificate_sha256, rack_name).verify_slice(proof).is_ok()
}

/// The region's answer to a right proof: HMAC-SHA256 keyed by the secret over `label ‖ nonce ‖
/// certificate fingerprint ‖ rack name ‖ 0 ‖ rack id`. Only a holder of the secret can make it,
/// so a rack that checks it knows the fingerprint it is about to pin is the region's own and
/// not one a man in the middle put into the challenge.
pub fn region_proof(
    secret: &Secret,
    nonce: &[u8],
    certificate_sha256: &[u8; CERTIFICATE_SHA256_LEN_BYTES],
    rack_name: &str,
    rack_id: &str,
) -> [u8; 32] {
    region_proof_mac(secret, nonce, certificate_sha256, rack_name, rack_id).finalize().into_bytes().into()
}

/// Checks the region's answer in constant time.
pub fn verify_region_proof(
    secret: &Secret,
    nonce: &[u8],
    certificate_sha256: &[u8; CERTIFICATE_SHA256_LEN_BYTES],
    rack_name: &str,
    rack_id: &str,
    proof: &[u8],
) -> bool {
    region_proof_mac(secret, nonce, certificate_sha256, rack_name, rack_id).verify_slice(proof).is_ok()
}

fn secret_mac(secret: &Secret) -> Hmac<Sha256> {
    // The key is the secret's text, so an operator can reproduce a proof with openssl.
    Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes keys of any length")
}

fn rack_proof_mac(secret: &Secret, nonce: &[u8], certificate_sha256: &[u8], rack_name: &str) -> Hmac<Sha256> {
    let mut mac = secret_mac(secret);
    mac.update(RACK_PROOF_LABEL);
    mac.update(nonce);
    mac.update(certificate_sha256);
    mac.update(rack_name.as_bytes());
    mac
}

fn region_proof_mac(
    secret: &Secret,
    nonce: &[u8],
    certificate_sha256: &[u8],
    rack_name: &str,
    rack_id: &str,
) -> Hmac<Sha256> {
    let mut mac = secret_mac(secret);
    mac.update(REGION_PROOF_LABEL);
    mac.update(nonce);
    mac.update(certificate_sha256);
    // A rack name never holds a 0 byte (see `validate_rack_name`), so the two cannot run together.
    mac.update(rack_name.as_bytes());
    mac.update(&[0]);
    mac.update(rack_id.as_bytes());
    mac
}

/// The value of the `Authorization` header a registered rack sends: `Rack ID:CREDENTIAL`.
pub fn rack_authorization(rack_id: &str, credential: &str) -> String {
    format!("Rack {rack_id}:{credential}")
}

/// Every API error is this JSON body with a non-2xx status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What is wrong, for a person.
    pub error: String,
    /// A stable machine-readable code where a client must act on it, e.g. [`CODE_REREGISTER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChallengeRequest {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChallengeResponse {
    /// Hex of [`NONCE_LEN_BYTES`] random bytes, valid once and for a short time.
    pub nonce: String,
    /// Hex of [`certificate_sha256`] of the region's TLS certificate. Sent in clear and
    /// trusted only once the region's [`RegisterResponse::region_proof`] covers it. Absent from
    /// regions that do not serve TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterRequest {
    pub name: String,
    pub nonce: String,
    /// Hex of [`registration_proof`].
    pub proof: String,
    /// Which proof `proof` is: [`REGISTRATION_PROOF_VERSION`]; absent (1) from rackd before TLS.
    #[serde(default = "proof_version_before_tls")]
    pub proof_version: u32,
}

fn proof_version_before_tls() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    pub rack_id: String,
    /// The rack's credential for every later call; the region keeps only its hash.
    pub credential: String,
    /// The region's cluster name, for the rack's status output.
    pub cluster_name: String,
    /// Hex of [`region_proof`]: the rack checks it before it pins the certificate.
    pub region_proof: String,
}

/// What a rack reports about itself every heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RackHealth {
    pub version: String,
    pub uptime_s: u64,
    /// One-minute load average divided by the number of CPUs (1.0 = fully busy).
    pub cpu_load: f64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    pub addresses: Vec<String>,
    /// `MemTotal` of /proc/meminfo; 0 from racks older than this field (or that cannot read it).
    #[serde(default)]
    pub memory_total_bytes: u64,
    /// `MemAvailable` of /proc/meminfo: what could be used without swapping.
    #[serde(default)]
    pub memory_available_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatRequest {
    pub health: RackHealth,
    /// Absent from racks that do not sync yet.
    #[serde(default)]
    pub sync: Option<images::SyncReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    /// How often the region wants heartbeats; the rack may send more often.
    pub heartbeat_interval_ms: u64,
    /// The region does not know what the snapshot the heartbeat named holds: send it with
    /// `PUT /rack/snapshot`.
    #[serde(default)]
    pub snapshot_wanted: bool,
}

/// A rack controller as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RackView {
    pub id: String,
    pub name: String,
    pub state: RackState,
    pub registered_at_ms: i64,
    pub last_seen_ms: Option<i64>,
    pub health: Option<RackHealth>,
    pub remote_address: Option<String>,
    pub sync_policy: images::SyncPolicy,
    pub sync: Option<images::SyncReport>,
    /// Files in the rack's current snapshot, as it last sent them (0 until it has).
    #[serde(default)]
    pub snapshot_files: u64,
}

/// One page of the rack list (`GET /racks?offset=&limit=`), by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RackPage {
    pub racks: Vec<RackView>,
    /// Racks registered, on every page.
    pub total: u64,
}

/// Racks one list page holds by default: what the controllers page shows at once.
pub const RACK_PAGE_DEFAULT: u32 = 100;

/// Racks one list page holds at most: a site is sized for 1,000 racks, so a client may still
/// take them all in one request (~1 KiB of JSON each, ~1 MiB), but never more than that.
pub const RACK_PAGE_MAX: u32 = 1000;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RackState {
    Online,
    Offline,
    /// Registered under a secret that has since changed.
    NeedsReregistration,
}

impl RackState {
    pub fn label(self) -> &'static str {
        match self {
            RackState::Online => "online",
            RackState::Offline => "offline",
            RackState::NeedsReregistration => "needs re-registration",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventView {
    pub id: i64,
    pub at_ms: i64,
    pub kind: String,
    pub actor: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccountView {
    pub username: String,
    pub email: String,
    pub is_admin: bool,
    pub ssh_keys: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn secret_accepts_32_hex_with_whitespace_and_upper_case() {
        let secret = Secret::parse("  00112233445566778899AABBCCDDEEFF\n").unwrap();
        assert_eq!(secret.expose(), SECRET);
    }

    #[test]
    fn secret_rejects_wrong_length() {
        assert_eq!(Secret::parse("abc"), Err(SecretError::Length { found: 3 }));
        assert_eq!(Secret::parse(&format!("{SECRET}0")), Err(SecretError::Length { found: 33 }));
        assert_eq!(Secret::parse(""), Err(SecretError::Length { found: 0 }));
    }

    #[test]
    fn secret_rejects_non_hex() {
        let err = Secret::parse("0011223344556677889zaabbccddeeff").unwrap_err();
        assert_eq!(err, SecretError::NotHex { found: 'z', position: 19 });
        assert!(err.to_string().contains("hex"));
    }

    #[test]
    fn secret_debug_hides_value() {
        let secret = Secret::parse(SECRET).unwrap();
        assert!(!format!("{secret:?}").contains("0011"));
    }

    const FINGERPRINT: [u8; 32] = [0xab; 32];

    #[test]
    fn proof_matches_reference_hmac() {
        // Reference: { printf 'metalrack rack proof v2\0nonce-1'; head -c 32 /dev/zero | tr '\0' '\253';
        //   printf 'rack-a'; } | openssl dgst -sha256 -hmac 00112233445566778899aabbccddeeff
        let secret = Secret::parse(SECRET).unwrap();
        let proof = registration_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-a");
        assert_eq!(hex::encode(proof), REFERENCE_PROOF);
        assert!(verify_registration_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-a", &proof));
    }

    // Computed independently with openssl (see proof_matches_reference_hmac).
    const REFERENCE_PROOF: &str = "7bff10cb734400d19392bc77db09fcfd2af5f539842df1d02d0701633648a824";

    #[test]
    fn region_proof_matches_reference_hmac() {
        // Reference: { printf 'metalrack region proof v2\0nonce-1'; head -c 32 /dev/zero | tr '\0' '\253';
        //   printf 'rack-a\0r1'; } | openssl dgst -sha256 -hmac 00112233445566778899aabbccddeeff
        let secret = Secret::parse(SECRET).unwrap();
        let proof = region_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-a", "r1");
        assert_eq!(hex::encode(proof), "3b671a37cc53935c65cad30a98e9d208167d74671ddbaa7fac2860a2762659f9");
        assert!(verify_region_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-a", "r1", &proof));
    }

    #[test]
    fn proof_fails_for_other_secret_nonce_name_or_certificate() {
        let secret = Secret::parse(SECRET).unwrap();
        let other = Secret::parse("ffeeddccbbaa99887766554433221100").unwrap();
        let other_certificate = [0xcd; 32];
        let proof = registration_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-a");
        assert!(!verify_registration_proof(&other, b"nonce-1", &FINGERPRINT, "rack-a", &proof));
        assert!(!verify_registration_proof(&secret, b"nonce-2", &FINGERPRINT, "rack-a", &proof));
        assert!(!verify_registration_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-b", &proof));
        assert!(!verify_registration_proof(&secret, b"nonce-1", &other_certificate, "rack-a", &proof));
        assert!(!verify_registration_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-a", &proof[..31]));
    }

    #[test]
    fn region_proof_is_not_a_rack_proof_and_binds_the_rack_id() {
        let secret = Secret::parse(SECRET).unwrap();
        let answer = region_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-a", "r1");
        assert!(!verify_registration_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-a", &answer));
        assert!(!verify_region_proof(&secret, b"nonce-1", &FINGERPRINT, "rack-a", "r2", &answer));
        assert!(!verify_region_proof(&secret, b"nonce-1", &[0xcd; 32], "rack-a", "r1", &answer));
    }

    #[test]
    fn a_register_request_without_a_version_is_a_version_1_proof() {
        let old: RegisterRequest = serde_json::from_str(r#"{"name":"a","nonce":"00","proof":"00"}"#).unwrap();
        assert_eq!(old.proof_version, 1);
    }

    #[test]
    fn rack_names() {
        assert!(validate_rack_name("rack-01.dc1_a").is_ok());
        assert!(validate_rack_name("").is_err());
        assert!(validate_rack_name("a b").is_err());
        assert!(validate_rack_name(&"a".repeat(64)).is_err());
    }
}
