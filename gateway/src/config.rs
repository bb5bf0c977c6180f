//! Gateway configuration: flags, each with an environment override. Secrets come from a file or
//! the environment, never from the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Parser;
use protocol::{PublicKeyAlg, TokenKeys};

#[derive(Debug, Clone, Parser)]
#[command(name = "gateway", about = "WebSocket gateway: authenticates clients and bridges them to NATS JetStream")]
pub struct Config {
    /// A TOML config file: `[section] key = value` sets the variable SECTION_KEY (flags and the
    /// environment win over it). Also from env CHAT_CONFIG.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address of the WebSocket listener (one SO_REUSEPORT socket per executor).
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// PEM certificate chain (the server's certificate first, then intermediates) for TLS on the
    /// WebSocket listener: clients then connect with wss://. Needs --tls-key. Read at start-up.
    #[arg(long, env = "GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Address of the Prometheus metrics and health endpoints.
    #[arg(long, env = "GATEWAY_METRICS_ADDR", default_value = "127.0.0.1:9101")]
    pub metrics_addr: SocketAddr,
    /// Executors (one per core, each pinned). Default: every available core.
    #[arg(long, env = "GATEWAY_CORES")]
    pub cores: Option<usize>,
    /// This gateway's unique id. Default: random.
    #[arg(long, env = "GATEWAY_ID")]
    pub gateway_id: Option<String>,
    #[command(flatten)]
    pub nats: bus::NatsArgs,
    /// File holding the HS256 token secret. Otherwise the secret is read from env JWT_SECRET.
    #[arg(long, env = "GATEWAY_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Verify tokens with this PEM public key instead of a shared secret (the gateway then holds
    /// no signing key and cannot serve dev tokens).
    #[arg(long, env = "GATEWAY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Algorithm of the public key: RS256, ES256 or EdDSA.
    #[arg(long, env = "GATEWAY_JWT_ALGORITHM", default_value = "EdDSA")]
    pub jwt_algorithm: String,
    /// Browser origins allowed to open a socket (comma-separated; `*` for any). Empty: no origin
    /// policy. Requests without an Origin header (non-browser clients) are not affected.
    #[arg(long, env = "GATEWAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Clock skew allowed on token expiry, in seconds.
    #[arg(long, env = "GATEWAY_TOKEN_LEEWAY_SECS", default_value_t = 60)]
    pub token_leeway_secs: u64,
    /// Dev mode: serve GET /dev/token?user=NAME, minting tokens for anyone. Never in production.
    #[arg(long, env = "GATEWAY_DEV_TOKENS")]
    pub dev_tokens: bool,
    /// Close a connection silent for this long (no frame, no ping).
    #[arg(long, env = "GATEWAY_HEARTBEAT_TIMEOUT_SECS", default_value_t = 30)]
    pub heartbeat_timeout_secs: u64,
    /// Time a client has to complete the TLS handshake (with --tls-cert) and the HTTP upgrade.
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,
    /// Close a connection whose socket accepts no bytes for this long (a client that never reads).
    #[arg(long, env = "GATEWAY_WRITE_TIMEOUT_SECS", default_value_t = 30)]
    pub write_timeout_secs: u64,
    /// Largest message body, bytes.
    #[arg(long, env = "GATEWAY_MAX_BODY", default_value_t = 32 * 1024)]
    pub max_body: usize,
    /// Largest WebSocket frame or message, bytes; larger ones close the connection (1009).
    #[arg(long, env = "GATEWAY_MAX_FRAME", default_value_t = 64 * 1024)]
    pub max_frame: usize,
    /// Per-connection queue of frames waiting to be written.
    #[arg(long, env = "GATEWAY_SEND_QUEUE", default_value_t = 512)]
    pub send_queue: usize,
    /// Sends a connection may have awaiting JetStream's acknowledgement before it stops reading.
    #[arg(long, env = "GATEWAY_MAX_INFLIGHT", default_value_t = 64)]
    pub max_inflight: usize,
    /// Inbox items fetched per round trip while draining.
    #[arg(long, env = "GATEWAY_DRAIN_BATCH", default_value_t = 256)]
    pub drain_batch: usize,
    /// Debounce of device cursor writes, milliseconds.
    #[arg(long, env = "GATEWAY_CURSOR_FLUSH_MS", default_value_t = 500)]
    pub cursor_flush_ms: u64,
    /// Coalescing window of delivery receipts per conversation, milliseconds.
    #[arg(long, env = "GATEWAY_RECEIPT_FLUSH_MS", default_value_t = 100)]
    pub receipt_flush_ms: u64,
    /// How often the gateway records its own heartbeat (gateway-level presence liveness).
    #[arg(long, env = "GATEWAY_PRESENCE_BEAT_SECS", default_value_t = 5)]
    pub presence_beat_secs: u64,
    /// After this long without a heartbeat a gateway is dead and its users show offline.
    #[arg(long, env = "GATEWAY_PRESENCE_TIMEOUT_SECS", default_value_t = 30)]
    pub presence_timeout_secs: u64,
    /// Messages (`send`, `gsend`) a connection may send per second, bursts of twice that;
    /// beyond it they are refused with `rate_limited`. 0: no limit.
    #[arg(long, env = "GATEWAY_MESSAGES_PER_SEC", default_value_t = 50)]
    pub messages_per_sec: u32,
    /// Group operations, presence queries and who-read queries per second per connection.
    #[arg(long, env = "GATEWAY_OPS_PER_SEC", default_value_t = 10)]
    pub ops_per_sec: u32,
    /// Typing indicators a connection may send per second (excess ones are dropped).
    #[arg(long, env = "GATEWAY_TYPING_PER_SEC", default_value_t = 2)]
    pub typing_per_sec: u32,
    /// Messages all of a user's connections on this gateway may send per second together,
    /// bursts of twice that; beyond it they are refused with `rate_limited`. 0: no limit.
    #[arg(long, env = "GATEWAY_USER_MESSAGES_PER_SEC", default_value_t = 100)]
    pub user_messages_per_sec: u32,
    /// Group operations, presence and who-read queries per second per user on this gateway.
    #[arg(long, env = "GATEWAY_USER_OPS_PER_SEC", default_value_t = 20)]
    pub user_ops_per_sec: u32,
    /// Typing indicators per second per user on this gateway (excess ones are dropped).
    #[arg(long, env = "GATEWAY_USER_TYPING_PER_SEC", default_value_t = 4)]
    pub user_typing_per_sec: u32,
    /// Concurrent connections one user may hold on this gateway; more are refused at the upgrade
    /// with HTTP 429. 0: no cap.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_USER", default_value_t = 10)]
    pub max_connections_per_user: u32,
    /// On SIGTERM, how long to wait for in-flight publishes before exiting.
    #[arg(long, env = "GATEWAY_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    pub drain_timeout_secs: u64,
    /// glommio io memory per executor, bytes (must fit RLIMIT_MEMLOCK across executors).
    #[arg(long, env = "GATEWAY_IO_MEMORY", default_value_t = 512 * 1024)]
    pub io_memory: usize,
    /// io_uring submission queue entries per ring of each executor. Besides batching, this
    /// sizes the kernel's table of armed polls (one per idle connection) that every
    /// cancellation searches; glommio cancels a timeout each time the executor wakes, so a
    /// small table costs CPU in proportion to the connections held (see ARCHITECTURE.md).
    #[arg(long, env = "GATEWAY_RING_DEPTH", default_value_t = 4096)]
    pub ring_depth: usize,
}

impl Config {
    /// Parses the flags and reads the token keys.
    pub fn load() -> anyhow::Result<(Self, TokenKeys)> {
        let cfg = Config::parse();
        if cfg.max_body + 1024 > cfg.max_frame {
            bail!("--max-frame must exceed --max-body by at least 1 KiB of framing");
        }
        if cfg.tls_cert.is_some() != cfg.tls_key.is_some() {
            bail!("--tls-cert and --tls-key (GATEWAY_TLS_CERT, GATEWAY_TLS_KEY) go together: give both or neither");
        }
        let keys = match &cfg.jwt_public_key_file {
            Some(p) => {
                let pem = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                let alg: PublicKeyAlg = cfg.jwt_algorithm.parse().map_err(anyhow::Error::msg)?;
                let keys = TokenKeys::public_key(alg, &pem, cfg.token_leeway_secs).map_err(anyhow::Error::msg)?;
                if cfg.dev_tokens {
                    bail!("--dev-tokens needs a shared secret to mint tokens, not a public key");
                }
                keys
            }
            None => {
                let secret = match &cfg.jwt_secret_file {
                    Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
                    None => std::env::var("JWT_SECRET").unwrap_or_default().into_bytes(),
                };
                let secret = trim_ascii(secret);
                if secret.len() < 16 {
                    bail!("the token secret (JWT_SECRET or --jwt-secret-file) must be at least 16 bytes");
                }
                TokenKeys::hs256(&secret, cfg.token_leeway_secs)
            }
        };
        Ok((cfg, keys))
    }

    pub fn cores(&self) -> usize {
        self.cores.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1)
    }

    /// The per-user limits of this gateway process.
    pub fn user_rates(&self) -> crate::user_limits::UserRates {
        crate::user_limits::UserRates {
            messages_per_sec: self.user_messages_per_sec,
            ops_per_sec: self.user_ops_per_sec,
            typing_per_sec: self.user_typing_per_sec,
            max_connections: self.max_connections_per_user,
        }
    }

    /// The certificate chain and key files when the listener speaks TLS.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }
}

fn trim_ascii(mut v: Vec<u8>) -> Vec<u8> {
    while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
        v.pop();
    }
    v
}
