//! Reading a user's inbox: a batched direct get (`next_by_subj` + `batch`, NATS 2.11+) returns up
//! to a batch of the user's messages after a sequence in one round trip, from any replica.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use futures::StreamExt;
use protocol::subjects;

/// One stored inbox message.
#[derive(Debug, Clone)]
pub struct StoredItem {
    pub seq: u64,
    pub payload: Bytes,
}

/// Returns up to `max` messages of `inbox.<user>` with a sequence greater than `after`, oldest
/// first. An empty vector means the inbox holds nothing after `after`.
pub async fn fetch_after(
    client: &async_nats::Client,
    user: &protocol::UserId,
    after: u64,
    max: usize,
) -> anyhow::Result<Vec<StoredItem>> {
    let reply = client.new_inbox();
    let mut sub = client.subscribe(reply.clone()).await.context("subscribing for inbox batch")?;
    let req = serde_json::json!({
        "seq": after + 1,
        "next_by_subj": subjects::inbox(user),
        "batch": max,
    });
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{}", subjects::INBOX_STREAM),
            reply,
            serde_json::to_vec(&req)?.into(),
        )
        .await?;
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .map_err(|_| anyhow!("inbox batch timed out"))?
            .ok_or_else(|| anyhow!("inbox batch subscription closed"))?;
        if let Some(status) = msg.status {
            match status.as_u16() {
                // End of batch, or nothing (more) to return.
                204 | 404 => break,
                code => bail!("inbox batch failed: {code} {:?}", msg.description),
            }
        }
        let seq = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .and_then(|v| v.as_str().parse().ok())
            .ok_or_else(|| anyhow!("inbox batch reply without Nats-Sequence"))?;
        out.push(StoredItem { seq, payload: msg.payload });
        if out.len() >= max {
            break;
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(out)
}
