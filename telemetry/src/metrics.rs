//! Rendering a prometheus-client registry for scrapes.

use prometheus_client::registry::Registry;

/// The `Content-Type` of `/metrics`: the Prometheus text format, version 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Renders every metric of `registry` in the Prometheus text format 0.0.4 (what
/// [`METRICS_CONTENT_TYPE`] announces; the OpenMetrics encoder would add a `# EOF` trailer and
/// different counter family names).
pub fn encode_registry(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an Err could only come from a metric's own encoder, and
    // a partial scrape is better than a panic in a request handler.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics failed; the scrape is partial");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

    #[test]
    fn renders_counters_and_gauges() {
        let mut r = Registry::default();
        let c: Counter = Counter::default();
        let g: Gauge = Gauge::default();
        r.register("demo_events", "Events seen", c.clone());
        r.register("demo_depth", "Queue depth", g.clone());
        c.inc_by(3);
        g.set(-2);
        let text = encode_registry(&r);
        assert!(text.contains("# TYPE demo_events_total counter\n"), "{text}");
        assert!(text.contains("demo_events_total 3\n"), "{text}");
        assert!(text.contains("demo_depth -2\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
