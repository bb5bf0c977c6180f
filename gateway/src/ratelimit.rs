//! Rate limits on what a client sends: token buckets per connection (messages, group operations
//! and queries, typing), checked together with the same kinds' buckets shared by all of the
//! user's connections on this gateway process ([`crate::user_limits`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::user_limits::UserSlot;

/// Every bucket holds this many seconds of its rate: bursts of twice the rate.
const BURST_SECS: f64 = 2.0;

/// How long an empty bucket takes to refill completely (whatever its rate).
pub const REFILL_TIME: Duration = Duration::from_secs(2);

/// `rate` tokens a second, bursts up to twice that.
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// A bucket full at `now`, with a burst of twice the rate. A rate of 0 disables the limit.
    pub fn per_sec_at(rate: u32, now: Instant) -> Self {
        let rate = rate as f64;
        RateLimit { rate, burst: rate * BURST_SECS, tokens: rate * BURST_SECS, at: now }
    }

    /// Takes a token if there is one at `now`.
    pub fn allow_at(&mut self, now: Instant) -> bool {
        let ok = self.has_token_at(now);
        if ok {
            self.take();
        }
        ok
    }

    /// Refills for the time since the last look and says whether a token is there, taking none:
    /// with [`RateLimit::take`], a caller can consult another bucket before spending this one.
    pub fn has_token_at(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        // A clock read on another core may be a little behind this bucket's last look: no refill.
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
        self.tokens >= 1.0
    }

    /// Spends a token that [`RateLimit::has_token_at`] found.
    pub fn take(&mut self) {
        if self.rate != 0.0 {
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
pub struct ConnLimits {
    messages: RateLimit,
    ops: RateLimit,
    typing: RateLimit,
    user: UserSlot,
    metrics: Arc<Metrics>,
}

impl ConnLimits {
    pub fn new(cfg: &Config, user: UserSlot, metrics: Arc<Metrics>) -> Self {
        let rates = (cfg.messages_per_sec, cfg.ops_per_sec, cfg.typing_per_sec);
        Self::with_rates(rates, user, metrics, Instant::now())
    }

    /// Full buckets at `now` with (messages, ops, typing) a second.
    fn with_rates(rates: (u32, u32, u32), user: UserSlot, metrics: Arc<Metrics>, now: Instant) -> Self {
        let (messages, ops, typing) = rates;
        ConnLimits {
            messages: RateLimit::per_sec_at(messages, now),
            ops: RateLimit::per_sec_at(ops, now),
            typing: RateLimit::per_sec_at(typing, now),
            user,
            metrics,
        }
    }

    /// Whether a frame of `kind` may go through now; a refusal is counted by scope and kind.
    pub fn check(&mut self, kind: Kind) -> Result<(), Scope> {
        self.check_at(kind, Instant::now())
    }

    fn check_at(&mut self, kind: Kind, now: Instant) -> Result<(), Scope> {
        let checked = self.decide(kind, now);
        if let Err(scope) = checked {
            self.metrics.rate_limited(scope.label(), kind.label());
        }
        checked
    }

    fn decide(&mut self, kind: Kind, now: Instant) -> Result<(), Scope> {
        let own = match kind {
            Kind::Messages => &mut self.messages,
            Kind::Ops => &mut self.ops,
            Kind::Typing => &mut self.typing,
        };
        if !own.has_token_at(now) {
            return Err(Scope::Connection);
        }
        if !self.user.allow_at(kind, now) {
            return Err(Scope::User);
        }
        own.take();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user_limits::{UserLimits, UserRates};
    use protocol::UserId;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::per_sec_at(10, t0);
        let allowed = (0..100).filter(|_| r.allow_at(t0)).count();
        assert_eq!(allowed, 20, "burst is twice the rate");
        assert!(!r.allow_at(t0));
        let t1 = t0 + Duration::from_millis(500);
        let allowed = (0..100).filter(|_| r.allow_at(t1)).count();
        assert_eq!(allowed, 5, "half a second refills half the rate");
        let t2 = t1 + REFILL_TIME;
        let allowed = (0..100).filter(|_| r.allow_at(t2)).count();
        assert_eq!(allowed, 20, "REFILL_TIME refills an empty bucket completely, and no more");
    }

    #[test]
    fn zero_disables() {
        let t0 = Instant::now();
        let mut r = RateLimit::per_sec_at(0, t0);
        assert!((0..1000).all(|_| r.allow_at(t0)));
    }

    #[test]
    fn an_earlier_clock_reading_neither_refills_nor_rewinds() {
        let t0 = Instant::now();
        let mut r = RateLimit::per_sec_at(1, t0 + Duration::from_secs(1));
        assert_eq!((0..10).filter(|_| r.allow_at(t0)).count(), 2);
        // Reading t0 again (another core's clock) must not move `at` back and refill twice.
        assert!(!r.allow_at(t0 + Duration::from_secs(1)));
        assert!(r.allow_at(t0 + Duration::from_secs(2)));
    }

    fn user_limits(messages: u32, ops: u32, typing: u32) -> Arc<UserLimits> {
        let rates =
            UserRates { messages_per_sec: messages, ops_per_sec: ops, typing_per_sec: typing, max_connections: 0 };
        Arc::new(UserLimits::new(rates, Default::default()))
    }

    fn conn(limits: &Arc<UserLimits>, user: &UserId, per_conn: u32, now: Instant) -> ConnLimits {
        let slot = limits.connect_at(user, now).expect("no connection cap");
        ConnLimits::with_rates((per_conn, per_conn, per_conn), slot, Arc::new(Metrics::new("test", 1)), now)
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
        let mut conns: Vec<ConnLimits> = (0..4).map(|_| conn(&limits, &alice, 50, t0)).collect();
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
        let metrics = Arc::new(Metrics::new("test", 1));
        let t0 = Instant::now();
        let mut c = ConnLimits::with_rates((0, 1, 0), limits.connect_at(&alice, t0).unwrap(), metrics.clone(), t0);
        // Messages: the user's burst of 2; ops: the connection's burst of 2.
        let messages = (0..5).filter(|_| c.check_at(Kind::Messages, t0).is_ok()).count();
        let ops = (0..5).filter(|_| c.check_at(Kind::Ops, t0).is_ok()).count();
        assert_eq!((messages, ops), (2, 2));
        let text = metrics.render();
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
