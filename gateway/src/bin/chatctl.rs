//! `chatctl`: operator commands against a running system.
//!
//! * `chatctl revoke --user alice` closes every session of alice and refuses her tokens issued
//!   until now (she signs in again to get a new one); `chatctl unrevoke --user alice` lifts it.
//! * `chatctl token --user alice [--device web] [--ttl-secs 3600]` mints an HS256 token with the
//!   shared secret (env JWT_SECRET or --jwt-secret-file), for scripts and debugging.

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use protocol::groups::Revocation;
use protocol::{subjects, TokenKeys, UserId};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "chatctl", about = "Operator commands: revoke sessions, mint tokens")]
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
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Revoke { user } | Cmd::Unrevoke { user } if UserId::parse(&user).is_err() => {
            bail!("{user:?} is not a valid user id")
        }
        Cmd::Revoke { user } => {
            let kv = revocations(&cli.nats).await?;
            let before = protocol::now_ms() / 1000 + 1;
            let value = serde_json::to_vec(&Revocation { before })?;
            kv.put(&user, value.into()).await.context("writing the revocation")?;
            println!("revoked {user}: tokens issued before {before} are refused, sessions closed");
        }
        Cmd::Unrevoke { user } => {
            let kv = revocations(&cli.nats).await?;
            kv.delete(&user).await.context("deleting the revocation")?;
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
    }
    Ok(())
}

async fn revocations(nats: &bus::NatsArgs) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    let client = tokio::time::timeout(std::time::Duration::from_secs(10), bus::connect(nats, "chatctl", None))
        .await
        .context("NATS did not answer")??;
    let js = async_nats::jetstream::new(client);
    js.get_key_value(subjects::REVOCATIONS_BUCKET).await.context("the revocations bucket (is storage running?)")
}
