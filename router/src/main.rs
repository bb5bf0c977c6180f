//! `router`: the group membership service (`svc.groups`) and the fan-out of the group stream into
//! the members' inboxes. See README.md, [`service`] and [`fanout`].

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod fanout;
mod membership;
mod metrics;
mod plan;
mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use clap::Parser;
use protocol::subjects;
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;

/// How long a stopping router waits for the fan-out to finish the batches in hand.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(name = "router", about = "Group membership service and group message fan-out")]
struct Args {
    /// A TOML config file: `[section] key = value` sets the variable SECTION_KEY (flags and the
    /// environment win over it). Also from env CHAT_CONFIG.
    #[arg(long)]
    #[allow(dead_code)] // read by telemetry::apply_config_file before parsing
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    nats: bus::NatsArgs,
    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "ROUTER_METRICS_ADDR", default_value = "127.0.0.1:9102")]
    metrics_addr: SocketAddr,
    /// Most members a group may have.
    #[arg(long, env = "ROUTER_MAX_MEMBERS", default_value_t = protocol::groups::DEFAULT_MAX_MEMBERS)]
    max_members: usize,
    /// This instance's index, 0-based: it fans out the partitions p with p % instances == instance.
    #[arg(long, env = "ROUTER_INSTANCE", default_value_t = 0)]
    instance: u32,
    /// How many router instances split the group stream partitions.
    #[arg(long, env = "ROUTER_INSTANCES", default_value_t = 1)]
    instances: u32,
    /// Group stream entries fetched and fanned out per batch, per partition.
    #[arg(long, env = "ROUTER_BATCH", default_value_t = 64)]
    batch: usize,
    /// Inbox publishes awaiting their PubAck at once, per partition.
    #[arg(long, env = "ROUTER_MAX_INFLIGHT", default_value_t = 4096)]
    max_inflight: usize,
    /// Groups whose member lists are cached, in total (split between the owned partitions).
    #[arg(long, env = "ROUTER_CACHE_GROUPS", default_value_t = 100_000)]
    cache_groups: usize,
}

impl Args {
    fn validate(&self) -> anyhow::Result<()> {
        if self.instances == 0 {
            bail!("--instances must be at least 1");
        }
        if self.instance >= self.instances {
            bail!("--instance must be below --instances ({})", self.instances);
        }
        if !(1..=4096).contains(&self.batch) {
            bail!("--batch must be 1 to 4096");
        }
        for (name, v) in [
            ("--max-members", self.max_members),
            ("--max-inflight", self.max_inflight),
            ("--cache-groups", self.cache_groups),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    telemetry::apply_config_file()?;
    let args = Args::parse();
    telemetry::init_logging("router");
    args.validate()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("router")
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut stop = std::pin::pin!(telemetry::stop_signal()?);
    let (metrics, registry) = Metrics::new();
    let health = telemetry::serve_registry(args.metrics_addr, registry).await?;

    let partitions = fanout::owned_partitions(args.instance, args.instances);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let client = bus::connect(&args.nats, bus::Role::Router, "router", Some(events_tx)).await?;
    // Every partition may have `max_inflight` PubAcks outstanding, and the membership service
    // some more: the context's in-flight bound must not be what limits them (a publisher
    // waiting for a permit its own unawaited acks hold would wait forever).
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(partitions.len() * args.max_inflight + 4096)
        .build(client.clone());

    tokio::select! {
        res = bus::wait_ready(&js) => res?,
        _ = &mut stop => {
            tracing::info!("stopped before the streams were provisioned");
            return Ok(());
        }
    }
    let groups = js.get_key_value(subjects::GROUPS_BUCKET).await.context("opening KV groups")?;
    let memberships = js.get_key_value(subjects::MEMBERSHIPS_BUCKET).await.context("opening KV memberships")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let cfg = Arc::new(fanout::Config {
        batch: args.batch,
        max_inflight: args.max_inflight,
        cache_groups: (args.cache_groups / partitions.len().max(1)).max(1),
    });
    let mut loops = Vec::new();
    for &p in &partitions {
        let mut part = fanout::Partition::new(p, js.clone(), groups.clone(), metrics.clone(), cfg.clone());
        // Bind before reporting ready; a failure here is retried by the loop itself.
        if let Err(e) = part.bind().await {
            tracing::warn!(partition = p, error = format!("{e:#}"), "binding the consumer failed; retrying");
        }
        loops.push(tokio::spawn(part.run(shutdown_rx.clone())));
    }
    let pending = tokio::spawn(fanout::report_pending(js.clone(), partitions.clone(), metrics.clone()));
    let svc = Arc::new(service::Service {
        client: client.clone(),
        js: js.clone(),
        groups,
        memberships,
        metrics: metrics.clone(),
        max_members: args.max_members,
    });
    let requests = service::subscribe(&client).await?;
    let service = tokio::spawn(service::run(svc, requests, shutdown_rx.clone()));
    let connection = tokio::spawn(follow_connection(events_rx, health.clone(), metrics.clone(), shutdown_rx));
    health.set_ready(true);
    tracing::info!(instance = args.instance, instances = args.instances, ?partitions, "router ready");

    stop.await;
    tracing::info!("shutting down: finishing the batches in hand");
    health.set_ready(false);
    let _ = shutdown_tx.send(true);
    // The batches in hand finish (their publishes are bounded by PubAck timeouts); if NATS is
    // unreachable the process exits anyway, and the next start replays what was not acked.
    let finished = tokio::time::timeout(SHUTDOWN_LIMIT, futures::future::join_all(loops)).await;
    if finished.is_err() {
        tracing::warn!("fan-out did not finish its batches in time; they are replayed at the next start");
    }
    if let Err(e) = service.await {
        tracing::warn!(error = %e, "membership service task failed");
    }
    pending.abort();
    connection.abort();
    // Acks and replies still buffered in the client go out before the process exits.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Counts reconnects and keeps readiness in line with the connection.
async fn follow_connection(
    mut events: mpsc::UnboundedReceiver<async_nats::Event>,
    health: Arc<telemetry::Health>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
) {
    // The first `Connected` is the initial connection.
    let mut connected_before = false;
    while let Some(ev) = events.recv().await {
        match ev {
            async_nats::Event::Connected => {
                if connected_before {
                    metrics.nats_reconnects.inc();
                    if !*shutdown.borrow() {
                        health.set_ready(true);
                    }
                }
                connected_before = true;
            }
            async_nats::Event::Disconnected => health.set_ready(false),
            _ => {}
        }
    }
}
