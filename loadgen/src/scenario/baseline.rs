//! `baseline`: the backbone's own limit. Publishes to a scratch JetStream stream configured like
//! INBOX (file storage, duplicate window, republish to a live subject) with payloads the size of
//! a stored chat item and a `Nats-Msg-Id` like the gateway's, keeping many acks in flight, and
//! optionally measures the publish → republished-copy round trip (the live delivery path).
//! Chat results are stated as a ratio to the publish rate.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::hist::{self, Hist};
use crate::report::{self, Output, Progress};
use crate::util::{self, fmt_duration, fmt_rate, parse_duration};
use crate::RunArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub run: RunArgs,
    /// The NATS server, and the bench role's credentials when it requires them (the scratch
    /// stream lives in the account of that identity: `chatctl nats-config` gives the bench role an
    /// account of its own).
    #[command(flatten)]
    pub nats: bus::NatsArgs,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Chat body size; the published payload is a stored chat item with a body this large, the
    /// same bytes the gateway stores per message.
    #[arg(long, default_value_t = 100)]
    pub body_size: usize,
    /// Publishes awaiting their PubAck, per connection.
    #[arg(long, default_value_t = 2048)]
    pub inflight: usize,
    /// NATS connections publishing in parallel (the gateway uses one).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Distinct subjects (users) the messages are spread over.
    #[arg(long, default_value_t = 100)]
    pub subjects: usize,
    /// Do not set Nats-Msg-Id (the gateway always sets it, for deduplication).
    #[arg(long)]
    pub no_msg_id: bool,
    /// Also measure publish → republished live copy received (the gateway's live path).
    #[arg(long)]
    pub round_trip: bool,
    /// Storage of the scratch stream (`file` like INBOX, or `memory`).
    #[arg(long, default_value = "file", value_parser = ["file", "memory"])]
    pub storage: String,
    /// Keep the scratch stream afterwards (it is deleted by default).
    #[arg(long)]
    pub keep_stream: bool,
}

struct Phase {
    ok: u64,
    errors: std::collections::BTreeMap<String, u64>,
    elapsed_s: f64,
    h_ack: Hist,
}

fn payload(body_size: usize, k: u64) -> Bytes {
    let head = format!("{k} {} ", util::now_us());
    let pad = body_size.saturating_sub(head.len());
    let body = format!("{head}{}", "x".repeat(pad));
    protocol::InboxItem::Chat {
        from: "lgbaseline-00000".into(),
        dev: "lg".into(),
        id: format!("{k}-{}", util::now_us()),
        body,
        media: None,
        ts: protocol::now_ms(),
    }
    .to_bytes()
    .into()
}

/// Publishes on every connection for `duration`; returns the acknowledged count.
async fn publish_phase(
    clients: &[async_nats::Client],
    args: &Args,
    subj_prefix: &str,
    phase_tag: &'static str,
    duration: Duration,
    counter: Arc<AtomicU64>,
) -> Phase {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let js = jetstream::ContextBuilder::new()
            .max_ack_inflight(args.inflight.max(1))
            .backpressure_on_inflight(true)
            .timeout(Duration::from_secs(10))
            .build(client.clone());
        let (args, prefix, counter) = (args.clone(), subj_prefix.to_owned(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut acks = FuturesUnordered::new();
            let mut ok = 0u64;
            let mut errors = std::collections::BTreeMap::<String, u64>::new();
            let mut h = hist::new();
            let mut k = 0u64;
            let mut last_ack = start;
            let note = |r: Result<Duration, String>,
                        h: &mut Hist,
                        ok: &mut u64,
                        errors: &mut std::collections::BTreeMap<String, u64>| match r {
                Ok(d) => {
                    *ok += 1;
                    counter.fetch_add(1, Relaxed);
                    hist::record(h, d.as_micros() as u64);
                }
                Err(e) => *errors.entry(e).or_default() += 1,
            };
            while Instant::now() < end {
                while acks.len() >= args.inflight.max(1) {
                    if let Some((r, t)) = acks.next().await {
                        note(r, &mut h, &mut ok, &mut errors);
                        last_ack = t;
                    }
                }
                let subject = format!("{prefix}.u{}", k % args.subjects.max(1) as u64);
                let mut msg = PublishMessage::build().payload(payload(args.body_size, k));
                if !args.no_msg_id {
                    msg = msg.message_id(format!("m|lgbaseline|{phase_tag}|{c}-{k}"));
                }
                let sent = Instant::now();
                match js.send_publish(subject, msg).await {
                    Ok(fut) => acks.push(async move {
                        let r = match fut.await {
                            Ok(ack) if ack.duplicate => Err("duplicate".to_owned()),
                            Ok(_) => Ok(sent.elapsed()),
                            Err(e) => Err(kind(e.kind())),
                        };
                        (r, Instant::now())
                    }),
                    Err(e) => *errors.entry(format!("publish_{}", kind(e.kind()))).or_default() += 1,
                }
                k += 1;
            }
            while let Some((r, t)) = acks.next().await {
                note(r, &mut h, &mut ok, &mut errors);
                last_ack = t;
            }
            (ok, errors, h, last_ack)
        }));
    }
    let mut phase = Phase { ok: 0, errors: Default::default(), elapsed_s: 0.0, h_ack: hist::new() };
    let mut last = start;
    for t in tasks {
        if let Ok((ok, errors, h, last_ack)) = t.await {
            phase.ok += ok;
            for (k, v) in errors {
                *phase.errors.entry(k).or_default() += v;
            }
            hist::merge(&mut phase.h_ack, &h);
            last = last.max(last_ack);
        }
    }
    phase.elapsed_s = (last - start).as_secs_f64().max(duration.as_secs_f64());
    phase
}

fn kind(k: PublishErrorKind) -> String {
    format!("{k:?}").to_lowercase()
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let started = SystemTime::now();
    if args.connections == 0 {
        bail!("--connections must be > 0");
    }
    let tag = util::run_tag();
    let name = format!("LGBASE_{}", tag.to_uppercase());
    let subj = format!("lgbase.{tag}");
    let live = format!("lglive.{tag}");
    let mut clients = Vec::new();
    for i in 0..args.connections {
        clients.push(
            bus::connect(&args.nats, bus::Role::Bench, &format!("loadgen baseline {i}"), None)
                .await
                .with_context(|| format!("connecting to {}", args.nats.url))?,
        );
    }
    let js = jetstream::new(clients[0].clone());
    // INBOX's definition, renamed onto scratch subjects.
    let mut cfg = bus::streams::inbox_stream(&bus::StreamSettings::default());
    cfg.name = name.clone();
    cfg.subjects = vec![format!("{subj}.*")];
    cfg.description = Some("loadgen baseline scratch stream (safe to delete)".into());
    cfg.republish = Some(stream::Republish {
        source: format!("{subj}.*"),
        destination: format!("{live}.{{{{wildcard(1)}}}}"),
        headers_only: false,
    });
    if args.storage == "memory" {
        cfg.storage = stream::StorageType::Memory;
    }
    let storage = format!("{:?}", cfg.storage).to_lowercase();
    js.create_stream(cfg.clone()).await.with_context(|| format!("creating scratch stream {name}"))?;
    let sample_len = payload(args.body_size, 0).len();
    report::note(format!(
        "publishing to {name} ({storage} storage, {} subjects, {sample_len}-byte payloads, {} in flight × {} connection(s)) for {}",
        args.subjects,
        args.inflight,
        args.connections,
        fmt_duration(args.duration)
    ));

    let result = async {
        let counter = Arc::new(AtomicU64::new(0));
        let progress = {
            let c = counter.clone();
            let mut last = (0u64, 0.0f64);
            Progress::start(move |el| {
                let n = c.load(Relaxed);
                let t = el.as_secs_f64();
                let line = format!(
                    "baseline t={t:>5.1}s acked {n} ({} msg/s)",
                    fmt_rate((n - last.0) as f64 / (t - last.1).max(1e-3))
                );
                last = (n, t);
                line
            })
        };
        let publish = publish_phase(&clients, &args, &subj, "p", args.duration, counter.clone()).await;
        progress.stop().await;

        let round_trip = if args.round_trip {
            report::note(format!(
                "round trip: publish and receive the republished copies for {}",
                fmt_duration(args.duration)
            ));
            // The consumer has a connection of its own with a deep subscription buffer; slow
            // consumer events (the client dropping copies) are counted and reported.
            let slow = Arc::new(AtomicU64::new(0));
            let consumer_client = {
                let slow = slow.clone();
                bus::options(&args.nats, bus::Role::Bench, "loadgen baseline consumer", None)
                    .await?
                    .subscription_capacity(1 << 20)
                    .event_callback(move |ev| {
                        let slow = slow.clone();
                        async move {
                            if matches!(ev, async_nats::Event::SlowConsumer(_)) {
                                slow.fetch_add(1, Relaxed);
                            }
                        }
                    })
                    .connect(bus::server_addrs(&args.nats.url)?)
                    .await
                    .context("connecting the round-trip consumer")?
            };
            let mut sub = consumer_client.subscribe(format!("{live}.>")).await?;
            consumer_client.flush().await?;
            let received = Arc::new(AtomicU64::new(0));
            let r2 = received.clone();
            let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
            let consumer = tokio::spawn(async move {
                let mut h = hist::new();
                let mut last = Instant::now();
                loop {
                    let m = tokio::select! {
                        _ = &mut stop_rx => break,
                        m = sub.next() => match m { Some(m) => m, None => break },
                    };
                    let now = util::now_us();
                    if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                        if let Some(us) =
                            v["body"].as_str().and_then(|b| b.split(' ').nth(1)).and_then(|s| s.parse::<u64>().ok())
                        {
                            hist::record(&mut h, now.saturating_sub(us));
                        }
                    }
                    r2.fetch_add(1, Relaxed);
                    last = Instant::now();
                }
                let _ = sub.unsubscribe().await;
                (h, last)
            });
            let counter = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let progress = {
                let (c, r) = (counter.clone(), received.clone());
                Progress::start(move |el| {
                    format!(
                        "round trip t={:>5.1}s acked {} received {}",
                        el.as_secs_f64(),
                        c.load(Relaxed),
                        r.load(Relaxed)
                    )
                })
            };
            let p = publish_phase(&clients, &args, &subj, "rt", args.duration, counter).await;
            // Wait for the copies still in flight.
            let deadline = Instant::now() + Duration::from_secs(10);
            while received.load(Relaxed) < p.ok && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            progress.stop().await;
            let got = received.load(Relaxed);
            let _ = stop_tx.send(());
            let (h, last) = consumer.await.unwrap_or_else(|_| (hist::new(), Instant::now()));
            // Received copies per second, from the start of publishing to the last copy.
            let elapsed = (last.max(start) - start).as_secs_f64().max(args.duration.as_secs_f64());
            let slow = slow.load(Relaxed);
            Some((p, got, h, elapsed, slow))
        } else {
            None
        };
        let info = js.get_stream(&name).await?.info().await.ok().map(|i| i.state.clone());
        anyhow::Ok((publish, round_trip, info))
    }
    .await;
    if !args.keep_stream {
        let _ = js.delete_stream(&name).await;
    }
    let (publish, round_trip, state) = result?;

    let msgs_per_s = publish.ok as f64 / publish.elapsed_s;
    let rt_json = round_trip.as_ref().map(|(p, got, h, elapsed, slow)| {
        json!({
            "slow_consumer_events": slow,
            "publish_to_republished_copy": hist::summary(h),
            "published_acked": p.ok,
            "received": got,
            "publish_msgs_per_s": p.ok as f64 / p.elapsed_s,
            "received_msgs_per_s": *got as f64 / elapsed,
            "errors": p.errors,
        })
    });
    let errors_total: u64 = publish.errors.values().sum();
    let config = json!({
        "nats_url": args.nats.url,
        "duration_s": args.duration.as_secs_f64(),
        "body_size": args.body_size,
        "payload_bytes": sample_len,
        "inflight_per_connection": args.inflight,
        "connections": args.connections,
        "subjects": args.subjects,
        "msg_id": !args.no_msg_id,
        "storage": storage,
        "round_trip": args.round_trip,
        "stream": name,
        "stream_config": "INBOX's (bus::streams::inbox_stream) on scratch subjects, republish included",
        "threads": args.run.threads(),
    });
    let results = json!({
        "publish": {
            "acked": publish.ok,
            "elapsed_s": publish.elapsed_s,
            "msgs_per_s": msgs_per_s,
            "bytes_per_s": msgs_per_s * sample_len as f64,
            "errors": publish.errors,
            "publish_to_ack": hist::summary(&publish.h_ack),
        },
        "round_trip": rt_json,
        "stream_state": state.map(|s| json!({"messages": s.messages, "bytes": s.bytes})),
    });
    let rt_line = round_trip
        .as_ref()
        .map(|(p, got, h, elapsed, _)| {
            format!(
                "round trip: {} acked, {} republished copies received → {} msg/s\npublish→copy {}\n",
                p.ok,
                got,
                fmt_rate(*got as f64 / elapsed),
                hist::line(h)
            )
        })
        .unwrap_or_default();
    let human = format!(
        "baseline: JetStream publish ({storage}, {sample_len}-byte payloads, {} in flight × {}): {} acked in {:.1}s → {} msg/s ({:.1} MB/s), errors {errors_total}\n\
         publish→ack {}\n{rt_line}",
        args.inflight,
        args.connections,
        publish.ok,
        publish.elapsed_s,
        fmt_rate(msgs_per_s),
        msgs_per_s * sample_len as f64 / 1e6,
        hist::line(&publish.h_ack),
    );
    let mut md = format!(
        "Raw JetStream publish with async acks to a scratch stream configured like INBOX ({storage} storage), {sample_len}-byte payloads (a stored chat item with a {}-byte body), {} acks in flight per connection, {} connection(s), Nats-Msg-Id {}.\n\n",
        args.body_size,
        args.inflight,
        args.connections,
        if args.no_msg_id { "off" } else { "on" }
    );
    md.push_str("| figure | value |\n|---|---|\n");
    md.push_str(&format!(
        "| publish (acked) | {} in {:.1} s → **{} msg/s** |\n",
        publish.ok,
        publish.elapsed_s,
        fmt_rate(msgs_per_s)
    ));
    md.push_str(&format!("| errors | {errors_total} |\n"));
    if let Some((p, got, _, elapsed, _)) = &round_trip {
        md.push_str(&format!(
            "| round trip (publish → republished copy) | {} acked, {got} received → {} msg/s |\n",
            p.ok,
            fmt_rate(*got as f64 / elapsed)
        ));
    }
    md.push('\n');
    md.push_str(hist::MD_HEADER);
    md.push_str(&hist::md_row("publish → PubAck", &publish.h_ack));
    if let Some((_, _, h, _, _)) = &round_trip {
        md.push_str(&hist::md_row("publish → republished copy", h));
    }
    let mut series = vec![("publish → PubAck", &publish.h_ack)];
    if let Some((_, _, h, _, _)) = &round_trip {
        series.push(("publish → republished copy", h));
    }
    let plot = report::Plot { title: "baseline: JetStream publish latency".into(), series };
    report::finish_plot(
        args.run.out.as_deref(),
        &Output { scenario: "baseline", started, config, results, markdown: md, human },
        Some(&plot),
    )?;
    Ok(if errors_total > 0 { 3 } else { 0 })
}
