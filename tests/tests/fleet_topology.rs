//! The seed's site as namespaces (issue 13), with the real daemons: a region alone in its
//! namespace and three real `rackd`, each behind its own 80 Mbit/s shaped uplink. All racks come
//! Online over their uplinks; an image pushed once crosses each uplink once (the counters show
//! its chunk bytes plus framing and a named allowance for heartbeats and polls, no more); the
//! shaping holds (the bytes took at least bytes/rate on the link); and no rack reaches another
//! rack's addresses, even where a rack's server listens; the region stops and returns and the
//! racks find it again. Machines added through the site are powered by their own rack over
//! Redfish. Also the runner's scenario files.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalrack_api::RackState;
use metalrack_hardware::scenario::{ImageSpec, Scenario, SyntheticImage};
use metalrack_hardware::topology::Topology;
use metalrack_tests::site::Site;

const UPLINK_MBIT: u32 = 80;
const IMAGE_BYTES: u64 = 32 << 20;
const IMAGE: &str = "seed/random";

/// What crosses an uplink beside the image's chunks while it syncs (a few seconds): heartbeats
/// (one a second, a few KiB with their answers over TLS), catalogue long-polls, sync status
/// reports and the manifest. Measured at well under 200 KiB; 1 MiB leaves room on a slow machine.
const CONTROL_TRAFFIC_ALLOWANCE_BYTES: u64 = 1 << 20;

/// Ethernet, IP and TCP headers (66 bytes per 1448-byte segment: 4.6%) and TLS records (under 1%)
/// on top of the chunk bytes.
const FRAMING_FACTOR: f64 = 1.08;

/// How often the link's counters are sampled while the image syncs.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Bytes a link may carry above its rate over a measured stretch: the token bucket (128 KiB at
/// this rate) and 20 ms at the rate for the time between reading a counter and reading the clock.
const RATE_SLACK_BYTES: u64 = (128 << 10) + (UPLINK_MBIT as u64 * 1_000_000 / 8) * 20 / 1000;

/// A connection attempt that must fail gets this long; one that must succeed is local.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The rack's HTTP boot server (it listens on every address of its namespace).
const RACK_HTTP_PORT: u16 = 5248;

/// Per rack: how many bytes its end of its uplink had received, and when they were read.
type Sample = Vec<(Instant, u64)>;

fn seed_with_random_image() -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hardware/scenarios/seed.toml");
    let mut scenario = Scenario::load(&path).unwrap();
    scenario.links.uplink_mbit = UPLINK_MBIT;
    scenario.links.provisioning_mbit = None;
    // No zeros and no repeats: every byte of the image is a chunk byte the rack must fetch.
    scenario.images = vec![ImageSpec {
        name: IMAGE.into(),
        path: None,
        synthetic: Some(SyntheticImage { size_bytes: IMAGE_BYTES, seed: 13, zero_percent: 0, duplicate_percent: 0 }),
    }];
    scenario.deploy.image = IMAGE.into();
    scenario
}

#[test]
fn three_racks_over_shaped_uplinks_come_online_sync_an_image_once_at_the_uplinks_rate_reach_no_other_rack_and_find_the_region_after_its_restart(
) {
    let scenario = seed_with_random_image();
    assert_eq!(scenario.racks.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_owned();
    Site::run(scenario, move |topology, scenario| async move { run(topology, scenario, &dir_path).await }).unwrap();
}

async fn run(topology: Arc<Topology>, scenario: Scenario, dir: &Path) {
    let mut site = Site::start(topology.clone(), scenario, dir).await.unwrap_or_else(|e| panic!("{e:#}"));
    let racks = site.api().racks().await.unwrap();
    assert_eq!(racks.len(), 3, "{racks:#?}");
    assert!(racks.iter().all(|r| r.state == RackState::Online), "{racks:#?}");

    let images = site.make_images().unwrap();
    let image = &images[0];
    assert_eq!(image.unique_chunk_bytes, IMAGE_BYTES, "a random image has no repeated chunk");

    // Sample every rack's end of its uplink while the image goes out.
    let before = site.uplink_counters().unwrap();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (topology, samples, stop) = (topology.clone(), samples.clone(), stop.clone());
        let names: Vec<String> = site.racks.iter().map(|r| r.name.clone()).collect();
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::SeqCst) {
                let sample = names
                    .iter()
                    .map(|n| {
                        let bytes = topology.uplink_counters(n).unwrap().down_bytes();
                        (Instant::now(), bytes)
                    })
                    .collect();
                samples.lock().unwrap().push(sample);
                std::thread::sleep(SAMPLE_EVERY);
            }
        })
    };
    site.push_image(image).await.unwrap_or_else(|e| panic!("{e:#}"));
    site.sync_all().await.unwrap();
    let synced = site.wait_synced(&image.blake3, Duration::from_secs(180)).await.unwrap_or_else(|e| panic!("{e:#}"));
    stop.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    // The two ends of a link are read one after the other, so a frame in flight between them (a
    // heartbeat, a poll's answer) can be counted by one end only: read again until they agree.
    // A frame lost or counted twice still fails the assertion below, at the deadline.
    let settle_deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = site.uplink_counters().unwrap();
        let agree = before.iter().zip(&after).all(|((_, before), (_, after))| {
            let crossed = after.since(before);
            crossed.region_end.tx_bytes == crossed.down_bytes()
        });
        if agree || Instant::now() >= settle_deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let samples = samples.lock().unwrap().clone();
    for (index, ((name, before), (_, after))) in before.iter().zip(&after).enumerate() {
        let crossed = after.since(before);
        let down = crossed.down_bytes();
        eprintln!(
            "{name}: synced after {:?}; down {down} bytes, up {} bytes over the uplink",
            synced[index].1,
            crossed.up_bytes()
        );
        // About one copy of the image crossed, once.
        assert!(down >= image.unique_chunk_bytes, "{name}: {down} bytes down, less than the image's chunks");
        let ceiling = (image.unique_chunk_bytes as f64 * FRAMING_FACTOR) as u64 + CONTROL_TRAFFIC_ALLOWANCE_BYTES;
        assert!(down <= ceiling, "{name}: {down} bytes down, more than one copy of the image ({ceiling})");
        assert_eq!(crossed.region_end.tx_bytes, down, "{name}: both ends count the same frames");

        // The rate held: from the first MiB of the image to its last, on the link's own counters.
        let base = before.down_bytes();
        let mark_low = base + (1 << 20);
        let mark_high = after.down_bytes() - (1 << 20);
        let first = samples.iter().map(|s| s[index]).find(|(_, bytes)| *bytes >= mark_low).expect("past the first MiB");
        let last = samples.iter().map(|s| s[index]).find(|(_, bytes)| *bytes >= mark_high).expect("near the end");
        let bytes = last.1 - first.1;
        let took = last.0 - first.0;
        let floor =
            Duration::from_secs_f64(bytes.saturating_sub(RATE_SLACK_BYTES) as f64 * 8.0 / (UPLINK_MBIT as f64 * 1e6));
        eprintln!("{name}: {bytes} bytes in {took:?} on the link (at {UPLINK_MBIT} Mbit/s at least {floor:?})");
        assert!(bytes >= IMAGE_BYTES / 2, "{name}: the samples caught most of the sync ({bytes} bytes)");
        assert!(took >= floor, "{name}: {bytes} bytes crossed in {took:?}, faster than {UPLINK_MBIT} Mbit/s");
    }

    // No rack reaches another: rack1 cannot connect to rack2's HTTP boot server, by its bridge
    // address or its uplink address, while rack2 itself can (so something listens there), and
    // rack1 reaches the region (so its uplink works).
    let rack1 = site.rack_network("rack1").unwrap();
    let rack2 = site.rack_network("rack2").unwrap();
    let rack2_targets = [
        SocketAddr::from((rack2.lab().gateway(), RACK_HTTP_PORT)),
        SocketAddr::from((rack2.uplink().rack_address, RACK_HTTP_PORT)),
    ];
    let region_target = SocketAddr::from((rack1.uplink().region_address, site.region.socket_address().port()));
    let from_rack2 = rack2
        .lab()
        .in_namespace(move || rack2_targets.map(|t| TcpStream::connect_timeout(&t, CONNECT_TIMEOUT)))
        .unwrap();
    for attempt in from_rack2 {
        attempt.expect("rack2 reaches its own HTTP boot server");
    }
    let from_rack1 = rack1
        .lab()
        .in_namespace(move || {
            (
                rack2_targets.map(|t| TcpStream::connect_timeout(&t, CONNECT_TIMEOUT)),
                TcpStream::connect_timeout(&region_target, CONNECT_TIMEOUT),
            )
        })
        .unwrap();
    for (target, attempt) in rack2_targets.iter().zip(from_rack1.0) {
        assert!(attempt.is_err(), "rack1 reached rack2 at {target}: {attempt:?}");
    }
    from_rack1.1.expect("rack1 reaches the region over its uplink");

    // The region stops and comes back on the same port: the racks find it again over their
    // uplinks, and it still knows the image they serve.
    site.stop_region().unwrap();
    site.start_region().unwrap();
    site.wait_racks_online().await.unwrap_or_else(|e| panic!("{e:#}"));
    for rack in &site.racks {
        assert!(site.api().rack_serves_file(&rack.name, &image.blake3).await.unwrap(), "{}", rack.name);
    }
}

#[test]
fn the_shipped_scenarios_parse_and_describe_the_seeds_site() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hardware/scenarios");
    let seed = Scenario::load(&dir.join("seed.toml")).unwrap();
    assert_eq!(seed.racks.len(), 3);
    assert_eq!(seed.machine_count(), 45);
    assert_eq!(seed.machines_at_once(), 45);
    let macs: std::collections::HashSet<String> = (0..3).flat_map(|i| seed.machines(i)).map(|m| m.mac).collect();
    assert_eq!(macs.len(), 45, "every machine of the site has its own MAC");
    let small = Scenario::load(&dir.join("small.toml")).unwrap();
    assert_eq!((small.racks.len(), small.machine_count()), (1, 2));
    let error = Scenario::from_toml("name = \"x\"\n[links]\nuplink_mbit = 10\n", Path::new("bad.toml")).unwrap_err();
    assert!(error.to_string().contains("bad.toml"), "{error}");
}

/// Machines added through the site are powered by their own rack: each BMC listens on the
/// loopback of its rack's namespace only (as a fleet's virtual BMCs do), so only that rack's
/// Redfish driver can reach it. Commissioning powers every machine on through it.
#[test]
fn machines_added_through_the_site_are_powered_on_by_their_own_rack_over_redfish_when_commissioned() {
    let mut scenario = seed_with_random_image();
    scenario.racks.truncate(2);
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_owned();
    Site::run(
        scenario,
        move |topology, scenario| async move { power_through_racks(topology, scenario, &dir_path).await },
    )
    .unwrap();
}

async fn power_through_racks(topology: Arc<Topology>, scenario: Scenario, dir: &Path) {
    use metalrack_api::machines::MachineState;
    use metalrack_api::power::PowerState;
    use metalrack_hardware::bmc::{BmcConfig, BmcServer, SimulatedMachine};
    use metalrack_tests::site::{MachineToAdd, BMC_PASSWORD, BMC_USERNAME};

    let site = Site::start(topology, scenario, dir).await.unwrap_or_else(|e| panic!("{e:#}"));
    // The region commissions only with a deploy environment in its catalogue; these machines are
    // power states that never boot, so its files are placeholders.
    let env = dir.join("placeholder-env");
    std::fs::create_dir_all(&env).unwrap();
    std::fs::write(env.join("kernel"), metalrack_tests::random_bytes(4096, 1)).unwrap();
    std::fs::write(env.join("initrd"), metalrack_tests::random_bytes(4096, 2)).unwrap();
    site.push_deploy_env(&env).await.unwrap_or_else(|e| panic!("{e:#}"));

    let mut machines = Vec::new();
    let mut to_add = Vec::new();
    let mut _bmcs = Vec::new();
    for (index, rack) in site.racks.iter().enumerate() {
        let network = site.rack_network(&rack.name).unwrap();
        let listener = network.lab().in_namespace(|| std::net::TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
        let machine = SimulatedMachine::new();
        let bmc = BmcServer::start(listener, BmcConfig::new(BMC_USERNAME, BMC_PASSWORD), machine.clone()).unwrap();
        let planned = &site.scenario.machines(index)[0];
        to_add.push(MachineToAdd {
            hostname: planned.hostname.clone(),
            mac: planned.mac.clone(),
            rack: rack.name.clone(),
            bmc_url: bmc.url(),
            bmc_username: BMC_USERNAME.into(),
            bmc_password: BMC_PASSWORD.into(),
        });
        machines.push(machine);
        _bmcs.push(bmc);
    }
    // Both BMCs listen on 127.0.0.1, each in its own rack's namespace: a rack that ran the other
    // rack's power request would reach its own loopback and find nothing there.
    let ids: Vec<String> = site.add_machines(&to_add).await.unwrap().into_iter().map(|m| m.id).collect();
    site.commission_all(&ids).await.unwrap();
    let commissioning = site
        .wait_all(&ids, MachineState::Commissioning, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(commissioning.len(), 2);
    metalrack_tests::wait_for("every machine powered on through its BMC", Duration::from_secs(60), || async {
        machines.iter().all(SimulatedMachine::on).then_some(())
    })
    .await;
    metalrack_tests::wait_for("the region to record both machines On", Duration::from_secs(60), || async {
        let listed = site.api().machines().await.ok()?;
        listed.iter().filter(|m| ids.contains(&m.id) && m.power_state == PowerState::On).count().eq(&2).then_some(())
    })
    .await;
}
