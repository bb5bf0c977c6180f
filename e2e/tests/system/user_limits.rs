//! Per-user limits: a user's connections on one gateway share one budget (whichever executor
//! each landed on), and a user may hold only so many connections per gateway.
//!
//! No timing assertions: the one bound that involves time is the token bucket's own arithmetic
//! (a user can never get more than its burst plus its rate times the time that passed).

use std::time::{Duration, Instant};

use testkit::{System, WsClient};

use crate::chat;
use crate::hostile::{metric, metrics_of, others_unaffected};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_users_connections_together_are_limited_at_the_user_rate() {
    // Per connection far more than the test sends; per user 2 a second, bursts of 4. Two
    // executors, so alice's connections land on both (SO_REUSEPORT spreads them).
    const USER_RATE: f64 = 2.0;
    const USER_BURST: f64 = 4.0;
    let sys =
        System::start_with(1, &["--cores", "2", "--messages-per-sec", "1000", "--user-messages-per-sec", "2"]).await;
    let mut bob = sys.connect(0, "bob", "d").await;
    bob.timeout = WAIT;
    bob.sync().await;
    const CONNS: usize = 6;
    const ROUNDS: usize = 20;
    let mut alice = Vec::new();
    for i in 0..CONNS {
        let mut c = sys.connect(0, "alice", &format!("d{i}")).await;
        c.timeout = WAIT;
        c.sync().await;
        alice.push(c);
    }
    let mut carol = sys.connect(0, "carol", "d").await;
    carol.timeout = WAIT;
    carol.sync().await;

    // Every connection of alice sends, interleaved, without waiting for answers; carol sends
    // in the middle of it.
    let started = Instant::now();
    for round in 0..ROUNDS {
        for (i, c) in alice.iter_mut().enumerate() {
            c.send_chat(&format!("a{i}-{round}"), "bob", "together").await;
        }
        if round % 5 == 0 {
            carol.send_chat(&format!("c-{round}"), "bob", "unaffected").await;
        }
    }
    // One answer per send on each connection: `sent`, or `rate_limited` naming the user's limit.
    let mut sent = Vec::new();
    let mut limited = Vec::new();
    for c in alice.iter_mut() {
        for _ in 0..ROUNDS {
            let f = c.recv_until(|f| f["t"] == "sent" || f["t"] == "error").await;
            let id = f["id"].as_str().unwrap_or_else(|| panic!("no id in {f}")).to_owned();
            match (f["t"].as_str(), f["code"].as_str()) {
                (Some("sent"), _) => sent.push(id),
                (Some("error"), Some("rate_limited")) => {
                    let msg = f["msg"].as_str().unwrap_or_default();
                    assert!(msg.contains("this user's connections"), "refused by the wrong limit: {f}");
                    limited.push(id)
                }
                _ => panic!("unexpected answer: {f}"),
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // carol's sends, within her own budget, all went through.
    for round in (0..ROUNDS).step_by(5) {
        let id = format!("c-{round}");
        let f = carol.recv_until(|f| f["id"] == id.as_str()).await;
        assert_eq!(f["t"], "sent", "{f}");
    }
    // Six connections, one budget: the burst went through, then no more than the rate allows.
    let total = CONNS * ROUNDS;
    assert_eq!(sent.len() + limited.len(), total);
    assert!(sent.len() as f64 >= USER_BURST, "only {} sent", sent.len());
    let bound = USER_BURST + USER_RATE * elapsed;
    assert!(sent.len() as f64 <= bound, "{} of {total} sent in {elapsed:.2} s: over the user's budget", sent.len());
    assert!(!limited.is_empty(), "nothing was limited");

    // Counted as user-scope message refusals, nothing at the connection scope.
    let text = metrics_of(&sys.gateways[0].metrics_url()).await;
    assert_eq!(metric(&text, "gateway_rate_limited_total", "scope=\"user\",kind=\"messages\""), limited.len() as f64);
    assert_eq!(metric(&text, "gateway_rate_limited_total", "scope=\"connection\""), 0.0, "{text}");

    // Every connection stays open and served; others are served meanwhile.
    for c in alice.iter_mut() {
        c.ping_pong().await;
    }
    others_unaffected(&sys, 0, "userlimit").await;

    // A refused id retried later goes through and was never stored before.
    let retry = limited[0].clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    let retried = loop {
        alice[0].send_chat(&retry, "bob", "together").await;
        let f = alice[0].recv_until(|f| f["id"] == retry.as_str()).await;
        if f["t"] == "sent" {
            break f;
        }
        assert_eq!(f["code"], "rate_limited", "{f}");
        assert!(tokio::time::Instant::now() < deadline, "retry still refused");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(retried["dup"], false, "{retried}");
    sent.push(retry);

    // Exactly the accepted messages are stored: a new device of bob drains them, once each.
    let mut again = sys.connect(0, "bob", "d2").await;
    again.timeout = WAIT;
    let synced = again.sync().await;
    let mut from_alice: Vec<String> = synced
        .items
        .iter()
        .filter(|f| chat(f)["from"] == "alice")
        .map(|f| chat(f)["id"].as_str().unwrap().to_owned())
        .collect();
    from_alice.sort();
    sent.sort();
    assert_eq!(from_alice, sent, "stored messages vs accepted sends");
    let from_carol = synced.items.iter().filter(|f| chat(f)["from"] == "carol").count();
    assert_eq!(from_carol, ROUNDS / 5);
}

#[tokio::test]
async fn connections_beyond_the_per_user_cap_are_refused_with_429() {
    let sys = System::start_with(2, &["--max-connections-per-user", "3"]).await;
    let connect = |gw: usize, device: &str| {
        let (url, token) = (sys.ws_url(gw), sys.token("alice", Some(device)));
        async move { WsClient::connect(&url, &token, None, None).await }
    };
    let mut alice = Vec::new();
    for i in 0..3 {
        let mut c = connect(0, &format!("d{i}")).await.expect("under the cap");
        c.timeout = WAIT;
        c.sync().await;
        alice.push(c);
    }
    // A fourth device, and a duplicate session of a connected one, are refused at the upgrade.
    assert_eq!(connect(0, "d3").await.err(), Some(429));
    assert_eq!(connect(0, "d0").await.err(), Some(429));
    let text = metrics_of(&sys.gateways[0].metrics_url()).await;
    assert_eq!(metric(&text, "gateway_handshake_failures_total", "cause=\"too_many_connections\""), 2.0, "{text}");
    assert_eq!(metric(&text, "gateway_rate_limited_total", "scope=\"user\",kind=\"connections\""), 2.0, "{text}");

    // alice's connections are untouched, and other users connect as usual.
    for c in alice.iter_mut() {
        c.ping_pong().await;
    }
    others_unaffected(&sys, 0, "cap").await;

    // The cap is per gateway process: alice may hold as many on the other gateway.
    let mut elsewhere = Vec::new();
    for i in 3..6 {
        let mut c = connect(1, &format!("d{i}")).await.expect("the other gateway has its own count");
        c.timeout = WAIT;
        c.sync().await;
        elsewhere.push(c);
    }
    assert_eq!(connect(1, "d6").await.err(), Some(429));

    // One closes: its place is free again (once the gateway has seen the close).
    alice.pop().unwrap().close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut back = loop {
        match connect(0, "d2").await {
            Ok(c) => break c,
            Err(429) => {
                assert!(tokio::time::Instant::now() < deadline, "still refused after a connection closed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("refused with {status}"),
        }
    };
    back.timeout = WAIT;
    back.sync().await;
    back.send_chat_ok("back-1", "bob", "a place was free").await;
    assert_eq!(connect(0, "d7").await.err(), Some(429));
}
