//! `storage`: owns the JetStream streams and buckets, removes inbox messages once every device of
//! their user has acknowledged them, and aggregates group receipts.
//!
//! At start it provisions the streams (retrying until NATS answers), then follows the `cursors`
//! bucket ([`watcher`]) into an in-memory table ([`cursors`]) and purges acknowledged messages in
//! batches ([`purger`]). It follows the RECEIPTS stream into a per-message receipt book
//! ([`receipt_book`], [`receipts`]), stores aggregate ticks in senders' inboxes and answers
//! "who read this" queries. It emits push-notification events for pushable items stored for users
//! with no live device ([`push`], [`notifier`]; storage/README.md). Metrics and health are served
//! over HTTP (`telemetry`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cursors;
mod history;
mod metrics;
mod notifier;
mod purger;
mod push;
mod receipt_book;
mod receipts;
mod stats;
mod watcher;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use clap::Parser;
use tokio::sync::{mpsc, watch};

use crate::cursors::CursorTable;
use crate::metrics::Metrics;
use crate::receipt_book::{BookConfig, ReceiptBook};

#[derive(Debug, Parser)]
#[command(name = "storage", about = "Provisions the JetStream streams and purges delivered inbox messages")]
struct Args {
    /// A TOML config file: `[section] key = value` sets the variable SECTION_KEY (flags and the
    /// environment win over it). Also from env CHAT_CONFIG.
    #[arg(long)]
    #[allow(dead_code)] // read by telemetry::apply_config_file before parsing
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    nats: bus::NatsArgs,
    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "STORAGE_METRICS_ADDR", default_value = "127.0.0.1:9201")]
    metrics_addr: SocketAddr,
    /// JetStream replicas of every stream and bucket (1 on a single server, 3 in a cluster).
    #[arg(long, env = "STORAGE_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// How long a retried publish (same message id) is recognised as a duplicate.
    #[arg(long, env = "STORAGE_DUPLICATE_WINDOW_SECS", default_value_t = 120)]
    duplicate_window_secs: u64,
    /// How long an undelivered message stays in an inbox.
    #[arg(long, env = "STORAGE_INBOX_MAX_AGE_SECS", default_value_t = 30 * 24 * 3600)]
    inbox_max_age_secs: u64,
    /// How long a device that stopped acknowledging holds messages in its user's inbox.
    #[arg(long, env = "STORAGE_CURSOR_MAX_AGE_SECS", default_value_t = 30 * 24 * 3600)]
    cursor_max_age_secs: u64,
    /// How often acknowledged messages are purged, in milliseconds.
    #[arg(long, env = "STORAGE_PURGE_INTERVAL_MS", default_value_t = 100)]
    purge_interval_ms: u64,
    /// Purge requests in flight at once.
    #[arg(long, env = "STORAGE_PURGE_CONCURRENCY", default_value_t = 32)]
    purge_concurrency: usize,
    /// How long group stream entries are kept (GROUPS stream max age).
    #[arg(long, env = "STORAGE_GROUP_MAX_AGE_SECS", default_value_t = 24 * 3600)]
    group_max_age_secs: u64,
    /// How long group receipt events are kept (RECEIPTS stream max age); also how long a group
    /// message's receipts are tracked, and so how far back a restart rebuilds them.
    #[arg(long, env = "STORAGE_RECEIPTS_MAX_AGE_SECS", default_value_t = 7 * 24 * 3600)]
    receipts_max_age_secs: u64,
    /// Most group messages whose receipts are tracked at once; the oldest are dropped beyond it.
    #[arg(long, env = "STORAGE_RECEIPT_ENTRIES", default_value_t = 200_000)]
    receipt_entries: usize,
    /// Most fully-read group messages remembered for "who read this" queries (0: none).
    #[arg(long, env = "STORAGE_RECEIPT_DONE_ENTRIES", default_value_t = 100_000)]
    receipt_done_entries: usize,
    /// Publish push-notification events on `push.<user>` for pushable items stored while the
    /// user has no live device (`--push-enabled false` turns it off).
    #[arg(long, env = "STORAGE_PUSH_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    push_enabled: bool,
    /// At most one push event per user per this many seconds (later items are counted into the
    /// next event).
    #[arg(long, env = "STORAGE_PUSH_DEBOUNCE_SECS", default_value_t = 30)]
    push_debounce_secs: u64,
    /// Most users whose push debounce window is tracked at once; the oldest are dropped beyond it.
    #[arg(long, env = "STORAGE_PUSH_MAX_USERS", default_value_t = 1_000_000)]
    push_max_users: usize,
    /// After this long without a heartbeat a gateway is dead and its users count as offline; keep
    /// it equal to the gateways' --presence-timeout-secs.
    #[arg(long, env = "STORAGE_PUSH_PRESENCE_TIMEOUT_SECS", default_value_t = 30)]
    push_presence_timeout_secs: u64,
}

impl Args {
    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=5).contains(&self.replicas) {
            bail!("--replicas must be 1 to 5 (JetStream's limit)");
        }
        for (name, v) in [
            ("--duplicate-window-secs", self.duplicate_window_secs),
            ("--inbox-max-age-secs", self.inbox_max_age_secs),
            ("--cursor-max-age-secs", self.cursor_max_age_secs),
            ("--purge-interval-ms", self.purge_interval_ms),
            ("--purge-concurrency", self.purge_concurrency as u64),
            ("--group-max-age-secs", self.group_max_age_secs),
            ("--receipts-max-age-secs", self.receipts_max_age_secs),
            ("--receipt-entries", self.receipt_entries as u64),
            ("--push-debounce-secs", self.push_debounce_secs),
            ("--push-max-users", self.push_max_users as u64),
            ("--push-presence-timeout-secs", self.push_presence_timeout_secs),
        ] {
            // 0 would mean "unlimited" to JetStream, or a busy loop here.
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.inbox_max_age_secs > 365 * 24 * 3600 {
            bail!("--inbox-max-age-secs is at most a year (31536000)");
        }
        // JetStream refuses a stream whose duplicate window is longer than its max age.
        for (name, v) in
            [("--group-max-age-secs", self.group_max_age_secs), ("--receipts-max-age-secs", self.receipts_max_age_secs)]
        {
            if v < self.duplicate_window_secs {
                bail!("{name} must be at least --duplicate-window-secs ({})", self.duplicate_window_secs);
            }
        }
        Ok(())
    }

    fn book_config(&self) -> BookConfig {
        BookConfig {
            max_entries: self.receipt_entries,
            max_age_ms: self.receipts_max_age_secs.saturating_mul(1000),
            done_capacity: self.receipt_done_entries,
        }
    }

    fn notifier_config(&self) -> notifier::NotifierConfig {
        notifier::NotifierConfig {
            debounce: push::DebounceConfig {
                window_ms: self.push_debounce_secs.saturating_mul(1000),
                max_users: self.push_max_users,
            },
            presence_timeout: Duration::from_secs(self.push_presence_timeout_secs),
        }
    }

    // Every field has a flag today; the update keeps this compiling when bus adds a setting.
    #[allow(clippy::needless_update)]
    fn stream_settings(&self) -> bus::StreamSettings {
        bus::StreamSettings {
            replicas: self.replicas,
            duplicate_window: Duration::from_secs(self.duplicate_window_secs),
            inbox_max_age: Duration::from_secs(self.inbox_max_age_secs),
            cursor_max_age: Duration::from_secs(self.cursor_max_age_secs),
            group_max_age: Duration::from_secs(self.group_max_age_secs),
            receipts_max_age: Duration::from_secs(self.receipts_max_age_secs),
            // Settings without a flag here keep bus's defaults.
            ..bus::StreamSettings::default()
        }
    }
}

fn main() -> anyhow::Result<()> {
    telemetry::apply_config_file()?;
    let args = Args::parse();
    telemetry::init_logging("storage");
    args.validate()?;
    // Storage does little work per event; two threads are plenty and leave cores to NATS.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut stop = std::pin::pin!(telemetry::stop_signal()?);
    let (metrics, registry) = Metrics::new();
    let health = telemetry::serve_registry(args.metrics_addr, registry).await?;

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let client = bus::connect(&args.nats, bus::Role::Storage, "storage", Some(events_tx)).await?;
    let js = jetstream::new(client);
    let settings = args.stream_settings();

    tokio::select! {
        _ = provision_until_ok(&js, &settings) => {}
        _ = &mut stop => {
            tracing::info!("stopped before the streams were provisioned");
            return Ok(());
        }
    }
    health.set_ready(true);
    tracing::info!("streams provisioned; ready");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (reconnects_tx, reconnects_rx) = watch::channel(0u64);
    let table = Arc::new(Mutex::new(CursorTable::new()));
    let connection = tokio::spawn(follow_connection(
        events_rx,
        Connection {
            js: js.clone(),
            settings,
            health: health.clone(),
            metrics: metrics.clone(),
            table: table.clone(),
            reconnects: reconnects_tx,
            shutdown: shutdown_rx.clone(),
        },
    ));
    let stats = tokio::spawn(stats::run(js.clone(), metrics.clone()));
    let watcher = tokio::spawn(watcher::run(
        js.clone(),
        table.clone(),
        metrics.clone(),
        reconnects_rx.clone(),
        shutdown_rx.clone(),
    ));
    let purge_cfg = purger::PurgeConfig {
        interval: Duration::from_millis(args.purge_interval_ms),
        concurrency: args.purge_concurrency,
        cursor_max_age: Duration::from_secs(args.cursor_max_age_secs),
    };
    let receipts = receipts::spawn(
        js.clone(),
        Arc::new(receipts::Shared::new(ReceiptBook::new(args.book_config()))),
        metrics.clone(),
        reconnects_rx.clone(),
        shutdown_rx.clone(),
    );
    let notifier = args.push_enabled.then(|| {
        tokio::spawn(notifier::run(
            js.clone(),
            args.notifier_config(),
            metrics.clone(),
            reconnects_rx.clone(),
            shutdown_rx.clone(),
        ))
    });
    let history = Arc::new(history::HistorySettings::default());
    let history_watch = history::spawn_watch(js.clone(), history.clone());
    let purger = tokio::spawn(purger::run(js, table, metrics, purge_cfg, history, shutdown_rx));

    stop.await;
    tracing::info!("shutting down");
    health.set_ready(false);
    let _ = shutdown_tx.send(true);
    // The purger finishes its batch in flight and flushes once more, within its own time bound.
    let _ = purger.await;
    history_watch.abort();
    let _ = watcher.await;
    // Stops consuming and answering, then publishes the ticks already due (bounded in time).
    let _ = receipts.await;
    if let Some(n) = notifier {
        let _ = n.await;
    }
    connection.abort();
    stats.abort();
    tracing::info!("stopped");
    Ok(())
}

/// Creates or updates the streams, retrying with backoff: NATS may still be starting.
async fn provision_until_ok(js: &jetstream::Context, settings: &bus::StreamSettings) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match bus::provision(js, settings).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    retry_in_ms = backoff.as_millis() as u64,
                    "provisioning failed"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What [`follow_connection`] acts on.
struct Connection {
    js: jetstream::Context,
    settings: bus::StreamSettings,
    health: Arc<telemetry::Health>,
    metrics: Metrics,
    table: Arc<Mutex<CursorTable>>,
    /// Bumped after every reconnection, so the watcher verifies the cursors bucket.
    reconnects: watch::Sender<u64>,
    shutdown: watch::Receiver<bool>,
}

/// Counts reconnects and keeps readiness in line with the connection. While disconnected, purges
/// are held (the watcher releases them once it verified the bucket after the reconnect). After a
/// reconnect the streams are provisioned again: the server may have come back without them.
async fn follow_connection(mut events: mpsc::UnboundedReceiver<async_nats::Event>, c: Connection) {
    // The first `Connected` is the initial connection, already used for provisioning.
    let mut connected_before = false;
    while let Some(ev) = events.recv().await {
        match ev {
            async_nats::Event::Connected => {
                if connected_before {
                    c.metrics.nats_reconnects.inc();
                    provision_until_ok(&c.js, &c.settings).await;
                    c.reconnects.send_modify(|n| *n += 1);
                    if !*c.shutdown.borrow() {
                        c.health.set_ready(true);
                    }
                }
                connected_before = true;
            }
            async_nats::Event::Disconnected => {
                c.health.set_ready(false);
                watcher::lock(&c.table).hold(true);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("storage").chain(extra.iter().copied())).unwrap()
    }

    #[test]
    fn receipt_flags_have_their_defaults_and_reach_the_settings() {
        let a = parse(&[]);
        a.validate().unwrap();
        assert_eq!(a.book_config(), BookConfig::default());
        let s = a.stream_settings();
        assert_eq!(s.receipts_max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(s.group_max_age, Duration::from_secs(24 * 3600));

        let a = parse(&[
            "--receipt-entries",
            "10",
            "--receipts-max-age-secs",
            "3600",
            "--group-max-age-secs",
            "600",
            "--receipt-done-entries",
            "0",
        ]);
        a.validate().unwrap();
        assert_eq!(a.book_config(), BookConfig { max_entries: 10, max_age_ms: 3_600_000, done_capacity: 0 });
        assert_eq!(a.stream_settings().group_max_age, Duration::from_secs(600));
    }

    #[test]
    fn push_flags_have_their_defaults_and_are_validated() {
        let a = parse(&[]);
        assert!(a.push_enabled);
        let c = a.notifier_config();
        assert_eq!(c.debounce, push::DebounceConfig { window_ms: 30_000, max_users: 1_000_000 });
        assert_eq!(c.presence_timeout, Duration::from_secs(30));
        let a = parse(&["--push-enabled", "false", "--push-debounce-secs", "5", "--push-max-users", "7"]);
        a.validate().unwrap();
        assert!(!a.push_enabled);
        assert_eq!(a.notifier_config().debounce, push::DebounceConfig { window_ms: 5_000, max_users: 7 });
        for bad in
            [&["--push-debounce-secs", "0"][..], &["--push-max-users", "0"], &["--push-presence-timeout-secs", "0"]]
        {
            assert!(parse(bad).validate().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn receipt_flags_are_validated() {
        for bad in [
            &["--receipt-entries", "0"][..],
            &["--receipts-max-age-secs", "0"],
            &["--group-max-age-secs", "0"],
            // Shorter than the duplicate window: JetStream would refuse the stream.
            &["--receipts-max-age-secs", "60"],
            &["--group-max-age-secs", "100", "--duplicate-window-secs", "200"],
        ] {
            assert!(parse(bad).validate().is_err(), "{bad:?} accepted");
        }
    }
}
