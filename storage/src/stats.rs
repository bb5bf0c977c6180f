//! Periodic INBOX stream size gauges, for capacity dashboards and to see purging work.

use std::time::Duration;

use async_nats::jetstream;
use protocol::subjects;

use crate::metrics::Metrics;

const EVERY: Duration = Duration::from_secs(5);

/// Refreshes the gauges every few seconds, forever (the caller aborts the task).
pub async fn run(js: jetstream::Context, metrics: Metrics) {
    let Ok(inbox) = js.get_stream_no_info(subjects::INBOX_STREAM).await else {
        return;
    };
    // Messages leave INBOX by purge (delivered) or by age (undelivered); the stream counts only
    // the total, so age expiries are the removals the purges do not explain.
    // A purge landing between the two readings skews one tick's difference; taking the smaller
    // of two consecutive ticks' differences keeps such a transient out of the counter.
    let mut start: Option<(u64, u64)> = None;
    let (mut last_diff, mut counted) = (0u64, 0u64);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match inbox.get_info().await {
            Ok(info) => {
                metrics.inbox_messages.set(clamp(info.state.messages));
                metrics.inbox_bytes.set(clamp(info.state.bytes));
                let removed = info.state.last_sequence.saturating_sub(info.state.messages);
                let purged = metrics.purged_messages.get();
                let (r0, p0) = *start.get_or_insert((removed, purged));
                let diff = removed.saturating_sub(r0).saturating_sub(purged.saturating_sub(p0));
                let settled = diff.min(last_diff);
                if settled > counted {
                    metrics.expired_undelivered.inc_by(settled - counted);
                    counted = settled;
                }
                last_diff = diff;
                if let Ok(c) = inbox.consumer_info(crate::notifier::CONSUMER).await {
                    metrics.push_consumer_pending.set(clamp(c.num_pending));
                }
            }
            // Expected while NATS restarts; the next tick retries.
            Err(e) => tracing::debug!(error = %e, "INBOX stream info failed"),
        }
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
