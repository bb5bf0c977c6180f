//! Batched direct gets (NATS 2.11+): one request returns many stored messages from any replica,
//! ending with an end-of-batch status. Used to drain a user's inbox (`next_by_subj` + `batch`)
//! and to read the last value of many KV keys at once (`multi_last`).

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

/// One message returned by a batched direct get.
#[derive(Debug, Clone)]
pub struct Direct {
    pub subject: String,
    pub seq: u64,
    pub payload: Bytes,
    /// A KV delete or purge marker.
    pub deleted: bool,
}

/// Sends a batched direct get to `stream` and collects the replies (at most `max`).
pub async fn direct_batch(
    client: &async_nats::Client,
    stream: &str,
    request: serde_json::Value,
    max: usize,
) -> anyhow::Result<Vec<Direct>> {
    let reply = client.new_inbox();
    let mut sub = client.subscribe(reply.clone()).await.context("subscribing for a direct get batch")?;
    client
        .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), reply, serde_json::to_vec(&request)?.into())
        .await?;
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .map_err(|_| anyhow!("direct get batch timed out"))?
            .ok_or_else(|| anyhow!("direct get subscription closed"))?;
        if let Some(status) = msg.status {
            match status.as_u16() {
                // End of batch, or nothing (more) to return.
                204 | 404 => break,
                code => bail!("direct get failed: {code} {:?}", msg.description),
            }
        }
        let headers = msg.headers.as_ref();
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
        let seq = header("Nats-Sequence")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("direct get reply without Nats-Sequence"))?;
        let subject = header("Nats-Subject").unwrap_or_default();
        let deleted = matches!(header("KV-Operation").as_deref(), Some("DEL") | Some("PURGE"));
        out.push(Direct { subject, seq, payload: msg.payload, deleted });
        if out.len() >= max {
            break;
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(out)
}

/// Returns up to `max` messages of `inbox.<user>` with a sequence greater than `after`, oldest
/// first. An empty vector means the inbox holds nothing after `after`.
pub async fn fetch_after(
    client: &async_nats::Client,
    user: &protocol::UserId,
    after: u64,
    max: usize,
) -> anyhow::Result<Vec<StoredItem>> {
    let req = serde_json::json!({ "seq": after + 1, "next_by_subj": subjects::inbox(user), "batch": max });
    let items = direct_batch(client, subjects::INBOX_STREAM, req, max).await?;
    Ok(items.into_iter().map(|d| StoredItem { seq: d.seq, payload: d.payload }).collect())
}

/// The current values of the KV keys of `bucket` matching `key_filter` (wildcards allowed),
/// as (key, value); deleted keys are left out.
pub async fn kv_last_values(
    client: &async_nats::Client,
    bucket: &str,
    key_filter: &str,
    max: usize,
) -> anyhow::Result<Vec<(String, Bytes)>> {
    let prefix = format!("$KV.{bucket}.");
    let req = serde_json::json!({ "multi_last": [format!("{prefix}{key_filter}")], "batch": max });
    let items = direct_batch(client, &format!("KV_{bucket}"), req, max).await?;
    Ok(items
        .into_iter()
        .filter(|d| !d.deleted)
        .filter_map(|d| Some((d.subject.strip_prefix(&prefix)?.to_owned(), d.payload)))
        .collect())
}
