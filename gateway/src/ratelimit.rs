//! Rate limits on what a client sends: token buckets per connection (messages, group operations
//! and queries, typing), checked together with the same kinds' buckets shared by all of the
//! user's connections on this gateway process ([`crate::user_limits`]).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::user_limits::UserSlot;

/// Every bucket holds this many seconds of its rate: bursts of twice the rate.
const BURST_SECS: f32 = 2.0;

/// How long an empty bucket takes to refill completely (whatever its rate).
pub const REFILL_TIME: Duration = Duration::from_secs(2);

/// A rate in tokens a second; 0 disables the limit. Kept by the bucket's owner (the
/// configuration), not by each bucket: a connection holds three buckets for its whole life.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(f32);

impl Rate {
    pub fn per_sec(rate: u32) -> Self {
        Rate(rate as f32)
    }

    fn burst(self) -> f32 {
        self.0 * BURST_SECS
    }
}

/// A point in time for the buckets: milliseconds since a process-wide origin, wrapping every
/// 49.7 days (4 bytes instead of an `Instant`'s 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(u32);

impl Millis {
    pub fn of(t: Instant) -> Self {
        // The origin lies an hour before the first reading, so that instants a little older
        // than it (a test's or another core's clock) still convert forwards.
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(|| {
            let now = Instant::now();
            now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
        });
        Millis(t.saturating_duration_since(origin).as_millis() as u32)
    }

    /// Milliseconds from `earlier` to `self`; `None` when `self` is a little before `earlier`
    /// (a clock read on another core, up to a minute). Anything further "before" is the 49.7-day
    /// wrap of a bucket idle that long, i.e. a long time.
    fn since(self, earlier: Millis) -> Option<u32> {
        let d = self.0.wrapping_sub(earlier.0);
        if (d as i32) < 0 && (d as i32) > -60_000 {
            None
        } else {
            Some(d)
        }
    }
}

/// A token bucket of a [`Rate`] given at each look, bursts up to twice the rate: 8 bytes.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    tokens: f32,
    at: Millis,
}

impl RateLimit {
    /// A bucket full at `now`.
    pub fn full_at(rate: Rate, now: Instant) -> Self {
        RateLimit { tokens: rate.burst(), at: Millis::of(now) }
    }

    /// Takes a token if there is one at `now`.
    pub fn allow_at(&mut self, rate: Rate, now: Instant) -> bool {
        let ok = self.has_token_at(rate, now);
        if ok {
            self.take(rate);
        }
        ok
    }

    /// Refills for the time since the last look and says whether a token is there, taking none:
    /// with [`RateLimit::take`], a caller can consult another bucket before spending this one.
    pub fn has_token_at(&mut self, rate: Rate, now: Instant) -> bool {
        if rate.0 == 0.0 {
            return true;
        }
        let now = Millis::of(now);
        // A clock read on another core may be a little behind this bucket's last look: no
        // refill, and `at` does not move back.
        if let Some(elapsed_ms) = now.since(self.at) {
            self.tokens = (self.tokens + elapsed_ms as f32 / 1000.0 * rate.0).min(rate.burst());
            self.at = now;
        }
        self.tokens >= 1.0
    }

    /// Spends a token that [`RateLimit::has_token_at`] found.
    pub fn take(&mut self, rate: Rate) {
        if rate.0 != 0.0 {
            self.tokens -= 1.0;
        }
    }
}

/// What a limited frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `send`, `gsend`.
    Messages,
    /// Group operations, `presence` and `receipts` queries.
    Ops,
    /// `typing`.
    Typing,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Messages => "messages",
            Kind::Ops => "ops",
            Kind::Typing => "typing",
        }
    }
}

/// Which limit refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This connection's own budget.
    Connection,
    /// The budget shared by all of the user's connections on this gateway.
    User,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Connection => "connection",
            Scope::User => "user",
        }
    }

    /// The `msg` of the `rate_limited` error frame.
    pub fn message(self) -> &'static str {
        match self {
            Scope::Connection => "too many requests on this connection; retry later with the same id",
            Scope::User => "too many requests from this user's connections; retry later with the same id",
        }
    }
}

/// The limits one connection's frames are checked against: its own buckets, then its user's.
/// A refused frame spends nothing from either, so a user's other connections keep their share.
/// The rates are the configuration's, given at each check.
pub struct ConnLimits {
    messages: RateLimit,
    ops: RateLimit,
    typing: RateLimit,
    user: UserSlot,
}

/// A connection's own rates: (messages, ops, typing).
#[derive(Debug, Clone, Copy)]
pub struct ConnRates {
    messages: Rate,
    ops: Rate,
    typing: Rate,
}

impl ConnRates {
    pub fn of(cfg: &Config) -> Self {
        Self::new(cfg.messages_per_sec, cfg.ops_per_sec, cfg.typing_per_sec)
    }

    pub fn new(messages: u32, ops: u32, typing: u32) -> Self {
        ConnRates { messages: Rate::per_sec(messages), ops: Rate::per_sec(ops), typing: Rate::per_sec(typing) }
    }
}

impl ConnLimits {
    /// Full buckets at `now`.
    pub fn new(rates: ConnRates, user: UserSlot, now: Instant) -> Self {
        ConnLimits {
            messages: RateLimit::full_at(rates.messages, now),
            ops: RateLimit::full_at(rates.ops, now),
            typing: RateLimit::full_at(rates.typing, now),
            user,
        }
    }

    /// Whether a frame of `kind` may go through now; a refusal is counted by scope and kind.
    pub fn check(&mut self, kind: Kind, rates: ConnRates, metrics: &Metrics) -> Result<(), Scope> {
        self.check_at(kind, rates, metrics, Instant::now())
    }

    fn check_at(&mut self, kind: Kind, rates: ConnRates, metrics: &Metrics, now: Instant) -> Result<(), Scope> {
        let checked = self.decide(kind, rates, now);
        if let Err(scope) = checked {
            metrics.rate_limited(scope.label(), kind.label());
        }
        checked
    }

    fn decide(&mut self, kind: Kind, rates: ConnRates, now: Instant) -> Result<(), Scope> {
        let (own, rate) = match kind {
            Kind::Messages => (&mut self.messages, rates.messages),
            Kind::Ops => (&mut self.ops, rates.ops),
            Kind::Typing => (&mut self.typing, rates.typing),
        };
        if !own.has_token_at(rate, now) {
            return Err(Scope::Connection);
        }
        if !self.user.allow_at(kind, now) {
            return Err(Scope::User);
        }
        own.take(rate);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user_limits::{UserLimits, UserRates};
    use protocol::UserId;
    use std::sync::Arc;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let rate = Rate::per_sec(10);
        let mut r = RateLimit::full_at(rate, t0);
        let allowed = (0..100).filter(|_| r.allow_at(rate, t0)).count();
        assert_eq!(allowed, 20, "burst is twice the rate");
        assert!(!r.allow_at(rate, t0));
        let t1 = t0 + Duration::from_millis(500);
        let allowed = (0..100).filter(|_| r.allow_at(rate, t1)).count();
        assert_eq!(allowed, 5, "half a second refills half the rate");
        let t2 = t1 + REFILL_TIME;
        let allowed = (0..100).filter(|_| r.allow_at(rate, t2)).count();
        assert_eq!(allowed, 20, "REFILL_TIME refills an empty bucket completely, and no more");
    }

    #[test]
    fn zero_disables() {
        let t0 = Instant::now();
        let mut r = RateLimit::full_at(Rate::per_sec(0), t0);
        assert!((0..1000).all(|_| r.allow_at(Rate::per_sec(0), t0)));
    }

    #[test]
    fn an_earlier_clock_reading_neither_refills_nor_rewinds() {
        let t0 = Instant::now();
        let rate = Rate::per_sec(1);
        let mut r = RateLimit::full_at(rate, t0 + Duration::from_secs(1));
        assert_eq!((0..10).filter(|_| r.allow_at(rate, t0)).count(), 2);
        // Reading t0 again (another core's clock) must not move `at` back and refill twice.
        assert!(!r.allow_at(rate, t0 + Duration::from_secs(1)));
        assert!(r.allow_at(rate, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn a_bucket_idle_past_the_clock_wrap_is_full_again() {
        // 49.7 days of milliseconds wrap a u32: a bucket last seen "after" now by more than a
        // minute was in fact seen long ago.
        let before = Millis(u32::MAX - 10_000);
        assert_eq!(Millis(5_000).since(before), Some(15_001));
        assert_eq!(Millis(1_000).since(Millis(2_000)), None, "a slightly earlier reading");
        assert_eq!(Millis(1_000).since(Millis(1_000_000)).map(|d| d > 2_000), Some(true));
        let rate = Rate::per_sec(10);
        let mut r = RateLimit { tokens: 0.0, at: Millis(Millis::of(Instant::now()).0.wrapping_add(3_600_000)) };
        assert!(r.allow_at(rate, Instant::now()), "an hour 'ahead' is a wrap: refilled");
    }

    fn user_limits(messages: u32, ops: u32, typing: u32) -> Arc<UserLimits> {
        let rates =
            UserRates { messages_per_sec: messages, ops_per_sec: ops, typing_per_sec: typing, max_connections: 0 };
        Arc::new(UserLimits::new(rates, Default::default()))
    }

    /// A connection with `per_conn` of each kind a second, and its rates.
    fn conn(limits: &Arc<UserLimits>, user: &UserId, per_conn: u32, now: Instant) -> Conn {
        let slot = limits.connect_at(user, now).expect("no connection cap");
        let rates = ConnRates::new(per_conn, per_conn, per_conn);
        Conn { limits: ConnLimits::new(rates, slot, now), rates, metrics: Metrics::new("test", 1) }
    }

    struct Conn {
        limits: ConnLimits,
        rates: ConnRates,
        metrics: Metrics,
    }

    impl Conn {
        fn check_at(&mut self, kind: Kind, now: Instant) -> Result<(), Scope> {
            self.limits.check_at(kind, self.rates, &self.metrics, now)
        }
    }

    #[test]
    fn the_connection_limit_binds_first_and_spends_nothing_of_the_users() {
        let t0 = Instant::now();
        let limits = user_limits(100, 100, 100);
        let alice = UserId::parse("alice").unwrap();
        let mut a = conn(&limits, &alice, 5, t0);
        let answers: Vec<_> = (0..12).map(|_| a.check_at(Kind::Messages, t0)).collect();
        assert_eq!(answers.iter().filter(|r| r.is_ok()).count(), 10);
        assert!(answers[10..].iter().all(|r| *r == Err(Scope::Connection)), "{answers:?}");
        // The user's bucket lost only the 10 that went through: another connection gets 190.
        let mut b = conn(&limits, &alice, 1000, t0);
        assert_eq!((0..1000).filter(|_| b.check_at(Kind::Messages, t0).is_ok()).count(), 190);
    }

    #[test]
    fn connections_of_one_user_share_the_users_budget_per_kind() {
        let t0 = Instant::now();
        let limits = user_limits(10, 2, 1);
        let alice = UserId::parse("alice").unwrap();
        let mut conns: Vec<Conn> = (0..4).map(|_| conn(&limits, &alice, 50, t0)).collect();
        // Each connection alone could send 100 at once; together they get the user's 20.
        let mut ok = 0;
        for _ in 0..30 {
            for c in &mut conns {
                match c.check_at(Kind::Messages, t0) {
                    Ok(()) => ok += 1,
                    Err(scope) => assert_eq!(scope, Scope::User),
                }
            }
        }
        assert_eq!(ok, 20);
        // Other kinds have their own user buckets, untouched by the messages.
        assert_eq!((0..10).filter(|_| conns[1].check_at(Kind::Ops, t0).is_ok()).count(), 4);
        assert_eq!((0..10).filter(|_| conns[2].check_at(Kind::Typing, t0).is_ok()).count(), 2);
        // A refused message spent nothing of its connection: after a second, the user's
        // refill (10) goes through on any one connection.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| conns[3].check_at(Kind::Messages, t1).is_ok()).count(), 10);
        // Another user is not affected.
        let bob = UserId::parse("bob").unwrap();
        let mut b = conn(&limits, &bob, 50, t0);
        assert_eq!((0..100).filter(|_| b.check_at(Kind::Messages, t0).is_ok()).count(), 20);
    }

    #[test]
    fn refusals_are_counted_by_scope_and_kind() {
        let limits = user_limits(1, 0, 0);
        let alice = UserId::parse("alice").unwrap();
        let t0 = Instant::now();
        let mut c = Conn {
            limits: ConnLimits::new(ConnRates::new(0, 1, 0), limits.connect_at(&alice, t0).unwrap(), t0),
            rates: ConnRates::new(0, 1, 0),
            metrics: Metrics::new("test", 1),
        };
        // Messages: the user's burst of 2; ops: the connection's burst of 2.
        let messages = (0..5).filter(|_| c.check_at(Kind::Messages, t0).is_ok()).count();
        let ops = (0..5).filter(|_| c.check_at(Kind::Ops, t0).is_ok()).count();
        assert_eq!((messages, ops), (2, 2));
        let text = c.metrics.render();
        let count = |labels: &str| {
            text.lines()
                .find(|l| l.starts_with("gateway_rate_limited_total{") && l.contains(labels))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        assert_eq!(count("scope=\"user\",kind=\"messages\""), 3, "{text}");
        assert_eq!(count("scope=\"connection\",kind=\"ops\""), 3, "{text}");
        assert_eq!(count("scope=\"connection\",kind=\"messages\""), 0, "{text}");
    }
}
