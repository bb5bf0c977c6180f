//! A spawned service process with its output captured to a log file.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// A child process (a service binary, or nats-server) whose stdout and stderr go to a log file.
/// [`Proc::respawn`] starts it again with the same arguments, appending to the same log. Dropping
/// it kills (SIGKILL) and reaps the process; if the test is panicking, the log's tail is printed.
pub struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

impl Proc {
    /// Spawns `program args...` with extra environment `envs` (the test's environment is
    /// inherited; `RUST_LOG` defaults to `info` so the log says something useful).
    pub fn spawn(name: &str, program: &Path, args: &[String], envs: &[(&str, &str)]) -> Proc {
        let dir = tempfile::Builder::new().prefix(&format!("testkit-{name}-")).tempdir().expect("creating a temp dir");
        let mut p = Proc {
            name: name.to_owned(),
            program: program.to_owned(),
            args: args.to_vec(),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
            log: dir.path().join(format!("{name}.log")),
            _dir: dir,
        };
        p.respawn();
        p
    }

    /// Starts the process again with the same program, arguments and environment, killing the
    /// current one first if it still runs. The log is appended to.
    pub fn respawn(&mut self) {
        self.kill9();
        let log = OpenOptions::new().create(true).append(true).open(&self.log).expect("opening the log file");
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(log.try_clone().expect("dup log fd")).stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        // If the test process dies without running destructors (a runner timeout kills it), the
        // kernel kills the child too instead of leaking a server that holds ports. The signal is
        // tied to the spawning *thread*: processes are spawned from the test's own thread, which
        // lives as long as the test.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs or when it
    /// was never started or already killed.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().expect("try_wait");
        if st.is_some() {
            self.child = None;
        }
        st
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.try_status();
        self.child.is_some()
    }

    /// SIGKILL and reap. A no-op when it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit. Returns the exit status, or `None`
    /// if it had to be killed with SIGKILL (or was not running).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let pid = self.pid()?;
        // Safety: plain kill(2) on a child we have not reaped yet, so the pid is still ours.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill9();
        None
    }

    /// Waits until `GET url` answers 200. Panics, with the log, if the process exits first or
    /// `timeout` passes.
    pub async fn wait_http_ok(&mut self, url: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                panic!("{} exited ({st}) before {url} answered 200\n{}", self.name, self.log_tail());
            }
            let last = match crate::http_get(url).await {
                Ok((200, _)) => return,
                Ok((code, body)) => format!("status {code}: {body}"),
                Err(e) => format!("{e:#}"),
            };
            if tokio::time::Instant::now() >= deadline {
                panic!("{} not ready: {url} not 200 after {timeout:?} (last: {last})\n{}", self.name, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for `GET http://<metrics_addr>/readyz` to answer 200 (see [`Proc::wait_http_ok`]).
    pub async fn wait_ready(&mut self, metrics_addr: &str, timeout: Duration) {
        self.wait_http_ok(&format!("http://{metrics_addr}/readyz"), timeout).await
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process (and its earlier incarnations) wrote so far.
    pub fn logs(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last lines of the log, framed, for panic messages.
    pub fn log_tail(&self) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        format!(
            "----- last {} lines of {} ({}) -----\n{}\n----- end of {} log -----",
            tail.len(),
            self.name,
            self.log.display(),
            tail.join("\n"),
            self.name
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Proc {
        Proc::spawn("sh", Path::new("/bin/sh"), &["-c".into(), script.into()], &[("TESTKIT_X", "42")])
    }

    #[tokio::test]
    async fn captures_output_and_environment() {
        let mut p = sh("echo out $TESTKIT_X; echo err >&2");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while p.try_status().is_none() {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let logs = p.logs();
        assert!(logs.contains("out 42") && logs.contains("err"), "{logs}");
        // respawn appends.
        p.respawn();
        while p.try_status().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(p.logs().matches("out 42").count(), 2);
    }

    #[tokio::test]
    async fn kill9_and_terminate() {
        let mut p = sh("exec sleep 30");
        assert!(p.is_running());
        p.kill9();
        assert!(!p.is_running());

        p.respawn();
        let st = p.terminate(Duration::from_secs(5)).await.expect("exits on SIGTERM");
        assert!(!st.success());

        // A process that ignores SIGTERM is killed after the timeout.
        let mut p = sh("trap '' TERM; while :; do sleep 0.05; done");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(p.terminate(Duration::from_millis(300)).await.is_none());
        assert!(!p.is_running());
    }

    #[tokio::test]
    async fn wait_ready_reports_an_early_exit_with_the_log() {
        let mut p = sh("echo boom; exit 3");
        let err = tokio::spawn(async move {
            p.wait_ready("127.0.0.1:1", Duration::from_secs(5)).await;
        })
        .await
        .unwrap_err();
        let msg = err.into_panic();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("exited") && msg.contains("boom"), "{msg}");
    }
}
