//! What is stored in a user's inbox (the payload of a message on `inbox.<user>`). The gateway
//! forwards these bytes to the client unchanged inside a `msg` frame, so the stored form is also
//! the wire form: JSON objects tagged by `k`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum InboxItem {
    /// A 1:1 chat message. `from`/`dev` are stamped by the gateway from the authenticated
    /// session, never taken from the client; `id` is the sender's client message id; `ts` is the
    /// gateway's clock when it accepted the message.
    Chat {
        from: String,
        dev: String,
        id: String,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media: Option<crate::media::Media>,
        ts: u64,
    },
    /// A group message: `sid` is its position in the group's timeline (the group stream
    /// sequence, the same for every member), `n` how many members it was sent to.
    Group {
        group: String,
        from: String,
        dev: String,
        id: String,
        sid: u64,
        n: u32,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media: Option<crate::media::Media>,
        ts: u64,
    },
    /// A membership change in the group's timeline: `event` is `created`, `added`, `removed` or
    /// `left`; `members` are the users it concerns.
    GroupEvent { group: String, sid: u64, event: String, by: String, members: Vec<String>, name: String, ts: u64 },
    /// Aggregate tick for the sender of group message `sid`: every recipient has reached
    /// `status`.
    GroupReceipt { group: String, sid: u64, status: ReceiptStatus, ts: u64 },
    /// A 1:1 message this user sent from another of its devices (`dev`), so that every device
    /// shows the whole conversation. `sid` is the message's server id.
    Outgoing {
        to: String,
        dev: String,
        id: String,
        sid: u64,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media: Option<crate::media::Media>,
        ts: u64,
    },
    /// This user read a conversation up to `up_to` on another device (`conv` is a user id, or
    /// `group` a group id): clear its unread count here too.
    ReadMark {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conv: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        dev: String,
        up_to: u64,
        ts: u64,
    },
    /// A receipt for messages this user sent to `from`: every message of this user's to `from`
    /// with a server id (`sid`) up to and including `up_to` has reached `status`.
    Receipt { from: String, status: ReceiptStatus, up_to: u64, ts: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    /// Two ticks: a device of the recipient has the message.
    Delivered,
    /// Blue ticks: the recipient has read it.
    Read,
}

impl ReceiptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptStatus::Delivered => "delivered",
            ReceiptStatus::Read => "read",
        }
    }
}

impl InboxItem {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a value built from Strings and integers cannot fail.
        serde_json::to_vec(self).expect("inbox item serialises")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(b)
    }

    /// The sender to acknowledge delivery to, for items that want a delivery receipt.
    pub fn receipt_target(&self) -> Option<&str> {
        match self {
            InboxItem::Chat { from, .. } => Some(from),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_item_wire_form() {
        let item = InboxItem::Chat {
            from: "alice".into(),
            dev: "web".into(),
            id: "c1".into(),
            body: "hi \"there\"".into(),
            media: None,
            ts: 7,
        };
        let b = item.to_bytes();
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#"{"k":"chat","from":"alice","dev":"web","id":"c1","body":"hi \"there\"","ts":7}"#
        );
        assert_eq!(InboxItem::from_bytes(&b).unwrap(), item);
        assert_eq!(item.receipt_target(), Some("alice"));
    }

    #[test]
    fn receipt_item_wire_form() {
        let item = InboxItem::Receipt { from: "bob".into(), status: ReceiptStatus::Delivered, up_to: 42, ts: 9 };
        assert_eq!(
            String::from_utf8(item.to_bytes()).unwrap(),
            r#"{"k":"receipt","from":"bob","status":"delivered","up_to":42,"ts":9}"#
        );
        assert_eq!(item.receipt_target(), None);
    }
}
