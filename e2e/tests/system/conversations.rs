//! A client that comes back gets, with its inbox drain, what it needs to rebuild its chat list:
//! per conversation the last server id and the number of new messages.

use serde_json::json;
use testkit::System;

#[tokio::test]
async fn reconnecting_client_gets_a_conversation_summary() {
    let sys = System::start(1).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let mut carol = sys.connect(0, "carol", "web").await;
    alice.sync().await;
    carol.sync().await;

    alice.send_json(&json!({"t": "group_create", "id": "g", "name": "trip", "members": ["bob", "carol"]})).await;
    let gid = alice.recv_type("group").await["group"]["gid"].as_str().unwrap().to_owned();
    let mut last_alice = 0;
    for i in 0..3 {
        last_alice = alice.send_chat_ok(&format!("a-{i}"), "bob", "hi").await["sid"].as_u64().unwrap();
    }
    let last_carol = carol.send_chat_ok("c-0", "bob", "yo").await["sid"].as_u64().unwrap();
    let mut last_group = 0;
    for i in 0..2 {
        alice.send_json(&json!({"t": "gsend", "id": format!("g-{i}"), "group": gid, "body": "plan"})).await;
        last_group = alice.recv_type("sent").await["sid"].as_u64().unwrap();
    }
    // `sent` means durable in the group timeline; the fan-out to inboxes follows. Carol, online,
    // seeing the last group message means bob's copy is stored too (one fan-out per entry).
    carol.recv_until(|f| f["t"] == "msg" && f["m"]["k"] == "group" && f["m"]["sid"] == last_group).await;

    // Bob was never connected: everything waits in his inbox.
    let mut bob = sys.connect(0, "bob", "phone").await;
    let synced = bob.sync().await;
    let convs = synced.conversations.expect("a conversations frame before synced");
    let list = convs["convs"].as_array().unwrap();
    let find =
        |key: &str, val: &str| list.iter().find(|c| c[key] == val).unwrap_or_else(|| panic!("{key}={val} in {convs}"));
    assert_eq!(find("conv", "alice")["unread"], 3, "{convs}");
    assert_eq!(find("conv", "alice")["last_sid"], last_alice, "{convs}");
    assert_eq!(find("conv", "carol")["unread"], 1, "{convs}");
    assert_eq!(find("conv", "carol")["last_sid"], last_carol, "{convs}");
    assert_eq!(find("group", &gid)["unread"], 2, "{convs}");
    assert_eq!(find("group", &gid)["last_sid"], last_group, "{convs}");

    // Nothing new: no summary.
    bob.ack(synced.seq).await;
    bob.ping_pong().await;
    drop(bob);
    let mut bob = sys.connect(0, "bob", "phone").await;
    let again = bob.sync().await;
    assert!(again.conversations.is_none(), "{:?}", again.conversations);
}
