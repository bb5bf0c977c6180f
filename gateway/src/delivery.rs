//! Per-connection delivery bookkeeping, sans I/O: which inbox items the client has been sent and
//! has acknowledged, whether a live copy is new, a repeat, or proof that something was missed,
//! and which delivery receipts an acknowledgement produces.
//!
//! Every live copy carries its inbox sequence and the sequence of the previous item stored for
//! the same user (JetStream's `Nats-Last-Sequence` on republished messages). If that previous
//! item is newer than anything this connection sent, the live path dropped something (a slow
//! consumer, a NATS reconnect, a full queue) and the connection resyncs from the inbox.

use std::collections::VecDeque;

/// What to do with a live copy.
#[derive(Debug, PartialEq, Eq)]
pub enum Live {
    /// Send it.
    Deliver,
    /// Already sent (the inbox drain got it first); drop it.
    Duplicate,
    /// Something before it was missed: drain the inbox from the last sent sequence.
    Gap,
}

/// Whom a delivered item earns a receipt for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptTarget {
    /// A 1:1 message from this sender; its sid is its inbox sequence.
    Direct(String),
    /// A group message: the group and the message's position in the group timeline.
    Group(String, u64),
}

/// What an acknowledgement changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Acked {
    /// The device's new cursor.
    pub cursor: u64,
    /// Delivery receipts to send: (sender, highest acknowledged sid of theirs).
    pub receipts: Vec<(String, u64)>,
    /// Group delivery receipts: (group, highest acknowledged group sid).
    pub group_receipts: Vec<(String, u64)>,
}

/// Receipt bookkeeping per connection: how many sent-but-unacked chat items it remembers (a
/// type parameter rather than a field: this state is part of every idle connection).
pub const MAX_UNACKED_TRACKED: usize = 1024;

#[derive(Debug)]
pub struct Delivery<const MAX_UNACKED: usize = MAX_UNACKED_TRACKED> {
    sent: u64,
    acked: u64,
    /// Chat items sent but not acknowledged: (seq, sender). Bounded; receipts are cumulative per
    /// conversation, so forgetting the oldest only delays a tick until a later message of the
    /// same sender is acknowledged.
    unacked: VecDeque<(u64, ReceiptTarget)>,
}

impl<const MAX_UNACKED: usize> Delivery<MAX_UNACKED> {
    /// Starts after `resume_from`: the client holds every item up to it.
    pub fn new(resume_from: u64) -> Self {
        Delivery { sent: resume_from, acked: resume_from, unacked: VecDeque::new() }
    }

    /// Highest sequence sent to the client.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Classifies a live copy with sequence `seq` whose predecessor for this user is `prev`
    /// (0 when unknown or deleted).
    pub fn classify_live(&self, seq: u64, prev: u64) -> Live {
        if seq <= self.sent {
            Live::Duplicate
        } else if prev > self.sent {
            Live::Gap
        } else {
            Live::Deliver
        }
    }

    /// Records that item `seq` was sent; `target` is set for messages, which earn a receipt.
    pub fn mark_sent(&mut self, seq: u64, target: Option<ReceiptTarget>) {
        debug_assert!(seq > self.sent, "items are sent in sequence order");
        self.sent = seq;
        if let Some(t) = target {
            if self.unacked.len() == MAX_UNACKED {
                self.unacked.pop_front();
            }
            self.unacked.push_back((seq, t));
        }
    }

    /// The client holds everything up to `seq` (it said so when resuming): nothing up to it is
    /// sent again.
    pub fn skip_to(&mut self, seq: u64) {
        self.sent = self.sent.max(seq);
    }

    /// Applies a cumulative ack. An ack beyond what was sent is clamped (a client cannot make the
    /// server forget items it never received); one at or below the cursor changes nothing.
    pub fn ack(&mut self, seq: u64) -> Option<Acked> {
        let seq = seq.min(self.sent);
        if seq <= self.acked {
            return None;
        }
        self.acked = seq;
        let mut receipts: Vec<(String, u64)> = Vec::new();
        let mut group_receipts: Vec<(String, u64)> = Vec::new();
        while self.unacked.front().is_some_and(|(s, _)| *s <= seq) {
            let (s, target) = self.unacked.pop_front().expect("front exists");
            let (list, key, sid) = match target {
                ReceiptTarget::Direct(sender) => (&mut receipts, sender, s),
                ReceiptTarget::Group(group, sid) => (&mut group_receipts, group, sid),
            };
            match list.iter_mut().find(|(k, _)| *k == key) {
                Some(r) => r.1 = r.1.max(sid),
                None => list.push((key, sid)),
            }
        }
        if self.unacked.is_empty() {
            // Release the table: a connection that once had many items in flight and is idle
            // now should not keep their room (up to MAX_UNACKED entries of 40 bytes).
            self.unacked = VecDeque::new();
        }
        Some(Acked { cursor: seq, receipts, group_receipts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(s: &str) -> Option<ReceiptTarget> {
        Some(ReceiptTarget::Direct(s.to_owned()))
    }

    #[test]
    fn acking_everything_releases_the_table() {
        let mut d = Delivery::<64>::new(0);
        for seq in 1..=50 {
            d.mark_sent(seq, direct("bob"));
        }
        d.ack(20);
        assert!(d.unacked.capacity() >= 30, "items still unacked keep the table");
        let acked = d.ack(50).expect("new ack");
        assert_eq!(acked.receipts, vec![("bob".to_owned(), 50)]);
        assert_eq!(d.unacked.capacity(), 0, "an idle connection holds no table");
    }

    #[test]
    fn group_items_produce_group_receipts_by_group_sid() {
        let mut d = Delivery::<8>::new(0);
        d.mark_sent(7, Some(ReceiptTarget::Group("g".into(), 100)));
        d.mark_sent(9, Some(ReceiptTarget::Group("g".into(), 101)));
        d.mark_sent(10, direct("a"));
        let got = d.ack(10).unwrap();
        assert_eq!(got.group_receipts, vec![("g".to_owned(), 101)]);
        assert_eq!(got.receipts, vec![("a".to_owned(), 10)]);
    }

    #[test]
    fn live_copies_after_a_drain_are_deduplicated() {
        let mut d = Delivery::<8>::new(0);
        d.mark_sent(3, direct("a"));
        d.mark_sent(5, direct("a"));
        assert_eq!(d.classify_live(5, 3), Live::Duplicate);
        assert_eq!(d.classify_live(4, 0), Live::Duplicate);
        assert_eq!(d.classify_live(9, 5), Live::Deliver);
        assert_eq!(d.classify_live(9, 0), Live::Deliver);
        assert_eq!(d.classify_live(9, 7), Live::Gap);
    }

    #[test]
    fn acks_are_cumulative_clamped_and_produce_one_receipt_per_sender() {
        let mut d = Delivery::<8>::new(10);
        d.mark_sent(11, direct("a"));
        d.mark_sent(12, direct("b"));
        d.mark_sent(13, None);
        d.mark_sent(14, direct("a"));
        assert_eq!(d.ack(9), None);
        let got = d.ack(100).unwrap();
        assert_eq!(got.cursor, 14);
        assert_eq!(got.receipts, vec![("a".to_owned(), 14), ("b".to_owned(), 12)]);
        assert_eq!(d.ack(14), None);
    }

    #[test]
    fn partial_ack_keeps_the_rest() {
        let mut d = Delivery::<8>::new(0);
        d.mark_sent(1, direct("a"));
        d.mark_sent(2, direct("a"));
        assert_eq!(d.ack(1).unwrap().receipts, vec![("a".to_owned(), 1)]);
        assert_eq!(d.ack(2).unwrap().receipts, vec![("a".to_owned(), 2)]);
    }

    #[test]
    fn tracking_is_bounded() {
        let mut d = Delivery::<2>::new(0);
        for s in 1..=5 {
            d.mark_sent(s, direct(if s == 1 { "old" } else { "new" }));
        }
        let got = d.ack(5).unwrap();
        assert_eq!(got.receipts, vec![("new".to_owned(), 5)]);
    }
}
