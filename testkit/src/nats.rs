//! A real nats-server with JetStream, on free ports, with its own store in a temp dir; optionally
//! with the system's generated authorization (one nkey identity per service role).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bus::Role;
use tempfile::TempDir;

use crate::{free_port, Proc, READY_TIMEOUT};

/// A nats-server child process (`-js`, listening on 127.0.0.1 only). Dropping it kills the server
/// and removes its store.
pub struct NatsServer {
    proc: Proc,
    store: TempDir,
    port: u16,
    monitor_port: u16,
    auth: Option<NatsAuth>,
    /// Whether refusals in the server log are expected (see [`NatsServer::expect_violations`]).
    violations_expected: bool,
}

/// The authorization of a server started with [`NatsServer::start_with_auth`]: the config and
/// seeds `chatctl nats-config` would write (`bus::auth::write_dir`), plus an unrestricted
/// "inspector" identity for the test's own look at the system ([`NatsServer::client`]).
pub struct NatsAuth {
    dir: TempDir,
    inspector_seed: String,
}

impl NatsAuth {
    fn generate() -> NatsAuth {
        let dir = tempfile::Builder::new().prefix("testkit-nats-auth-").tempdir().expect("creating the auth dir");
        let inspector = bus::auth::Identity::generate(Role::Admin).expect("generating an nkey");
        bus::auth::write_dir(dir.path(), std::slice::from_ref(&inspector.public_key))
            .expect("writing the NATS authorization");
        let conf = format!("# testkit: the generated authorization\ninclude \"{}\"\n", bus::auth::CONFIG_FILE);
        std::fs::write(dir.path().join("nats.conf"), conf).expect("writing nats.conf");
        NatsAuth { inspector_seed: inspector.seed().to_owned(), dir }
    }

    /// The directory holding `auth.conf` and the seeds.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The nkey seed file of `role` (for `--nats-nkey-file`).
    pub fn nkey_file(&self, role: Role) -> PathBuf {
        self.dir.path().join(role.seed_file())
    }

    /// The nkey seed of `role`.
    pub fn seed(&self, role: Role) -> String {
        std::fs::read_to_string(self.nkey_file(role)).expect("reading a seed").trim().to_owned()
    }
}

impl NatsServer {
    /// Starts a server on a free client port and a free monitoring port and waits until
    /// JetStream answers. A "free" port can be taken by a concurrent test before the server
    /// binds it; the server then exits (or another server answers on its monitoring port), and
    /// it is started again on other ports.
    pub async fn start() -> NatsServer {
        Self::start_inner(false).await
    }

    /// Like [`NatsServer::start`], with the system's generated authorization: every service must
    /// connect with its role's nkey ([`NatsServer::service_args`]) and may only use its subjects.
    pub async fn start_with_auth() -> NatsServer {
        Self::start_inner(true).await
    }

    /// [`NatsServer::start_with_auth`] when `TESTKIT_NATS_AUTH` asks for it (see
    /// [`auth_from_env`]), else [`NatsServer::start`]: for tests that start their services with
    /// the `start_on` constructors and so run either way.
    pub async fn start_from_env() -> NatsServer {
        Self::start_inner(auth_from_env()).await
    }

    async fn start_inner(auth: bool) -> NatsServer {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let mut s = Self::spawn_on_free_ports(auth.then(NatsAuth::generate));
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

    fn spawn_on_free_ports(auth: Option<NatsAuth>) -> NatsServer {
        let store = tempfile::Builder::new().prefix("testkit-nats-store-").tempdir().expect("creating the store dir");
        let (port, monitor_port) = (free_port(), free_port());
        let mut args: Vec<String> = Vec::new();
        if let Some(a) = &auth {
            args.extend(["-c".to_owned(), a.dir().join("nats.conf").display().to_string()]);
        }
        args.extend(
            [
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
            .map(|s| s.to_string()),
        );
        let proc = Proc::spawn("nats-server", &nats_server_bin(), &args, &[]);
        NatsServer { proc, store, port, monitor_port, auth, violations_expected: false }
    }

    /// Refusals in the server log are part of the test. Otherwise a server with authorization
    /// fails the test when it is dropped if it refused anything (see [`NatsServer::violations`]):
    /// the system must never need more than its roles' permissions.
    pub fn expect_violations(&mut self) {
        self.violations_expected = true;
    }

    /// The authorization, when started with [`NatsServer::start_with_auth`].
    pub fn auth(&self) -> Option<&NatsAuth> {
        self.auth.as_ref()
    }

    /// The arguments a service of `role` needs to reach this server: `--nats-url`, and with
    /// authorization `--nats-nkey-file` with the role's seed.
    pub fn service_args(&self, role: Role) -> Vec<String> {
        let mut args = vec!["--nats-url".to_owned(), self.url()];
        if let Some(a) = &self.auth {
            args.extend(["--nats-nkey-file".to_owned(), a.nkey_file(role).display().to_string()]);
        }
        args
    }

    /// The server log's lines about refused operations (`Publish Violation`, `Subscription
    /// Violation`) and refused connections (`authentication error`, `Authorization Violation`).
    pub fn violations(&self) -> Vec<String> {
        self.proc
            .logs()
            .lines()
            .filter(|l| l.contains("Violation") || l.contains("authentication error"))
            .map(str::to_owned)
            .collect()
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

    /// A client connected to this server; with authorization, as the unrestricted inspector.
    pub async fn client(&self) -> async_nats::Client {
        let mut opts = async_nats::ConnectOptions::new();
        if let Some(a) = &self.auth {
            opts = opts.nkey(a.inspector_seed.clone());
        }
        opts.connect(self.url()).await.unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }

    /// A client connected as `role` (its nkey and inbox prefix), as the service would be. Panics
    /// on a server without authorization.
    pub async fn client_as(&self, role: Role) -> async_nats::Client {
        let a = self.auth.as_ref().expect("client_as needs a server started with start_with_auth");
        async_nats::ConnectOptions::new()
            .nkey(a.seed(role))
            .custom_inbox_prefix(role.inbox_prefix())
            .connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to {} as {}: {e}", self.url(), role.name()))
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

impl Drop for NatsServer {
    fn drop(&mut self) {
        if self.auth.is_none() || self.violations_expected || std::thread::panicking() {
            return;
        }
        let v = self.violations();
        if !v.is_empty() {
            panic!(
                "nats-server refused {} operation(s) of the system (its generated permissions do not cover them):\n{}",
                v.len(),
                v.join("\n")
            );
        }
    }
}

/// Whether `TESTKIT_NATS_AUTH` asks for the generated NATS authorization in every [`System`]
/// (`TESTKIT_NATS_AUTH=1 cargo nextest run -p e2e` runs the system tests with each service on its
/// own role's identity).
///
/// [`System`]: crate::System
pub fn auth_from_env() -> bool {
    std::env::var("TESTKIT_NATS_AUTH").is_ok_and(|v| !v.is_empty() && v != "0")
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

    #[tokio::test]
    async fn a_server_with_authorization_fails_the_test_that_made_it_refuse_something() {
        let server = NatsServer::start_with_auth().await;
        // The push role may read push.> and publish nothing.
        let push = server.client_as(Role::Push).await;
        let mut events = push.subscribe("push.>").await.unwrap();
        let inspector = server.client().await;
        inspector.publish("push.bob", "e".into()).await.unwrap();
        inspector.flush().await.unwrap();
        assert_eq!(events.next().await.unwrap().subject.as_str(), "push.bob");
        assert!(server.violations().is_empty(), "{:?}", server.violations());

        push.publish("inbox.bob", "forged".into()).await.unwrap();
        push.flush().await.unwrap();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while server.violations().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the refused publish was not logged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            server.violations()[0].contains("Publish Violation - Subject \"inbox.bob\""),
            "{:?}",
            server.violations()
        );
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(server)));
        let msg = dropped.expect_err("dropping a server that refused something panics");
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("refused 1 operation") && msg.contains("inbox.bob"), "{msg}");

        // Unless the test expects refusals.
        let mut server = NatsServer::start_with_auth().await;
        server.expect_violations();
        let push = server.client_as(Role::Push).await;
        push.publish("inbox.bob", "forged".into()).await.unwrap();
        push.flush().await.unwrap();
        drop(server);
    }
}
