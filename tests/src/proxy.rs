//! TCP middlemen: [`Forwarder`] carries an operator's browser from the host's namespace to a
//! region inside a site's namespace (`fleet run --ui-listen`). Between a rack and its region, on
//! 127.0.0.1 port 0, for the TLS tests:
//! [`Recorder`] passes bytes through unchanged and keeps them, so a test can see what crossed
//! the wire; [`Mitm`] is a man in the middle who knows everything but the secret: it rewrites the
//! certificate fingerprint in the registration challenge to its own, terminates TLS with its own
//! certificate, and then either relays to the region or answers the registration itself.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Bytes kept per connection and direction: heartbeats and registration are a few KiB; a test
/// that syncs images through a recorder keeps only the start of the stream.
pub const RECORDED_BYTES_MAX: usize = 4 << 20;

/// What one connection carried, each direction from its first byte.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    pub to_region: Vec<u8>,
    pub to_rack: Vec<u8>,
}

/// A pass-through proxy that records every connection.
#[derive(Debug)]
pub struct Recorder {
    /// `http://127.0.0.1:PORT/MAAS`: the region's URL through the proxy.
    pub url: String,
    connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Starts relaying to the region at `region_url` (`http://HOST:PORT/MAAS`).
    pub async fn start(region_url: &str) -> Recorder {
        let region = region_address(region_url);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/MAAS", listener.local_addr().unwrap());
        let connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>> = Arc::default();
        let all = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((rack, _)) = listener.accept().await {
                let recorded = Arc::new(Mutex::new(Recorded::default()));
                all.lock().unwrap().push(recorded.clone());
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(region).await else { return };
                    let (rack_read, rack_write) = rack.into_split();
                    let (region_read, region_write) = upstream.into_split();
                    let up = relay(rack_read, region_write, recorded.clone(), true);
                    let down = relay(region_read, rack_write, recorded, false);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Recorder { url, connections, task }
    }

    /// Every connection so far, in the order they were accepted.
    pub fn connections(&self) -> Vec<Recorded> {
        self.connections.lock().unwrap().iter().map(|c| c.lock().unwrap().clone()).collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    recorded: Arc<Mutex<Recorded>>,
    to_region: bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut recorded = recorded.lock().unwrap();
            let kept = if to_region { &mut recorded.to_region } else { &mut recorded.to_rack };
            let room = RECORDED_BYTES_MAX.saturating_sub(kept.len());
            kept.extend_from_slice(&buffer[..n.min(room)]);
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Connections a [`Forwarder`] carries at once: a browser opens a handful per tab; more wait in
/// the listener's backlog.
pub const FORWARDED_CONNECTIONS_MAX: usize = 64;

/// A plain TCP forwarder: whatever connects to its listener is joined to `upstream`, bytes
/// unchanged (TLS passes through end to end). The listener may belong to another network
/// namespace than the runtime it runs on: upstream connections are opened by the runtime's
/// threads, so they start in the runtime's namespace (a site's region namespace).
#[derive(Debug)]
pub struct Forwarder {
    /// Where it listens.
    pub local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Starts forwarding; must be called inside a tokio runtime.
    pub fn start(listener: std::net::TcpListener, upstream: SocketAddr) -> std::io::Result<Forwarder> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let slots = Arc::new(tokio::sync::Semaphore::new(FORWARDED_CONNECTIONS_MAX));
        let task = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let Ok((mut client, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let _slot = slot;
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Ok(Forwarder { local, task })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the man in the middle does with the registration that reaches him over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MitmMode {
    /// Relays it to the region (over TLS) and the answer back.
    Relay,
    /// Answers it himself with a credential of his own making, never asking the region.
    Forge,
}

/// A man in the middle with his own certificate.
#[derive(Debug)]
pub struct Mitm {
    /// `http://127.0.0.1:PORT/MAAS`: what the rack is told is the region.
    pub url: String,
    /// SHA-256 of the middleman's certificate, hex: what he puts into the challenge.
    pub certificate_sha256: String,
    task: tokio::task::JoinHandle<()>,
}

impl Mitm {
    /// Starts a middleman before the region at `region_url` whose certificate (to connect on to
    /// it over TLS) is `region_certificate_pem`.
    pub async fn start(region_url: &str, region_certificate_pem: &[u8], mode: MitmMode) -> Mitm {
        let region = region_address(region_url);
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().self_signed(&key).unwrap();
        let own_sha256 = hex::encode(metalrack_api::certificate_sha256(certificate.der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![certificate.der().clone()],
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(region_certificate_pem).unwrap()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let connector = TlsConnector::from(Arc::new(client));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/MAAS", listener.local_addr().unwrap());
        let fingerprint = own_sha256.clone();
        let task = tokio::spawn(async move {
            while let Ok((rack, _)) = listener.accept().await {
                let (acceptor, connector, fingerprint) = (acceptor.clone(), connector.clone(), fingerprint.clone());
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    if rack.peek(&mut first).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let Ok(upstream) = TcpStream::connect(region).await else { return };
                    if first[0] != 0x16 {
                        rewrite_challenge(rack, upstream, &fingerprint).await;
                        return;
                    }
                    let Ok(rack) = acceptor.accept(rack).await else { return };
                    match mode {
                        MitmMode::Forge => forge_registration(rack).await,
                        MitmMode::Relay => {
                            let name = ServerName::try_from("127.0.0.1").unwrap();
                            let Ok(region) = connector.connect(name, upstream).await else { return };
                            let (mut rack, mut region) = (rack, region);
                            let _ = tokio::io::copy_bidirectional(&mut rack, &mut region).await;
                        }
                    }
                });
            }
        });
        Mitm { url, certificate_sha256: own_sha256, task }
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays one clear request and its answer with every certificate fingerprint the region sent
/// replaced by `fingerprint` (the same length, so Content-Length holds), then the rest as is.
async fn rewrite_challenge(mut rack: TcpStream, mut region: TcpStream, fingerprint: &str) {
    let Some(request) = read_message(&mut rack).await else { return };
    if region.write_all(&request).await.is_err() {
        return;
    }
    let Some(answer) = read_message(&mut region).await else { return };
    let text = String::from_utf8_lossy(&answer).into_owned();
    let rewritten = match text.find("\"certificate_sha256\":\"") {
        Some(at) => {
            let start = at + "\"certificate_sha256\":\"".len();
            format!("{}{fingerprint}{}", &text[..start], &text[start + fingerprint.len()..])
        }
        None => text,
    };
    if rack.write_all(rewritten.as_bytes()).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut rack, &mut region).await;
}

/// Reads a registration request and answers it as a region would, but without the secret.
async fn forge_registration(mut rack: impl AsyncRead + AsyncWrite + Unpin) {
    if read_message(&mut rack).await.is_none() {
        return;
    }
    let body = serde_json::json!({
        "rack_id": "mitm",
        "credential": "chosen-by-the-man-in-the-middle",
        "cluster_name": "mitm",
        "region_proof": "00".repeat(32),
    })
    .to_string();
    let answer =
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let _ = rack.write_all(answer.as_bytes()).await;
    let _ = rack.flush().await;
}

/// One HTTP/1 message with a Content-Length body (all the rack and region send here).
async fn read_message(stream: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut message = Vec::new();
    let mut buffer = [0u8; 4096];
    let header_end = loop {
        if let Some(at) = message.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buffer).await.ok().filter(|n| *n > 0)?;
        message.extend_from_slice(&buffer[..n]);
    };
    let head = String::from_utf8_lossy(&message[..header_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |value| value.trim().parse().unwrap_or(0));
    while message.len() < header_end + length {
        let n = stream.read(&mut buffer).await.ok().filter(|n| *n > 0)?;
        message.extend_from_slice(&buffer[..n]);
    }
    Some(message)
}

/// `HOST:PORT` of an `http://HOST:PORT/MAAS` URL.
fn region_address(region_url: &str) -> SocketAddr {
    let rest = region_url.trim_start_matches("http://").trim_start_matches("https://");
    rest.split('/').next().unwrap().parse().expect("a region URL with an IP address and port")
}
