//! How a client trusts the region's certificate by its SHA-256 (the fingerprint racks pin at
//! registration and operators give `imgtool --region-cert-sha256`), as a rustls client config.
//! Shared by rackd and imgtool so both check a pin the same way; computation only, no I/O, and
//! compiled only with the `tls-client` feature so the region does not build what it never uses.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use crate::{certificate_sha256, CERTIFICATE_SHA256_LEN_BYTES};

/// Which region certificate a client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionTrust {
    /// Exactly the certificate with this SHA-256 (DER).
    Pinned([u8; CERTIFICATE_SHA256_LEN_BYTES]),
    /// Any certificate: only for the registration challenge to an `https://` URL, whose request
    /// holds nothing secret and whose answer is believed only once the region's HMAC covers it.
    NothingYet,
}

/// The pinned verifier's refusal, carried inside rustls' (and so reqwest's) errors: find it
/// with [`find_pin_mismatch`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("the certificate's sha256 is {presented}, the pinned one {pinned}")]
pub struct PinMismatch {
    pub pinned: String,
    pub presented: String,
}

/// The [`PinMismatch`] somewhere in `error`'s chain. An `io::Error`'s `source()` skips the
/// error it wraps, so those are opened by hand.
pub fn find_pin_mismatch<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a PinMismatch> {
    if let Some(mismatch) = error.downcast_ref::<PinMismatch>() {
        return Some(mismatch);
    }
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) =
        error.downcast_ref::<rustls::Error>()
    {
        if let Some(mismatch) = inner.downcast_ref::<PinMismatch>() {
            return Some(mismatch);
        }
    }
    if let Some(inner) = error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        if let Some(mismatch) = find_pin_mismatch(inner) {
            return Some(mismatch);
        }
    }
    error.source().and_then(find_pin_mismatch)
}

/// A fingerprint as operators copy it: 64 hex digits, with or without `openssl`'s colons.
pub fn parse_certificate_sha256(text: &str) -> Option<[u8; CERTIFICATE_SHA256_LEN_BYTES]> {
    let digits: String = text.trim().chars().filter(|&c| c != ':').collect();
    hex::decode(digits).ok()?.try_into().ok()
}

/// A TLS client config (ring, the safe default versions, no client certificate) that accepts
/// the region's certificate as `trust` says.
pub fn client_config(trust: RegionTrust) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier { trust, provider }))
        .with_no_client_auth()
}

/// Checks the region's certificate against a pin instead of names and authorities: what is
/// trusted is what the operator (or the secret's HMAC, for a rack) vouched for. The handshake's
/// signature is still checked, so the peer holds the pinned certificate's key.
#[derive(Debug)]
struct PinnedVerifier {
    trust: RegionTrust,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let RegionTrust::Pinned(pinned) = self.trust else { return Ok(ServerCertVerified::assertion()) };
        let presented = certificate_sha256(end_entity);
        if presented == pinned {
            return Ok(ServerCertVerified::assertion());
        }
        let mismatch = PinMismatch { pinned: hex::encode(pinned), presented: hex::encode(presented) };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(mismatch)))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_as_logged_and_as_openssl_prints_them() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_certificate_sha256(&plain), Some([0xab; 32]));
        assert_eq!(parse_certificate_sha256(&format!(" {colons}\n")), Some([0xab; 32]));
        for bad in ["", "ab", &"ab".repeat(33), &"zz".repeat(32)] {
            assert_eq!(parse_certificate_sha256(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_pin_mismatch_is_found_inside_the_errors_that_carry_it() {
        let mismatch = PinMismatch { pinned: "aa".into(), presented: "bb".into() };
        let tls = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(mismatch))));
        let io = std::io::Error::other(tls);
        assert_eq!(find_pin_mismatch(&io).map(|m| m.presented.as_str()), Some("bb"));
        assert!(find_pin_mismatch(&std::io::Error::other("unrelated")).is_none());
    }
}
