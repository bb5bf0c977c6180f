use super::*;

const LIMITS: Limits = Limits { max_frame: 1024, max_message: 4096 };

/// A client frame: `first` is the first header byte (FIN, RSV, opcode), masked with a fixed key.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![first];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

const TEXT: u8 = 0x81;
const BINARY: u8 = 0x82;
const TEXT_FIRST: u8 = 0x01;
const CONT: u8 = 0x00;
const CONT_LAST: u8 = 0x80;
const CLOSE: u8 = 0x88;
const PING: u8 = 0x89;
const PONG: u8 = 0x8a;

#[derive(Debug, PartialEq, Eq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

fn own(m: Inbound<'_>) -> Owned {
    match m {
        Inbound::Text(t) => Owned::Text(t.to_owned()),
        Inbound::Binary(b) => Owned::Binary(b.to_vec()),
        Inbound::Ping(b) => Owned::Ping(b.to_vec()),
        Inbound::Pong(b) => Owned::Pong(b.to_vec()),
        Inbound::Close(c) => Owned::Close(c.map(|(code, r)| (code, r.to_owned()))),
    }
}

/// Feeds `chunks` one after the other; returns the messages and the first violation.
fn decode_chunks(dec: &mut Decoder, chunks: &[&[u8]]) -> (Vec<Owned>, Option<Violation>) {
    let mut got = Vec::new();
    for chunk in chunks {
        let mut buf = chunk.to_vec();
        if let Err(v) = dec.feed(&mut buf, &mut |m| got.push(own(m))) {
            return (got, Some(v));
        }
    }
    (got, None)
}

fn decode_all(bytes: &[u8]) -> (Vec<Owned>, Option<Violation>) {
    decode_chunks(&mut Decoder::new(LIMITS), &[bytes])
}

fn stream() -> (Vec<u8>, Vec<Owned>) {
    let mut bytes = frame(TEXT, br#"{"t":"ping"}"#);
    bytes.extend(frame(TEXT_FIRST, "héllo ".as_bytes()));
    bytes.extend(frame(PING, b"p1"));
    bytes.extend(frame(CONT, &[0xe2, 0x82])); // a character split across fragments
    bytes.extend(frame(CONT_LAST, &[0xac, b'!']));
    bytes.extend(frame(BINARY, &[0, 1, 2]));
    bytes.extend(frame(TEXT, &vec![b'x'; 300])); // 16-bit length
    bytes.extend(frame(PONG, b""));
    bytes.extend(frame(CLOSE, &[0x03, 0xe8, b'b', b'y', b'e']));
    let expected = vec![
        Owned::Text(r#"{"t":"ping"}"#.into()),
        Owned::Ping(b"p1".to_vec()),
        Owned::Text("héllo €!".into()),
        Owned::Binary(vec![0, 1, 2]),
        Owned::Text("x".repeat(300)),
        Owned::Pong(vec![]),
        Owned::Close(Some((1000, "bye".into()))),
    ];
    (bytes, expected)
}

#[test]
fn decodes_a_stream_in_one_read() {
    let (bytes, expected) = stream();
    let mut dec = Decoder::new(LIMITS);
    let (got, err) = decode_chunks(&mut dec, &[&bytes]);
    assert_eq!(err, None);
    assert_eq!(got, expected);
    assert!(dec.closed());
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn decodes_the_same_whatever_the_read_boundaries() {
    let (bytes, expected) = stream();
    for split in 0..=bytes.len() {
        let (got, err) = decode_chunks(&mut Decoder::new(LIMITS), &[&bytes[..split], &bytes[split..]]);
        assert_eq!(err, None, "split at {split}");
        assert_eq!(got, expected, "split at {split}");
    }
    // One byte at a time.
    let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
    let (got, err) = decode_chunks(&mut Decoder::new(LIMITS), &chunks);
    assert_eq!(err, None);
    assert_eq!(got, expected);
}

#[test]
fn holds_no_heap_between_complete_frames() {
    let mut dec = Decoder::new(LIMITS);
    let f = frame(TEXT, b"hello");
    let (_, err) = decode_chunks(&mut dec, &[&f[..3]]);
    assert_eq!(err, None);
    assert!(dec.buffered() > 0, "an incomplete frame is carried");
    let (got, err) = decode_chunks(&mut dec, &[&f[3..]]);
    assert_eq!(err, None);
    assert_eq!(got, vec![Owned::Text("hello".into())]);
    assert_eq!(dec.buffered(), 0, "nothing kept once the frame completed");
}

#[test]
fn ignores_what_follows_a_close() {
    let mut bytes = frame(CLOSE, b"");
    bytes.extend(frame(TEXT, b"after"));
    bytes.extend(b"\xff\xff garbage");
    let (got, err) = decode_all(&bytes);
    assert_eq!(err, None);
    assert_eq!(got, vec![Owned::Close(None)]);
}

fn violation(bytes: &[u8]) -> Violation {
    let (_, err) = decode_all(bytes);
    err.expect("a violation")
}

#[test]
fn refuses_protocol_violations_with_1002() {
    let unmasked = [TEXT, 2, b'h', b'i'];
    let mut mid_message = frame(TEXT_FIRST, b"a");
    mid_message.extend(frame(TEXT, b"b"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked", unmasked.to_vec()),
        ("rsv1", frame(TEXT | 0x40, b"x")),
        ("rsv3", frame(TEXT | 0x10, b"x")),
        ("reserved data opcode", frame(0x83, b"")),
        ("reserved control opcode", frame(0x8b, b"")),
        ("fragmented ping", frame(0x09, b"")),
        ("long ping", frame(PING, &[0; 126])),
        ("orphan continuation", frame(CONT_LAST, b"x")),
        ("new message mid-fragment", mid_message),
        ("1-byte close", frame(CLOSE, &[3])),
        ("close code 1005", frame(CLOSE, &1005u16.to_be_bytes())),
        ("close code 999", frame(CLOSE, &999u16.to_be_bytes())),
        ("close code 5000", frame(CLOSE, &5000u16.to_be_bytes())),
    ];
    for (name, bytes) in cases {
        assert_eq!(violation(&bytes).code, 1002, "{name}");
    }
}

#[test]
fn refuses_invalid_utf8_with_1007() {
    assert_eq!(violation(&frame(TEXT, &[0xff])).code, 1007);
    let mut split = frame(TEXT_FIRST, &[0xe2]);
    split.extend(frame(CONT_LAST, b"a"));
    assert_eq!(violation(&split).code, 1007);
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.push(0xc0);
    assert_eq!(violation(&frame(CLOSE, &close)).code, 1007);
    // Binary is not validated.
    assert_eq!(decode_all(&frame(BINARY, &[0xff])).1, None);
}

#[test]
fn refuses_oversized_frames_from_the_header_alone() {
    let limits = Limits { max_frame: 100, max_message: 150 };
    // A header claiming 2^40 bytes: refused before any payload arrives.
    let mut huge = vec![TEXT, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    let (_, err) = decode_chunks(&mut Decoder::new(limits), &[&huge]);
    assert_eq!(err, Some(Violation::TOO_BIG));
    let (_, err) = decode_chunks(&mut Decoder::new(limits), &[&frame(TEXT, &[b'a'; 101])[..8]]);
    assert_eq!(err.map(|v| v.code), Some(1009));
    // Fragments each within the frame limit, together beyond the message limit.
    let mut frags = frame(TEXT_FIRST, &[b'a'; 100]);
    frags.extend(frame(CONT_LAST, &[b'a'; 51]));
    let (_, err) = decode_chunks(&mut Decoder::new(limits), &[&frags]);
    assert_eq!(err.map(|v| v.code), Some(1009));
    let mut fits = frame(TEXT_FIRST, &[b'a'; 100]);
    fits.extend(frame(CONT_LAST, &[b'a'; 50]));
    assert_eq!(decode_chunks(&mut Decoder::new(limits), &[&fits]).1, None);
}

#[test]
fn mask_matches_the_bytewise_definition() {
    let mask = [1, 0x80, 0xff, 7];
    for len in 0..40 {
        let data: Vec<u8> = (0..len as u8).collect();
        let mut fast = data.clone();
        apply_mask(&mut fast, mask);
        let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        assert_eq!(fast, slow, "len {len}");
    }
}

/// Parses a server frame with tungstenite: (FIN, opcode byte, masked, payload).
fn parse_server_frame(bytes: &[u8]) -> (bool, u8, bool, Vec<u8>) {
    let mut cursor = Cursor::new(bytes);
    let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
    let start = cursor.position() as usize;
    assert_eq!(bytes.len(), start + len as usize, "exactly one frame");
    (header.is_final, u8::from(header.opcode), header.mask.is_some(), bytes[start..].to_vec())
}

#[test]
fn encodes_unmasked_final_frames() {
    for len in [0usize, 5, 125, 126, 300, 70_000] {
        let text = vec![b'z'; len];
        let mut out = Vec::new();
        encode_text(&text, &mut out);
        assert_eq!(parse_server_frame(&out), (true, 1, false, text), "len {len}");
    }
    let mut out = Vec::new();
    encode_pong(b"abc", &mut out);
    assert_eq!(parse_server_frame(&out), (true, 10, false, b"abc".to_vec()));
}

#[test]
fn close_reason_is_cut_on_a_character_boundary() {
    let reason = "é".repeat(100); // 200 bytes
    let mut out = Vec::new();
    encode_close(1001, &reason, &mut out);
    let (fin, op, masked, body) = parse_server_frame(&out);
    assert!(fin && !masked);
    assert_eq!(op, 8);
    assert!(body.len() <= 125);
    assert_eq!(&body[..2], &1001u16.to_be_bytes());
    assert!(std::str::from_utf8(&body[2..]).is_ok());
}

#[test]
fn close_replies_echo_the_status_or_nothing() {
    let mut out = Vec::new();
    encode_close_reply(Some(1001), &mut out);
    assert_eq!(parse_server_frame(&out), (true, 8, false, 1001u16.to_be_bytes().to_vec()));
    out.clear();
    encode_close_reply(None, &mut out);
    assert_eq!(parse_server_frame(&out), (true, 8, false, vec![]));
}
