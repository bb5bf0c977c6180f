//! Media by reference: a message may carry a descriptor of an attachment that lives elsewhere
//! (uploaded by the client to object storage). The server validates the descriptor's shape and
//! limits and carries it opaquely; media bytes never travel over the WebSocket. End-to-end
//! encrypted clients put the content hash and the decryption key here, encrypted or not as
//! their protocol decides.

use serde::{Deserialize, Serialize};

/// Largest attachment a descriptor may announce (2 GiB).
pub const MAX_MEDIA_SIZE: u64 = 2 * 1024 * 1024 * 1024;
/// Largest inline thumbnail, base64 characters (about 12 KiB of image).
pub const MAX_THUMB: usize = 16 * 1024;
pub const MAX_URL: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Media {
    /// Where to fetch it: an `https://` URL.
    pub url: String,
    /// MIME type, `type/subtype`.
    pub mime: String,
    /// Size in bytes (1 ..= 2 GiB).
    pub size: u64,
    /// A small inline preview, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumb: Option<String>,
    /// SHA-256 of the (encrypted) content, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The content key for end-to-end encrypted media, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A file name to show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn is_base64(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
}

fn is_mime_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
}

impl Media {
    /// Checks the descriptor; the error says which field is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let u = &self.url;
        if u.len() > MAX_URL || !u.starts_with("https://") || u.len() <= "https://".len() {
            return Err(format!("media.url must be an https:// URL of at most {MAX_URL} bytes"));
        }
        if u.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err("media.url must not contain spaces or control characters".into());
        }
        match self.mime.split_once('/') {
            Some((t, s)) if self.mime.len() <= 127 && is_mime_token(t) && is_mime_token(s) => {}
            _ => return Err("media.mime must be a MIME type like image/jpeg".into()),
        }
        if self.size == 0 || self.size > MAX_MEDIA_SIZE {
            return Err(format!("media.size must be 1 to {MAX_MEDIA_SIZE} bytes"));
        }
        if let Some(t) = &self.thumb {
            if t.len() > MAX_THUMB || !is_base64(t) {
                return Err(format!("media.thumb must be base64 of at most {MAX_THUMB} characters"));
            }
        }
        if let Some(h) = &self.sha256 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("media.sha256 must be 64 hex digits".into());
            }
        }
        if let Some(k) = &self.key {
            if k.is_empty() || k.len() > 256 || !is_base64(k) {
                return Err("media.key must be base64 of at most 256 characters".into());
            }
        }
        if let Some(n) = &self.name {
            if n.is_empty() || n.len() > 255 || n.chars().any(char::is_control) {
                return Err("media.name must be 1 to 255 bytes without control characters".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Media {
        Media {
            url: "https://cdn.example/a/b.jpg".into(),
            mime: "image/jpeg".into(),
            size: 1234,
            thumb: Some("iVBORw0KGgo=".into()),
            sha256: Some("a".repeat(64)),
            key: Some("c2VjcmV0".into()),
            name: Some("beach.jpg".into()),
        }
    }

    #[test]
    fn accepts_a_full_descriptor() {
        assert_eq!(ok().validate(), Ok(()));
    }

    #[test]
    fn refuses_each_bad_field() {
        let cases: Vec<Box<dyn Fn(&mut Media)>> = vec![
            Box::new(|m| m.url = "http://cdn.example/x".into()),
            Box::new(|m| m.url = "javascript:alert(1)".into()),
            Box::new(|m| m.url = "https://".into()),
            Box::new(|m| m.url = format!("https://x/{}", "a".repeat(3000))),
            Box::new(|m| m.url = "https://x/a b".into()),
            Box::new(|m| m.mime = "jpeg".into()),
            Box::new(|m| m.mime = "image/".into()),
            Box::new(|m| m.size = 0),
            Box::new(|m| m.size = MAX_MEDIA_SIZE + 1),
            Box::new(|m| m.thumb = Some("not base64 !".into())),
            Box::new(|m| m.thumb = Some("a".repeat(MAX_THUMB + 1))),
            Box::new(|m| m.sha256 = Some("xyz".into())),
            Box::new(|m| m.key = Some(String::new())),
            Box::new(|m| m.name = Some("a\nb".into())),
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut m = ok();
            f(&mut m);
            assert!(m.validate().is_err(), "case {i} accepted: {m:?}");
        }
    }
}
