//! Reading a service's Prometheus endpoint (plain HTTP/1.1 GET, loopback): the gateway's RSS,
//! its open connections, and counter deltas over a run.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Samples by `name{labels}` (exactly as exposed).
pub type Samples = BTreeMap<String, f64>;

pub const RSS: &str = "gateway_resident_memory_bytes";
pub const OPEN: &str = "gateway_connections_open";

/// GETs `url` (`http://host:port/path`) and returns the body.
pub async fn http_get(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow!("only http:// URLs are supported: {url}"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fut = async {
        let mut s =
            tokio::net::TcpStream::connect(hostport).await.with_context(|| format!("connecting to {hostport}"))?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: loadgen\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf =
        tokio::time::timeout(Duration::from_secs(10), fut).await.map_err(|_| anyhow!("GET {url} timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP response from {url}"))?;
    let status =
        head.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0);
    if status != 200 {
        bail!("GET {url}: HTTP {status}");
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Parses the text exposition format.
pub fn parse(text: &str) -> Samples {
    let mut m = Samples::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]`: labels may contain spaces, so split after the `}`.
        let (key, rest) = match line.rfind('}') {
            Some(i) => (&line[..=i], &line[i + 1..]),
            None => match line.split_once(' ') {
                Some((k, r)) => (k, r),
                None => continue,
            },
        };
        if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
            m.insert(key.trim().to_owned(), v);
        }
    }
    m
}

pub async fn scrape(url: &str) -> anyhow::Result<Samples> {
    Ok(parse(&http_get(url).await?))
}

/// Scrapes every URL; failures are reported in place (a benchmark should not die for a scrape).
pub async fn scrape_all(urls: &[String]) -> Vec<Result<Samples, String>> {
    let mut out = Vec::new();
    for u in urls {
        out.push(scrape(u).await.map_err(|e| format!("{e:#}")));
    }
    out
}

/// Counter changes between two scrapes (`*_total` samples that moved), for the report: they
/// show errors, resyncs, slow consumers and close reasons the gateway saw during the run.
pub fn counter_deltas(before: &Samples, after: &Samples) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in after {
        let name = k.split('{').next().unwrap_or(k);
        if !name.ends_with("_total") {
            continue;
        }
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if d != 0.0 {
            m.insert(k.clone(), json!(d));
        }
    }
    Value::Object(m)
}

/// Per gateway: RSS and open connections before and after a run, and the counters that moved.
pub fn gateway_report(
    urls: &[String],
    before: &[Result<Samples, String>],
    after: &[Result<Samples, String>],
) -> Vec<Value> {
    urls.iter()
        .zip(before.iter().zip(after))
        .map(|(url, (b, a))| match (b, a) {
            (Ok(b), Ok(a)) => json!({
                "metrics_url": url,
                "rss_before_bytes": b.get(RSS),
                "rss_after_bytes": a.get(RSS),
                "connections_open_before": b.get(OPEN),
                "connections_open_after": a.get(OPEN),
                "counter_deltas": counter_deltas(b, a),
            }),
            (b, a) => json!({
                "metrics_url": url,
                "error": format!("{:?} / {:?}", b.as_ref().err(), a.as_ref().err()),
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exposition() {
        let t = "# HELP x\n# TYPE gateway_connections_open gauge\ngateway_connections_open 12\n\
                 gateway_connections_closed_total{reason=\"client closed\"} 3\n\
                 gateway_connections_closed_total{reason=\"io_error\"} 2\n\
                 gateway_resident_memory_bytes 1.5e6\n";
        let s = parse(t);
        assert_eq!(s[OPEN], 12.0);
        assert_eq!(s[RSS], 1.5e6);
        let mut after = s.clone();
        after.insert("gateway_connections_closed_total{reason=\"io_error\"}".into(), 7.0);
        let d = counter_deltas(&s, &after);
        assert_eq!(d.as_object().unwrap().len(), 1);
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("5\r\nhello\r\n3\r\n ab\r\n0\r\n\r\n"), "hello ab");
    }
}
