//! The fan-out: copies every entry of the group stream (`GROUPS`) into the inboxes of the group's
//! members.
//!
//! # How instances split the work
//!
//! The stream stores `group.<gid>` as `group.<partition>.<gid>` (a subject transform, 8
//! partitions), so each group lives in exactly one partition. Instance `i` of `n`
//! (`--instance i --instances n`) owns the partitions `p` with `p % n == i` and runs one durable
//! pull consumer per owned partition, `fanout-p<p>`, filtered on `group.<p>.*`. Each partition is
//! processed by one task, strictly sequentially: fetch a batch, publish every copy of every entry
//! in stream order (acks awaited asynchronously, many in flight), wait for all PubAcks, then
//! acknowledge the batch. So per-group order holds: one group → one partition → one consumer →
//! one sequential loop, and the copies of a group's entry k+1 are published only once every copy
//! of entry k is acknowledged, so they are stored in that order in every member's inbox.
//!
//! Each partition must have exactly one live owner: stop an instance before starting its
//! replacement (SIGTERM finishes the batch in hand and exits) and change `--instances` on all
//! instances together.
//!
//! # Failures: no duplicates, no gaps, no reordering
//!
//! Every copy is published with `Nats-Msg-Id` = `f|<sid>|<member>` (the `sent` receipt event with
//! `s|<gid>|<sid>`), so publishing an entry again stores nothing new as long as the first copy is
//! within the INBOX duplicate window (`storage --duplicate-window-secs`, 2 minutes by default).
//! Entries are acknowledged only after every copy is acknowledged, so:
//!
//! * If a publish fails, the batch is not acknowledged: its entries are nak'ed with a delay, the
//!   member cache is rolled back to the start of the batch, and the partition is *rebound* to
//!   replay the batch from its first entry.
//! * Binding a partition (at start, and after any failure) deletes and recreates its consumer
//!   starting at the first entry not known to be done (the failed batch's first entry, or right
//!   after the consumer's ack floor), unless nothing is delivered and unacknowledged and no one
//!   else is pulling from it. A nak'ed or unacknowledged entry would otherwise only come back
//!   after its delay or the ack wait (30 s), behind entries delivered meanwhile, which would
//!   reorder the group; rebinding replays in order, at once.
//! * The consumer numbers its deliveries; a jump in that numbering (an entry delivered to a pull
//!   request nobody reads any more) also rebinds, before anything of the batch is published.
//! * A router killed mid-batch (even `kill -9`) is the same case: the restarted instance rebinds,
//!   replays the unacknowledged entries in order, and the dedup ids drop the copies already
//!   stored.
//! * A NATS connection lost mid-batch loses the copies in flight on it while copies still queued
//!   in the client go out after the reconnect. The per-group barrier of [`Pipeline`] (a group's
//!   next entry is published only once its previous entry is stored for every recipient) makes
//!   sure that what gets stored of a group is always a prefix of its timeline per member, so the
//!   replay fills the gap in order.
//!
//! After a restart (or an eviction) the member cache does not know a group: the members at a
//! post's position are then taken from the group's next membership event in the stream (the list
//! before it follows from the event), or, when there is none, from KV `groups`.
//!
//! Limits: a replay later than the duplicate window after the first attempt (a router down for
//! more than 2 minutes in the middle of a batch) can store a second copy of the entries of that
//! batch for the members who already had them; clients also drop repeated `(group, sid)`. On a
//! cache miss with no membership event within 256 entries after the post, or with a change whose
//! KV write is done but whose event is not yet in the stream (milliseconds), the KV list is newer
//! than the post's position.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer},
    context::PublishErrorKind,
    kv,
    message::PublishMessage,
    stream::RetentionPolicy,
    AckKind,
};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{future::BoxFuture, StreamExt as _};
use protocol::groups::{GroupEntry, GroupState};
use protocol::{ids, subjects};
use tokio::sync::watch;

use crate::metrics::{Metrics, PartitionLabel};
use crate::plan::{self, MemberCache, Position, Reject, Undo};

/// How long JetStream waits for an acknowledgement before redelivering an entry.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// How long a fetch waits for the first entry (also bounds how fast a loop sees a shutdown).
const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// Group stream entries examined after a cache miss to find the group's next membership event.
const MISS_SCAN: usize = 256;
/// Delay of the nak of a failed batch (the rebind replays it sooner anyway).
const NAK_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Config {
    /// Entries fetched per batch.
    pub batch: usize,
    /// Publishes awaiting their PubAck at once, per partition.
    pub max_inflight: usize,
    /// Groups held in the member cache, per partition.
    pub cache_groups: usize,
}

/// The partitions instance `instance` of `instances` owns.
pub fn owned_partitions(instance: u32, instances: u32) -> Vec<u32> {
    (0..subjects::GROUP_PARTITIONS).filter(|p| p % instances == instance).collect()
}

pub fn consumer_name(partition: u32) -> String {
    format!("fanout-p{partition}")
}

fn consumer_config(partition: u32, cfg: &Config, deliver_policy: DeliverPolicy) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(partition)),
        description: Some(format!("router fan-out of group stream partition {partition}")),
        deliver_policy,
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        filter_subject: subjects::group_partition_filter(partition),
        // One batch is in hand at a time; the bound keeps a stray client from taking more.
        max_ack_pending: (cfg.batch * 2) as i64,
        ..Default::default()
    }
}

/// One partition's fan-out loop and its state.
pub struct Partition {
    pub partition: u32,
    pub js: jetstream::Context,
    pub groups: kv::Store,
    pub metrics: Metrics,
    pub cfg: Arc<Config>,
    cache: MemberCache,
    consumer: Option<PullConsumer>,
    /// The consumer sequence the next delivery must have: the consumer counts every delivery,
    /// so a jump means an entry went to a pull request we no longer read (it would come back
    /// later, out of order) and the partition is rebound instead.
    next_delivery: u64,
    /// Every entry up to this stream sequence is fanned out and acknowledged.
    done_through: u64,
    /// Where the next bind restarts the consumer: the first entry of a failed batch (the member
    /// cache was rolled back to that position), or right after `done_through` after a gap.
    replay_from: Option<u64>,
}

/// An entry of a batch after planning: its latency clock and how many copies it had.
struct Done {
    ts: u64,
    recipients: usize,
}

/// Why a batch was not completed.
enum BatchError {
    /// A delivery is missing before this batch: nothing was published.
    Gap { expected: u64, got: u64 },
    /// Publishing or acknowledging failed.
    Failed(anyhow::Error),
}

impl Partition {
    pub fn new(partition: u32, js: jetstream::Context, groups: kv::Store, metrics: Metrics, cfg: Arc<Config>) -> Self {
        let cache = MemberCache::new(cfg.cache_groups);
        Partition {
            partition,
            js,
            groups,
            metrics,
            cfg,
            cache,
            consumer: None,
            next_delivery: 1,
            done_through: 0,
            replay_from: None,
        }
    }

    /// Binds the consumer. An existing consumer with entries delivered and unacknowledged (a
    /// previous instance died, or a batch failed) is recreated to start from the first entry
    /// not known to be done, so that entries come in stream order (see the module docs).
    pub async fn bind(&mut self) -> anyhow::Result<()> {
        let name = consumer_name(self.partition);
        let mut stream = self.js.get_stream(subjects::GROUPS_STREAM).await.context("getting the GROUPS stream")?;
        let work_queue = stream.info().await.map(|i| i.config.retention == RetentionPolicy::WorkQueue)?;
        let restart_at = |start: u64| {
            if work_queue || start <= 1 {
                // A work queue keeps only unacknowledged entries: all of them is the rest.
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence { start_sequence: start }
            }
        };
        let deliver = match stream.consumer_info(&name).await {
            // Nothing delivered and unacknowledged, nobody else pulling: keep the consumer where
            // it is (its settings are updated to ours below).
            Ok(info) if self.replay_from.is_none() && info.num_ack_pending == 0 && info.num_waiting == 0 => {
                info.config.deliver_policy
            }
            Ok(info) => {
                let start = self.replay_from.unwrap_or(info.ack_floor.stream_sequence + 1);
                tracing::info!(
                    partition = self.partition,
                    start,
                    ack_floor = info.ack_floor.stream_sequence,
                    unacked = info.num_ack_pending,
                    waiting = info.num_waiting,
                    "rebinding the fan-out consumer"
                );
                stream.delete_consumer(&name).await.context("deleting the consumer to rebind it")?;
                restart_at(start)
            }
            Err(e) if matches!(e.kind(), jetstream::context::ConsumerInfoErrorKind::NotFound) => {
                tracing::info!(partition = self.partition, "creating the fan-out consumer");
                restart_at(self.replay_from.unwrap_or(1))
            }
            Err(e) => return Err(e).context("reading the consumer"),
        };
        let start = match deliver {
            DeliverPolicy::ByStartSequence { start_sequence } => Some(start_sequence),
            _ => None,
        };
        let consumer = stream
            .create_consumer(consumer_config(self.partition, &self.cfg, deliver))
            .await
            .context("creating the consumer")?;
        let info = consumer.cached_info();
        self.next_delivery = info.delivered.consumer_sequence + 1;
        self.done_through = match start {
            Some(start) if info.delivered.consumer_sequence == 0 => start - 1,
            _ => info.ack_floor.stream_sequence,
        };
        self.replay_from = None;
        self.consumer = Some(consumer);
        Ok(())
    }

    /// Runs until `shutdown` turns true. A fetch in progress (at most [`FETCH_EXPIRES`]) and the
    /// batch in hand are finished first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let sleep = |d: Duration, mut s: watch::Receiver<bool>| async move {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = s.wait_for(|stop| *stop) => {}
            }
        };
        while !*shutdown.borrow_and_update() {
            let Some(consumer) = self.consumer.clone() else {
                match self.bind().await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(
                            partition = self.partition,
                            error = format!("{e:#}"),
                            "binding the consumer failed"
                        );
                        sleep(backoff, shutdown.clone()).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
                continue;
            };
            let msgs = match fetch(&consumer, self.cfg.batch).await {
                Ok(msgs) => msgs,
                Err(e) => {
                    tracing::warn!(partition = self.partition, error = format!("{e:#}"), "fetching failed; rebinding");
                    self.consumer = None;
                    sleep(backoff, shutdown.clone()).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if msgs.is_empty() {
                continue;
            }
            match self.process(&msgs).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(BatchError::Gap { expected, got }) => {
                    tracing::warn!(
                        partition = self.partition,
                        expected,
                        got,
                        from = self.done_through + 1,
                        "a delivery went missing; rebinding to keep the order"
                    );
                    self.replay_from = Some(self.done_through + 1);
                    self.consumer = None;
                }
                Err(BatchError::Failed(e)) => {
                    self.metrics.fanout_retries.inc();
                    tracing::warn!(
                        partition = self.partition,
                        entries = msgs.len(),
                        error = format!("{e:#}"),
                        "fan-out of a batch failed; replaying it"
                    );
                    for m in &msgs {
                        let _ = m.ack_with(AckKind::Nak(Some(NAK_DELAY))).await;
                    }
                    self.consumer = None;
                    sleep(backoff, shutdown.clone()).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::info!(partition = self.partition, "fan-out stopped");
    }

    /// Fans out one batch and acknowledges it. On error nothing more is acknowledged, the member
    /// cache is back at the start of the batch and the next bind replays from there.
    async fn process(&mut self, msgs: &[jetstream::Message]) -> Result<(), BatchError> {
        // Stream positions and consumer sequences, checked before anything is published.
        let mut sids = Vec::with_capacity(msgs.len());
        for m in msgs {
            let info = m.info().map_err(|e| BatchError::Failed(anyhow!("message without JetStream metadata: {e}")))?;
            if info.consumer_sequence != self.next_delivery + sids.len() as u64 {
                return Err(BatchError::Gap {
                    expected: self.next_delivery + sids.len() as u64,
                    got: info.consumer_sequence,
                });
            }
            sids.push(info.stream_sequence);
        }
        let first = sids[0];
        let mut undo = Undo::default();
        let js = self.js.clone();
        let mut pipe = Pipeline::new(&js, self.cfg.max_inflight);
        let mut done = Vec::with_capacity(msgs.len());
        let res = async {
            for (msg, &sid) in msgs.iter().zip(&sids) {
                if let Some(d) = self.plan_and_publish(msg, sid, &mut undo, &mut pipe).await? {
                    done.push(d);
                }
            }
            pipe.finish().await?;
            let stored_at = protocol::now_ms();
            // All copies are stored: acknowledge the entries. The last ack waits for the
            // server's confirmation, which comes after the earlier ones were processed.
            let (last, rest) = msgs.split_last().expect("a batch is never empty");
            for m in rest {
                m.ack().await.map_err(|e| anyhow!("acking: {e}"))?;
            }
            last.double_ack().await.map_err(|e| anyhow!("acking: {e}"))?;
            Ok(stored_at)
        }
        .await;
        let now = match res {
            Ok(stored_at) => stored_at,
            Err(e) => {
                self.cache.rollback(undo);
                self.replay_from = Some(first);
                return Err(BatchError::Failed(e));
            }
        };
        self.next_delivery += msgs.len() as u64;
        self.done_through = *sids.last().expect("a batch is never empty");
        self.metrics.group_entries.inc_by(msgs.len() as u64);
        for d in done {
            self.metrics.fanout_deliveries.inc_by(d.recipients as u64);
            self.metrics.fanout_size.observe(d.recipients as f64);
            self.metrics.fanout_seconds.observe(now.saturating_sub(d.ts) as f64 / 1000.0);
        }
        Ok(())
    }

    /// Plans one entry and queues its publishes. `None`: the entry is dropped (rejected or
    /// malformed), which is final.
    async fn plan_and_publish(
        &mut self,
        msg: &jetstream::Message,
        sid: u64,
        undo: &mut Undo,
        pipe: &mut Pipeline<'_>,
    ) -> anyhow::Result<Option<Done>> {
        let Some(gid) = plan::gid_of(msg.subject.as_str()) else {
            self.reject(sid, msg.subject.as_str(), "not a group stream subject");
            return Ok(None);
        };
        let entry: GroupEntry = match serde_json::from_slice(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                // The error text never contains the body: serde_json reports positions only.
                self.reject(sid, gid, &format!("malformed entry: {e}"));
                return Ok(None);
            }
        };
        if plan::needs_members(&self.cache, gid, &entry) {
            self.load(gid, msg.subject.as_str(), sid, undo).await?;
        }
        let rev = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .and_then(|id| plan::event_rev(id.as_str(), gid));
        let fanout = match plan::plan(&mut self.cache, undo, Position { gid, sid }, &entry, rev) {
            Ok(f) => f,
            Err(Reject::NotMember { from }) => {
                self.reject(sid, gid, &format!("sender {from} is not a member"));
                return Ok(None);
            }
            Err(Reject::NoGroup) => {
                self.reject(sid, gid, "no such group");
                return Ok(None);
            }
        };
        pipe.begin_entry(gid).await?;
        if let Some(receipt) = fanout.receipt {
            pipe.publish(subjects::receipts(gid), plan::sent_msg_id(gid, sid), receipt, false).await?;
        }
        // Group messages deserve a push notification when the member has no live device; membership
        // events do not.
        let push = matches!(entry, GroupEntry::Post { .. });
        for member in &fanout.recipients {
            let msg_id = ids::fanout_dedup_id(sid, member);
            pipe.publish(format!("inbox.{member}"), msg_id, fanout.item.clone(), push).await?;
        }
        Ok(Some(Done { ts: fanout.ts, recipients: fanout.recipients.len() }))
    }

    fn reject(&self, sid: u64, gid: &str, why: &str) {
        self.metrics.rejected.inc();
        tracing::warn!(partition = self.partition, sid, gid, why, "group stream entry dropped");
    }

    /// Fills the cache for a post of a group it does not hold (after a start, a rebind or an
    /// eviction). The first membership event of the group after the post gives the member list
    /// at the post's position exactly; only if there is none (within [`MISS_SCAN`] entries) is
    /// the latest list read from KV `groups`.
    async fn load(&mut self, gid: &str, subject: &str, sid: u64, undo: &mut Undo) -> anyhow::Result<()> {
        if let Some((event, rev)) = self.next_event(subject, sid).await? {
            // `None`: the post comes before the group's creation; it reaches no one.
            if let Some(before) = plan::members_before(&event) {
                self.cache.set(gid, rev.map_or(0, |r| r.saturating_sub(1)), &before, undo);
            }
            return Ok(());
        }
        let entry = self.groups.entry(gid).await.map_err(|e| anyhow!("reading group {gid}: {e}"))?;
        if let Some(e) = entry {
            if e.operation == kv::Operation::Put {
                match serde_json::from_slice::<GroupState>(&e.value) {
                    Ok(state) => {
                        self.cache.set(gid, e.revision, &state.members, undo);
                    }
                    Err(err) => tracing::error!(gid, error = %err, "group state in KV is not valid JSON"),
                }
            }
        }
        Ok(())
    }

    /// The first membership event on `subject` (one group) after stream sequence `sid`, with its
    /// KV revision; `None` if there is none, or none within [`MISS_SCAN`] entries.
    async fn next_event(&self, subject: &str, sid: u64) -> anyhow::Result<Option<(GroupEntry, Option<u64>)>> {
        let stream = self.js.get_stream_no_info(subjects::GROUPS_STREAM).await?;
        let gid = plan::gid_of(subject).unwrap_or_default();
        let mut seq = sid + 1;
        for _ in 0..MISS_SCAN {
            let msg = match stream.raw_message_builder().sequence(seq).next_by_subject(subject).send().await {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), jetstream::stream::LastRawMessageErrorKind::NoMessageFound) => {
                    return Ok(None)
                }
                Err(e) => return Err(anyhow!("reading the group stream: {e}")),
            };
            seq = msg.sequence + 1;
            if let Ok(entry @ GroupEntry::Event { .. }) = serde_json::from_slice::<GroupEntry>(&msg.payload) {
                let rev = msg
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .and_then(|id| plan::event_rev(id.as_str(), gid));
                return Ok(Some((entry, rev)));
            }
        }
        Ok(None)
    }
}

/// Fetches up to `batch` entries: returns as soon as some are available, or empty after
/// [`FETCH_EXPIRES`].
async fn fetch(consumer: &PullConsumer, batch: usize) -> anyhow::Result<Vec<jetstream::Message>> {
    let mut stream = consumer
        .fetch()
        .max_messages(batch)
        .expires(FETCH_EXPIRES)
        .messages()
        .await
        .map_err(|e| anyhow!("pull request: {e}"))?;
    let mut out = Vec::new();
    while let Some(m) = stream.next().await {
        match m {
            Ok(m) => out.push(m),
            // A status ending the request (e.g. 409): keep what arrived before it.
            Err(e) if !out.is_empty() => {
                tracing::debug!(error = %e, "fetch ended early");
                break;
            }
            Err(e) => return Err(anyhow!("fetch: {e}")),
        }
    }
    Ok(out)
}

type AckFuture = BoxFuture<'static, (usize, Result<jetstream::publish::PublishAck, jetstream::context::PublishError>)>;

/// Publishes in order with many PubAcks outstanding (bounded by `max_inflight`), with a barrier
/// per group: the copies of a group's next entry are published only once every copy of its
/// previous entry is acknowledged.
///
/// The barrier is what keeps inboxes in order when the NATS connection drops mid-batch: the
/// copies written to the lost connection are gone while those still queued in the client are
/// sent after the reconnect. Without it, a member could get entry k+1 stored and entry k lost,
/// and the replay would then store k after k+1. With it, entry k+1 of a group is never sent
/// before entry k is stored for everyone, and a lost copy of k fails the batch first. Entries of
/// different groups (and all the copies of one entry) still go out back to back.
struct Pipeline<'a> {
    js: &'a jetstream::Context,
    inflight: FuturesUnordered<AckFuture>,
    max_inflight: usize,
    /// The groups of this batch (index = tag of their publishes) and their outstanding acks.
    groups: Vec<(String, usize)>,
    current: usize,
}

impl<'a> Pipeline<'a> {
    fn new(js: &'a jetstream::Context, max_inflight: usize) -> Self {
        Pipeline {
            js,
            inflight: FuturesUnordered::new(),
            max_inflight: max_inflight.max(1),
            groups: Vec::new(),
            current: 0,
        }
    }

    /// Starts the publishes of an entry of `gid`: waits until the previous entry of the group is
    /// fully acknowledged.
    async fn begin_entry(&mut self, gid: &str) -> anyhow::Result<()> {
        let tag = match self.groups.iter().position(|(g, _)| g == gid) {
            Some(tag) => tag,
            None => {
                self.groups.push((gid.to_owned(), 0));
                self.groups.len() - 1
            }
        };
        while self.groups[tag].1 > 0 {
            self.next_ack().await?;
        }
        self.current = tag;
        Ok(())
    }

    /// Publishes one message of the current entry; its PubAck is awaited later.
    async fn publish(&mut self, subject: String, msg_id: String, payload: Bytes, push: bool) -> anyhow::Result<()> {
        while self.inflight.len() >= self.max_inflight {
            self.next_ack().await?;
        }
        let mut publish = PublishMessage::build().payload(payload).message_id(msg_id);
        if push {
            // Storage announces the item if the member has no live device (storage/README.md).
            publish = publish.header(protocol::subjects::PUSH_HEADER, "1");
        }
        let ack = self.js.send_publish(subject, publish).await.map_err(|e| anyhow!("publishing: {e}"))?;
        let tag = self.current;
        self.groups[tag].1 += 1;
        self.inflight.push(Box::pin(async move { (tag, ack.await) }));
        Ok(())
    }

    async fn next_ack(&mut self) -> anyhow::Result<()> {
        let Some((tag, res)) = self.inflight.next().await else { return Ok(()) };
        self.groups[tag].1 -= 1;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                Err(anyhow!("publish acknowledged by no stream: {e}"))
            }
            Err(e) => Err(anyhow!("publish not acknowledged: {e}")),
        }
    }

    /// Waits for every outstanding PubAck.
    async fn finish(&mut self) -> anyhow::Result<()> {
        while !self.inflight.is_empty() {
            self.next_ack().await?;
        }
        Ok(())
    }
}

/// Refreshes `router_consumer_pending` from the consumers' info every few seconds.
pub async fn report_pending(js: jetstream::Context, partitions: Vec<u32>, metrics: Metrics) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let Ok(stream) = js.get_stream(subjects::GROUPS_STREAM).await else { continue };
        for &p in &partitions {
            if let Ok(info) = stream.consumer_info(consumer_name(p)).await {
                let gauge = metrics.consumer_pending.get_or_create(&PartitionLabel { partition: p });
                gauge.set(info.num_pending.min(i64::MAX as u64) as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_split_the_partitions() {
        assert_eq!(owned_partitions(0, 1), (0..8).collect::<Vec<_>>());
        assert_eq!(owned_partitions(0, 2), vec![0, 2, 4, 6]);
        assert_eq!(owned_partitions(1, 2), vec![1, 3, 5, 7]);
        assert_eq!(owned_partitions(2, 3), vec![2, 5]);
        assert!(owned_partitions(9, 10).is_empty());
        // Every partition has exactly one owner.
        for n in 1..=9u32 {
            let mut all: Vec<u32> = (0..n).flat_map(|i| owned_partitions(i, n)).collect();
            all.sort();
            assert_eq!(all, (0..8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn consumer_settings() {
        let cfg = Config { batch: 64, max_inflight: 10, cache_groups: 10 };
        let c = consumer_config(3, &cfg, DeliverPolicy::All);
        assert_eq!(c.durable_name.as_deref(), Some("fanout-p3"));
        assert_eq!(c.filter_subject, "group.3.*");
        assert_eq!(c.ack_policy, AckPolicy::Explicit);
        assert_eq!(c.ack_wait, Duration::from_secs(30));
        assert_eq!(c.max_ack_pending, 128);
    }
}
