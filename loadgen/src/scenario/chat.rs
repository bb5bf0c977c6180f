//! `chat`: users in conversations send 1:1 messages at a fixed rate (open loop) or as fast as a
//! window of unconfirmed sends allows (`--rate max`, closed loop), acknowledge what they receive,
//! and measure send→sent and send→deliver latency. A ledger then checks every acknowledged
//! message arrived exactly once, in order, at its recipient.
//!
//! Open loop: each sender has a schedule of intended send times (`t0 + phase + k/rate`), and
//! latency is measured from the intended time, so a stalled connection or a backed-up socket
//! shows up as latency instead of silently lowering the send rate (no coordinated omission).
//! The body carries the sender's sequence number and the intended time, so the receiver measures
//! latency without any shared table.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Frame, GatewayArgs, Opened, Ws};
use crate::hist::{self, Hist};
use crate::ledger::{self, Arrival, ReceiverBook, SenderBook};
use crate::report::{self, Output, Progress};
use crate::scrape;
use crate::util::{self, fmt_duration, fmt_rate, parse_duration};
use crate::RunArgs;

/// Who talks to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// 0↔1, 2↔3, …: every user sends to and receives from one partner.
    Pairs,
    /// i→i+1 (mod users): every user sends to one user and receives from another.
    Ring,
    /// Each user sends round-robin to the next K users (mod users), receiving from K users.
    Mesh(usize),
    /// Broadcast: users form groups of K+1 (0..=K, K+1..=2K+1, …); each member posts to its group
    /// (`gsend`), so every message goes to the K other members.
    Group(usize),
}

impl Layout {
    pub fn parse(s: &str) -> Result<Layout, String> {
        match s {
            "pairs" => Ok(Layout::Pairs),
            "ring" => Ok(Layout::Ring),
            _ => match s.strip_prefix("mesh:").map(str::parse::<usize>) {
                Some(Ok(k)) if k >= 1 => Ok(Layout::Mesh(k)),
                Some(_) => Err(format!("bad layout {s:?}: mesh:K needs K ≥ 1")),
                None => match s.strip_prefix("group:").map(str::parse::<usize>) {
                    Some(Ok(k)) if (1..=1023).contains(&k) => Ok(Layout::Group(k)),
                    _ => {
                        Err(format!("unknown layout {s:?}: use pairs, ring, mesh:K (K ≥ 1) or group:K (1 ≤ K ≤ 1023)"))
                    }
                },
            },
        }
    }

    pub fn name(&self) -> String {
        match self {
            Layout::Pairs => "pairs".into(),
            Layout::Ring => "ring".into(),
            Layout::Mesh(k) => format!("mesh:{k}"),
            Layout::Group(k) => format!("group:{k}"),
        }
    }

    /// Members per group (`K+1`) for the group layout.
    pub fn group_size(&self) -> Option<usize> {
        match self {
            Layout::Group(k) => Some(k + 1),
            _ => None,
        }
    }

    /// The users `i` sends to, in round-robin order.
    pub fn peers(&self, i: usize, n: usize) -> Vec<usize> {
        match self {
            Layout::Pairs => vec![if (i ^ 1) < n { i ^ 1 } else { 0 }],
            Layout::Ring => vec![(i + 1) % n],
            Layout::Mesh(k) => (1..=(*k).min(n - 1)).map(|d| (i + d) % n).collect(),
            Layout::Group(k) => {
                let first = i / (k + 1) * (k + 1);
                (first..(first + k + 1).min(n)).filter(|&j| j != i).collect()
            }
        }
    }
}

/// The send rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Messages per second per user, open loop.
    PerUser(f64),
    /// Closed loop: as fast as `--window` unconfirmed sends per connection allow.
    Max,
}

impl Rate {
    pub fn parse(s: &str) -> Result<Rate, String> {
        if s == "max" {
            return Ok(Rate::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerUser(r)),
            _ => Err(format!("bad rate {s:?}: messages per second per user (> 0), or `max`")),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub gw: GatewayArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Users, one connection each.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Conversation layout: `pairs` (0↔1, 2↔3 …), `ring` (i→i+1), `mesh:K` (each user sends
    /// round-robin to the next K users), or `group:K` (broadcast: groups of K+1 users, created
    /// with `group_create` before the run; every member posts to its group with `gsend`, each
    /// message reaching the K others; --users must be a multiple of K+1).
    #[arg(long, default_value = "pairs", value_parser = Layout::parse)]
    pub layout: Layout,
    /// Messages per second per user (open loop: latency is measured from the scheduled send
    /// time), or `max`: closed loop, each connection keeps `--window` sends awaiting their
    /// `sent` tick (latency then runs from the actual send).
    #[arg(long, default_value = "10", value_parser = Rate::parse)]
    pub rate: Rate,
    /// Aggregate open-loop rate in messages per second over all users (overrides --rate).
    #[arg(long)]
    pub total_rate: Option<f64>,
    /// With `--rate max`: sends per connection awaiting their `sent` tick.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// How long users send.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After sending stops, how long to wait for outstanding ticks and deliveries (the run
    /// ends earlier once everything acknowledged has been delivered).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Message body size in bytes (the body starts with the sender's sequence and send time).
    #[arg(long, default_value_t = 100)]
    pub body_size: usize,
    /// Acknowledge (cumulative `ack`) after this many received items…
    #[arg(long, default_value_t = 32)]
    pub ack_every: u64,
    /// …or after this long, whichever comes first.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    pub ack_interval: Duration,
    /// Send a `ping` frame when a connection has written nothing for this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// Connections opened per second before the run.
    #[arg(long, default_value_t = 500.0)]
    pub connect_rate: f64,
    /// Time allowed to open one connection (TCP, upgrade, hello, synced).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// User id prefix (users are `<prefix>-<i>`). Default: a fresh random prefix, so inboxes
    /// start empty.
    #[arg(long)]
    pub user_prefix: Option<String>,
    /// A baseline result (`baseline-*.json` from `loadgen baseline --out`): chat throughput is
    /// stated as a ratio to its JetStream publish rate.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// The baseline rate in messages per second, if not given as a file.
    #[arg(long, conflicts_with = "baseline")]
    pub baseline_rate: Option<f64>,
}

/// Live counters, read by the progress line and the end-of-run condition.
#[derive(Default)]
struct Counters {
    issued: AtomicU64,
    acked: AtomicU64,
    /// Deliveries the acknowledged messages call for (one per recipient).
    expected: AtomicU64,
    failed: AtomicU64,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    regressions: AtomicU64,
    ended: AtomicU64,
    /// Highest send→deliver latency since the sampler last looked (µs).
    max_deliver_us: AtomicU64,
}

/// What every connection task of the run shares (read-only but for the counters).
struct Run {
    prefix: String,
    names: Vec<String>,
    peers: Vec<Vec<usize>>,
    /// Group layout: the group each user posts to (empty for 1:1 layouts).
    gids: Vec<String>,
    body_size: usize,
    t0_us: u64,
    end_us: u64,
    /// Open loop: microseconds between two sends of one user; `None` in max mode.
    interval_us: Option<f64>,
    ack_interval: Duration,
    ping_interval: Duration,
    ack_every: u64,
    counters: Counters,
}

impl Run {
    /// The recipients of message `seq` of `sender`: one peer (round-robin) for the 1:1 layouts,
    /// every other member for the group layout.
    fn targets(&self, sender: usize, seq: u64) -> &[usize] {
        let p = &self.peers[sender];
        if !self.gids.is_empty() {
            return p;
        }
        std::slice::from_ref(&p[(seq % p.len() as u64) as usize])
    }

    /// Deliveries one message of `sender` calls for.
    fn fanout(&self, sender: usize) -> u64 {
        if self.gids.is_empty() {
            1
        } else {
            self.peers[sender].len() as u64
        }
    }

    fn send_frame(&self, sender: usize, seq: u64, intended_us: u64) -> String {
        let (kind, key, to) = match self.gids.get(sender) {
            Some(gid) => ("gsend", "group", gid),
            None => ("send", "to", &self.names[self.targets(sender, seq)[0]]),
        };
        let head = format!("{seq} {intended_us} ");
        let pad = self.body_size.saturating_sub(head.len());
        let mut s = String::with_capacity(64 + to.len() + head.len() + pad + 48);
        s.push_str(r#"{"t":""#);
        s.push_str(kind);
        s.push_str(r#"","id":""#);
        s.push_str(&format!("{seq}-{intended_us}"));
        s.push_str(r#"",""#);
        s.push_str(key);
        s.push_str(r#"":""#);
        s.push_str(to);
        s.push_str(r#"","body":""#);
        s.push_str(&head);
        s.extend(std::iter::repeat_n('x', pad));
        s.push_str(r#""}"#);
        s
    }

    fn user_index(&self, name: &str) -> Option<u32> {
        name.strip_prefix(&self.prefix)?
            .strip_prefix('-')?
            .parse()
            .ok()
            .filter(|&i: &u32| (i as usize) < self.names.len())
    }
}

/// Per-connection state shared by its reader and writer.
struct Shared {
    /// Highest inbox sequence received (what to ack).
    highest: AtomicU64,
    ack_now: Notify,
    /// Max mode: free slots for sends awaiting their tick.
    window: Semaphore,
}

/// `<seq>-<intended_us>` (client ids) or `<seq> <intended_us> …` (bodies).
fn parse_stamp(s: &str, sep: char) -> Option<(u64, u64)> {
    let mut it = s.splitn(3, sep);
    let seq = it.next()?.parse().ok()?;
    let us = it.next()?.split(' ').next()?.parse().ok()?;
    Some((seq, us))
}

struct WriterOut {
    issued: u64,
    error: Option<String>,
}

async fn writer(
    run: Arc<Run>,
    me: usize,
    sh: Arc<Shared>,
    mut sink: SplitSink<Ws, Message>,
    mut stop: watch::Receiver<bool>,
) -> WriterOut {
    let clock = util::clock();
    let mut issued = 0u64;
    let mut last_acked = 0u64;
    // Spread users over the interval so that they do not all send at the same instant.
    let phase = run.interval_us.map(|i| i * (me as f64 / run.names.len() as f64)).unwrap_or(0.0);
    let intended = |k: u64| -> u64 { run.t0_us + (phase + k as f64 * run.interval_us.unwrap_or(0.0)) as u64 };
    let end = tokio::time::Instant::from_std(clock.instant_at(run.end_us));
    let mut sending = true;
    let mut ack_tick = tokio::time::interval(run.ack_interval);
    ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_write = Instant::now();
    let mut error = None;
    let max_mode = run.interval_us.is_none();

    tokio::time::sleep_until(clock.instant_at(run.t0_us).into()).await;
    loop {
        let ping_at = tokio::time::Instant::from_std(last_write + run.ping_interval);
        let next_send = tokio::time::Instant::from_std(clock.instant_at(intended(issued)));
        // Ok(true) when something was written (which postpones the next ping).
        let res: Result<bool, tokio_tungstenite::tungstenite::Error> = tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = sh.ack_now.notified() => ack(&sh, &mut sink, &mut last_acked).await,
            _ = ack_tick.tick() => ack(&sh, &mut sink, &mut last_acked).await,
            _ = tokio::time::sleep_until(end), if sending => { sending = false; Ok(false) }
            _ = tokio::time::sleep_until(next_send), if sending && !max_mode => {
                // Everything due now, in one write; the next wake-up re-checks acks first.
                let now = clock.now_us();
                let mut n = 0;
                let mut r = Ok(());
                while n < 64 {
                    let at = intended(issued);
                    if at > now || at >= run.end_us {
                        break;
                    }
                    if let Err(e) = sink.feed(Message::Text(run.send_frame(me, issued, at).into())).await {
                        r = Err(e);
                        break;
                    }
                    issued += 1;
                    n += 1;
                }
                run.counters.issued.fetch_add(n, Relaxed);
                if intended(issued) >= run.end_us {
                    sending = false;
                }
                match r {
                    Ok(()) if n > 0 => sink.flush().await.map(|_| true),
                    Ok(()) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            permit = sh.window.acquire(), if sending && max_mode => {
                if let Ok(p) = permit { p.forget(); }
                let mut n = 1;
                let mut r = sink.feed(Message::Text(run.send_frame(me, issued, clock.now_us()).into())).await;
                issued += 1;
                while r.is_ok() && n < 64 {
                    match sh.window.try_acquire() {
                        Ok(p) => p.forget(),
                        Err(_) => break,
                    }
                    r = sink.feed(Message::Text(run.send_frame(me, issued, clock.now_us()).into())).await;
                    issued += 1;
                    n += 1;
                }
                run.counters.issued.fetch_add(n, Relaxed);
                match r {
                    Ok(()) => sink.flush().await.map(|_| true),
                    Err(e) => Err(e),
                }
            }
            _ = tokio::time::sleep_until(ping_at) => sink.send(Message::Text(client::PING.into())).await.map(|_| true),
        };
        match res {
            Ok(true) => last_write = Instant::now(),
            Ok(false) => {}
            Err(e) => {
                error = Some(client::ws_fail("write", &e).cause);
                break;
            }
        }
    }
    if error.is_none() {
        // Acknowledge what arrived last, then close politely.
        let _ = ack(&sh, &mut sink, &mut last_acked).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    }
    WriterOut { issued, error }
}

/// Sends a cumulative ack when something new arrived; Ok(true) when it wrote.
async fn ack(
    sh: &Shared,
    sink: &mut SplitSink<Ws, Message>,
    last_acked: &mut u64,
) -> Result<bool, tokio_tungstenite::tungstenite::Error> {
    let h = sh.highest.load(Relaxed);
    if h > *last_acked {
        *last_acked = h;
        sink.send(Message::Text(client::ack_frame(h).into())).await?;
        return Ok(true);
    }
    Ok(false)
}

#[derive(Default)]
struct ReaderOut {
    sender: SenderBook,
    receiver: ReceiverBook,
    h_sent: Option<Hist>,
    h_deliver: Option<Hist>,
    errors: BTreeMap<String, u64>,
    ended: Option<String>,
    receipts: u64,
    other_items: u64,
    last_tick_us: u64,
    last_delivery_us: u64,
}

struct Reader {
    run: Arc<Run>,
    /// This connection's user index.
    me: usize,
    sh: Arc<Shared>,
    max_mode: bool,
    since_ack: u64,
    out: ReaderOut,
    h_sent: Hist,
    h_deliver: Hist,
}

impl Reader {
    fn handle(&mut self, text: &str) {
        let f = match Frame::parse(text) {
            Ok(f) => f,
            Err(_) => {
                *self.out.errors.entry("unparseable_frame".into()).or_default() += 1;
                return;
            }
        };
        let c = &self.run.counters;
        match &*f.t {
            "sent" => {
                let now = util::now_us();
                match f.id.as_deref().and_then(|id| parse_stamp(id, '-')) {
                    Some((seq, intended)) => {
                        self.out.sender.sent(seq, f.dup == Some(true));
                        hist::record(&mut self.h_sent, now.saturating_sub(intended));
                    }
                    None => self.out.sender.unknown_ids += 1,
                }
                self.out.last_tick_us = now;
                c.acked.fetch_add(1, Relaxed);
                c.expected.fetch_add(self.run.fanout(self.me), Relaxed);
                if self.max_mode {
                    self.sh.window.add_permits(1);
                }
            }
            "error" => {
                let code = f.code.as_deref().unwrap_or("unknown");
                *self.out.errors.entry(format!("error_{code}")).or_default() += 1;
                if let Some(id) = f.id.as_deref() {
                    match parse_stamp(id, '-') {
                        Some((seq, _)) => self.out.sender.failed(seq),
                        None => self.out.sender.unknown_ids += 1,
                    }
                    c.failed.fetch_add(1, Relaxed);
                    if self.max_mode {
                        self.sh.window.add_permits(1);
                    }
                }
            }
            "msg" => {
                let Some(seq) = f.seq else {
                    *self.out.errors.entry("msg_without_seq".into()).or_default() += 1;
                    return;
                };
                if !self.out.receiver.inbox_seq(seq) {
                    c.regressions.fetch_add(1, Relaxed);
                    return;
                }
                self.sh.highest.fetch_max(seq, Relaxed);
                match f.m.as_ref().map(|m| &*m.k) {
                    Some("chat") | Some("group") => {
                        let m = f.m.as_ref().expect("checked");
                        let sender = m.from.as_deref().and_then(|n| self.run.user_index(n));
                        let stamp = m.body.as_deref().and_then(|b| parse_stamp(b, ' '));
                        match (sender, stamp) {
                            (Some(s), Some((mseq, intended))) => match self.out.receiver.chat(s, mseq) {
                                Arrival::First => {
                                    let now = util::now_us();
                                    let lat = now.saturating_sub(intended);
                                    hist::record(&mut self.h_deliver, lat);
                                    c.max_deliver_us.fetch_max(lat, Relaxed);
                                    self.out.last_delivery_us = now;
                                    c.delivered.fetch_add(1, Relaxed);
                                }
                                Arrival::Duplicate => {
                                    c.duplicates.fetch_add(1, Relaxed);
                                }
                            },
                            _ => self.out.receiver.unreadable += 1,
                        }
                    }
                    Some("receipt") => self.out.receipts += 1,
                    _ => self.out.other_items += 1,
                }
                self.since_ack += 1;
                if self.since_ack >= self.run.ack_every {
                    self.since_ack = 0;
                    self.sh.ack_now.notify_one();
                }
            }
            "pong" | "hello" | "synced" => {}
            other => *self.out.errors.entry(format!("frame_{other}")).or_default() += 1,
        }
    }
}

async fn reader(
    run: Arc<Run>,
    me: usize,
    sh: Arc<Shared>,
    mut stream: SplitStream<Ws>,
    early: Vec<String>,
    mut stop: watch::Receiver<bool>,
) -> ReaderOut {
    let max_mode = run.interval_us.is_none();
    let mut r = Reader {
        run,
        me,
        sh,
        max_mode,
        since_ack: 0,
        out: ReaderOut::default(),
        h_sent: hist::new(),
        h_deliver: hist::new(),
    };
    for t in &early {
        r.handle(t);
    }
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = stream.next() => m,
        };
        match msg {
            None => {
                r.out.ended = Some("eof".into());
                break;
            }
            Some(Err(e)) => {
                r.out.ended = Some(client::ws_fail("read", &e).cause);
                break;
            }
            Some(Ok(Message::Text(t))) => r.handle(t.as_str()),
            Some(Ok(Message::Close(f))) => {
                let code = f.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                let reason = f.map(|f| f.reason.to_string()).unwrap_or_default();
                r.out.ended = Some(format!("closed_{code} {reason}").trim().to_owned());
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    if r.out.ended.is_some() {
        r.run.counters.ended.fetch_add(1, Relaxed);
    }
    r.out.h_sent = Some(r.h_sent);
    r.out.h_deliver = Some(r.h_deliver);
    r.out
}

/// Opens every user's connection at `rate` per second; fails the run if any cannot connect.
pub async fn open_all(
    targets: &[client::Target],
    gw: &GatewayArgs,
    tokens: &[String],
    rate: f64,
    timeout: Duration,
) -> anyhow::Result<(Vec<Opened>, Hist)> {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let at = start + Duration::from_secs_f64(i as f64 / rate.max(1.0));
        let target = targets[i % targets.len()].clone();
        let token = token.clone();
        let source = util::source_ip(gw.source_ip_base, gw.source_ips, i as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            client::open(&target, &token, source, client::ws_config(64 * 1024), timeout).await
        }));
    }
    let mut opened = Vec::new();
    let mut fails: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut h = hist::new();
    for t in tasks {
        match t.await? {
            Ok(o) => {
                hist::record(&mut h, o.timings.synced_us);
                opened.push(o);
            }
            Err(f) => {
                let e = fails.entry(f.cause).or_insert((0, f.detail));
                e.0 += 1;
            }
        }
    }
    if !fails.is_empty() {
        let list: Vec<String> = fails.iter().map(|(c, (n, d))| format!("{c} ×{n} (e.g. {d})")).collect();
        bail!("{} of {} connections failed to open: {}", tokens.len() - opened.len(), tokens.len(), list.join("; "));
    }
    Ok((opened, h))
}

/// Reads the baseline publish rate from a `loadgen baseline` JSON file.
pub fn baseline_rate(path: &std::path::Path) -> anyhow::Result<f64> {
    let v: Value =
        serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)?;
    v["results"]["publish"]["msgs_per_s"]
        .as_f64()
        .ok_or_else(|| anyhow!("{} has no results.publish.msgs_per_s", path.display()))
}

/// Group layout: the first member of each group of `size` creates it with the others
/// (`group_create`); returns the group id of every user. Frames that arrive meanwhile (inbox
/// items such as the `group_event`) are kept for the member's reader.
async fn create_groups(
    opened: &mut [Opened],
    names: &[String],
    size: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let creations = opened.chunks_mut(size).enumerate().map(|(g, members)| {
        let others: Vec<&str> = names[g * size + 1..(g + 1) * size].iter().map(String::as_str).collect();
        async move {
            let creator = &mut members[0];
            let id = format!("lg-group-{g}");
            let frame = json!({"t": "group_create", "id": id, "name": format!("loadgen {g}"), "members": others});
            creator
                .ws
                .send(Message::Text(frame.to_string().into()))
                .await
                .map_err(|e| anyhow!("group {g}: sending group_create: {e}"))?;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let msg = tokio::time::timeout_at(deadline, creator.ws.next())
                    .await
                    .map_err(|_| anyhow!("group {g}: no answer to group_create within {}", fmt_duration(timeout)))?;
                let text = match msg {
                    None => bail!("group {g}: the creator's connection ended"),
                    Some(Err(e)) => bail!("group {g}: {e}"),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(f))) => bail!("group {g}: connection closed ({f:?})"),
                    Some(Ok(_)) => continue,
                };
                let v: Value = serde_json::from_str(text.as_str()).with_context(|| format!("group {g}: bad frame"))?;
                match v["t"].as_str() {
                    Some("group") if v["id"] == id.as_str() => {
                        break v["group"]["gid"]
                            .as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| anyhow!("group {g}: answer without gid: {}", text.as_str()))
                    }
                    Some("error") if v["id"] == id.as_str() => {
                        bail!("group {g}: group_create refused: {}", text.as_str())
                    }
                    _ => creator.early.push(text.as_str().to_owned()),
                }
            }
        }
    });
    let gids = futures::future::try_join_all(creations).await?;
    Ok(gids.into_iter().flat_map(|g| std::iter::repeat_n(g, size)).collect())
}

/// Moments of a measurement, for callers that sample something around the send window (the
/// `peer` scenario reads the servers' CPU time there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// t0: the first send is due now.
    SendStart,
    /// Sending is over and every answer and delivery has arrived (or the grace period ended);
    /// the connections are still open.
    Settled,
}

/// What one run measured, before it is judged and reported.
pub struct Measured {
    pub rate: Rate,
    pub check: ledger::Check,
    pub errors: BTreeMap<String, u64>,
    /// Connections that ended before the run did, by cause.
    pub ended: BTreeMap<String, u64>,
    pub receipts: u64,
    pub other_items: u64,
    pub t0_us: u64,
    pub last_tick_us: u64,
    pub last_delivery_us: u64,
    pub finished_at_us: u64,
    /// `[t_s, issued, sent, delivered, max send→deliver µs]` per second from t0.
    pub timeline: Vec<[u64; 5]>,
    pub steady: Option<f64>,
    pub offered: Option<f64>,
    pub total_issued: u64,
    /// Messages acknowledged by `sent`.
    pub acked: u64,
    /// First deliveries (one per recipient: K per message with `group:K`).
    pub delivered: u64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    pub h_sent: Hist,
    pub h_deliver: Hist,
    pub h_open: Hist,
    pub early_items: usize,
    /// loadgen's own CPU seconds since it started.
    pub loadgen_cpu_s: f64,
    pub metrics_before: Vec<Result<scrape::Samples, String>>,
    pub metrics_after: Vec<Result<scrape::Samples, String>>,
    pub prefix: String,
    pub ping_interval: Duration,
}

/// The verdict of a measurement: `(verdict, exit status, problems in words)`.
pub fn judge(m: &Measured) -> (String, i32, Vec<String>) {
    let violations = m.check.violations();
    let ended_total: u64 = m.ended.values().sum();
    let send_errors = m.check.failed + m.check.unanswered;
    let list = |m: &BTreeMap<String, u64>| m.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", ");
    // What went wrong besides the ledger, in words (close codes, error codes).
    let mut problems = Vec::new();
    if ended_total > 0 {
        problems.push(format!(
            "{ended_total} connections ended early ({}); messages to their users count as lost",
            list(&m.ended)
        ));
    }
    if !m.errors.is_empty() {
        problems.push(format!("errors received: {}", list(&m.errors)));
    }
    let verdict = if violations > 0 {
        format!("FAIL: ledger violations ({violations})")
    } else if send_errors > 0 || ended_total > 0 {
        format!("ERRORS: {send_errors} sends failed or unanswered, {ended_total} connections ended early")
    } else {
        "PASS: every acknowledged message delivered exactly once, in order".to_owned()
    };
    let exit = if violations > 0 {
        1
    } else if send_errors > 0 || ended_total > 0 {
        3
    } else {
        0
    };
    (verdict, exit, problems)
}

/// Connects the users, runs the workload, and returns what it measured; `mark` is called at
/// each [`Mark`].
pub async fn measure(args: &Args, mut mark: impl FnMut(Mark)) -> anyhow::Result<Measured> {
    if args.users < 2 {
        bail!("--users must be at least 2");
    }
    if args.users as u64 > u32::MAX as u64 {
        bail!("too many users");
    }
    if let Layout::Mesh(k) = args.layout {
        if k >= args.users {
            bail!("mesh:{k} needs more than {k} users");
        }
    }
    if let Some(size) = args.layout.group_size() {
        if !args.users.is_multiple_of(size) {
            bail!("{} needs --users to be a multiple of {size} (groups of {size})", args.layout.name());
        }
    }
    if args.gw.secret.len() < 16 {
        bail!("the token secret (--secret or JWT_SECRET) must be at least 16 bytes, like the gateway's");
    }
    let rate = match (args.total_rate, args.rate) {
        (Some(t), _) if t > 0.0 => Rate::PerUser(t / args.users as f64),
        (Some(_), _) => bail!("--total-rate must be > 0"),
        (None, r) => r,
    };
    let nofile = util::raise_nofile();
    if nofile < args.users as u64 + 64 {
        bail!("RLIMIT_NOFILE is {nofile}: too low for {} connections", args.users);
    }
    let prefix = args.user_prefix.clone().unwrap_or_else(|| format!("lg{}", util::run_tag()));
    let names: Vec<String> = (0..args.users).map(|i| format!("{prefix}-{i}")).collect();
    if let Some(bad) = names.iter().find(|n| protocol::UserId::parse(n).is_err()) {
        bail!("user id {bad:?} is not valid (ids: 1–64 bytes of A-Z a-z 0-9 _ -)");
    }
    let keys = protocol::TokenKeys::hs256(args.gw.secret.as_bytes(), 0);
    let ttl = (args.duration + args.grace).as_secs() + 3600;
    let tokens: Vec<String> = names.iter().map(|n| keys.mint(n, Some("lg"), ttl)).collect();
    let targets = client::resolve_all(&args.gw.urls, args.gw.ca_file.as_deref()).await?;
    let peers: Vec<Vec<usize>> = (0..args.users).map(|i| args.layout.peers(i, args.users)).collect();

    let metrics_before = scrape::scrape_all(&args.gw.metrics_urls).await;

    report::note(format!(
        "opening {} connections to {} ({} /s)",
        args.users,
        args.gw.urls.join(", "),
        args.connect_rate
    ));
    let (mut opened, h_open) = open_all(&targets, &args.gw, &tokens, args.connect_rate, args.connect_timeout).await?;
    let gids = match args.layout.group_size() {
        Some(size) => {
            let gids = create_groups(&mut opened, &names, size, args.connect_timeout).await?;
            report::note(format!("created {} groups of {size}", args.users / size));
            gids
        }
        None => Vec::new(),
    };
    let early_items: usize = opened.iter().map(|o| o.early.len()).sum();
    // Ping well within the gateway's heartbeat timeout (from `hello`).
    let heartbeat = opened.iter().map(|o| o.heartbeat_ms).min().unwrap_or(30_000);
    let ping_interval = args.ping_interval.min(Duration::from_millis((heartbeat / 2).max(100)));

    let interval_us = match rate {
        Rate::PerUser(r) => Some(1e6 / r),
        Rate::Max => None,
    };
    let t0_us = util::now_us() + 500_000;
    let run = Arc::new(Run {
        prefix: prefix.clone(),
        names: names.clone(),
        peers: peers.clone(),
        gids,
        body_size: args.body_size,
        t0_us,
        end_us: t0_us + args.duration.as_micros() as u64,
        interval_us,
        ack_interval: args.ack_interval,
        ping_interval,
        ack_every: args.ack_every.max(1),
        counters: Counters::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for (i, o) in opened.into_iter().enumerate() {
        let sh = Arc::new(Shared {
            highest: AtomicU64::new(0),
            ack_now: Notify::new(),
            window: Semaphore::new(if interval_us.is_none() { args.window.max(1) } else { 0 }),
        });
        let (sink, stream) = o.ws.split();
        writers.push(tokio::spawn(writer(run.clone(), i, sh.clone(), sink, stop_rx.clone())));
        readers.push(tokio::spawn(reader(run.clone(), i, sh, stream, o.early, stop_rx.clone())));
    }

    // A one-second time series aligned on t0.
    let timeline: Arc<Mutex<Vec<[u64; 5]>>> = Arc::default();
    let sampler = {
        let (run, timeline) = (run.clone(), timeline.clone());
        tokio::spawn(async move {
            let t0 = util::clock().instant_at(run.t0_us);
            let mut k = 1u64;
            loop {
                tokio::time::sleep_until((t0 + Duration::from_secs(k)).into()).await;
                let c = &run.counters;
                timeline.lock().unwrap().push([
                    k,
                    c.issued.load(Relaxed),
                    c.acked.load(Relaxed),
                    c.delivered.load(Relaxed),
                    c.max_deliver_us.swap(0, Relaxed),
                ]);
                k += 1;
            }
        })
    };
    let progress = {
        let run = run.clone();
        let mut last = (0u64, 0u64, 0.0f64);
        Progress::start(move |_| {
            let c = &run.counters;
            let t = (util::now_us() as f64 - run.t0_us as f64) / 1e6;
            let (acked, delivered) = (c.acked.load(Relaxed), c.delivered.load(Relaxed));
            let dt = (t - last.2).max(1e-3);
            let line = format!(
                "chat t={:>5.1}s issued {} sent {} ({}/s) delivered {} ({}/s) errors {} dup {} ended {}",
                t,
                c.issued.load(Relaxed),
                acked,
                fmt_rate((acked - last.0) as f64 / dt),
                delivered,
                fmt_rate((delivered - last.1) as f64 / dt),
                c.failed.load(Relaxed),
                c.duplicates.load(Relaxed),
                c.ended.load(Relaxed),
            );
            last = (acked, delivered, t);
            line
        })
    };

    report::note(format!(
        "sending for {} ({}), then up to {} grace",
        fmt_duration(args.duration),
        match rate {
            Rate::PerUser(r) =>
                format!("{} msg/s per user, {} msg/s total, open loop", fmt_rate(r), fmt_rate(r * args.users as f64)),
            Rate::Max => format!("max: closed loop, window {}", args.window),
        },
        fmt_duration(args.grace)
    ));
    let clock = util::clock();
    tokio::time::sleep_until(clock.instant_at(run.t0_us).into()).await;
    mark(Mark::SendStart);
    tokio::time::sleep_until(clock.instant_at(run.end_us).into()).await;
    let grace_end = clock.instant_at(run.end_us) + args.grace;
    // Grace: until every send is answered and every acknowledged message delivered.
    let mut settled = false;
    while Instant::now() < grace_end {
        let c = &run.counters;
        let answered = c.acked.load(Relaxed) + c.failed.load(Relaxed);
        if answered >= c.issued.load(Relaxed) && c.delivered.load(Relaxed) >= c.expected.load(Relaxed) {
            settled = true;
            break;
        }
        if c.ended.load(Relaxed) as usize == args.users {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A little longer, to catch late duplicates.
    tokio::time::sleep(Duration::from_millis(if settled { 500 } else { 0 })).await;
    mark(Mark::Settled);
    let finished_at_us = util::now_us();
    let _ = stop_tx.send(true);
    sampler.abort();
    let mut wouts = Vec::new();
    for w in writers {
        wouts.push(w.await?);
    }
    let mut routs = Vec::new();
    for r in readers {
        routs.push(r.await?);
    }
    progress.stop().await;
    let loadgen_cpu_s = crate::procfs::cpu_seconds(None).unwrap_or(0.0);
    let metrics_after = scrape::scrape_all(&args.gw.metrics_urls).await;

    // The ledger.
    let issued: Vec<u64> = wouts.iter().map(|w| w.issued).collect();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut h_sent = hist::new();
    let mut h_deliver = hist::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut ended: BTreeMap<String, u64> = BTreeMap::new();
    let (mut receipts, mut other_items, mut last_tick, mut last_delivery) = (0, 0, 0, 0);
    for (w, r) in wouts.iter().zip(routs) {
        // One cause per connection: what the reader saw (the close code), else the write error.
        if let Some(e) = r.ended.clone().or_else(|| w.error.as_ref().map(|e| format!("writer_{e}"))) {
            *ended.entry(e).or_default() += 1;
        }
        for (k, v) in r.errors {
            *errors.entry(k).or_default() += v;
        }
        hist::merge(&mut h_sent, r.h_sent.as_ref().expect("set"));
        hist::merge(&mut h_deliver, r.h_deliver.as_ref().expect("set"));
        receipts += r.receipts;
        other_items += r.other_items;
        last_tick = last_tick.max(r.last_tick_us);
        last_delivery = last_delivery.max(r.last_delivery_us);
        senders.push(r.sender);
        receivers.push(r.receiver);
    }
    let check = ledger::check(&issued, &senders, &receivers, |s, seq| run.targets(s, seq));

    // Throughput: over the sending window, or until the last tick / delivery if later (a
    // backlog drained during the grace period counts against the rate).
    let d = args.duration.as_secs_f64();
    let span = |last_us: u64| (last_us.saturating_sub(t0_us) as f64 / 1e6).max(d);
    let total_issued: u64 = issued.iter().sum();
    let acked = check.acknowledged;
    let delivered = run.counters.delivered.load(Relaxed);
    let sent_per_s = acked as f64 / span(last_tick);
    let delivered_per_s = delivered as f64 / span(last_delivery);
    let tl = timeline.lock().unwrap().clone();
    let steady = steady_rate(&tl, args.duration);
    let offered = match rate {
        Rate::PerUser(r) => Some(r * args.users as f64),
        Rate::Max => None,
    };
    Ok(Measured {
        rate,
        check,
        errors,
        ended,
        receipts,
        other_items,
        t0_us,
        last_tick_us: last_tick,
        last_delivery_us: last_delivery,
        finished_at_us,
        timeline: tl,
        steady,
        offered,
        total_issued,
        acked,
        delivered,
        sent_per_s,
        delivered_per_s,
        h_sent,
        h_deliver,
        h_open,
        early_items,
        loadgen_cpu_s,
        metrics_before,
        metrics_after,
        prefix,
        ping_interval,
    })
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let started = SystemTime::now();
    let baseline = match (&args.baseline, args.baseline_rate) {
        (Some(p), _) => Some((baseline_rate(p)?, p.display().to_string())),
        (None, Some(r)) => Some((r, "--baseline-rate".to_owned())),
        (None, None) => None,
    };
    let m = measure(&args, |_| {}).await?;
    let (verdict, exit, problems) = judge(&m);
    let Measured {
        rate,
        check,
        errors,
        ended,
        receipts,
        other_items,
        t0_us,
        last_tick_us: last_tick,
        last_delivery_us: last_delivery,
        finished_at_us,
        timeline: tl,
        steady,
        offered,
        total_issued,
        acked,
        delivered,
        sent_per_s,
        delivered_per_s,
        h_sent,
        h_deliver,
        h_open,
        early_items,
        loadgen_cpu_s: cpu,
        metrics_before,
        metrics_after,
        prefix,
        ping_interval,
    } = m;
    let d = args.duration.as_secs_f64();
    let violations = check.violations();

    let gateway = scrape::gateway_report(&args.gw.metrics_urls, &metrics_before, &metrics_after);

    let ratio = |v: f64| baseline.as_ref().map(|(b, _)| v / b);
    let mode = match rate {
        Rate::PerUser(_) => "open-loop",
        Rate::Max => "closed-loop (max)",
    };
    let origin = match rate {
        Rate::PerUser(_) => "intended (scheduled) send time",
        Rate::Max => "actual send time",
    };
    let config = json!({
        "urls": args.gw.urls,
        "metrics_urls": args.gw.metrics_urls,
        "users": args.users,
        "layout": args.layout.name(),
        "rate": match rate { Rate::PerUser(r) => json!(r), Rate::Max => json!("max") },
        "total_rate": offered,
        "window": args.window,
        "duration_s": d,
        "grace_s": args.grace.as_secs_f64(),
        "body_size": args.body_size,
        "ack_every": args.ack_every,
        "ack_interval_ms": args.ack_interval.as_millis() as u64,
        "ping_interval_ms": ping_interval.as_millis() as u64,
        "connect_rate": args.connect_rate,
        "user_prefix": prefix,
        "source_ip_base": args.gw.source_ip_base.to_string(),
        "source_ips": args.gw.source_ips,
        "threads": args.run.threads(),
        "baseline": baseline.as_ref().map(|(r, src)| json!({"msgs_per_s": r, "source": src})),
    });
    let results = json!({
        "mode": mode,
        "verdict": verdict,
        "throughput": {
            "offered_per_s": offered,
            "issued": total_issued,
            "issued_per_s": total_issued as f64 / d,
            "sent_acknowledged": acked,
            "sent_per_s": sent_per_s,
            "delivered": delivered,
            "delivered_per_s": delivered_per_s,
            "steady_delivered_per_s": steady,
            "receipts_received": receipts,
            "other_items_received": other_items,
            "last_tick_after_t0_s": last_tick.saturating_sub(t0_us) as f64 / 1e6,
            "last_delivery_after_t0_s": last_delivery.saturating_sub(t0_us) as f64 / 1e6,
            "run_end_after_t0_s": finished_at_us.saturating_sub(t0_us) as f64 / 1e6,
        },
        "baseline_ratio": {
            "delivered_per_s": ratio(delivered_per_s),
            "sent_per_s": ratio(sent_per_s),
        },
        "latency": {
            "measured_from": origin,
            "send_to_sent": hist::summary(&h_sent),
            "send_to_deliver": hist::summary(&h_deliver),
            "connect_to_synced": hist::summary(&h_open),
        },
        "ledger": check,
        "violations": violations,
        "errors": errors,
        "connections_ended_early": ended,
        "items_before_synced": early_items,
        "loadgen_cpu_seconds": cpu,
        "timeline": tl.iter().map(|r| json!({"t_s": r[0], "issued": r[1], "sent": r[2], "delivered": r[3], "max_send_to_deliver_us": r[4]})).collect::<Vec<_>>(),
        "gateway": gateway,
    });

    let base_line = match &baseline {
        Some((b, _)) => format!(
            "baseline (JetStream publish): {} msg/s → delivered/baseline = {:.3}, sent/baseline = {:.3}\n",
            fmt_rate(*b),
            delivered_per_s / b,
            sent_per_s / b
        ),
        None => String::new(),
    };
    let human = format!(
        "chat: {} users ({}), {}, {} for {}\n\
         issued {} · sent {} ({} msg/s) · delivered {} ({} msg/s; steady {} msg/s)\n\
         {}\
         send→sent    {}\n\
         send→deliver {}\n\
         (latency from the {})\n\
         ledger: lost {} · duplicates {} · reordered {} · seq regressions {} · misdelivered {} · failed {} · unanswered {}\n\
         {}{}\n",
        args.users,
        args.layout.name(),
        mode,
        offered.map(|o| format!("{} msg/s offered", fmt_rate(o))).unwrap_or_else(|| format!("window {}", args.window)),
        fmt_duration(args.duration),
        total_issued,
        acked,
        fmt_rate(sent_per_s),
        delivered,
        fmt_rate(delivered_per_s),
        steady.map(fmt_rate).unwrap_or_else(|| "–".into()),
        base_line,
        hist::line(&h_sent),
        hist::line(&h_deliver),
        origin,
        check.lost,
        check.duplicates,
        check.reordered,
        check.seq_regressions,
        check.misdelivered,
        check.failed,
        check.unanswered,
        problems.iter().map(|p| format!("{p}\n")).collect::<String>(),
        verdict,
    );
    let mut md = String::new();
    md.push_str(&format!(
        "{} users, layout `{}`, {}, {}, sending for {}, body {} bytes.\n\n",
        args.users,
        args.layout.name(),
        mode,
        offered
            .map(|o| format!("{} msg/s offered", fmt_rate(o)))
            .unwrap_or_else(|| format!("window {} per connection", args.window)),
        fmt_duration(args.duration),
        args.body_size
    ));
    md.push_str("| figure | value |\n|---|---|\n");
    md.push_str(&format!("| sent (acknowledged) | {acked} → **{} msg/s** |\n", fmt_rate(sent_per_s)));
    md.push_str(&format!(
        "| delivered | {delivered} → **{} msg/s** (steady {} msg/s) |\n",
        fmt_rate(delivered_per_s),
        steady.map(fmt_rate).unwrap_or_else(|| "–".into())
    ));
    if let Some((b, _)) = &baseline {
        md.push_str(&format!(
            "| baseline JetStream publish | {} msg/s → delivered/baseline **{:.3}** |\n",
            fmt_rate(*b),
            delivered_per_s / b
        ));
    }
    md.push_str(&format!(
        "| ledger | lost {} · duplicates {} · reordered {} · seq regressions {} · misdelivered {} · failed {} · unanswered {} |\n",
        check.lost, check.duplicates, check.reordered, check.seq_regressions, check.misdelivered, check.failed, check.unanswered
    ));
    for p in &problems {
        md.push_str(&format!("| problem | {p} |\n"));
    }
    md.push_str(&format!("| verdict | {verdict} |\n\n"));
    md.push_str(&format!("Latency measured from the {origin}.\n\n"));
    md.push_str(hist::MD_HEADER);
    md.push_str(&hist::md_row("send → sent", &h_sent));
    md.push_str(&hist::md_row("send → deliver", &h_deliver));
    md.push_str(&hist::md_row("connect → synced", &h_open));
    let plot = report::Plot {
        title: format!("chat: latency ({mode}, from the {origin})"),
        series: vec![("send → sent", &h_sent), ("send → deliver", &h_deliver), ("connect → synced", &h_open)],
    };
    report::finish_plot(
        args.run.out.as_deref(),
        &Output { scenario: "chat", started, config, results, markdown: md, human },
        Some(&plot),
    )?;
    Ok(exit)
}

/// Delivered messages per second between 10% of the send window (at least 1 s, to skip the
/// ramp) and its end, from the one-second time series.
fn steady_rate(tl: &[[u64; 5]], duration: Duration) -> Option<f64> {
    let d = duration.as_secs();
    let from = (d / 10).max(1);
    let a = tl.iter().find(|r| r[0] == from)?;
    let b = tl.iter().find(|r| r[0] == d)?;
    (b[0] > a[0]).then(|| (b[3] - a[3]) as f64 / (b[0] - a[0]) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        assert_eq!(Layout::parse("pairs").unwrap().peers(2, 4), vec![3]);
        assert_eq!(Layout::Pairs.peers(4, 5), vec![0]);
        assert_eq!(Layout::Ring.peers(3, 4), vec![0]);
        assert_eq!(Layout::parse("mesh:2").unwrap().peers(3, 4), vec![0, 1]);
        assert!(Layout::parse("mesh:0").is_err());
        let g = Layout::parse("group:2").unwrap();
        assert_eq!((g.name(), g.group_size()), ("group:2".to_owned(), Some(3)));
        assert_eq!(g.peers(0, 6), vec![1, 2]);
        assert_eq!(g.peers(4, 6), vec![3, 5]);
        assert!(Layout::parse("group:0").is_err());
        assert!(Layout::parse("group:1024").is_err());
        assert_eq!(Layout::Pairs.group_size(), None);
        assert_eq!(Rate::parse("max").unwrap(), Rate::Max);
        assert!(Rate::parse("0").is_err());
    }

    #[test]
    fn frames_and_stamps() {
        let run = Run {
            prefix: "p".into(),
            names: vec!["p-0".into(), "p-1".into()],
            peers: vec![vec![1], vec![0]],
            gids: Vec::new(),
            body_size: 40,
            t0_us: 0,
            end_us: 0,
            interval_us: None,
            ack_interval: Duration::from_millis(1),
            ping_interval: Duration::from_secs(1),
            ack_every: 1,
            counters: Counters::default(),
        };
        let f = run.send_frame(0, 7, 123456);
        let v: Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["to"], "p-1");
        assert_eq!(v["id"], "7-123456");
        assert_eq!(v["body"].as_str().unwrap().len(), 40);
        assert_eq!(parse_stamp(v["body"].as_str().unwrap(), ' '), Some((7, 123456)));
        assert_eq!(parse_stamp("7-123456", '-'), Some((7, 123456)));
        assert_eq!(run.user_index("p-1"), Some(1));
        assert_eq!(run.user_index("p-2"), None);
        assert_eq!(run.user_index("q-1"), None);
        // Decoded by the gateway's own frame decoder.
        assert!(protocol::decode_client_frame(f.as_bytes(), &protocol::Limits::default()).is_ok());
    }

    #[test]
    fn group_frames_and_targets() {
        let run = Run {
            prefix: "p".into(),
            names: (0..3).map(|i| format!("p-{i}")).collect(),
            peers: (0..3).map(|i| Layout::Group(2).peers(i, 3)).collect(),
            gids: vec!["g0000001".into(); 3],
            body_size: 20,
            t0_us: 0,
            end_us: 0,
            interval_us: None,
            ack_interval: Duration::from_millis(1),
            ping_interval: Duration::from_secs(1),
            ack_every: 1,
            counters: Counters::default(),
        };
        assert_eq!(run.targets(1, 5), &[0, 2]);
        assert_eq!(run.fanout(1), 2);
        let f = run.send_frame(1, 5, 99);
        let v: Value = serde_json::from_str(&f).unwrap();
        assert_eq!((v["t"].as_str(), v["group"].as_str()), (Some("gsend"), Some("g0000001")));
        assert!(protocol::decode_client_frame(f.as_bytes(), &protocol::Limits::default()).is_ok());
        let one = Run { gids: Vec::new(), peers: vec![vec![1, 2], vec![0], vec![0]], ..run };
        assert_eq!(one.targets(0, 3), &[2]);
        assert_eq!(one.fanout(0), 1);
    }

    #[test]
    fn steady() {
        let tl: Vec<[u64; 5]> = (1..=10).map(|k| [k, 0, 0, k * 100, 0]).collect();
        assert_eq!(steady_rate(&tl, Duration::from_secs(10)), Some(100.0));
    }
}
