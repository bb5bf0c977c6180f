//! The router's membership service contract (NATS request/reply on `svc.groups`) and the group
//! state stored in the `groups` KV bucket. The gateway forwards a client's group operation with
//! `by` set to the authenticated user; the router validates, updates the KV buckets, records a
//! membership event in the group's timeline and replies.

use serde::{Deserialize, Serialize};

use crate::frames::ErrorCode;

/// Default cap on members per group (configurable in the router).
pub const DEFAULT_MAX_MEMBERS: usize = 1024;
/// Longest group name, bytes.
pub const MAX_NAME: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRequest {
    /// The authenticated user asking (stamped by the gateway, never from the client).
    pub by: String,
    #[serde(flatten)]
    pub op: GroupOp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GroupOp {
    Create { name: String, members: Vec<String> },
    Add { group: String, members: Vec<String> },
    Remove { group: String, members: Vec<String> },
    Leave { group: String },
    Info { group: String },
    List,
}

/// A group as stored in KV `groups` and returned to members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub gid: String,
    pub name: String,
    pub created_by: String,
    pub created_at: u64,
    pub admins: Vec<String>,
    pub members: Vec<String>,
}

impl GroupState {
    pub fn is_member(&self, user: &str) -> bool {
        self.members.iter().any(|m| m == user)
    }

    pub fn is_admin(&self, user: &str) -> bool {
        self.admins.iter().any(|m| m == user)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub gid: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum GroupReply {
    Group { group: GroupState },
    Groups { groups: Vec<GroupSummary> },
    Error { code: ErrorCode, msg: String },
}

/// A receipt event on `receipts.<group>` (stream RECEIPTS), aggregated by storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum ReceiptEvent {
    /// Published by the router before it fans a message out: who sent it and to how many.
    Sent { group: String, sid: u64, sender: String, recipients: Vec<String> },
    /// Published by a gateway: `by` has every message of the group up to `up_to` (cumulative).
    Delivered { group: String, by: String, up_to: u64 },
    /// Published by a gateway: `by` has read every message of the group up to `up_to`.
    Read { group: String, by: String, up_to: u64 },
}

/// Request on `svc.receipts`: who has received and read group message `sid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoReadRequest {
    /// The asking user; must be a member of the group (checked by the gateway).
    pub by: String,
    pub group: String,
    pub sid: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum WhoReadReply {
    Receipts { recipients: usize, delivered: Vec<String>, read: Vec<String> },
    Error { code: ErrorCode, msg: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_form() {
        let r = GroupRequest { by: "al".into(), op: GroupOp::Add { group: "g1".into(), members: vec!["bo".into()] } };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"by":"al","op":"add","group":"g1","members":["bo"]}"#);
        assert_eq!(serde_json::from_str::<GroupRequest>(&s).unwrap(), r);
        let l = serde_json::to_string(&GroupRequest { by: "al".into(), op: GroupOp::List }).unwrap();
        assert_eq!(l, r#"{"by":"al","op":"list"}"#);
    }

    #[test]
    fn reply_and_event_wire_forms() {
        let e = GroupReply::Error { code: ErrorCode::Forbidden, msg: "x".into() };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"r":"error","code":"forbidden","msg":"x"}"#);
        assert_eq!(serde_json::from_str::<GroupReply>(&s).unwrap(), e);
        let ev = ReceiptEvent::Read { group: "g".into(), by: "b".into(), up_to: 3 };
        assert_eq!(serde_json::to_string(&ev).unwrap(), r#"{"e":"read","group":"g","by":"b","up_to":3}"#);
    }
}

/// An entry of the group stream (`group.<gid>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum GroupEntry {
    /// A message, published by the sender's gateway after checking membership.
    Post {
        from: String,
        dev: String,
        id: String,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media: Option<crate::media::Media>,
        ts: u64,
    },
    /// A membership change, published by the router after updating KV `groups`. `state` is the
    /// member list after the change: the fan-out applies it at this position in the timeline,
    /// so every message is fanned out to exactly the members of the moment it was sent.
    Event { event: String, by: String, members: Vec<String>, name: String, state: Vec<String>, ts: u64 },
}

/// A user's presence on one gateway (KV `presence`, key `<user>.<gateway>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub online: bool,
    /// Online since (when online), or last seen (when offline), ms since the epoch.
    pub at: u64,
}

/// A user's settings (KV `settings`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSettings {
    /// Server-side history kept for this many days (0: off, the ephemeral default; at most 90).
    #[serde(default)]
    pub history_days: u32,
}

/// A revocation of a user's sessions (KV `revocations`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Tokens issued (`iat`) before this time, in seconds since the epoch, are refused.
    pub before: u64,
}

/// A gateway's heartbeat (KV `gateways`): a gateway whose beat is older than the liveness
/// timeout is dead, and the users it held are offline since that beat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayBeat {
    pub at: u64,
}
