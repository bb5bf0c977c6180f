//! Presence: online / last seen without presence storms.
//!
//! * A user is online while any of its devices holds a connection. Each gateway records, per
//!   user it holds, one KV entry `presence/<user>.<gateway>` when the user's first connection on
//!   it opens and when its last one closes (never per heartbeat).
//! * Liveness is per gateway: every gateway writes its beat to KV `gateways` every few seconds.
//!   A record claiming "online" on a gateway whose beat is older than the timeout is read as
//!   offline since that beat, so a crashed gateway cannot leave its users online; one surviving
//!   gateway then reaps it (rewrites those records, announces the changes, removes the beat).
//! * A dead client is caught by the connection heartbeat timeout and closes like any other.
//! * Presence is pulled (`presence` query) or pushed only to connections that asked for those
//!   users (`presence_sub`, a chat that is open): a change is announced on the core subject
//!   `presence.<user>`, and only gateways with a watcher of that user subscribe to it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::stream::{AbortHandle, Abortable, SelectAll};
use futures::StreamExt;
use fxhash::FxHashMap;
use protocol::groups::{GatewayBeat, PresenceRecord};
use protocol::{subjects, PresenceView, ServerFrame, UserId};
use tokio::sync::mpsc;

use crate::bridge::ExecEvent;
use crate::metrics::Metrics;

pub enum PresenceCmd {
    /// The user's first connection on this gateway opened.
    Online(UserId),
    /// The user's last connection on this gateway closed.
    Offline(UserId),
    Query {
        users: Vec<UserId>,
        reply: oneshot::Sender<Vec<PresenceView>>,
    },
    Watch {
        user: UserId,
        exec: usize,
    },
    Unwatch {
        user: UserId,
        exec: usize,
    },
}

/// Combines a user's per-gateway records into one view. Pure: `beats` are the gateways' last
/// heartbeats, `now` and `timeout` in ms.
pub fn combine(
    user: &str,
    records: &[(String, PresenceRecord)],
    beats: &FxHashMap<String, u64>,
    me: &str,
    now: u64,
    timeout: u64,
) -> PresenceView {
    let mut online = false;
    let mut last_seen: Option<u64> = None;
    for (gw, rec) in records {
        let alive = gw == me || beats.get(gw).is_some_and(|b| now.saturating_sub(*b) < timeout);
        let seen = if rec.online && alive {
            online = true;
            now
        } else if rec.online {
            // Online on a dead gateway: last seen when that gateway last beat.
            beats.get(gw).copied().unwrap_or(rec.at)
        } else {
            rec.at
        };
        last_seen = Some(last_seen.map_or(seen, |l| l.max(seen)));
    }
    PresenceView { user: user.to_owned(), online, last_seen: if online { None } else { last_seen } }
}

/// Announcements of presence changes of one watched user, tagged with the user.
type ChangeStream = Abortable<futures::stream::Map<async_nats::Subscriber, fn(async_nats::Message) -> String>>;

struct Watch {
    execs: Vec<(usize, u32)>,
    abort: AbortHandle,
}

pub fn spawn(
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    gateway_id: String,
    exec_tx: Vec<flume::Sender<ExecEvent>>,
    metrics: Arc<Metrics>,
    beat_every: Duration,
    timeout: Duration,
) -> mpsc::UnboundedSender<PresenceCmd> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        if let Err(e) = run(client, js, gateway_id, exec_tx, metrics, beat_every, timeout, rx).await {
            tracing::error!(error = %format!("{e:#}"), "presence stopped");
        }
    });
    tx
}

#[allow(clippy::too_many_arguments)]
async fn run(
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    me: String,
    exec_tx: Vec<flume::Sender<ExecEvent>>,
    metrics: Arc<Metrics>,
    beat_every: Duration,
    timeout: Duration,
    mut cmds: mpsc::UnboundedReceiver<PresenceCmd>,
) -> anyhow::Result<()> {
    let records = js.get_key_value(subjects::PRESENCE_BUCKET).await?;
    let gateways = js.get_key_value(subjects::GATEWAYS_BUCKET).await?;
    let timeout_ms = timeout.as_millis() as u64;
    // A gateway restarting under the same id first reaps what its previous life left online.
    if let Ok(Some(old)) = gateways.get(&me).await {
        let at = serde_json::from_slice::<GatewayBeat>(&old).map(|b| b.at).unwrap_or_else(|_| protocol::now_ms());
        reap(&client, &records, &me, at).await;
    }
    beat(&gateways, &me).await;
    let mut beats: FxHashMap<String, u64> = FxHashMap::default();
    let mut beat_tick = tokio::time::interval(beat_every);
    let mut watches: FxHashMap<UserId, Watch> = FxHashMap::default();
    let mut changes: SelectAll<ChangeStream> = SelectAll::new();
    let (view_tx, mut views) = mpsc::unbounded_channel::<PresenceView>();

    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    PresenceCmd::Online(user) => announce(&client, &records, &me, &user, true).await,
                    PresenceCmd::Offline(user) => announce(&client, &records, &me, &user, false).await,
                    PresenceCmd::Query { users, reply } => {
                        let (client, beats, me) = (client.clone(), beats.clone(), me.clone());
                        tokio::spawn(async move {
                            let mut out = Vec::with_capacity(users.len());
                            for u in users {
                                out.push(query(&client, &beats, &me, u.as_str(), timeout_ms).await);
                            }
                            let _ = reply.send(out);
                        });
                    }
                    PresenceCmd::Watch { user, exec } => {
                        if let Some(w) = watches.get_mut(&user) {
                            match w.execs.iter_mut().find(|(e, _)| *e == exec) {
                                Some((_, n)) => *n += 1,
                                None => w.execs.push((exec, 1)),
                            }
                            continue;
                        }
                        match client.subscribe(subjects::presence_changed(user.as_str())).await {
                            Ok(sub) => {
                                let (abort, reg) = AbortHandle::new_pair();
                                let subject_user: fn(async_nats::Message) -> String =
                                    |m| subjects::user_of(m.subject.as_str()).unwrap_or_default().to_owned();
                                changes.push(Abortable::new(sub.map(subject_user), reg));
                                watches.insert(user, Watch { execs: vec![(exec, 1)], abort });
                            }
                            Err(e) => tracing::warn!(error = %e, "presence subscribe failed"),
                        }
                    }
                    PresenceCmd::Unwatch { user, exec } => {
                        let Some(w) = watches.get_mut(&user) else { continue };
                        if let Some(pos) = w.execs.iter().position(|(e, _)| *e == exec) {
                            w.execs[pos].1 -= 1;
                            if w.execs[pos].1 == 0 {
                                w.execs.swap_remove(pos);
                            }
                        }
                        if w.execs.is_empty() {
                            w.abort.abort();
                            watches.remove(&user);
                        }
                    }
                }
            }
            Some(user) = changes.next(), if !changes.is_empty() => {
                // A change was announced: read the user's presence again and push it.
                let (client, beats, me, view_tx) = (client.clone(), beats.clone(), me.clone(), view_tx.clone());
                tokio::spawn(async move {
                    let _ = view_tx.send(query(&client, &beats, &me, &user, timeout_ms).await);
                });
            }
            Some(view) = views.recv() => {
                let Ok(user) = UserId::parse(&view.user) else { continue };
                let Some(w) = watches.get(&user) else { continue };
                metrics.presence_pushes.inc();
                let frame: Bytes = ServerFrame::Presence { id: None, users: std::slice::from_ref(&view) }.to_json().into();
                for (exec, _) in &w.execs {
                    let _ = exec_tx[*exec].send(ExecEvent::Ephemeral { user: user.clone(), frame: frame.clone(), presence: true });
                }
            }
            _ = beat_tick.tick() => {
                beat(&gateways, &me).await;
                beats = load_beats(&client).await.unwrap_or(beats);
                let now = protocol::now_ms();
                for (gw, at) in beats.iter() {
                    if gw != &me && now.saturating_sub(*at) >= timeout_ms {
                        claim_and_reap(&client, &records, &gateways, gw, *at).await;
                    }
                }
            }
        }
    }
    Ok(())
}

async fn beat(gateways: &async_nats::jetstream::kv::Store, me: &str) {
    let v = serde_json::to_vec(&GatewayBeat { at: protocol::now_ms() }).expect("beat serialises");
    if let Err(e) = gateways.put(me, v.into()).await {
        tracing::warn!(error = %e, "gateway heartbeat failed");
    }
}

async fn load_beats(client: &async_nats::Client) -> anyhow::Result<FxHashMap<String, u64>> {
    let beats = bus::inbox::kv_last_values(client, subjects::GATEWAYS_BUCKET, "*", 100_000).await?;
    Ok(beats.into_iter().filter_map(|(gw, v)| Some((gw, serde_json::from_slice::<GatewayBeat>(&v).ok()?.at))).collect())
}

async fn announce(
    client: &async_nats::Client,
    records: &async_nats::jetstream::kv::Store,
    me: &str,
    user: &UserId,
    online: bool,
) {
    let rec = PresenceRecord { online, at: protocol::now_ms() };
    let v = serde_json::to_vec(&rec).expect("record serialises");
    if let Err(e) = records.put(subjects::presence_key(user.as_str(), me), v.into()).await {
        tracing::warn!(error = %e, "presence write failed");
        return;
    }
    let _ = client.publish(subjects::presence_changed(user.as_str()), Bytes::new()).await;
}

async fn query(
    client: &async_nats::Client,
    beats: &FxHashMap<String, u64>,
    me: &str,
    user: &str,
    timeout_ms: u64,
) -> PresenceView {
    let recs = bus::inbox::kv_last_values(client, subjects::PRESENCE_BUCKET, &format!("{user}.*"), 256)
        .await
        .unwrap_or_default();
    let parsed: Vec<(String, PresenceRecord)> = recs
        .into_iter()
        .filter_map(|(k, v)| {
            let gw = k.split_once('.')?.1.to_owned();
            Some((gw, serde_json::from_slice(&v).ok()?))
        })
        .collect();
    // A gateway that started since the beats were last loaded is unknown here, not dead: read
    // the beats again before judging its records.
    let unknown = parsed.iter().any(|(gw, _)| gw != me && !beats.contains_key(gw));
    if unknown {
        if let Ok(fresh) = load_beats(client).await {
            return combine(user, &parsed, &fresh, me, protocol::now_ms(), timeout_ms);
        }
    }
    combine(user, &parsed, beats, me, protocol::now_ms(), timeout_ms)
}

/// Takes the job of reaping a dead gateway: only the gateway whose compare-and-set on the beat
/// succeeds does it, so it happens once.
async fn claim_and_reap(
    client: &async_nats::Client,
    records: &async_nats::jetstream::kv::Store,
    gateways: &async_nats::jetstream::kv::Store,
    gw: &str,
    at: u64,
) {
    let Ok(Some(entry)) = gateways.entry(gw).await else { return };
    if gateways.delete_expect_revision(gw, Some(entry.revision)).await.is_err() {
        return;
    }
    tracing::info!(gateway = gw, "reaping a dead gateway's presence");
    reap(client, records, gw, at).await;
}

/// Marks every user a gateway held as offline since `at` and announces it.
async fn reap(client: &async_nats::Client, records: &async_nats::jetstream::kv::Store, gw: &str, at: u64) {
    let Ok(recs) = bus::inbox::kv_last_values(client, subjects::PRESENCE_BUCKET, &format!("*.{gw}"), 1_000_000).await
    else {
        return;
    };
    for (key, v) in recs {
        let Ok(rec) = serde_json::from_slice::<PresenceRecord>(&v) else { continue };
        if !rec.online {
            continue;
        }
        let Some((user, _)) = key.split_once('.') else { continue };
        let off = serde_json::to_vec(&PresenceRecord { online: false, at }).expect("record serialises");
        if records.put(&key, off.into()).await.is_ok() {
            let _ = client.publish(subjects::presence_changed(user), Bytes::new()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(online: bool, at: u64) -> PresenceRecord {
        PresenceRecord { online, at }
    }

    #[test]
    fn online_anywhere_alive_means_online() {
        let beats: FxHashMap<String, u64> = [("g1".to_owned(), 990), ("g2".to_owned(), 10)].into_iter().collect();
        let v = combine("u", &[("g1".into(), rec(true, 5)), ("g2".into(), rec(false, 7))], &beats, "me", 1000, 30);
        assert!(v.online);
        assert_eq!(v.last_seen, None);
    }

    #[test]
    fn online_on_a_dead_gateway_is_offline_since_its_last_beat() {
        let beats: FxHashMap<String, u64> = [("g1".to_owned(), 500)].into_iter().collect();
        let v = combine("u", &[("g1".into(), rec(true, 100))], &beats, "me", 1000, 30);
        assert!(!v.online);
        assert_eq!(v.last_seen, Some(500));
    }

    #[test]
    fn last_seen_is_the_latest_and_own_gateway_is_alive() {
        let beats = FxHashMap::default();
        let v = combine("u", &[("a".into(), rec(false, 100)), ("b".into(), rec(false, 300))], &beats, "me", 1000, 30);
        assert_eq!((v.online, v.last_seen), (false, Some(300)));
        let v = combine("u", &[("me".into(), rec(true, 1))], &beats, "me", 1000, 30);
        assert!(v.online);
        let v = combine("u", &[], &beats, "me", 1000, 30);
        assert_eq!((v.online, v.last_seen), (false, None));
    }
}
