//! The gateway live multiplexer's NATS protocol parser (gateway/src/bridge/live_mux/proto.rs) on
//! arbitrary bytes: everything a NATS server (or whatever answers on its address) sends the
//! gateway's live connection. proto.rs uses only std, so it is compiled in with #[path].
//!
//! Checks: never panics; every operation consumes at least one byte and no more than it has; the
//! same bytes fed in two pieces, split anywhere, give the same operations (reads split the
//! stream at arbitrary points); header blocks never panic the header parser.
#![no_main]
#![allow(dead_code)]

use libfuzzer_sys::fuzz_target;

#[path = "../../gateway/src/bridge/live_mux/proto.rs"]
mod proto;

use proto::{parse, HeaderBlock, ServerOp};

const MAX_PAYLOAD: usize = 4096;

/// Every operation of `input` as a debug string, parsed from a buffer fed in the pieces
/// `input[..cut]` and `input[cut..]`, and whether parsing stopped on an error.
fn run(input: &[u8], cut: usize) -> (Vec<String>, bool) {
    let mut buf = Vec::new();
    let mut ops = Vec::new();
    for piece in [&input[..cut], &input[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match parse(&buf, MAX_PAYLOAD) {
                Ok(Some((op, n))) => {
                    assert!(n > 0 && n <= buf.len(), "consumed {n} of {}", buf.len());
                    if let ServerOp::Msg(m) = &op {
                        if let Some(h) = m.headers {
                            if let Ok(h) = HeaderBlock::parse(h) {
                                let _ = h.get("Nats-Sequence");
                            }
                        }
                    }
                    ops.push(format!("{op:?}"));
                    buf.drain(..n);
                }
                Ok(None) => break,
                Err(_) => return (ops, true),
            }
        }
    }
    (ops, false)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // The first byte picks the split point.
    let (cut, input) = (data[0] as usize, &data[1..]);
    let cut = if input.is_empty() { 0 } else { cut % (input.len() + 1) };
    let whole = run(input, input.len());
    let split = run(input, cut);
    // An error may surface at a different point (a piece can end inside the bad operation),
    // but the operations before it are the same.
    if !whole.1 && !split.1 {
        assert_eq!(whole.0, split.0, "split at {cut} changed the operations");
    } else {
        let n = whole.0.len().min(split.0.len());
        assert_eq!(whole.0[..n], split.0[..n], "split at {cut} changed the operations before an error");
    }
});
