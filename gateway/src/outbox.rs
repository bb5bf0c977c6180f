//! A connection's queue of live copies waiting to be written, filled by the executor's dispatcher
//! and emptied by the connection task. Single-threaded (one executor), so plain cells; it holds
//! no allocation while empty, which is most of the time for most connections.
//!
//! When the queue is full the copy is dropped and the connection is flagged to resync from its
//! inbox: nothing is lost (the inbox has it), and a burst cannot grow memory without bound.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

pub struct LiveCopy {
    /// The inbox sequence; 0 for an ephemeral frame (typing, presence) that is sent as it is.
    pub seq: u64,
    /// The previous item stored for the same user (`Nats-Last-Sequence`), 0 when unknown.
    pub prev: u64,
    pub payload: Bytes,
}

/// Why the executor asks a connection to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    /// The gateway is draining: the client is told to reconnect (elsewhere).
    Draining,
    /// The session's token was revoked.
    Revoked,
    /// The client sent nothing for longer than the heartbeat timeout.
    Silent,
}

impl Kick {
    /// The WebSocket close code and reason sent to the client.
    pub fn close(self) -> (u16, &'static str) {
        match self {
            Kick::Draining => (1001, "server draining"),
            Kick::Revoked => (1008, "session revoked"),
            Kick::Silent => (1001, "heartbeat timeout"),
        }
    }

    /// Why the session ended, as the `reason` label of the closed-connections metric.
    pub fn metric_reason(self) -> &'static str {
        match self {
            Kick::Draining => "server_draining",
            Kick::Revoked => "kicked",
            Kick::Silent => "heartbeat_timeout",
        }
    }
}

pub struct Outbox {
    queue: RefCell<VecDeque<LiveCopy>>,
    resync: Cell<bool>,
    kick: Cell<Option<Kick>>,
    /// When the client last sent a frame, on the executor's coarse clock (seconds): the
    /// executor's once-a-second sweep closes connections silent for the heartbeat timeout, so
    /// an idle connection needs no timer of its own.
    last_seen: Cell<u32>,
    waker: RefCell<Option<Waker>>,
    /// When the session's token was issued (seconds), for revocations.
    issued_at: u64,
}

impl Outbox {
    /// `now`: the executor's coarse clock (the connection counts as seen when it opens).
    pub fn new(issued_at: u64, now: u32) -> Self {
        Outbox {
            queue: RefCell::new(VecDeque::new()),
            resync: Cell::new(false),
            kick: Cell::new(None),
            last_seen: Cell::new(now),
            waker: RefCell::new(None),
            issued_at,
        }
    }

    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    /// The client sent something at `now` (the executor's coarse clock).
    pub fn seen(&self, now: u32) {
        self.last_seen.set(now);
    }

    /// Seconds the client has been silent at `now`, on the executor's coarse clock: up to one
    /// second more than the real silence, never less (a tick may be late, not early).
    pub fn silent_for(&self, now: u32) -> u32 {
        now.saturating_sub(self.last_seen.get())
    }

    /// Queues a live copy; beyond `cap` queued copies the connection resyncs from its inbox.
    pub fn push(&self, copy: LiveCopy, cap: usize) {
        let mut q = self.queue.borrow_mut();
        if q.len() >= cap {
            self.resync.set(true);
        } else {
            q.push_back(copy);
        }
        drop(q);
        self.wake();
    }

    /// Asks the connection to resync from its inbox (live copies may have been lost).
    pub fn request_resync(&self) {
        self.resync.set(true);
        self.wake();
    }

    /// Asks the connection to close (the first reason given wins).
    pub fn kick(&self, why: Kick) {
        if self.kick.get().is_none() {
            self.kick.set(Some(why));
        }
        self.wake();
    }

    pub fn take_resync(&self) -> bool {
        let r = self.resync.replace(false);
        if r {
            // Whatever is queued is older than what the resync will read from the inbox.
            self.queue.borrow_mut().clear();
        }
        r
    }

    pub fn kicked(&self) -> Option<Kick> {
        self.kick.get()
    }

    /// Takes everything queued, releasing the queue's memory once it is empty again.
    pub fn take_all(&self) -> VecDeque<LiveCopy> {
        std::mem::take(&mut *self.queue.borrow_mut())
    }

    /// Ready when there is something to do (copies queued, a resync or a kick requested);
    /// otherwise remembers the waker (replacing an older one only when it would wake a
    /// different task).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.queue.borrow().is_empty() || self.resync.get() || self.kick.get().is_some() {
            return Poll::Ready(());
        }
        let mut w = self.waker.borrow_mut();
        match &*w {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(seq: u64) -> LiveCopy {
        LiveCopy { seq, prev: 0, payload: Bytes::new() }
    }

    #[test]
    fn overflow_turns_into_a_resync() {
        let o = Outbox::new(0, 0);
        o.push(copy(1), 2);
        o.push(copy(2), 2);
        o.push(copy(3), 2);
        assert!(o.take_resync());
        assert!(o.take_all().is_empty(), "a resync supersedes what was queued");
        assert!(!o.take_resync());
    }

    #[test]
    fn take_all_returns_in_order() {
        let o = Outbox::new(0, 0);
        o.push(copy(1), 8);
        o.push(copy(2), 8);
        let got: Vec<u64> = o.take_all().into_iter().map(|c| c.seq).collect();
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn silence_is_counted_from_the_last_frame_on_the_coarse_clock() {
        let o = Outbox::new(0, 100);
        assert_eq!(o.silent_for(100), 0);
        assert_eq!(o.silent_for(131), 31);
        o.seen(130);
        assert_eq!(o.silent_for(131), 1);
        assert_eq!(o.silent_for(129), 0, "a clock read before the frame is not negative silence");
    }

    #[test]
    fn the_first_kick_wins() {
        let o = Outbox::new(0, 0);
        assert_eq!(o.kicked(), None);
        o.kick(Kick::Revoked);
        o.kick(Kick::Draining);
        assert_eq!(o.kicked(), Some(Kick::Revoked));
        assert_eq!(Kick::Revoked.close(), (1008, "session revoked"));
    }
}
