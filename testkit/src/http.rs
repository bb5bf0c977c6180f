//! A minimal HTTP/1.0 GET over a plain TCP socket, enough for readiness probes, metrics and the
//! dev token endpoint without pulling an HTTP client into every test binary.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET url` (`http://host:port/path?query`); returns the status code and the body as text.
/// Each call has a 5 s budget so a hung server cannot hang the test.
pub async fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    let (host, path) = split_url(url)?;
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(host).await?;
        // HTTP/1.0 and `Connection: close`: the server ends the body by closing the socket.
        let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        parse_response(&buf)
    })
    .await
    .map_err(|_| anyhow!("GET {url} timed out"))?
    .with_context(|| format!("GET {url}"))
}

/// Polls `url` until it answers 200 or `timeout` passes.
pub async fn wait_http_ok(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match http_get(url).await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("status {code}: {body}"),
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{url} not 200 after {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow!("only http:// URLs are supported: {url}"))?;
    Ok(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

fn parse_response(buf: &[u8]) -> anyhow::Result<(u16, String)> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response ({} bytes)", buf.len()))?;
    let head = std::str::from_utf8(&buf[..end]).context("HTTP head is not UTF-8")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head:?}"))?;
    let mut body = buf[end + 4..].to_vec();
    // Servers should not chunk a reply to HTTP/1.0, but decode it if one does.
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("bad chunk header"))?;
        let size_str = std::str::from_utf8(&b[..nl])?;
        let size_str = size_str.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16).context("bad chunk size")?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() {
        assert_eq!(
            split_url("http://127.0.0.1:8080/dev/token?user=a").unwrap(),
            ("127.0.0.1:8080", "/dev/token?user=a")
        );
        assert_eq!(split_url("http://h:1").unwrap(), ("h:1", "/"));
        assert!(split_url("https://h:1/").is_err());
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(parse_response(r).unwrap(), (200, "ok".into()));
        let r = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), (503, "not ready".into()));
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }

    #[tokio::test]
    async fn gets_from_a_local_server() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /readyz ");
                let reply: &[u8] = if ok { b"HTTP/1.1 200 OK\r\n\r\nready" } else { b"HTTP/1.1 404 Not Found\r\n\r\n" };
                s.write_all(reply).await.unwrap();
            }
        });
        let base = format!("http://{addr}");
        assert_eq!(http_get(&format!("{base}/readyz")).await.unwrap(), (200, "ready".into()));
        assert_eq!(http_get(&format!("{base}/x")).await.unwrap().0, 404);
        wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(2)).await.unwrap();
        assert!(wait_http_ok(&format!("{base}/x"), Duration::from_millis(200)).await.is_err());
    }
}
