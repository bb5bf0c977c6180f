//! Logging setup: one line per event on stdout, human-readable by default, JSON lines with
//! `LOG_FORMAT=json` for log shippers.
//!
//! Policy for every service: never log message bodies or tokens. Log ids, sizes, sequences.

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::{fmt::MakeWriter, EnvFilter};

/// Installs the global tracing subscriber. The filter comes from `RUST_LOG` (default `info`);
/// `LOG_FORMAT=json` switches to JSON lines, each carrying `"service":"<service>"` so lines from
/// several services can share one pipeline. Calling it again (tests) is harmless: the first
/// subscriber stays.
pub fn init_logging(service: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let res = if json {
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(ServiceTagged::new(service, io::stdout))
            .try_init()
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            // Colour codes only for a person at a terminal, not in files or log pipelines.
            .with_ansi(io::stdout().is_terminal())
            .with_writer(io::stdout)
            .try_init()
    };
    // Err only means a subscriber is already installed.
    let _ = res;
}

/// Makes one writer per event that inserts `"service":"<name>",` right after the opening `{` of
/// the JSON line. tracing-subscriber formats a whole event into a buffer and hands it to a fresh
/// writer with one `write_all`, so a per-event "first write" flag is enough to find the line start.
struct ServiceTagged<M> {
    /// `{"service":"<name>",` with the name JSON-escaped.
    prefix: Box<str>,
    inner: M,
}

impl<M> ServiceTagged<M> {
    fn new(service: &str, inner: M) -> Self {
        ServiceTagged { prefix: format!("{{\"service\":\"{}\",", json_escape(service)).into(), inner }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for ServiceTagged<M> {
    type Writer = EventWriter<'a, M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter { prefix: &self.prefix, inner: self.inner.make_writer(), started: false }
    }
}

struct EventWriter<'a, W> {
    prefix: &'a str,
    inner: W,
    started: bool,
}

impl<W: Write> Write for EventWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.started && !buf.is_empty() {
            self.started = true;
            if buf[0] == b'{' {
                // Prefix and rest go out as one buffer so concurrent events cannot interleave
                // between them (stdout writes of one buffer are atomic under its lock).
                let mut line = Vec::with_capacity(self.prefix.len() + buf.len());
                line.extend_from_slice(self.prefix.as_bytes());
                line.extend_from_slice(&buf[1..]);
                self.inner.write_all(&line)?;
                return Ok(buf.len());
            }
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_service() {
        let sink = Sink::default();
        let s2 = sink.clone();
        let tagged = ServiceTagged::new("sto\"rage", move || s2.clone());
        let subscriber = tracing_subscriber::fmt().json().flatten_event(true).with_writer(tagged).finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(seq = 7u64, "first");
            tracing::warn!("second");
        });
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        for l in &lines {
            assert!(l.starts_with(r#"{"service":"sto\"rage","#), "{l}");
            assert!(l.ends_with('}'), "{l}");
        }
        assert!(lines[0].contains(r#""seq":7"#), "{}", lines[0]);
        assert!(lines[0].contains(r#""message":"first""#), "{}", lines[0]);
    }

    #[test]
    fn non_json_writes_pass_through() {
        let sink = Sink::default();
        let mut w = EventWriter { prefix: "{\"service\":\"x\",", inner: sink.clone(), started: false };
        w.write_all(b"plain line\n").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"plain line\n");
    }

    #[test]
    fn init_twice_is_harmless() {
        init_logging("test");
        init_logging("test");
    }
}
