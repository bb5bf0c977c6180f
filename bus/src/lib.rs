//! NATS JetStream plumbing shared by the services: connecting, the definitions of the streams and
//! buckets (owned and provisioned by `storage`, awaited by everyone else), inbox reads, and the
//! NATS authorization of each service role ([`auth`]).

pub mod auth;
pub mod inbox;
pub mod streams;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub use auth::Role;
pub use streams::{provision, wait_ready, StreamSettings};

/// Flags every service uses to reach NATS. At most one way to authenticate: an nkey seed file
/// (what `chatctl nats-config` generates), a user and password, or a JWT credentials file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s); several, comma-separated, for a cluster.
    #[arg(long = "nats-url", env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub url: String,
    /// A NATS credentials file (JWT), for a server in operator mode.
    #[arg(long = "nats-creds", env = "NATS_CREDS", conflicts_with_all = ["nkey_file", "user"])]
    pub creds: Option<PathBuf>,
    /// A file holding this service's nkey seed (`SU…`), as written by `chatctl nats-config`.
    #[arg(long = "nats-nkey-file", env = "NATS_NKEY_FILE", conflicts_with = "user")]
    pub nkey_file: Option<PathBuf>,
    /// NATS user name; the password comes from --nats-password-file or the environment variable
    /// NATS_PASSWORD (never from the command line).
    #[arg(long = "nats-user", env = "NATS_USER")]
    pub user: Option<String>,
    /// A file holding the NATS password of --nats-user.
    #[arg(long = "nats-password-file", env = "NATS_PASSWORD_FILE", requires = "user")]
    pub password_file: Option<PathBuf>,
}

impl NatsArgs {
    pub fn new(url: impl Into<String>) -> Self {
        NatsArgs { url: url.into(), ..Default::default() }
    }

    /// With the nkey seed in `path`.
    pub fn with_nkey_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.nkey_file = Some(path.into());
        self
    }

    /// How these arguments authenticate, with the secrets read from their files (or the
    /// environment). Errors name the file or setting at fault.
    pub fn auth(&self) -> anyhow::Result<Auth> {
        let read = |p: &PathBuf, what: &str| -> anyhow::Result<String> {
            let s = std::fs::read_to_string(p).with_context(|| format!("reading the {what} file {}", p.display()))?;
            let s = s.trim().to_owned();
            if s.is_empty() {
                bail!("the {what} file {} is empty", p.display());
            }
            Ok(s)
        };
        if let Some(p) = &self.creds {
            return Ok(Auth::Creds(p.clone()));
        }
        if let Some(p) = &self.nkey_file {
            let seed = read(p, "NATS nkey seed")?;
            // Checked here so that a wrong file is reported as such, not as a refused connection.
            auth::Identity::from_seed(Role::Gateway, &seed)
                .with_context(|| format!("the NATS nkey seed file {}", p.display()))?;
            return Ok(Auth::Nkey(seed));
        }
        if let Some(user) = &self.user {
            let password = match &self.password_file {
                Some(p) => read(p, "NATS password")?,
                None => match std::env::var("NATS_PASSWORD") {
                    Ok(p) if !p.is_empty() => p,
                    _ => bail!(
                        "--nats-user needs a password: --nats-password-file or the environment variable NATS_PASSWORD"
                    ),
                },
            };
            return Ok(Auth::UserPassword(user.clone(), password));
        }
        Ok(Auth::None)
    }
}

/// How a service authenticates to NATS (see [`NatsArgs::auth`]).
pub enum Auth {
    None,
    /// A credentials file (user JWT and nkey seed).
    Creds(PathBuf),
    /// An nkey seed.
    Nkey(String),
    UserPassword(String, String),
}

/// The delay before reconnect attempt `attempt` (1 for the first): exponential from 50 ms,
/// capped at 1 s, each a random point in the upper half of its step ("equal jitter"), so that
/// the clients of a restarted server come back within about a second and not all at once.
/// async-nats' own default doubles from 2 ms up to 4 s, so a client could stay away up to 4 s
/// after the server was back.
pub fn reconnect_delay(attempt: usize) -> Duration {
    let step = reconnect_step(attempt);
    let half = step / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// The upper bound of [`reconnect_delay`] for `attempt`.
fn reconnect_step(attempt: usize) -> Duration {
    const FIRST: Duration = Duration::from_millis(50);
    const CAP: Duration = Duration::from_secs(1);
    let doublings = attempt.saturating_sub(1).min(16) as u32;
    FIRST.saturating_mul(1 << doublings).min(CAP)
}

/// How often a repeated refusal of the credentials is logged again.
const AUTH_ERROR_LOG_EVERY: Duration = Duration::from_secs(30);

/// Connects to NATS as `role`, retrying the first connection until a server answers and
/// reconnecting forever after that (see [`reconnect_delay`]). Replies come on the role's inbox
/// prefix ([`Role::inbox_prefix`]), which is what the generated permissions allow it to read.
/// `events` receives connection events (reconnects, slow consumers) so the caller can count
/// them and resync. A server that refuses the credentials or an operation is logged as an error.
pub async fn connect(
    args: &NatsArgs,
    role: Role,
    name: &str,
    events: Option<tokio::sync::mpsc::UnboundedSender<async_nats::Event>>,
) -> anyhow::Result<async_nats::Client> {
    let opts = options(args, role, name, events).await?;
    let urls = server_addrs(&args.url)?;
    opts.connect(urls).await.context("connecting to NATS")
}

/// The parsed server list of a `--nats-url` value.
pub fn server_addrs(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    url.split(',').map(|u| u.trim().parse()).collect::<Result<_, _>>().context("parsing NATS URL")
}

/// The connect options [`connect`] uses: name, credentials, inbox prefix, retries and reconnect
/// delays, request timeout and event logging.
pub async fn options(
    args: &NatsArgs,
    role: Role,
    name: &str,
    events: Option<tokio::sync::mpsc::UnboundedSender<async_nats::Event>>,
) -> anyhow::Result<async_nats::ConnectOptions> {
    let auth = args.auth()?;
    let started = Instant::now();
    // Milliseconds since `started` at which an authorization error was last logged (+1; 0: never).
    let auth_logged = Arc::new(AtomicU64::new(0));
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(role.inbox_prefix())
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .event_callback(move |ev| {
            let events = events.clone();
            let auth_logged = auth_logged.clone();
            async move {
                log_event(&ev, role, started, &auth_logged);
                if let Some(tx) = events {
                    let _ = tx.send(ev);
                }
            }
        });
    opts = match auth {
        Auth::None => opts,
        Auth::Creds(p) => {
            opts.credentials_file(&p).await.with_context(|| format!("reading NATS credentials {}", p.display()))?
        }
        Auth::Nkey(seed) => opts.nkey(seed),
        Auth::UserPassword(user, password) => opts.user_and_password(user, password),
    };
    Ok(opts)
}

fn log_event(ev: &async_nats::Event, role: Role, started: Instant, auth_logged: &AtomicU64) {
    use async_nats::{ClientError, Event, ServerError};
    let refused = match ev {
        Event::ServerError(ServerError::AuthorizationViolation) => true,
        Event::ClientError(ClientError::Other(e)) => {
            let e = e.to_lowercase();
            e.contains("authorization violation") || e.contains("authentication")
        }
        _ => false,
    };
    if refused {
        // Retried about once a second: say it at once, then every AUTH_ERROR_LOG_EVERY.
        let now = started.elapsed().as_millis() as u64 + 1;
        let last = auth_logged.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= AUTH_ERROR_LOG_EVERY.as_millis() as u64 {
            auth_logged.store(now, Ordering::Relaxed);
            tracing::error!(
                event = %ev,
                role = role.name(),
                "NATS refused this service's credentials (authorization violation); check --nats-nkey-file \
                 (or --nats-user / --nats-creds) against the server's config. Retrying; not ready until it connects"
            );
        }
        return;
    }
    match ev {
        Event::ServerError(ServerError::Other(e)) if e.to_lowercase().contains("permissions violation") => {
            tracing::error!(
                event = %ev,
                role = role.name(),
                "NATS refused an operation of this service: its NATS permissions do not cover it (regenerate the \
                 server's authorization with this version's `chatctl nats-config`)"
            );
        }
        Event::ServerError(_) | Event::ClientError(_) => tracing::warn!(event = %ev, "nats connection event"),
        _ => tracing::info!(event = %ev, "nats connection event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn reconnect_delays_grow_from_50ms_to_1s_with_jitter() {
        assert_eq!(reconnect_step(0), Duration::from_millis(50));
        assert_eq!(reconnect_step(1), Duration::from_millis(50));
        assert_eq!(reconnect_step(2), Duration::from_millis(100));
        assert_eq!(reconnect_step(5), Duration::from_millis(800));
        assert_eq!(reconnect_step(6), Duration::from_secs(1));
        assert_eq!(reconnect_step(usize::MAX), Duration::from_secs(1));
        for attempt in 0..40 {
            let step = reconnect_step(attempt);
            for _ in 0..50 {
                let d = reconnect_delay(attempt);
                assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?} outside [{:?}, {step:?}]", step / 2);
            }
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        nats: NatsArgs,
    }

    fn parse(args: &[&str]) -> Result<NatsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("svc").chain(args.iter().copied())).map(|c| c.nats)
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("bus-natsargs-{}-{}-{name}", std::process::id(), protocol::now_ms()));
        std::fs::write(&p, contents).unwrap();
        p
    }

    #[test]
    fn one_way_to_authenticate_at_a_time() {
        assert!(parse(&["--nats-nkey-file", "a", "--nats-user", "u"]).is_err());
        assert!(parse(&["--nats-creds", "a", "--nats-nkey-file", "b"]).is_err());
        assert!(parse(&["--nats-password-file", "p"]).is_err(), "a password without a user");
        let a = parse(&["--nats-user", "u", "--nats-password-file", "p"]).unwrap();
        assert_eq!(a.user.as_deref(), Some("u"));
    }

    #[test]
    fn secrets_come_from_files_and_bad_files_are_named() {
        let id = auth::Identity::generate(Role::Storage).unwrap();
        let good = temp_file("good.nk", &format!("{}\n", id.seed()));
        assert!(matches!(NatsArgs::new("x").with_nkey_file(&good).auth().unwrap(), Auth::Nkey(s) if s == id.seed()));

        let bad = temp_file("bad.nk", "SUnotaseed");
        let e = format!("{:#}", NatsArgs::new("x").with_nkey_file(&bad).auth().err().unwrap());
        assert!(e.contains(&bad.display().to_string()), "{e}");
        let missing = NatsArgs::new("x").with_nkey_file("/nonexistent/storage.nk").auth().err().unwrap();
        assert!(format!("{missing:#}").contains("/nonexistent/storage.nk"));

        let pw = temp_file("pw", "s3cret\n");
        let args = NatsArgs { user: Some("svc".into()), password_file: Some(pw.clone()), ..NatsArgs::new("x") };
        assert!(matches!(args.auth().unwrap(), Auth::UserPassword(u, p) if u == "svc" && p == "s3cret"));
        let empty = temp_file("empty", "\n");
        let args = NatsArgs { user: Some("svc".into()), password_file: Some(empty.clone()), ..NatsArgs::new("x") };
        assert!(args.auth().is_err());
        assert!(matches!(NatsArgs::new("x").auth().unwrap(), Auth::None));
        for p in [good, bad, pw, empty] {
            let _ = std::fs::remove_file(p);
        }
    }
}
