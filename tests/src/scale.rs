//! A simulated site against one region, for `bench_scale` and `tests/scale.rs`: racks (each a
//! [`RackClient`] from its own loopback address) registered a few at a time, then heartbeating at
//! the interval the region asks for and holding a catalogue and a power long-poll as `rackd`
//! does; machines added through the API spread over the racks; boot events at a fixed rate; an
//! administrator's UI session; and the admin requests a [`LatencySampler`] times.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use metalrack_api::machines::{MachineCreate, MachinePage};
use metalrack_api::power::PowerParameters;
use metalrack_api::{paths, RackState};
use tokio::task::JoinSet;

use crate::api::Api;
use crate::latency::LatencySampler;
use crate::rack_client::RackClient;
use crate::region::Region;

/// Racks registering at once: a site's racks come up over minutes, not in one instant; 16
/// stays well inside the region's challenge bounds (`CHALLENGES_PER_SOURCE_MAX`, 16 per address,
/// and `CHALLENGES_PENDING_MAX`, 1,024 in all), so none is refused.
pub const REGISTERING_AT_ONCE: usize = 16;

/// Machines added at once through the API (an operator's script, or enlisting).
pub const ADDING_AT_ONCE: usize = 8;

/// How long `rackd` asks its catalogue and power polls to be held (`appliance/src/sync`,
/// `appliance/src/power_requests.rs`: 30 s each).
pub const POLL_WAIT: Duration = Duration::from_secs(30);

/// Pause after a failed poll or heartbeat before the next, as rackd backs off.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Events one boot sends (DHCP, TFTP, HTTP, script, kernel fetch): what a PXE boot through a
/// rack logs, sent as one batch as the rack's queue flushes them.
pub const EVENTS_PER_BOOT: usize = 5;

/// The source address of rack `i`: 127.1.x.y, away from 127.0.0.x that other tests' clients use.
pub fn rack_source(i: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 1, 0, 1)) + i as u32))
}

/// Rack `i`'s name.
pub fn rack_name(i: usize) -> String {
    format!("rack{i:04}")
}

/// Machine `i`'s MAC.
pub fn machine_mac(i: usize) -> String {
    format!("52:54:01:{:02x}:{:02x}:{:02x}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

/// What the simulated racks did: counts, and the first failure of each kind.
#[derive(Debug, Default)]
pub struct FleetCounters {
    pub heartbeats: AtomicUsize,
    pub heartbeat_failures: AtomicUsize,
    pub catalogue_answers: AtomicUsize,
    pub catalogue_failures: AtomicUsize,
    pub power_answers: AtomicUsize,
    pub power_failures: AtomicUsize,
    pub boots: AtomicUsize,
    pub boot_failures: AtomicUsize,
    pub first_failure: Mutex<Option<String>>,
}

impl FleetCounters {
    fn failed(&self, counter: &AtomicUsize, what: &str, error: &anyhow::Error) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.first_failure.lock().unwrap().get_or_insert_with(|| format!("{what}: {error:#}"));
    }

    /// Failures of any kind so far.
    pub fn failures(&self) -> usize {
        [&self.heartbeat_failures, &self.catalogue_failures, &self.power_failures, &self.boot_failures]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// One line: each count and the first failure.
    pub fn summary(&self) -> String {
        let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
        format!(
            "heartbeats {} ({} failed), catalogue answers {} ({} failed), power answers {} ({} failed), boots {} ({} failed){}",
            n(&self.heartbeats),
            n(&self.heartbeat_failures),
            n(&self.catalogue_answers),
            n(&self.catalogue_failures),
            n(&self.power_answers),
            n(&self.power_failures),
            n(&self.boots),
            n(&self.boot_failures),
            self.first_failure.lock().unwrap().as_ref().map(|f| format!("; first failure: {f}")).unwrap_or_default()
        )
    }
}

/// Registers `count` racks named [`rack_name`] from [`rack_source`] addresses,
/// [`REGISTERING_AT_ONCE`] at a time.
pub async fn register_racks(region: &Region, count: usize) -> Result<Vec<RackClient>> {
    let secret = region.shared_secret()?;
    let mut racks = Vec::with_capacity(count);
    let mut registering = JoinSet::new();
    for i in 0..count {
        if registering.len() >= REGISTERING_AT_ONCE {
            racks.push(registering.join_next().await.expect("a task")??);
        }
        let (url, secret) = (region.url.clone(), secret.clone());
        registering.spawn(async move { RackClient::register(&url, &secret, &rack_name(i), rack_source(i)).await });
    }
    while let Some(rack) = registering.join_next().await {
        racks.push(rack??);
    }
    racks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(racks)
}

/// Adds `count` machines with manual power, machine `i` on rack `i % racks`, [`ADDING_AT_ONCE`]
/// at a time; their ids in order.
pub async fn add_machines(api: &Api, racks: &[RackClient], count: usize) -> Result<Vec<String>> {
    let mut ids = vec![String::new(); count];
    let mut adding = JoinSet::new();
    let mut next = 0;
    while next < count || !adding.is_empty() {
        while next < count && adding.len() < ADDING_AT_ONCE {
            let (api, rack, i) = (api.clone(), racks[next % racks.len()].rack_id.clone(), next);
            adding.spawn(async move {
                let create = MachineCreate {
                    hostname: format!("node{i:05}"),
                    mac: machine_mac(i),
                    power: PowerParameters::Manual,
                    rack: Some(rack),
                };
                api.add_machine(&create).await.map(|m| (i, m.id)).with_context(|| format!("adding machine {i}"))
            });
            next += 1;
        }
        let (i, id) = adding.join_next().await.expect("a task")??;
        ids[i] = id;
    }
    Ok(ids)
}

/// Runs every rack as rackd would: a heartbeat each interval the region asks for (spread over
/// the interval, as racks started at different times are), a catalogue long-poll and a power
/// long-poll held and renewed. The tasks end when the set is dropped.
pub fn run_racks(racks: &[RackClient], shared_counters: &Arc<FleetCounters>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let n = racks.len();
    for (i, rack) in racks.iter().enumerate() {
        let (rack, counters) = (rack.clone(), shared_counters.clone());
        tasks.spawn(async move {
            let mut interval = Duration::from_secs(5);
            // Spread: rack i starts i/n of the way into the first interval.
            tokio::time::sleep(interval * i as u32 / n as u32).await;
            loop {
                match rack.heartbeat().await {
                    Ok(answer) => {
                        counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                        interval = Duration::from_millis(answer.heartbeat_interval_ms);
                    }
                    Err(e) => counters.failed(&counters.heartbeat_failures, &rack.name, &e),
                }
                tokio::time::sleep(interval).await;
            }
        });
        let (rack, counters) = (racks[i].clone(), shared_counters.clone());
        tasks.spawn(async move {
            let mut seen: Option<(i64, i64, u64)> = None;
            loop {
                let (after, requested, changes, wait) = match seen {
                    None => (-1, 0, None, Duration::ZERO),
                    Some((revision, requested, changes)) => (revision, requested, Some(changes), POLL_WAIT),
                };
                match rack.catalogue_since(after, requested, changes, wait).await {
                    Ok(catalogue) => {
                        counters.catalogue_answers.fetch_add(1, Ordering::Relaxed);
                        seen = Some((catalogue.revision, catalogue.sync_requested, catalogue.changes_seen));
                    }
                    Err(e) => {
                        counters.failed(&counters.catalogue_failures, &rack.name, &e);
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        });
        let (rack, counters) = (racks[i].clone(), shared_counters.clone());
        tasks.spawn(async move {
            loop {
                match rack.power_requests(POLL_WAIT).await {
                    Ok(_) => {
                        counters.power_answers.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counters.failed(&counters.power_failures, &rack.name, &e);
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        });
    }
    tasks
}

/// Boots machines at `boots_per_s`, machine after machine round the fleet, each boot sent by
/// its rack as one batch of [`EVENTS_PER_BOOT`] events. Ends when the task is aborted.
pub fn run_boots(
    racks: &[RackClient],
    machines: usize,
    boots_per_s: f64,
    counters: &Arc<FleetCounters>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let (racks, counters) = (racks.to_vec(), counters.clone());
    let queue_id = 4242u64;
    tasks.spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / boots_per_s));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sending = JoinSet::new();
        for boot in 0usize.. {
            ticks.tick().await;
            let machine = boot % machines;
            let rack = racks[machine % racks.len()].clone();
            let counters = counters.clone();
            let mac = machine_mac(machine);
            let at_ms = jiff::Timestamp::now().as_millisecond();
            let kinds = ["boot.dhcp", "boot.tftp", "boot.http", "boot.script", "boot.http"];
            let events: Vec<serde_json::Value> = kinds
                .iter()
                .take(EVENTS_PER_BOOT)
                .enumerate()
                .map(|(k, kind)| {
                    // Each rack numbers its own events; one counter per boot keeps them unique.
                    let seq = (boot * EVENTS_PER_BOOT + k + 1) as u64;
                    serde_json::json!({"queue_id": queue_id, "seq": seq, "at_ms": at_ms, "mac": mac, "kind": kind, "message": format!("{kind} for {mac}")})
                })
                .collect();
            sending.spawn(async move {
                match rack.send_boot_events(&serde_json::Value::Array(events)).await {
                    Ok(status) if status.is_success() => {
                        counters.boots.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(status) => counters.failed(&counters.boot_failures, &rack.name, &anyhow::anyhow!("{status}")),
                    Err(e) => counters.failed(&counters.boot_failures, &rack.name, &e),
                }
            });
            while sending.try_join_next().is_some() {}
        }
    });
    tasks
}

/// An HTTPS client logged in to the region's UI as `username` (its session cookie kept).
pub async fn ui_session(region: &Region, username: &str, password: &str) -> Result<reqwest::Client> {
    ui_session_from(region.https_client_builder(), &region.https_url(), username, password).await
}

/// [`ui_session`] from a client builder (say, one made before moving to another runtime, so
/// the session's connections live on that runtime) and the region's HTTPS URL.
pub async fn ui_session_from(
    builder: reqwest::ClientBuilder,
    region_url: &str,
    username: &str,
    password: &str,
) -> Result<reqwest::Client> {
    let client = builder.cookie_store(true).redirect(reqwest::redirect::Policy::none()).build()?;
    let response = client
        .post(format!("{region_url}/login"))
        .form(&[("username", username), ("password", password)])
        .send()
        .await?;
    anyhow::ensure!(response.status().is_redirection(), "login as {username}: {}", response.status());
    Ok(client)
}

/// Names of the admin requests [`admin_sampler`] times.
pub const MACHINES_FIRST_PAGE: &str = "API GET /machines (first page)";
pub const MACHINES_DEEP_PAGE: &str = "API GET /machines (deep page)";
pub const ONE_MACHINE: &str = "API GET /machines/{id}";
pub const RACKS_FIRST_PAGE: &str = "API GET /racks (first page of 100)";
pub const RACKS_DEEP_PAGE: &str = "API GET /racks (deep page)";
pub const UI_MACHINES: &str = "UI /machines";
pub const UI_DASHBOARD: &str = "UI / (dashboard)";

/// The admin requests an operator makes while the site runs: the API's machine list (first and
/// a deep page at `deep_offset`), one machine, the rack list (first and a deep page at
/// `rack_deep_offset`); the UI's machines page and dashboard.
pub fn admin_sampler(
    interval: Duration,
    api: &Api,
    ui: &reqwest::Client,
    region_url: &str,
    machine_id: &str,
    deep_offset: u64,
    rack_deep_offset: u64,
) -> LatencySampler {
    let get = |path: String| {
        let api = api.clone();
        move || api.request(reqwest::Method::GET, &path)
    };
    let page = |path: String| {
        let (ui, url) = (ui.clone(), format!("{region_url}{path}"));
        move || ui.get(&url)
    };
    LatencySampler::new(interval)
        .probe(MACHINES_FIRST_PAGE, get(paths::MACHINES.to_owned()))
        .probe(MACHINES_DEEP_PAGE, get(format!("{}?offset={deep_offset}", paths::MACHINES)))
        .probe(ONE_MACHINE, get(paths::machine(machine_id)))
        .probe(RACKS_FIRST_PAGE, get(paths::RACKS.to_owned()))
        .probe(RACKS_DEEP_PAGE, get(format!("{}?offset={rack_deep_offset}", paths::RACKS)))
        .probe(UI_MACHINES, page("/machines".to_owned()))
        .probe(UI_DASHBOARD, page("/".to_owned()))
}

/// The offset of a deep page of the rack list for `n_racks` racks: the last full page of 100
/// (900 of 1,000), or halfway when there are too few racks for that to be deep.
pub fn rack_deep_offset(n_racks: usize) -> u64 {
    let n_racks = n_racks as u64;
    n_racks.saturating_sub(u64::from(metalrack_api::RACK_PAGE_DEFAULT)).max(n_racks / 2)
}

/// Racks not Online, by name.
pub async fn racks_not_online(api: &Api) -> Result<Vec<String>> {
    Ok(api.racks().await?.into_iter().filter(|r| r.state != RackState::Online).map(|r| r.name).collect())
}

/// Pages through the whole machine list `page_len` at a time: every machine once, in hostname
/// order, and the total each page reports.
pub async fn machine_list_paged(api: &Api, page_len: u32) -> Result<(Vec<String>, u64)> {
    let mut hostnames = Vec::new();
    let mut total = 0;
    loop {
        let path = format!("{}?offset={}&limit={page_len}", paths::MACHINES, hostnames.len());
        let response = api.request(reqwest::Method::GET, &path).send().await?.error_for_status()?;
        let page: MachinePage = response.json().await?;
        total = total.max(page.total);
        if page.machines.is_empty() {
            return Ok((hostnames, total));
        }
        hostnames.extend(page.machines.into_iter().map(|m| m.hostname));
    }
}

/// `/proc/PID/stat`'s unit of CPU time (`USER_HZ`): 100 on every Linux architecture we run on.
const CLOCK_TICKS_PER_S: u64 = 100;

/// `/proc/PID` figures: CPU time (user + system) and resident memory now and at its peak.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessUsage {
    pub cpu: Duration,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

impl ProcessUsage {
    /// Reads `/proc/PID/stat` (utime, stime) and `/proc/PID/status` (VmRSS, VmHWM).
    pub fn of(pid: u32) -> Result<ProcessUsage> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/PID/stat")?;
        // Fields after the command, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').context("a stat line")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc/PID/status")?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(ProcessUsage {
            cpu: Duration::from_millis(ticks * 1000 / CLOCK_TICKS_PER_S),
            rss_bytes: kib("VmRSS:") * 1024,
            peak_rss_bytes: kib("VmHWM:") * 1024,
        })
    }

    /// This process.
    pub fn own() -> Result<ProcessUsage> {
        ProcessUsage::of(std::process::id())
    }
}
