//! Crashes lose nothing that was acknowledged with `sent`; a NATS restart under online users loses
//! nothing on their open connections.

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

/// NATS is killed and restarted while bob and alice stay connected. The gateway's live
/// multiplexer reconnects, subscribes every online user again, confirms it, and resyncs: bob, on
/// the same WebSocket, gets every message sent before, around and after the restart, once each,
/// in order (some are stored before the resubscription, and come from the inbox; later ones come
/// live).
#[tokio::test]
async fn nats_restart_with_users_online_loses_nothing() {
    let mut sys = System::start(1).await;
    let within = Duration::from_secs(30);
    let (mut bob, synced) = connect_synced(&sys.ws_url(0), &sys.token("bob", Some("phone")), within).await;
    assert!(synced.items.is_empty());
    bob.timeout = within;
    let (mut alice, _) = connect_synced(&sys.ws_url(0), &sys.token("alice", Some("web")), within).await;
    let mut expected = Vec::new();
    let mut send = |body: String| {
        expected.push(body.clone());
        body
    };
    let mut inbox = Inbox::new();
    for i in 0..3 {
        let body = send(format!("before {i}"));
        send_retrying(&mut alice, &format!("b-{i}"), "bob", &body, within).await;
        inbox.record(&bob.recv_type("msg").await);
    }

    sys.nats.restart().await; // kill -9, start again on the same port and store
                              // At once, while the gateway may not have resubscribed yet.
    for i in 0..5 {
        let body = send(format!("around {i}"));
        send_retrying(&mut alice, &format!("r-{i}"), "bob", &body, within).await;
    }
    sys.gateways[0].wait_ready().await; // ready again: the live subscriptions are back
    for i in 0..5 {
        let body = send(format!("after {i}"));
        send_retrying(&mut alice, &format!("a-{i}"), "bob", &body, within).await;
    }

    while inbox.len() < expected.len() {
        inbox.record(&bob.recv_type("msg").await);
    }
    // Anything more would be a duplicate.
    loop {
        match bob.next_event(Duration::from_millis(500)).await {
            testkit::Event::Frame(f) if f["t"] == "msg" => {
                inbox.record(&f);
            }
            testkit::Event::Frame(_) => {}
            testkit::Event::Timeout => break,
            testkit::Event::Closed(code) => panic!("bob's connection closed ({code:?})"),
        }
    }
    inbox.assert_no_duplicates();
    assert_eq!(inbox.chat_bodies(), expected, "every message, once, in order, on the same connection");
    assert!(bob.close_code().is_none());
    assert!(
        sys.gateways[0].metric("gateway_live_mux_reconnects_total").await >= 1.0,
        "the live multiplexer reconnected"
    );
}
