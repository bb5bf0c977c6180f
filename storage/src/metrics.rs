//! The service's Prometheus metrics. Counter names get `_total` from the encoder.

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

/// Handles to every metric; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    pub cursor_updates: Counter,
    pub cursor_rejects: Counter,
    pub watch_restarts: Counter,
    pub purges: Counter,
    pub history_copies: Counter,
    pub push_consumer_pending: Gauge,
    pub purged_messages: Counter,
    pub expired_undelivered: Counter,
    pub purge_errors: Counter,
    pub purge_seconds: Histogram,
    pub tracked_devices: Gauge,
    pub inbox_messages: Gauge,
    pub inbox_bytes: Gauge,
    pub nats_reconnects: Counter,
    /// By `kind`: sent, delivered, read, invalid.
    pub receipt_events: Family<Labels, Counter>,
    /// By `status`: delivered, read.
    pub group_receipts_emitted: Family<Labels, Counter>,
    pub group_receipt_duplicates: Counter,
    pub group_receipt_errors: Counter,
    pub receipt_entries: Gauge,
    pub receipt_evictions: Counter,
    pub receipt_queries: Counter,
    pub receipt_consumer_restarts: Counter,
    pub push_events: Counter,
    /// By `reason`: online, debounced.
    pub push_suppressed: Family<Labels, Counter>,
    pub push_tracked_users: Gauge,
    pub push_evictions: Counter,
    pub push_online_records: Gauge,
    pub push_gateways: Gauge,
    pub push_restarts: Counter,
}

impl Metrics {
    /// The metrics and a registry holding them.
    pub fn new() -> (Self, Registry) {
        let m = Metrics {
            cursor_updates: Counter::default(),
            cursor_rejects: Counter::default(),
            watch_restarts: Counter::default(),
            purges: Counter::default(),
            history_copies: Counter::default(),
            push_consumer_pending: Gauge::default(),
            purged_messages: Counter::default(),
            expired_undelivered: Counter::default(),
            purge_errors: Counter::default(),
            // 0.5 ms .. ~8 s.
            purge_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            tracked_devices: Gauge::default(),
            inbox_messages: Gauge::default(),
            inbox_bytes: Gauge::default(),
            nats_reconnects: Counter::default(),
            receipt_events: Family::default(),
            group_receipts_emitted: Family::default(),
            group_receipt_duplicates: Counter::default(),
            group_receipt_errors: Counter::default(),
            receipt_entries: Gauge::default(),
            receipt_evictions: Counter::default(),
            receipt_queries: Counter::default(),
            receipt_consumer_restarts: Counter::default(),
            push_events: Counter::default(),
            push_suppressed: Family::default(),
            push_tracked_users: Gauge::default(),
            push_evictions: Counter::default(),
            push_online_records: Gauge::default(),
            push_gateways: Gauge::default(),
            push_restarts: Counter::default(),
        };
        let mut r = Registry::default();
        r.register(
            "storage_cursor_updates",
            "Changes of the cursors bucket seen (puts, deletes, purges)",
            m.cursor_updates.clone(),
        );
        r.register(
            "storage_cursor_rejects",
            "Cursor changes ignored because the key or value was malformed",
            m.cursor_rejects.clone(),
        );
        r.register(
            "storage_watch_restarts",
            "Times the cursors watch was re-created and the cursor table rebuilt",
            m.watch_restarts.clone(),
        );
        r.register("storage_purges", "Inbox purges of acknowledged messages that succeeded", m.purges.clone());
        r.register(
            "storage_push_consumer_pending",
            "INBOX items not yet read by the push-notifier consumer (its lag)",
            m.push_consumer_pending.clone(),
        );
        r.register(
            "storage_purged_messages",
            "Inbox messages removed because every device of their user acknowledged them",
            m.purged_messages.clone(),
        );
        r.register(
            "storage_inbox_expired_undelivered",
            "Inbox messages dropped undelivered at the inbox max age (derived: removals not made by purges)",
            m.expired_undelivered.clone(),
        );
        r.register(
            "storage_history_copies",
            "Delivered items moved into the history of users who opted in",
            m.history_copies.clone(),
        );
        r.register("storage_purge_errors", "Inbox purges that failed (they are retried)", m.purge_errors.clone());
        r.register("storage_purge_seconds", "Latency of one inbox purge request", m.purge_seconds.clone());
        r.register("storage_tracked_devices", "Devices whose cursor is held in memory", m.tracked_devices.clone());
        r.register("storage_inbox_messages", "Messages stored in the INBOX stream", m.inbox_messages.clone());
        r.register("storage_inbox_bytes", "Bytes stored in the INBOX stream", m.inbox_bytes.clone());
        r.register(
            "storage_nats_reconnects",
            "Reconnections to NATS after the first connection",
            m.nats_reconnects.clone(),
        );
        r.register(
            "storage_receipt_events",
            "Group receipt events consumed from RECEIPTS, by kind (sent, delivered, read, invalid)",
            m.receipt_events.clone(),
        );
        r.register(
            "storage_group_receipts_emitted",
            "Aggregate group receipt ticks stored in a sender's inbox, by status",
            m.group_receipts_emitted.clone(),
        );
        r.register(
            "storage_group_receipt_duplicates",
            "Aggregate ticks JetStream dropped as duplicates (already stored, e.g. re-emitted by a rebuild)",
            m.group_receipt_duplicates.clone(),
        );
        r.register(
            "storage_group_receipt_errors",
            "Aggregate ticks given up after repeated publish failures",
            m.group_receipt_errors.clone(),
        );
        r.register(
            "storage_receipt_entries",
            "Group messages whose receipts are pending (not yet read by every recipient)",
            m.receipt_entries.clone(),
        );
        r.register(
            "storage_receipt_evictions",
            "Pending group messages dropped before everyone read them (entry cap or max age)",
            m.receipt_evictions.clone(),
        );
        r.register("storage_receipt_queries", "Who-read queries received", m.receipt_queries.clone());
        r.register(
            "storage_receipt_consumer_restarts",
            "Times the RECEIPTS consumer was re-created",
            m.receipt_consumer_restarts.clone(),
        );
        r.register("storage_push_events", "Push notification events published on push.<user>", m.push_events.clone());
        r.register(
            "storage_push_suppressed",
            "Pushable inbox items that caused no event of their own, by reason (online: the user has a live \
             device; debounced: counted for the user's next event)",
            m.push_suppressed.clone(),
        );
        r.register(
            "storage_push_tracked_users",
            "Users with a push event in their current debounce window",
            m.push_tracked_users.clone(),
        );
        r.register(
            "storage_push_evictions",
            "Users dropped from push debouncing for the --push-max-users cap (their counted items are not announced)",
            m.push_evictions.clone(),
        );
        r.register(
            "storage_push_online_records",
            "Presence records saying online held by the push notifier",
            m.push_online_records.clone(),
        );
        r.register("storage_push_gateways", "Gateway heartbeats held by the push notifier", m.push_gateways.clone());
        r.register(
            "storage_push_restarts",
            "Times the push notifier re-created its watches and INBOX consumer",
            m.push_restarts.clone(),
        );
        (m, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_names() {
        let (m, r) = Metrics::new();
        m.purge_seconds.observe(0.002);
        m.receipt_events.get_or_create(&[("kind", "sent")]).inc();
        m.group_receipts_emitted.get_or_create(&[("status", "read")]).inc();
        m.push_suppressed.get_or_create(&[("reason", "online")]).inc();
        let text = telemetry::encode_registry(&r);
        for name in [
            "storage_cursor_updates_total ",
            "storage_purges_total ",
            "storage_purge_errors_total ",
            "storage_purge_seconds_bucket{",
            "storage_purge_seconds_count ",
            "storage_tracked_devices ",
            "storage_inbox_messages ",
            "storage_inbox_bytes ",
            "storage_nats_reconnects_total ",
            "storage_receipt_events_total{kind=\"sent\"} 1",
            "storage_group_receipts_emitted_total{status=\"read\"} 1",
            "storage_receipt_entries ",
            "storage_receipt_evictions_total ",
            "storage_receipt_queries_total ",
            "storage_push_events_total ",
            "storage_push_suppressed_total{reason=\"online\"} 1",
            "storage_push_tracked_users ",
            "storage_push_evictions_total ",
            "storage_push_online_records ",
            "storage_push_gateways ",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
