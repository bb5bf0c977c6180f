//! Server-side history for users who opted in (KV `settings`, `history_days` > 0): before the
//! purger removes delivered items from such a user's inbox, it moves the conversation items
//! (1:1 and group messages — received, and its own, which its gateway copies into its inbox —
//! and membership events) into the user's history (stream HISTORY,
//! `history.<user>.<conversation>`) in inbox order, with a per-message TTL of the user's
//! retention. Each item is copied with the
//! dedup id `h|<user>|<inbox seq>`, so a purge retried after a failure stores nothing twice
//! (within the duplicate window).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use futures::StreamExt;
use fxhash::FxHashMap;
use protocol::groups::UserSettings;
use protocol::{subjects, UserId};

use crate::metrics::Metrics;

/// Who keeps history, for how many days.
#[derive(Default)]
pub struct HistorySettings {
    days: RwLock<FxHashMap<String, u32>>,
}

impl HistorySettings {
    pub fn days(&self, user: &str) -> u32 {
        self.days.read().map(|m| m.get(user).copied().unwrap_or(0)).unwrap_or(0)
    }

    fn set(&self, user: &str, days: u32) {
        if let Ok(mut m) = self.days.write() {
            if days == 0 {
                m.remove(user);
            } else {
                m.insert(user.to_owned(), days);
            }
        }
    }
}

/// Follows KV `settings` (its history first), forever.
pub fn spawn_watch(js: jetstream::Context, settings: Arc<HistorySettings>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let res: anyhow::Result<()> = async {
                let kv = js.get_key_value(subjects::SETTINGS_BUCKET).await?;
                let mut entries = kv.watch_with_history(">").await?;
                while let Some(entry) = entries.next().await {
                    let entry = entry?;
                    let days = match entry.operation {
                        jetstream::kv::Operation::Put => {
                            serde_json::from_slice::<UserSettings>(&entry.value).map(|s| s.history_days).unwrap_or(0)
                        }
                        _ => 0,
                    };
                    settings.set(&entry.key, days.min(subjects::MAX_HISTORY_DAYS));
                }
                Ok(())
            }
            .await;
            if let Err(e) = res {
                tracing::warn!(error = %format!("{e:#}"), "settings watch failed; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// The history conversation of an inbox item, if it belongs in history.
pub fn conversation_of(item: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head {
        k: String,
        #[serde(default)]
        from: Option<String>,
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        group: Option<String>,
    }
    let h: Head = serde_json::from_slice(item).ok()?;
    match h.k.as_str() {
        "chat" => subjects::conversation_key(h.from.as_deref(), None),
        "outgoing" => subjects::conversation_key(h.to.as_deref(), None),
        "group" | "group_event" => subjects::conversation_key(None, h.group.as_deref()),
        _ => None,
    }
}

/// Copies `user`'s conversation items with a sequence up to `up_to` into its history. Errors
/// leave the inbox as it is (the purge is retried later).
pub async fn archive(
    js: &jetstream::Context,
    user: &UserId,
    up_to: u64,
    days: u32,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let client = js.client();
    let ttl = Duration::from_secs(u64::from(days) * 24 * 3600);
    let mut after = 0;
    loop {
        let batch = bus::inbox::fetch_after(&client, user, after, 256).await?;
        let Some(last) = batch.last().map(|i| i.seq) else { break };
        let mut acks: Vec<PublishAckFuture> = Vec::new();
        for item in batch.iter().take_while(|i| i.seq <= up_to) {
            let Some(conv) = conversation_of(&item.payload) else { continue };
            let msg = PublishMessage::build()
                .message_id(format!("h|{user}|{}", item.seq))
                .ttl(ttl)
                .payload(item.payload.clone());
            acks.push(js.send_publish(subjects::history(user.as_str(), &conv), msg).await?);
        }
        for ack in acks {
            ack.await?;
            metrics.history_copies.inc();
        }
        if last >= up_to || batch.len() < 256 {
            break;
        }
        after = last;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_conversation_items_go_to_history() {
        assert_eq!(conversation_of(br#"{"k":"chat","from":"bob","body":"x"}"#).as_deref(), Some("d-bob"));
        assert_eq!(conversation_of(br#"{"k":"group","group":"g1","from":"bob"}"#).as_deref(), Some("g-g1"));
        assert_eq!(conversation_of(br#"{"k":"group_event","group":"g1"}"#).as_deref(), Some("g-g1"));
        assert_eq!(conversation_of(br#"{"k":"receipt","from":"bob"}"#), None);
        assert_eq!(conversation_of(br#"{"k":"outgoing","to":"bob"}"#).as_deref(), Some("d-bob"));
        assert_eq!(conversation_of(br#"{"k":"read_mark","conv":"bob"}"#), None);
        assert_eq!(conversation_of(b"junk"), None);
    }

    #[test]
    fn settings_map() {
        let s = HistorySettings::default();
        s.set("a", 30);
        assert_eq!(s.days("a"), 30);
        s.set("a", 0);
        assert_eq!(s.days("a"), 0);
    }
}
