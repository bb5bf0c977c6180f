//! Group receipts aggregated per message and member, without I/O.
//!
//! The router records every group message before it fans it out (`Sent`: the sender and the
//! recipients of that moment); gateways report per member how far the member's devices have
//! received the group (`Delivered`) and how far the member has read it (`Read`). Both reports are
//! cumulative: `up_to` covers every message of the group with `sid <= up_to`. [`ReceiptBook`]
//! keeps, per group, the messages whose ticks are not complete yet and says when the sender is due
//! an aggregate tick ([`Tick`]): `delivered` once every recipient has the message, `read` once
//! every recipient has read it. Reading implies having: a `Read` also counts as `Delivered`.
//!
//! Rules for odd input (the events come over NATS, so none of it is trusted):
//! * events with an invalid group or user id are rejected ([`Rejected`]); recipient ids that are
//!   invalid are dropped from the recipient set (they could never report, so the message would
//!   never complete);
//! * the sender is not one of its own message's recipients (its other devices do not make ticks);
//! * a message with no recipients left is remembered as complete at once, without ticks;
//! * a repeated `Sent` for a known or completed message changes nothing (first one wins);
//! * reports for a group with no pending message, or from a user who is not a recipient, change
//!   nothing; a report that arrives before the `Sent` it covers is applied when the `Sent` arrives.
//!
//! Memory is bounded. Pending messages are capped ([`BookConfig::max_entries`], the oldest are
//! evicted first) and dropped after [`BookConfig::max_age_ms`] ([`ReceiptBook::expire`]); a
//! message that everyone has read leaves the pending set and is remembered, with its recipient
//! list, in a small LRU table ([`BookConfig::done_capacity`]) so "who read this" still answers.
//! Recipient lists are shared between consecutive messages of a group with the same recipients,
//! and per-recipient progress is two bits per message, so a pending message of a 1024-member group
//! costs a few hundred bytes. Per group the book also keeps each reporting member's highest
//! `up_to` (bounded per group, dropped with the group's last pending message), so a report only
//! walks the messages it newly covers instead of the group's whole history.
//!
//! Ticks carry the time of the event that completed them (the event's stream timestamp), so a
//! rebuild from the same events produces the same ticks, byte for byte.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use protocol::groups::ReceiptEvent;
use protocol::item::{InboxItem, ReceiptStatus};
use protocol::{subjects, GroupId, UserId};

/// Most members per group whose progress marks are kept (see the module doc); beyond it reports of
/// further members are still applied, only not remembered.
const MAX_MARKS_PER_GROUP: usize = 8192;

/// Limits of the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BookConfig {
    /// Most pending messages held; the oldest are evicted beyond it.
    pub max_entries: usize,
    /// Pending messages older than this (by the time their `Sent` was stored) are dropped.
    pub max_age_ms: u64,
    /// Most completed ("everyone read") messages remembered for queries; 0 remembers none.
    pub done_capacity: usize,
}

impl Default for BookConfig {
    fn default() -> Self {
        BookConfig { max_entries: 200_000, max_age_ms: 7 * 24 * 3600 * 1000, done_capacity: 100_000 }
    }
}

/// An aggregate tick due to the sender of group message `sid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub sender: UserId,
    pub group: Arc<str>,
    pub sid: u64,
    pub status: ReceiptStatus,
    /// When the event that completed it was stored (ms since the epoch).
    pub ts: u64,
}

impl Tick {
    /// `inbox.<sender>`.
    pub fn subject(&self) -> String {
        subjects::inbox(&self.sender)
    }

    /// `gr|<gid>|<sid>|<status>`: one stored tick per message and status within the duplicate
    /// window, however often it is emitted.
    pub fn dedup_id(&self) -> String {
        format!("gr|{}|{}|{}", self.group, self.sid, self.status.as_str())
    }

    /// What is stored in the sender's inbox.
    pub fn item(&self) -> InboxItem {
        InboxItem::GroupReceipt { group: self.group.to_string(), sid: self.sid, status: self.status, ts: self.ts }
    }
}

/// Why an event was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("invalid group id")]
    BadGroup,
    #[error("invalid user id")]
    BadUser,
}

/// Who has received and read one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoRead {
    /// How many recipients the message has.
    pub recipients: usize,
    /// Recipients that have it (sorted), including those who read it.
    pub delivered: Vec<String>,
    /// Recipients that read it (sorted).
    pub read: Vec<String>,
}

/// A message's recipients, sorted and without repeats.
#[derive(Debug, PartialEq, Eq)]
struct Members(Box<[Box<str>]>);

impl Members {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn index(&self, user: &str) -> Option<usize> {
        self.0.binary_search_by(|m| (**m).cmp(user)).ok()
    }

    fn names(&self, keep: impl Fn(usize) -> bool) -> Vec<String> {
        self.0.iter().enumerate().filter(|(i, _)| keep(*i)).map(|(_, u)| u.to_string()).collect()
    }
}

/// One bit per recipient.
#[derive(Debug)]
struct Bits(Box<[u64]>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)].into_boxed_slice())
    }

    /// Sets bit `i`; true if it was not set before.
    fn set(&mut self, i: usize) -> bool {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        match self.0.get_mut(word) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                true
            }
            _ => false,
        }
    }

    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }
}

/// A pending message.
#[derive(Debug)]
struct Entry {
    sender: UserId,
    recipients: Arc<Members>,
    delivered: Bits,
    read: Bits,
    n_delivered: usize,
    n_read: usize,
    created_ms: u64,
    /// Insertion number: with `created_ms`, the entry's key in the age index.
    order: u64,
    delivered_ticked: bool,
}

impl Entry {
    /// Recipient `i` has the message, and has read it if `read`.
    fn mark(&mut self, i: usize, read: bool) {
        if self.delivered.set(i) {
            self.n_delivered += 1;
        }
        if read && self.read.set(i) {
            self.n_read += 1;
        }
    }

    /// Pushes the ticks now due; true once everyone has read it (the entry is complete).
    fn due(&mut self, group: &Arc<str>, sid: u64, at_ms: u64, ticks: &mut Vec<Tick>) -> bool {
        let n = self.recipients.len();
        let tick = |status| Tick { sender: self.sender.clone(), group: group.clone(), sid, status, ts: at_ms };
        if !self.delivered_ticked && self.n_delivered >= n {
            self.delivered_ticked = true;
            ticks.push(tick(ReceiptStatus::Delivered));
        }
        if self.n_read >= n {
            ticks.push(tick(ReceiptStatus::Read));
            return true;
        }
        false
    }
}

/// A member's highest reported `up_to` in a group. `delivered >= read` always (read implies
/// delivered).
#[derive(Debug, Default, Clone, Copy)]
struct Marks {
    delivered: Option<u64>,
    read: Option<u64>,
}

#[derive(Debug, Default)]
struct Group {
    entries: BTreeMap<u64, Entry>,
    marks: HashMap<Box<str>, Marks>,
    /// Highest `up_to` of any mark: a new message above it has no earlier reports to apply.
    max_mark: u64,
    /// The last recipient set, shared by following messages with the same recipients.
    last_set: Option<Arc<Members>>,
}

/// A message everyone has read.
#[derive(Debug)]
struct Done {
    recipients: Arc<Members>,
    created_ms: u64,
    /// Last use, the key in the LRU index.
    stamp: u64,
}

/// Per group and message, who has received and read it; see the module doc.
#[derive(Debug)]
pub struct ReceiptBook {
    cfg: BookConfig,
    groups: HashMap<Arc<str>, Group>,
    /// Pending messages by (created, insertion): the front is the oldest.
    by_age: BTreeMap<(u64, u64), (Arc<str>, u64)>,
    next_order: u64,
    done: HashMap<(Arc<str>, u64), Done>,
    /// Completed messages by last use: the front is the least recently used.
    done_lru: BTreeMap<u64, (Arc<str>, u64)>,
    next_stamp: u64,
    evictions: u64,
}

impl ReceiptBook {
    pub fn new(cfg: BookConfig) -> Self {
        ReceiptBook {
            cfg,
            groups: HashMap::new(),
            by_age: BTreeMap::new(),
            next_order: 0,
            done: HashMap::new(),
            done_lru: BTreeMap::new(),
            next_stamp: 0,
            evictions: 0,
        }
    }

    /// Forgets every message (before a rebuild); the eviction count is kept.
    pub fn reset(&mut self) {
        let evictions = self.evictions;
        *self = Self::new(self.cfg);
        self.evictions = evictions;
    }

    /// Pending messages held.
    pub fn entries(&self) -> usize {
        self.by_age.len()
    }

    /// Completed messages remembered.
    pub fn done_entries(&self) -> usize {
        self.done.len()
    }

    /// Pending messages dropped so far before everyone read them (by the cap or by age).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Applies one event stored at `at_ms` (ms since the epoch); ticks now due are appended to
    /// `ticks` in order (per message, `delivered` before `read`; messages by ascending `sid`).
    pub fn apply(&mut self, ev: &ReceiptEvent, at_ms: u64, ticks: &mut Vec<Tick>) -> Result<(), Rejected> {
        match ev {
            ReceiptEvent::Sent { group, sid, sender, recipients } => {
                self.sent(group, *sid, sender, recipients, at_ms, ticks)
            }
            ReceiptEvent::Delivered { group, by, up_to } => self.report(group, by, *up_to, false, at_ms, ticks),
            ReceiptEvent::Read { group, by, up_to } => self.report(group, by, *up_to, true, at_ms, ticks),
        }
    }

    fn sent(
        &mut self,
        group: &str,
        sid: u64,
        sender: &str,
        recipients: &[String],
        at_ms: u64,
        ticks: &mut Vec<Tick>,
    ) -> Result<(), Rejected> {
        GroupId::parse(group).map_err(|_| Rejected::BadGroup)?;
        let sender = UserId::parse(sender).map_err(|_| Rejected::BadUser)?;
        let gid: Arc<str> = match self.groups.get_key_value(group) {
            Some((_, g)) if g.entries.contains_key(&sid) => return Ok(()),
            Some((gid, _)) => gid.clone(),
            None => Arc::from(group),
        };
        if self.done.contains_key(&(gid.clone(), sid)) {
            return Ok(());
        }
        let mut users: Vec<&str> = recipients.iter().map(String::as_str).filter(|r| *r != sender.as_str()).collect();
        users.sort_unstable();
        users.dedup();

        let g = self.groups.entry(gid.clone()).or_default();
        let set = match &g.last_set {
            // The usual case, a group's messages to the same members: share the set, and skip the
            // validation (the shared set holds valid ids only, so an equal list is valid).
            Some(s) if s.0.len() == users.len() && s.0.iter().zip(&users).all(|(a, b)| **a == **b) => s.clone(),
            _ => {
                let valid = users.iter().filter(|u| UserId::parse(u).is_ok()).map(|u| Box::from(*u)).collect();
                let s = Arc::new(Members(valid));
                g.last_set = Some(s.clone());
                s
            }
        };
        if set.len() == 0 {
            // Nobody to wait for: complete at once, with nothing to tick.
            if g.entries.is_empty() {
                self.groups.remove(&gid);
            }
            self.remember_done(gid, sid, set, at_ms);
            return Ok(());
        }

        let order = self.next_order;
        self.next_order += 1;
        let n = set.len();
        let mut e = Entry {
            sender,
            recipients: set,
            delivered: Bits::new(n),
            read: Bits::new(n),
            n_delivered: 0,
            n_read: 0,
            created_ms: at_ms,
            order,
            delivered_ticked: false,
        };
        // Reports stored before this message (not the usual order, but possible) cover it too.
        if sid <= g.max_mark {
            for (user, m) in &g.marks {
                let read = m.read.is_some_and(|r| r >= sid);
                let delivered = read || m.delivered.is_some_and(|d| d >= sid);
                if delivered {
                    if let Some(i) = e.recipients.index(user) {
                        e.mark(i, read);
                    }
                }
            }
        }
        let complete = e.due(&gid, sid, at_ms, ticks);
        if complete {
            let recipients = e.recipients.clone();
            if g.entries.is_empty() {
                self.groups.remove(&gid);
            }
            self.remember_done(gid, sid, recipients, at_ms);
            return Ok(());
        }
        g.entries.insert(sid, e);
        self.by_age.insert((at_ms, order), (gid, sid));
        while self.by_age.len() > self.cfg.max_entries {
            self.drop_oldest();
        }
        Ok(())
    }

    /// A cumulative `Delivered` (or `Read`, if `read`) from `by` up to `up_to`.
    fn report(
        &mut self,
        group: &str,
        by: &str,
        up_to: u64,
        read: bool,
        at_ms: u64,
        ticks: &mut Vec<Tick>,
    ) -> Result<(), Rejected> {
        GroupId::parse(group).map_err(|_| Rejected::BadGroup)?;
        UserId::parse(by).map_err(|_| Rejected::BadUser)?;
        let Some((gid, _)) = self.groups.get_key_value(group) else {
            // No pending message in the group: nothing this could complete.
            return Ok(());
        };
        let gid = gid.clone();
        let Some(g) = self.groups.get_mut(&gid) else {
            return Ok(());
        };
        let m = g.marks.get(by).copied().unwrap_or_default();
        // Messages up to the mark already have this report applied.
        let from = if read { m.read } else { m.delivered };
        if from.is_some_and(|f| f >= up_to) {
            return Ok(());
        }
        let lower = from.map_or(Bound::Unbounded, Bound::Excluded);
        let mut complete = Vec::new();
        for (&sid, e) in g.entries.range_mut((lower, Bound::Included(up_to))) {
            if let Some(i) = e.recipients.index(by) {
                e.mark(i, read);
                if e.due(&gid, sid, at_ms, ticks) {
                    complete.push(sid);
                }
            }
        }
        let new = Marks {
            delivered: m.delivered.max(Some(up_to)),
            read: if read { m.read.max(Some(up_to)) } else { m.read },
        };
        if let Some(slot) = g.marks.get_mut(by) {
            *slot = new;
        } else if g.marks.len() < MAX_MARKS_PER_GROUP {
            g.marks.insert(Box::from(by), new);
        }
        g.max_mark = g.max_mark.max(up_to);

        let mut finished = Vec::with_capacity(complete.len());
        for sid in complete {
            if let Some(e) = g.entries.remove(&sid) {
                self.by_age.remove(&(e.created_ms, e.order));
                finished.push((sid, e.recipients, e.created_ms));
            }
        }
        if g.entries.is_empty() {
            self.groups.remove(&gid);
        }
        for (sid, recipients, created_ms) in finished {
            self.remember_done(gid.clone(), sid, recipients, created_ms);
        }
        Ok(())
    }

    /// Drops pending messages stored before `now_ms - max_age`. Returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let cutoff = now_ms.saturating_sub(self.cfg.max_age_ms);
        let mut n = 0;
        while self.by_age.first_key_value().is_some_and(|((created, _), _)| *created < cutoff) {
            self.drop_oldest();
            n += 1;
        }
        n
    }

    /// Who has received and read message `sid` of `group`, if it is known: pending, or completed
    /// and still remembered (then everyone has both). A completed message older than the max age
    /// is forgotten, as a rebuild from the (age-limited) stream would.
    pub fn who(&mut self, group: &str, sid: u64, now_ms: u64) -> Option<WhoRead> {
        if let Some(e) = self.groups.get(group).and_then(|g| g.entries.get(&sid)) {
            return Some(WhoRead {
                recipients: e.recipients.len(),
                delivered: e.recipients.names(|i| e.delivered.get(i)),
                read: e.recipients.names(|i| e.read.get(i)),
            });
        }
        let key = (Arc::<str>::from(group), sid);
        let d = self.done.get_mut(&key)?;
        if d.created_ms < now_ms.saturating_sub(self.cfg.max_age_ms) {
            let stamp = d.stamp;
            self.done.remove(&key);
            self.done_lru.remove(&stamp);
            return None;
        }
        // Recently used: keep it longer.
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if let Some(k) = self.done_lru.remove(&d.stamp) {
            self.done_lru.insert(stamp, k);
        }
        d.stamp = stamp;
        let everyone = d.recipients.names(|_| true);
        Some(WhoRead { recipients: everyone.len(), delivered: everyone.clone(), read: everyone })
    }

    /// Evicts the oldest pending message.
    fn drop_oldest(&mut self) {
        let Some((_, (gid, sid))) = self.by_age.pop_first() else {
            return;
        };
        if let Some(g) = self.groups.get_mut(&gid) {
            g.entries.remove(&sid);
            if g.entries.is_empty() {
                self.groups.remove(&gid);
            }
        }
        self.evictions += 1;
    }

    fn remember_done(&mut self, gid: Arc<str>, sid: u64, recipients: Arc<Members>, created_ms: u64) {
        if self.cfg.done_capacity == 0 {
            return;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if let Some(old) = self.done.insert((gid.clone(), sid), Done { recipients, created_ms, stamp }) {
            self.done_lru.remove(&old.stamp);
        }
        self.done_lru.insert(stamp, (gid, sid));
        while self.done.len() > self.cfg.done_capacity {
            let Some((_, key)) = self.done_lru.pop_first() else {
                break;
            };
            self.done.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use ReceiptStatus::{Delivered, Read};

    fn book() -> ReceiptBook {
        ReceiptBook::new(BookConfig::default())
    }

    fn sent(group: &str, sid: u64, sender: &str, recipients: &[&str]) -> ReceiptEvent {
        ReceiptEvent::Sent {
            group: group.into(),
            sid,
            sender: sender.into(),
            recipients: recipients.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn delivered(group: &str, by: &str, up_to: u64) -> ReceiptEvent {
        ReceiptEvent::Delivered { group: group.into(), by: by.into(), up_to }
    }

    fn read(group: &str, by: &str, up_to: u64) -> ReceiptEvent {
        ReceiptEvent::Read { group: group.into(), by: by.into(), up_to }
    }

    /// Applies `ev` at time 1000 and returns the ticks as (sender, group, sid, status).
    fn feed(b: &mut ReceiptBook, ev: ReceiptEvent) -> Vec<(String, String, u64, ReceiptStatus)> {
        feed_at(b, ev, 1_000)
    }

    fn feed_at(b: &mut ReceiptBook, ev: ReceiptEvent, at: u64) -> Vec<(String, String, u64, ReceiptStatus)> {
        let mut t = Vec::new();
        b.apply(&ev, at, &mut t).expect("accepted");
        t.into_iter().map(|t| (t.sender.to_string(), t.group.to_string(), t.sid, t.status)).collect()
    }

    fn tick(sender: &str, group: &str, sid: u64, s: ReceiptStatus) -> (String, String, u64, ReceiptStatus) {
        (sender.into(), group.into(), sid, s)
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_1024_member_group_ticks_after_the_last_member_only() {
        let mut b = book();
        let members: Vec<String> = (0..1024).map(|i| format!("m{i:04}")).collect();
        let refs: Vec<&str> = members.iter().map(|s| s.as_str()).collect();
        assert!(feed(&mut b, sent("g", 7, "alice", &refs)).is_empty());
        assert_eq!(b.entries(), 1);
        // Everyone but the last one has it: no tick yet, however often they report.
        for m in &members[..1023] {
            assert!(feed(&mut b, delivered("g", m, 7)).is_empty());
            assert!(feed(&mut b, delivered("g", m, 7)).is_empty());
        }
        let w = b.who("g", 7, 1_000).unwrap();
        assert_eq!((w.recipients, w.delivered.len(), w.read.len()), (1024, 1023, 0));
        assert_eq!(feed(&mut b, delivered("g", &members[1023], 7)), vec![tick("alice", "g", 7, Delivered)]);
        // Once only.
        assert!(feed(&mut b, delivered("g", &members[1023], 9)).is_empty());
        for m in &members[..1023] {
            assert!(feed(&mut b, read("g", m, 7)).is_empty());
        }
        assert_eq!(b.who("g", 7, 1_000).unwrap().read.len(), 1023);
        assert_eq!(feed(&mut b, read("g", &members[1023], 7)), vec![tick("alice", "g", 7, Read)]);
        // Complete: no longer pending, but still answered, with everyone.
        assert_eq!(b.entries(), 0);
        let w = b.who("g", 7, 1_000).unwrap();
        assert_eq!(w.recipients, 1024);
        assert_eq!(w.delivered, members);
        assert_eq!(w.read, members);
        // Late or repeated reports and a repeated Sent tick nothing again.
        assert!(feed(&mut b, read("g", &members[0], 7)).is_empty());
        assert!(feed(&mut b, sent("g", 7, "alice", &refs)).is_empty());
        assert_eq!(b.entries(), 0);
    }

    #[test]
    fn read_implies_delivered() {
        let mut b = book();
        feed(&mut b, sent("g", 1, "alice", &["bob", "carol"]));
        assert!(feed(&mut b, read("g", "bob", 1)).is_empty());
        let w = b.who("g", 1, 1_000).unwrap();
        assert_eq!((w.delivered, w.read), (names(&["bob"]), names(&["bob"])));
        // carol reads without a delivery report: both ticks at once, delivered first.
        assert_eq!(
            feed(&mut b, read("g", "carol", 1)),
            vec![tick("alice", "g", 1, Delivered), tick("alice", "g", 1, Read)]
        );
        // A delivery report after the read changes nothing.
        assert!(feed(&mut b, delivered("g", "carol", 1)).is_empty());
    }

    #[test]
    fn delivered_then_read_by_one_member_ticks_each_once() {
        let mut b = book();
        feed(&mut b, sent("g", 3, "alice", &["bob"]));
        assert_eq!(feed(&mut b, delivered("g", "bob", 3)), vec![tick("alice", "g", 3, Delivered)]);
        assert_eq!(feed(&mut b, read("g", "bob", 3)), vec![tick("alice", "g", 3, Read)]);
        assert_eq!(b.entries(), 0);
    }

    #[test]
    fn cumulative_reports_cover_every_earlier_message() {
        let mut b = book();
        feed(&mut b, sent("g", 10, "alice", &["bob", "carol"]));
        feed(&mut b, sent("g", 11, "bob", &["alice", "carol"]));
        // dave joined: only the third message is his.
        feed(&mut b, sent("g", 12, "alice", &["bob", "carol", "dave"]));
        feed(&mut b, sent("g", 13, "carol", &["alice", "bob", "dave"]));
        // Another group's message is not covered.
        feed(&mut b, sent("h", 11, "alice", &["bob"]));

        assert!(feed(&mut b, delivered("g", "carol", 12)).is_empty());
        // bob's report covers 10 and 12 (11 is his own): 10 is now delivered to everyone.
        assert_eq!(feed(&mut b, delivered("g", "bob", 13)), vec![tick("alice", "g", 10, Delivered)]);
        // alice reports for 11 and 13; 11 completes its delivery.
        assert_eq!(feed(&mut b, delivered("g", "alice", 20)), vec![tick("bob", "g", 11, Delivered)]);
        // dave had nothing before 12; his report completes 12 and 13 (carol's covers only up to 12,
        // but 13 is carol's own).
        assert_eq!(
            feed(&mut b, delivered("g", "dave", 13)),
            vec![tick("alice", "g", 12, Delivered), tick("carol", "g", 13, Delivered)]
        );
        // Reads: carol reads up to 11, bob up to 13.
        assert!(feed(&mut b, read("g", "carol", 11)).is_empty());
        assert_eq!(feed(&mut b, read("g", "bob", 13)), vec![tick("alice", "g", 10, Read)]);
        assert_eq!(feed(&mut b, read("g", "alice", 13)), vec![tick("bob", "g", 11, Read)]);
        assert_eq!(feed(&mut b, read("g", "dave", 13)), vec![tick("carol", "g", 13, Read)]);
        // A lower up_to than already reported changes nothing; carol's next read completes 12.
        assert!(feed(&mut b, read("g", "carol", 5)).is_empty());
        assert_eq!(feed(&mut b, read("g", "carol", 12)), vec![tick("alice", "g", 12, Read)]);
        assert_eq!(b.entries(), 1, "only h/11 pending");
        // Group h was not touched by any of it.
        assert_eq!(b.who("h", 11, 1_000).unwrap().delivered, Vec::<String>::new());
        assert_eq!(
            feed(&mut b, read("h", "bob", 11)),
            vec![tick("alice", "h", 11, Delivered), tick("alice", "h", 11, Read)]
        );
    }

    #[test]
    fn one_report_completing_several_messages_ticks_them_in_order() {
        let mut b = book();
        for sid in [5, 2, 9] {
            feed(&mut b, sent("g", sid, "alice", &["bob"]));
        }
        assert_eq!(
            feed(&mut b, read("g", "bob", 9)),
            vec![
                tick("alice", "g", 2, Delivered),
                tick("alice", "g", 2, Read),
                tick("alice", "g", 5, Delivered),
                tick("alice", "g", 5, Read),
                tick("alice", "g", 9, Delivered),
                tick("alice", "g", 9, Read),
            ]
        );
        assert_eq!(b.entries(), 0);
    }

    #[test]
    fn ticks_name_the_inbox_dedup_id_and_item() {
        let mut b = book();
        b.apply(&sent("g1", 42, "alice", &["bob"]), 10, &mut Vec::new()).unwrap();
        let mut t = Vec::new();
        b.apply(&delivered("g1", "bob", 42), 77, &mut t).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].subject(), "inbox.alice");
        assert_eq!(t[0].dedup_id(), "gr|g1|42|delivered");
        assert_eq!(
            String::from_utf8(t[0].item().to_bytes()).unwrap(),
            r#"{"k":"group_receipt","group":"g1","sid":42,"status":"delivered","ts":77}"#
        );
    }

    #[test]
    fn the_cap_evicts_the_oldest_first() {
        let mut b = ReceiptBook::new(BookConfig { max_entries: 3, ..BookConfig::default() });
        // Stored at 100, 50, 300, 200: age, not sid or arrival, decides.
        feed_at(&mut b, sent("g", 1, "alice", &["bob"]), 100);
        feed_at(&mut b, sent("g", 2, "alice", &["bob"]), 50);
        feed_at(&mut b, sent("h", 3, "alice", &["bob"]), 300);
        assert_eq!(b.evictions(), 0);
        feed_at(&mut b, sent("h", 4, "alice", &["bob"]), 200);
        assert_eq!((b.entries(), b.evictions()), (3, 1));
        assert!(b.who("g", 2, 1_000).is_none());
        feed_at(&mut b, sent("h", 5, "alice", &["bob"]), 400);
        assert_eq!((b.entries(), b.evictions()), (3, 2));
        assert!(b.who("g", 1, 1_000).is_none());
        // Reports for evicted messages tick nothing; the rest still work.
        assert!(feed(&mut b, delivered("g", "bob", 2)).is_empty());
        assert_eq!(feed(&mut b, delivered("h", "bob", 3)), vec![tick("alice", "h", 3, Delivered)]);
        assert_eq!(b.entries(), 3);
    }

    #[test]
    fn old_messages_expire() {
        let mut b = ReceiptBook::new(BookConfig { max_age_ms: 1_000, ..BookConfig::default() });
        feed_at(&mut b, sent("g", 1, "alice", &["bob"]), 10_000);
        feed_at(&mut b, sent("g", 2, "alice", &["bob"]), 10_500);
        feed_at(&mut b, sent("g", 3, "alice", &[]), 10_000);
        feed_at(&mut b, sent("g", 4, "alice", &["bob", "carol"]), 10_600);
        assert_eq!(b.expire(11_000), 0);
        assert_eq!(b.expire(11_400), 1);
        assert_eq!((b.entries(), b.evictions()), (2, 1));
        assert!(b.who("g", 1, 11_400).is_none());
        // A completed message is forgotten after the max age too.
        assert!(b.who("g", 3, 10_900).is_some());
        assert!(b.who("g", 3, 11_400).is_none());
        assert_eq!(b.expire(u64::MAX), 2);
        assert_eq!(b.entries(), 0);
        assert_eq!(b.expire(0), 0);
    }

    #[test]
    fn unknown_messages_are_not_found() {
        let mut b = book();
        assert!(b.who("g", 1, 0).is_none());
        feed(&mut b, sent("g", 1, "alice", &["bob"]));
        assert!(b.who("g", 2, 0).is_none());
        assert!(b.who("h", 1, 0).is_none());
        assert!(b.who("", 1, 0).is_none());
        assert!(b.who("g", 1, 0).is_some());
        // Reports for unknown groups or messages are accepted and change nothing.
        assert!(feed(&mut b, delivered("nope", "bob", 99)).is_empty());
        assert!(feed(&mut b, read("nope", "bob", u64::MAX)).is_empty());
    }

    #[test]
    fn reports_from_non_recipients_are_ignored() {
        let mut b = book();
        feed(&mut b, sent("g", 1, "alice", &["alice", "bob", "carol"]));
        // The sender is not a recipient of its own message, even when listed.
        assert_eq!(b.who("g", 1, 0).unwrap().recipients, 2);
        assert!(feed(&mut b, read("g", "alice", 1)).is_empty());
        assert!(feed(&mut b, read("g", "mallory", 1)).is_empty());
        assert!(feed(&mut b, read("g", "bob", 1)).is_empty());
        let w = b.who("g", 1, 0).unwrap();
        assert_eq!((w.recipients, w.delivered, w.read), (2, names(&["bob"]), names(&["bob"])));
        assert_eq!(
            feed(&mut b, read("g", "carol", 1)),
            vec![tick("alice", "g", 1, Delivered), tick("alice", "g", 1, Read)]
        );
    }

    #[test]
    fn a_repeated_sent_does_not_reset_progress() {
        let mut b = book();
        feed(&mut b, sent("g", 1, "alice", &["bob", "carol"]));
        feed(&mut b, delivered("g", "bob", 1));
        assert!(feed(&mut b, sent("g", 1, "mallory", &["dave"])).is_empty());
        let w = b.who("g", 1, 0).unwrap();
        assert_eq!((w.recipients, w.delivered), (2, names(&["bob"])));
        assert_eq!(feed(&mut b, delivered("g", "carol", 1)), vec![tick("alice", "g", 1, Delivered)]);
    }

    #[test]
    fn reports_before_the_sent_are_applied_when_it_arrives() {
        let mut b = book();
        // The group needs a pending message for reports to be remembered (erin never reports).
        feed(&mut b, sent("g", 1, "alice", &["bob", "carol", "erin"]));
        feed(&mut b, read("g", "bob", 5));
        feed(&mut b, delivered("g", "carol", 5));
        // Message 3 was recorded late: bob read it, carol has it.
        assert_eq!(feed(&mut b, sent("g", 3, "dave", &["bob", "carol"])), vec![tick("dave", "g", 3, Delivered)]);
        assert_eq!(feed(&mut b, read("g", "carol", 3)), vec![tick("dave", "g", 3, Read)]);
        // A message after the reports starts from nothing.
        assert!(feed(&mut b, sent("g", 6, "dave", &["bob"])).is_empty());
        // One that every recipient has read already completes on arrival.
        assert_eq!(
            feed(&mut b, sent("g", 4, "carol", &["bob"])),
            vec![tick("carol", "g", 4, Delivered), tick("carol", "g", 4, Read)]
        );
        assert_eq!(b.who("g", 4, 1_000).unwrap().read, names(&["bob"]));
    }

    #[test]
    fn a_message_without_recipients_is_complete_without_ticks() {
        let mut b = book();
        assert!(feed(&mut b, sent("g", 1, "alice", &[])).is_empty());
        assert!(feed(&mut b, sent("g", 2, "alice", &["alice", "no.pe", ""])).is_empty());
        assert_eq!(b.entries(), 0);
        let w = b.who("g", 2, 1_000).unwrap();
        assert_eq!((w.recipients, w.delivered.len(), w.read.len()), (0, 0, 0));
    }

    #[test]
    fn odd_input_never_panics() {
        let mut b = book();
        let mut t = Vec::new();
        // Invalid ids are rejected.
        assert_eq!(b.apply(&sent("g.x", 1, "alice", &["bob"]), 0, &mut t), Err(Rejected::BadGroup));
        assert_eq!(b.apply(&sent("", 1, "alice", &["bob"]), 0, &mut t), Err(Rejected::BadGroup));
        assert_eq!(b.apply(&sent("g", 1, "al ice", &["bob"]), 0, &mut t), Err(Rejected::BadUser));
        assert_eq!(b.apply(&delivered("g", "b*", 1), 0, &mut t), Err(Rejected::BadUser));
        assert_eq!(b.apply(&read("g>", "bob", 1), 0, &mut t), Err(Rejected::BadGroup));
        assert_eq!(b.entries(), 0);
        // Extreme numbers, repeated and invalid recipients.
        feed_at(&mut b, sent("g", 0, "alice", &["bob", "bob", "x y", "carol"]), 0);
        feed_at(&mut b, sent("g", u64::MAX, "alice", &["bob"]), u64::MAX);
        assert_eq!(b.who("g", 0, 0).unwrap().recipients, 2);
        assert!(feed(&mut b, delivered("g", "bob", 0)).is_empty());
        assert!(feed(&mut b, delivered("g", "bob", 0)).is_empty());
        assert_eq!(feed(&mut b, delivered("g", "carol", 0)), vec![tick("alice", "g", 0, Delivered)]);
        assert_eq!(feed(&mut b, delivered("g", "bob", u64::MAX)), vec![tick("alice", "g", u64::MAX, Delivered)]);
        assert!(feed(&mut b, delivered("g", "bob", u64::MAX)).is_empty());
        assert!(feed(&mut b, read("g", "bob", u64::MAX)).len() == 1);
        assert!(feed(&mut b, read("g", "bob", 0)).is_empty());
        assert_eq!(feed(&mut b, read("g", "carol", u64::MAX)), vec![tick("alice", "g", 0, Read)]);
        assert_eq!(b.entries(), 0);
        assert_eq!(b.expire(u64::MAX), 0);
        assert_eq!(b.expire(0), 0);
        // Zero caps.
        let mut z = ReceiptBook::new(BookConfig { max_entries: 0, max_age_ms: 0, done_capacity: 0 });
        assert!(feed(&mut z, sent("g", 1, "alice", &["bob"])).is_empty());
        assert_eq!((z.entries(), z.evictions()), (0, 1));
        assert!(feed(&mut z, read("g", "bob", 1)).is_empty());
        assert!(feed(&mut z, sent("g", 2, "alice", &[])).is_empty());
        assert!(z.who("g", 2, 0).is_none());
    }

    #[test]
    fn completed_messages_are_remembered_in_a_bounded_lru() {
        let mut b = ReceiptBook::new(BookConfig { done_capacity: 2, ..BookConfig::default() });
        for sid in 1..=3 {
            feed(&mut b, sent("g", sid, "alice", &["bob"]));
        }
        feed(&mut b, read("g", "bob", 1));
        feed(&mut b, read("g", "bob", 2));
        // Using 1 makes 2 the least recently used.
        assert!(b.who("g", 1, 1_000).is_some());
        feed(&mut b, read("g", "bob", 3));
        assert_eq!(b.done_entries(), 2);
        assert!(b.who("g", 2, 1_000).is_none());
        assert_eq!(b.who("g", 1, 1_000).unwrap().read, names(&["bob"]));
        assert_eq!(b.who("g", 3, 1_000).unwrap().delivered, names(&["bob"]));
        // A forgotten message's Sent replayed again starts it afresh (no way to know better).
        assert!(feed(&mut b, sent("g", 2, "alice", &["bob"])).is_empty());
        assert_eq!(b.entries(), 1);
    }

    #[test]
    fn recipient_sets_are_shared_between_messages() {
        let mut b = book();
        feed(&mut b, sent("g", 1, "alice", &["carol", "bob"]));
        feed(&mut b, sent("g", 2, "dave", &["bob", "carol", "bob"]));
        let g = &b.groups["g"];
        assert!(Arc::ptr_eq(&g.entries[&1].recipients, &g.entries[&2].recipients));
        feed(&mut b, sent("g", 3, "alice", &["bob"]));
        let g = &b.groups["g"];
        assert!(!Arc::ptr_eq(&g.entries[&1].recipients, &g.entries[&3].recipients));
    }

    #[test]
    fn reset_forgets_everything() {
        let mut b = book();
        feed(&mut b, sent("g", 1, "alice", &["bob"]));
        feed(&mut b, sent("g", 2, "alice", &[]));
        b.reset();
        assert_eq!((b.entries(), b.done_entries()), (0, 0));
        assert!(b.who("g", 1, 0).is_none());
        // Rebuilding from the same events gives the same ticks.
        feed(&mut b, sent("g", 1, "alice", &["bob"]));
        assert_eq!(feed(&mut b, delivered("g", "bob", 1)), vec![tick("alice", "g", 1, Delivered)]);
    }

    #[test]
    fn many_members_beyond_the_mark_cap_still_complete() {
        let mut b = book();
        let n = MAX_MARKS_PER_GROUP + 100;
        let members: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
        let refs: Vec<&str> = members.iter().map(|s| s.as_str()).collect();
        feed(&mut b, sent("g", 1, "alice", &refs));
        feed(&mut b, sent("g", 2, "alice", &refs));
        let mut ticks = Vec::new();
        for m in &members {
            ticks.extend(feed(&mut b, read("g", m, 2)));
        }
        assert_eq!(
            ticks,
            vec![
                tick("alice", "g", 1, Delivered),
                tick("alice", "g", 1, Read),
                tick("alice", "g", 2, Delivered),
                tick("alice", "g", 2, Read)
            ]
        );
    }

    /// A deliberately naive model: every report walks every message of the group.
    #[derive(Default)]
    struct Model {
        msgs: BTreeMap<(String, u64), ModelMsg>,
    }

    struct ModelMsg {
        sender: String,
        recipients: BTreeSet<String>,
        delivered: BTreeSet<String>,
        read: BTreeSet<String>,
        delivered_ticked: bool,
        read_ticked: bool,
    }

    type T = (String, String, u64, ReceiptStatus);

    impl Model {
        fn apply(&mut self, ev: &ReceiptEvent, out: &mut Vec<T>) {
            match ev {
                ReceiptEvent::Sent { group, sid, sender, recipients } => {
                    let recipients = recipients.iter().filter(|r| *r != sender).cloned().collect();
                    self.msgs.entry((group.clone(), *sid)).or_insert(ModelMsg {
                        sender: sender.clone(),
                        recipients,
                        delivered: BTreeSet::new(),
                        read: BTreeSet::new(),
                        delivered_ticked: false,
                        read_ticked: false,
                    });
                }
                ReceiptEvent::Delivered { group, by, up_to } | ReceiptEvent::Read { group, by, up_to } => {
                    let read = matches!(ev, ReceiptEvent::Read { .. });
                    for ((g, sid), m) in self.msgs.iter_mut() {
                        if g != group || sid > up_to || !m.recipients.contains(by) {
                            continue;
                        }
                        m.delivered.insert(by.clone());
                        if read {
                            m.read.insert(by.clone());
                        }
                        if !m.delivered_ticked && m.delivered.len() == m.recipients.len() {
                            m.delivered_ticked = true;
                            out.push((m.sender.clone(), g.clone(), *sid, Delivered));
                        }
                        if !m.read_ticked && m.read.len() == m.recipients.len() {
                            m.read_ticked = true;
                            out.push((m.sender.clone(), g.clone(), *sid, Read));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_a_naive_model_on_random_events() {
        // A small deterministic generator (xorshift): no extra dependency, reproducible.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        let users: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
        let mut ticks = 0;
        for round in 0..300 {
            let mut b = book();
            let mut model = Model::default();
            // Per group, the sids recorded so far. As in the system, a report only covers messages
            // whose Sent is already recorded (the router records before it fans out).
            let mut sids: Vec<Vec<u64>> = vec![Vec::new(); 3];
            for step in 0..200 {
                let gi = rnd(3) as usize;
                let group = format!("g{gi}");
                let top = sids[gi].last().copied().unwrap_or(0);
                let user = users[rnd(10) as usize].clone();
                let ev = match rnd(10) {
                    0..=2 => {
                        let sid = if !sids[gi].is_empty() && rnd(5) == 0 {
                            // A repeated Sent (with other content: the first one counts).
                            sids[gi][rnd(sids[gi].len() as u64) as usize]
                        } else {
                            let sid = top + 1 + rnd(3);
                            sids[gi].push(sid);
                            sid
                        };
                        let recipients = (0..rnd(7)).map(|_| users[rnd(10) as usize].clone()).collect();
                        ReceiptEvent::Sent { group, sid, sender: user, recipients }
                    }
                    3..=6 => ReceiptEvent::Delivered { group, by: user, up_to: rnd(top + 1) },
                    _ => ReceiptEvent::Read { group, by: user, up_to: rnd(top + 1) },
                };
                let mut want = Vec::new();
                model.apply(&ev, &mut want);
                let got = feed(&mut b, ev.clone());
                assert_eq!(got, want, "round {round} step {step}: {ev:?}");
                ticks += got.len();
            }
            // The book holds exactly the messages the model has not seen read by everyone.
            let pending = model.msgs.values().filter(|m| !m.recipients.is_empty() && !m.read_ticked).count();
            assert_eq!(b.entries(), pending, "round {round}");
            for ((g, sid), m) in &model.msgs {
                let w = b.who(g, *sid, 1_000).expect("known");
                assert_eq!(w.recipients, m.recipients.len());
                assert_eq!(w.delivered, m.delivered.iter().cloned().collect::<Vec<_>>());
                assert_eq!(w.read, m.read.iter().cloned().collect::<Vec<_>>());
            }
        }
        assert!(ticks > 1000, "the generator exercises completion ({ticks} ticks)");
    }
}
