//! Turns the table's purge decisions into JetStream purges, in batches.
//!
//! Purging per acknowledgement would cost one request per ack; batching every interval coalesces a
//! user's acks into one purge per interval. Concurrency is bounded so a large backlog (after a
//! start, when every user is purged once) cannot flood the server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt;
use protocol::subjects;
use tokio::sync::watch;

use crate::cursors::{CursorTable, PurgeAction};
use crate::history::HistorySettings;
use crate::metrics::Metrics;
use crate::watcher::lock;

/// Purge settings, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct PurgeConfig {
    pub interval: Duration,
    pub concurrency: usize,
    /// Devices silent for longer are forgotten (the bucket's max age).
    pub cursor_max_age: Duration,
}

/// Most purges taken from the table per batch; the rest wait for the next batch, so one batch
/// stays short and shutdown stays prompt.
const BATCH_LIMIT: usize = 4096;
/// How often stale devices are aged out of the table.
const EXPIRE_EVERY: Duration = Duration::from_secs(30);
/// Longest pause after failing batches (NATS down): keeps retries from spinning.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the last batch at shutdown may take.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Runs batches until `shutdown` turns true, then finishes the batch in progress and flushes what
/// is pending once more (bounded in time).
pub async fn run(
    js: jetstream::Context,
    table: Arc<Mutex<CursorTable>>,
    metrics: Metrics,
    cfg: PurgeConfig,
    history: Arc<HistorySettings>,
    mut shutdown: watch::Receiver<bool>,
) {
    // No info request: the handle only names the stream, which may not exist yet.
    let inbox = match js.get_stream_no_info(subjects::INBOX_STREAM).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "invalid INBOX stream name; purging disabled");
            return;
        }
    };
    let mut last_expire = Instant::now();
    let mut pause = cfg.interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        if last_expire.elapsed() >= EXPIRE_EVERY {
            last_expire = Instant::now();
            expire(&table, cfg.cursor_max_age);
        }
        let b = batch(&js, &inbox, &table, &metrics, &history, cfg.concurrency).await;
        pause = if b.failed { (pause * 2).clamp(cfg.interval, MAX_BACKOFF.max(cfg.interval)) } else { cfg.interval };
    }
    let flush = async {
        loop {
            let b = batch(&js, &inbox, &table, &metrics, &history, cfg.concurrency).await;
            if b.taken == 0 || b.failed {
                break;
            }
        }
    };
    if tokio::time::timeout(FINAL_FLUSH, flush).await.is_err() {
        tracing::warn!("final purge batch did not finish in time");
    }
}

fn expire(table: &Mutex<CursorTable>, max_age: Duration) {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let cutoff = now_ms.saturating_sub(max_age.as_millis() as u64);
    let n = lock(table).expire(cutoff);
    if n > 0 {
        tracing::info!(devices = n, "forgot devices whose cursor expired");
    }
}

struct BatchOutcome {
    /// Purges attempted.
    taken: usize,
    /// Whether any of them failed.
    failed: bool,
}

/// One batch of purges.
async fn batch(
    js: &jetstream::Context,
    inbox: &Stream<()>,
    table: &Mutex<CursorTable>,
    metrics: &Metrics,
    history: &HistorySettings,
    concurrency: usize,
) -> BatchOutcome {
    let actions = {
        let mut t = lock(table);
        metrics.tracked_devices.set(t.tracked_devices() as i64);
        t.take_purges(BATCH_LIMIT)
    };
    let taken = actions.len();
    if taken == 0 {
        return BatchOutcome { taken, failed: false };
    }
    let results: Vec<(PurgeAction, bool)> = futures::stream::iter(actions)
        .map(|a| async move {
            let ok = purge(js, inbox, &a, metrics, history.days(a.user.as_str())).await;
            (a, ok)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut failed = false;
    let mut t = lock(table);
    for (a, ok) in &results {
        if !ok {
            failed = true;
            t.purge_failed(a);
        }
    }
    BatchOutcome { taken, failed }
}

/// Removes every message of `inbox.<user>` with a sequence up to and including `up_to`, after
/// moving its conversation items into the user's history when the user keeps one.
async fn purge(
    js: &jetstream::Context,
    inbox: &Stream<()>,
    a: &PurgeAction,
    metrics: &Metrics,
    history_days: u32,
) -> bool {
    let started = Instant::now();
    if history_days > 0 {
        if let Err(e) = crate::history::archive(js, &a.user, a.up_to, history_days, metrics).await {
            metrics.purge_errors.inc();
            tracing::warn!(user = %a.user, error = %format!("{e:#}"), "moving items to history failed; will retry");
            return false;
        }
    }
    // `seq` keeps messages with a sequence >= seq.
    let res = inbox.purge().filter(subjects::inbox(&a.user)).sequence(a.up_to.saturating_add(1)).await;
    metrics.purge_seconds.observe(started.elapsed().as_secs_f64());
    match res {
        Ok(r) => {
            metrics.purges.inc();
            metrics.purged_messages.inc_by(r.purged);
            tracing::debug!(user = %a.user, up_to = a.up_to, purged = r.purged, "purged inbox");
            true
        }
        Err(e) => {
            metrics.purge_errors.inc();
            tracing::warn!(user = %a.user, up_to = a.up_to, error = %e, "inbox purge failed; will retry");
            false
        }
    }
}
