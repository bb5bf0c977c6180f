//! loadgen: benchmarks of the chat backend through its public surfaces (WebSocket gateways and
//! NATS), with results written as JSON and Markdown.
//!
//! * `chat`      — 1:1 message throughput and latency, with a delivery ledger.
//! * `connect`   — connection capacity: handshake latency and gateway memory per connection.
//! * `baseline`  — the backbone's own limit: raw JetStream publish rate (and round trip).
//! * `group`     — a 1024-member group: send to the last member, fan-out rate, with a ledger.
//! * `offline`   — inboxes fill while recipients are offline, then they connect and drain.
//! * `storm`     — every connection drops at once; clients reconnect with backoff and drain.
//! * `peer`      — the gateway against reference tokio-tungstenite and Node `ws` servers.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod client;
mod hist;
mod ledger;
mod plot;
mod procfs;
mod report;
mod scenario;
mod scrape;
mod session;
mod util;

use scenario::{baseline, chat, connect, group, offline, peer, storm};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Options every scenario has.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Write `<scenario>-<timestamp>.json` (every figure, the machine, the command line, the git
    /// commit), a Markdown summary `<scenario>-<timestamp>.md` and a latency percentile plot
    /// `<scenario>-<timestamp>.svg` into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Runtime worker threads (default: the number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl RunArgs {
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1)
    }
}

#[derive(Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for the chat backend: chat throughput/latency with a delivery ledger, connection capacity and memory, and the JetStream baseline",
    long_about = None,
    after_help = "Exit status: 0 success; 1 ledger violations (lost, duplicated, reordered, misdelivered messages); \
2 the run could not be carried out (bad arguments, unreachable services, connections refused); \
3 the run completed with errors (failed or unanswered sends, dropped connections, publish errors).\n\n\
Typical session (see bench-results/run-all.sh):\n  \
loadgen baseline --nats-url nats://127.0.0.1:4222 --out bench-results   (with the generated NATS authorization: --nats-nkey-file <dir>/bench.nk)\n  \
JWT_SECRET=... loadgen chat --url ws://127.0.0.1:8080/ws --metrics-url http://127.0.0.1:9101/metrics --rate max --baseline bench-results/baseline-*.json --out bench-results\n  \
JWT_SECRET=... loadgen connect --connections 10000 --metrics-url http://127.0.0.1:9101/metrics --out bench-results"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Users in conversations send 1:1 messages at a fixed rate (open loop) or as fast as a
    /// window allows (`--rate max`); reports sent/s, delivered/s, send→sent and send→deliver
    /// latency, and checks the delivery ledger (lost, duplicates, reordered → exit status 1).
    Chat(chat::Args),
    /// Opens N authenticated connections at a target rate and holds them; reports handshake
    /// latency, failures by cause, the gateway's memory per connection, connections per gateway
    /// CPU second during the ramp (--gateway-pid), and a delivery probe: every held connection
    /// sends one message to another and must receive exactly one (exit 1 on loss or duplicates).
    #[command(after_help = connect::SYSCTL_HELP)]
    Connect(connect::Args),
    /// One group of up to 1024 online members; one posts at a fixed rate: time from the send to
    /// the last member receiving it, fan-out deliveries per second, and a ledger (exit 1 on
    /// loss, duplicates or reordering).
    Group(group::Args),
    /// Raw JetStream publish throughput with async acks to a scratch stream configured like
    /// INBOX: the backbone's own limit, which chat results are stated against.
    Baseline(baseline::Args),
    /// Messages pile up in the inboxes of offline recipients (senders send N each, every send
    /// acknowledged), then the recipients connect, all at once or at a rate, and drain: drain
    /// rate, time to empty per recipient and overall, connect → synced, a recheck that nothing
    /// comes again after the acks, and the ledger (exit 1 on loss, duplicates or reordering).
    #[command(after_help = offline::HELP)]
    Offline(offline::Args),
    /// A reconnect storm: many clients receiving while senders send; every connection drops at
    /// once (loadgen resets the sockets, or --gateway-pid / --kill-cmd kill a gateway,
    /// --restart-cmd starts it again); clients come back with jittered exponential backoff
    /// (--backoff-base/-cap/-jitter) and drain from since/cursor. Time until all are back,
    /// attempts and failures by cause, and the ledger (exit 1 on loss, duplicates, reordering).
    #[command(after_help = storm::HELP)]
    Storm(storm::Args),
    /// The gateway against reference servers (peers/tokio-ws, peers/node-ws) on the same
    /// workloads in one run: memory per idle connection and messages/s per core (echo and
    /// broadcast at max rate), as ratios beside the targets of issue #9. Started by
    /// bench-results/peer.sh, which starts every server and passes their URLs and pids.
    Peer(peer::Args),
    /// Internal: one process of `connect` (spawned by it).
    #[command(hide = true)]
    ConnectWorker {
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        args: connect::WorkerArgs,
    },
}

fn main() {
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Chat(a) => a.run.threads(),
        Cmd::Connect(_) => 1,
        Cmd::Baseline(a) => a.run.threads(),
        Cmd::Group(a) => a.run.threads(),
        Cmd::Offline(a) => a.run.threads(),
        Cmd::Storm(a) => a.run.threads(),
        Cmd::Peer(a) => a.run.threads(),
        Cmd::ConnectWorker { threads, .. } => threads.unwrap_or(1).max(1),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Chat(a) => chat::run(a).await,
            Cmd::Connect(a) => connect::run(a).await,
            Cmd::Baseline(a) => baseline::run(a).await,
            Cmd::Group(a) => group::run(a).await,
            Cmd::Offline(a) => offline::run(a).await,
            Cmd::Storm(a) => storm::run(a).await,
            Cmd::Peer(a) => peer::run(a).await,
            Cmd::ConnectWorker { args, .. } => connect::worker(args).await,
        }
    });
    // Do not wait for stray tasks (held sockets, timers): the results are written.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::exit(2);
        }
    }
}
