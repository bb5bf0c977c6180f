//! Media by reference: descriptors are validated and carried to the recipients as they were sent;
//! bad ones are refused with `bad_field` and store nothing.

use serde_json::json;
use testkit::System;

use crate::chat;

#[tokio::test]
async fn media_descriptors_reach_recipients_and_bad_ones_are_refused() {
    let sys = System::start(1).await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let mut bob = sys.connect(0, "bob", "phone").await;
    alice.sync().await;
    bob.sync().await;

    let media = json!({
        "url": "https://cdn.example/u/alice/9f2c.jpg.enc",
        "mime": "image/jpeg",
        "size": 183_221,
        "thumb": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==",
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "key": "q83vEjRWeJCrze8SNFZ4kA==",
        "name": "beach.jpg"
    });
    alice.send_json(&json!({"t": "send", "id": "m-1", "to": "bob", "body": "", "media": media})).await;
    assert_eq!(alice.recv_type("sent").await["id"], "m-1");
    let msg = bob.expect_type("msg").await;
    assert_eq!(chat(&msg)["media"], media, "{msg}");

    // Every bad shape is refused with the frame's id, and nothing reaches bob.
    let bad = [
        (json!({"url": "http://cdn.example/x", "mime": "image/png", "size": 1}), "bad_field"),
        (json!({"url": "https://cdn.example/x", "mime": "png", "size": 1}), "bad_field"),
        (json!({"url": "https://cdn.example/x", "mime": "image/png", "size": 0}), "bad_field"),
        (json!({"url": "https://cdn.example/x", "mime": "image/png", "size": 1, "sha256": "nope"}), "bad_field"),
        (json!({"url": "https://cdn.example/x", "mime": "image/png", "size": "1"}), "bad_field"),
        (json!({"url": "https://cdn.example/x", "mime": "image/png"}), "missing_field"),
    ];
    for (i, (m, code)) in bad.iter().enumerate() {
        let id = format!("bad-{i}");
        alice.send_json(&json!({"t": "send", "id": id, "to": "bob", "body": "", "media": m})).await;
        let e = alice.recv_type("error").await;
        assert_eq!(e["code"], *code, "{m} -> {e}");
        assert_eq!(e["id"], id.as_str(), "{e}");
    }
    bob.expect_silence(std::time::Duration::from_millis(500)).await;

    // In a group the descriptor reaches every member too.
    alice.send_json(&json!({"t": "group_create", "id": "g", "name": "pics", "members": ["bob"]})).await;
    let gid = alice.recv_type("group").await["group"]["gid"].as_str().unwrap().to_owned();
    alice.send_json(&json!({"t": "gsend", "id": "m-2", "group": gid, "body": "", "media": media})).await;
    assert_eq!(alice.recv_type("sent").await["id"], "m-2");
    let item = bob.recv_until(|f| f["t"] == "msg" && f["m"]["k"] == "group").await;
    assert_eq!(item["m"]["media"], media, "{item}");
}
