//! Per-user limits: what all of a user's connections on this gateway process may do together,
//! whichever executor (core) each one runs on — token buckets for messages, operations and
//! typing, and a cap on the user's concurrent connections. Without them a user multiplies its
//! per-connection budget by opening more connections (devices, or duplicate sessions of one).
//!
//! The state is a map keyed by user, split into [`SHARDS`] shards each behind its own mutex. A
//! connection holds a [`UserSlot`] (its user's id, shared, and the limits); a limited frame locks
//! its user's shard and finds the user's buckets there, contended only by connections of users
//! of the same shard on other cores at the same instant.
//!
//! An entry lives while the user has a connection here, and [`crate::ratelimit::REFILL_TIME`]
//! (2 s) after its last one closes — the time an empty bucket takes to refill — so closing and
//! reopening connections buys no fresh burst. Memory is thus bounded by the users online on this
//! process plus those that left in the last 2 s (a map entry with three 8-byte buckets, under
//! a hundred bytes each; the user id is shared with the connection).
//!
//! The limits hold per gateway process, not across gateways: a user with connections on k
//! gateways gets at most k times the per-user budget (k ≤ the number of gateways, and ≤ the
//! connection cap). A global limit would need a shared counter in NATS (a KV update, which is a
//! JetStream write with a PubAck) for every message — doubling the stream writes of the send
//! path, whose only write today is the message itself, and adding a round trip before `sent`.
//! A user's devices normally land on one or a few gateways, so the per-process limit already
//! caps what one account can push through the system to a small multiple of the per-user rate.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use fxhash::FxHashMap;
use prometheus_client::metrics::gauge::Gauge;
use protocol::UserId;

use crate::ratelimit::{Kind, Rate, RateLimit, REFILL_TIME};

/// Shards of the user map: enough that connects and closes on different cores rarely meet.
const SHARDS: usize = 64;

/// The per-user limits of this gateway process. 0 disables a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRates {
    pub messages_per_sec: u32,
    pub ops_per_sec: u32,
    pub typing_per_sec: u32,
    /// Concurrent connections per user on this process.
    pub max_connections: u32,
}

/// The user already has `open` connections here, the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyConnections {
    pub open: u32,
}

impl UserRates {
    fn of(&self, kind: Kind) -> Rate {
        Rate::per_sec(match kind {
            Kind::Messages => self.messages_per_sec,
            Kind::Ops => self.ops_per_sec,
            Kind::Typing => self.typing_per_sec,
        })
    }
}

/// A user's buckets, shared by its connections.
struct Buckets {
    messages: RateLimit,
    ops: RateLimit,
    typing: RateLimit,
}

impl Buckets {
    fn new(rates: &UserRates, now: Instant) -> Self {
        Buckets {
            messages: RateLimit::full_at(rates.of(Kind::Messages), now),
            ops: RateLimit::full_at(rates.of(Kind::Ops), now),
            typing: RateLimit::full_at(rates.of(Kind::Typing), now),
        }
    }

    fn of(&mut self, kind: Kind) -> &mut RateLimit {
        match kind {
            Kind::Messages => &mut self.messages,
            Kind::Ops => &mut self.ops,
            Kind::Typing => &mut self.typing,
        }
    }
}

struct Entry {
    connections: u32,
    buckets: Buckets,
    /// When the last connection closed (None while the user has one).
    idle_since: Option<Instant>,
}

#[derive(Default)]
struct Shard {
    users: FxHashMap<UserId, Entry>,
    /// Users whose last connection closed, in closing order: the entries to forget once their
    /// buckets would have refilled. A user that came back (or left again later) has a stale
    /// record here, recognised by its time.
    idle: VecDeque<(UserId, Instant)>,
}

impl Shard {
    /// Forgets the users idle for [`REFILL_TIME`] at `now`.
    fn sweep(&mut self, now: Instant, tracked: &Gauge) {
        while let Some((_, since)) = self.idle.front() {
            if now.saturating_duration_since(*since) < REFILL_TIME {
                break;
            }
            let Some((user, since)) = self.idle.pop_front() else { break };
            if self.users.get(&user).is_some_and(|e| e.connections == 0 && e.idle_since == Some(since)) {
                self.users.remove(&user);
                tracked.dec();
            }
        }
    }
}

pub struct UserLimits {
    shards: Box<[Mutex<Shard>]>,
    rates: UserRates,
    /// Users with an entry (the `gateway_rate_limit_users` gauge).
    tracked: Gauge,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something ever did, the counts are still
    // usable, so do not turn one panic into a panic of every connection.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl UserLimits {
    pub fn new(rates: UserRates, tracked: Gauge) -> Self {
        UserLimits { shards: (0..SHARDS).map(|_| Mutex::default()).collect(), rates, tracked }
    }

    fn shard(&self, user: &UserId) -> &Mutex<Shard> {
        &self.shards[fxhash::hash(user) % SHARDS]
    }

    /// Registers a connection of `user`, or refuses it when the user has the maximum already.
    /// The connection counts until the slot is dropped.
    pub fn connect(self: &Arc<Self>, user: &UserId) -> Result<UserSlot, TooManyConnections> {
        self.connect_at(user, Instant::now())
    }

    pub(crate) fn connect_at(self: &Arc<Self>, user: &UserId, now: Instant) -> Result<UserSlot, TooManyConnections> {
        let mut shard = lock(self.shard(user));
        shard.sweep(now, &self.tracked);
        let max = self.rates.max_connections;
        match shard.users.get_mut(user) {
            Some(e) if max != 0 && e.connections >= max => return Err(TooManyConnections { open: e.connections }),
            Some(e) => {
                e.connections += 1;
                e.idle_since = None;
            }
            None => {
                let buckets = Buckets::new(&self.rates, now);
                shard.users.insert(user.clone(), Entry { connections: 1, buckets, idle_since: None });
                self.tracked.inc();
            }
        }
        Ok(UserSlot {
            limits: self.clone(),
            user: user.clone(),
            #[cfg(test)]
            closed_at: None,
        })
    }

    /// Takes a token of `kind` from `user`'s bucket if there is one at `now`.
    fn allow_at(&self, user: &UserId, kind: Kind, now: Instant) -> bool {
        let mut shard = lock(self.shard(user));
        match shard.users.get_mut(user) {
            Some(e) => e.buckets.of(kind).allow_at(self.rates.of(kind), now),
            // Unreachable while a slot is held (its entry stays); allow rather than refuse.
            None => true,
        }
    }

    fn release(&self, user: &UserId, now: Instant) {
        let mut shard = lock(self.shard(user));
        let idle = match shard.users.get_mut(user) {
            Some(e) => {
                e.connections = e.connections.saturating_sub(1);
                if e.connections == 0 {
                    e.idle_since = Some(now);
                }
                e.connections == 0
            }
            None => false,
        };
        if idle {
            shard.idle.push_back((user.clone(), now));
        }
        shard.sweep(now, &self.tracked);
    }

    /// Forgets every user idle long enough. Connects and closes sweep their own shard; this
    /// catches shards that see no traffic (call it every second or so).
    pub fn sweep(&self) {
        self.sweep_at(Instant::now())
    }

    pub(crate) fn sweep_at(&self, now: Instant) {
        for shard in self.shards.iter() {
            lock(shard).sweep(now, &self.tracked);
        }
    }

    /// Users with an entry: online here, or left less than [`REFILL_TIME`] ago.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards.iter().map(|s| lock(s).users.len()).sum()
    }

    /// Open connections of `user` here.
    #[cfg(test)]
    fn connections(&self, user: &UserId) -> u32 {
        lock(self.shard(user)).users.get(user).map_or(0, |e| e.connections)
    }
}

/// One connection's share of its user's limits; dropping it closes the connection's count.
pub struct UserSlot {
    limits: Arc<UserLimits>,
    user: UserId,
    /// A test's clock for the release (the real one otherwise).
    #[cfg(test)]
    closed_at: Option<Instant>,
}

impl UserSlot {
    /// Takes a token of `kind` from the user's bucket if there is one at `now`.
    pub fn allow_at(&self, kind: Kind, now: Instant) -> bool {
        self.limits.allow_at(&self.user, kind, now)
    }

    /// Drops the slot as if its connection closed at `now`.
    #[cfg(test)]
    fn close_at(mut self, now: Instant) {
        self.closed_at = Some(now);
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        #[cfg(test)]
        let now = self.closed_at.unwrap_or_else(Instant::now);
        #[cfg(not(test))]
        let now = Instant::now();
        self.limits.release(&self.user, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(messages: u32, max_connections: u32) -> (Arc<UserLimits>, Gauge) {
        let rates = UserRates { messages_per_sec: messages, ops_per_sec: 0, typing_per_sec: 0, max_connections };
        let gauge = Gauge::default();
        (Arc::new(UserLimits::new(rates, gauge.clone())), gauge)
    }

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn drain(slot: &UserSlot, now: Instant) -> usize {
        (0..10_000).take_while(|_| slot.allow_at(Kind::Messages, now)).count()
    }

    #[test]
    fn the_connection_cap_refuses_the_extra_connection_until_one_closes() {
        let t0 = Instant::now();
        let (limits, _) = limits(0, 3);
        let alice = user("alice");
        let mut slots: Vec<UserSlot> = (0..3).map(|_| limits.connect_at(&alice, t0).expect("under the cap")).collect();
        assert_eq!(limits.connect_at(&alice, t0).err(), Some(TooManyConnections { open: 3 }));
        assert_eq!(limits.connections(&alice), 3, "a refusal counts nothing");
        // Other users have their own cap.
        let bob: Vec<UserSlot> = (0..3).map(|_| limits.connect_at(&user("bob"), t0).unwrap()).collect();
        slots.pop().unwrap().close_at(t0);
        assert_eq!(limits.connections(&alice), 2);
        slots.push(limits.connect_at(&alice, t0).expect("a closed connection frees its place"));
        assert!(limits.connect_at(&alice, t0).is_err());
        drop(bob);
    }

    #[test]
    fn zero_connections_means_no_cap() {
        let (limits, _) = limits(0, 0);
        let alice = user("alice");
        let slots: Vec<UserSlot> = (0..1000).map(|_| limits.connect(&alice).unwrap()).collect();
        assert_eq!(limits.connections(&alice), 1000);
        drop(slots);
        assert_eq!(limits.connections(&alice), 0);
    }

    #[test]
    fn an_entry_outlives_the_last_connection_until_its_buckets_refill() {
        let t0 = Instant::now();
        let (limits, gauge) = limits(10, 0);
        let alice = user("alice");
        let a = limits.connect_at(&alice, t0).unwrap();
        assert_eq!(drain(&a, t0), 20);
        assert_eq!((limits.tracked(), gauge.get()), (1, 1));
        a.close_at(t0);
        // Reconnecting at once finds the empty bucket: closing bought no fresh burst.
        let t1 = t0 + Duration::from_millis(100);
        let a = limits.connect_at(&alice, t1).unwrap();
        assert_eq!(drain(&a, t1), 1, "0.1 s of refill at 10/s");
        a.close_at(t1);
        // Just before the refill time the entry is still there...
        limits.sweep_at(t1 + REFILL_TIME - Duration::from_millis(1));
        assert_eq!(limits.tracked(), 1);
        // ... then it is forgotten: a full bucket is all it held.
        limits.sweep_at(t1 + REFILL_TIME);
        assert_eq!((limits.tracked(), gauge.get()), (0, 0));
        let t2 = t1 + REFILL_TIME;
        let a = limits.connect_at(&alice, t2).unwrap();
        assert_eq!(drain(&a, t2), 20);
    }

    #[test]
    fn a_user_who_came_back_is_not_forgotten_by_a_stale_idle_record() {
        let t0 = Instant::now();
        let (limits, gauge) = limits(10, 0);
        let alice = user("alice");
        limits.connect_at(&alice, t0).unwrap().close_at(t0);
        let back = limits.connect_at(&alice, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(drain(&back, t0 + Duration::from_secs(1)), 20);
        // The record of the first close expires while alice is connected again: kept.
        limits.sweep_at(t0 + Duration::from_secs(60));
        assert_eq!((limits.tracked(), gauge.get()), (1, 1));
        assert_eq!(limits.connections(&alice), 1);
        // Left again at t=3 s: forgotten at 5 s, not at the first record's time.
        let t3 = t0 + Duration::from_secs(3);
        back.close_at(t3);
        limits.sweep_at(t3 + REFILL_TIME - Duration::from_millis(1));
        assert_eq!(limits.tracked(), 1);
        limits.sweep_at(t3 + REFILL_TIME);
        assert_eq!((limits.tracked(), gauge.get()), (0, 0));
    }

    #[test]
    fn connects_and_closes_sweep_their_shard() {
        let t0 = Instant::now();
        let (limits, _) = limits(10, 0);
        for i in 0..500 {
            limits.connect_at(&user(&format!("u{i}")), t0).unwrap().close_at(t0);
        }
        assert_eq!(limits.tracked(), 500);
        // Later traffic alone (no periodic sweep) forgets the idle users of the shards it touches.
        let later = t0 + REFILL_TIME;
        let keep: Vec<UserSlot> =
            (0..2000).map(|i| limits.connect_at(&user(&format!("v{i}")), later).unwrap()).collect();
        assert_eq!(limits.tracked(), 2000, "every shard was touched: only the online users remain");
        drop(keep);
    }

    #[test]
    fn connections_on_different_threads_share_one_budget() {
        let t0 = Instant::now();
        let (limits, _) = limits(1000, 0);
        let alice = user("alice");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let slot = limits.connect_at(&alice, t0).unwrap();
                std::thread::spawn(move || drain(&slot, t0))
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 2000, "the user's burst, split between the threads however they raced");
        assert_eq!(limits.connections(&alice), 0, "each thread's slot closed");
    }
}
