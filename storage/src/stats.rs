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
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match inbox.get_info().await {
            Ok(info) => {
                metrics.inbox_messages.set(clamp(info.state.messages));
                metrics.inbox_bytes.set(clamp(info.state.bytes));
            }
            // Expected while NATS restarts; the next tick retries.
            Err(e) => tracing::debug!(error = %e, "INBOX stream info failed"),
        }
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
