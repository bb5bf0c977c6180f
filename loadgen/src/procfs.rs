//! What a process costs, read from /proc: resident memory (`VmRSS` of `/proc/<pid>/status`) and
//! CPU time (`utime` + `stime` of `/proc/<pid>/stat`, all threads of the process).

use anyhow::{anyhow, Context as _};

/// `"self"` or a pid.
pub fn path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(p) => format!("/proc/{p}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// `VmRSS` in bytes from the text of `/proc/<pid>/status` (the kernel writes it in kB).
pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line["VmRSS:".len()..].split_whitespace();
    let v: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => Some(v * 1024),
        Some(_) => None,
    }
}

/// `(utime, stime)` in clock ticks from the text of `/proc/<pid>/stat`. The command name (field
/// 2) is in parentheses and may itself hold spaces and parentheses, so fields are counted after
/// the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let (_, after) = stat.rsplit_once(')')?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is [0] (field 3), utime [11] (field 14), stime [12] (field 15).
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Resident memory of a process, bytes.
pub fn rss_bytes(pid: Option<u32>) -> anyhow::Result<u64> {
    let p = path(pid, "status");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    parse_vmrss(&s).ok_or_else(|| anyhow!("{p} has no VmRSS line"))
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: Option<u32>) -> anyhow::Result<f64> {
    let p = path(pid, "stat");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    let (u, s) = parse_stat_ticks(&s).ok_or_else(|| anyhow!("{p}: unexpected format"))?;
    Ok((u + s) as f64 / ticks_per_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmrss() {
        let status = "Name:\tnats-server\nVmPeak:\t  123 kB\nVmRSS:\t   20480 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vmrss(status), Some(20480 * 1024));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        assert_eq!(parse_vmrss("VmRSS: lots kB\n"), None);
        assert_eq!(parse_vmrss("VmRSS: 5 MB\n"), None);
    }

    #[test]
    fn stat_ticks_with_awkward_command_names() {
        // Fields 3.. of a real line; utime 1234, stime 56.
        let tail = "S 1 2 3 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 3 0 99 1000 200";
        assert_eq!(parse_stat_ticks(&format!("4242 (gateway) {tail}")), Some((1234, 56)));
        assert_eq!(parse_stat_ticks(&format!("4242 (MainThread (x) y) {tail}")), Some((1234, 56)));
        assert_eq!(parse_stat_ticks("4242 (short) S 1 2"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_bytes(None).unwrap() > 0);
        assert!(cpu_seconds(Some(std::process::id())).unwrap() >= 0.0);
        assert!(rss_bytes(Some(u32::MAX)).is_err());
    }
}
