//! `peer`: this system against reference WebSocket servers — a tokio-tungstenite server
//! (peers/tokio-ws) and a Node `ws` server (peers/node-ws) — on the same workloads, driven by the
//! same client code, in one run. For each target in turn:
//!
//! 1. **connect**: N idle authenticated connections (the `connect` scenario's worker fleet), and
//!    the server's memory per connection = growth of its resident memory (`VmRSS` from
//!    /proc/<pid>/status) ÷ connections open. For our system the gateway's growth is the figure;
//!    each backend process (nats-server, storage, router) is reported beside it and summed into a
//!    whole-backend figure.
//! 2. **workloads** (the `chat` scenario at max rate, closed loop): `echo` (users in pairs, each
//!    sending to its partner) and `broadcast` (groups of K+1, each message to the K others). The
//!    server's CPU time (utime + stime from /proc/<pid>/stat) is read when sending starts and
//!    once everything is delivered; deliveries ÷ CPU seconds is the number of messages per second
//!    one fully busy core would deliver ("messages/s per core"), for the gateway alone and for the
//!    whole backend.
//!
//! The report states the ratios gateway/tokio and gateway/node beside the targets of issue #9
//! (≥ 2× messages/s per core, ≤ 0.25× memory per connection), and that our system stores every
//! message durably in JetStream before acknowledging it while the references store nothing.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail};
use serde_json::{json, Value};

use crate::hist;
use crate::procfs;
use crate::report::{self, Output};
use crate::scenario::{chat, connect};
use crate::util::{self, fmt_duration, fmt_rate, parse_duration};
use crate::RunArgs;

/// Issue #9: at least this many times the references' messages/s per core…
pub const TARGET_MSGS_PER_CORE: f64 = 2.0;
/// …and at most this fraction of their memory per connection.
pub const TARGET_MEMORY_PER_CONN: f64 = 0.25;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Users in pairs, each sending 1:1 messages to its partner (chat layout `pairs`).
    Echo,
    /// Groups of K+1 users (`--fanout K`), each member posting to its group (chat layout
    /// `group:K`): every message is delivered K times.
    Broadcast,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Echo => "echo",
            Workload::Broadcast => "broadcast",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub run: RunArgs,
    /// Our gateway's WebSocket URL (leave out to skip our system).
    #[arg(long)]
    pub gateway_url: Option<String>,
    /// Pid of the gateway process.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Another process of our backend as NAME=PID (nats-server, storage, router): its memory
    /// growth and CPU time are reported beside the gateway's and added into the whole-backend
    /// figures. Repeat for each.
    #[arg(long = "backend-pid", value_parser = parse_named_pid)]
    pub backend_pids: Vec<(String, u32)>,
    /// The tokio-tungstenite reference server's WebSocket URL (peers/tokio-ws).
    #[arg(long)]
    pub tokio_url: Option<String>,
    /// Pid of the tokio-tungstenite server.
    #[arg(long)]
    pub tokio_pid: Option<u32>,
    /// The Node `ws` reference server's WebSocket URL (peers/node-ws).
    #[arg(long)]
    pub node_url: Option<String>,
    /// Pid of the Node server (the `node` process itself, not npm).
    #[arg(long)]
    pub node_pid: Option<u32>,
    /// HS256 token secret shared by every target; tokens are minted locally. Prefer the
    /// environment variable.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// First loopback source address of client sockets (see `connect --help`).
    #[arg(long, default_value = "127.0.1.1")]
    pub source_ip_base: Ipv4Addr,
    /// How many source addresses to use (0: no bind).
    #[arg(long, default_value_t = 32)]
    pub source_ips: u32,
    /// Idle connections opened per target for the memory figure.
    #[arg(long, default_value_t = 5_000)]
    pub connections: u64,
    /// Connections opened per second.
    #[arg(long, default_value_t = 1000.0)]
    pub connect_rate: f64,
    /// Wait this long after the ramp before the first memory reading.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub settle: Duration,
    /// How long to hold the idle connections (memory is read every 5 s from --settle; the last
    /// reading counts).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Workloads to run against every target, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "echo,broadcast")]
    pub workloads: Vec<Workload>,
    /// Users (one connection each) in each workload.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Broadcast: recipients of each message (groups of K+1; --users must be a multiple of K+1).
    #[arg(long, default_value_t = 9)]
    pub fanout: usize,
    /// Sends per connection awaiting their `sent` tick (closed loop at max rate).
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// How long each workload sends.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After sending stops, how long to wait for outstanding ticks and deliveries.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub body_size: usize,
    /// Pause between phases, so that connections closing after one phase do not weigh on the
    /// next.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub pause: Duration,
}

fn parse_named_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or_else(|| format!("expected NAME=PID, got {s:?}"))?;
    let pid: u32 = pid.trim().parse().map_err(|_| format!("bad pid in {s:?}"))?;
    if name.trim().is_empty() {
        return Err(format!("empty name in {s:?}"));
    }
    Ok((name.trim().to_owned(), pid))
}

/// A process whose memory and CPU are read.
#[derive(Debug, Clone)]
struct Proc {
    name: String,
    pid: u32,
}

/// One system under test.
struct Target {
    /// `gateway`, `tokio` or `node`: the key in the JSON.
    key: &'static str,
    label: &'static str,
    url: String,
    /// The WebSocket server process.
    server: Proc,
    /// The rest of the backend (our system only).
    backend: Vec<Proc>,
}

impl Target {
    fn procs(&self) -> Vec<Proc> {
        std::iter::once(self.server.clone()).chain(self.backend.iter().cloned()).collect()
    }
}

fn targets(a: &Args) -> anyhow::Result<Vec<Target>> {
    let mut v = Vec::new();
    let mut add = |key, label, url: &Option<String>, pid: Option<u32>, name: &str, backend: Vec<Proc>| match (url, pid)
    {
        (Some(url), Some(pid)) => {
            v.push(Target { key, label, url: url.clone(), server: Proc { name: name.into(), pid }, backend });
            Ok(())
        }
        (None, None) => Ok(()),
        _ => Err(anyhow!("--{key}-url and --{key}-pid go together")),
    };
    let backend = a.backend_pids.iter().map(|(n, p)| Proc { name: n.clone(), pid: *p }).collect();
    add("gateway", "gateway (this system)", &a.gateway_url, a.gateway_pid, "gateway", backend)?;
    add("tokio", "tokio-tungstenite", &a.tokio_url, a.tokio_pid, "peer-tokio-ws", Vec::new())?;
    add("node", "Node ws", &a.node_url, a.node_pid, "node", Vec::new())?;
    if a.gateway_url.is_none() && !a.backend_pids.is_empty() {
        bail!("--backend-pid belongs to our system: give --gateway-url and --gateway-pid too");
    }
    if v.is_empty() {
        bail!("no target: give at least one of --gateway-url/--gateway-pid, --tokio-url/--tokio-pid, --node-url/--node-pid");
    }
    Ok(v)
}

// ---------------------------------------------------------------- accounting (pure)

/// Bytes per connection from resident memory before and with `open` connections; negative when
/// the process shrank meanwhile.
pub fn per_connection(before: u64, after: u64, open: u64) -> Option<f64> {
    (open > 0).then(|| (after as f64 - before as f64) / open as f64)
}

/// CPU seconds each process used between two readings (`None` where either reading failed).
pub fn cpu_used(before: &[Option<f64>], after: &[Option<f64>]) -> Vec<Option<f64>> {
    before.iter().zip(after).map(|(b, a)| Some((a.as_ref()? - b.as_ref()?).max(0.0))).collect()
}

/// The sum, if every term is known.
pub fn sum_all(v: &[Option<f64>]) -> Option<f64> {
    v.iter().try_fold(0.0, |acc, x| x.map(|x| acc + x))
}

/// Messages per CPU second: the rate one fully busy core would sustain ("messages/s per core").
pub fn per_cpu_second(messages: u64, cpu_s: Option<f64>) -> Option<f64> {
    cpu_s.filter(|&c| c > 0.0).map(|c| messages as f64 / c)
}

/// `ours / theirs`, when both are known and `theirs` is positive.
pub fn ratio(ours: Option<f64>, theirs: Option<f64>) -> Option<f64> {
    match (ours, theirs) {
        (Some(o), Some(t)) if t > 0.0 => Some(o / t),
        _ => None,
    }
}

/// Which direction a target goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// The ratio must be at least the target.
    AtLeast(f64),
    /// The ratio must be at most the target.
    AtMost(f64),
}

impl Goal {
    pub fn met(self, ratio: Option<f64>) -> Option<bool> {
        let r = ratio?;
        Some(match self {
            Goal::AtLeast(t) => r >= t,
            Goal::AtMost(t) => r <= t,
        })
    }

    fn text(self) -> String {
        match self {
            Goal::AtLeast(t) => format!("≥ {t}×"),
            Goal::AtMost(t) => format!("≤ {t}×"),
        }
    }
}

// ---------------------------------------------------------------- measuring

fn rss_all(procs: &[Proc]) -> Vec<Result<u64, String>> {
    procs.iter().map(|p| procfs::rss_bytes(Some(p.pid)).map_err(|e| format!("{e:#}"))).collect()
}

fn cpu_all(procs: &[Proc]) -> Vec<Option<f64>> {
    procs.iter().map(|p| procfs::cpu_seconds(Some(p.pid)).ok()).collect()
}

/// Builds a scenario's arguments the way its command line would, so every default stays the
/// scenario's own.
fn parse_sub<T: clap::FromArgMatches + clap::Args>(name: &'static str, argv: &[String]) -> anyhow::Result<T> {
    let cmd = T::augment_args(clap::Command::new(name).no_binary_name(true));
    let m = cmd.try_get_matches_from(argv).map_err(|e| anyhow!("internal {name} arguments: {e}"))?;
    T::from_arg_matches(&m).map_err(|e| anyhow!("internal {name} arguments: {e}"))
}

fn common_argv(a: &Args, url: &str) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--url".into(),
        url.into(),
        "--secret".into(),
        a.secret.clone(),
        "--source-ip-base".into(),
        a.source_ip_base.to_string(),
        "--source-ips".into(),
        a.source_ips.to_string(),
    ];
    if let Some(t) = a.run.threads {
        v.extend(["--threads".into(), t.to_string()]);
    }
    v
}

/// Phase (a): idle connections and memory per connection.
async fn connect_phase(a: &Args, t: &Target, prefix: &str) -> anyhow::Result<Value> {
    let mut argv = common_argv(a, &t.url);
    argv.extend([
        "--connections".into(),
        a.connections.to_string(),
        "--rate".into(),
        a.connect_rate.to_string(),
        "--settle".into(),
        fmt_duration(a.settle),
        "--hold".into(),
        fmt_duration(a.hold),
        // The reference servers relay no chat messages: memory only.
        "--no-probe".into(),
    ]);
    let cargs: connect::Args = parse_sub("connect", &argv)?;
    let procs = t.procs();
    let before = rss_all(&procs);
    for (p, r) in procs.iter().zip(&before) {
        if let Err(e) = r {
            bail!("{} (pid {}): {e}", p.name, p.pid);
        }
    }
    let held = connect::hold(&cargs, prefix, || std::future::ready(rss_all(&procs))).await?;
    let (after, open) = held.last();
    let mut rows = Vec::new();
    let mut per_conn: Vec<Option<f64>> = Vec::new();
    for ((p, b), a) in procs.iter().zip(&before).zip(after) {
        let (b, a) = (b.as_ref().ok().copied(), a.as_ref().ok().copied());
        let pc = match (b, a) {
            (Some(b), Some(a)) => per_connection(b, a, open),
            _ => None,
        };
        per_conn.push(pc);
        rows.push(json!({
            "name": p.name, "pid": p.pid, "rss_before_bytes": b, "rss_after_bytes": a,
            "growth_bytes": b.zip(a).map(|(b, a)| a as i64 - b as i64), "per_connection_bytes": pc,
        }));
    }
    let ok = held.failed() == 0 && held.dropped_total() == 0 && held.fatal.is_empty() && held.opened == a.connections;
    Ok(json!({
        "ok": ok,
        "wanted": a.connections,
        "opened": held.opened,
        "failed": held.failed(),
        "failures_by_cause": held.failures,
        "failure_examples": held.failure_examples,
        "dropped_while_held": held.dropped,
        "worker_errors": held.fatal,
        "ramp_seconds": held.ramp_s,
        "open_at_memory_sample": open,
        "processes": rows,
        "server_per_connection_bytes": per_conn[0],
        "backend_per_connection_bytes": sum_all(&per_conn),
        "tcp_to_synced": hist::summary(&held.h_synced),
    }))
}

/// Phase (b): one workload at max rate, with the CPU time of every process over the send window
/// (from t0 until everything is delivered).
async fn workload_phase(a: &Args, t: &Target, w: Workload, prefix: &str) -> anyhow::Result<(Value, i32)> {
    let layout = match w {
        Workload::Echo => "pairs".to_owned(),
        Workload::Broadcast => format!("group:{}", a.fanout),
    };
    let mut argv = common_argv(a, &t.url);
    argv.extend([
        "--users".into(),
        a.users.to_string(),
        "--layout".into(),
        layout.clone(),
        "--rate".into(),
        "max".into(),
        "--window".into(),
        a.window.to_string(),
        "--duration".into(),
        fmt_duration(a.duration),
        "--grace".into(),
        fmt_duration(a.grace),
        "--body-size".into(),
        a.body_size.to_string(),
        "--user-prefix".into(),
        prefix.to_owned(),
    ]);
    let cargs: chat::Args = parse_sub("chat", &argv)?;
    let procs = t.procs();
    let (mut start, mut end) = (None, None);
    let m = chat::measure(&cargs, |mark| {
        let reading = (Instant::now(), cpu_all(&procs));
        match mark {
            chat::Mark::SendStart => start = Some(reading),
            chat::Mark::Settled => end = Some(reading),
        }
    })
    .await?;
    let (verdict, exit, problems) = chat::judge(&m);
    let ((t_start, c_start), (t_end, c_end)) =
        start.zip(end).ok_or_else(|| anyhow!("the workload ended before its send window"))?;
    let wall_s = (t_end - t_start).as_secs_f64();
    let used = cpu_used(&c_start, &c_end);
    let server_cpu = used[0];
    let backend_cpu = sum_all(&used);
    let cores = |c: Option<f64>| c.map(|c| c / wall_s.max(1e-9));
    let cpu_rows: Vec<Value> = procs
        .iter()
        .zip(&used)
        .map(|(p, u)| json!({"name": p.name, "pid": p.pid, "cpu_seconds": u, "cores_busy": cores(*u)}))
        .collect();
    Ok((
        json!({
            "workload": w.name(),
            "layout": layout,
            "users": a.users,
            "window": a.window,
            "duration_s": a.duration.as_secs_f64(),
            "verdict": verdict,
            "problems": problems,
            "sent_acknowledged": m.acked,
            "delivered": m.delivered,
            "sent_per_s": m.sent_per_s,
            "delivered_per_s": m.delivered_per_s,
            "steady_delivered_per_s": m.steady,
            "cpu_window_s": wall_s,
            "cpu": cpu_rows,
            "server_cpu_seconds": server_cpu,
            "backend_cpu_seconds": backend_cpu,
            "server_cores_busy": cores(server_cpu),
            "backend_cores_busy": cores(backend_cpu),
            "delivered_per_server_cpu_second": per_cpu_second(m.delivered, server_cpu),
            "delivered_per_backend_cpu_second": per_cpu_second(m.delivered, backend_cpu),
            "latency": {
                "measured_from": "actual send time (closed loop)",
                "send_to_sent": hist::summary(&m.h_sent),
                "send_to_deliver": hist::summary(&m.h_deliver),
            },
            "ledger": m.check,
            "receipts_received": m.receipts,
            "other_items_received": m.other_items,
            "loadgen_cpu_seconds_total": m.loadgen_cpu_s,
        }),
        exit,
    ))
}

// ---------------------------------------------------------------- reporting

/// One row of the comparison: a figure per target, the ratios and the target.
struct Row {
    figure: String,
    basis: &'static str,
    unit: Unit,
    values: [Option<f64>; 3],
    goal: Goal,
}

#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    PerSecond,
}

impl Unit {
    fn fmt(self, v: Option<f64>) -> String {
        match (self, v) {
            (_, None) => "n/a".into(),
            (Unit::Bytes, Some(b)) if b.abs() >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
            (Unit::Bytes, Some(b)) => format!("{b:.0} B"),
            (Unit::PerSecond, Some(r)) => format!("{} msg/s", fmt_rate(r)),
        }
    }
}

fn fmt_ratio(r: Option<f64>, goal: Goal) -> String {
    match r {
        None => "n/a".into(),
        Some(r) => format!("{r:.2}× {}", if goal.met(Some(r)) == Some(true) { "✓" } else { "✗" }),
    }
}

const KEYS: [&str; 3] = ["gateway", "tokio", "node"];

fn comparison(results: &serde_json::Map<String, Value>, workloads: &[Workload]) -> Vec<Row> {
    let get = |key: &str, path: &[&str]| -> Option<f64> {
        let mut v = results.get(key)?;
        for p in path {
            v = v.get(p)?;
        }
        v.as_f64()
    };
    // The references are one process, so their whole-backend figures are their server's.
    let vals = |path: &[&str]| -> [Option<f64>; 3] { KEYS.map(|k| get(k, path)) };
    let mut rows = vec![
        Row {
            figure: "memory per idle connection".into(),
            basis: "server process (gateway)",
            unit: Unit::Bytes,
            values: vals(&["connect", "server_per_connection_bytes"]),
            goal: Goal::AtMost(TARGET_MEMORY_PER_CONN),
        },
        Row {
            figure: "memory per idle connection".into(),
            basis: "whole backend (gateway + nats-server + storage + router)",
            unit: Unit::Bytes,
            values: vals(&["connect", "backend_per_connection_bytes"]),
            goal: Goal::AtMost(TARGET_MEMORY_PER_CONN),
        },
    ];
    for w in workloads {
        let n = w.name();
        rows.push(Row {
            figure: format!("{n}: messages delivered/s per core"),
            basis: "server process (gateway)",
            unit: Unit::PerSecond,
            values: vals(&["workloads", n, "delivered_per_server_cpu_second"]),
            goal: Goal::AtLeast(TARGET_MSGS_PER_CORE),
        });
        rows.push(Row {
            figure: format!("{n}: messages delivered/s per core"),
            basis: "whole backend (gateway + nats-server + storage + router)",
            unit: Unit::PerSecond,
            values: vals(&["workloads", n, "delivered_per_backend_cpu_second"]),
            goal: Goal::AtLeast(TARGET_MSGS_PER_CORE),
        });
    }
    rows
}

fn row_json(r: &Row) -> Value {
    let [g, t, n] = r.values;
    let (rt, rn) = (ratio(g, t), ratio(g, n));
    json!({
        "figure": r.figure, "basis": r.basis,
        "gateway": g, "tokio": t, "node": n,
        "gateway_vs_tokio": rt, "gateway_vs_node": rn,
        "target": r.goal.text(),
        "met_vs_tokio": r.goal.met(rt), "met_vs_node": r.goal.met(rn),
    })
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let started = SystemTime::now();
    let targets = targets(&a)?;
    if a.secret.len() < 16 {
        bail!("the token secret (--secret or JWT_SECRET) must be at least 16 bytes, like the gateway's");
    }
    if a.workloads.contains(&Workload::Broadcast) && (a.fanout == 0 || !a.users.is_multiple_of(a.fanout + 1)) {
        bail!("broadcast: --users ({}) must be a multiple of --fanout + 1 ({})", a.users, a.fanout + 1);
    }
    for t in &targets {
        for p in t.procs() {
            procfs::rss_bytes(Some(p.pid)).map_err(|e| anyhow!("{} {} (pid {}): {e:#}", t.key, p.name, p.pid))?;
        }
    }
    let tag = util::run_tag();
    let mut results = serde_json::Map::new();
    let (mut worst, mut errors) = (0i32, Vec::<String>::new());
    for (i, t) in targets.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(a.pause).await;
        }
        report::note(format!("== {} at {} ==", t.label, t.url));
        let mut tr = serde_json::Map::new();
        tr.insert("label".into(), json!(t.label));
        tr.insert("url".into(), json!(t.url));
        tr.insert(
            "processes".into(),
            json!(t
                .procs()
                .iter()
                .enumerate()
                .map(|(i, p)| json!({
                    "name": p.name, "pid": p.pid, "role": if i == 0 { "server" } else { "backend" },
                }))
                .collect::<Vec<_>>()),
        );
        if a.connections > 0 {
            report::note(format!("{}: {} idle connections (memory per connection)", t.key, a.connections));
            match connect_phase(&a, t, &format!("pc{tag}{}", t.key)).await {
                Ok(v) => {
                    if v["ok"] != true {
                        errors.push(format!("{} connect: not every connection opened and held", t.key));
                    }
                    tr.insert("connect".into(), v);
                }
                Err(e) => {
                    errors.push(format!("{} connect: {e:#}", t.key));
                    tr.insert("connect".into(), json!({"error": format!("{e:#}")}));
                }
            }
            tokio::time::sleep(a.pause).await;
        }
        let mut wl = serde_json::Map::new();
        for (j, w) in a.workloads.iter().enumerate() {
            if j > 0 {
                tokio::time::sleep(a.pause).await;
            }
            report::note(format!("{}: workload {} for {}", t.key, w.name(), fmt_duration(a.duration)));
            match workload_phase(&a, t, *w, &format!("pw{tag}{}{j}", t.key)).await {
                Ok((v, exit)) => {
                    if exit != 0 {
                        errors.push(format!("{} {}: {}", t.key, w.name(), v["verdict"].as_str().unwrap_or("?")));
                        worst = if exit == 1 || worst == 1 { 1 } else { 3 };
                    }
                    wl.insert(w.name().into(), v);
                }
                Err(e) => {
                    errors.push(format!("{} {}: {e:#}", t.key, w.name()));
                    wl.insert(w.name().into(), json!({"error": format!("{e:#}")}));
                }
            }
        }
        tr.insert("workloads".into(), Value::Object(wl));
        results.insert(t.key.into(), Value::Object(tr));
    }
    if worst == 0 && !errors.is_empty() {
        worst = 3;
    }

    let rows = comparison(&results, &a.workloads);
    let config = json!({
        "targets": targets.iter().map(|t| json!({
            "key": t.key, "url": t.url,
            "processes": t.procs().iter().map(|p| json!({"name": p.name, "pid": p.pid})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "connections": a.connections,
        "connect_rate": a.connect_rate,
        "settle_s": a.settle.as_secs_f64(),
        "hold_s": a.hold.as_secs_f64(),
        "workloads": a.workloads.iter().map(|w| w.name()).collect::<Vec<_>>(),
        "users": a.users,
        "fanout": a.fanout,
        "window": a.window,
        "duration_s": a.duration.as_secs_f64(),
        "grace_s": a.grace.as_secs_f64(),
        "body_size": a.body_size,
        "pause_s": a.pause.as_secs_f64(),
        "source_ip_base": a.source_ip_base.to_string(),
        "source_ips": a.source_ips,
        "threads": a.run.threads(),
        "targets_of_issue_9": {
            "messages_per_second_per_core": format!("≥ {TARGET_MSGS_PER_CORE}×"),
            "memory_per_connection": format!("≤ {TARGET_MEMORY_PER_CONN}×"),
        },
    });
    let results_json = json!({
        "targets": results,
        "comparison": rows.iter().map(row_json).collect::<Vec<_>>(),
        "errors": errors,
    });
    let (markdown, human) = render(&a, &targets, &results, &rows, &errors);
    report::finish(
        a.run.out.as_deref(),
        &Output { scenario: "peer", started, config, results: results_json, markdown, human },
    )?;
    Ok(worst)
}

const HONESTY: &str = "Our system acknowledges a message (`sent`) only once JetStream has stored it \
durably (file store), then delivers it live, tracks per-device cursors and sends delivery receipts; \
the reference servers store nothing (a message to an offline user is dropped), have no retry dedup, \
receipts, cursors, presence or heartbeat timeout, and verify the same HS256 tokens. Memory per \
connection is resident-memory growth ÷ connections open (/proc/<pid>/status VmRSS); messages/s per \
core is deliveries ÷ CPU seconds of the process(es) from the first send until everything was \
delivered (/proc/<pid>/stat utime + stime). loadgen shares the machine with every target.";

fn render(
    a: &Args,
    targets: &[Target],
    results: &serde_json::Map<String, Value>,
    rows: &[Row],
    errors: &[String],
) -> (String, String) {
    let mut md = format!(
        "This system against reference WebSocket servers on the same workloads, driven by the same client \
code, one target after the other: {} idle connections each for memory; then {} at max rate (closed loop, \
window {} per connection, {} users, {} each; broadcast to {} recipients per message).\n\n{HONESTY}\n\n",
        a.connections,
        a.workloads.iter().map(|w| w.name()).collect::<Vec<_>>().join(" and "),
        a.window,
        a.users,
        fmt_duration(a.duration),
        a.fanout
    );
    md.push_str("## Ratios against the targets of issue #9\n\n");
    md.push_str("| figure | basis | gateway | tokio-tungstenite | Node ws | gateway/tokio | gateway/node | target |\n");
    md.push_str("|---|---|---|---|---|---|---|---|\n");
    let mut human = String::from("peer: gateway vs tokio-tungstenite vs Node ws\n");
    for r in rows {
        let [g, t, n] = r.values;
        let (rt, rn) = (ratio(g, t), ratio(g, n));
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.figure,
            r.basis,
            r.unit.fmt(g),
            r.unit.fmt(t),
            r.unit.fmt(n),
            fmt_ratio(rt, r.goal),
            fmt_ratio(rn, r.goal),
            r.goal.text()
        ));
        human.push_str(&format!(
            "{} [{}]: gateway {} · tokio {} · node {} → gateway/tokio {} · gateway/node {} (target {})\n",
            r.figure,
            r.basis,
            r.unit.fmt(g),
            r.unit.fmt(t),
            r.unit.fmt(n),
            fmt_ratio(rt, r.goal),
            fmt_ratio(rn, r.goal),
            r.goal.text()
        ));
    }
    md.push_str("\n## Per target\n\n");
    for t in targets {
        let Some(v) = results.get(t.key) else { continue };
        md.push_str(&format!("### {} ({})\n\n| figure | value |\n|---|---|\n", t.label, t.url));
        let c = &v["connect"];
        if let Some(e) = c["error"].as_str() {
            md.push_str(&format!("| connect | error: {e} |\n"));
        } else if !c.is_null() {
            md.push_str(&format!(
                "| idle connections | {} of {} opened, {} failed, ramp {:.1} s |\n",
                c["opened"],
                c["wanted"],
                c["failed"],
                c["ramp_seconds"].as_f64().unwrap_or(0.0)
            ));
            for p in c["processes"].as_array().into_iter().flatten() {
                let mib = |k: &str| p[k].as_f64().map(|b| format!("{:.1} MiB", b / 1048576.0)).unwrap_or("n/a".into());
                md.push_str(&format!(
                    "| {} RSS: before → with {} connections | {} → {} = **{}** per connection |\n",
                    p["name"].as_str().unwrap_or("?"),
                    c["open_at_memory_sample"],
                    mib("rss_before_bytes"),
                    mib("rss_after_bytes"),
                    Unit::Bytes.fmt(p["per_connection_bytes"].as_f64())
                ));
            }
        }
        // In the order they ran (the JSON object is sorted by name).
        for (name, w) in a.workloads.iter().filter_map(|w| Some((w.name(), v["workloads"].get(w.name())?))) {
            if let Some(e) = w["error"].as_str() {
                md.push_str(&format!("| {name} | error: {e} |\n"));
                continue;
            }
            let lat = |k: &str, p: &str| w["latency"][k][p].as_u64().map(hist::fmt_ms).unwrap_or_else(|| "–".into());
            md.push_str(&format!(
                "| {name}: delivered | {} → **{} msg/s** (sent {} msg/s) |\n",
                w["delivered"],
                fmt_rate(w["delivered_per_s"].as_f64().unwrap_or(0.0)),
                fmt_rate(w["sent_per_s"].as_f64().unwrap_or(0.0))
            ));
            for p in w["cpu"].as_array().into_iter().flatten() {
                md.push_str(&format!(
                    "| {name}: {} CPU | {:.2} s over {:.1} s ({:.2} cores busy) |\n",
                    p["name"].as_str().unwrap_or("?"),
                    p["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
                    w["cpu_window_s"].as_f64().unwrap_or(0.0),
                    p["cores_busy"].as_f64().unwrap_or(f64::NAN)
                ));
            }
            md.push_str(&format!(
                "| {name}: send → deliver | p50 {} · p99 {} · max {} |\n| {name}: send → sent | p50 {} · p99 {} |\n",
                lat("send_to_deliver", "p50_us"),
                lat("send_to_deliver", "p99_us"),
                lat("send_to_deliver", "max_us"),
                lat("send_to_sent", "p50_us"),
                lat("send_to_sent", "p99_us"),
            ));
            md.push_str(&format!("| {name}: verdict | {} |\n", w["verdict"].as_str().unwrap_or("?")));
            human.push_str(&format!(
                "{}/{name}: delivered {} msg/s, send→deliver p50 {} p99 {} — {}\n",
                t.key,
                fmt_rate(w["delivered_per_s"].as_f64().unwrap_or(0.0)),
                lat("send_to_deliver", "p50_us"),
                lat("send_to_deliver", "p99_us"),
                w["verdict"].as_str().unwrap_or("?")
            ));
        }
        md.push('\n');
    }
    if !errors.is_empty() {
        md.push_str("## Errors\n\n");
        for e in errors {
            md.push_str(&format!("* {e}\n"));
            human.push_str(&format!("error: {e}\n"));
        }
    }
    (md, human)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting() {
        assert_eq!(per_connection(1000, 5000, 4), Some(1000.0));
        assert_eq!(per_connection(5000, 1000, 4), Some(-1000.0));
        assert_eq!(per_connection(1, 2, 0), None);
        let used = cpu_used(&[Some(1.0), Some(2.0), None], &[Some(3.5), Some(2.0), Some(9.0)]);
        assert_eq!(used, vec![Some(2.5), Some(0.0), None]);
        assert_eq!(sum_all(&used[..2]), Some(2.5));
        assert_eq!(sum_all(&used), None);
        assert_eq!(per_cpu_second(1000, Some(2.5)), Some(400.0));
        assert_eq!(per_cpu_second(1000, Some(0.0)), None);
        assert_eq!(ratio(Some(3.0), Some(1.5)), Some(2.0));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(Goal::AtLeast(2.0).met(Some(2.0)), Some(true));
        assert_eq!(Goal::AtLeast(2.0).met(Some(1.9)), Some(false));
        assert_eq!(Goal::AtMost(0.25).met(Some(0.3)), Some(false));
        assert_eq!(Goal::AtMost(0.25).met(None), None);
    }

    #[test]
    fn named_pids_and_targets() {
        assert_eq!(parse_named_pid("nats-server=42"), Ok(("nats-server".into(), 42)));
        assert!(parse_named_pid("42").is_err());
        assert!(parse_named_pid("=42").is_err());
        assert!(parse_named_pid("x=y").is_err());
        let a = parse_sub::<Args>(
            "peer",
            &["--secret", "0123456789abcdef", "--tokio-url", "ws://127.0.0.1:1/ws", "--tokio-pid", "7"]
                .map(String::from),
        )
        .unwrap();
        let t = targets(&a).unwrap();
        assert_eq!((t.len(), t[0].key, t[0].server.pid), (1, "tokio", 7));
        let a = parse_sub::<Args>("peer", &["--secret", "x", "--node-url", "ws://h/ws"].map(String::from)).unwrap();
        assert!(targets(&a).is_err());
    }

    #[test]
    fn sub_arguments_keep_their_defaults() {
        let c: chat::Args = parse_sub(
            "chat",
            &["--url", "ws://127.0.0.1:1/ws", "--secret", "s", "--layout", "group:4", "--rate", "max"]
                .map(String::from),
        )
        .unwrap();
        assert_eq!(c.layout, chat::Layout::Group(4));
        assert_eq!(c.ack_every, 32);
        assert!(parse_sub::<chat::Args>("chat", &["--bogus".to_owned()]).is_err());
    }

    #[test]
    fn comparison_uses_the_gateway_alone_and_the_whole_backend() {
        let mut m = serde_json::Map::new();
        m.insert(
            "gateway".into(),
            json!({"connect": {"server_per_connection_bytes": 2000.0, "backend_per_connection_bytes": 5000.0},
                   "workloads": {"echo": {"delivered_per_server_cpu_second": 40000.0, "delivered_per_backend_cpu_second": 10000.0}}}),
        );
        m.insert(
            "tokio".into(),
            json!({"connect": {"server_per_connection_bytes": 4000.0, "backend_per_connection_bytes": 4000.0},
                   "workloads": {"echo": {"delivered_per_server_cpu_second": 20000.0, "delivered_per_backend_cpu_second": 20000.0}}}),
        );
        let rows = comparison(&m, &[Workload::Echo]);
        assert_eq!(rows.len(), 4);
        // References: the whole backend is the server.
        assert_eq!(rows[0].values, [Some(2000.0), Some(4000.0), None]);
        assert_eq!(rows[1].values, [Some(5000.0), Some(4000.0), None]);
        let j = row_json(&rows[2]);
        assert_eq!(j["gateway_vs_tokio"], 2.0);
        assert_eq!(j["met_vs_tokio"], true);
        assert_eq!(j["met_vs_node"], Value::Null);
        let j = row_json(&rows[1]);
        assert_eq!(j["gateway_vs_tokio"], 1.25);
        assert_eq!(j["met_vs_tokio"], false);
    }
}
