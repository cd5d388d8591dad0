//! The Redfish driver against the lab's virtual BMC (real HTTP and HTTPS, a simulated machine).

use std::collections::VecDeque;
use std::sync::Mutex;

use metalrack_api::power::{PowerAction, PowerParameters, PowerRequest};
use metalrack_hardware::bmc::{BmcConfig, BmcServer, BmcTransport, MachineError, PoweredMachine, SimulatedMachine};
use metalrack_hardware::qemu::{BootFrom, BootOrder};

use super::super::run;
use super::*;

const USER: &str = "rack";
const PASSWORD: &str = "bmc-password-never-logged";

fn start(transport: BmcTransport, machine: impl PoweredMachine) -> BmcServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    BmcServer::start(listener, BmcConfig { transport, ..BmcConfig::new(USER, PASSWORD) }, machine).unwrap()
}

fn request(server: &BmcServer, trust_self_signed: bool, actions: Vec<PowerAction>) -> PowerRequest {
    PowerRequest {
        boot_generation: 0,
        id: 42,
        machine_id: "machine-1".into(),
        mac: "52:54:00:00:00:01".into(),
        parameters: PowerParameters::Redfish {
            address: server.url(),
            username: USER.into(),
            password: PASSWORD.into(),
            system_id: None,
            trust_self_signed,
        },
        actions,
    }
}

#[tokio::test]
async fn a_request_sets_the_next_boot_powers_on_and_queries_through_the_bmc() {
    let machine = SimulatedMachine::new();
    let server = start(BmcTransport::Http, machine.clone());
    let actions = vec![PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::On, PowerAction::Query];
    let result = run(&request(&server, false, actions)).await;
    assert_eq!(result.error, None);
    assert_eq!((result.id, result.state), (42, PowerState::On));
    assert!(machine.on());
    assert_eq!(machine.starts(), [BootOrder { first: BootFrom::Network, once: Some(BootFrom::Network) }]);

    let result =
        run(&request(&server, false, vec![PowerAction::SetNextBoot(BootDevice::Disk), PowerAction::Cycle])).await;
    assert_eq!((result.state, result.error), (PowerState::On, None));
    assert_eq!(machine.starts()[1], BootOrder { first: BootFrom::Network, once: Some(BootFrom::Disk) });

    let result = run(&request(&server, false, vec![PowerAction::Off, PowerAction::Query])).await;
    assert_eq!((result.state, result.error), (PowerState::Off, None));
    assert!(!machine.on());
    let result = run(&request(&server, false, vec![PowerAction::Cycle])).await;
    assert_eq!((result.state, result.error), (PowerState::On, None));
    assert!(machine.on(), "a cycle of a machine that is off powers it on");
}

#[tokio::test]
async fn wrong_credentials_fail_with_the_status_and_never_show_the_password() {
    let server = start(BmcTransport::Http, SimulatedMachine::new());
    let mut request = request(&server, false, vec![PowerAction::Query, PowerAction::On]);
    let PowerParameters::Redfish { password, .. } = &mut request.parameters else { unreachable!() };
    *password = "the-wrong-password".into();
    let result = run(&request).await;
    assert_eq!(result.state, PowerState::Error);
    let error = result.error.unwrap();
    assert!(error.contains("401"), "{error}");
    assert!(error.contains("power action query failed"), "{error}");
    assert!(!error.contains("the-wrong-password"), "{error}");
}

#[tokio::test]
async fn an_unreachable_bmc_is_an_error_naming_its_address() {
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let driver = RedfishDriver::new(&format!("http://{address}"), USER, PASSWORD, None, false).unwrap();
    let error = super::super::error_text(&driver.power_on().await.unwrap_err());
    assert!(error.contains(&address.to_string()), "{error}");
}

#[tokio::test]
async fn https_with_a_self_signed_certificate_is_refused_unless_the_operator_trusts_it() {
    let machine = SimulatedMachine::new();
    let server = start(BmcTransport::Https { names: vec!["127.0.0.1".into()] }, machine.clone());
    let refused = run(&request(&server, false, vec![PowerAction::On])).await;
    let error = refused.error.unwrap();
    assert!(error.contains("certificate") || error.contains("Certificate"), "{error}");
    assert!(!machine.on());

    let trusted = run(&request(&server, true, vec![PowerAction::On, PowerAction::Query])).await;
    assert_eq!((trusted.state, trusted.error), (PowerState::On, None));
    assert!(machine.on());
}

#[tokio::test]
async fn a_named_system_is_used_and_an_unknown_one_is_a_404_error() {
    let server = start(BmcTransport::Http, SimulatedMachine::new());
    let mut request = request(&server, false, vec![PowerAction::Query]);
    let PowerParameters::Redfish { system_id, .. } = &mut request.parameters else { unreachable!() };
    *system_id = Some("1".into());
    assert_eq!(run(&request).await.state, PowerState::Off);
    let PowerParameters::Redfish { system_id, .. } = &mut request.parameters else { unreachable!() };
    *system_id = Some("2".into());
    let error = run(&request).await.error.unwrap();
    assert!(error.contains("404"), "{error}");
}

/// A machine whose power state reads as scripted, one answer per look, then the last one for
/// good: a guest that powers itself off between two requests, at a known moment. The BMC looks
/// once per GET and once per PATCH's etag check.
struct ScriptedMachine {
    answers: Mutex<VecDeque<bool>>,
    last: Mutex<bool>,
}

impl ScriptedMachine {
    fn new(answers: &[bool]) -> ScriptedMachine {
        ScriptedMachine { answers: Mutex::new(answers.iter().copied().collect()), last: Mutex::new(answers[0]) }
    }
}

impl PoweredMachine for ScriptedMachine {
    fn power_on(&mut self, _boot: BootOrder) -> Result<(), MachineError> {
        Ok(())
    }

    fn power_off(&mut self) -> Result<(), MachineError> {
        Ok(())
    }

    fn is_on(&mut self) -> bool {
        let mut last = self.last.lock().unwrap();
        if let Some(answer) = self.answers.lock().unwrap().pop_front() {
            *last = answer;
        }
        *last
    }
}

#[tokio::test]
async fn a_stale_etag_is_retried_once_with_the_new_one() {
    // GET: on (etag "…-on"); PATCH: off, so that etag is stale → 412; GET: off; PATCH: off → 200.
    let server = start(BmcTransport::Http, ScriptedMachine::new(&[true, false]));
    let driver = RedfishDriver::new(&server.url(), USER, PASSWORD, None, false).unwrap();
    driver.set_next_boot(BootDevice::Disk).await.unwrap();
    let (system, _) = driver.system("check").await.unwrap();
    assert_eq!(system["Boot"]["BootSourceOverrideTarget"], "Hdd");
    assert_eq!(system["Boot"]["BootSourceOverrideEnabled"], "Once");
}

#[tokio::test]
async fn an_etag_that_changes_on_every_look_is_an_error_after_one_retry() {
    let flapping = [true, false, true, false, true, false];
    let server = start(BmcTransport::Http, ScriptedMachine::new(&flapping));
    let driver = RedfishDriver::new(&server.url(), USER, PASSWORD, None, false).unwrap();
    let error = driver.set_next_boot(BootDevice::Pxe).await.unwrap_err();
    assert!(matches!(error, RedfishError::EtagKeptChanging { .. }), "{error}");
}

#[tokio::test]
async fn a_stale_etag_from_an_earlier_read_gets_412() {
    let machine = SimulatedMachine::new();
    let server = start(BmcTransport::Http, machine.clone());
    let driver = RedfishDriver::new(&server.url(), USER, PASSWORD, None, false).unwrap();
    let (_, etag) = driver.system("read").await.unwrap();
    driver.power_on().await.unwrap();
    let error = driver.patch_boot("Pxe", etag.as_deref()).await.unwrap_err();
    assert!(matches!(error, RedfishError::Status { status: StatusCode::PRECONDITION_FAILED, .. }), "{error}");
}

#[test]
fn addresses_that_are_not_a_bare_http_or_https_origin_are_refused() {
    for bad in ["10.0.0.5", "ftp://10.0.0.5", "https://", "https://10.0.0.5/redfish", "https://user@10.0.0.5"] {
        assert!(
            matches!(RedfishDriver::new(bad, USER, PASSWORD, None, false), Err(RedfishError::Address { .. })),
            "{bad}"
        );
    }
    let driver = RedfishDriver::new("https://10.0.0.5:8443/", USER, PASSWORD, None, true).unwrap();
    assert!(!format!("{driver:?}").contains(PASSWORD));
}

#[test]
fn bmc_messages_come_from_the_redfish_error_and_are_cut() {
    let body = br#"{"error":{"code":"Base.1.8.GeneralError","message":"general","@Message.ExtendedInfo":[{"Message":"specific"}]}}"#;
    assert_eq!(bmc_message(body), "specific");
    assert_eq!(bmc_message(br#"{"error":{"message":"only general"}}"#), "only general");
    assert_eq!(bmc_message(&[b'x'; 10_000]).len(), BMC_MESSAGE_BYTES_MAX);
    assert_eq!(bmc_message(b""), "(no message)");
}
