//! The region's TLS identity: a certificate and key it makes on first start in `DATA/tls/` (or
//! the operator's own, `regiond serve --tls-cert FILE --tls-key FILE`), the rustls server
//! config built from them, and the certificate's SHA-256 fingerprint that racks pin at
//! registration (see `docs/SECURITY.md`, "TLS").
//!
//! ```text
//! DATA/tls/cert.pem   the generated certificate (self-signed; give it to curl as --cacert)
//! DATA/tls/key.pem    its private key (mode 0600)
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use metalrack_api::{certificate_sha256, CERTIFICATE_SHA256_LEN_BYTES};
use metalrack_image_tools::private_file::write_private_file;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Only HTTP/1.1 is served; saying so in ALPN keeps clients from offering h2.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Where a certificate and its key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// `DATA/tls/`, made on first start for `names` (host names and addresses, beside
    /// `localhost` and the loopback addresses) and kept from then on.
    Generated { names: Vec<String> },
    /// The operator's PEM files (`--tls-cert`, `--tls-key`), read at every start.
    Files { certificate: PathBuf, key: PathBuf },
}

/// What the listener and registration need of the certificate.
#[derive(Clone)]
pub struct TlsIdentity {
    pub server_config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the end-entity certificate (DER): what racks pin.
    pub certificate_sha256: [u8; CERTIFICATE_SHA256_LEN_BYTES],
    /// The PEM file the certificate was read from.
    pub certificate_path: PathBuf,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("certificate_sha256", &hex::encode(self.certificate_sha256))
            .field("certificate_path", &self.certificate_path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create {path}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot make a certificate for {names:?}")]
    Generate { names: Vec<String>, source: rcgen::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read a PEM certificate from {path}")]
    ReadCertificate { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read a PEM private key from {path}")]
    ReadKey { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("the certificate {certificate} and the key {key} do not make a TLS server")]
    Config { certificate: PathBuf, key: PathBuf, source: rustls::Error },
}

/// `DATA/tls/`.
pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The generated certificate, `DATA/tls/cert.pem`.
pub fn generated_certificate_path(data_dir: &Path) -> PathBuf {
    tls_dir(data_dir).join("cert.pem")
}

fn generated_key_path(data_dir: &Path) -> PathBuf {
    tls_dir(data_dir).join("key.pem")
}

/// The region's identity from `source`, making the certificate first if it is to be generated
/// and is not there yet.
pub fn load_or_create(data_dir: &Path, source: &TlsSource) -> Result<TlsIdentity, TlsError> {
    let (certificate, key) = match source {
        TlsSource::Files { certificate, key } => (certificate.clone(), key.clone()),
        TlsSource::Generated { names } => {
            let (certificate, key) = (generated_certificate_path(data_dir), generated_key_path(data_dir));
            // Both or neither: a key without its certificate (a crash between the writes) is
            // replaced, since nothing can have pinned a certificate that was never served.
            if !(certificate.exists() && key.exists()) {
                generate(data_dir, names)?;
                tracing::info!(path = %certificate.display(), "made the region's TLS certificate");
            }
            (certificate, key)
        }
    };
    load(&certificate, &key)
}

/// Host names and addresses the generated certificate is made for: the loopback names, this
/// machine's hostname, and `extra` (the config's `tls_names`, the listen address).
pub fn default_names(listen: IpAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if let Ok(host) = nix::unistd::gethostname() {
        names.push(host.to_string_lossy().into_owned());
    }
    if !listen.is_unspecified() {
        names.push(listen.to_string());
    }
    names.extend(extra.iter().cloned());
    names.retain(|n| !n.is_empty());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

fn generate(data_dir: &Path, names: &[String]) -> Result<(), TlsError> {
    let dir = tls_dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|source| TlsError::CreateDir { path: dir.clone(), source })?;
    let generate_error = |source| TlsError::Generate { names: names.to_vec(), source };
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(generate_error)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "Metalrack region");
    let key = rcgen::KeyPair::generate().map_err(generate_error)?;
    let certificate = params.self_signed(&key).map_err(generate_error)?;
    // The key first: a certificate on disk means its key is there too.
    let key_path = generated_key_path(data_dir);
    write_private_file(&key_path, key.serialize_pem().as_bytes())
        .map_err(|source| TlsError::Write { path: key_path, source })?;
    let certificate_path = generated_certificate_path(data_dir);
    write_private_file(&certificate_path, certificate.pem().as_bytes())
        .map_err(|source| TlsError::Write { path: certificate_path, source })
}

/// The SHA-256 of the end-entity certificate in a PEM file (the first one): what racks pin and
/// `regiond tls show` prints.
pub fn certificate_file_sha256(certificate_path: &Path) -> Result<[u8; CERTIFICATE_SHA256_LEN_BYTES], TlsError> {
    let chain = read_chain(certificate_path)?;
    Ok(certificate_sha256(&chain[0]))
}

/// The certificates of a PEM file, leaf first; at least one.
fn read_chain(certificate_path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_certificate = |source| TlsError::ReadCertificate { path: certificate_path.to_owned(), source };
    let chain = CertificateDer::pem_file_iter(certificate_path)
        .map_err(read_certificate)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_certificate)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: certificate_path.to_owned() });
    }
    Ok(chain)
}

fn load(certificate_path: &Path, key_path: &Path) -> Result<TlsIdentity, TlsError> {
    let chain = read_chain(certificate_path)?;
    let certificate_sha256 = certificate_sha256(&chain[0]);
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|source| TlsError::ReadKey { path: key_path.to_owned(), source })?;
    let config_error =
        |source| TlsError::Config { certificate: certificate_path.to_owned(), key: key_path.to_owned(), source };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(TlsIdentity {
        server_config: Arc::new(config),
        certificate_sha256,
        certificate_path: certificate_path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_kept_and_the_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let source = TlsSource::Generated { names: vec!["localhost".into(), "10.0.0.1".into()] };
        let first = load_or_create(dir.path(), &source).unwrap();
        let second = load_or_create(dir.path(), &source).unwrap();
        assert_eq!(first.certificate_sha256, second.certificate_sha256, "kept across restarts");
        let shown = certificate_file_sha256(&generated_certificate_path(dir.path())).unwrap();
        assert_eq!(shown, first.certificate_sha256, "the fingerprint shown is the one served");
        let mode = std::fs::metadata(generated_key_path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(tls_dir(dir.path())).unwrap();
        let third = load_or_create(dir.path(), &source).unwrap();
        assert_ne!(first.certificate_sha256, third.certificate_sha256, "a new one after the old is removed");
    }

    #[test]
    fn own_files_are_used_as_given_and_bad_ones_say_which() {
        let dir = tempfile::tempdir().unwrap();
        let generated = load_or_create(dir.path(), &TlsSource::Generated { names: vec!["r".into()] }).unwrap();
        let own = TlsSource::Files {
            certificate: generated_certificate_path(dir.path()),
            key: generated_key_path(dir.path()),
        };
        let other_dir = tempfile::tempdir().unwrap();
        assert_eq!(load_or_create(other_dir.path(), &own).unwrap().certificate_sha256, generated.certificate_sha256);
        assert!(!tls_dir(other_dir.path()).exists(), "nothing generated when files are given");
        let missing =
            TlsSource::Files { certificate: dir.path().join("nope.pem"), key: generated_key_path(dir.path()) };
        let err = load_or_create(other_dir.path(), &missing).unwrap_err();
        assert!(matches!(err, TlsError::ReadCertificate { .. }), "{err}");
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }

    #[test]
    fn default_names_hold_loopback_the_listen_address_and_extras_once() {
        let names = default_names("10.1.2.3".parse().unwrap(), &["region.example".into(), "localhost".into()]);
        for name in ["localhost", "127.0.0.1", "::1", "10.1.2.3", "region.example"] {
            assert_eq!(names.iter().filter(|n| *n == name).count(), 1, "{name} in {names:?}");
        }
        assert!(!default_names("0.0.0.0".parse().unwrap(), &[]).contains(&"0.0.0.0".to_owned()));
    }
}
