//! Malformed frames get the right error code, and the connection keeps working.

use serde_json::json;
use testkit::System;

use crate::chat;

#[tokio::test]
async fn malformed_frames_get_error_codes_and_the_connection_survives() {
    let sys = System::start(1).await;
    let mut bob = sys.connect(0, "bob", "phone").await;
    bob.sync().await;
    let mut alice = sys.connect(0, "alice", "web").await;
    let max_body = alice.sync().await.hello["max_body"].as_u64().expect("hello.max_body") as usize;
    // The too-large frame must stay under the 64 KiB frame limit (else it is a close, 1009).
    assert!(max_body + 200 < 64 * 1024, "max_body {max_body}");
    let too_large = json!({"t":"send","id":"c-big","to":"bob","body":"x".repeat(max_body + 1)});
    let too_large = too_large.to_string();

    // (frame, expected code, expected id when the frame had a readable one)
    let cases: [(&str, &str, Option<&str>); 10] = [
        ("{", "bad_json", None),
        ("hello there", "bad_json", None),
        (r#"{"t":"nope","id":"c-0"}"#, "unknown_type", None),
        (r#"{"id":"c-0"}"#, "unknown_type", None),
        (r#"{"t":"send","id":"c-1","to":"bob"}"#, "missing_field", Some("c-1")),
        (r#"{"t":"ack"}"#, "missing_field", None),
        (r#"{"t":"ack","seq":"x"}"#, "bad_field", None),
        (r#"{"t":"send","id":"c 2","to":"bob","body":"x"}"#, "bad_field", None),
        (r#"{"t":"send","id":"c-3","to":"no.such.user","body":"x"}"#, "bad_field", Some("c-3")),
        (&too_large, "too_large", Some("c-big")),
    ];
    for (frame, code, id) in cases {
        let shown = &frame[..frame.len().min(60)];
        alice.send_raw_text(frame).await;
        let err = alice.expect_type("error").await;
        assert_eq!(err["code"], code, "frame {shown}: {err}");
        if let Some(id) = id {
            assert_eq!(err["id"], id, "frame {shown}: {err}");
        }
        // Still open and answering.
        alice.send_json(&json!({"t":"ping"})).await;
        alice.expect_type("pong").await;
    }

    alice.send_binary(&[0x01, 0x02, 0x03]).await;
    let err = alice.expect_type("error").await;
    assert_eq!(err["code"], "binary_unsupported", "{err}");

    // A following ping and send work; none of the refused sends was delivered.
    alice.send_json(&json!({"t":"ping"})).await;
    alice.expect_type("pong").await;
    alice.send_chat_ok("c-ok", "bob", "after the junk").await;
    let msg = bob.expect_type("msg").await;
    assert_eq!(chat(&msg)["id"], "c-ok", "{msg}");
}
