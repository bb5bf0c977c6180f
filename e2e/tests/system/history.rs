//! Server-side history for users who opt in: delivered messages move from the inbox into the
//! user's history, its own messages interleave in order, pages go back and forth, a user reads
//! only its own conversations, and history survives a restart of storage.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::System;

async fn page(c: &mut testkit::WsClient, req: Value) -> Value {
    c.send_json(&req).await;
    let id = req["id"].clone();
    c.recv_until(|f| f["t"] == "history" && f["id"] == id).await
}

fn bodies(p: &Value) -> Vec<String> {
    p["items"].as_array().unwrap().iter().map(|i| i["m"]["body"].as_str().unwrap_or("").to_owned()).collect()
}

#[tokio::test]
async fn opted_in_users_page_through_their_history() {
    let mut sys = System::start(1).await;
    let mut bob = sys.connect(0, "bob", "phone").await;
    bob.sync().await;
    bob.send_json(&json!({"t": "settings", "id": "s1", "history_days": 30})).await;
    let s = bob.recv_type("settings").await;
    assert_eq!(s["history_days"], 30, "{s}");
    // The setting applies to this session at once and to new ones; reconnect to be sure the
    // stored value is read back.
    drop(bob);
    let mut bob = sys.connect(0, "bob", "phone").await;
    bob.sync().await;
    bob.send_json(&json!({"t": "settings", "id": "s2"})).await;
    assert_eq!(bob.recv_type("settings").await["history_days"], 30);

    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    // A conversation: alice 1, bob 2, alice 3, bob 4, alice 5 (bob acks what he receives).
    for i in 1..=5 {
        if i % 2 == 1 {
            alice.send_chat_ok(&format!("a{i}"), "bob", &format!("m{i}")).await;
            let m = bob.recv_until(|f| f["t"] == "msg" && f["m"]["k"] == "chat").await;
            bob.ack(m["seq"].as_u64().unwrap()).await;
        } else {
            bob.send_chat_ok(&format!("b{i}"), "alice", &format!("m{i}")).await;
        }
    }
    bob.ping_pong().await;

    // Storage moves delivered items into history after the acks (bounded wait).
    let want: Vec<String> = (1..=5).map(|i| format!("m{i}")).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let latest = loop {
        let p = page(&mut bob, json!({"t": "history", "id": "h", "conv": "alice", "limit": 10})).await;
        if bodies(&p) == want || tokio::time::Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(bodies(&latest), want, "{latest}");
    assert_eq!(latest["more"], false);
    let items = latest["items"].as_array().unwrap();
    assert_eq!(items[0]["m"]["k"], "chat");
    assert_eq!(items[1]["m"]["k"], "outgoing");
    assert_eq!(items[1]["m"]["to"], "alice");

    // Paging: the two newest, then the ones before them, then forward from the oldest.
    let p1 = page(&mut bob, json!({"t": "history", "id": "p1", "conv": "alice", "limit": 2})).await;
    assert_eq!(bodies(&p1), ["m4", "m5"]);
    assert_eq!(p1["more"], true);
    let first_hseq = p1["items"][0]["hseq"].as_u64().unwrap();
    let p2 =
        page(&mut bob, json!({"t": "history", "id": "p2", "conv": "alice", "before": first_hseq, "limit": 2})).await;
    assert_eq!(bodies(&p2), ["m2", "m3"]);
    let oldest = latest["items"][0]["hseq"].as_u64().unwrap();
    let p3 = page(&mut bob, json!({"t": "history", "id": "p3", "conv": "alice", "after": oldest, "limit": 2})).await;
    assert_eq!(bodies(&p3), ["m2", "m3"]);

    // Alice did not opt in: she has no history, and nobody reads bob's.
    let a = page(&mut alice, json!({"t": "history", "id": "ha", "conv": "bob", "limit": 10})).await;
    assert!(a["items"].as_array().unwrap().is_empty(), "{a}");

    // History survives a restart of storage.
    sys.storage.restart().await;
    let again = page(&mut bob, json!({"t": "history", "id": "h2", "conv": "alice", "limit": 10})).await;
    assert_eq!(bodies(&again), want);

    // Bad requests are refused with the frame's id.
    bob.send_json(&json!({"t": "history", "id": "bad", "conv": "alice", "before": 5, "after": 1})).await;
    let e = bob.recv_type("error").await;
    assert_eq!((e["code"].as_str(), e["id"].as_str()), (Some("bad_field"), Some("bad")));
    bob.send_json(&json!({"t": "settings", "id": "bad2", "history_days": 400})).await;
    assert_eq!(bob.recv_type("error").await["code"], "bad_field");
}

#[tokio::test]
async fn group_history_stops_after_leaving() {
    let sys = System::start(1).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let mut bob = sys.connect(0, "bob", "phone").await;
    alice.sync().await;
    bob.sync().await;
    // Fan-out and archiving run behind the acks; give them room on a loaded CI machine.
    bob.timeout = Duration::from_secs(30);
    bob.send_json(&json!({"t": "settings", "id": "s", "history_days": 7})).await;
    bob.recv_type("settings").await;
    alice.send_json(&json!({"t": "group_create", "id": "g", "name": "club", "members": ["bob"]})).await;
    let gid = alice.recv_type("group").await["group"]["gid"].as_str().unwrap().to_owned();

    let mut acked = 0;
    for i in 0..2 {
        alice
            .send_json(&json!({"t": "gsend", "id": format!("g{i}"), "group": gid, "body": format!("before{i}")}))
            .await;
        alice.recv_type("sent").await;
    }
    // Bob reads and acks them, then leaves; later messages are not his.
    for _ in 0..2 {
        let m = bob.recv_until(|f| f["t"] == "msg" && f["m"]["k"] == "group").await;
        acked = m["seq"].as_u64().unwrap();
    }
    bob.ack(acked).await;
    bob.send_json(&json!({"t": "group_leave", "id": "l", "group": gid})).await;
    // The answer and the `left` event race each other; take both in whatever order they come.
    let (mut answered, mut left_seq) = (false, None);
    while !answered || left_seq.is_none() {
        let f = bob.recv().await;
        if f["t"] == "group" && f["id"] == "l" {
            answered = true;
        } else if f["t"] == "msg" && f["m"]["k"] == "group_event" && f["m"]["event"] == "left" {
            left_seq = f["seq"].as_u64();
        }
    }
    alice.send_json(&json!({"t": "gsend", "id": "after", "group": gid, "body": "after"})).await;
    alice.recv_type("sent").await;
    // Bob acks everything he got (up to the leave event), so it all moves to history.
    bob.ack(left_seq.unwrap()).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let p = loop {
        let p = page(&mut bob, json!({"t": "history", "id": "h", "group": gid, "limit": 20})).await;
        let b = bodies(&p);
        if b.iter().filter(|s| s.starts_with("before")).count() == 2 || tokio::time::Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let b = bodies(&p);
    assert!(b.contains(&"before0".to_owned()) && b.contains(&"before1".to_owned()), "{p}");
    assert!(!b.contains(&"after".to_owned()), "a message after leaving is not in the leaver's history: {p}");
}
