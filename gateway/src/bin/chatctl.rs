//! `chatctl`: operator commands against a running system.
//!
//! * `chatctl revoke --user alice` closes every session of alice and refuses her tokens issued
//!   until now (she signs in again to get a new one); `chatctl unrevoke --user alice` lifts it.
//! * `chatctl token --user alice [--device web] [--ttl-secs 3600]` mints an HS256 token with the
//!   shared secret (env JWT_SECRET or --jwt-secret-file), for scripts and debugging.
//! * `chatctl nats-config --dir DIR` writes the NATS authorization of the system: `DIR/auth.conf`
//!   (accounts and per-service permissions, to include from the nats-server config) and one nkey
//!   seed per role (`DIR/<role>.nk`, mode 0600; existing ones are kept). SECURITY.md lists what
//!   each role may do.

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use protocol::groups::Revocation;
use protocol::{subjects, TokenKeys, UserId};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "chatctl", about = "Operator commands: revoke sessions, mint tokens, generate the NATS authorization")]
struct Cli {
    #[command(flatten)]
    nats: bus::NatsArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Close all of a user's sessions and refuse the tokens issued so far.
    Revoke {
        #[arg(long)]
        user: String,
    },
    /// Lift a revocation.
    Unrevoke {
        #[arg(long)]
        user: String,
    },
    /// Mint a token (HS256, shared secret from env JWT_SECRET or --jwt-secret-file).
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: Option<String>,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        #[arg(long, env = "GATEWAY_JWT_SECRET_FILE")]
        jwt_secret_file: Option<std::path::PathBuf>,
    },
    /// Write the nats-server authorization (DIR/auth.conf) and one nkey seed per service role
    /// (DIR/<role>.nk). Seeds already in DIR are kept, so running it again after an upgrade
    /// updates the permissions without changing any credential.
    NatsConfig {
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Revoke { user } | Cmd::Unrevoke { user } if UserId::parse(&user).is_err() => {
            bail!("{user:?} is not a valid user id")
        }
        Cmd::Revoke { user } => {
            let mut admin = Admin::connect(&cli.nats).await?;
            let kv = admin.revocations().await?;
            let before = protocol::now_ms() / 1000 + 1;
            let value = serde_json::to_vec(&Revocation { before })?;
            let res = kv.put(&user, value.into()).await.context("writing the revocation");
            admin.explain(res)?;
            println!("revoked {user}: tokens issued before {before} are refused, sessions closed");
        }
        Cmd::Unrevoke { user } => {
            let mut admin = Admin::connect(&cli.nats).await?;
            let kv = admin.revocations().await?;
            let res = kv.delete(&user).await.context("deleting the revocation");
            admin.explain(res)?;
            println!("lifted the revocation of {user}");
        }
        Cmd::Token { user, device, ttl_secs, jwt_secret_file } => {
            let secret = match jwt_secret_file {
                Some(p) => std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                None => std::env::var("JWT_SECRET").context("set JWT_SECRET or --jwt-secret-file")?.into_bytes(),
            };
            let secret = String::from_utf8_lossy(&secret).trim().to_owned();
            UserId::parse(&user).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", TokenKeys::hs256(secret.as_bytes(), 0).mint(&user, device.as_deref(), ttl_secs));
        }
        Cmd::NatsConfig { dir } => {
            let g = bus::auth::write_dir(&dir, &[])?;
            println!(
                "wrote {} (accounts {} and {})",
                g.config.display(),
                bus::auth::CHAT_ACCOUNT,
                bus::auth::BENCH_ACCOUNT
            );
            for (role, path) in &g.seeds {
                let state = if g.new_keys.contains(role) { "new" } else { "kept" };
                println!("  {:<8} {} ({state})", role.name(), path.display());
            }
            println!(
                "include it from the nats-server config (include \"{}\") and start each service with \
                 --nats-nkey-file <dir>/<role>.nk (env NATS_NKEY_FILE); reload the server (nats-server --signal \
                 reload) after running this again",
                g.config.display()
            );
        }
    }
    Ok(())
}

/// A connection as the admin role. The server's refusals (credentials, permissions) are kept, so
/// that a failed command says why rather than only that it timed out.
struct Admin {
    js: async_nats::jetstream::Context,
    events: tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
}

impl Admin {
    async fn connect(nats: &bus::NatsArgs) -> anyhow::Result<Admin> {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let client = bus::connect(nats, bus::Role::Admin, "chatctl", Some(tx)).await?;
        Ok(Admin { js: async_nats::jetstream::new(client), events })
    }

    async fn revocations(&mut self) -> anyhow::Result<async_nats::jetstream::kv::Store> {
        let res = self.js.get_key_value(subjects::REVOCATIONS_BUCKET).await;
        self.explain(res.context("opening the revocations bucket (is NATS up, and storage running?)"))
    }

    /// `res`, with the server's refusals so far added to its error.
    fn explain<T>(&mut self, res: anyhow::Result<T>) -> anyhow::Result<T> {
        let mut refused = Vec::new();
        while let Ok(ev) = self.events.try_recv() {
            if let async_nats::Event::ServerError(e) = &ev {
                refused.push(e.to_string());
            }
            if let async_nats::Event::ClientError(e) = &ev {
                refused.push(e.to_string());
            }
        }
        refused.dedup();
        res.map_err(|e| {
            if refused.is_empty() {
                return e;
            }
            e.context(format!(
                "NATS refused: {}. chatctl connects as the admin role: --nats-nkey-file <dir>/admin.nk from \
                 `chatctl nats-config` (or its --nats-user / --nats-creds)",
                refused.join("; ")
            ))
        })
    }
}
