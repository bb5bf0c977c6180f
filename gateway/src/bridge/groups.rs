//! The gateway's view of group membership, for checking sends, typing and who-read queries:
//! a bounded cache of member lists read from KV `groups`, refreshed by a watch of the bucket,
//! with commands for a group queued in arrival order while its state loads.

use super::*;
use futures::StreamExt as _;

/// How long a group's membership, read from KV `groups`, is trusted for checking sends. Every
/// change to the bucket is also pushed to the gateway (a watch of KV `groups`) and applied to
/// cached groups at once — the router writes KV before it records the membership event, so a
/// member who has seen its `added` event is already known here. The time limit only bounds
/// staleness while that watch is down. The router re-checks every post at its exact position in
/// the group timeline, so a stale cache can never make a non-member's message reach anyone.
pub(super) const GROUP_CACHE_TTL: Duration = Duration::from_secs(30);

/// Groups whose membership a gateway keeps in memory.
pub(super) const GROUP_CACHE_MAX: usize = 100_000;

pub(super) struct CachedGroup {
    members: Vec<String>,
    loaded: Instant,
}

/// Group commands waiting for the group's state to be loaded, in arrival order.
pub(super) enum GroupWait {
    Typing {
        from: UserId,
    },
    Publish {
        sender: UserId,
        msg_id: String,
        payload: Bytes,
        mirrors: Vec<Mirror>,
        reply: oneshot::Sender<Result<Stored, PublishFailure>>,
    },
    Check {
        user: UserId,
        reply: oneshot::Sender<Result<(), PublishFailure>>,
    },
}

pub(super) fn member_check(members: Option<&[String]>, user: &str) -> Result<(), PublishFailure> {
    match members {
        None => Err(PublishFailure::NotFound),
        Some(m) if m.iter().any(|u| u == user) => Ok(()),
        Some(_) => Err(PublishFailure::Forbidden),
    }
}

/// Runs a group command now if the group's membership is cached and fresh, otherwise queues it
/// behind a load of the group's state (one load per group at a time). Commands of one group run
/// in arrival order either way, so a connection's group messages keep their order.
#[allow(clippy::too_many_arguments)]
pub(super) async fn group_command(
    js: &jetstream::Context,
    client: &async_nats::Client,
    metrics: &Arc<Metrics>,
    kv: &jetstream::kv::Store,
    int_tx: &tokio::sync::mpsc::UnboundedSender<Internal>,
    groups: &mut FxHashMap<String, CachedGroup>,
    waits: &mut FxHashMap<String, Vec<GroupWait>>,
    gid: String,
    wait: GroupWait,
) {
    if let Some(queue) = waits.get_mut(&gid) {
        queue.push(wait);
        return;
    }
    if let Some(g) = groups.get(&gid).filter(|g| g.loaded.elapsed() < GROUP_CACHE_TTL) {
        run_group_wait(js, client, metrics, &gid, Ok(Some(&g.members)), wait).await;
        return;
    }
    waits.insert(gid.clone(), vec![wait]);
    let (kv, int_tx) = (kv.clone(), int_tx.clone());
    tokio::spawn(async move {
        let res = match kv.get(&gid).await {
            Ok(None) => Ok(None),
            Ok(Some(v)) => match serde_json::from_slice::<GroupState>(&v) {
                Ok(s) => Ok(Some(s)),
                Err(e) => {
                    tracing::warn!(error = %e, group = %gid, "unreadable group state");
                    Err(())
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "group state read failed");
                Err(())
            }
        };
        let _ = int_tx.send(Internal::GroupLoaded(gid, res));
    });
}

pub(super) fn cache_group(groups: &mut FxHashMap<String, CachedGroup>, gid: String, members: Vec<String>) {
    if groups.len() >= GROUP_CACHE_MAX && !groups.contains_key(&gid) {
        // Evict stale entries first; if none, an arbitrary one (it is reloaded on demand).
        groups.retain(|_, g| g.loaded.elapsed() < GROUP_CACHE_TTL);
        if groups.len() >= GROUP_CACHE_MAX {
            if let Some(k) = groups.keys().next().cloned() {
                groups.remove(&k);
            }
        }
    }
    groups.insert(gid, CachedGroup { members, loaded: Instant::now() });
}

/// Follows KV `groups` (new changes only), forever, so cached memberships change when the
/// router changes them rather than when the cache entry expires.
pub(super) fn spawn_group_watch(kv: jetstream::kv::Store, int_tx: tokio::sync::mpsc::UnboundedSender<Internal>) {
    tokio::spawn(async move {
        loop {
            match kv.watch(">").await {
                Ok(mut changes) => {
                    while let Some(change) = changes.next().await {
                        let Ok(entry) = change else { break };
                        let state = match entry.operation {
                            jetstream::kv::Operation::Put => serde_json::from_slice::<GroupState>(&entry.value).ok(),
                            _ => None,
                        };
                        if int_tx.send(Internal::GroupUpdated(entry.key, state)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "group watch failed; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// Runs a group command against the group's members (`Ok(None)`: no such group).
pub(super) async fn run_group_wait(
    js: &jetstream::Context,
    client: &async_nats::Client,
    metrics: &Arc<Metrics>,
    gid: &str,
    members: Result<Option<&[String]>, PublishFailure>,
    wait: GroupWait,
) {
    let verdict = |user: &str| members.and_then(|m| member_check(m, user));
    match wait {
        GroupWait::Publish { sender, msg_id, payload, mirrors, reply } => match verdict(sender.as_str()) {
            Ok(()) => publish(js, metrics, format!("group.{gid}"), msg_id, payload, mirrors, false, reply).await,
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        GroupWait::Check { user, reply } => {
            let _ = reply.send(verdict(user.as_str()));
        }
        GroupWait::Typing { from } => {
            if verdict(from.as_str()).is_err() {
                return;
            }
            metrics.typing_events.inc();
            let frame = ServerFrame::Typing { from: from.as_str(), group: Some(gid) }.to_json();
            for m in members.ok().flatten().unwrap_or_default() {
                if m != from.as_str() {
                    if let Ok(to) = UserId::parse(m) {
                        publish_ephemeral(client, &to, frame.clone()).await;
                    }
                }
            }
        }
    }
}
