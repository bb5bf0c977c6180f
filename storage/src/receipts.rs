//! Group receipts over NATS: the RECEIPTS stream into the [`ReceiptBook`], aggregate ticks into the
//! senders' inboxes, and the "who read this" query service.
//!
//! **State and restarts.** The book lives in memory only. At start (and whenever the stream was
//! replaced) it is rebuilt by replaying RECEIPTS from its first message with an ordered consumer,
//! which then goes on with live events; the stream's max age bounds the replay. Until the replay
//! has caught up, queries are answered `unavailable` rather than with a half-built answer.
//!
//! **Ticks during a replay are emitted normally.** The replay cannot tell which ticks an earlier
//! run already stored (the process may have died between completing a message and publishing its
//! tick, or during a publish), and suppressing them could lose a tick for good. So every tick is
//! published again: a tick is idempotent for the client (it says "everyone has it / has read it"),
//! its payload is identical (it carries the stream time of the event that completed it), and
//! JetStream drops a repeat within the duplicate window by its `Nats-Msg-Id`
//! (`gr|<gid>|<sid>|<status>`). A tick older than that window is stored once more; that is the
//! accepted cost of a restart. Persisting "ticks published up to stream sequence N" would remove
//! it, if restarts turn out to be frequent.
//!
//! **Publishing.** Ticks go to one publisher task through a bounded channel (a slow publisher
//! slows the consumer down, never grows memory). It writes them in order and waits for the
//! acknowledgements concurrently (bounded); a failed publish is retried with backoff (safe: same
//! message id), and given up after a while (logged and counted; the next rebuild emits it again).
//!
//! **A replaced stream.** The ordered consumer survives reconnects and server restarts, resuming
//! after the last sequence it delivered. It cannot notice RECEIPTS being deleted and created again
//! (a server that came back empty): it would wait for sequences the new stream reaches much later.
//! So the stream's creation time is checked after every reconnect and periodically; if it changed
//! (or the stream stays missing), the book is reset and rebuilt from the new stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{
    self,
    consumer::{
        push::{OrderedConfig, OrderedErrorKind},
        DeliverPolicy, ReplayPolicy,
    },
    message::PublishMessage,
};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use protocol::groups::{ReceiptEvent, WhoReadReply, WhoReadRequest};
use protocol::item::ReceiptStatus;
use protocol::{subjects, ErrorCode, GroupId};
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::receipt_book::{ReceiptBook, Tick};

/// Queue group of the query service: one storage instance answers each query.
pub const QUERY_QUEUE_GROUP: &str = "storage";
/// Ticks waiting for the publisher.
const TICK_QUEUE: usize = 4096;
/// Tick publishes awaiting their acknowledgement.
const MAX_IN_FLIGHT: usize = 256;
/// Attempts per tick before it is given up (about two minutes with the backoff below).
const MAX_ATTEMPTS: u32 = 30;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the publisher gets at shutdown.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// How often old pending messages are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(30);
/// How often the stream's identity is checked besides after reconnects.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// Consecutive "stream not found" answers after which the book is rebuilt.
const MISSING_CHECKS: u32 = 3;

/// The book and whether it reflects the whole stream yet; shared by the consumer and the queries.
pub struct Shared {
    book: Mutex<ReceiptBook>,
    caught_up: AtomicBool,
}

impl Shared {
    pub fn new(book: ReceiptBook) -> Self {
        Shared { book: Mutex::new(book), caught_up: AtomicBool::new(false) }
    }

    /// Held only for short, non-panicking sections; recover from poisoning anyway.
    fn book(&self) -> MutexGuard<'_, ReceiptBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    fn set_caught_up(&self, v: bool) {
        self.caught_up.store(v, Ordering::Release);
    }
}

/// Starts the consumer, the tick publisher and the query service. The returned task ends after
/// `shutdown` turned true, once the ticks already due were published (bounded in time).
pub fn spawn(
    js: jetstream::Context,
    shared: Arc<Shared>,
    metrics: Metrics,
    reconnects: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = mpsc::channel(TICK_QUEUE);
    let consumer = tokio::spawn(consume(js.clone(), shared.clone(), metrics.clone(), tx, reconnects, shutdown.clone()));
    let publisher = tokio::spawn(publish(js.clone(), metrics.clone(), rx));
    let queries = tokio::spawn(serve_queries(js.client(), shared, metrics, shutdown));
    tokio::spawn(async move {
        let _ = consumer.await;
        let _ = queries.await;
        // The consumer is gone, so the channel closes once the publisher took what is queued.
        if tokio::time::timeout(FINAL_FLUSH, publisher).await.is_err() {
            tracing::warn!("group receipt ticks still unpublished at shutdown; the next start emits them again");
        }
    })
}

/// Where the consumer is in which stream.
#[derive(Debug, Default)]
struct Position {
    /// Creation time of the stream the book was built from (ns since the epoch).
    created: Option<i128>,
    /// Next stream sequence to apply.
    next: u64,
}

/// Follows RECEIPTS into the book until `shutdown` turns true, re-creating the consumer after
/// failures.
async fn consume(
    js: jetstream::Context,
    shared: Arc<Shared>,
    metrics: Metrics,
    ticks: mpsc::Sender<Tick>,
    mut reconnects: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pos = Position::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut progressed = false;
        let res = tokio::select! {
            r = follow(&js, &shared, &metrics, &ticks, &mut reconnects, &mut pos, &mut progressed) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match res {
            Ok(()) => tracing::warn!("receipts consumer ended; re-creating it"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "receipts consumer failed; re-creating it"),
        }
        metrics.receipt_consumer_restarts.inc();
        if progressed {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One consumer, from creation until it ends or fails.
async fn follow(
    js: &jetstream::Context,
    shared: &Shared,
    metrics: &Metrics,
    ticks: &mpsc::Sender<Tick>,
    reconnects: &mut watch::Receiver<u64>,
    pos: &mut Position,
    progressed: &mut bool,
) -> anyhow::Result<()> {
    let stream = js.get_stream(subjects::RECEIPTS_STREAM).await.context("opening the RECEIPTS stream")?;
    let created = stream.cached_info().created.unix_timestamp_nanos();
    if pos.created != Some(created) {
        if pos.created.is_some() {
            tracing::warn!("the RECEIPTS stream was re-created; rebuilding group receipts from it");
        }
        shared.set_caught_up(false);
        let mut book = shared.book();
        book.reset();
        metrics.receipt_entries.set(0);
        *pos = Position { created: Some(created), next: 1 };
    }
    let deliver_policy =
        if pos.next <= 1 { DeliverPolicy::All } else { DeliverPolicy::ByStartSequence { start_sequence: pos.next } };
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            description: Some("storage: group receipts".to_owned()),
            replay_policy: ReplayPolicy::Instant,
            deliver_policy,
            ..Default::default()
        })
        .await
        .context("creating the receipts consumer")?;
    if !shared.is_caught_up() {
        tracing::info!(events = consumer.cached_info().num_pending, "rebuilding group receipts");
        if consumer.cached_info().num_pending == 0 {
            caught_up(shared);
        }
    }
    let mut messages = consumer.messages().await.context("reading the receipts consumer")?;
    let mut identity = Identity { created, missing: 0 };
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconnects_open = true;
    reconnects.mark_unchanged();
    let mut due = Vec::new();
    loop {
        // `next` on a stream is cancel-safe: nothing is lost when another branch wins the race.
        let msg = tokio::select! {
            m = messages.next() => m,
            _ = expire.tick() => {
                expire_old(shared, metrics);
                continue;
            }
            _ = check.tick() => {
                identity.check(js).await?;
                continue;
            }
            changed = reconnects.changed(), if reconnects_open => {
                reconnects_open = changed.is_ok();
                identity.check(js).await?;
                continue;
            }
        };
        let Some(msg) = msg else {
            return Ok(());
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) if e.kind() == OrderedErrorKind::MissingHeartbeat => {
                // The ordered consumer re-creates itself from where it was; nothing was lost.
                tracing::info!(error = %e, "receipts consumer interrupted; it resumes by itself");
                continue;
            }
            Err(e) => return Err(e).context("reading the receipts consumer"),
        };
        *progressed = true;
        let (seq, pending, at_ms) = match msg.info() {
            // When the event was stored: ages and tick times follow the stream, not the replay.
            Ok(i) => (
                i.stream_sequence,
                i.pending,
                u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "receipt event without stream metadata; skipped");
                continue;
            }
        };
        if seq < pos.next {
            // Already applied (a redelivery); applying again would be harmless but counted twice.
            continue;
        }
        pos.next = seq.saturating_add(1);
        apply(shared, metrics, &msg.payload, at_ms, &mut due);
        for t in due.drain(..) {
            if ticks.send(t).await.is_err() {
                // The publisher is gone: shutting down.
                return Ok(());
            }
        }
        if pending == 0 && !shared.is_caught_up() {
            caught_up(shared);
        }
    }
}

fn caught_up(shared: &Shared) {
    shared.set_caught_up(true);
    let b = shared.book();
    tracing::info!(pending = b.entries(), completed = b.done_entries(), "group receipts rebuilt; answering queries");
}

/// Applies one stored event; ticks now due are appended to `due`.
fn apply(shared: &Shared, metrics: &Metrics, payload: &[u8], at_ms: u64, due: &mut Vec<Tick>) {
    let ev: ReceiptEvent = match serde_json::from_slice(payload) {
        Ok(ev) => ev,
        Err(e) => {
            metrics.receipt_event("invalid");
            tracing::warn!(error = %e, "unreadable receipt event; skipped");
            return;
        }
    };
    let kind = match &ev {
        ReceiptEvent::Sent { .. } => "sent",
        ReceiptEvent::Delivered { .. } => "delivered",
        ReceiptEvent::Read { .. } => "read",
    };
    let mut book = shared.book();
    let evictions = book.evictions();
    match book.apply(&ev, at_ms, due) {
        Ok(()) => metrics.receipt_event(kind),
        Err(e) => {
            metrics.receipt_event("invalid");
            tracing::warn!(kind, error = %e, "receipt event rejected");
        }
    }
    metrics.receipt_evictions.inc_by(book.evictions() - evictions);
    metrics.receipt_entries.set(book.entries() as i64);
}

fn expire_old(shared: &Shared, metrics: &Metrics) {
    let mut book = shared.book();
    let evictions = book.evictions();
    let n = book.expire(protocol::now_ms());
    metrics.receipt_evictions.inc_by(book.evictions() - evictions);
    metrics.receipt_entries.set(book.entries() as i64);
    if n > 0 {
        tracing::info!(messages = n, "dropped group messages whose receipts were incomplete past the max age");
    }
}

/// The identity of the stream the book was built from.
struct Identity {
    created: i128,
    /// Consecutive checks that found no stream.
    missing: u32,
}

impl Identity {
    /// Fails if the stream was replaced or is gone, so the book is rebuilt. An unreachable server
    /// changes nothing.
    async fn check(&mut self, js: &jetstream::Context) -> anyhow::Result<()> {
        match js.get_stream(subjects::RECEIPTS_STREAM).await {
            Ok(s) if s.cached_info().created.unix_timestamp_nanos() != self.created => {
                anyhow::bail!("the RECEIPTS stream was re-created")
            }
            Ok(_) => self.missing = 0,
            Err(e) if is_not_found(&e) => {
                self.missing += 1;
                if self.missing >= MISSING_CHECKS {
                    anyhow::bail!("the RECEIPTS stream is gone");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot check the RECEIPTS stream"),
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

/// The outcome of one publish attempt: the tick, its attempt number, and whether JetStream
/// reported it as a duplicate.
type Attempt = Pin<Box<dyn Future<Output = (Tick, u32, Result<bool, String>)> + Send>>;

/// Publishes ticks from `rx` into the senders' inboxes until the channel closes and every publish
/// in flight has finished.
async fn publish(js: jetstream::Context, metrics: Metrics, mut rx: mpsc::Receiver<Tick>) {
    let mut in_flight: FuturesUnordered<Attempt> = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            t = rx.recv(), if open && in_flight.len() < MAX_IN_FLIGHT => match t {
                Some(t) => {
                    let attempt = send(&js, t, 1).await;
                    in_flight.push(attempt);
                }
                None => open = false,
            },
            Some((tick, attempt, res)) = in_flight.next(), if !in_flight.is_empty() => match res {
                Ok(duplicate) => {
                    if duplicate {
                        metrics.group_receipt_duplicates.inc();
                    } else {
                        metrics.group_receipt_emitted(tick.status);
                    }
                }
                Err(e) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(error = %e, id = tick.dedup_id(), attempt, "group receipt publish failed; retrying");
                    in_flight.push(retry(js.clone(), tick, attempt + 1));
                }
                Err(e) => {
                    metrics.group_receipt_errors.inc();
                    tracing::error!(error = %e, id = tick.dedup_id(), "group receipt given up after {attempt} attempts");
                }
            },
            else => break,
        }
    }
}

fn message(t: &Tick) -> PublishMessage {
    PublishMessage::build().message_id(t.dedup_id()).payload(t.item().to_bytes().into())
}

/// Hands the publish to the connection now (so ticks go out in order) and returns the wait for
/// its acknowledgement.
async fn send(js: &jetstream::Context, t: Tick, attempt: u32) -> Attempt {
    match js.send_publish(t.subject(), message(&t)).await {
        Ok(ack) => Box::pin(async move {
            let res = ack.await.map(|a| a.duplicate).map_err(|e| e.to_string());
            (t, attempt, res)
        }),
        Err(e) => Box::pin(async move { (t, attempt, Err(e.to_string())) }),
    }
}

/// Publishes again after a backoff.
fn retry(js: jetstream::Context, t: Tick, attempt: u32) -> Attempt {
    let delay = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(10))).min(MAX_BACKOFF);
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        let res = async {
            let ack = js.send_publish(t.subject(), message(&t)).await?.await?;
            Ok::<_, jetstream::context::PublishError>(ack.duplicate)
        }
        .await;
        (t, attempt, res.map_err(|e| e.to_string()))
    })
}

/// Answers `svc.receipts` (queue group `storage`) until `shutdown` turns true.
async fn serve_queries(
    client: async_nats::Client,
    shared: Arc<Shared>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut sub = loop {
        match client.queue_subscribe(subjects::RECEIPT_QUERY_SERVICE, QUERY_QUEUE_GROUP.to_owned()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to the receipts query service; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let Some(msg) = msg else {
            break;
        };
        metrics.receipt_queries.inc();
        let Some(reply_to) = msg.reply else {
            continue;
        };
        let body = answer(&shared, &msg.payload, protocol::now_ms());
        if let Err(e) = client.publish(reply_to, body.into()).await {
            tracing::debug!(error = %e, "receipts query reply failed");
        }
    }
    // Let the other instances of the queue group take the queries from now on.
    let _ = sub.unsubscribe().await;
}

/// The reply to one `WhoReadRequest` payload.
fn answer(shared: &Shared, payload: &[u8], now_ms: u64) -> Vec<u8> {
    let error = |code, msg: &str| WhoReadReply::Error { code, msg: msg.to_owned() };
    let reply = match serde_json::from_slice::<WhoReadRequest>(payload) {
        Err(_) => error(ErrorCode::BadJson, "expected {\"by\",\"group\",\"sid\"}"),
        Ok(req) if GroupId::parse(&req.group).is_err() => error(ErrorCode::BadField, "invalid group id"),
        Ok(_) if !shared.is_caught_up() => {
            error(ErrorCode::Unavailable, "group receipts are being rebuilt; retry shortly")
        }
        Ok(req) => match shared.book().who(&req.group, req.sid, now_ms) {
            Some(w) => WhoReadReply::Receipts { recipients: w.recipients, delivered: w.delivered, read: w.read },
            None => error(ErrorCode::NotFound, "unknown group message"),
        },
    };
    // A reply of strings and numbers always serialises.
    serde_json::to_vec(&reply).unwrap_or_default()
}

impl Metrics {
    fn receipt_event(&self, kind: &'static str) {
        self.receipt_events.get_or_create(&[("kind", kind)]).inc();
    }

    fn group_receipt_emitted(&self, status: ReceiptStatus) {
        self.group_receipts_emitted.get_or_create(&[("status", status.as_str())]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipt_book::BookConfig;

    fn shared() -> Shared {
        Shared::new(ReceiptBook::new(BookConfig::default()))
    }

    fn ev(e: ReceiptEvent) -> Vec<u8> {
        serde_json::to_vec(&e).unwrap()
    }

    fn ask(s: &Shared, group: &str, sid: u64) -> WhoReadReply {
        let req = WhoReadRequest { by: "bob".into(), group: group.into(), sid };
        serde_json::from_slice(&answer(s, &serde_json::to_vec(&req).unwrap(), 1_000)).unwrap()
    }

    #[test]
    fn applies_stored_events_and_counts_them() {
        let s = shared();
        let (m, r) = Metrics::new();
        let mut due = Vec::new();
        let sent = ReceiptEvent::Sent {
            group: "g".into(),
            sid: 4,
            sender: "alice".into(),
            recipients: vec!["bob".into(), "carol".into()],
        };
        apply(&s, &m, &ev(sent), 500, &mut due);
        apply(&s, &m, &ev(ReceiptEvent::Read { group: "g".into(), by: "bob".into(), up_to: 4 }), 600, &mut due);
        apply(&s, &m, b"{not json", 700, &mut due);
        apply(&s, &m, &ev(ReceiptEvent::Read { group: "g.*".into(), by: "bob".into(), up_to: 4 }), 700, &mut due);
        assert!(due.is_empty());
        apply(&s, &m, &ev(ReceiptEvent::Delivered { group: "g".into(), by: "carol".into(), up_to: 9 }), 800, &mut due);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].status, due[0].ts, due[0].sender.as_str()), (ReceiptStatus::Delivered, 800, "alice"));
        let text = telemetry::encode_registry(&r);
        for line in [
            "storage_receipt_events_total{kind=\"sent\"} 1",
            "storage_receipt_events_total{kind=\"read\"} 1",
            "storage_receipt_events_total{kind=\"delivered\"} 1",
            "storage_receipt_events_total{kind=\"invalid\"} 2",
            "storage_receipt_entries 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn queries_wait_for_the_rebuild_then_answer() {
        let s = shared();
        let (m, _) = Metrics::new();
        let sent = ReceiptEvent::Sent {
            group: "g".into(),
            sid: 4,
            sender: "alice".into(),
            recipients: vec!["carol".into(), "bob".into()],
        };
        apply(&s, &m, &ev(sent), 500, &mut Vec::new());
        let err = |code| matches!(ask(&s, "g", 4), WhoReadReply::Error { code: c, .. } if c == code);
        assert!(err(ErrorCode::Unavailable));
        s.set_caught_up(true);
        assert_eq!(ask(&s, "g", 4), WhoReadReply::Receipts { recipients: 2, delivered: vec![], read: vec![] });
        apply(
            &s,
            &m,
            &ev(ReceiptEvent::Read { group: "g".into(), by: "carol".into(), up_to: 4 }),
            600,
            &mut Vec::new(),
        );
        assert_eq!(
            ask(&s, "g", 4),
            WhoReadReply::Receipts { recipients: 2, delivered: vec!["carol".into()], read: vec!["carol".into()] }
        );
        assert!(matches!(ask(&s, "g", 5), WhoReadReply::Error { code: ErrorCode::NotFound, .. }));
        assert!(matches!(ask(&s, "a.b", 4), WhoReadReply::Error { code: ErrorCode::BadField, .. }));
        let bad: WhoReadReply = serde_json::from_slice(&answer(&s, b"[]", 0)).unwrap();
        assert!(matches!(bad, WhoReadReply::Error { code: ErrorCode::BadJson, .. }));
    }
}
