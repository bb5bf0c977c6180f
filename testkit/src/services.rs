//! The workspace's services as child processes, and a whole system of them.

use std::time::Duration;

use protocol::TokenKeys;

use crate::{bin_path, free_port, NatsServer, Proc, WsClient, READY_TIMEOUT};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The `storage` service: provisions the streams and purges delivered messages.
pub struct Storage {
    pub proc: Proc,
    metrics_addr: String,
}

impl Storage {
    /// `storage --nats-url <url> --metrics-addr 127.0.0.1:<free>`; waits for `/readyz`.
    pub async fn start(nats_url: &str) -> Storage {
        Self::start_with(nats_url, &[]).await
    }

    /// Like [`Storage::start`] with extra command-line arguments.
    pub async fn start_with(nats_url: &str, extra: &[&str]) -> Storage {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args = strings(&["--nats-url", nats_url, "--metrics-addr", &metrics_addr]);
        args.extend(strings(extra));
        let proc = Proc::spawn("storage", &bin_path("storage"), &args, &[]);
        let mut s = Storage { proc, metrics_addr };
        s.wait_ready().await;
        s
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    pub async fn wait_ready(&mut self) {
        self.proc.wait_ready(&self.metrics_addr, READY_TIMEOUT).await
    }

    /// `kill -9`, start again with the same arguments, wait for readiness.
    pub async fn restart(&mut self) {
        self.proc.respawn();
        self.wait_ready().await;
    }
}

/// The `router` service: group membership and fan-out.
pub struct Router {
    pub proc: Proc,
    pub metrics_addr: String,
}

impl Router {
    /// `router --nats-url <url> --metrics-addr 127.0.0.1:<free> <extra>`; waits for `/readyz`.
    pub async fn start(nats_url: &str, extra: &[&str]) -> Router {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args = strings(&["--nats-url", nats_url, "--metrics-addr", &metrics_addr]);
        args.extend(strings(extra));
        let proc = Proc::spawn("router", &bin_path("router"), &args, &[]);
        let mut r = Router { proc, metrics_addr };
        r.wait_ready().await;
        r
    }

    pub async fn wait_ready(&mut self) {
        self.proc.wait_ready(&self.metrics_addr, READY_TIMEOUT).await
    }

    /// `kill -9`, start again with the same arguments, wait for readiness.
    pub async fn restart(&mut self) {
        self.proc.respawn();
        self.wait_ready().await;
    }

    pub async fn metrics(&self) -> String {
        let (code, body) =
            crate::http_get(&format!("http://{}/metrics", self.metrics_addr)).await.expect("router metrics");
        assert_eq!(code, 200);
        body
    }

    /// The value of an unlabelled metric (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// A `gateway` process. Its ports (and `--gateway-id`) stay the same across restarts, so
/// [`Gateway::ws_url`] stays valid.
pub struct Gateway {
    pub proc: Proc,
    listen_addr: String,
    metrics_addr: String,
}

impl Gateway {
    /// `gateway --listen 127.0.0.1:<free> --metrics-addr 127.0.0.1:<free> --cores 1
    /// --nats-url <url> --gateway-id gw-<port>` with `JWT_SECRET=<secret>`; waits for `/readyz`.
    pub async fn start(nats_url: &str, secret: &str) -> Gateway {
        Self::start_with(nats_url, secret, &[]).await
    }

    /// Like [`Gateway::start`] with extra arguments (a `--gateway-id` among them replaces the
    /// default one).
    pub async fn start_with(nats_url: &str, secret: &str, extra: &[&str]) -> Gateway {
        let port = free_port();
        let listen_addr = format!("127.0.0.1:{port}");
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args = strings(&[
            "--listen",
            &listen_addr,
            "--metrics-addr",
            &metrics_addr,
            "--cores",
            "1",
            "--nats-url",
            nats_url,
        ]);
        // Gateways on one host need distinct ids.
        if !extra.contains(&"--gateway-id") {
            args.extend(strings(&["--gateway-id", &format!("gw-{port}")]));
        }
        args.extend(strings(extra));
        let proc = Proc::spawn("gateway", &bin_path("gateway"), &args, &[("JWT_SECRET", secret)]);
        let mut g = Gateway { proc, listen_addr, metrics_addr };
        g.wait_ready().await;
        g
    }

    /// `ws://127.0.0.1:<port>/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.listen_addr)
    }

    /// `http://127.0.0.1:<port>` (the listener; `/dev/token` lives here with `--dev-tokens`).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.listen_addr)
    }

    /// `http://127.0.0.1:<metrics port>/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    /// `http://127.0.0.1:<metrics port>/readyz` (200 while serving, 503 while draining).
    pub fn readyz_url(&self) -> String {
        format!("http://{}/readyz", self.metrics_addr)
    }

    /// Waits for `/readyz` = 200, then for the WebSocket listener to accept TCP connections
    /// (readiness can be reported a moment before the executors have bound their listeners).
    pub async fn wait_ready(&mut self) {
        self.proc.wait_ready(&self.metrics_addr, READY_TIMEOUT).await;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while tokio::net::TcpStream::connect(&self.listen_addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway ready but {} accepts no connection\n{}",
                self.listen_addr,
                self.proc.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let (code, body) = crate::http_get(&self.metrics_url()).await.expect("gateway metrics");
        assert_eq!(code, 200);
        body
    }

    /// The value of a metric line, by name with its labels if any (0 when absent):
    /// `metric("gateway_live_mux_reconnects_total")`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// SIGKILL, no drain.
    pub fn kill9(&mut self) {
        self.proc.kill9()
    }

    /// SIGTERM (the gateway drains) and waits up to 30 s; `None` if it had to be killed.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.terminate(Duration::from_secs(30)).await
    }

    /// `kill -9`, then start again on the same ports with the same arguments and wait for
    /// readiness.
    pub async fn restart(&mut self) {
        self.proc.respawn();
        self.wait_ready().await;
    }
}

/// A whole system for one test: a nats-server, storage, a router, and `n` gateways sharing a
/// token secret.
pub struct System {
    // Field order is drop order: gateways, then router and storage, then the server they talk to.
    pub gateways: Vec<Gateway>,
    pub router: Router,
    pub storage: Storage,
    pub nats: NatsServer,
    secret: String,
    keys: TokenKeys,
}

impl System {
    pub async fn start(gateways: usize) -> System {
        Self::start_with(gateways, &[]).await
    }

    /// Like [`System::start`], with extra arguments for every gateway.
    pub async fn start_with(gateways: usize, gateway_args: &[&str]) -> System {
        let nats = NatsServer::start().await;
        let storage = Storage::start(&nats.url()).await;
        let router = Router::start(&nats.url(), &[]).await;
        // A fresh secret per system: tokens of one test never work against another.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let secret = format!("testkit-{}-{}-{n}", std::process::id(), protocol::now_ms());
        let url = nats.url();
        let gateways =
            futures::future::join_all((0..gateways).map(|_| Gateway::start_with(&url, &secret, gateway_args))).await;
        let keys = TokenKeys::hs256(secret.as_bytes(), 5);
        System { gateways, router, storage, nats, secret, keys }
    }

    /// A token for `user` (with `dev` = `device` when given), valid for an hour.
    pub fn token(&self, user: &str, device: Option<&str>) -> String {
        self.keys.mint(user, device, 3600)
    }

    /// The keys the gateways verify with (to mint unusual tokens).
    pub fn keys(&self) -> &TokenKeys {
        &self.keys
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    /// The WebSocket URL of gateway `i`.
    pub fn ws_url(&self, i: usize) -> String {
        self.gateways[i].ws_url()
    }

    /// Connects `user` on `device` (named in the token) to gateway `gw`; nothing is read yet.
    pub async fn connect(&self, gw: usize, user: &str, device: &str) -> WsClient {
        WsClient::open(&self.ws_url(gw), &self.token(user, Some(device)), None, None).await
    }
}
