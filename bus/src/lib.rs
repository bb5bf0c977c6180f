//! NATS JetStream plumbing shared by the services: connecting, the definitions of the streams and
//! buckets (owned and provisioned by `storage`, awaited by everyone else), and inbox reads.

pub mod inbox;
pub mod streams;

use std::time::Duration;

use anyhow::Context as _;

pub use streams::{provision, wait_ready, StreamSettings};

/// Flags every service uses to reach NATS.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s); several, comma-separated, for a cluster.
    #[arg(long = "nats-url", env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub url: String,
    /// A NATS credentials file (never pass secrets on the command line).
    #[arg(long = "nats-creds", env = "NATS_CREDS")]
    pub creds: Option<std::path::PathBuf>,
}

impl NatsArgs {
    pub fn new(url: impl Into<String>) -> Self {
        NatsArgs { url: url.into(), creds: None }
    }
}

/// Connects to NATS, retrying the first connection until a server answers and reconnecting
/// forever after that. `events` receives connection events (reconnects, slow consumers) so the
/// caller can count them and resync.
pub async fn connect(
    args: &NatsArgs,
    name: &str,
    events: Option<tokio::sync::mpsc::UnboundedSender<async_nats::Event>>,
) -> anyhow::Result<async_nats::Client> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .event_callback(move |ev| {
            let events = events.clone();
            async move {
                tracing::info!(event = %ev, "nats connection event");
                if let Some(tx) = events {
                    let _ = tx.send(ev);
                }
            }
        });
    if let Some(creds) = &args.creds {
        opts = opts.credentials_file(creds).await.context("reading NATS credentials")?;
    }
    let urls: Vec<async_nats::ServerAddr> =
        args.url.split(',').map(|u| u.trim().parse()).collect::<Result<_, _>>().context("parsing NATS URL")?;
    opts.connect(urls).await.context("connecting to NATS")
}
