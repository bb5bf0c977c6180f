//! Dialling a NATS server for the live multiplexer: the server list from `--nats-url`, TLS, the
//! `INFO` / `CONNECT` / `PING`-`PONG` handshake, and authentication from the same settings that
//! `bus::connect` uses for the gateway's main connection (a credentials file, or user and
//! password or a token in the URL).
//!
//! Adding an authentication mode is one variant of [`Credentials`], one arm in [`credentials`]
//! (where it comes from) and one in [`connect_json`] (what CONNECT carries).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::proto::{self, ServerOp};

/// How long one dial (TCP, TLS, handshake) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// The default `max_payload` when a server does not say (nats-server's own default).
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// The largest `max_payload` we accept from a server (nats-server allows at most 64 MiB).
const MAX_PAYLOAD_CAP: usize = 64 << 20;

/// One server of `--nats-url`.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerAddr {
    /// `tls://`: TLS whatever the server says.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// From the URL's userinfo, percent-decoded.
    pub user: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl ServerAddr {
    /// `nats://[user[:password]@]host[:port]`, `tls://…`, or `host[:port]` (nats://, port 4222).
    pub fn parse(s: &str) -> anyhow::Result<ServerAddr> {
        let s = s.trim();
        let full = if s.contains("://") { s.to_owned() } else { format!("nats://{s}") };
        let url = url::Url::parse(&full).with_context(|| format!("NATS URL {:?} is invalid", redact_url(s)))?;
        let tls = match url.scheme() {
            "nats" => false,
            "tls" => true,
            "ws" | "wss" => bail!(
                "NATS URL {}: WebSocket URLs are not supported by the gateway's live connection; use nats:// or tls://",
                redact_url(s)
            ),
            other => bail!("NATS URL {}: unknown scheme {other:?} (nats:// or tls://)", redact_url(s)),
        };
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(h) => h.to_string(),
            None => bail!("NATS URL {}: no host", redact_url(s)),
        };
        let decode = |v: &str| percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned();
        let user = (!url.username().is_empty()).then(|| decode(url.username()));
        let password = url.password().map(decode);
        Ok(ServerAddr { tls, host, port: url.port().unwrap_or(4222), user, password })
    }

    /// The address as logs show it: never the userinfo.
    pub fn redacted(&self) -> String {
        let scheme = if self.tls { "tls" } else { "nats" };
        let auth = if self.user.is_some() { "***@" } else { "" };
        if self.host.contains(':') {
            format!("{scheme}://{auth}[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{auth}{}:{}", self.host, self.port)
        }
    }
}

fn redact_url(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(i), Some(at)) if at > i => format!("{}***{}", &s[..i + 3], &s[at..]),
        (None, Some(at)) => format!("***{}", &s[at..]),
        _ => s.to_owned(),
    }
}

/// The server list of `--nats-url` (comma-separated).
pub fn parse_servers(urls: &str) -> anyhow::Result<Vec<ServerAddr>> {
    let servers: Vec<ServerAddr> =
        urls.split(',').filter(|u| !u.trim().is_empty()).map(ServerAddr::parse).collect::<Result<_, _>>()?;
    if servers.is_empty() {
        bail!("--nats-url names no server");
    }
    Ok(servers)
}

/// How the connection authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// An nkey seed (`--nats-nkey-file`): the public key and a signature of the server's nonce.
    Nkey(String),
    /// A NATS credentials file: a user JWT and the nkey seed that signs the server's nonce.
    /// Read at every connection, so a rotated file is picked up on the next reconnect.
    CredsFile(PathBuf),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            Credentials::Token(_) => f.write_str("Token(***)"),
            Credentials::Nkey(_) => f.write_str("Nkey(***)"),
            Credentials::CredsFile(p) => write!(f, "CredsFile({})", p.display()),
        }
    }
}

/// The credentials for `server`, as `bus::connect` would use them: the credentials file of
/// `--nats-creds` first, else the URL's userinfo (`user:password@`, or a lone `token@`).
pub fn credentials(args: &bus::NatsArgs, server: &ServerAddr) -> anyhow::Result<Credentials> {
    Ok(match args.auth()? {
        bus::Auth::Creds(path) => Credentials::CredsFile(path),
        bus::Auth::Nkey(seed) => Credentials::Nkey(seed),
        bus::Auth::UserPassword(user, password) => Credentials::UserPassword { user, password },
        bus::Auth::None => match (&server.user, &server.password) {
            (Some(user), Some(password)) => {
                Credentials::UserPassword { user: user.clone(), password: password.clone() }
            }
            (Some(token), None) => Credentials::Token(token.clone()),
            _ => Credentials::None,
        },
    })
}

/// What a server says about itself (the fields this client uses).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ServerInfo {
    #[serde(default)]
    pub server_id: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub max_payload: usize,
    #[serde(default)]
    pub headers: bool,
    #[serde(default)]
    pub tls_required: bool,
    #[serde(default)]
    pub nonce: Option<String>,
    /// Other servers of the cluster, `host:port`.
    #[serde(default)]
    pub connect_urls: Vec<String>,
    /// Lame duck mode: the server is about to shut down.
    #[serde(default)]
    pub ldm: bool,
}

impl ServerInfo {
    pub fn parse(json: &[u8]) -> anyhow::Result<ServerInfo> {
        serde_json::from_slice(json).context("server INFO is not valid JSON")
    }

    /// The bound on a message's size for the parser.
    pub fn max_payload(&self) -> usize {
        match self.max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n.min(MAX_PAYLOAD_CAP),
        }
    }
}

#[derive(Serialize)]
struct ConnectOptions<'a> {
    verbose: bool,
    pedantic: bool,
    tls_required: bool,
    name: &'a str,
    lang: &'a str,
    version: &'a str,
    /// 1: the server may send INFO updates (cluster changes, lame duck mode).
    protocol: u8,
    /// This connection never publishes; nothing of ours should come back.
    echo: bool,
    headers: bool,
    no_responders: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nkey: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<String>,
}

/// The JSON of the CONNECT operation for `creds`, signing the server's nonce where the mode
/// needs it. `creds_text` is the content of the credentials file for [`Credentials::CredsFile`].
pub fn connect_json(
    creds: &Credentials,
    creds_text: Option<&str>,
    name: &str,
    tls: bool,
    nonce: Option<&str>,
) -> anyhow::Result<String> {
    let mut opts = ConnectOptions {
        verbose: false,
        pedantic: false,
        tls_required: tls,
        name,
        lang: "rust-chat-live-mux",
        version: env!("CARGO_PKG_VERSION"),
        protocol: 1,
        echo: false,
        headers: true,
        no_responders: false,
        user: None,
        pass: None,
        auth_token: None,
        jwt: None,
        nkey: None,
        sig: None,
    };
    let parsed;
    match creds {
        Credentials::None => {}
        Credentials::UserPassword { user, password } => {
            opts.user = Some(user);
            opts.pass = Some(password);
        }
        Credentials::Token(token) => opts.auth_token = Some(token),
        Credentials::Nkey(seed) => {
            let nonce = nonce.context("the server sent no nonce to sign: is it configured for nkey authentication?")?;
            let key = nkeys::KeyPair::from_seed(seed).map_err(|e| anyhow::anyhow!("invalid NATS nkey seed: {e}"))?;
            let sig = key.sign(nonce.as_bytes()).map_err(|e| anyhow::anyhow!("signing the server nonce: {e}"))?;
            opts.nkey = Some(key.public_key());
            opts.sig = Some(URL_SAFE_NO_PAD.encode(sig));
        }
        Credentials::CredsFile(path) => {
            let text = creds_text.context("credentials file not read")?;
            parsed = parse_creds(text).with_context(|| format!("NATS credentials file {}", path.display()))?;
            let nonce = nonce.context("the server sent no nonce to sign: is it configured for JWT authentication?")?;
            let key = nkeys::KeyPair::from_seed(&parsed.1)
                .map_err(|e| anyhow::anyhow!("NATS credentials file {}: invalid nkey seed: {e}", path.display()))?;
            let sig = key.sign(nonce.as_bytes()).map_err(|e| anyhow::anyhow!("signing the server nonce: {e}"))?;
            opts.jwt = Some(&parsed.0);
            opts.sig = Some(URL_SAFE_NO_PAD.encode(sig));
        }
    }
    Ok(serde_json::to_string(&opts)?)
}

/// The user JWT and the nkey seed of a credentials file: the first two blocks framed by
/// `-----BEGIN …-----` / `------END …------` lines.
pub fn parse_creds(text: &str) -> anyhow::Result<(String, String)> {
    let mut blocks = Vec::new();
    let mut inside: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if t.len() >= 6 && t.starts_with("---") && t.ends_with("---") {
            match inside.take() {
                Some(block) => blocks.push(block),
                None => inside = Some(String::new()),
            }
        } else if let Some(block) = &mut inside {
            if block.is_empty() && !t.is_empty() {
                block.push_str(t);
            }
        }
    }
    let mut it = blocks.into_iter().filter(|b| !b.is_empty());
    let jwt = it.next().context("no user JWT block")?;
    let seed = it.next().context("no nkey seed block after the JWT")?;
    Ok((jwt, seed))
}

/// A connection, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An established, authenticated connection.
pub struct Connection {
    pub stream: Stream,
    /// Bytes read after the handshake's PONG (already the start of the live traffic).
    pub read_buf: Vec<u8>,
    pub info: ServerInfo,
}

/// Dials servers with one name and one set of settings.
pub struct Dialer {
    pub name: String,
    pub args: bus::NatsArgs,
    tls: OnceLock<Arc<rustls::ClientConfig>>,
}

impl Dialer {
    pub fn new(name: String, args: bus::NatsArgs) -> Dialer {
        Dialer { name, args, tls: OnceLock::new() }
    }

    /// Connects to `server` and completes the handshake (bounded by [`DIAL_TIMEOUT`]).
    pub async fn dial(&self, server: &ServerAddr) -> anyhow::Result<Connection> {
        tokio::time::timeout(DIAL_TIMEOUT, self.dial_inner(server))
            .await
            .map_err(|_| anyhow::anyhow!("no handshake within {DIAL_TIMEOUT:?}"))?
    }

    async fn dial_inner(&self, server: &ServerAddr) -> anyhow::Result<Connection> {
        let tcp = TcpStream::connect((server.host.as_str(), server.port)).await.context("TCP connect")?;
        tcp.set_nodelay(true)?;
        let mut stream = Stream::Plain(tcp);
        let mut buf = Vec::with_capacity(4096);
        let info = match next_op(&mut stream, &mut buf, DEFAULT_MAX_PAYLOAD).await? {
            Owned::Info(info) => info,
            other => bail!("expected INFO from the server, got {other:?}"),
        };
        let tls = server.tls || info.tls_required;
        if tls {
            if !buf.is_empty() {
                bail!("the server sent data after INFO before the TLS handshake");
            }
            let Stream::Plain(tcp) = stream else { unreachable!("TLS starts on a plain stream") };
            let config = self.tls_config()?;
            let name = rustls::pki_types::ServerName::try_from(server.host.clone())
                .with_context(|| format!("{:?} is not a valid TLS server name", server.host))?;
            let tls_stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.with_context(|| {
                format!("TLS handshake with {} (server tls_required: {})", server.redacted(), info.tls_required)
            })?;
            stream = Stream::Tls(Box::new(tls_stream));
        }
        if !info.headers {
            bail!("server {} does not support message headers (NATS 2.2 or later is required)", info.server_id);
        }
        let creds = credentials(&self.args, server)?;
        let creds_text = match &creds {
            Credentials::CredsFile(path) => Some(
                tokio::fs::read_to_string(path)
                    .await
                    .with_context(|| format!("reading NATS credentials file {}", path.display()))?,
            ),
            _ => None,
        };
        let json = connect_json(&creds, creds_text.as_deref(), &self.name, tls, info.nonce.as_deref())?;
        let mut out = Vec::with_capacity(json.len() + 16);
        proto::encode::connect(&mut out, &json);
        proto::encode::ping(&mut out);
        stream.write_all(&out).await?;
        stream.flush().await?;
        // The PONG says the server accepted CONNECT; an auth failure comes as -ERR instead.
        loop {
            match next_op(&mut stream, &mut buf, info.max_payload()).await? {
                Owned::Pong => break,
                Owned::Err(e) => bail!("server refused the connection: {e}"),
                Owned::Ping => {
                    let mut pong = Vec::new();
                    proto::encode::pong(&mut pong);
                    stream.write_all(&pong).await?;
                }
                Owned::Ok | Owned::Info(_) => {}
                Owned::Msg => bail!("message before the handshake completed"),
            }
        }
        Ok(Connection { stream, read_buf: buf, info })
    }

    fn tls_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        if let Some(c) = self.tls.get() {
            return Ok(c.clone());
        }
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "loading the system's CA certificates");
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            bail!(
                "TLS to NATS needs trusted CA certificates and the system store has none \
                 (install ca-certificates, or point SSL_CERT_FILE / SSL_CERT_DIR at the CA)"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(self.tls.get_or_init(|| Arc::new(config)).clone())
    }
}

/// A server operation of the handshake, owned.
#[derive(Debug)]
enum Owned {
    Info(ServerInfo),
    Ping,
    Pong,
    Ok,
    Err(String),
    Msg,
}

async fn next_op(stream: &mut Stream, buf: &mut Vec<u8>, max_payload: usize) -> anyhow::Result<Owned> {
    loop {
        if let Some((op, n)) = proto::parse(buf, max_payload)? {
            let owned = match op {
                ServerOp::Info(json) => Owned::Info(ServerInfo::parse(json)?),
                ServerOp::Ping => Owned::Ping,
                ServerOp::Pong => Owned::Pong,
                ServerOp::Ok => Owned::Ok,
                ServerOp::Err(e) => Owned::Err(e.to_owned()),
                ServerOp::Msg(_) => Owned::Msg,
            };
            buf.drain(..n);
            return Ok(owned);
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            bail!("the server closed the connection during the handshake");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        let s = parse_servers("nats://127.0.0.1:4222, tls://u%40x:p%3Aw@nats.example, 10.0.0.1,[::1]:5222").unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!((s[0].tls, s[0].host.as_str(), s[0].port, &s[0].user), (false, "127.0.0.1", 4222, &None));
        assert_eq!((s[1].tls, s[1].host.as_str(), s[1].port), (true, "nats.example", 4222));
        assert_eq!((s[1].user.as_deref(), s[1].password.as_deref()), (Some("u@x"), Some("p:w")));
        assert_eq!(s[1].redacted(), "tls://***@nats.example:4222");
        assert_eq!((s[2].host.as_str(), s[2].port), ("10.0.0.1", 4222));
        assert_eq!((s[3].host.as_str(), s[3].port), ("::1", 5222));
        assert_eq!(s[3].redacted(), "nats://[::1]:5222");
        for bad in ["ws://h:1", "http://h", "nats://", ""] {
            assert!(parse_servers(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_servers("wss://secret:pw@h").unwrap_err().to_string();
        assert!(!e.contains("secret") && !e.contains("pw@"), "{e}");
    }

    #[test]
    fn credentials_follow_the_settings() {
        let mut args = bus::NatsArgs::new("x");
        let plain = ServerAddr::parse("nats://h").unwrap();
        let up = ServerAddr::parse("nats://alice:s3cret@h").unwrap();
        let tok = ServerAddr::parse("nats://t0ken@h").unwrap();
        assert_eq!(credentials(&args, &plain).unwrap(), Credentials::None);
        assert_eq!(
            credentials(&args, &up).unwrap(),
            Credentials::UserPassword { user: "alice".into(), password: "s3cret".into() }
        );
        assert_eq!(credentials(&args, &tok).unwrap(), Credentials::Token("t0ken".into()));
        args.creds = Some("/etc/chat/gw.creds".into());
        assert_eq!(credentials(&args, &up).unwrap(), Credentials::CredsFile("/etc/chat/gw.creds".into()));
        assert!(!format!("{:?}", credentials(&bus::NatsArgs::new("x"), &up).unwrap()).contains("s3cret"));
    }

    fn json(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn connect_options_per_mode() {
        let v = json(&connect_json(&Credentials::None, None, "gw", false, None).unwrap());
        assert_eq!(
            (v["headers"].as_bool(), v["verbose"].as_bool(), v["protocol"].as_u64()),
            (Some(true), Some(false), Some(1))
        );
        assert!(v.get("user").is_none() && v.get("auth_token").is_none() && v.get("jwt").is_none());
        let up = Credentials::UserPassword { user: "a".into(), password: "p\"w".into() };
        let v = json(&connect_json(&up, None, "gw", true, None).unwrap());
        assert_eq!(
            (v["user"].as_str(), v["pass"].as_str(), v["tls_required"].as_bool()),
            (Some("a"), Some("p\"w"), Some(true))
        );
        let v = json(&connect_json(&Credentials::Token("t".into()), None, "gw", false, None).unwrap());
        assert_eq!(v["auth_token"], "t");
    }

    #[test]
    fn creds_file_signs_the_nonce() {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().unwrap();
        let text = format!(
            "-----BEGIN NATS USER JWT-----\neyJhbGciOiJlZDI1NTE5In0.e30.sig\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n*************************************************************\n"
        );
        assert_eq!(parse_creds(&text).unwrap(), ("eyJhbGciOiJlZDI1NTE5In0.e30.sig".to_owned(), seed.clone()));
        let creds = Credentials::CredsFile("gw.creds".into());
        let v = json(&connect_json(&creds, Some(&text), "gw", false, Some("n0nce")).unwrap());
        assert_eq!(v["jwt"], "eyJhbGciOiJlZDI1NTE5In0.e30.sig");
        let sig = URL_SAFE_NO_PAD.decode(v["sig"].as_str().unwrap()).unwrap();
        let public = nkeys::KeyPair::from_public_key(&user.public_key()).unwrap();
        public.verify(b"n0nce", &sig).expect("the signature verifies with the user's public key");
        // No nonce (a server not set up for JWTs), or a broken file: clear errors.
        let e = connect_json(&creds, Some(&text), "gw", false, None).unwrap_err().to_string();
        assert!(e.contains("nonce"), "{e}");
        assert!(
            connect_json(&creds, Some("-----BEGIN X-----\nonly\n-----END X-----\n"), "gw", false, Some("n")).is_err()
        );
        let bad_seed = text.replace(&seed, "SUNOTASEED");
        assert!(connect_json(&creds, Some(&bad_seed), "gw", false, Some("n")).is_err());
    }

    #[test]
    fn info_fields() {
        let i = ServerInfo::parse(
            br#"{"server_id":"S","version":"2.15.1","max_payload":2097152,"headers":true,"nonce":"abc","connect_urls":["10.0.0.2:4222"],"extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(
            (i.max_payload(), i.headers, i.nonce.as_deref(), i.connect_urls.len()),
            (2 << 20, true, Some("abc"), 1)
        );
        assert_eq!(ServerInfo::parse(b"{}").unwrap().max_payload(), DEFAULT_MAX_PAYLOAD);
        assert!(ServerInfo::parse(b"{\"max_payload\":-1}").is_err());
    }
}
