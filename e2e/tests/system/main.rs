//! System tests: a real nats-server, the real `storage` and `gateway` binaries, and WebSocket
//! clients speaking PROTOCOL.md. Every test starts its own [`testkit::System`], so tests are
//! independent and run in parallel. One test binary with a module per theme (one link, not
//! eight).
//!
//! Needs `cargo build --workspace --bins` first and nats-server (scripts/install-nats.sh);
//! `scripts/test.sh` does both.
//!
//! No timing assertions: timeouts only keep a broken system from hanging a test.

mod auth;
mod conversations;
mod delivery;
mod devices;
mod drain;
mod expiry;
mod group_crash;
mod group_kit;
mod group_receipts;
mod groups;
mod heartbeat;
mod history;
mod hostile;
mod malformed;
mod media;
mod nats_auth;
mod presence;
mod push;
mod receipts;
mod restart;
mod retention;
mod retry;
mod tls;
mod typing;
mod user_limits;

use std::time::Duration;

use serde_json::Value;
use testkit::{Synced, WsClient};

/// The chat item of a `msg` frame, checked to be one.
fn chat(frame: &Value) -> &Value {
    assert_eq!(frame["t"], "msg", "not a msg frame: {frame}");
    assert_eq!(frame["m"]["k"], "chat", "not a chat item: {frame}");
    &frame["m"]
}

fn seq(frame: &Value) -> u64 {
    frame["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {frame}"))
}

fn sid(sent: &Value) -> u64 {
    sent["sid"].as_u64().unwrap_or_else(|| panic!("no sid in {sent}"))
}

/// Connects and reads up to `synced`, retrying (with a pause) while the gateway refuses with
/// 5xx or closes before `synced` (1013: the backbone is unavailable), as a client would after a
/// crash; any other refusal fails the test.
async fn connect_synced(url: &str, token: &str, within: Duration) -> (WsClient, Synced) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = match WsClient::connect(url, token, None, None).await {
            Ok(mut c) => {
                c.timeout = Duration::from_secs(20);
                match c.try_sync().await {
                    Ok(s) => return (c, s),
                    Err(code) => format!("closed with {code:?} before synced"),
                }
            }
            Err(status) if status >= 500 => format!("HTTP {status}"),
            Err(status) => panic!("{url}: upgrade refused with HTTP {status}"),
        };
        assert!(tokio::time::Instant::now() < deadline, "{url}: no session within {within:?}: {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends a chat message the way PROTOCOL.md tells a client to: on `unavailable` or `internal`,
/// retry with the same id. Returns the `sent` frame.
async fn send_retrying(c: &mut WsClient, id: &str, to: &str, body: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        c.send_chat(id, to, body).await;
        let f = c.recv_until(|f| f["id"] == id && (f["t"] == "sent" || f["t"] == "error")).await;
        let retryable = f["code"] == "unavailable" || f["code"] == "internal";
        if f["t"] == "sent" {
            return f;
        }
        assert!(retryable && tokio::time::Instant::now() < deadline, "send {id}: {f}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (bounded) until INBOX no longer holds `seq`: storage purged it.
async fn wait_purged(stream: &async_nats::jetstream::stream::Stream, seq: u64, within: Duration) {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match stream.get_raw_message(seq).await {
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return,
            Err(e) => panic!("reading INBOX seq {seq}: {e}"),
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "seq {seq} still in INBOX after {within:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Whether INBOX holds `seq`.
async fn in_inbox(stream: &async_nats::jetstream::stream::Stream, seq: u64) -> bool {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    match stream.get_raw_message(seq).await {
        Ok(_) => true,
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => false,
        Err(e) => panic!("reading INBOX seq {seq}: {e}"),
    }
}
