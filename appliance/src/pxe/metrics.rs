//! Prometheus metrics of the rack's PXE services (prometheus-client's text format on /metrics).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub dhcp_packets: Family<KindLabel, Counter>,
    pub dhcp_dropped: Family<KindLabel, Counter>,
    pub dhcp_leases: Gauge,
    pub tftp_sessions: Counter,
    pub tftp_sessions_active: Gauge,
    pub tftp_bytes: Counter,
    pub tftp_refused: Counter,
    pub tftp_dropped: Family<KindLabel, Counter>,
    pub tftp_failed: Family<KindLabel, Counter>,
    pub tftp_retransmits: Counter,
    pub http_streams: Counter,
    pub http_streams_active: Gauge,
    pub http_bytes: Counter,
    pub http_sendfile_bytes: Counter,
    pub http_readahead_bytes: Counter,
    pub http_stalled: Counter,
    pub http_refused: Family<KindLabel, Counter>,
    pub sync_phase: Family<KindLabel, Gauge>,
    pub boot_events: super::events::EventCounters,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("metalrack_rack");
        let metrics_registry = &mut registry;
        let dhcp_packets = Family::<KindLabel, Counter>::default();
        metrics_registry.register("dhcp_packets", "DHCP packets received, by message type", dhcp_packets.clone());
        let dhcp_dropped = Family::<KindLabel, Counter>::default();
        metrics_registry.register("dhcp_dropped", "DHCP packets dropped, by reason", dhcp_dropped.clone());
        let dhcp_leases = Gauge::default();
        metrics_registry.register("dhcp_leases", "DHCP leases held", dhcp_leases.clone());
        let tftp_sessions = Counter::default();
        metrics_registry.register("tftp_sessions", "TFTP transfers started", tftp_sessions.clone());
        let tftp_sessions_active = Gauge::default();
        metrics_registry.register("tftp_sessions_active", "TFTP transfers running", tftp_sessions_active.clone());
        let tftp_bytes = Counter::default();
        metrics_registry.register("tftp_bytes", "Bytes sent over TFTP", tftp_bytes.clone());
        let tftp_refused = Counter::default();
        metrics_registry.register("tftp_refused", "TFTP requests refused", tftp_refused.clone());
        let tftp_dropped = Family::<KindLabel, Counter>::default();
        metrics_registry.register("tftp_dropped", "Packets to the TFTP port dropped, by reason", tftp_dropped.clone());
        let tftp_failed = Family::<KindLabel, Counter>::default();
        metrics_registry.register("tftp_failed", "TFTP transfers not completed, by reason", tftp_failed.clone());
        let tftp_retransmits = Counter::default();
        metrics_registry.register("tftp_retransmits", "TFTP windows resent after a timeout", tftp_retransmits.clone());
        let http_streams = Counter::default();
        metrics_registry.register("http_streams", "HTTP boot file streams started", http_streams.clone());
        let http_streams_active = Gauge::default();
        metrics_registry.register("http_streams_active", "HTTP boot file streams running", http_streams_active.clone());
        let http_bytes = Counter::default();
        metrics_registry.register("http_bytes", "Bytes sent by HTTP boot", http_bytes.clone());
        let http_sendfile_bytes = Counter::default();
        metrics_registry.register(
            "http_sendfile_bytes",
            "Bytes of HTTP boot bodies sent zero-copy with sendfile",
            http_sendfile_bytes.clone(),
        );
        let http_readahead_bytes = Counter::default();
        metrics_registry.register(
            "http_readahead_bytes",
            "Bytes of HTTP boot files the kernel was asked to read ahead of the sender (not yet in the page cache)",
            http_readahead_bytes.clone(),
        );
        let http_stalled = Counter::default();
        metrics_registry.register(
            "http_stalled",
            "HTTP boot connections reset because the client read nothing for the stall timeout",
            http_stalled.clone(),
        );
        let http_refused = Family::<KindLabel, Counter>::default();
        metrics_registry.register("http_refused", "HTTP boot file requests refused, by reason", http_refused.clone());
        let sync_phase = Family::<KindLabel, Gauge>::default();
        metrics_registry.register("sync_phase", "1 for the image sync's current phase", sync_phase.clone());
        let boot_events = super::events::EventCounters::default();
        metrics_registry.register(
            "boot_events_queued",
            "Boot events queued for the region",
            boot_events.queued.clone(),
        );
        metrics_registry.register("boot_events_sent", "Boot events the region took", boot_events.sent.clone());
        metrics_registry.register(
            "boot_events_dropped",
            "Boot events dropped, by reason (queue_full, refused, unreadable)",
            boot_events.dropped.clone(),
        );
        metrics_registry.register(
            "boot_events_truncated",
            "Boot events with a field cut to the wire's length",
            boot_events.truncated.clone(),
        );
        Metrics {
            registry,
            dhcp_packets,
            dhcp_dropped,
            dhcp_leases,
            tftp_sessions,
            tftp_sessions_active,
            tftp_bytes,
            tftp_refused,
            tftp_dropped,
            tftp_failed,
            tftp_retransmits,
            http_streams,
            http_streams_active,
            http_bytes,
            http_sendfile_bytes,
            http_readahead_bytes,
            http_stalled,
            http_refused,
            sync_phase,
            boot_events,
        }
    }

    pub fn count(family: &Family<KindLabel, Counter>, kind: &str) {
        family.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String works");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
