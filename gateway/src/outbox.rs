//! A connection's queue of live copies waiting to be written, filled by the executor's dispatcher
//! and emptied by the connection task. Single-threaded (one executor), so plain cells; it holds
//! no allocation while empty, which is most of the time for most connections.
//!
//! When the queue is full the copy is dropped and the connection is flagged to resync from its
//! inbox: nothing is lost (the inbox has it), and a burst cannot grow memory without bound.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Poll, Waker};

use bytes::Bytes;

pub struct LiveCopy {
    /// The inbox sequence; 0 for an ephemeral frame (typing, presence) that is sent as it is.
    pub seq: u64,
    /// The previous item stored for the same user (`Nats-Last-Sequence`), 0 when unknown.
    pub prev: u64,
    pub payload: Bytes,
}

pub struct Outbox {
    queue: RefCell<VecDeque<LiveCopy>>,
    cap: usize,
    resync: Cell<bool>,
    kick: Cell<Option<(u16, &'static str)>>,
    waker: RefCell<Option<Waker>>,
    /// When the session's token was issued (seconds), for revocations.
    issued_at: u64,
}

impl Outbox {
    pub fn new(cap: usize, issued_at: u64) -> Self {
        Outbox {
            queue: RefCell::new(VecDeque::new()),
            cap,
            resync: Cell::new(false),
            kick: Cell::new(None),
            waker: RefCell::new(None),
            issued_at,
        }
    }

    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    pub fn push(&self, copy: LiveCopy) {
        let mut q = self.queue.borrow_mut();
        if q.len() >= self.cap {
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

    /// Asks the connection to close with this code and reason.
    pub fn kick(&self, code: u16, reason: &'static str) {
        self.kick.set(Some((code, reason)));
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

    pub fn kicked(&self) -> Option<(u16, &'static str)> {
        self.kick.get()
    }

    /// Takes everything queued, releasing the queue's memory once it is empty again.
    pub fn take_all(&self) -> VecDeque<LiveCopy> {
        std::mem::take(&mut *self.queue.borrow_mut())
    }

    /// Resolves when there is something to do: copies queued, a resync or a kick requested.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            if !self.queue.borrow().is_empty() || self.resync.get() || self.kick.get().is_some() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
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
        let o = Outbox::new(2, 0);
        o.push(copy(1));
        o.push(copy(2));
        o.push(copy(3));
        assert!(o.take_resync());
        assert!(o.take_all().is_empty(), "a resync supersedes what was queued");
        assert!(!o.take_resync());
    }

    #[test]
    fn take_all_returns_in_order() {
        let o = Outbox::new(8, 0);
        o.push(copy(1));
        o.push(copy(2));
        let got: Vec<u64> = o.take_all().into_iter().map(|c| c.seq).collect();
        assert_eq!(got, vec![1, 2]);
    }
}
