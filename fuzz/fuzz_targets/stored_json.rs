//! JSON decoding of what the services exchange and store: inbox items (InboxItem::from_bytes,
//! rendered to clients by render_item without re-parsing) and the router's group contract
//! (protocol::groups). Client-controlled strings end up inside all of them. Checks: never
//! panics; whatever decodes re-encodes to something that decodes to the same value; a stored
//! item that decodes renders into a `msg` frame that is valid JSON carrying the item unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::groups::{
    GatewayBeat, GroupEntry, GroupReply, GroupRequest, GroupState, GroupSummary, PresenceRecord, ReceiptEvent,
    Revocation, WhoReadReply, WhoReadRequest,
};
use protocol::{render_item, ConvSummary, InboxItem, Media, PresenceView};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let bytes = serde_json::to_vec(&v).expect("a decoded value encodes");
        let back: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{} re-encoded as {:?} does not decode: {e}",
                std::any::type_name::<T>(),
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(back, v, "{} changed in a round trip", std::any::type_name::<T>());
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(item) = InboxItem::from_bytes(data) {
        let back = InboxItem::from_bytes(&item.to_bytes()).expect("an item's own bytes decode");
        assert_eq!(back, item);
        let frame = render_item(42, data);
        let v: serde_json::Value = serde_json::from_str(&frame).expect("a rendered msg frame is JSON");
        assert_eq!(v["t"], "msg");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["m"], serde_json::from_slice::<serde_json::Value>(data).unwrap());
        let _ = item.receipt_target();
    }
    round_trip::<GroupRequest>(data);
    round_trip::<GroupReply>(data);
    round_trip::<GroupEntry>(data);
    round_trip::<GroupState>(data);
    round_trip::<GroupSummary>(data);
    round_trip::<ReceiptEvent>(data);
    round_trip::<WhoReadRequest>(data);
    round_trip::<WhoReadReply>(data);
    round_trip::<PresenceRecord>(data);
    round_trip::<PresenceView>(data);
    round_trip::<Revocation>(data);
    round_trip::<GatewayBeat>(data);
    round_trip::<Media>(data);
    round_trip::<ConvSummary>(data);
});
