//! 1:1 delivery: online across gateways, and offline on reconnect.

use serde_json::json;
use testkit::{Inbox, System};

use crate::{chat, seq, sid};

#[tokio::test]
async fn online_delivery_across_two_gateway_processes() {
    let sys = System::start(2).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let mut bob = sys.connect(1, "bob", "phone").await;
    let a = alice.sync().await;
    assert_eq!(a.hello["user"], "alice");
    assert_eq!(a.hello["device"], "web");
    bob.sync().await; // bob is live from here

    let sent = alice.send_chat_ok("c-1", "bob", "hello bob").await;
    assert_eq!(sent["dup"], false, "{sent}");

    let msg = bob.expect_type("msg").await;
    let m = chat(&msg);
    assert_eq!(m["from"], "alice");
    assert_eq!(m["dev"], "web");
    assert_eq!(m["id"], "c-1");
    assert_eq!(m["body"], "hello bob");
    assert_eq!(seq(&msg), sid(&sent), "bob's seq is alice's sid");

    // And the other way round, gw2 -> gw1.
    let sent = bob.send_chat_ok("c-1", "alice", "hi alice").await;
    let msg = alice.expect_type("msg").await;
    assert_eq!(chat(&msg)["body"], "hi alice");
    assert_eq!(chat(&msg)["from"], "bob");
    assert_eq!(seq(&msg), sid(&sent));
}

#[tokio::test]
async fn offline_messages_arrive_in_order_on_reconnect() {
    let sys = System::start(2).await;
    // bob has been here before, and is away now.
    let mut bob = sys.connect(1, "bob", "phone").await;
    bob.sync().await;
    bob.close().await;

    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    let mut sids = Vec::new();
    for i in 0..20 {
        let sent = alice.send_chat_ok(&format!("c-{i}"), "bob", &format!("message {i}")).await;
        sids.push(sid(&sent));
    }
    assert!(sids.windows(2).all(|w| w[0] < w[1]), "sids not increasing: {sids:?}");

    let mut bob = sys.connect(1, "bob", "phone").await;
    let synced = bob.sync().await;
    let arrived: Vec<u64> = synced.items.iter().map(seq).collect();
    assert_eq!(arrived, sids, "all 20, in order, before synced");
    let mut inbox = Inbox::new();
    inbox.record_all(&synced.items);
    inbox.assert_no_duplicates();
    let expected: Vec<String> = (0..20).map(|i| format!("message {i}")).collect();
    assert_eq!(inbox.chat_bodies(), expected);
    assert_eq!(synced.seq, *sids.last().unwrap());

    // Live again after synced.
    alice.send_chat_ok("c-live", "bob", "now live").await;
    assert_eq!(chat(&bob.expect_type("msg").await)["body"], "now live");
    bob.send_json(&json!({"t":"ack","seq": inbox.max_seq()})).await;
}
