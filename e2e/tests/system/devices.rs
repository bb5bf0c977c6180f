//! One user, two devices (`phone`, `laptop`): each gets everything, from its own cursor, and
//! sees what the other sent and read.

use std::time::Duration;

use serde_json::{json, Value};
use testkit::{System, WsClient};

use crate::{chat, in_inbox, seq, sid, wait_purged};

const WAIT: Duration = Duration::from_secs(20);

/// Registers alice's `phone` and `laptop` (a device learns at connect time whether the user has
/// others, so both must be known before the devices that matter connect), then connects the
/// phone to gateway 0 and the laptop to gateway 1, both synced.
async fn alice_on_two_devices(sys: &System) -> (WsClient, WsClient) {
    for dev in ["phone", "laptop"] {
        let mut c = sys.connect(0, "alice", dev).await;
        c.sync().await;
        c.close().await;
    }
    let mut phone = sys.connect(0, "alice", "phone").await;
    phone.sync().await;
    let mut laptop = sys.connect(1, "alice", "laptop").await;
    laptop.sync().await;
    (phone, laptop)
}

/// The next frame, which must be a `msg` of kind `k`.
async fn expect_item(c: &mut WsClient, k: &str) -> Value {
    let f = c.expect_type("msg").await;
    assert_eq!(f["m"]["k"], k, "expected a `{k}` item, got {f}");
    f
}

/// The cursor a device has recorded in KV `cursors`.
async fn cursor(kv: &async_nats::jetstream::kv::Store, key: &str) -> Option<u64> {
    let v = kv.get(key).await.unwrap_or_else(|e| panic!("reading cursors/{key}: {e}"))?;
    std::str::from_utf8(&v).ok()?.trim().parse().ok()
}

#[tokio::test]
async fn each_device_gets_every_message_from_its_own_cursor() {
    let sys = System::start(2).await;
    let (mut phone, mut laptop) = alice_on_two_devices(&sys).await;
    let mut bob = sys.connect(1, "bob", "web").await;
    bob.sync().await;
    let js = sys.nats.jetstream().await;
    let stream = js.get_stream("INBOX").await.expect("INBOX stream");
    let cursors = js.get_key_value(protocol::subjects::CURSORS_BUCKET).await.expect("KV cursors");

    // Both devices get it live; once both have acked it, it leaves the inbox.
    let s1 = sid(&bob.send_chat_ok("b-1", "alice", "one").await);
    for dev in [&mut phone, &mut laptop] {
        let f = expect_item(dev, "chat").await;
        assert_eq!((seq(&f), &chat(&f)["id"]), (s1, &json!("b-1")), "{f}");
        dev.ack(s1).await;
        dev.ping_pong().await;
    }
    wait_purged(&stream, s1, WAIT).await;

    // The laptop goes away; the phone gets and acks two more.
    laptop.close().await;
    let s2 = sid(&bob.send_chat_ok("b-2", "alice", "two").await);
    let s3 = sid(&bob.send_chat_ok("b-3", "alice", "three").await);
    for (s, id) in [(s2, "b-2"), (s3, "b-3")] {
        let f = expect_item(&mut phone, "chat").await;
        assert_eq!((seq(&f), &chat(&f)["id"]), (s, &json!(id)), "{f}");
    }
    phone.ack(s3).await;
    phone.ping_pong().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while cursor(&cursors, "alice.phone").await.is_none_or(|c| c < s3) {
        assert!(tokio::time::Instant::now() < deadline, "the phone's cursor never reached {s3}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The phone's cursor is past them, the laptop's is not: they stay in the inbox (a bounded
    // look: storage had the phone's cursor and two seconds to act on it).
    for _ in 0..20 {
        assert!(in_inbox(&stream, s2).await && in_inbox(&stream, s3).await, "purged before the laptop acked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The laptop comes back and resumes from its own cursor.
    let mut laptop = sys.connect(1, "alice", "laptop").await;
    let synced = laptop.sync().await;
    assert_eq!(synced.hello["resume_from"], s1, "{}", synced.hello);
    let got: Vec<(u64, Value)> = synced.items.iter().map(|f| (seq(f), chat(f)["id"].clone())).collect();
    assert_eq!(got, [(s2, json!("b-2")), (s3, json!("b-3"))]);
    laptop.ack(s3).await;
    laptop.ping_pong().await;
    wait_purged(&stream, s2, WAIT).await;
    wait_purged(&stream, s3, WAIT).await;

    // And both are live again.
    let s4 = sid(&bob.send_chat_ok("b-4", "alice", "four").await);
    for dev in [&mut phone, &mut laptop] {
        assert_eq!(seq(&expect_item(dev, "chat").await), s4);
    }
}

#[tokio::test]
async fn what_one_device_sends_and_reads_shows_on_the_other() {
    let sys = System::start(2).await;
    let (mut phone, mut laptop) = alice_on_two_devices(&sys).await;
    let mut bob = sys.connect(1, "bob", "web").await;
    bob.sync().await;

    // The phone sends to bob: bob gets it, the laptop gets an `outgoing` copy with its sid.
    let sent = phone.send_chat_ok("p-1", "bob", "from my phone").await;
    let s = sid(&sent);
    let f = bob.expect_type("msg").await;
    assert_eq!((chat(&f)["from"].clone(), chat(&f)["dev"].clone()), (json!("alice"), json!("phone")), "{f}");
    assert_eq!(seq(&f), s);
    let out = expect_item(&mut laptop, "outgoing").await;
    let m = &out["m"];
    assert_eq!(m["to"], "bob", "{out}");
    assert_eq!(m["dev"], "phone", "{out}");
    assert_eq!(m["id"], "p-1", "{out}");
    assert_eq!(m["sid"], s, "the copy carries the sid from the phone's `sent`: {out}");
    assert_eq!(m["body"], "from my phone", "{out}");
    let out_seq = seq(&out);

    // The phone does not get its own copy: the next item it gets is bob's later message.
    let b1 = sid(&bob.send_chat_ok("b-1", "alice", "seen on both").await);
    assert!(b1 > out_seq);
    let f = expect_item(&mut phone, "chat").await;
    assert_eq!((seq(&f), &chat(&f)["id"]), (b1, &json!("b-1")), "{f}");
    let f = expect_item(&mut laptop, "chat").await;
    assert_eq!(seq(&f), b1);

    // The phone reads the conversation: the laptop gets a `read_mark`, bob a read receipt.
    phone.send_json(&json!({"t":"read","conv":"bob","up_to":b1})).await;
    let mark = expect_item(&mut laptop, "read_mark").await;
    let m = &mark["m"];
    assert_eq!((&m["conv"], &m["dev"], &m["up_to"]), (&json!("bob"), &json!("phone"), &json!(b1)), "{mark}");
    let mark_seq = seq(&mark);
    let r = bob.recv_until(|f| f["t"] == "msg" && f["m"]["k"] == "receipt").await;
    assert_eq!(
        (&r["m"]["from"], &r["m"]["status"], &r["m"]["up_to"]),
        (&json!("alice"), &json!("read"), &json!(b1)),
        "{r}"
    );

    // ...and not its own `read_mark`: the next item it gets is bob's next message.
    let b2 = sid(&bob.send_chat_ok("b-2", "alice", "after the read").await);
    assert!(b2 > mark_seq);
    let f = expect_item(&mut phone, "chat").await;
    assert_eq!((seq(&f), &chat(&f)["id"]), (b2, &json!("b-2")), "{f}");
    assert_eq!(seq(&expect_item(&mut laptop, "chat").await), b2);

    // Nothing was acked: on reconnect each device drains the same inbox, the phone without its
    // own copies, the laptop with them.
    phone.close().await;
    laptop.close().await;
    let kinds = |items: &[Value]| -> Vec<(u64, String)> {
        items.iter().map(|f| (seq(f), f["m"]["k"].as_str().unwrap_or_default().to_owned())).collect()
    };
    let mut phone = sys.connect(0, "alice", "phone").await;
    let synced = phone.sync().await;
    assert_eq!(kinds(&synced.items), [(b1, "chat".to_string()), (b2, "chat".to_string())]);
    let mut laptop = sys.connect(1, "alice", "laptop").await;
    let synced = laptop.sync().await;
    assert_eq!(
        kinds(&synced.items),
        [
            (out_seq, "outgoing".to_string()),
            (b1, "chat".to_string()),
            (mark_seq, "read_mark".to_string()),
            (b2, "chat".to_string())
        ]
    );
}
