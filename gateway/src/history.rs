//! Reading a page of a user's server-side history (stream HISTORY, one subject per user and
//! conversation). Forward pages (`after`) are one batched direct get; backward pages (`before`,
//! or the latest) walk back one message per request (`multi_last` with `up_to_seq`), since
//! direct gets only batch forwards — a page is at most 100 small requests to one server.

use bytes::Bytes;
use protocol::subjects;

/// Up to `limit` items of `subject`, oldest first, after `after` or before `before` (the latest
/// ones when neither); `more` tells whether the page was full (there may be more).
pub async fn page(
    client: &async_nats::Client,
    subject: &str,
    before: Option<u64>,
    after: Option<u64>,
    limit: usize,
) -> anyhow::Result<(Vec<(u64, Bytes)>, bool)> {
    let mut items = Vec::with_capacity(limit);
    if let Some(after) = after {
        let req = serde_json::json!({ "seq": after + 1, "next_by_subj": subject, "batch": limit });
        for d in bus::inbox::direct_batch(client, subjects::HISTORY_STREAM, req, limit).await? {
            items.push((d.seq, d.payload));
        }
    } else {
        let mut up_to = before.map(|b| b.saturating_sub(1));
        while items.len() < limit && up_to != Some(0) {
            let mut req = serde_json::json!({ "multi_last": [subject], "batch": 1 });
            if let Some(u) = up_to {
                req["up_to_seq"] = u.into();
            }
            let Some(d) = bus::inbox::direct_batch(client, subjects::HISTORY_STREAM, req, 1).await?.pop() else {
                break;
            };
            up_to = Some(d.seq.saturating_sub(1));
            items.push((d.seq, d.payload));
        }
        items.reverse();
    }
    let more = items.len() == limit;
    Ok((items, more))
}
