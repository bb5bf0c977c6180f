//! The delivery probe of `connect`: once the hold's memory samples are taken, every held
//! connection of a worker sends exactly one chat message to the next held connection of the same
//! worker (a ring: c₀ → c₁ → … → c₀), so every held connection must receive exactly one message,
//! from its predecessor, with the id that predecessor used. The ledger of `chat` judges it
//! ([`crate::ledger`]): an acknowledged probe that never arrives is lost, one that arrives twice
//! is duplicated, one from anybody else is delivered to the wrong user.
//!
//! The probe message of connection `s` has the client id `0-<intended µs>` (sequence 0 of `s`,
//! the time its send was scheduled) and the same stamp at the start of its body, so the
//! receiver measures send → deliver latency without a shared table (sender and receiver are in
//! one process). Sends are paced by the worker (`--probe-rate`, shared over the workers by their
//! connections) and latency runs from the scheduled time, so a backed-up connection shows as
//! latency. Receivers do not `ack`: the users are throwaway (a fresh prefix), and an ack would add
//! a delivery receipt — a second stream write — per probe.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::Frame;
use crate::hist::{self, Hist};
use crate::ledger::{self, Arrival, Check, ReceiverBook, SenderBook};
use crate::session::parse_stamp;
use crate::util::parse_duration;

/// The probe's flags (flattened into `connect`'s).
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Skip the delivery probe (by default, after the hold every held connection sends one
    /// message to the next held connection of its worker and must receive exactly one).
    #[arg(long)]
    pub no_probe: bool,
    /// Probe sends per second over all workers (each worker paces its share).
    #[arg(long, default_value_t = 2000.0)]
    pub probe_rate: f64,
    /// After the last probe send is due, how long to wait for the missing `sent` ticks and
    /// deliveries before judging (the probe ends earlier once everything has arrived).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub probe_timeout: Duration,
}

impl ProbeArgs {
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.no_probe && (!self.probe_rate.is_finite() || self.probe_rate <= 0.0) {
            anyhow::bail!("--probe-rate must be > 0");
        }
        Ok(())
    }
}

/// What the parent asks a worker to do (one `probe <json>` line on its stdin).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Command {
    /// This worker's share of `--probe-rate`.
    pub rate: f64,
    pub timeout_ms: u64,
}

/// The one send a held connection is asked to make.
#[derive(Debug, Clone)]
pub struct Order {
    pub to: String,
    pub intended_us: u64,
}

/// The sequence number of the probe message of every sender (each sends one).
pub const SEQ: u64 = 0;

/// The ring over the worker's held connections (local indices, ascending): each sends to the
/// next and the last to the first, so each receives from exactly one. A lone connection sends
/// to itself (a 1:1 message to oneself is stored in one's own inbox like any other).
pub fn ring(live: &[usize]) -> Vec<(usize, usize)> {
    let n = live.len();
    (0..n).map(|i| (live[i], live[(i + 1) % n])).collect()
}

/// The users of one worker: `<prefix>-c<first + k>` for local index k < count.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
    pub first: u64,
    pub count: u64,
}

impl Names {
    pub fn name(&self, local: usize) -> String {
        format!("{}-c{}", self.prefix, self.first + local as u64)
    }

    /// The local index of a user id of this worker.
    pub fn local(&self, name: &str) -> Option<u32> {
        let i: u64 = name.strip_prefix(&self.prefix)?.strip_prefix("-c")?.parse().ok()?;
        let k = i.checked_sub(self.first)?;
        (k < self.count).then_some(k as u32)
    }
}

/// `{"t":"send",…}`: the probe of a sender, to `to`, scheduled at `intended_us`.
pub fn send_frame(to: &str, intended_us: u64) -> String {
    json!({"t": "send", "id": format!("{SEQ}-{intended_us}"), "to": to, "body": format!("{SEQ} {intended_us} probe")})
        .to_string()
}

/// The probe books of one connection.
#[derive(Default)]
pub struct Book {
    /// Probes this connection wrote (0 or 1).
    pub issued: u64,
    pub sender: SenderBook,
    pub receiver: ReceiverBook,
    /// Error frames by code.
    pub errors: BTreeMap<String, u64>,
    /// Inbox items other than chat messages.
    pub other_items: u64,
}

/// What a server frame was, for the connection's live counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Pong,
    /// The `sent` tick of this connection's probe, `latency_us` after its scheduled time.
    Ticked {
        latency_us: u64,
    },
    /// An `error` answering this connection's probe.
    Refused,
    /// The first delivery of a probe, `latency_us` after its scheduled send.
    Delivered {
        latency_us: u64,
    },
    /// A probe delivered again, or anything the ledger will judge (unreadable, regression).
    Judged,
    Other,
}

impl Book {
    /// Enters one server text frame, received at `now_us`.
    pub fn on_frame(&mut self, text: &str, names: &Names, now_us: u64) -> Seen {
        let Ok(f) = Frame::parse(text) else {
            *self.errors.entry("unparseable_frame".into()).or_default() += 1;
            return Seen::Other;
        };
        match &*f.t {
            "pong" => Seen::Pong,
            "sent" => match f.id.as_deref().and_then(|id| parse_stamp(id, '-')) {
                Some((seq, intended)) => {
                    self.sender.sent(seq, f.dup == Some(true));
                    Seen::Ticked { latency_us: now_us.saturating_sub(intended) }
                }
                None => {
                    self.sender.unknown_ids += 1;
                    Seen::Other
                }
            },
            "error" => {
                *self.errors.entry(format!("error_{}", f.code.as_deref().unwrap_or("unknown"))).or_default() += 1;
                match f.id.as_deref().map(|id| parse_stamp(id, '-')) {
                    Some(Some((seq, _))) => {
                        self.sender.failed(seq);
                        Seen::Refused
                    }
                    Some(None) => {
                        self.sender.unknown_ids += 1;
                        Seen::Other
                    }
                    None => Seen::Other,
                }
            }
            "msg" => {
                let Some(seq) = f.seq else {
                    *self.errors.entry("msg_without_seq".into()).or_default() += 1;
                    return Seen::Other;
                };
                if !self.receiver.inbox_seq(seq) {
                    return Seen::Judged;
                }
                let Some(m) = f.m.as_ref().filter(|m| m.k == "chat") else {
                    self.other_items += 1;
                    return Seen::Other;
                };
                let from = m.from.as_deref().and_then(|n| names.local(n));
                let stamp = m.id.as_deref().and_then(|id| parse_stamp(id, '-'));
                match (from, stamp) {
                    (Some(s), Some((mseq, intended))) => match self.receiver.chat(s, mseq) {
                        Arrival::First => Seen::Delivered { latency_us: now_us.saturating_sub(intended) },
                        Arrival::Duplicate => Seen::Judged,
                    },
                    // From a user outside this worker's ring, or without a readable id.
                    _ => {
                        self.receiver.unreadable += 1;
                        Seen::Judged
                    }
                }
            }
            _ => Seen::Other,
        }
    }
}

/// Judges the books of a worker's connections: `target[s]` is whom connection `s` was asked to
/// send to. Takes the books out (later arrivals are not counted: the probe has ended).
pub fn judge(books: &mut [Book], target: &[Option<usize>]) -> Check {
    let issued: Vec<u64> = books.iter().map(|b| b.issued).collect();
    let senders: Vec<SenderBook> = books.iter_mut().map(|b| std::mem::take(&mut b.sender)).collect();
    let receivers: Vec<ReceiverBook> = books.iter_mut().map(|b| std::mem::take(&mut b.receiver)).collect();
    let index: Vec<usize> = (0..books.len()).collect();
    // A delivery from a sender that was given no target (not in the ring) is misdelivered.
    const NOBODY: &[usize] = &[];
    ledger::check(&issued, &senders, &receivers, |s, _| match target.get(s).copied().flatten() {
        Some(r) => std::slice::from_ref(&index[r]),
        None => NOBODY,
    })
}

/// A worker's (or, merged, the run's) probe result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Held connections in the rings when the probe started (each should send and receive one).
    pub ring: u64,
    pub check: Check,
    pub errors: BTreeMap<String, u64>,
    pub other_items: u64,
    /// send → `sent` tick and send → deliver, from the scheduled send (hex of the histograms).
    pub h_sent: String,
    pub h_deliver: String,
    /// From the first scheduled send to the verdict (the longest worker's, once merged).
    pub seconds: f64,
    /// Workers that judged at the deadline with ticks or deliveries missing.
    pub timed_out: u64,
}

impl Report {
    pub fn new(ring: u64, check: Check, errors: BTreeMap<String, u64>, other_items: u64) -> Report {
        Report {
            ring,
            check,
            errors,
            other_items,
            h_sent: hist::to_hex(&hist::new()),
            h_deliver: hist::to_hex(&hist::new()),
            seconds: 0.0,
            timed_out: 0,
        }
    }

    pub fn merge(&mut self, o: &Report) -> anyhow::Result<()> {
        self.ring += o.ring;
        self.check.merge(&o.check);
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.other_items += o.other_items;
        for (mine, theirs) in [(&mut self.h_sent, &o.h_sent), (&mut self.h_deliver, &o.h_deliver)] {
            let mut h = hist::from_hex(mine)?;
            hist::merge(&mut h, &hist::from_hex(theirs)?);
            *mine = hist::to_hex(&h);
        }
        self.seconds = self.seconds.max(o.seconds);
        self.timed_out += o.timed_out;
        Ok(())
    }

    /// Delivered to a user other than the probe's recipient, or from a user outside the ring.
    pub fn wrong_sender(&self) -> u64 {
        self.check.misdelivered + self.check.unreadable
    }

    /// Delivery violations: lost, duplicated, wrong sender or id, out of inbox order. Exit 1.
    pub fn violations(&self) -> u64 {
        self.check.violations()
    }

    /// Sends refused or never answered (the run has errors, exit 3, but no violation).
    pub fn unconfirmed(&self) -> u64 {
        self.check.failed + self.check.unanswered
    }

    /// Connections of the ring that had not written their probe when it was judged (their
    /// connection ended first, or the deadline came first).
    pub fn not_sent(&self) -> u64 {
        self.ring.saturating_sub(self.check.issued)
    }

    pub fn verdict(&self) -> String {
        let c = &self.check;
        if self.violations() > 0 {
            format!(
                "FAIL: {} lost, {} duplicated, {} to or from the wrong user, {} with an unknown id, {} out of inbox order",
                c.lost,
                c.duplicates,
                self.wrong_sender(),
                c.phantom,
                c.seq_regressions + c.reordered
            )
        } else if self.unconfirmed() > 0 || self.not_sent() > 0 {
            format!(
                "ERRORS: {} refused, {} unanswered, {} connections had not sent by the deadline; no acknowledged probe lost",
                c.failed,
                c.unanswered,
                self.not_sent()
            )
        } else {
            format!("PASS: {} probes, each delivered exactly once to the expected connection", c.delivered_once)
        }
    }

    pub fn to_json(&self) -> anyhow::Result<Value> {
        let c = &self.check;
        Ok(json!({
            "verdict": self.verdict(),
            "ring_connections": self.ring,
            "sent": c.issued,
            "acknowledged": c.acknowledged,
            "refused": c.failed,
            "unanswered": c.unanswered,
            "delivered": c.delivered_once,
            "lost": c.lost,
            "duplicated": c.duplicates,
            "wrong_sender": self.wrong_sender(),
            "unknown_id": c.phantom,
            "out_of_inbox_order": c.seq_regressions,
            "delivered_unacknowledged": c.delivered_unacknowledged,
            "not_sent": self.not_sent(),
            "errors": self.errors,
            "other_items": self.other_items,
            "seconds": self.seconds,
            "workers_timed_out": self.timed_out,
            "send_to_sent_latency": hist::summary(&self.sent_hist()?),
            "send_to_deliver_latency": hist::summary(&self.deliver_hist()?),
            "ledger": c,
        }))
    }

    pub fn sent_hist(&self) -> anyhow::Result<Hist> {
        hist::from_hex(&self.h_sent)
    }

    pub fn deliver_hist(&self) -> anyhow::Result<Hist> {
        hist::from_hex(&self.h_deliver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names { prefix: "lgx".into(), first: 100, count: 5 }
    }

    #[test]
    fn ring_covers_every_held_connection_once_each_way() {
        assert_eq!(ring(&[]), vec![]);
        assert_eq!(ring(&[3]), vec![(3, 3)]);
        // Connections 1 and 4 are not held: the ring skips them.
        let r = ring(&[0, 2, 3, 5]);
        assert_eq!(r, vec![(0, 2), (2, 3), (3, 5), (5, 0)]);
        let mut senders: Vec<usize> = r.iter().map(|p| p.0).collect();
        let mut receivers: Vec<usize> = r.iter().map(|p| p.1).collect();
        senders.sort();
        receivers.sort();
        assert_eq!(senders, receivers);
        assert!(r.iter().all(|(s, t)| s != t));
    }

    #[test]
    fn names_map_to_local_indices() {
        let n = names();
        assert_eq!(n.name(2), "lgx-c102");
        assert_eq!(n.local("lgx-c102"), Some(2));
        assert_eq!(n.local("lgx-c104"), Some(4));
        assert_eq!(n.local("lgx-c105"), None, "the next worker's");
        assert_eq!(n.local("lgx-c99"), None, "the previous worker's");
        assert_eq!(n.local("lgy-c102"), None);
        assert_eq!(n.local("lgx-c"), None);
    }

    #[test]
    fn frame_is_a_valid_send() {
        let f = send_frame("lgx-c101", 1_234_567);
        let v: Value = serde_json::from_str(&f).unwrap();
        assert_eq!((v["to"].as_str(), v["id"].as_str()), (Some("lgx-c101"), Some("0-1234567")));
        assert!(protocol::decode_client_frame(f.as_bytes(), &protocol::Limits::default()).is_ok());
    }

    fn chat(seq: u64, from: &str, id: &str) -> String {
        json!({"t": "msg", "seq": seq, "m": {"k": "chat", "from": from, "id": id, "body": "x", "ts": 1}}).to_string()
    }

    /// Runs a ring of `n` connections in memory: every connection gets its tick, and `deliver`
    /// says, per recipient, what it receives (sender local index and the id used).
    fn run(n: usize, deliver: impl Fn(usize) -> Vec<(usize, String)>) -> (Check, Vec<Seen>) {
        let names = Names { prefix: "p".into(), first: 0, count: n as u64 };
        let mut books: Vec<Book> = (0..n).map(|_| Book::default()).collect();
        let pairs = ring(&(0..n).collect::<Vec<_>>());
        let mut target = vec![None; n];
        let mut seen = Vec::new();
        for &(s, r) in &pairs {
            target[s] = Some(r);
            books[s].issued = 1;
            seen.push(books[s].on_frame(r#"{"t":"sent","id":"0-1000","sid":5,"ts":1}"#, &names, 1500));
        }
        for (r, book) in books.iter_mut().enumerate() {
            for (k, (s, id)) in deliver(r).into_iter().enumerate() {
                seen.push(book.on_frame(&chat(k as u64 + 1, &names.name(s), &id), &names, 4000));
            }
        }
        (judge(&mut books, &target), seen)
    }

    #[test]
    fn clean_ring_passes() {
        let (c, seen) = run(4, |r| vec![((r + 3) % 4, "0-1000".into())]);
        assert_eq!((c.issued, c.acknowledged, c.delivered_once), (4, 4, 4));
        assert_eq!(c.violations(), 0, "{c:?}");
        assert!(seen.contains(&Seen::Ticked { latency_us: 500 }));
        assert!(seen.contains(&Seen::Delivered { latency_us: 3000 }));
        let rep = Report::new(4, c, BTreeMap::new(), 0);
        assert!(rep.verdict().starts_with("PASS"), "{}", rep.verdict());
    }

    #[test]
    fn a_missing_delivery_fails() {
        // Connection 2 never gets the probe of connection 1.
        let (c, _) = run(4, |r| if r == 2 { vec![] } else { vec![((r + 3) % 4, "0-1000".into())] });
        assert_eq!(c.lost, 1);
        assert_eq!(c.delivered_once, 3);
        let rep = Report::new(4, c, BTreeMap::new(), 0);
        assert_eq!(rep.violations(), 1);
        assert!(rep.verdict().starts_with("FAIL: 1 lost"), "{}", rep.verdict());
    }

    #[test]
    fn duplicates_wrong_senders_and_ids_fail() {
        let (c, _) = run(4, |r| match r {
            // Delivered twice (stored twice under a new inbox seq).
            0 => vec![(3, "0-1000".into()), (3, "0-1000".into())],
            // From connection 3 instead of its predecessor 0: 0's probe to 1 is lost and 3's is
            // misdelivered.
            1 => vec![(3, "0-1000".into())],
            // The right sender but an id it never used.
            2 => vec![(1, "0-1000".into()), (1, "7-1000".into())],
            _ => vec![(2, "0-1000".into())],
        });
        assert_eq!((c.duplicates, c.lost, c.misdelivered, c.phantom), (1, 1, 1, 1));
        let rep = Report::new(4, c, BTreeMap::new(), 0);
        assert_eq!(rep.wrong_sender(), 1);
        assert!(rep.verdict().starts_with("FAIL"));
    }

    #[test]
    fn strangers_and_unanswered_sends() {
        let names = Names { prefix: "p".into(), first: 0, count: 2 };
        let mut books: Vec<Book> = (0..2).map(|_| Book::default()).collect();
        let target = vec![Some(1), Some(0)];
        books[0].issued = 1;
        books[1].issued = 1;
        // 0 is ticked and delivered; 1 is never answered; 1 also hears from a stranger.
        books[0].on_frame(r#"{"t":"sent","id":"0-10","sid":1,"ts":1}"#, &names, 20);
        assert_eq!(books[1].on_frame(&chat(1, "p-c0", "0-10"), &names, 30), Seen::Delivered { latency_us: 20 });
        assert_eq!(books[1].on_frame(&chat(2, "q-c9", "0-10"), &names, 30), Seen::Judged);
        // A refusal of something else and a receipt are not probes.
        assert_eq!(
            books[0].on_frame(r#"{"t":"error","code":"bad_json","msg":"x"}"#, &names, 40),
            Seen::Other,
            "no id: not an answer to the probe"
        );
        let receipt = r#"{"t":"msg","seq":3,"m":{"k":"receipt","from":"p-c1","status":"delivered","up_to":1,"ts":1}}"#;
        assert_eq!(books[1].on_frame(receipt, &names, 50), Seen::Other);
        let c = judge(&mut books, &target);
        assert_eq!((c.acknowledged, c.unanswered, c.delivered_once, c.unreadable), (1, 1, 1, 1));
        let rep = Report::new(2, c, BTreeMap::new(), 0);
        assert_eq!(rep.wrong_sender(), 1);
        assert!(rep.verdict().starts_with("FAIL"), "a stranger's message is a violation");
    }

    #[test]
    fn refused_probe_is_an_error_not_a_violation() {
        let names = Names { prefix: "p".into(), first: 0, count: 2 };
        let mut books: Vec<Book> = (0..2).map(|_| Book::default()).collect();
        books[0].issued = 1;
        books[1].issued = 1;
        assert_eq!(
            books[0].on_frame(r#"{"t":"error","id":"0-10","code":"rate_limited","msg":"slow down"}"#, &names, 40),
            Seen::Refused
        );
        books[1].on_frame(r#"{"t":"sent","id":"0-10","sid":1,"ts":1}"#, &names, 20);
        books[0].on_frame(&chat(1, "p-c1", "0-10"), &names, 30);
        let c = judge(&mut books, &[Some(1), Some(0)]);
        let mut rep = Report::new(2, c, books[0].errors.clone(), 0);
        assert_eq!(rep.violations(), 0);
        assert_eq!(rep.unconfirmed(), 1);
        assert!(rep.verdict().starts_with("ERRORS"), "{}", rep.verdict());
        // Merging two workers' reports adds them up.
        let other = rep.clone();
        rep.merge(&other).unwrap();
        assert_eq!((rep.ring, rep.check.failed, rep.errors["error_rate_limited"]), (4, 2, 2));
    }
}
