//! `offline`: messages pile up in the inboxes of recipients who are offline, then the recipients
//! come back — all at once or at a rate — and drain them.
//!
//! 1. Register: every recipient connects once and leaves (so the server knows its device and
//!    keeps its inbox for it, as for any real user who has been online before).
//! 2. Fill: S senders (online throughout) send N messages each; message k of sender s goes to
//!    recipient (s + k) mod R. Each sender keeps one message awaiting its `sent` tick (retrying
//!    `rate_limited`/`unavailable` with the same id), so its order is kept. The fill ends when
//!    every send is answered.
//! 3. Drain: the recipients connect (resuming from their stored cursors), receive their inbox,
//!    acknowledge as they go (cumulative `ack`, as PROTOCOL.md asks), and stamp the moment they
//!    hold every message acknowledged to them ("empty").
//! 4. Recheck: after the recipients closed, each reconnects once more; nothing may come again
//!    (their acks were recorded as cursors).
//!
//! Reported: the drain rate (messages delivered / time from the first connect to the last
//! delivery), time to empty per recipient and overall, connect → `synced`, and the ledger.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::bail;
use futures::SinkExt;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, GatewayArgs, Target};
use crate::hist;
use crate::report::{self, Output, Progress};
use crate::scrape;
use crate::session::{self, Backoff, ClientArgs, Control, Env, Role, SendPlan, Sending, Spec, Spread};
use crate::util::{self, fmt_duration, fmt_rate, parse_duration};
use crate::RunArgs;

pub const HELP: &str = "\
Phases: register (each recipient connects once and leaves, so its device is known), fill (each
sender keeps one message awaiting its `sent` tick; rate_limited/unavailable/internal answers
are retried with the same id, keeping the order), drain (recipients connect from their stored
cursors and ack as they go), recheck (each recipient reconnects once more: nothing may come
again).

The ledger drops what a client drops (items whose seq it holds, chat messages whose sender and
id it holds) and checks what is left: every message acknowledged by `sent` delivered exactly
once, in per-sender order, to its recipient only. Exit status 1 on a violation (lost, stored
twice, reordered, seq regression, misdelivered); 3 when sends failed or went unanswered,
recipients did not empty within --drain-timeout, connections were lost, or the recheck got
anything again.";

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub gw: GatewayArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Recipients: offline while their messages pile up, then one connection each.
    #[arg(long, default_value_t = 100)]
    pub recipients: usize,
    /// Senders, one connection each, online throughout.
    #[arg(long, default_value_t = 50)]
    pub senders: usize,
    /// Messages each sender sends. Message k of sender s goes to recipient (s + k) mod R, so
    /// each inbox gets senders × messages / recipients of them (± 1).
    #[arg(long, default_value_t = 1000)]
    pub messages: u64,
    /// Recipients connecting per second for the drain; 0: all at once.
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Connections per second while setting up (recipients registering, senders connecting).
    #[arg(long, default_value_t = 500.0)]
    pub setup_rate: f64,
    /// Longest wait for every send to be answered.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub fill_timeout: Duration,
    /// Longest wait for every recipient to hold all its messages.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Skip the recheck (each recipient reconnecting once more after the drain must get
    /// nothing again).
    #[arg(long)]
    pub no_recheck: bool,
    /// Pause between the recipients closing and the recheck (the gateway writes a cursor when
    /// its connection closes).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub recheck_after: Duration,
}

/// Connects each user once and leaves politely, acknowledging whatever was waiting (a reused
/// `--user-prefix`). Returns how many items were waiting.
async fn register(
    targets: &[Target],
    gw: &GatewayArgs,
    tokens: &[String],
    rate: f64,
    timeout: Duration,
) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let at = start + Duration::from_secs_f64(i as f64 / rate.max(1.0));
        let target = targets[i % targets.len()].clone();
        let token = token.clone();
        let source = util::source_ip(gw.source_ip_base, gw.source_ips, i as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let o = client::open(&target, &token, source, client::ws_config(64 * 1024), timeout).await?;
            let (n, last) = count_items(&o.early);
            let mut ws = o.ws;
            if last > 0 {
                let _ = ws.send(Message::Text(client::ack_frame(last).into())).await;
            }
            let close = CloseFrame { code: CloseCode::Normal, reason: "loadgen registered".into() };
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(close))).await;
            Ok::<u64, client::Fail>(n)
        }));
    }
    let mut waiting = 0;
    let mut fails: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for t in tasks {
        match t.await? {
            Ok(n) => waiting += n,
            Err(f) => fails.entry(f.cause).or_insert((0, f.detail)).0 += 1,
        }
    }
    if !fails.is_empty() {
        let list: Vec<String> = fails.iter().map(|(c, (n, d))| format!("{c} ×{n} (e.g. {d})")).collect();
        bail!("recipients could not register: {}", list.join("; "));
    }
    Ok(waiting)
}

/// `msg` frames among frames received before `synced`, and the highest `seq` among them.
fn count_items(frames: &[String]) -> (u64, u64) {
    let mut n = 0;
    let mut last = 0;
    for t in frames {
        if let Ok(f) = client::Frame::parse(t) {
            if f.t == "msg" {
                n += 1;
                last = last.max(f.seq.unwrap_or(0));
            }
        }
    }
    (n, last)
}

/// Reconnects each recipient once (no `since`: from its stored cursor) and counts what the
/// server sends again before `synced`.
async fn recheck(
    targets: &[Target],
    gw: &GatewayArgs,
    tokens: &[String],
    rate: f64,
    timeout: Duration,
) -> (u64, BTreeMap<String, u64>) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let at = start + Duration::from_secs_f64(i as f64 / rate.max(1.0));
        let target = targets[i % targets.len()].clone();
        let token = token.clone();
        let source = util::source_ip(gw.source_ip_base, gw.source_ips, i as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let o = client::open(&target, &token, source, client::ws_config(64 * 1024), timeout).await?;
            let (n, _) = count_items(&o.early);
            let mut ws = o.ws;
            let close = CloseFrame { code: CloseCode::Normal, reason: "loadgen recheck".into() };
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(close))).await;
            Ok::<u64, client::Fail>(n)
        }));
    }
    let mut again = 0;
    let mut fails = BTreeMap::new();
    for t in tasks {
        match t.await {
            Ok(Ok(n)) => again += n,
            Ok(Err(f)) => *fails.entry(f.cause).or_default() += 1,
            Err(e) => *fails.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    (again, fails)
}

/// Waits until `done()` or `timeout`; true when done.
async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let started = SystemTime::now();
    let (r_n, s_n) = (args.recipients, args.senders);
    if r_n == 0 || s_n == 0 || args.messages == 0 {
        bail!("--recipients, --senders and --messages must be at least 1");
    }
    if r_n > u32::MAX as usize || s_n > u32::MAX as usize {
        bail!("too many users");
    }
    if args.gw.secret.len() < 16 {
        bail!("the token secret (--secret or JWT_SECRET) must be at least 16 bytes, like the gateway's");
    }
    if args.connect_rate < 0.0 || args.setup_rate <= 0.0 {
        bail!("--connect-rate must be ≥ 0 and --setup-rate > 0");
    }
    let nofile = util::raise_nofile();
    if nofile < (r_n + s_n) as u64 + 64 {
        bail!("RLIMIT_NOFILE is {nofile}: too low for {} connections", r_n + s_n);
    }
    let prefix = args.client.user_prefix.clone().unwrap_or_else(|| format!("lg{}", util::run_tag()));
    let senders: Vec<String> = (0..s_n).map(|i| Env::sender_name(&prefix, i)).collect();
    let recipients: Vec<String> = (0..r_n).map(|i| Env::recipient_name(&prefix, i)).collect();
    if let Some(bad) = senders.iter().chain(&recipients).find(|n| protocol::UserId::parse(n).is_err()) {
        bail!("user id {bad:?} is not valid (ids: 1–64 bytes of A-Z a-z 0-9 _ -)");
    }
    let keys = protocol::TokenKeys::hs256(args.gw.secret.as_bytes(), 0);
    let mint = |n: &String| keys.mint(n, Some("lg"), 24 * 3600);
    let sender_tokens: Vec<String> = senders.iter().map(mint).collect();
    let recipient_tokens: Vec<String> = recipients.iter().map(mint).collect();
    let targets = Arc::new(client::resolve_all(&args.gw.urls, args.gw.ca_file.as_deref()).await?);
    let spread = Spread { senders: s_n, recipients: r_n };
    let total = s_n as u64 * args.messages;
    let depths: Vec<u64> = (0..r_n).map(|r| (0..s_n).map(|s| spread.count_to(s, args.messages, r)).sum()).collect();
    let env = Arc::new(Env {
        prefix: prefix.clone(),
        spread,
        recipient_names: recipients.clone(),
        body_size: args.client.body_size,
        ack_every: args.client.ack_every.max(1),
        ack_interval: args.client.ack_interval,
        ping_interval: args.client.ping_interval,
        connect_timeout: args.client.connect_timeout,
        backoff: Backoff::default(),
        counters: Default::default(),
        drop_us: AtomicU64::new(0),
        go_us: AtomicU64::new(0),
        expect: (0..r_n).map(|_| AtomicU64::new(0)).collect(),
    });
    let metrics_before = scrape::scrape_all(&args.gw.metrics_urls).await;

    // 1. Register the recipients, then they are offline.
    report::note(format!("registering {r_n} recipients (connect once, leave) on {}", args.gw.urls.join(", ")));
    let leftover =
        register(&targets, &args.gw, &recipient_tokens, args.setup_rate, args.client.connect_timeout).await?;
    if leftover > 0 {
        report::note(format!("{leftover} items were already waiting for the recipients (reused prefix); acknowledged"));
    }

    // 2. Senders connect.
    let (ctl_tx, ctl_rx) = watch::channel(Control::default());
    let setup_start = Instant::now();
    let mut sender_handles = Vec::new();
    for (s, token) in sender_tokens.iter().enumerate() {
        let spec = Spec {
            index: s,
            token: token.clone(),
            role: Role::Sender(SendPlan { sender: s, count: Some(args.messages), interval_us: None, phase_us: 0.0 }),
            since: true,
            droppable: false,
            targets: targets.clone(),
            source_ip_base: args.gw.source_ip_base,
            source_ips: args.gw.source_ips,
        };
        let at = setup_start + Duration::from_secs_f64(s as f64 / args.setup_rate);
        sender_handles.push(session::spawn_at(env.clone(), spec, ctl_rx.clone(), at));
    }
    let c = &env.counters;
    let setup_timeout = Duration::from_secs_f64(s_n as f64 / args.setup_rate) + args.client.connect_timeout * 2;
    if !wait_until(setup_timeout, || c.synced.load(Relaxed) >= s_n as u64).await {
        let _ = ctl_tx.send(Control { stop: true, ..Control::default() });
        let outs = session::collect(sender_handles).await?;
        bail!(
            "only {} of {s_n} senders connected within {}: {}",
            c.synced.load(Relaxed),
            fmt_duration(setup_timeout),
            session::list(&session::failures_between(&outs, 0, u64::MAX))
        );
    }

    // The progress line and a one-second timeline.
    let phase = Arc::new(Mutex::new("fill"));
    let drain_start_us = Arc::new(AtomicU64::new(0));
    let timeline: Arc<Mutex<Vec<[u64; 5]>>> = Arc::default();
    let progress = {
        let (env, phase, timeline, drain_start_us) =
            (env.clone(), phase.clone(), timeline.clone(), drain_start_us.clone());
        let mut last = (0u64, 0u64);
        Progress::start(move |el| {
            let c = &env.counters;
            let (acked, delivered) = (c.acked.load(Relaxed), c.delivered.load(Relaxed));
            let ds = drain_start_us.load(Relaxed);
            if ds != 0 {
                let t = util::now_us().saturating_sub(ds) / 1000;
                timeline.lock().unwrap().push([
                    t,
                    delivered,
                    c.synced.load(Relaxed).saturating_sub(s_n as u64),
                    c.empty.load(Relaxed),
                    c.redelivered.load(Relaxed),
                ]);
            }
            let line = format!(
                "offline t={:>5.1}s {} sent {}/{total} ({}/s) errors {} retries {} · delivered {} ({}/s) recipients synced {} empty {}/{r_n}",
                el.as_secs_f64(),
                phase.lock().unwrap(),
                acked,
                fmt_rate(acked.saturating_sub(last.0) as f64),
                c.failed.load(Relaxed),
                c.retried.load(Relaxed),
                delivered,
                fmt_rate(delivered.saturating_sub(last.1) as f64),
                c.synced.load(Relaxed).saturating_sub(s_n as u64),
                c.empty.load(Relaxed),
            );
            last = (acked, delivered);
            line
        })
    };

    // 3. Fill.
    report::note(format!(
        "fill: {s_n} senders × {} messages = {total} to {r_n} offline recipients (inbox depth {}–{})",
        args.messages,
        depths.iter().min().unwrap_or(&0),
        depths.iter().max().unwrap_or(&0)
    ));
    let fill_start_us = util::now_us();
    env.go_us.store(fill_start_us, Relaxed);
    ctl_tx.send_modify(|c| c.sending = Sending::Go);
    let filled = wait_until(args.fill_timeout, || c.acked.load(Relaxed) + c.failed.load(Relaxed) >= total).await;
    let fill_end_us = util::now_us();
    ctl_tx.send_modify(|c| c.sending = Sending::Stop);
    let acked_fill = c.acked.load(Relaxed);
    if !filled {
        report::note(format!(
            "fill timed out after {}: {} of {total} sends answered",
            fmt_duration(args.fill_timeout),
            acked_fill + c.failed.load(Relaxed)
        ));
    }

    // 4. Drain.
    *phase.lock().unwrap() = "drain";
    report::note(format!(
        "drain: {r_n} recipients connect {}",
        if args.connect_rate > 0.0 { format!("at {}/s", fmt_rate(args.connect_rate)) } else { "all at once".into() }
    ));
    let drain_start = Instant::now();
    drain_start_us.store(util::now_us(), Relaxed);
    let drain_t0 = drain_start_us.load(Relaxed);
    let mut recipient_handles = Vec::new();
    for (r, token) in recipient_tokens.iter().enumerate() {
        let spec = Spec {
            index: s_n + r,
            token: token.clone(),
            role: Role::Recipient { index: r, track_empty: true },
            since: true,
            droppable: false,
            targets: targets.clone(),
            source_ip_base: args.gw.source_ip_base,
            source_ips: args.gw.source_ips,
        };
        let at = if args.connect_rate > 0.0 {
            drain_start + Duration::from_secs_f64(r as f64 / args.connect_rate)
        } else {
            drain_start
        };
        recipient_handles.push(session::spawn_at(env.clone(), spec, ctl_rx.clone(), at));
    }
    let drained = wait_until(args.drain_timeout, || {
        c.empty.load(Relaxed) >= r_n as u64 && c.synced.load(Relaxed) >= (r_n + s_n) as u64
    })
    .await;
    if !drained {
        report::note(format!(
            "drain timed out after {}: {} of {r_n} recipients hold all their messages",
            fmt_duration(args.drain_timeout),
            c.empty.load(Relaxed)
        ));
    }
    // A moment more, to catch late duplicates.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let drain_end_us = util::now_us();
    ctl_tx.send_modify(|c| c.stop = true);
    let mut recipient_outs = session::collect(recipient_handles).await?;
    let mut sender_outs = session::collect(sender_handles).await?;
    progress.stop().await;
    let cpu = crate::procfs::cpu_seconds(None).unwrap_or(0.0);

    // 5. Recheck.
    let recheck = if args.no_recheck {
        None
    } else {
        tokio::time::sleep(args.recheck_after).await;
        report::note(format!("recheck: {r_n} recipients reconnect from their cursors; nothing may come again"));
        Some(recheck(&targets, &args.gw, &recipient_tokens, args.setup_rate, args.client.connect_timeout).await)
    };
    let metrics_after = scrape::scrape_all(&args.gw.metrics_urls).await;

    // Figures.
    let mut h_fill_sent = hist::new();
    for o in &sender_outs {
        hist::merge(&mut h_fill_sent, &o.h_sent);
    }
    let (mut h_hello, mut h_synced, mut h_empty) = (hist::new(), hist::new(), hist::new());
    let mut delivered = 0u64;
    let (mut last_delivery, mut last_empty) = (0u64, 0u64);
    let mut not_empty = 0u64;
    for o in &recipient_outs {
        let first = o.conns.first();
        if let Some(h) = first.map(|r| r.hello_us).filter(|&h| h > 0) {
            hist::record(&mut h_hello, h.saturating_sub(o.start_us));
        }
        if let Some(s) = o.conns.iter().map(|r| r.synced_us).find(|&s| s > 0) {
            hist::record(&mut h_synced, s.saturating_sub(o.start_us));
        }
        match o.empty_us {
            Some(e) => {
                hist::record(&mut h_empty, e.saturating_sub(o.start_us));
                last_empty = last_empty.max(e);
            }
            None => not_empty += 1,
        }
        delivered += o.h_deliver.len();
        last_delivery = last_delivery.max(o.last_delivery_us);
    }
    let drain_span_s = last_delivery.saturating_sub(drain_t0) as f64 / 1e6;
    let drain_rate = if drain_span_s > 0.0 { delivered as f64 / drain_span_s } else { 0.0 };
    let all_empty_s = (not_empty == 0).then(|| last_empty.saturating_sub(drain_t0) as f64 / 1e6);
    let fill_s = (fill_end_us - fill_start_us) as f64 / 1e6;
    let tl = timeline.lock().unwrap().clone();
    let peak = peak_rate(&tl);

    let retries = session::sum_maps(sender_outs.iter().map(|o| &o.retries));
    let errors = session::sum_maps(sender_outs.iter().chain(&recipient_outs).map(|o| &o.errors));
    let drain_failures = session::failures_between(&recipient_outs, 0, u64::MAX);
    let drain_losses = session::losses_between(&recipient_outs, 0, u64::MAX);
    let sender_losses = session::losses_between(&sender_outs, 0, u64::MAX);
    let receipts: u64 = sender_outs.iter().map(|o| o.receipts).sum();
    let check = session::check(spread, &mut sender_outs, &mut recipient_outs);

    let violations = check.violations();
    let mut problems = Vec::new();
    if check.failed + check.unanswered > 0 {
        problems.push(format!("{} sends failed, {} unanswered", check.failed, check.unanswered));
    }
    if not_empty > 0 {
        problems.push(format!("{not_empty} recipients did not receive all their messages within the drain timeout"));
    }
    if !drain_failures.is_empty() {
        problems.push(format!("recipient connection attempts failed: {}", session::list(&drain_failures)));
    }
    if !drain_losses.is_empty() {
        problems.push(format!("recipient connections lost during the drain: {}", session::list(&drain_losses)));
    }
    if !sender_losses.is_empty() {
        problems.push(format!("sender connections lost: {}", session::list(&sender_losses)));
    }
    if !errors.is_empty() {
        problems.push(format!("errors received: {}", session::list(&errors)));
    }
    if let Some((again, fails)) = &recheck {
        if *again > 0 {
            problems.push(format!("recheck: {again} items delivered again after they had been acknowledged"));
        }
        if !fails.is_empty() {
            problems.push(format!("recheck connections failed: {}", session::list(fails)));
        }
    }
    let verdict = if violations > 0 {
        format!("FAIL: ledger violations ({violations})")
    } else if !problems.is_empty() {
        format!("ERRORS: {}", problems.join("; "))
    } else {
        "PASS: every acknowledged message delivered exactly once, in order; nothing delivered again after the acks"
            .into()
    };
    let exit = if violations > 0 {
        1
    } else if !problems.is_empty() {
        3
    } else {
        0
    };

    let depth_min = *depths.iter().min().unwrap_or(&0);
    let depth_max = *depths.iter().max().unwrap_or(&0);
    let connect_mode = if args.connect_rate > 0.0 {
        format!("at {}/s", fmt_rate(args.connect_rate))
    } else {
        "all at once".to_owned()
    };
    let config = json!({
        "urls": args.gw.urls,
        "metrics_urls": args.gw.metrics_urls,
        "recipients": r_n,
        "senders": s_n,
        "messages_per_sender": args.messages,
        "inbox_depth": {"min": depth_min, "max": depth_max},
        "connect_rate": args.connect_rate,
        "setup_rate": args.setup_rate,
        "fill_timeout_s": args.fill_timeout.as_secs_f64(),
        "drain_timeout_s": args.drain_timeout.as_secs_f64(),
        "recheck": !args.no_recheck,
        "recheck_after_s": args.recheck_after.as_secs_f64(),
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
    let results = json!({
        "verdict": verdict,
        "fill": {
            "messages": total,
            "acknowledged": acked_fill,
            "seconds": fill_s,
            "sent_per_s": acked_fill as f64 / fill_s.max(1e-9),
            "retries_by_code": retries,
            "send_to_sent": hist::summary(&h_fill_sent),
            "completed": filled,
        },
        "drain": {
            "delivered": delivered,
            "seconds_to_last_delivery": drain_span_s,
            "delivered_per_s": drain_rate,
            "peak_one_second_per_s": peak,
            "all_empty_after_s": all_empty_s,
            "recipients_not_empty": not_empty,
            "connect_to_hello": hist::summary(&h_hello),
            "connect_to_synced": hist::summary(&h_synced),
            "connect_to_empty": hist::summary(&h_empty),
            "connection_failures": drain_failures,
            "connections_lost": drain_losses,
            "completed": drained,
            "seconds_until_stop": (drain_end_us - drain_t0) as f64 / 1e6,
        },
        "recheck": recheck.as_ref().map(|(again, fails)| json!({"items_delivered_again": again, "failures": fails})),
        "receipts_received_by_senders": receipts,
        "ledger": check,
        "violations": violations,
        "errors": errors,
        "sender_connections_lost": sender_losses,
        "problems": problems,
        "loadgen_cpu_seconds": cpu,
        "timeline_since_drain_start": tl.iter().map(|r| json!({"t_s": r[0] as f64 / 1e3, "delivered": r[1], "recipients_synced": r[2], "recipients_empty": r[3], "redelivered": r[4]})).collect::<Vec<_>>(),
        "gateway": scrape::gateway_report(&args.gw.metrics_urls, &metrics_before, &metrics_after),
    });

    let ledger_line = format!(
        "lost {} · stored twice {} · reordered {} · seq regressions {} · misdelivered {} · phantom {} · failed {} · unanswered {} (redelivered by seq, allowed: {})",
        check.lost,
        check.duplicates,
        check.reordered,
        check.seq_regressions,
        check.misdelivered,
        check.phantom,
        check.failed,
        check.unanswered,
        check.redelivered
    );
    let recheck_line = match &recheck {
        Some((again, fails)) => format!(
            "recheck: {r_n} recipients reconnected from their cursors: {again} items delivered again{}\n",
            if fails.is_empty() { String::new() } else { format!(", failures {}", session::list(fails)) }
        ),
        None => String::new(),
    };
    let human = format!(
        "offline: {r_n} recipients, inbox depth {depth_min}–{depth_max} ({total} messages from {s_n} senders), drain {connect_mode}\n\
         fill: {acked_fill} acknowledged in {fill_s:.1}s ({} msg/s); send→sent {}\n\
         drain: {delivered} delivered in {drain_span_s:.2}s → {} msg/s (peak second {}); all empty after {}\n\
         connect → synced {}\n\
         connect → empty  {}\n\
         {recheck_line}\
         ledger: {ledger_line}\n\
         {}\n",
        fmt_rate(acked_fill as f64 / fill_s.max(1e-9)),
        hist::line(&h_fill_sent),
        fmt_rate(drain_rate),
        peak.map(fmt_rate).unwrap_or_else(|| "–".into()),
        all_empty_s.map(|s| format!("{s:.2}s")).unwrap_or_else(|| "– (not all)".into()),
        hist::line(&h_synced),
        hist::line(&h_empty),
        verdict,
    );
    let mut md = format!(
        "{r_n} recipients offline while {s_n} senders sent {} messages each ({total}; inbox depth {depth_min}–{depth_max}), then the recipients connected {connect_mode} and drained, acknowledging as they went.\n\n",
        args.messages
    );
    md.push_str("| figure | value |\n|---|---|\n");
    md.push_str(&format!(
        "| fill (one send awaiting its tick per sender) | {acked_fill} in {fill_s:.1} s → {} msg/s |\n",
        fmt_rate(acked_fill as f64 / fill_s.max(1e-9))
    ));
    md.push_str(&format!(
        "| drain rate | {delivered} in {drain_span_s:.2} s → **{} msg/s** (peak second {}) |\n",
        fmt_rate(drain_rate),
        peak.map(fmt_rate).unwrap_or_else(|| "–".into())
    ));
    md.push_str(&format!(
        "| all recipients empty after | **{}** |\n",
        all_empty_s.map(|s| format!("{s:.2} s")).unwrap_or_else(|| format!("– ({not_empty} not empty)"))
    ));
    if let Some((again, _)) = &recheck {
        md.push_str(&format!("| recheck (reconnect from the cursor) | {again} items delivered again |\n"));
    }
    md.push_str(&format!("| ledger | {ledger_line} |\n"));
    for p in &problems {
        md.push_str(&format!("| problem | {p} |\n"));
    }
    md.push_str(&format!("| verdict | {verdict} |\n\n"));
    md.push_str("Per recipient, from the start of its connection attempt:\n\n");
    md.push_str(hist::MD_HEADER);
    md.push_str(&hist::md_row("connect → hello", &h_hello));
    md.push_str(&hist::md_row("connect → synced", &h_synced));
    md.push_str(&hist::md_row("connect → empty", &h_empty));
    md.push_str(&hist::md_row("fill: send → sent", &h_fill_sent));
    md.push_str(
        "\nThe ledger drops what a client drops (items whose `seq` it holds; chat messages whose sender and id it holds) \
         and checks what is left, what the app would show: every acknowledged message exactly once, in per-sender order, \
         at its recipient only.\n",
    );
    let plot = report::Plot {
        title: format!("offline: {r_n} recipients draining {depth_min}–{depth_max} messages each ({connect_mode})"),
        series: vec![
            ("connect → synced", &h_synced),
            ("connect → empty", &h_empty),
            ("fill: send → sent", &h_fill_sent),
        ],
    };
    report::finish_plot(
        args.run.out.as_deref(),
        &Output { scenario: "offline", started, config, results, markdown: md, human },
        Some(&plot),
    )?;
    Ok(exit)
}

/// The highest delivery rate between two consecutive rows of the timeline (about a second
/// apart; `[t_ms, delivered, …]`).
fn peak_rate(tl: &[[u64; 5]]) -> Option<f64> {
    tl.windows(2)
        .filter(|w| w[1][0] > w[0][0])
        .map(|w| w[1][1].saturating_sub(w[0][1]) as f64 * 1e3 / (w[1][0] - w[0][0]) as f64)
        .fold(None, |m, v| Some(m.map_or(v, |m: f64| m.max(v))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_of_timeline() {
        let tl = [[0, 0, 0, 0, 0], [1000, 500, 0, 0, 0], [2000, 2500, 0, 0, 0], [2500, 3000, 0, 0, 0]];
        assert_eq!(peak_rate(&tl), Some(2000.0));
        assert_eq!(peak_rate(&tl[..1]), None);
    }

    #[test]
    fn counts_waiting_items() {
        let frames = vec![
            r#"{"t":"msg","seq":4,"m":{"k":"chat"}}"#.to_owned(),
            r#"{"t":"conversations","convs":[]}"#.to_owned(),
            r#"{"t":"msg","seq":9,"m":{"k":"receipt"}}"#.to_owned(),
        ];
        assert_eq!(count_items(&frames), (2, 9));
        assert_eq!(count_items(&[]), (0, 0));
    }
}
