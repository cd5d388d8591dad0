//! Boot events end to end, made by real TFTP requests to a real `rackd serve` (each refused
//! read is one `boot.refused` event): tens of thousands queued while the region is down arrive
//! once and in order when it returns, a hostile one (a 1000-byte file name) costing only itself;
//! and the queue survives a rack restart, and a kill while it drains stores nothing twice.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use metalrack_api::machines::BOOT_EVENT_MESSAGE_BYTES_MAX;
use metalrack_api::RackState;
use metalrack_tests::region::StoredBootEvent;
use metalrack_tests::{free_port, tftp, wait_for, wait_for_or_show, Rack, Region, DEADLINE};

/// Events queued while the region is down: twice the bound the rack had before its queue went
/// to disk (10,000), ~70 batches to drain.
const QUEUED: usize = 20_000;

/// How long 20,000 events may take to reach the region once it is back (measured: a few
/// seconds; the margin is for a loaded 2-core machine: with an optimised build running beside
/// it, one run of the restart test took over 60 s, its failed sends backing off).
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

/// A rack serving TFTP and HTTP (for /metrics) on loopback, DHCP off.
struct PxeRack {
    rack: Rack,
    config: String,
    tftp: SocketAddr,
    http: String,
}

impl PxeRack {
    /// Registers rack `r1` with `region` and serves until it is online.
    async fn start(dir: &Path, region: &Region, api_key: &str) -> PxeRack {
        let loaders = dir.join("loaders");
        std::fs::create_dir_all(&loaders).unwrap();
        std::fs::write(loaders.join("undionly.kpxe"), b"pretend loader").unwrap();
        let (http_port, tftp_port) = (free_port(), free_port());
        let config = format!(
            "[pxe]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\nhttp_listen = \"127.0.0.1:{http_port}\"\n\
             loaders_dir = \"{}\"\n[pxe.tftp]\nlisten = \"127.0.0.1:{tftp_port}\"\n[pxe.dhcp]\nmode = \"off\"\n",
            loaders.display()
        );
        let mut rack = Rack::new(dir, "r1");
        rack.register_ok(&region.url, &region.secret());
        rack.serve_with_config(&config);
        region.wait_rack_state(api_key, "r1", RackState::Online).await;
        let pxe = PxeRack {
            rack,
            config,
            tftp: SocketAddr::from(([127, 0, 0, 1], tftp_port)),
            http: format!("http://127.0.0.1:{http_port}"),
        };
        pxe.wait_serving().await;
        pxe
    }

    /// Starts `rackd serve` again (same data dir, config and ports) and waits until it serves.
    async fn restart(&mut self, kill: bool) {
        let mut daemon = self.rack.daemon.take().unwrap();
        if kill {
            daemon.kill();
        } else {
            daemon.terminate().unwrap();
        }
        self.rack.serve_with_config(&self.config);
        self.wait_serving().await;
    }

    async fn wait_serving(&self) {
        wait_for("the rack's PXE to serve", DEADLINE, || async {
            reqwest::get(format!("{}/metrics", self.http)).await.ok().filter(|r| r.status().is_success()).map(|_| ())
        })
        .await;
    }

    /// Asks for each name over TFTP (one refusal, so one boot event, each); returns how long it
    /// took.
    async fn refuse_all(&self, names: Vec<String>) -> Duration {
        let server = self.tftp;
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            for name in &names {
                let (code, _) = tftp::refused(server, name).unwrap_or_else(|e| panic!("{name:.40}: {e:?}"));
                assert_eq!(code, 1, "file not found");
            }
            started.elapsed()
        })
        .await
        .unwrap()
    }

    /// A sample from the rack's /metrics, 0 when absent (a counter family with no sample yet).
    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.http)).await.unwrap().text().await.unwrap();
        text.lines()
            .find(|line| line.split_whitespace().next() == Some(name))
            .and_then(|line| line.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0)
    }
}

fn missing(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

fn refusal(name: &str) -> String {
    format!("TFTP {name} refused: no such file")
}

/// Waits until the region stored at least `n` boot events; returns them all. A timeout shows
/// how far it got and both daemons' logs.
async fn wait_stored(region: &Region, pxe: &PxeRack, n: usize, deadline: Duration) -> Vec<StoredBootEvent> {
    let last_count = Cell::new(0);
    wait_for_or_show(
        &format!("{n} boot events at the region"),
        deadline,
        || async {
            let stored = region.stored_boot_events().await;
            last_count.set(stored.len());
            (stored.len() >= n).then_some(stored)
        },
        || {
            let rack = pxe.rack.daemon.as_ref().map(|daemon| daemon.log_tail(40)).unwrap_or_default();
            format!("{} stored by then\n{rack}\n{}", last_count.get(), region.daemon.log_tail(40))
        },
    )
    .await
}

/// The rack's ids of what the region stored: one rack, one queue, numbers rising.
async fn assert_ids_rise(region: &Region) {
    let ids = region.stored_boot_event_ids().await;
    let rack_id = ids[0].0.clone().expect("boot events carry the rack's id");
    let queue_id = ids[0].1.expect("and the rack's queue id");
    let mut last_seq = 0;
    for (i, (rack, queue, seq)) in ids.iter().enumerate() {
        assert_eq!((rack.as_deref(), *queue), (Some(rack_id.as_str()), Some(queue_id)), "event {i}");
        let seq = seq.expect("and its number");
        assert!(seq > last_seq, "event {i}: seq {seq} after {last_seq}");
        last_seq = seq;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_events_queued_while_the_region_is_down_arrive_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let pxe = PxeRack::start(dir.path(), &region, &api_key).await;
    region.daemon.terminate().unwrap();

    // Half, one hostile name (1000 bytes, multi-byte characters where it will be cut), half.
    let names = missing("missing", QUEUED);
    let hostile = format!("{}{}", "h".repeat(400), "ü".repeat(300));
    assert_eq!(hostile.len(), 1000);
    let mut queued_in = pxe.refuse_all(names[..QUEUED / 2].to_vec()).await;
    queued_in += pxe.refuse_all(vec![hostile.clone()]).await;
    queued_in += pxe.refuse_all(names[QUEUED / 2..].to_vec()).await;
    assert_eq!(pxe.metric("metalrack_rack_boot_events_queued").await, (QUEUED + 1) as f64);

    region.restart();
    let started = Instant::now();
    let stored = wait_stored(&region, &pxe, QUEUED + 1, DRAIN_DEADLINE).await;
    let drained_in = started.elapsed();
    eprintln!(
        "{} boot events: queued through TFTP in {queued_in:?}, drained to the region in {drained_in:?}",
        QUEUED + 1
    );

    // All, once, in order: the hostile one in its place, cut to the named length and marked.
    let mut expected: Vec<String> = names.iter().map(|name| refusal(name)).collect();
    let cut = &stored[QUEUED / 2].message;
    assert!(cut.len() <= BOOT_EVENT_MESSAGE_BYTES_MAX && cut.ends_with('…'), "{} bytes: {cut:.60}", cut.len());
    assert!(refusal(&hostile).starts_with(cut.trim_end_matches('…')));
    expected.insert(QUEUED / 2, cut.clone());
    let messages: Vec<&String> = stored.iter().map(|e| &e.message).collect();
    assert_eq!(messages.len(), expected.len());
    if let Some(i) = (0..expected.len()).find(|i| *messages[*i] != expected[*i]) {
        panic!("event {i}: {:.60} where {:.60} was expected", messages[i], expected[i]);
    }
    assert!(stored.iter().all(|e| e.kind == "boot.refused" && e.actor == "127.0.0.1 via r1"));
    assert_ids_rise(&region).await;

    // Nothing left to send again, nothing dropped; the one cut field counted.
    assert_eq!(pxe.metric("metalrack_rack_boot_events_queued").await, 0.0);
    assert_eq!(pxe.metric("metalrack_rack_boot_events_sent_total").await, (QUEUED + 1) as f64);
    assert_eq!(pxe.metric("metalrack_rack_boot_events_truncated_total").await, 1.0);
    for reason in ["queue_full", "refused", "unreadable"] {
        let name = format!("metalrack_rack_boot_events_dropped_total{{kind=\"{reason}\"}}");
        assert_eq!(pxe.metric(&name).await, 0.0, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rack_restart_keeps_the_queue_and_a_kill_while_draining_stores_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let mut pxe = PxeRack::start(dir.path(), &region, &api_key).await;
    region.daemon.terminate().unwrap();

    // Queued, the rack stopped and started again (its last flush fails: the region is down),
    // more queued.
    let before = missing("before-restart", 3000);
    let after = missing("after-restart", 3000);
    pxe.refuse_all(before.clone()).await;
    pxe.restart(false).await;
    assert_eq!(pxe.metric("metalrack_rack_boot_events_queued").await, 3000.0, "kept across the restart");
    pxe.refuse_all(after.clone()).await;

    // The region returns; the rack is killed as soon as the first events arrive, which is
    // (measured) well before the last: events it sent but had not yet marked sent go again.
    region.restart();
    let at_kill = wait_stored(&region, &pxe, 1, DRAIN_DEADLINE).await.len();
    pxe.restart(true).await;
    let stored_at_kill = region.stored_boot_events().await.len();
    eprintln!("rack killed with {at_kill}..{stored_at_kill} of 6000 events at the region");
    let stored = wait_stored(&region, &pxe, 6000, DRAIN_DEADLINE).await;
    let expected: Vec<String> = before.iter().chain(&after).map(|name| refusal(name)).collect();
    let messages: Vec<String> = stored.into_iter().map(|e| e.message).collect();
    assert_eq!(messages.len(), expected.len(), "each stored once");
    if let Some(i) = (0..expected.len()).find(|i| messages[*i] != expected[*i]) {
        panic!("event {i}: {} where {} was expected", messages[i], expected[i]);
    }
    assert_ids_rise(&region).await;
    wait_for("the restarted rack's queue to empty", DEADLINE, || async {
        (pxe.metric("metalrack_rack_boot_events_queued").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(region.stored_boot_events().await.len(), 6000, "and nothing sent again after");
}
