//! The deploy agent's side of the rack's HTTP boot server: its task (`GET /agent/task`), its
//! reports (`POST /agent/report`, queued for the region with the boot events), and the
//! manifests of snapshot files (`GET /manifests/{id}`). Everything is answered from the boot
//! table and the snapshot, so deploys go on while the region is away.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metalrack_api::agent::{
    AgentJob, AgentReport, AgentTask, MachineReport, AGENT_REPORT_JSON_BYTES_MAX, AGENT_REPORT_PATH, AGENT_TASK_PATH,
};
use metalrack_api::machines::{normalize_mac, BootAction};
use subtle::ConstantTimeEq;

use super::Pxe;
use crate::snapshot::boot_table::Boots;

/// Reports one client address may send per second, sustained (burst [`REPORTS_BURST`]): an
/// agent reports about once a second; an enlisting stranger cannot flood the event queue past it.
const REPORTS_PER_S: f64 = 5.0;
const REPORTS_BURST: f64 = 20.0;

/// Client addresses whose report budget is tracked; past it the fullest-budget entries (idle
/// clients) are forgotten. ~64 bytes each.
const REPORT_CLIENTS_MAX: usize = 4096;

/// The agent retries a task the rack cannot serve yet (its image is still syncing) after this.
const RETRY_AFTER_SYNC_S: u32 = 15;

/// The agent's routes, with their own state (merged into the boot server's router).
pub fn router(pxe: Arc<Pxe>) -> Router {
    let state = AgentState { pxe, budgets: Arc::default() };
    Router::new()
        .route(AGENT_TASK_PATH, get(task))
        .route(AGENT_REPORT_PATH, post(report))
        .route("/manifests/{id}", get(manifest))
        .with_state(state)
}

#[derive(Clone)]
struct AgentState {
    pxe: Arc<Pxe>,
    budgets: Arc<Mutex<HashMap<IpAddr, Budget>>>,
}

/// A token bucket per client address.
#[derive(Debug, Clone, Copy)]
struct Budget {
    tokens: f64,
    at: Instant,
}

impl AgentState {
    /// Takes one report from `address`'s budget; false when it is spent.
    fn take_report(&self, address: IpAddr, now: Instant) -> bool {
        let mut budgets = self.budgets.lock().expect("lock");
        if budgets.len() >= REPORT_CLIENTS_MAX && !budgets.contains_key(&address) {
            // Entries that have refilled completely say nothing: forget them first.
            budgets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * REPORTS_PER_S < REPORTS_BURST);
            if budgets.len() >= REPORT_CLIENTS_MAX {
                let oldest = budgets.iter().min_by_key(|(_, b)| b.at).map(|(a, _)| *a).expect("non-empty");
                budgets.remove(&oldest);
            }
        }
        let budget = budgets.entry(address).or_insert(Budget { tokens: REPORTS_BURST, at: now });
        budget.tokens =
            (budget.tokens + now.duration_since(budget.at).as_secs_f64() * REPORTS_PER_S).min(REPORTS_BURST);
        budget.at = now;
        if budget.tokens < 1.0 {
            return false;
        }
        budget.tokens -= 1.0;
        true
    }
}

#[derive(serde::Deserialize)]
struct MacQuery {
    mac: String,
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    (status, format!("{}\n", message.into())).into_response()
}

/// The bearer token presented, compared in constant time with the job's.
fn token_matches(headers: &HeaderMap, token: &str) -> bool {
    let presented =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    presented.is_some_and(|p| p.len() == token.len() && bool::from(p.as_bytes().ct_eq(token.as_bytes())))
}

async fn task(
    State(state): State<AgentState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<MacQuery>,
    headers: HeaderMap,
) -> Response {
    let Ok(mac) = normalize_mac(&query.mac) else {
        return text(StatusCode::BAD_REQUEST, "expected ?mac=aa:bb:cc:dd:ee:ff");
    };
    let boots = state.pxe.boot_table.borrow().clone();
    let answer = task_for(&state.pxe, &boots, &mac, &headers);
    match &answer {
        Ok(task) => state.pxe.record(&mac, "boot.agent", format!("agent at {peer} took its task: {}", describe(task))),
        Err(refusal) => state.pxe.record(&mac, "boot.agent", format!("agent at {peer} got no task: {}", refusal.1)),
    }
    match answer {
        Ok(task) => Json(task).into_response(),
        Err((StatusCode::SERVICE_UNAVAILABLE, why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, RETRY_AFTER_SYNC_S.to_string())],
            format!("{why}\n"),
        )
            .into_response(),
        Err((status, why)) => text(status, why),
    }
}

fn describe(task: &AgentTask) -> String {
    match task {
        AgentTask::Enlist => "enlist".into(),
        AgentTask::Commission { .. } => "commission".into(),
        AgentTask::Deploy { file_path, file_len, .. } => format!("deploy {file_path} ({file_len} bytes)"),
        AgentTask::Release { erase, .. } => format!("release (erase: {erase:?})"),
    }
}

/// The task for `mac`: its job from the boot table, resolved against the current snapshot.
fn task_for(pxe: &Pxe, boots: &Boots, mac: &str, headers: &HeaderMap) -> Result<AgentTask, (StatusCode, String)> {
    let Some(machine) = boots.machine(mac) else {
        return if boots.deploy_env.is_some() {
            Ok(AgentTask::Enlist)
        } else {
            Err((StatusCode::NOT_FOUND, "this rack has no job for that machine".into()))
        };
    };
    let BootAction::Agent { machine_id, token, job, .. } = &machine.boot else {
        return Err((StatusCode::NOT_FOUND, "this rack has no job for that machine".into()));
    };
    if !token_matches(headers, token) {
        return Err((StatusCode::UNAUTHORIZED, "wrong or missing job token".into()));
    }
    let machine_id = machine_id.clone();
    match job {
        AgentJob::Commission => Ok(AgentTask::Commission { machine_id }),
        AgentJob::Release { erase, disk } => Ok(AgentTask::Release { machine_id, erase: *erase, disk: disk.clone() }),
        AgentJob::Deploy { image, kind, disk } => {
            let snapshot = pxe.store.current().ok().flatten();
            let file = snapshot.as_ref().and_then(|s| {
                s.files.iter().find(|f| {
                    f.image == image.image && f.arch == image.arch && f.version == image.version && f.kind == *kind
                })
            });
            let Some(file) = file else {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{} {} {} is not on this rack yet (syncing)", image.image, image.arch, image.version),
                ));
            };
            let path = crate::snapshot::relative_path(file)
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("snapshot file: {e}")))?;
            Ok(AgentTask::Deploy {
                machine_id,
                file_path: format!("/images/{}", path.display()),
                manifest_path: format!("/manifests/{}", file.manifest_id),
                file_len: file.file_len,
                file_hash: file.file_hash.clone(),
                disk: disk.clone(),
            })
        }
    }
}

async fn report(
    State(state): State<AgentState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<MacQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(mac) = normalize_mac(&query.mac) else {
        return text(StatusCode::BAD_REQUEST, "expected ?mac=aa:bb:cc:dd:ee:ff");
    };
    if !state.take_report(peer.ip(), Instant::now()) {
        return (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "1")], "too many reports; retry\n")
            .into_response();
    }
    let Ok(bytes) = to_bytes(body, AGENT_REPORT_JSON_BYTES_MAX).await else {
        return text(StatusCode::PAYLOAD_TOO_LARGE, format!("a report is at most {AGENT_REPORT_JSON_BYTES_MAX} bytes"));
    };
    let report: AgentReport = match serde_json::from_slice(&bytes) {
        Ok(report) => report,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("not a report: {e}")),
    };
    if let Err(why) = report.validate() {
        return text(StatusCode::UNPROCESSABLE_ENTITY, why);
    }
    if report == AgentReport::BootedLocal {
        return text(StatusCode::BAD_REQUEST, "only the rack reports a local boot");
    }
    let boots = state.pxe.boot_table.borrow().clone();
    let machine_report = match boots.machine(&mac).map(|m| &m.boot) {
        Some(BootAction::Agent { machine_id, token, job, .. }) => {
            if !token_matches(&headers, token) {
                return text(StatusCode::UNAUTHORIZED, "wrong or missing job token");
            }
            if matches!(report, AgentReport::Deployed { .. }) && matches!(job, AgentJob::Deploy { .. }) {
                // Before the region hears: the machine's next boot is from its disk.
                state.pxe.deploys_done.mark(&mac, token);
            }
            MachineReport { machine_id: machine_id.clone(), token: token.clone(), report }
        }
        None if matches!(report, AgentReport::Inventory { .. }) => {
            MachineReport { machine_id: String::new(), token: String::new(), report }
        }
        _ => return text(StatusCode::CONFLICT, "this rack has no job for that machine"),
    };
    let message = summary(&machine_report.report, &peer);
    state.pxe.events.push_report(&mac, message, machine_report);
    StatusCode::ACCEPTED.into_response()
}

/// One line for the event log.
fn summary(report: &AgentReport, peer: &SocketAddr) -> String {
    match report {
        AgentReport::Inventory { inventory } => format!(
            "inventory from {peer}: {} CPUs, {} MiB, {} disks, {} NICs",
            inventory.cpus,
            inventory.memory_bytes >> 20,
            inventory.disks.len(),
            inventory.nics.len()
        ),
        AgentReport::Progress { progress } | AgentReport::Deployed { progress } => format!(
            "{:?}: {} of {} bytes ({} written, {} skipped, {} refetched chunks)",
            progress.phase,
            progress.bytes_done,
            progress.bytes_total,
            progress.bytes_written,
            progress.bytes_skipped,
            progress.chunks_refetched
        ),
        AgentReport::Released => "disk released".into(),
        AgentReport::Failed { reason } => format!("agent failed: {reason}"),
        AgentReport::BootedLocal => "booted from its local disk".into(),
    }
}

async fn manifest(State(state): State<AgentState>, UrlPath(id): UrlPath<String>) -> Response {
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return text(StatusCode::BAD_REQUEST, "a manifest id is 64 hex characters");
    }
    let path = state.pxe.store.manifest_path(&id);
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(_) => text(StatusCode::NOT_FOUND, "no such manifest on this rack"),
    }
}

/// A finished deploy's machine asking for its script: told to boot locally, and the region told
/// (through the queue) that the deployed system is booting. Returns whether that applied.
pub fn booted_local_after_deploy(pxe: &Pxe, boots: &Boots, mac: &str) -> bool {
    let Some(BootAction::Agent { machine_id, token, job: AgentJob::Deploy { .. }, .. }) =
        boots.machine(mac).map(|m| &m.boot)
    else {
        return false;
    };
    if !pxe.deploys_done.is_done(mac, token) {
        return false;
    }
    let report =
        MachineReport { machine_id: machine_id.clone(), token: token.clone(), report: AgentReport::BootedLocal };
    pxe.events.push_report(mac, "asked for its boot script after its deploy: booting from its disk".into(), report);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PxeConfig;
    use crate::snapshot::boot_table::Boots;
    use metalrack_api::agent::{DeployEnv, DeployPhase, DeployProgress, ImageRef};
    use metalrack_api::images::CatalogueFile;
    use metalrack_api::machines::{BootEvent, MachineBoot};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    const MAC: &str = "52:54:00:aa:bb:01";
    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    struct Rack {
        _dir: tempfile::TempDir,
        pxe: Arc<Pxe>,
        table: tokio::sync::watch::Sender<Arc<Boots>>,
        url: String,
        shutdown: CancellationToken,
    }

    impl Drop for Rack {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    fn env() -> DeployEnv {
        DeployEnv {
            image: ImageRef { image: "metalrack/deploy-env".into(), arch: "amd64".into(), version: "1".into() },
            kernel_params: "console=ttyS0".into(),
        }
    }

    fn deploying(token: &str) -> MachineBoot {
        MachineBoot {
            mac: MAC.into(),
            hostname: "n1".into(),
            boot: BootAction::Agent {
                env: env(),
                machine_id: "m1".into(),
                token: token.into(),
                job: AgentJob::Deploy {
                    image: ImageRef { image: "debian/bookworm".into(), arch: "amd64".into(), version: "2".into() },
                    kind: "root-disk".into(),
                    disk: None,
                },
            },
        }
    }

    /// A rack's HTTP boot server in-process with one image file (`root-disk` of debian/bookworm
    /// amd64 2) in its snapshot.
    async fn rack(extra: &str) -> Rack {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = crate::data_dir::DataDir::new(dir.path());
        let config: PxeConfig = toml::from_str(&format!(
            "interface = \"lo\"\naddress = \"127.0.0.1\"\nhttp_listen = \"127.0.0.1:0\"\n{extra}\n[dhcp]\nmode = \"off\"\n"
        ))
        .unwrap();
        let (table, reader) = tokio::sync::watch::channel(Arc::new(Boots::default()));
        let pxe = Pxe::for_test(config, data_dir, reader);
        std::fs::create_dir_all(&pxe.boot_files_dir).unwrap();
        let content: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let hash = blake3::hash(&content).to_hex().to_string();
        std::fs::create_dir_all(pxe.store.files_dir()).unwrap();
        std::fs::write(pxe.store.file_path(&hash), &content).unwrap();
        std::fs::create_dir_all(pxe.store.manifests_dir()).unwrap();
        std::fs::write(pxe.store.manifest_path(&"ab".repeat(32)), b"manifest bytes").unwrap();
        let file = CatalogueFile {
            image: "debian/bookworm".into(),
            arch: "amd64".into(),
            version: "2".into(),
            kind: "root-disk".into(),
            manifest_id: "ab".repeat(32),
            file_hash: hash,
            file_len: content.len() as u64,
            n_chunks: 1,
        };
        pxe.store.publish(1, &[file]).unwrap();
        let listener = super::super::http::bind(&pxe.config).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(super::super::http::serve(listener, pxe.clone(), TaskTracker::new(), shutdown.clone()));
        Rack { _dir: dir, pxe, table, url, shutdown }
    }

    fn queued(pxe: &Pxe) -> Vec<BootEvent> {
        pxe.events.snapshot()
    }

    fn progress(phase: DeployPhase) -> DeployProgress {
        DeployProgress {
            phase,
            bytes_total: 1_000_000,
            bytes_done: 1_000_000,
            bytes_fetched: 1_000_000,
            bytes_written: 1_000_000,
            bytes_skipped: 0,
            chunks_refetched: 0,
            rate_bytes_per_s: 1,
        }
    }

    #[tokio::test]
    async fn a_deploying_machine_gets_its_task_only_with_its_token_and_its_reports_are_queued_for_the_region() {
        let rack = rack("").await;
        rack.table.send_replace(Arc::new(Boots {
            machines: vec![deploying(TOKEN)],
            deploy_env: Some(env()),
            generation: 1,
        }));
        let http = reqwest::Client::new();
        let task_url = format!("{}{AGENT_TASK_PATH}?mac={MAC}", rack.url);
        assert_eq!(http.get(&task_url).send().await.unwrap().status(), 401, "no token");
        let wrong = http.get(&task_url).bearer_auth("f".repeat(32)).send().await.unwrap();
        assert_eq!(wrong.status(), 401, "another job's token");
        let task: AgentTask = http.get(&task_url).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
        let AgentTask::Deploy { machine_id, file_path, manifest_path, file_len, .. } = task else { panic!("{task:?}") };
        assert_eq!((machine_id.as_str(), file_len), ("m1", 1_000_000));
        let ranged = http.get(format!("{}{file_path}", rack.url)).header("Range", "bytes=10-19").send().await.unwrap();
        assert_eq!(ranged.status(), 206);
        assert_eq!(ranged.bytes().await.unwrap().as_ref(), &(10..20u8).collect::<Vec<_>>()[..]);
        let manifest = http.get(format!("{}{manifest_path}", rack.url)).send().await.unwrap();
        assert_eq!(manifest.bytes().await.unwrap().as_ref(), b"manifest bytes");

        let report_url = format!("{}{AGENT_REPORT_PATH}?mac={MAC}", rack.url);
        let deployed = AgentReport::Deployed { progress: progress(DeployPhase::Done) };
        let refused = http.post(&report_url).json(&deployed).send().await.unwrap();
        assert_eq!(refused.status(), 401, "a report needs the token too");
        let taken = http.post(&report_url).bearer_auth(TOKEN).json(&deployed).send().await.unwrap();
        assert_eq!(taken.status(), 202);
        let last = queued(&rack.pxe).pop().unwrap();
        assert_eq!(last.kind, "machine.deployed");
        let report = last.report.expect("the report travels with the event");
        assert_eq!((report.machine_id.as_str(), report.token.as_str()), ("m1", TOKEN));
        assert_eq!(report.report, deployed);

        // The region has not heard yet (its table still says deploy): the rack answers "local"
        // and tells the region the deployed system is booting.
        let script = http.get(format!("{}/ipxe/{}", rack.url, MAC.replace(':', "-"))).send().await.unwrap();
        let script = script.text().await.unwrap();
        assert!(script.contains("exit") && !script.contains("imgfetch --name kernel"), "{script}");
        let booted = queued(&rack.pxe).into_iter().rev().find(|e| e.kind != "boot.script").unwrap();
        assert_eq!(booted.report.map(|r| r.report), Some(AgentReport::BootedLocal));
        // The region moved on (Deployed → local): the rack forgets its note.
        rack.table.send_replace(Arc::new(Boots {
            machines: vec![MachineBoot { boot: BootAction::Local, ..deploying(TOKEN) }],
            deploy_env: Some(env()),
            generation: 2,
        }));
        rack.pxe.deploys_done.prune(&rack.pxe.boot_table.borrow());
        assert!(!rack.pxe.deploys_done.is_done(MAC, TOKEN));
    }

    #[tokio::test]
    async fn unknown_machines_enlist_with_their_inventory_and_nothing_else() {
        let rack = rack("").await;
        let http = reqwest::Client::new();
        let task_url = format!("{}{AGENT_TASK_PATH}?mac={MAC}", rack.url);
        assert_eq!(http.get(&task_url).send().await.unwrap().status(), 404, "no deploy environment: no enlistment");
        rack.table.send_replace(Arc::new(Boots { machines: vec![], deploy_env: Some(env()), generation: 1 }));
        let task: AgentTask = http.get(&task_url).send().await.unwrap().json().await.unwrap();
        assert_eq!(task, AgentTask::Enlist);
        let script = http.get(format!("{}/ipxe/{}", rack.url, MAC.replace(':', "-"))).send().await.unwrap();
        let script = script.text().await.unwrap();
        assert!(script.contains("metalrack.rack=") && !script.contains("metalrack.token"), "{script}");

        let report_url = format!("{}{AGENT_REPORT_PATH}?mac={MAC}", rack.url);
        let progress = AgentReport::Progress { progress: progress(DeployPhase::Writing) };
        let refused = http.post(&report_url).json(&progress).send().await.unwrap();
        assert_eq!(refused.status(), 409, "an unknown machine may only enlist");
        let forged = http.post(&report_url).json(&AgentReport::BootedLocal).send().await.unwrap();
        assert_eq!(forged.status(), 400);
        let inventory = AgentReport::Inventory {
            inventory: metalrack_api::agent::Inventory {
                firmware: metalrack_api::agent::Firmware::Bios,
                cpus: 2,
                cpu_model: "QEMU".into(),
                memory_bytes: 512 << 20,
                disks: vec![],
                nics: vec![],
            },
        };
        assert_eq!(http.post(&report_url).json(&inventory).send().await.unwrap().status(), 202);
        let last = queued(&rack.pxe).pop().unwrap();
        assert_eq!(last.kind, "machine.inventory");
        assert_eq!(last.report.map(|r| (r.machine_id, r.report)), Some((String::new(), inventory.clone())));
        let big = vec![b' '; AGENT_REPORT_JSON_BYTES_MAX + 1];
        assert_eq!(http.post(&report_url).body(big).send().await.unwrap().status(), 413);
        // A flood costs only its sender: past the burst, 429.
        let mut statuses = Vec::new();
        for _ in 0..(REPORTS_BURST as usize + 5) {
            statuses.push(http.post(&report_url).json(&inventory).send().await.unwrap().status().as_u16());
        }
        assert!(statuses.contains(&429), "{statuses:?}");
    }

    #[tokio::test]
    async fn the_fault_hook_corrupts_exactly_one_ranged_image_response() {
        let rack = rack("fault_corrupt_one_image_range = true").await;
        rack.table.send_replace(Arc::new(Boots { machines: vec![deploying(TOKEN)], deploy_env: None, generation: 1 }));
        let http = reqwest::Client::new();
        let task: AgentTask = http
            .get(format!("{}{AGENT_TASK_PATH}?mac={MAC}", rack.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let AgentTask::Deploy { file_path, .. } = task else { panic!() };
        let expected: Vec<u8> = (1000..2000u32).map(|i| (i % 251) as u8).collect();
        let mut bodies = Vec::new();
        for _ in 0..3 {
            let ranged =
                http.get(format!("{}{file_path}", rack.url)).header("Range", "bytes=1000-1999").send().await.unwrap();
            bodies.push(ranged.bytes().await.unwrap().to_vec());
        }
        assert_ne!(bodies[0], expected, "the first is corrupted");
        assert_eq!(bodies[0].iter().zip(&expected).filter(|(a, b)| a != b).count(), 1, "by one byte");
        assert_eq!(bodies[1], expected);
        assert_eq!(bodies[2], expected);
    }
}
