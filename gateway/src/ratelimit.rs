//! Token buckets for per-connection rate limits (messages, typing, group operations).

use std::time::Instant;

/// `rate` tokens a second, bursts up to `burst`.
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// A bucket with a burst of twice the rate. A rate of 0 disables the limit.
    pub fn per_sec(rate: u32) -> Self {
        let rate = rate as f64;
        RateLimit { rate, burst: rate * 2.0, tokens: rate * 2.0, at: Instant::now() }
    }

    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::per_sec(10);
        r.at = t0;
        let allowed = (0..100).filter(|_| r.allow_at(t0)).count();
        assert_eq!(allowed, 20, "burst is twice the rate");
        assert!(!r.allow_at(t0));
        let t1 = t0 + Duration::from_millis(500);
        let allowed = (0..100).filter(|_| r.allow_at(t1)).count();
        assert_eq!(allowed, 5, "half a second refills half the rate");
    }

    #[test]
    fn zero_disables() {
        let mut r = RateLimit::per_sec(0);
        assert!((0..1000).all(|_| r.allow()));
    }
}
