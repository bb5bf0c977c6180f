//! Follows the `cursors` bucket into the [`CursorTable`].
//!
//! The watch starts with the last value of every key (deliver policy "last per subject") and then
//! follows changes, so the table holds the full current state, not only what changes after start.
//! If the watch fails for good it is re-created after a short backoff and the table is rebuilt
//! from the bucket; until the rebuilt table is complete, no purges are made.
//!
//! A watch survives reconnects and server restarts by itself (the ordered consumer resumes from the
//! last sequence it delivered). It does not notice the bucket being deleted and created again (a
//! server that came back empty and was provisioned anew): it would wait for sequences the new
//! bucket reaches only much later, while the table keeps cursors that mean nothing for the new
//! inboxes, and purging by them would delete undelivered messages. So purges are held from a
//! disconnect until the bucket is verified to be the same one (by its creation time), checked
//! after every reconnect and periodically; a different or missing bucket rebuilds the table.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{
    self,
    consumer::push::{OrderedError, OrderedErrorKind},
    kv,
};
use futures::StreamExt;
use protocol::subjects;
use tokio::sync::watch;

use crate::cursors::{Change, CursorTable};
use crate::metrics::Metrics;

const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the bucket's identity is checked besides after reconnects.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Consecutive "stream not found" answers after which the table is rebuilt.
const MISSING_CHECKS: u32 = 3;

/// Runs until `shutdown` turns true. `reconnects` changes after every reconnection to NATS.
pub async fn run(
    js: jetstream::Context,
    table: Arc<Mutex<CursorTable>>,
    metrics: Metrics,
    mut reconnects: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut loaded = false;
        let res = tokio::select! {
            r = follow(&js, &table, &metrics, &mut reconnects, &mut loaded) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match res {
            Ok(()) => tracing::warn!("cursors watch ended; re-creating it"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "cursors watch failed; re-creating it"),
        }
        metrics.watch_restarts.inc();
        if loaded {
            // It worked for a while: this is a fresh failure, retry soon.
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One watch, from creation until it ends or fails. Sets `loaded` once the bucket was loaded.
async fn follow(
    js: &jetstream::Context,
    table: &Mutex<CursorTable>,
    metrics: &Metrics,
    reconnects: &mut watch::Receiver<u64>,
    loaded: &mut bool,
) -> anyhow::Result<()> {
    let kv = js.get_key_value(subjects::CURSORS_BUCKET).await.context("opening the cursors bucket")?;
    let mut bucket = Bucket::identify(js).await?;
    let mut watch = kv.watch_with_history(">").await.context("watching the cursors bucket")?;
    lock(table).reset();
    tracing::info!("loading cursors");
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconnects_open = true;
    reconnects.mark_unchanged();
    loop {
        // `next` on a stream is cancel-safe: nothing is lost when another branch wins the race.
        let entry = tokio::select! {
            entry = watch.next() => entry,
            _ = check.tick() => {
                bucket.check(js, table).await?;
                continue;
            }
            changed = reconnects.changed(), if reconnects_open => {
                reconnects_open = changed.is_ok();
                bucket.check(js, table).await?;
                continue;
            }
        };
        let Some(entry) = entry else {
            return Ok(());
        };
        let entry = match entry {
            Ok(e) => e,
            Err(e) if is_transient(&e) => {
                // The ordered consumer re-creates itself from where it was (e.g. after a server
                // restart); nothing was lost.
                tracing::info!(error = %e, "cursors watch interrupted; it resumes by itself");
                continue;
            }
            Err(e) => return Err(e).context("reading the cursors watch"),
        };
        metrics.cursor_updates.inc();
        let change = match entry.operation {
            kv::Operation::Put => Change::Put {
                value: &entry.value,
                // When the value was stored: it expires from the bucket that long after.
                at_ms: u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            },
            kv::Operation::Delete | kv::Operation::Purge => Change::Remove,
        };
        let mut t = lock(table);
        if let Err(e) = t.apply(&entry.key, change) {
            metrics.cursor_rejects.inc();
            // The key is an id pair, safe to log; the value is at most a short number.
            tracing::warn!(key = %entry.key.escape_debug(), error = %e, "ignoring cursor");
        }
        // `seen_current`: every value that existed when the watch started was delivered.
        if entry.seen_current && !t.is_synced() {
            t.mark_synced();
            *loaded = true;
            tracing::info!(devices = t.tracked_devices(), "cursors loaded");
        }
    }
}

/// The identity of the bucket the table was built from.
struct Bucket {
    stream: String,
    /// Creation time of the bucket's stream, in ns since the epoch.
    created: i128,
    /// Consecutive checks that found no bucket.
    missing: u32,
}

impl Bucket {
    async fn identify(js: &jetstream::Context) -> anyhow::Result<Self> {
        let stream = format!("KV_{}", subjects::CURSORS_BUCKET);
        let created = js
            .get_stream(&stream)
            .await
            .context("reading the cursors bucket info")?
            .cached_info()
            .created
            .unix_timestamp_nanos();
        Ok(Bucket { stream, created, missing: 0 })
    }

    /// Releases held purges if the bucket is still the one the table was built from; fails if it
    /// was replaced or is gone, so the table is rebuilt. An unreachable server changes nothing.
    async fn check(&mut self, js: &jetstream::Context, table: &Mutex<CursorTable>) -> anyhow::Result<()> {
        match js.get_stream(&self.stream).await {
            Ok(s) if s.cached_info().created.unix_timestamp_nanos() != self.created => {
                anyhow::bail!("the cursors bucket was re-created")
            }
            Ok(_) => {
                self.missing = 0;
                lock(table).hold(false);
            }
            Err(e) if is_not_found(&e) => {
                self.missing += 1;
                if self.missing >= MISSING_CHECKS {
                    anyhow::bail!("the cursors bucket is gone");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot check the cursors bucket"),
        }
        Ok(())
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// A missed heartbeat is reported once while the ordered consumer re-creates itself; the watch
/// goes on after it. Anything else ends the watch.
pub(crate) fn is_transient(e: &kv::WatcherError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<OrderedError>())
        .is_some_and(|o| o.kind() == OrderedErrorKind::MissingHeartbeat)
}

/// The table's lock is only held for short, non-panicking sections, but recover from poisoning
/// anyway rather than take the service down.
pub fn lock(table: &Mutex<CursorTable>) -> std::sync::MutexGuard<'_, CursorTable> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}
