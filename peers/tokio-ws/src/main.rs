//! peer-tokio-ws: a reference WebSocket chat server written the idiomatic tokio-tungstenite way
//! (one task per connection, an unbounded channel per connection feeding its writer, a shared
//! registry behind a mutex — the shape of tokio-tungstenite's own chat example), speaking the
//! subset of PROTOCOL.md that `loadgen peer` drives: the authenticated upgrade, `hello`/`synced`,
//! `send`, `group_create`, `gsend`, `ack`, `ping`.
//!
//! It is the comparison point for the gateway in `loadgen peer`, so it gets no handicap: a release
//! build, a multi-thread runtime with a worker per core, mimalloc like the gateway, TCP_NODELAY,
//! and the gateway's own per-connection WebSocket limits (read buffer, frame and message cap).
//! What it leaves out, all in its favour: nothing is stored (a message to an offline user is
//! dropped), no dedup of retried ids, no receipts, cursors, presence or heartbeat timeout, and
//! messages are delivered to the recipient's connections directly from the sender's task.
//!
//! Tokens: HS256 JWTs verified with `JWT_SECRET` exactly as the gateway does (signature, `exp`,
//! `sub`; the device from `dev`, else the `device` query parameter, else `default`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::{future, pin_mut, StreamExt, TryStreamExt};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

mod hub;

use hub::{Hub, Out};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "peer-tokio-ws", version, about = "Reference tokio-tungstenite chat server for `loadgen peer`")]
struct Cli {
    /// Address to listen on (WebSocket upgrades on the path /ws).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Runtime worker threads (default: the number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Per-connection socket read buffer, bytes (the gateway's default `--read-buffer`).
    #[arg(long, default_value_t = 2048)]
    read_buffer: usize,
    /// Largest WebSocket frame or message, bytes (the gateway's default `--max-frame`).
    #[arg(long, default_value_t = 64 * 1024)]
    max_frame: usize,
    /// HS256 token secret, like the gateway's. Prefer the environment variable.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    dev: Option<String>,
}

struct Auth {
    key: DecodingKey,
    validation: Validation,
}

impl Auth {
    fn new(secret: &[u8]) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 30;
        validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        Auth { key: DecodingKey::from_secret(secret), validation }
    }

    /// `(user, device)` from the upgrade request, or the HTTP status and reason to refuse it.
    fn identify(&self, req: &Request) -> Result<(String, String), (StatusCode, &'static str)> {
        if req.uri().path() != "/ws" {
            return Err((StatusCode::NOT_FOUND, "not_found"));
        }
        let query = req.uri().query().unwrap_or("");
        let param =
            |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')));
        let bearer =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let token = bearer.or_else(|| param("token")).ok_or((StatusCode::UNAUTHORIZED, "token_missing"))?;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|_| (StatusCode::UNAUTHORIZED, "token_invalid"))?
            .claims;
        let device = claims.dev.or_else(|| param("device").map(str::to_owned)).unwrap_or_else(|| "default".into());
        if !hub::valid_id(&claims.sub) || device.len() > 32 || !hub::valid_id(&device) {
            return Err((StatusCode::BAD_REQUEST, "bad_id"));
        }
        Ok((claims.sub, device))
    }
}

async fn connection(hub: Arc<Hub>, auth: Arc<Auth>, config: WebSocketConfig, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut who = None;
    // The callback's error type is tungstenite's (an HTTP response), not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        match auth.identify(req) {
            Ok(id) => {
                who = Some(id);
                Ok(resp)
            }
            Err((status, cause)) => {
                let mut e = ErrorResponse::new(Some(format!("{cause}\n")));
                *e.status_mut() = status;
                Err(e)
            }
        }
    };
    let accept = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let ws = match tokio::time::timeout(Duration::from_secs(10), accept).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(_)) | Err(_) => return,
    };
    let Some((user, device)) = who else { return };

    let (tx, rx) = futures::channel::mpsc::unbounded();
    let conn = hub.connect(user, device, tx);
    let (outgoing, incoming) = ws.split();
    let handle_incoming = incoming.try_for_each(|msg| {
        match msg {
            Message::Text(t) => hub.handle(&conn, t.as_str()),
            Message::Binary(_) => hub.binary(&conn),
            _ => {}
        }
        future::ok(())
    });
    let mut seq = 0u64;
    let write_outgoing = rx
        .map(move |o| {
            Ok(Message::text(match o {
                Out::Frame(s) => s,
                Out::Item(item) => {
                    seq += 1;
                    format!(r#"{{"t":"msg","seq":{seq},"m":{item}}}"#)
                }
            }))
        })
        .forward(outgoing);
    pin_mut!(handle_incoming, write_outgoing);
    future::select(handle_incoming, write_outgoing).await;
    hub.disconnect(&conn);
}

fn main() {
    let cli = Cli::parse();
    if cli.jwt_secret.is_empty() {
        eprintln!("peer-tokio-ws: JWT_SECRET (or --jwt-secret) must be set");
        std::process::exit(2);
    }
    let threads =
        cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peer-tokio-ws: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(cli.read_buffer)
        .max_message_size(Some(cli.max_frame))
        .max_frame_size(Some(cli.max_frame));
    let res: std::io::Result<()> = rt.block_on(async move {
        let socket = if cli.listen.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(cli.listen)?;
        let listener = socket.listen(4096)?;
        eprintln!("peer-tokio-ws: listening on ws://{}/ws with {threads} worker threads", cli.listen);
        let hub = Arc::new(Hub::default());
        let auth = Arc::new(Auth::new(cli.jwt_secret.as_bytes()));
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(connection(hub.clone(), auth.clone(), config, stream));
                }
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    eprintln!("peer-tokio-ws: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    if let Err(e) = res {
        eprintln!("peer-tokio-ws: {e}");
        std::process::exit(2);
    }
}
