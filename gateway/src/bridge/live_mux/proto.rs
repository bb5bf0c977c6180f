//! Sans-I/O codec for the part of the core NATS client protocol the live multiplexer speaks
//! (<https://docs.nats.io/reference/reference-protocols/nats-protocol>): it parses what a server
//! sends (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`) out of a byte buffer that grows as
//! reads arrive, and encodes what the client sends (`CONNECT`, `SUB`, `UNSUB`, `PING`, `PONG`).
//!
//! No I/O, no allocation while parsing: [`parse`] borrows from the buffer it is given and says how
//! many bytes the operation took, so the caller decides when to discard them. Input from the
//! network never panics the parser; a framing error (the next operation cannot be found) is a
//! [`ProtoError`] and the connection must be dropped. A message whose framing is intact but whose
//! header block is malformed is still returned whole: [`HeaderBlock::parse`] reports that, and the
//! caller skips just that message.
//!
//! Only std: the fuzz target (fuzz/fuzz_targets/nats_proto.rs) compiles this file on its own.

use std::fmt;

/// The longest control line (`MSG …`, `INFO {…}`, `-ERR …`) accepted, as nats-server's own
/// `max_control_line` default; INFO can be longer on a large cluster, so it has its own bound.
pub const MAX_CONTROL_LINE: usize = 4096;
/// The longest `INFO` line accepted (it lists the cluster's URLs).
pub const MAX_INFO_LINE: usize = 64 * 1024;

/// What a server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp<'a> {
    /// The JSON object of an `INFO` line.
    Info(&'a [u8]),
    Msg(Msg<'a>),
    Ping,
    Pong,
    Ok,
    /// The text of a `-ERR` line, without its quotes.
    Err(&'a str),
}

/// A delivered message (`MSG` or `HMSG`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg<'a> {
    pub subject: &'a str,
    pub sid: u64,
    pub reply: Option<&'a str>,
    /// The raw header block of an `HMSG` (from `NATS/1.0` to the blank line), unvalidated.
    pub headers: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// Why the byte stream cannot be parsed further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// No CRLF within the control-line limit.
    ControlLineTooLong(usize),
    /// A line that starts with no operation this client knows.
    UnknownOp(String),
    /// An operation with the wrong arguments.
    BadArgs(&'static str, String),
    /// A message larger than the limit the caller set (the server's `max_payload`).
    TooLarge { size: usize, max: usize },
    /// A message's bytes not followed by CRLF.
    MissingTrailer,
    /// Not UTF-8 where text is required.
    NotText(&'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::ControlLineTooLong(n) => write!(f, "no line end within {n} bytes"),
            ProtoError::UnknownOp(s) => write!(f, "unknown operation {s:?}"),
            ProtoError::BadArgs(op, line) => write!(f, "malformed {op} arguments {line:?}"),
            ProtoError::TooLarge { size, max } => write!(f, "message of {size} bytes exceeds the limit of {max}"),
            ProtoError::MissingTrailer => f.write_str("message not terminated by CRLF"),
            ProtoError::NotText(what) => write!(f, "{what} is not UTF-8"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// Parses one operation from the start of `buf`. `Ok(None)`: more bytes are needed (nothing is
/// consumed); `Ok(Some((op, n)))`: `op` took the first `n` bytes. `max_payload` bounds a message's
/// header and payload bytes together.
pub fn parse(buf: &[u8], max_payload: usize) -> Result<Option<(ServerOp<'_>, usize)>, ProtoError> {
    let is_info = starts_with_ignore_case(buf, b"INFO");
    let limit = if is_info { MAX_INFO_LINE } else { MAX_CONTROL_LINE };
    let Some(eol) = find_crlf(&buf[..buf.len().min(limit)]) else {
        if buf.len() >= limit {
            return Err(ProtoError::ControlLineTooLong(limit));
        }
        return Ok(None);
    };
    let line = &buf[..eol];
    let after = eol + 2;
    let (op, rest) = split_op(line);
    let op_upper = op.to_ascii_uppercase();
    match op_upper.as_slice() {
        b"PING" if rest.is_empty() => Ok(Some((ServerOp::Ping, after))),
        b"PONG" if rest.is_empty() => Ok(Some((ServerOp::Pong, after))),
        b"+OK" if rest.is_empty() => Ok(Some((ServerOp::Ok, after))),
        b"-ERR" => {
            let text = std::str::from_utf8(rest).map_err(|_| ProtoError::NotText("-ERR text"))?;
            let text = text.trim();
            let text = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')).unwrap_or(text);
            Ok(Some((ServerOp::Err(text), after)))
        }
        b"INFO" => {
            let json = trim_ascii(rest);
            if !json.starts_with(b"{") || !json.ends_with(b"}") {
                return Err(ProtoError::BadArgs("INFO", lossy(line)));
            }
            Ok(Some((ServerOp::Info(json), after)))
        }
        b"MSG" => {
            let args = std::str::from_utf8(rest).map_err(|_| ProtoError::NotText("MSG line"))?;
            let mut it = args.split_ascii_whitespace();
            let bad = || ProtoError::BadArgs("MSG", lossy(line));
            let (subject, sid, reply, len) = match (it.next(), it.next(), it.next(), it.next(), it.next()) {
                (Some(s), Some(sid), Some(r), Some(n), None) => (s, sid, Some(r), n),
                (Some(s), Some(sid), Some(n), None, None) => (s, sid, None, n),
                _ => return Err(bad()),
            };
            let sid = parse_num(sid).ok_or_else(bad)?;
            let len = parse_num(len).ok_or_else(bad)? as usize;
            check_size(len, max_payload)?;
            let Some(body) = body(buf, after, len)? else { return Ok(None) };
            let msg = Msg { subject, sid, reply, headers: None, payload: body };
            Ok(Some((ServerOp::Msg(msg), after + len + 2)))
        }
        b"HMSG" => {
            let args = std::str::from_utf8(rest).map_err(|_| ProtoError::NotText("HMSG line"))?;
            let mut it = args.split_ascii_whitespace();
            let bad = || ProtoError::BadArgs("HMSG", lossy(line));
            let (subject, sid, reply, hlen, total) =
                match (it.next(), it.next(), it.next(), it.next(), it.next(), it.next()) {
                    (Some(s), Some(sid), Some(r), Some(h), Some(t), None) => (s, sid, Some(r), h, t),
                    (Some(s), Some(sid), Some(h), Some(t), None, None) => (s, sid, None, h, t),
                    _ => return Err(bad()),
                };
            let sid = parse_num(sid).ok_or_else(bad)?;
            let hlen = parse_num(hlen).ok_or_else(bad)? as usize;
            let total = parse_num(total).ok_or_else(bad)? as usize;
            if hlen > total {
                return Err(bad());
            }
            check_size(total, max_payload)?;
            let Some(body) = body(buf, after, total)? else { return Ok(None) };
            let (headers, payload) = body.split_at(hlen);
            let msg = Msg { subject, sid, reply, headers: Some(headers), payload };
            Ok(Some((ServerOp::Msg(msg), after + total + 2)))
        }
        _ => Err(ProtoError::UnknownOp(lossy(&line[..line.len().min(32)]))),
    }
}

/// The `len` bytes of a message body starting at `at`, if they and their CRLF have arrived.
fn body(buf: &[u8], at: usize, len: usize) -> Result<Option<&[u8]>, ProtoError> {
    let end = at.checked_add(len).ok_or(ProtoError::TooLarge { size: len, max: usize::MAX })?;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(ProtoError::MissingTrailer);
    }
    Ok(Some(&buf[at..end]))
}

fn check_size(size: usize, max: usize) -> Result<(), ProtoError> {
    if size > max {
        return Err(ProtoError::TooLarge { size, max });
    }
    Ok(())
}

/// A decimal number of at most 19 digits (no sign, no overflow).
fn parse_num(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The operation name (up to the first space or tab) and the rest of the line after it.
fn split_op(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&line[..i], trim_ascii(&line[i + 1..])),
        None => (line, &[]),
    }
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn starts_with_ignore_case(buf: &[u8], prefix: &[u8]) -> bool {
    buf.len() >= prefix.len() && buf[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A validated header block: `NATS/1.0[ status[ description]]` then `Name: value` lines, then a
/// blank line. Names are case-sensitive (as NATS keeps them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderBlock<'a> {
    /// The inline status of a server-generated message (`NATS/1.0 503`), if any.
    pub status: Option<u16>,
    lines: &'a str,
}

/// Why a header block was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    NotText,
    NoVersionLine,
    BadStatus,
    /// A line that is neither `Name: value` nor blank.
    BadLine(String),
    /// Not terminated by an empty line.
    Unterminated,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NotText => f.write_str("header block is not UTF-8"),
            HeaderError::NoVersionLine => f.write_str("header block does not start with NATS/1.0"),
            HeaderError::BadStatus => f.write_str("header block has a malformed status"),
            HeaderError::BadLine(l) => write!(f, "malformed header line {l:?}"),
            HeaderError::Unterminated => f.write_str("header block is not terminated by an empty line"),
        }
    }
}

impl std::error::Error for HeaderError {}

impl<'a> HeaderBlock<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<HeaderBlock<'a>, HeaderError> {
        let text = std::str::from_utf8(raw).map_err(|_| HeaderError::NotText)?;
        let text = text.strip_suffix("\r\n\r\n").ok_or(HeaderError::Unterminated)?;
        let (version, lines) = text.split_once("\r\n").unwrap_or((text, ""));
        let rest = version.strip_prefix("NATS/1.0").ok_or(HeaderError::NoVersionLine)?;
        let status = match rest.trim().split_ascii_whitespace().next() {
            None => None,
            Some(code) if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) => {
                Some(code.parse().map_err(|_| HeaderError::BadStatus)?)
            }
            Some(_) => return Err(HeaderError::BadStatus),
        };
        if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
            return Err(HeaderError::NoVersionLine);
        }
        for line in lines.split("\r\n").filter(|l| !l.is_empty()) {
            let valid = match line.split_once(':') {
                Some((name, _)) => {
                    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
                        || line.starts_with([' ', '\t']) // a folded continuation line
                }
                None => line.starts_with([' ', '\t']),
            };
            if !valid || line.contains(['\r', '\n']) {
                return Err(HeaderError::BadLine(line.chars().take(64).collect()));
            }
        }
        Ok(HeaderBlock { status, lines })
    }

    /// The first value of header `name`, trimmed (a folded continuation is not part of it).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.lines.split("\r\n").find_map(|line| {
            let (n, v) = line.split_once(':')?;
            (n == name).then(|| v.trim())
        })
    }
}

/// Encodes client operations into a write buffer.
pub mod encode {
    use std::io::Write as _;

    /// Why a subject cannot be sent: it would break the line protocol.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct BadSubject;

    /// A subject is one token or more, with no whitespace or control characters (anything else
    /// would let a value inject protocol operations).
    pub fn valid_subject(subject: &str) -> bool {
        !subject.is_empty()
            && subject.bytes().all(|b| b.is_ascii_graphic())
            && subject.split('.').all(|t| !t.is_empty())
    }

    pub fn connect(out: &mut Vec<u8>, json: &str) {
        out.extend_from_slice(b"CONNECT ");
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    pub fn sub(out: &mut Vec<u8>, subject: &str, sid: u64) -> Result<(), BadSubject> {
        if !valid_subject(subject) {
            return Err(BadSubject);
        }
        let _ = write!(out, "SUB {subject} {sid}\r\n");
        Ok(())
    }

    pub fn unsub(out: &mut Vec<u8>, sid: u64) {
        let _ = write!(out, "UNSUB {sid}\r\n");
    }

    pub fn ping(out: &mut Vec<u8>) {
        out.extend_from_slice(b"PING\r\n");
    }

    pub fn pong(out: &mut Vec<u8>) {
        out.extend_from_slice(b"PONG\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    /// Parses every operation of `input`, fed to the parser in pieces that end at each of
    /// `cuts`, as reads would deliver them; returns them as owned debug strings.
    fn parse_all_fed(input: &[u8], cuts: &[usize]) -> Result<Vec<String>, ProtoError> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut fed = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[fed..cut]);
            fed = cut;
            while let Some((op, n)) = parse(&buf, MAX)? {
                out.push(format!("{op:?}"));
                buf.drain(..n);
            }
        }
        assert!(buf.is_empty(), "left over: {:?}", String::from_utf8_lossy(&buf));
        Ok(out)
    }

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(b"INFO {\"server_id\":\"x\",\"max_payload\":1048576,\"headers\":true}\r\n");
        s.extend_from_slice(b"PING\r\n+OK\r\nPONG\r\n");
        s.extend_from_slice(b"MSG live.alice 7 5\r\nhello\r\n");
        s.extend_from_slice(b"MSG live.bob 8 _INBOX.r 0\r\n\r\n");
        let hdr = b"NATS/1.0\r\nNats-Sequence: 42\r\nNats-Last-Sequence: 40\r\n\r\n";
        s.extend_from_slice(format!("HMSG live.alice 7 {} {}\r\n", hdr.len(), hdr.len() + 4).as_bytes());
        s.extend_from_slice(hdr);
        s.extend_from_slice(b"{\"a\"\r\n");
        s.extend_from_slice(b"-ERR 'Permissions Violation for Subscription to \"live.x\"'\r\n");
        s.extend_from_slice(b"msg live.a 1 2\r\n\r\n\r\n");
        s
    }

    #[test]
    fn parses_every_operation() {
        let ops = parse_all_fed(&stream(), &[]).unwrap();
        assert_eq!(ops.len(), 9, "{ops:#?}");
        assert!(ops[0].starts_with("Info("));
        assert_eq!(ops[1], "Ping");
        assert_eq!(ops[2], "Ok");
        assert_eq!(ops[3], "Pong");
        assert!(ops[4].contains("subject: \"live.alice\", sid: 7, reply: None, headers: None"));
        assert!(ops[5].contains("reply: Some(\"_INBOX.r\")"));
        assert_eq!(ops[7], "Err(\"Permissions Violation for Subscription to \\\"live.x\\\"\")");
        // Operation names are case-insensitive; the payload may contain CRLF.
        assert!(ops[8].contains("payload: [13, 10]"));
    }

    #[test]
    fn hmsg_splits_headers_from_payload() {
        let s = stream();
        let start = s.windows(4).position(|w| w == b"HMSG").unwrap();
        let Some((ServerOp::Msg(m), _)) = parse(&s[start..], MAX).unwrap() else { panic!("no message") };
        assert_eq!(m.payload, b"{\"a\"");
        let h = HeaderBlock::parse(m.headers.unwrap()).unwrap();
        assert_eq!(h.get("Nats-Sequence"), Some("42"));
        assert_eq!(h.get("Nats-Last-Sequence"), Some("40"));
        assert_eq!(h.get("nats-sequence"), None, "names are case-sensitive");
        assert_eq!(h.status, None);
    }

    #[test]
    fn every_split_point_gives_the_same_operations() {
        let s = stream();
        let whole = parse_all_fed(&s, &[]).unwrap();
        for cut in 0..=s.len() {
            assert_eq!(parse_all_fed(&s, &[cut]).unwrap(), whole, "split at {cut}");
        }
        // Byte by byte.
        let cuts: Vec<usize> = (0..s.len()).collect();
        assert_eq!(parse_all_fed(&s, &cuts).unwrap(), whole);
    }

    #[test]
    fn prefixes_need_more_and_never_fail() {
        let s = stream();
        let (_, first) = parse(&s, MAX).unwrap().unwrap();
        for k in 0..first {
            assert_eq!(parse(&s[..k], MAX), Ok(None), "prefix of {k}");
        }
    }

    #[test]
    fn framing_errors() {
        let e = |b: &[u8]| parse(b, MAX).unwrap_err();
        assert!(matches!(e(b"FOO bar\r\n"), ProtoError::UnknownOp(_)));
        assert!(matches!(e(b"MSG a\r\n"), ProtoError::BadArgs("MSG", _)));
        assert!(matches!(e(b"MSG a b 1\r\nx\r\n"), ProtoError::BadArgs("MSG", _)));
        assert!(matches!(e(b"MSG a 1 -1\r\n"), ProtoError::BadArgs("MSG", _)));
        assert!(matches!(e(b"MSG a 1 99999999999999999999\r\n"), ProtoError::BadArgs("MSG", _)));
        assert!(matches!(e(b"MSG a 1 1 2 3\r\n"), ProtoError::BadArgs("MSG", _)));
        assert!(matches!(e(b"MSG a 1 2\r\nabXY"), ProtoError::MissingTrailer));
        assert!(matches!(e(b"HMSG a 1 5 2\r\n"), ProtoError::BadArgs("HMSG", _)));
        assert!(matches!(e(b"HMSG a 1 2\r\n"), ProtoError::BadArgs("HMSG", _)));
        assert_eq!(parse(b"MSG a 1 2000000\r\n", MAX), Err(ProtoError::TooLarge { size: 2_000_000, max: MAX }));
        assert!(matches!(e(b"INFO nope\r\n"), ProtoError::BadArgs("INFO", _)));
        assert!(matches!(e(b"PING extra\r\n"), ProtoError::UnknownOp(_)));
        assert!(matches!(e(b"MSG \xff 1 1\r\nx\r\n"), ProtoError::NotText(_)));
        let long = vec![b'x'; MAX_CONTROL_LINE + 1];
        assert_eq!(parse(&long, MAX), Err(ProtoError::ControlLineTooLong(MAX_CONTROL_LINE)));
        // An INFO may be longer than other lines, up to its own bound.
        let mut info = b"INFO {\"x\":\"".to_vec();
        info.extend(std::iter::repeat_n(b'a', MAX_CONTROL_LINE * 2));
        info.extend_from_slice(b"\"}\r\n");
        assert!(matches!(parse(&info, MAX), Ok(Some((ServerOp::Info(_), _)))));
    }

    #[test]
    fn header_blocks() {
        fn ok(b: &[u8]) -> HeaderBlock<'_> {
            HeaderBlock::parse(b).unwrap()
        }
        assert_eq!(ok(b"NATS/1.0\r\n\r\n").get("x"), None);
        assert_eq!(ok(b"NATS/1.0 503\r\n\r\n").status, Some(503));
        let h = ok(b"NATS/1.0 404 No Messages\r\nA: 1\r\nA: 2\r\nB:x y \r\n\r\n");
        assert_eq!((h.status, h.get("A"), h.get("B")), (Some(404), Some("1"), Some("x y")));
        assert_eq!(ok(b"NATS/1.0\r\nChat-Ephemeral: 1\r\n\r\n").get("Chat-Ephemeral"), Some("1"));
        let bad = |b: &[u8]| HeaderBlock::parse(b).unwrap_err();
        assert_eq!(bad(b"HTTP/1.1\r\n\r\n"), HeaderError::NoVersionLine);
        assert_eq!(bad(b"NATS/1.0x\r\n\r\n"), HeaderError::BadStatus);
        assert_eq!(bad(b"NATS/1.0\r\nA: 1\r\n"), HeaderError::Unterminated);
        assert_eq!(bad(b"NATS/1.0 abc\r\n\r\n"), HeaderError::BadStatus);
        assert!(matches!(bad(b"NATS/1.0\r\nno colon\r\n\r\n"), HeaderError::BadLine(_)));
        assert!(matches!(bad(b"NATS/1.0\r\n: empty name\r\n\r\n"), HeaderError::BadLine(_)));
        assert!(matches!(bad(b"NATS/1.0\r\nA\nB: 1\r\n\r\n"), HeaderError::BadLine(_)));
        assert_eq!(bad(b"NATS/1.0\r\n\xff: 1\r\n\r\n"), HeaderError::NotText);
    }

    #[test]
    fn encodes_client_operations() {
        let mut out = Vec::new();
        encode::connect(&mut out, "{\"headers\":true}");
        encode::sub(&mut out, "live.alice", 7).unwrap();
        encode::unsub(&mut out, 7);
        encode::ping(&mut out);
        encode::pong(&mut out);
        assert_eq!(out, b"CONNECT {\"headers\":true}\r\nSUB live.alice 7\r\nUNSUB 7\r\nPING\r\nPONG\r\n");
        for bad in ["", "live. x", "live.a\r\nPUB x 1", "live..a", ".live", "live\t"] {
            assert_eq!(encode::sub(&mut out, bad, 1), Err(encode::BadSubject), "{bad:?}");
        }
    }

    /// A tiny deterministic generator (no dependency): xorshift64*.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn mutated_streams_never_panic() {
        let base = stream();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut s = base.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = (rng.next() as usize) % s.len();
                match rng.next() % 3 {
                    0 => s[i] = rng.next() as u8,
                    1 => {
                        s.remove(i);
                    }
                    _ => s.insert(i, b"\r\n 0123456789:"[rng.next() as usize % 14]),
                }
            }
            let mut buf: &[u8] = &s;
            // Whatever happens, each step consumes bytes or stops: no panic, no endless loop.
            while let Ok(Some((op, n))) = parse(buf, 1024) {
                assert!(n > 0 && n <= buf.len());
                if let ServerOp::Msg(Msg { headers: Some(h), .. }) = op {
                    if let Ok(h) = HeaderBlock::parse(h) {
                        let _ = h.get("Nats-Sequence");
                    }
                }
                buf = &buf[n..];
            }
        }
    }
}
