//! The seed's scenario (issue 13), end to end: a region alone in its namespace, three identical
//! registered racks over their own uplinks (no region on any rack), fifteen simulated machines
//! per rack on each rack's provisioning network, an image pushed once. All 45 are commissioned,
//! then deployed at once: every machine ends Deployed with its disk holding exactly the image,
//! the deploy bytes cross only each rack's provisioning network (the uplinks carry control
//! traffic only, measured on the links), and the region's API answers throughout. Then an update
//! of the image is deployed to all 45 with the region stopped once every machine has taken its
//! deploy task: all finish, and the region shows them Deployed once it is back.
//!
//! The scenario is `hardware/scenarios/seed.toml` with a smaller image (16 MiB instead of 1 GiB,
//! so the test fits the test run on two cores; `fleet run hardware/scenarios/seed.toml` and
//! `bench_fleet` run the full size).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalrack_api::agent::{DeployPhase, EraseMode};
use metalrack_api::machines::{MachineState, ReleaseRequest};
use metalrack_api::paths;
use metalrack_hardware::fleet::{Fleet, FleetMachineStatus, SimPhase};
use metalrack_hardware::scenario::Scenario;
use metalrack_hardware::topology::Topology;
use metalrack_tests::site::{machines_to_add, write_stand_in_deploy_env, Site, SiteImage};

const IMAGE_BYTES: u64 = 16 << 20;

/// Commissioning or deploying 45 simulated machines: seconds on a quiet box, but the test run
/// builds and runs other tests on the same two cores.
const MACHINES_DEADLINE: Duration = Duration::from_secs(600);

/// How often the API is asked for the machine list while the machines deploy.
const API_SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// A machine list answer slower than this during the deploys is a region that suffers: the
/// region answers in milliseconds idle; on a loaded 2-core CI box, a second is already bad.
const API_ANSWER_MAX: Duration = Duration::from_secs(2);

/// Bytes the update changes: a few pieces of 64 KiB, like a small package update.
const UPDATE_PIECES: u64 = 4;
const UPDATE_PIECE_BYTES: usize = 64 << 10;

fn seed_scenario() -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hardware/scenarios/seed.toml");
    let mut scenario = Scenario::load(&path).unwrap();
    let synthetic = scenario.images[0].synthetic.as_mut().expect("the seed's image is synthetic");
    synthetic.size_bytes = IMAGE_BYTES;
    scenario
}

#[test]
fn the_seeds_45_machines_on_three_racks_deploy_at_once_from_their_own_racks_also_with_the_region_stopped() {
    let scenario = seed_scenario();
    assert_eq!((scenario.racks.len(), scenario.machine_count(), scenario.machines_at_once()), (3, 45, 45));
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_owned();
    Site::run(scenario, move |topology, scenario| async move { run(topology, scenario, &dir_path).await }).unwrap();
}

async fn run(topology: Arc<Topology>, scenario: Scenario, dir: &Path) {
    let mut site = Site::start(topology.clone(), scenario, dir).await.unwrap_or_else(|e| panic!("{e:#}"));
    // The simulated machines fetch and count the deploy environment but do not run it: a
    // stand-in of the real one's order of size.
    let env = write_stand_in_deploy_env(&dir.join("deploy-env"), 1 << 20, 3 << 20).unwrap();
    site.push_deploy_env(&env).await.unwrap_or_else(|e| panic!("{e:#}"));
    let images = site.make_images().unwrap();
    let v1 = images[0].clone();
    site.push_image(&v1).await.unwrap_or_else(|e| panic!("{e:#}"));
    site.sync_all().await.unwrap();
    site.wait_synced(&v1.blake3, MACHINES_DEADLINE).await.unwrap_or_else(|e| panic!("{e:#}"));

    // Fifteen machines per rack, each behind its own Redfish BMC on its rack's network.
    let fleets: Vec<(String, Fleet)> = site
        .racks
        .iter()
        .enumerate()
        .map(|(index, rack)| (rack.name.clone(), site.start_fleet(index).unwrap_or_else(|e| panic!("{e:#}"))))
        .collect();
    let to_add: Vec<_> = fleets.iter().flat_map(|(rack, fleet)| machines_to_add(rack, fleet)).collect();
    let ids: Vec<String> =
        site.add_machines(&to_add).await.unwrap_or_else(|e| panic!("{e:#}")).into_iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 45);

    // 1. Commission all 45.
    site.commission_all(&ids).await.unwrap();
    let ready = tokio::select! {
        ready = site.wait_all(&ids, MachineState::Ready, MACHINES_DEADLINE) => ready.unwrap_or_else(|e| panic!("{e:#}")),
        failure = first_failure(&fleets) => panic!("commissioning: {failure}"),
    };
    for machine in &ready {
        let inventory = machine.inventory.as_ref().unwrap_or_else(|| panic!("{} has no inventory", machine.hostname));
        assert_eq!(inventory.disks.len(), 1, "{}: {inventory:?}", machine.hostname);
    }

    // The update is pushed and synced now, so that only deploys move while the machines deploy.
    let v2 = make_update(&v1, dir);
    site.push_image_version(&v2, "2").await.unwrap_or_else(|e| panic!("{e:#}"));
    site.sync_all().await.unwrap();
    site.wait_synced(&v2.blake3, MACHINES_DEADLINE).await.unwrap_or_else(|e| panic!("{e:#}"));

    // 2. Deploy all 45 at once, the region's API sampled meanwhile.
    let uplinks_before = site.uplink_counters().unwrap();
    let provisioning_before: Vec<_> =
        site.racks.iter().map(|r| site.topology().provisioning_counters(&r.name).unwrap()).collect();
    let sampler = ApiSampler::start(&site);
    let started = Instant::now();
    site.deploy_all(&ids, &v1.name).await.unwrap();
    tokio::select! {
        deployed = site.wait_all(&ids, MachineState::Deployed, MACHINES_DEADLINE) => deployed.unwrap_or_else(|e| panic!("{e:#}")),
        failure = first_failure(&fleets) => panic!("deploying: {failure}"),
    };
    let took = started.elapsed();
    let samples = sampler.stop().await;
    let uplinks_after = site.uplink_counters().unwrap();

    let v1_hash = metalrack_image_tools::Hash::from_hex(&v1.blake3).unwrap();
    for (rack, fleet) in &fleets {
        for machine in fleet.machines() {
            assert_eq!(fleet.disk_hash(&machine.mac, v1.bytes), Some(v1_hash), "{rack}/{}'s disk", machine.hostname);
            let deploy = machine.deploy.unwrap_or_else(|| panic!("{}: no deploy figures", machine.hostname));
            assert_eq!(deploy.phase, DeployPhase::Done, "{machine:#?}");
        }
    }
    // Zero deploy bytes from the region or another rack: each uplink carried control traffic
    // only (heartbeats, polls, events), under a quarter of one image copy, while each rack's
    // provisioning network carried every byte its machines fetched.
    for (index, ((rack, fleet), ((_, before), (_, after)))) in
        fleets.iter().zip(uplinks_before.iter().zip(&uplinks_after)).enumerate()
    {
        let uplink = after.since(before);
        let provisioning = site.topology().provisioning_counters(rack).unwrap().since(&provisioning_before[index]);
        let fetched: u64 = fleet.machines().iter().filter_map(|m| m.deploy).map(|d| d.bytes_fetched).sum();
        eprintln!(
            "{rack}: 15 deploys in {took:?}; uplink down {} B / up {} B; provisioning to the machines {} B; \
             the machines fetched {fetched} B of image",
            uplink.down_bytes(),
            uplink.up_bytes(),
            provisioning.tx_bytes
        );
        assert!(fetched >= 15 * (v1.unique_chunk_bytes / 2), "{rack}: the machines fetched only {fetched} bytes");
        assert!(provisioning.tx_bytes >= fetched, "{rack}: the image went to the machines over their network");
        assert!(
            uplink.down_bytes() < v1.unique_chunk_bytes / 4,
            "{rack}: {} bytes came down the uplink during the deploys: image bytes crossed it",
            uplink.down_bytes()
        );
    }
    let errors: Vec<&String> = samples.iter().filter_map(|s| s.as_ref().err()).collect();
    assert!(errors.is_empty(), "the region's API failed during the deploys: {errors:?}");
    let mut latencies: Vec<Duration> = samples.iter().filter_map(|s| s.as_ref().ok().copied()).collect();
    latencies.sort();
    assert!(latencies.len() >= 2, "the API was sampled during the deploys ({} samples)", latencies.len());
    let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "machine list during the deploys: {} samples, p50 {:?}, p99 {p99:?}",
        latencies.len(),
        latencies[latencies.len() / 2]
    );
    assert!(p99 <= API_ANSWER_MAX, "the machine list's p99 during the deploys was {p99:?}");

    // 3. The update to all 45, the region stopped once every machine has taken its task.
    let release = ReleaseRequest { erase: EraseMode::None };
    for id in &ids {
        site.api().machine_action(paths::MACHINE_RELEASE, id, &release).await.unwrap();
    }
    site.wait_all(&ids, MachineState::Ready, MACHINES_DEADLINE).await.unwrap_or_else(|e| panic!("{e:#}"));
    let boots_before: Vec<Vec<u32>> =
        fleets.iter().map(|(_, f)| f.machines().iter().map(|m| m.boots).collect()).collect();
    site.deploy_all_version(&ids, &v1.name, "2").await.unwrap();
    wait_fleets("every machine running its deploy task", &fleets, |index, machines| {
        machines.iter().zip(&boots_before[index]).all(|(m, before)| {
            m.boots > *before && matches!(m.phase, SimPhase::Agent | SimPhase::Deploying | SimPhase::BootedLocal)
        })
    })
    .await;
    site.stop_region().unwrap();
    let v2_hash = metalrack_image_tools::Hash::from_hex(&v2.blake3).unwrap();
    wait_fleets("every machine deployed with the region stopped", &fleets, |_, machines| {
        machines.iter().all(|m| m.phase == SimPhase::BootedLocal)
    })
    .await;
    for (rack, fleet) in &fleets {
        for machine in fleet.machines() {
            assert_eq!(fleet.disk_hash(&machine.mac, v2.bytes), Some(v2_hash), "{rack}/{}'s disk", machine.hostname);
            let deploy = machine.deploy.unwrap_or_else(|| panic!("{}: no deploy figures", machine.hostname));
            assert!(
                deploy.bytes_fetched < v2.bytes / 4,
                "{}: the update fetched {} bytes: the unchanged chunks were not skipped",
                machine.hostname,
                deploy.bytes_fetched
            );
        }
    }
    site.start_region().unwrap();
    site.wait_all(&ids, MachineState::Deployed, MACHINES_DEADLINE).await.unwrap_or_else(|e| panic!("{e:#}"));
}

/// v1 with a few 64 KiB pieces rewritten: an update that changes a little of the image.
fn make_update(v1: &SiteImage, dir: &Path) -> SiteImage {
    let mut bytes = std::fs::read(&v1.path).unwrap();
    let stride = bytes.len() as u64 / (UPDATE_PIECES + 1);
    for piece in 1..=UPDATE_PIECES {
        let at = (piece * stride) as usize;
        bytes[at..at + UPDATE_PIECE_BYTES]
            .copy_from_slice(&metalrack_tests::random_bytes(UPDATE_PIECE_BYTES, 100 + piece));
    }
    let path = dir.join("update.img");
    std::fs::write(&path, &bytes).unwrap();
    SiteImage {
        path: path.clone(),
        blake3: metalrack_tests::data::file_blake3(&path),
        unique_chunk_bytes: v1.unique_chunk_bytes,
        ..v1.clone()
    }
}

/// Returns once a simulated machine shows a failure, which the region would see only as a
/// machine that never reports again.
async fn first_failure(fleets: &[(String, Fleet)]) -> String {
    loop {
        for (rack, fleet) in fleets {
            if let Some(failed) = fleet.machines().into_iter().find(|m| matches!(m.phase, SimPhase::Failed { .. })) {
                return format!("{rack}/{} failed: {:?}", failed.hostname, failed.phase);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until `done(rack index, machines)` holds for every fleet.
async fn wait_fleets(what: &str, fleets: &[(String, Fleet)], done: impl Fn(usize, &[FleetMachineStatus]) -> bool) {
    metalrack_tests::wait_for(what, MACHINES_DEADLINE, || async {
        for (index, (_, fleet)) in fleets.iter().enumerate() {
            let machines = fleet.machines();
            if let Some(failed) = machines.iter().find(|m| matches!(m.phase, SimPhase::Failed { .. })) {
                panic!("{what}: a machine failed: {failed:#?}");
            }
            if !done(index, &machines) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// Asks the region for the machine list's first page every [`API_SAMPLE_EVERY`] until stopped:
/// each answer's time, or why it failed.
struct ApiSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    samples: Arc<Mutex<Vec<Result<Duration, String>>>>,
}

impl ApiSampler {
    fn start(site: &Site) -> ApiSampler {
        let api = site.api();
        let stop = Arc::new(AtomicBool::new(false));
        let samples: Arc<Mutex<Vec<Result<Duration, String>>>> = Arc::default();
        let task = {
            let (stop, samples) = (stop.clone(), samples.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let asked = Instant::now();
                    let answer = tokio::time::timeout(API_ANSWER_MAX * 5, api.machines()).await;
                    let sample = match answer {
                        Ok(Ok(machines)) if machines.len() == 45 => Ok(asked.elapsed()),
                        Ok(Ok(machines)) => Err(format!("{} machines listed", machines.len())),
                        Ok(Err(e)) => Err(format!("{e:#}")),
                        Err(_) => Err(format!("no answer in {:?}", API_ANSWER_MAX * 5)),
                    };
                    samples.lock().unwrap().push(sample);
                    tokio::time::sleep(API_SAMPLE_EVERY).await;
                }
            })
        };
        ApiSampler { stop, task, samples }
    }

    async fn stop(self) -> Vec<Result<Duration, String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        std::mem::take(&mut self.samples.lock().unwrap())
    }
}
