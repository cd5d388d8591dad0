//! The web UI in a real browser (headless Chromium driven over WebDriver): log in, name the
//! cluster, see the racks on Controllers, and register a new rack with the command the UI shows;
//! add a machine through the Add form and find it on Machines and its own page; watch a deploy's
//! progress bar move on the Machines page and the machine's page without a reload; deploy (a
//! chosen version), abort, release with erase and check power from a machine's page.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use metalrack_api::agent::{
    AgentJob, AgentReport, DeployPhase, DeployProgress, DiskInventory, Firmware, Inventory, MachineReport, NicInventory,
};
use metalrack_api::machines::{BootAction, BootEvent, MachineState, MachineView};
use metalrack_api::paths;
use metalrack_api::RackState;
use metalrack_tests::process::Spawn;
use metalrack_tests::rack_client::RackClient;
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
    // Each rack's recent health is drawn: the memory chart (rackd reads /proc/meminfo) is a
    // line the browser lays out, under the page's CSP (no script, no inline style).
    wait_for("rack-a's memory chart drawn", DEADLINE, || async {
        client.refresh().await.unwrap();
        let line =
            client.find(Locator::Css("tr[data-rack='rack-a'] figure[data-series='memory'] polyline")).await.ok()?;
        let (_, _, width, _) = line.rectangle().await.ok()?;
        (width > 0.0).then_some(())
    })
    .await;
    let caption = text(&client, "tr[data-rack='rack-a'] figure[data-series='memory'] figcaption").await;
    assert!(caption.starts_with("Memory ") && caption.ends_with(" %"), "{caption}");
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

const ADMIN_PASSWORD: &str = "correct horse battery";
const LOCALHOST: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Logs in as `admin` and skips the first-login welcome page; the browser is on the dashboard.
async fn log_in(client: &Client, region: &Region) {
    client.goto(&format!("{}/login", region.https_url())).await.unwrap();
    client.find(Locator::Id("username")).await.unwrap().send_keys("admin").await.unwrap();
    client.find(Locator::Id("password")).await.unwrap().send_keys(ADMIN_PASSWORD).await.unwrap();
    client.find(Locator::Id("login")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("skip")).await.unwrap();
    client.find(Locator::Id("skip")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Css(".tiles")).await.unwrap();
}

#[tokio::test]
async fn a_machine_added_through_the_add_form_is_listed_paged_filtered_shown_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", ADMIN_PASSWORD);
    // Two racks, so the form must say which one (the select holds both).
    RackClient::register(&region.url, &region.secret(), "rack-a", LOCALHOST).await.unwrap();
    RackClient::register(&region.url, &region.secret(), "rack-b", LOCALHOST).await.unwrap();

    let (_driver, webdriver) = start_chromedriver(dir.path());
    let client =
        browser(&webdriver, &dir.path().join("chromium-profile"), &region.certificate_spki_sha256_base64()).await;
    log_in(&client, &region).await;

    client.find(Locator::LinkText("Machines")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("add-machine")).await.unwrap();
    client.find(Locator::Id("add-machine")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("add-form")).await.unwrap();
    client.find(Locator::Id("hostname")).await.unwrap().send_keys("node-7").await.unwrap();
    // A bad MAC first: the form says why and keeps what was typed.
    client.find(Locator::Id("mac")).await.unwrap().send_keys("52:54:00:aa:bb").await.unwrap();
    client.find(Locator::Css("#rack option:nth-child(2)")).await.unwrap().click().await.unwrap();
    client.find(Locator::Css("#driver option[value='manual']")).await.unwrap().click().await.unwrap();
    client.find(Locator::Id("add")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("add-error")).await.unwrap();
    assert!(text(&client, "#add-error").await.contains("is not a MAC address"));
    let mac_field = client.find(Locator::Id("mac")).await.unwrap();
    assert_eq!(mac_field.prop("value").await.unwrap().as_deref(), Some("52:54:00:aa:bb"));
    mac_field.clear().await.unwrap();
    mac_field.send_keys("52:54:00:AA:BB:07").await.unwrap();
    screenshot(&client, "add-machine").await;
    client.find(Locator::Id("add")).await.unwrap().click().await.unwrap();

    // The new machine's page: New, manual power, on the rack chosen.
    client.wait().for_element(Locator::Id("machine-state")).await.unwrap();
    assert_eq!(text(&client, "#machine-state").await, "New");
    assert_eq!(text(&client, "h1").await, "node-7 New");
    let page = client.source().await.unwrap();
    assert!(page.contains("52:54:00:aa:bb:07") && page.contains("manual"), "{page}");
    screenshot(&client, "machine-page").await;

    // The API agrees on what the form made.
    let machines: serde_json::Value =
        region.api(&api_key).request(reqwest::Method::GET, paths::MACHINES).send().await.unwrap().json().await.unwrap();
    let machine: MachineView = serde_json::from_value(machines["machines"][0].clone()).unwrap();
    assert_eq!((machine.hostname.as_str(), machine.mac.as_str()), ("node-7", "52:54:00:aa:bb:07"));
    assert_eq!((machine.state, machine.rack_name.as_deref()), (MachineState::New, Some("rack-b")));

    // On Machines: its row links to its page and shows its state; the dashboard counts it.
    client.find(Locator::LinkText("Machines")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("machines")).await.unwrap();
    let row = format!("tr[data-machine='{}']", machine.id);
    assert_eq!(text(&client, &format!("{row} td.state")).await, "New");
    assert_eq!(text(&client, &format!("{row} td.name")).await, "node-7");
    screenshot(&client, "machines").await;
    client.find(Locator::Css(&format!("{row} td.name a"))).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("machine-state")).await.unwrap();
    assert!(client.current_url().await.unwrap().path().ends_with(&format!("/MAAS/machines/{}", machine.id)));

    // A refused action shows the domain's reason on the page: no deploy environment yet.
    client.find(Locator::Id("commission")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("machine-error")).await.unwrap();
    assert!(text(&client, "#machine-error").await.contains("imgtool deploy-env build --push"));
    assert_eq!(text(&client, "#machine-state").await, "New");

    // Marked broken from its page: the page shows the state, the reason, and Mark fixed.
    client.find(Locator::Id("broken-reason")).await.unwrap().send_keys("fan failure").await.unwrap();
    client.find(Locator::Id("mark-broken")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("mark-fixed")).await.unwrap();
    assert_eq!(text(&client, "#machine-state").await, "Broken");
    assert_eq!(text(&client, "#status-message").await, "fan failure");

    client.goto(&format!("{}/", region.https_url())).await.unwrap();
    assert_eq!(text(&client, "#machine-counts span[data-state='broken']").await, "1 broken");

    // 100 more: the list shows a page of 100 with a link to the next; the filter finds the
    // broken one alone.
    for i in 0..100 {
        let body = serde_json::json!({"mac": format!("52:54:00:cc:00:{i:02x}"), "rack": "rack-a",
            "power": {"driver": "manual"}});
        api_post(&region, &api_key, paths::MACHINES.into(), body).await;
    }
    client.goto(&format!("{}/machines", region.https_url())).await.unwrap();
    let rows = client.find_all(Locator::Css("#machines tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 100);
    assert!(text(&client, "p.pager").await.starts_with("101 machines"));
    client.find(Locator::Id("next")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("previous")).await.unwrap();
    assert_eq!(client.find_all(Locator::Css("#machines tbody tr")).await.unwrap().len(), 1);
    client.find(Locator::Css("#state-filter option[value='broken']")).await.unwrap().click().await.unwrap();
    client.find(Locator::Css("form.filter button")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Css(&row)).await.unwrap();
    assert_eq!(client.find_all(Locator::Css("#machines tbody tr")).await.unwrap().len(), 1);
    assert!(client.current_url().await.unwrap().query().unwrap().contains("state=broken"));

    // Deleted from its page (a second click confirms): gone from the list.
    client.find(Locator::Css(&format!("{row} td.name a"))).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Css("details.confirm summary")).await.unwrap();
    client.find(Locator::Css("details.confirm summary")).await.unwrap().click().await.unwrap();
    client.find(Locator::Id("delete")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("add-machine")).await.unwrap();
    assert!(text(&client, "p.pager").await.starts_with("100 machines"));
    assert!(client.find(Locator::Css(&row)).await.is_err());
    client.close().await.unwrap();
}

/// A region with a registered rack client, a deploy environment and a root-disk image in two
/// versions, and one machine commissioned to Ready through the API and the rack protocol.
struct Site {
    region: Region,
    key: String,
    rack: RackClient,
    machine: MachineView,
    token: String,
    seq: std::sync::atomic::AtomicU64,
}

impl Site {
    async fn ready(dir: &std::path::Path) -> Site {
        const MAC: &str = "52:54:00:aa:bb:21";
        let region = Region::start(&dir.join("region"));
        let key = region.create_admin("admin", ADMIN_PASSWORD);
        let rack = RackClient::register(&region.url, &region.secret(), "rack1", LOCALHOST).await.unwrap();
        for kind in ["kernel", "initrd"] {
            let file = dir.join(kind);
            std::fs::write(&file, format!("pretend {kind} ").repeat(1000)).unwrap();
            region.push(&key, &file, "metalrack/deploy-env", kind, "1");
        }
        for version in ["1", "2"] {
            let root = dir.join(format!("root-{version}.img"));
            std::fs::write(&root, format!("pretend root disk {version} ").repeat(4000)).unwrap();
            region.push(&key, &root, "ubuntu/noble", "root-disk", version);
        }
        let body = serde_json::json!({"mac": MAC, "power": {"driver": "manual"}});
        let machine = api_post(&region, &key, paths::MACHINES.into(), body).await;
        let mut site = Site { region, key, rack, machine, token: String::new(), seq: Default::default() };
        site.call(paths::machine_path(paths::MACHINE_COMMISSION, &site.machine.id), serde_json::json!({})).await;
        site.token = site.agent_token(AgentJob::Commission).await;
        let inventory = Inventory {
            firmware: Firmware::Uefi,
            cpus: 2,
            cpu_model: String::new(),
            memory_bytes: 2 << 30,
            disks: vec![DiskInventory {
                name: "vda".into(),
                size_bytes: 8 << 30,
                model: "QEMU".into(),
                serial: "s".into(),
            }],
            nics: vec![NicInventory { name: "eth0".into(), mac: MAC.into(), speed_mbps: None }],
        };
        site.report(AgentReport::Inventory { inventory }).await;
        site
    }

    /// A POST to the API as the admin that must succeed; the machine it answers.
    async fn call(&self, path: String, body: serde_json::Value) -> MachineView {
        let response =
            self.region.api(&self.key).request(reqwest::Method::POST, &path).json(&body).send().await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.unwrap()
    }

    /// Deploys the newest image version through the API: Deploying, with the job's token.
    async fn deploy(&mut self) {
        let deploy = serde_json::json!({"image": "ubuntu/noble", "arch": "amd64"});
        self.machine = self.call(paths::machine_path(paths::MACHINE_DEPLOY, &self.machine.id), deploy).await;
        assert_eq!(self.machine.state, MachineState::Deploying);
        self.deploy_token().await;
    }

    /// Takes the deploy job's token from the rack's catalogue.
    async fn deploy_token(&mut self) {
        let site = self;
        site.token = site
            .agent_token(AgentJob::Deploy {
                image: site.machine.image.clone().unwrap(),
                kind: "root-disk".into(),
                disk: Some("vda".into()),
            })
            .await;
    }

    /// The job token the rack is told to hand the machine's agent, checking the job.
    async fn agent_token(&self, want: AgentJob) -> String {
        let catalogue = self.rack.catalogue(-1, -1, Duration::ZERO).await.unwrap();
        let boot = catalogue.machines.into_iter().find(|m| m.mac == self.machine.mac).expect("the rack knows it").boot;
        match boot {
            BootAction::Agent { token, job, .. } if job == want => token,
            other => panic!("the rack should boot the agent with {want:?}, not {other:?}"),
        }
    }

    /// One report as the rack forwards it: a boot event carrying it.
    async fn report(&self, report: AgentReport) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let event = BootEvent {
            queue_id: 7,
            seq,
            at_ms: 1,
            mac: self.machine.mac.clone(),
            kind: report.event_kind().into(),
            message: format!("report {seq}"),
            report: Some(MachineReport { machine_id: self.machine.id.clone(), token: self.token.clone(), report }),
        };
        let status = self.rack.send_boot_events(&serde_json::to_value(vec![event]).unwrap()).await.unwrap();
        assert_eq!(status, reqwest::StatusCode::NO_CONTENT);
    }

    async fn progress(&self, done: u64) {
        self.report(AgentReport::Progress { progress: metalrack_tests::reports::progress(DeployPhase::Writing, done) })
            .await;
    }
}

/// A POST to the API as `key`'s owner that must succeed; the machine it answers.
async fn api_post(region: &Region, key: &str, path: String, body: serde_json::Value) -> MachineView {
    let response = region.api(key).request(reqwest::Method::POST, &path).json(&body).send().await.unwrap();
    assert!(response.status().is_success(), "{path}: {}", response.status());
    response.json().await.unwrap()
}

#[tokio::test]
async fn a_deploys_progress_moves_on_the_machines_page_and_the_machine_page_without_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::ready(dir.path()).await;
    site.deploy().await;
    site.progress(250).await;

    let (_driver, webdriver) = start_chromedriver(dir.path());
    let client =
        browser(&webdriver, &dir.path().join("chromium-profile"), &site.region.certificate_spki_sha256_base64()).await;
    log_in(&client, &site.region).await;
    client.goto(&format!("{}/machines", site.region.https_url())).await.unwrap();
    client.wait().for_element(Locator::Id("machines")).await.unwrap();
    let row = format!("tr[data-machine='{}']", site.machine.id);
    assert_eq!(text(&client, &format!("{row} td.state")).await, "Deploying");
    assert_eq!(text(&client, &format!("{row} .progress-text")).await, "25 % · 250 B of 1000 B · 100 B/s");
    // A mark on this page's window: a reload would lose it.
    client.execute("window.metalrackNoReload = true;", vec![]).await.unwrap();

    site.progress(700).await;
    wait_for("the progress bar at 70 % without a reload", DEADLINE, || async {
        let bar = client.find(Locator::Css(&format!("{row} progress"))).await.ok()?;
        let value = bar.attr("value").await.ok()??;
        (value == "70").then_some(())
    })
    .await;
    assert_eq!(text(&client, &format!("{row} .progress-text")).await, "70 % · 700 B of 1000 B · 100 B/s");
    let same_page = client.execute("return window.metalrackNoReload === true;", vec![]).await.unwrap();
    assert_eq!(same_page, serde_json::Value::Bool(true), "the page was reloaded");
    screenshot(&client, "machines-deploying").await;

    // The machine's page follows the progress too, in place.
    client.find(Locator::Css(&format!("{row} td.name a"))).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("machine-progress")).await.unwrap();
    assert_eq!(text(&client, "#machine-progress .progress-text").await, "70 % · 700 B of 1000 B · 100 B/s");
    client.execute("window.metalrackNoReload = true;", vec![]).await.unwrap();
    site.progress(900).await;
    wait_for("the machine page's progress at 90 %", DEADLINE, || async {
        let bar = client.find(Locator::Css("#machine-progress progress")).await.ok()?;
        (bar.attr("value").await.ok()?? == "90").then_some(())
    })
    .await;
    let detail = text(&client, "#machine-progress .progress-detail").await;
    assert_eq!(detail, "writing · 900 B fetched, 900 B written, 0 B already there, 0 chunks fetched again");
    let same_page = client.execute("return window.metalrackNoReload === true;", vec![]).await.unwrap();
    assert_eq!(same_page, serde_json::Value::Bool(true), "the machine page was reloaded");
    screenshot(&client, "machine-deploying").await;
    client.back().await.unwrap();
    client.wait().for_element(Locator::Id("machines")).await.unwrap();

    // The written image and the boot from disk: the row says Deployed and the bar goes.
    let done = DeployProgress {
        phase: DeployPhase::Done,
        bytes_done: 1000,
        ..metalrack_tests::reports::progress(DeployPhase::Writing, 1000)
    };
    site.report(AgentReport::Deployed { progress: done }).await;
    site.report(AgentReport::BootedLocal).await;
    wait_for("the row Deployed without a reload", DEADLINE, || async {
        let state = client.find(Locator::Css(&format!("{row} td.state"))).await.ok()?.text().await.ok()?;
        (state == "Deployed").then_some(())
    })
    .await;
    assert!(client.find(Locator::Css(&format!("{row} progress"))).await.is_err());

    // What the script reads: the session's machines.json, the same data as the API's list...
    let seen = client
        .execute(
            "return fetch(arguments[0]).then(response => response.json());",
            vec![format!("{}/machines.json", site.region.https_url()).into()],
        )
        .await
        .unwrap();
    let api: serde_json::Value = site
        .region
        .api(&site.key)
        .request(reqwest::Method::GET, paths::MACHINES)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen, api);
    // ...and nothing without a session: the login page, never the machines.
    let anonymous = site.region.https_client_builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let response = anonymous.get(format!("{}/machines.json", site.region.https_url())).send().await.unwrap();
    assert!(response.status().is_redirection(), "{}", response.status());
    assert!(response.headers()["location"].to_str().unwrap().ends_with("/MAAS/login"));
    // The script itself is served by the region, as a script, cacheable.
    let script = anonymous.get(format!("{}/static/machines.js", site.region.https_url())).send().await.unwrap();
    assert_eq!(script.headers()["content-type"], "application/javascript");
    assert_eq!(script.headers()["cache-control"], "max-age=300");
    client.close().await.unwrap();
}

#[tokio::test]
async fn a_machine_is_deployed_aborted_released_and_powered_from_its_page_which_follows_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::ready(dir.path()).await;
    let (_driver, webdriver) = start_chromedriver(dir.path());
    let client =
        browser(&webdriver, &dir.path().join("chromium-profile"), &site.region.certificate_spki_sha256_base64()).await;
    log_in(&client, &site.region).await;
    let page = format!("{}/machines/{}", site.region.https_url(), site.machine.id);
    client.goto(&page).await.unwrap();
    client.wait().for_element(Locator::Id("deploy-form")).await.unwrap();
    assert_eq!(text(&client, "#machine-state").await, "Ready");
    // The inventory the agent reported, and the disk to deploy to offered from it.
    let inventory = text(&client, "#inventory").await;
    assert!(inventory.contains("UEFI") && inventory.contains("vda") && inventory.contains("8.0 GiB"), "{inventory}");
    assert_eq!(text(&client, "#deploy-disk option").await, "vda · 8.0 GiB QEMU");
    // The newest version is chosen unless another is.
    let image = client.find(Locator::Css("#deploy-image option:checked")).await.unwrap().text().await.unwrap();
    assert_eq!(image, "ubuntu/noble amd64, newest (2)");
    client
        .find(Locator::Css("#deploy-image option[value='ubuntu/noble amd64 1']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    screenshot(&client, "machine-ready").await;
    client.find(Locator::Id("deploy")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("abort")).await.unwrap();
    assert_eq!(text(&client, "#machine-state").await, "Deploying");
    site.machine.image = Some(metalrack_api::agent::ImageRef {
        image: "ubuntu/noble".into(),
        arch: "amd64".into(),
        version: "1".into(),
    });
    site.deploy_token().await;

    // Abort: a failed deploy, with who stopped it.
    client.find(Locator::Id("abort")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("release-form")).await.unwrap();
    assert_eq!(text(&client, "#machine-state").await, "Failed deployment");
    assert_eq!(text(&client, "#status-message").await, "aborted by admin");

    // Release with a quick erase: the rack is told to boot the agent with that job.
    client.find(Locator::Css("#release-erase option[value='quick']")).await.unwrap().click().await.unwrap();
    client.find(Locator::Id("release")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("machine-state")).await.unwrap();
    assert_eq!(text(&client, "#machine-state").await, "Releasing");
    site.token = site
        .agent_token(AgentJob::Release { erase: metalrack_api::agent::EraseMode::Quick, disk: Some("vda".into()) })
        .await;

    // A machine with a BMC: its page's Check asks the rack to query its power.
    let body = serde_json::json!({"mac": "52:54:00:aa:bb:22", "hostname": "bmc-node", "power": {"driver": "redfish",
        "address": "https://10.0.0.5", "username": "admin", "password": "bmc-secret-7"}});
    let other = api_post(&site.region, &site.key, paths::MACHINES.into(), body).await;
    client.goto(&format!("{}/machines/{}", site.region.https_url(), other.id)).await.unwrap();
    client.wait().for_element(Locator::Id("power-check")).await.unwrap();
    let source = client.source().await.unwrap();
    assert!(!source.contains("bmc-secret-7") && source.contains("https://10.0.0.5"), "{source}");
    client.find(Locator::Id("power-check")).await.unwrap().click().await.unwrap();
    client.wait().for_element(Locator::Id("power-state")).await.unwrap();
    wait_for("a power query for the machine", DEADLINE, || async {
        let requests = site.rack.power_requests(Duration::from_secs(2)).await.unwrap();
        requests
            .iter()
            .any(|r| r.machine_id == other.id && r.actions == [metalrack_api::power::PowerAction::Query])
            .then_some(())
    })
    .await;
    client.goto(&page).await.unwrap();
    client.wait().for_element(Locator::Id("machine-state")).await.unwrap();

    // The events, newest first, name who did what.
    let events = text(&client, "table.events").await;
    let release = events.find("Failed deployment → Releasing").unwrap_or_else(|| panic!("released: {events}"));
    let abort = events.find("Deploying → Failed deployment").unwrap_or_else(|| panic!("aborted: {events}"));
    assert!(events.contains("deploy ubuntu/noble amd64 version 1 to vda asked for"), "{events}");
    assert!(release < abort, "newest first: {events}");
    screenshot(&client, "machine-releasing").await;

    // The released report: the page loads itself again and shows the machine Ready.
    site.report(AgentReport::Released).await;
    wait_for("the machine page showing Ready by itself", DEADLINE, || async {
        let state = client.find(Locator::Id("machine-state")).await.ok()?.text().await.ok()?;
        (state == "Ready").then_some(())
    })
    .await;
    client.close().await.unwrap();
}
