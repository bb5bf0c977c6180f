//! Latency percentile-distribution plots as small standalone SVG files.
//!
//! The usual HdrHistogram picture: percentile on x with "nines" spacing (0 %, 90 %, 99 %,
//! 99.9 %, 99.99 % … equally spaced, i.e. x = −log10(1 − q) for quantile q), latency on a log
//! scale on y. A curve stops at the last percentile its sample count resolves (1 − 1/n), where it
//! reaches the maximum; that is drawn as a dot. Plain SVG text: no fonts, scripts or external
//! references, so it renders the same in a browser, an editor preview or a Markdown viewer.

use std::fmt::Write as _;

use crate::hist::Hist;

const W: f64 = 760.0;
/// The plot area's height; the legend goes below it, one line per series.
const PLOT_H: f64 = 340.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 40.0;
/// Below the plot area: tick labels and the axis title.
const AXIS_H: f64 = 50.0;
const LEGEND_LINE: f64 = 18.0;
/// Samples per decade of nines along a curve.
const STEPS_PER_NINE: u32 = 24;
const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/// x of quantile `q` (0 ≤ q < 1), in nines: 0 → 0, 0.9 → 1, 0.99 → 2, 0.999 → 3.
pub fn nines(q: f64) -> f64 {
    -(1.0 - q.clamp(0.0, 1.0 - 1e-12)).log10()
}

/// The quantile at `x` nines (the inverse of [`nines`]).
pub fn quantile_at(x: f64) -> f64 {
    1.0 - 10f64.powf(-x)
}

/// The label of the x tick at `k` nines: `0%`, `90%`, `99%`, `99.9%`, …
pub fn nines_label(k: u32) -> String {
    match k {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        _ => format!("99.{}%", "9".repeat(k as usize - 2)),
    }
}

/// How many nines the x axis spans for the largest sample count `n`: enough to show the tail
/// the samples resolve (log10 n), at least 2 (99 %) and at most 6.
pub fn x_span(n: u64) -> u32 {
    ((n.max(1) as f64).log10().ceil() as u32).clamp(2, 6)
}

/// The y range in decades of microseconds, `[floor(log10 lo), ceil(log10 hi)]`, at least one
/// decade wide.
pub fn y_decades(lo_us: u64, hi_us: u64) -> (i32, i32) {
    let lo = (lo_us.max(1) as f64).log10().floor() as i32;
    let mut hi = (hi_us.max(1) as f64).log10().ceil() as i32;
    if hi <= lo {
        hi = lo + 1;
    }
    (lo, hi)
}

/// y ticks (µs) for the decade range: every decade, plus 2× and 5× when the range is narrow.
pub fn y_ticks(lo: i32, hi: i32) -> Vec<u64> {
    let mut v = Vec::new();
    for d in lo..=hi {
        let base = 10u64.pow(d.max(0) as u32);
        v.push(base);
        if hi - lo <= 3 && d < hi {
            v.push(2 * base);
            v.push(5 * base);
        }
    }
    v
}

/// A duration label: `1 µs`, `20 µs`, `500 µs`, `1 ms`, `2 s`, `100 s`.
pub fn us_label(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{} s", trim(us as f64 / 1e6))
    } else if us >= 1_000 {
        format!("{} ms", trim(us as f64 / 1e3))
    } else {
        format!("{us} µs")
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The points of one curve: (nines, µs), from 0 % up to the last percentile `n` samples
/// resolve, capped at `span` nines; the last point is the maximum.
pub fn curve(h: &Hist, span: u32) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    // The last percentile n samples resolve: 1 − 1/n, i.e. log10(n) nines.
    let end = nines(1.0 - 1.0 / h.len() as f64).min(span as f64);
    let mut pts = Vec::new();
    let mut i = 0u32;
    loop {
        let x = i as f64 / STEPS_PER_NINE as f64;
        if x >= end {
            break;
        }
        pts.push((x, h.value_at_quantile(quantile_at(x))));
        i += 1;
    }
    pts.push((end, h.max()));
    pts
}

/// A whole plot; `None` when every series is empty.
pub fn svg(title: &str, series: &[(&str, &Hist)]) -> Option<String> {
    let live: Vec<&(&str, &Hist)> = series.iter().filter(|(_, h)| !h.is_empty()).collect();
    if live.is_empty() {
        return None;
    }
    let span = x_span(live.iter().map(|(_, h)| h.len()).max().unwrap_or(1));
    let lo_us = live.iter().map(|(_, h)| h.min()).min().unwrap_or(1);
    let hi_us = live.iter().map(|(_, h)| h.max()).max().unwrap_or(1);
    let (dlo, dhi) = y_decades(lo_us, hi_us);
    let (pw, ph) = (W - LEFT - RIGHT, PLOT_H);
    let legend_top = TOP + ph + AXIS_H;
    let height = legend_top + LEGEND_LINE * live.len() as f64 + 10.0;
    let px = |x: f64| LEFT + pw * x / span as f64;
    let py = |us: u64| {
        let l = (us.max(1) as f64).log10();
        TOP + ph * (1.0 - (l - dlo as f64) / (dhi - dlo) as f64)
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{height}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#, W / 2.0, esc(title));
    // Grid and ticks.
    for k in 0..=span {
        let x = px(k as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 16.0,
            nines_label(k)
        );
    }
    for t in y_ticks(dlo, dhi) {
        let y = py(t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            us_label(t)
        );
    }
    let _ = writeln!(s, r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + pw / 2.0,
        TOP + ph + 36.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">latency (log scale)</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    // Curves and the legend.
    for (i, (name, h)) in live.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts = curve(h, span);
        let path: Vec<String> = pts.iter().map(|&(x, v)| format!("{:.1},{:.1}", px(x), py(v))).collect();
        let _ =
            writeln!(s, r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#, path.join(" "));
        if let Some(&(x, v)) = pts.last() {
            let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#, px(x), py(v));
        }
        let ly = legend_top + LEGEND_LINE * i as f64 + 4.0;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{} (n={}, max {})</text>"#,
            LEFT + 10.0,
            ly - 4.0,
            LEFT + 34.0,
            ly - 4.0,
            LEFT + 40.0,
            ly,
            esc(name),
            h.len(),
            crate::hist::fmt_ms(h.max())
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist;

    #[test]
    fn percentile_axis() {
        for (q, x) in [(0.0, 0.0), (0.9, 1.0), (0.99, 2.0), (0.999, 3.0), (0.9999, 4.0)] {
            assert!((nines(q) - x).abs() < 1e-9, "{q} → {}", nines(q));
            assert!((quantile_at(x) - q).abs() < 1e-12);
        }
        assert!(nines(1.0).is_finite());
        let labels: Vec<String> = (0..=5).map(nines_label).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]);
        assert_eq!(x_span(1), 2);
        assert_eq!(x_span(500), 3);
        assert_eq!(x_span(10_000), 4);
        assert_eq!(x_span(u64::MAX), 6);
    }

    #[test]
    fn latency_axis() {
        assert_eq!(y_decades(800, 45_000), (2, 5));
        assert_eq!(y_decades(1000, 1000), (3, 4));
        assert_eq!(y_decades(0, 0), (0, 1));
        assert_eq!(y_ticks(3, 4), vec![1000, 2000, 5000, 10_000]);
        assert_eq!(y_ticks(0, 6), vec![1, 10, 100, 1000, 10_000, 100_000, 1_000_000]);
        assert_eq!(us_label(500), "500 µs");
        assert_eq!(us_label(2000), "2 ms");
        assert_eq!(us_label(1500), "1.5 ms");
        assert_eq!(us_label(10_000_000), "10 s");
    }

    #[test]
    fn curves_follow_the_histogram() {
        let mut h = hist::new();
        for v in 1..=1000u64 {
            hist::record(&mut h, v * 10);
        }
        let c = curve(&h, x_span(h.len()));
        // From 0 % to log10(1000) = 3 nines, ending at the maximum, never decreasing.
        assert_eq!(c.first().unwrap().0, 0.0);
        assert!((c.last().unwrap().0 - 3.0).abs() < 1e-9);
        assert_eq!(c.last().unwrap().1, h.max());
        assert!(c.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        // The 90 % point (x = 1) is the histogram's p90.
        let p90 = c.iter().find(|p| (p.0 - 1.0).abs() < 1e-9).unwrap().1;
        assert_eq!(p90, h.value_at_quantile(0.9));
        assert!(curve(&hist::new(), 3).is_empty());
    }

    #[test]
    fn svg_document() {
        let mut a = hist::new();
        let mut b = hist::new();
        for v in 1..=200u64 {
            hist::record(&mut a, 1000 + v);
            hist::record(&mut b, 5000 * v);
        }
        let doc = svg("chat <latency> & more", &[("send → sent", &a), ("empty", &hist::new()), ("send → deliver", &b)])
            .unwrap();
        assert!(doc.starts_with("<svg ") && doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<polyline").count(), 2, "empty series are left out");
        assert!(doc.contains("chat &lt;latency&gt; &amp; more"));
        assert!(doc.contains(">99%<") && doc.contains(">90%<"));
        assert!(svg("nothing", &[("a", &hist::new())]).is_none());
    }
}
