//! Crashes lose nothing that was acknowledged with `sent`.

use std::time::Duration;

use testkit::{Inbox, System};

use crate::{chat, connect_synced, send_retrying, seq, sid};

const N: usize = 10;

/// alice sends N messages to bob (away), each confirmed by `sent`; returns the sids.
async fn send_n(sys: &System) -> Vec<u64> {
    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    let mut sids = Vec::new();
    for i in 0..N {
        let sent = alice.send_chat_ok(&format!("c-{i}"), "bob", &format!("durable {i}")).await;
        sids.push(sid(&sent));
    }
    sids
}

/// bob connects and must get exactly the N messages, once each, in order.
async fn bob_gets_all(sys: &System, sids: &[u64]) {
    let (_bob, synced) =
        connect_synced(&sys.ws_url(0), &sys.token("bob", Some("phone")), Duration::from_secs(30)).await;
    let mut inbox = Inbox::new();
    inbox.record_all(&synced.items);
    inbox.assert_no_duplicates();
    let arrived: Vec<u64> = synced.items.iter().map(seq).collect();
    assert_eq!(arrived, sids, "every acknowledged message, once, in order");
    let expected: Vec<String> = (0..N).map(|i| format!("durable {i}")).collect();
    assert_eq!(inbox.chat_bodies(), expected);
}

#[tokio::test]
async fn gateway_kill9_and_restart_loses_nothing_acknowledged() {
    let mut sys = System::start(1).await;
    let sids = send_n(&sys).await;
    sys.gateways[0].restart().await; // kill -9, start again on the same port
    bob_gets_all(&sys, &sids).await;
}

#[tokio::test]
async fn nats_kill9_and_restart_loses_nothing_acknowledged() {
    let mut sys = System::start(1).await;
    let sids = send_n(&sys).await;
    sys.nats.restart().await; // kill -9, start again on the same port and store
    sys.storage.wait_ready().await;
    sys.gateways[0].wait_ready().await;
    bob_gets_all(&sys, &sids).await;

    // The system works again: a new message goes through, live.
    let (mut bob, _) = connect_synced(&sys.ws_url(0), &sys.token("bob", Some("phone")), Duration::from_secs(30)).await;
    let (mut alice, _) =
        connect_synced(&sys.ws_url(0), &sys.token("alice", Some("web")), Duration::from_secs(30)).await;
    let sent = send_retrying(&mut alice, "c-after", "bob", "after the crash", Duration::from_secs(30)).await;
    let msg = bob.expect_type("msg").await;
    assert_eq!(chat(&msg)["body"], "after the crash");
    assert_eq!(seq(&msg), sid(&sent));
}
