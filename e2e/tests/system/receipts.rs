//! `delivered` receipts reach the sender, online and offline.

use serde_json::Value;
use testkit::{System, WsClient};

use crate::{chat, seq, sid};

fn is_receipt(f: &Value) -> bool {
    f["t"] == "msg" && f["m"]["k"] == "receipt"
}

async fn expect_delivered_receipt(alice: &mut WsClient, up_to: u64) {
    let r = alice.recv_until(is_receipt).await;
    let m = &r["m"];
    assert_eq!(m["from"], "bob", "{r}");
    assert_eq!(m["status"], "delivered", "{r}");
    assert_eq!(m["up_to"], up_to, "{r}");
}

#[tokio::test]
async fn delivered_receipt_reaches_an_online_sender() {
    let sys = System::start(2).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let mut bob = sys.connect(1, "bob", "phone").await;
    alice.sync().await;
    bob.sync().await;

    let sent = alice.send_chat_ok("c-1", "bob", "did you get this?").await;
    let msg = bob.expect_type("msg").await;
    assert_eq!(chat(&msg)["id"], "c-1");
    bob.ack(seq(&msg)).await;

    expect_delivered_receipt(&mut alice, sid(&sent)).await;
}

#[tokio::test]
async fn delivered_receipt_reaches_an_offline_sender_on_reconnect() {
    let sys = System::start(2).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    let sent = alice.send_chat_ok("c-1", "bob", "read me later").await;
    alice.close().await;

    let mut bob = sys.connect(1, "bob", "phone").await;
    let synced = bob.sync().await;
    assert_eq!(synced.items.len(), 1, "{:?}", synced.items);
    assert_eq!(chat(&synced.items[0])["id"], "c-1");
    bob.ack(seq(&synced.items[0])).await;
    bob.ping_pong().await; // the gateway has read the ack

    // The receipt is in alice's inbox (drained on connect) or arrives live right after.
    let mut alice = sys.connect(0, "alice", "web").await;
    expect_delivered_receipt(&mut alice, sid(&sent)).await;
}

async fn expect_read_receipt(alice: &mut WsClient, up_to: u64) {
    let r = alice.recv_until(|f| is_receipt(f) && f["m"]["status"] == "read").await;
    let m = &r["m"];
    assert_eq!(m["from"], "bob", "{r}");
    assert_eq!(m["up_to"], up_to, "{r}");
}

#[tokio::test]
async fn read_receipt_reaches_an_online_sender() {
    let sys = System::start(2).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let mut bob = sys.connect(1, "bob", "phone").await;
    alice.sync().await;
    bob.sync().await;

    let sent = alice.send_chat_ok("c-1", "bob", "read this").await;
    let msg = bob.expect_type("msg").await;
    assert_eq!(chat(&msg)["id"], "c-1");
    bob.send_json(&serde_json::json!({"t":"read","conv":"alice","up_to":seq(&msg)})).await;

    expect_read_receipt(&mut alice, sid(&sent)).await;
}

#[tokio::test]
async fn read_receipt_reaches_an_offline_sender_on_reconnect() {
    let sys = System::start(2).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    let sent = alice.send_chat_ok("c-1", "bob", "read me later").await;
    alice.close().await;

    let mut bob = sys.connect(1, "bob", "phone").await;
    let synced = bob.sync().await;
    assert_eq!(synced.items.len(), 1, "{:?}", synced.items);
    let s = seq(&synced.items[0]);
    bob.ack(s).await;
    bob.send_json(&serde_json::json!({"t":"read","conv":"alice","up_to":s})).await;
    bob.ping_pong().await; // the gateway has read both

    // The receipt is in alice's inbox (drained on connect) or arrives live right after.
    let mut alice = sys.connect(0, "alice", "web").await;
    alice.timeout = std::time::Duration::from_secs(20);
    expect_read_receipt(&mut alice, sid(&sent)).await;
}

/// A device that received an item but whose ack was lost resumes with `since`: the gateway takes
/// that as its ack, so the sender still gets its `delivered` receipt and nothing is redelivered.
#[tokio::test]
async fn resuming_with_since_counts_as_the_lost_ack() {
    let sys = System::start(1).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    let sent = alice.send_chat_ok("c-1", "bob", "ack lost").await;

    let mut bob = sys.connect(0, "bob", "phone").await;
    let synced = bob.sync().await;
    let held = seq(&synced.items[0]);
    bob.close().await; // no ack

    let token = sys.token("bob", Some("phone"));
    let mut bob = WsClient::open(&sys.ws_url(0), &token, None, Some(held)).await;
    let synced = bob.sync().await;
    assert!(synced.items.is_empty(), "nothing the client holds is sent again: {:?}", synced.items);
    expect_delivered_receipt(&mut alice, sid(&sent)).await;
}

/// A `since` from another server's store (beyond anything stored here) is ignored: the client
/// gets what it does not have instead of silently missing it.
#[tokio::test]
async fn a_since_from_another_store_is_ignored() {
    let sys = System::start(1).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    alice.send_chat_ok("c-1", "bob", "new epoch").await;

    let token = sys.token("bob", Some("phone"));
    let mut bob = WsClient::open(&sys.ws_url(0), &token, None, Some(1_000_000)).await;
    let synced = bob.sync().await;
    assert_eq!(synced.hello["resume_from"], 0, "{}", synced.hello);
    assert_eq!(synced.items.len(), 1, "{:?}", synced.items);
    assert_eq!(chat(&synced.items[0])["id"], "c-1");
}

/// A `since` with nothing of the user's between the stored cursor and it (here the sequence of
/// another user's message; after a store restart, items the inbox no longer holds) is taken as
/// the ack and the connection goes on. It once made the gateway ask the inbox for the same
/// items forever, stalling the connection and, through the NATS bridge, the whole gateway
/// (found by the fault suite's nats-kill-churn case).
#[tokio::test]
async fn a_since_with_nothing_of_the_users_below_it_does_not_stall_the_connection() {
    let sys = System::start(1).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    let other = alice.send_chat_ok("c-1", "carol", "for carol").await;
    let later = alice.send_chat_ok("c-2", "bob", "for bob").await;

    let token = sys.token("bob", Some("phone"));
    let mut bob = WsClient::open(&sys.ws_url(0), &token, None, Some(sid(&other))).await;
    let synced = bob.sync().await;
    assert_eq!(synced.items.len(), 1, "{:?}", synced.items);
    assert_eq!(chat(&synced.items[0])["id"], "c-2");
    assert_eq!(seq(&synced.items[0]), sid(&later));
}
