//! Retrying a send with the same client id stores nothing new.

use testkit::{Inbox, System};

use crate::{chat, seq, sid};

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
