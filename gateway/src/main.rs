//! The gateway binary: thread-per-core WebSocket executors on glommio, bridged to NATS.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

mod bridge;
mod config;
mod conn;
mod delivery;
mod executor;
mod handshake;
mod history;
mod metrics;
mod outbox;
mod presence;
mod ratelimit;
mod readiness;
mod revocation;
mod stream;
mod tls;
mod user_limits;
mod web;
mod wsio;

// `--features heap-profile` leaves the system allocator in place so that heap profilers that
// interpose malloc (heaptrack, valgrind's massif/dhat) see every allocation.
#[cfg(not(feature = "heap-profile"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // The config file becomes environment defaults before anything reads the environment.
    telemetry::apply_config_file()?;
    telemetry::init_logging("gateway");
    let (cfg, keys) = config::Config::load()?;
    // Before anything connects: a gateway with an unusable certificate exits at once, saying why.
    let tls = match cfg.tls_files() {
        Some((cert, key)) => Some(tls::server_config(cert, key)?),
        None => None,
    };
    let cfg = Arc::new(cfg);
    let gateway_id: Arc<str> = cfg.gateway_id.clone().unwrap_or_else(|| format!("gw-{:08x}", rand_u32())).into();
    let keys = Arc::new(keys);
    let metrics = Arc::new(metrics::Metrics::new(&gateway_id, cfg.cores()));
    let health = Arc::new(telemetry::Health::default());
    let cores = cfg.cores();
    let ready = Arc::new(readiness::Readiness::new(health.clone(), cores));
    let revocations = Arc::new(revocation::Revocations::default());
    let user_limits = Arc::new(user_limits::UserLimits::new(cfg.user_rates(), metrics.rate_limit_users.clone()));

    let (bridge, exec_events, _bridge_thread) = bridge::start(
        bridge::BridgeConfig {
            nats: cfg.nats.clone(),
            gateway_id: gateway_id.to_string(),
            cursor_flush: Duration::from_millis(cfg.cursor_flush_ms),
            receipt_flush: Duration::from_millis(cfg.receipt_flush_ms),
            presence_beat: Duration::from_secs(cfg.presence_beat_secs.max(1)),
            presence_timeout: Duration::from_secs(cfg.presence_timeout_secs.max(2)),
        },
        cores,
        metrics.clone(),
        ready.clone(),
        health.clone(),
        cfg.metrics_addr,
        revocations.clone(),
    )?;

    // The executors accept only once the backbone is ready, so that readiness means "serving".
    while !ready.backbone() {
        std::thread::sleep(Duration::from_millis(20));
    }

    let online = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut handles = Vec::new();
    for (id, events) in exec_events.into_iter().enumerate() {
        let (cfg, keys, bridge, metrics, gateway_id, ready, revocations, user_limits, tls) = (
            cfg.clone(),
            keys.clone(),
            bridge.clone(),
            metrics.clone(),
            gateway_id.clone(),
            ready.clone(),
            revocations.clone(),
            user_limits.clone(),
            tls.clone(),
        );
        let placement = if cores <= online { Placement::Fixed(id) } else { Placement::Unbound };
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("gateway-{id}"))
            .io_memory(cfg.io_memory)
            .ring_depth(cfg.ring_depth.max(1))
            .spawn(move || async move {
                let ctx = Rc::new(
                    executor::ExecCtx::new(id, cfg, keys, bridge, metrics, gateway_id, revocations, user_limits)
                        .with_tls(tls),
                );
                executor::run(ctx, events, ready).await
            })
            .map_err(|e| anyhow::anyhow!("starting executor {id}: {e}"))?;
        handles.push(h);
    }
    tracing::info!(gateway = %gateway_id, listen = %cfg.listen, tls = tls.is_some(), metrics = %cfg.metrics_addr, executors = cores, "gateway serving");

    wait_for_signal()?;
    tracing::info!("draining");
    ready.drain();
    bridge.drain();
    for h in handles {
        let _ = h.join();
    }
    // Give the bridge a moment to write the cursors of the connections that just closed.
    std::thread::sleep(Duration::from_millis(cfg.cursor_flush_ms.min(1000) + 100));
    tracing::info!("gateway stopped");
    Ok(())
}

/// Blocks until SIGTERM or SIGINT.
fn wait_for_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        telemetry::stop_signal()?.await;
        anyhow::Ok(())
    })
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() as u32
}
