//! A histogram with one shard of counters per core, merged only when scraped, so recording on a
//! hot path is a few relaxed atomic adds on memory no other core writes (no lock, no shared
//! cache line), unlike a single shared histogram.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

struct Shard {
    /// Per-bucket counts (not cumulative); the last one is +Inf.
    buckets: Box<[AtomicU64]>,
    /// The f64 sum, as bits.
    sum: AtomicU64,
}

pub struct ShardedHistogram {
    name: &'static str,
    help: &'static str,
    bounds: Vec<f64>,
    shards: Box<[Shard]>,
}

impl ShardedHistogram {
    /// `bounds` are the buckets' upper bounds, ascending; `shards` one per recording thread.
    pub fn new(name: &'static str, help: &'static str, bounds: impl IntoIterator<Item = f64>, shards: usize) -> Self {
        let bounds: Vec<f64> = bounds.into_iter().collect();
        let shards = (0..shards.max(1))
            .map(|_| Shard {
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicU64::new(0f64.to_bits()),
            })
            .collect();
        ShardedHistogram { name, help, bounds, shards }
    }

    /// Records `v` in shard `shard` (taken modulo the number of shards).
    pub fn observe(&self, shard: usize, v: f64) {
        let s = &self.shards[shard % self.shards.len()];
        let i = self.bounds.partition_point(|b| *b < v);
        s.buckets[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = s.sum.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(cur) + v).to_bits();
            match s.sum.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Appends the merged histogram in the Prometheus text format.
    pub fn encode(&self, out: &mut String) {
        let mut counts = vec![0u64; self.bounds.len() + 1];
        let mut sum = 0f64;
        for s in self.shards.iter() {
            for (c, b) in counts.iter_mut().zip(s.buckets.iter()) {
                *c += b.load(Ordering::Relaxed);
            }
            sum += f64::from_bits(s.sum.load(Ordering::Relaxed));
        }
        let name = self.name;
        let _ = writeln!(out, "# HELP {name} {}", self.help);
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (bound, c) in self.bounds.iter().zip(counts.iter()) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Exponential bucket bounds: `start`, `start*factor`, … (`n` of them).
pub fn exponential(start: f64, factor: f64, n: usize) -> impl Iterator<Item = f64> {
    (0..n).map(move |i| start * factor.powi(i as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_shards_into_cumulative_buckets() {
        let h = ShardedHistogram::new("x_seconds", "help", [0.1, 1.0], 2);
        h.observe(0, 0.05);
        h.observe(1, 0.5);
        h.observe(1, 5.0);
        h.observe(7, 0.1); // shard taken modulo; a value equal to a bound falls in that bucket
        let mut out = String::new();
        h.encode(&mut out);
        assert!(out.contains("# TYPE x_seconds histogram"));
        assert!(out.contains("x_seconds_bucket{le=\"0.1\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{le=\"1\"} 3\n"));
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(out.contains("x_seconds_count 4\n"));
        let sum: f64 = out.lines().find_map(|l| l.strip_prefix("x_seconds_sum ")).unwrap().parse().unwrap();
        assert!((sum - 5.65).abs() < 1e-9);
    }

    #[test]
    fn exponential_bounds() {
        let b: Vec<f64> = exponential(1.0, 2.0, 4).collect();
        assert_eq!(b, vec![1.0, 2.0, 4.0, 8.0]);
    }
}
