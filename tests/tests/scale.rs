//! The scale benchmark (`bench_scale`: 1,000 racks, 10,000 machines) cut to a tenth so it runs
//! in every test run: 100 racks heartbeating and holding their long-polls, 1,000 machines, boots
//! at a fleet's rate, and an administrator's requests timed meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metalrack_tests::latency::SAMPLE_INTERVAL_DEFAULT;
use metalrack_tests::scale::{
    add_machines, admin_sampler, machine_list_paged, rack_deep_offset, racks_not_online, register_racks, run_boots,
    run_racks, ui_session, FleetCounters,
};
use metalrack_tests::{wait_for, Region, DEADLINE};

const RACKS: usize = 100;
const MACHINES: usize = 1000;

/// Heartbeats every second, offline after three missed: the window below spans many offline
/// periods, so a rack whose heartbeats were delayed or refused would show.
const REGION_CONFIG: &str = "rack_heartbeat_interval_ms = 1000\nrack_offline_after_ms = 3000\n";

/// Boots a second: `bench_scale`'s rate for 10,000 machines (a rolling reboot of the fleet in an
/// hour, 2.8 a second, rounded up) scaled to a tenth of the fleet, and doubled for margin.
const BOOTS_PER_S: f64 = 1.0;

/// How long the admin requests are timed while the site runs.
const WINDOW: Duration = Duration::from_secs(10);

/// p99 bound of each admin request under the load: the debug build serves a first page of 100
/// machines in a few milliseconds unloaded and `bench_scale` (release, ten times the site) stays
/// under 50 ms; this test runs a debug region, 100 simulated racks and the sampler on a shared
/// 2-core CI machine beside other tests, so it allows ten times that. It catches the regressions
/// that matter here (a query per machine, a scan per rack, a handler slot held by a poll: each
/// costs seconds) without failing on a busy neighbour.
const ADMIN_P99_MAX: Duration = Duration::from_millis(500);

/// The list page the deep-page probe asks for: the last full page of 100.
const DEEP_OFFSET: u64 = (MACHINES - 100) as u64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_racks_and_a_thousand_machines_stay_online_paged_and_quick_to_administer() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_config(&dir.path().join("region"), REGION_CONFIG);
    let api_key = region.create_admin("admin", "scale-password");
    let api = region.api(&api_key);

    let racks = register_racks(&region, RACKS).await.unwrap();
    let machine_ids = add_machines(&api, &racks, MACHINES).await.unwrap();
    println!("{RACKS} racks registered and {MACHINES} machines added in {:?}", started.elapsed());

    let counters = Arc::new(FleetCounters::default());
    let rack_tasks = run_racks(&racks, &counters);
    wait_for("every rack to be Online", DEADLINE, || async {
        racks_not_online(&api).await.ok().filter(|offline| offline.is_empty())
    })
    .await;
    let boots = run_boots(&racks, MACHINES, BOOTS_PER_S, &counters);

    let ui = ui_session(&region, "admin", "scale-password").await.unwrap();
    let sampler = admin_sampler(
        SAMPLE_INTERVAL_DEFAULT,
        &api,
        &ui,
        &region.https_url(),
        &machine_ids[0],
        DEEP_OFFSET,
        rack_deep_offset(RACKS),
    );
    let report = sampler.run_for(WINDOW).await;
    println!("{report}");
    println!("{}", counters.summary());

    assert!(report.failures().is_empty(), "admin requests failed: {:?}", report.failures());
    for request in &report.requests {
        assert!(request.count >= 10, "{} sampled only {} times in {WINDOW:?}", request.name, request.count);
        assert!(request.p99 < ADMIN_P99_MAX, "{} p99 {:?} with {RACKS} racks:\n{report}", request.name, request.p99);
    }
    let offline = racks_not_online(&api).await.unwrap();
    assert!(offline.is_empty(), "racks went offline under the load: {offline:?}");
    assert_eq!(counters.failures(), 0, "{}", counters.summary());
    assert!(counters.boots.load(std::sync::atomic::Ordering::Relaxed) >= 5, "{}", counters.summary());

    // Paged by 100: every machine once, in hostname order, the total on each page.
    let (hostnames, total) = machine_list_paged(&api, 100).await.unwrap();
    assert_eq!(total, MACHINES as u64);
    let expected: Vec<String> = (0..MACHINES).map(|i| format!("node{i:05}")).collect();
    assert_eq!(hostnames, expected, "the pages hold every machine once, in order");

    drop(boots);
    drop(rack_tasks);
    println!("done in {:?}", started.elapsed());
}
