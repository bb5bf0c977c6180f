//! Retrying a send with the same client id stores nothing new; a send refused while the
//! backbone is down can be retried on the same connection.

use std::time::Duration;

use testkit::{Inbox, System};

use crate::{chat, connect_synced, send_retrying, seq, sid};

#[tokio::test]
async fn retry_with_the_same_id_is_deduplicated() {
    let sys = System::start(1).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let mut bob = sys.connect(0, "bob", "phone").await;
    alice.sync().await;
    bob.sync().await;

    let first = alice.send_chat_ok("c-1", "bob", "once").await;
    assert_eq!(first["dup"], false, "{first}");
    let again = alice.send_chat_ok("c-1", "bob", "once").await;
    assert_eq!(again["dup"], true, "{again}");
    assert_eq!(sid(&again), sid(&first), "a retry returns the same sid");

    // bob gets c-1 once: the next message after it is c-2, not a second c-1.
    let second = alice.send_chat_ok("c-2", "bob", "twice?").await;
    let m1 = bob.expect_type("msg").await;
    assert_eq!(chat(&m1)["id"], "c-1");
    assert_eq!(seq(&m1), sid(&first));
    let m2 = bob.expect_type("msg").await;
    assert_eq!(chat(&m2)["id"], "c-2", "c-1 arrived twice");
    assert_eq!(seq(&m2), sid(&second));
    bob.close().await;

    // The inbox holds exactly the two messages.
    let mut bob = sys.connect(0, "bob", "phone").await;
    let mut inbox = Inbox::new();
    inbox.record_all(&bob.sync().await.items);
    inbox.assert_no_duplicates();
    assert_eq!(inbox.chat_bodies(), ["once", "twice?"]);
}

/// A send refused with `unavailable` while NATS is down does not poison the connection, and
/// nothing sent after it is stored before it: the connection refuses later sends until the
/// client sends the refused one again; once NATS is back, the retry is stored, then the rest,
/// in the order the client first sent them.
#[tokio::test]
async fn a_send_refused_while_nats_is_down_is_retried_on_the_same_connection() {
    let mut sys = System::start(1).await;
    let within = Duration::from_secs(30);
    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    alice.timeout = within;
    let before = alice.send_chat_ok("c-before", "bob", "before").await;

    sys.nats.kill();
    alice.send_chat("c-down", "bob", "while down").await;
    let refused = alice.recv_until(|f| f["id"] == "c-down" && (f["t"] == "sent" || f["t"] == "error")).await;
    assert_eq!(refused["t"], "error", "NATS is down: {refused}");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    // A later send is refused at once, naming the one to retry first.
    alice.send_chat("c-next", "bob", "next").await;
    let blocked = alice.recv_until(|f| f["id"] == "c-next").await;
    assert_eq!(blocked["code"], "unavailable", "{blocked}");
    assert!(blocked["msg"].as_str().is_some_and(|m| m.contains("retry c-down first")), "{blocked}");

    sys.nats.respawn().await;
    let down = send_retrying(&mut alice, "c-down", "bob", "while down", within).await;
    let next = send_retrying(&mut alice, "c-next", "bob", "next", within).await;
    assert!(sid(&before) < sid(&down) && sid(&down) < sid(&next), "{before} {down} {next}");

    let (_bob, synced) = connect_synced(&sys.ws_url(0), &sys.token("bob", Some("phone")), within).await;
    let mut inbox = Inbox::new();
    inbox.record_all(&synced.items);
    inbox.assert_no_duplicates();
    assert_eq!(inbox.chat_bodies(), ["before", "while down", "next"]);
}
