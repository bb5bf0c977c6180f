//! The streams and buckets of the system. `storage` creates or updates them at start
//! ([`provision`]); the other services wait until they exist ([`wait_ready`]).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream};
use protocol::subjects;

/// The streams `storage` provisions (besides the buckets' streams).
pub const STREAMS: [&str; 4] =
    [subjects::INBOX_STREAM, subjects::GROUPS_STREAM, subjects::RECEIPTS_STREAM, subjects::HISTORY_STREAM];

/// The KV buckets `storage` provisions. Each is stored in a stream named [`kv_stream`].
pub const BUCKETS: [&str; 7] = [
    subjects::CURSORS_BUCKET,
    subjects::GROUPS_BUCKET,
    subjects::MEMBERSHIPS_BUCKET,
    subjects::PRESENCE_BUCKET,
    subjects::GATEWAYS_BUCKET,
    subjects::REVOCATIONS_BUCKET,
    subjects::SETTINGS_BUCKET,
];

/// The stream that holds KV bucket `bucket`.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Every stream of the system: [`STREAMS`] and the buckets' streams.
pub fn all_stream_names() -> Vec<String> {
    STREAMS.iter().map(|s| s.to_string()).chain(BUCKETS.iter().map(|b| kv_stream(b))).collect()
}

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
    /// How long a revocation is kept: at least the longest token lifetime.
    pub revocation_max_age: Duration,
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
            revocation_max_age: Duration::from_secs(30 * 24 * 3600),
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

/// `GROUPS`: group sends and membership events on `group.<gid>`, stored as
/// `group.<partition>.<gid>` so that router instances can split partitions between them while
/// each group's entries stay in one partition, in order.
pub fn groups_stream(s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: subjects::GROUPS_STREAM.to_owned(),
        subjects: vec![subjects::GROUP_SUBJECTS.to_owned()],
        subject_transform: Some(stream::SubjectTransform {
            source: subjects::GROUP_SUBJECTS.to_owned(),
            destination: format!("group.{{{{partition({},1)}}}}.{{{{wildcard(1)}}}}", subjects::GROUP_PARTITIONS),
        }),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: s.group_max_age,
        duplicate_window: s.duplicate_window,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

/// `HISTORY`: opted-in users' copies of their conversations, each with a per-message TTL (the
/// user's retention), under a 90-day ceiling.
pub fn history_stream(s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: subjects::HISTORY_STREAM.to_owned(),
        subjects: vec![subjects::HISTORY_SUBJECTS.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(u64::from(subjects::MAX_HISTORY_DAYS) * 24 * 3600),
        allow_message_ttl: true,
        allow_direct: true,
        duplicate_window: s.duplicate_window,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

/// `RECEIPTS`: group receipt events on `receipts.<gid>`, aggregated by storage.
pub fn receipts_stream(s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: subjects::RECEIPTS_STREAM.to_owned(),
        subjects: vec![subjects::RECEIPT_SUBJECTS.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: s.receipts_max_age,
        duplicate_window: s.duplicate_window,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

fn bucket(s: &StreamSettings, name: &str, description: &str, max_age: Duration) -> kv::Config {
    kv::Config {
        bucket: name.to_owned(),
        description: description.to_owned(),
        history: 1,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        ..Default::default()
    }
}

/// The buckets beside the cursors: group state by group id, each user's groups, presence per
/// `<user>.<gateway>` (kept as long as last seen matters), and gateway heartbeats (a dead
/// gateway's beat is removed by the gateway that reaps it).
pub fn other_buckets(s: &StreamSettings) -> [kv::Config; 6] {
    [
        bucket(s, subjects::GROUPS_BUCKET, "group state by group id (JSON GroupState)", Duration::ZERO),
        bucket(s, subjects::MEMBERSHIPS_BUCKET, "group ids by user id (JSON list)", Duration::ZERO),
        bucket(s, subjects::PRESENCE_BUCKET, "presence by <user>.<gateway> (JSON PresenceRecord)", s.cursor_max_age),
        bucket(s, subjects::GATEWAYS_BUCKET, "gateway heartbeats (JSON GatewayBeat)", Duration::ZERO),
        bucket(s, subjects::REVOCATIONS_BUCKET, "session revocations by user (JSON Revocation)", s.revocation_max_age),
        bucket(s, subjects::SETTINGS_BUCKET, "user settings by user id (JSON UserSettings)", Duration::ZERO),
    ]
}

/// Creates the streams and buckets, or updates them to the configured settings.
pub async fn provision(js: &jetstream::Context, s: &StreamSettings) -> anyhow::Result<()> {
    js.create_or_update_stream(inbox_stream(s)).await.context("provisioning INBOX stream")?;
    js.create_or_update_stream(groups_stream(s)).await.context("provisioning GROUPS stream")?;
    js.create_or_update_stream(receipts_stream(s)).await.context("provisioning RECEIPTS stream")?;
    js.create_or_update_stream(history_stream(s)).await.context("provisioning HISTORY stream")?;
    js.create_or_update_key_value(cursors_bucket(s)).await.context("provisioning cursors bucket")?;
    for b in other_buckets(s) {
        let name = b.bucket.clone();
        js.create_or_update_key_value(b).await.with_context(|| format!("provisioning {name} bucket"))?;
    }
    Ok(())
}

/// Waits until every stream and bucket exists (created by `storage`). Logs while it waits.
pub async fn wait_ready(js: &jetstream::Context) -> anyhow::Result<()> {
    let mut logged = false;
    loop {
        let mut missing = Vec::new();
        for stream in STREAMS {
            if js.get_stream(stream).await.is_err() {
                missing.push(stream);
            }
        }
        for bucket in BUCKETS {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream lists (which the NATS permissions are generated from) name exactly what
    /// [`provision`] creates.
    #[test]
    fn the_lists_name_every_provisioned_stream() {
        let s = StreamSettings::default();
        let mut provisioned: Vec<String> =
            [inbox_stream(&s), groups_stream(&s), receipts_stream(&s), history_stream(&s)].map(|c| c.name).into();
        provisioned.push(kv_stream(&cursors_bucket(&s).bucket));
        provisioned.extend(other_buckets(&s).map(|b| kv_stream(&b.bucket)));
        provisioned.sort();
        let mut listed = all_stream_names();
        listed.sort();
        assert_eq!(listed, provisioned);
    }
}
