//! The lab's virtual BMC: a Redfish subset over HTTP or HTTPS (self-signed) with Basic auth that
//! powers one machine on and off and sets its next boot device, so the rack's Redfish driver
//! meets a real HTTP peer with real etags and real errors.
//!
//! The machine is behind [`PoweredMachine`]: [`QemuMachine`] runs QEMU in a lab (power on =
//! start QEMU, off = stop it, a guest that powers itself off reads as Off), and the simulated
//! fleet can plug in its own machines.
//!
//! Served: `GET /redfish/v1` (service root), `GET /redfish/v1/Systems` (one member),
//! `GET`/`PATCH /redfish/v1/Systems/{id}` (`PowerState`, `Boot`, `@odata.etag`, `If-Match`),
//! `POST /redfish/v1/Systems/{id}/Actions/ComputerSystem.Reset`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::lab::Lab;
use crate::qemu::{BootFrom, BootOrder, GuestReboot, Machine, MachineSpec, QemuError};

/// Largest request body: a `PATCH` of `Boot` or a reset is under 200 bytes; anything near this
/// is not a Redfish client of ours.
pub const BMC_BODY_BYTES_MAX: usize = 16 * 1024;

/// Connections open at once. A BMC has one or two clients (the rack's driver, a test); real BMCs
/// allow a handful too. Each costs a task and hyper's buffers (~10 KiB).
pub const BMC_CONNECTIONS_MAX: usize = 32;

/// A request's headers must arrive within this (also the keep-alive idle limit).
pub const BMC_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS handshake must end within this.
pub const BMC_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The system id when the config does not name one (many BMCs call their only system `1`).
pub const SYSTEM_ID_DEFAULT: &str = "1";

/// The realm of the `WWW-Authenticate` challenge.
const AUTH_REALM: &str = "metalrack-lab-bmc";

/// Redfish's service root.
const SERVICE_ROOT: &str = "/redfish/v1";

/// The targets this BMC offers (`BootSourceOverrideTarget@Redfish.AllowableValues`).
const BOOT_TARGETS: [&str; 3] = ["None", "Pxe", "Hdd"];
/// The reset types this BMC accepts.
const RESET_TYPES: [&str; 5] = ["On", "ForceOff", "GracefulShutdown", "ForceRestart", "PowerCycle"];

/// Why a machine could not do what the BMC asked; its text goes to the client and the log.
pub type MachineError = Box<dyn std::error::Error + Send + Sync>;

/// What a BMC drives. Calls may block (QEMU takes half a second to start): the BMC makes them on
/// a blocking thread, one at a time.
pub trait PoweredMachine: Send + 'static {
    /// Starts the machine with `boot` as its boot order; a machine that is on stays on.
    fn power_on(&mut self, boot: BootOrder) -> Result<(), MachineError>;
    /// Pulls the plug; a machine that is off stays off.
    fn power_off(&mut self) -> Result<(), MachineError>;
    /// Whether it runs now (a guest that powered itself off is off).
    fn is_on(&mut self) -> bool;
}

/// A QEMU machine in a lab, behind a BMC.
pub struct QemuMachine {
    lab: Arc<Lab>,
    tap: String,
    spec: MachineSpec,
    log_dir: PathBuf,
    running: Option<Machine>,
}

impl std::fmt::Debug for QemuMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuMachine").field("tap", &self.tap).field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl QemuMachine {
    /// A machine that is off. Its guest reboots like hardware does ([`GuestReboot::Restart`]):
    /// only a power off (by the BMC or the guest) ends QEMU.
    pub fn new(lab: Arc<Lab>, tap: impl Into<String>, spec: MachineSpec, log_dir: impl Into<PathBuf>) -> QemuMachine {
        let spec = MachineSpec { guest_reboot: GuestReboot::Restart, ..spec };
        QemuMachine { lab, tap: tap.into(), spec, log_dir: log_dir.into(), running: None }
    }

    /// The QEMU of the last power on, if there was one since the last power off (it may have
    /// ended by itself: see [`Machine::is_running`]).
    pub fn machine(&mut self) -> Option<&mut Machine> {
        self.running.as_mut()
    }
}

impl PoweredMachine for QemuMachine {
    fn power_on(&mut self, boot: BootOrder) -> Result<(), MachineError> {
        if self.is_on() {
            return Ok(());
        }
        // A QEMU that ended by itself is reaped before its successor takes the tap.
        self.running = None;
        let spec = MachineSpec { boot, ..self.spec.clone() };
        let machine = Machine::power_on(&self.lab, &self.tap, &spec, &self.log_dir)
            .map_err(|error: QemuError| -> MachineError { Box::new(error) })?;
        self.running = Some(machine);
        Ok(())
    }

    fn power_off(&mut self) -> Result<(), MachineError> {
        if let Some(mut machine) = self.running.take() {
            machine.power_off();
        }
        Ok(())
    }

    fn is_on(&mut self) -> bool {
        self.running.as_mut().is_some_and(Machine::is_running)
    }
}

/// A machine that is only its power state: what a BMC test or a simulated fleet plugs in when no
/// guest needs to run. Clones share the machine, so a test keeps one to watch what the BMC did.
#[derive(Debug, Clone, Default)]
pub struct SimulatedMachine {
    inner: Arc<Mutex<SimulatedState>>,
}

#[derive(Debug, Default)]
struct SimulatedState {
    on: bool,
    /// The boot order of each power on, oldest first; bounded by [`SIMULATED_STARTS_KEPT`].
    starts: std::collections::VecDeque<BootOrder>,
}

/// Power-on records a [`SimulatedMachine`] keeps (the oldest go first): a test looks at the last
/// few, and a long-running simulated fleet must not grow without end.
pub const SIMULATED_STARTS_KEPT: usize = 64;

impl SimulatedMachine {
    /// A machine that is off.
    pub fn new() -> SimulatedMachine {
        SimulatedMachine::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimulatedState> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether it is on.
    pub fn on(&self) -> bool {
        self.state().on
    }

    /// The guest powers itself off (a `poweroff` inside it).
    pub fn guest_power_off(&self) {
        self.state().on = false;
    }

    /// The boot orders it was started with, oldest first.
    pub fn starts(&self) -> Vec<BootOrder> {
        self.state().starts.iter().copied().collect()
    }
}

impl PoweredMachine for SimulatedMachine {
    fn power_on(&mut self, boot: BootOrder) -> Result<(), MachineError> {
        let mut state = self.state();
        if !state.on {
            state.on = true;
            if state.starts.len() == SIMULATED_STARTS_KEPT {
                state.starts.pop_front();
            }
            state.starts.push_back(boot);
        }
        Ok(())
    }

    fn power_off(&mut self) -> Result<(), MachineError> {
        self.state().on = false;
        Ok(())
    }

    fn is_on(&mut self) -> bool {
        self.state().on
    }
}

/// How clients reach the BMC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BmcTransport {
    Http,
    /// HTTPS with a fresh self-signed certificate for these names (like most BMCs ship).
    Https {
        names: Vec<String>,
    },
}

/// A BMC's settings.
#[derive(Clone)]
pub struct BmcConfig {
    pub username: String,
    pub password: String,
    /// The one member of `/redfish/v1/Systems`.
    pub system_id: String,
    pub transport: BmcTransport,
}

impl std::fmt::Debug for BmcConfig {
    // The password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BmcConfig")
            .field("username", &self.username)
            .field("system_id", &self.system_id)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl BmcConfig {
    /// Plain HTTP, system [`SYSTEM_ID_DEFAULT`].
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> BmcConfig {
        BmcConfig {
            username: username.into(),
            password: password.into(),
            system_id: SYSTEM_ID_DEFAULT.to_string(),
            transport: BmcTransport::Http,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BmcError {
    #[error("system id {system_id:?} is not one URL path segment")]
    SystemId { system_id: String },
    #[error("cannot use the BMC's listener")]
    Listener { source: std::io::Error },
    #[error("cannot make the BMC's self-signed certificate for {names:?}")]
    Certificate { names: Vec<String>, source: rcgen::Error },
    #[error("cannot set up TLS with the BMC's certificate")]
    Tls { source: rustls::Error },
}

/// `BootSourceOverrideTarget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BootTarget {
    None,
    Pxe,
    Hdd,
}

impl BootTarget {
    fn parse(text: &str) -> Option<BootTarget> {
        match text {
            "None" => Some(BootTarget::None),
            "Pxe" => Some(BootTarget::Pxe),
            "Hdd" => Some(BootTarget::Hdd),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            BootTarget::None => "None",
            BootTarget::Pxe => "Pxe",
            BootTarget::Hdd => "Hdd",
        }
    }

    fn device(self) -> Option<BootFrom> {
        match self {
            BootTarget::None => None,
            BootTarget::Pxe => Some(BootFrom::Network),
            BootTarget::Hdd => Some(BootFrom::Disk),
        }
    }
}

/// `BootSourceOverrideEnabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BootEnabled {
    Disabled,
    Once,
    Continuous,
}

impl BootEnabled {
    fn parse(text: &str) -> Option<BootEnabled> {
        match text {
            "Disabled" => Some(BootEnabled::Disabled),
            "Once" => Some(BootEnabled::Once),
            "Continuous" => Some(BootEnabled::Continuous),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            BootEnabled::Disabled => "Disabled",
            BootEnabled::Once => "Once",
            BootEnabled::Continuous => "Continuous",
        }
    }
}

/// The system's state as the BMC keeps it.
struct System {
    machine: Box<dyn PoweredMachine>,
    target: BootTarget,
    enabled: BootEnabled,
    /// Bumped on every change the BMC makes, so the etag changes with it.
    generation: u64,
}

impl System {
    /// The etag of the representation when the machine is `on` or not: the BMC's changes and the
    /// power state (which the guest can change on its own). Each request asks the machine once.
    fn etag(&self, on: bool) -> String {
        let power = if on { "on" } else { "off" };
        format!("\"{}-{power}\"", self.generation)
    }

    /// The boot order of the next power on; a `Once` override is consumed by it.
    ///
    /// QEMU keeps the order it was started with across the guest's own reboots, except that
    /// `-boot once=` holds for the first boot only and QEMU restores `order=` on the next reset.
    /// So `Once` becomes `once=` (the override lasts exactly one boot, even when the guest
    /// reboots), `Continuous` becomes `order=` (every boot of this start), and the next power on
    /// starts QEMU afresh from what is set then.
    ///
    /// Unlike a real board, an override set while the machine runs takes effect at the next power
    /// on or reset through the BMC, not at a reboot the guest does by itself (QEMU's order is
    /// fixed when it starts). The rack always follows `SetNextBoot` with an on or a cycle.
    fn next_boot_order(&mut self) -> BootOrder {
        let device = self.target.device();
        match (self.enabled, device) {
            (BootEnabled::Once, Some(device)) => {
                self.target = BootTarget::None;
                self.enabled = BootEnabled::Disabled;
                self.generation += 1;
                BootOrder { first: BootFrom::Network, once: Some(device) }
            }
            (BootEnabled::Continuous, Some(device)) => BootOrder { first: device, once: None },
            _ => BootOrder::default(),
        }
    }

    fn power_on(&mut self) -> Result<(), MachineError> {
        if self.machine.is_on() {
            return Ok(());
        }
        let boot = self.next_boot_order();
        self.generation += 1;
        self.machine.power_on(boot)
    }

    fn power_off(&mut self) -> Result<(), MachineError> {
        self.generation += 1;
        self.machine.power_off()
    }
}

struct Shared {
    username: String,
    password: String,
    system_id: String,
    system: Mutex<System>,
}

impl Shared {
    fn system_path(&self) -> String {
        format!("{SERVICE_ROOT}/Systems/{}", self.system_id)
    }

    /// Runs `f` on the system on a blocking thread (machines may block).
    async fn with_system<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut System) -> T + Send + 'static,
    ) -> Result<T, Response> {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut system = shared.system.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut system)
        })
        .await
        .map_err(|error| {
            tracing::error!(%error, "a BMC machine call panicked");
            redfish_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "the machine call failed")
        })
    }
}

/// A running BMC, which owns its machine. Dropping it stops serving; the machine is dropped once
/// the last request in flight ends (a [`QemuMachine`] then ends its QEMU). Power the machine off
/// through Redfish first when the moment QEMU ends matters.
pub struct BmcServer {
    address: SocketAddr,
    certificate_der: Option<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for BmcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BmcServer").field("address", &self.address).finish_non_exhaustive()
    }
}

impl BmcServer {
    /// Serves on `listener` (bound by the caller: port 0 in tests, or inside a lab's namespace
    /// with [`Lab::in_namespace`]). Must be called within a tokio runtime.
    pub fn start(
        listener: std::net::TcpListener,
        config: BmcConfig,
        machine: impl PoweredMachine,
    ) -> Result<BmcServer, BmcError> {
        let system_id = config.system_id.clone();
        if system_id.is_empty() || system_id.contains(['/', '?', '#', '%']) {
            return Err(BmcError::SystemId { system_id });
        }
        listener.set_nonblocking(true).map_err(|source| BmcError::Listener { source })?;
        let address = listener.local_addr().map_err(|source| BmcError::Listener { source })?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| BmcError::Listener { source })?;
        let (acceptor, certificate_der) = match &config.transport {
            BmcTransport::Http => (None, None),
            BmcTransport::Https { names } => {
                let (acceptor, der) = self_signed_acceptor(names)?;
                (Some(acceptor), Some(der))
            }
        };
        let shared = Arc::new(Shared {
            username: config.username,
            password: config.password,
            system_id,
            system: Mutex::new(System {
                machine: Box::new(machine),
                target: BootTarget::None,
                enabled: BootEnabled::Disabled,
                generation: 0,
            }),
        });
        let task = tokio::spawn(accept_loop(listener, acceptor, router(shared)));
        tracing::info!(%address, "lab BMC serving Redfish");
        Ok(BmcServer { address, certificate_der, task })
    }

    /// [`BmcServer::start`] on a listener bound to `address` in the calling thread's network
    /// namespace.
    pub fn bind(address: SocketAddr, config: BmcConfig, machine: impl PoweredMachine) -> Result<BmcServer, BmcError> {
        let listener = std::net::TcpListener::bind(address).map_err(|source| BmcError::Listener { source })?;
        BmcServer::start(listener, config, machine)
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://ADDR` or `https://ADDR`: the Redfish address to give the rack.
    pub fn url(&self) -> String {
        let scheme = if self.certificate_der.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.address)
    }

    /// The self-signed certificate (DER) when serving HTTPS.
    pub fn certificate_der(&self) -> Option<&[u8]> {
        self.certificate_der.as_deref()
    }
}

impl Drop for BmcServer {
    fn drop(&mut self) {
        // The accept loop owns every connection task (a JoinSet): aborting it ends them all.
        self.task.abort();
    }
}

fn self_signed_acceptor(names: &[String]) -> Result<(tokio_rustls::TlsAcceptor, Vec<u8>), BmcError> {
    let certificate_error = |source| BmcError::Certificate { names: names.to_vec(), source };
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(certificate_error)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "Metalrack lab BMC");
    let key = rcgen::KeyPair::generate().map_err(certificate_error)?;
    let certificate = params.self_signed(&key).map_err(certificate_error)?;
    let der = certificate.der().to_vec();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| BmcError::Tls { source })?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone().into()], key_der)
        .map_err(|source| BmcError::Tls { source })?;
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), der))
}

async fn accept_loop(listener: tokio::net::TcpListener, acceptor: Option<tokio_rustls::TlsAcceptor>, app: Router) {
    let connections = Arc::new(tokio::sync::Semaphore::new(BMC_CONNECTIONS_MAX));
    let mut tasks = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(BMC_HEADER_READ_TIMEOUT);
    loop {
        // Finished connection tasks are reaped so the set stays as large as the open connections.
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "lab BMC: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "lab BMC: connection refused, {BMC_CONNECTIONS_MAX} already open");
            continue;
        };
        let (app, http, acceptor) = (app.clone(), http.clone(), acceptor.clone());
        tasks.spawn(async move {
            match acceptor {
                None => serve_connection(stream, app, &http).await,
                Some(acceptor) => {
                    match tokio::time::timeout(BMC_TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, app, &http).await,
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "lab BMC: TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "lab BMC: TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

async fn serve_connection<I>(io: I, app: Router, http: &hyper::server::conn::http1::Builder)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if let Err(error) = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app)).await {
        tracing::debug!(%error, "lab BMC: connection ended with an error");
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(SERVICE_ROOT, get(service_root))
        .route(&format!("{SERVICE_ROOT}/"), get(service_root))
        .route(&format!("{SERVICE_ROOT}/Systems"), get(systems))
        .route(&format!("{SERVICE_ROOT}/Systems/{{id}}"), get(system_get).patch(system_patch))
        .route(&format!("{SERVICE_ROOT}/Systems/{{id}}/Actions/ComputerSystem.Reset"), post(system_reset))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), basic_auth))
        .layer(DefaultBodyLimit::max(BMC_BODY_BYTES_MAX))
        .with_state(shared)
}

/// A Redfish error body (`Base` message registry) with `status`.
fn redfish_error(status: StatusCode, message_id: &str, message: &str) -> Response {
    let id = format!("Base.1.8.{message_id}");
    let body = json!({
        "error": {
            "code": id,
            "message": message,
            "@Message.ExtendedInfo": [{ "MessageId": id, "Message": message }],
        }
    });
    (status, Json(body)).into_response()
}

async fn basic_auth(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Basic "))
        .and_then(|encoded| base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok());
    let expected = format!("{}:{}", shared.username, shared.password);
    let authorized = presented.is_some_and(|presented| bool::from(presented.ct_eq(expected.as_bytes())));
    if !authorized {
        let mut response =
            redfish_error(StatusCode::UNAUTHORIZED, "InsufficientPrivilege", "valid Basic credentials are required");
        let challenge = format!("Basic realm=\"{AUTH_REALM}\"");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_str(&challenge).expect("ASCII"));
        return response;
    }
    next.run(request).await
}

async fn not_found() -> Response {
    redfish_error(StatusCode::NOT_FOUND, "ResourceMissingAtURI", "no such resource on this BMC")
}

async fn service_root() -> Json<Value> {
    Json(json!({
        "@odata.id": SERVICE_ROOT,
        "@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot",
        "Id": "RootService",
        "Name": "Metalrack lab BMC",
        "RedfishVersion": "1.8.0",
        "Systems": { "@odata.id": format!("{SERVICE_ROOT}/Systems") },
    }))
}

async fn systems(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "@odata.id": format!("{SERVICE_ROOT}/Systems"),
        "@odata.type": "#ComputerSystemCollection.ComputerSystemCollection",
        "Name": "Computer System Collection",
        "Members@odata.count": 1,
        "Members": [{ "@odata.id": shared.system_path() }],
    }))
}

/// The system's representation with its `ETag` header.
fn system_response(shared: &Shared, system: &mut System) -> Response {
    let on = system.machine.is_on();
    let etag = system.etag(on);
    let power = if on { "On" } else { "Off" };
    let path = shared.system_path();
    let body = json!({
        "@odata.id": path,
        "@odata.type": "#ComputerSystem.v1_13_0.ComputerSystem",
        "@odata.etag": etag,
        "Id": shared.system_id,
        "Name": "Metalrack lab machine",
        "PowerState": power,
        "Boot": {
            "BootSourceOverrideTarget": system.target.name(),
            "BootSourceOverrideEnabled": system.enabled.name(),
            "BootSourceOverrideTarget@Redfish.AllowableValues": BOOT_TARGETS,
        },
        "Actions": {
            "#ComputerSystem.Reset": {
                "target": format!("{path}/Actions/ComputerSystem.Reset"),
                "ResetType@Redfish.AllowableValues": RESET_TYPES,
            }
        },
    });
    let mut response = Json(body).into_response();
    response.headers_mut().insert(header::ETAG, HeaderValue::from_str(&etag).expect("ASCII etag"));
    response
}

/// The 404 for a system id that is not this BMC's.
fn unknown_system(shared: &Shared, id: &str) -> Option<Response> {
    (id != shared.system_id)
        .then(|| redfish_error(StatusCode::NOT_FOUND, "ResourceMissingAtURI", "no such system on this BMC"))
}

async fn system_get(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if let Some(response) = unknown_system(&shared, &id) {
        return response;
    }
    let for_response = shared.clone();
    shared.with_system(move |system| system_response(&for_response, system)).await.unwrap_or_else(|error| error)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SystemPatch {
    #[serde(rename = "Boot")]
    boot: Option<BootPatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BootPatch {
    #[serde(rename = "BootSourceOverrideTarget")]
    target: Option<String>,
    #[serde(rename = "BootSourceOverrideEnabled")]
    enabled: Option<String>,
}

async fn system_patch(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(response) = unknown_system(&shared, &id) {
        return response;
    }
    let patch: SystemPatch = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(error) => {
            let message = format!("the body is not a writable ComputerSystem patch: {error}");
            return redfish_error(StatusCode::BAD_REQUEST, "MalformedJSON", &message);
        }
    };
    let boot = patch.boot.unwrap_or(BootPatch { target: None, enabled: None });
    let target = match boot.target.as_deref().map(|t| (t, BootTarget::parse(t))) {
        None => None,
        Some((_, Some(target))) => Some(target),
        Some((text, None)) => {
            let message = format!("BootSourceOverrideTarget {text:?} is not one of {BOOT_TARGETS:?}");
            return redfish_error(StatusCode::BAD_REQUEST, "PropertyValueNotInList", &message);
        }
    };
    let enabled = match boot.enabled.as_deref().map(|e| (e, BootEnabled::parse(e))) {
        None => None,
        Some((_, Some(enabled))) => Some(enabled),
        Some((text, None)) => {
            let message = format!("BootSourceOverrideEnabled {text:?} is not Disabled, Once or Continuous");
            return redfish_error(StatusCode::BAD_REQUEST, "PropertyValueNotInList", &message);
        }
    };
    let if_match = headers.get(header::IF_MATCH).map(|value| value.to_str().unwrap_or("").to_string());
    let for_response = shared.clone();
    shared
        .with_system(move |system| {
            if let Some(if_match) = if_match {
                let on = system.machine.is_on();
                let current = system.etag(on);
                let matches = if_match.split(',').map(str::trim).any(|tag| tag == "*" || tag == current);
                if !matches {
                    return redfish_error(
                        StatusCode::PRECONDITION_FAILED,
                        "PreconditionFailed",
                        "the If-Match etag is not the system's current one: read it again",
                    );
                }
            }
            if let Some(target) = target {
                system.target = target;
            }
            if let Some(enabled) = enabled {
                system.enabled = enabled;
            }
            system.generation += 1;
            system_response(&for_response, system)
        })
        .await
        .unwrap_or_else(|error| error)
}

#[derive(Deserialize)]
struct ResetBody {
    #[serde(rename = "ResetType")]
    reset_type: String,
}

async fn system_reset(State(shared): State<Arc<Shared>>, Path(id): Path<String>, body: Bytes) -> Response {
    if let Some(response) = unknown_system(&shared, &id) {
        return response;
    }
    let reset: ResetBody = match serde_json::from_slice(&body) {
        Ok(reset) => reset,
        Err(error) => {
            let message = format!("the body is not {{\"ResetType\": ...}}: {error}");
            return redfish_error(StatusCode::BAD_REQUEST, "MalformedJSON", &message);
        }
    };
    let reset_type = reset.reset_type;
    if !RESET_TYPES.contains(&reset_type.as_str()) {
        let message = format!("ResetType {reset_type:?} is not one of {RESET_TYPES:?}");
        return redfish_error(StatusCode::BAD_REQUEST, "ActionParameterValueNotInList", &message);
    }
    let outcome = shared
        .with_system(move |system| match reset_type.as_str() {
            "On" => system.power_on(),
            // The lab's QEMU has no monitor to press an ACPI power button through, and its guests
            // keep nothing worth a clean shutdown: a graceful shutdown is a hard one here.
            "ForceOff" | "GracefulShutdown" => system.power_off(),
            // Off, then on with the next boot order (a pending Once override applies).
            _ => system.power_off().and_then(|()| system.power_on()),
        })
        .await;
    match outcome {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(error)) => {
            let chain = metalrack_image_tools::error_chain(error.as_ref());
            tracing::warn!(error = %chain, "lab BMC: the machine refused a reset");
            redfish_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", &chain)
        }
        Err(response) => response,
    }
}

#[cfg(test)]
mod tests;
