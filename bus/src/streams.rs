//! The streams and buckets of the system. `storage` creates or updates them at start
//! ([`provision`]); the other services wait until they exist ([`wait_ready`]).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream};
use protocol::subjects;

/// Settings of the provisioned streams, from the storage service's config.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// JetStream replicas: 1 on a single server, 3 in a cluster.
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop a retried publish.
    pub duplicate_window: Duration,
    /// How long an undelivered message waits in an inbox before it is dropped.
    pub inbox_max_age: Duration,
    /// How long a device that stopped acknowledging keeps holding messages in its user's inbox.
    pub cursor_max_age: Duration,
    /// How long group stream entries are kept after fan-out (for replays and investigation).
    pub group_max_age: Duration,
    /// How long group receipt events are kept (storage rebuilds its aggregates from them).
    pub receipts_max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            inbox_max_age: Duration::from_secs(30 * 24 * 3600),
            cursor_max_age: Duration::from_secs(30 * 24 * 3600),
            group_max_age: Duration::from_secs(24 * 3600),
            receipts_max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// `INBOX`: every user's durable inbox on `inbox.<user>`. Each stored message is republished to
/// `live.<user>` with its stream sequence in the `Nats-Sequence` header, which is how online
/// devices get it in milliseconds.
pub fn inbox_stream(s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: subjects::INBOX_STREAM.to_owned(),
        subjects: vec![subjects::INBOX_SUBJECTS.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age: s.inbox_max_age,
        duplicate_window: s.duplicate_window,
        num_replicas: s.replicas,
        allow_direct: true,
        republish: Some(stream::Republish {
            source: subjects::INBOX_SUBJECTS.to_owned(),
            destination: format!("{}.{{{{wildcard(1)}}}}", subjects::LIVE_PREFIX),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// `cursors`: per device, the highest inbox sequence it acknowledged.
pub fn cursors_bucket(s: &StreamSettings) -> kv::Config {
    kv::Config {
        bucket: subjects::CURSORS_BUCKET.to_owned(),
        description: "per-device inbox delivery cursors (<user>.<device> -> seq)".to_owned(),
        history: 1,
        max_age: s.cursor_max_age,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

/// Creates the streams and buckets, or updates them to the configured settings.
pub async fn provision(js: &jetstream::Context, s: &StreamSettings) -> anyhow::Result<()> {
    js.create_or_update_stream(inbox_stream(s)).await.context("provisioning INBOX stream")?;
    js.create_or_update_key_value(cursors_bucket(s)).await.context("provisioning cursors bucket")?;
    Ok(())
}

/// Waits until every stream and bucket exists (created by `storage`). Logs while it waits.
pub async fn wait_ready(js: &jetstream::Context) -> anyhow::Result<()> {
    let mut logged = false;
    loop {
        let mut missing = Vec::new();
        for stream in [subjects::INBOX_STREAM, subjects::GROUPS_STREAM, subjects::RECEIPTS_STREAM] {
            if js.get_stream(stream).await.is_err() {
                missing.push(stream);
            }
        }
        for bucket in [subjects::CURSORS_BUCKET, subjects::GROUPS_BUCKET, subjects::MEMBERSHIPS_BUCKET] {
            if js.get_key_value(bucket).await.is_err() {
                missing.push(bucket);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if !logged {
            tracing::info!(?missing, "waiting for storage to provision the streams");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
