//! Watching the fleet: the region's `/metrics` (requests by route template and status with
//! latency histograms, racks and machines by state, boot events and events dropped) scraped
//! from a real region after real requests; the Grafana dashboard in `docs/grafana/` checked
//! against what a running region and a running `rackd` export; and the controllers page's
//! charts of each rack's recent health after heartbeats.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;

use metalrack_api::images::SyncReport;
use metalrack_api::{paths, HeartbeatRequest, RackHealth, RackState};
use metalrack_tests::rack_client::RackClient;
use metalrack_tests::{free_port, wait_for, Rack, Region, DEADLINE};
use reqwest::{Method, StatusCode};
use serde_json::json;

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const ADMIN_PASSWORD: &str = "correct horse battery staple";

/// Fast heartbeats, but a rack stays online for a minute after its last one, so the rack
/// counts cannot change between a scrape and the API's list on a loaded machine.
const SITE_CONFIG: &str = "rack_heartbeat_interval_ms = 200\nrack_offline_after_ms = 60000\n";

/// The samples of an OpenMetrics text: `name{labels}` (as written) → value.
type Samples = HashMap<String, f64>;

fn parse_samples(text: &str) -> Samples {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Every sample name a scrape can hold: the sample lines' names and, for each `# TYPE` line
/// (families with no sample yet included), the names its type makes.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else { continue };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// A region, its admin's API key, and an HTTPS client for raw requests.
struct Site {
    region: Region,
    key: String,
}

impl Site {
    fn start(dir: &Path) -> Site {
        let region = Region::start_with_config(&dir.join("region"), SITE_CONFIG);
        let key = region.create_admin("admin", ADMIN_PASSWORD);
        Site { region, key }
    }

    /// An API call as the admin; its status.
    async fn call(&self, method: Method, path: &str, body: Option<serde_json::Value>) -> StatusCode {
        let mut request = self.region.api(&self.key).request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap().status()
    }

    async fn scrape_text(&self) -> String {
        let response = self.region.api(&self.key).request(Method::GET, paths::METRICS).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
        response.text().await.unwrap()
    }

    async fn scrape(&self) -> Samples {
        parse_samples(&self.scrape_text().await)
    }

    /// A session cookie of the admin for the UI.
    async fn ui_session(&self) -> String {
        let client = self.region.https_client_builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let response = client
            .post(format!("{}/login", self.region.https_url()))
            .form(&[("username", "admin"), ("password", ADMIN_PASSWORD)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        response.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned()
    }

    async fn page(&self, session: &str, path: &str) -> String {
        let response = self
            .region
            .https_client()
            .get(format!("{}{path}", self.region.https_url()))
            .header("cookie", session)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.text().await.unwrap()
    }
}

/// `after - before` of one series (absent counts as 0).
fn delta(before: &Samples, after: &Samples, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

fn requests(route: &str, method: &str, status: u16) -> String {
    format!("metalrack_region_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}}")
}

fn api_route(template: &str) -> String {
    format!("{}{}{template}", paths::BASE_PATH, metalrack_api::API_PREFIX)
}

#[tokio::test]
async fn region_metrics_count_requests_by_route_template_and_status_and_match_racks_and_machines() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path());
    let region = &site.region;
    let online = RackClient::register(&region.url, &region.secret(), "rack-online", LOCALHOST).await.unwrap();
    let _silent = RackClient::register(&region.url, &region.secret(), "rack-silent", LOCALHOST).await.unwrap();
    online.heartbeat().await.unwrap();
    for i in 0..3 {
        let body = json!({"mac": format!("52:54:00:00:00:0{i}"), "power": {"driver": "manual"}, "rack": "rack-online"});
        assert_eq!(site.call(Method::POST, paths::MACHINES, Some(body)).await, StatusCode::CREATED);
    }
    let broken = json!({"reason": "fan"});
    let path = paths::machine_path(paths::MACHINE_MARK_BROKEN, "52-54-00-00-00-02");
    assert_eq!(site.call(Method::POST, &path, Some(broken)).await, StatusCode::OK);

    let before = site.scrape().await;
    for _ in 0..3 {
        assert_eq!(site.call(Method::GET, paths::MACHINES, None).await, StatusCode::OK);
    }
    assert_eq!(site.call(Method::GET, &paths::machine("52-54-00-99-99-99"), None).await, StatusCode::NOT_FOUND);
    // Paths no route knows, each different: one label for all of them.
    let unknown: Vec<String> = (0..20).map(|i| format!("/no-such-endpoint-{i}-{}", std::process::id())).collect();
    for path in &unknown {
        assert_eq!(site.call(Method::GET, path, None).await, StatusCode::NOT_FOUND);
    }
    let ui_unknown = region.https_client().get(format!("{}/nowhere-xyzzy", region.https_url())).send().await.unwrap();
    assert_eq!(ui_unknown.status(), StatusCode::NOT_FOUND);
    // Boot events: a batch stored, then one sent again (stored once), then a batch refused.
    let event = |seq: u64, kind: &str| json!({"queue_id": 7, "seq": seq, "at_ms": 1, "mac": "52:54:00:00:00:00", "kind": kind, "message": "m"});
    let good = json!([event(1, "boot.dhcp"), event(2, "boot.tftp")]);
    assert_eq!(online.send_boot_events(&good).await.unwrap(), StatusCode::NO_CONTENT);
    assert_eq!(online.send_boot_events(&good).await.unwrap(), StatusCode::NO_CONTENT);
    let bad = json!([event(3, "boot.http"), event(4, "not-a-boot-event"), event(5, "boot.http")]);
    assert_eq!(online.send_boot_events(&bad).await.unwrap(), StatusCode::BAD_REQUEST);
    // /metrics needs a key like the rest of the API.
    let metrics_url = format!("{}{}{}", region.https_url(), metalrack_api::API_PREFIX, paths::METRICS);
    let anonymous = region.https_client().get(metrics_url);
    assert_eq!(anonymous.send().await.unwrap().status(), StatusCode::UNAUTHORIZED);

    let text = site.scrape_text().await;
    let after = parse_samples(&text);
    let machines = api_route(paths::MACHINES);
    assert_eq!(delta(&before, &after, &requests(&machines, "GET", 200)), 3.0, "{text}");
    assert_eq!(delta(&before, &after, &requests(&api_route(paths::MACHINE), "GET", 404)), 1.0, "{text}");
    let count = format!("metalrack_region_http_request_duration_seconds_count{{route=\"{machines}\",method=\"GET\"}}");
    assert_eq!(delta(&before, &after, &count), 3.0, "the histogram saw each request: {text}");
    let inf = format!(
        "metalrack_region_http_request_duration_seconds_bucket{{le=\"+Inf\",route=\"{machines}\",method=\"GET\"}}"
    );
    assert_eq!(delta(&before, &after, &inf), 3.0, "{text}");
    let sum = format!("metalrack_region_http_request_duration_seconds_sum{{route=\"{machines}\",method=\"GET\"}}");
    assert!(delta(&before, &after, &sum) > 0.0, "{text}");
    assert_eq!(
        delta(&before, &after, &requests("unmatched", "GET", 404)),
        unknown.len() as f64 + 1.0,
        "unknown API and UI paths fold into one label: {text}"
    );
    assert!(!text.contains("no-such-endpoint") && !text.contains("xyzzy"), "no raw path became a label: {text}");
    assert_eq!(delta(&before, &after, &requests(&api_route(paths::METRICS), "GET", 401)), 1.0, "{text}");
    let events_route = api_route(paths::RACK_EVENTS);
    assert_eq!(delta(&before, &after, &requests(&events_route, "POST", 204)), 2.0, "{text}");
    assert_eq!(delta(&before, &after, &requests(&events_route, "POST", 400)), 1.0, "{text}");
    assert_eq!(delta(&before, &after, "metalrack_region_boot_events_received_total"), 4.0, "{text}");
    assert_eq!(delta(&before, &after, "metalrack_region_boot_events_stored_total"), 2.0, "resent events stored once");
    let refused = "metalrack_region_events_dropped_total{reason=\"boot_batch_refused\"}";
    assert_eq!(delta(&before, &after, refused), 3.0, "every event of the refused batch: {text}");

    // The fleet gauges match what the API lists.
    let gauge = |series: &str| after.get(series).copied().unwrap_or_else(|| panic!("{series} missing: {text}"));
    let racks = region.racks(&site.key).await;
    for state in [RackState::Online, RackState::Offline, RackState::NeedsReregistration] {
        let listed = racks.iter().filter(|r| r.state == state).count() as f64;
        let word = serde_json::to_value(state).unwrap();
        assert_eq!(gauge(&format!("metalrack_region_racks{{state={word}}}")), listed, "{word}: {text}");
    }
    assert_eq!(gauge("metalrack_region_racks{state=\"online\"}"), 1.0);
    assert_eq!(gauge("metalrack_region_racks{state=\"offline\"}"), 1.0);
    assert_eq!(gauge("metalrack_region_machines{state=\"new\"}"), 2.0, "{text}");
    assert_eq!(gauge("metalrack_region_machines{state=\"broken\"}"), 1.0, "{text}");
    assert_eq!(gauge("metalrack_region_machines{state=\"deployed\"}"), 0.0, "every state is exported: {text}");
    assert_eq!(gauge("metalrack_region_deploys_in_progress"), 0.0);
    assert!(gauge("metalrack_region_heartbeats_total") >= 1.0);
    assert!(
        gauge("metalrack_region_db_connections{state=\"idle\"}")
            + gauge("metalrack_region_db_connections{state=\"in_use\"}")
            >= 1.0
    );
    // Exported from the start (a dashboard's rate() has a series); none closed in this run.
    assert_eq!(gauge("metalrack_region_db_connections_closed_in_transaction_total"), 0.0, "{text}");
    assert!(text.ends_with("# EOF\n"), "a complete OpenMetrics document");
}

#[tokio::test]
async fn metrics_are_refused_over_clear_http_even_with_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path());
    let url = format!("{}{}{}", site.region.url, metalrack_api::API_PREFIX, paths::METRICS);
    assert!(url.starts_with("http://"), "{url}");
    let response = reqwest::Client::new().get(&url).bearer_auth(&site.key).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(!response.text().await.unwrap().contains("metalrack_region_"));
}

/// A heartbeat with these figures and a snapshot built from catalogue revision 0 (the empty
/// catalogue's, so the rack is current and its sync lag is 0).
fn heartbeat(cpu_load: f64, memory_available_bytes: u64) -> HeartbeatRequest {
    heartbeat_at_revision(cpu_load, memory_available_bytes, 0)
}

fn heartbeat_at_revision(cpu_load: f64, memory_available_bytes: u64, snapshot_revision: i64) -> HeartbeatRequest {
    HeartbeatRequest {
        health: RackHealth {
            version: "test".into(),
            uptime_s: 1,
            cpu_load,
            disk_free_bytes: 30 << 30,
            disk_total_bytes: 40 << 30,
            addresses: vec![],
            memory_total_bytes: 8 << 30,
            memory_available_bytes,
        },
        sync: Some(SyncReport { snapshot_revision, ..SyncReport::default() }),
    }
}

#[tokio::test]
async fn controllers_page_charts_each_racks_recent_cpu_memory_disk_and_sync_lag_after_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path());
    let region = &site.region;
    let charted = RackClient::register(&region.url, &region.secret(), "rack-charted", LOCALHOST).await.unwrap();
    let _quiet = RackClient::register(&region.url, &region.secret(), "rack-quiet", LOCALHOST).await.unwrap();
    for (cpu, available) in [(0.1, 6u64 << 30), (0.3, 4 << 30), (0.5, 2 << 30)] {
        charted.heartbeat_with(&heartbeat(cpu, available)).await.unwrap();
    }
    let session = site.ui_session().await;
    let page = site.page(&session, "/controllers").await;
    let row =
        page.split("data-rack=\"rack-charted\"").nth(1).expect("the charted rack's row").split("</tr>").next().unwrap();
    for series in ["cpu", "memory", "disk", "sync-lag"] {
        assert!(row.contains(&format!("data-series=\"{series}\" data-samples=\"3\"")), "{series}: {row}");
    }
    assert_eq!(row.matches("<polyline").count(), 4, "one line per chart: {row}");
    assert!(row.contains("<figcaption>CPU 50 %</figcaption>"), "the latest CPU load: {row}");
    assert!(row.contains("<figcaption>Memory 75 %</figcaption>"), "8 GiB with 2 GiB available: {row}");
    assert!(row.contains("<figcaption>Disk 25 %</figcaption>"), "{row}");
    assert!(row.contains("<figcaption>Sync lag 0 s</figcaption>"), "{row}");
    let quiet = page.split("data-rack=\"rack-quiet\"").nth(1).unwrap().split("</tr>").next().unwrap();
    assert!(quiet.contains("no heartbeat since the region started") && !quiet.contains("<svg"), "{quiet}");
    assert!(page.contains("id=\"charts-explained\"") && page.contains("Sync lag"), "the page says what sync lag is");

    // The rack's own page charts the same samples; more heartbeats, more points, bounded.
    for _ in 0..2 {
        charted.heartbeat_with(&heartbeat(0.2, 4 << 30)).await.unwrap();
    }
    let own = site.page(&session, &format!("/controllers/{}", charted.rack_id)).await;
    let card = own.split("id=\"recent-health\"").nth(1).expect("the recent health card");
    assert!(card.contains("data-series=\"cpu\" data-samples=\"5\""), "{card}");
    assert!(card.contains("<figcaption>CPU 20 %</figcaption>"), "{card}");

    // An image pushed: the catalogue moves on, and a rack still at revision 0 lags behind,
    // counted from its first heartbeat that showed it behind, until it reports the new revision.
    let image = dir.path().join("kernel");
    std::fs::write(&image, b"pretend kernel ".repeat(1000)).unwrap();
    region.push(&site.key, &image, "ubuntu/noble", "kernel", "1");
    let revision = charted.catalogue(-1, -1, std::time::Duration::ZERO).await.unwrap().revision;
    assert!(revision > 0);
    let lag_caption = |page: &str| -> String {
        let chart = page.split("data-series=\"sync-lag\"").nth(1).expect("a sync lag chart");
        chart.split("<figcaption>").nth(1).unwrap().split("</figcaption>").next().unwrap().to_owned()
    };
    let behind_since = std::time::Instant::now();
    let caption = wait_for("the rack's sync lag to grow past 1 s", DEADLINE, || async {
        charted.heartbeat_with(&heartbeat_at_revision(0.2, 4 << 30, 0)).await.unwrap();
        let caption = lag_caption(&site.page(&session, &format!("/controllers/{}", charted.rack_id)).await);
        (caption != "Sync lag 0 s" && caption != "Sync lag 1 s").then_some(caption)
    })
    .await;
    let shown_s: f64 = caption.trim_start_matches("Sync lag ").trim_end_matches(" s").parse().unwrap();
    assert!(
        shown_s <= behind_since.elapsed().as_secs_f64() + 1.0,
        "lag counts from the first heartbeat behind: {caption}"
    );
    charted.heartbeat_with(&heartbeat_at_revision(0.2, 4 << 30, revision)).await.unwrap();
    let own = site.page(&session, &format!("/controllers/{}", charted.rack_id)).await;
    assert_eq!(lag_caption(&own), "Sync lag 0 s", "caught up");
}

/// The metric names a PromQL expression uses: identifiers starting `metalrack_`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("metalrack_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every query of the dashboard: panel targets' `expr` and templating variables' queries.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    let panels = dashboard["panels"].as_array().expect("the dashboard has panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().expect("a panel id")), "panel ids are unique");
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "every panel is placed: {panel}");
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("a target has an expression").to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(query) = variable["definition"].as_str() {
            queries.push(query.to_owned());
        }
    }
    queries
}

#[tokio::test]
async fn the_grafana_dashboard_queries_only_metrics_a_running_region_and_rack_export() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/metalrack.json"))
        .expect("docs/grafana/metalrack.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();

    // What the dashboard must show (the list), by the metric behind it.
    for needed in [
        "metalrack_region_http_requests_total",
        "metalrack_region_http_request_duration_seconds_bucket",
        "metalrack_region_racks",
        "metalrack_region_machines",
        "metalrack_region_deploys_in_progress",
        "metalrack_region_events_dropped_total",
        "metalrack_rack_http_bytes_total",
        "metalrack_rack_tftp_bytes_total",
        "metalrack_rack_dhcp_packets_total",
    ] {
        assert!(used.contains(needed), "the dashboard does not show {needed}");
    }
    for quantile in ["histogram_quantile(0.5,", "histogram_quantile(0.99,"] {
        assert!(queries.iter().any(|q| q.contains(quantile)), "no {quantile} latency panel");
    }

    // A running region and a running rackd (PXE on loopback, DHCP off).
    let dir = tempfile::tempdir().unwrap();
    let site = Site::start(dir.path());
    let region_names = exported_names(&site.scrape_text().await);
    let loaders = dir.path().join("loaders");
    std::fs::create_dir_all(&loaders).unwrap();
    std::fs::write(loaders.join("undionly.kpxe"), b"pretend loader").unwrap();
    let (http_port, tftp_port) = (free_port(), free_port());
    let config = format!(
        "[pxe]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\nhttp_listen = \"127.0.0.1:{http_port}\"\n\
         loaders_dir = \"{}\"\n[pxe.tftp]\nlisten = \"127.0.0.1:{tftp_port}\"\n[pxe.dhcp]\nmode = \"off\"\n",
        loaders.display()
    );
    let mut rack = Rack::new(dir.path(), "r1");
    rack.register_ok(&site.region.url, &site.region.secret());
    rack.serve_with_config(&config);
    let rack_text = wait_for("the rack's /metrics", DEADLINE, || async {
        let response = reqwest::get(format!("http://127.0.0.1:{http_port}/metrics")).await.ok()?;
        response.status().is_success().then_some(())?;
        response.text().await.ok()
    })
    .await;
    let rack_names = exported_names(&rack_text);

    let missing: Vec<&String> =
        used.iter().filter(|name| !region_names.contains(*name) && !rack_names.contains(*name)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:?}\nregion: {region_names:?}\nrack: {rack_names:?}"
    );

    // The real rack's heartbeats carry its memory, which the controllers page charts.
    site.region.wait_rack_state(&site.key, "r1", RackState::Online).await;
    let session = site.ui_session().await;
    let row = wait_for("two heartbeats of r1 charted", DEADLINE, || async {
        let page = site.page(&session, "/controllers").await;
        let row = page.split("data-rack=\"r1\"").nth(1)?.split("</tr>").next()?.to_owned();
        (!row.contains("data-samples=\"1\"") && row.contains("data-series=\"memory\"")).then_some(row)
    })
    .await;
    assert!(!row.contains("<figcaption>Memory –</figcaption>"), "rackd reports its memory: {row}");
}

/// Racks heartbeating in the batching test, and heartbeats each sends after its first.
const BATCH_RACKS: usize = 20;
const BATCH_ROUNDS: usize = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_racks_heartbeats_are_written_in_one_transaction_a_second_and_racks_show_their_latest_health() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::start(dir.path());
    let racks = metalrack_tests::scale::register_racks(&site.region, BATCH_RACKS).await.unwrap();
    let health = |round: usize| RackHealth { version: format!("round-{round}"), ..Default::default() };
    let beat = |rack: &RackClient, round: usize| {
        let (rack, request) = (rack.clone(), HeartbeatRequest { health: health(round), sync: None });
        async move { rack.heartbeat_with(&request).await.unwrap() }
    };
    // First heartbeats: each rack comes online at once, written through (no flush needed).
    futures_util::future::join_all(racks.iter().map(|rack| beat(rack, 0))).await;
    let before = site.scrape().await;
    assert_eq!(before.get("metalrack_region_racks{state=\"online\"}").copied(), Some(BATCH_RACKS as f64));

    // Rounds at the config's heartbeat interval (200 ms), so the heartbeats span several flush
    // intervals, as a site's do.
    let started = std::time::Instant::now();
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(200));
    for round in 1..=BATCH_ROUNDS {
        pace.tick().await;
        futures_util::future::join_all(racks.iter().map(|rack| beat(rack, round))).await;
    }
    // Read through the buffer: every rack Online with its latest health, flushed or not.
    let views = site.region.racks(&site.key).await;
    assert_eq!(views.len(), BATCH_RACKS);
    for view in &views {
        assert_eq!(view.state, RackState::Online, "{view:?}");
        assert_eq!(view.health.as_ref().unwrap().version, format!("round-{BATCH_ROUNDS}"), "{view:?}");
    }
    // Wait for the flush that writes the last round, then count the transactions.
    let after = wait_for("the last heartbeats flushed", DEADLINE, || async {
        let after = site.scrape().await;
        (delta(&before, &after, "metalrack_region_heartbeats_flushed_total") >= 1.0).then_some(after)
    })
    .await;
    let elapsed_s = started.elapsed().as_secs_f64();
    let heartbeats = delta(&before, &after, "metalrack_region_heartbeats_total");
    let flushes = delta(&before, &after, "metalrack_region_heartbeat_flushes_total");
    let flushed = delta(&before, &after, "metalrack_region_heartbeats_flushed_total");
    println!("{heartbeats} heartbeats, {flushes} flush transactions writing {flushed} rows in {elapsed_s:.1} s");
    assert_eq!(heartbeats, (BATCH_RACKS * BATCH_ROUNDS) as f64);
    // One transaction per flush interval (1 s) at most, and one per tick can be due at the start
    // and the end: not one per heartbeat.
    assert!(flushes >= 1.0 && flushes <= elapsed_s.ceil() + 1.0, "{flushes} flushes in {elapsed_s:.1} s");
    assert!(flushes * 10.0 < heartbeats, "{flushes} flushes for {heartbeats} heartbeats");
    // Each flush writes each rack's latest once: never more rows than racks per flush.
    assert!(
        flushed <= flushes * BATCH_RACKS as f64 && flushed >= BATCH_RACKS as f64,
        "{flushed} rows, {flushes} flushes"
    );
    assert_eq!(after.get("metalrack_region_racks{state=\"online\"}").copied(), Some(BATCH_RACKS as f64));

    // One more round, then a restart at once: what the region stored (by its last periodic
    // flush or the one at shutdown) is each rack's latest health.
    futures_util::future::join_all(racks.iter().map(|rack| beat(rack, BATCH_ROUNDS + 1))).await;
    site.region.restart();
    for view in site.region.racks(&site.key).await {
        assert_eq!(view.health.as_ref().unwrap().version, format!("round-{}", BATCH_ROUNDS + 1), "{view:?}");
        assert!(view.last_seen_ms.is_some(), "{view:?}");
    }
}
