//! `group`: one group of G members (up to 1024), all online; one member posts M messages at a
//! fixed rate (open loop). Measures, per message, the time from the send to the *last* member
//! receiving it (what a group chat user waits for), each member delivery's latency, and the
//! fan-out rate (member deliveries per second) — and checks that every member got every message
//! exactly once and in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use futures::{SinkExt, StreamExt};
use protocol::TokenKeys;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, GatewayArgs, Ws};
use crate::hist::{self, Hist};
use crate::report::{self, Output};
use crate::util::{self, parse_duration};
use crate::RunArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub gw: GatewayArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Members of the group (the poster included), one connection each; at most 1024.
    #[arg(long, default_value_t = 1024)]
    pub members: usize,
    /// Messages the poster sends.
    #[arg(long, default_value_t = 200)]
    pub messages: usize,
    /// Messages per second (open loop: latency runs from the scheduled send time).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// After the last send, how long to wait for deliveries.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub body: usize,
}

/// What members saw, shared by their reader tasks.
struct Seen {
    /// Per message index: when the first and last member got it (µs on the run clock), and how
    /// many members did.
    per_msg: HashMap<usize, (u64, u64, usize)>,
    deliveries: Hist,
    duplicates: u64,
    reordered: u64,
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    if a.members < 2 || a.members > 1024 {
        bail!("--members must be 2 to 1024");
    }
    util::raise_nofile();
    let started = SystemTime::now();
    let targets = client::resolve_all(&a.gw.urls, a.gw.ca_file.as_deref()).await?;
    let keys = TokenKeys::hs256(a.gw.secret.as_bytes(), 0);
    let prefix = util::run_tag();
    let users: Vec<String> = (0..a.members).map(|i| format!("{prefix}-g{i}")).collect();

    // Connect every member (in parallel, bounded), spread over the gateways and source addresses.
    report::note(format!("connecting {} members", a.members));
    let mut conns: Vec<Option<Ws>> = (0..a.members).map(|_| None).collect();
    let opened = futures::stream::iter(users.iter().enumerate())
        .map(|(i, u)| {
            let target = targets[i % targets.len()].clone();
            let token = keys.mint(u, Some("lg"), 3600);
            let source = util::source_ip(a.gw.source_ip_base, a.gw.source_ips, i as u64);
            async move {
                let r = client::open(&target, &token, source, client::ws_config(4096), Duration::from_secs(30)).await;
                (i, r)
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    for (i, r) in opened {
        match r {
            Ok(o) => conns[i] = Some(o.ws),
            Err(f) => bail!("member {i} could not connect: {} ({})", f.cause, f.detail),
        }
    }
    let mut conns: Vec<Ws> = conns.into_iter().map(|c| c.expect("every member connected")).collect();

    // The poster creates the group with everyone.
    let mut poster = conns.remove(0);
    let create = json!({"t": "group_create", "id": "lg-create", "name": "loadgen", "members": &users[1..]});
    poster.send(Message::Text(create.to_string().into())).await?;
    let gid = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), poster.next())
            .await
            .context("no answer to group_create")?
            .context("poster closed")??;
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t)?;
        match v["t"].as_str() {
            Some("group") => break v["group"]["gid"].as_str().context("group without gid")?.to_owned(),
            Some("error") => bail!("group_create refused: {v}"),
            _ => {}
        }
    };
    report::note(format!("group {gid} with {} members", a.members));

    // Every other member reads, acks, and records deliveries of the poster's messages.
    let seen =
        Arc::new(Mutex::new(Seen { per_msg: HashMap::new(), deliveries: hist::new(), duplicates: 0, reordered: 0 }));
    let clock = util::clock();
    let mut readers = Vec::new();
    for mut ws in conns {
        let seen = seen.clone();
        readers.push(tokio::spawn(async move {
            let mut last_index: Option<usize> = None;
            let mut got = std::collections::HashSet::new();
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(t) = msg else { continue };
                let Ok(f) = client::Frame::parse(&t) else { continue };
                if f.t != "msg" {
                    continue;
                }
                let now = clock.now_us();
                if let Some(seq) = f.seq {
                    let _ = ws.send(Message::Text(client::ack_frame(seq).into())).await;
                }
                let Some(item) = f.m else { continue };
                if item.k != "group" {
                    continue;
                }
                // Body: "<index> <scheduled send µs> <padding>".
                let body = item.body.as_deref().unwrap_or("");
                let mut parts = body.split(' ');
                let (Some(Ok(index)), Some(Ok(at))) =
                    (parts.next().map(str::parse::<usize>), parts.next().map(str::parse::<u64>))
                else {
                    continue;
                };
                let mut s = seen.lock().expect("seen lock");
                if !got.insert(index) {
                    s.duplicates += 1;
                    continue;
                }
                if last_index.is_some_and(|l| index < l) {
                    s.reordered += 1;
                }
                last_index = Some(index);
                hist::record(&mut s.deliveries, now.saturating_sub(at));
                let e = s.per_msg.entry(index).or_insert((now, now, 0));
                e.0 = e.0.min(now);
                e.1 = e.1.max(now);
                e.2 += 1;
            }
        }));
    }

    // The poster sends on a fixed schedule and keeps reading its own frames (sent ticks).
    let recipients = a.members - 1;
    let interval = Duration::from_secs_f64(1.0 / a.rate.max(0.001));
    let send_start = clock.now_us() + 100_000;
    let mut sent_ok = 0usize;
    let mut errors = 0usize;
    let (mut sink, mut stream) = poster.split();
    let ticks = tokio::spawn(async move {
        let (mut ok, mut err) = (0usize, 0usize);
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(t) = msg else { continue };
            let Ok(f) = client::Frame::parse(&t) else { continue };
            match &*f.t {
                "sent" => ok += 1,
                "error" => err += 1,
                _ => {}
            }
        }
        (ok, err)
    });
    for i in 0..a.messages {
        let at = send_start + (i as u64) * interval.as_micros() as u64;
        tokio::time::sleep_until(clock.instant_at(at).into()).await;
        let head = format!("{i} {at} ");
        let body = format!("{head}{}", "x".repeat(a.body.saturating_sub(head.len())));
        let frame = json!({"t": "gsend", "id": format!("lg-{i}"), "group": gid, "body": body});
        sink.send(Message::Text(frame.to_string().into())).await?;
    }
    let sends_done = Instant::now();
    // Wait until every member has every message, or the grace period ends.
    loop {
        let complete = {
            let s = seen.lock().expect("seen lock");
            s.per_msg.len() == a.messages && s.per_msg.values().all(|e| e.2 >= recipients)
        };
        if complete || sends_done.elapsed() > a.grace {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = sink.close().await;
    if let Ok(Ok((ok, err))) = tokio::time::timeout(Duration::from_secs(2), ticks).await {
        sent_ok = ok;
        errors = err;
    }
    for r in &readers {
        r.abort();
    }

    let s = seen.lock().expect("seen lock");
    let mut to_last = hist::new();
    let mut to_first = hist::new();
    let mut lost = 0usize;
    let (mut first_at, mut last_at) = (u64::MAX, 0u64);
    for i in 0..a.messages {
        let at = send_start + (i as u64) * interval.as_micros() as u64;
        match s.per_msg.get(&i) {
            Some(&(first, last, n)) => {
                hist::record(&mut to_first, first.saturating_sub(at));
                if n >= recipients {
                    hist::record(&mut to_last, last.saturating_sub(at));
                }
                lost += recipients.saturating_sub(n);
                first_at = first_at.min(first);
                last_at = last_at.max(last);
            }
            None => lost += recipients,
        }
    }
    let deliveries = s.deliveries.len();
    let span_s = (last_at.saturating_sub(first_at.min(last_at))) as f64 / 1e6;
    let fanout_rate = if span_s > 0.0 { deliveries as f64 / span_s } else { 0.0 };
    let ok = lost == 0 && s.duplicates == 0 && s.reordered == 0 && errors == 0;
    let results = json!({
        "members": a.members,
        "messages": a.messages,
        "sent_ok": sent_ok,
        "send_errors": errors,
        "member_deliveries": deliveries,
        "fanout_deliveries_per_sec": fanout_rate,
        "lost": lost,
        "duplicates": s.duplicates,
        "reordered": s.reordered,
        "send_to_last_member": hist::summary(&to_last),
        "send_to_first_member": hist::summary(&to_first),
        "send_to_each_delivery": hist::summary(&s.deliveries),
        "verdict": if ok { "PASS" } else { "FAIL" },
    });
    let markdown = format!(
        "One group of {} members, all online; one member posts {} messages at {}/s (open loop), body {} bytes.\n\n\
| figure | value |\n|---|---|\n| member deliveries | {} → **{} deliveries/s** during the fan-out |\n\
| ledger | lost {} · duplicates {} · reordered {} · send errors {} |\n| verdict | {} |\n\n\
{}{}{}{}",
        a.members,
        a.messages,
        a.rate,
        a.body,
        deliveries,
        util::fmt_rate(fanout_rate),
        lost,
        s.duplicates,
        s.reordered,
        errors,
        if ok { "PASS: every member got every message exactly once, in order" } else { "FAIL" },
        hist::MD_HEADER,
        hist::md_row("send → last member", &to_last),
        hist::md_row("send → first member", &to_first),
        hist::md_row("send → each delivery", &s.deliveries),
    );
    let human = format!(
        "group: {} members, {} messages: send→last member {}; {} deliveries/s; lost {} dup {} reordered {} — {}",
        a.members,
        a.messages,
        hist::line(&to_last),
        util::fmt_rate(fanout_rate),
        lost,
        s.duplicates,
        s.reordered,
        if ok { "PASS" } else { "FAIL" }
    );
    let config = json!({
        "urls": a.gw.urls, "members": a.members, "messages": a.messages, "rate": a.rate,
        "grace_s": a.grace.as_secs_f64(), "body": a.body,
    });
    let plot = report::Plot {
        title: format!("group: {} members, latency from the scheduled send", a.members),
        series: vec![
            ("send → last member", &to_last),
            ("send → first member", &to_first),
            ("send → each delivery", &s.deliveries),
        ],
    };
    report::finish_plot(
        a.run.out.as_deref(),
        &Output { scenario: "group", started, config, results, markdown, human },
        Some(&plot),
    )?;
    Ok(if ok { 0 } else { 1 })
}
