//! One client connection: TCP from a chosen loopback source address, the authenticated WebSocket
//! upgrade, the `hello`/`synced` opening, and decoding of server frames.

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use futures::StreamExt;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Gateway WebSocket URL options shared by the scenarios that talk to gateways.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Gateway WebSocket URL, ws:// or wss://; repeat to spread connections over several
    /// gateways (round-robin).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws")]
    pub urls: Vec<String>,
    /// PEM certificates to trust for wss:// URLs (e.g. the gateway's self-signed certificate).
    /// Default: the system's root certificates.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// HS256 token secret (same as the gateway's JWT_SECRET); tokens are minted locally. Prefer
    /// the environment variable: the value is redacted from recorded command lines anyway.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// First loopback source address; client sockets bind to consecutive addresses from here so
    /// that each (source, destination) pair has its own ephemeral port range.
    #[arg(long, default_value = "127.0.1.1")]
    pub source_ip_base: Ipv4Addr,
    /// How many source addresses to use (0: no bind, the kernel picks 127.0.0.1).
    #[arg(long, default_value_t = 32)]
    pub source_ips: u32,
    /// The gateway's Prometheus endpoint(s) (e.g. http://127.0.0.1:9101/metrics), read before and
    /// after the run; repeat for several gateways.
    #[arg(long = "metrics-url")]
    pub metrics_urls: Vec<String>,
}

/// A resolved gateway URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// The TLS client configuration for a wss:// URL.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

pub async fn resolve(url: &str, tls: &Option<Arc<rustls::ClientConfig>>) -> anyhow::Result<Target> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("ws://") {
        (rest, None)
    } else if let Some(rest) = url.strip_prefix("wss://") {
        (rest, Some(tls.clone().ok_or_else(|| anyhow!("no TLS configuration for {url}"))?))
    } else {
        bail!("only ws:// and wss:// URLs are supported: {url}");
    };
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    // The default ports of the schemes, as a client library would use them.
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:{}", if tls.is_some() { 443 } else { 80 })
    };
    let addr = tokio::net::lookup_host(&hostport)
        .await
        .with_context(|| format!("resolving {hostport}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| anyhow!("{hostport} has no IPv4 address"))?;
    Ok(Target { url: url.to_owned(), addr, tls })
}

/// Resolves every URL; the TLS configuration (trusting `ca_file`, else the system's roots) is
/// built once, only when a wss:// URL needs it.
pub async fn resolve_all(urls: &[String], ca_file: Option<&Path>) -> anyhow::Result<Vec<Target>> {
    let tls = if urls.iter().any(|u| u.starts_with("wss://")) { Some(tls_config(ca_file)?) } else { None };
    let mut v = Vec::new();
    for u in urls {
        v.push(resolve(u, &tls).await?);
    }
    if v.is_empty() {
        anyhow::bail!("no gateway URL given");
    }
    Ok(v)
}

/// A rustls client configuration (ring; TLS 1.3 and 1.2; ALPN http/1.1) trusting the
/// certificates of `ca_file`, or the system's root certificates.
pub fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))? {
                let cert = cert.with_context(|| format!("{}: not valid PEM", path.display()))?;
                roots.add(cert).with_context(|| format!("{}: a certificate rustls cannot use", path.display()))?;
            }
            if roots.is_empty() {
                bail!("{}: no PEM certificate in it", path.display());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                bail!("no system root certificates found (pass --ca-file): {:?}", native.errors);
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Small buffers: most load-test connections are idle, and thousands of them share the machine
/// with the system under test.
pub fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Why a connection attempt failed: a short `cause` (grouped in reports) and the detail.
#[derive(Debug, Clone)]
pub struct Fail {
    pub cause: String,
    pub detail: String,
}

impl Fail {
    pub fn new(cause: impl Into<String>, detail: impl Into<String>) -> Self {
        Fail { cause: cause.into(), detail: detail.into() }
    }
}

fn io_cause(stage: &str, e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE) {
        return "fd_limit".into();
    }
    let k = match e.kind() {
        K::ConnectionRefused => "refused",
        K::ConnectionReset => "reset",
        K::TimedOut => "timeout",
        K::AddrInUse => "addr_in_use",
        K::AddrNotAvailable => "addr_not_available",
        K::BrokenPipe => "broken_pipe",
        K::UnexpectedEof => "eof",
        _ => "io_error",
    };
    format!("{stage}_{k}")
}

/// Time spent in each step of the opening, microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// TCP connect.
    pub tcp_us: u64,
    /// TCP connect through the `101 Switching Protocols` response (with the TLS handshake for
    /// wss://).
    pub upgrade_us: u64,
    /// Through the `hello` frame.
    pub hello_us: u64,
    /// Through `synced` (the inbox is drained; the session is live).
    pub synced_us: u64,
}

pub struct Opened {
    pub ws: Ws,
    pub timings: Timings,
    pub heartbeat_ms: u64,
    /// Frames received during the opening other than hello/synced (inbox items of a reused user).
    pub early: Vec<String>,
}

/// Connects, upgrades with `Authorization: Bearer <token>`, and waits for `hello` and `synced`.
/// The whole opening is bounded by `timeout`.
pub async fn open(
    target: &Target,
    token: &str,
    source: Option<Ipv4Addr>,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<Opened, Fail> {
    let started = Instant::now();
    match tokio::time::timeout(timeout, open_inner(target, token, source, config, started)).await {
        Ok(r) => r,
        Err(_) => Err(Fail::new("timeout", format!("opening took over {timeout:?}"))),
    }
}

/// TCP connect (from `source`, when given) to `target` and the authenticated WebSocket upgrade
/// of `url` (the target's URL, possibly with query parameters such as `since`). Returns the
/// socket and the TCP connect time in microseconds since `started`.
pub async fn upgrade(
    target: &Target,
    url: &str,
    token: &str,
    source: Option<Ipv4Addr>,
    config: WebSocketConfig,
    started: Instant,
) -> Result<(Ws, u64), Fail> {
    let sock = TcpSocket::new_v4().map_err(|e| Fail::new(io_cause("socket", &e), e.to_string()))?;
    if let Some(ip) = source {
        // Choose the port at connect() time, per destination, not at bind() time: otherwise
        // every bound socket takes a port of the source address for every destination.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a correctly sized int option.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))
            .map_err(|e| Fail::new(io_cause("bind", &e), format!("{ip}: {e}")))?;
    }
    let stream = sock.connect(target.addr).await.map_err(|e| Fail::new(io_cause("tcp", &e), e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let tcp_us = started.elapsed().as_micros() as u64;

    let mut req = url.into_client_request().map_err(|e| Fail::new("bad_url", e.to_string()))?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().map_err(|_| Fail::new("bad_token", "token is not a valid header value"))?,
    );
    let connector = match &target.tls {
        Some(tls) => Connector::Rustls(tls.clone()),
        None => Connector::Plain,
    };
    let (ws, _resp) = tokio_tungstenite::client_async_tls_with_config(req, stream, Some(config), Some(connector))
        .await
        .map_err(|e| upgrade_fail(&e))?;
    Ok((ws, tcp_us))
}

async fn open_inner(
    target: &Target,
    token: &str,
    source: Option<Ipv4Addr>,
    config: WebSocketConfig,
    started: Instant,
) -> Result<Opened, Fail> {
    let mut t = Timings::default();
    let (mut ws, tcp_us) = upgrade(target, &target.url, token, source, config, started).await?;
    t.tcp_us = tcp_us;
    t.upgrade_us = started.elapsed().as_micros() as u64;

    let mut heartbeat_ms = 30_000;
    let mut early = Vec::new();
    loop {
        let msg = match ws.next().await {
            None => return Err(Fail::new("closed_before_synced", "stream ended")),
            Some(Err(e)) => return Err(ws_fail("opening", &e)),
            Some(Ok(m)) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(f) => {
                let code = f.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                let reason = f.map(|f| f.reason.to_string()).unwrap_or_default();
                return Err(Fail::new(format!("closed_{code}"), reason));
            }
            _ => continue,
        };
        let f = Frame::parse(text.as_str()).map_err(|e| Fail::new("bad_frame", format!("{e}: {}", text.as_str())))?;
        match &*f.t {
            "hello" => {
                t.hello_us = started.elapsed().as_micros() as u64;
                heartbeat_ms = f.heartbeat_ms.unwrap_or(heartbeat_ms);
            }
            "synced" => {
                t.synced_us = started.elapsed().as_micros() as u64;
                return Ok(Opened { ws, timings: t, heartbeat_ms, early });
            }
            "error" => {
                return Err(Fail::new(
                    format!("error_{}", f.code.as_deref().unwrap_or("unknown")),
                    f.msg.as_deref().unwrap_or("").to_owned(),
                ))
            }
            _ => early.push(text.as_str().to_owned()),
        }
    }
}

fn upgrade_fail(e: &WsError) -> Fail {
    match e {
        WsError::Http(resp) => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).trim().to_owned()).unwrap_or_default();
            Fail::new(format!("http_{}", resp.status().as_u16()), body)
        }
        other => ws_fail("upgrade", other),
    }
}

/// Classifies a WebSocket error during stage `stage`.
pub fn ws_fail(stage: &str, e: &WsError) -> Fail {
    let cause = match e {
        WsError::Io(io) => io_cause(stage, io),
        WsError::ConnectionClosed | WsError::AlreadyClosed => format!("{stage}_closed"),
        // The peer's TCP connection ended without a close frame: a killed or vanished server.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => format!("{stage}_reset_without_close"),
        WsError::Protocol(_) => format!("{stage}_protocol"),
        WsError::Capacity(_) => format!("{stage}_capacity"),
        WsError::Http(r) => format!("http_{}", r.status().as_u16()),
        _ => format!("{stage}_error"),
    };
    Fail::new(cause, e.to_string())
}

/// A server frame, decoded leniently into the union of the fields loadgen needs. Unknown frame
/// types and fields are ignored, like the protocol asks of clients.
#[allow(dead_code)] // Decoded for completeness and debugging; not every field is used.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    #[serde(borrow)]
    pub t: Cow<'a, str>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub sid: Option<u64>,
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub dup: Option<bool>,
    #[serde(default)]
    pub heartbeat_ms: Option<u64>,
    #[serde(default)]
    pub resume_from: Option<u64>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub msg: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub m: Option<Item<'a>>,
}

/// The stored item inside a `msg` frame.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
pub struct Item<'a> {
    #[serde(borrow)]
    pub k: Cow<'a, str>,
    #[serde(default, borrow)]
    pub from: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub body: Option<Cow<'a, str>>,
    #[serde(default)]
    pub ts: Option<u64>,
    #[serde(default)]
    pub up_to: Option<u64>,
}

impl<'a> Frame<'a> {
    pub fn parse(s: &'a str) -> Result<Frame<'a>, serde_json::Error> {
        serde_json::from_str(s)
    }
}

pub const PING: &str = r#"{"t":"ping"}"#;

/// `url` with `key=value` added to its query string.
pub fn with_query(url: &str, key: &str, value: impl std::fmt::Display) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={value}")
}

pub fn ack_frame(seq: u64) -> String {
    format!(r#"{{"t":"ack","seq":{seq}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_ws_and_wss_urls() {
        let t = resolve("ws://127.0.0.1:8080/ws", &None).await.unwrap();
        assert_eq!((t.addr.to_string().as_str(), t.tls.is_some()), ("127.0.0.1:8080", false));
        let t = resolve("ws://127.0.0.1/ws?x=1", &None).await.unwrap();
        assert_eq!(t.addr.port(), 80);
        assert!(resolve("wss://127.0.0.1/ws", &None).await.is_err(), "wss:// without a TLS configuration");
        assert!(resolve("http://127.0.0.1:8080/ws", &None).await.is_err());

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let urls = ["wss://127.0.0.1/ws".to_owned(), "ws://127.0.0.1:8080/ws".to_owned()];
        let targets = resolve_all(&urls, Some(&ca)).await.unwrap();
        assert_eq!(targets[0].addr.port(), 443);
        let tls = targets[0].tls.as_ref().expect("wss:// has a TLS configuration");
        assert_eq!(tls.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(targets[1].tls.is_none());

        // A CA file that is missing or holds no certificate is an error that names it.
        let e = format!("{:#}", resolve_all(&urls, Some(&dir.path().join("nope.pem"))).await.unwrap_err());
        assert!(e.contains("nope.pem"), "{e}");
        std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        let e = format!("{:#}", resolve_all(&urls, Some(&dir.path().join("key.pem"))).await.unwrap_err());
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn decodes_server_frames() {
        let f = Frame::parse(r#"{"t":"sent","id":"7-123","sid":43,"ts":1,"dup":false}"#).unwrap();
        assert_eq!((&*f.t, f.sid, f.id.as_deref()), ("sent", Some(43), Some("7-123")));
        let f = Frame::parse(
            r#"{"t":"msg","seq":44,"m":{"k":"chat","from":"a-1","dev":"lg","id":"1-2","body":"1 2 xx","ts":5,"extra":[1]}}"#,
        )
        .unwrap();
        let m = f.m.unwrap();
        assert_eq!((&*m.k, m.from.as_deref(), m.body.as_deref()), ("chat", Some("a-1"), Some("1 2 xx")));
        let f = Frame::parse(
            r#"{"t":"msg","seq":45,"m":{"k":"receipt","from":"b","status":"delivered","up_to":43,"ts":9}}"#,
        )
        .unwrap();
        assert_eq!(f.m.unwrap().up_to, Some(43));
        let f = Frame::parse(r#"{"t":"error","code":"bad_json","msg":"x \"y\""}"#).unwrap();
        assert_eq!(f.msg.as_deref(), Some("x \"y\""));
        assert!(Frame::parse(r#"{"t":"future","whatever":{"a":1}}"#).is_ok());
        let f = Frame::parse(r#"{"t":"hello","user":"u","heartbeat_ms":30000,"resume_from":41}"#).unwrap();
        assert_eq!((f.heartbeat_ms, f.resume_from), (Some(30000), Some(41)));
    }

    #[test]
    fn query_parameters() {
        assert_eq!(with_query("ws://h:1/ws", "since", 7), "ws://h:1/ws?since=7");
        assert_eq!(with_query("ws://h:1/ws?device=a", "since", 7), "ws://h:1/ws?device=a&since=7");
    }
}
