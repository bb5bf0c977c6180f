//! `connect`: opens N authenticated connections at a target rate, holds them (pinging within the
//! heartbeat), and reports handshake latency, failures by cause, and the gateway's memory per
//! connection read from its metrics endpoint.
//!
//! Connections are opened by worker processes (this binary re-executed with the hidden
//! `connect-worker` subcommand), each holding at most `--per-worker` connections, so that no
//! process needs more than ~19,000 file descriptors. Workers talk to the parent with JSON lines
//! on stdout (progress, "ramped", the final result with serialised histograms) and take one
//! command on stdin (`release`: close everything and report).
//!
//! Before the release, the delivery probe ([`probe`]): the parent sends `probe <json>`, each
//! worker has every held connection send one message to the next held connection of its ring,
//! waits for the ticks and deliveries, judges its ledger and reports it (`probed`).
//!
//! The ramp is also a measurement of connection setup cost: with `--gateway-pid` (and
//! `--nats-pid`) the CPU seconds those processes used during the ramp are read from /proc, so
//! the report gives connections opened per gateway CPU second — the per-core figure on a machine
//! whose cores loadgen and nats-server share.

mod probe;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, GatewayArgs};
use crate::hist::{self, Hist};
use crate::procfs;
use crate::report::{self, Output, Progress};
use crate::scrape::{self, Samples};
use crate::util::{self, fmt_duration, fmt_rate, parse_duration};
use crate::RunArgs;

pub const SYSCTL_HELP: &str = "\
Opening many connections on one machine (loopback) needs, besides a gateway that accepts them:
  * file descriptors: every connection is one fd in the gateway and one in a loadgen worker.
    Raise the hard limit (`ulimit -Hn`, systemd LimitNOFILE=, /etc/security/limits.conf) of
    both; loadgen raises its soft limit to the hard one and keeps each worker process under
    --per-worker connections (default 19,000, for a 20,000 fd limit). System-wide:
    fs.file-max and fs.nr_open must exceed the total (sysctl -w fs.file-max=2000000).
  * ephemeral ports: a (source address, destination) pair has at most
    net.ipv4.ip_local_port_range ports (default 32768-60999: 28,232). loadgen binds client
    sockets to --source-ips consecutive addresses from --source-ip-base (all of 127.0.0.0/8 is
    local on Linux, nothing to configure) with IP_BIND_ADDRESS_NO_PORT, so the limit applies
    per source address. Widen it with sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\".
  * accept backlog: bursts of connects overflow the listen queue (SYN retries add 1 s, 3 s…
    to handshake latency). net.core.somaxconn (default 4096) caps the backlog the gateway
    asks for; net.ipv4.tcp_max_syn_backlog the half-open queue.
  * TIME_WAIT: closed client sockets linger 60 s holding their port; repeated runs against
    the same destination benefit from net.ipv4.tcp_tw_reuse=1 (default 2: loopback only).
  * conntrack (only if the nf_conntrack module is loaded): net.netfilter.nf_conntrack_max.";

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub gw: GatewayArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Connections to open (one user each).
    #[arg(long, default_value_t = 10_000)]
    pub connections: u64,
    /// Connections opened per second (spread over the workers).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to hold the connections once all are open.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Wait this long after the ramp before reading the gateway's memory.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Each connection sends a `ping` frame this often (the gateway closes connections silent
    /// for its heartbeat timeout, 30 s by default).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// Time allowed to open one connection (TCP, upgrade, hello, synced).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Most connections one worker process holds (each needs one file descriptor).
    #[arg(long, default_value_t = 19_000)]
    pub per_worker: u64,
    /// Worker processes (default: as few as --per-worker allows).
    #[arg(long)]
    pub workers: Option<u64>,
    /// User id prefix (users are `<prefix>-c<i>`); default: a fresh random prefix.
    #[arg(long)]
    pub user_prefix: Option<String>,
    #[command(flatten)]
    pub probe: probe::ProbeArgs,
    /// The pid of a gateway process (repeat for several): the CPU seconds it uses during the ramp
    /// (and the probe) are read from /proc/<pid>/stat, giving connections per gateway CPU second.
    #[arg(long = "gateway-pid")]
    pub gateway_pids: Vec<u32>,
    /// The pid of nats-server, to report its CPU seconds beside the gateways'.
    #[arg(long)]
    pub nats_pid: Option<u32>,
}

/// What a worker is asked to do (passed as JSON; the secret travels in its environment).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: u64,
    pub urls: Vec<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub first: u64,
    pub count: u64,
    pub rate: f64,
    pub ping_interval_ms: u64,
    pub timeout_ms: u64,
    pub source_ip_base: Ipv4Addr,
    pub source_ips: u32,
    pub user_prefix: String,
    pub threads: usize,
}

#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The worker's job, as JSON.
    #[arg(long)]
    pub spec: String,
}

/// Worker → parent messages, one JSON object per stdout line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    Progress {
        attempted: u64,
        open: u64,
        failed: u64,
        dropped: u64,
        #[serde(default)]
        probes_sent: u64,
        #[serde(default)]
        probes_delivered: u64,
    },
    Ramped {
        open: u64,
        failed: u64,
    },
    Probed(Box<probe::Report>),
    Result(Box<WorkerResult>),
    Fatal {
        error: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerResult {
    attempted: u64,
    opened: u64,
    open_at_release: u64,
    failures: BTreeMap<String, u64>,
    failure_examples: BTreeMap<String, String>,
    dropped: BTreeMap<String, u64>,
    pings_sent: u64,
    pongs: u64,
    h_tcp: String,
    h_upgrade: String,
    h_hello: String,
    h_synced: String,
    ramp_seconds: f64,
    nofile_limit: u64,
}

#[derive(Default)]
struct WCounters {
    attempted: AtomicU64,
    open: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    pings: AtomicU64,
    pongs: AtomicU64,
    /// Probe orders a connection took and wrote, or could not write.
    probes_sent: AtomicU64,
    probes_unsent: AtomicU64,
    probes_acked: AtomicU64,
    probes_refused: AtomicU64,
    probes_delivered: AtomicU64,
}

#[derive(Default)]
struct WBooks {
    h_tcp: Option<Hist>,
    h_upgrade: Option<Hist>,
    h_hello: Option<Hist>,
    h_synced: Option<Hist>,
    h_probe_sent: Option<Hist>,
    h_probe_deliver: Option<Hist>,
    failures: BTreeMap<String, u64>,
    failure_examples: BTreeMap<String, String>,
    dropped: BTreeMap<String, u64>,
}

fn emit(ev: &Event) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(ev).unwrap_or_else(|_| "{}".into()));
    let _ = out.flush();
}

/// The hidden worker: opens its share of connections, holds them until `release`.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<i32> {
    let spec: WorkerSpec = serde_json::from_str(&args.spec).context("parsing worker spec")?;
    match worker_inner(spec).await {
        Ok(()) => Ok(0),
        Err(e) => {
            emit(&Event::Fatal { error: format!("{e:#}") });
            Ok(2)
        }
    }
}

/// What the parent tells a worker on its stdin.
enum Cmd {
    Probe(probe::Command),
    Release,
}

async fn worker_inner(spec: WorkerSpec) -> anyhow::Result<()> {
    let nofile = util::raise_nofile();
    if nofile < spec.count + 32 {
        bail!(
            "worker {}: RLIMIT_NOFILE is {nofile}, too low for {} connections (lower --per-worker or raise the limit)",
            spec.index,
            spec.count
        );
    }
    let secret = std::env::var("JWT_SECRET").context("worker needs JWT_SECRET")?;
    let keys = protocol::TokenKeys::hs256(secret.as_bytes(), 0);
    let targets = Arc::new(client::resolve_all(&spec.urls, spec.ca_file.as_deref()).await?);
    let names = Arc::new(probe::Names { prefix: spec.user_prefix.clone(), first: spec.first, count: spec.count });

    // `release` (or the parent going away: EOF) ends the hold; `probe <json>` starts the probe.
    let (release_tx, release_rx) = watch::channel(false);
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Cmd>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.lock().read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.trim() == "release" => break,
                Ok(_) => match line.trim().strip_prefix("probe ").map(serde_json::from_str::<probe::Command>) {
                    Some(Ok(c)) => {
                        let _ = cmd_tx.send(Cmd::Probe(c));
                    }
                    Some(Err(e)) => emit(&Event::Fatal { error: format!("bad probe command: {e}") }),
                    None => {}
                },
            }
        }
        let _ = release_tx.send(true);
        let _ = cmd_tx.send(Cmd::Release);
    });

    let counters = Arc::new(WCounters::default());
    let books = Arc::new(Mutex::new(WBooks {
        h_tcp: Some(hist::new()),
        h_upgrade: Some(hist::new()),
        h_hello: Some(hist::new()),
        h_synced: Some(hist::new()),
        h_probe_sent: Some(hist::new()),
        h_probe_deliver: Some(hist::new()),
        ..Default::default()
    }));
    // Each connection's probe books, and the channel through which it gets its one probe order
    // (closed once its task has ended: the connection is not held).
    let probe_books: Arc<Vec<Mutex<probe::Book>>> =
        Arc::new((0..spec.count).map(|_| Mutex::new(probe::Book::default())).collect());
    let mut orders: Vec<Option<oneshot::Sender<probe::Order>>> = Vec::with_capacity(spec.count as usize);
    let progress = {
        let c = counters.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                emit(&Event::Progress {
                    attempted: c.attempted.load(Relaxed),
                    open: c.open.load(Relaxed),
                    failed: c.failed.load(Relaxed),
                    dropped: c.dropped.load(Relaxed),
                    probes_sent: c.probes_sent.load(Relaxed),
                    probes_delivered: c.probes_delivered.load(Relaxed),
                });
            }
        })
    };

    let ping = Duration::from_millis(spec.ping_interval_ms.max(100));
    let timeout = Duration::from_millis(spec.timeout_ms);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(spec.count as usize);
    for k in 0..spec.count {
        if *release_rx.borrow() {
            break;
        }
        let i = spec.first + k;
        tokio::time::sleep_until(started + Duration::from_secs_f64(k as f64 / spec.rate.max(0.001))).await;
        let token = keys.mint(&format!("{}-c{i}", spec.user_prefix), Some("lg"), 24 * 3600);
        let target = targets[(i % targets.len() as u64) as usize].clone();
        let source = util::source_ip(spec.source_ip_base, spec.source_ips, i);
        let (c, b, mut release) = (counters.clone(), books.clone(), release_rx.clone());
        let (pb, names) = (probe_books.clone(), names.clone());
        let (order_tx, mut order_rx) = oneshot::channel::<probe::Order>();
        orders.push(Some(order_tx));
        c.attempted.fetch_add(1, Relaxed);
        tasks.push(tokio::spawn(async move {
            let opened = client::open(&target, &token, source, client::ws_config(4096), timeout).await;
            let mut ws = match opened {
                Ok(o) => {
                    let t = o.timings;
                    let mut b = b.lock().unwrap();
                    hist::record(b.h_tcp.as_mut().unwrap(), t.tcp_us);
                    hist::record(b.h_upgrade.as_mut().unwrap(), t.upgrade_us);
                    hist::record(b.h_hello.as_mut().unwrap(), t.hello_us);
                    hist::record(b.h_synced.as_mut().unwrap(), t.synced_us);
                    drop(b);
                    c.open.fetch_add(1, Relaxed);
                    o.ws
                }
                Err(f) => {
                    c.failed.fetch_add(1, Relaxed);
                    let mut b = b.lock().unwrap();
                    *b.failures.entry(f.cause.clone()).or_default() += 1;
                    b.failure_examples.entry(f.cause).or_insert(f.detail);
                    return;
                }
            };
            let book = &pb[k as usize];
            // Hold: ping on a jittered schedule, answer the server, send the probe when told to,
            // until released.
            let phase = Duration::from_millis(rand::random_range(0..ping.as_millis() as u64));
            let mut next_ping = tokio::time::Instant::now() + phase;
            let mut order_open = true;
            let dropped = loop {
                tokio::select! {
                    biased;
                    _ = release.changed() => break None,
                    order = &mut order_rx, if order_open => {
                        order_open = false;
                        let Ok(o) = order else { continue };
                        book.lock().unwrap().issued = 1;
                        if let Err(e) = ws.send(Message::Text(probe::send_frame(&o.to, o.intended_us).into())).await {
                            c.probes_unsent.fetch_add(1, Relaxed);
                            break Some(client::ws_fail("probe", &e).cause);
                        }
                        c.probes_sent.fetch_add(1, Relaxed);
                    }
                    m = ws.next() => match m {
                        None => break Some("eof".to_owned()),
                        Some(Err(e)) => break Some(client::ws_fail("hold", &e).cause),
                        Some(Ok(Message::Close(f))) => {
                            break Some(format!("closed_{}", f.map(|f| u16::from(f.code)).unwrap_or(1005)))
                        }
                        Some(Ok(Message::Text(t))) => {
                            let seen = book.lock().unwrap().on_frame(t.as_str(), &names, util::now_us());
                            match seen {
                                probe::Seen::Pong => {
                                    c.pongs.fetch_add(1, Relaxed);
                                }
                                probe::Seen::Ticked { latency_us } => {
                                    c.probes_acked.fetch_add(1, Relaxed);
                                    hist::record(b.lock().unwrap().h_probe_sent.as_mut().unwrap(), latency_us);
                                }
                                probe::Seen::Refused => {
                                    c.probes_refused.fetch_add(1, Relaxed);
                                }
                                probe::Seen::Delivered { latency_us } => {
                                    c.probes_delivered.fetch_add(1, Relaxed);
                                    hist::record(b.lock().unwrap().h_probe_deliver.as_mut().unwrap(), latency_us);
                                }
                                probe::Seen::Judged | probe::Seen::Other => {}
                            }
                        }
                        Some(Ok(_)) => {}
                    },
                    _ = tokio::time::sleep_until(next_ping) => {
                        next_ping += ping;
                        if let Err(e) = ws.send(Message::Text(client::PING.into())).await {
                            break Some(client::ws_fail("ping", &e).cause);
                        }
                        c.pings.fetch_add(1, Relaxed);
                    }
                }
            };
            c.open.fetch_sub(1, Relaxed);
            match dropped {
                Some(cause) => {
                    c.dropped.fetch_add(1, Relaxed);
                    *b.lock().unwrap().dropped.entry(cause).or_default() += 1;
                }
                None => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "loadgen done".into() })),
                    )
                    .await;
                }
            }
        }));
    }
    // Ramped: every attempt has opened or failed.
    loop {
        let (o, f, d) = (counters.open.load(Relaxed), counters.failed.load(Relaxed), counters.dropped.load(Relaxed));
        if o + f + d >= counters.attempted.load(Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp_seconds = started.elapsed().as_secs_f64();
    emit(&Event::Ramped { open: counters.open.load(Relaxed), failed: counters.failed.load(Relaxed) });
    let mut probed = false;
    while let Some(cmd) = cmd_rx.recv().await {
        match cmd {
            Cmd::Probe(p) if !probed => {
                probed = true;
                let r = run_probe(p, &names, &mut orders, &probe_books, &counters, &books, release_rx.clone()).await?;
                emit(&Event::Probed(Box::new(r)));
            }
            Cmd::Probe(_) => {}
            Cmd::Release => break,
        }
    }
    drop(orders);
    let open_at_release = counters.open.load(Relaxed);
    let all = futures::future::join_all(tasks);
    let _ = tokio::time::timeout(Duration::from_secs(20), all).await;
    progress.abort();
    let mut b = books.lock().unwrap();
    let res = WorkerResult {
        attempted: counters.attempted.load(Relaxed),
        opened: b.h_synced.as_ref().map(|h| h.len()).unwrap_or(0),
        open_at_release,
        failures: std::mem::take(&mut b.failures),
        failure_examples: std::mem::take(&mut b.failure_examples),
        dropped: std::mem::take(&mut b.dropped),
        pings_sent: counters.pings.load(Relaxed),
        pongs: counters.pongs.load(Relaxed),
        h_tcp: hist::to_hex(b.h_tcp.as_ref().unwrap()),
        h_upgrade: hist::to_hex(b.h_upgrade.as_ref().unwrap()),
        h_hello: hist::to_hex(b.h_hello.as_ref().unwrap()),
        h_synced: hist::to_hex(b.h_synced.as_ref().unwrap()),
        ramp_seconds,
        nofile_limit: nofile,
    };
    emit(&Event::Result(Box::new(res)));
    Ok(())
}

/// The probe in one worker: the ring over its held connections, one order each at the worker's
/// share of `--probe-rate`, then a wait (up to the timeout after the last send is due) for the
/// ticks and deliveries, and the verdict of the ledger.
async fn run_probe(
    cmd: probe::Command,
    names: &probe::Names,
    orders: &mut [Option<oneshot::Sender<probe::Order>>],
    books: &[Mutex<probe::Book>],
    c: &WCounters,
    hists: &Mutex<WBooks>,
    mut release: watch::Receiver<bool>,
) -> anyhow::Result<probe::Report> {
    // Held: the connection's task still listens for its order.
    let live: Vec<usize> = (0..orders.len()).filter(|&k| orders[k].as_ref().is_some_and(|o| !o.is_closed())).collect();
    let pairs = probe::ring(&live);
    let mut target: Vec<Option<usize>> = vec![None; books.len()];
    let clock = util::clock();
    let start_us = clock.now_us();
    let interval_us = 1e6 / cmd.rate.max(0.001);
    let mut given = 0u64;
    for (n, &(s, r)) in pairs.iter().enumerate() {
        if *release.borrow() {
            break;
        }
        let intended_us = start_us + (n as f64 * interval_us) as u64;
        tokio::time::sleep_until(clock.instant_at(intended_us).into()).await;
        target[s] = Some(r);
        let order = probe::Order { to: names.name(r), intended_us };
        // A connection that ended since the ring was drawn cannot send: its recipient then
        // expects nothing (its own probe, if it was ticked, is judged like any other).
        if let Some(tx) = orders[s].take() {
            if tx.send(order).is_ok() {
                given += 1;
            }
        }
    }
    // Wait until every order was written (or could not be), answered, and every tick delivered.
    let deadline =
        clock.instant_at(start_us + (pairs.len() as f64 * interval_us) as u64) + Duration::from_millis(cmd.timeout_ms);
    let deadline = tokio::time::Instant::from_std(deadline);
    let mut timed_out = false;
    loop {
        let taken = c.probes_sent.load(Relaxed) + c.probes_unsent.load(Relaxed);
        let sent = c.probes_sent.load(Relaxed);
        let answered = c.probes_acked.load(Relaxed) + c.probes_refused.load(Relaxed);
        if taken >= given && answered >= sent && c.probes_delivered.load(Relaxed) >= c.probes_acked.load(Relaxed) {
            break;
        }
        if tokio::time::Instant::now() >= deadline || *release.borrow_and_update() {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = (clock.now_us().saturating_sub(start_us)) as f64 / 1e6;
    let mut taken: Vec<probe::Book> = books.iter().map(|b| std::mem::take(&mut *b.lock().unwrap())).collect();
    let mut errors = BTreeMap::new();
    let mut other_items = 0;
    for b in &taken {
        for (k, v) in &b.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        other_items += b.other_items;
    }
    let check = probe::judge(&mut taken, &target);
    let mut r = probe::Report::new(pairs.len() as u64, check, errors, other_items);
    let h = hists.lock().unwrap();
    r.h_sent = hist::to_hex(h.h_probe_sent.as_ref().expect("set at start"));
    r.h_deliver = hist::to_hex(h.h_probe_deliver.as_ref().expect("set at start"));
    r.seconds = seconds;
    r.timed_out = u64::from(timed_out);
    Ok(r)
}

/// One worker as the parent sees it.
struct WorkerHandle {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    /// Connections it opens.
    count: u64,
}

#[derive(Default, Clone, Copy)]
struct WorkerState {
    attempted: u64,
    open: u64,
    failed: u64,
    dropped: u64,
    probes_sent: u64,
    probes_delivered: u64,
    ramped: bool,
    probed: bool,
    done: bool,
}

/// What the workers reported at the end of the probe and at the release.
struct Got {
    results: Vec<Option<WorkerResult>>,
    probes: Vec<Option<probe::Report>>,
}

/// CPU seconds of the processes under test at one instant.
struct CpuMark {
    at: Instant,
    gateways: Vec<Option<f64>>,
    nats: Option<f64>,
    workers: Option<f64>,
}

fn cpu_mark(args: &Args, worker_pids: &[u32]) -> CpuMark {
    let read = |pid: u32| procfs::cpu_seconds(Some(pid)).ok();
    CpuMark {
        at: Instant::now(),
        gateways: args.gateway_pids.iter().map(|&p| read(p)).collect(),
        nats: args.nats_pid.and_then(read),
        workers: worker_pids.iter().map(|&p| read(p)).sum(),
    }
}

/// CPU seconds the processes under test used over a window (the ramp, the probe).
#[derive(Debug, Clone)]
pub struct CpuWindow {
    pub wall_s: f64,
    /// Per `--gateway-pid`, in order (`None`: unreadable at either end).
    pub gateways: Vec<(u32, Option<f64>)>,
    pub nats: Option<(u32, Option<f64>)>,
    /// loadgen's worker processes together.
    pub workers: Option<f64>,
}

impl CpuWindow {
    fn between(args: &Args, from: &CpuMark, to: &CpuMark) -> CpuWindow {
        let used = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        CpuWindow {
            wall_s: to.at.duration_since(from.at).as_secs_f64(),
            gateways: args
                .gateway_pids
                .iter()
                .zip(from.gateways.iter().zip(&to.gateways))
                .map(|(&p, (&a, &b))| (p, used(a, b)))
                .collect(),
            nats: args.nats_pid.map(|p| (p, used(from.nats, to.nats))),
            workers: used(from.workers, to.workers),
        }
    }

    /// All gateways together (`None` without --gateway-pid, or when one was unreadable).
    pub fn gateway_total(&self) -> Option<f64> {
        if self.gateways.is_empty() {
            return None;
        }
        self.gateways.iter().map(|(_, c)| *c).sum()
    }

    /// `things` per gateway CPU second, and the CPU of every process, as JSON.
    fn to_json(&self, things: u64, per: &str) -> Value {
        let cores = |c: Option<f64>| c.map(|c| c / self.wall_s.max(1e-9));
        let gw = self.gateway_total();
        json!({
            "wall_seconds": self.wall_s,
            "gateway_cpu_seconds": gw,
            "gateway_cores_busy": cores(gw),
            format!("{per}_per_gateway_cpu_second"): super::peer::per_cpu_second(things, gw),
            "gateways": self.gateways.iter().map(|(p, c)| json!({"pid": p, "cpu_seconds": c})).collect::<Vec<_>>(),
            "nats_server_cpu_seconds": self.nats.and_then(|(_, c)| c),
            "nats_server_cores_busy": cores(self.nats.and_then(|(_, c)| c)),
            "loadgen_workers_cpu_seconds": self.workers,
            "loadgen_workers_cores_busy": cores(self.workers),
        })
    }

    /// `gateway 1.23 CPU-s (0.95 cores) · nats-server … · loadgen workers …`.
    fn line(&self) -> String {
        let f = |name: &str, c: Option<f64>| match c {
            Some(c) => format!("{name} {c:.2} CPU-s ({:.2} cores)", c / self.wall_s.max(1e-9)),
            None => format!("{name} n/a"),
        };
        let mut parts = vec![f("gateway", self.gateway_total())];
        if let Some((_, c)) = self.nats {
            parts.push(f("nats-server", c));
        }
        parts.push(f("loadgen workers", self.workers));
        format!("{} over {:.2} s", parts.join(" · "), self.wall_s)
    }
}

/// A metrics sample of every gateway.
#[derive(Clone)]
struct MemSample {
    at_s: f64,
    samples: Vec<Result<Samples, String>>,
}

fn mem_json(s: &MemSample, urls: &[String]) -> Value {
    json!({
        "at_s": s.at_s,
        "gateways": urls.iter().zip(&s.samples).map(|(u, r)| match r {
            Ok(m) => json!({"metrics_url": u, "rss_bytes": m.get(scrape::RSS), "connections_open": m.get(scrape::OPEN)}),
            Err(e) => json!({"metrics_url": u, "error": e}),
        }).collect::<Vec<_>>(),
    })
}

fn total(s: &MemSample, name: &str) -> Option<f64> {
    let mut t = 0.0;
    for r in &s.samples {
        t += r.as_ref().ok()?.get(name).copied()?;
    }
    Some(t)
}

/// What [`hold`] measured: what became of the connections, and the samples taken while they
/// were held.
pub struct Held<T> {
    pub workers: u64,
    pub ramp_s: f64,
    pub attempted: u64,
    pub opened: u64,
    pub open_at_release: u64,
    pub failures: BTreeMap<String, u64>,
    pub failure_examples: BTreeMap<String, String>,
    pub dropped: BTreeMap<String, u64>,
    pub pings: u64,
    pub pongs: u64,
    pub per_worker: Vec<Value>,
    /// Workers that failed as a whole.
    pub fatal: Vec<String>,
    pub h_tcp: Hist,
    pub h_upgrade: Hist,
    pub h_hello: Hist,
    pub h_synced: Hist,
    /// `--settle` after the ramp and every 5 s until the hold ends (at least one): each sample
    /// with the number of connections open when it was taken.
    pub samples: Vec<(T, u64)>,
    /// CPU of the processes under test from the start of the workers until every worker ramped.
    pub ramp_cpu: CpuWindow,
    /// The delivery probe, all workers' merged (`None`: --no-probe, or nothing held).
    pub probe: Option<probe::Report>,
    pub probe_cpu: Option<CpuWindow>,
}

impl<T> Held<T> {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// The last sample and the connections open when it was taken.
    pub fn last(&self) -> (&T, u64) {
        let (s, open) = self.samples.last().expect("hold takes at least one sample");
        (s, *open)
    }
}

/// Opens `args.connections` connections (users `<prefix>-c<i>`) from worker processes at
/// `--rate`, holds them for `--hold` while calling `sample` (`--settle` after the ramp, then every
/// 5 s), releases them and gathers the workers' results. The memory probe is the caller's: the
/// gateway's metrics endpoint for `connect`, /proc for `peer`.
pub async fn hold<T, F, Fut>(args: &Args, prefix: &str, mut sample: F) -> anyhow::Result<Held<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    if args.connections == 0 {
        bail!("--connections must be > 0");
    }
    if args.gw.secret.len() < 16 {
        bail!("the token secret (--secret or JWT_SECRET) must be at least 16 bytes, like the gateway's");
    }
    if args.per_worker == 0 || args.per_worker > 19_000 {
        bail!("--per-worker must be between 1 and 19000 (a process may hold at most ~20,000 fds)");
    }
    let workers = args.workers.unwrap_or(0).max(args.connections.div_ceil(args.per_worker)).min(args.connections);
    args.probe.check()?;
    // Validate the URLs here (workers would each fail the same way).
    client::resolve_all(&args.gw.urls, args.gw.ca_file.as_deref()).await?;
    for &pid in args.gateway_pids.iter().chain(&args.nats_pid) {
        procfs::cpu_seconds(Some(pid)).with_context(|| format!("--gateway-pid/--nats-pid {pid}"))?;
    }
    let t_start = Instant::now();
    let ramp_mark = cpu_mark(args, &[]);

    // Start the workers.
    let exe = std::env::current_exe().context("locating the loadgen binary")?;
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Event)>();
    let mut handles = Vec::new();
    let mut worker_pids = Vec::new();
    let base = args.connections / workers;
    let extra = args.connections % workers;
    let mut first = 0;
    report::note(format!(
        "opening {} connections at {}/s with {} worker process(es), holding {} after the ramp",
        args.connections,
        args.rate,
        workers,
        fmt_duration(args.hold)
    ));
    for w in 0..workers {
        let count = base + u64::from(w < extra);
        let spec = WorkerSpec {
            index: w,
            urls: args.gw.urls.clone(),
            ca_file: args.gw.ca_file.clone(),
            first,
            count,
            rate: args.rate * count as f64 / args.connections as f64,
            ping_interval_ms: args.ping_interval.as_millis() as u64,
            timeout_ms: args.timeout.as_millis() as u64,
            source_ip_base: args.gw.source_ip_base,
            source_ips: args.gw.source_ips,
            user_prefix: prefix.to_owned(),
            threads: args.run.threads(),
        };
        first += count;
        let mut child = tokio::process::Command::new(&exe)
            .arg("connect-worker")
            .arg("--threads")
            .arg(args.run.threads().to_string())
            .arg("--spec")
            .arg(serde_json::to_string(&spec)?)
            .env("JWT_SECRET", &args.gw.secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a connect worker")?;
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take();
        worker_pids.extend(child.id());
        let tx = ev_tx.clone();
        let idx = w as usize;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                match serde_json::from_str::<Event>(&l) {
                    Ok(ev) => {
                        let _ = tx.send((idx, ev));
                    }
                    Err(_) => report::note(format!("worker {idx}: {l}")),
                }
            }
            let _ = tx.send((idx, Event::Fatal { error: "worker output ended".into() }));
        });
        handles.push(WorkerHandle { child, stdin, count });
    }
    drop(ev_tx);

    let states = Arc::new(Mutex::new(vec![WorkerState::default(); workers as usize]));
    let progress = {
        let states = states.clone();
        let n = args.connections;
        Progress::start(move |el| {
            let s = states.lock().unwrap();
            let sum = |f: fn(&WorkerState) -> u64| s.iter().map(f).sum::<u64>();
            let probes = match sum(|w| w.probes_sent) {
                0 => String::new(),
                sent => format!(" probes sent {sent} delivered {}", sum(|w| w.probes_delivered)),
            };
            format!(
                "connect t={:>5.1}s attempted {}/{} open {} failed {} dropped {} workers ramped {}/{}{probes}",
                el.as_secs_f64(),
                sum(|w| w.attempted),
                n,
                sum(|w| w.open),
                sum(|w| w.failed),
                sum(|w| w.dropped),
                s.iter().filter(|w| w.ramped).count(),
                s.len()
            )
        })
    };

    let mut got = Got { results: (0..workers).map(|_| None).collect(), probes: (0..workers).map(|_| None).collect() };
    let mut fatal: Vec<String> = Vec::new();
    let mut on_event = |w: usize, ev: Event, got: &mut Got| {
        let mut s = states.lock().unwrap();
        match ev {
            Event::Progress { attempted, open, failed, dropped, probes_sent, probes_delivered } => {
                let st = &mut s[w];
                (st.attempted, st.open, st.failed, st.dropped) = (attempted, open, failed, dropped);
                (st.probes_sent, st.probes_delivered) = (probes_sent, probes_delivered);
            }
            Event::Probed(r) => {
                s[w].probed = true;
                got.probes[w] = Some(*r);
            }
            Event::Ramped { open, failed } => {
                s[w].ramped = true;
                s[w].open = open;
                s[w].failed = failed;
            }
            Event::Result(r) => {
                s[w].done = true;
                s[w].ramped = true;
                got.results[w] = Some(*r);
            }
            Event::Fatal { error } => {
                if !s[w].done {
                    s[w].done = true;
                    s[w].ramped = true;
                    fatal.push(format!("worker {w}: {error}"));
                }
            }
        }
    };

    // Ramp.
    while !states.lock().unwrap().iter().all(|w| w.ramped) {
        match ev_rx.recv().await {
            Some((w, ev)) => on_event(w, ev, &mut got),
            None => break,
        }
    }
    let ramp_s = t_start.elapsed().as_secs_f64();
    let ramp_cpu = CpuWindow::between(args, &ramp_mark, &cpu_mark(args, &worker_pids));
    let open_after_ramp: u64 = states.lock().unwrap().iter().map(|w| w.open).sum();
    report::note(format!(
        "ramp done in {ramp_s:.1}s: {open_after_ramp} open ({}); settling {} then holding",
        ramp_cpu.line(),
        fmt_duration(args.settle)
    ));

    // Hold, sampling the gateways' memory every 5 s (the first after --settle).
    let hold_end = Instant::now() + args.hold.max(args.settle);
    let mut samples: Vec<(T, u64)> = Vec::new();
    let mut next_sample = Instant::now() + args.settle;
    let mut workers_gone = false;
    loop {
        let now = Instant::now();
        if now >= hold_end {
            break;
        }
        if now >= next_sample {
            let s = sample().await;
            let open = states.lock().unwrap().iter().map(|w| w.open).sum::<u64>();
            samples.push((s, open));
            next_sample = Instant::now() + Duration::from_secs(5);
            continue;
        }
        let wait = next_sample.min(hold_end) - now;
        tokio::select! {
            ev = ev_rx.recv(), if !workers_gone => match ev {
                Some((w, ev)) => on_event(w, ev, &mut got),
                None => workers_gone = true,
            },
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if samples.is_empty() {
        let open = states.lock().unwrap().iter().map(|w| w.open).sum::<u64>();
        samples.push((sample().await, open));
    }

    // The delivery probe: every held connection sends one message and must receive one.
    let mut probe_cpu = None;
    let open_now: u64 = states.lock().unwrap().iter().map(|w| w.open).sum();
    if !args.probe.no_probe && open_now > 0 {
        report::note(format!(
            "probe: each of the {open_now} held connections sends one message to the next of its worker, {}/s in all",
            fmt_rate(args.probe.probe_rate)
        ));
        let mark = cpu_mark(args, &worker_pids);
        for h in &mut handles {
            let cmd = probe::Command {
                rate: args.probe.probe_rate * h.count as f64 / args.connections as f64,
                timeout_ms: args.probe.probe_timeout.as_millis() as u64,
            };
            if let Some(stdin) = h.stdin.as_mut() {
                let line = format!("probe {}\n", serde_json::to_string(&cmd)?);
                let _ = stdin.write_all(line.as_bytes()).await;
                let _ = stdin.flush().await;
            }
        }
        // The slowest worker paces its share in about open/rate seconds, then waits at most
        // --probe-timeout; beyond that (and a margin for judging), a worker is not answering.
        let limit = Duration::from_secs_f64(open_now as f64 / args.probe.probe_rate)
            + args.probe.probe_timeout
            + Duration::from_secs(30);
        let deadline = tokio::time::Instant::now() + limit;
        while !states.lock().unwrap().iter().all(|w| w.probed || w.done) {
            match tokio::time::timeout_at(deadline, ev_rx.recv()).await {
                Ok(Some((w, ev))) => on_event(w, ev, &mut got),
                Ok(None) | Err(_) => break,
            }
        }
        probe_cpu = Some(CpuWindow::between(args, &mark, &cpu_mark(args, &worker_pids)));
    }

    // Release and collect.
    report::note("releasing connections");
    for h in &mut handles {
        if let Some(mut stdin) = h.stdin.take() {
            let _ = stdin.write_all(b"release\n").await;
            let _ = stdin.flush().await;
        }
    }
    let collect_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !states.lock().unwrap().iter().all(|w| w.done) {
        match tokio::time::timeout_at(collect_deadline, ev_rx.recv()).await {
            Ok(Some((w, ev))) => on_event(w, ev, &mut got),
            Ok(None) | Err(_) => break,
        }
    }
    for h in &mut handles {
        let _ = tokio::time::timeout(Duration::from_secs(5), h.child.wait()).await;
        let _ = h.child.start_kill();
    }
    progress.stop().await;

    // Aggregate.
    let (mut h_tcp, mut h_up, mut h_hello, mut h_synced) = (hist::new(), hist::new(), hist::new(), hist::new());
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut examples: BTreeMap<String, String> = BTreeMap::new();
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    let (mut attempted, mut opened, mut pings, mut pongs, mut open_at_release) = (0, 0, 0, 0, 0);
    let mut per_worker = Vec::new();
    let mut probe: Option<probe::Report> = None;
    if probe_cpu.is_some() {
        for (w, p) in got.probes.iter().enumerate() {
            match p {
                Some(p) => match probe.as_mut() {
                    Some(m) => m.merge(p)?,
                    None => probe = Some(p.clone()),
                },
                None if got.results[w].as_ref().is_some_and(|r| r.opened > 0) => {
                    fatal.push(format!("worker {w}: no probe result"))
                }
                None => {}
            }
        }
    }
    for (w, r) in got.results.iter().enumerate() {
        let Some(r) = r else {
            per_worker.push(json!({"worker": w, "error": "no result"}));
            continue;
        };
        hist::merge(&mut h_tcp, &hist::from_hex(&r.h_tcp)?);
        hist::merge(&mut h_up, &hist::from_hex(&r.h_upgrade)?);
        hist::merge(&mut h_hello, &hist::from_hex(&r.h_hello)?);
        hist::merge(&mut h_synced, &hist::from_hex(&r.h_synced)?);
        for (k, v) in &r.failures {
            *failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.failure_examples {
            examples.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for (k, v) in &r.dropped {
            *dropped.entry(k.clone()).or_default() += v;
        }
        attempted += r.attempted;
        opened += r.opened;
        pings += r.pings_sent;
        pongs += r.pongs;
        open_at_release += r.open_at_release;
        per_worker.push(json!({
            "worker": w, "attempted": r.attempted, "opened": r.opened,
            "open_at_release": r.open_at_release, "ramp_seconds": r.ramp_seconds,
            "nofile_limit": r.nofile_limit,
        }));
    }
    Ok(Held {
        workers,
        ramp_s,
        attempted,
        opened,
        open_at_release,
        failures,
        failure_examples: examples,
        dropped,
        pings,
        pongs,
        per_worker,
        fatal,
        h_tcp,
        h_upgrade: h_up,
        h_hello,
        h_synced,
        samples,
        ramp_cpu,
        probe,
        probe_cpu,
    })
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let started = SystemTime::now();
    let prefix = args.user_prefix.clone().unwrap_or_else(|| format!("lg{}", util::run_tag()));
    let urls = args.gw.metrics_urls.clone();
    if urls.is_empty() {
        report::note("no --metrics-url: gateway memory per connection will not be measured");
    }

    let t_start = Instant::now();
    let sample = |urls: Vec<String>| async move {
        MemSample { at_s: t_start.elapsed().as_secs_f64(), samples: scrape::scrape_all(&urls).await }
    };
    let before = sample(urls.clone()).await;
    for (u, r) in urls.iter().zip(&before.samples) {
        if let Err(e) = r {
            bail!("cannot read {u}: {e}");
        }
    }
    let held = hold(&args, &prefix, || sample(urls.clone())).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_close = sample(urls.clone()).await;
    let (after, open_at_after) = held.last();
    let (after, samples) = (after.clone(), held.samples.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>());
    let Held {
        workers,
        ramp_s,
        attempted,
        opened,
        open_at_release,
        failures,
        failure_examples: examples,
        dropped,
        pings,
        pongs,
        per_worker,
        fatal,
        h_tcp,
        h_upgrade: h_up,
        h_hello,
        h_synced,
        samples: _,
        ramp_cpu,
        probe,
        probe_cpu,
    } = held;
    let failed: u64 = failures.values().sum();
    let dropped_total: u64 = dropped.values().sum();

    // Memory per connection: (RSS with the connections open − RSS before) / connections open.
    let rss_before = total(&before, scrape::RSS);
    let rss_after = total(&after, scrape::RSS);
    let gw_open_before = total(&before, scrape::OPEN);
    let gw_open_after = total(&after, scrape::OPEN);
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if open_at_after > 0 => Some((a - b) / open_at_after as f64),
        _ => None,
    };
    let per_conn_gw = match (rss_before, rss_after, gw_open_before, gw_open_after) {
        (Some(b), Some(a), Some(ob), Some(oa)) if oa > ob => Some((a - b) / (oa - ob)),
        _ => None,
    };
    let peak_rss = samples
        .iter()
        .filter_map(|s| total(s, scrape::RSS))
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));

    let probe_violations = probe.as_ref().map_or(0, |p| p.violations());
    let probe_clean = probe.as_ref().is_none_or(|p| p.violations() == 0 && p.unconfirmed() == 0 && p.not_sent() == 0);
    let ok = failed == 0 && dropped_total == 0 && fatal.is_empty() && opened == args.connections && probe_clean;
    let verdict = if probe_violations > 0 {
        format!("FAIL: delivery probe: {}", probe.as_ref().map(|p| p.verdict()).unwrap_or_default())
    } else if ok {
        match &probe {
            Some(_) => "PASS: every connection opened, held, and received its probe exactly once".to_owned(),
            None => "PASS: every connection opened and held".to_owned(),
        }
    } else {
        format!(
            "ERRORS: {failed} failed to open, {dropped_total} dropped while held, {} worker errors{}",
            fatal.len(),
            probe.as_ref().map(|p| format!("; probe {}", p.verdict())).unwrap_or_default()
        )
    };
    let achieved_rate = opened as f64 / ramp_s.max(1e-9);
    let per_gw_cpu = super::peer::per_cpu_second(opened, ramp_cpu.gateway_total());
    let probe_json = match &probe {
        Some(p) => {
            let mut v = p.to_json()?;
            if let Some(c) = &probe_cpu {
                v["cpu"] = c.to_json(p.check.delivered_once, "deliveries");
            }
            v
        }
        None => Value::Null,
    };
    let (h_probe_sent, h_probe_deliver) = match &probe {
        Some(p) => (p.sent_hist()?, p.deliver_hist()?),
        None => (hist::new(), hist::new()),
    };
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let config = json!({
        "urls": args.gw.urls,
        "metrics_urls": urls,
        "connections": args.connections,
        "rate": args.rate,
        "hold_s": args.hold.as_secs_f64(),
        "settle_s": args.settle.as_secs_f64(),
        "ping_interval_ms": args.ping_interval.as_millis() as u64,
        "timeout_ms": args.timeout.as_millis() as u64,
        "per_worker": args.per_worker,
        "workers": workers,
        "source_ip_base": args.gw.source_ip_base.to_string(),
        "source_ips": args.gw.source_ips,
        "user_prefix": prefix,
        "threads_per_worker": args.run.threads(),
        "probe": !args.probe.no_probe,
        "probe_rate": args.probe.probe_rate,
        "probe_timeout_s": args.probe.probe_timeout.as_secs_f64(),
        "gateway_pids": args.gateway_pids,
        "nats_pid": args.nats_pid,
    });
    let results_json = json!({
        "verdict": verdict,
        "attempted": attempted,
        "opened": opened,
        "failed": failed,
        "failures_by_cause": failures,
        "failure_examples": examples,
        "dropped_while_held": dropped,
        "open_at_memory_sample": open_at_after,
        "open_at_release": open_at_release,
        "ramp_seconds": ramp_s,
        "achieved_rate_per_s": achieved_rate,
        "ramp": {
            "target_rate_per_s": args.rate,
            "opened": opened,
            "seconds": ramp_s,
            "achieved_rate_per_s": achieved_rate,
            "cpu": ramp_cpu.to_json(opened, "connections"),
        },
        "probe": probe_json,
        "pings_sent": pings,
        "pongs_received": pongs,
        "handshake_latency": {
            "tcp_connect": hist::summary(&h_tcp),
            "tcp_to_101_upgrade": hist::summary(&h_up),
            "tcp_to_hello": hist::summary(&h_hello),
            "tcp_to_synced": hist::summary(&h_synced),
        },
        "memory": {
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "rss_peak_during_hold_bytes": peak_rss,
            "rss_after_close_bytes": total(&after_close, scrape::RSS),
            "gateway_connections_open_before": gw_open_before,
            "gateway_connections_open_after": gw_open_after,
            "bytes_per_connection": per_conn,
            "bytes_per_connection_by_gateway_gauge": per_conn_gw,
            "before": mem_json(&before, &urls),
            "samples_during_hold": samples.iter().map(|s| mem_json(s, &urls)).collect::<Vec<_>>(),
            "after_close": mem_json(&after_close, &urls),
        },
        "workers": per_worker,
        "worker_errors": fatal,
    });
    let fmt_bytes = |v: Option<f64>| v.map(|b| format!("{:.1} MiB", mib(b))).unwrap_or_else(|| "n/a".into());
    let per_conn_s =
        per_conn.map(|b| format!("{:.0} bytes ({:.1} KiB)", b, b / 1024.0)).unwrap_or_else(|| "n/a".into());
    let fail_s = if failures.is_empty() {
        "none".to_owned()
    } else {
        failures.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", ")
    };
    let drop_s = if dropped.is_empty() {
        "none".to_owned()
    } else {
        dropped.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", ")
    };
    let human = format!(
        "connect: {opened}/{} opened in {ramp_s:.1}s ({} /s target, {workers} worker(s)), held {}\n\
         tcp connect   {}\n\
         101 upgrade   {}\n\
         synced        {}\n\
         failures: {fail_s}\n\
         dropped while held: {drop_s}\n\
         gateway RSS: before {} → with {open_at_after} connections {} (peak {}) → after close {}\n\
         memory per connection: {per_conn_s}\n\
         ramp: {achieved_rate:.0} connections/s; CPU {}; {}\n\
         {}\
         {verdict}\n",
        args.connections,
        fmt_rate(args.rate),
        fmt_duration(args.hold),
        hist::line(&h_tcp),
        hist::line(&h_up),
        hist::line(&h_synced),
        fmt_bytes(rss_before),
        fmt_bytes(rss_after),
        fmt_bytes(peak_rss),
        fmt_bytes(total(&after_close, scrape::RSS)),
        ramp_cpu.line(),
        per_gw_cpu
            .map(|v| format!("{v:.0} connections per gateway CPU second"))
            .unwrap_or_else(|| "no --gateway-pid".into()),
        probe_human(probe.as_ref(), &h_probe_deliver),
    );
    let mut md = format!(
        "{} authenticated connections opened at {} /s by {workers} worker process(es), held {} (pinging every {}).\n\n",
        args.connections,
        fmt_rate(args.rate),
        fmt_duration(args.hold),
        fmt_duration(args.ping_interval)
    );
    md.push_str("| figure | value |\n|---|---|\n");
    md.push_str(&format!("| opened | {opened} of {} in {ramp_s:.1} s |\n", args.connections));
    md.push_str(&format!("| failures | {fail_s} |\n"));
    md.push_str(&format!("| dropped while held | {drop_s} |\n"));
    md.push_str(&format!("| gateway RSS before (0 connections) | {} |\n", fmt_bytes(rss_before)));
    md.push_str(&format!("| gateway RSS with {open_at_after} connections | **{}** |\n", fmt_bytes(rss_after)));
    md.push_str(&format!("| memory per connection | **{per_conn_s}** |\n"));
    md.push_str(&format!("| gateway RSS after close | {} |\n", fmt_bytes(total(&after_close, scrape::RSS))));
    md.push_str(&format!("| verdict | {verdict} |\n\n"));
    md.push_str("Handshake latency, from the start of the TCP connect:\n\n");
    md.push_str(hist::MD_HEADER);
    md.push_str(&hist::md_row("TCP connect", &h_tcp));
    md.push_str(&hist::md_row("→ 101 upgrade", &h_up));
    md.push_str(&hist::md_row("→ hello", &h_hello));
    md.push_str(&hist::md_row("→ synced", &h_synced));
    md.push_str(&format!(
        "\nRamp: {opened} connections in {ramp_s:.2} s = **{achieved_rate:.0} /s** (target {} /s). CPU used during the ramp: {}.",
        fmt_rate(args.rate),
        ramp_cpu.line()
    ));
    match per_gw_cpu {
        Some(v) => md.push_str(&format!(" **{v:.0} connections per gateway CPU second.**\n")),
        None => md.push_str(" (Give --gateway-pid for connections per gateway CPU second.)\n"),
    }
    if let Some(p) = &probe {
        let c = &p.check;
        md.push_str(&format!(
            "\nDelivery probe (every held connection sends one message to the next held connection of its \
             worker, {} /s in all, then must receive exactly one):\n\n",
            fmt_rate(args.probe.probe_rate)
        ));
        md.push_str("| probe | value |\n|---|---|\n");
        md.push_str(&format!("| connections in the rings | {} |\n", p.ring));
        md.push_str(&format!("| sent / acknowledged | {} / {} |\n", c.issued, c.acknowledged));
        md.push_str(&format!("| refused / unanswered | {} / {} |\n", c.failed, c.unanswered));
        md.push_str(&format!("| delivered exactly once | **{}** |\n", c.delivered_once));
        md.push_str(&format!(
            "| lost / duplicated / wrong sender / unknown id | {} / {} / {} / {} |\n",
            c.lost,
            c.duplicates,
            p.wrong_sender(),
            c.phantom
        ));
        md.push_str(&format!("| time from the first send to the verdict | {:.1} s |\n", p.seconds));
        if let Some(cpu) = &probe_cpu {
            md.push_str(&format!("| CPU during the probe | {} |\n", cpu.line()));
        }
        md.push_str(&format!("| verdict | {} |\n\n", p.verdict()));
        md.push_str(hist::MD_HEADER);
        md.push_str(&hist::md_row("probe send → sent", &h_probe_sent));
        md.push_str(&hist::md_row("probe send → deliver", &h_probe_deliver));
    }
    let mut series =
        vec![("TCP connect", &h_tcp), ("→ 101 upgrade", &h_up), ("→ hello", &h_hello), ("→ synced", &h_synced)];
    if probe.is_some() {
        series.push(("probe send → deliver", &h_probe_deliver));
    }
    let plot = report::Plot {
        title: "connect: handshake latency from the start of the TCP connect; probe send → deliver".into(),
        series,
    };
    report::finish_plot(
        args.run.out.as_deref(),
        &Output { scenario: "connect", started, config, results: results_json, markdown: md, human },
        Some(&plot),
    )?;
    if !fatal.is_empty() {
        for f in &fatal {
            report::note(f);
        }
    }
    Ok(if probe_violations > 0 {
        1
    } else if ok {
        0
    } else {
        3
    })
}

/// The probe's lines of the human summary (empty without a probe).
fn probe_human(p: Option<&probe::Report>, h_deliver: &Hist) -> String {
    let Some(p) = p else { return String::new() };
    let c = &p.check;
    format!(
        "probe: {} sent, {} acknowledged, {} delivered, {} lost, {} duplicated, {} wrong sender ({:.1} s)\n\
         probe send → deliver  {}\n",
        c.issued,
        c.acknowledged,
        c.delivered_once,
        c.lost,
        c.duplicates,
        p.wrong_sender(),
        p.seconds,
        hist::line(h_deliver)
    )
}
