//! The workspace's services as child processes, and a whole system of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bus::Role;
use protocol::TokenKeys;
use tempfile::TempDir;

use crate::{bin_path, free_port, ClientTls, NatsServer, Proc, TestCert, WsClient, READY_TIMEOUT};

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
        let mut s = Self::spawn(&strings(&["--nats-url", nats_url]), extra);
        s.wait_ready().await;
        s
    }

    /// Storage on `nats` with the storage role's credentials when it has authorization; waits
    /// for `/readyz`.
    pub async fn start_on(nats: &NatsServer, extra: &[&str]) -> Storage {
        let mut s = Self::spawn(&nats.service_args(Role::Storage), extra);
        s.wait_ready().await;
        s
    }

    /// Starts storage with these NATS arguments and `extra`, without waiting for readiness.
    pub fn spawn(nats_args: &[String], extra: &[&str]) -> Storage {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args = nats_args.to_vec();
        args.extend(strings(&["--metrics-addr", &metrics_addr]));
        args.extend(strings(extra));
        let proc = Proc::spawn("storage", &bin_path("storage"), &args, &[]);
        Storage { proc, metrics_addr }
    }

    /// `http://<metrics addr>/readyz`.
    pub fn readyz_url(&self) -> String {
        format!("http://{}/readyz", self.metrics_addr)
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
        let mut r = Self::spawn(&strings(&["--nats-url", nats_url]), extra);
        r.wait_ready().await;
        r
    }

    /// A router on `nats` with the router role's credentials when it has authorization; waits
    /// for `/readyz`.
    pub async fn start_on(nats: &NatsServer, extra: &[&str]) -> Router {
        let mut r = Self::spawn(&nats.service_args(Role::Router), extra);
        r.wait_ready().await;
        r
    }

    /// Starts a router with these NATS arguments and `extra`, without waiting for readiness.
    pub fn spawn(nats_args: &[String], extra: &[&str]) -> Router {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args = nats_args.to_vec();
        args.extend(strings(&["--metrics-addr", &metrics_addr]));
        args.extend(strings(extra));
        let proc = Proc::spawn("router", &bin_path("router"), &args, &[]);
        Router { proc, metrics_addr }
    }

    /// `http://<metrics addr>/readyz`.
    pub fn readyz_url(&self) -> String {
        format!("http://{}/readyz", self.metrics_addr)
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
    tls: Option<GatewayTls>,
}

/// The certificate a TLS gateway serves, generated for it, and the client trust that goes with it.
struct GatewayTls {
    cert_path: PathBuf,
    client: ClientTls,
    /// Holds cert.pem and key.pem for the gateway's life (and restarts).
    _dir: TempDir,
}

impl Gateway {
    /// `gateway --listen 127.0.0.1:<free> --metrics-addr 127.0.0.1:<free> --nats-url <url>
    /// --cores 1 --gateway-id gw-<port>` with `JWT_SECRET=<secret>`; waits for `/readyz`.
    pub async fn start(nats_url: &str, secret: &str) -> Gateway {
        Self::start_with(nats_url, secret, &[]).await
    }

    /// Like [`Gateway::start`] with extra arguments (a `--gateway-id` or `--cores` among them
    /// replaces the default one).
    pub async fn start_with(nats_url: &str, secret: &str, extra: &[&str]) -> Gateway {
        let mut g = Self::spawn(&strings(&["--nats-url", nats_url]), secret, extra);
        g.wait_ready().await;
        g
    }

    /// A gateway on `nats` with the gateway role's credentials when it has authorization (see
    /// [`Gateway::start_with`]); waits for `/readyz`.
    pub async fn start_on(nats: &NatsServer, secret: &str, extra: &[&str]) -> Gateway {
        let mut g = Self::spawn(&nats.service_args(Role::Gateway), secret, extra);
        g.wait_ready().await;
        g
    }

    /// Like [`Gateway::start_with`], serving TLS (`wss://`) with a self-signed certificate for
    /// `127.0.0.1` and `localhost` generated into a temporary directory of its own. Connect with
    /// [`Gateway::connect`] (or [`Gateway::client_tls`]); [`Gateway::tls_cert_path`] is the
    /// certificate to trust (e.g. loadgen's `--ca-file`).
    pub async fn start_tls(nats_url: &str, secret: &str, extra: &[&str]) -> Gateway {
        Self::start_tls_with(&strings(&["--nats-url", nats_url]), secret, extra).await
    }

    /// [`Gateway::start_tls`] with these NATS arguments.
    async fn start_tls_with(nats_args: &[String], secret: &str, extra: &[&str]) -> Gateway {
        let dir = tempfile::Builder::new().prefix("testkit-gateway-tls-").tempdir().expect("creating a temp dir");
        let cert = TestCert::generate();
        let (cert_path, key_path) = cert.write_to(dir.path());
        let tls = GatewayTls { cert_path, client: cert.client(), _dir: dir };
        let key_path = key_path.to_str().expect("UTF-8 temp path").to_owned();
        let cert_arg = tls.cert_path.to_str().expect("UTF-8 temp path").to_owned();
        let mut args = vec!["--tls-cert", &cert_arg, "--tls-key", &key_path];
        args.extend_from_slice(extra);
        let mut g = Self::spawn_inner(nats_args, secret, &args, Some(tls));
        g.wait_ready().await;
        g
    }

    /// Starts a gateway with these NATS arguments, without waiting for readiness.
    pub fn spawn(nats_args: &[String], secret: &str, extra: &[&str]) -> Gateway {
        Self::spawn_inner(nats_args, secret, extra, None)
    }

    fn spawn_inner(nats_args: &[String], secret: &str, extra: &[&str], tls: Option<GatewayTls>) -> Gateway {
        let port = free_port();
        let listen_addr = format!("127.0.0.1:{port}");
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args = strings(&["--listen", &listen_addr, "--metrics-addr", &metrics_addr]);
        args.extend(nats_args.iter().cloned());
        if !extra.contains(&"--cores") {
            args.extend(strings(&["--cores", "1"]));
        }
        // Gateways on one host need distinct ids.
        if !extra.contains(&"--gateway-id") {
            args.extend(strings(&["--gateway-id", &format!("gw-{port}")]));
        }
        args.extend(strings(extra));
        let proc = Proc::spawn("gateway", &bin_path("gateway"), &args, &[("JWT_SECRET", secret)]);
        Gateway { proc, listen_addr, metrics_addr, tls }
    }

    /// `ws://127.0.0.1:<port>/ws`, or `wss://` when the gateway serves TLS.
    pub fn ws_url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}/ws", self.listen_addr)
    }

    /// `http://127.0.0.1:<port>` (the listener; `/dev/token` lives here with `--dev-tokens`), or
    /// `https://` when the gateway serves TLS.
    pub fn http_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.listen_addr)
    }

    /// `127.0.0.1:<port>` of the WebSocket listener.
    pub fn listen_addr(&self) -> &str {
        &self.listen_addr
    }

    /// The client trust for a TLS gateway's certificate (`None` without TLS).
    pub fn client_tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref().map(|t| &t.client)
    }

    /// The PEM certificate a TLS gateway serves (`None` without TLS).
    pub fn tls_cert_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.cert_path.as_path())
    }

    /// Connects to this gateway (over TLS when it serves TLS); the HTTP status when the upgrade
    /// is refused.
    pub async fn connect(&self, token: &str, device: Option<&str>, since: Option<u64>) -> Result<WsClient, u16> {
        match self.client_tls() {
            Some(tls) => WsClient::connect_tls(&self.ws_url(), token, device, since, tls).await,
            None => WsClient::connect(&self.ws_url(), token, device, since).await,
        }
    }

    /// Like [`Gateway::connect`]; panics when the upgrade is refused.
    pub async fn open(&self, token: &str, device: Option<&str>, since: Option<u64>) -> WsClient {
        self.connect(token, device, since)
            .await
            .unwrap_or_else(|status| panic!("{}: upgrade refused with HTTP {status}", self.ws_url()))
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

    /// Like [`System::start`], with extra arguments for every gateway. With `TESTKIT_NATS_AUTH=1`
    /// the server has the generated authorization (see [`System::start_with_auth`]).
    pub async fn start_with(gateways: usize, gateway_args: &[&str]) -> System {
        Self::start_on(NatsServer::start_from_env().await, gateways, gateway_args).await
    }

    /// Like [`System::start_with`], every gateway serving TLS with a certificate of its own (see
    /// [`Gateway::start_tls`]); [`System::connect`] connects over `wss://`.
    pub async fn start_tls(gateways: usize, gateway_args: &[&str]) -> System {
        Self::start_inner(NatsServer::start_from_env().await, gateways, gateway_args, true).await
    }

    /// Like [`System::start`] on a server with the generated NATS authorization: every service
    /// connects with its own role's identity and may use only its role's subjects.
    pub async fn start_with_auth(gateways: usize, gateway_args: &[&str]) -> System {
        Self::start_on(NatsServer::start_with_auth().await, gateways, gateway_args).await
    }

    /// The services on `nats` (with their roles' credentials if it has authorization).
    pub async fn start_on(nats: NatsServer, gateways: usize, gateway_args: &[&str]) -> System {
        Self::start_inner(nats, gateways, gateway_args, false).await
    }

    async fn start_inner(nats: NatsServer, gateways: usize, gateway_args: &[&str], tls: bool) -> System {
        let storage = Storage::start_on(&nats, &[]).await;
        let router = Router::start_on(&nats, &[]).await;
        // A fresh secret per system: tokens of one test never work against another.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let secret = format!("testkit-{}-{}-{n}", std::process::id(), protocol::now_ms());
        let gateways = futures::future::join_all((0..gateways).map(|_| async {
            if tls {
                Gateway::start_tls_with(&nats.service_args(Role::Gateway), &secret, gateway_args).await
            } else {
                Gateway::start_on(&nats, &secret, gateway_args).await
            }
        }))
        .await;
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

    /// Connects `user` on `device` (named in the token) to gateway `gw` (over `wss://` when it
    /// serves TLS); nothing is read yet.
    pub async fn connect(&self, gw: usize, user: &str, device: &str) -> WsClient {
        self.gateways[gw].open(&self.token(user, Some(device)), None, None).await
    }
}
