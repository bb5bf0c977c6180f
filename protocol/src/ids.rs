//! Identifiers that come from the network. Each is validated once, at the edge, so that everything
//! downstream (NATS subjects, KV keys, dedup headers) can use it without escaping.

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} may only contain A-Z a-z 0-9 _ -")]
    BadChar { what: &'static str },
}

/// The characters allowed in a user or device id. They keep an id a single NATS subject token
/// (no `.`, `*`, `>` or whitespace) and a valid KV key.
fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn check(what: &'static str, s: &str, max: usize, ok: fn(u8) -> bool) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > max {
        return Err(IdError::TooLong { what, max });
    }
    if !s.bytes().all(ok) {
        return Err(IdError::BadChar { what });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(s: &str) -> Result<Self, IdError> {
                check($what, s, $max, $ok)?;
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A user id: the `sub` of a token and one NATS subject token.
    UserId, "user id", 64, token_char
);
id_type!(
    /// A device id: one of a user's connected clients, each with its own inbox cursor.
    DeviceId, "device id", 32, token_char
);
id_type!(
    /// The sender's own id for a message, which makes retries idempotent. Printable ASCII without
    /// spaces, so it can go into a `Nats-Msg-Id` header as it is.
    ClientMsgId, "message id", 64, |b| b.is_ascii_graphic()
);

impl DeviceId {
    /// The device id used when neither the token nor the handshake names one.
    pub fn default_device() -> Self {
        Self("default".to_owned())
    }
}

/// The JetStream dedup id of a 1:1 message: the same (sender, device, client id) always maps to the
/// same id, so a retry within the duplicate window stores nothing new and returns the first
/// sequence. `|` cannot occur in user or device ids, so the encoding is unambiguous.
pub fn direct_msg_dedup_id(sender: &UserId, device: &DeviceId, id: &ClientMsgId) -> String {
    format!("m|{}|{}|{}", sender, device, id)
}

/// The dedup id of a receipt: one stored receipt per (reader, conversation partner, status,
/// position), however many devices or gateways report it.
pub fn receipt_dedup_id(by: &UserId, to: &UserId, status: &str, up_to: u64) -> String {
    format!("r|{}|{}|{}|{}", by, to, status, up_to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_single_subject_tokens() {
        assert!(UserId::parse("alice_01-x").is_ok());
        for bad in ["", "a.b", "a*", "a>", "a b", "ä", "a\n"] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            UserId::parse(&"u".repeat(65)),
            Err(IdError::TooLong {
                what: "user id",
                max: 64
            })
        );
    }

    #[test]
    fn client_ids_refuse_whitespace_and_control_bytes() {
        assert!(ClientMsgId::parse("c-1:2.3/4").is_ok());
        for bad in ["", "a b", "a\r\nNats-Msg-Id: x", "\u{7f}"] {
            assert!(ClientMsgId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn dedup_ids_are_stable_and_distinct() {
        let a = UserId::parse("a").unwrap();
        let d = DeviceId::parse("d").unwrap();
        let id = ClientMsgId::parse("1").unwrap();
        assert_eq!(direct_msg_dedup_id(&a, &d, &id), "m|a|d|1");
        let d2 = DeviceId::parse("d2").unwrap();
        assert_ne!(
            direct_msg_dedup_id(&a, &d, &id),
            direct_msg_dedup_id(&a, &d2, &id)
        );
    }
}
