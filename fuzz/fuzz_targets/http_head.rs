//! The gateway's HTTP request-head parser (gateway/src/handshake.rs) on arbitrary bytes: what
//! every TCP connection sends first, before any authentication. handshake.rs lives in the gateway
//! *binary* crate, so it is compiled into this target from its source file with #[path] (web.rs
//! with it, which handshake.rs calls). Moving both into a gateway library target would let the
//! fuzz target depend on it like any crate.
//!
//! Checks: never panics; a complete head's length is within the input; the head alone parses to
//! the same request (it does not depend on bytes after it); a strict prefix of a complete head
//! never completes differently (the gateway parses as bytes arrive); token verification and the
//! 101 response never panic on whatever the head carried.
#![no_main]
#![allow(dead_code)]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protocol::TokenKeys;

#[path = "../../gateway/src/web.rs"]
mod web;

#[path = "../../gateway/src/handshake.rs"]
mod handshake;

use handshake::{authenticate, origin_allowed, parse_head, switching_protocols, Request, MAX_HEAD};

fn keys() -> &'static TokenKeys {
    static KEYS: OnceLock<TokenKeys> = OnceLock::new();
    KEYS.get_or_init(|| TokenKeys::hs256(b"fuzz-secret-0123456789", 60))
}

fuzz_target!(|data: &[u8]| {
    // The gateway never hands the parser more than MAX_HEAD plus one read chunk.
    let data = &data[..data.len().min(MAX_HEAD + 1024)];
    let res = parse_head(data);
    let Ok(Some((req, len))) = &res else { return };
    assert!(*len > 0 && *len <= data.len(), "head length {len} outside the input of {}", data.len());
    assert_eq!(parse_head(&data[..*len]), res, "the head alone parses differently");
    // Prefixes, as the gateway sees them while bytes arrive: none may complete (a shorter head
    // would have been found) and none may fail (the bytes were valid so far).
    for k in [0, 1, len / 4, len / 2, len.saturating_sub(2), len - 1] {
        if k < *len {
            assert_eq!(parse_head(&data[..k]), Ok(None), "prefix of {k} of a {len}-byte head");
        }
    }
    if let Request::Upgrade(up) = req {
        let _ = switching_protocols(&up.key);
        let _ = origin_allowed(&["https://chat.example".to_owned()], up.origin.as_deref());
        if let Ok((user, device, _)) = authenticate(keys(), up) {
            // Forged tokens cannot verify; if one did, its ids must still be valid.
            assert!(protocol::UserId::parse(user.as_str()).is_ok());
            assert!(protocol::DeviceId::parse(device.as_str()).is_ok());
        }
    }
});
