//! The small KV reads and writes of the bridge: device cursors and user settings.

use super::*;

pub(super) async fn open_cursor(kv: &jetstream::kv::Store, user: &UserId, device: &DeviceId) -> anyhow::Result<u64> {
    let key = subjects::cursor_key(user, device);
    for _ in 0..3 {
        if let Some(v) = kv.get(&key).await? {
            return Ok(super::open::parse_cursor(&v));
        }
        // Register the device so that storage keeps the inbox until this device has it. A
        // concurrent connection of the same device may create it first: then read it again.
        if kv.create(&key, Bytes::from_static(b"0")).await.is_ok() {
            return Ok(0);
        }
    }
    anyhow::bail!("could not read or create the cursor {key}")
}

pub(super) fn spawn_cursor_put(
    kv: &jetstream::kv::Store,
    metrics: &Arc<Metrics>,
    (user, device): (UserId, DeviceId),
    seq: u64,
) {
    let (kv, metrics) = (kv.clone(), metrics.clone());
    tokio::spawn(async move {
        let key = subjects::cursor_key(&user, &device);
        match kv.put(&key, seq.to_string().into()).await {
            Ok(_) => {
                metrics.cursor_writes.inc();
            }
            // A lost cursor write only means redelivery (deduplicated by clients) later.
            Err(e) => tracing::warn!(error = %e, "cursor write failed"),
        }
    });
}

/// Reads a user's settings, after changing its history retention when asked.
pub(super) async fn settings(
    kv: &jetstream::kv::Store,
    user: &UserId,
    history_days: Option<u32>,
) -> Result<UserSettings, PublishFailure> {
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "settings unavailable");
        PublishFailure::Unavailable
    };
    if let Some(days) = history_days {
        let s = UserSettings { history_days: days };
        let v = serde_json::to_vec(&s).expect("settings serialise");
        kv.put(user.as_str(), v.into()).await.map_err(|e| unavailable(&e))?;
        return Ok(s);
    }
    match kv.get(user.as_str()).await.map_err(|e| unavailable(&e))? {
        Some(v) => Ok(serde_json::from_slice(&v).unwrap_or_default()),
        None => Ok(UserSettings::default()),
    }
}
