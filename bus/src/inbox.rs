//! Batched direct gets (NATS 2.11+): one request returns many stored messages from any replica,
//! ending with an end-of-batch status. Used to drain a user's inbox (`next_by_subj` + `batch`)
//! and to read the last value of many KV keys at once (`multi_last`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// How long a batched direct get waits for each of its replies ([`direct_batch`]) or for the
/// whole batch ([`DirectGets`]).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a batched direct get to `stream` and collects the replies (at most `max`), on a reply
/// subscription of its own (a SUB and an UNSUB per call). For repeated reads use [`DirectGets`],
/// which shares one reply subscription among all its requests.
pub async fn direct_batch(
    client: &async_nats::Client,
    stream: &str,
    request: serde_json::Value,
    max: usize,
) -> anyhow::Result<Vec<Direct>> {
    let reply = client.new_inbox();
    let mut sub = client.subscribe(reply.clone()).await.context("subscribing for a direct get batch")?;
    client.publish_with_reply(direct_subject(stream), reply, serde_json::to_vec(&request)?.into()).await?;
    let out = collect(&mut sub, max).await;
    let _ = sub.unsubscribe().await;
    out
}

fn direct_subject(stream: &str) -> String {
    format!("$JS.API.DIRECT.GET.{stream}")
}

/// Reads the replies of one batch from `replies` until its end-of-batch status or `max` items.
async fn collect<S>(replies: &mut S, max: usize) -> anyhow::Result<Vec<Direct>>
where
    S: futures::Stream<Item = async_nats::Message> + Unpin,
{
    let mut batch = Batch::new(max);
    while !batch.is_complete() {
        let msg = tokio::time::timeout(REPLY_TIMEOUT, replies.next())
            .await
            .map_err(|_| anyhow!("direct get batch timed out"))?
            .ok_or_else(|| anyhow!("direct get subscription closed"))?;
        batch.feed(msg)?;
    }
    Ok(batch.out)
}

/// The replies of one batch as they come: complete at the end-of-batch status or at `max`
/// items. A reply lost on the way (a slow consumer drops messages) is an error, never a gap.
struct Batch {
    max: usize,
    out: Vec<Direct>,
    chain: Chain,
    ended: bool,
}

impl Batch {
    fn new(max: usize) -> Batch {
        Batch { max, out: Vec::new(), chain: Chain::default(), ended: false }
    }

    fn is_complete(&self) -> bool {
        self.ended || self.out.len() >= self.max
    }

    fn feed(&mut self, msg: async_nats::Message) -> anyhow::Result<()> {
        let previous =
            msg.headers.as_ref().and_then(|h| h.get("Nats-Last-Sequence")).and_then(|v| v.as_str().parse().ok());
        let reply = parse_reply(msg)?;
        self.chain.follow(previous, reply.as_ref().map(|d| d.seq))?;
        match reply {
            Some(d) => self.out.push(d),
            None => self.ended = true,
        }
        Ok(())
    }
}

/// The links of a batch: each reply (the end-of-batch status included) names in
/// `Nats-Last-Sequence` the sequence of the message sent before it in the batch (0 for the
/// first), so a reply missing in between shows as a broken link.
#[derive(Debug, Default)]
struct Chain {
    last: u64,
}

impl Chain {
    /// Checks a reply naming `previous` (when the server says) and carrying message `seq` (none
    /// for the end-of-batch status).
    fn follow(&mut self, previous: Option<u64>, seq: Option<u64>) -> anyhow::Result<()> {
        if let Some(p) = previous {
            if p != self.last {
                bail!("direct get batch lost replies: one follows {p}, the last received was {}", self.last);
            }
        }
        if let Some(seq) = seq {
            self.last = seq;
        }
        Ok(())
    }
}

/// One reply of a batched direct get: a stored message, or `None` at the end of the batch (or
/// when there is nothing (more) to return).
fn parse_reply(msg: async_nats::Message) -> anyhow::Result<Option<Direct>> {
    if let Some(status) = msg.status {
        return match status.as_u16() {
            204 | 404 => Ok(None),
            code => bail!("direct get failed: {code} {:?}", msg.description),
        };
    }
    let headers = msg.headers.as_ref();
    let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    let seq = header("Nats-Sequence")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("direct get reply without Nats-Sequence"))?;
    let subject = header("Nats-Subject").unwrap_or_default().to_owned();
    let deleted = matches!(header("KV-Operation"), Some("DEL") | Some("PURGE"));
    Ok(Some(Direct { subject, seq, payload: msg.payload, deleted }))
}

/// Batched direct gets over one long-lived reply subscription (`<inbox>.*`, one token per
/// request), so that a read costs the server one request and its replies, not also a SUB and an
/// UNSUB, and the client no subscription or channel of its own: the router task collects each
/// request's replies, by their last token, and hands over the whole batch (one oneshot) when it
/// is complete. A reply nobody waits for any more (timed out, or past `max`) is dropped. Cheap to
/// clone. Must be created inside a tokio runtime (it spawns the router).
#[derive(Clone)]
pub struct DirectGets {
    inner: Arc<Shared>,
}

struct Shared {
    client: async_nats::Client,
    /// The reply subject prefix: request `n` gets its replies on `<prefix>.<n>`.
    prefix: String,
    next: AtomicU64,
    waiting: Arc<Mutex<Waiting>>,
    router: tokio::task::AbortHandle,
}

type Waiting = HashMap<u64, Pending>;

/// A request's batch so far, and where the result goes.
struct Pending {
    batch: Batch,
    done: futures::channel::oneshot::Sender<anyhow::Result<Vec<Direct>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Dropping the router's subscriber unsubscribes.
        self.router.abort();
    }
}

impl DirectGets {
    pub async fn new(client: &async_nats::Client) -> anyhow::Result<DirectGets> {
        let prefix = client.new_inbox();
        let mut sub = client.subscribe(format!("{prefix}.*")).await.context("subscribing for direct get replies")?;
        let waiting: Arc<Mutex<Waiting>> = Arc::default();
        let routes = waiting.clone();
        let router = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(id) = request_id(&msg.subject) else { continue };
                let mut routes = routes.lock().unwrap_or_else(|e| e.into_inner());
                let Some(pending) = routes.get_mut(&id) else { continue };
                let result = pending.batch.feed(msg);
                if result.is_err() || pending.batch.is_complete() {
                    let Some(Pending { batch, done }) = routes.remove(&id) else { continue };
                    let _ = done.send(result.map(|()| batch.out));
                }
            }
            // The client is closed: every waiting request ends ("subscription closed").
            routes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        })
        .abort_handle();
        Ok(DirectGets {
            inner: Arc::new(Shared { client: client.clone(), prefix, next: AtomicU64::new(0), waiting, router }),
        })
    }

    /// Like [`direct_batch`], on the shared reply subscription.
    pub async fn batch(&self, stream: &str, request: serde_json::Value, max: usize) -> anyhow::Result<Vec<Direct>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let s = &*self.inner;
        let id = s.next.fetch_add(1, Ordering::Relaxed);
        let (done, result) = futures::channel::oneshot::channel();
        let _entry = Registered::new(&s.waiting, id, Pending { batch: Batch::new(max), done });
        let reply = format!("{}.{id}", s.prefix);
        s.client.publish_with_reply(direct_subject(stream), reply, serde_json::to_vec(&request)?.into()).await?;
        tokio::time::timeout(REPLY_TIMEOUT, result)
            .await
            .map_err(|_| anyhow!("direct get batch timed out"))?
            .map_err(|_| anyhow!("direct get subscription closed"))?
    }

    /// Like [`fetch_after`], on the shared reply subscription.
    pub async fn fetch_after(
        &self,
        user: &protocol::UserId,
        after: u64,
        max: usize,
    ) -> anyhow::Result<Vec<StoredItem>> {
        let items = self.batch(subjects::INBOX_STREAM, fetch_request(user, after, max), max).await?;
        Ok(into_stored(items))
    }

    /// Like [`kv_last_values`], on the shared reply subscription.
    pub async fn kv_last_values(
        &self,
        bucket: &str,
        key_filter: &str,
        max: usize,
    ) -> anyhow::Result<Vec<(String, Bytes)>> {
        let (stream, req) = kv_last_request(bucket, key_filter, max);
        Ok(kv_values(bucket, self.batch(&stream, req, max).await?))
    }
}

/// The request number of a reply subject `<prefix>.<n>`.
fn request_id(subject: &str) -> Option<u64> {
    subject.rsplit('.').next()?.parse().ok()
}

/// A request's entry in the routing table, removed however the request ends (answered, timed
/// out, failed or dropped).
struct Registered<'a> {
    waiting: &'a Mutex<Waiting>,
    id: u64,
}

impl<'a> Registered<'a> {
    fn new(waiting: &'a Mutex<Waiting>, id: u64, pending: Pending) -> Self {
        waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(id, pending);
        Registered { waiting, id }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// Returns up to `max` messages of `inbox.<user>` with a sequence greater than `after`, oldest
/// first. An empty vector means the inbox holds nothing after `after`.
pub async fn fetch_after(
    client: &async_nats::Client,
    user: &protocol::UserId,
    after: u64,
    max: usize,
) -> anyhow::Result<Vec<StoredItem>> {
    Ok(into_stored(direct_batch(client, subjects::INBOX_STREAM, fetch_request(user, after, max), max).await?))
}

fn fetch_request(user: &protocol::UserId, after: u64, max: usize) -> serde_json::Value {
    serde_json::json!({ "seq": after + 1, "next_by_subj": subjects::inbox(user), "batch": max })
}

fn into_stored(items: Vec<Direct>) -> Vec<StoredItem> {
    items.into_iter().map(|d| StoredItem { seq: d.seq, payload: d.payload }).collect()
}

/// The current values of the KV keys of `bucket` matching `key_filter` (wildcards allowed),
/// as (key, value); deleted keys are left out.
pub async fn kv_last_values(
    client: &async_nats::Client,
    bucket: &str,
    key_filter: &str,
    max: usize,
) -> anyhow::Result<Vec<(String, Bytes)>> {
    let (stream, req) = kv_last_request(bucket, key_filter, max);
    Ok(kv_values(bucket, direct_batch(client, &stream, req, max).await?))
}

/// The stream and the request of a `multi_last` read of `bucket`'s keys matching `key_filter`.
fn kv_last_request(bucket: &str, key_filter: &str, max: usize) -> (String, serde_json::Value) {
    (format!("KV_{bucket}"), serde_json::json!({ "multi_last": [format!("$KV.{bucket}.{key_filter}")], "batch": max }))
}

/// (key, value) of the live entries among `items` read from `bucket`.
fn kv_values(bucket: &str, items: Vec<Direct>) -> Vec<(String, Bytes)> {
    let prefix = format!("$KV.{bucket}.");
    items
        .into_iter()
        .filter(|d| !d.deleted)
        .filter_map(|d| Some((d.subject.strip_prefix(&prefix)?.to_owned(), d.payload)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbroken_batch_passes() {
        let mut c = Chain::default();
        c.follow(Some(0), Some(3)).unwrap();
        c.follow(Some(3), Some(7)).unwrap();
        c.follow(Some(7), None).unwrap();
    }

    #[test]
    fn a_lost_reply_breaks_the_chain() {
        // The first reply lost.
        let mut c = Chain::default();
        assert!(c.follow(Some(3), Some(7)).is_err());
        // One in the middle.
        let mut c = Chain::default();
        c.follow(Some(0), Some(3)).unwrap();
        assert!(c.follow(Some(7), Some(9)).is_err());
        // The last one before the end of the batch.
        let mut c = Chain::default();
        c.follow(Some(0), Some(3)).unwrap();
        assert!(c.follow(Some(7), None).is_err());
    }

    #[test]
    fn replies_without_the_header_are_not_judged() {
        let mut c = Chain::default();
        c.follow(None, Some(3)).unwrap();
        c.follow(None, Some(9)).unwrap();
        c.follow(Some(9), None).unwrap();
    }

    /// A reply as the server sends it: stored message `seq` (or the end-of-batch status with
    /// `seq` None) after message `previous`.
    fn reply(seq: Option<u64>, previous: u64) -> async_nats::Message {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Last-Sequence", previous.to_string().as_str());
        if let Some(seq) = seq {
            headers.insert("Nats-Sequence", seq.to_string().as_str());
            headers.insert("Nats-Subject", "inbox.alice");
        }
        async_nats::Message {
            subject: "_INBOX.gateway.x.1".into(),
            reply: None,
            payload: Bytes::from_static(b"m"),
            headers: Some(headers),
            status: seq.is_none().then(|| 204u16.try_into().unwrap()),
            description: None,
            length: 0,
        }
    }

    #[test]
    fn a_batch_completes_at_its_end_or_at_max() {
        let mut b = Batch::new(10);
        b.feed(reply(Some(3), 0)).unwrap();
        b.feed(reply(Some(8), 3)).unwrap();
        assert!(!b.is_complete());
        b.feed(reply(None, 8)).unwrap();
        assert!(b.is_complete());
        assert_eq!(b.out.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![3, 8]);

        let mut b = Batch::new(1);
        b.feed(reply(Some(3), 0)).unwrap();
        assert!(b.is_complete());
    }

    #[test]
    fn a_batch_with_a_hole_or_a_bad_reply_fails() {
        let mut b = Batch::new(10);
        b.feed(reply(Some(3), 0)).unwrap();
        assert!(b.feed(reply(Some(9), 8)).is_err());

        let mut b = Batch::new(10);
        let mut no_seq = reply(Some(3), 0);
        no_seq.headers.as_mut().unwrap().insert("Nats-Sequence", "x");
        assert!(b.feed(no_seq).is_err());

        let mut refused = reply(None, 0);
        refused.status = Some(408u16.try_into().unwrap());
        assert!(Batch::new(10).feed(refused).is_err());
    }

    #[test]
    fn request_ids_are_the_last_token() {
        assert_eq!(request_id("_INBOX.gateway.abc.17"), Some(17));
        assert_eq!(request_id("_INBOX.gateway.abc.x"), None);
        assert_eq!(request_id("17"), Some(17));
    }
}
