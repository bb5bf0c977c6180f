//! `storm`: a reconnect storm. Many clients are connected and receiving while a few senders send
//! to them (open loop); then every connection drops at once and the clients come back with
//! jittered exponential backoff, resume from their `since` or their stored cursor, and drain
//! what piled up, while the senders keep sending.
//!
//! The drop is, by default, loadgen closing every client socket abruptly (TCP RST, no close
//! frame); or a signal to a gateway process (`--gateway-pid`, SIGKILL by default); or any shell
//! command (`--kill-cmd`). `--restart-cmd` starts the gateway again.
//!
//! Reported: time until every dropped client is back (reconnected and `synced`, i.e. its inbox
//! drained), percentiles of each client's time to back, reconnect attempts and failures by
//! cause, how long the backlog of messages acknowledged before the drop took to arrive, and the
//! ledger. The ledger drops what a client drops (items whose `seq` it holds — the server resends
//! what was not acknowledged — and chat messages whose sender and id it holds) and counts both
//! kinds of server duplicate; what is left, what the app would show, must hold every
//! acknowledged message exactly once, in per-sender order.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{self, GatewayArgs};
use crate::hist;
use crate::report::{self, Output, Progress};
use crate::scrape;
use crate::session::{self, BackoffArgs, ClientArgs, Control, Env, Resume, Role, SendPlan, Sending, Spec, Spread};
use crate::util::{self, fmt_duration, fmt_rate, parse_duration};
use crate::RunArgs;

/// The signal for `--gateway-pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Signal {
    /// SIGKILL: the gateway vanishes; clients see their connections reset.
    Kill,
    /// SIGTERM: the gateway drains (`reconnect` frames, close code 1001) and exits.
    Term,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Kill => libc::SIGKILL,
            Signal::Term => libc::SIGTERM,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Kill => "SIGKILL",
            Signal::Term => "SIGTERM",
        }
    }
}

pub const HELP: &str = "\
Phases: connect everyone; senders send for --before; drop every connection at once; wait until
every dropped client is back (reconnected and synced: its inbox drained) or --recover-timeout;
send --after more; stop sending and wait up to --grace for the last ticks and deliveries.

Backoff: the n-th consecutive attempt (the first reconnect after a loss is n = 1, each failed
attempt adds one) waits d·(1 − jitter·u), d = min(--backoff-cap, --backoff-base·2^(n−1)), u
uniform in [0, 1); a client moves on to the next --url after each loss or failure.

The ledger: server duplicates are counted first — items resent with a seq the client already
held (allowed after a reconnect) and messages stored twice under a new seq (a violation of the
send deduplication). The client drops both, as PROTOCOL.md asks; what is left, what the app
would show, must hold every message acknowledged by `sent` exactly once, in per-sender order,
at its recipient only. Exit status 1 on a violation; 3 when dropped clients did not come back,
sends failed or went unanswered, connections were lost before the drop, or --restart-cmd
failed.

Example, a gateway killed and restarted:
  loadgen storm --url ws://127.0.0.1:8080/ws --clients 5000 \\
    --gateway-pid \"$(cat gateway.pid)\" \\
    --restart-cmd 'gateway --listen 127.0.0.1:8080 >>gateway.log 2>&1 & echo $! >gateway.pid' \\
    --out bench-results";

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub gw: GatewayArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub backoff: BackoffArgs,
    /// Receiving clients, one connection (and user) each.
    #[arg(long, default_value_t = 2000)]
    pub clients: usize,
    /// Senders, one connection each; they keep sending throughout.
    #[arg(long, default_value_t = 20)]
    pub senders: usize,
    /// Messages per second per sender, open loop (latency runs from the scheduled send time, so
    /// an outage shows as latency); message k of sender s goes to client (s + k) mod clients.
    /// The gateway's default limit is 50 a second per connection.
    #[arg(long, default_value_t = 25.0)]
    pub rate: f64,
    /// Connections opened per second before the storm.
    #[arg(long, default_value_t = 500.0)]
    pub connect_rate: f64,
    /// How clients resume: `since` (the highest seq they hold), `cursor` (the server's stored
    /// cursor: unacknowledged items come again and are dropped by seq), or `half` (each way).
    #[arg(long, value_enum, default_value = "half")]
    pub resume: Resume,
    /// Sending time before the drop.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub before: Duration,
    /// Longest wait, from the drop, for every dropped client to be back.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub recover_timeout: Duration,
    /// Sending time after every dropped client is back.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub after: Duration,
    /// After sending stops, longest wait for outstanding ticks and deliveries.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Drop the connections by running this shell command (`sh -c`), e.g. a kill of the
    /// gateway; it must return. Without it or --gateway-pid, loadgen closes every client
    /// socket itself, abruptly (TCP RST, no close frame).
    #[arg(long, conflicts_with = "gateway_pid")]
    pub kill_cmd: Option<String>,
    /// Drop the connections by sending --kill-signal to this gateway process.
    #[arg(long)]
    pub gateway_pid: Option<i32>,
    /// The signal for --gateway-pid: `kill` (SIGKILL) or `term` (SIGTERM: the gateway drains,
    /// sending `reconnect` and closing with 1001).
    #[arg(long, value_enum, default_value = "kill")]
    pub kill_signal: Signal,
    /// After the drop, start the gateway again with this shell command (`sh -c`). It must
    /// return: start a long-running process in the background (`… >>gateway.log 2>&1 &`).
    #[arg(long)]
    pub restart_cmd: Option<String>,
    /// Wait this long after the drop before --restart-cmd.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub restart_delay: Duration,
    /// With loadgen's own drop: drop the senders' connections too (by default they keep
    /// their connections and send throughout).
    #[arg(long)]
    pub drop_senders: bool,
    /// Gateway URL(s) for the senders (default: --url). A gateway that is not killed keeps
    /// them sending throughout a --kill-cmd/--gateway-pid storm.
    #[arg(long = "sender-url")]
    pub sender_urls: Vec<String>,
}

/// How the connections are dropped.
enum DropBy {
    Loadgen { senders_too: bool },
    Pid(i32, Signal),
    Command(String),
}

impl DropBy {
    fn describe(&self) -> String {
        match self {
            DropBy::Loadgen { senders_too: false } => "loadgen closed every client socket abruptly (RST)".into(),
            DropBy::Loadgen { senders_too: true } => {
                "loadgen closed every client and sender socket abruptly (RST)".into()
            }
            DropBy::Pid(p, s) => format!("{} to gateway pid {p}", s.name()),
            DropBy::Command(c) => format!("`{c}`"),
        }
    }
}

/// Runs `sh -c cmd` (output to stderr), waiting up to `timeout`; returns its exit code.
async fn shell(cmd: &str, timeout: Duration) -> anyhow::Result<i32> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .spawn()
        .with_context(|| format!("starting `{cmd}`"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => Ok(status?.code().unwrap_or(-1)),
        Err(_) => {
            let _ = child.start_kill();
            bail!("`{cmd}` did not return within {} (background long-running processes with &)", fmt_duration(timeout))
        }
    }
}

/// Per-client recovery figures (µs after the drop), for the clients that lost their connection.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub dropped: u64,
    pub back: u64,
    /// The slowest client back (synced), if all are back.
    pub all_back_us: Option<u64>,
}

/// Joins drop and back instants: `(dropped_us, back_synced_us)` per client.
pub fn recovery(drop_us: u64, clients: impl Iterator<Item = (Option<u64>, Option<u64>)>) -> Recovery {
    let mut r = Recovery::default();
    let mut slowest = 0;
    for (dropped, back) in clients {
        if dropped.is_none() {
            continue;
        }
        r.dropped += 1;
        if let Some(b) = back {
            r.back += 1;
            slowest = slowest.max(b.saturating_sub(drop_us));
        }
    }
    r.all_back_us = (r.dropped > 0 && r.back == r.dropped).then_some(slowest);
    r
}

/// The backlog: first deliveries at or after the drop of messages acknowledged (ticked) before
/// it. `ticks[s][k]` is when message k of sender s got its tick (0: never); `late` holds
/// `(sender, mseq, delivered_us)`. Returns (how many, the last delivery of one, µs after the drop).
pub fn backlog(drop_us: u64, ticks: &[Vec<u64>], late: impl Iterator<Item = (u32, u64, u64)>) -> (u64, Option<u64>) {
    let mut n = 0;
    let mut last = None;
    for (s, k, at) in late {
        let tick = ticks.get(s as usize).and_then(|t| t.get(k as usize)).copied().unwrap_or(0);
        if tick != 0 && tick < drop_us {
            n += 1;
            let d = at.saturating_sub(drop_us);
            last = Some(last.map_or(d, |l: u64| l.max(d)));
        }
    }
    (n, last)
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let started = SystemTime::now();
    let (n, s_n) = (args.clients, args.senders);
    if n == 0 || s_n == 0 {
        bail!("--clients and --senders must be at least 1");
    }
    if n > u32::MAX as usize || s_n > u32::MAX as usize {
        bail!("too many users");
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) || args.connect_rate <= 0.0 {
        bail!("--rate and --connect-rate must be > 0");
    }
    if args.gw.secret.len() < 16 {
        bail!("the token secret (--secret or JWT_SECRET) must be at least 16 bytes, like the gateway's");
    }
    if args.restart_cmd.is_some() && args.kill_cmd.is_none() && args.gateway_pid.is_none() {
        bail!("--restart-cmd needs --kill-cmd or --gateway-pid (loadgen's own drop leaves the gateway running)");
    }
    let backoff = args.backoff.backoff()?;
    let nofile = util::raise_nofile();
    if nofile < (n + s_n) as u64 + 64 {
        bail!("RLIMIT_NOFILE is {nofile}: too low for {} connections", n + s_n);
    }
    let drop_by = match (&args.kill_cmd, args.gateway_pid) {
        (Some(c), _) => DropBy::Command(c.clone()),
        (None, Some(p)) => {
            // SAFETY: signal 0 only checks that the process exists and may be signalled.
            if unsafe { libc::kill(p, 0) } != 0 {
                bail!("--gateway-pid {p}: {}", std::io::Error::last_os_error());
            }
            DropBy::Pid(p, args.kill_signal)
        }
        (None, None) => DropBy::Loadgen { senders_too: args.drop_senders },
    };
    let loadgen_drop = matches!(drop_by, DropBy::Loadgen { .. });

    let prefix = args.client.user_prefix.clone().unwrap_or_else(|| format!("lg{}", util::run_tag()));
    let senders: Vec<String> = (0..s_n).map(|i| Env::sender_name(&prefix, i)).collect();
    let clients: Vec<String> = (0..n).map(|i| Env::recipient_name(&prefix, i)).collect();
    if let Some(bad) = senders.iter().chain(&clients).find(|u| protocol::UserId::parse(u).is_err()) {
        bail!("user id {bad:?} is not valid (ids: 1–64 bytes of A-Z a-z 0-9 _ -)");
    }
    let keys = protocol::TokenKeys::hs256(args.gw.secret.as_bytes(), 0);
    let targets = Arc::new(client::resolve_all(&args.gw.urls, args.gw.ca_file.as_deref()).await?);
    let sender_targets = if args.sender_urls.is_empty() {
        targets.clone()
    } else {
        Arc::new(client::resolve_all(&args.sender_urls, args.gw.ca_file.as_deref()).await?)
    };
    let spread = Spread { senders: s_n, recipients: n };
    let env = Arc::new(Env {
        prefix: prefix.clone(),
        spread,
        recipient_names: clients.clone(),
        body_size: args.client.body_size,
        ack_every: args.client.ack_every.max(1),
        ack_interval: args.client.ack_interval,
        ping_interval: args.client.ping_interval,
        connect_timeout: args.client.connect_timeout,
        backoff,
        counters: Default::default(),
        drop_us: AtomicU64::new(0),
        go_us: AtomicU64::new(0),
        expect: (0..n).map(|_| AtomicU64::new(0)).collect(),
    });
    let metrics_before = scrape::scrape_all(&args.gw.metrics_urls).await;

    // Connect everyone.
    report::note(format!(
        "connecting {n} clients and {s_n} senders to {} at {}/s",
        args.gw.urls.join(", "),
        fmt_rate(args.connect_rate)
    ));
    let (ctl_tx, ctl_rx) = watch::channel(Control::default());
    let t_setup = Instant::now();
    let interval_us = 1e6 / args.rate;
    let mut client_handles = Vec::new();
    let mut sender_handles = Vec::new();
    let at = |i: usize| t_setup + Duration::from_secs_f64(i as f64 / args.connect_rate);
    for (i, user) in clients.iter().enumerate() {
        let spec = Spec {
            index: i,
            token: keys.mint(user, Some("lg"), 24 * 3600),
            role: Role::Recipient { index: i, track_empty: false },
            since: args.resume.uses_since(i),
            droppable: true,
            targets: targets.clone(),
            source_ip_base: args.gw.source_ip_base,
            source_ips: args.gw.source_ips,
        };
        client_handles.push(session::spawn_at(env.clone(), spec, ctl_rx.clone(), at(i)));
    }
    for (s, user) in senders.iter().enumerate() {
        let spec = Spec {
            index: n + s,
            token: keys.mint(user, Some("lg"), 24 * 3600),
            role: Role::Sender(SendPlan {
                sender: s,
                count: None,
                interval_us: Some(interval_us),
                // Spread the senders over the interval.
                phase_us: interval_us * s as f64 / s_n as f64,
            }),
            since: args.resume.uses_since(s),
            droppable: loadgen_drop && args.drop_senders,
            targets: sender_targets.clone(),
            source_ip_base: args.gw.source_ip_base,
            source_ips: args.gw.source_ips,
        };
        sender_handles.push(session::spawn_at(env.clone(), spec, ctl_rx.clone(), at(n + s)));
    }
    let c = &env.counters;
    let setup_timeout = Duration::from_secs_f64((n + s_n) as f64 / args.connect_rate) + args.client.connect_timeout * 2;
    let setup_end = Instant::now() + setup_timeout;
    while c.synced.load(Relaxed) < (n + s_n) as u64 {
        if Instant::now() >= setup_end {
            ctl_tx.send_modify(|c| c.stop = true);
            let mut outs = session::collect(client_handles).await?;
            outs.extend(session::collect(sender_handles).await?);
            bail!(
                "only {} of {} connections synced within {}; failed attempts: {}",
                c.synced.load(Relaxed),
                n + s_n,
                fmt_duration(setup_timeout),
                session::list(&session::failures_between(&outs, 0, u64::MAX))
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report::note(format!("{} connections synced in {:.1}s", n + s_n, t_setup.elapsed().as_secs_f64()));

    // Send; the progress line samples a one-second timeline.
    let phase = Arc::new(Mutex::new("before"));
    let timeline: Arc<Mutex<Vec<[u64; 7]>>> = Arc::default();
    let go_us = util::now_us() + 100_000;
    env.go_us.store(go_us, Relaxed);
    ctl_tx.send_modify(|c| c.sending = Sending::Go);
    let progress = {
        let (env, phase, timeline) = (env.clone(), phase.clone(), timeline.clone());
        let mut last = (0u64, 0u64);
        Progress::start(move |_| {
            let c = &env.counters;
            let t_ms = util::now_us().saturating_sub(go_us) / 1000;
            let (acked, delivered) = (c.acked.load(Relaxed), c.delivered.load(Relaxed));
            let row = [
                t_ms,
                c.connected.load(Relaxed),
                c.synced.load(Relaxed),
                acked,
                delivered,
                c.attempts.load(Relaxed),
                c.attempt_failures.load(Relaxed),
            ];
            timeline.lock().unwrap().push(row);
            let line = format!(
                "storm t={:>5.1}s {} connected {} synced {} dropped {} back {} attempts {} failed {} · sent {} ({}/s) delivered {} ({}/s) redelivered {}",
                t_ms as f64 / 1e3,
                phase.lock().unwrap(),
                row[1],
                row[2],
                c.dropped.load(Relaxed),
                c.back.load(Relaxed),
                row[5],
                row[6],
                acked,
                fmt_rate(acked.saturating_sub(last.0) as f64),
                delivered,
                fmt_rate(delivered.saturating_sub(last.1) as f64),
                c.redelivered.load(Relaxed),
            );
            last = (acked, delivered);
            line
        })
    };
    report::note(format!(
        "{s_n} senders at {} msg/s each ({} msg/s); dropping every connection in {}",
        fmt_rate(args.rate),
        fmt_rate(args.rate * s_n as f64),
        fmt_duration(args.before)
    ));
    tokio::time::sleep_until(Instant::from_std(util::clock().instant_at(go_us)) + args.before).await;

    // The drop.
    *phase.lock().unwrap() = "recovering";
    let acked_before_drop = c.acked.load(Relaxed);
    let drop_us = util::now_us();
    env.drop_us.store(drop_us, Relaxed);
    report::note(format!("drop: {}", drop_by.describe()));
    match &drop_by {
        DropBy::Loadgen { .. } => ctl_tx.send_modify(|c| c.drop_gen += 1),
        DropBy::Pid(p, s) => {
            // SAFETY: kill(2) with a pid and signal number; no memory involved.
            if unsafe { libc::kill(*p, s.number()) } != 0 {
                bail!("sending {} to {p}: {}", s.name(), std::io::Error::last_os_error());
            }
        }
        DropBy::Command(cmd) => {
            let code = shell(cmd, Duration::from_secs(60)).await?;
            if code != 0 {
                bail!("--kill-cmd `{cmd}` exited with status {code}");
            }
        }
    }
    let drop_done_us = util::now_us();
    let restart = args.restart_cmd.clone().map(|cmd| {
        let delay = args.restart_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let start = util::now_us();
            report::note(format!("restart: `{cmd}`"));
            let r = shell(&cmd, Duration::from_secs(120)).await;
            (start, util::now_us(), r.map_err(|e| format!("{e:#}")))
        })
    });

    // Recovery: until every client that lost its connection is back (a client whose connection
    // survived, on a gateway that was not killed, does not hold this up).
    let recover_end = Instant::now() + args.recover_timeout;
    let all_back = loop {
        let since_drop = Duration::from_micros(util::now_us().saturating_sub(drop_done_us));
        let (dropped, back) = (c.dropped.load(Relaxed), c.back.load(Relaxed));
        if since_drop >= Duration::from_secs(1) && dropped > 0 && back >= dropped {
            break true;
        }
        if Instant::now() >= recover_end {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if all_back {
        report::note(format!("every dropped client is back; sending {} more", fmt_duration(args.after)));
    } else {
        report::note(format!(
            "not every dropped client came back within {} ({} of {})",
            fmt_duration(args.recover_timeout),
            c.back.load(Relaxed),
            c.dropped.load(Relaxed)
        ));
    }
    *phase.lock().unwrap() = "after";
    tokio::time::sleep(args.after).await;

    // Stop sending; wait for the last ticks and deliveries.
    *phase.lock().unwrap() = "grace";
    ctl_tx.send_modify(|c| c.sending = Sending::Stop);
    let stop_us = util::now_us();
    let grace_end = Instant::now() + args.grace;
    let mut settled = false;
    while Instant::now() < grace_end {
        let answered = c.acked.load(Relaxed) + c.failed.load(Relaxed);
        if answered >= c.issued.load(Relaxed) && c.delivered.load(Relaxed) >= c.acked.load(Relaxed) {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A little longer, to catch late duplicates.
    tokio::time::sleep(Duration::from_millis(if settled { 500 } else { 0 })).await;
    ctl_tx.send_modify(|c| c.stop = true);
    let end_us = util::now_us();
    let mut client_outs = session::collect(client_handles).await?;
    let mut sender_outs = session::collect(sender_handles).await?;
    progress.stop().await;
    let cpu = crate::procfs::cpu_seconds(None).unwrap_or(0.0);
    let restart = match restart {
        Some(h) => Some(h.await?),
        None => None,
    };
    let metrics_after = scrape::scrape_all(&args.gw.metrics_urls).await;

    // Figures.
    let all: Vec<&session::Out> = client_outs.iter().chain(&sender_outs).collect();
    let rec_clients = recovery(drop_us, client_outs.iter().map(|o| (o.dropped_us, o.back_synced_us)));
    let rec_senders = recovery(drop_us, sender_outs.iter().map(|o| (o.dropped_us, o.back_synced_us)));
    let (mut h_detect, mut h_hello, mut h_back) = (hist::new(), hist::new(), hist::new());
    let mut attempts_after = 0u64;
    let mut max_attempts = 0u64;
    for o in &all {
        if let Some(d) = o.dropped_us {
            hist::record(&mut h_detect, d.saturating_sub(drop_us));
            // Attempts after the loss: failed ones and the connections that reached hello.
            let a = o.failures.iter().filter(|(t, _)| *t >= d).count() as u64
                + o.conns.iter().filter(|r| r.attempt_us >= d).count() as u64;
            attempts_after += a;
            max_attempts = max_attempts.max(a);
        }
        if let Some(h) = o.back_hello_us {
            hist::record(&mut h_hello, h.saturating_sub(drop_us));
        }
        if let Some(b) = o.back_synced_us {
            hist::record(&mut h_back, b.saturating_sub(drop_us));
        }
    }
    let not_dropped = |outs: &[session::Out]| outs.iter().filter(|o| o.dropped_us.is_none()).count() as u64;
    let (clients_not_dropped, senders_not_dropped) = (not_dropped(&client_outs), not_dropped(&sender_outs));
    let failures_after = session::failures_between(all.iter().copied(), drop_us, u64::MAX);
    let failures_before = session::failures_between(all.iter().copied(), 0, drop_us);
    let losses_before = session::losses_between(all.iter().copied(), 0, drop_us);
    let losses_at_drop = session::losses_between(all.iter().copied(), drop_us, u64::MAX);
    let ticks: Vec<Vec<u64>> = sender_outs.iter().map(|o| o.ticks.clone()).collect();
    let (backlog_n, caught_up_us) = backlog(drop_us, &ticks, client_outs.iter().flat_map(|o| o.late.iter().copied()));
    let (mut h_sent, mut h_deliver) = (hist::new(), hist::new());
    for o in &all {
        hist::merge(&mut h_sent, &o.h_sent);
        hist::merge(&mut h_deliver, &o.h_deliver);
    }
    let resent: u64 = sender_outs.iter().map(|o| o.resent).sum();
    let retries = session::sum_maps(sender_outs.iter().map(|o| &o.retries));
    let errors = session::sum_maps(all.iter().map(|o| &o.errors));
    let reconnect_frames: u64 = all.iter().map(|o| o.reconnect_frames).sum();
    let receipts: u64 = sender_outs.iter().map(|o| o.receipts).sum();
    let delivered: u64 = client_outs.iter().map(|o| o.h_deliver.len()).sum();
    let drained: u64 = client_outs.iter().map(|o| o.drained_after_drop).sum();
    drop(all);
    let check = session::check(spread, &mut sender_outs, &mut client_outs);
    let tl = timeline.lock().unwrap().clone();

    let violations = check.violations();
    let mut problems = Vec::new();
    if rec_clients.dropped == 0 {
        problems.push("no client connection was dropped".to_owned());
    }
    if rec_clients.back < rec_clients.dropped || rec_senders.back < rec_senders.dropped {
        problems.push(format!(
            "{} dropped clients and {} dropped senders not back within {}",
            rec_clients.dropped - rec_clients.back,
            rec_senders.dropped - rec_senders.back,
            fmt_duration(args.recover_timeout)
        ));
    }
    if check.failed + check.unanswered > 0 {
        problems.push(format!("{} sends failed, {} unanswered", check.failed, check.unanswered));
    }
    if !losses_before.is_empty() {
        problems.push(format!("connections lost before the drop: {}", session::list(&losses_before)));
    }
    if !errors.is_empty() {
        problems.push(format!("errors received: {}", session::list(&errors)));
    }
    if let Some((_, _, r)) = &restart {
        match r {
            Ok(0) => {}
            Ok(code) => problems.push(format!("--restart-cmd exited with status {code}")),
            Err(e) => problems.push(format!("--restart-cmd: {e}")),
        }
    }
    let verdict = if violations > 0 {
        format!("FAIL: ledger violations ({violations})")
    } else if !problems.is_empty() {
        format!("ERRORS: {}", problems.join("; "))
    } else {
        "PASS: every dropped client back; every acknowledged message shown exactly once, in order".into()
    };
    let exit = if violations > 0 {
        1
    } else if !problems.is_empty() {
        3
    } else {
        0
    };

    let secs = |us: Option<u64>| us.map(|u| u as f64 / 1e6);
    let fmt_s = |us: Option<u64>| us.map(|u| format!("{:.2} s", u as f64 / 1e6)).unwrap_or_else(|| "–".into());
    let drop_at_s = drop_us.saturating_sub(go_us) as f64 / 1e6;
    let b = &args.backoff;
    let backoff_desc = format!(
        "backoff base {} cap {} jitter {}",
        fmt_duration(b.backoff_base),
        fmt_duration(b.backoff_cap),
        b.backoff_jitter
    );
    let config = json!({
        "urls": args.gw.urls,
        "sender_urls": if args.sender_urls.is_empty() { json!(args.gw.urls) } else { json!(args.sender_urls) },
        "metrics_urls": args.gw.metrics_urls,
        "clients": n,
        "senders": s_n,
        "rate_per_sender": args.rate,
        "connect_rate": args.connect_rate,
        "resume": args.resume.name(),
        "before_s": args.before.as_secs_f64(),
        "recover_timeout_s": args.recover_timeout.as_secs_f64(),
        "after_s": args.after.as_secs_f64(),
        "grace_s": args.grace.as_secs_f64(),
        "drop": drop_by.describe(),
        "kill_cmd": args.kill_cmd,
        "gateway_pid": args.gateway_pid,
        "kill_signal": args.gateway_pid.map(|_| args.kill_signal.name()),
        "restart_cmd": args.restart_cmd,
        "restart_delay_s": args.restart_delay.as_secs_f64(),
        "drop_senders": args.drop_senders,
        "backoff": {
            "base_ms": b.backoff_base.as_millis() as u64,
            "cap_ms": b.backoff_cap.as_millis() as u64,
            "jitter": b.backoff_jitter,
            "formula": "n-th consecutive attempt waits d·(1 − jitter·u), d = min(cap, base·2^(n−1)), u uniform in [0,1)",
        },
        "body_size": args.client.body_size,
        "ack_every": args.client.ack_every,
        "ack_interval_ms": args.client.ack_interval.as_millis() as u64,
        "ping_interval_ms": args.client.ping_interval.as_millis() as u64,
        "connect_timeout_ms": args.client.connect_timeout.as_millis() as u64,
        "user_prefix": prefix,
        "source_ip_base": args.gw.source_ip_base.to_string(),
        "source_ips": args.gw.source_ips,
        "threads": args.run.threads(),
    });
    let recovery_json =
        |r: &Recovery| json!({"dropped": r.dropped, "back": r.back, "all_back_after_s": secs(r.all_back_us)});
    let results = json!({
        "verdict": verdict,
        "drop_at_s": drop_at_s,
        "drop_action_s": (drop_done_us - drop_us) as f64 / 1e6,
        "restart": restart.as_ref().map(|(a, z, r)| json!({
            "started_after_drop_s": a.saturating_sub(drop_us) as f64 / 1e6,
            "returned_after_drop_s": z.saturating_sub(drop_us) as f64 / 1e6,
            "exit_status": r.as_ref().ok(),
            "error": r.as_ref().err(),
        })),
        "clients": recovery_json(&rec_clients),
        "senders": recovery_json(&rec_senders),
        "not_dropped": {"clients": clients_not_dropped, "senders": senders_not_dropped},
        "drop_to_detected": hist::summary(&h_detect),
        "drop_to_reconnected": hist::summary(&h_hello),
        "drop_to_back_synced": hist::summary(&h_back),
        "reconnect_attempts_after_drop": attempts_after,
        "most_attempts_by_one_client": max_attempts,
        "attempt_failures_after_drop": failures_after,
        "attempt_failures_before_drop": failures_before,
        "connections_lost_at_drop": losses_at_drop,
        "connections_lost_before_drop": losses_before,
        "reconnect_frames": reconnect_frames,
        "backlog": {
            "drained_from_inboxes_after_reconnect": drained,
            "acknowledged_before_drop": acked_before_drop,
            "acknowledged_before_drop_delivered_after": backlog_n,
            "last_of_those_after_s": secs(caught_up_us),
        },
        "sends": {
            "issued": check.issued,
            "acknowledged": check.acknowledged,
            "resent_after_reconnect": resent,
            "dup_ticks": check.dup_flagged_ticks,
            "retries_by_code": retries,
            "send_to_sent": hist::summary(&h_sent),
            "stopped_at_s": stop_us.saturating_sub(go_us) as f64 / 1e6,
        },
        "deliveries": {
            "delivered": delivered,
            "send_to_deliver": hist::summary(&h_deliver),
            "receipts_received_by_senders": receipts,
        },
        "server_duplicates": {
            "redelivered_same_seq": check.redelivered,
            "stored_twice_new_seq": check.duplicates,
        },
        "ledger": check,
        "violations": violations,
        "errors": errors,
        "problems": problems,
        "settled": settled,
        "run_seconds": end_us.saturating_sub(go_us) as f64 / 1e6,
        "loadgen_cpu_seconds": cpu,
        "timeline": tl.iter().map(|r| json!({
            "t_s": r[0] as f64 / 1e3, "connected": r[1], "synced": r[2], "acknowledged": r[3],
            "delivered": r[4], "attempts": r[5], "attempt_failures": r[6],
        })).collect::<Vec<Value>>(),
        "gateway": scrape::gateway_report(&args.gw.metrics_urls, &metrics_before, &metrics_after),
    });

    let ledger_line = format!(
        "lost {} · reordered {} · seq regressions {} · misdelivered {} · phantom {} · failed {} · unanswered {}",
        check.lost,
        check.reordered,
        check.seq_regressions,
        check.misdelivered,
        check.phantom,
        check.failed,
        check.unanswered
    );
    let dup_line = format!(
        "delivered again by the server: {} with a seq already held (resent after the reconnect, allowed), {} stored twice under a new seq (violation); the app drops both",
        check.redelivered, check.duplicates
    );
    let back_line = format!(
        "{}/{} dropped clients back (synced) — all after {}{}",
        rec_clients.back,
        rec_clients.dropped,
        fmt_s(rec_clients.all_back_us),
        if rec_senders.dropped > 0 {
            format!(
                "; senders {}/{} back after {}",
                rec_senders.back,
                rec_senders.dropped,
                fmt_s(rec_senders.all_back_us)
            )
        } else {
            String::new()
        }
    );
    let human = format!(
        "storm: {n} clients + {s_n} senders ({} msg/s each, resume {}), {backoff_desc}\n\
         drop at t={drop_at_s:.1}s: {}\n\
         {back_line}; not dropped: {clients_not_dropped} clients, {senders_not_dropped} senders\n\
         reconnect attempts after the drop {attempts_after} (most by one client {max_attempts}); failures: {}\n\
         drop → reconnected   {}\n\
         drop → back (synced) {}\n\
         backlog: {drained} messages drained from the inboxes on reconnect; {backlog_n} acknowledged before the drop arrived after it (last after {})\n\
         sends: {} acknowledged, {resent} re-sent after a reconnect ({} were already stored), retries: {}\n\
         send→sent    {}\n\
         send→deliver {}\n\
         {dup_line}\n\
         ledger: {ledger_line}\n\
         {verdict}\n",
        fmt_rate(args.rate),
        args.resume.name(),
        drop_by.describe(),
        session::list(&failures_after),
        hist::line(&h_hello),
        hist::line(&h_back),
        fmt_s(caught_up_us),
        check.acknowledged,
        check.dup_flagged_ticks,
        session::list(&retries),
        hist::line(&h_sent),
        hist::line(&h_deliver),
    );
    let mut md = format!(
        "{n} clients connected and receiving while {s_n} senders sent {} msg/s each (open loop); after {} every connection was dropped ({}); clients reconnect with jittered exponential backoff ({backoff_desc}), resume by `{}`, and drain.\n\n",
        fmt_rate(args.rate),
        fmt_duration(args.before),
        drop_by.describe(),
        args.resume.name()
    );
    md.push_str("| figure | value |\n|---|---|\n");
    md.push_str(&format!("| clients back (connected + synced) | {back_line} |\n"));
    md.push_str(&format!("| time until all back | **{}** |\n", fmt_s(rec_clients.all_back_us)));
    md.push_str(&format!(
        "| reconnect attempts after the drop | {attempts_after} (most by one client: {max_attempts}); failures: {} |\n",
        session::list(&failures_after)
    ));
    md.push_str(&format!("| connections lost at the drop | {} |\n", session::list(&losses_at_drop)));
    md.push_str(&format!(
        "| backlog | {drained} messages drained from the inboxes on reconnect; {backlog_n} acknowledged before the drop arrived after it (the last after {}) |\n",
        fmt_s(caught_up_us)
    ));
    md.push_str(&format!(
        "| sends | {} acknowledged, {resent} re-sent after a reconnect ({} already stored), retries: {} |\n",
        check.acknowledged,
        check.dup_flagged_ticks,
        session::list(&retries)
    ));
    md.push_str(&format!("| server duplicates | {dup_line} |\n"));
    md.push_str(&format!("| ledger | {ledger_line} |\n"));
    for p in &problems {
        md.push_str(&format!("| problem | {p} |\n"));
    }
    md.push_str(&format!("| verdict | {verdict} |\n\n"));
    md.push_str(hist::MD_HEADER);
    md.push_str(&hist::md_row("drop → loss detected", &h_detect));
    md.push_str(&hist::md_row("drop → reconnected (hello)", &h_hello));
    md.push_str(&hist::md_row("drop → back (synced)", &h_back));
    md.push_str(&hist::md_row("send → sent", &h_sent));
    md.push_str(&hist::md_row("send → deliver", &h_deliver));
    md.push_str(
        "\nSend latencies run from the scheduled send time, so sends due while a sender was down count their wait. \
         The ledger drops what a client drops (items whose `seq` it holds; chat messages whose sender and id it holds) \
         and checks what is left, what the app would show: every acknowledged message exactly once, in per-sender \
         order, at its recipient only. Server duplicates are counted before that filter.\n",
    );
    let plot = report::Plot {
        title: format!("storm: {n} clients, {}", drop_by.describe()),
        series: vec![
            ("drop → reconnected", &h_hello),
            ("drop → back (synced)", &h_back),
            ("send → sent", &h_sent),
            ("send → deliver", &h_deliver),
        ],
    };
    report::finish_plot(
        args.run.out.as_deref(),
        &Output { scenario: "storm", started, config, results, markdown: md, human },
        Some(&plot),
    )?;
    Ok(exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_joins_drops_and_returns() {
        let drop = 1_000_000;
        // Not dropped, dropped and back after 2 s, dropped and back after 0.5 s.
        let r = recovery(
            drop,
            [(None, None), (Some(drop + 10), Some(drop + 2_000_000)), (Some(drop), Some(drop + 500_000))].into_iter(),
        );
        assert_eq!(r, Recovery { dropped: 2, back: 2, all_back_us: Some(2_000_000) });
        let r = recovery(drop, [(Some(drop), Some(drop + 5)), (Some(drop), None)].into_iter());
        assert_eq!(r, Recovery { dropped: 2, back: 1, all_back_us: None });
        assert_eq!(recovery(drop, std::iter::empty()).all_back_us, None);
    }

    #[test]
    fn backlog_counts_what_was_acknowledged_before_the_drop() {
        let drop = 10_000;
        // Sender 0: message 0 ticked before the drop, 1 after, 2 never.
        let ticks = vec![vec![9_000, 11_000, 0]];
        let late = [(0u32, 0u64, 12_000u64), (0, 1, 13_000), (0, 2, 14_000), (5, 0, 15_000)];
        assert_eq!(backlog(drop, &ticks, late.into_iter()), (1, Some(2_000)));
        assert_eq!(backlog(drop, &ticks, std::iter::empty()), (0, None));
    }
}
