//! Power control of the rack's machines: the drivers ([`redfish`], [`ipmi`], [`manual`]) behind
//! one [`PowerControl`] trait, and [`run`], which carries out one of the region's
//! [`PowerRequest`]s and says what came of it.
//!
//! The region decides; the rack only runs requests, since BMC networks are rack-local. A
//! request's password lives in that request alone and never reaches a log: the drivers' `Debug`
//! leaves it out, IPMI gets it through the environment, and errors never quote it.

pub mod ipmi;
pub mod manual;
pub mod redfish;

use std::future::Future;
use std::time::Duration;

use metalrack_api::power::{
    BootDevice, PowerAction, PowerParameters, PowerRequest, PowerResult, PowerState, POWER_ERROR_BYTES_MAX,
};

/// The longest one action may take, whatever the driver. A Redfish call is a few requests of at
/// most [`redfish::REDFISH_REQUEST_TIMEOUT`] each, an IPMI call one `ipmitool` of at most
/// [`ipmi::IPMITOOL_TIMEOUT`]; a BMC slower than this is treated as failed so that one dead BMC
/// holds the rack's power loop for a bounded time.
pub const POWER_ACTION_TIMEOUT: Duration = Duration::from_secs(90);

/// Actions one request may carry; the region sends a handful (set the next boot, cycle, query).
/// More is a malformed request, refused before anything runs.
pub const POWER_ACTIONS_PER_REQUEST_MAX: usize = 16;

/// What a driver does to one machine (named apart from the wire's `PowerDriver`, which only says
/// which driver). The futures are `Send` so the rack's loop can run requests on any worker.
pub trait PowerControl {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Whether a successful on/off/cycle means the machine is now in that state. False for the
    /// manual driver, where a person is only asked to act.
    const CONFIRMS_POWER: bool;

    fn power_on(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Hard off.
    fn power_off(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Off then on when it is on; on when it is off.
    fn power_cycle(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn query(&self) -> impl Future<Output = Result<PowerState, Self::Error>> + Send;
    /// The device of the next boot only.
    fn set_next_boot(&self, device: BootDevice) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Why an action failed: the driver's error or the deadline.
#[derive(Debug, thiserror::Error)]
pub enum ActionError<E: std::error::Error + 'static> {
    #[error("power action {action} failed")]
    Driver { action: &'static str, source: E },
    #[error("power action {action} did not finish within {}s (POWER_ACTION_TIMEOUT)", timeout.as_secs())]
    Timeout { action: &'static str, timeout: Duration },
}

/// Why a request was refused before any action ran.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the power parameters are invalid: {reason}")]
    Parameters { reason: String },
    #[error("the request carries {n_actions} actions, more than {POWER_ACTIONS_PER_REQUEST_MAX}")]
    TooManyActions { n_actions: usize },
    #[error("cannot set up the Redfish driver")]
    Redfish { source: redfish::RedfishError },
}

/// Runs `request`'s actions in order, each within [`POWER_ACTION_TIMEOUT`], stopping at the first
/// failure; the result's error is that failure's chain, cut to [`POWER_ERROR_BYTES_MAX`].
pub async fn run(request: &PowerRequest) -> PowerResult {
    let driver = request.parameters.driver();
    tracing::info!(
        request_id = request.id,
        machine_id = %request.machine_id,
        ?driver,
        actions = ?request.actions,
        "running a power request"
    );
    let (state, error) = match prepare(request) {
        Err(error) => (PowerState::Unknown, Some(error_text(&error))),
        Ok(()) => match &request.parameters {
            PowerParameters::Redfish { address, username, password, system_id, trust_self_signed } => {
                match redfish::RedfishDriver::new(address, username, password, system_id.as_deref(), *trust_self_signed)
                {
                    Ok(driver) => run_actions(&driver, &request.actions).await,
                    Err(source) => (PowerState::Unknown, Some(error_text(&RequestError::Redfish { source }))),
                }
            }
            PowerParameters::Ipmi { address, port, username, password } => {
                let driver = ipmi::IpmiDriver::new(address, *port, username, password);
                run_actions(&driver, &request.actions).await
            }
            PowerParameters::Manual => {
                let driver = manual::ManualDriver::new(&request.machine_id, &request.mac);
                run_actions(&driver, &request.actions).await
            }
        },
    };
    match &error {
        None => tracing::info!(request_id = request.id, machine_id = %request.machine_id, ?state, "power request done"),
        Some(error) => {
            tracing::warn!(request_id = request.id, machine_id = %request.machine_id, %error, "power request failed")
        }
    }
    PowerResult { id: request.id, machine_id: request.machine_id.clone(), state, error }
}

fn prepare(request: &PowerRequest) -> Result<(), RequestError> {
    request.parameters.validate().map_err(|reason| RequestError::Parameters { reason })?;
    if request.actions.len() > POWER_ACTIONS_PER_REQUEST_MAX {
        return Err(RequestError::TooManyActions { n_actions: request.actions.len() });
    }
    Ok(())
}

/// Runs `actions` with `driver`: the state they leave (the last query's, or what the last
/// confirmed action implies) and the first error's text.
pub async fn run_actions<D: PowerControl>(driver: &D, actions: &[PowerAction]) -> (PowerState, Option<String>) {
    let mut state = PowerState::Unknown;
    for action in actions {
        match run_action(driver, *action).await {
            Ok(Some(new_state)) => state = new_state,
            Ok(None) => {}
            Err(error) => {
                if matches!(action, PowerAction::Query) {
                    state = PowerState::Error;
                }
                return (state, Some(error_text(&error)));
            }
        }
    }
    (state, None)
}

/// One action within [`POWER_ACTION_TIMEOUT`]: the state it leaves when it tells.
async fn run_action<D: PowerControl>(
    driver: &D,
    action: PowerAction,
) -> Result<Option<PowerState>, ActionError<D::Error>> {
    let name = action_name(action);
    let implied = |state| if D::CONFIRMS_POWER { Some(state) } else { None };
    let work = async {
        match action {
            PowerAction::On => driver.power_on().await.map(|()| implied(PowerState::On)),
            PowerAction::Off => driver.power_off().await.map(|()| implied(PowerState::Off)),
            PowerAction::Cycle => driver.power_cycle().await.map(|()| implied(PowerState::On)),
            PowerAction::Query => driver.query().await.map(Some),
            PowerAction::SetNextBoot(device) => driver.set_next_boot(device).await.map(|()| None),
        }
    };
    match tokio::time::timeout(POWER_ACTION_TIMEOUT, work).await {
        Ok(outcome) => outcome.map_err(|source| ActionError::Driver { action: name, source }),
        Err(_) => Err(ActionError::Timeout { action: name, timeout: POWER_ACTION_TIMEOUT }),
    }
}

fn action_name(action: PowerAction) -> &'static str {
    match action {
        PowerAction::On => "on",
        PowerAction::Off => "off",
        PowerAction::Cycle => "cycle",
        PowerAction::Query => "query",
        PowerAction::SetNextBoot(BootDevice::Pxe) => "set_next_boot(pxe)",
        PowerAction::SetNextBoot(BootDevice::Disk) => "set_next_boot(disk)",
    }
}

/// `error` and its sources joined with ": ", cut to [`POWER_ERROR_BYTES_MAX`] at a character
/// boundary.
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = metalrack_image_tools::error_chain(error);
    cut(&mut text, POWER_ERROR_BYTES_MAX);
    text
}

/// Cuts `text` to at most `max_bytes`, at a character boundary.
fn cut(text: &mut String, max_bytes: usize) {
    if text.len() > max_bytes {
        let mut end = max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn error_text_is_the_chain_cut_at_a_character_boundary() {
        let error = Outer { source: std::io::Error::other("inner") };
        assert_eq!(error_text(&error), "outer: inner");
        let long = Outer { source: std::io::Error::other("é".repeat(POWER_ERROR_BYTES_MAX)) };
        let text = error_text(&long);
        assert!(text.len() <= POWER_ERROR_BYTES_MAX);
        assert!(text.starts_with("outer: é"));
    }

    #[tokio::test]
    async fn invalid_parameters_are_refused_before_any_action() {
        let request = PowerRequest {
            boot_generation: 0,
            id: 7,
            machine_id: "m1".into(),
            mac: "52:54:00:00:00:01".into(),
            parameters: PowerParameters::Ipmi {
                address: "-oProxyCommand=x".into(),
                port: 623,
                username: "u".into(),
                password: "secret-password".into(),
            },
            actions: vec![PowerAction::On],
        };
        let result = run(&request).await;
        assert_eq!((result.id, result.state), (7, PowerState::Unknown));
        let error = result.error.unwrap();
        assert!(error.contains("IPMI address"), "{error}");
        assert!(!error.contains("secret-password"));
    }

    /// A log writer the test reads back.
    #[derive(Clone, Default)]
    struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for CapturedLog {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_password_is_in_no_log_line_of_a_failing_or_succeeding_request() {
        use metalrack_hardware::bmc::{BmcConfig, BmcServer, SimulatedMachine};
        let log = CapturedLog::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        // The runtime has one thread, so everything of the request logs through this subscriber.
        let _guard = tracing::subscriber::set_default(subscriber);
        let password = "password-that-must-not-be-logged";
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = BmcServer::start(listener, BmcConfig::new("admin", password), SimulatedMachine::new()).unwrap();
        let parameters = |password: &str| PowerParameters::Redfish {
            address: server.url(),
            username: "admin".into(),
            password: password.into(),
            system_id: None,
            trust_self_signed: false,
        };
        let mut request = PowerRequest {
            boot_generation: 0,
            id: 1,
            machine_id: "m1".into(),
            mac: "52:54:00:00:00:01".into(),
            parameters: parameters(password),
            actions: vec![PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::On, PowerAction::Query],
        };
        assert_eq!(run(&request).await.error, None);
        let wrong = "wrong-password-that-must-not-be-logged";
        request.parameters = parameters(wrong);
        assert!(run(&request).await.error.is_some());
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("power request done") && text.contains("power request failed"), "{text}");
        assert!(!text.contains(password) && !text.contains(wrong), "{text}");
    }

    #[tokio::test]
    async fn too_many_actions_are_refused() {
        let request = PowerRequest {
            boot_generation: 0,
            id: 8,
            machine_id: "m1".into(),
            mac: "52:54:00:00:00:01".into(),
            parameters: PowerParameters::Manual,
            actions: vec![PowerAction::Query; POWER_ACTIONS_PER_REQUEST_MAX + 1],
        };
        assert!(run(&request).await.error.unwrap().contains("actions"));
    }
}
