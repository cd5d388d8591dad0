//! The `metalrack` client CLI run for real against a real region (over HTTPS, trusting its
//! certificate by fingerprint) with a rack client registered: login (a wrong key refused, the
//! file only its owner reads), add with manual and Redfish power (the BMC password in no output),
//! list (table, JSON, state filter), show by id and MAC, commission (refused with the region's
//! reason until a deploy environment is in the catalogue), deploy `--wait` ending Deployed
//! (exit 0) or failed (exit 1) as the rack's reports say, a wait that times out (exit 2),
//! release, power, broken and fixed, abort, delete, events naming the user, and the images list.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use metalrack_api::agent::{AgentReport, DeployPhase, MachineReport};
use metalrack_api::images::ImageView;
use metalrack_api::machines::{BootAction, BootEvent, MachinePage, MachineState, MachineView};
use metalrack_api::power::{PowerAction, PowerRequest, PowerResult, PowerState};
use metalrack_api::EventView;
use metalrack_tests::rack_client::RackClient;
use metalrack_tests::reports::{inventory, progress};
use metalrack_tests::{binary, wait_for, Region, DEADLINE, FAST_REGION_CONFIG};
use reqwest::StatusCode;

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const ADMIN_PASSWORD: &str = "correct horse battery staple";
/// The BMC password: given through the environment, it must never come back in any output.
const BMC_PASSWORD: &str = "hunter2-bmc-secret";
const DEPLOY_ENV: &str = "metalrack/deploy-env";

/// How long a power poll is held when a request is expected at once.
const POLL: Duration = Duration::from_secs(5);

/// The `metalrack` binary with its own login file; every output is checked for the password.
struct Metalrack {
    login_file: PathBuf,
}

impl Metalrack {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary("metalrack"));
        command.args(args).env("METALRACK_LOGIN_FILE", &self.login_file).stdin(Stdio::null());
        command.env_remove("METALRACK_POWER_PASSWORD");
        command
    }

    /// Runs `metalrack ARGS`; its output, whatever the exit, checked for the password.
    fn run(&self, args: &[&str]) -> Output {
        checked(args, self.command(args).output().expect("metalrack runs"))
    }

    /// Runs `metalrack ARGS` that must exit 0; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert_eq!(output.status.code(), Some(0), "metalrack {args:?}: {}", text(&output));
        String::from_utf8(output.stdout).unwrap()
    }

    /// `metalrack ARGS --output json`, parsed.
    fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        let stdout = self.ok(&args);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("metalrack {args:?} printed no such JSON ({e}): {stdout}"))
    }

    fn show(&self, machine: &str) -> MachineView {
        self.json(&["machines", "show", machine])
    }

    /// Runs `metalrack ARGS` that must exit 2 (an error); its stderr.
    fn error(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert_eq!(output.status.code(), Some(2), "metalrack {args:?} should fail: {}", text(&output));
        assert!(output.stdout.is_empty(), "an error prints nothing on stdout: {}", text(&output));
        String::from_utf8(output.stderr).unwrap()
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        metalrack_tests::stderr(output)
    )
}

/// `output` of `metalrack ARGS`, after checking the BMC password is in neither stream.
fn checked(args: &[&str], output: Output) -> Output {
    let all = text(&output);
    assert!(!all.contains(BMC_PASSWORD), "metalrack {args:?} showed the BMC password: {all}");
    output
}

/// A region with an admin and a registered rack, and `metalrack` logged in to it.
struct Site {
    region: Region,
    key: String,
    rack: RackClient,
    cli: Metalrack,
    /// Sequence numbers of the rack's event queue.
    seq: std::sync::atomic::AtomicU64,
}

impl Site {
    async fn start(dir: &Path) -> Site {
        let region = Region::start_with_env(&dir.join("region"), FAST_REGION_CONFIG, &[("RUST_LOG", "debug")]);
        let key = region.create_admin("admin", ADMIN_PASSWORD);
        let rack = RackClient::register(&region.url, &region.secret(), "rack1", LOCALHOST).await.unwrap();
        let cli = Metalrack { login_file: dir.join("config/metalrack/login.toml") };
        let login = cli.ok(&["login", &region.https_url(), &key, "--region-cert-sha256", &region.certificate_sha256()]);
        assert!(login.contains("as admin"), "{login}");
        Site { region, key, rack, cli, seq: Default::default() }
    }

    /// Sends one report the way the rack's queue does: a boot event carrying it.
    async fn report(&self, machine: &MachineView, token: &str, report: AgentReport) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let event = BootEvent {
            queue_id: 7,
            seq,
            at_ms: 1,
            mac: machine.mac.clone(),
            kind: report.event_kind().into(),
            message: format!("report {seq}"),
            report: Some(MachineReport { machine_id: machine.id.clone(), token: token.into(), report }),
        };
        let status = self.rack.send_boot_events(&serde_json::to_value(vec![event]).unwrap()).await.unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
    }

    /// The job token the rack is told for `mac` while an agent job runs.
    async fn agent_token(&self, mac: &str) -> String {
        let catalogue = self.rack.catalogue(-1, -1, Duration::ZERO).await.unwrap();
        let machine = catalogue.machines.into_iter().find(|m| m.mac == mac).expect("the rack is told of the machine");
        match machine.boot {
            BootAction::Agent { token, .. } => token,
            other => panic!("the rack should boot {mac} into the agent, not {other:?}"),
        }
    }

    /// The power request with `actions` for `machine_id` the rack is given, waiting for it (a
    /// request of an earlier operation nobody answered may come first).
    async fn power_request_for(&self, machine_id: &str, actions: &[PowerAction]) -> PowerRequest {
        wait_for(&format!("a power request {actions:?} for {machine_id}"), DEADLINE, || async {
            let requests = self.rack.power_requests(POLL).await.unwrap();
            requests.into_iter().find(|r| r.machine_id == machine_id && r.actions == actions)
        })
        .await
    }

    /// Pushes a pretend deploy environment (kernel and initrd) into the catalogue.
    fn push_deploy_env(&self, dir: &Path) {
        for kind in ["kernel", "initrd"] {
            let file = dir.join(kind);
            std::fs::write(&file, format!("pretend {kind} ").repeat(1000)).unwrap();
            self.region.push(&self.key, &file, DEPLOY_ENV, kind, "1");
        }
    }

    /// `metalrack machines commission ID`, then the agent's inventory: Ready.
    async fn commission_to_ready(&self, machine: &MachineView) {
        let shown: MachineView = self.cli.json(&["machines", "commission", &machine.id]);
        assert_eq!(shown.state, MachineState::Commissioning);
        let token = self.agent_token(&machine.mac).await;
        self.report(machine, &token, AgentReport::Inventory { inventory: inventory(&machine.mac) }).await;
        assert_eq!(self.cli.show(&machine.id).state, MachineState::Ready);
    }
}

/// Starts `metalrack ARGS` in the background (a `--wait`ed operation); join it for its output.
fn spawn(cli: &Metalrack, args: &[&str]) -> tokio::task::JoinHandle<Output> {
    let mut command = cli.command(args);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let output = command.output().expect("metalrack runs");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        checked(&args, output)
    })
}

/// Waits until machine `id` is in `state` as the API shows it (what a `--wait` then sees).
async fn wait_state(site: &Site, id: &str, state: MachineState) {
    wait_for(&format!("machine {id} to be {}", state.label()), DEADLINE, || async {
        (site.region.api(&site.key).machine(id).await.unwrap().state == state).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_refuses_a_wrong_key_saving_nothing_and_saves_a_right_one_readable_only_by_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let key = region.create_admin("admin", ADMIN_PASSWORD);
    let cli = Metalrack { login_file: dir.path().join("login.toml") };
    let url = region.https_url();
    let pin = region.certificate_sha256();

    // A wrong key: exit 2, the region's refusal said, no file.
    let stderr = cli.error(&["login", &url, "not-a-key", "--region-cert-sha256", &pin]);
    assert!(stderr.contains("checking the login: the region refused (401"), "{stderr}");
    assert!(!cli.login_file.exists(), "a refused login is not saved");

    // Another certificate's fingerprint: refused before the key is sent.
    let stderr = cli.error(&["login", &url, &key, "--region-cert-sha256", &"00".repeat(32)]);
    assert!(stderr.contains(&url), "the refusal names the region: {stderr}");
    assert!(!cli.login_file.exists());

    // A URL in clear: refused before the key is sent, saying what to use.
    let clear = region.url.clone();
    let stderr = cli.error(&["login", &clear, &key, "--region-cert-sha256", &pin]);
    assert!(stderr.contains("HTTPS only") && stderr.contains(&format!("use {url}")), "{stderr}");
    assert!(!stderr.contains("imgtool") && !stderr.contains(&key), "{stderr}");

    // Not logged in: the other commands say what to do.
    let stderr = cli.error(&["machines", "list"]);
    assert!(stderr.contains("not logged in") && stderr.contains("metalrack login"), "{stderr}");

    // `-`: the key from standard input (out of `ps`), as good as given.
    let mut login = cli.command(&["login", &url, "-", "--region-cert-sha256", &pin]);
    login.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = login.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), format!("{key}\n").as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let saved = std::fs::read_to_string(&cli.login_file).unwrap();
    assert!(saved.contains(&format!("api_key = \"{key}\"")), "the key read is saved: {saved}");
    std::fs::remove_file(&cli.login_file).unwrap();

    // The right key, trusting the certificate file: saved for the owner only.
    let shown = cli.ok(&["login", &url, &key, "--ca-cert", region.certificate_path().to_str().unwrap()]);
    assert!(shown.contains("as admin"), "{shown}");
    let mode = std::fs::metadata(&cli.login_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the login file holds the API key");
    let page: MachinePage = cli.json(&["machines", "list"]);
    assert_eq!(page.total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metalrack_adds_commissions_deploys_fails_releases_and_fixes_machines_with_the_exit_codes_scripts_rely_on() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path()).await;
    let cli = &site.cli;
    let (mac1, mac2) = ("52:54:00:cc:dd:01", "52:54:00:cc:dd:02");

    // Added with Redfish power (the password from the environment) and manual power.
    let mut add = cli.command(&[
        "machines",
        "add",
        "--mac",
        mac1,
        "--hostname",
        "node1",
        "--power-driver",
        "redfish",
        "--power-address",
        "https://10.0.0.5",
        "--power-user",
        "admin",
        "--output",
        "json",
    ]);
    add.env("METALRACK_POWER_PASSWORD", BMC_PASSWORD);
    let output = checked(&["machines", "add"], add.output().unwrap());
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let m1: MachineView = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((m1.state, m1.hostname.as_str(), m1.rack_name.as_deref()), (MachineState::New, "node1", Some("rack1")));
    let power = m1.power.as_ref().expect("the power parameters are shown");
    assert!(power.password_set, "{power:?}");
    let table = cli.ok(&["machines", "add", "--mac", mac2, "--power-driver", "manual"]);
    assert!(table.contains("state:     New") && table.contains("(manual)"), "{table}");
    let m2 = cli.show(mac2);
    let stderr = cli.error(&["machines", "add", "--mac", mac2, "--power-driver", "manual"]);
    assert!(stderr.contains("exists already"), "{stderr}");

    // Listed as a table and as JSON; filtered by state; shown by id and by MAC.
    let table = cli.ok(&["machines", "list"]);
    assert!(table.starts_with("ID "), "a header: {table}");
    for machine in [&m1, &m2] {
        let row =
            table.lines().find(|l| l.starts_with(&machine.id)).unwrap_or_else(|| panic!("{} in {table}", machine.id));
        assert!(row.contains(&machine.mac) && row.contains("New") && row.contains("rack1"), "{row}");
    }
    let page: MachinePage = cli.json(&["machines", "list"]);
    assert_eq!(page.total, 2);
    let mut ids: Vec<&str> = page.machines.iter().map(|m| m.id.as_str()).collect();
    ids.sort();
    let mut want = vec![m1.id.as_str(), m2.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    let shown = cli.show(&m1.id);
    assert_eq!((shown.mac.as_str(), shown.power.unwrap().password_set), (mac1, true));
    assert_eq!(cli.show(mac1).id, m1.id, "found by its MAC");
    let stderr = cli.error(&["machines", "show", &format!("{}/{}", &m1.id[..4], &m1.id[4..])]);
    assert!(stderr.contains("is not a machine"), "not quietly another id: {stderr}");
    let stderr = cli.error(&["machines", "list", "--state", "sleeping"]);
    assert!(stderr.contains("not a state") && stderr.contains("ready"), "{stderr}");

    // No deploy environment in the catalogue: exit 2 with the region's reason.
    let stderr = cli.error(&["machines", "commission", &m1.id]);
    assert!(stderr.contains("409") && stderr.contains("imgtool deploy-env build --push"), "{stderr}");
    site.push_deploy_env(dir.path());
    site.commission_to_ready(&m1).await;
    // commission --wait follows it to Ready (by MAC), exit 0.
    let commission = spawn(cli, &["machines", "commission", mac2, "--wait"]);
    wait_state(&site, &m2.id, MachineState::Commissioning).await;
    let token = site.agent_token(mac2).await;
    site.report(&m2, &token, AgentReport::Inventory { inventory: inventory(mac2) }).await;
    let output = tokio::time::timeout(DEADLINE, commission).await.expect("commission --wait ends").unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("state:     Ready"), "{}", text(&output));
    let page: MachinePage = cli.json(&["machines", "list", "--state", "ready"]);
    assert_eq!(page.total, 2);
    let page: MachinePage = cli.json(&["machines", "list", "--state", "new"]);
    assert_eq!((page.total, page.machines.len()), (0, 0));
    let shown = cli.ok(&["machines", "show", &m1.id]);
    assert!(shown.contains("disk vda") && shown.contains("4 CPUs"), "the inventory: {shown}");

    // An image to deploy, listed by `images list`.
    let root = dir.path().join("root.img");
    std::fs::write(&root, b"pretend root disk ".repeat(4000)).unwrap();
    site.region.push(&site.key, &root, "ubuntu/noble", "root-disk", "1");
    let images = cli.ok(&["images", "list"]);
    assert!(images.lines().any(|l| l.starts_with("ubuntu/noble") && l.contains("root-disk")), "{images}");
    assert!(images.lines().any(|l| l.starts_with(DEPLOY_ENV) && l.contains("initrd,kernel")), "{images}");
    let listed: Vec<ImageView> = cli.json(&["images", "list"]);
    assert!(listed.iter().any(|i| i.name == "ubuntu/noble" && i.versions[0].version == "1"), "{listed:?}");

    // deploy --wait follows the rack's reports and exits 0 once the machine booted its disk.
    let deploy = spawn(cli, &["machines", "deploy", &m1.id, "--image", "ubuntu/noble", "--wait", "--output", "json"]);
    wait_state(&site, &m1.id, MachineState::Deploying).await;
    let token = site.agent_token(mac1).await;
    site.report(&m1, &token, AgentReport::Progress { progress: progress(DeployPhase::Writing, 500) }).await;
    site.report(&m1, &token, AgentReport::Deployed { progress: progress(DeployPhase::Done, 1000) }).await;
    assert!(!deploy.is_finished(), "written is not booted yet");
    site.report(&m1, &token, AgentReport::BootedLocal).await;
    let output = tokio::time::timeout(DEADLINE, deploy).await.expect("deploy --wait ends").unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let deployed: MachineView = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(deployed.state, MachineState::Deployed);
    assert_eq!(deployed.image.as_ref().map(|i| i.image.as_str()), Some("ubuntu/noble"));
    let table = cli.ok(&["machines", "show", &m1.id]);
    assert!(
        table.contains("state:     Deployed") && table.contains("image:     ubuntu/noble amd64 1 on vda"),
        "{table}"
    );

    // A deploy the agent fails: --wait exits 1 and says why.
    let deploy = spawn(cli, &["machines", "deploy", mac2, "--image", "ubuntu/noble", "--wait"]);
    wait_state(&site, &m2.id, MachineState::Deploying).await;
    let token = site.agent_token(mac2).await;
    site.report(&m2, &token, AgentReport::Failed { reason: "disk vda: write error at 4096".into() }).await;
    let output = tokio::time::timeout(DEADLINE, deploy).await.expect("deploy --wait ends").unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(shown.contains("state:     Failed deployment"), "{shown}");
    let stderr = metalrack_tests::stderr(&output);
    assert!(stderr.contains("Failed deployment: disk vda: write error at 4096"), "{stderr}");

    // Release --wait: the rack is asked to power it off, says it is off, the machine is Ready.
    let release = spawn(cli, &["machines", "release", &m1.id, "--wait", "--output", "json"]);
    let request = site.power_request_for(&m1.id, &[PowerAction::Off]).await;
    let result = PowerResult { id: request.id, machine_id: m1.id.clone(), state: PowerState::Off, error: None };
    assert_eq!(site.rack.power_result(&result).await.unwrap(), StatusCode::NO_CONTENT);
    let output = tokio::time::timeout(DEADLINE, release).await.expect("release --wait ends").unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let released: MachineView = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((released.state, released.power_state), (MachineState::Ready, PowerState::Off));

    // Power: asked of the rack for a Redfish machine; refused for a manual one.
    cli.ok(&["machines", "power", &m1.id, "on"]);
    site.power_request_for(&m1.id, &[PowerAction::On]).await;
    let stderr = cli.error(&["machines", "power", &m2.id, "cycle"]);
    assert!(stderr.contains("409"), "{stderr}");

    // Broken with a reason, then fixed (Ready again: it was commissioned).
    let broken: MachineView = cli.json(&["machines", "mark-broken", &m2.id, "--reason", "fan failed"]);
    assert_eq!((broken.state, broken.status_message.as_str()), (MachineState::Broken, "fan failed"));
    let stderr = cli.error(&["machines", "deploy", &m2.id, "--image", "ubuntu/noble"]);
    assert!(stderr.contains("mark it fixed first"), "{stderr}");
    let fixed: MachineView = cli.json(&["machines", "mark-fixed", &m2.id]);
    assert_eq!(fixed.state, MachineState::Ready);

    // Abort a commissioning; then delete the machine.
    // (Waited for too briefly: exit 2, saying so; the commissioning goes on.)
    let stderr = cli.error(&["machines", "commission", &m2.id, "--wait", "--wait-timeout-s", "1"]);
    assert!(stderr.contains(&format!("{} is still Commissioning after 1 s", m2.id)), "{stderr}");
    assert_eq!(cli.show(&m2.id).state, MachineState::Commissioning);
    let aborted: MachineView = cli.json(&["machines", "abort", &m2.id]);
    assert_eq!(aborted.state, MachineState::New, "an aborted commissioning leaves it new");
    assert!(aborted.status_message.contains("aborted by admin"), "{aborted:?}");
    let deleted = cli.ok(&["machines", "delete", &m2.id]);
    assert!(deleted.contains(&format!("Deleted {}", m2.id)), "{deleted}");
    let stderr = cli.error(&["machines", "show", &m2.id]);
    assert!(stderr.contains("404"), "{stderr}");
    let page: MachinePage = cli.json(&["machines", "list"]);
    assert_eq!(page.total, 1);

    // Events: what happened to the machine and who asked.
    let events: Vec<EventView> = cli.json(&["machines", "events", &m1.id]);
    assert!(events.iter().any(|e| e.actor == "admin" && e.kind.starts_with("machine.")), "{events:?}");
    let table = cli.ok(&["machines", "events", &m1.id]);
    assert!(table.lines().any(|l| l.contains("admin") && l.contains("machine.")), "{table}");

    // The password reached neither the API's answers (above) nor the region's log.
    assert!(!site.region.daemon.log_text().contains(BMC_PASSWORD), "the region logged the BMC password");
}
