//! A minimal HTTP/1.1 responder for `/metrics`, `/healthz` and `/readyz`.
//!
//! Every connection carries one request and is closed after the response (`Connection: close`),
//! which Prometheus and probe clients handle fine and which keeps the state machine trivial. The
//! request head is bounded in size and time, request bodies are never read, and concurrent
//! connections are capped, so a misbehaving client costs at most a few KiB and a few seconds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::{Health, Render, METRICS_CONTENT_TYPE};

/// Bounds applied to every connection.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Largest request head (request line plus headers) accepted.
    max_head: usize,
    /// Time a client has to send its whole request head.
    read_timeout: Duration,
    /// Time a client has to take the whole response.
    write_timeout: Duration,
    /// Connections served at once; more are closed at accept.
    max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 8 * 1024,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// Binds `addr` and serves the endpoints until the task is dropped. Fails only if binding fails.
pub async fn serve(addr: SocketAddr, render: Render, health: Arc<Health>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    serve_listener(listener, render, health).await
}

/// Binds `addr` (port 0 picks a free port), spawns the server on the current tokio runtime and
/// returns the bound address.
pub async fn spawn(addr: SocketAddr, render: Render, health: Arc<Health>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(serve_listener(listener, render, health));
    Ok(local)
}

/// Serves the endpoints on an already bound listener, forever.
pub async fn serve_listener(listener: TcpListener, render: Render, health: Arc<Health>) -> anyhow::Result<()> {
    serve_with(listener, render, health, Limits::default()).await
}

async fn serve_with(listener: TcpListener, render: Render, health: Arc<Health>, limits: Limits) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics and health endpoint listening");
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning on the error.
                tracing::warn!(error = %e, "metrics endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint busy; closing connection");
            continue;
        };
        let (render, health) = (render.clone(), health.clone());
        tokio::spawn(async move {
            handle(stream, &render, &health, limits).await;
            drop(permit);
        });
    }
}

/// Why a request head could not be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The client closed or the socket failed: nothing to answer.
    Gone,
    TooLarge,
}

async fn handle(mut stream: TcpStream, render: &Render, health: &Health, limits: Limits) {
    let head = match tokio::time::timeout(limits.read_timeout, read_head(&mut stream, limits.max_head)).await {
        Err(_) | Ok(Err(HeadError::Gone)) => return,
        Ok(Err(HeadError::TooLarge)) => Response::text(431, "request header too large\n"),
        Ok(Ok(head)) => match parse_request_line(&head) {
            Some((method, path)) => route(method, path, render, health),
            None => Response::text(400, "bad request\n"),
        },
    };
    let bytes = head.to_bytes();
    let sent = tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    if matches!(sent, Ok(Ok(()))) {
        linger(&mut stream).await;
    }
}

/// Closing a socket with unread input makes the kernel send a reset, which can destroy the
/// response before the client reads it (an unread body, or an oversized head). So after the
/// response, read and discard what the client still sends, briefly and boundedly, until it closes.
async fn linger(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let mut budget = 256 * 1024usize;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while budget > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Reads until the blank line ending the request head; returns the head without it.
async fn read_head(stream: &mut TcpStream, max: usize) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| HeadError::Gone)?;
        if n == 0 {
            return Err(HeadError::Gone);
        }
        // Search only where a terminator could newly appear.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf[from..]) {
            buf.truncate(from + end);
            return Ok(buf);
        }
        if buf.len() > max {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Position of the end of the head (`\r\n\r\n`, or a bare `\n\n` from sloppy clients).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find(|&i| buf[i..].starts_with(b"\r\n\r\n") || buf[i..].starts_with(b"\n\n"))
}

/// `GET /metrics?x HTTP/1.1` -> `("GET", "/metrics")`. None for anything malformed.
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !version.starts_with("HTTP/1.")
    {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some((method, path))
}

fn route(method: &str, path: &str, render: &Render, health: &Health) -> Response {
    let head_only = method == "HEAD";
    let mut resp = match path {
        "/metrics" | "/healthz" | "/readyz" if method != "GET" && !head_only => Response {
            status: 405,
            content_type: "text/plain; charset=utf-8",
            extra: Some("Allow: GET, HEAD\r\n"),
            body: b"method not allowed\n".to_vec(),
            head_only: false,
        },
        "/metrics" => Response {
            status: 200,
            content_type: METRICS_CONTENT_TYPE,
            extra: None,
            body: render().into_bytes(),
            head_only: false,
        },
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" if health.is_ready() => Response::text(200, "ready\n"),
        "/readyz" => Response::text(503, "not ready\n"),
        _ => Response::text(404, "not found\n"),
    };
    resp.head_only = head_only;
    resp
}

struct Response {
    status: u16,
    content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    extra: Option<&'static str>,
    body: Vec<u8>,
    /// HEAD: headers as for GET, no body.
    head_only: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra: None,
            body: body.as_bytes().to_vec(),
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n",
            self.status,
            reason,
            self.content_type,
            self.body.len(),
            self.extra.unwrap_or(""),
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render() -> Render {
        Arc::new(|| "# TYPE up gauge\nup 1\n".to_owned())
    }

    async fn start(limits: Limits) -> (SocketAddr, Arc<Health>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(Health::new());
        tokio::spawn(serve_with(listener, render(), health.clone(), limits));
        (addr, health)
    }

    /// Sends raw bytes, returns everything the server sent before closing.
    async fn raw(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        read_all(s).await
    }

    /// Everything until the server closes; a reset ends the read like a close does.
    async fn read_all(mut s: TcpStream) -> String {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("server closes the connection");
        String::from_utf8(out).unwrap()
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        raw(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await
    }

    fn status(resp: &str) -> u16 {
        resp.split(' ').nth(1).unwrap().parse().unwrap()
    }

    fn body(resp: &str) -> &str {
        resp.split_once("\r\n\r\n").unwrap().1
    }

    #[tokio::test]
    async fn serves_the_endpoints() {
        let (addr, health) = start(Limits::default()).await;

        let r = get(addr, "/healthz").await;
        assert_eq!(status(&r), 200, "{r}");
        assert_eq!(body(&r), "ok\n");

        let r = get(addr, "/readyz").await;
        assert_eq!(status(&r), 503, "{r}");
        health.set_ready(true);
        let r = get(addr, "/readyz").await;
        assert_eq!(status(&r), 200, "{r}");

        let r = get(addr, "/metrics?name[]=up").await;
        assert_eq!(status(&r), 200, "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{r}");
        assert!(r.contains("Content-Length: 21\r\n"), "{r}");
        assert_eq!(body(&r), "# TYPE up gauge\nup 1\n");

        let r = get(addr, "/nope").await;
        assert_eq!(status(&r), 404, "{r}");
        let r = get(addr, "/").await;
        assert_eq!(status(&r), 404, "{r}");
    }

    #[tokio::test]
    async fn spawn_binds_port_zero() {
        let health = Arc::new(Health::new());
        let addr = spawn("127.0.0.1:0".parse().unwrap(), render(), health).await.unwrap();
        assert_ne!(addr.port(), 0);
        assert_eq!(status(&get(addr, "/healthz").await), 200);
    }

    #[tokio::test]
    async fn head_and_other_methods() {
        let (addr, _) = start(Limits::default()).await;
        let r = raw(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&r), 200, "{r}");
        assert!(r.contains("Content-Length: 21\r\n"), "{r}");
        assert_eq!(body(&r), "");

        let r = raw(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status(&r), 405, "{r}");
        assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");
    }

    #[tokio::test]
    async fn request_split_across_writes() {
        let (addr, _) = start(Limits::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        for part in ["GE", "T /hea", "lthz HTTP/1.0\r", "\n\r", "\n"] {
            s.write_all(part.as_bytes()).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = read_all(s).await;
        assert_eq!(status(&out), 200, "{out}");
    }

    #[tokio::test]
    async fn junk_is_refused_without_harm() {
        let (addr, _) = start(Limits::default()).await;
        for junk in [
            &b"\x00\xff\xfe garbage\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2 extra\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
        ] {
            let r = raw(addr, junk).await;
            assert_eq!(status(&r), 400, "{junk:?} -> {r}");
        }
        // A client that sends a little and leaves.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /met").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_all(s).await, "");
        // Still serving.
        assert_eq!(status(&get(addr, "/healthz").await), 200);
    }

    #[tokio::test]
    async fn oversized_head_is_refused() {
        let limits = Limits { max_head: 256, ..Limits::default() };
        let (addr, _) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(4096));
        // The server may close before taking everything; only the answer matters.
        let _ = s.write_all(req.as_bytes()).await;
        let r = read_all(s).await;
        assert_eq!(status(&r), 431, "{r}");
    }

    #[tokio::test]
    async fn silent_client_is_dropped() {
        let limits = Limits { read_timeout: Duration::from_millis(100), ..Limits::default() };
        let (addr, _) = start(limits).await;
        let s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_all(s).await, "");
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed() {
        let limits = Limits { max_connections: 1, read_timeout: Duration::from_secs(5), ..Limits::default() };
        let (addr, _) = start(limits).await;
        // Holds the only slot by sending nothing.
        let _idle = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = get(addr, "/healthz").await;
        assert_eq!(r, "");
    }

    #[test]
    fn parses_request_lines() {
        assert_eq!(parse_request_line(b"GET /metrics?a=b HTTP/1.1\r\nHost: x"), Some(("GET", "/metrics")));
        assert_eq!(parse_request_line(b"HEAD /readyz HTTP/1.0"), Some(("HEAD", "/readyz")));
        assert_eq!(parse_request_line(b"GET  /metrics HTTP/1.1"), None);
        assert_eq!(parse_request_line(b""), None);
    }
}

/// Serves a service's prometheus-client registry on `addr` (with `/healthz` and `/readyz`) and
/// returns the readiness flag, not ready yet. Needs a tokio runtime.
pub async fn serve_registry(
    addr: SocketAddr,
    registry: prometheus_client::registry::Registry,
) -> anyhow::Result<Arc<Health>> {
    let registry = Arc::new(registry);
    let render: Render = Arc::new(move || crate::encode_registry(&registry));
    let health = Arc::new(Health::new());
    spawn(addr, render, health.clone()).await?;
    Ok(health)
}
