//! The Redfish handlers over real HTTP(S), with a [`SimulatedMachine`] behind them.

use super::*;

const USER: &str = "admin";
const PASSWORD: &str = "lab-bmc-password";

fn start(transport: BmcTransport) -> (BmcServer, SimulatedMachine) {
    let machine = SimulatedMachine::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = BmcConfig { transport, ..BmcConfig::new(USER, PASSWORD) };
    let server = BmcServer::start(listener, config, machine.clone()).unwrap();
    (server, machine)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

fn system_url(server: &BmcServer) -> String {
    format!("{}/redfish/v1/Systems/{SYSTEM_ID_DEFAULT}", server.url())
}

async fn get_system(server: &BmcServer) -> (Value, String) {
    let response = client().get(system_url(server)).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let etag = response.headers()[header::ETAG].to_str().unwrap().to_string();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["@odata.etag"], etag.as_str(), "the body's etag is the header's");
    (body, etag)
}

async fn reset(server: &BmcServer, reset_type: &str) -> reqwest::Response {
    client()
        .post(format!("{}/Actions/ComputerSystem.Reset", system_url(server)))
        .basic_auth(USER, Some(PASSWORD))
        .json(&json!({ "ResetType": reset_type }))
        .send()
        .await
        .unwrap()
}

async fn patch_boot(server: &BmcServer, if_match: Option<&str>, target: &str, enabled: &str) -> reqwest::Response {
    let mut request = client()
        .patch(system_url(server))
        .basic_auth(USER, Some(PASSWORD))
        .json(&json!({ "Boot": { "BootSourceOverrideTarget": target, "BootSourceOverrideEnabled": enabled } }));
    if let Some(etag) = if_match {
        request = request.header(header::IF_MATCH, etag);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn requests_without_the_configured_credentials_get_401_with_a_basic_challenge() {
    let (server, _machine) = start(BmcTransport::Http);
    let url = format!("{}/redfish/v1", server.url());
    let anonymous = client().get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Basic "));
    let wrong = client().get(&url).basic_auth(USER, Some("not-the-password")).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong_user = client().get(&url).basic_auth("root", Some(PASSWORD)).send().await.unwrap();
    assert_eq!(wrong_user.status(), 401);
    let right = client().get(&url).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(right.status(), 200);
}

#[tokio::test]
async fn the_service_root_links_a_systems_collection_of_one_member() {
    let (server, _machine) = start(BmcTransport::Http);
    let root: Value = client()
        .get(format!("{}/redfish/v1", server.url()))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let systems_path = root["Systems"]["@odata.id"].as_str().unwrap();
    assert_eq!(systems_path, "/redfish/v1/Systems");
    let systems: Value = client()
        .get(format!("{}{systems_path}", server.url()))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(systems["Members"].as_array().unwrap().len(), 1);
    assert_eq!(systems["Members"][0]["@odata.id"], "/redfish/v1/Systems/1");
    let (system, _) = get_system(&server).await;
    assert_eq!(system["PowerState"], "Off");
    assert_eq!(system["Boot"]["BootSourceOverrideTarget"], "None");
    assert_eq!(system["Boot"]["BootSourceOverrideEnabled"], "Disabled");
    assert_eq!(system["Boot"]["BootSourceOverrideTarget@Redfish.AllowableValues"], json!(["None", "Pxe", "Hdd"]));
    let missing = client()
        .get(format!("{}/redfish/v1/Systems/2", server.url()))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn resets_drive_the_machine_and_a_guest_power_off_reads_as_off() {
    let (server, machine) = start(BmcTransport::Http);
    assert_eq!(reset(&server, "On").await.status(), 204);
    assert!(machine.on());
    assert_eq!(get_system(&server).await.0["PowerState"], "On");
    assert_eq!(reset(&server, "ForceOff").await.status(), 204);
    assert!(!machine.on());
    assert_eq!(get_system(&server).await.0["PowerState"], "Off");

    assert_eq!(reset(&server, "PowerCycle").await.status(), 204, "a cycle of a machine that is off powers it on");
    assert!(machine.on());
    assert_eq!(reset(&server, "ForceRestart").await.status(), 204);
    assert!(machine.on());
    assert_eq!(machine.starts().len(), 3, "on, cycle, then the restart powered it off and on again");
    assert_eq!(reset(&server, "GracefulShutdown").await.status(), 204);
    assert!(!machine.on());

    assert_eq!(reset(&server, "On").await.status(), 204);
    machine.guest_power_off();
    assert_eq!(get_system(&server).await.0["PowerState"], "Off");
}

#[tokio::test]
async fn an_unknown_reset_type_gets_400_with_a_redfish_error_and_changes_nothing() {
    let (server, machine) = start(BmcTransport::Http);
    let response = reset(&server, "Nmi").await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Base.1.8.ActionParameterValueNotInList");
    assert!(body["error"]["message"].as_str().unwrap().contains("Nmi"));
    assert!(!machine.on());
    let garbage = client()
        .post(format!("{}/Actions/ComputerSystem.Reset", system_url(&server)))
        .basic_auth(USER, Some(PASSWORD))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
}

#[tokio::test]
async fn a_patch_with_a_stale_etag_gets_412_and_every_change_changes_the_etag() {
    let (server, _machine) = start(BmcTransport::Http);
    let (_, first) = get_system(&server).await;
    let response = patch_boot(&server, Some(&first), "Pxe", "Once").await;
    assert_eq!(response.status(), 200);
    let (system, second) = get_system(&server).await;
    assert_ne!(first, second);
    assert_eq!(system["Boot"]["BootSourceOverrideTarget"], "Pxe");
    assert_eq!(system["Boot"]["BootSourceOverrideEnabled"], "Once");

    let stale = patch_boot(&server, Some(&first), "Hdd", "Once").await;
    assert_eq!(stale.status(), 412);
    let body: Value = stale.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Base.1.8.PreconditionFailed");
    assert_eq!(
        get_system(&server).await.0["Boot"]["BootSourceOverrideTarget"],
        "Pxe",
        "a refused patch changes nothing"
    );

    assert_eq!(reset(&server, "On").await.status(), 204);
    let (_, third) = get_system(&server).await;
    assert_ne!(second, third, "a power change changes the etag");
    assert_eq!(patch_boot(&server, Some(&second), "Hdd", "Once").await.status(), 412);
    assert_eq!(patch_boot(&server, Some(&third), "Hdd", "Once").await.status(), 200);
    assert_eq!(patch_boot(&server, None, "None", "Disabled").await.status(), 200, "If-Match is optional");
}

#[tokio::test]
async fn bad_boot_values_and_unknown_properties_get_400() {
    let (server, _machine) = start(BmcTransport::Http);
    let response = patch_boot(&server, None, "Floppy", "Once").await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Base.1.8.PropertyValueNotInList");
    assert_eq!(patch_boot(&server, None, "Pxe", "Sometimes").await.status(), 400);
    let unknown = client()
        .patch(system_url(&server))
        .basic_auth(USER, Some(PASSWORD))
        .json(&json!({ "AssetTag": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
}

#[tokio::test]
async fn a_once_override_applies_to_the_next_power_on_only_and_continuous_persists() {
    let (server, machine) = start(BmcTransport::Http);
    assert_eq!(patch_boot(&server, None, "Hdd", "Once").await.status(), 200);
    assert_eq!(reset(&server, "On").await.status(), 204);
    assert_eq!(machine.starts()[0], BootOrder { first: BootFrom::Network, once: Some(BootFrom::Disk) });
    let (system, _) = get_system(&server).await;
    assert_eq!(system["Boot"]["BootSourceOverrideEnabled"], "Disabled", "the power on consumed Once");
    assert_eq!(system["Boot"]["BootSourceOverrideTarget"], "None");

    assert_eq!(reset(&server, "PowerCycle").await.status(), 204);
    assert_eq!(machine.starts()[1], BootOrder::default(), "the next start is back to network, then disk");

    assert_eq!(patch_boot(&server, None, "Hdd", "Continuous").await.status(), 200);
    for _ in 0..2 {
        assert_eq!(reset(&server, "ForceRestart").await.status(), 204);
    }
    let starts = machine.starts();
    assert_eq!(starts[2..], [BootOrder { first: BootFrom::Disk, once: None }; 2]);
    assert_eq!(get_system(&server).await.0["Boot"]["BootSourceOverrideEnabled"], "Continuous");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused() {
    let (server, machine) = start(BmcTransport::Http);
    let padding = "x".repeat(BMC_BODY_BYTES_MAX);
    let response = client()
        .post(format!("{}/Actions/ComputerSystem.Reset", system_url(&server)))
        .basic_auth(USER, Some(PASSWORD))
        .json(&json!({ "ResetType": "On", "Padding": padding }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(!machine.on());
}

#[tokio::test]
async fn https_serves_the_self_signed_certificate_that_the_server_reports() {
    let (server, machine) = start(BmcTransport::Https { names: vec!["localhost".into(), "127.0.0.1".into()] });
    assert!(server.url().starts_with("https://"));
    let certificate = reqwest::Certificate::from_der(server.certificate_der().unwrap()).unwrap();
    let trusting =
        reqwest::Client::builder().add_root_certificate(certificate).timeout(Duration::from_secs(10)).build().unwrap();
    let url =
        format!("https://localhost:{}/redfish/v1/Systems/1/Actions/ComputerSystem.Reset", server.address().port());
    let response =
        trusting.post(&url).basic_auth(USER, Some(PASSWORD)).json(&json!({"ResetType": "On"})).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert!(machine.on());
    let untrusting = client().get(&url).basic_auth(USER, Some(PASSWORD)).send().await;
    assert!(untrusting.is_err(), "a client without the certificate refuses it");
}
