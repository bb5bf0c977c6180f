//! The HTTP side of a connection, sans I/O: parsing the request head and deciding what to answer.
//! The gateway reads the head itself (bounded size and time) so that it can refuse a bad token
//! with a plain `401` before any WebSocket state exists, and serve the dev token endpoint.

use protocol::{DeviceId, Identity, TokenError, TokenKeys, UserId};

/// Largest request head accepted, bytes.
pub const MAX_HEAD: usize = 8 * 1024;

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A WebSocket upgrade on `/ws`.
    Upgrade(Upgrade),
    /// `GET /dev/token?user=..&device=..` (answered only in dev mode).
    DevToken { user: String, device: Option<String> },
    /// A plain GET of a web client asset (served only in dev mode).
    Asset(&'static str, &'static [u8]),
    /// Anything else: answer with this status and reason.
    Refuse(u16, &'static str),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub key: String,
    pub token: String,
    pub device: Option<String>,
    pub since: Option<u64>,
    /// The browser's `Origin` header, if any.
    pub origin: Option<String>,
}

/// Parses a complete request head (through the blank line). `Ok(None)` means more bytes are
/// needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed HTTP request"),
    };
    if req.method != Some("GET") {
        return Ok(Some((Request::Refuse(405, "Method Not Allowed"), len)));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut token = None;
    let mut device = None;
    let mut since = None;
    let mut user = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "token" => token = Some(v.into_owned()),
            "device" => device = Some(v.into_owned()),
            "user" => user = Some(v.into_owned()),
            "since" => since = Some(v.parse::<u64>().map_err(|_| "since must be a number")?),
            _ => {}
        }
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let request = match path {
        "/ws" | "/" => {
            let is_upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
                && header("connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
            if !is_upgrade {
                match crate::web::asset(path) {
                    Some((ty, body)) => Request::Asset(ty, body),
                    None => Request::Refuse(426, "Upgrade Required"),
                }
            } else if header("sec-websocket-version") != Some("13") {
                Request::Refuse(400, "Bad Request")
            } else if let Some(key) = header("sec-websocket-key") {
                if let Some(bearer) = header("authorization").and_then(|v| v.strip_prefix("Bearer ")) {
                    token = Some(bearer.trim().to_owned());
                }
                Request::Upgrade(Upgrade {
                    key: key.to_owned(),
                    token: token.unwrap_or_default(),
                    device,
                    since,
                    origin: header("origin").map(str::to_owned),
                })
            } else {
                Request::Refuse(400, "Bad Request")
            }
        }
        "/dev/token" => match user {
            Some(user) => Request::DevToken { user, device },
            None => Request::Refuse(400, "Bad Request"),
        },
        _ => match crate::web::asset(path) {
            Some((ty, body)) => Request::Asset(ty, body),
            None => Request::Refuse(404, "Not Found"),
        },
    };
    Ok(Some((request, len)))
}

/// Whether a browser origin may open a socket: no `Origin` header (not a browser) is always
/// allowed; otherwise it must be listed, unless the list is empty (no origin policy).
pub fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        None => true,
        Some(o) => allowed.is_empty() || allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(o)),
    }
}

/// Why an upgrade was refused, with its HTTP status.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    Token(TokenError),
    BadDevice,
}

impl AuthError {
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            AuthError::Token(_) => (401, "Unauthorized"),
            AuthError::BadDevice => (400, "Bad Request"),
        }
    }

    pub fn cause(&self) -> &'static str {
        match self {
            AuthError::Token(t) => t.cause(),
            AuthError::BadDevice => "bad_device",
        }
    }
}

/// The authenticated identity of an upgrade: user from the token; device from the token, else
/// the handshake, else the default device.
/// The authenticated (user, device, token issued-at).
pub fn authenticate(keys: &TokenKeys, up: &Upgrade) -> Result<(UserId, DeviceId, u64), AuthError> {
    let Identity { user, device, issued_at } = keys.verify(&up.token).map_err(AuthError::Token)?;
    let device = match (device, &up.device) {
        (Some(d), _) => d,
        (None, Some(d)) => DeviceId::parse(d).map_err(|_| AuthError::BadDevice)?,
        (None, None) => DeviceId::default_device(),
    };
    Ok((user, device, issued_at))
}

pub fn switching_protocols(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes())
    )
}

pub fn asset_response(content_type: &str, body_len: usize) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {body_len}\r\nConnection: close\r\nCache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n\r\n"
    )
}

pub fn plain_response(status: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /ws?token=abc&device=phone&since=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nEXTRA";

    #[test]
    fn parses_an_upgrade_and_leaves_the_rest() {
        let (req, len) = parse_head(UPGRADE.as_bytes()).unwrap().unwrap();
        assert_eq!(&UPGRADE[len..], "EXTRA");
        assert_eq!(
            req,
            Request::Upgrade(Upgrade {
                key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
                token: "abc".into(),
                device: Some("phone".into()),
                since: Some(7),
                origin: None,
            })
        );
    }

    #[test]
    fn bearer_header_wins_over_query() {
        let head = UPGRADE.replace("Host: x\r\n", "Host: x\r\nAuthorization: Bearer zzz\r\n");
        let Request::Upgrade(up) = parse_head(head.as_bytes()).unwrap().unwrap().0 else { panic!() };
        assert_eq!(up.token, "zzz");
    }

    #[test]
    fn partial_and_junk() {
        assert_eq!(parse_head(b"GET /ws HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert!(parse_head(b"\x00\x01garbage\r\n\r\n").is_err());
        let (req, _) = parse_head(b"POST /ws HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(req, Request::Refuse(405, "Method Not Allowed"));
        let (req, _) = parse_head(b"GET /ws HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(req, Request::Refuse(426, "Upgrade Required"));
        let (req, _) = parse_head(b"GET /nope HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(req, Request::Refuse(404, "Not Found"));
        assert!(parse_head(b"GET /ws?since=x HTTP/1.1\r\n\r\n").is_err());
    }

    #[test]
    fn dev_token_request() {
        let (req, _) = parse_head(b"GET /dev/token?user=al%69ce HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(req, Request::DevToken { user: "alice".into(), device: None });
    }

    #[test]
    fn origins() {
        let list = vec!["https://chat.example".to_owned()];
        assert!(origin_allowed(&list, None));
        assert!(origin_allowed(&list, Some("https://chat.example")));
        assert!(!origin_allowed(&list, Some("https://evil.example")));
        assert!(origin_allowed(&[], Some("https://any.example")));
        let (req, _) =
            parse_head(UPGRADE.replace("Host: x\r\n", "Host: x\r\nOrigin: https://o\r\n").as_bytes()).unwrap().unwrap();
        let Request::Upgrade(up) = req else { panic!() };
        assert_eq!(up.origin.as_deref(), Some("https://o"));
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert!(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==").contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn authentication_picks_the_device() {
        let keys = TokenKeys::hs256(b"0123456789abcdef", 0);
        let mut up =
            Upgrade { key: "k".into(), token: keys.mint("al", None, 60), device: None, since: None, origin: None };
        assert_eq!(authenticate(&keys, &up).unwrap().1.as_str(), "default");
        up.device = Some("tab".into());
        assert_eq!(authenticate(&keys, &up).unwrap().1.as_str(), "tab");
        up.device = Some("bad.dev".into());
        assert_eq!(authenticate(&keys, &up), Err(AuthError::BadDevice));
        up.token = keys.mint("al", Some("phone"), 60);
        assert_eq!(authenticate(&keys, &up).unwrap().1.as_str(), "phone");
        up.token = "x".into();
        assert_eq!(authenticate(&keys, &up).unwrap_err().status().0, 401);
    }
}
