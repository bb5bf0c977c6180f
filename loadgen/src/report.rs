//! Results: the machine-readable JSON, the short Markdown summary, the live progress line.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use serde_json::{json, Value};

/// Everything a scenario produced.
pub struct Output {
    pub scenario: &'static str,
    pub started: SystemTime,
    /// The effective configuration (every knob, defaults included).
    pub config: Value,
    /// Every figure.
    pub results: Value,
    /// Scenario-specific Markdown (tables), placed under the common header.
    pub markdown: String,
    /// The human summary printed at the end.
    pub human: String,
}

/// What the run is measured on: CPU, memory, kernel and the limits that matter for load tests.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let logical = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = |key: &str| -> Option<u64> {
        meminfo.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
    };
    let read = |p: &str| {
        std::fs::read_to_string(p).map(|s| s.split_whitespace().collect::<Vec<_>>().join(" ")).unwrap_or_default()
    };
    let nofile = {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into a local struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
        json!({ "soft": r.rlim_cur, "hard": r.rlim_max })
    };
    json!({
        "cpu_model": model,
        "logical_cpus": logical,
        "available_parallelism": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_total_bytes": mem_kb("MemTotal:").map(|k| k * 1024),
        "mem_available_bytes": mem_kb("MemAvailable:").map(|k| k * 1024),
        "kernel": read("/proc/sys/kernel/osrelease"),
        "kernel_version": read("/proc/sys/kernel/version"),
        "hostname": read("/proc/sys/kernel/hostname"),
        "loadavg": read("/proc/loadavg"),
        "sysctl": {
            "net.ipv4.ip_local_port_range": read("/proc/sys/net/ipv4/ip_local_port_range"),
            "net.core.somaxconn": read("/proc/sys/net/core/somaxconn"),
            "net.ipv4.tcp_max_syn_backlog": read("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
            "net.ipv4.tcp_tw_reuse": read("/proc/sys/net/ipv4/tcp_tw_reuse"),
            "fs.file-max": read("/proc/sys/fs/file-max"),
            "fs.nr_open": read("/proc/sys/fs/nr_open"),
        },
        "rlimit_nofile": nofile,
    })
}

/// One line of machine description for summaries.
pub fn machine_line(m: &Value) -> String {
    let gib = m["mem_total_bytes"].as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    format!(
        "{} × {}, {:.1} GiB RAM, Linux {}",
        m["logical_cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        gib,
        m["kernel"].as_str().unwrap_or("?")
    )
}

/// The exact command line, shell-quoted, with the value of `--secret` redacted.
pub fn command_line() -> String {
    let mut out = Vec::new();
    let mut redact_next = false;
    for a in std::env::args() {
        if redact_next {
            out.push("<redacted>".to_owned());
            redact_next = false;
            continue;
        }
        if a == "--secret" {
            redact_next = true;
            out.push(a);
        } else if a.starts_with("--secret=") {
            out.push("--secret=<redacted>".into());
        } else {
            out.push(shell_quote(&a));
        }
    }
    out.join(" ")
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The commit of the working tree and whether it has uncommitted changes.
/// Asked in the current directory, else next to the loadgen binary (inside the repository's
/// target directory), so that runs from elsewhere still record the commit.
pub fn git() -> Value {
    let dir = {
        let in_repo = |d: &Path| {
            std::process::Command::new("git")
                .arg("-C")
                .arg(d)
                .args(["rev-parse", "--git-dir"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
        if in_repo(&cwd) {
            cwd
        } else {
            exe_dir.filter(|d| in_repo(d)).unwrap_or(cwd)
        }
    };
    let run = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").arg("-C").arg(&dir).args(args).output().ok()?;
        // Only the trailing newline goes: porcelain lines start with a meaningful space.
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    };
    let commit = run(&["rev-parse", "HEAD"]);
    let status = run(&["status", "--porcelain", "--untracked-files=no"]);
    let changed: Vec<String> =
        status.as_deref().unwrap_or("").lines().map(|l| l.get(3..).unwrap_or(l).to_owned()).collect();
    json!({
        "commit": commit,
        "dirty": status.as_ref().map(|s| !s.is_empty()),
        "modified_files": changed,
    })
}

/// A latency plot to write next to the results: named histograms on one percentile chart.
pub struct Plot<'a> {
    pub title: String,
    pub series: Vec<(&'a str, &'a crate::hist::Hist)>,
}

/// The files a run wrote.
pub struct Written {
    pub json: PathBuf,
    pub markdown: PathBuf,
    pub plot: Option<PathBuf>,
}

/// Builds the full JSON document and Markdown, writes both into `out` (when given) with the
/// latency plot as `<scenario>-<timestamp>.svg` (linked from the Markdown), and returns the paths.
pub fn write(out: Option<&Path>, o: &Output, plot: Option<&Plot>) -> anyhow::Result<Option<Written>> {
    let (stamp, iso) = crate::util::utc_stamp(o.started);
    let machine = machine();
    let git = git();
    let command = command_line();
    let mut doc = json!({
        "scenario": o.scenario,
        "started_at": iso,
        "finished_at": crate::util::utc_stamp(SystemTime::now()).1,
        "loadgen_version": env!("CARGO_PKG_VERSION"),
        "command_line": command,
        "git": git,
        "machine": machine,
        "config": o.config,
        "results": o.results,
    });
    let Some(dir) = out else { return Ok(None) };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join(format!("{}-{stamp}.json", o.scenario));
    let md_path = dir.join(format!("{}-{stamp}.md", o.scenario));
    let svg = plot.and_then(|p| crate::plot::svg(&p.title, &p.series));
    let svg_path = svg.as_ref().map(|_| dir.join(format!("{}-{stamp}.svg", o.scenario)));
    if let Some(p) = &svg_path {
        doc["latency_plot"] = json!(file_name(p));
    }
    let mut md = String::new();
    md.push_str(&format!("# loadgen {} — {iso}\n\n", o.scenario));
    md.push_str(&format!(
        "* commit: `{}`{}\n",
        doc["git"]["commit"].as_str().unwrap_or("unknown"),
        if doc["git"]["dirty"].as_bool() == Some(true) { " (working tree has uncommitted changes)" } else { "" }
    ));
    md.push_str(&format!("* machine: {}\n", machine_line(&doc["machine"])));
    md.push_str(&format!("* command: `{command}`\n"));
    md.push_str(&format!("* full results: `{}`\n", file_name(&json_path)));
    if let Some(p) = &svg_path {
        md.push_str(&format!("* latency percentiles: [{0}]({0})\n", file_name(p)));
    }
    md.push('\n');
    md.push_str(&o.markdown);
    if let (Some(p), Some(plot)) = (&svg_path, plot) {
        md.push_str(&format!("\n![{}]({})\n", plot.title, file_name(p)));
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    if let (Some(p), Some(text)) = (&svg_path, svg) {
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(Some(Written { json: json_path, markdown: md_path, plot: svg_path }))
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// Prints the human summary and the paths written (for scenarios without latency histograms).
#[allow(dead_code)] // Every scenario in this tree has a plot; kept for those that will not.
pub fn finish(out: Option<&Path>, o: &Output) -> anyhow::Result<()> {
    finish_plot(out, o, None)
}

/// Like [`finish`], with a latency plot written next to the results. The `results:` line is
/// what bench-results/run-all.sh reads; the plot gets a line of its own.
pub fn finish_plot(out: Option<&Path>, o: &Output, plot: Option<&Plot>) -> anyhow::Result<()> {
    let written = write(out, o, plot)?;
    println!("{}", o.human.trim_end());
    if let Some(w) = written {
        println!("results: {} and {}", w.json.display(), w.markdown.display());
        if let Some(p) = w.plot {
            println!("plot: {}", p.display());
        }
    }
    Ok(())
}

/// A live progress line on stderr: rewritten in place on a terminal, one line every few seconds
/// otherwise (logs stay readable).
pub struct Progress {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start<F>(mut line: F) -> Progress
    where
        F: FnMut(Duration) -> String + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let tty = std::io::stderr().is_terminal();
        let every = if tty { Duration::from_millis(500) } else { Duration::from_secs(5) };
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut last_print = Instant::now() - every;
            loop {
                tick.tick().await;
                if s.load(Ordering::Relaxed) {
                    break;
                }
                // The closure runs every second (scenarios sample time series from it).
                let text = line(started.elapsed());
                if last_print.elapsed() >= every {
                    last_print = Instant::now();
                    let mut e = std::io::stderr().lock();
                    if tty {
                        let _ = write!(e, "\r\x1b[2K{text}");
                    } else {
                        let _ = writeln!(e, "{text}");
                    }
                    let _ = e.flush();
                }
            }
            if tty {
                let _ = writeln!(std::io::stderr());
            }
        });
        Progress { stop, task }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// A status line to stderr (phase changes), not overwritten by the progress line.
pub fn note(msg: impl AsRef<str>) {
    let mut e = std::io::stderr().lock();
    if e.is_terminal() {
        let _ = write!(e, "\r\x1b[2K");
    }
    let _ = writeln!(e, "[loadgen] {}", msg.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--rate"), "--rate");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
