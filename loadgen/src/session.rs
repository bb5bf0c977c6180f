//! A client that behaves the way PROTOCOL.md asks real clients to, for the scenarios in which
//! connections come and go (`offline`, `storm`):
//!
//! * it reconnects after a lost connection or a failed attempt with jittered exponential backoff
//!   ([`Backoff`]), moving on to the next gateway URL when several are given;
//! * it resumes with `since` = the highest inbox `seq` it holds, or (`--resume cursor`) from the
//!   cursor the server stored for its device;
//! * it drops what it already holds — items by `seq`, chat messages by sender and id — and
//!   acknowledges (cumulative `ack`) what it receives, every few items or milliseconds;
//! * as a sender it keeps one message awaiting its `sent` tick at a time and re-sends that
//!   message with the same id after a reconnect or a retryable error (`rate_limited`,
//!   `unavailable`, `internal`): the only way PROTOCOL.md gives to keep a sender's order across
//!   an outage. Open-loop senders follow a schedule of intended send times and their latency
//!   runs from the intended time, so an outage shows as latency, not as fewer sends.
//!
//! Each client is one task owning its books ([`Out`]); live figures go through shared atomic
//! [`Counters`]; the scenario steers every client through one [`Control`] watch channel.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::client::{self, Frame, Target, Ws};
use crate::hist::{self, Hist};
use crate::ledger::{self, Arrival, Check, ReceiverBook, SenderBook};
use crate::util::{self, parse_duration};

/// Reconnect waits: the wait before the n-th consecutive attempt (n ≥ 1; the first reconnect
/// after a lost connection is n = 1, each failed attempt adds one) is
/// `d·(1 − jitter·u)` with `d = min(cap, base·2^(n−1))` and `u` uniform in [0, 1).
/// `jitter = 1` is "full jitter" (uniform in [0, d]), `jitter = 0` a fixed exponential schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_millis(500), cap: Duration::from_secs(10), jitter: 1.0 }
    }
}

impl Backoff {
    /// The upper bound of the n-th wait: `min(cap, base·2^(n−1))` (n = 0 is treated as 1).
    pub fn ceiling(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(40);
        self.base.saturating_mul(1u32 << doublings.min(31)).min(self.cap)
    }

    /// The n-th wait for a random draw `u` in [0, 1).
    pub fn delay(&self, n: u32, u: f64) -> Duration {
        let d = self.ceiling(n);
        d.mul_f64((1.0 - self.jitter.clamp(0.0, 1.0) * u.clamp(0.0, 1.0)).max(0.0))
    }
}

/// The backoff flags (documented in `--help`).
#[derive(Debug, Clone, clap::Args)]
pub struct BackoffArgs {
    /// Reconnect backoff base: the first reconnect after a lost connection waits up to this
    /// long; each failed attempt doubles the bound (see --backoff-jitter for the formula).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub backoff_base: Duration,
    /// Reconnect backoff cap: no wait is longer than this.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub backoff_cap: Duration,
    /// Random fraction of each wait: the n-th consecutive attempt waits d·(1 − jitter·u),
    /// d = min(cap, base·2^(n−1)), u uniform in [0, 1). 1 = full jitter (uniform in [0, d]),
    /// 0 = no jitter (every client retries at the same instants).
    #[arg(long, default_value_t = 1.0)]
    pub backoff_jitter: f64,
}

impl BackoffArgs {
    pub fn backoff(&self) -> anyhow::Result<Backoff> {
        if !(0.0..=1.0).contains(&self.backoff_jitter) {
            anyhow::bail!("--backoff-jitter must be between 0 and 1");
        }
        if self.backoff_base.is_zero() || self.backoff_cap < self.backoff_base {
            anyhow::bail!("--backoff-base must be > 0 and --backoff-cap at least --backoff-base");
        }
        Ok(Backoff { base: self.backoff_base, cap: self.backoff_cap, jitter: self.backoff_jitter })
    }
}

/// Client knobs shared by `offline` and `storm`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Message body size in bytes (the body starts with the sender's sequence and send time).
    #[arg(long, default_value_t = 100)]
    pub body_size: usize,
    /// Acknowledge (cumulative `ack`) after this many received items…
    #[arg(long, default_value_t = 32)]
    pub ack_every: u64,
    /// …or this long after the first unacknowledged one, whichever comes first.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    pub ack_interval: Duration,
    /// Send a `ping` frame when a connection has written nothing for this long (at most half
    /// the gateway's heartbeat from `hello`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// Time allowed for one connection attempt up to `hello` (TCP, upgrade, authentication);
    /// the inbox drain that follows is not bounded by it.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// User id prefix: senders are `<prefix>-s<i>`, recipients `<prefix>-r<i>`. Default: a
    /// fresh random prefix, so inboxes start empty.
    #[arg(long)]
    pub user_prefix: Option<String>,
}

/// How a client resumes after a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Resume {
    /// `since` = the highest inbox `seq` it holds (nothing is resent).
    Since,
    /// No `since`: from the cursor the server stored for the device (debounced, so items
    /// received but not yet recorded are resent and dropped by `seq`).
    Cursor,
    /// Every other client each way, so both paths run.
    Half,
}

impl Resume {
    pub fn uses_since(self, client: usize) -> bool {
        match self {
            Resume::Since => true,
            Resume::Cursor => false,
            Resume::Half => client.is_multiple_of(2),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Resume::Since => "since",
            Resume::Cursor => "cursor",
            Resume::Half => "half",
        }
    }
}

/// Who gets which message: message k of sender s goes to recipient (s + k) mod R, so every
/// sender writes to every recipient in turn and every recipient hears from every sender (when
/// there are enough messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub senders: usize,
    pub recipients: usize,
}

impl Spread {
    pub fn target(&self, sender: usize, k: u64) -> usize {
        ((sender as u64 + k) % self.recipients.max(1) as u64) as usize
    }

    /// How many of sender `s`'s first `n` messages go to recipient `r`.
    pub fn count_to(&self, s: usize, n: u64, r: usize) -> u64 {
        let m = self.recipients.max(1) as u64;
        let first = (r as u64 + m - s as u64 % m) % m;
        if first < n {
            (n - 1 - first) / m + 1
        } else {
            0
        }
    }
}

/// What senders do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// Not yet.
    Wait,
    /// Send (following each sender's plan).
    Go,
    /// Issue nothing new; a message awaiting its tick is still retried.
    Stop,
}

/// What the scenario tells every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub sending: Sending,
    /// Incremented when loadgen drops every droppable connection abruptly.
    pub drop_gen: u32,
    /// End: acknowledge what arrived, close politely, return the books.
    pub stop: bool,
}

impl Default for Control {
    fn default() -> Self {
        Control { sending: Sending::Wait, drop_gen: 0, stop: false }
    }
}

/// Live figures, for the progress line and the scenario's end conditions.
#[derive(Default)]
pub struct Counters {
    /// Connections past `hello`, now.
    pub connected: AtomicU64,
    /// Connections past `synced`, now.
    pub synced: AtomicU64,
    pub attempts: AtomicU64,
    pub attempt_failures: AtomicU64,
    /// Connections that ended other than by the scenario's stop.
    pub lost: AtomicU64,
    pub issued: AtomicU64,
    /// `sent` ticks (first tick of each message).
    pub acked: AtomicU64,
    /// Sends refused for good (non-retryable error).
    pub failed: AtomicU64,
    /// Sends retried after a retryable error.
    pub retried: AtomicU64,
    /// Sends re-sent after a reconnect.
    pub resent: AtomicU64,
    /// First deliveries of chat messages.
    pub delivered: AtomicU64,
    pub redelivered: AtomicU64,
    pub stored_twice: AtomicU64,
    pub regressions: AtomicU64,
    /// Clients whose connection ended at or after the drop instant.
    pub dropped: AtomicU64,
    /// Of those, clients synced again.
    pub back: AtomicU64,
    /// Recipients holding every message expected of them.
    pub empty: AtomicU64,
}

/// What every client of a run shares.
pub struct Env {
    pub prefix: String,
    pub spread: Spread,
    pub recipient_names: Vec<String>,
    pub body_size: usize,
    pub ack_every: u64,
    pub ack_interval: Duration,
    pub ping_interval: Duration,
    pub connect_timeout: Duration,
    pub backoff: Backoff,
    pub counters: Counters,
    /// The drop instant on the run clock (µs); 0 until then.
    pub drop_us: AtomicU64,
    /// When sending started (µs on the run clock): open-loop schedules start here.
    pub go_us: AtomicU64,
    /// Per recipient: messages to it acknowledged by `sent` so far.
    pub expect: Vec<AtomicU64>,
}

impl Env {
    /// The sender index of a user id `<prefix>-s<i>`.
    pub fn sender_index(&self, name: &str) -> Option<u32> {
        name.strip_prefix(&self.prefix)?
            .strip_prefix("-s")?
            .parse()
            .ok()
            .filter(|&i: &u32| (i as usize) < self.spread.senders)
    }

    pub fn sender_name(prefix: &str, i: usize) -> String {
        format!("{prefix}-s{i}")
    }

    pub fn recipient_name(prefix: &str, i: usize) -> String {
        format!("{prefix}-r{i}")
    }

    /// `{"t":"send",…}` for message `mseq` of `sender`, scheduled at `intended_us`. The client id
    /// is `<mseq>-<intended_us>`, and the body starts with `<mseq> <intended_us> `.
    pub fn send_frame(&self, sender: usize, mseq: u64, intended_us: u64) -> String {
        let to = &self.recipient_names[self.spread.target(sender, mseq)];
        let head = format!("{mseq} {intended_us} ");
        let pad = self.body_size.saturating_sub(head.len());
        let mut s = String::with_capacity(64 + to.len() + head.len() + pad);
        s.push_str(r#"{"t":"send","id":""#);
        s.push_str(&format!("{mseq}-{intended_us}"));
        s.push_str(r#"","to":""#);
        s.push_str(to);
        s.push_str(r#"","body":""#);
        s.push_str(&head);
        s.extend(std::iter::repeat_n('x', pad));
        s.push_str(r#""}"#);
        s
    }
}

/// `<seq>-<intended_us>` (client ids) or `<seq> <intended_us> …` (bodies).
pub fn parse_stamp(s: &str, sep: char) -> Option<(u64, u64)> {
    let mut it = s.splitn(3, sep);
    let seq = it.next()?.parse().ok()?;
    let us = it.next()?.split(' ').next()?.parse().ok()?;
    Some((seq, us))
}

/// A sender's plan.
#[derive(Debug, Clone, Copy)]
pub struct SendPlan {
    pub sender: usize,
    /// Messages to send; `None`: until sending stops.
    pub count: Option<u64>,
    /// Open loop: microseconds between two sends, from `Env::go_us + phase_us`. `None`: closed
    /// loop, the next message as soon as the previous one is answered.
    pub interval_us: Option<f64>,
    pub phase_us: f64,
}

#[derive(Debug, Clone, Copy)]
pub enum Role {
    Sender(SendPlan),
    /// Recipient index; `track_empty`: stamp the moment it holds every message expected of it.
    Recipient {
        index: usize,
        track_empty: bool,
    },
}

pub struct Spec {
    /// Client index (source address, first gateway, resume mode).
    pub index: usize,
    pub token: String,
    pub role: Role,
    pub since: bool,
    /// Loadgen's own drop closes this client's connection.
    pub droppable: bool,
    pub targets: Arc<Vec<Target>>,
    pub source_ip_base: Ipv4Addr,
    pub source_ips: u32,
}

/// One connection attempt, as it went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConnRecord {
    pub attempt_us: u64,
    /// 0: not reached.
    pub hello_us: u64,
    pub synced_us: u64,
    pub end_us: u64,
    /// Why it ended (`None`: stopped by the scenario).
    pub end: Option<String>,
    /// `since` sent, if any.
    pub since: Option<u64>,
    /// `hello.resume_from`.
    pub resume_from: Option<u64>,
    /// `msg` frames received on it (new or not).
    pub items: u64,
}

/// A client's books, returned when it stops.
pub struct Out {
    /// When the client started (its first attempt), µs on the run clock.
    pub start_us: u64,
    pub receiver: ReceiverBook,
    pub sender: SenderBook,
    pub issued: u64,
    /// Re-sent after a reconnect (same id).
    pub resent: u64,
    /// Retries after a retryable error, by error code.
    pub retries: BTreeMap<String, u64>,
    /// Error frames and frames loadgen did not expect, by code.
    pub errors: BTreeMap<String, u64>,
    pub h_sent: Hist,
    pub h_deliver: Hist,
    /// Successful connections (reached `hello`).
    pub conns: Vec<ConnRecord>,
    /// Failed attempts: (when, cause).
    pub failures: Vec<(u64, String)>,
    pub failure_examples: BTreeMap<String, String>,
    /// Sender: when each message got its tick (µs; 0: never).
    pub ticks: Vec<u64>,
    /// First deliveries at or after the drop: (sender, mseq, when).
    pub late: Vec<(u32, u64, u64)>,
    /// First deliveries from the inbox drain (between `hello` and `synced`) of connections
    /// opened after the drop: what piled up while the client was away.
    pub drained_after_drop: u64,
    /// First connection loss at or after the drop.
    pub dropped_us: Option<u64>,
    /// `hello` and `synced` of the first connection opened after that loss.
    pub back_hello_us: Option<u64>,
    pub back_synced_us: Option<u64>,
    /// Recipient: when it held every message expected of it.
    pub empty_us: Option<u64>,
    pub first_delivery_us: u64,
    pub last_delivery_us: u64,
    pub receipts: u64,
    pub other_items: u64,
    pub reconnect_frames: u64,
}

impl Out {
    fn new() -> Out {
        Out {
            start_us: util::now_us(),
            receiver: ReceiverBook::default(),
            sender: SenderBook::default(),
            issued: 0,
            resent: 0,
            retries: BTreeMap::new(),
            errors: BTreeMap::new(),
            h_sent: hist::new(),
            h_deliver: hist::new(),
            conns: Vec::new(),
            failures: Vec::new(),
            failure_examples: BTreeMap::new(),
            ticks: Vec::new(),
            late: Vec::new(),
            drained_after_drop: 0,
            dropped_us: None,
            back_hello_us: None,
            back_synced_us: None,
            empty_us: None,
            first_delivery_us: 0,
            last_delivery_us: 0,
            receipts: 0,
            other_items: 0,
            reconnect_frames: 0,
        }
    }
}

/// The message awaiting its tick.
#[derive(Debug, Clone, Copy)]
struct Inflight {
    mseq: u64,
    intended_us: u64,
    /// Connection generation it was last written on and awaits an answer from (0: none).
    awaiting_on: u32,
    /// Ever written (so writing it again is a re-send).
    written: bool,
    /// After a retryable error: not before this.
    retry_at: Option<Instant>,
}

/// How a connection attempt ended.
enum Ended {
    /// The scenario stopped the client.
    Stopped,
    /// Never reached `hello`.
    Failed(client::Fail),
    /// Reached `hello` and was lost (`synced`: it had reached `synced`).
    Lost { synced: bool },
}

struct Client {
    env: Arc<Env>,
    spec: Spec,
    out: Out,
    next: u64,
    inflight: Option<Inflight>,
    gen: u32,
    target_i: usize,
    drop_gen: u32,
    /// Delivered chat messages (first deliveries), for the "empty" stamp.
    delivered: u64,
    /// The current connection is between `hello` and `synced` (items come from the inbox).
    draining: bool,
}

/// Runs one client until the scenario stops it; returns its books.
pub async fn run(env: Arc<Env>, spec: Spec, mut control: watch::Receiver<Control>) -> Out {
    let drop_gen = control.borrow_and_update().drop_gen;
    let mut c = Client {
        out: Out::new(),
        target_i: spec.index % spec.targets.len().max(1),
        env,
        spec,
        next: 0,
        inflight: None,
        gen: 0,
        drop_gen,
        delivered: 0,
        draining: false,
    };
    c.life(&mut control).await;
    c.out
}

impl Client {
    async fn life(&mut self, control: &mut watch::Receiver<Control>) {
        // Consecutive attempts since the last connection that reached `synced`.
        let mut n: u32 = 0;
        let mut wait = Duration::ZERO;
        loop {
            if control.borrow().stop {
                return;
            }
            if !wait.is_zero() {
                let until = Instant::now() + wait;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        r = control.changed() => if r.is_err() || control.borrow().stop { return },
                    }
                }
            }
            match self.attempt(control).await {
                Ended::Stopped => return,
                Ended::Failed(f) => {
                    self.env.counters.attempt_failures.fetch_add(1, Relaxed);
                    self.out.failures.push((util::now_us(), f.cause.clone()));
                    self.out.failure_examples.entry(f.cause).or_insert(f.detail);
                    n += 1;
                }
                Ended::Lost { synced } => {
                    n = if synced { 1 } else { n + 1 };
                }
            }
            // The gateway we were on may be gone: try the next one first.
            self.target_i = (self.target_i + 1) % self.spec.targets.len().max(1);
            wait = self.env.backoff.delay(n, rand::random::<f64>());
        }
    }

    fn since(&self) -> Option<u64> {
        let held = self.out.receiver.held();
        (self.spec.since && held > 0).then_some(held)
    }

    async fn attempt(&mut self, control: &mut watch::Receiver<Control>) -> Ended {
        let env = self.env.clone();
        let counters = &env.counters;
        counters.attempts.fetch_add(1, Relaxed);
        let mut rec = ConnRecord { attempt_us: util::now_us(), since: self.since(), ..Default::default() };
        let target = &self.spec.targets[self.target_i];
        let url = match rec.since {
            Some(s) => client::with_query(&target.url, "since", s),
            None => target.url.clone(),
        };
        let source = util::source_ip(self.spec.source_ip_base, self.spec.source_ips, self.spec.index as u64);
        let started = std::time::Instant::now();
        let hello_deadline = Instant::now() + env.connect_timeout;
        let upgraded = tokio::select! {
            r = tokio::time::timeout(
                env.connect_timeout,
                client::upgrade(target, &url, &self.spec.token, source, client::ws_config(16 * 1024), started),
            ) => r,
            _ = wait_stop(control) => return Ended::Stopped,
        };
        let mut ws = match upgraded {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(f)) => return Ended::Failed(f),
            Err(_) => {
                return Ended::Failed(client::Fail::new(
                    "timeout",
                    format!("no upgrade within {:?}", env.connect_timeout),
                ))
            }
        };

        self.gen += 1;
        let gen = self.gen;
        self.out.receiver.new_connection();
        let mut hello = false;
        let mut synced = false;
        // Highest seq seen on this connection (new or redelivered) and acknowledged on it.
        let (mut seen_here, mut acked_here) = (0u64, 0u64);
        let mut since_ack = 0u64;
        let mut ack_due: Option<Instant> = None;
        let mut last_write = Instant::now();
        let mut ping_every = env.ping_interval;
        let far = Instant::now() + Duration::from_secs(86_400 * 365);

        // A drop ordered while this connection was being opened does not concern it.
        self.drop_gen = control.borrow().drop_gen;

        let end: Result<(), String> = loop {
            // Read at each turn: the loop wakes on every change of the control channel.
            let sending = control.borrow().sending;
            let send_at = if synced { self.next_send_at(gen, sending) } else { None };
            let mut ack_now = false;
            tokio::select! {
                biased;
                r = control.changed() => {
                    let c = if r.is_err() { Control { stop: true, ..Control::default() } } else { *control.borrow_and_update() };
                    if c.stop {
                        if seen_here > acked_here {
                            let _ = ws.send(Message::Text(client::ack_frame(seen_here).into())).await;
                        }
                        let close = CloseFrame { code: CloseCode::Normal, reason: "loadgen done".into() };
                        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(close))).await;
                        rec.end_us = util::now_us();
                        self.conn_closed(&mut rec, hello, synced, false);
                        return Ended::Stopped;
                    }
                    if c.drop_gen != self.drop_gen {
                        self.drop_gen = c.drop_gen;
                        if self.spec.droppable {
                            abort(ws);
                            break Err("dropped_by_loadgen".into());
                        }
                    }
                }
                // Timers before reading: they fire only when due, and a busy stream must not
                // starve acks, pings and sends.
                _ = tokio::time::sleep_until(hello_deadline), if !hello => {
                    abort(ws);
                    return Ended::Failed(client::Fail::new("timeout", format!("no hello within {:?}", env.connect_timeout)));
                }
                _ = tokio::time::sleep_until(ack_due.unwrap_or(far)), if ack_due.is_some() => ack_now = true,
                _ = tokio::time::sleep_until(last_write + ping_every) => {
                    if let Err(e) = ws.send(Message::Text(client::PING.into())).await {
                        break Err(client::ws_fail("write", &e).cause);
                    }
                    last_write = Instant::now();
                }
                _ = tokio::time::sleep_until(send_at.unwrap_or(far)), if send_at.is_some() => {
                    if let Err(e) = self.send(&mut ws, gen).await {
                        break Err(client::ws_fail("write", &e).cause);
                    }
                    last_write = Instant::now();
                }
                m = ws.next() => match m {
                    None => break Err("eof".into()),
                    Some(Err(e)) => break Err(client::ws_fail("read", &e).cause),
                    Some(Ok(Message::Close(f))) => {
                        break Err(format!("closed_{}", f.map(|f| u16::from(f.code)).unwrap_or(1005)));
                    }
                    Some(Ok(Message::Text(t))) => {
                        let f = match Frame::parse(t.as_str()) {
                            Ok(f) => f,
                            Err(_) => {
                                *self.out.errors.entry("unparseable_frame".into()).or_default() += 1;
                                continue;
                            }
                        };
                        match &*f.t {
                            "hello" => {
                                hello = true;
                                self.draining = true;
                                rec.hello_us = util::now_us();
                                rec.resume_from = f.resume_from;
                                counters.connected.fetch_add(1, Relaxed);
                                if let Some(hb) = f.heartbeat_ms {
                                    ping_every = ping_every.min(Duration::from_millis((hb / 2).max(100)));
                                }
                                if self.out.dropped_us.is_some() && self.out.back_hello_us.is_none() {
                                    self.out.back_hello_us = Some(rec.hello_us);
                                }
                            }
                            "synced" => {
                                synced = true;
                                self.draining = false;
                                rec.synced_us = util::now_us();
                                counters.synced.fetch_add(1, Relaxed);
                                if self.out.dropped_us.is_some() && self.out.back_synced_us.is_none() {
                                    self.out.back_synced_us = Some(rec.synced_us);
                                    counters.back.fetch_add(1, Relaxed);
                                }
                                self.check_empty(rec.synced_us);
                            }
                            "msg" => {
                                rec.items += 1;
                                if let Some(seq) = f.seq {
                                    seen_here = seen_here.max(seq);
                                    since_ack += 1;
                                    if since_ack >= env.ack_every {
                                        ack_now = true;
                                    } else if ack_due.is_none() {
                                        ack_due = Some(Instant::now() + env.ack_interval);
                                    }
                                }
                                self.on_item(&f);
                            }
                            "sent" => self.on_sent(&f),
                            "error" => self.on_error(&f),
                            "reconnect" => self.out.reconnect_frames += 1,
                            "pong" | "conversations" => {}
                            other => *self.out.errors.entry(format!("frame_{other}")).or_default() += 1,
                        }
                    }
                    Some(Ok(_)) => {}
                },
            }
            if ack_now {
                ack_due = None;
                since_ack = 0;
                if seen_here > acked_here {
                    if let Err(e) = ws.send(Message::Text(client::ack_frame(seen_here).into())).await {
                        break Err(client::ws_fail("write", &e).cause);
                    }
                    acked_here = seen_here;
                    last_write = Instant::now();
                }
            }
        };
        let cause = end.err().unwrap_or_default();
        rec.end_us = util::now_us();
        rec.end = Some(cause.clone());
        if !hello {
            // Closed before `hello` (refused after the upgrade: 1013 when the backbone is
            // down, for example): a failed attempt.
            return Ended::Failed(client::Fail::new(cause, "connection ended before hello"));
        }
        self.conn_closed(&mut rec, hello, synced, true);
        Ended::Lost { synced }
    }

    /// Bookkeeping when a connection that reached `hello` ends.
    fn conn_closed(&mut self, rec: &mut ConnRecord, hello: bool, synced: bool, lost: bool) {
        let c = &self.env.counters;
        self.draining = false;
        if hello {
            c.connected.fetch_sub(1, Relaxed);
        }
        if synced {
            c.synced.fetch_sub(1, Relaxed);
        }
        if let Some(f) = self.inflight.as_mut() {
            // Whatever was awaited on this connection must be written again on the next one.
            f.awaiting_on = 0;
        }
        if lost {
            c.lost.fetch_add(1, Relaxed);
            let drop_us = self.env.drop_us.load(Relaxed);
            if drop_us != 0 && rec.end_us >= drop_us && self.out.dropped_us.is_none() {
                self.out.dropped_us = Some(rec.end_us);
                c.dropped.fetch_add(1, Relaxed);
            }
        }
        self.out.conns.push(std::mem::take(rec));
    }

    fn check_empty(&mut self, now: u64) {
        if let Role::Recipient { index, track_empty: true } = self.spec.role {
            if self.out.empty_us.is_none() && self.delivered >= self.env.expect[index].load(Relaxed) {
                self.out.empty_us = Some(now);
                self.env.counters.empty.fetch_add(1, Relaxed);
            }
        }
    }

    fn on_item(&mut self, f: &Frame) {
        let c = &self.env.counters;
        let Some(seq) = f.seq else {
            *self.out.errors.entry("msg_without_seq".into()).or_default() += 1;
            return;
        };
        let (regr, redel) = (self.out.receiver.seq_regressions, self.out.receiver.redelivered);
        if !self.out.receiver.inbox_seq(seq) {
            if self.out.receiver.seq_regressions > regr {
                c.regressions.fetch_add(1, Relaxed);
            }
            if self.out.receiver.redelivered > redel {
                c.redelivered.fetch_add(1, Relaxed);
            }
            return;
        }
        let Some(m) = f.m.as_ref() else {
            *self.out.errors.entry("msg_without_item".into()).or_default() += 1;
            return;
        };
        match &*m.k {
            "chat" => {
                let sender = m.from.as_deref().and_then(|n| self.env.sender_index(n));
                let stamp = m.body.as_deref().and_then(|b| parse_stamp(b, ' '));
                let (Some(s), Some((mseq, intended))) = (sender, stamp) else {
                    self.out.receiver.unreadable += 1;
                    return;
                };
                match self.out.receiver.chat(s, mseq) {
                    Arrival::First => {
                        let now = util::now_us();
                        hist::record(&mut self.out.h_deliver, now.saturating_sub(intended));
                        if self.out.first_delivery_us == 0 {
                            self.out.first_delivery_us = now;
                        }
                        self.out.last_delivery_us = now;
                        self.delivered += 1;
                        c.delivered.fetch_add(1, Relaxed);
                        let drop_us = self.env.drop_us.load(Relaxed);
                        if drop_us != 0 && now >= drop_us {
                            self.out.late.push((s, mseq, now));
                            if self.draining && self.out.dropped_us.is_some() {
                                self.out.drained_after_drop += 1;
                            }
                        }
                        self.check_empty(now);
                    }
                    Arrival::Duplicate => {
                        c.stored_twice.fetch_add(1, Relaxed);
                    }
                }
            }
            "receipt" => self.out.receipts += 1,
            _ => self.out.other_items += 1,
        }
    }

    fn on_sent(&mut self, f: &Frame) {
        let Some((mseq, _)) = f.id.as_deref().and_then(|id| parse_stamp(id, '-')) else {
            self.out.sender.unknown_ids += 1;
            return;
        };
        self.out.sender.sent(mseq, f.dup == Some(true));
        let Some(inf) = self.inflight.filter(|i| i.mseq == mseq) else { return };
        let now = util::now_us();
        hist::record(&mut self.out.h_sent, now.saturating_sub(inf.intended_us));
        let i = mseq as usize;
        if self.out.ticks.len() <= i {
            self.out.ticks.resize(i + 1, 0);
        }
        self.out.ticks[i] = now;
        if let Role::Sender(p) = self.spec.role {
            self.env.expect[self.env.spread.target(p.sender, mseq)].fetch_add(1, Relaxed);
        }
        self.env.counters.acked.fetch_add(1, Relaxed);
        self.inflight = None;
    }

    fn on_error(&mut self, f: &Frame) {
        let code = f.code.as_deref().unwrap_or("unknown").to_owned();
        let target = f.id.as_deref().and_then(|id| parse_stamp(id, '-')).map(|(m, _)| m);
        match (target, self.inflight.as_mut()) {
            (Some(mseq), Some(inf)) if inf.mseq == mseq => {
                if matches!(code.as_str(), "rate_limited" | "unavailable" | "internal") {
                    // "Retry later with the same id": the message keeps its place, later ones
                    // wait behind it, so the sender's order holds.
                    let ms = if code == "rate_limited" { 100..300 } else { 100..500 };
                    inf.retry_at = Some(Instant::now() + Duration::from_millis(rand::random_range(ms)));
                    inf.awaiting_on = 0;
                    *self.out.retries.entry(code).or_default() += 1;
                    self.env.counters.retried.fetch_add(1, Relaxed);
                } else {
                    self.out.sender.failed(mseq);
                    *self.out.errors.entry(format!("error_{code}")).or_default() += 1;
                    self.env.counters.failed.fetch_add(1, Relaxed);
                    self.inflight = None;
                }
            }
            (Some(_), _) => {
                self.out.sender.unknown_ids += 1;
                *self.out.errors.entry(format!("error_{code}")).or_default() += 1;
            }
            (None, _) => *self.out.errors.entry(format!("error_{code}")).or_default() += 1,
        }
    }

    /// When the next send is due on connection `gen` (`None`: nothing to send now).
    fn next_send_at(&self, gen: u32, sending: Sending) -> Option<Instant> {
        let Role::Sender(plan) = self.spec.role else { return None };
        if let Some(f) = &self.inflight {
            if f.awaiting_on == gen {
                return None;
            }
            return Some(f.retry_at.unwrap_or_else(Instant::now));
        }
        if sending != Sending::Go || plan.count.is_some_and(|n| self.next >= n) {
            return None;
        }
        match plan.interval_us {
            None => Some(Instant::now()),
            Some(_) => Some(util::clock().instant_at(self.intended(plan, self.next)).into()),
        }
    }

    fn intended(&self, plan: SendPlan, k: u64) -> u64 {
        let go = self.env.go_us.load(Relaxed);
        go + (plan.phase_us + k as f64 * plan.interval_us.unwrap_or(0.0)) as u64
    }

    async fn send(&mut self, ws: &mut Ws, gen: u32) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let Role::Sender(plan) = self.spec.role else { return Ok(()) };
        let inf = match self.inflight {
            Some(mut f) => {
                if f.written && f.retry_at.is_none() {
                    self.out.resent += 1;
                    self.env.counters.resent.fetch_add(1, Relaxed);
                }
                f.retry_at = None;
                f
            }
            None => {
                let mseq = self.next;
                let intended_us = match plan.interval_us {
                    Some(_) => self.intended(plan, mseq),
                    None => util::now_us(),
                };
                self.next += 1;
                self.out.issued += 1;
                self.env.counters.issued.fetch_add(1, Relaxed);
                Inflight { mseq, intended_us, awaiting_on: 0, written: false, retry_at: None }
            }
        };
        self.inflight = Some(inf);
        let frame = self.env.send_frame(plan.sender, inf.mseq, inf.intended_us);
        ws.send(Message::Text(frame.into())).await?;
        if let Some(f) = self.inflight.as_mut() {
            f.written = true;
            f.awaiting_on = gen;
        }
        Ok(())
    }
}

/// Starts a client at `at`; the handle returns its books.
pub fn spawn_at(
    env: Arc<Env>,
    spec: Spec,
    control: watch::Receiver<Control>,
    at: Instant,
) -> tokio::task::JoinHandle<Out> {
    tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        run(env, spec, control).await
    })
}

/// Waits for every client's books.
pub async fn collect(handles: Vec<tokio::task::JoinHandle<Out>>) -> anyhow::Result<Vec<Out>> {
    let mut outs = Vec::with_capacity(handles.len());
    for h in handles {
        outs.push(h.await?);
    }
    Ok(outs)
}

/// The ledger over every client: `senders[s]` is sender s, `recipients[r]` recipient r. Chat
/// messages that reached a sender's connection count as misdelivered. Takes the books out of
/// the clients' outputs.
pub fn check(spread: Spread, senders: &mut [Out], recipients: &mut [Out]) -> Check {
    let issued: Vec<u64> = senders.iter().map(|o| o.issued).collect();
    let sender_books: Vec<SenderBook> = senders.iter_mut().map(|o| std::mem::take(&mut o.sender)).collect();
    let mut receiver_books: Vec<ReceiverBook> =
        recipients.iter_mut().map(|o| std::mem::take(&mut o.receiver)).collect();
    receiver_books.extend(senders.iter_mut().map(|o| std::mem::take(&mut o.receiver)));
    // The ledger takes each message's recipients as a slice: one recipient here.
    let index: Vec<usize> = (0..spread.recipients.max(1)).collect();
    ledger::check(&issued, &sender_books, &receiver_books, |s, k| std::slice::from_ref(&index[spread.target(s, k)]))
}

/// Failed attempts by cause, over `outs`, with `from_us ≤ t < to_us`.
pub fn failures_between<'a>(
    outs: impl IntoIterator<Item = &'a Out>,
    from_us: u64,
    to_us: u64,
) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for o in outs {
        for (t, c) in &o.failures {
            if (from_us..to_us).contains(t) {
                *m.entry(c.clone()).or_default() += 1;
            }
        }
    }
    m
}

/// Connections lost by cause, over `outs`, with the loss at `from_us ≤ t < to_us`.
pub fn losses_between<'a>(outs: impl IntoIterator<Item = &'a Out>, from_us: u64, to_us: u64) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for o in outs {
        for r in &o.conns {
            if let Some(e) = &r.end {
                if (from_us..to_us).contains(&r.end_us) {
                    *m.entry(e.clone()).or_default() += 1;
                }
            }
        }
    }
    m
}

/// Sums per-code maps (errors, retries) over `outs`.
pub fn sum_maps<'a>(maps: impl Iterator<Item = &'a BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for x in maps {
        for (k, v) in x {
            *m.entry(k.clone()).or_default() += v;
        }
    }
    m
}

/// `a ×3, b ×1`, or `none`.
pub fn list(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", ")
}

/// Closes the socket abruptly: SO_LINGER 0 makes close() send a TCP RST, with no close frame
/// and no FIN handshake — what a vanished network or a killed client looks like to the gateway.
fn abort(ws: Ws) {
    // tokio deprecates set_linger because a non-zero linger blocks the thread in close();
    // a zero linger does not block (the kernel discards the send queue and resets).
    let tcp = match ws.get_ref() {
        MaybeTlsStream::Plain(tcp) => tcp,
        MaybeTlsStream::Rustls(tls) => tls.get_ref().0,
        _ => return,
    };
    #[allow(deprecated)]
    let _ = tcp.set_linger(Some(Duration::ZERO));
    drop(ws);
}

async fn wait_stop(control: &mut watch::Receiver<Control>) {
    loop {
        if control.borrow_and_update().stop {
            return;
        }
        if control.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn backoff_schedule() {
        let b = Backoff { base: ms(500), cap: ms(10_000), jitter: 1.0 };
        // Ceilings double from the base and stop at the cap.
        let ceilings: Vec<u64> = (1..=7).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(b.ceiling(0), ms(500));
        assert_eq!(b.ceiling(u32::MAX), ms(10_000), "no overflow");
        // Full jitter: uniform in [0, ceiling].
        assert_eq!(b.delay(3, 0.0), ms(2000));
        assert_eq!(b.delay(3, 0.5), ms(1000));
        assert!(b.delay(3, 0.999_999) < ms(1));
        // Half jitter: in [ceiling/2, ceiling]; none: exactly the ceiling.
        let half = Backoff { jitter: 0.5, ..b };
        assert_eq!(half.delay(2, 1.0), ms(500));
        assert_eq!(half.delay(2, 0.0), ms(1000));
        let none = Backoff { jitter: 0.0, ..b };
        assert_eq!(none.delay(4, 0.7), ms(4000));
        // Out-of-range inputs are clamped, never negative or above the cap.
        assert_eq!(Backoff { jitter: 7.0, ..b }.delay(1, 2.0), Duration::ZERO);
        assert_eq!(b.delay(30, -1.0), ms(10_000));
    }

    #[test]
    fn backoff_flags_are_checked() {
        let args =
            |base, cap, jitter| BackoffArgs { backoff_base: ms(base), backoff_cap: ms(cap), backoff_jitter: jitter };
        assert_eq!(args(100, 1000, 0.5).backoff().unwrap(), Backoff { base: ms(100), cap: ms(1000), jitter: 0.5 });
        assert!(args(100, 1000, 1.5).backoff().is_err());
        assert!(args(0, 1000, 1.0).backoff().is_err());
        assert!(args(2000, 1000, 1.0).backoff().is_err());
    }

    #[test]
    fn spread_over_recipients() {
        let sp = Spread { senders: 3, recipients: 4 };
        assert_eq!((0..6).map(|k| sp.target(1, k)).collect::<Vec<_>>(), [1, 2, 3, 0, 1, 2]);
        // count_to agrees with target, and every message goes somewhere exactly once.
        for s in 0..3 {
            for n in [0, 1, 4, 5, 11] {
                let mut total = 0;
                for r in 0..4 {
                    let by_target = (0..n).filter(|&k| sp.target(s, k) == r).count() as u64;
                    assert_eq!(sp.count_to(s, n, r), by_target, "s={s} n={n} r={r}");
                    total += by_target;
                }
                assert_eq!(total, n);
            }
        }
        // More senders than recipients.
        let sp = Spread { senders: 10, recipients: 3 };
        assert_eq!(sp.count_to(7, 6, 1), 2);
        assert_eq!(sp.target(7, 0), 1);
    }

    #[test]
    fn resume_modes() {
        assert!(Resume::Since.uses_since(1));
        assert!(!Resume::Cursor.uses_since(0));
        assert_eq!((0..4).map(|i| Resume::Half.uses_since(i)).collect::<Vec<_>>(), [true, false, true, false]);
    }

    fn env() -> Env {
        Env {
            prefix: "p".into(),
            spread: Spread { senders: 2, recipients: 3 },
            recipient_names: (0..3).map(|i| Env::recipient_name("p", i)).collect(),
            body_size: 40,
            ack_every: 1,
            ack_interval: ms(1),
            ping_interval: ms(1),
            connect_timeout: ms(1),
            backoff: Backoff::default(),
            counters: Counters::default(),
            drop_us: AtomicU64::new(0),
            go_us: AtomicU64::new(0),
            expect: (0..3).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    #[test]
    fn frames_names_and_stamps() {
        let e = env();
        let f = e.send_frame(1, 4, 987_654);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["to"], "p-r2"); // (1 + 4) mod 3
        assert_eq!(v["id"], "4-987654");
        assert_eq!(v["body"].as_str().unwrap().len(), 40);
        assert_eq!(parse_stamp(v["body"].as_str().unwrap(), ' '), Some((4, 987_654)));
        assert_eq!(parse_stamp("4-987654", '-'), Some((4, 987_654)));
        assert_eq!(parse_stamp("x-1", '-'), None);
        assert!(protocol::decode_client_frame(f.as_bytes(), &protocol::Limits::default()).is_ok());
        assert_eq!(e.sender_index("p-s1"), Some(1));
        assert_eq!(e.sender_index("p-s2"), None, "only 2 senders");
        assert_eq!(e.sender_index("p-r1"), None);
        assert_eq!(e.sender_index("q-s1"), None);
    }

    #[test]
    fn ledger_over_clients_with_reconnects() {
        // Sender 0 sends 0, 1, 2 to recipients 0, 1, 2; sender 1 sends 0, 1 to recipients 1, 2.
        let sp = Spread { senders: 2, recipients: 3 };
        let mut senders: Vec<Out> = (0..2).map(|_| Out::new()).collect();
        let mut recipients: Vec<Out> = (0..3).map(|_| Out::new()).collect();
        for (s, n) in [(0usize, 3u64), (1, 2)] {
            senders[s].issued = n;
            for k in 0..n {
                senders[s].sender.sent(k, false);
            }
        }
        // Recipient 1 gets sender 0's message 1 (seq 10) and sender 1's message 0 (seq 11),
        // reconnects from a stale cursor and is sent both again (redelivered, dropped), then
        // gets sender 1's message 0 once more under a new seq (stored twice).
        let r1 = &mut recipients[1].receiver;
        for (seq, s, k) in [(10, 0, 1), (11, 1, 0)] {
            assert!(r1.inbox_seq(seq));
            assert_eq!(r1.chat(s, k), Arrival::First);
        }
        r1.new_connection();
        assert!(!r1.inbox_seq(10));
        assert!(!r1.inbox_seq(11));
        assert!(r1.inbox_seq(12));
        assert_eq!(r1.chat(1, 0), Arrival::Duplicate);
        assert!(!r1.inbox_seq(12), "a repeat on the same connection is a regression");
        assert_eq!(r1.held(), 12);
        // Recipient 0 gets its message; recipient 2 gets sender 1's message 1 only: sender 0's
        // message 2 is lost. A sender's connection gets a chat message: misdelivered.
        let r0 = &mut recipients[0].receiver;
        r0.inbox_seq(1);
        r0.chat(0, 0);
        let r2 = &mut recipients[2].receiver;
        r2.inbox_seq(1);
        r2.chat(1, 1);
        senders[1].receiver.inbox_seq(3);
        senders[1].receiver.chat(0, 0);
        let c = check(sp, &mut senders, &mut recipients);
        assert_eq!((c.issued, c.acknowledged, c.delivered_once), (5, 5, 3));
        assert_eq!(c.lost, 1);
        assert_eq!(c.redelivered, 2);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.seq_regressions, 1);
        assert_eq!(c.misdelivered, 1);
        assert_eq!(c.reordered, 0);
        // Redeliveries are allowed; the rest are violations.
        assert_eq!(c.violations(), 1 + 1 + 1 + 1);
    }

    #[test]
    fn loss_and_failure_accounting() {
        let mut a = Out::new();
        a.failures = vec![(5, "tcp_refused".into()), (15, "tcp_refused".into()), (20, "http_503".into())];
        a.conns = vec![
            ConnRecord { end_us: 8, end: Some("read_reset".into()), ..Default::default() },
            ConnRecord { end_us: 30, end: None, ..Default::default() },
        ];
        let b = Out::new();
        let outs = [a, b];
        let f = failures_between(&outs, 10, u64::MAX);
        assert_eq!(list(&f), "http_503 ×1, tcp_refused ×1");
        assert_eq!(list(&losses_between(&outs, 0, 10)), "read_reset ×1");
        assert_eq!(list(&losses_between(&outs, 10, u64::MAX)), "none", "a stopped connection is no loss");
    }
}
