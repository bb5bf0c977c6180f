//! Shared pieces of the router's system tests: a router process, group requests over NATS,
//! posting as a gateway would, reading the group timeline and the inboxes, and the oracle that
//! says what every inbox must hold.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream;
use protocol::groups::{GroupEntry, GroupOp, GroupReply, GroupRequest, GroupState};
use protocol::item::InboxItem;
use protocol::{subjects, UserId};
use testkit::{NatsServer, Storage};

/// How long a test waits for the fan-out to finish (debug builds on 2 busy cores).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(240);

pub use testkit::Router;

/// nats-server, storage (which provisions the streams), and a client.
pub struct Env {
    pub storage: Storage,
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

impl Env {
    pub async fn start() -> Env {
        let nats = NatsServer::start_from_env().await;
        let storage = Storage::start_on(&nats, &[]).await;
        let client = nats.client().await;
        let js = jetstream::new(client.clone());
        Env { storage, nats, client, js }
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// One request to the membership service.
    pub async fn raw_op(&self, payload: Vec<u8>) -> GroupReply {
        let msg = self.client.request(subjects::GROUP_SERVICE, payload.into()).await.expect("group request");
        serde_json::from_slice(&msg.payload).expect("reply is a GroupReply")
    }

    pub async fn op(&self, by: &str, op: GroupOp) -> GroupReply {
        self.raw_op(serde_json::to_vec(&GroupRequest { by: by.into(), op }).unwrap()).await
    }

    /// `op`, which must answer `group`.
    pub async fn group_op(&self, by: &str, op: GroupOp) -> GroupState {
        match self.op(by, op.clone()).await {
            GroupReply::Group { group } => group,
            other => panic!("{by} {op:?}: {other:?}"),
        }
    }

    pub async fn create(&self, by: &str, name: &str, members: &[String]) -> GroupState {
        self.group_op(by, GroupOp::Create { name: name.into(), members: members.to_vec() }).await
    }

    /// Publishes a post to `group.<gid>` as a gateway does; returns its sid.
    pub async fn post(&self, gid: &str, from: &str, id: &str) -> u64 {
        post(&self.js, gid, from, id).await
    }

    pub async fn inbox_messages(&self) -> u64 {
        let mut s = self.js.get_stream(subjects::INBOX_STREAM).await.unwrap();
        s.info().await.unwrap().state.messages
    }
}

pub async fn post(js: &jetstream::Context, gid: &str, from: &str, id: &str) -> u64 {
    let entry = GroupEntry::Post {
        from: from.into(),
        dev: "d1".into(),
        id: id.into(),
        body: format!("body of {id} from {from}"),
        media: None,
        ts: protocol::now_ms(),
    };
    let publish = jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&entry).unwrap().into())
        .message_id(format!("g|{from}|d1|{id}"));
    js.send_publish(format!("group.{gid}"), publish).await.unwrap().await.unwrap().sequence
}

pub fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// One entry of a group's timeline.
#[derive(Debug, Clone)]
pub struct TimelineEntry {
    pub sid: u64,
    pub subject: String,
    pub entry: GroupEntry,
}

/// Every entry of the GROUPS stream for `gid`, in stream order.
pub async fn timeline(js: &jetstream::Context, gid: &str) -> Vec<TimelineEntry> {
    let mut stream = js.get_stream(subjects::GROUPS_STREAM).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else { continue };
        if m.subject.as_str().rsplit('.').next() == Some(gid) {
            out.push(TimelineEntry {
                sid: seq,
                subject: m.subject.to_string(),
                entry: serde_json::from_slice(&m.payload).unwrap(),
            });
        }
    }
    out
}

/// What every user's inbox must hold for this group, in order: the sids of the events they see
/// (members of the state after the event, and the users it concerns) and of the posts sent
/// while they were members (except their own). Posts from non-members reach no one.
pub fn expected(timeline: &[TimelineEntry]) -> BTreeMap<String, Vec<u64>> {
    let mut members: Vec<String> = Vec::new();
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for t in timeline {
        match &t.entry {
            GroupEntry::Event { members: concerned, state, .. } => {
                members = state.clone();
                let to: BTreeSet<&String> = state.iter().chain(concerned.iter()).collect();
                for u in to {
                    out.entry(u.clone()).or_default().push(t.sid);
                }
            }
            GroupEntry::Post { from, .. } => {
                if members.contains(from) {
                    for u in members.iter().filter(|m| *m != from) {
                        out.entry(u.clone()).or_default().push(t.sid);
                    }
                }
            }
        }
    }
    out
}

/// One stored inbox item.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub item: InboxItem,
}

/// Everything in `inbox.<user>`, oldest first.
pub async fn inbox(client: &async_nats::Client, user: &str) -> Vec<Stored> {
    let uid = UserId::parse(user).unwrap();
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let batch = bus::inbox::fetch_after(client, &uid, after, 256).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        for s in batch {
            after = s.seq;
            out.push(Stored { seq: s.seq, item: InboxItem::from_bytes(&s.payload).unwrap() });
        }
    }
}

/// The sids of `gid`'s items in `user`'s inbox, in inbox order.
pub fn group_sids(items: &[Stored], gid: &str) -> Vec<u64> {
    items
        .iter()
        .filter_map(|s| match &s.item {
            InboxItem::Group { group, sid, .. } | InboxItem::GroupEvent { group, sid, .. } if group == gid => {
                Some(*sid)
            }
            _ => None,
        })
        .collect()
}

/// Waits until the INBOX stream holds `total` messages (the fan-out is done), then compares
/// every user's inbox with `expected` per group: every item exactly once, in timeline order.
pub async fn verify(env: &Env, expected: &BTreeMap<String, BTreeMap<String, Vec<u64>>>, total: u64) {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let n = env.inbox_messages().await;
        if n >= total || tokio::time::Instant::now() >= deadline {
            assert_eq!(n, total, "INBOX holds {n} messages, expected {total}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Users by inbox, read once each.
    let mut per_user: HashMap<String, Vec<Stored>> = HashMap::new();
    for per_group in expected.values() {
        for u in per_group.keys() {
            if !per_user.contains_key(u) {
                per_user.insert(u.clone(), inbox(&env.client, u).await);
            }
        }
    }
    for (gid, per_group) in expected {
        for (u, sids) in per_group {
            let got = group_sids(&per_user[u], gid);
            assert_eq!(&got, sids, "inbox of {u} for group {gid}");
        }
    }
}

/// The total number of inbox copies `expected` describes.
pub fn total(expected: &BTreeMap<String, BTreeMap<String, Vec<u64>>>) -> u64 {
    expected.values().flat_map(|g| g.values()).map(|v| v.len() as u64).sum()
}
