//! A real nats-server with JetStream, on free ports, with its own store in a temp dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::{free_port, Proc, READY_TIMEOUT};

/// A nats-server child process (`-js`, listening on 127.0.0.1 only). Dropping it kills the server
/// and removes its store.
pub struct NatsServer {
    proc: Proc,
    store: TempDir,
    port: u16,
    monitor_port: u16,
}

impl NatsServer {
    /// Starts a server on a free client port and a free monitoring port and waits until
    /// JetStream answers. A "free" port can be taken by a concurrent test before the server
    /// binds it; the server then exits (or another server answers on its monitoring port), and
    /// it is started again on other ports.
    pub async fn start() -> NatsServer {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let mut s = Self::spawn_on_free_ports();
            if s.owns_its_ports().await {
                s.wait_ready().await;
                return s;
            }
            if attempt == ATTEMPTS {
                panic!("nats-server could not bind free ports in {ATTEMPTS} attempts\n{}", s.proc.log_tail());
            }
            // Dropping `s` kills it and removes its store.
        }
        unreachable!()
    }

    /// Waits (bounded) until this server answers on its monitoring port as itself (its `/varz`
    /// names its client port). False if it exited first (a port was taken) or another server
    /// answers there.
    async fn owns_its_ports(&mut self) -> bool {
        let varz = format!("http://127.0.0.1:{}/varz", self.monitor_port);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if !self.proc.is_running() {
                return false;
            }
            if let Ok((200, body)) = crate::http_get(&varz).await {
                let port = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["port"].as_u64());
                // Still running after answering: it did bind both ports.
                return port == Some(u64::from(self.port)) && self.proc.is_running();
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("nats-server: {varz} did not answer within {READY_TIMEOUT:?}\n{}", self.proc.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn spawn_on_free_ports() -> NatsServer {
        let store = tempfile::Builder::new().prefix("testkit-nats-store-").tempdir().expect("creating the store dir");
        let (port, monitor_port) = (free_port(), free_port());
        let args: Vec<String> = [
            "-js",
            "-sd",
            &store.path().display().to_string(),
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &monitor_port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::spawn("nats-server", &nats_server_bin(), &args, &[]);
        NatsServer { proc, store, port, monitor_port }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/varz`, `/jsz`, `/healthz`).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The JetStream store directory (`-sd`), kept across [`NatsServer::restart`].
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server with SIGKILL (no clean shutdown). [`NatsServer::respawn`] brings it back.
    pub fn kill(&mut self) {
        self.proc.kill9();
    }

    /// Starts the server again on the same ports and store and waits until JetStream answers.
    pub async fn respawn(&mut self) {
        self.proc.respawn();
        self.wait_ready().await;
    }

    /// `kill -9`, then start again on the same ports and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.respawn().await;
    }

    /// A client connected to this server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }

    /// A JetStream context on a new client.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Waits until JetStream is enabled and the server reports itself healthy (after a restart
    /// that includes recovering the streams from the store).
    async fn wait_ready(&mut self) {
        let base = format!("http://127.0.0.1:{}", self.monitor_port);
        for path in ["/healthz?js-enabled-only=true", "/healthz"] {
            self.proc.wait_http_ok(&format!("{base}{path}"), READY_TIMEOUT).await;
        }
    }
}

/// The nats-server binary: `$NATS_SERVER_BIN`, else `<workspace>/.tools/bin/nats-server`
/// (installed by `scripts/install-nats.sh`), else `nats-server` on `PATH`.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let tools = crate::workspace_root().join(".tools/bin/nats-server");
    if tools.is_file() {
        return tools;
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("nats-server")).find(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found: run scripts/install-nats.sh (installs the pinned version \
                 into {}), or set NATS_SERVER_BIN",
                tools.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    #[tokio::test]
    async fn starts_serves_jetstream_and_stops() {
        let mut server = NatsServer::start().await;
        let js = server.jetstream().await;
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "T".into(),
            subjects: vec!["t.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        js.publish("t.1", "one".into()).await.unwrap().await.unwrap();

        // A kill -9 and restart keeps what JetStream acknowledged.
        server.restart().await;
        let js = server.jetstream().await;
        let stream = js.get_stream("T").await.unwrap();
        let msg = stream.get_raw_message(1).await.unwrap();
        assert_eq!(&msg.payload[..], b"one");
        assert!(server.store_dir().join("jetstream").is_dir());

        // Core NATS works too.
        let client = server.client().await;
        let mut sub = client.subscribe("x").await.unwrap();
        client.publish("x", "hi".into()).await.unwrap();
        assert_eq!(&sub.next().await.unwrap().payload[..], b"hi");

        let port = server.port();
        drop(server);
        // The server is gone: its port can be bound again.
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("port released");
    }
}
