//! The delivery ledger of a chat run. Every sender numbers its messages 0, 1, 2… and writes the
//! number into the body; the `sent` tick comes back with the client id, which encodes the same
//! number. After the run the ledger checks that every message acknowledged as `sent` reached its
//! recipient exactly once, in per-sender order, and nowhere else.
//!
//! Receivers that reconnect (`offline`, `storm`) filter what the server sends the way
//! PROTOCOL.md asks of clients: an item whose `seq` they already hold is dropped (the server
//! may resend what was not acknowledged: allowed, counted as `redelivered`), and a chat message
//! whose `(from, id)` they already hold is dropped too (the same message stored twice under a
//! new `seq`: counted as `duplicates`, a violation of the send deduplication). What is left is
//! what the app would show; that is what `lost`, `reordered` and `misdelivered` judge.
//!
//! Nothing is shared while the run is hot: each connection keeps its own records, and the check
//! joins them at the end.

use fxhash::FxHashMap;
use serde::{Deserialize, Serialize};

/// What the sender knows about its message `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SendStatus {
    /// Issued, never answered.
    Unanswered = 0,
    /// Answered by `sent`.
    Sent = 1,
    /// Answered by `error`.
    Failed = 2,
}

/// The sender side of one connection: the answer to each of its messages.
#[derive(Default)]
pub struct SenderBook {
    status: Vec<u8>,
    /// `sent` ticks for a message that already had one.
    pub repeated_ticks: u64,
    /// `sent` ticks with `dup: true` (the backbone saw the id before; loadgen never retries).
    pub dup_flagged: u64,
    /// Ticks or errors naming a message this sender never issued.
    pub unknown_ids: u64,
}

impl SenderBook {
    fn slot(&mut self, seq: u64) -> &mut u8 {
        let i = seq as usize;
        if i >= self.status.len() {
            self.status.resize(i + 1, SendStatus::Unanswered as u8);
        }
        &mut self.status[i]
    }

    pub fn sent(&mut self, seq: u64, dup: bool) {
        if dup {
            self.dup_flagged += 1;
        }
        let s = self.slot(seq);
        let repeated = *s == SendStatus::Sent as u8;
        *s = SendStatus::Sent as u8;
        if repeated {
            self.repeated_ticks += 1;
        }
    }

    pub fn failed(&mut self, seq: u64) {
        let s = self.slot(seq);
        if *s != SendStatus::Sent as u8 {
            *s = SendStatus::Failed as u8;
        }
    }

    pub fn status(&self, seq: u64) -> SendStatus {
        match self.status.get(seq as usize) {
            Some(1) => SendStatus::Sent,
            Some(2) => SendStatus::Failed,
            _ => SendStatus::Unanswered,
        }
    }
}

#[derive(Default)]
struct FromSender {
    /// Deliveries of each sender sequence number (saturating).
    counts: Vec<u8>,
    /// Highest sender sequence delivered so far (for order).
    max_seq: Option<u64>,
}

/// The receiver side of one connection: what arrived, from whom.
#[derive(Default)]
pub struct ReceiverBook {
    from: FxHashMap<u32, FromSender>,
    /// A message arrived after a later message of the same sender.
    pub reordered: u64,
    /// Inbox items whose `seq` was not above the previous item's on the same connection (inbox
    /// order broken, or an item sent twice on one connection). These are not entered again.
    pub seq_regressions: u64,
    /// Items, on a new connection, whose `seq` this receiver already held: resent by the server
    /// after a reconnect because they had not been acknowledged. Allowed; dropped by `seq`.
    pub redelivered: u64,
    /// Highest inbox sequence held (over all connections).
    last_inbox_seq: u64,
    /// Highest inbox sequence received on the current connection.
    conn_seq: u64,
    /// Chat items whose sender or body loadgen could not read.
    pub unreadable: u64,
}

/// What a delivery was, for the caller's live counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    First,
    Duplicate,
}

impl ReceiverBook {
    /// A new connection starts: its items may repeat what earlier connections delivered.
    pub fn new_connection(&mut self) {
        self.conn_seq = 0;
    }

    /// The highest inbox sequence held: what to `ack`, and the `since` of a reconnect.
    pub fn held(&self) -> u64 {
        self.last_inbox_seq
    }

    /// Records the inbox sequence of any item (chat or receipt); false when the item is not new
    /// (a regression on this connection, or a redelivery of a held item after a reconnect).
    pub fn inbox_seq(&mut self, seq: u64) -> bool {
        if seq <= self.conn_seq {
            self.seq_regressions += 1;
            return false;
        }
        self.conn_seq = seq;
        if seq <= self.last_inbox_seq {
            self.redelivered += 1;
            return false;
        }
        self.last_inbox_seq = seq;
        true
    }

    /// Records chat message `seq` of `sender` (call after [`Self::inbox_seq`] said it advanced).
    pub fn chat(&mut self, sender: u32, seq: u64) -> Arrival {
        let f = self.from.entry(sender).or_default();
        let i = seq as usize;
        if i >= f.counts.len() {
            f.counts.resize(i + 1, 0);
        }
        let c = &mut f.counts[i];
        *c = c.saturating_add(1);
        if *c > 1 {
            return Arrival::Duplicate;
        }
        match f.max_seq {
            Some(m) if seq < m => self.reordered += 1,
            _ => f.max_seq = Some(seq),
        }
        Arrival::First
    }

    pub fn count(&self, sender: u32, seq: u64) -> u32 {
        self.from.get(&sender).and_then(|f| f.counts.get(seq as usize)).copied().unwrap_or(0) as u32
    }
}

/// The verdict.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Messages issued by senders.
    pub issued: u64,
    /// Answered by `sent`.
    pub acknowledged: u64,
    /// Answered by `error`.
    pub failed: u64,
    /// Never answered (neither `sent` nor `error`) by the end of the grace period.
    pub unanswered: u64,
    /// Deliveries of acknowledged messages that happened exactly once (one per recipient: a
    /// group message to K members counts K).
    pub delivered_once: u64,
    /// Deliveries of acknowledged messages that never happened (per recipient). A violation.
    pub lost: u64,
    /// Extra deliveries of a message under a new inbox sequence (stored twice). A violation.
    pub duplicates: u64,
    /// Deliveries out of per-sender order. A violation.
    pub reordered: u64,
    /// Inbox items sent on one connection with a sequence not above the previous one. A
    /// violation (items of one inbox arrive in `seq` order).
    pub seq_regressions: u64,
    /// Items resent after a reconnect with a `seq` the receiver already held (not yet
    /// acknowledged when the connection ended). Allowed: at-least-once delivery, dropped by
    /// `seq` on the client.
    pub redelivered: u64,
    /// Delivered to a user who was not the recipient. A violation.
    pub misdelivered: u64,
    /// Delivered but never issued by that sender. A violation.
    pub phantom: u64,
    /// Messages without a `sent` tick that were delivered anyway (allowed: at-least-once store
    /// after an unconfirmed publish).
    pub delivered_unacknowledged: u64,
    /// Duplicate or unsolicited `sent` ticks.
    pub repeated_ticks: u64,
    pub dup_flagged_ticks: u64,
    pub unknown_ids: u64,
    /// Chat items loadgen could not read.
    pub unreadable: u64,
}

impl Check {
    /// Adds the verdict of another, disjoint set of books (another worker process's).
    pub fn merge(&mut self, o: &Check) {
        self.issued += o.issued;
        self.acknowledged += o.acknowledged;
        self.failed += o.failed;
        self.unanswered += o.unanswered;
        self.delivered_once += o.delivered_once;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.seq_regressions += o.seq_regressions;
        self.redelivered += o.redelivered;
        self.misdelivered += o.misdelivered;
        self.phantom += o.phantom;
        self.delivered_unacknowledged += o.delivered_unacknowledged;
        self.repeated_ticks += o.repeated_ticks;
        self.dup_flagged_ticks += o.dup_flagged_ticks;
        self.unknown_ids += o.unknown_ids;
        self.unreadable += o.unreadable;
    }

    pub fn violations(&self) -> u64 {
        self.lost
            + self.duplicates
            + self.reordered
            + self.seq_regressions
            + self.misdelivered
            + self.phantom
            + self.unreadable
    }
}

/// Joins the books. `issued[s]` is how many messages sender `s` issued; `targets(s, seq)` are the
/// recipients of message `seq` of `s` (one for 1:1, the other members for a group).
pub fn check<'a>(
    issued: &[u64],
    senders: &[SenderBook],
    receivers: &[ReceiverBook],
    targets: impl Fn(usize, u64) -> &'a [usize],
) -> Check {
    let mut c = Check::default();
    for (s, book) in senders.iter().enumerate() {
        c.repeated_ticks += book.repeated_ticks;
        c.dup_flagged_ticks += book.dup_flagged;
        c.unknown_ids += book.unknown_ids;
        for seq in 0..issued[s] {
            c.issued += 1;
            let status = book.status(seq);
            match status {
                SendStatus::Sent => c.acknowledged += 1,
                SendStatus::Failed => c.failed += 1,
                SendStatus::Unanswered => c.unanswered += 1,
            }
            for &r in targets(s, seq) {
                let n = receivers[r].count(s as u32, seq);
                if n > 1 {
                    c.duplicates += (n - 1) as u64;
                }
                match (status, n) {
                    (SendStatus::Sent, 0) => c.lost += 1,
                    (SendStatus::Sent, 1) => c.delivered_once += 1,
                    (SendStatus::Sent, _) => {}
                    (_, 0) => {}
                    (_, _) => c.delivered_unacknowledged += 1,
                }
            }
        }
    }
    for (r, book) in receivers.iter().enumerate() {
        c.reordered += book.reordered;
        c.seq_regressions += book.seq_regressions;
        c.redelivered += book.redelivered;
        c.unreadable += book.unreadable;
        for (&s, f) in &book.from {
            for (seq, &n) in f.counts.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let seq = seq as u64;
                let s = s as usize;
                if s >= issued.len() || seq >= issued[s] {
                    c.phantom += n as u64;
                } else if !targets(s, seq).contains(&r) {
                    c.misdelivered += n as u64;
                }
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_run_passes() {
        // Two users, pairs: 0 -> 1, 1 -> 0.
        let mut senders = vec![SenderBook::default(), SenderBook::default()];
        let mut receivers = vec![ReceiverBook::default(), ReceiverBook::default()];
        let mut inbox = [0u64; 2];
        for (s, sender) in senders.iter_mut().enumerate() {
            for seq in 0..5 {
                sender.sent(seq, false);
                let r = 1 - s;
                inbox[r] += 1;
                assert!(receivers[r].inbox_seq(inbox[r]));
                assert_eq!(receivers[r].chat(s as u32, seq), Arrival::First);
            }
        }
        let other = [1, 0];
        let c = check(&[5, 5], &senders, &receivers, |s, _| std::slice::from_ref(&other[s]));
        assert_eq!(c.violations(), 0, "{c:?}");
        assert_eq!(c.delivered_once, 10);
    }

    #[test]
    fn group_messages_count_per_recipient() {
        // One group of three: each message of a member goes to the two others.
        let members: [Vec<usize>; 3] = [vec![1, 2], vec![0, 2], vec![0, 1]];
        let mut senders: Vec<SenderBook> = (0..3).map(|_| SenderBook::default()).collect();
        let mut receivers: Vec<ReceiverBook> = (0..3).map(|_| ReceiverBook::default()).collect();
        let mut inbox = [0u64; 3];
        for s in 0..3usize {
            for seq in 0..4 {
                senders[s].sent(seq, false);
                for &r in &members[s] {
                    // Member 2 never gets message 3 of member 0.
                    if (s, seq, r) == (0, 3, 2) {
                        continue;
                    }
                    inbox[r] += 1;
                    receivers[r].inbox_seq(inbox[r]);
                    receivers[r].chat(s as u32, seq);
                }
            }
        }
        // Member 0 also gets its own message: misdelivered.
        receivers[0].inbox_seq(100);
        receivers[0].chat(0, 1);
        let c = check(&[4, 4, 4], &senders, &receivers, |s, _| &members[s]);
        assert_eq!(c.acknowledged, 12);
        assert_eq!(c.delivered_once, 23);
        assert_eq!(c.lost, 1);
        assert_eq!(c.misdelivered, 1);
        assert_eq!(c.violations(), 2);
    }

    #[test]
    fn merged_checks_add_up_and_survive_json() {
        let a = Check { issued: 3, acknowledged: 2, unanswered: 1, delivered_once: 2, ..Default::default() };
        let b = Check { issued: 4, acknowledged: 4, delivered_once: 3, lost: 1, phantom: 2, ..Default::default() };
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!((m.issued, m.acknowledged, m.unanswered, m.delivered_once), (7, 6, 1, 5));
        assert_eq!(m.violations(), 3, "one lost, two phantom");
        let back: Check = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        // Merging an empty verdict changes nothing.
        m.merge(&Check::default());
        assert_eq!(back, m);
    }

    #[test]
    fn finds_loss_duplicates_order_and_misdelivery() {
        let mut senders = vec![SenderBook::default(), SenderBook::default()];
        let mut receivers = vec![ReceiverBook::default(), ReceiverBook::default()];
        for seq in 0..4 {
            senders[0].sent(seq, false);
        }
        senders[0].failed(4);
        let r = &mut receivers[1];
        let mut n = 0;
        let mut deliver = |r: &mut ReceiverBook, seq| {
            n += 1;
            r.inbox_seq(n);
            r.chat(0, seq)
        };
        deliver(r, 0);
        deliver(r, 2);
        deliver(r, 1); // reordered
        assert_eq!(deliver(r, 2), Arrival::Duplicate);
        deliver(r, 4); // failed but delivered: allowed
        assert!(!r.inbox_seq(3)); // regression
                                  // seq 3 lost; receiver 0 gets a phantom from sender 0 (seq 9) and a misdelivery (seq 0).
        receivers[0].inbox_seq(1);
        receivers[0].chat(0, 0);
        receivers[0].inbox_seq(2);
        receivers[0].chat(0, 9);
        let other = [1, 0];
        let c = check(&[5, 0], &senders, &receivers, |s, _| std::slice::from_ref(&other[s]));
        assert_eq!(c.lost, 1);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.reordered, 1);
        assert_eq!(c.seq_regressions, 1);
        assert_eq!(c.phantom, 1);
        assert_eq!(c.misdelivered, 1);
        assert_eq!(c.failed, 1);
        assert_eq!(c.delivered_unacknowledged, 1);
        assert_eq!(c.delivered_once, 2);
    }
}
