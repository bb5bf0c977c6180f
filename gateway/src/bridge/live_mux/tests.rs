//! The multiplexer against a real nats-server (testkit): confirmation, deliveries and their
//! headers, unsubscription, a server restart, authentication modes and refused subscriptions.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::UserId;
use testkit::{free_port, nats_server_bin, NatsServer, Proc};
use tokio::sync::mpsc;

use super::*;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// Bounds every wait, so that a broken multiplexer fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(20);

struct Harness {
    mux: LiveMux,
    events: mpsc::Receiver<MuxEvent>,
    metrics: Arc<Metrics>,
    health: Arc<telemetry::Health>,
}

impl Harness {
    fn start(url: &str) -> Harness {
        let metrics = Arc::new(Metrics::new("test", 1));
        let health = Arc::new(telemetry::Health::default());
        let ready = Arc::new(Readiness::new(health.clone(), 1));
        // Everything but the multiplexer is ready: readiness then follows its connection.
        ready.set_backbone(true);
        ready.listening();
        let cfg = MuxConfig { nats: bus::NatsArgs::new(url), name: "gateway test live".into() };
        let (mux, events) = LiveMux::spawn(cfg, metrics.clone(), ready).expect("valid settings");
        Harness { mux, events, metrics, health }
    }

    async fn next(&mut self) -> MuxEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no event from the multiplexer in time")
            .expect("multiplexer gone")
    }

    /// Subscribes `user` and waits for the confirmation of that subscription.
    async fn subscribe(&mut self, user: &str) -> (u64, bool) {
        let sid = self.mux.subscribe(UserId::parse(user).unwrap());
        (sid, self.confirmation(sid).await)
    }

    async fn confirmation(&mut self, sid: u64) -> bool {
        loop {
            match self.next().await {
                MuxEvent::Confirmed { sid: s, ok, .. } if s == sid => return ok,
                MuxEvent::Confirmed { .. } | MuxEvent::Resubscribed => {}
                MuxEvent::Live(d) => panic!("unexpected delivery {d:?}"),
            }
        }
    }

    async fn delivery(&mut self) -> LiveDelivery {
        match self.next().await {
            MuxEvent::Live(d) => d,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    /// Waits until the multiplexer is connected with its subscriptions in place.
    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.health.is_ready() {
            assert!(tokio::time::Instant::now() < deadline, "live multiplexer not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn metric(&self, line_start: &str) -> f64 {
        let text = self.metrics.render();
        text.lines().find_map(|l| l.strip_prefix(line_start).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    }
}

fn stored(seq: u64, prev: u64) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Sequence", seq.to_string().as_str());
    h.insert("Nats-Last-Sequence", prev.to_string().as_str());
    h
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

#[tokio::test]
async fn confirms_subscriptions_and_delivers_with_their_headers() {
    let nats = NatsServer::start().await;
    let mut h = Harness::start(&nats.url());
    h.wait_ready().await;
    let (alice_sid, ok) = h.subscribe("alice").await;
    assert!(ok, "subscription confirmed by the server");
    // A second confirmation of the same subscription (another connection of the user).
    h.mux.confirm(alice_sid);
    assert!(h.confirmation(alice_sid).await);

    let client = nats.client().await;
    client.publish_with_headers("live.alice", stored(5, 3), "one".into()).await.unwrap();
    let mut typing = async_nats::HeaderMap::new();
    typing.insert(EPHEMERAL_HEADER, "1");
    client.publish_with_headers("live.alice", typing, "typing".into()).await.unwrap();
    // Without the headers INBOX's RePublish sets: ignored and counted, the stream goes on.
    client.publish("live.alice", "no headers".into()).await.unwrap();
    let mut junk = async_nats::HeaderMap::new();
    junk.insert("Nats-Sequence", "not a number");
    client.publish_with_headers("live.alice", junk, "bad".into()).await.unwrap();
    client.publish_with_headers("live.alice", stored(6, 5), Bytes::from(vec![b'x'; 100_000])).await.unwrap();
    client.flush().await.unwrap();

    let d = h.delivery().await;
    assert_eq!(
        d,
        LiveDelivery { user: user("alice"), kind: LiveKind::Stored { seq: 5, prev: 3 }, payload: "one".into() }
    );
    let d = h.delivery().await;
    assert_eq!((d.kind, &d.payload[..]), (LiveKind::Ephemeral, &b"typing"[..]));
    let d = h.delivery().await;
    assert_eq!((d.kind, d.payload.len()), (LiveKind::Stored { seq: 6, prev: 5 }, 100_000));
    assert_eq!(h.metric("gateway_live_mux_errors_total{kind=\"message\"}"), 2.0);

    // After UNSUB nothing more arrives for alice: bob's message, published after alice's, is
    // the next event.
    h.mux.unsubscribe(alice_sid);
    let (_, ok) = h.subscribe("bob").await;
    assert!(ok);
    client.publish_with_headers("live.alice", stored(7, 6), "late".into()).await.unwrap();
    client.publish_with_headers("live.bob", stored(8, 0), "for bob".into()).await.unwrap();
    client.flush().await.unwrap();
    let d = h.delivery().await;
    assert_eq!((d.user, d.kind), (user("bob"), LiveKind::Stored { seq: 8, prev: 0 }));
    assert_eq!(h.metric("gateway_live_mux_connected"), 1.0);
    assert_eq!(h.metric("gateway_live_mux_reconnects_total"), 0.0);
}

#[tokio::test]
async fn resubscribes_everything_after_a_server_restart() {
    let mut nats = NatsServer::start().await;
    let mut h = Harness::start(&nats.url());
    h.wait_ready().await;
    let mut sids = Vec::new();
    for i in 0..50 {
        let (sid, ok) = h.subscribe(&format!("u{i}")).await;
        assert!(ok);
        sids.push(sid);
    }

    nats.kill();
    // While the server is down a subscription cannot be confirmed: the connection that asked
    // fails fast (and retries), but the subscription is kept and sent after the reconnect.
    let (late_sid, ok) = h.subscribe("late").await;
    assert!(!ok, "confirmed without a server");
    assert!(!h.health.is_ready(), "ready without a live connection");
    nats.respawn().await;

    loop {
        match h.next().await {
            MuxEvent::Resubscribed => break,
            MuxEvent::Confirmed { ok, .. } => assert!(!ok),
            MuxEvent::Live(d) => panic!("delivery before resubscription: {d:?}"),
        }
    }
    h.wait_ready().await;
    assert_eq!(h.metric("gateway_live_mux_reconnects_total"), 1.0);

    // Every subscription is back on the server, including the one made during the outage.
    let client = nats.client().await;
    for i in 0..50 {
        client.publish_with_headers(format!("live.u{i}"), stored(100 + i, 0), "after".into()).await.unwrap();
    }
    client.publish_with_headers("live.late", stored(200, 0), "late".into()).await.unwrap();
    client.flush().await.unwrap();
    for i in 0..50 {
        let d = h.delivery().await;
        assert_eq!((d.user, d.kind), (user(&format!("u{i}")), LiveKind::Stored { seq: 100 + i, prev: 0 }));
    }
    assert_eq!(h.delivery().await.user, user("late"));
    h.mux.confirm(late_sid);
    assert!(h.confirmation(late_sid).await);
}

/// A nats-server started from a configuration file (authentication, permissions).
struct ConfiguredServer {
    _proc: Proc,
    _dir: tempfile::TempDir,
    port: u16,
}

impl ConfiguredServer {
    async fn start(config: &str) -> ConfiguredServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, format!("listen: 127.0.0.1:{port}\n{config}")).unwrap();
        let proc = Proc::spawn("nats-server", &nats_server_bin(), &["-c".into(), display(&path)], &[]);
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "nats-server did not listen\n{}", proc.log_tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ConfiguredServer { _proc: proc, _dir: dir, port }
    }

    fn url(&self, userinfo: &str) -> String {
        format!("nats://{userinfo}@127.0.0.1:{}", self.port)
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

const USERS: &str = r#"
authorization {
  users = [
    { user: "gw", password: "p@ss:word", permissions: { subscribe: { allow: ["live.>"], deny: ["live.forbidden"] } } }
    { user: "pub", password: "pub" }
  ]
}
"#;

#[tokio::test]
async fn user_and_password_from_the_url_and_a_refused_subscription() {
    let server = ConfiguredServer::start(USERS).await;
    // The password is percent-encoded in the URL, as a URL requires for '@' and ':'.
    let mut h = Harness::start(&server.url("gw:p%40ss%3Aword"));
    h.wait_ready().await;
    let (_, ok) = h.subscribe("forbidden").await;
    assert!(!ok, "a subscription the server refused is not confirmed");
    assert_eq!(h.metric("gateway_live_mux_errors_total{kind=\"permissions\"}"), 1.0);
    let (_, ok) = h.subscribe("alice").await;
    assert!(ok, "the connection survives a refused subscription");

    let client = async_nats::ConnectOptions::with_user_and_password("pub".into(), "pub".into())
        .connect(format!("127.0.0.1:{}", server.port))
        .await
        .unwrap();
    client.publish_with_headers("live.alice", stored(1, 0), "hi".into()).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(h.delivery().await.payload, "hi");
}

#[tokio::test]
async fn wrong_password_never_connects() {
    let server = ConfiguredServer::start(USERS).await;
    let mut h = Harness::start(&server.url("gw:wrong"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.metric("gateway_live_mux_errors_total{kind=\"connect\"}") < 2.0 {
        assert!(tokio::time::Instant::now() < deadline, "no failed connection attempts counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, ok) = h.subscribe("alice").await;
    assert!(!ok);
    assert!(!h.health.is_ready());
    assert_eq!(h.metric("gateway_live_mux_connected"), 0.0);
}

#[tokio::test]
async fn token_from_the_url() {
    let server = ConfiguredServer::start("authorization { token: \"s3cret-token\" }\n").await;
    let mut h = Harness::start(&server.url("s3cret-token"));
    h.wait_ready().await;
    let (_, ok) = h.subscribe("alice").await;
    assert!(ok);
}

#[test]
fn backoff_follows_the_services_reconnect_schedule() {
    for attempt in 0..40u32 {
        let d = backoff(attempt);
        assert!(d >= Duration::from_millis(25) && d <= Duration::from_secs(1), "attempt {attempt}: {d:?}");
    }
    assert!(backoff(0) <= Duration::from_millis(50));
    assert!(backoff(30) >= Duration::from_millis(500));
}

#[test]
fn classifies_live_copies_by_their_headers() {
    let h = b"NATS/1.0\r\nNats-Stream: INBOX\r\nNats-Sequence: 9\r\nNats-Last-Sequence: 4\r\n\r\n";
    assert_eq!(classify(Some(h)), Ok(LiveKind::Stored { seq: 9, prev: 4 }));
    assert_eq!(classify(Some(b"NATS/1.0\r\nNats-Sequence: 1\r\n\r\n")), Ok(LiveKind::Stored { seq: 1, prev: 0 }));
    assert_eq!(classify(Some(b"NATS/1.0\r\nChat-Ephemeral: 1\r\n\r\n")), Ok(LiveKind::Ephemeral));
    assert!(classify(None).is_err());
    assert!(classify(Some(b"NATS/1.0\r\n\r\n")).is_err());
    assert!(classify(Some(b"garbage")).is_err());
}

/// What a subscription costs the process: resident memory before and after `MUX_MEASURE_USERS`
/// (10,000 by default) more confirmed subscriptions with one delivery each, like
/// bus/examples/subscription_cost.rs measures for async-nats subscribers (5.4 KB each). A first
/// round of as many users warms up what is allocated once (channel blocks, buffers, the test's
/// own publishing client), so the second round shows what each further user costs: its map
/// entry, its user id, and the map's growth. Not a check (RSS depends on the allocator and the
/// machine): it prints the figures.
/// `cargo nextest run -p gateway --run-ignored only -E 'test(memory_per_subscription)' --no-capture`
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn memory_per_subscription() {
    let n: u64 = std::env::var("MUX_MEASURE_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let nats = NatsServer::start().await;
    let client = nats.client().await;
    let mut h = Harness::start(&nats.url());
    h.wait_ready().await;
    let mut seq = 0;
    for round in 0..2 {
        let before = crate::metrics::resident_bytes();
        let mut last = 0;
        for i in 0..n {
            last = h.mux.subscribe(user(&format!("user-{round}-{i:07}")));
        }
        assert!(h.confirmation(last).await);
        for i in 0..n {
            seq += 1;
            client.publish_with_headers(format!("live.user-{round}-{i:07}"), stored(seq, 0), "x".into()).await.unwrap();
        }
        client.flush().await.unwrap();
        for _ in 0..n {
            h.delivery().await;
        }
        let after = crate::metrics::resident_bytes();
        println!(
            "round={round} ({}) subscriptions_added={n} rss_before={before} rss_after={after} bytes_per_subscription={}",
            if round == 0 { "warm-up" } else { "marginal" },
            after.saturating_sub(before) / n
        );
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`: (ca, cert, key).
fn test_pki(dir: &Path) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "live mux test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        display(&path)
    };
    (write("ca.pem", ca.pem()), write("cert.pem", cert.pem()), write("key.pem", key.serialize_pem()))
}

/// TLS for `tls://` URLs and for servers that require it, verified against the CA that
/// `SSL_CERT_FILE` names (nextest runs each test in its own process, so setting it here touches
/// no other test).
#[tokio::test]
async fn tls_when_the_url_or_the_server_asks_for_it() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(pki.path());
    std::env::set_var("SSL_CERT_FILE", &ca);
    let server = ConfiguredServer::start(&format!("tls {{ cert_file: \"{cert}\", key_file: \"{key}\" }}\n")).await;
    for url in [format!("tls://127.0.0.1:{}", server.port), format!("nats://127.0.0.1:{}", server.port)] {
        let mut h = Harness::start(&url);
        h.wait_ready().await;
        let (_, ok) = h.subscribe("alice").await;
        assert!(ok, "{url}");
        let client = async_nats::ConnectOptions::new()
            .add_root_certificates(ca.clone().into())
            .require_tls(true)
            .connect(format!("tls://127.0.0.1:{}", server.port))
            .await
            .unwrap();
        client.publish_with_headers("live.alice", stored(3, 1), "secret".into()).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(h.delivery().await.payload, "secret", "{url}");
    }
}

/// A `tls://` URL to a server without TLS fails (and says so): never a plain-text fallback.
#[tokio::test]
async fn tls_url_to_a_plain_server_never_falls_back() {
    let nats = NatsServer::start().await;
    let mut h = Harness::start(&format!("tls://127.0.0.1:{}", nats.port()));
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.metric("gateway_live_mux_errors_total{kind=\"connect\"}") < 2.0 {
        assert!(tokio::time::Instant::now() < deadline, "no failed connection attempts counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, ok) = h.subscribe("alice").await;
    assert!(!ok);
    assert_eq!(h.metric("gateway_live_mux_connected"), 0.0);
}
