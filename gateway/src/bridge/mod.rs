//! The bridge between the glommio executors and NATS. async-nats is a tokio library, so it runs
//! on a thread of its own with a current-thread tokio runtime; executors talk to it through
//! runtime-neutral channels (flume for commands and events, futures' oneshot for replies).
//!
//! The bridge owns:
//! * publishing to JetStream, answering each publish with its PubAck (sequence, duplicate);
//! * live interest: one core NATS subscription on `live.<user>` per user connected to this
//!   gateway, shared by all of the user's connections on all executors, held by the live
//!   multiplexer ([`live_mux`]: its own NATS connection, a map entry per user), and the
//!   forwarding of live copies to the executors that want them, with a bound on each executor's
//!   queue (overflow drops the copy and resyncs that executor's connections);
//! * inbox reads for drains, device cursors (debounced writes) and delivery receipts (coalesced
//!   per conversation);
//! * connection events: after the live multiplexer reconnects (and has every subscription back)
//!   every connection is told to resync from its inbox, since live copies may have been lost
//!   meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use futures::channel::oneshot;
use fxhash::FxHashMap;
use protocol::groups::{
    GroupReply, GroupRequest, GroupState, ReceiptEvent, UserSettings, WhoReadReply, WhoReadRequest,
};
use protocol::item::{InboxItem, ReceiptStatus};
use protocol::{ids, subjects, Conversation, DeviceId, GroupId, PresenceView, ServerFrame, UserId};

use crate::metrics::Metrics;
use crate::presence::{self, PresenceCmd};
use crate::readiness::Readiness;

mod groups;
mod kv;
pub mod live_mux;
mod open;
mod publish;

use groups::*;
use kv::*;
use live_mux::{LiveDelivery, LiveKind, LiveMux, MuxConfig, MuxEvent};
use open::OpenReads;
use publish::*;

/// Live copies queued for one executor beyond which further copies are dropped (and that
/// executor's connections resync from their inboxes): an executor that stops keeping up cannot
/// make the bridge buffer without bound.
const EXEC_QUEUE_LIMIT: usize = 65_536;

/// Settings the bridge needs from the gateway's config.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub nats: bus::NatsArgs,
    pub gateway_id: String,
    pub cursor_flush: Duration,
    pub receipt_flush: Duration,
    /// How often this gateway writes its heartbeat.
    pub presence_beat: Duration,
    /// A gateway silent this long is dead, and its users offline.
    pub presence_timeout: Duration,
}

/// A page of history: (history position, stored item) oldest first, and whether it was full.
pub type HistoryPage = (Vec<(u64, Bytes)>, bool);

/// A message stored by JetStream.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    pub seq: u64,
    pub duplicate: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishFailure {
    /// JetStream did not confirm in time or is unreachable: the message may or may not be
    /// stored, and a retry with the same id is safe.
    Unavailable,
    Internal,
    /// The group does not exist.
    NotFound,
    /// The sender is not a member of the group.
    Forbidden,
}

pub enum Command {
    Publish {
        subject: String,
        msg_id: String,
        payload: Bytes,
        mirrors: Vec<Mirror>,
        /// Stored with `Chat-Push: 1`: storage announces it if the recipient has no live device.
        push: bool,
        reply: oneshot::Sender<Result<Stored, PublishFailure>>,
    },
    /// A connection of `user`'s `device` on executor `exec` opens: subscribe to live copies
    /// and, meanwhile, read the device's cursor (registering the device when new), count the
    /// user's devices and read its settings; once the server has confirmed the subscription,
    /// read the first drain batch (when the drain starts at the cursor: `since` ≤ cursor), so
    /// that nothing stored after the subscription can be missed. One command and one reply per
    /// connection, the reads concurrent.
    Open {
        user: UserId,
        device: DeviceId,
        exec: usize,
        since: u64,
        prefetch: usize,
        reply: oneshot::Sender<Result<Opened, OpenFailure>>,
    },
    Unsubscribe {
        user: UserId,
        exec: usize,
    },
    Fetch {
        user: UserId,
        after: u64,
        max: usize,
        reply: oneshot::Sender<anyhow::Result<Vec<bus::inbox::StoredItem>>>,
    },
    /// Record a device's cursor: debounced, or at once with `now` (a closing connection).
    Cursor {
        user: UserId,
        device: DeviceId,
        seq: u64,
        now: bool,
    },
    /// `by` has received (or read) every message of `to`'s up to sid `up_to`.
    Receipt {
        by: UserId,
        to: String,
        status: ReceiptStatus,
        up_to: u64,
    },
    /// `by` has received (or read) every message of `group` up to group sid `up_to`.
    GroupReceipt {
        by: UserId,
        group: String,
        status: ReceiptStatus,
        up_to: u64,
    },
    /// Publish a group post after checking that the sender is a member.
    GroupPublish {
        group: GroupId,
        sender: UserId,
        msg_id: String,
        payload: Bytes,
        mirrors: Vec<Mirror>,
        reply: oneshot::Sender<Result<Stored, PublishFailure>>,
    },
    /// Is `user` a member of `group`?
    GroupCheck {
        group: GroupId,
        user: UserId,
        reply: oneshot::Sender<Result<(), PublishFailure>>,
    },
    /// A membership operation, served by the router.
    GroupOp {
        req: GroupRequest,
        reply: oneshot::Sender<Result<GroupReply, PublishFailure>>,
    },
    /// Who received and read a group message, served by storage.
    WhoRead {
        req: WhoReadRequest,
        reply: oneshot::Sender<Result<WhoReadReply, PublishFailure>>,
    },
    /// Online / last seen of these users.
    PresenceQuery {
        users: Vec<UserId>,
        reply: oneshot::Sender<Vec<PresenceView>>,
    },
    /// Executor `exec` pushes presence changes of `user` to a connection (or stops).
    PresenceWatch {
        user: UserId,
        exec: usize,
        on: bool,
    },
    /// `from` is typing in `conv`: an ephemeral frame to the online recipients.
    Typing {
        from: UserId,
        conv: Conversation,
    },
    /// `user` read `conv` up to `up_to` on device `dev`: tell the user's other devices.
    ReadMark {
        user: UserId,
        conv: Conversation,
        dev: String,
        up_to: u64,
    },
    /// The last sequence the INBOX stream has stored.
    InboxLastSeq {
        reply: oneshot::Sender<anyhow::Result<u64>>,
    },
    /// Read the user's settings, or change its history retention first.
    Settings {
        user: UserId,
        history_days: Option<u32>,
        reply: oneshot::Sender<Result<UserSettings, PublishFailure>>,
    },
    /// A page of `user`'s history of conversation `conv` (a history subject token).
    History {
        user: UserId,
        conv: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
        reply: oneshot::Sender<Result<HistoryPage, PublishFailure>>,
    },
    /// Tell every executor to drain.
    Drain,
}

/// What a connection needs to start, read by [`Command::Open`].
#[derive(Debug)]
pub struct Opened {
    /// The device's stored cursor (0 for a device registered now).
    pub cursor: u64,
    /// How many devices the user has registered, this one included.
    pub devices: usize,
    /// The user's history retention (0 when unset or unreadable).
    pub history_days: u32,
    /// The first drain batch after `cursor`, read after the subscription was confirmed; `None`
    /// when the client resumes beyond the cursor (the drain then starts elsewhere).
    pub first_batch: Option<Vec<bus::inbox::StoredItem>>,
}

/// Why [`Command::Open`] failed; either way the client is told to retry later.
#[derive(Debug)]
pub enum OpenFailure {
    /// The live subscription was not confirmed (the live connection is down).
    Subscription,
    /// A read from the backbone failed.
    Backbone(anyhow::Error),
}

/// A copy of a sent message kept after its PubAck, when its server id is known (in the sender's
/// own inbox, for its other devices and its history).
pub struct Mirror {
    pub subject: String,
    pub item: InboxItem,
    pub msg_id: String,
}

/// What the bridge sends an executor.
pub enum ExecEvent {
    Live {
        user: UserId,
        seq: u64,
        prev: u64,
        payload: Bytes,
    },
    /// A frame that is not stored (typing, presence): sent as it is to the connections of
    /// `user` (or, with `presence`, to the connections watching `user`'s presence).
    Ephemeral {
        user: UserId,
        frame: Bytes,
        presence: bool,
    },
    /// Live copies may have been lost: every connection resyncs from its inbox.
    ResyncAll,
    /// The gateway is shutting down: stop accepting and send clients elsewhere.
    Drain,
    /// Close `user`'s sessions authenticated with tokens issued before `before` (seconds).
    Revoke {
        user: UserId,
        before: u64,
    },
}

/// The executors' handle on the bridge. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Bridge {
    tx: flume::Sender<Command>,
}

impl Bridge {
    fn send(&self, cmd: Command) {
        // The bridge thread lives as long as the process; if it is gone the reply channel of
        // the command reports it as cancelled.
        let _ = self.tx.send(cmd);
    }

    /// See [`Command::Open`]. The subscription is taken even when this fails: the connection
    /// releases it with [`Bridge::unsubscribe`] however it ends.
    pub async fn open(
        &self,
        user: UserId,
        device: DeviceId,
        exec: usize,
        since: u64,
        prefetch: usize,
    ) -> Result<Opened, OpenFailure> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Open { user, device, exec, since, prefetch, reply });
        rx.await.unwrap_or_else(|_| Err(OpenFailure::Backbone(anyhow::anyhow!("bridge gone"))))
    }

    pub fn unsubscribe(&self, user: UserId, exec: usize) {
        self.send(Command::Unsubscribe { user, exec });
    }

    pub async fn fetch(&self, user: UserId, after: u64, max: usize) -> anyhow::Result<Vec<bus::inbox::StoredItem>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Fetch { user, after, max, reply });
        rx.await.context("bridge gone")?
    }

    pub fn cursor(&self, user: UserId, device: DeviceId, seq: u64, now: bool) {
        self.send(Command::Cursor { user, device, seq, now });
    }

    pub fn receipt(&self, by: UserId, to: String, status: ReceiptStatus, up_to: u64) {
        self.send(Command::Receipt { by, to, status, up_to });
    }

    pub fn group_receipt(&self, by: UserId, group: String, status: ReceiptStatus, up_to: u64) {
        self.send(Command::GroupReceipt { by, group, status, up_to });
    }

    /// Queues a publish; the returned receiver answers with the PubAck. Commands are taken in
    /// the order they are sent, which keeps a connection's messages in order.
    pub fn publish_cmd(
        &self,
        subject: String,
        msg_id: String,
        payload: Bytes,
        mirrors: Vec<Mirror>,
        push: bool,
    ) -> oneshot::Receiver<Result<Stored, PublishFailure>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Publish { subject, msg_id, payload, mirrors, push, reply });
        rx
    }

    pub async fn presence(&self, users: Vec<UserId>) -> Vec<PresenceView> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::PresenceQuery { users, reply });
        rx.await.unwrap_or_default()
    }

    pub fn presence_watch(&self, user: UserId, exec: usize, on: bool) {
        self.send(Command::PresenceWatch { user, exec, on });
    }

    pub fn typing(&self, from: UserId, conv: Conversation) {
        self.send(Command::Typing { from, conv });
    }

    pub fn read_mark(&self, user: UserId, conv: Conversation, dev: String, up_to: u64) {
        self.send(Command::ReadMark { user, conv, dev, up_to });
    }

    pub async fn inbox_last_seq(&self) -> anyhow::Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::InboxLastSeq { reply });
        rx.await.context("bridge gone")?
    }

    pub fn group_publish_cmd(
        &self,
        group: GroupId,
        sender: UserId,
        msg_id: String,
        payload: Bytes,
        mirrors: Vec<Mirror>,
    ) -> oneshot::Receiver<Result<Stored, PublishFailure>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::GroupPublish { group, sender, msg_id, payload, mirrors, reply });
        rx
    }

    pub async fn settings(&self, user: UserId, history_days: Option<u32>) -> Result<UserSettings, PublishFailure> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Settings { user, history_days, reply });
        rx.await.unwrap_or(Err(PublishFailure::Unavailable))
    }

    pub async fn history(
        &self,
        user: UserId,
        conv: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, PublishFailure> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::History { user, conv, before, after, limit, reply });
        rx.await.unwrap_or(Err(PublishFailure::Unavailable))
    }

    pub async fn group_check(&self, group: GroupId, user: UserId) -> Result<(), PublishFailure> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::GroupCheck { group, user, reply });
        rx.await.unwrap_or(Err(PublishFailure::Unavailable))
    }

    pub async fn group_op(&self, req: GroupRequest) -> Result<GroupReply, PublishFailure> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::GroupOp { req, reply });
        rx.await.unwrap_or(Err(PublishFailure::Unavailable))
    }

    pub async fn who_read(&self, req: WhoReadRequest) -> Result<WhoReadReply, PublishFailure> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::WhoRead { req, reply });
        rx.await.unwrap_or(Err(PublishFailure::Unavailable))
    }
}

/// Starts the bridge thread. Returns the handle and one event receiver per executor.
pub fn start(
    cfg: BridgeConfig,
    executors: usize,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    health: Arc<telemetry::Health>,
    metrics_addr: std::net::SocketAddr,
    revocations: Arc<crate::revocation::Revocations>,
) -> anyhow::Result<(Bridge, Vec<flume::Receiver<ExecEvent>>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = flume::unbounded();
    let (exec_tx, exec_rx): (Vec<_>, Vec<_>) = (0..executors).map(|_| flume::unbounded()).unzip();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = std::thread::Builder::new().name("nats-bridge".into()).spawn(move || {
        rt.block_on(async move {
            let render_metrics = metrics.clone();
            let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || render_metrics.render());
            if let Err(e) = telemetry::spawn(metrics_addr, render, health.clone()).await {
                tracing::error!(error = %e, "metrics endpoint failed to start");
                std::process::exit(1);
            }
            if let Err(e) = run(cfg, rx, exec_tx, metrics, ready, revocations).await {
                tracing::error!(error = %format!("{e:#}"), "bridge failed");
                std::process::exit(1);
            }
        })
    })?;
    Ok((Bridge { tx }, exec_rx, handle))
}

/// Live interest of this gateway in one user.
struct Interest {
    /// Connections per executor: (executor, count); nearly always one, kept inline.
    execs: smallvec::SmallVec<[(usize, u32); 1]>,
    /// The live multiplexer's subscription.
    sid: u64,
    /// Subscribers waiting until the server confirms the subscription.
    waiting: Option<Vec<oneshot::Sender<()>>>,
}

enum Internal {
    /// A receipt publish failed; retry it at the next flush.
    RetryReceipt(ReceiptKey, u64),
    /// A group's state was read from KV (None: no such group; Err: unavailable).
    GroupLoaded(String, Result<Option<GroupState>, ()>),
    /// A membership operation changed a group: trust the new state at once.
    GroupChanged(GroupState),
    /// KV `groups` changed (from any router): refresh the group if it is cached (None: deleted).
    GroupUpdated(String, Option<GroupState>),
}

/// A pending receipt: (reader, conversation partner or group, status, is it a group).
type ReceiptKey = (UserId, String, ReceiptStatus, bool);

async fn run(
    cfg: BridgeConfig,
    commands: flume::Receiver<Command>,
    exec_tx: Vec<flume::Sender<ExecEvent>>,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    revocations: Arc<crate::revocation::Revocations>,
) -> anyhow::Result<()> {
    // The live multiplexer dials on its own, in parallel with the main connection.
    let mux_cfg = MuxConfig { nats: cfg.nats.clone(), name: format!("gateway {} live", cfg.gateway_id) };
    let (mut mux, mut mux_events) = LiveMux::spawn(mux_cfg, metrics.clone(), ready.clone())?;
    let (ev_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let client =
        bus::connect(&cfg.nats, bus::Role::Gateway, &format!("gateway {}", cfg.gateway_id), Some(ev_tx)).await?;
    let js = jetstream::ContextBuilder::new()
        .ack_timeout(Duration::from_secs(5))
        .max_ack_inflight(20_000)
        .build(client.clone());
    bus::wait_ready(&js).await?;
    let kv = js.get_key_value(subjects::CURSORS_BUCKET).await?;
    // Inbox drains and KV listings share one reply subscription (no SUB/UNSUB per read).
    let direct = bus::inbox::DirectGets::new(&client).await?;
    ready.set_backbone(true);
    tracing::info!(gateway = %cfg.gateway_id, "bridge ready");

    let (int_tx, mut internal) = tokio::sync::mpsc::unbounded_channel::<Internal>();
    let mut interests: FxHashMap<UserId, Interest> = FxHashMap::default();
    let mut lagging = Lagging::new(exec_tx.len());
    let mut cursors: FxHashMap<(UserId, DeviceId), u64> = FxHashMap::default();
    let mut cursor_writer = CursorWriter::new(kv.clone(), metrics.clone());
    let mut receipts: FxHashMap<ReceiptKey, u64> = FxHashMap::default();
    let mut groups: FxHashMap<String, CachedGroup> = FxHashMap::default();
    let mut group_waits: FxHashMap<String, Vec<GroupWait>> = FxHashMap::default();
    let groups_kv = js.get_key_value(subjects::GROUPS_BUCKET).await?;
    let settings_kv = js.get_key_value(subjects::SETTINGS_BUCKET).await?;
    crate::revocation::spawn_watch(js.clone(), revocations, exec_tx.clone());
    spawn_group_watch(groups_kv.clone(), int_tx.clone());
    let mut read_marks: FxHashMap<(UserId, String, bool), (u64, String)> = FxHashMap::default();
    let presence = presence::spawn(
        client.clone(),
        js.clone(),
        cfg.gateway_id.clone(),
        exec_tx.clone(),
        metrics.clone(),
        cfg.presence_beat,
        cfg.presence_timeout,
    );
    let mut cursor_tick = tokio::time::interval(cfg.cursor_flush);
    let mut receipt_tick = tokio::time::interval(cfg.receipt_flush);
    let mut disconnected = false;

    loop {
        tokio::select! {
            cmd = commands.recv_async() => {
                let Ok(cmd) = cmd else { break };
                match cmd {
                    Command::Publish { subject, msg_id, payload, mirrors, push, reply } => {
                        publish(&js, &metrics, subject, msg_id, payload, mirrors, push, reply).await;
                    }
                    Command::PresenceQuery { users, reply } => {
                        let _ = presence.send(PresenceCmd::Query { users, reply });
                    }
                    Command::PresenceWatch { user, exec, on } => {
                        let _ = presence.send(if on { PresenceCmd::Watch { user, exec } } else { PresenceCmd::Unwatch { user, exec } });
                    }
                    Command::Typing { from, conv } => match conv {
                        Conversation::Direct(to) => {
                            metrics.typing_events.inc();
                            publish_ephemeral(&client, &to, ServerFrame::Typing { from: from.as_str(), group: None }.to_json()).await;
                        }
                        Conversation::Group(g) => {
                            let wait = GroupWait::Typing { from };
                            group_command(&js, &client, &metrics, &groups_kv, &int_tx, &mut groups, &mut group_waits, g.to_string(), wait).await;
                        }
                    },
                    Command::ReadMark { user, conv, dev, up_to } => {
                        let (key, is_group) = match conv {
                            Conversation::Direct(u) => (u.to_string(), false),
                            Conversation::Group(g) => (g.to_string(), true),
                        };
                        let e = read_marks.entry((user, key, is_group)).or_insert((0, dev.clone()));
                        if up_to > e.0 {
                            *e = (up_to, dev);
                        }
                    }
                    Command::Settings { user, history_days, reply } => {
                        let kv = settings_kv.clone();
                        tokio::spawn(async move { let _ = reply.send(settings(&kv, &user, history_days).await); });
                    }
                    Command::History { user, conv, before, after, limit, reply } => {
                        let client = client.clone();
                        tokio::spawn(async move {
                            let res = crate::history::page(&client, &subjects::history(user.as_str(), &conv), before, after, limit).await;
                            let _ = reply.send(res.map_err(|e| {
                                tracing::warn!(error = %format!("{e:#}"), "history read failed");
                                PublishFailure::Unavailable
                            }));
                        });
                    }
                    Command::InboxLastSeq { reply } => {
                        let js = js.clone();
                        tokio::spawn(async move {
                            let res = async {
                                let mut stream = js.get_stream(subjects::INBOX_STREAM).await?;
                                Ok::<_, anyhow::Error>(stream.info().await?.state.last_sequence)
                            }
                            .await;
                            let _ = reply.send(res);
                        });
                    }
                    Command::Open { user, device, exec, since, prefetch, reply } => {
                        // Every subscriber waits for a PING/PONG round trip on the live
                        // connection after the SUB: then the server has the interest, and a
                        // drain started afterwards cannot miss an item. A user already
                        // subscribed costs one more PING (batched with others).
                        let (confirmed_tx, confirmed) = oneshot::channel();
                        if let Some(i) = interests.get_mut(&user) {
                            match i.execs.iter_mut().find(|(e, _)| *e == exec) {
                                Some((_, n)) => *n += 1,
                                None => i.execs.push((exec, 1)),
                            }
                            match &mut i.waiting {
                                Some(w) => w.push(confirmed_tx),
                                None => {
                                    i.waiting = Some(vec![confirmed_tx]);
                                    mux.confirm(i.sid);
                                }
                            }
                        } else {
                            let sid = mux.subscribe(user.clone());
                            interests.insert(user.clone(), Interest { execs: smallvec::smallvec![(exec, 1)], sid, waiting: Some(vec![confirmed_tx]) });
                            let _ = presence.send(PresenceCmd::Online(user.clone()));
                            metrics.live_subscriptions.inc();
                        }
                        let reads = OpenReads { direct: direct.clone(), cursors: kv.clone(), settings: settings_kv.clone() };
                        tokio::spawn(async move {
                            let _ = reply.send(reads.open(&user, &device, confirmed, since, prefetch).await);
                        });
                    }
                    Command::Unsubscribe { user, exec } => {
                        let Some(i) = interests.get_mut(&user) else { continue };
                        if let Some(pos) = i.execs.iter().position(|(e, _)| *e == exec) {
                            i.execs[pos].1 -= 1;
                            if i.execs[pos].1 == 0 {
                                i.execs.swap_remove(pos);
                            }
                        }
                        if i.execs.is_empty() {
                            mux.unsubscribe(i.sid);
                            interests.remove(&user);
                            let _ = presence.send(PresenceCmd::Offline(user.clone()));
                            metrics.live_subscriptions.dec();
                        }
                    }
                    Command::Fetch { user, after, max, reply } => {
                        let direct = direct.clone();
                        tokio::spawn(async move {
                            let _ = reply.send(direct.fetch_after(&user, after, max).await);
                        });
                    }
                    Command::Cursor { user, device, seq, now } => {
                        let key = (user, device);
                        let seq = cursors.get(&key).copied().unwrap_or(0).max(seq);
                        if now {
                            cursors.remove(&key);
                            cursor_writer.put(key, seq);
                        } else {
                            cursors.insert(key, seq);
                        }
                    }
                    Command::Receipt { by, to, status, up_to } => {
                        let e = receipts.entry((by, to, status, false)).or_insert(0);
                        *e = (*e).max(up_to);
                    }
                    Command::GroupReceipt { by, group, status, up_to } => {
                        let e = receipts.entry((by, group, status, true)).or_insert(0);
                        *e = (*e).max(up_to);
                    }
                    Command::GroupPublish { group, sender, msg_id, payload, mirrors, reply } => {
                        let wait = GroupWait::Publish { sender, msg_id, payload, mirrors, reply };
                        group_command(&js, &client, &metrics, &groups_kv, &int_tx, &mut groups, &mut group_waits, group.to_string(), wait).await;
                    }
                    Command::GroupCheck { group, user, reply } => {
                        let wait = GroupWait::Check { user, reply };
                        group_command(&js, &client, &metrics, &groups_kv, &int_tx, &mut groups, &mut group_waits, group.to_string(), wait).await;
                    }
                    Command::GroupOp { req, reply } => {
                        let (client, int_tx) = (client.clone(), int_tx.clone());
                        tokio::spawn(async move {
                            let res = request_json::<_, GroupReply>(&client, subjects::GROUP_SERVICE, &req).await;
                            if let Ok(GroupReply::Group { group }) = &res {
                                let _ = int_tx.send(Internal::GroupChanged(group.clone()));
                            }
                            let _ = reply.send(res);
                        });
                    }
                    Command::WhoRead { req, reply } => {
                        let client = client.clone();
                        tokio::spawn(async move {
                            let _ = reply.send(request_json(&client, subjects::RECEIPT_QUERY_SERVICE, &req).await);
                        });
                    }
                    Command::Drain => {
                        for tx in &exec_tx {
                            let _ = tx.send(ExecEvent::Drain);
                        }
                    }
                }
            }
            Some(ev) = mux_events.recv() => match ev {
                MuxEvent::Live(d) => forward_live(&interests, &exec_tx, &mut lagging, &metrics, d),
                MuxEvent::Confirmed { user, sid, ok } => {
                    if let Some(i) = interests.get_mut(&user).filter(|i| i.sid == sid) {
                        // Dropping a waiter tells its connection the backbone is unavailable.
                        for w in i.waiting.take().unwrap_or_default() {
                            if ok { let _ = w.send(()); }
                        }
                    }
                }
                MuxEvent::Resubscribed => resync_all(&exec_tx),
            },
            _ = lagging.tick.tick(), if lagging.any() => lagging.release(&exec_tx),
            Some(int) = internal.recv() => match int {
                Internal::RetryReceipt(key, up_to) => {
                    let e = receipts.entry(key).or_insert(0);
                    *e = (*e).max(up_to);
                }
                Internal::GroupLoaded(gid, res) => {
                    let waiting = group_waits.remove(&gid).unwrap_or_default();
                    let members = match res {
                        Ok(state) => {
                            let members = state.map(|s| s.members);
                            if let Some(m) = &members {
                                cache_group(&mut groups, gid.clone(), m.clone());
                            }
                            Ok(members)
                        }
                        Err(()) => Err(PublishFailure::Unavailable),
                    };
                    for w in waiting {
                        let members = members.as_ref().map(|m| m.as_deref()).map_err(|e| *e);
                        run_group_wait(&js, &client, &metrics, &gid, members, w).await;
                    }
                }
                Internal::GroupChanged(state) => {
                    cache_group(&mut groups, state.gid, state.members);
                }
                Internal::GroupUpdated(gid, state) => match state {
                    // Only groups this gateway uses are kept; others are read when needed.
                    Some(s) if groups.contains_key(&gid) => cache_group(&mut groups, gid, s.members),
                    Some(_) => {}
                    None => {
                        groups.remove(&gid);
                    }
                },
            },
            // The main connection carries no live copies (the multiplexer does, and resyncs
            // after its own reconnects): its events only count and gate readiness.
            Some(ev) = events.recv() => match ev {
                async_nats::Event::Disconnected => { disconnected = true; ready.set_backbone(false); }
                async_nats::Event::Connected => {
                    ready.set_backbone(true);
                    if disconnected {
                        disconnected = false;
                        metrics.nats_reconnects.inc();
                    }
                }
                async_nats::Event::SlowConsumer(_) => { metrics.nats_slow_consumers.inc(); }
                _ => {}
            },
            _ = cursor_tick.tick(), if !cursors.is_empty() => {
                for (key, seq) in cursors.drain() {
                    cursor_writer.put(key, seq);
                }
            }
            _ = cursor_writer.progress(), if cursor_writer.pending() > 0 => {}
            _ = receipt_tick.tick(), if !receipts.is_empty() => {
                for (key, up_to) in receipts.drain() {
                    spawn_receipt(&js, &metrics, &int_tx, key, up_to);
                }
                for ((user, conv, is_group), (up_to, dev)) in read_marks.drain() {
                    let (conv, group) = if is_group { (None, Some(conv)) } else { (Some(conv), None) };
                    let item = InboxItem::ReadMark { conv, group, dev, up_to, ts: protocol::now_ms() };
                    let js = js.clone();
                    tokio::spawn(async move {
                        let res = async {
                            js.send_publish(subjects::inbox(&user), PublishMessage::build().payload(item.to_bytes().into())).await?.await
                        }
                        .await;
                        if let Err(e) = res {
                            tracing::warn!(error = %e, "read mark for other devices failed");
                        }
                    });
                }
            }
        }
    }
    Ok(())
}

fn forward_live(
    interests: &FxHashMap<UserId, Interest>,
    exec_tx: &[flume::Sender<ExecEvent>],
    lagging: &mut Lagging,
    metrics: &Metrics,
    d: LiveDelivery,
) {
    let Some(i) = interests.get(&d.user) else {
        return;
    };
    // A resync owed to an executor goes before any later copy.
    lagging.release(exec_tx);
    for (exec, _) in &i.execs {
        let tx = &exec_tx[*exec];
        if tx.len() >= EXEC_QUEUE_LIMIT {
            metrics.live_copies_dropped.inc();
            // A dropped typing frame needs no resync; a dropped stored item does.
            if matches!(d.kind, LiveKind::Stored { .. }) {
                lagging.mark(*exec);
            }
            continue;
        }
        let ev = match d.kind {
            LiveKind::Ephemeral => {
                ExecEvent::Ephemeral { user: d.user.clone(), frame: d.payload.clone(), presence: false }
            }
            LiveKind::Stored { seq, prev } => {
                ExecEvent::Live { user: d.user.clone(), seq, prev, payload: d.payload.clone() }
            }
        };
        let _ = tx.send(ev);
    }
}

/// Executors that had live copies dropped (their queue was full) and owe their connections a
/// resync, sent once their queue has room again.
struct Lagging {
    owed: Vec<bool>,
    tick: tokio::time::Interval,
}

impl Lagging {
    fn new(executors: usize) -> Lagging {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Lagging { owed: vec![false; executors], tick }
    }

    fn any(&self) -> bool {
        self.owed.iter().any(|o| *o)
    }

    fn mark(&mut self, exec: usize) {
        if !self.owed[exec] {
            tracing::warn!(
                executor = exec,
                limit = EXEC_QUEUE_LIMIT,
                "executor queue full: dropping live copies, its connections will resync"
            );
        }
        self.owed[exec] = true;
    }

    fn release(&mut self, exec_tx: &[flume::Sender<ExecEvent>]) {
        for (exec, owed) in self.owed.iter_mut().enumerate() {
            if *owed && exec_tx[exec].len() < EXEC_QUEUE_LIMIT {
                *owed = false;
                let _ = exec_tx[exec].send(ExecEvent::ResyncAll);
            }
        }
    }
}

fn resync_all(exec_tx: &[flume::Sender<ExecEvent>]) {
    for tx in exec_tx {
        let _ = tx.send(ExecEvent::ResyncAll);
    }
}

impl Bridge {
    /// Starts a graceful drain (SIGTERM): executors stop accepting and send clients elsewhere.
    pub fn drain(&self) {
        self.send(Command::Drain);
    }
}
