//! TLS end to end, with the real binaries: after registration every rack call is HTTPS pinned to
//! the region's certificate; a man in the middle of the registration is caught; a replaced
//! certificate is refused until the rack registers again; the UI is HTTPS with Secure cookies.

use metalrack_api::RackState;
use metalrack_tests::proxy::{Mitm, MitmMode, Recorder};
use metalrack_tests::{stderr, wait_for, Rack, Region, DEADLINE};
use reqwest::StatusCode;

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The credential `rackd register` saved.
fn saved_credential(rack: &Rack) -> String {
    let text = std::fs::read_to_string(rack.data_dir.join("registration.toml")).unwrap();
    let value: toml::Value = toml::from_str(&text).unwrap();
    value["credential"].as_str().unwrap().to_owned()
}

// Multi-threaded: the middleman's tasks run while the test blocks on `rackd register`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_challenge_every_rack_call_is_tls_and_the_credential_never_crosses_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let recorder = Recorder::start(&region.url).await;

    // The seed's command, through the recorder: `rackd register --url http://...`.
    let mut rack = Rack::new(dir.path(), "r1");
    rack.register_ok(&recorder.url, &region.secret());
    let pinned = std::fs::read_to_string(rack.data_dir.join("registration.toml")).unwrap();
    assert!(pinned.contains(&region.certificate_sha256()), "the region's certificate is pinned: {pinned}");
    rack.serve();
    region.wait_rack_state(&api_key, "r1", RackState::Online).await;
    // A few heartbeats more (every 200 ms), all through the recorder.
    let seen = region.api(&api_key).rack("r1").await.unwrap().last_seen_ms.unwrap();
    wait_for("two more heartbeats", DEADLINE, || async {
        let now = region.api(&api_key).rack("r1").await.ok()?.last_seen_ms?;
        (now > seen + 300).then_some(())
    })
    .await;

    let credential = saved_credential(&rack);
    let connections = recorder.connections();
    let (tls, clear): (Vec<_>, Vec<_>) =
        connections.iter().filter(|c| !c.to_region.is_empty()).partition(|c| c.to_region[0] == TLS_HANDSHAKE_RECORD);
    assert_eq!(clear.len(), 1, "only the challenge goes in clear: {} clear connections", clear.len());
    let challenge = String::from_utf8_lossy(&clear[0].to_region);
    assert!(challenge.starts_with("POST /MAAS/api/v1/racks/challenge "), "{challenge}");
    assert_eq!(challenge.matches("HTTP/1.1\r\n").count(), 1, "one request on the clear connection: {challenge}");
    assert!(tls.len() >= 2, "registration and serve over TLS: {} connections", tls.len());
    for connection in &connections {
        for bytes in [&connection.to_region, &connection.to_rack] {
            assert!(!contains(bytes, credential.as_bytes()), "the credential crossed in clear");
            assert!(!contains(bytes, b"Authorization") && !contains(bytes, b"authorization"), "a header in clear");
            assert!(!contains(bytes, b"heartbeat"), "a heartbeat in clear");
        }
    }
}

// Multi-threaded: the middleman's tasks run while the test blocks on `rackd register`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_man_in_the_middle_of_the_registration_is_caught_and_nothing_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let region_pem = std::fs::read(region.certificate_path()).unwrap();
    let cases = [
        // He relays the proof to the region: it covers his certificate, so the region refuses it.
        (MitmMode::Relay, "wrong secret"),
        // He answers himself: he cannot sign the answer with the secret, so the rack refuses it.
        (MitmMode::Forge, "man in the middle"),
    ];
    for (mode, expected) in cases {
        let mitm = Mitm::start(&region.url, &region_pem, mode).await;
        let rack = Rack::new(dir.path(), &format!("r-{mode:?}").to_lowercase());
        let output = rack.register(&mitm.url, &region.secret());
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{mode:?}: registration must fail: {message}");
        assert!(message.contains(expected), "{mode:?}: expected {expected:?} in {message:?}");
        assert!(!rack.data_dir.join("registration.toml").exists(), "{mode:?}: nothing saved");
        assert_ne!(mitm.certificate_sha256, region.certificate_sha256());
    }
    assert!(region.racks(&api_key).await.is_empty(), "no rack registered");
}

#[tokio::test]
async fn a_replaced_region_certificate_is_refused_until_the_rack_registers_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let mut rack = Rack::new(dir.path(), "r1");
    rack.register_ok(&region.url, &region.secret());
    rack.serve();
    region.wait_rack_state(&api_key, "r1", RackState::Online).await;
    let old = region.certificate_sha256();

    // A new certificate on the same address: the region makes one when DATA/tls/ is gone.
    region.daemon.terminate().unwrap();
    std::fs::remove_dir_all(region.data_dir.join("tls")).unwrap();
    region.restart();
    let new = region.certificate_sha256();
    assert_ne!(old, new);

    let log = wait_for("the rack to refuse the new certificate", DEADLINE, || async {
        let log = rack.daemon.as_ref().unwrap().log_text();
        log.contains("other than the one this rack pinned").then_some(log)
    })
    .await;
    assert!(log.contains(&old) && log.contains(&new) && log.contains("register again"), "{log}");
    region.wait_rack_state(&api_key, "r1", RackState::Offline).await;
    let status = wait_for("rackd status to say so", DEADLINE, || async {
        let status = rack.status();
        status.contains("must register again").then_some(status)
    })
    .await;
    assert!(status.contains("register again"), "{status}");

    // Registering again (here with an https:// URL, which works the same) pins the new one,
    // and the running rack picks it up.
    rack.register_ok(&region.https_url(), &region.secret());
    assert!(std::fs::read_to_string(rack.data_dir.join("registration.toml")).unwrap().contains(&new));
    region.wait_rack_state(&api_key, "r1", RackState::Online).await;
}

#[tokio::test]
async fn the_ui_is_https_with_secure_cookies_and_clear_http_is_redirected_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    region.create_admin("admin", "correct horse battery");
    let https = region.https_client_builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let clear = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    // Over HTTPS: the login page, and a session cookie the browser sends over HTTPS only.
    let page = https.get(format!("{}/login", region.https_url())).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let login = https
        .post(format!("{}/login", region.https_url()))
        .form(&[("username", "admin"), ("password", "correct horse battery")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("; Secure") && cookie.contains("HttpOnly"), "{cookie}");

    // In clear: the UI redirects to the same URL over HTTPS, a form post included (308 keeps it).
    for (method, path) in [(reqwest::Method::GET, "/controllers?x=1"), (reqwest::Method::POST, "/login")] {
        let response = clear.request(method.clone(), format!("{}{path}", region.url)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT, "{method} {path}");
        assert_eq!(response.headers()["location"], format!("{}{path}", region.https_url()), "{method} {path}");
    }
    // A rack call in clear is refused with the code that makes a rack register again.
    let heartbeat = clear.post(format!("{}/api/v1/racks/heartbeat", region.url)).json(&serde_json::json!({}));
    let response = heartbeat.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: metalrack_api::ErrorBody = response.json().await.unwrap();
    assert_eq!(body.code.as_deref(), Some(metalrack_api::CODE_REREGISTER), "{body:?}");
    assert!(body.error.contains("HTTPS"), "{body:?}");
}

#[tokio::test]
async fn the_api_is_refused_in_clear_with_or_without_a_key_and_says_where_to_go() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let clear = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    // With the key, the API over clear HTTP is refused, not redirected: a redirect followed
    // would succeed and hide that the key crossed in clear; the refusal says to replace it.
    for (method, path) in [(reqwest::Method::GET, "/api/v1/images"), (reqwest::Method::PUT, "/api/v1/machines/x")] {
        let response =
            clear.request(method.clone(), format!("{}{path}", region.url)).bearer_auth(&api_key).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{method} {path}");
        let body: metalrack_api::ErrorBody = response.json().await.unwrap();
        assert!(body.error.contains(&format!("use {}{path}", region.https_url())), "{body:?}");
        assert!(body.error.contains("crossed the network in clear") && body.error.contains("--new"), "{body:?}");
        assert!(!body.error.contains(&api_key), "{body:?}");
    }
    // Without a key too (nothing in the API is for clear HTTP), and a key sent to a UI page is
    // refused rather than redirected, for the same reason.
    let anonymous = clear.get(format!("{}/api/v1/images", region.url)).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::FORBIDDEN);
    let keyed_page = clear.get(format!("{}/controllers", region.url)).bearer_auth(&api_key).send().await.unwrap();
    assert_eq!(keyed_page.status(), StatusCode::FORBIDDEN);
    // What racks need before they know the certificate is still answered in clear.
    let challenge = clear
        .post(format!("{}/api/v1/racks/challenge", region.url))
        .json(&metalrack_api::ChallengeRequest { name: "r1".into() })
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), StatusCode::OK);
    // And the same key over HTTPS works.
    assert!(region.api(&api_key).images().await.unwrap().is_empty());
}

/// `imgtool push` of `file` as `version` over `url`, trusting the region as `trust` says
/// (arguments, then environment variables).
fn imgtool_push(
    api_key: &str,
    file: &std::path::Path,
    version: &str,
    url: &str,
    trust: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut command = std::process::Command::new(metalrack_tests::binary("imgtool"));
    command.arg("push").arg(file).args(["--name", "custom/x", "--arch", "amd64", "--kind", "root-disk"]);
    command.args(["--version", version, "--url", url, "--api-key", api_key]).args(trust);
    command.env_remove("METALRACK_CA_CERT").env_remove("METALRACK_REGION_CERT_SHA256").env_remove("METALRACK_URL");
    command.envs(env.iter().copied());
    command.output().unwrap()
}

#[tokio::test]
async fn imgtool_pushes_over_https_trusting_the_regions_certificate_or_its_fingerprint_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let file = dir.path().join("x.img");
    std::fs::write(&file, metalrack_tests::random_bytes(300 << 10, 9)).unwrap();
    let certificate = region.certificate_path().display().to_string();
    let sha256 = region.certificate_sha256();
    let url = region.https_url();

    // The operator's two ways, as options and as environment variables.
    let committed = [
        imgtool_push(&api_key, &file, "1", &url, &["--ca-cert", &certificate], &[]),
        imgtool_push(&api_key, &file, "2", &url, &["--region-cert-sha256", &sha256], &[]),
        imgtool_push(&api_key, &file, "3", &url, &[], &[("METALRACK_CA_CERT", &certificate)]),
        imgtool_push(&api_key, &file, "4", &url, &[], &[("METALRACK_REGION_CERT_SHA256", &sha256)]),
    ];
    for (i, output) in committed.iter().enumerate() {
        assert!(output.status.success(), "push {}: {}", i + 1, stderr(output));
        assert!(String::from_utf8_lossy(&output.stdout).contains("committed"), "push {}", i + 1);
    }

    // Another certificate, another fingerprint, a clear URL, no trust at all: refused, exit 2,
    // one line saying what to fix, and nothing pushed.
    let other_dir = tempfile::tempdir().unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let other_pem = other_dir.path().join("other.pem");
    std::fs::write(&other_pem, other.cert.pem()).unwrap();
    let other_pem = other_pem.display().to_string();
    let wrong_pin = "00".repeat(32);
    let clear_url = region.url.clone();
    let refused = [
        (vec!["--ca-cert", other_pem.as_str()], url.as_str(), "not trusted by --ca-cert"),
        (vec!["--region-cert-sha256", wrong_pin.as_str()], url.as_str(), sha256.as_str()),
        (vec!["--ca-cert", certificate.as_str()], clear_url.as_str(), "use --url https://"),
        (vec![], url.as_str(), "--ca-cert"),
    ];
    for (trust, url, expected) in refused {
        let output = imgtool_push(&api_key, &file, "5", url, &trust, &[]);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{trust:?} {url}: {message}");
        assert!(message.contains(expected), "{trust:?} {url}: expected {expected:?} in {message:?}");
        if !trust.is_empty() {
            assert_eq!(message.trim_end().lines().count(), 1, "one line: {message:?}");
        }
    }
    let image = region.api(&api_key).image("custom/x").await.unwrap();
    let versions: Vec<&str> = image.versions.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(versions.len(), 4, "only the trusted pushes committed: {versions:?}");
    assert!(!versions.contains(&"5"), "{versions:?}");
}
