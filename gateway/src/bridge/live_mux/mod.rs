//! The live-subscription multiplexer: one NATS connection of its own, spoken directly in the core
//! client protocol, that holds the gateway's `live.<user>` subscriptions.
//!
//! Why not async-nats: every `async_nats::Subscriber` owns a tokio channel whose first block of
//! 32 message slots is allocated at once — about 5.4 KB of gateway memory per connected user
//! (bus/examples/subscription_cost.rs). Here a user's subscription is one `sid → user` map entry
//! (a few tens of bytes) and one SUB on the server, which keeps the interest exact per user, so
//! gateways still scale out horizontally.
//!
//! The bridge drives it with [`LiveMux::subscribe`] / [`LiveMux::confirm`] /
//! [`LiveMux::unsubscribe`] and reads [`MuxEvent`]s:
//! * a subscription is confirmed ([`MuxEvent::Confirmed`]) when the PONG of a PING sent after its
//!   SUB arrives — the server has the interest then, so a drain started afterwards misses nothing;
//!   a SUB the server refused (permissions) or one in flight when the connection drops is
//!   confirmed with `ok: false`;
//! * deliveries ([`MuxEvent::Live`]) carry what the executors need from the headers INBOX's
//!   RePublish sets (`Nats-Sequence`, `Nats-Last-Sequence`) or the `Chat-Ephemeral` marker;
//! * after a reconnect every subscription is sent again, confirmed with PING/PONG, and only then
//!   [`MuxEvent::Resubscribed`] tells the bridge to resync every connection from its inbox: what
//!   was stored during the outage is read from the inbox, what is stored afterwards comes live.
//!
//! Buffering is bounded: the event channel to the bridge has a fixed capacity and the task waits
//! for room (it stops reading the socket meanwhile), so a slow bridge pushes back onto the
//! server, which drops the connection as a slow consumer past its own bound — and the reconnect
//! resyncs. The read buffer holds at most one message (bounded by the server's `max_payload`).

mod dial;
pub mod proto;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fxhash::{FxHashMap, FxHashSet};
use protocol::{subjects, UserId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::readiness::Readiness;
use dial::{Connection, Dialer, ServerAddr, ServerInfo};
use proto::{HeaderBlock, ServerOp};

/// The header that marks an ephemeral frame (typing) on `live.<user>`.
pub const EPHEMERAL_HEADER: &str = "Chat-Ephemeral";
/// Events buffered towards the bridge before the multiplexer stops reading the socket.
const EVENT_CAPACITY: usize = 4096;
/// A keepalive PING this often when nothing else is pending.
const PING_INTERVAL: Duration = Duration::from_secs(20);
/// No PONG this long after a PING: the connection is dead (half-open TCP, stuck server).
const PONG_TIMEOUT: Duration = Duration::from_secs(30);
/// Writing a batch of operations may take this long before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands handled per batch (one PING confirms the SUBs of a whole batch).
const COMMAND_BATCH: usize = 1024;

/// Settings of the multiplexer.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    pub nats: bus::NatsArgs,
    /// The connection name servers show (`gateway <id> live`).
    pub name: String,
}

/// A live message for a subscribed user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDelivery {
    pub user: UserId,
    pub kind: LiveKind,
    pub payload: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveKind {
    /// A stored inbox item: its stream sequence and the user's previous one.
    Stored { seq: u64, prev: u64 },
    /// A frame that is not stored (typing).
    Ephemeral,
}

/// What the multiplexer tells the bridge.
#[derive(Debug)]
pub enum MuxEvent {
    Live(LiveDelivery),
    /// The subscription `sid` of `user` is in place on the server (or, `ok: false`, could not be
    /// confirmed: not connected, refused, or the connection dropped first).
    Confirmed {
        user: UserId,
        sid: u64,
        ok: bool,
    },
    /// The connection was re-established and every subscription confirmed again: live copies
    /// may have been lost meanwhile, every connection must resync from its inbox.
    Resubscribed,
}

enum Cmd {
    Subscribe { sid: u64, user: UserId },
    Confirm { sid: u64 },
    Unsubscribe { sid: u64 },
}

/// The bridge's handle on the multiplexer task.
pub struct LiveMux {
    tx: mpsc::UnboundedSender<Cmd>,
    next_sid: u64,
}

impl LiveMux {
    /// Starts the multiplexer task on the current tokio runtime. Fails at once on settings that
    /// can never work (URLs); connecting is retried forever in the background.
    pub fn spawn(
        cfg: MuxConfig,
        metrics: Arc<Metrics>,
        ready: Arc<Readiness>,
    ) -> anyhow::Result<(LiveMux, mpsc::Receiver<MuxEvent>)> {
        let servers = dial::parse_servers(&cfg.nats.url)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_CAPACITY);
        let task = Task {
            dialer: Arc::new(Dialer::new(cfg.name, cfg.nats)),
            servers,
            next_server: 0,
            cmds: rx,
            events: ev_tx,
            subs: FxHashMap::default(),
            metrics,
            ready,
        };
        tokio::spawn(task.run());
        Ok((LiveMux { tx, next_sid: 1 }, ev_rx))
    }

    /// Subscribes to `live.<user>` and asks for a confirmation; returns the subscription's id.
    pub fn subscribe(&mut self, user: UserId) -> u64 {
        let sid = self.next_sid;
        self.next_sid += 1;
        let _ = self.tx.send(Cmd::Subscribe { sid, user });
        sid
    }

    /// Asks for another confirmation of `sid` (a [`MuxEvent::Confirmed`] follows).
    pub fn confirm(&self, sid: u64) {
        let _ = self.tx.send(Cmd::Confirm { sid });
    }

    pub fn unsubscribe(&self, sid: u64) {
        let _ = self.tx.send(Cmd::Unsubscribe { sid });
    }
}

/// What a PONG answers, in the order the PINGs were sent.
enum Pending {
    Keepalive,
    /// These subscriptions were sent before the PING.
    Confirm(Vec<u64>),
    /// Every subscription was sent again after a reconnect.
    Resubscribed {
        reconnect: bool,
    },
}

/// Why a connection ended.
#[derive(Debug)]
enum Lost {
    Io(std::io::Error),
    Proto(proto::ProtoError),
    Closed,
    Stale,
    WriteTimeout,
    /// The bridge is gone: the gateway is shutting down.
    Shutdown,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Io(e) => write!(f, "I/O error: {e}"),
            Lost::Proto(e) => write!(f, "protocol error: {e}"),
            Lost::Closed => f.write_str("closed by the server"),
            Lost::Stale => write!(f, "no PONG within {PONG_TIMEOUT:?}"),
            Lost::WriteTimeout => write!(f, "a write took longer than {WRITE_TIMEOUT:?}"),
            Lost::Shutdown => f.write_str("shutting down"),
        }
    }
}

struct Task {
    dialer: Arc<Dialer>,
    servers: Vec<ServerAddr>,
    next_server: usize,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::Sender<MuxEvent>,
    /// Every subscription: re-sent after a reconnect.
    subs: FxHashMap<u64, UserId>,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
}

/// The state of one established connection (its read buffer is kept apart: parsed operations
/// borrow from it while this is updated).
struct Live {
    stream: dial::Stream,
    out: Vec<u8>,
    pending: VecDeque<(Pending, Instant)>,
    /// Subjects the server refused to subscribe since the last PONG (`-ERR 'Permissions
    /// Violation for Subscription to …'` arrives before the PONG of the PING after the SUB).
    denied: FxHashSet<String>,
    max_payload: usize,
}

impl Task {
    async fn run(mut self) {
        let mut connected_before = false;
        loop {
            let Some(conn) = self.connect().await else { return };
            self.metrics.live_mux_connected.set(1);
            if connected_before {
                self.metrics.live_mux_reconnects.inc();
            }
            tracing::info!(
                server_id = %conn.info.server_id,
                version = %conn.info.version,
                subscriptions = self.subs.len(),
                "live multiplexer connected"
            );
            let lost = self.serve(conn, connected_before).await;
            connected_before = true;
            self.metrics.live_mux_connected.set(0);
            self.ready.set_live(false);
            if let Lost::Shutdown = lost {
                return;
            }
            if let Lost::Proto(_) = lost {
                self.metrics.live_mux_error("protocol");
            }
            tracing::warn!(error = %lost, "live multiplexer lost its NATS connection; reconnecting");
        }
    }

    /// Dials the servers in turn with jittered exponential backoff until one completes the
    /// handshake, handling the bridge's commands meanwhile. None: the bridge is gone.
    async fn connect(&mut self) -> Option<Connection> {
        let mut attempt: u32 = 0;
        loop {
            let server = self.servers[self.next_server % self.servers.len()].clone();
            let (dialer, target) = (self.dialer.clone(), server.clone());
            let dial = async move { dialer.dial(&target).await };
            tokio::pin!(dial);
            let res = loop {
                tokio::select! {
                    res = &mut dial => break res,
                    cmd = self.cmds.recv() => {
                        let cmd = cmd?;
                        self.offline_command(cmd).await?;
                    }
                }
            };
            match res {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    self.metrics.live_mux_error("connect");
                    let msg = format!("{e:#}");
                    if msg.contains("Authorization Violation") || msg.contains("Permissions Violation") {
                        tracing::error!(server = ?server, error = %msg, "live multiplexer: NATS refused our credentials");
                    } else {
                        tracing::warn!(server = ?server, error = %msg, "live multiplexer: connecting to NATS failed");
                    }
                    self.next_server += 1;
                }
            }
            let pause = tokio::time::sleep(backoff(attempt));
            attempt = attempt.saturating_add(1);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    cmd = self.cmds.recv() => {
                        let cmd = cmd?;
                        self.offline_command(cmd).await?;
                    }
                }
            }
        }
    }

    /// A command while there is no connection: bookkeeping only, confirmations fail.
    async fn offline_command(&mut self, cmd: Cmd) -> Option<()> {
        match cmd {
            Cmd::Subscribe { sid, user } => {
                self.subs.insert(sid, user.clone());
                self.emit(MuxEvent::Confirmed { user, sid, ok: false }).await?;
            }
            Cmd::Confirm { sid } => {
                if let Some(user) = self.subs.get(&sid).cloned() {
                    self.emit(MuxEvent::Confirmed { user, sid, ok: false }).await?;
                }
            }
            Cmd::Unsubscribe { sid } => {
                self.subs.remove(&sid);
            }
        }
        Some(())
    }

    async fn emit(&self, ev: MuxEvent) -> Option<()> {
        self.events.send(ev).await.ok()
    }

    /// Runs one connection until it fails: sends every subscription again, then serves
    /// commands, reads, and keepalives.
    async fn serve(&mut self, conn: Connection, reconnect: bool) -> Lost {
        let max_payload = conn.info.max_payload();
        self.learn_servers(&conn.info);
        let mut rbuf = conn.read_buf;
        let mut live = Live {
            stream: conn.stream,
            out: Vec::with_capacity(64 * 1024),
            pending: VecDeque::new(),
            denied: FxHashSet::default(),
            max_payload,
        };
        for (sid, user) in &self.subs {
            let _ = proto::encode::sub(&mut live.out, &subjects::live(user), *sid);
            if live.out.len() >= 64 * 1024 {
                if let Err(e) = live.flush().await {
                    return e;
                }
            }
        }
        live.ping(Pending::Resubscribed { reconnect });
        let mut keepalive = tokio::time::interval(PING_INTERVAL);
        keepalive.tick().await;
        let res = loop {
            if let Err(e) = live.flush().await {
                break e;
            }
            if rbuf.capacity() - rbuf.len() < 16 * 1024 {
                rbuf.reserve(64 * 1024);
            }
            tokio::select! {
                read = live.stream.read_buf(&mut rbuf) => match read {
                    Ok(0) => break Lost::Closed,
                    Ok(_) => {
                        if let Err(e) = self.process(&mut live, &mut rbuf).await {
                            break e;
                        }
                    }
                    Err(e) => break Lost::Io(e),
                },
                cmd = self.cmds.recv() => {
                    let Some(cmd) = cmd else { break Lost::Shutdown };
                    for ev in self.online_commands(&mut live, cmd) {
                        if self.emit(ev).await.is_none() {
                            return Lost::Shutdown;
                        }
                    }
                }
                _ = keepalive.tick() => {
                    if live.pending.front().is_some_and(|(_, sent)| sent.elapsed() >= PONG_TIMEOUT) {
                        break Lost::Stale;
                    }
                    if live.pending.is_empty() {
                        live.ping(Pending::Keepalive);
                    }
                }
            }
        };
        // Confirmations in flight will never come: the connections waiting for them fail (and
        // retry); their subscriptions are sent again on the next connection.
        for (p, _) in live.pending.drain(..) {
            if let Pending::Confirm(sids) = p {
                for sid in sids {
                    if let Some(user) = self.subs.get(&sid).cloned() {
                        if self.emit(MuxEvent::Confirmed { user, sid, ok: false }).await.is_none() {
                            return Lost::Shutdown;
                        }
                    }
                }
            }
        }
        res
    }

    /// Adds the cluster's other servers (from INFO) to the rotation, with the first configured
    /// server's scheme and URL credentials (a cluster shares its users).
    fn learn_servers(&mut self, info: &ServerInfo) {
        let first = self.servers[0].clone();
        for url in &info.connect_urls {
            let Ok(mut addr) = ServerAddr::parse(url) else { continue };
            addr.tls = first.tls;
            addr.user.clone_from(&first.user);
            addr.password.clone_from(&first.password);
            if !self.servers.iter().any(|s| s.host == addr.host && s.port == addr.port) {
                tracing::info!(server = ?addr, "live multiplexer: discovered NATS server");
                self.servers.push(addr);
            }
        }
    }

    /// Takes `first` and whatever else is queued (up to a batch), encodes it, and asks for one
    /// confirmation of all the subscriptions it contained. Returns the confirmations that failed
    /// at once.
    fn online_commands(&mut self, live: &mut Live, first: Cmd) -> Vec<MuxEvent> {
        let mut confirm = Vec::new();
        let mut failed = Vec::new();
        let mut cmd = Some(first);
        let mut n = 0;
        while let Some(c) = cmd.take() {
            match c {
                Cmd::Subscribe { sid, user } => {
                    if proto::encode::sub(&mut live.out, &subjects::live(&user), sid).is_ok() {
                        self.subs.insert(sid, user);
                        confirm.push(sid);
                    } else {
                        // UserId only allows subject-safe characters: this cannot happen.
                        tracing::error!(user = %user, "live multiplexer: user id is not a valid subject token");
                        self.metrics.live_mux_error("protocol");
                        failed.push(MuxEvent::Confirmed { user, sid, ok: false });
                    }
                }
                Cmd::Confirm { sid } => {
                    if self.subs.contains_key(&sid) {
                        confirm.push(sid);
                    }
                }
                Cmd::Unsubscribe { sid } => {
                    if self.subs.remove(&sid).is_some() {
                        proto::encode::unsub(&mut live.out, sid);
                    }
                }
            }
            n += 1;
            if n < COMMAND_BATCH {
                cmd = self.cmds.try_recv().ok();
            }
        }
        if !confirm.is_empty() {
            live.ping(Pending::Confirm(confirm));
        }
        failed
    }

    /// Handles every complete operation in the read buffer.
    async fn process(&mut self, live: &mut Live, rbuf: &mut Vec<u8>) -> Result<(), Lost> {
        let mut at = 0;
        let res = loop {
            let (ev, n) = match proto::parse(&rbuf[at..], live.max_payload) {
                Ok(None) => break Ok(()),
                Err(e) => break Err(Lost::Proto(e)),
                Ok(Some((op, n))) => (self.operation(live, op), n),
            };
            at += n;
            // Sending may wait for room: the socket is not read meanwhile (backpressure).
            for ev in ev {
                if self.emit(ev).await.is_none() {
                    break;
                }
            }
            if self.events.is_closed() {
                break Err(Lost::Shutdown);
            }
        };
        rbuf.drain(..at);
        if rbuf.is_empty() && rbuf.capacity() > 1 << 20 {
            // A large message grew it: give the memory back.
            *rbuf = Vec::with_capacity(64 * 1024);
        }
        res
    }

    /// One server operation; returns the events it produces.
    fn operation(&mut self, live: &mut Live, op: ServerOp<'_>) -> Vec<MuxEvent> {
        match op {
            ServerOp::Msg(m) => {
                let Some(user) = self.subs.get(&m.sid) else {
                    // Unsubscribed while the message was on its way.
                    return Vec::new();
                };
                match classify(m.headers) {
                    Ok(kind) => vec![MuxEvent::Live(LiveDelivery {
                        user: user.clone(),
                        kind,
                        payload: Bytes::copy_from_slice(m.payload),
                    })],
                    Err(why) => {
                        self.metrics.live_mux_error("message");
                        tracing::warn!(subject = %m.subject, error = %why, "live copy ignored");
                        Vec::new()
                    }
                }
            }
            ServerOp::Ping => {
                proto::encode::pong(&mut live.out);
                Vec::new()
            }
            ServerOp::Pong => {
                let Some((p, _)) = live.pending.pop_front() else {
                    self.metrics.live_mux_error("protocol");
                    tracing::warn!("live multiplexer: PONG without a PING");
                    return Vec::new();
                };
                let denied = std::mem::take(&mut live.denied);
                match p {
                    Pending::Keepalive => Vec::new(),
                    Pending::Confirm(sids) => sids
                        .into_iter()
                        .filter_map(|sid| {
                            let user = self.subs.get(&sid)?.clone();
                            let ok = !denied.contains(&subjects::live(&user));
                            Some(MuxEvent::Confirmed { user, sid, ok })
                        })
                        .collect(),
                    Pending::Resubscribed { reconnect } => {
                        self.ready.set_live(true);
                        if !denied.is_empty() {
                            tracing::error!(
                                refused = denied.len(),
                                "live multiplexer: subscriptions refused after reconnect"
                            );
                        }
                        if reconnect {
                            vec![MuxEvent::Resubscribed]
                        } else {
                            Vec::new()
                        }
                    }
                }
            }
            ServerOp::Ok => Vec::new(),
            ServerOp::Err(text) => {
                if let Some(rest) = text.strip_prefix("Permissions Violation") {
                    self.metrics.live_mux_error("permissions");
                    tracing::error!(
                        error = %text,
                        "live multiplexer: NATS refused a subscription (Permissions Violation): the gateway's \
                         NATS user needs subscribe permission on live.>"
                    );
                    if let Some(subject) =
                        rest.strip_prefix(" for Subscription to ").map(|s| s.trim().trim_matches('"'))
                    {
                        live.denied.insert(subject.to_owned());
                    }
                } else {
                    self.metrics.live_mux_error("server");
                    tracing::error!(error = %text, "live multiplexer: NATS server error");
                }
                Vec::new()
            }
            ServerOp::Info(json) => {
                match ServerInfo::parse(json) {
                    Ok(info) => {
                        if info.ldm {
                            tracing::warn!(server_id = %info.server_id, "live multiplexer: NATS server entering lame duck mode");
                        }
                        self.learn_servers(&info);
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "live multiplexer: unreadable INFO update"),
                }
                Vec::new()
            }
        }
    }
}

impl Live {
    fn ping(&mut self, p: Pending) {
        proto::encode::ping(&mut self.out);
        self.pending.push_back((p, Instant::now()));
    }

    async fn flush(&mut self) -> Result<(), Lost> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {
                self.out.clear();
                if self.out.capacity() > 1 << 20 {
                    self.out.shrink_to(64 * 1024);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(Lost::Io(e)),
            Err(_) => Err(Lost::WriteTimeout),
        }
    }
}

/// What a live copy is, from its headers (as INBOX's RePublish or the typing publisher set them).
fn classify(headers: Option<&[u8]>) -> Result<LiveKind, String> {
    let Some(raw) = headers else {
        return Err("no headers (no Nats-Sequence)".into());
    };
    let h = HeaderBlock::parse(raw).map_err(|e| e.to_string())?;
    if h.get(EPHEMERAL_HEADER).is_some() {
        return Ok(LiveKind::Ephemeral);
    }
    let num = |name: &str| h.get(name).and_then(|v| v.parse::<u64>().ok());
    let seq = num("Nats-Sequence").ok_or("no valid Nats-Sequence")?;
    Ok(LiveKind::Stored { seq, prev: num("Nats-Last-Sequence").unwrap_or(0) })
}

/// The pause before reconnect attempt `attempt` (0-based): the same schedule as every other
/// NATS connection of the services (`bus::reconnect_delay`: 50 ms doubling to 1 s, jittered).
fn backoff(attempt: u32) -> Duration {
    bus::reconnect_delay(attempt as usize + 1)
}

#[cfg(test)]
mod tests;
