//! Everything the services and clients agree on, with no I/O: identifiers and their rules, NATS
//! subject and stream names, the client wire frames, the payloads stored in inboxes, and token
//! verification. Pure functions only, so it is unit-tested and fuzzed in isolation.

pub mod frames;
pub mod groups;
pub mod ids;
pub mod item;
pub mod media;
pub mod subjects;
pub mod token;

pub use frames::{
    decode_client_frame, render_history, render_item, ClientFrame, ConvSummary, Conversation, DecodeError, ErrorCode,
    Limits, PresenceView, ServerFrame,
};
pub use ids::{ClientMsgId, DeviceId, GroupId, IdError, UserId};
pub use item::InboxItem;
pub use media::Media;
pub use token::{Claims, Identity, PublicKeyAlg, TokenError, TokenKeys};

/// Milliseconds since the Unix epoch, the one timestamp unit on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
