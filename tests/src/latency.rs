//! A latency sampler: named requests sent one after another at a fixed interval from a task of
//! their own, during a window or until stopped, reported as count, errors and p50/p99/max per
//! request. Benchmarks compare a region's API idle and under load with it (`bench_scale`, the
//! deploy storm).
//!
//! On a virtual machine the host decides too. Two options say how much:
//! [`LatencySampler::reference_work`] times a fixed piece of CPU work on the sampler's thread at
//! the start of each round ([`reference_work`]; the box's speed at that moment), and
//! [`LatencySampler::watch_steal`] reads a CPU's steal time (time the hypervisor ran something
//! else while this vCPU had work) before and after each request, and reports each probe's
//! figures also over the samples during which none was seen.
//!
//! ```no_run
//! # async fn example(api: metalrack_tests::api::Api) {
//! use metalrack_tests::latency::{LatencySampler, SAMPLE_INTERVAL_DEFAULT};
//! let sampler = LatencySampler::new(SAMPLE_INTERVAL_DEFAULT)
//!     .probe("GET /machines", { let api = api.clone(); move || api.request(reqwest::Method::GET, "/machines") });
//! let idle = sampler.clone().run_for(std::time::Duration::from_secs(10)).await;
//! let running = sampler.start();
//! // ... the load ...
//! let loaded = running.stop().await;
//! println!("{idle}\n{loaded}");
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::oneshot;

/// A round of every probe every 100 ms: 10 samples a second per request, enough for a p99 over
/// a window of a minute (600 samples) while adding little load (the probes go one at a time).
pub const SAMPLE_INTERVAL_DEFAULT: Duration = Duration::from_millis(100);

/// A probe's answer that takes longer counts as an error (and its time as this).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Samples kept per probe: a day at 10 a second would be 864,000; this bounds a sampler left
/// running (8 bytes each, 8 MiB per probe). Past it, samples are counted but not kept.
pub const SAMPLES_PER_PROBE_MAX: usize = 1 << 20;

/// Builds one request of a probe, afresh for each sample.
type MakeRequest = Arc<dyn Fn() -> reqwest::RequestBuilder + Send + Sync>;

/// Requests to sample and how often.
#[derive(Clone)]
pub struct LatencySampler {
    interval: Duration,
    probes: Vec<(String, MakeRequest)>,
    /// Whether each round times [`reference_work`] first.
    reference: bool,
    /// The CPU whose steal time each sample watches.
    steal_cpu: Option<usize>,
}

impl fmt::Debug for LatencySampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.probes.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("LatencySampler")
            .field("interval", &self.interval)
            .field("probes", &names)
            .field("reference", &self.reference)
            .field("steal_cpu", &self.steal_cpu)
            .finish()
    }
}

/// A sampler running on its own task; [`RunningSampler::stop`] ends it and reports.
#[derive(Debug)]
pub struct RunningSampler {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<LatencyReport>,
}

/// One probe's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLatency {
    pub name: String,
    /// Samples sent (answered or not).
    pub count: usize,
    /// Samples that failed: no answer, a status other than 2xx, or over [`PROBE_TIMEOUT`].
    pub errors: usize,
    /// The first failure, to say why.
    pub first_error: Option<String>,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// With a CPU's steal watched: the samples during which it grew, and the others' figures.
    pub steal: Option<StealSeen>,
}

/// A probe's samples split by whether the watched CPU's steal time grew while each was in
/// flight. `/proc/stat` counts steal in 10 ms units, so an episode of 10 ms or more is always
/// seen and a shorter one only sometimes: the clean figures may still hold short ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StealSeen {
    /// Samples during which the steal count grew.
    pub hit: usize,
    /// p50 and p99 of the samples during which it did not.
    pub clean_p50: Duration,
    pub clean_p99: Duration,
    /// With reference work as well: the p99 of the same samples, each divided by the box's speed
    /// when it was sent (the median reference time of the last [`SPEED_ROUNDS`] rounds), in
    /// units of that reference time. It takes out the host's drift between windows.
    pub clean_relative_p99: Option<f64>,
}

/// Rounds whose reference times give the box's speed for a sample: a second at the default
/// interval. The host's speed drifts over seconds; one reference alone is itself sometimes
/// interrupted.
pub const SPEED_ROUNDS: usize = 5;

/// What a sampler measured, one entry per probe in the order they were added.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyReport {
    pub window: Duration,
    pub requests: Vec<RequestLatency>,
    /// With reference work: its times, one per round (the box's speed over the window).
    pub reference: Option<RequestLatency>,
}

/// Name of the reference work's row.
pub const REFERENCE_WORK: &str = "reference work (fixed CPU work on the sampler's thread)";

/// The steal time of `cpu` so far, in `/proc/stat`'s units (USER_HZ, 10 ms): time the hypervisor
/// gave to something else while this virtual CPU had work. None where it cannot be read.
pub fn cpu_steal_ticks(cpu: usize) -> Option<u64> {
    steal_ticks_of(&std::fs::read_to_string("/proc/stat").ok()?, cpu)
}

/// The steal field (the eighth number) of the `cpuN` line of a `/proc/stat` text.
fn steal_ticks_of(stat: &str, cpu: usize) -> Option<u64> {
    let name = format!("cpu{cpu}");
    let line = stat.lines().find(|line| line.split_whitespace().next() == Some(name.as_str()))?;
    line.split_whitespace().nth(8)?.parse().ok()
}

/// A fixed piece of CPU work, the same on every call, of the kinds a region's request is made
/// of: allocation, formatting, hashing into a map and sorting strings (0.7–1.1 ms on the lab's
/// box). Timed beside requests it tells how fast the core was at that moment.
pub fn reference_work() -> u64 {
    const ENTRIES: u64 = 2048;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut names = std::collections::HashMap::with_capacity(ENTRIES as usize);
    for i in 0..ENTRIES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        names.insert(std::hint::black_box(state), format!("machine-{:016x}-{i}", state >> 3));
    }
    let mut sorted: Vec<&String> = names.values().collect();
    sorted.sort_unstable();
    sorted.iter().step_by(64).map(|name| name.len() as u64).sum::<u64>() + names.len() as u64
}

impl LatencySampler {
    /// A sampler that sends every probe once each `interval` (a round's start to the next's;
    /// a round that takes longer delays the next rather than bunching them).
    pub fn new(interval: Duration) -> LatencySampler {
        LatencySampler { interval, probes: Vec::new(), reference: false, steal_cpu: None }
    }

    /// Times [`reference_work`] at the start of each round ([`LatencyReport::reference`]).
    pub fn reference_work(mut self) -> LatencySampler {
        self.reference = true;
        self
    }

    /// Reads `cpu`'s steal time before and after each sample ([`RequestLatency::steal`]): the
    /// CPU the server under test runs on.
    pub fn watch_steal(mut self, cpu: usize) -> LatencySampler {
        self.steal_cpu = Some(cpu);
        self
    }

    /// Adds a probe: `make` builds its request (URL, authentication) each time it is sampled.
    /// The latency is from sending to the whole body read.
    pub fn probe(
        mut self,
        name: impl Into<String>,
        make: impl Fn() -> reqwest::RequestBuilder + Send + Sync + 'static,
    ) -> LatencySampler {
        self.probes.push((name.into(), Arc::new(make)));
        self
    }

    /// Samples until [`RunningSampler::stop`].
    pub fn start(self) -> RunningSampler {
        let (stop, stopped) = oneshot::channel();
        RunningSampler { stop, task: tokio::spawn(self.sample(stopped)) }
    }

    /// Samples for `window` and reports.
    pub async fn run_for(self, window: Duration) -> LatencyReport {
        let running = self.start();
        tokio::time::sleep(window).await;
        running.stop().await
    }

    async fn sample(self, mut stopped: oneshot::Receiver<()>) -> LatencyReport {
        let started = Instant::now();
        let mut samples: Vec<Samples> = self.probes.iter().map(|_| Samples::default()).collect();
        let mut reference = Samples::default();
        let mut recent: std::collections::VecDeque<Duration> = std::collections::VecDeque::with_capacity(SPEED_ROUNDS);
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'rounds: loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = ticks.tick() => {}
            }
            // Counted once the round's first probe goes: a stop between the two leaves the round
            // out of both, so every round has one reference.
            let mut round_reference = None;
            if self.reference {
                let started = Instant::now();
                std::hint::black_box(reference_work());
                let took = started.elapsed();
                round_reference = Some(took);
                if recent.len() == SPEED_ROUNDS {
                    recent.pop_front();
                }
                recent.push_back(took);
            }
            let unit = (!recent.is_empty()).then(|| {
                let mut sorted: Vec<Duration> = recent.iter().copied().collect();
                sorted.sort_unstable();
                percentile(&sorted, 50.0).as_secs_f64().max(f64::MIN_POSITIVE)
            });
            // Within a round one sample's reading after is the next one's before: the samples go
            // back to back, and `/proc/stat` is read on the core under test.
            let mut steal_now = None;
            for ((_, make), samples) in self.probes.iter().zip(&mut samples) {
                if stopped.try_recv().is_ok() {
                    break 'rounds;
                }
                if let Some(took) = round_reference.take() {
                    reference.add(took, None);
                }
                let steal_before = steal_now.or_else(|| self.steal_cpu.and_then(cpu_steal_ticks));
                let sent = Instant::now();
                let result = tokio::time::timeout(PROBE_TIMEOUT, send(make().timeout(PROBE_TIMEOUT))).await;
                let took = sent.elapsed();
                let result = result.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {PROBE_TIMEOUT:?}")));
                samples.add(took, result.err());
                steal_now = self.steal_cpu.and_then(cpu_steal_ticks);
                if let (Some(before), Some(after)) = (steal_before, steal_now) {
                    samples.add_steal(took, after > before, unit);
                }
            }
        }
        let window = started.elapsed();
        let requests = self.probes.iter().zip(samples).map(|((name, _), samples)| samples.summary(name)).collect();
        let reference = self.reference.then(|| reference.summary(REFERENCE_WORK));
        LatencyReport { window, requests, reference }
    }
}

impl RunningSampler {
    /// Ends the sampling (a request under way is finished first) and reports.
    pub async fn stop(self) -> LatencyReport {
        let _ = self.stop.send(());
        self.task.await.expect("the sampler's task does not panic")
    }
}

/// Sends `request` and reads its whole body; an error unless the status is 2xx.
async fn send(request: reqwest::RequestBuilder) -> Result<()> {
    let response = request.send().await.context("send")?;
    let status = response.status();
    let body = response.bytes().await.context("read the body")?;
    anyhow::ensure!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)]));
    Ok(())
}

/// One probe's samples so far.
#[derive(Debug, Default)]
struct Samples {
    count: usize,
    errors: usize,
    first_error: Option<String>,
    latencies: Vec<Duration>,
    /// With steal watched: samples during which it grew, and the latencies of the others.
    stolen: usize,
    watched: bool,
    clean: Vec<Duration>,
    /// The clean samples in units of the box's speed, with reference work.
    clean_relative: Vec<f64>,
}

impl Samples {
    fn add(&mut self, took: Duration, error: Option<anyhow::Error>) {
        self.count += 1;
        if let Some(error) = error {
            self.errors += 1;
            self.first_error.get_or_insert_with(|| format!("{error:#}"));
        }
        // Failures count at the time they took: a refusal in 1 ms must not flatter the p99, and
        // the error count says there were some.
        if self.latencies.len() < SAMPLES_PER_PROBE_MAX {
            self.latencies.push(took);
        }
    }

    fn add_steal(&mut self, took: Duration, stolen: bool, unit_s: Option<f64>) {
        self.watched = true;
        if stolen {
            self.stolen += 1;
        } else if self.clean.len() < SAMPLES_PER_PROBE_MAX {
            self.clean.push(took);
            if let Some(unit_s) = unit_s {
                self.clean_relative.push(took.as_secs_f64() / unit_s);
            }
        }
    }

    fn summary(mut self, name: &str) -> RequestLatency {
        self.latencies.sort_unstable();
        self.clean.sort_unstable();
        self.clean_relative.sort_unstable_by(f64::total_cmp);
        let steal = self.watched.then(|| StealSeen {
            hit: self.stolen,
            clean_p50: percentile(&self.clean, 50.0),
            clean_p99: percentile(&self.clean, 99.0),
            clean_relative_p99: (!self.clean_relative.is_empty()).then(|| percentile(&self.clean_relative, 99.0)),
        });
        RequestLatency {
            name: name.to_owned(),
            count: self.count,
            errors: self.errors,
            first_error: self.first_error,
            p50: percentile(&self.latencies, 50.0),
            p99: percentile(&self.latencies, 99.0),
            max: self.latencies.last().copied().unwrap_or_default(),
            steal,
        }
    }
}

/// The `p`th percentile (0 < p ≤ 100) of `sorted` (ascending) by nearest rank: the smallest
/// sample with at least p % of the samples at or below it, so always a measured value. Zero (the
/// type's default) for no samples.
pub fn percentile<T: Copy + Default + PartialOrd>(sorted: &[T], p: f64) -> T {
    assert!(p > 0.0 && p <= 100.0, "a percentile is in (0, 100], not {p}");
    debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "samples are sorted");
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl LatencyReport {
    /// The figures of probe `name`.
    pub fn get(&self, name: &str) -> Option<&RequestLatency> {
        self.requests.iter().find(|r| r.name == name)
    }

    /// The largest p99 of all probes.
    pub fn worst_p99(&self) -> Duration {
        self.requests.iter().map(|r| r.p99).max().unwrap_or_default()
    }

    /// Probes with errors, as `NAME: N errors, e.g. FIRST`.
    pub fn failures(&self) -> Vec<String> {
        self.requests
            .iter()
            .filter(|r| r.errors > 0)
            .map(|r| {
                format!(
                    "{}: {} errors of {}, e.g. {}",
                    r.name,
                    r.errors,
                    r.count,
                    r.first_error.as_deref().unwrap_or("")
                )
            })
            .collect()
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A Markdown table: request, samples, errors, p50, p99, max (ms).
impl fmt::Display for LatencyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| request | samples | errors | p50 (ms) | p99 (ms) | max (ms) |")?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|")?;
        for r in &self.requests {
            writeln!(
                f,
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                r.name,
                r.count,
                r.errors,
                ms(r.p50),
                ms(r.p99),
                ms(r.max)
            )?;
        }
        if let Some(r) = &self.reference {
            writeln!(f, "| {} | {} | - | {:.2} | {:.2} | {:.2} |", r.name, r.count, ms(r.p50), ms(r.p99), ms(r.max))?;
        }
        Ok(())
    }
}

/// The region's request-latency histogram as `/metrics` exports it
/// (`metalrack_region_http_request_duration_seconds`): cumulative counts per bucket bound, by
/// route template and method. It times a request inside the region (routing to response), so
/// set beside a sampler's figures it tells the region's share of a slow answer from the
/// client's and the network's. Two scrapes subtracted ([`RouteHistograms::since`]) give a
/// window's requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteHistograms {
    /// (route, method) → (bucket upper bound in seconds, requests at or under it), ascending.
    buckets: std::collections::BTreeMap<(String, String), Vec<(f64, u64)>>,
}

const DURATION_BUCKET: &str = "metalrack_region_http_request_duration_seconds_bucket{";

impl RouteHistograms {
    /// Reads the bucket lines of an OpenMetrics text; other lines are skipped.
    pub fn parse(text: &str) -> RouteHistograms {
        let mut histograms = RouteHistograms::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(DURATION_BUCKET) else { continue };
            let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
            let Ok(count) = value.trim().parse::<f64>() else { continue };
            let (mut le, mut route, mut method) = (None, None, None);
            for label in labels.split("\",") {
                let Some((name, value)) = label.split_once("=\"") else { continue };
                let value = value.trim_end_matches('"');
                match name {
                    "le" => le = Some(if value == "+Inf" { f64::INFINITY } else { value.parse().unwrap_or(f64::NAN) }),
                    "route" => route = Some(value.to_owned()),
                    "method" => method = Some(value.to_owned()),
                    _ => {}
                }
            }
            if let (Some(le), Some(route), Some(method)) = (le, route, method) {
                if !le.is_nan() {
                    histograms.buckets.entry((route, method)).or_default().push((le, count as u64));
                }
            }
        }
        for buckets in histograms.buckets.values_mut() {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        histograms
    }

    /// The region's histograms now (`GET /metrics` with an API key).
    pub async fn scrape(api: &crate::api::Api) -> Result<RouteHistograms> {
        let response = api.request(reqwest::Method::GET, metalrack_api::paths::METRICS).send().await?;
        let text = response.error_for_status().context("GET /metrics")?.text().await?;
        Ok(RouteHistograms::parse(&text))
    }

    /// The requests counted since `before` (an earlier scrape of the same region).
    pub fn since(&self, before: &RouteHistograms) -> RouteHistograms {
        let mut buckets = self.buckets.clone();
        for (key, now) in &mut buckets {
            let Some(then) = before.buckets.get(key) else { continue };
            for (bound, count) in now.iter_mut() {
                let earlier = then.iter().find(|(b, _)| b == bound).map_or(0, |(_, c)| *c);
                *count = count.saturating_sub(earlier);
            }
        }
        RouteHistograms { buckets }
    }

    /// Requests of `route` and `method` counted.
    pub fn count(&self, route: &str, method: &str) -> u64 {
        self.get(route, method).and_then(|b| b.last()).map_or(0, |(_, c)| *c)
    }

    /// The smallest bucket bound that at least `q` (0 < q ≤ 1) of the requests of `route` and
    /// `method` came in under: "p99 ≤ 10 ms", exact to the bucket (no interpolation). None
    /// without requests.
    pub fn quantile_bound(&self, route: &str, method: &str, q: f64) -> Option<Duration> {
        let buckets = self.get(route, method)?;
        let total = buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let needed = (q * total as f64).ceil() as u64;
        let (bound, _) = buckets.iter().find(|(_, count)| *count >= needed)?;
        Some(if bound.is_finite() { Duration::from_secs_f64(*bound) } else { Duration::MAX })
    }

    /// Every (route, method) seen, in order.
    pub fn routes(&self) -> Vec<(String, String)> {
        self.buckets.keys().cloned().collect()
    }

    fn get(&self, route: &str, method: &str) -> Option<&Vec<(f64, u64)>> {
        self.buckets.get(&(route.to_owned(), method.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# TYPE metalrack_region_http_request_duration_seconds histogram\n\
metalrack_region_http_request_duration_seconds_bucket{le=\"0.005\",route=\"/MAAS/api/v1/machines\",method=\"GET\"} 90\n\
metalrack_region_http_request_duration_seconds_bucket{le=\"0.01\",route=\"/MAAS/api/v1/machines\",method=\"GET\"} 98\n\
metalrack_region_http_request_duration_seconds_bucket{le=\"0.025\",route=\"/MAAS/api/v1/machines\",method=\"GET\"} 100\n\
metalrack_region_http_request_duration_seconds_bucket{le=\"+Inf\",route=\"/MAAS/api/v1/machines\",method=\"GET\"} 100\n\
metalrack_region_http_request_duration_seconds_sum{route=\"/MAAS/api/v1/machines\",method=\"GET\"} 0.4\n\
metalrack_region_http_requests_total{route=\"/MAAS/api/v1/machines\",method=\"GET\",status=\"200\"} 100\n";

    #[test]
    fn the_regions_histogram_gives_each_quantile_as_the_bucket_it_falls_in() {
        let histograms = RouteHistograms::parse(SCRAPE);
        let route = "/MAAS/api/v1/machines";
        assert_eq!(histograms.count(route, "GET"), 100);
        assert_eq!(histograms.quantile_bound(route, "GET", 0.5), Some(Duration::from_millis(5)));
        assert_eq!(histograms.quantile_bound(route, "GET", 0.98), Some(Duration::from_millis(10)));
        assert_eq!(histograms.quantile_bound(route, "GET", 0.99), Some(Duration::from_millis(25)));
        assert_eq!(histograms.quantile_bound(route, "POST", 0.99), None);
    }

    #[test]
    fn a_window_of_the_regions_histogram_counts_only_the_requests_since_the_first_scrape() {
        let before = RouteHistograms::parse(SCRAPE);
        let later = SCRAPE.replace("} 90", "} 190").replace("} 98", "} 198").replace("} 100\n", "} 300\n");
        let window = RouteHistograms::parse(&later).since(&before);
        let route = "/MAAS/api/v1/machines";
        // 200 more: 100 under 5 ms, 100 between 10 and 25 ms.
        assert_eq!(window.count(route, "GET"), 200);
        assert_eq!(window.quantile_bound(route, "GET", 0.5), Some(Duration::from_millis(5)));
        assert_eq!(window.quantile_bound(route, "GET", 0.51), Some(Duration::from_millis(25)));
    }

    fn millis(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn percentile_is_the_nearest_rank() {
        let samples = millis(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_millis(100));
        // 1,000 samples: p99 is the 990th, so the 10 slowest lie above it.
        let samples = millis(&(1..=1000).collect::<Vec<_>>());
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(990));
    }

    #[test]
    fn percentile_of_few_samples_is_a_measured_one() {
        assert_eq!(percentile::<Duration>(&[], 99.0), Duration::ZERO);
        assert_eq!(percentile(&millis(&[7]), 50.0), Duration::from_millis(7));
        assert_eq!(percentile(&millis(&[7]), 99.0), Duration::from_millis(7));
        // Of ten, p99 is the slowest and p50 the fifth.
        let samples = millis(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 500]);
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(500));
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(5));
        assert_eq!(percentile(&samples, 10.0), Duration::from_millis(1));
    }

    #[test]
    #[should_panic(expected = "a percentile is in (0, 100]")]
    fn percentile_refuses_zero() {
        percentile(&millis(&[1]), 0.0);
    }

    #[test]
    fn failures_are_counted_at_their_time_and_named() {
        let mut samples = Samples::default();
        samples.add(Duration::from_millis(3), None);
        samples.add(Duration::from_millis(900), Some(anyhow::anyhow!("503 Service Unavailable")));
        samples.add(Duration::from_millis(5), None);
        let summary = samples.summary("GET /x");
        assert_eq!((summary.count, summary.errors), (3, 1));
        assert_eq!(summary.first_error.as_deref(), Some("503 Service Unavailable"));
        assert_eq!(summary.p50, Duration::from_millis(5));
        assert_eq!(summary.max, Duration::from_millis(900));
    }

    /// A real HTTP server on port 0: `/ok` answers 200, anything else 404. Its address.
    async fn ok_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buffer = vec![0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut buffer).await else { return };
                        if n == 0 {
                            return;
                        }
                        let ok = buffer[..n].starts_with(b"GET /ok ");
                        let answer: &[u8] = if ok {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        } else {
                            b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nnope"
                        };
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn a_sampler_samples_a_real_server_at_its_interval_and_counts_refusals() {
        let address = ok_server().await;
        let http = reqwest::Client::new();
        let (ok_client, missing_client) = (http.clone(), http);
        let report = LatencySampler::new(Duration::from_millis(20))
            .probe("ok", move || ok_client.get(format!("http://{address}/ok")))
            .probe("missing", move || missing_client.get(format!("http://{address}/missing")))
            .run_for(Duration::from_millis(500))
            .await;
        let ok = report.get("ok").unwrap();
        // 25 rounds in 500 ms at best; a loaded machine may manage fewer.
        assert!((5..=26).contains(&ok.count), "{report}");
        assert_eq!(ok.errors, 0, "{report}");
        assert!(ok.p50 <= ok.p99 && ok.p99 <= ok.max && ok.max > Duration::ZERO, "{report}");
        let missing = report.get("missing").unwrap();
        assert_eq!(missing.errors, missing.count, "every 404 is an error: {report}");
        assert!(missing.first_error.as_deref().unwrap().starts_with("404"), "{report}");
        assert_eq!(report.failures().len(), 1);
        assert!(report.to_string().contains("| ok | "));
        assert!(report.reference.is_none() && ok.steal.is_none(), "neither unless asked: {report:?}");
    }

    #[tokio::test]
    async fn asked_to_the_sampler_times_reference_work_each_round_and_splits_samples_by_steal() {
        let address = ok_server().await;
        let http = reqwest::Client::new();
        let report = LatencySampler::new(Duration::from_millis(20))
            .probe("ok", move || http.get(format!("http://{address}/ok")))
            .reference_work()
            .watch_steal(0)
            .run_for(Duration::from_millis(500))
            .await;
        let ok = report.get("ok").unwrap();
        let reference = report.reference.as_ref().expect("the reference's row");
        assert_eq!(reference.count, ok.count, "one reference per round: {report:?}");
        assert!(reference.p50 > Duration::ZERO && reference.p50 <= reference.p99, "{report:?}");
        assert!(report.to_string().contains(REFERENCE_WORK), "{report}");
        let steal = ok.steal.expect("cpu0's steal is watched");
        assert!(steal.hit <= ok.count, "{steal:?}");
        if steal.hit < ok.count {
            // The clean samples are some of all: their median and p99 lie within all samples'.
            assert!(steal.clean_p50 > Duration::ZERO && steal.clean_p99 <= ok.max, "{steal:?}: {report:?}");
            // In units of the reference's time: the clean p99 over a reference time the sampler
            // measured, so between the quotients by the slowest and the fastest reference.
            let relative = steal.clean_relative_p99.expect("with reference work");
            let (slowest, fastest) = (reference.max.as_secs_f64(), reference.p50.as_secs_f64() / 100.0);
            assert!(relative > 0.0 && relative <= ok.max.as_secs_f64() / fastest, "{relative}: {report:?}");
            assert!(relative >= steal.clean_p50.as_secs_f64() / slowest / 100.0, "{relative}: {report:?}");
        }
    }

    #[test]
    fn the_steal_time_is_the_eighth_number_of_the_cpus_line() {
        let stat = "cpu  2990214 70492 776469 3004301 78970 0 200197 196709 0 0\n\
                    cpu0 1537108 27715 413079 1451115 21757 0 112499 91651 0 0\n\
                    cpu1 1453106 42777 363389 1553186 57212 0 87697 105057 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(steal_ticks_of(stat, 0), Some(91651));
        assert_eq!(steal_ticks_of(stat, 1), Some(105057));
        assert_eq!(steal_ticks_of(stat, 2), None);
        assert!(cpu_steal_ticks(0).is_some(), "this machine's /proc/stat has cpu0");
    }

    #[test]
    fn the_reference_work_is_the_same_on_every_call() {
        assert_eq!(reference_work(), reference_work());
        assert!(reference_work() > 2048);
    }
}
