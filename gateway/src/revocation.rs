//! Revocation of a user's sessions: `chatctl revoke USER` writes `revocations/<user>` =
//! `{"before": now}`. Every gateway follows the bucket: a token issued before that time is
//! refused at the upgrade (401), and the user's open sessions that were authenticated with such
//! a token are closed (1008). The set is small (only revoked users, kept for the longest token
//! lifetime), so each gateway holds all of it in memory.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use fxhash::FxHashMap;
use protocol::groups::Revocation;
use protocol::{subjects, UserId};

use crate::bridge::ExecEvent;

#[derive(Default)]
pub struct Revocations {
    before: RwLock<FxHashMap<String, u64>>,
}

impl Revocations {
    /// Whether a token of `user` issued at `iat` (seconds) is revoked.
    pub fn is_revoked(&self, user: &str, iat: u64) -> bool {
        self.before.read().map(|m| m.get(user).is_some_and(|b| iat < *b)).unwrap_or(false)
    }

    fn set(&self, user: &str, before: Option<u64>) {
        if let Ok(mut m) = self.before.write() {
            match before {
                Some(b) => {
                    m.insert(user.to_owned(), b);
                }
                None => {
                    m.remove(user);
                }
            }
        }
    }
}

/// Follows KV `revocations` (its history first), forever, reconnecting after errors.
pub fn spawn_watch(
    js: async_nats::jetstream::Context,
    revocations: Arc<Revocations>,
    exec_tx: Vec<flume::Sender<ExecEvent>>,
) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = watch(&js, &revocations, &exec_tx).await {
                tracing::warn!(error = %format!("{e:#}"), "revocation watch failed; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

async fn watch(
    js: &async_nats::jetstream::Context,
    revocations: &Revocations,
    exec_tx: &[flume::Sender<ExecEvent>],
) -> anyhow::Result<()> {
    let kv = js.get_key_value(subjects::REVOCATIONS_BUCKET).await?;
    let mut entries = kv.watch_with_history(">").await?;
    while let Some(entry) = entries.next().await {
        let entry = entry?;
        match entry.operation {
            async_nats::jetstream::kv::Operation::Put => {
                let Ok(r) = serde_json::from_slice::<Revocation>(&entry.value) else {
                    tracing::warn!(key = %entry.key, "unreadable revocation ignored");
                    continue;
                };
                revocations.set(&entry.key, Some(r.before));
                if let Ok(user) = UserId::parse(&entry.key) {
                    for tx in exec_tx {
                        let _ = tx.send(ExecEvent::Revoke { user: user.clone(), before: r.before });
                    }
                }
            }
            _ => revocations.set(&entry.key, None),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_issued_before_are_revoked() {
        let r = Revocations::default();
        assert!(!r.is_revoked("a", 5));
        r.set("a", Some(10));
        assert!(r.is_revoked("a", 9));
        assert!(!r.is_revoked("a", 10));
        assert!(!r.is_revoked("b", 1));
        r.set("a", None);
        assert!(!r.is_revoked("a", 1));
    }
}
