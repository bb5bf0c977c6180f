//! Push notifications over NATS: follows KV `presence` and `gateways` into an [`OnlineView`],
//! reads the headers of everything stored in INBOX, and publishes the [`PushDebouncer`]'s events
//! on core NATS `push.<user>` (see storage/README.md for the contract).
//!
//! **The INBOX consumer.** A durable pull consumer ([`CONSUMER`]) with `headers_only` (the
//! bodies never leave the server), deliver policy "new" when first created, and ack policy
//! "none". No acks because a push is a best-effort hint: acknowledging every inbox message would
//! add a request per stored item on the busiest stream, and redelivering after a crash would only
//! re-count items (duplicate pushes). Durable because a restart then resumes where the previous
//! run stopped, so items stored while storage was down are still announced; at most the batch a
//! dying process had pulled is lost. Several storage instances share the consumer (each item goes
//! to one of them); each debounces what it sees, so a user can get one event per window per
//! instance.
//!
//! **Loading first.** Until both buckets are loaded (every current value delivered), no item is
//! read: a half-loaded view would announce items to users who are online. The consumer keeps
//! them meanwhile. The watches survive reconnects and server restarts by themselves but not a
//! bucket or stream created anew (a server that came back empty), so, like the cursors watcher,
//! the streams' creation times are checked after every reconnect and periodically, and
//! everything is re-created if they changed. The debouncer survives that, so windows hold.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    kv,
};
use futures::StreamExt;
use protocol::subjects;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::push::{self, DebounceConfig, OnlineView, Outcome, PushDebouncer, PushEvent};

/// Durable name of the INBOX consumer.
pub const CONSUMER: &str = subjects::PUSH_NOTIFIER_CONSUMER;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often windows are ended (trailing events go out at most this late).
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How often the streams' identity is checked besides after reconnects.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Consecutive "stream not found" answers after which everything is re-created.
const MISSING_CHECKS: u32 = 3;

/// Settings, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct NotifierConfig {
    pub debounce: DebounceConfig,
    /// The gateways' presence timeout: a gateway whose beat is older is dead.
    pub presence_timeout: Duration,
}

/// Runs until `shutdown` turns true, re-creating watches and consumer after failures. Events
/// still waiting for the end of their window are dropped at shutdown.
pub async fn run(
    js: jetstream::Context,
    cfg: NotifierConfig,
    metrics: Metrics,
    mut reconnects: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    for reason in ["online", "debounced"] {
        let _ = metrics.push_suppressed.get_or_create(&[("reason", reason)]);
    }
    let mut state = State {
        view: OnlineView::new(cfg.presence_timeout.as_millis() as u64),
        debouncer: PushDebouncer::new(cfg.debounce),
        metrics,
        client: js.client(),
        events: Vec::new(),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut loaded = false;
        let res = tokio::select! {
            r = follow(&js, &mut state, &mut reconnects, &mut loaded) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match res {
            Ok(()) => tracing::warn!("push notifier input ended; re-creating it"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "push notifier failed; re-creating it"),
        }
        state.metrics.push_restarts.inc();
        if loaded {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

struct State {
    view: OnlineView,
    debouncer: PushDebouncer,
    metrics: Metrics,
    client: async_nats::Client,
    /// Reused buffer of trailing events.
    events: Vec<PushEvent>,
}

/// One set of watches and one consumer, until they end or fail. Sets `loaded` once both buckets
/// were loaded.
async fn follow(
    js: &jetstream::Context,
    st: &mut State,
    reconnects: &mut watch::Receiver<u64>,
    loaded: &mut bool,
) -> anyhow::Result<()> {
    let presence_kv = js.get_key_value(subjects::PRESENCE_BUCKET).await.context("opening the presence bucket")?;
    let gateways_kv = js.get_key_value(subjects::GATEWAYS_BUCKET).await.context("opening the gateways bucket")?;
    let mut identity = Identity::read(js).await?;
    st.view.reset();
    st.update_view_gauges();
    let mut presence = presence_kv.watch_with_history(">").await.context("watching the presence bucket")?;
    let mut gateways = gateways_kv.watch_with_history(">").await.context("watching the gateways bucket")?;
    // An empty bucket delivers nothing, so there is no "everything delivered" mark to wait for.
    let mut presence_loaded = identity.presence_empty;
    let mut gateways_loaded = identity.gateways_empty;
    let inbox = js.get_stream(subjects::INBOX_STREAM).await.context("opening the INBOX stream")?;
    let consumer = inbox
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.to_owned()),
            description: Some("storage: push notifications (headers of pushable inbox items)".to_owned()),
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::None,
            headers_only: true,
            filter_subject: subjects::INBOX_SUBJECTS.to_owned(),
            ..Default::default()
        })
        .await
        .context("creating the push-notifier consumer")?;
    let mut items: Option<pull::Stream> = None;
    tracing::info!("loading presence for push notifications");

    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconnects_open = true;
    reconnects.mark_unchanged();
    loop {
        if items.is_none() && presence_loaded && gateways_loaded {
            items = Some(consumer.messages().await.context("reading the push-notifier consumer")?);
            *loaded = true;
            tracing::info!(
                online_records = st.view.online_records(),
                gateways = st.view.gateways(),
                "presence loaded; push notifications on"
            );
        }
        // `next` on a stream is cancel-safe: nothing is lost when another branch wins the race.
        tokio::select! {
            entry = presence.next() => {
                let entry = watched(entry, "presence")?;
                if let Some(e) = entry {
                    let value = (e.operation == kv::Operation::Put).then_some(&e.value[..]);
                    if let Err(err) = st.view.presence(&e.key, value) {
                        tracing::warn!(key = %e.key.escape_debug(), error = %err, "ignoring presence record");
                    }
                    presence_loaded |= e.seen_current;
                    st.update_view_gauges();
                }
            }
            entry = gateways.next() => {
                let entry = watched(entry, "gateways")?;
                if let Some(e) = entry {
                    let value = (e.operation == kv::Operation::Put).then_some(&e.value[..]);
                    if let Err(err) = st.view.beat(&e.key, value) {
                        tracing::warn!(key = %e.key.escape_debug(), error = %err, "ignoring gateway heartbeat");
                    }
                    gateways_loaded |= e.seen_current;
                    st.update_view_gauges();
                }
            }
            msg = async { items.as_mut().expect("checked by the guard").next().await }, if items.is_some() => {
                match msg {
                    None => return Ok(()),
                    Some(Ok(m)) => st.item(&m).await,
                    Some(Err(e)) if e.kind() == pull::MessagesErrorKind::MissingHeartbeat => {
                        // The stream issues a new pull request by itself.
                        tracing::info!(error = %e, "push-notifier consumer interrupted; it resumes by itself");
                    }
                    Some(Err(e)) => return Err(e).context("reading the push-notifier consumer"),
                }
            }
            _ = flush.tick() => st.flush().await,
            _ = check.tick() => {
                identity.check(js).await?;
                presence_loaded |= identity.presence_empty;
                gateways_loaded |= identity.gateways_empty;
            }
            changed = reconnects.changed(), if reconnects_open => {
                reconnects_open = changed.is_ok();
                identity.check(js).await?;
            }
        }
    }
}

/// An entry of a watch, `None` after a transient interruption; fails when the watch ended or
/// failed for good.
fn watched(entry: Option<Result<kv::Entry, kv::WatcherError>>, bucket: &str) -> anyhow::Result<Option<kv::Entry>> {
    match entry {
        None => anyhow::bail!("the {bucket} watch ended"),
        Some(Ok(e)) => Ok(Some(e)),
        Some(Err(e)) if crate::watcher::is_transient(&e) => {
            tracing::info!(error = %e, bucket, "watch interrupted; it resumes by itself");
            Ok(None)
        }
        Some(Err(e)) => Err(e).with_context(|| format!("reading the {bucket} watch")),
    }
}

impl State {
    /// One INBOX message (headers only).
    async fn item(&mut self, msg: &jetstream::Message) {
        let pushable =
            msg.headers.as_ref().and_then(|h| h.get(push::PUSH_HEADER)).is_some_and(|v| push::wants_push(v.as_str()));
        if !pushable {
            return;
        }
        let Some(user) = subjects::user_of(msg.subject.as_str()) else {
            return;
        };
        let seq = match msg.info() {
            Ok(i) => i.stream_sequence,
            Err(e) => {
                tracing::warn!(error = %e, "inbox item without stream metadata; no push");
                return;
            }
        };
        let now = protocol::now_ms();
        let online = self.view.is_online(user, now);
        let evictions = self.debouncer.evictions();
        match self.debouncer.offer(user, seq, online, now) {
            Outcome::Event(ev) => self.publish(&ev).await,
            Outcome::Debounced => self.suppressed("debounced"),
            Outcome::Online => self.suppressed("online"),
        }
        self.metrics.push_evictions.inc_by(self.debouncer.evictions() - evictions);
        self.metrics.push_tracked_users.set(self.debouncer.tracked_users() as i64);
    }

    /// Ends the windows that are over and publishes their trailing events.
    async fn flush(&mut self) {
        let now = protocol::now_ms();
        let mut events = std::mem::take(&mut self.events);
        self.debouncer.due(now, |u| self.view.is_online(u, now), &mut events);
        for ev in events.drain(..) {
            self.publish(&ev).await;
        }
        self.events = events;
        self.metrics.push_tracked_users.set(self.debouncer.tracked_users() as i64);
    }

    async fn publish(&self, ev: &PushEvent) {
        match self.client.publish(subjects::push(&ev.user), ev.to_json().into()).await {
            Ok(()) => {
                self.metrics.push_events.inc();
            }
            Err(e) => tracing::debug!(error = %e, "push event not published"),
        }
    }

    fn suppressed(&self, reason: &'static str) {
        self.metrics.push_suppressed.get_or_create(&[("reason", reason)]).inc();
    }

    fn update_view_gauges(&self) {
        self.metrics.push_online_records.set(self.view.online_records() as i64);
        self.metrics.push_gateways.set(self.view.gateways() as i64);
    }
}

/// The streams the view and the consumer were built from, by creation time.
struct Identity {
    created: [i128; 3],
    /// Whether the buckets held nothing (at the last check).
    presence_empty: bool,
    gateways_empty: bool,
    /// Consecutive checks that found a stream missing.
    missing: u32,
}

const STREAMS: [&str; 3] = ["KV_presence", "KV_gateways", subjects::INBOX_STREAM];

impl Identity {
    async fn read(js: &jetstream::Context) -> anyhow::Result<Self> {
        debug_assert_eq!(STREAMS[0], format!("KV_{}", subjects::PRESENCE_BUCKET));
        debug_assert_eq!(STREAMS[1], format!("KV_{}", subjects::GATEWAYS_BUCKET));
        let mut created = [0; 3];
        let mut empty = [false; 3];
        for (i, name) in STREAMS.iter().enumerate() {
            let s = js.get_stream(*name).await.with_context(|| format!("reading stream {name}"))?;
            let info = s.cached_info();
            created[i] = info.created.unix_timestamp_nanos();
            empty[i] = info.state.messages == 0;
        }
        Ok(Identity { created, presence_empty: empty[0], gateways_empty: empty[1], missing: 0 })
    }

    /// Fails if a stream was replaced or is gone, so everything is re-created. An unreachable
    /// server changes nothing.
    async fn check(&mut self, js: &jetstream::Context) -> anyhow::Result<()> {
        match Identity::read(js).await {
            Ok(now) if now.created != self.created => anyhow::bail!("a stream was re-created"),
            Ok(now) => {
                self.missing = 0;
                self.presence_empty = now.presence_empty;
                self.gateways_empty = now.gateways_empty;
            }
            Err(e) if is_not_found(&e) => {
                self.missing += 1;
                if self.missing >= MISSING_CHECKS {
                    anyhow::bail!("a stream is gone");
                }
            }
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "cannot check the push notifier's streams"),
        }
        Ok(())
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<jetstream::context::GetStreamError>().is_some_and(|e| {
            matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            )
        })
    })
}
