//! The machine lifecycle through the region's real API and the rack protocol, with a real
//! region (SQLite in a temp dir) and a rack client registered over TLS: add, commission (power
//! requests the rack polls for, the agent boot in the rack's catalogue, the inventory report),
//! deploy with a per-rack queue, reports of an earlier job ignored, illegal transitions refused
//! with their reason, the stall timer, and the BMC password never shown.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use metalrack_api::agent::{AgentJob, AgentReport, DeployPhase, MachineReport};
use metalrack_api::machines::{BootAction, BootEvent, MachineState, MachineView};
use metalrack_api::paths;
use metalrack_api::power::{BootDevice, PowerAction, PowerRequest, PowerResult, PowerState};
use metalrack_tests::rack_client::RackClient;
use metalrack_tests::reports::{inventory, progress};
use metalrack_tests::{wait_for, Region, DEADLINE, FAST_REGION_CONFIG};
use reqwest::{Method, StatusCode};
use serde_json::json;

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const ADMIN_PASSWORD: &str = "correct horse battery staple";
/// The BMC password: it must never come back from the API nor reach the log.
const BMC_PASSWORD: &str = "hunter2-bmc-secret";
const DEPLOY_ENV: &str = "metalrack/deploy-env";

/// How long a power poll is held in these tests when a request is expected at once.
const POLL: Duration = Duration::from_secs(5);

/// A region, its admin's API key, and a registered rack.
struct Site {
    region: Region,
    key: String,
    rack: RackClient,
    /// Sequence numbers of the rack's event queue.
    seq: std::sync::atomic::AtomicU64,
}

impl Site {
    async fn start(dir: &Path, extra_config: &str) -> Site {
        let config = format!("{FAST_REGION_CONFIG}{extra_config}");
        // Debug logs: every line the region writes is checked for the password.
        let region = Region::start_with_env(&dir.join("region"), &config, &[("RUST_LOG", "debug")]);
        let key = region.create_admin("admin", ADMIN_PASSWORD);
        let rack = RackClient::register(&region.url, &region.secret(), "rack1", LOCALHOST).await.unwrap();
        Site { region, key, rack, seq: Default::default() }
    }

    /// A request as the admin; the status and the body.
    async fn call(&self, method: Method, path: &str, body: Option<serde_json::Value>) -> (StatusCode, String) {
        let mut request = self.region.api(&self.key).request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(!text.contains(BMC_PASSWORD), "the password came back from {path}: {text}");
        (status, text)
    }

    /// A call that must answer `want`; its JSON.
    async fn expect(&self, method: Method, path: &str, body: Option<serde_json::Value>, want: StatusCode) -> String {
        let (status, text) = self.call(method.clone(), path, body).await;
        assert_eq!(status, want, "{method} {path}: {text}");
        text
    }

    async fn machine(&self, key: &str) -> MachineView {
        let text = self.expect(Method::GET, &paths::machine(key), None, StatusCode::OK).await;
        serde_json::from_str(&text).unwrap()
    }

    async fn action(&self, template: &str, id: &str, body: Option<serde_json::Value>) -> MachineView {
        let text = self.expect(Method::POST, &paths::machine_path(template, id), body, StatusCode::OK).await;
        serde_json::from_str(&text).unwrap()
    }

    async fn add(&self, mac: &str) -> MachineView {
        let body = json!({
            "mac": mac,
            "power": {"driver": "redfish", "address": "https://10.0.0.5", "username": "admin",
                      "password": BMC_PASSWORD},
        });
        let text = self.expect(Method::POST, paths::MACHINES, Some(body), StatusCode::CREATED).await;
        serde_json::from_str(&text).unwrap()
    }

    /// Sends one report the way the rack's queue does: a boot event carrying it.
    async fn report(&self, mac: &str, machine_id: &str, token: &str, report: AgentReport) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let event = BootEvent {
            queue_id: 42,
            seq,
            at_ms: 1,
            mac: mac.into(),
            kind: report.event_kind().into(),
            message: format!("report {seq}"),
            report: Some(MachineReport { machine_id: machine_id.into(), token: token.into(), report }),
        };
        let status = self.rack.send_boot_events(&serde_json::to_value(vec![event]).unwrap()).await.unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
    }

    /// This rack's power requests for `machine_id`, waiting for at least one.
    async fn power_requests_for(&self, machine_id: &str) -> Vec<PowerRequest> {
        wait_for("a power request for the machine", DEADLINE, || async {
            let requests = self.rack.power_requests(POLL).await.unwrap();
            let mine: Vec<PowerRequest> = requests.into_iter().filter(|r| r.machine_id == machine_id).collect();
            (!mine.is_empty()).then_some(mine)
        })
        .await
    }

    /// The boot action the rack is told for `mac`.
    async fn rack_boot(&self, mac: &str) -> BootAction {
        let catalogue = self.rack.catalogue(-1, -1, Duration::ZERO).await.unwrap();
        catalogue.machines.into_iter().find(|m| m.mac == mac).expect("the rack is told of the machine").boot
    }

    /// Pushes a deploy environment (kernel and initrd files) into the catalogue.
    fn push_deploy_env(&self, dir: &Path) {
        for kind in ["kernel", "initrd"] {
            let file = dir.join(kind);
            std::fs::write(&file, format!("pretend {kind} ").repeat(1000)).unwrap();
            self.region.push(&self.key, &file, DEPLOY_ENV, kind, "1");
        }
    }

    /// The job token the rack is told for `mac` while an agent job runs.
    async fn agent_token(&self, mac: &str) -> (String, AgentJob) {
        match self.rack_boot(mac).await {
            BootAction::Agent { token, job, env, .. } => {
                assert_eq!(env.image.image, DEPLOY_ENV);
                assert_eq!(env.kernel_params, "console=ttyS0");
                (token, job)
            }
            other => panic!("the rack should boot {mac} into the agent, not {other:?}"),
        }
    }

    /// Commissions machine `id` (MAC `mac`) to Ready through the rack protocol.
    async fn commission_to_ready(&self, id: &str, mac: &str) {
        let machine = self.action(paths::MACHINE_COMMISSION, id, None).await;
        assert_eq!(machine.state, MachineState::Commissioning);
        let (token, job) = self.agent_token(mac).await;
        assert_eq!(job, AgentJob::Commission);
        self.report(mac, id, &token, AgentReport::Inventory { inventory: inventory(mac) }).await;
        assert_eq!(self.machine(id).await.state, MachineState::Ready);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_are_commissioned_deployed_failed_released_aborted_and_fixed_through_the_api_and_the_rack_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), "deploys_per_rack_max = 1\n").await;
    let (mac1, mac2) = ("52:54:00:aa:bb:01", "52:54:00:aa:bb:02");

    // Added with the one rack implied; the view shows the driver, never the password.
    let m1 = site.add(mac1).await;
    assert_eq!((m1.state, m1.rack_name.as_deref()), (MachineState::New, Some("rack1")));
    assert!(m1.id.len() == 8 && m1.id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{}", m1.id);
    assert!(m1.power.as_ref().unwrap().password_set);
    let body = json!({"mac": mac1, "power": {"driver": "manual"}});
    let text = site.expect(Method::POST, paths::MACHINES, Some(body), StatusCode::CONFLICT).await;
    assert!(text.contains("exists already"), "{text}");
    assert_eq!(site.machine(&mac1.replace(':', "-")).await.id, m1.id, "a machine is found by its MAC too");

    // No deploy environment yet: commissioning is refused, saying what to do.
    let (status, text) = site.call(Method::POST, &paths::machine_path(paths::MACHINE_COMMISSION, &m1.id), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(text.contains("imgtool deploy-env build --push"), "{text}");
    site.push_deploy_env(dir.path());

    // Commission: the rack is asked to boot it from the network and cycle it, and tells the
    // machine to boot the agent with the commission job.
    let machine = site.action(paths::MACHINE_COMMISSION, &m1.id, None).await;
    assert_eq!(machine.state, MachineState::Commissioning);
    let requests = site.power_requests_for(&m1.id).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].actions, [PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::Cycle]);
    assert_eq!(requests[0].mac, mac1);
    let result = PowerResult { id: requests[0].id, machine_id: m1.id.clone(), state: PowerState::On, error: None };
    assert_eq!(site.rack.power_result(&result).await.unwrap(), StatusCode::NO_CONTENT);
    assert_eq!(site.machine(&m1.id).await.power_state, PowerState::On);
    let (token, job) = site.agent_token(mac1).await;
    assert_eq!(job, AgentJob::Commission);
    assert_eq!(token.len(), 32);

    // A report with another token (an earlier job's) changes nothing; the right one makes the
    // machine Ready with its inventory, and the rack is asked to power it off.
    site.report(mac1, &m1.id, &"0".repeat(32), AgentReport::Inventory { inventory: inventory(mac1) }).await;
    let machine = site.machine(&m1.id).await;
    assert_eq!((machine.state, machine.inventory.is_none()), (MachineState::Commissioning, true));
    site.report(mac1, &m1.id, &token, AgentReport::Inventory { inventory: inventory(mac1) }).await;
    let machine = site.machine(&m1.id).await;
    assert_eq!(machine.state, MachineState::Ready);
    assert_eq!(machine.inventory.unwrap().disks[0].name, "vda");
    let requests = site.power_requests_for(&m1.id).await;
    assert_eq!(requests.iter().map(|r| r.actions.clone()).collect::<Vec<_>>(), [vec![PowerAction::Off]]);
    assert_eq!(site.rack_boot(mac1).await, BootAction::Local);

    // An illegal transition is refused with its reason.
    let (status, text) = site.call(Method::POST, &paths::machine_path(paths::MACHINE_MARK_FIXED, &m1.id), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(text.contains("cannot mark fixed a machine that is ready"), "{text}");

    // A second machine, commissioned too; an image to deploy.
    let m2 = site.add(mac2).await;
    site.commission_to_ready(&m2.id, mac2).await;
    let root = dir.path().join("root.img");
    std::fs::write(&root, b"pretend root disk ".repeat(4000)).unwrap();
    site.region.push(&site.key, &root, "ubuntu/noble", "root-disk", "1");

    // One deploy slot on the rack: the first deploys, the second waits first in the queue.
    let deploy = json!({"image": "ubuntu/noble", "arch": "amd64"});
    let machine = site.action(paths::MACHINE_DEPLOY, &m1.id, Some(deploy.clone())).await;
    assert_eq!(machine.state, MachineState::Deploying);
    assert_eq!(machine.disk.as_deref(), Some("vda"), "the inventory's first disk");
    let machine = site.action(paths::MACHINE_DEPLOY, &m2.id, Some(deploy)).await;
    assert_eq!((machine.state, machine.queue_position), (MachineState::Allocated, Some(1)));
    let (token, job) = site.agent_token(mac1).await;
    match job {
        AgentJob::Deploy { image, kind, disk } => {
            assert_eq!((image.image.as_str(), image.version.as_str()), ("ubuntu/noble", "1"));
            assert_eq!((kind.as_str(), disk.as_deref()), ("root-disk", Some("vda")));
        }
        other => panic!("a deploy job, not {other:?}"),
    }
    assert_eq!(site.rack_boot(mac2).await, BootAction::Local, "a queued machine is not booted yet");

    // Progress, the image written (still deploying until it boots its disk), then booted.
    site.report(mac1, &m1.id, &token, AgentReport::Progress { progress: progress(DeployPhase::Writing, 500) }).await;
    let machine = site.machine(&m1.id).await;
    assert_eq!(machine.progress.unwrap().bytes_done, 500);
    site.report(mac1, &m1.id, &token, AgentReport::Deployed { progress: progress(DeployPhase::Done, 1000) }).await;
    assert_eq!(site.machine(&m1.id).await.state, MachineState::Deploying);
    site.report(mac1, &m1.id, &token, AgentReport::BootedLocal).await;
    let machine = site.machine(&m1.id).await;
    assert_eq!(machine.state, MachineState::Deployed);
    assert_eq!(machine.progress.unwrap().phase, DeployPhase::Done);
    assert_eq!(site.rack_boot(mac1).await, BootAction::Local);

    // The freed slot goes to the waiting machine at once.
    let machine = site.machine(&m2.id).await;
    assert_eq!((machine.state, machine.queue_position), (MachineState::Deploying, None));
    site.agent_token(mac2).await;

    // Release without erase: powered off, then Ready once the rack says it is off.
    let machine = site.action(paths::MACHINE_RELEASE, &m1.id, Some(json!({"erase": "none"}))).await;
    assert_eq!(machine.state, MachineState::Releasing);
    let requests = site.power_requests_for(&m1.id).await;
    assert_eq!(requests[0].actions, [PowerAction::Off]);
    let result = PowerResult { id: requests[0].id, machine_id: m1.id.clone(), state: PowerState::Off, error: None };
    assert_eq!(site.rack.power_result(&result).await.unwrap(), StatusCode::NO_CONTENT);
    assert_eq!(site.machine(&m1.id).await.state, MachineState::Ready);

    // An agent's failure fails the deploy with its reason.
    let (token2, _) = site.agent_token(mac2).await;
    site.report(mac2, &m2.id, &token2, AgentReport::Failed { reason: "disk vda: write error at 4096".into() }).await;
    let machine = site.machine(&m2.id).await;
    assert_eq!(machine.state, MachineState::FailedDeployment);
    assert_eq!(machine.status_message, "disk vda: write error at 4096");

    // Released with erase: the agent erases, reports, and the machine is Ready and powered off.
    let machine = site.action(paths::MACHINE_RELEASE, &m2.id, Some(json!({"erase": "quick"}))).await;
    assert_eq!(machine.state, MachineState::Releasing);
    let (token3, job) = site.agent_token(mac2).await;
    assert_eq!(job, AgentJob::Release { erase: metalrack_api::agent::EraseMode::Quick, disk: Some("vda".into()) });
    assert_ne!(token3, token2, "each job has its own token");
    let requests = site.power_requests_for(&m2.id).await;
    assert_eq!(requests.last().unwrap().actions, [PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::Cycle]);
    site.report(mac2, &m2.id, &token3, AgentReport::Released).await;
    assert_eq!(site.machine(&m2.id).await.state, MachineState::Ready);
    let requests = site.power_requests_for(&m2.id).await;
    assert_eq!(requests.last().unwrap().actions, [PowerAction::Off]);

    // Deployed again, then aborted halfway: a failed deploy, and the machine powered off.
    let deploy = json!({"image": "ubuntu/noble", "arch": "amd64", "version": "1"});
    let machine = site.action(paths::MACHINE_DEPLOY, &m2.id, Some(deploy)).await;
    assert_eq!(machine.state, MachineState::Deploying);
    let machine = site.action(paths::MACHINE_ABORT, &m2.id, None).await;
    assert_eq!((machine.state, machine.status_message.as_str()), (MachineState::FailedDeployment, "aborted by admin"));
    let requests = site.power_requests_for(&m2.id).await;
    assert_eq!(requests.last().unwrap().actions, [PowerAction::Off]);
    let missing = json!({"image": "ubuntu/noble", "arch": "amd64", "version": "7"});
    let (status, text) =
        site.call(Method::POST, &paths::machine_path(paths::MACHINE_DEPLOY, &m2.id), Some(missing)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(text.contains("no version 7 with a root-disk file"), "{text}");

    // Broken, then fixed: Ready again (it was commissioned).
    let broken = json!({"reason": "fan failure"});
    let machine = site.action(paths::MACHINE_MARK_BROKEN, &m2.id, Some(broken)).await;
    assert_eq!((machine.state, machine.status_message.as_str()), (MachineState::Broken, "fan failure"));
    let (status, text) = site.call(Method::POST, &paths::machine_path(paths::MACHINE_COMMISSION, &m2.id), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(text.contains("mark it fixed first"), "{text}");
    assert_eq!(site.action(paths::MACHINE_MARK_FIXED, &m2.id, None).await.state, MachineState::Ready);

    // The machine's events name who did what.
    let text =
        site.expect(Method::GET, &paths::machine_path(paths::MACHINE_EVENTS, &m1.id), None, StatusCode::OK).await;
    let events: Vec<metalrack_api::EventView> = serde_json::from_str(&text).unwrap();
    let lines: Vec<String> = events.iter().map(|e| format!("{} {}", e.actor, e.message)).collect();
    for expected in ["admin", "Commissioning → Ready", "rack rack1", "Deploying → Deployed", "deploy scheduler"] {
        assert!(lines.iter().any(|l| l.contains(expected)), "no event with {expected:?} in {lines:#?}");
    }

    // The list pages and filters.
    let text =
        site.expect(Method::GET, &format!("{}?state=ready&limit=1", paths::MACHINES), None, StatusCode::OK).await;
    let page: metalrack_api::machines::MachinePage = serde_json::from_str(&text).unwrap();
    assert_eq!((page.total, page.machines.len()), (2, 1));
    let text = site.expect(Method::GET, &format!("{}?state=deploying", paths::MACHINES), None, StatusCode::OK).await;
    let page: metalrack_api::machines::MachinePage = serde_json::from_str(&text).unwrap();
    assert_eq!(page.total, 0);
    site.expect(Method::GET, &format!("{}?limit=0", paths::MACHINES), None, StatusCode::BAD_REQUEST).await;
    site.expect(Method::GET, paths::EVENTS, None, StatusCode::OK).await;

    // The password reached no log line.
    let log = site.region.daemon.log_text();
    assert!(log.contains("DEBUG"), "the region logged at debug level");
    assert!(!log.contains(BMC_PASSWORD), "the BMC password is in the region's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_reports_for_the_stall_timeout_fails_naming_the_last_event() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), "stall_timeout_s = 2\n").await;
    let mac = "52:54:00:aa:bb:09";
    let machine = site.add(mac).await;
    site.push_deploy_env(dir.path());
    let machine = site.action(paths::MACHINE_COMMISSION, &machine.id, None).await;
    assert_eq!(machine.state, MachineState::Commissioning);
    let (stalled_token, _) = site.agent_token(mac).await;
    let failed = wait_for("the stall timer to fail the commissioning", DEADLINE, || async {
        let machine = site.machine(&machine.id).await;
        (machine.state == MachineState::FailedCommissioning).then_some(machine)
    })
    .await;
    assert!(failed.status_message.starts_with("no report for 2 s; the last event: "), "{}", failed.status_message);
    assert_eq!(site.rack_boot(mac).await, BootAction::Local, "the agent is no longer served");
    // A late report of the stalled job changes nothing: its token is no longer current.
    site.report(mac, &machine.id, &stalled_token, AgentReport::Inventory { inventory: inventory(mac) }).await;
    assert_eq!(site.machine(&machine.id).await.state, MachineState::FailedCommissioning);
    // A failed machine may be commissioned again.
    let machine = site.action(paths::MACHINE_COMMISSION, &machine.id, None).await;
    assert_eq!(machine.state, MachineState::Commissioning);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_mac_reporting_an_inventory_is_enlisted_on_its_rack_then_edited_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), "").await;
    let mac = "52:54:00:aa:bb:0a";
    site.report(mac, "", "", AgentReport::Inventory { inventory: inventory(mac) }).await;
    let machine = site.machine(mac).await;
    assert_eq!((machine.state, machine.hostname.as_str()), (MachineState::New, "node-525400aabb0a"));
    assert_eq!(machine.rack_name.as_deref(), Some("rack1"));
    assert_eq!(machine.inventory.unwrap().cpus, 4);
    // Enlisting again (a reboot with no job) updates the inventory of the machine it is.
    let mut bigger = inventory(mac);
    bigger.cpus = 8;
    site.report(mac, "", "", AgentReport::Inventory { inventory: bigger }).await;
    assert_eq!(site.machine(mac).await.inventory.unwrap().cpus, 8);
    let page = site.region.api(&site.key).machines().await.unwrap();
    assert_eq!(page.iter().filter(|m| m.mac == mac).count(), 1);

    // An operator names it and gives it a BMC; then deletes it.
    let edit = json!({"hostname": "web1", "power": {"driver": "ipmi", "address": "10.0.0.7", "username": "root",
                      "password": BMC_PASSWORD}});
    let text = site.expect(Method::PATCH, &paths::machine(mac), Some(edit), StatusCode::OK).await;
    let edited: MachineView = serde_json::from_str(&text).unwrap();
    assert_eq!(edited.hostname, "web1");
    assert_eq!(edited.power.unwrap().address.as_deref(), Some("10.0.0.7:623"));
    let bad = json!({"hostname": "no spaces please"});
    site.expect(Method::PATCH, &paths::machine(mac), Some(bad), StatusCode::BAD_REQUEST).await;
    site.expect(Method::DELETE, &paths::machine(&edited.id), None, StatusCode::NO_CONTENT).await;
    site.expect(Method::GET, &paths::machine(&edited.id), None, StatusCode::NOT_FOUND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_power_poll_answers_as_soon_as_a_request_is_queued_and_a_machine_without_a_bmc_refuses_power_commands() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), "").await;
    let machine = site.add("52:54:00:aa:bb:0b").await;
    let hold = Duration::from_secs(50);
    let started = std::time::Instant::now();
    let rack = site.rack.clone();
    let poll = tokio::spawn(async move { rack.power_requests(hold).await.unwrap() });
    let body = json!({"action": "on"});
    site.action(paths::MACHINE_POWER, &machine.id, Some(body)).await;
    let requests = tokio::time::timeout(DEADLINE, poll).await.expect("the poll answered").unwrap();
    assert!(started.elapsed() < hold / 2, "the poll waited out its hold ({:?})", started.elapsed());
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].actions, [PowerAction::On]);

    // A machine without a BMC: power commands are refused, naming why.
    let body = json!({"mac": "52:54:00:aa:bb:0c", "power": {"driver": "manual"}});
    let text = site.expect(Method::POST, paths::MACHINES, Some(body), StatusCode::CREATED).await;
    let manual: MachineView = serde_json::from_str(&text).unwrap();
    let (status, text) = site
        .call(Method::POST, &paths::machine_path(paths::MACHINE_POWER, &manual.id), Some(json!({"action": "on"})))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(text.contains("no power driver"), "{text}");
}

/// A machine change made while the rack is between two catalogue polls (it read one answer and
/// has not asked again yet) must end the rack's next poll at once: seen first in the QEMU deploy
/// test, where the rack was told "local" for 30 s after a deploy began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_change_made_between_two_catalogue_polls_answers_the_next_poll_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), "").await;
    let first = site.rack.catalogue_since(-1, -1, None, Duration::ZERO).await.unwrap();
    // The change lands after the rack's answer was read and before its next poll.
    let machine = site.add("52:54:00:aa:bb:0d").await;
    let hold = Duration::from_secs(50);
    let started = std::time::Instant::now();
    let next =
        site.rack.catalogue_since(first.revision, first.sync_requested, Some(first.changes_seen), hold).await.unwrap();
    assert!(started.elapsed() < hold / 2, "the poll waited out its hold ({:?})", started.elapsed());
    assert!(next.machines.iter().any(|m| m.mac == machine.mac), "the new machine is in the answer");
    assert_ne!(next.changes_seen, first.changes_seen);
    // Nothing changed since: the poll is held (here for a short hold).
    let short = Duration::from_millis(1500);
    let started = std::time::Instant::now();
    site.rack.catalogue_since(next.revision, next.sync_requested, Some(next.changes_seen), short).await.unwrap();
    assert!(started.elapsed() >= short - Duration::from_millis(100), "held while nothing changed");
}

/// A machine added to one rack answers that rack's held catalogue poll at once and leaves
/// another rack's held: with 1,000 racks, waking every poll for every machine cost 1,000
/// catalogue answers per machine added (`bench_scale`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_added_to_one_rack_answers_its_poll_and_leaves_another_racks_poll_held() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), "").await;
    let other = RackClient::register(&site.region.url, &site.region.secret(), "rack2", LOCALHOST).await.unwrap();
    let mine = site.rack.catalogue_since(-1, -1, None, Duration::ZERO).await.unwrap();
    let theirs = other.catalogue_since(-1, -1, None, Duration::ZERO).await.unwrap();
    let hold = Duration::from_secs(3);
    let held_poll = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let answer =
            other.catalogue_since(theirs.revision, theirs.sync_requested, Some(theirs.changes_seen), hold).await;
        (started.elapsed(), answer.unwrap(), theirs.changes_seen)
    });
    let my_poll = {
        let rack = site.rack.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let answer = rack.catalogue_since(mine.revision, mine.sync_requested, Some(mine.changes_seen), hold).await;
            (started.elapsed(), answer.unwrap())
        })
    };
    // Whether a poll arrives before or after the add, the answers are the same: rack1's count
    // moved past what it saw (answered at once), rack2's did not (held).
    let body = json!({"mac": "52:54:00:aa:bb:2a", "power": {"driver": "manual"}, "rack": "rack1"});
    site.expect(Method::POST, paths::MACHINES, Some(body), StatusCode::CREATED).await;
    let (took, answer) = my_poll.await.unwrap();
    assert!(took < hold - Duration::from_millis(500), "rack1's poll waited out its hold ({took:?})");
    assert!(answer.machines.iter().any(|m| m.mac == "52:54:00:aa:bb:2a"), "rack1 is told of its machine");
    let (took, answer, seen) = held_poll.await.unwrap();
    assert!(took >= hold - Duration::from_millis(100), "rack2's poll answered early ({took:?})");
    assert_eq!(answer.changes_seen, seen, "nothing changed for rack2");
    assert!(answer.machines.is_empty(), "rack2 serves none of rack1's machines");
}

/// A power-on names the rack's boot generation, which only a catalogue holding the change that
/// asked for the power-on reaches: a rack that powers on once its boot table is that new cannot
/// boot the machine into what it was told before (its catalogue answer may trail the power
/// request: the two are separate polls, and the region wakes them one after the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_on_names_a_boot_generation_that_only_a_catalogue_with_its_change_reaches() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path(), "").await;
    site.push_deploy_env(dir.path());
    let machine = site.add("52:54:00:aa:bb:0e").await;
    let before = site.rack.catalogue(-1, -1, Duration::ZERO).await.unwrap();
    let told_before = &before.machines.iter().find(|m| m.mac == machine.mac).expect("told of the machine").boot;
    assert!(!matches!(told_before, BootAction::Agent { .. }), "{told_before:?}");

    site.action(paths::MACHINE_COMMISSION, &machine.id, None).await;
    let requests = site.power_requests_for(&machine.id).await;
    let power_on = requests
        .iter()
        .find(|r| r.actions.iter().any(|a| matches!(a, PowerAction::On | PowerAction::Cycle)))
        .expect("commissioning powers the machine on");
    assert!(
        power_on.boot_generation > before.boot_generation,
        "the power-on's generation {} is one a catalogue from before the change ({}) already had",
        power_on.boot_generation,
        before.boot_generation
    );
    let after = site.rack.catalogue(-1, -1, Duration::ZERO).await.unwrap();
    assert!(after.boot_generation >= power_on.boot_generation);
    let told_after = &after.machines.iter().find(|m| m.mac == machine.mac).unwrap().boot;
    assert!(matches!(told_after, BootAction::Agent { job: AgentJob::Commission, .. }), "{told_after:?}");
}
