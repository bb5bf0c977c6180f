//! WebSocket framing (wscodec): arbitrary bytes, fed in arbitrary chunks, must never panic,
//! must decode the same whatever the chunking, and an idle decoder must hold no buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wscodec::{Decoder, Inbound, Limits};

const LIMITS: Limits = Limits { max_frame: 4096, max_message: 8192 };

/// (messages as debug strings, the first violation's code), feeding `data` in chunks cut at
/// the offsets `cuts` picks.
fn run(data: &[u8], cuts: &[u8]) -> (Vec<String>, Option<u16>, usize) {
    let mut dec = Decoder::new(LIMITS);
    let mut got = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = match cuts.get(i) {
            Some(&c) => (c as usize % rest.len()) + 1,
            None => rest.len(),
        };
        i += 1;
        let mut chunk = rest[..n].to_vec();
        rest = &rest[n..];
        if let Err(v) = dec.feed(&mut chunk, &mut |m: Inbound<'_>| got.push(format!("{m:?}"))) {
            return (got, Some(v.code), 0);
        }
    }
    (got, None, dec.buffered())
}

fuzz_target!(|input: &[u8]| {
    // The first 16 bytes choose the chunking, the rest is the stream.
    let (cuts, data) = input.split_at(input.len().min(16));
    let whole = run(data, &[]);
    let chunked = run(data, cuts);
    assert_eq!(whole.0, chunked.0, "messages depend on read boundaries");
    assert_eq!(whole.1, chunked.1, "violations depend on read boundaries");
    if let Some(code) = whole.1 {
        assert!(matches!(code, 1002 | 1007 | 1009), "unexpected close code {code}");
    }
});
