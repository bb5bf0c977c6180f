//! A client that goes silent is closed with 1001 and shows offline.

use protocol::now_ms;
use testkit::System;

use crate::presence::{Watcher, WAIT};

#[tokio::test]
async fn a_silent_client_is_closed_with_1001_and_goes_offline() {
    let sys = System::start_with(1, &["--heartbeat-timeout-secs", "2"]).await;
    // alice watches dave and keeps her own connection alive with pings and queries.
    let mut alice = Watcher::connect(&sys, 0, "alice", "web").await;
    alice.keepalive = true;
    alice.subscribe(&["dave"]).await;

    // dave connects and then says nothing (tungstenite would answer WebSocket pings, but the
    // gateway only counts the client's own frames).
    let connected_at = now_ms();
    let mut dave = sys.connect(0, "dave", "phone").await;
    let hello = dave.sync().await.hello;
    assert_eq!(hello["heartbeat_ms"], 2000, "{hello}");
    alice.wait_for("dave", "online", |v| v["online"] == true, WAIT).await;

    // Read dave's socket while waiting for the push, so the close handshake is not stuck on it.
    let offline_push = async {
        loop {
            // (A late push of dave's connection, online, may come first.)
            let p = alice.next_push("dave", WAIT).await;
            if p["online"] == false {
                return p;
            }
        }
    };
    let (code, pushed) = tokio::join!(dave.wait_closed(WAIT), offline_push);
    assert_eq!(code, Some(1001), "silent client's close code");
    assert_eq!(pushed["online"], false, "{pushed}");
    let last_seen = pushed["last_seen"].as_u64().unwrap_or_else(|| panic!("no last_seen: {pushed}"));
    assert!(last_seen >= connected_at && last_seen <= now_ms(), "last_seen {last_seen}: {pushed}");
    assert_eq!(alice.query_one("dave").await, pushed, "a query agrees with the push");

    // alice, who kept talking, is still connected.
    alice.c.ping_pong().await;
}
