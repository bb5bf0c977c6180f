//! A WebSocket client speaking PROTOCOL.md, for tests: every call has a timeout so a broken
//! server fails the test instead of hanging it.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest as _, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::ClientTls;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the next read brought.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A JSON text frame.
    Frame(Value),
    /// The connection ended; the close code when the server sent a close frame with one.
    Closed(Option<u16>),
    /// Nothing arrived in time.
    Timeout,
}

/// The start of a connection: `hello`, the backlog of `msg` frames, and the `synced` sequence.
#[derive(Debug, Clone)]
pub struct Synced {
    pub hello: Value,
    /// The `msg` frames sent before `synced`, in arrival order.
    pub items: Vec<Value>,
    /// The `seq` of the `synced` frame.
    pub seq: u64,
    /// The `conversations` summary sent before `synced` (when the drain had items).
    pub conversations: Option<Value>,
}

/// A test client connection.
pub struct WsClient {
    ws: Ws,
    close_code: Option<u16>,
    closed: bool,
    /// How long [`WsClient::recv`] and friends wait for each frame (default 5 s).
    pub timeout: Duration,
}

impl WsClient {
    /// Opens `ws_url?token=..&device=..&since=..` (an empty `token` is left out). Returns the
    /// HTTP status when the server refuses the upgrade; panics if the server cannot be reached.
    pub async fn connect(ws_url: &str, token: &str, device: Option<&str>, since: Option<u64>) -> Result<WsClient, u16> {
        Self::connect_request(&ws_request_url(ws_url, token, device, since), None).await
    }

    /// Like [`WsClient::connect`] over `wss://`, trusting what `tls` trusts.
    pub async fn connect_tls(
        ws_url: &str,
        token: &str,
        device: Option<&str>,
        since: Option<u64>,
        tls: &ClientTls,
    ) -> Result<WsClient, u16> {
        Self::connect_request_with(&ws_request_url(ws_url, token, device, since), None, Some(tls)).await
    }

    /// Like [`WsClient::connect`] but panics (with the status) when the upgrade is refused.
    pub async fn open(ws_url: &str, token: &str, device: Option<&str>, since: Option<u64>) -> WsClient {
        Self::connect(ws_url, token, device, since)
            .await
            .unwrap_or_else(|status| panic!("{ws_url}: upgrade refused with HTTP {status}"))
    }

    /// Like [`WsClient::open`] over `wss://`, trusting what `tls` trusts.
    pub async fn open_tls(
        ws_url: &str,
        token: &str,
        device: Option<&str>,
        since: Option<u64>,
        tls: &ClientTls,
    ) -> WsClient {
        Self::connect_tls(ws_url, token, device, since, tls)
            .await
            .unwrap_or_else(|status| panic!("{ws_url}: upgrade refused with HTTP {status}"))
    }

    /// Opens exactly `url`, with `Authorization: Bearer <bearer>` when given.
    pub async fn connect_request(url: &str, bearer: Option<&str>) -> Result<WsClient, u16> {
        Self::connect_request_with(url, bearer, None).await
    }

    /// Opens exactly `url` (`ws://`, or `wss://` with `tls`), with `Authorization: Bearer
    /// <bearer>` when given.
    pub async fn connect_request_with(
        url: &str,
        bearer: Option<&str>,
        tls: Option<&ClientTls>,
    ) -> Result<WsClient, u16> {
        let mut req = url.into_client_request().unwrap_or_else(|e| panic!("bad WebSocket URL {url}: {e}"));
        if let Some(token) = bearer {
            req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().expect("header value"));
        }
        assert!(
            tls.is_some() || !url.starts_with("wss:"),
            "{url}: a wss:// test connection needs a ClientTls (Gateway::client_tls) to trust the test certificate"
        );
        let connector = tls.map(|t| Connector::Rustls(t.0.clone()));
        let res = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector),
        )
        .await
        .unwrap_or_else(|_| panic!("{url}: WebSocket handshake timed out"));
        match res {
            Ok((ws, _)) => Ok(WsClient { ws, close_code: None, closed: false, timeout: Duration::from_secs(5) }),
            Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("{url}: WebSocket connect failed: {e}"),
        }
    }

    /// For a `wss://` connection: the negotiated TLS version and ALPN protocol.
    pub fn tls_session(&self) -> Option<(rustls::ProtocolVersion, Option<Vec<u8>>)> {
        match self.ws.get_ref() {
            MaybeTlsStream::Rustls(s) => {
                let conn = s.get_ref().1;
                Some((conn.protocol_version()?, conn.alpn_protocol().map(<[u8]>::to_vec)))
            }
            _ => None,
        }
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, v: &Value) {
        self.send(Message::text(v.to_string())).await
    }

    /// Sends `text` as it is, in a text frame (for malformed-frame tests).
    pub async fn send_raw_text(&mut self, text: &str) {
        self.send(Message::text(text)).await
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        self.send(Message::binary(data.to_vec())).await
    }

    /// A WebSocket-level ping (not the protocol's `ping` frame).
    pub async fn send_ws_ping(&mut self) {
        self.send(Message::Ping(Vec::new().into())).await
    }

    /// `{"t":"send","id":id,"to":to,"body":body}`.
    pub async fn send_chat(&mut self, id: &str, to: &str, body: &str) {
        self.send_json(&serde_json::json!({"t":"send","id":id,"to":to,"body":body})).await
    }

    /// `{"t":"ack","seq":seq}`.
    pub async fn ack(&mut self, seq: u64) {
        self.send_json(&serde_json::json!({"t":"ack","seq":seq})).await
    }

    /// Sends a protocol `ping` and waits for its `pong` (skipping other frames): once it returns,
    /// the server has read every frame sent before.
    pub async fn ping_pong(&mut self) {
        self.send_json(&serde_json::json!({"t":"ping"})).await;
        self.recv_type("pong").await;
    }

    /// Sends a chat message and waits for its `sent` (skipping other frames); panics on `error`.
    pub async fn send_chat_ok(&mut self, id: &str, to: &str, body: &str) -> Value {
        self.send_chat(id, to, body).await;
        let f = self.recv_until(|f| f["id"] == id && (f["t"] == "sent" || f["t"] == "error")).await;
        assert_eq!(f["t"], "sent", "send {id} failed: {f}");
        f
    }

    async fn send(&mut self, m: Message) {
        tokio::time::timeout(Duration::from_secs(5), self.ws.send(m))
            .await
            .expect("WebSocket send timed out")
            .expect("WebSocket send failed");
    }

    /// The next event within `timeout`. WebSocket pings and pongs are skipped (tungstenite
    /// answers pings by itself).
    pub async fn next_event(&mut self, timeout: Duration) -> Event {
        if self.closed {
            return Event::Closed(self.close_code);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(n) => n,
            };
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v = serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("server sent a non-JSON text frame ({e}): {t}"));
                    return Event::Frame(v);
                }
                Some(Ok(Message::Binary(b))) => {
                    panic!("server sent a binary frame ({} bytes)", b.len())
                }
                Some(Ok(Message::Close(cf))) => {
                    self.close_code = cf.map(|cf| u16::from(cf.code));
                    self.closed = true;
                    return Event::Closed(self.close_code);
                }
                Some(Ok(_)) => continue, // ping, pong, raw frame
                // A reset or an abrupt end (a killed gateway) also ends the connection.
                Some(Err(_)) | None => {
                    self.closed = true;
                    return Event::Closed(self.close_code);
                }
            }
        }
    }

    /// The next JSON frame; panics on timeout ([`WsClient::timeout`]) or when the connection
    /// closes.
    pub async fn recv(&mut self) -> Value {
        match self.next_event(self.timeout).await {
            Event::Frame(v) => v,
            Event::Closed(code) => panic!("connection closed (code {code:?}) awaiting a frame"),
            Event::Timeout => panic!("no frame within {:?}", self.timeout),
        }
    }

    /// Receives frames until one satisfies `pred` and returns it; the others are dropped. Each
    /// frame gets the full [`WsClient::timeout`].
    pub async fn recv_until(&mut self, mut pred: impl FnMut(&Value) -> bool) -> Value {
        loop {
            let f = self.recv().await;
            if pred(&f) {
                return f;
            }
        }
    }

    /// Receives frames until one of type `t` and returns it, dropping the others.
    pub async fn recv_type(&mut self, t: &str) -> Value {
        self.recv_until(|f| f["t"] == t).await
    }

    /// The next frame, which must be of type `t`.
    pub async fn expect_type(&mut self, t: &str) -> Value {
        let f = self.recv().await;
        assert_eq!(f["t"], t, "expected a `{t}` frame, got {f}");
        f
    }

    /// Panics if a frame arrives (or the connection closes) within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        match self.next_event(d).await {
            Event::Timeout => {}
            Event::Frame(f) => panic!("expected silence for {d:?}, got {f}"),
            Event::Closed(code) => {
                panic!("expected silence for {d:?}, connection closed ({code:?})")
            }
        }
    }

    /// Reads `hello`, then every `msg` until `synced`. Panics on any other frame or a close.
    pub async fn sync(&mut self) -> Synced {
        match self.try_sync().await {
            Ok(s) => s,
            Err(code) => panic!("connection closed (code {code:?}) before `synced`"),
        }
    }

    /// Like [`WsClient::sync`], but a close before `synced` (e.g. 1013 while the backbone is
    /// unavailable) is returned as `Err(close code)` instead of panicking.
    pub async fn try_sync(&mut self) -> Result<Synced, Option<u16>> {
        let mut hello = None;
        let mut items = Vec::new();
        let mut conversations = None;
        loop {
            let f = match self.next_event(self.timeout).await {
                Event::Frame(f) => f,
                Event::Closed(code) => return Err(code),
                Event::Timeout => panic!("no frame within {:?} before `synced`", self.timeout),
            };
            match (f["t"].as_str(), &hello) {
                (Some("hello"), None) => hello = Some(f),
                (Some("msg"), Some(_)) => items.push(f),
                (Some("conversations"), Some(_)) => conversations = Some(f),
                (Some("synced"), Some(_)) => {
                    let seq = f["seq"].as_u64().expect("synced.seq is a number");
                    return Ok(Synced { hello: hello.unwrap(), items, seq, conversations });
                }
                _ => panic!("expected `hello`, then `msg`s and `synced`; got {f}"),
            }
        }
    }

    /// Waits (dropping frames) until the server closes the connection; returns the close code.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Event::Frame(_) => continue,
                Event::Closed(code) => return code,
                Event::Timeout => panic!("connection still open after {timeout:?}"),
            }
        }
    }

    /// The close code the server sent, once the connection has closed.
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// Closes the connection with 1000 and waits (bounded) for the server's close.
    pub async fn close(mut self) {
        if self.closed {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = self.ws.next().await {} })
            .await;
    }
}

/// `ws_url` with the protocol's query parameters (an empty `token` is left out).
pub fn ws_request_url(ws_url: &str, token: &str, device: Option<&str>, since: Option<u64>) -> String {
    let mut params = Vec::new();
    if !token.is_empty() {
        params.push(format!("token={}", encode(token)));
    }
    if let Some(d) = device {
        params.push(format!("device={}", encode(d)));
    }
    if let Some(s) = since {
        params.push(format!("since={s}"));
    }
    if params.is_empty() {
        return ws_url.to_owned();
    }
    let sep = if ws_url.contains('?') { '&' } else { '?' };
    format!("{ws_url}{sep}{}", params.join("&"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a client keeps to drop redeliveries, as PROTOCOL.md asks: items by `seq`, chat messages
/// by `(from, id)`, group messages by `(group, sid)`. Counts what it dropped so tests can assert exactly-once delivery.
#[derive(Debug, Default)]
pub struct Inbox {
    items: BTreeMap<u64, Value>,
    chat_keys: HashSet<(String, String)>,
    /// `seq`s received again.
    pub dup_seqs: Vec<u64>,
    /// Messages received again under a new `seq` (the same message stored twice): chat
    /// `(from, id)`, or group `("group/<gid>", sid)`.
    pub dup_chats: Vec<(String, String)>,
}

impl Inbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a `msg` frame. Returns true when it is new (a client would show it), false for a
    /// duplicate it would drop. Panics on other frames.
    pub fn record(&mut self, frame: &Value) -> bool {
        assert_eq!(frame["t"], "msg", "not a msg frame: {frame}");
        let seq = frame["seq"].as_u64().unwrap_or_else(|| panic!("msg without seq: {frame}"));
        if self.items.contains_key(&seq) {
            self.dup_seqs.push(seq);
            return false;
        }
        let m = &frame["m"];
        let str_of = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let key = match m["k"].as_str() {
            Some("chat") => Some((str_of(&m["from"]), str_of(&m["id"]))),
            Some("group") => Some((format!("group/{}", str_of(&m["group"])), m["sid"].to_string())),
            _ => None,
        };
        if let Some(key) = key {
            if !self.chat_keys.insert(key.clone()) {
                self.dup_chats.push(key);
                return false;
            }
        }
        self.items.insert(seq, m.clone());
        true
    }

    /// Records every frame of `frames` (all must be `msg`).
    pub fn record_all<'a>(&mut self, frames: impl IntoIterator<Item = &'a Value>) {
        for f in frames {
            self.record(f);
        }
    }

    /// Number of distinct items held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The highest `seq` held (0 when empty): what to `ack`, or pass as `since`.
    pub fn max_seq(&self) -> u64 {
        self.items.keys().next_back().copied().unwrap_or(0)
    }

    /// `(seq, m)` of the items of kind `k` (`chat`, `receipt`), in `seq` order.
    pub fn of_kind(&self, k: &str) -> Vec<(u64, &Value)> {
        self.items.iter().filter(|(_, m)| m["k"] == k).map(|(s, m)| (*s, m)).collect()
    }

    /// The bodies of the chat messages, in `seq` order.
    pub fn chat_bodies(&self) -> Vec<String> {
        self.of_kind("chat").iter().map(|(_, m)| m["body"].as_str().unwrap_or_default().to_owned()).collect()
    }

    /// Panics if anything arrived twice.
    pub fn assert_no_duplicates(&self) {
        assert!(
            self.dup_seqs.is_empty() && self.dup_chats.is_empty(),
            "duplicates: seqs {:?}, chats {:?}",
            self.dup_seqs,
            self.dup_chats
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builds_request_urls() {
        let u = "ws://127.0.0.1:1/ws";
        assert_eq!(ws_request_url(u, "", None, None), u);
        assert_eq!(
            ws_request_url(u, "a.b-c_d", Some("web"), Some(7)),
            "ws://127.0.0.1:1/ws?token=a.b-c_d&device=web&since=7"
        );
        assert_eq!(ws_request_url(u, "", Some("a b&c"), None), "ws://127.0.0.1:1/ws?device=a%20b%26c");
    }

    fn chat(seq: u64, from: &str, id: &str, body: &str) -> Value {
        json!({"t":"msg","seq":seq,"m":{"k":"chat","from":from,"dev":"d","id":id,"body":body,"ts":1}})
    }

    #[test]
    fn inbox_drops_and_counts_duplicates() {
        let mut inbox = Inbox::new();
        assert!(inbox.record(&chat(2, "alice", "c1", "one")));
        assert!(inbox.record(&chat(5, "alice", "c2", "two")));
        assert!(inbox.record(
            &json!({"t":"msg","seq":6,"m":{"k":"receipt","from":"bob","status":"delivered","up_to":4,"ts":1}})
        ));
        inbox.assert_no_duplicates();
        assert_eq!(inbox.chat_bodies(), ["one", "two"]);
        assert_eq!(inbox.of_kind("receipt").len(), 1);
        assert_eq!(inbox.max_seq(), 6);

        assert!(!inbox.record(&chat(2, "alice", "c1", "one")));
        assert!(!inbox.record(&chat(9, "alice", "c2", "two")));
        assert_eq!(inbox.dup_seqs, [2]);
        assert_eq!(inbox.dup_chats, [("alice".to_string(), "c2".to_string())]);
        assert_eq!(inbox.len(), 3);
        assert!(std::panic::catch_unwind(|| inbox.assert_no_duplicates()).is_err());

        let group = |seq: u64, sid: u64| json!({"t":"msg","seq":seq,"m":{"k":"group","group":"g1","sid":sid,"from":"a","id":"x","body":"b"}});
        let mut inbox = Inbox::new();
        assert!(inbox.record(&group(1, 7)));
        assert!(inbox.record(&group(2, 8)));
        assert!(!inbox.record(&group(3, 7)));
        assert_eq!(inbox.dup_chats, [("group/g1".to_string(), "7".to_string())]);
    }

    /// Against a tiny in-process WebSocket server: frames, pings, close codes, refusals.
    #[tokio::test]
    async fn client_round_trip() {
        use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", l.local_addr().unwrap());
        tokio::spawn(async move {
            // First connection: echo JSON text frames, then close with 1001 on "bye".
            let (s, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            ws.send(Message::Ping(vec![1].into())).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(t) if t.as_str() == "bye" => {
                        let cf = CloseFrame { code: CloseCode::Away, reason: "draining".into() };
                        ws.send(Message::Close(Some(cf))).await.unwrap();
                    }
                    Message::Text(t) => ws.send(Message::Text(t)).await.unwrap(),
                    _ => {}
                }
            }
            // Second connection: refuse the upgrade with 401.
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 2048];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            tokio::io::AsyncWriteExt::write_all(&mut s, b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        let mut c = WsClient::open(&url, "tok", None, None).await;
        c.send_json(&json!({"t":"pong"})).await;
        assert_eq!(c.expect_type("pong").await, json!({"t":"pong"}));
        c.send_json(&json!({"t":"x","id":"a"})).await;
        c.send_json(&json!({"t":"y","id":"b"})).await;
        assert_eq!(c.recv_until(|f| f["id"] == "b").await["t"], "y");
        c.expect_silence(Duration::from_millis(100)).await;
        c.send_raw_text("bye").await;
        assert_eq!(c.wait_closed(Duration::from_secs(2)).await, Some(1001));
        assert_eq!(c.close_code(), Some(1001));
        c.close().await;

        assert_eq!(WsClient::connect(&url, "", None, None).await.err(), Some(401));
    }
}
