//! Client wire frames: JSON text frames tagged by `t`. See PROTOCOL.md for the prose version.
//!
//! Decoding is strict about what it needs and lenient about what it does not: unknown fields are
//! ignored (so clients can evolve), but a frame that is not JSON, has an unknown type, misses a
//! field, has a field of the wrong type, or an id that breaks the id rules gets a precise error.

use serde::{Deserialize, Serialize};

use crate::groups::{GroupOp, GroupState, GroupSummary, MAX_NAME};
use crate::ids::{ClientMsgId, GroupId, UserId};
use crate::media::Media;

/// Limits applied while decoding a client frame.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message body in bytes.
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body: 32 * 1024 }
    }
}

/// A decoded and validated client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Send a 1:1 message.
    Send { id: ClientMsgId, to: UserId, body: String, media: Option<Media> },
    /// Cumulative delivery ack: this device has every inbox item with `seq` <= this.
    Ack { seq: u64 },
    /// Application heartbeat; answered with `pong`.
    Ping,
    /// A membership operation, answered with `group`, `groups` or `error`.
    Group { id: ClientMsgId, op: GroupOp },
    /// Send a message to a group.
    GroupSend { id: ClientMsgId, group: GroupId, body: String, media: Option<Media> },
    /// Read receipt: the user has read the conversation up to `up_to` (a `sid`).
    Read { conv: Conversation, up_to: u64 },
    /// Who has received and read group message `sid`.
    WhoRead { id: ClientMsgId, group: GroupId, sid: u64 },
    /// The user is typing in a conversation (ephemeral, rate-limited, online recipients only).
    Typing { conv: Conversation },
    /// Online / last seen of these users, answered with `presence`.
    Presence { id: ClientMsgId, users: Vec<UserId> },
    /// Read (`history_days` absent) or change the user's settings; answered with `settings`.
    Settings { id: ClientMsgId, history_days: Option<u32> },
    /// A page of the user's server-side history of a conversation, answered with `history`.
    History { id: ClientMsgId, conv: Conversation, before: Option<u64>, after: Option<u64>, limit: usize },
    /// Push presence changes of these users to this connection (replaces the previous list; an
    /// empty list stops the pushes).
    PresenceSub { users: Vec<UserId> },
}

/// Most items one history page may hold.
pub const MAX_HISTORY_PAGE: usize = 100;

/// Most users one presence query or subscription may name.
pub const MAX_PRESENCE_USERS: usize = 256;

/// A conversation: with one user, or a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    Direct(UserId),
    Group(GroupId),
}

#[derive(Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum RawFrame {
    Settings {
        id: String,
        #[serde(default)]
        history_days: Option<u32>,
    },
    History {
        id: String,
        #[serde(default)]
        conv: Option<String>,
        #[serde(default)]
        group: Option<String>,
        #[serde(default)]
        before: Option<u64>,
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        limit: Option<usize>,
    },
    Typing {
        #[serde(default)]
        conv: Option<String>,
        #[serde(default)]
        group: Option<String>,
    },
    Presence {
        id: String,
        users: Vec<String>,
    },
    PresenceSub {
        users: Vec<String>,
    },
    Send {
        id: String,
        to: String,
        body: String,
        #[serde(default)]
        media: Option<Media>,
    },
    Ack {
        seq: u64,
    },
    Ping,
    GroupCreate {
        id: String,
        name: String,
        members: Vec<String>,
    },
    GroupAdd {
        id: String,
        group: String,
        members: Vec<String>,
    },
    GroupRemove {
        id: String,
        group: String,
        members: Vec<String>,
    },
    GroupLeave {
        id: String,
        group: String,
    },
    GroupInfo {
        id: String,
        group: String,
    },
    Groups {
        id: String,
    },
    Gsend {
        id: String,
        group: String,
        body: String,
        #[serde(default)]
        media: Option<Media>,
    },
    Read {
        #[serde(default)]
        conv: Option<String>,
        #[serde(default)]
        group: Option<String>,
        up_to: u64,
    },
    Receipts {
        id: String,
        group: String,
        sid: u64,
    },
}

/// Machine-readable error codes, stable across versions (PROTOCOL.md lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON (or not UTF-8 text).
    BadJson,
    /// `t` names no known frame type, or is missing.
    UnknownType,
    /// A required field is missing.
    MissingField,
    /// A field has the wrong type or an invalid value.
    BadField,
    /// The message body is larger than the limit.
    TooLarge,
    /// Binary frames are not part of the protocol.
    BinaryUnsupported,
    /// Too many frames; slow down.
    RateLimited,
    /// The group (or the message asked about) does not exist.
    NotFound,
    /// Not allowed: not a member of the group, or not an admin of it.
    Forbidden,
    /// A limit would be exceeded (members per group, for example).
    LimitExceeded,
    /// The backbone is unavailable; retry later with the same message id.
    Unavailable,
    /// An unexpected server failure; retry later with the same message id.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {msg}")]
pub struct DecodeError {
    pub code: ErrorCode,
    pub msg: String,
    /// The frame's `id`, when it had a readable one, so the client can match the error.
    pub id: Option<String>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<serde_json::Value>,
}

fn id_of(bytes: &[u8]) -> Option<String> {
    match serde_json::from_slice::<IdOnly>(bytes).ok()?.id? {
        serde_json::Value::String(s) if s.len() <= 128 => Some(s),
        _ => None,
    }
}

/// Decodes one client text frame.
pub fn decode_client_frame(bytes: &[u8], limits: &Limits) -> Result<ClientFrame, DecodeError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(DecodeError { code: ErrorCode::BadJson, msg: "a frame must be a JSON object".into(), id: None });
    }
    let raw: RawFrame = serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        let text = e.to_string();
        let code = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ErrorCode::BadJson,
            Category::Data if text.starts_with("unknown variant") => ErrorCode::UnknownType,
            Category::Data if text.starts_with("missing field `t`") => ErrorCode::UnknownType,
            Category::Data if text.starts_with("missing field") => ErrorCode::MissingField,
            Category::Data => ErrorCode::BadField,
        };
        let id = if code == ErrorCode::BadJson { None } else { id_of(bytes) };
        DecodeError { code, msg: text, id }
    })?;
    match raw {
        RawFrame::Send { id, to, body, media } => {
            let bad = |msg: String, id: Option<String>| DecodeError { code: ErrorCode::BadField, msg, id };
            let cid = ClientMsgId::parse(&id).map_err(|e| bad(format!("id: {e}"), None))?;
            let to = UserId::parse(&to).map_err(|e| bad(format!("to: {e}"), Some(id.clone())))?;
            if body.len() > limits.max_body {
                return Err(DecodeError {
                    code: ErrorCode::TooLarge,
                    msg: format!("body is {} bytes, the limit is {}", body.len(), limits.max_body),
                    id: Some(id),
                });
            }
            check_media(media.as_ref(), &id)?;
            Ok(ClientFrame::Send { id: cid, to, body, media })
        }
        RawFrame::Ack { seq } => Ok(ClientFrame::Ack { seq }),
        RawFrame::Ping => Ok(ClientFrame::Ping),
        RawFrame::GroupCreate { id, name, members } => {
            let cid = client_id(&id)?;
            if name.trim().is_empty() || name.len() > MAX_NAME {
                return Err(bad_field(format!("name must be 1 to {MAX_NAME} bytes"), &id));
            }
            let members = user_list(&members, &id)?;
            Ok(ClientFrame::Group { id: cid, op: GroupOp::Create { name, members } })
        }
        RawFrame::GroupAdd { id, group, members } => {
            let (cid, group) = (client_id(&id)?, group_id(&group, &id)?);
            let members = user_list(&members, &id)?;
            Ok(ClientFrame::Group { id: cid, op: GroupOp::Add { group, members } })
        }
        RawFrame::GroupRemove { id, group, members } => {
            let (cid, group) = (client_id(&id)?, group_id(&group, &id)?);
            let members = user_list(&members, &id)?;
            Ok(ClientFrame::Group { id: cid, op: GroupOp::Remove { group, members } })
        }
        RawFrame::GroupLeave { id, group } => {
            let (cid, group) = (client_id(&id)?, group_id(&group, &id)?);
            Ok(ClientFrame::Group { id: cid, op: GroupOp::Leave { group } })
        }
        RawFrame::GroupInfo { id, group } => {
            let (cid, group) = (client_id(&id)?, group_id(&group, &id)?);
            Ok(ClientFrame::Group { id: cid, op: GroupOp::Info { group } })
        }
        RawFrame::Groups { id } => Ok(ClientFrame::Group { id: client_id(&id)?, op: GroupOp::List }),
        RawFrame::Gsend { id, group, body, media } => {
            let cid = client_id(&id)?;
            let group = GroupId::parse(&group).map_err(|e| bad_field(format!("group: {e}"), &id))?;
            if body.len() > limits.max_body {
                return Err(DecodeError {
                    code: ErrorCode::TooLarge,
                    msg: format!("body is {} bytes, the limit is {}", body.len(), limits.max_body),
                    id: Some(id),
                });
            }
            check_media(media.as_ref(), &id)?;
            Ok(ClientFrame::GroupSend { id: cid, group, body, media })
        }
        RawFrame::Read { conv, group, up_to } => Ok(ClientFrame::Read { conv: conversation(conv, group)?, up_to }),
        RawFrame::Receipts { id, group, sid } => {
            let cid = client_id(&id)?;
            let group = GroupId::parse(&group).map_err(|e| bad_field(format!("group: {e}"), &id))?;
            Ok(ClientFrame::WhoRead { id: cid, group, sid })
        }
        RawFrame::Settings { id, history_days } => {
            let cid = client_id(&id)?;
            if history_days.is_some_and(|d| d > crate::subjects::MAX_HISTORY_DAYS) {
                return Err(bad_field(format!("history_days must be 0 to {}", crate::subjects::MAX_HISTORY_DAYS), &id));
            }
            Ok(ClientFrame::Settings { id: cid, history_days })
        }
        RawFrame::History { id, conv, group, before, after, limit } => {
            let cid = client_id(&id)?;
            let conv = conversation(conv, group).map_err(|e| DecodeError { id: Some(id.clone()), ..e })?;
            if before.is_some() && after.is_some() {
                return Err(bad_field("at most one of before and after".into(), &id));
            }
            let limit = limit.unwrap_or(50);
            if limit == 0 || limit > MAX_HISTORY_PAGE {
                return Err(bad_field(format!("limit must be 1 to {MAX_HISTORY_PAGE}"), &id));
            }
            Ok(ClientFrame::History { id: cid, conv, before, after, limit })
        }
        RawFrame::Typing { conv, group } => Ok(ClientFrame::Typing { conv: conversation(conv, group)? }),
        RawFrame::Presence { id, users } => {
            let cid = client_id(&id)?;
            Ok(ClientFrame::Presence { id: cid, users: presence_users(&users, Some(&id))? })
        }
        RawFrame::PresenceSub { users } => Ok(ClientFrame::PresenceSub { users: presence_users(&users, None)? }),
    }
}

fn conversation(conv: Option<String>, group: Option<String>) -> Result<Conversation, DecodeError> {
    let bad = |msg: String| DecodeError { code: ErrorCode::BadField, msg, id: None };
    match (conv, group) {
        (Some(c), None) => Ok(Conversation::Direct(UserId::parse(&c).map_err(|e| bad(format!("conv: {e}")))?)),
        (None, Some(g)) => Ok(Conversation::Group(GroupId::parse(&g).map_err(|e| bad(format!("group: {e}")))?)),
        _ => Err(bad("exactly one of conv and group is required".to_owned())),
    }
}

fn presence_users(users: &[String], id: Option<&str>) -> Result<Vec<UserId>, DecodeError> {
    let err = |code, msg: String| DecodeError { code, msg, id: id.map(str::to_owned) };
    if users.len() > MAX_PRESENCE_USERS {
        return Err(err(ErrorCode::LimitExceeded, format!("at most {MAX_PRESENCE_USERS} users")));
    }
    users.iter().map(|u| UserId::parse(u).map_err(|e| err(ErrorCode::BadField, format!("users: {e}")))).collect()
}

fn check_media(media: Option<&Media>, id: &str) -> Result<(), DecodeError> {
    media.map_or(Ok(()), |m| m.validate().map_err(|e| bad_field(e, id)))
}

fn bad_field(msg: String, id: &str) -> DecodeError {
    DecodeError { code: ErrorCode::BadField, msg, id: Some(id.to_owned()) }
}

fn client_id(id: &str) -> Result<ClientMsgId, DecodeError> {
    ClientMsgId::parse(id).map_err(|e| DecodeError { code: ErrorCode::BadField, msg: format!("id: {e}"), id: None })
}

fn group_id(group: &str, id: &str) -> Result<String, DecodeError> {
    GroupId::parse(group).map(|g| g.to_string()).map_err(|e| bad_field(format!("group: {e}"), id))
}

/// Validates a list of user ids (at most the largest group size, each a valid id).
fn user_list(members: &[String], id: &str) -> Result<Vec<String>, DecodeError> {
    if members.len() > crate::groups::DEFAULT_MAX_MEMBERS {
        return Err(DecodeError {
            code: ErrorCode::LimitExceeded,
            msg: format!("at most {} members per request", crate::groups::DEFAULT_MAX_MEMBERS),
            id: Some(id.to_owned()),
        });
    }
    members
        .iter()
        .map(|m| UserId::parse(m).map(|u| u.to_string()).map_err(|e| bad_field(format!("members: {e}"), id)))
        .collect()
}

/// Frames the server sends, other than stored inbox items (see [`render_item`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame on every connection.
    Hello {
        user: &'a str,
        device: &'a str,
        gateway: &'a str,
        /// The client should send something (a `ping` will do) at least this often.
        heartbeat_ms: u64,
        max_body: usize,
        /// Inbox items after this sequence will follow.
        resume_from: u64,
    },
    /// The message with this client id is durable; `sid` is its server id.
    Sent {
        id: &'a str,
        sid: u64,
        ts: u64,
        dup: bool,
    },
    /// The inbox has been drained up to `seq`; what follows is live.
    Synced {
        seq: u64,
    },
    Pong,
    Error {
        code: ErrorCode,
        msg: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    /// The server is going away; reconnect (with backoff) to another gateway.
    Reconnect {
        reason: &'a str,
    },
    /// Presence of users: the answer to a `presence` query (with its `id`), or a pushed change.
    Presence {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        users: &'a [PresenceView],
    },
    /// Someone is typing to this user (`group` set when in a group).
    Typing {
        from: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<&'a str>,
    },
    /// Sent once before `synced` on connect: per conversation that had items in the inbox drain,
    /// its last server id and how many messages in it are new.
    Conversations {
        convs: &'a [ConvSummary],
    },
    /// The user's settings (answer to `settings`).
    Settings {
        id: &'a str,
        history_days: u32,
    },
    /// Answer to a group operation: the group as it is now.
    Group {
        id: &'a str,
        group: &'a GroupState,
    },
    /// Answer to `groups`: the user's groups.
    Groups {
        id: &'a str,
        groups: &'a [GroupSummary],
    },
    /// Answer to `receipts`: who has received and who has read group message `sid`.
    Receipts {
        id: &'a str,
        group: &'a str,
        sid: u64,
        recipients: usize,
        delivered: &'a [String],
        read: &'a [String],
    },
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frame serialises")
    }
}

/// A conversation in the `conversations` frame: `conv` (a user) or `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvSummary {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub last_sid: u64,
    pub unread: u32,
}

/// One user's presence: online now, or when last seen (ms since the epoch; absent if never).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceView {
    pub user: String,
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
}

/// Renders a page of history: `{"t":"history","id":..,"more":..,"items":[{"hseq":..,"m":<item>},..]}`
/// without parsing the stored items (JSON written by our own services).
pub fn render_history(id: &str, items: &[(u64, &[u8])], more: bool) -> String {
    let mut s = String::with_capacity(64 + items.iter().map(|(_, b)| b.len() + 24).sum::<usize>());
    s.push_str("{\"t\":\"history\",\"id\":");
    s.push_str(&serde_json::to_string(id).expect("a string serialises"));
    s.push_str(if more { ",\"more\":true,\"items\":[" } else { ",\"more\":false,\"items\":[" });
    for (i, (hseq, item)) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str("{\"hseq\":");
        s.push_str(&hseq.to_string());
        s.push_str(",\"m\":");
        s.push_str(std::str::from_utf8(item).unwrap_or("null"));
        s.push('}');
    }
    s.push_str("]}");
    s
}

/// Renders a stored inbox item as a `msg` frame without parsing it:
/// `{"t":"msg","seq":<seq>,"m":<stored item>}`. The stored bytes are JSON written by our own
/// services (see [`crate::item::InboxItem`]).
pub fn render_item(seq: u64, item: &[u8]) -> String {
    let item = std::str::from_utf8(item).unwrap_or("null");
    let mut s = String::with_capacity(item.len() + 32);
    s.push_str("{\"t\":\"msg\",\"seq\":");
    s.push_str(&seq.to_string());
    s.push_str(",\"m\":");
    s.push_str(item);
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Result<ClientFrame, DecodeError> {
        decode_client_frame(s.as_bytes(), &Limits::default())
    }

    #[test]
    fn decodes_valid_frames() {
        assert_eq!(
            dec(r#"{"t":"send","id":"c1","to":"bob","body":"hi","extra":1}"#).unwrap(),
            ClientFrame::Send {
                id: ClientMsgId::parse("c1").unwrap(),
                to: UserId::parse("bob").unwrap(),
                body: "hi".into(),
                media: None
            }
        );
        assert_eq!(dec(r#"{"t":"ack","seq":5}"#).unwrap(), ClientFrame::Ack { seq: 5 });
        assert_eq!(dec(r#"{"t":"ping"}"#).unwrap(), ClientFrame::Ping);
    }

    #[test]
    fn classifies_errors() {
        let code = |s: &str| dec(s).unwrap_err().code;
        assert_eq!(code("{"), ErrorCode::BadJson);
        assert_eq!(code("[]"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(dec(" \n{\"t\":\"ping\"}"), Ok(ClientFrame::Ping), "leading whitespace is fine");
        assert_eq!(code(r#"{"t":"nope"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"id":"x"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"t":"send","id":"c","to":"b"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"t":"ack","seq":"x"}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"t":"ack","seq":-1}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"t":"send","id":"c","to":"a.b","body":""}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"t":"send","id":"a b","to":"b","body":""}"#), ErrorCode::BadField);
    }

    #[test]
    fn errors_carry_the_frame_id_when_readable() {
        let e = dec(r#"{"t":"send","id":"c9","to":"b"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c9"));
        let e = dec(r#"{"t":"send","id":"c9","to":"bad.user","body":""}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c9"));
    }

    #[test]
    fn decodes_group_frames() {
        let f = dec(r#"{"t":"group_create","id":"c","name":"Fr","members":["b","c"]}"#).unwrap();
        assert_eq!(
            f,
            ClientFrame::Group {
                id: ClientMsgId::parse("c").unwrap(),
                op: GroupOp::Create { name: "Fr".into(), members: vec!["b".into(), "c".into()] }
            }
        );
        assert!(matches!(dec(r#"{"t":"groups","id":"c"}"#).unwrap(), ClientFrame::Group { op: GroupOp::List, .. }));
        assert!(matches!(
            dec(r#"{"t":"gsend","id":"c","group":"g1","body":"x"}"#).unwrap(),
            ClientFrame::GroupSend { .. }
        ));
        assert_eq!(
            dec(r#"{"t":"read","group":"g1","up_to":4}"#).unwrap(),
            ClientFrame::Read { conv: Conversation::Group(GroupId::parse("g1").unwrap()), up_to: 4 }
        );
        let code = |s: &str| dec(s).unwrap_err().code;
        assert_eq!(code(r#"{"t":"read","up_to":4}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"t":"read","conv":"a","group":"g","up_to":4}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"t":"group_create","id":"c","name":"","members":[]}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"t":"group_add","id":"c","group":"g","members":["a.b"]}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"t":"gsend","id":"c","group":"g>","body":""}"#), ErrorCode::BadField);
    }

    #[test]
    fn decodes_presence_and_typing() {
        assert_eq!(
            dec(r#"{"t":"typing","conv":"bob"}"#).unwrap(),
            ClientFrame::Typing { conv: Conversation::Direct(UserId::parse("bob").unwrap()) }
        );
        assert!(matches!(dec(r#"{"t":"presence","id":"p","users":["a","b"]}"#).unwrap(), ClientFrame::Presence { .. }));
        assert_eq!(dec(r#"{"t":"presence_sub","users":[]}"#).unwrap(), ClientFrame::PresenceSub { users: vec![] });
        let many: Vec<String> = (0..300).map(|i| format!("\"u{i}\"")).collect();
        let f = format!(r#"{{"t":"presence","id":"p","users":[{}]}}"#, many.join(","));
        assert_eq!(dec(&f).unwrap_err().code, ErrorCode::LimitExceeded);
        assert_eq!(dec(r#"{"t":"typing"}"#).unwrap_err().code, ErrorCode::BadField);
        let v = PresenceView { user: "b".into(), online: false, last_seen: Some(5) };
        let users = [v];
        assert_eq!(
            ServerFrame::Presence { id: None, users: &users }.to_json(),
            r#"{"t":"presence","users":[{"user":"b","online":false,"last_seen":5}]}"#
        );
    }

    #[test]
    fn media_descriptors_are_validated() {
        let ok = r#"{"t":"send","id":"c","to":"b","body":"","media":{"url":"https://x/y.png","mime":"image/png","size":10}}"#;
        let ClientFrame::Send { media: Some(m), .. } = dec(ok).unwrap() else { panic!("no media") };
        assert_eq!(m.size, 10);
        let bad =
            r#"{"t":"gsend","id":"c","group":"g","body":"","media":{"url":"ftp://x","mime":"image/png","size":10}}"#;
        let e = dec(bad).unwrap_err();
        assert_eq!((e.code, e.id.as_deref()), (ErrorCode::BadField, Some("c")));
        let wrong_type =
            r#"{"t":"send","id":"c","to":"b","body":"","media":{"url":"https://x","mime":"a/b","size":"big"}}"#;
        assert_eq!(dec(wrong_type).unwrap_err().code, ErrorCode::BadField);
    }

    #[test]
    fn settings_and_history_frames() {
        assert_eq!(
            dec(r#"{"t":"settings","id":"s","history_days":30}"#).unwrap(),
            ClientFrame::Settings { id: ClientMsgId::parse("s").unwrap(), history_days: Some(30) }
        );
        assert_eq!(dec(r#"{"t":"settings","id":"s","history_days":91}"#).unwrap_err().code, ErrorCode::BadField);
        let ClientFrame::History { limit, before, .. } =
            dec(r#"{"t":"history","id":"h","conv":"bob","before":9}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!((limit, before), (50, Some(9)));
        let code = |s: &str| dec(s).unwrap_err().code;
        assert_eq!(code(r#"{"t":"history","id":"h","conv":"b","before":1,"after":2}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"t":"history","id":"h","group":"g","limit":1000}"#), ErrorCode::BadField);
        assert_eq!(code(r#"{"t":"history","id":"h"}"#), ErrorCode::BadField);
        assert_eq!(
            render_history("h\"1", &[(3, br#"{"k":"chat"}"#)], true),
            r#"{"t":"history","id":"h\"1","more":true,"items":[{"hseq":3,"m":{"k":"chat"}}]}"#
        );
    }

    #[test]
    fn enforces_body_limit() {
        let body = "x".repeat(11);
        let f = format!(r#"{{"t":"send","id":"c","to":"b","body":"{body}"}}"#);
        let e = decode_client_frame(f.as_bytes(), &Limits { max_body: 10 }).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
    }

    #[test]
    fn renders_items_and_frames() {
        assert_eq!(render_item(3, br#"{"k":"chat"}"#), r#"{"t":"msg","seq":3,"m":{"k":"chat"}}"#);
        let e = ServerFrame::Error { code: ErrorCode::BadJson, msg: "x", id: None };
        assert_eq!(e.to_json(), r#"{"t":"error","code":"bad_json","msg":"x"}"#);
        let s = ServerFrame::Sent { id: "c", sid: 1, ts: 2, dup: false };
        assert_eq!(s.to_json(), r#"{"t":"sent","id":"c","sid":1,"ts":2,"dup":false}"#);
    }

    #[test]
    fn never_panics_on_junk() {
        for s in ["", "\u{0}", "null", "1", r#"{"t":1}"#, r#"{"t":"send","id":1,"to":[],"body":{}}"#] {
            let _ = dec(s);
        }
        let _ = decode_client_frame(&[0xff, 0xfe], &Limits::default());
    }

    /// Inputs the fuzz targets (fuzz/, scripts/fuzz.sh) and the hostile-client system tests
    /// exercise, pinned: what the decoder answers, and that it answers without panicking or
    /// overflowing the stack.
    #[test]
    fn hostile_inputs_from_fuzzing() {
        let code = |s: &[u8]| decode_client_frame(s, &Limits::default()).unwrap_err().code;
        // Valid JSON that is not an object (the first fuzz findings: "\n0", "\n\n2\n") is bad_json.
        for s in ["\n0", "\n\n2\n", "[]", "\"s\"", "null", "true", " [{\"t\":\"ping\"}]"] {
            assert_eq!(code(s.as_bytes()), ErrorCode::BadJson, "{s:?}");
        }
        // Not JSON: trailing bytes, a form feed (ASCII whitespace, not JSON whitespace).
        assert_eq!(code(br#"{"t":"ping"} x"#), ErrorCode::BadJson);
        assert_eq!(code(b"\x0c{\"t\":\"ping\"}"), ErrorCode::BadJson);
        // Deep nesting hits serde_json's recursion limit, not the stack.
        let deep = format!("{{\"t\":\"send\",\"body\":{}}}", "[".repeat(100_000));
        assert_eq!(code(deep.as_bytes()), ErrorCode::BadJson);
        // A `t` of the wrong type, a duplicate tag.
        assert_eq!(code(br#"{"t":7}"#), ErrorCode::BadField);
        assert_eq!(code(br#"{"t":"ping","t":"ack"}"#), ErrorCode::BadField);
        // Huge ids are refused without being echoed back.
        let huge = format!(r#"{{"t":"send","id":"{}","to":"bob","body":"b"}}"#, "i".repeat(100_000));
        let e = dec(&huge).unwrap_err();
        assert_eq!((e.code, e.id.as_deref()), (ErrorCode::BadField, None));
        assert!(e.msg.len() < 256, "{}", e.msg);
        let e = dec(&format!(r#"{{"t":"explode","id":"{}"}}"#, "j".repeat(129))).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::UnknownType, None));
        // Numbers out of range.
        assert_eq!(code(br#"{"t":"ack","seq":18446744073709551616}"#), ErrorCode::BadField);
        assert_eq!(code(br#"{"t":"ack","seq":1e400}"#), ErrorCode::BadJson);
    }
}
