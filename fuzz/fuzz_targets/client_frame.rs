//! `protocol::decode_client_frame` on arbitrary bytes: every WebSocket text frame a client sends
//! goes through it. Beyond "never panics", checks what the gateway relies on: an accepted frame
//! respects the limits and id rules (media descriptors included), only valid JSON is ever
//! accepted, a valid JSON object is never called `bad_json`, and an error's echoed id is bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::groups::{GroupOp, DEFAULT_MAX_MEMBERS, MAX_NAME};
use protocol::{decode_client_frame, ClientFrame, ErrorCode, GroupId, Limits, UserId};

fn check(data: &[u8], limits: &Limits) {
    let res = decode_client_frame(data, limits);
    let json = serde_json::from_slice::<serde_json::Value>(data);
    let valid_json = json.is_ok();
    // PROTOCOL.md: a frame is a JSON object; anything else (even valid JSON) is bad_json.
    let json_object = matches!(json, Ok(serde_json::Value::Object(_)));
    match &res {
        Ok(frame) => {
            assert!(valid_json, "accepted a frame that is not valid JSON: {:?}", String::from_utf8_lossy(data));
            match frame {
                ClientFrame::Send { body, media, .. } | ClientFrame::GroupSend { body, media, .. } => {
                    assert!(body.len() <= limits.max_body, "body over the limit accepted");
                    if let Some(m) = media {
                        assert_eq!(m.validate(), Ok(()), "invalid media descriptor accepted");
                    }
                }
                ClientFrame::Presence { users, .. } | ClientFrame::PresenceSub { users } => {
                    assert!(users.len() <= protocol::frames::MAX_PRESENCE_USERS);
                }
                ClientFrame::Group { op, .. } => match op {
                    GroupOp::Create { name, members } => {
                        assert!(!name.trim().is_empty() && name.len() <= MAX_NAME, "bad group name accepted");
                        check_members(members);
                    }
                    GroupOp::Add { group, members } | GroupOp::Remove { group, members } => {
                        assert!(GroupId::parse(group).is_ok(), "bad group id accepted: {group:?}");
                        check_members(members);
                    }
                    GroupOp::Leave { group } | GroupOp::Info { group } => {
                        assert!(GroupId::parse(group).is_ok(), "bad group id accepted: {group:?}");
                    }
                    GroupOp::List => {}
                },
                _ => {}
            }
        }
        Err(e) => {
            if json_object {
                assert_ne!(e.code, ErrorCode::BadJson, "a valid JSON object answered bad_json: {e:?}");
            }
            if let Some(id) = &e.id {
                assert!(id.len() <= 128, "error echoes an id of {} bytes", id.len());
            }
        }
    }
    // Pure: the same bytes decode the same way.
    assert_eq!(res, decode_client_frame(data, limits));
}

fn check_members(members: &[String]) {
    assert!(members.len() <= DEFAULT_MAX_MEMBERS, "too many members accepted");
    for m in members {
        assert!(UserId::parse(m).is_ok(), "bad member id accepted: {m:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, &Limits::default());
    // A tiny body limit reaches the too_large paths with small inputs.
    check(data, &Limits { max_body: 4 });
});
