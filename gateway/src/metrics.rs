//! The gateway's Prometheus metrics. Counters are shared atomics (cheap at two to a few dozen
//! cores); process memory is read from /proc when scraped, so memory per connection is
//! `gateway_resident_memory_bytes / gateway_connections_open`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::registry::{Registry, Unit};
use telemetry::{exponential, ShardedHistogram};

type Labels = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

pub struct Metrics {
    registry: Registry,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    connections_closed: Family<Labels, Counter>,
    handshake_failures: Family<Labels, Counter>,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub frame_errors: Family<Labels, Counter>,
    pub messages_published: Counter,
    pub messages_duplicate: Counter,
    pub publish_errors: Counter,
    pub publish_ack_seconds: ShardedHistogram,
    items_delivered: Family<Labels, Counter>,
    pub send_to_deliver_seconds: ShardedHistogram,
    pub acks: Counter,
    pub receipts_published: Counter,
    pub cursor_writes: Counter,
    pub drain_items: ShardedHistogram,
    pub drain_seconds: ShardedHistogram,
    pub resyncs: Counter,
    pub nats_reconnects: Counter,
    pub nats_slow_consumers: Counter,
    pub live_subscriptions: Gauge,
    pub live_mux_connected: Gauge,
    pub live_mux_reconnects: Counter,
    live_mux_errors: Family<Labels, Counter>,
    pub live_copies_dropped: Counter,
    pub presence_pushes: Counter,
    pub typing_events: Counter,
    pub typing_dropped: Counter,
    rate_limited: Family<Labels2, Counter>,
    /// Users with per-user limit state on this process (kept up to date by `UserLimits`).
    pub rate_limit_users: Gauge,
    resident: Gauge,
    /// Time each executor spent running tasks, µs (its own slot; summed by nobody).
    executor_busy_us: Box<[AtomicU64]>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 50 µs .. ~3.3 s
    exponential(0.00005, 2.0, 17)
}

impl Metrics {
    /// `executors` executors record into shards 0..executors; the bridge thread into the last.
    pub fn new(gateway_id: &str, executors: usize) -> Self {
        let mut registry = Registry::default();
        let shards = executors + 1;
        let m = Metrics {
            publish_ack_seconds: ShardedHistogram::new(
                "gateway_publish_ack_seconds",
                "Time from publish to JetStream's PubAck",
                latency_buckets(),
                shards,
            ),
            send_to_deliver_seconds: ShardedHistogram::new(
                "gateway_send_to_deliver_seconds",
                "Time from the sender's gateway accepting a message to its delivery here (ms clock resolution)",
                latency_buckets(),
                shards,
            ),
            drain_items: ShardedHistogram::new(
                "gateway_inbox_drain_items",
                "Items sent per inbox drain",
                exponential(1.0, 4.0, 10),
                shards,
            ),
            drain_seconds: ShardedHistogram::new(
                "gateway_inbox_drain_seconds",
                "Duration of inbox drains",
                latency_buckets(),
                shards,
            ),
            executor_busy_us: (0..executors).map(|_| AtomicU64::new(0)).collect(),
            connections_open: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_closed: Family::default(),
            handshake_failures: Family::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            frame_errors: Family::default(),
            messages_published: Counter::default(),
            messages_duplicate: Counter::default(),
            publish_errors: Counter::default(),
            items_delivered: Family::default(),
            acks: Counter::default(),
            receipts_published: Counter::default(),
            cursor_writes: Counter::default(),
            resyncs: Counter::default(),
            nats_reconnects: Counter::default(),
            nats_slow_consumers: Counter::default(),
            live_subscriptions: Gauge::default(),
            live_mux_connected: Gauge::default(),
            live_mux_reconnects: Counter::default(),
            live_mux_errors: Family::default(),
            live_copies_dropped: Counter::default(),
            presence_pushes: Counter::default(),
            typing_events: Counter::default(),
            typing_dropped: Counter::default(),
            rate_limited: Family::default(),
            rate_limit_users: Gauge::default(),
            resident: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("gateway_connections_open", "Open WebSocket connections", m.connections_open.clone());
        r.register("gateway_connections_accepted", "Accepted TCP connections", m.connections_accepted.clone());
        r.register("gateway_connections_closed", "Closed connections by reason", m.connections_closed.clone());
        r.register("gateway_handshake_failures", "Refused or failed handshakes by cause", m.handshake_failures.clone());
        r.register("gateway_frames_in", "Frames received from clients", m.frames_in.clone());
        r.register("gateway_frames_out", "Frames sent to clients", m.frames_out.clone());
        r.register("gateway_frame_errors", "Client frames answered with an error, by code", m.frame_errors.clone());
        r.register(
            "gateway_messages_published",
            "Messages stored in JetStream for clients",
            m.messages_published.clone(),
        );
        r.register(
            "gateway_messages_duplicate",
            "Sends that were retries of stored messages",
            m.messages_duplicate.clone(),
        );
        r.register("gateway_publish_errors", "Publishes JetStream did not acknowledge", m.publish_errors.clone());
        r.register(
            "gateway_items_delivered",
            "Inbox items written to clients, by path (live or inbox)",
            m.items_delivered.clone(),
        );
        r.register("gateway_acks", "Delivery acks received", m.acks.clone());
        r.register("gateway_receipts_published", "Delivery receipts stored for senders", m.receipts_published.clone());
        r.register("gateway_cursor_writes", "Device cursor writes to the KV bucket", m.cursor_writes.clone());
        r.register(
            "gateway_resyncs",
            "Connections resynced from the inbox after a gap in the live path",
            m.resyncs.clone(),
        );
        r.register("gateway_nats_reconnects", "Reconnections to NATS", m.nats_reconnects.clone());
        r.register("gateway_nats_slow_consumers", "Slow consumer events from NATS", m.nats_slow_consumers.clone());
        r.register(
            "gateway_live_subscriptions",
            "Live NATS subscriptions (one per connected user)",
            m.live_subscriptions.clone(),
        );
        r.register(
            "gateway_live_mux_connected",
            "Whether the live multiplexer's NATS connection is up (1) or down (0)",
            m.live_mux_connected.clone(),
        );
        r.register(
            "gateway_live_mux_reconnects",
            "Reconnections of the live multiplexer's NATS connection (each resubscribes every user, then resyncs)",
            m.live_mux_reconnects.clone(),
        );
        r.register(
            "gateway_live_mux_errors",
            "Live multiplexer errors by kind: connect, protocol (connection dropped), permissions, server (-ERR), message (live copy ignored)",
            m.live_mux_errors.clone(),
        );
        r.register(
            "gateway_live_copies_dropped",
            "Live copies dropped because an executor's event queue was full (its connections resync)",
            m.live_copies_dropped.clone(),
        );
        r.register(
            "gateway_presence_pushes",
            "Presence changes pushed to watching connections",
            m.presence_pushes.clone(),
        );
        r.register("gateway_typing_events", "Typing indicators relayed", m.typing_events.clone());
        r.register("gateway_typing_dropped", "Typing indicators dropped by the rate limit", m.typing_dropped.clone());
        r.register(
            "gateway_rate_limited",
            "Client requests refused by a rate limit, by scope (connection, user) and kind (messages, ops, typing; \
             connections: upgrades refused by the per-user connection cap)",
            m.rate_limited.clone(),
        );
        r.register(
            "gateway_rate_limit_users",
            "Users with per-user rate-limit state here: online on this gateway, or left in the last 2 s",
            m.rate_limit_users.clone(),
        );
        r.register_with_unit(
            "gateway_resident_memory",
            "Resident set size of the process",
            Unit::Bytes,
            m.resident.clone(),
        );
        // Every series of the rate limits exists from the start (at 0), so rates and alerts see
        // the first refusal as an increase.
        for (scope, kinds) in [
            ("connection", &["messages", "ops", "typing"][..]),
            ("user", &["messages", "ops", "typing", "connections"][..]),
        ] {
            for kind in kinds {
                let _ = m.rate_limited.get_or_create(&[("scope", scope), ("kind", kind)]);
            }
        }
        let info = prometheus_client::metrics::info::Info::new([("gateway_id", gateway_id.to_owned())]);
        r.register("gateway_build", "Gateway identity", info);
        Metrics { registry, ..m }
    }

    pub fn closed(&self, reason: &'static str) {
        self.connections_closed.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn handshake_failed(&self, cause: &'static str) {
        self.handshake_failures.get_or_create(&[("cause", cause)]).inc();
    }

    pub fn frame_error(&self, code: &'static str) {
        self.frame_errors.get_or_create(&[("code", code)]).inc();
    }

    /// A request refused by the `scope` limit of `kind`.
    pub fn rate_limited(&self, scope: &'static str, kind: &'static str) {
        self.rate_limited.get_or_create(&[("scope", scope), ("kind", kind)]).inc();
    }

    pub fn live_mux_error(&self, kind: &'static str) {
        self.live_mux_errors.get_or_create(&[("kind", kind)]).inc();
    }

    pub fn delivered(&self, path: &'static str) {
        self.items_delivered.get_or_create(&[("path", path)]).inc();
    }

    /// The shard of the bridge thread.
    pub fn bridge_shard(&self) -> usize {
        self.executor_busy_us.len()
    }

    /// Adds time executor `id` spent running tasks.
    pub fn executor_busy(&self, id: usize, busy: std::time::Duration) {
        if let Some(c) = self.executor_busy_us.get(id) {
            c.fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
        }
    }

    pub fn render(&self) -> String {
        let resident = resident_bytes();
        self.resident.set(resident as i64);
        let mut out = telemetry::encode_registry(&self.registry);
        for h in [&self.publish_ack_seconds, &self.send_to_deliver_seconds, &self.drain_items, &self.drain_seconds] {
            h.encode(&mut out);
        }
        let _ = writeln!(out, "# HELP gateway_executor_busy_seconds_total Time each executor spent running tasks");
        let _ = writeln!(out, "# TYPE gateway_executor_busy_seconds_total counter");
        for (i, c) in self.executor_busy_us.iter().enumerate() {
            let secs = c.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "gateway_executor_busy_seconds_total{{executor=\"{i}\"}} {secs}");
        }
        let open = self.connections_open.get().max(0) as u64;
        let _ = writeln!(out, "# HELP gateway_memory_per_connection_bytes Resident memory divided by open connections");
        let _ = writeln!(out, "# TYPE gateway_memory_per_connection_bytes gauge");
        let _ = writeln!(out, "gateway_memory_per_connection_bytes {}", resident.checked_div(open).unwrap_or(0));
        out
    }
}

/// Resident set size from /proc/self/statm (pages × page size).
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    pages * page
}
