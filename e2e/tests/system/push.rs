//! Push fallback: a message for a user with no connected device produces one `push.<user>`
//! event (debounced); a user who is online gets none.

use std::time::Duration;

use futures::StreamExt;
use testkit::System;

#[tokio::test]
async fn a_message_for_an_offline_user_emits_one_push_event() {
    let sys = System::start(1).await;
    let client = sys.nats.client().await;
    let mut pushes = client.subscribe("push.*").await.expect("subscribe push.*");
    client.flush().await.expect("flush");

    let mut alice = sys.connect(0, "alice", "web").await;
    let mut carol = sys.connect(0, "carol", "web").await;
    alice.sync().await;
    carol.sync().await;
    // bob has never connected: three messages, one event (within the debounce window).
    for i in 0..3 {
        alice.send_chat_ok(&format!("p{i}"), "bob", "wake up").await;
    }
    // carol is online: no event for her.
    alice.send_chat_ok("c0", "carol", "you are here").await;

    let first = tokio::time::timeout(Duration::from_secs(20), pushes.next())
        .await
        .expect("a push event within 20 s")
        .expect("subscription open");
    assert_eq!(first.subject.as_str(), "push.bob");
    let event: serde_json::Value = serde_json::from_slice(&first.payload).expect("JSON event");
    assert_eq!(event["user"], "bob", "{event}");
    // Nothing more within a few seconds: the others are debounced, carol is online.
    let more = tokio::time::timeout(Duration::from_secs(3), pushes.next()).await;
    assert!(more.is_err(), "unexpected extra push event: {:?}", more.ok().flatten().map(|m| m.subject));
}
