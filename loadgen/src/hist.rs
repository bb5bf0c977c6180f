//! Latency histograms (HdrHistogram, microseconds, 3 significant digits) and their summaries.

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

pub type Hist = Histogram<u64>;

/// A histogram from 1 µs to 1 hour; larger values are clamped to the top (never dropped).
pub fn new() -> Hist {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Hist, us: u64) {
    h.saturating_record(us.max(1));
}

pub fn merge(into: &mut Hist, from: &Hist) {
    // Same bounds everywhere, so adding cannot fail.
    let _ = into.add(from);
}

pub const PERCENTILES: [(&str, f64); 4] = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)];

/// `{count, min_us, mean_us, p50_us, p90_us, p99_us, p99_9_us, max_us}`.
pub fn summary(h: &Hist) -> Value {
    if h.is_empty() {
        return json!({ "count": 0 });
    }
    json!({
        "count": h.len(),
        "min_us": h.min(),
        "mean_us": h.mean().round() as u64,
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p99_9_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

pub fn fmt_ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// One human line: `p50 1.20 ms  p90 …  p99 …  p99.9 …  max …  (n=…)`.
pub fn line(h: &Hist) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    let mut s = String::new();
    for (name, p) in PERCENTILES {
        s.push_str(&format!("{name} {}  ", fmt_ms(h.value_at_percentile(p))));
    }
    s.push_str(&format!("max {}  (n={})", fmt_ms(h.max()), h.len()));
    s
}

/// A Markdown table row: `| name | p50 | p90 | p99 | p99.9 | max | n |`.
pub fn md_row(name: &str, h: &Hist) -> String {
    if h.is_empty() {
        return format!("| {name} | – | – | – | – | – | 0 |\n");
    }
    let mut s = format!("| {name} |");
    for (_, p) in PERCENTILES {
        s.push_str(&format!(" {} |", fmt_ms(h.value_at_percentile(p))));
    }
    s.push_str(&format!(" {} | {} |\n", fmt_ms(h.max()), h.len()));
    s
}

pub const MD_HEADER: &str = "| latency | p50 | p90 | p99 | p99.9 | max | samples |\n|---|---|---|---|---|---|---|\n";

/// Hex of the V2 serialisation, to pass a histogram between processes in JSON.
pub fn to_hex(h: &Hist) -> String {
    let mut buf = Vec::new();
    let _ = V2Serializer::new().serialize(h, &mut buf);
    crate::util::hex_encode(&buf)
}

pub fn from_hex(s: &str) -> anyhow::Result<Hist> {
    let bytes = crate::util::hex_decode(s).ok_or_else(|| anyhow::anyhow!("bad histogram encoding"))?;
    let h: Hist =
        Deserializer::new().deserialize(&mut &bytes[..]).map_err(|e| anyhow::anyhow!("bad histogram: {e:?}"))?;
    let mut out = new();
    merge(&mut out, &h);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_clamp() {
        let mut h = new();
        for v in [0, 5, 1000, 10_000_000_000] {
            record(&mut h, v);
        }
        assert_eq!(h.len(), 4);
        let back = from_hex(&to_hex(&h)).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
        assert_eq!(summary(&back)["count"], 4);
    }
}
