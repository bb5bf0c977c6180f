//! Measures what one async-nats core NATS subscription costs a process: one `Subscriber` per
//! connected user (on `live.<user>`), merged into one `SelectAll` stream, as the gateway's bridge
//! held them before its live multiplexer (gateway/src/bridge/live_mux/, whose own figure comes
//! from the ignored test `memory_per_subscription` there). Prints resident memory before and
//! after N of them.
//!
//! `cargo run --release -p bus --example subscription_cost -- nats://127.0.0.1:4222 10000`

use futures::stream::{AbortHandle, Abortable, SelectAll};
use futures::StreamExt;

fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) * 4096
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10_000);
    let client = async_nats::connect(url).await?;
    client.flush().await?;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let before = resident();
    let mut live = SelectAll::new();
    let mut aborts = Vec::with_capacity(n);
    for i in 0..n {
        let sub = client.subscribe(format!("live.subcost-{i}")).await?;
        let (abort, reg) = AbortHandle::new_pair();
        live.push(Abortable::new(sub.map(move |m| (i, m)), reg));
        aborts.push(abort);
    }
    client.flush().await?;
    // Deliver one message to every subscription, as a connected user gets at least one.
    for i in 0..n {
        client.publish(format!("live.subcost-{i}"), "x".into()).await?;
    }
    client.flush().await?;
    let mut got = 0;
    while got < n {
        if live.next().await.is_none() {
            break;
        }
        got += 1;
    }
    let after = resident();
    println!(
        "subscriptions={n} delivered={got} rss_before={before} rss_after={after} bytes_per_subscription={}",
        (after.saturating_sub(before)) / n as u64
    );
    Ok(())
}
