//! Server-side WebSocket framing (RFC 6455) without I/O.
//!
//! The gateway holds very many mostly idle connections, so a connection must not own read or
//! write buffers while nothing happens on it. [`Decoder`] decodes bytes the caller read into a
//! buffer it borrows only for the call (the gateway uses one scratch buffer per executor):
//! complete messages are handed to a callback as borrowed slices, and the decoder keeps bytes
//! only while a frame or a fragmented message is incomplete — so an idle connection's decoder
//! is three words and no heap. The encoders append server frames (never masked) to a caller's
//! buffer.
//!
//! Frame headers are parsed and formatted by tungstenite's `FrameHeader`; message assembly,
//! control frames, limits and validation (what tungstenite's `WebSocket` does on top of it, with
//! buffers it owns for the connection's lifetime) are here. Violations carry the close code the
//! connection must be closed with (1002 protocol error, 1007 invalid UTF-8, 1009 too big).
//! Text is validated once the message is complete, so an invalid fragment is refused at the end
//! of its message rather than at once (allowed by RFC 6455 §8.1).

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Size limits; a frame or message beyond them is a violation with close code 1009.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one frame, bytes.
    pub max_frame: usize,
    /// Largest payload of one message (all its fragments), bytes.
    pub max_message: usize,
}

/// Why the peer's bytes cannot be accepted: close the connection with `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    const fn protocol(reason: &'static str) -> Self {
        Violation { code: 1002, reason }
    }
    const INVALID_UTF8: Violation = Violation { code: 1007, reason: "invalid UTF-8" };
    const TOO_BIG: Violation = Violation { code: 1009, reason: "frame or message too large" };
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

impl std::error::Error for Violation {}

/// A complete message (or control frame) from the client, borrowed from the bytes fed.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The client's Close: status code and reason, if it sent one. Nothing after it is decoded.
    Close(Option<(u16, &'a str)>),
}

/// A fragmented data message being assembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    data: Vec<u8>,
}

/// Decodes a client's byte stream into messages. See the crate documentation.
#[derive(Debug)]
pub struct Decoder {
    /// [`Limits`], kept in 32 bits (a decoder is part of every idle connection's state).
    max_frame: u32,
    max_message: u32,
    /// Bytes of an incomplete frame, kept until the rest arrives (empty, unallocated, otherwise).
    carry: Vec<u8>,
    message: Option<Box<Partial>>,
    closed: bool,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Decoder {
            max_frame: clamp(limits.max_frame),
            max_message: clamp(limits.max_message),
            carry: Vec::new(),
            message: None,
            closed: false,
        }
    }

    /// Heap bytes this decoder holds (incomplete frame and message).
    pub fn buffered(&self) -> usize {
        self.carry.capacity() + self.message.as_ref().map_or(0, |m| m.data.capacity())
    }

    /// Whether the client's Close was decoded (everything after it is ignored).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Decodes `input` (bytes just read; they are unmasked in place) after whatever was carried
    /// over from the previous call, calling `sink` for every complete message in order. Keeps a
    /// trailing incomplete frame for the next call. After an error the decoder must not be fed
    /// again: the connection is to be closed with the violation's code.
    pub fn feed(&mut self, input: &mut [u8], sink: &mut dyn FnMut(Inbound<'_>)) -> Result<(), Violation> {
        if self.carry.is_empty() {
            let used = self.decode(input, sink)?;
            if used < input.len() && !self.closed {
                self.carry.extend_from_slice(&input[used..]);
            }
        } else {
            let mut carry = std::mem::take(&mut self.carry);
            carry.extend_from_slice(input);
            let used = self.decode(&mut carry, sink)?;
            if used < carry.len() && !self.closed {
                carry.drain(..used);
                carry.shrink_to_fit();
                self.carry = carry;
            }
        }
        Ok(())
    }

    /// Decodes whole frames from the start of `buf`; returns how many bytes they took.
    fn decode(&mut self, buf: &mut [u8], sink: &mut dyn FnMut(Inbound<'_>)) -> Result<usize, Violation> {
        let mut pos = 0;
        while !self.closed && pos < buf.len() {
            let mut cursor = Cursor::new(&buf[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(_) => return Err(Violation::protocol("reserved opcode")),
            };
            let head_len = cursor.position() as usize;
            // Refuse an oversized frame as soon as its header says so, before its payload.
            if len > u64::from(self.max_frame) {
                return Err(Violation::TOO_BIG);
            }
            let len = len as usize;
            if buf.len() - pos - head_len < len {
                break;
            }
            let start = pos + head_len;
            pos = start + len;
            self.frame(header, &mut buf[start..pos], sink)?;
        }
        Ok(pos)
    }

    fn frame(
        &mut self,
        header: FrameHeader,
        payload: &mut [u8],
        sink: &mut dyn FnMut(Inbound<'_>),
    ) -> Result<(), Violation> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(Violation::protocol("reserved bits set (no extension was negotiated)"));
        }
        let Some(mask) = header.mask else {
            return Err(Violation::protocol("client frames must be masked"));
        };
        apply_mask(payload, mask);
        match header.opcode {
            OpCode::Control(control) => {
                if !header.is_final {
                    return Err(Violation::protocol("fragmented control frame"));
                }
                if payload.len() > 125 {
                    return Err(Violation::protocol("control frame payload over 125 bytes"));
                }
                match control {
                    Control::Ping => sink(Inbound::Ping(payload)),
                    Control::Pong => sink(Inbound::Pong(payload)),
                    Control::Close => {
                        let close = parse_close(payload)?;
                        self.closed = true;
                        self.message = None;
                        sink(Inbound::Close(close));
                    }
                    Control::Reserved(_) => return Err(Violation::protocol("reserved opcode")),
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some(partial) = self.message.as_mut() else {
                    return Err(Violation::protocol("continuation frame without a message to continue"));
                };
                if partial.data.len() + payload.len() > self.max_message as usize {
                    return Err(Violation::TOO_BIG);
                }
                partial.data.extend_from_slice(payload);
                if header.is_final {
                    let partial = self.message.take().expect("checked above");
                    emit(partial.text, &partial.data, sink)?;
                }
            }
            OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
                if self.message.is_some() {
                    return Err(Violation::protocol("new message before the fragmented one ended"));
                }
                if payload.len() > self.max_message as usize {
                    return Err(Violation::TOO_BIG);
                }
                let text = kind == Data::Text;
                if header.is_final {
                    emit(text, payload, sink)?;
                } else {
                    self.message = Some(Box::new(Partial { text, data: payload.to_vec() }));
                }
            }
            OpCode::Data(Data::Reserved(_)) => return Err(Violation::protocol("reserved opcode")),
        }
        Ok(())
    }
}

fn emit(text: bool, data: &[u8], sink: &mut dyn FnMut(Inbound<'_>)) -> Result<(), Violation> {
    if text {
        let s = std::str::from_utf8(data).map_err(|_| Violation::INVALID_UTF8)?;
        sink(Inbound::Text(s));
    } else {
        sink(Inbound::Binary(data));
    }
    Ok(())
}

/// The body of a Close frame: empty, or a valid status code and a UTF-8 reason (§5.5.1, §7.4).
fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, Violation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Violation::protocol("close frame with a 1-byte body")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() {
                return Err(Violation::protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| Violation::INVALID_UTF8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// XORs `buf` with the repeating 4-byte `mask` (§5.3), a word at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().expect("8-byte chunk")) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    // The tail starts at a multiple of 8, hence of 4: the mask phase is 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

fn encode(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let header = FrameHeader { is_final: true, rsv1: false, rsv2: false, rsv3: false, opcode, mask: None };
    out.reserve(header.len(payload.len() as u64) + payload.len());
    header.format(payload.len() as u64, out).expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
}

/// Appends an unfragmented text frame.
pub fn encode_text(text: &[u8], out: &mut Vec<u8>) {
    encode(OpCode::Data(Data::Text), text, out);
}

/// Appends the Pong answering a Ping with `payload` (§5.5.3: the same application data).
pub fn encode_pong(payload: &[u8], out: &mut Vec<u8>) {
    encode(OpCode::Control(Control::Pong), payload, out);
}

/// Appends a Close frame with `code` and `reason` (cut to fit the 125-byte control frame limit,
/// on a character boundary).
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut body = Vec::with_capacity(2 + end);
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OpCode::Control(Control::Close), &body, out);
}

/// Appends the answer to a client's Close (§5.5.1): a Close echoing its status code, or an empty
/// one when it carried none.
pub fn encode_close_reply(status: Option<u16>, out: &mut Vec<u8>) {
    match status {
        Some(code) => encode(OpCode::Control(Control::Close), &code.to_be_bytes(), out),
        None => encode(OpCode::Control(Control::Close), &[], out),
    }
}

#[cfg(test)]
mod tests;
