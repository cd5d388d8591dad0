//! The web UI in a real browser (headless Chromium driven over WebDriver): log in, name the
//! cluster, see the racks on Controllers, and register a new rack with the command the UI shows.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use metalrack_api::RackState;
use metalrack_tests::process::Spawn;
use metalrack_tests::{random_bytes, wait_for, Daemon, Rack, Region, DEADLINE};

/// Starts chromedriver on a free port and returns it (stopped on drop) with its URL.
fn start_chromedriver(dir: &std::path::Path) -> (Daemon, String) {
    let mut command = Command::new("chromedriver");
    command.arg("--port=0").arg(format!("--log-path={}", dir.join("chromedriver.log").display()));
    let mut daemon = Daemon::spawn("chromedriver", command, &dir.join("chromedriver.stderr"), true, Spawn::default())
        .expect("chromedriver is installed (apt-get install chromium chromium-driver; scripts/test does it)");
    let mut reader = BufReader::new(daemon.take_stdout().unwrap());
    let mut line = String::new();
    let port = loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "chromedriver exited before announcing its port");
        if let Some(rest) = line.trim().strip_prefix("ChromeDriver was started successfully on port ") {
            break rest.trim_end_matches('.').parse::<u16>().expect("port number");
        }
    };
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in reader.lines() {});
    (daemon, format!("http://127.0.0.1:{port}"))
}

/// Headless Chromium that trusts the certificate with SPKI hash `spki_sha256_base64` (the
/// region's; it is self-signed, so no authority vouches for it) and no other.
async fn browser(webdriver: &str, profile: &std::path::Path, spki_sha256_base64: &str) -> Client {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("--user-data-dir={}", profile.display()),
        format!("--ignore-certificate-errors-spki-list={spki_sha256_base64}"),
    ])
    .collect::<Vec<_>>();
    let mut capabilities = serde_json::Map::new();
    capabilities
        .insert("goog:chromeOptions".into(), serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }));
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(webdriver)
        .await
        .expect("a WebDriver session with headless Chromium")
}

async fn text(client: &Client, css: &str) -> String {
    client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).text().await.unwrap()
}

/// Saves a screenshot under target/ui-screenshots for a person to look at.
async fn screenshot(client: &Client, name: &str) {
    let dir = metalrack_tests::binary("regiond").parent().unwrap().join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), client.screenshot().await.unwrap()).unwrap();
}

#[tokio::test]
async fn log_in_see_controllers_and_register_a_rack_with_the_shown_command() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let secret = region.secret();
    let mut racks = vec![Rack::new(dir.path(), "rack-a"), Rack::new(dir.path(), "rack-b")];
    for rack in &mut racks {
        rack.register_ok(&region.url, &secret);
        rack.serve();
        region.wait_rack_state(&api_key, &rack.name, RackState::Online).await;
    }

    let (_driver, webdriver) = start_chromedriver(dir.path());
    let spki = region.certificate_spki_sha256_base64();
    let client = browser(&webdriver, &dir.path().join("chromium-profile"), &spki).await;

    // Log in; the first login shows the welcome page, where the cluster gets its name.
    // The URL an operator types, http://: the region sends the browser to the same URL over HTTPS.
    client.goto(&format!("{}/", region.url)).await.unwrap();
    let url = client.current_url().await.unwrap();
    assert_eq!(url.scheme(), "https", "{url}");
    assert!(url.path().ends_with("/MAAS/login"));
    client.find(Locator::Id("username")).await.unwrap().send_keys("admin").await.unwrap();
    client.find(Locator::Id("password")).await.unwrap().send_keys("correct horse battery").await.unwrap();
    screenshot(&client, "login").await;
    client.find(Locator::Id("login")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("cluster_name")).await.unwrap();
    assert!(client.current_url().await.unwrap().path().ends_with("/MAAS/welcome"));
    let name_field = client.find(Locator::Id("cluster_name")).await.unwrap();
    name_field.clear().await.unwrap();
    name_field.send_keys("lab-east").await.unwrap();
    client.find(Locator::Id("save")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Css(".tiles")).await.unwrap();
    assert_eq!(text(&client, "header .cluster").await, "lab-east");
    screenshot(&client, "dashboard").await;

    // Controllers lists both racks as online.
    client.find(Locator::LinkText("Controllers")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("controllers")).await.unwrap();
    for name in ["rack-a", "rack-b"] {
        assert_eq!(text(&client, &format!("tr[data-rack='{name}'] .badge")).await, "online");
    }
    screenshot(&client, "controllers").await;

    // "Add rack controller" shows the exact command, secret included.
    client.find(Locator::Id("add-rack")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("register-command")).await.unwrap();
    let command = text(&client, "#register-command").await;
    assert_eq!(command, format!("rackd register --url {} --secret {secret}", region.url));
    screenshot(&client, "add-rack").await;

    // Run that command as an operator would on the new rack's box, then start the rack.
    let mut words = command.split_whitespace();
    assert_eq!(words.next(), Some("rackd"));
    let mut new_rack = Rack::new(dir.path(), "rack-c");
    let mut args: Vec<&str> = words.collect();
    args.extend(["--name", "rack-c"]);
    let output = new_rack.command(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    new_rack.serve();

    // It shows online on the Controllers page after a reload.
    client.goto(&format!("{}/controllers", region.url)).await.unwrap();
    wait_for("rack-c online in the browser", DEADLINE, || async {
        client.refresh().await.unwrap();
        let badge = client.find(Locator::Css("tr[data-rack='rack-c'] .badge")).await.ok()?;
        (badge.text().await.ok()? == "online").then_some(())
    })
    .await;
    screenshot(&client, "controllers-after").await;

    // Images: a pushed image shows per-rack sync state; "Sync now" and the policy form work.
    let image = dir.path().join("kernel");
    std::fs::write(&image, random_bytes(2_400_000, 1)).unwrap();
    region.push(&api_key, &image, "ubuntu/noble", "kernel", "1");
    client.find(Locator::LinkText("Images")).await.unwrap().click().await.unwrap();
    wait_for("rack-a synced on the Images page", DEADLINE, || async {
        client.refresh().await.unwrap();
        let badge = client
            .find(Locator::Css(
                "section[data-image='ubuntu/noble'] tr[data-version='1'] div[data-rack='rack-a'] .badge",
            ))
            .await
            .ok()?;
        (badge.attr("data-status").await.ok()?? == "synced").then_some(())
    })
    .await;
    screenshot(&client, "images").await;
    client.find(Locator::Id("sync-all")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Css("section[data-image='ubuntu/noble']")).await.unwrap();

    // A rack's page sets its sync policy; Controllers shows it.
    client.goto(&format!("{}/controllers", region.url)).await.unwrap();
    client.find(Locator::Css("tr[data-rack='rack-b'] td.sync a")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("policy-form")).await.unwrap();
    client.find(Locator::Css("#policy option[value='window']")).await.unwrap().click().await.unwrap();
    screenshot(&client, "rack-policy").await;
    client.find(Locator::Id("save-policy")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("sync-state")).await.unwrap();
    client.goto(&format!("{}/controllers", region.url)).await.unwrap();
    assert_eq!(text(&client, "tr[data-rack='rack-b'] td.sync a").await, "window 04:00–06:00");

    // Logging out ends the session: Controllers sends the browser back to the login page.
    client.find(Locator::Css("button.link")).await.unwrap().click().await.unwrap();
    client.wait().at_most(Duration::from_secs(10)).for_element(Locator::Id("login")).await.unwrap();
    client.goto(&format!("{}/controllers", region.url)).await.unwrap();
    assert!(client.current_url().await.unwrap().path().ends_with("/MAAS/login"));
    client.close().await.unwrap();
}
