//! How `imgtool` trusts the region over HTTPS: by a PEM file of certificates to trust (the
//! region's own `DATA/tls/cert.pem`, or the authority that signed the operator's certificate;
//! names are checked) or by the certificate's SHA-256 (checked exactly, as racks pin it, with
//! the same code: `metalrack_api::tls_pin`). There is no fallback to clear HTTP or to trusting
//! whatever answers: the API key goes in every request.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use metalrack_api::tls_pin::{self, RegionTrust};
use metalrack_api::CERTIFICATE_SHA256_LEN_BYTES;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// What the operator told imgtool to trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionCertificate {
    /// Certificates (PEM) the region's chain must end in; its name must match the URL's host.
    Authority(PathBuf),
    /// Exactly the certificate with this SHA-256 (DER), whatever names it holds.
    Sha256([u8; CERTIFICATE_SHA256_LEN_BYTES]),
}

impl RegionCertificate {
    /// From the two options; clap lets through at most one, and at least one.
    pub fn from_options(ca_cert: Option<PathBuf>, sha256: Option<&str>) -> anyhow::Result<RegionCertificate> {
        match (ca_cert, sha256) {
            (Some(path), None) => Ok(RegionCertificate::Authority(path)),
            (None, Some(text)) => tls_pin::parse_certificate_sha256(text)
                .map(RegionCertificate::Sha256)
                .with_context(|| format!("--region-cert-sha256 {text:?} is not a SHA-256 (64 hex digits)")),
            _ => bail!("give one of --ca-cert FILE or --region-cert-sha256 HEX"),
        }
    }

    /// The rustls config that trusts the region as told.
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        match self {
            RegionCertificate::Sha256(pin) => Ok(tls_pin::client_config(RegionTrust::Pinned(*pin))),
            RegionCertificate::Authority(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(read_certificates(path)?);
                if added == 0 {
                    bail!("--ca-cert {}: no certificate in it can be trusted", path.display());
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                Ok(rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth())
            }
        }
    }

    /// What to tell the operator when the handshake refused the region's certificate; `None`
    /// when `error` is about something else (the region down, a wrong port).
    pub fn refusal(&self, error: &(dyn std::error::Error + 'static)) -> Option<String> {
        if let Some(mismatch) = tls_pin::find_pin_mismatch(error) {
            return Some(format!(
                "the region presents a certificate with sha256 {}, not the {} given by --region-cert-sha256; \
                 'regiond tls show' on the region prints its fingerprint",
                mismatch.presented, mismatch.pinned
            ));
        }
        let reason = find_certificate_error(error)?;
        Some(match self {
            RegionCertificate::Authority(path) => format!(
                "the region's certificate is not trusted by --ca-cert {} ({reason:?}); give the region's \
                 DATA/tls/cert.pem (or its authority), and a URL host the certificate names, or pin it with \
                 --region-cert-sha256",
                path.display()
            ),
            RegionCertificate::Sha256(_) => format!("the region's certificate is refused ({reason:?})"),
        })
    }
}

fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let context = || format!("--ca-cert {}: cannot read PEM certificates", path.display());
    let certificates = CertificateDer::pem_file_iter(path)
        .with_context(context)?
        .collect::<Result<Vec<_>, _>>()
        .with_context(context)?;
    if certificates.is_empty() {
        bail!("--ca-cert {}: holds no PEM certificate", path.display());
    }
    Ok(certificates)
}

/// The rustls certificate error somewhere in `error`'s chain (inside an `io::Error`, whose
/// `source()` skips what it wraps, as reqwest nests it).
fn find_certificate_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::CertificateError> {
    if let Some(rustls::Error::InvalidCertificate(reason)) = error.downcast_ref::<rustls::Error>() {
        return Some(reason);
    }
    if let Some(inner) = error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        if let Some(reason) = find_certificate_error(inner) {
            return Some(reason);
        }
    }
    error.source().and_then(find_certificate_error)
}

/// The region URL imgtool calls: `https://` only. An `http://` one is refused rather than
/// upgraded, so a script or `METALRACK_URL` that still says `http://` is fixed once, in the open,
/// instead of the operator believing the key goes in clear (or that it never did).
pub fn https_base(url: &str) -> anyhow::Result<String> {
    let base = url.trim().trim_end_matches('/');
    if let Some(rest) = base.strip_prefix("http://") {
        bail!(
            "--url {base}: imgtool talks to the region over HTTPS only, so the API key never crosses the network \
             in clear; use --url https://{rest} (the region serves HTTPS on the same port)"
        );
    }
    if !base.starts_with("https://") {
        bail!("--url {base}: expected https://REGION:5240/MAAS");
    }
    Ok(base.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_and_the_http_one_says_what_to_use() {
        assert_eq!(https_base("https://r:5240/MAAS/").unwrap(), "https://r:5240/MAAS");
        let err = https_base("http://r:5240/MAAS").unwrap_err().to_string();
        assert!(err.contains("use --url https://r:5240/MAAS"), "{err}");
        assert!(https_base("r:5240/MAAS").is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = RegionCertificate::Authority(path).client_config().unwrap_err();
        assert!(format!("{err:#}").contains("empty.pem"), "{err:#}");
        let err = RegionCertificate::from_options(None, Some("abcd")).unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }
}
