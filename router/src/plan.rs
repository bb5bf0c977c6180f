//! Fan-out planning with no I/O: the member cache of a partition and, for each group stream
//! entry, what to publish. [`crate::fanout`] fetches the entries, loads cache misses from KV and
//! does the publishing.
//!
//! The cache holds, per group, the member list *at the current position of the partition's
//! timeline*: a membership event sets it to the event's `state`, so every post is fanned out to
//! exactly the members of its position, however ops and sends race. Only a cache miss (a group
//! not seen since start, or evicted) falls back to KV `groups`, which holds the latest state.

use std::collections::HashMap;

use bytes::Bytes;
use protocol::groups::{GroupEntry, ReceiptEvent};
use protocol::item::InboxItem;
use protocol::UserId;

/// A group's members as cached, with the KV revision they come from (the `groups` revision the
/// event was written at, or the revision loaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    pub rev: u64,
    pub list: Vec<String>,
}

/// Undo log of the cache changes of one batch: if the batch fails, the cache goes back to where
/// it was, so the replay of the batch sees the same membership at each position.
#[derive(Debug, Default)]
pub struct Undo {
    saved: Vec<(String, Option<Members>)>,
}

/// The member lists of the groups of one partition, bounded: when full, an arbitrary group is
/// evicted (it is reloaded from KV when it shows up again).
#[derive(Debug)]
pub struct MemberCache {
    cap: usize,
    map: HashMap<String, Members>,
}

impl MemberCache {
    pub fn new(cap: usize) -> Self {
        MemberCache { cap: cap.max(1), map: HashMap::new() }
    }

    pub fn get(&self, gid: &str) -> Option<&Members> {
        self.map.get(gid)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Sets `gid`'s members (recording the old value in `undo`), unless the cache already holds
    /// a newer revision: membership events can reach the timeline out of revision order when two
    /// ops on a group race, and an older state must not replace a newer one. Member ids that are
    /// not valid user ids are dropped (they could not be inbox subjects). Returns whether the
    /// cache was updated.
    pub fn set(&mut self, gid: &str, rev: u64, list: &[String], undo: &mut Undo) -> bool {
        if let Some(cur) = self.map.get(gid) {
            if cur.rev > rev {
                return false;
            }
        }
        if !undo.saved.iter().any(|(g, _)| g == gid) {
            undo.saved.push((gid.to_owned(), self.map.get(gid).cloned()));
        }
        if !self.map.contains_key(gid) && self.map.len() >= self.cap {
            // Arbitrary eviction: whatever the hash map yields first.
            if let Some(victim) = self.map.keys().next().cloned() {
                self.map.remove(&victim);
            }
        }
        let list = list.iter().filter(|m| UserId::parse(m).is_ok()).cloned().collect();
        self.map.insert(gid.to_owned(), Members { rev, list });
        true
    }

    /// Reverts the changes recorded in `undo`.
    pub fn rollback(&mut self, undo: Undo) {
        for (gid, old) in undo.saved.into_iter().rev() {
            match old {
                Some(m) => {
                    self.map.insert(gid, m);
                }
                None => {
                    self.map.remove(&gid);
                }
            }
        }
    }
}

/// Where a group stream entry sits: its group and its stream sequence (the timeline position).
#[derive(Debug, Clone, Copy)]
pub struct Position<'a> {
    pub gid: &'a str,
    pub sid: u64,
}

/// What to publish for one entry, in this order: the `sent` receipt event (posts only), then one
/// inbox copy per recipient, all sharing `item`.
#[derive(Debug, Clone)]
pub struct Fanout {
    pub receipt: Option<Bytes>,
    pub recipients: Vec<String>,
    pub item: Bytes,
    /// When the entry was accepted (ms since the epoch), for the fan-out latency.
    pub ts: u64,
}

/// Why an entry is not fanned out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// The sender is not a member at this position of the timeline.
    NotMember { from: String },
    /// A post for a group that does not exist.
    NoGroup,
}

/// Does this entry need the group's members from KV before it can be planned?
pub fn needs_members(cache: &MemberCache, gid: &str, entry: &GroupEntry) -> bool {
    matches!(entry, GroupEntry::Post { .. }) && cache.get(gid).is_none()
}

/// Plans the fan-out of one entry, updating the cache for membership events. For a post, the
/// caller first loads the group into the cache when [`needs_members`] says so; a group still
/// missing after that does not exist.
///
/// `event_rev` is the `groups` KV revision a membership event was written at (from its
/// `Nats-Msg-Id`, `ev|<gid>|<rev>`); `None` when unknown (the event then applies).
pub fn plan(
    cache: &mut MemberCache,
    undo: &mut Undo,
    at: Position<'_>,
    entry: &GroupEntry,
    event_rev: Option<u64>,
) -> Result<Fanout, Reject> {
    match entry {
        GroupEntry::Post { from, dev, id, body, media, ts } => {
            let members = cache.get(at.gid).ok_or(Reject::NoGroup)?;
            if !members.list.iter().any(|m| m == from) {
                return Err(Reject::NotMember { from: from.clone() });
            }
            let recipients: Vec<String> = members.list.iter().filter(|m| *m != from).cloned().collect();
            let receipt = ReceiptEvent::Sent {
                group: at.gid.to_owned(),
                sid: at.sid,
                sender: from.clone(),
                recipients: recipients.clone(),
            };
            let item = InboxItem::Group {
                group: at.gid.to_owned(),
                from: from.clone(),
                dev: dev.clone(),
                id: id.clone(),
                sid: at.sid,
                n: recipients.len() as u32,
                body: body.clone(),
                media: media.clone(),
                ts: *ts,
            };
            Ok(Fanout {
                receipt: Some(serde_json::to_vec(&receipt).expect("receipt serialises").into()),
                recipients,
                item: item.to_bytes().into(),
                ts: *ts,
            })
        }
        GroupEntry::Event { event, by, members, name, state, ts } => {
            // Without a revision, the event applies, keeping the cached revision.
            let rev = event_rev.unwrap_or_else(|| cache.get(at.gid).map_or(0, |m| m.rev));
            cache.set(at.gid, rev, state, undo);
            // The members of this position (the event's state, or a newer one already applied),
            // plus the users the event concerns: the removed and the leaving see their removal.
            let current = cache.get(at.gid).map(|m| m.list.as_slice()).unwrap_or(&[]);
            let mut recipients: Vec<String> = current.to_vec();
            for m in members {
                if !recipients.contains(m) && UserId::parse(m).is_ok() {
                    recipients.push(m.clone());
                }
            }
            let item = InboxItem::GroupEvent {
                group: at.gid.to_owned(),
                sid: at.sid,
                event: event.clone(),
                by: by.clone(),
                members: members.clone(),
                name: name.clone(),
                ts: *ts,
            };
            Ok(Fanout { receipt: None, recipients, item: item.to_bytes().into(), ts: *ts })
        }
    }
}

/// The member list just before a membership event, from the event alone: its `state` is the
/// list after it, `members` the users it concerns. `None` for `created` (no group before it) and
/// for posts.
///
/// Used on a cache miss: the first membership event after a post tells the members at the post's
/// position exactly, where KV `groups` only knows the latest list.
pub fn members_before(entry: &GroupEntry) -> Option<Vec<String>> {
    let GroupEntry::Event { event, members, state, .. } = entry else { return None };
    match event.as_str() {
        "created" => None,
        "added" => Some(state.iter().filter(|m| !members.contains(m)).cloned().collect()),
        // "removed", "left": they were members just before.
        _ => {
            let mut before = state.clone();
            before.extend(members.iter().filter(|m| !state.contains(m)).cloned());
            Some(before)
        }
    }
}

/// The group id of a stored group stream subject, `group.<partition>.<gid>`.
pub fn gid_of(subject: &str) -> Option<&str> {
    let mut parts = subject.split('.');
    let (g, p, gid) = (parts.next()?, parts.next()?, parts.next()?);
    (g == "group" && p.parse::<u32>().is_ok() && !gid.is_empty() && parts.next().is_none()).then_some(gid)
}

/// The KV revision in a membership event's `Nats-Msg-Id` (`ev|<gid>|<rev>`).
pub fn event_rev(msg_id: &str, gid: &str) -> Option<u64> {
    let rest = msg_id.strip_prefix("ev|")?;
    let (g, rev) = rest.rsplit_once('|')?;
    (g == gid).then(|| rev.parse().ok()).flatten()
}

/// The `Nats-Msg-Id` of a membership event: the group and the `groups` revision it produced.
pub fn event_msg_id(gid: &str, rev: u64) -> String {
    format!("ev|{gid}|{rev}")
}

/// The `Nats-Msg-Id` of a post's `sent` receipt event.
pub fn sent_msg_id(gid: &str, sid: u64) -> String {
    format!("s|{gid}|{sid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn post(from: &str) -> GroupEntry {
        GroupEntry::Post { from: from.into(), dev: "d".into(), id: "c1".into(), body: "hi".into(), media: None, ts: 5 }
    }

    fn event(kind: &str, members: &[&str], state: &[&str]) -> GroupEntry {
        GroupEntry::Event {
            event: kind.into(),
            by: "al".into(),
            members: s(members),
            name: "n".into(),
            state: s(state),
            ts: 6,
        }
    }

    fn at(sid: u64) -> Position<'static> {
        Position { gid: "g1", sid }
    }

    #[test]
    fn post_goes_to_every_member_but_the_sender() {
        let mut c = MemberCache::new(10);
        let mut u = Undo::default();
        assert!(needs_members(&c, "g1", &post("al")));
        c.set("g1", 3, &s(&["al", "bo", "cy"]), &mut u);
        assert!(!needs_members(&c, "g1", &post("al")));
        let f = plan(&mut c, &mut u, at(9), &post("bo"), None).unwrap();
        assert_eq!(f.recipients, s(&["al", "cy"]));
        assert_eq!(f.ts, 5);
        let item = InboxItem::from_bytes(&f.item).unwrap();
        assert_eq!(
            item,
            InboxItem::Group {
                group: "g1".into(),
                from: "bo".into(),
                dev: "d".into(),
                id: "c1".into(),
                sid: 9,
                n: 2,
                body: "hi".into(),
                media: None,
                ts: 5
            }
        );
        let r: ReceiptEvent = serde_json::from_slice(f.receipt.as_ref().unwrap()).unwrap();
        assert_eq!(
            r,
            ReceiptEvent::Sent { group: "g1".into(), sid: 9, sender: "bo".into(), recipients: s(&["al", "cy"]) }
        );
    }

    #[test]
    fn posts_from_non_members_and_to_unknown_groups_are_rejected() {
        let mut c = MemberCache::new(10);
        let mut u = Undo::default();
        assert_eq!(plan(&mut c, &mut u, at(1), &post("al"), None).unwrap_err(), Reject::NoGroup);
        c.set("g1", 1, &s(&["al"]), &mut u);
        assert_eq!(
            plan(&mut c, &mut u, at(2), &post("zed"), None).unwrap_err(),
            Reject::NotMember { from: "zed".into() }
        );
    }

    #[test]
    fn events_set_the_membership_of_their_position() {
        let mut c = MemberCache::new(10);
        let mut u = Undo::default();
        let f = plan(&mut c, &mut u, at(1), &event("created", &["al", "bo"], &["al", "bo"]), Some(1)).unwrap();
        assert_eq!(f.recipients, s(&["al", "bo"]));
        assert!(f.receipt.is_none());
        assert_eq!(plan(&mut c, &mut u, at(2), &post("bo"), None).unwrap().recipients, s(&["al"]));
        // bo is removed: bo sees the removal, then no longer gets posts, nor may post.
        let f = plan(&mut c, &mut u, at(3), &event("removed", &["bo"], &["al"]), Some(2)).unwrap();
        assert_eq!(f.recipients, s(&["al", "bo"]));
        match InboxItem::from_bytes(&f.item).unwrap() {
            InboxItem::GroupEvent { group, sid, event, by, members, name, ts } => {
                assert_eq!((group.as_str(), sid, event.as_str(), by.as_str()), ("g1", 3, "removed", "al"));
                assert_eq!((members, name.as_str(), ts), (s(&["bo"]), "n", 6));
            }
            other => panic!("{other:?}"),
        }
        assert!(plan(&mut c, &mut u, at(4), &post("bo"), None).is_err());
        // cy joins: gets the event and the posts after it.
        let f = plan(&mut c, &mut u, at(5), &event("added", &["cy"], &["al", "cy"]), Some(3)).unwrap();
        assert_eq!(f.recipients, s(&["al", "cy"]));
        assert_eq!(plan(&mut c, &mut u, at(6), &post("al"), None).unwrap().recipients, s(&["cy"]));
    }

    #[test]
    fn an_older_event_does_not_replace_a_newer_state() {
        let mut c = MemberCache::new(10);
        let mut u = Undo::default();
        // Revision 6 (cy added after bo's removal at 5) reached the timeline before revision 5.
        plan(&mut c, &mut u, at(1), &event("added", &["cy"], &["al", "cy"]), Some(6)).unwrap();
        let f = plan(&mut c, &mut u, at(2), &event("removed", &["bo"], &["al"]), Some(5)).unwrap();
        assert_eq!(f.recipients, s(&["al", "cy", "bo"]));
        assert_eq!(c.get("g1").unwrap(), &Members { rev: 6, list: s(&["al", "cy"]) });
    }

    #[test]
    fn rollback_restores_the_cache_of_the_batch_start() {
        let mut c = MemberCache::new(10);
        let mut u = Undo::default();
        c.set("g1", 1, &s(&["al"]), &mut u);
        let mut batch = Undo::default();
        c.set("g1", 2, &s(&["al", "bo"]), &mut batch);
        c.set("g1", 3, &s(&["bo"]), &mut batch);
        c.set("g2", 1, &s(&["cy"]), &mut batch);
        c.rollback(batch);
        assert_eq!(c.get("g1").unwrap(), &Members { rev: 1, list: s(&["al"]) });
        assert!(c.get("g2").is_none());
    }

    #[test]
    fn the_cache_is_bounded_and_drops_invalid_ids() {
        let mut c = MemberCache::new(2);
        let mut u = Undo::default();
        for g in ["a", "b", "c", "d"] {
            c.set(g, 1, &s(&["al", "bad id", "x.y"]), &mut u);
            assert!(c.len() <= 2);
        }
        assert_eq!(c.get("d").unwrap().list, s(&["al"]));
    }

    #[test]
    fn members_before_an_event() {
        assert_eq!(members_before(&event("added", &["cy"], &["al", "bo", "cy"])), Some(s(&["al", "bo"])));
        assert_eq!(members_before(&event("removed", &["bo"], &["al"])), Some(s(&["al", "bo"])));
        assert_eq!(members_before(&event("left", &["al"], &["bo"])), Some(s(&["bo", "al"])));
        assert_eq!(members_before(&event("created", &["al"], &["al"])), None);
        assert_eq!(members_before(&post("al")), None);
    }

    #[test]
    fn subjects_and_ids() {
        assert_eq!(gid_of("group.3.gabc"), Some("gabc"));
        assert_eq!(gid_of("group.x.gabc"), None);
        assert_eq!(gid_of("group.3"), None);
        assert_eq!(gid_of("group.3.a.b"), None);
        assert_eq!(gid_of("inbox.3.a"), None);
        assert_eq!(event_rev(&event_msg_id("g1", 42), "g1"), Some(42));
        assert_eq!(event_rev("ev|g2|42", "g1"), None);
        assert_eq!(event_rev("g|al|d|1", "g1"), None);
        assert_eq!(event_rev("ev|g1|x", "g1"), None);
        assert_eq!(sent_msg_id("g1", 7), "s|g1|7");
    }
}
