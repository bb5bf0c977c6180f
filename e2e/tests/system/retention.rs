//! An inbox item stays until the device acknowledges it, and goes once it has.

use std::time::Duration;

use async_nats::jetstream::stream::RawMessageErrorKind;
use futures::TryStreamExt as _;
use testkit::System;

use crate::{chat, seq, sid};

#[tokio::test]
async fn message_stays_in_the_inbox_until_acknowledged() {
    let sys = System::start(1).await;
    let mut bob = sys.connect(0, "bob", "phone").await;
    bob.sync().await;
    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    let sid = sid(&alice.send_chat_ok("c-1", "bob", "keep me").await);

    // Received, but not acknowledged: redelivered on reconnect.
    let msg = bob.expect_type("msg").await;
    assert_eq!(seq(&msg), sid);
    bob.close().await;
    let mut bob = sys.connect(0, "bob", "phone").await;
    let synced = bob.sync().await;
    assert_eq!(synced.items.len(), 1, "{:?}", synced.items);
    assert_eq!(seq(&synced.items[0]), sid);
    assert_eq!(chat(&synced.items[0])["body"], "keep me");

    // Acknowledged: storage removes it from the stream...
    bob.ack(sid).await;
    bob.ping_pong().await;
    bob.close().await;
    let js = sys.nats.jetstream().await;
    let stream = js.get_stream("INBOX").await.expect("INBOX stream");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match stream.get_raw_message(sid).await {
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
            Err(e) => panic!("reading INBOX seq {sid}: {e}"),
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "seq {sid} still in INBOX 15 s after the ack");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects("inbox.bob")
        .await
        .expect("stream info")
        .try_collect()
        .await
        .expect("stream info subjects");
    assert!(subjects.is_empty(), "inbox.bob still holds {subjects:?}");

    // ...and it is not delivered again.
    let mut bob = sys.connect(0, "bob", "phone").await;
    let synced = bob.sync().await;
    assert!(synced.items.iter().all(|f| f["m"]["k"] != "chat"), "redelivered after ack: {:?}", synced.items);
}
