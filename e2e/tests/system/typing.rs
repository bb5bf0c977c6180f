//! Typing indicators: ephemeral, live only, rate-limited.

use std::time::Duration;

use futures::TryStreamExt as _;
use serde_json::{json, Value};
use testkit::System;

use crate::chat;

fn typing_to(user: &str) -> Value {
    json!({"t":"typing","conv":user})
}

#[tokio::test]
async fn typing_reaches_an_online_recipient_on_another_gateway() {
    let sys = System::start(2).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let mut bob = sys.connect(1, "bob", "phone").await;
    alice.sync().await;
    bob.sync().await;

    alice.send_json(&typing_to("bob")).await;
    let f = bob.expect_type("typing").await;
    assert_eq!(f, json!({"t":"typing","from":"alice"}));
    // The typist gets nothing back.
    alice.ping_pong().await;
}

#[tokio::test]
async fn typing_to_an_offline_user_is_not_stored() {
    let sys = System::start(1).await;
    // bob has been here before (a registered device), and is away now.
    let mut bob = sys.connect(0, "bob", "phone").await;
    bob.sync().await;
    bob.close().await;

    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    alice.send_json(&typing_to("bob")).await;
    alice.send_json(&typing_to("bob")).await;
    // A chat message after the typing: the gateway handles alice's frames in order, so by its
    // `sent` the typing indicators have been dealt with too.
    alice.send_chat_ok("c-1", "bob", "after typing").await;

    // INBOX holds the chat message for bob and nothing else.
    let js = sys.nats.jetstream().await;
    let stream = js.get_stream("INBOX").await.expect("INBOX stream");
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects("inbox.bob")
        .await
        .expect("stream info")
        .try_collect()
        .await
        .expect("stream info subjects");
    assert_eq!(subjects, [("inbox.bob".to_string(), 1)], "only the chat message is stored for bob");

    // bob comes back: the drain has only the chat, and no typing arrives afterwards.
    let mut bob = sys.connect(0, "bob", "phone").await;
    let synced = bob.sync().await;
    assert_eq!(synced.items.len(), 1, "{:?}", synced.items);
    assert_eq!(chat(&synced.items[0])["id"], "c-1");
    bob.expect_silence(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn typing_beyond_the_rate_limit_is_dropped() {
    let sys = System::start_with(1, &["--typing-per-sec", "1"]).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let mut bob = sys.connect(0, "bob", "phone").await;
    let mut carol = sys.connect(0, "carol", "web").await;
    alice.sync().await;
    bob.sync().await;
    carol.sync().await;

    const SENT: usize = 20;
    for _ in 0..SENT {
        alice.send_json(&typing_to("bob")).await;
    }
    alice.ping_pong().await; // the gateway has handled all 20
                             // carol's indicator goes out after alice's through the same gateway and NATS connection,
                             // so it marks the end of alice's burst at bob.
    carol.send_json(&typing_to("bob")).await;

    let mut delivered = 0;
    loop {
        let f = bob.expect_type("typing").await;
        match f["from"].as_str() {
            Some("alice") => delivered += 1,
            Some("carol") => break,
            _ => panic!("unexpected typing frame {f}"),
        }
    }
    assert!((1..=3).contains(&delivered), "{delivered} of {SENT} typing indicators delivered with --typing-per-sec 1");
}
