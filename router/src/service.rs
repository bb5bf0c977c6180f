//! The membership service: requests on `svc.groups` (queue group `router`, so any number of
//! router instances share them), answered after the change is stored and recorded.
//!
//! A change is: read the group from KV `groups`, apply the rules ([`crate::membership`]), write
//! it back with compare-and-set on the revision read (retried on a conflict, so concurrent ops on
//! one group from several instances serialise in KV), update the `memberships` entry of every
//! user who joined or left (compare-and-set too), then publish the membership event to the
//! group's timeline (`group.<gid>`, `Nats-Msg-Id` `ev|<gid>|<revision>`) and wait for its PubAck,
//! then reply.
//!
//! Crash windows: a router killed after the KV write but before the event is published leaves
//! the timeline without that event; the fan-out then works with the previous member list until
//! the next change of the group, whose event carries the whole member list again. A repeated
//! add/remove that finds nothing to change still repairs the `memberships` entries it concerns.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, message::PublishMessage};
use bytes::Bytes;
use futures::StreamExt as _;
use protocol::groups::{GroupEntry, GroupOp, GroupReply, GroupRequest, GroupState, GroupSummary};
use protocol::{subjects, ErrorCode, GroupId};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::membership::{self, Ctx, Event, OpError, Outcome};
use crate::metrics::Metrics;
use crate::plan::event_msg_id;

/// Compare-and-set attempts before answering `unavailable`.
const CAS_ATTEMPTS: usize = 8;
/// Requests handled at once by one instance.
const CONCURRENCY: usize = 256;
/// How long in-flight requests get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub struct Service {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub groups: kv::Store,
    pub memberships: kv::Store,
    pub metrics: Metrics,
    pub max_members: usize,
}

/// Subscribes to `svc.groups` in the queue group `router`; the server knows the subscription
/// when this returns.
pub async fn subscribe(client: &async_nats::Client) -> anyhow::Result<async_nats::Subscriber> {
    let sub = client.queue_subscribe(subjects::GROUP_SERVICE, "router".to_owned()).await?;
    client.flush().await?;
    tracing::info!(subject = subjects::GROUP_SERVICE, "membership service listening");
    Ok(sub)
}

/// Serves the requests of `sub` until `shutdown` turns true, then drains the subscription and
/// waits (boundedly) for the requests in flight.
pub async fn run(svc: Arc<Service>, mut sub: async_nats::Subscriber, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = JoinSet::new();
    // Set at shutdown: until then the rest of the subscription is read and answered.
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        let msg = tokio::select! {
            msg = sub.next() => msg,
            _ = shutdown.changed(), if drain_until.is_none() => {
                // Stop taking requests; the ones already delivered to us are still answered.
                let _ = sub.drain().await;
                drain_until = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                continue;
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)), if drain_until.is_some() => None,
        };
        let Some(msg) = msg else { break };
        while tasks.try_join_next().is_some() {}
        let permit = slots.clone().acquire_owned().await.expect("semaphore never closed");
        let svc = svc.clone();
        tasks.spawn(async move {
            svc.handle(msg).await;
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
}

fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadJson => "bad_json",
        ErrorCode::UnknownType => "unknown_type",
        ErrorCode::MissingField => "missing_field",
        ErrorCode::BadField => "bad_field",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::BinaryUnsupported => "binary_unsupported",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::NotFound => "not_found",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::LimitExceeded => "limit_exceeded",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Internal => "internal",
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> OpError {
    tracing::warn!(error = %e, "{what} failed");
    OpError::new(ErrorCode::Unavailable, format!("{what} failed; retry"))
}

fn to_json<T: serde::Serialize>(v: &T) -> Bytes {
    // Values built from Strings, integers and Vecs always serialise.
    serde_json::to_vec(v).expect("serialises").into()
}

/// A fresh group id: `g` and 128 random bits in hex (a valid `GroupId`).
fn new_gid() -> String {
    format!("g{:032x}", rand::random::<u128>())
}

impl Service {
    async fn handle(&self, msg: async_nats::Message) {
        let Some(reply_to) = msg.reply.clone() else {
            tracing::debug!("group request without a reply subject ignored");
            return;
        };
        let (op, reply) = match serde_json::from_slice::<GroupRequest>(&msg.payload) {
            Err(e) => ("malformed", GroupReply::Error { code: ErrorCode::BadField, msg: e.to_string() }),
            Ok(req) => {
                let op = membership::op_name(&req.op);
                let reply = self.serve(&req).await.unwrap_or_else(|e| GroupReply::Error { code: e.code, msg: e.msg });
                (op, reply)
            }
        };
        let result = match &reply {
            GroupReply::Error { code, .. } => code_label(*code),
            _ => "ok",
        };
        self.metrics.op(op, result);
        if let Err(e) = self.client.publish(reply_to, to_json(&reply)).await {
            tracing::warn!(error = %e, op, "sending a group reply failed");
        }
    }

    fn ctx<'a>(&self, gid: &'a str) -> Ctx<'a> {
        Ctx { now_ms: protocol::now_ms(), new_gid: gid, max_members: self.max_members }
    }

    /// Answers one (parsed) request.
    pub async fn serve(&self, req: &GroupRequest) -> Result<GroupReply, OpError> {
        membership::validate(req)?;
        match &req.op {
            GroupOp::List => self.list(&req.by).await,
            GroupOp::Create { .. } => self.create(req).await,
            GroupOp::Info { group } => {
                let current = self.load(group).await?;
                match membership::apply(current.as_ref().map(|(s, _)| s), req, self.ctx(group))? {
                    Outcome::Read(group) | Outcome::Unchanged(group) | Outcome::Changed { state: group, .. } => {
                        Ok(GroupReply::Group { group })
                    }
                }
            }
            GroupOp::Add { group, .. } | GroupOp::Remove { group, .. } | GroupOp::Leave { group } => {
                self.change(req, group).await
            }
        }
    }

    /// The group's state and KV revision, `None` if it does not exist.
    async fn load(&self, gid: &str) -> Result<Option<(GroupState, u64)>, OpError> {
        let entry = self.groups.entry(gid).await.map_err(|e| unavailable("reading the group", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let state: GroupState = serde_json::from_slice(&e.value).map_err(|err| {
                    tracing::error!(gid, error = %err, "group state in KV is not valid JSON");
                    OpError::new(ErrorCode::Internal, "group state unreadable")
                })?;
                Ok(Some((state, e.revision)))
            }
            _ => Ok(None),
        }
    }

    async fn create(&self, req: &GroupRequest) -> Result<GroupReply, OpError> {
        for _ in 0..CAS_ATTEMPTS {
            let gid = new_gid();
            let Outcome::Changed { state, event } = membership::apply(None, req, self.ctx(&gid))? else {
                return Err(OpError::new(ErrorCode::Internal, "create changed nothing"));
            };
            match self.groups.create(&gid, to_json(&state)).await {
                Ok(rev) => return self.recorded(state, event, rev).await,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(unavailable("creating the group", e)),
            }
        }
        Err(OpError::new(ErrorCode::Internal, "could not allocate a group id"))
    }

    async fn change(&self, req: &GroupRequest, gid: &str) -> Result<GroupReply, OpError> {
        for attempt in 0..CAS_ATTEMPTS {
            let current = self.load(gid).await?;
            let rev = current.as_ref().map_or(0, |(_, rev)| *rev);
            match membership::apply(current.as_ref().map(|(s, _)| s), req, self.ctx(gid))? {
                Outcome::Read(state) => return Ok(GroupReply::Group { group: state }),
                Outcome::Unchanged(state) => {
                    self.repair_memberships(req, &state).await?;
                    return Ok(GroupReply::Group { group: state });
                }
                Outcome::Changed { state, event } => match self.groups.update(gid, to_json(&state), rev).await {
                    Ok(new_rev) => return self.recorded(state, event, new_rev).await,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        tracing::debug!(gid, attempt, "group changed concurrently; retrying");
                        // A little jitter so that racing instances do not collide again.
                        let ms = rand::random::<u64>() % (5 << attempt.min(4));
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Err(e) => return Err(unavailable("updating the group", e)),
                },
            }
        }
        Err(OpError::new(ErrorCode::Unavailable, "too many concurrent changes to the group; retry"))
    }

    /// After the group is stored at `rev`: the members' group lists, then the timeline event.
    async fn recorded(&self, state: GroupState, event: Event, rev: u64) -> Result<GroupReply, OpError> {
        let gid = state.gid.clone();
        let lists = self.update_memberships(&gid, event.joined(), event.departed()).await;
        // The event is published even if a list update failed: KV `groups` already changed and
        // the timeline must follow it.
        let published = self.publish_event(&state, &event, rev).await;
        tracing::info!(
            gid = %gid,
            event = event.kind.as_str(),
            by = %event.by,
            count = event.members.len(),
            rev,
            "group changed"
        );
        lists?;
        published?;
        Ok(GroupReply::Group { group: state })
    }

    async fn publish_event(&self, state: &GroupState, event: &Event, rev: u64) -> Result<(), OpError> {
        let entry = GroupEntry::Event {
            event: event.kind.as_str().to_owned(),
            by: event.by.clone(),
            members: event.members.clone(),
            name: state.name.clone(),
            state: state.members.clone(),
            ts: protocol::now_ms(),
        };
        let payload = to_json(&entry);
        let gid = GroupId::parse(&state.gid).map_err(|e| OpError::new(ErrorCode::Internal, e.to_string()))?;
        let subject = subjects::group(&gid);
        let msg_id = event_msg_id(&state.gid, rev);
        let mut last = String::new();
        for attempt in 0..4u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            let publish = PublishMessage::build().payload(payload.clone()).message_id(&msg_id);
            match self.js.send_publish(subject.clone(), publish).await {
                Ok(ack) => match ack.await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
        }
        tracing::error!(gid = %state.gid, rev, error = %last, "publishing a membership event failed");
        Err(OpError::new(ErrorCode::Unavailable, "recording the change failed; retry"))
    }

    /// Adds `gid` to the lists of `joined` and removes it from the lists of `departed`, a few
    /// users at a time.
    async fn update_memberships(&self, gid: &str, joined: &[String], departed: &[String]) -> Result<(), OpError> {
        let jobs: Vec<(&String, bool)> =
            joined.iter().map(|u| (u, true)).chain(departed.iter().map(|u| (u, false))).collect();
        for chunk in jobs.chunks(16) {
            futures::future::try_join_all(chunk.iter().map(|(user, add)| self.update_membership(user, gid, *add)))
                .await?;
        }
        Ok(())
    }

    /// For an add or remove that found nothing to change (often a retry after a failure): makes
    /// the `memberships` entries of the users it names match the group.
    async fn repair_memberships(&self, req: &GroupRequest, state: &GroupState) -> Result<(), OpError> {
        let (joined, departed): (Vec<String>, Vec<String>) = match &req.op {
            GroupOp::Add { members, .. } => (members.clone(), vec![]),
            GroupOp::Remove { members, .. } => (vec![], members.clone()),
            _ => return Ok(()),
        };
        let joined: Vec<String> = joined.into_iter().filter(|u| state.is_member(u)).collect();
        let departed: Vec<String> = departed.into_iter().filter(|u| !state.is_member(u)).collect();
        self.update_memberships(&state.gid, &joined, &departed).await
    }

    /// Adds `gid` to (or removes it from) `user`'s group list, with compare-and-set.
    async fn update_membership(&self, user: &str, gid: &str, add: bool) -> Result<(), OpError> {
        for _ in 0..CAS_ATTEMPTS {
            let entry = self.memberships.entry(user).await.map_err(|e| unavailable("reading memberships", e))?;
            let (list, rev) = match &entry {
                None => (Vec::new(), None),
                Some(e) if e.operation != kv::Operation::Put => (Vec::new(), Some(e.revision)),
                Some(e) => {
                    let list = serde_json::from_slice::<Vec<String>>(&e.value).unwrap_or_else(|err| {
                        tracing::error!(user, error = %err, "memberships entry is not a JSON list; rebuilding it");
                        Vec::new()
                    });
                    (list, Some(e.revision))
                }
            };
            let next = if add { membership::with_group(&list, gid) } else { membership::without_group(&list, gid) };
            let Some(next) = next else { return Ok(()) };
            let res = match rev {
                None => self
                    .memberships
                    .create(user, to_json(&next))
                    .await
                    .map(|_| ())
                    .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
                Some(rev) => self
                    .memberships
                    .update(user, to_json(&next), rev)
                    .await
                    .map(|_| ())
                    .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
            };
            match res {
                Ok(()) => return Ok(()),
                Err((true, _)) => continue,
                Err((false, e)) => return Err(unavailable("updating memberships", e)),
            }
        }
        Err(OpError::new(ErrorCode::Unavailable, "too many concurrent membership changes; retry"))
    }

    /// `by`'s groups, from `memberships`, each checked against the group itself.
    async fn list(&self, by: &str) -> Result<GroupReply, OpError> {
        let raw = self.memberships.get(by).await.map_err(|e| unavailable("reading memberships", e))?;
        let gids: Vec<String> = match raw {
            None => Vec::new(),
            Some(b) => serde_json::from_slice(&b).unwrap_or_else(|err| {
                tracing::error!(user = by, error = %err, "memberships entry is not a JSON list");
                Vec::new()
            }),
        };
        let mut groups = Vec::new();
        for chunk in gids.chunks(16) {
            let found = futures::future::try_join_all(chunk.iter().map(|gid| self.summary(gid, by))).await?;
            groups.extend(found.into_iter().flatten());
        }
        Ok(GroupReply::Groups { groups })
    }

    /// The group's id and name if it exists and `by` is a member.
    async fn summary(&self, gid: &str, by: &str) -> Result<Option<GroupSummary>, OpError> {
        if GroupId::parse(gid).is_err() {
            return Ok(None);
        }
        Ok(self.load(gid).await?.and_then(|(state, _)| {
            state.is_member(by).then(|| GroupSummary { gid: state.gid.clone(), name: state.name })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_group_ids() {
        let a = new_gid();
        assert!(GroupId::parse(&a).is_ok(), "{a}");
        assert_eq!(a.len(), 33);
        assert!(a.starts_with('g'));
        assert_ne!(a, new_gid());
    }

    #[test]
    fn labels_match_the_wire_codes() {
        for code in [ErrorCode::BadField, ErrorCode::NotFound, ErrorCode::Forbidden, ErrorCode::LimitExceeded] {
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{}\"", code_label(code)));
        }
    }
}
