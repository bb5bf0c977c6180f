//! NATS names: subjects, streams and buckets. Every service builds its subjects here so that a
//! rename is one edit.

use crate::ids::{DeviceId, UserId};

/// The stream holding every user's durable inbox.
pub const INBOX_STREAM: &str = "INBOX";
/// Subjects the INBOX stream captures: `inbox.<user>`.
pub const INBOX_SUBJECTS: &str = "inbox.*";
/// Prefix of the live copies JetStream republishes for every stored inbox message.
pub const LIVE_PREFIX: &str = "live";
/// KV bucket of per-device delivery cursors, keyed `<user>.<device>`.
pub const CURSORS_BUCKET: &str = "cursors";

/// The stream of group sends and membership events, `group.<group id>`. Stored under a
/// partitioned subject `group.<partition>.<group id>` (a subject transform on the stream), so
/// that router instances can split the partitions between them while each group stays in one.
pub const GROUPS_STREAM: &str = "GROUPS";
pub const GROUP_SUBJECTS: &str = "group.*";
/// Partitions of the group stream (fixed when the stream is created).
pub const GROUP_PARTITIONS: u32 = 8;
/// KV bucket of group state, keyed by group id (JSON `GroupState`).
pub const GROUPS_BUCKET: &str = "groups";
/// KV bucket of each user's groups, keyed by user id (JSON list of group ids).
pub const MEMBERSHIPS_BUCKET: &str = "memberships";
/// Request subject of the router's membership service (queue group `router`).
pub const GROUP_SERVICE: &str = "svc.groups";
/// The stream of group receipt events (`receipts.<group id>`), aggregated by storage.
pub const RECEIPTS_STREAM: &str = "RECEIPTS";
pub const RECEIPT_SUBJECTS: &str = "receipts.*";
/// Request subject of storage's "who received / read this group message" query.
pub const RECEIPT_QUERY_SERVICE: &str = "svc.receipts";

/// KV bucket of presence records, keyed `<user>.<gateway>` (JSON `PresenceRecord`).
pub const PRESENCE_BUCKET: &str = "presence";
/// KV bucket of session revocations, keyed by user id (JSON `Revocation`): tokens issued before
/// `before` are refused and the user's sessions are closed.
pub const REVOCATIONS_BUCKET: &str = "revocations";
/// The stream of server-side history, for users who opted in: `history.<user>.<conversation>`
/// where the conversation is `d-<peer>` or `g-<group id>`. One copy per user, so each user's
/// retention applies to its own copies (per-message TTL) and a user reads only its own.
pub const HISTORY_STREAM: &str = "HISTORY";
pub const HISTORY_SUBJECTS: &str = "history.>";
/// Longest history retention a user may choose, days.
pub const MAX_HISTORY_DAYS: u32 = 90;
/// KV bucket of per-user settings, keyed by user id (JSON `UserSettings`).
pub const SETTINGS_BUCKET: &str = "settings";

/// The history subject of `user`'s conversation `conv` (see [`conversation_key`]).
pub fn history(user: &str, conv: &str) -> String {
    format!("history.{user}.{conv}")
}

/// The conversation token of a 1:1 peer or a group in history subjects.
pub fn conversation_key(peer: Option<&str>, group: Option<&str>) -> Option<String> {
    match (peer, group) {
        (Some(p), None) => Some(format!("d-{p}")),
        (None, Some(g)) => Some(format!("g-{g}")),
        _ => None,
    }
}

/// KV bucket of gateway heartbeats, keyed by gateway id (JSON `GatewayBeat`).
pub const GATEWAYS_BUCKET: &str = "gateways";

/// Core NATS subject announcing that a user's presence may have changed (empty payload).
pub fn presence_changed(user: &str) -> String {
    format!("presence.{user}")
}

pub fn presence_key(user: &str, gateway: &str) -> String {
    format!("{user}.{gateway}")
}

/// Header on inbox items that deserve a push notification when the recipient has no live
/// device (1:1 chat messages and members' copies of group messages).
pub const PUSH_HEADER: &str = "Chat-Push";

/// Durable name of storage's consumer on INBOX that reads the headers of stored items to emit
/// push events (the NATS permissions name it).
pub const PUSH_NOTIFIER_CONSUMER: &str = "push-notifier";

/// Core NATS subject of push-notification events for a user with no connected device.
pub fn push(user: &str) -> String {
    format!("push.{user}")
}

pub fn group(gid: &crate::ids::GroupId) -> String {
    format!("group.{gid}")
}

/// The stored subjects of one partition of the group stream.
pub fn group_partition_filter(partition: u32) -> String {
    format!("group.{partition}.*")
}

pub fn receipts(gid: &str) -> String {
    format!("receipts.{gid}")
}

pub fn inbox(user: &UserId) -> String {
    format!("inbox.{user}")
}

pub fn live(user: &UserId) -> String {
    format!("{LIVE_PREFIX}.{user}")
}

/// The user a `live.<user>` or `inbox.<user>` subject belongs to, if it is one.
pub fn user_of(subject: &str) -> Option<&str> {
    let (_, user) = subject.split_once('.')?;
    (!user.is_empty() && !user.contains('.')).then_some(user)
}

pub fn cursor_key(user: &UserId, device: &DeviceId) -> String {
    format!("{user}.{device}")
}

/// Splits a cursor key back into its user and device.
pub fn parse_cursor_key(key: &str) -> Option<(&str, &str)> {
    let (user, device) = key.split_once('.')?;
    (!user.is_empty() && !device.is_empty() && !device.contains('.')).then_some((user, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let u = UserId::parse("bob").unwrap();
        let d = DeviceId::parse("phone").unwrap();
        assert_eq!(inbox(&u), "inbox.bob");
        assert_eq!(user_of(&live(&u)), Some("bob"));
        assert_eq!(parse_cursor_key(&cursor_key(&u, &d)), Some(("bob", "phone")));
        assert_eq!(user_of("live"), None);
        assert_eq!(parse_cursor_key("bob."), None);
    }
}
