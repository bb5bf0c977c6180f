//! The router's Prometheus metrics, served by `telemetry` on `--metrics-addr`. Counter names get
//! `_total` from the encoder.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: u32,
}

/// Handles to every metric; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    pub group_entries: Counter,
    pub fanout_deliveries: Counter,
    pub fanout_seconds: Histogram,
    pub fanout_size: Histogram,
    pub rejected: Counter,
    pub fanout_retries: Counter,
    pub ops: Family<OpLabels, Counter>,
    pub consumer_pending: Family<PartitionLabel, Gauge>,
    pub nats_reconnects: Counter,
}

impl Metrics {
    /// The metrics and a registry holding them.
    pub fn new() -> (Self, Registry) {
        let m = Metrics {
            group_entries: Counter::default(),
            fanout_deliveries: Counter::default(),
            // 1 ms .. ~65 s.
            fanout_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            // 1 .. 2048 recipients.
            fanout_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            rejected: Counter::default(),
            fanout_retries: Counter::default(),
            ops: Family::default(),
            consumer_pending: Family::default(),
            nats_reconnects: Counter::default(),
        };
        let mut r = Registry::default();
        r.register(
            "router_group_entries",
            "Group stream entries (posts and membership events) fanned out",
            m.group_entries.clone(),
        );
        r.register(
            "router_fanout_deliveries",
            "Inbox copies stored (or found already stored) by the fan-out",
            m.fanout_deliveries.clone(),
        );
        r.register(
            "router_fanout_seconds",
            "From an entry's timestamp to the PubAcks of all its copies",
            m.fanout_seconds.clone(),
        );
        r.register("router_fanout_size", "Recipients per fanned-out entry", m.fanout_size.clone());
        r.register(
            "router_rejected",
            "Group stream entries dropped: sender not a member at that position, unknown group, malformed",
            m.rejected.clone(),
        );
        r.register(
            "router_fanout_retries",
            "Batches whose publishes failed and that are replayed from the last acknowledged entry",
            m.fanout_retries.clone(),
        );
        r.register("router_ops", "Membership service requests by operation and result", m.ops.clone());
        r.register(
            "router_consumer_pending",
            "Group stream entries not yet delivered to the partition's fan-out consumer",
            m.consumer_pending.clone(),
        );
        r.register(
            "router_nats_reconnects",
            "Reconnections to NATS after the first connection",
            m.nats_reconnects.clone(),
        );
        (m, r)
    }

    pub fn op(&self, op: &'static str, result: &'static str) {
        self.ops.get_or_create(&OpLabels { op, result }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_names() {
        let (m, r) = Metrics::new();
        m.op("add", "ok");
        m.consumer_pending.get_or_create(&PartitionLabel { partition: 3 }).set(7);
        m.fanout_seconds.observe(0.01);
        m.fanout_size.observe(3.0);
        let text = telemetry::encode_registry(&r);
        for name in [
            "router_group_entries_total 0",
            "router_fanout_deliveries_total 0",
            "router_fanout_seconds_bucket",
            "router_fanout_size_bucket",
            "router_rejected_total 0",
            "router_ops_total{op=\"add\",result=\"ok\"} 1",
            "router_consumer_pending{partition=\"3\"} 7",
            "router_nats_reconnects_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
