//! The region's Prometheus metrics: the counters and histograms the HTTP layer and the domains
//! update as things happen, and the gauges the scrape handler (`http/api/metrics.rs`) sets from
//! one grouped query each just before it encodes them. Every label takes its values from a
//! bounded set (route templates, methods, status codes, states, reasons), never from what a
//! client sent, so a scan of random paths cannot grow the registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Prefix of every metric the region exports (the rack's are `metalrack_rack_*`).
pub const METRICS_PREFIX: &str = "metalrack_region";

/// The route label of a request no route matched (unknown paths, scans): all of them share it,
/// so they cost one series, not one per path.
pub const ROUTE_UNMATCHED: &str = "unmatched";

/// Upper bounds of the request latency buckets, in seconds: 1 ms to 60 s, the longest a
/// long-poll is held (`metalrack_api::limits`), so held polls land in a bucket of their own
/// instead of `+Inf`. 16 buckets × routes (~60) × methods actually used: a few thousand series.
pub const LATENCY_BUCKETS_S: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0];

/// A request as counted: its route template, method and status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: &'static str,
    pub status: u16,
}

/// A request's latency is kept per route and method (the status would multiply the buckets).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_S)
}

/// The region's metrics; one per process, shared through `Shared`.
#[derive(Debug)]
pub struct RegionMetrics {
    registry: Registry,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_request_duration: HistogramFamily,
    pub http_requests_in_flight: Gauge,
    pub long_polls_held: Gauge,
    pub racks: Family<StateLabel, Gauge>,
    pub machines: Family<StateLabel, Gauge>,
    pub deploys_in_progress: Gauge,
    pub deploys_waiting: Gauge,
    pub heartbeats: Counter,
    pub heartbeat_flushes: Counter,
    pub heartbeats_flushed: Counter,
    pub boot_events_received: Counter,
    pub boot_events_stored: Counter,
    pub events_dropped: Family<ReasonLabel, Counter>,
    pub events_trimmed: Gauge,
    pub db_connections: Family<StateLabel, Gauge>,
    pub db_connections_closed_in_transaction: Counter,
    /// One scrape at a time: each sets the scrape-time gauges and then encodes them.
    pub scrape: tokio::sync::Mutex<()>,
}

impl RegionMetrics {
    pub fn new() -> RegionMetrics {
        let mut registry = Registry::with_prefix(METRICS_PREFIX);
        let r = &mut registry;
        let http_requests = Family::<RequestLabels, Counter>::default();
        r.register(
            "http_requests",
            "HTTP requests answered, by route template (unmatched for unknown paths), method and status code",
            http_requests.clone(),
        );
        let http_request_duration = HistogramFamily::new_with_constructor(latency_histogram);
        r.register(
            "http_request_duration_seconds",
            "Time from a request's routing to its response head, by route template and method",
            http_request_duration.clone(),
        );
        let http_requests_in_flight = Gauge::default();
        r.register(
            "http_requests_in_flight",
            "Requests holding a handler slot now (long-polls apart)",
            http_requests_in_flight.clone(),
        );
        let long_polls_held = Gauge::default();
        r.register("long_polls_held", "Racks' catalogue and power long-polls held now", long_polls_held.clone());
        let racks = Family::<StateLabel, Gauge>::default();
        r.register("racks", "Registered racks, by state", racks.clone());
        let machines = Family::<StateLabel, Gauge>::default();
        r.register("machines", "Machines, by lifecycle state", machines.clone());
        let deploys_in_progress = Gauge::default();
        r.register("deploys_in_progress", "Machines deploying now", deploys_in_progress.clone());
        let deploys_waiting = Gauge::default();
        r.register(
            "deploys_waiting",
            "Machines allocated for a deploy that waits for a slot on its rack",
            deploys_waiting.clone(),
        );
        let heartbeats = Counter::default();
        r.register("heartbeats", "Rack heartbeats recorded", heartbeats.clone());
        let heartbeat_flushes = Counter::default();
        r.register(
            "heartbeat_flushes",
            "Database transactions that wrote buffered rack heartbeats (one per flush interval with any pending; \
             a rack's first heartbeat after being offline is written at once and not counted here)",
            heartbeat_flushes.clone(),
        );
        let heartbeats_flushed = Counter::default();
        r.register(
            "heartbeats_flushed",
            "Rack heartbeats written by those transactions (each rack's latest of the interval)",
            heartbeats_flushed.clone(),
        );
        let boot_events_received = Counter::default();
        r.register(
            "boot_events_received",
            "Boot events racks sent in batches the region accepted (resent ones included)",
            boot_events_received.clone(),
        );
        let boot_events_stored = Counter::default();
        r.register(
            "boot_events_stored",
            "Boot events stored (each rack queue's sequence number once)",
            boot_events_stored.clone(),
        );
        let events_dropped = Family::<ReasonLabel, Counter>::default();
        r.register(
            "events_dropped",
            "Events the region did not keep, by reason: boot_batch_refused (events in a batch refused as \
             invalid; the rack splits it and retries, so one bad event may be counted more than once), \
             record_failed (the event log could not be written)",
            events_dropped.clone(),
        );
        let events_trimmed = Gauge::default();
        r.register(
            "events_trimmed",
            "Events deleted from the log to keep it bounded (ids below the oldest kept), since the database began",
            events_trimmed.clone(),
        );
        let db_connections = Family::<StateLabel, Gauge>::default();
        r.register("db_connections", "Database pool connections, by state (idle, in_use)", db_connections.clone());
        let db_connections_closed_in_transaction = Counter::default();
        r.register(
            "db_connections_closed_in_transaction",
            "Database connections closed (rolling their transaction back) because they came back to their pool \
             inside a transaction: a write aborted inside BEGIN when its client went away",
            db_connections_closed_in_transaction.clone(),
        );
        // Every reason appears from the start, at 0, so a dashboard's rate() has a series.
        for reason in [DROPPED_BOOT_BATCH_REFUSED, DROPPED_RECORD_FAILED] {
            let _ = events_dropped.get_or_create(&ReasonLabel { reason });
        }
        RegionMetrics {
            registry,
            http_requests,
            http_request_duration,
            http_requests_in_flight,
            long_polls_held,
            racks,
            machines,
            deploys_in_progress,
            deploys_waiting,
            heartbeats,
            heartbeat_flushes,
            heartbeats_flushed,
            boot_events_received,
            boot_events_stored,
            events_dropped,
            events_trimmed,
            db_connections,
            db_connections_closed_in_transaction,
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// Counts one answered request.
    pub fn observe_request(&self, route: &str, method: &axum::http::Method, status: u16, seconds: f64) {
        let method = method_label(method);
        self.http_requests.get_or_create(&RequestLabels { route: route.to_owned(), method, status }).inc();
        self.http_request_duration.get_or_create(&RouteLabels { route: route.to_owned(), method }).observe(seconds);
    }

    /// Counts events lost for `reason` (one of the `DROPPED_*` constants).
    pub fn count_dropped(&self, reason: &'static str, n: u64) {
        self.events_dropped.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }

    /// The registry in OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String works");
        out
    }
}

impl Default for RegionMetrics {
    fn default() -> Self {
        RegionMetrics::new()
    }
}

/// `events_dropped` reason: a batch of boot events refused as invalid (422).
pub const DROPPED_BOOT_BATCH_REFUSED: &str = "boot_batch_refused";
/// `events_dropped` reason: an event the region could not write to its log.
pub const DROPPED_RECORD_FAILED: &str = "record_failed";

/// The method as a label: the standard ones by name, anything else as `other` (a client
/// chooses the method, so it cannot be a label as sent).
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_standard_set_fold_into_other() {
        assert_eq!(method_label(&axum::http::Method::GET), "GET");
        assert_eq!(method_label(&axum::http::Method::from_bytes(b"BREW").unwrap()), "other");
    }

    #[test]
    fn a_request_shows_in_the_counter_and_the_histogram_of_its_route() {
        let metrics = RegionMetrics::new();
        metrics.observe_request("/MAAS/api/v1/machines", &axum::http::Method::GET, 200, 0.003);
        let text = metrics.encode();
        assert!(
            text.contains(
                "metalrack_region_http_requests_total{route=\"/MAAS/api/v1/machines\",method=\"GET\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "metalrack_region_http_request_duration_seconds_bucket{le=\"0.005\",route=\"/MAAS/api/v1/machines\",method=\"GET\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("metalrack_region_events_dropped_total{reason=\"record_failed\"} 0"), "{text}");
    }
}
