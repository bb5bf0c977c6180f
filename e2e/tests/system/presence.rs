//! Presence: `presence` queries and `presence_sub` pushes across gateways, several devices, and
//! a gateway killed with its users online.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::now_ms;
use serde_json::{json, Value};
use testkit::{Event, System, WsClient};

/// Bound on every wait for a presence change (generous: debug builds on 2 busy cores).
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// A connection that asks about presence and watches pushes. Frames that arrive while it waits
/// for something else are kept, so no push is lost between calls.
pub(crate) struct Watcher {
    pub c: WsClient,
    backlog: VecDeque<Value>,
    /// Send a `ping` every half second while waiting for a push (for gateways with a short
    /// heartbeat timeout).
    pub keepalive: bool,
}

fn is_push(f: &Value) -> bool {
    f["t"] == "presence" && f.get("id").is_none()
}

/// The entry for `user` in a `presence` frame, if any.
fn entry<'a>(f: &'a Value, user: &str) -> Option<&'a Value> {
    f["users"].as_array()?.iter().find(|u| u["user"] == user)
}

impl Watcher {
    /// Connects `user` on `device` to gateway `gw` and reads up to `synced`.
    pub async fn connect(sys: &System, gw: usize, user: &str, device: &str) -> Watcher {
        let mut c = sys.connect(gw, user, device).await;
        c.sync().await;
        Watcher { c, backlog: VecDeque::new(), keepalive: false }
    }

    /// `{"t":"presence","id":..,"users":users}`; returns the answer's entries, one per user, in
    /// order.
    pub async fn query(&mut self, users: &[&str]) -> Vec<Value> {
        static N: AtomicU64 = AtomicU64::new(0);
        let id = format!("p-{}", N.fetch_add(1, Ordering::Relaxed));
        self.c.send_json(&json!({"t":"presence","id":id,"users":users})).await;
        loop {
            let f = self.c.recv().await;
            if f["t"] == "error" && f["id"] == id.as_str() {
                // Queries are rate-limited per connection (`--ops-per-sec`): wait and ask again.
                assert_eq!(f["code"], "rate_limited", "presence query refused: {f}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.c.send_json(&json!({"t":"presence","id":id,"users":users})).await;
                continue;
            }
            if f["t"] == "presence" && f["id"] == id.as_str() {
                let list = f["users"].as_array().unwrap_or_else(|| panic!("presence answer without users: {f}"));
                assert_eq!(list.len(), users.len(), "one entry per user asked: {f}");
                for (v, u) in list.iter().zip(users) {
                    assert_eq!(v["user"], *u, "entries in the order asked: {f}");
                }
                return list.clone();
            }
            self.backlog.push_back(f);
        }
    }

    pub async fn query_one(&mut self, user: &str) -> Value {
        self.query(&[user]).await.remove(0)
    }

    /// Queries `user` until `pred` holds (the gateways write presence asynchronously), within
    /// `within`; returns the entry that satisfied it.
    pub async fn wait_for(&mut self, user: &str, what: &str, pred: impl Fn(&Value) -> bool, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.query_one(user).await;
            if pred(&v) {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "{user} not {what} after {within:?}: last answer {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `presence_sub` for `users`, then a query: the gateway handles a connection's frames in
    /// order, so once the answer is here the subscription is in place.
    pub async fn subscribe(&mut self, users: &[&str]) {
        self.c.send_json(&json!({"t":"presence_sub","users":users})).await;
        self.query(&["nobody-sync"]).await;
    }

    /// The next pushed `presence` entry for `user` (earlier frames of other kinds are dropped).
    pub async fn next_push(&mut self, user: &str, within: Duration) -> Value {
        while let Some(f) = self.backlog.pop_front() {
            if is_push(&f) {
                if let Some(e) = entry(&f, user) {
                    return e.clone();
                }
            }
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "no presence push for {user} within {within:?}");
            let slice = if self.keepalive { left.min(Duration::from_millis(500)) } else { left };
            match self.c.next_event(slice).await {
                Event::Frame(f) if is_push(&f) => {
                    if let Some(e) = entry(&f, user) {
                        return e.clone();
                    }
                }
                Event::Frame(_) => {}
                Event::Closed(code) => panic!("watcher closed ({code:?}) awaiting a presence push for {user}"),
                Event::Timeout => {}
            }
            if self.keepalive {
                self.c.send_json(&json!({"t":"ping"})).await;
            }
        }
    }

    /// Panics if a presence push (for anyone) is pending or arrives within `d`.
    pub async fn expect_no_push(&mut self, d: Duration) {
        if let Some(f) = self.backlog.iter().find(|f| is_push(f)) {
            panic!("unexpected presence push: {f}");
        }
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.c.next_event(left).await {
                Event::Frame(f) if is_push(&f) => panic!("unexpected presence push: {f}"),
                Event::Frame(f) => self.backlog.push_back(f),
                Event::Closed(code) => panic!("watcher closed ({code:?})"),
                Event::Timeout => return,
            }
        }
    }
}

fn online(v: &Value) -> bool {
    v["online"] == true
}

fn offline(v: &Value) -> bool {
    v["online"] == false
}

/// Checks an entry says online, without `last_seen`.
#[track_caller]
fn assert_online(v: &Value, user: &str) {
    assert_eq!(v["user"], user, "{v}");
    assert_eq!(v["online"], true, "{user} should be online: {v}");
    assert!(v.get("last_seen").is_none(), "no last_seen while online: {v}");
}

/// Checks an entry says offline with `last_seen` in `[since, now]`; returns `last_seen`.
#[track_caller]
fn assert_offline_since(v: &Value, user: &str, since: u64) -> u64 {
    assert_eq!(v["user"], user, "{v}");
    assert_eq!(v["online"], false, "{user} should be offline: {v}");
    let ls = v["last_seen"].as_u64().unwrap_or_else(|| panic!("offline {user} without last_seen: {v}"));
    let now = now_ms();
    assert!(ls >= since && ls <= now, "last_seen {ls} not in [{since}, {now}]: {v}");
    ls
}

/// Waits until gateway `gw` of `w` sees users connected to every other gateway as online.
/// A gateway learns the others' liveness from their periodic beats, and until it has read a
/// gateway's first beat it takes that gateway's users for offline (see
/// `a_user_on_a_gateway_started_later_is_online_for_the_others`); the other tests start from a
/// settled system. A probe user connects to each other gateway until `w`'s queries agree.
async fn settle(sys: &System, w: &mut Watcher, gw: usize) {
    for other in (0..sys.gateways.len()).filter(|&g| g != gw) {
        let probe = format!("probe-{other}");
        let mut c = sys.connect(other, &probe, "probe").await;
        c.sync().await;
        w.wait_for(&probe, "online", online, WAIT).await;
        c.close().await;
    }
}

#[tokio::test]
async fn presence_query_never_seen_online_elsewhere_and_last_seen() {
    let sys = System::start(2).await;
    let mut alice = Watcher::connect(&sys, 0, "alice", "web").await;
    settle(&sys, &mut alice, 0).await;

    // Never seen: offline, and no last_seen at all.
    let v = alice.query_one("nobody").await;
    assert_eq!(v, json!({"user":"nobody","online":false}), "never-seen user");

    // Online on the other gateway.
    let since = now_ms();
    let mut bob = sys.connect(1, "bob", "phone").await;
    bob.sync().await;
    let v = alice.wait_for("bob", "online", online, WAIT).await;
    assert_online(&v, "bob");

    // A clean disconnect: offline, last seen between the connect and now.
    bob.close().await;
    let v = alice.wait_for("bob", "offline", offline, WAIT).await;
    let last_seen = assert_offline_since(&v, "bob", since);

    // One query for several users, answered in the order asked; the asker itself is online.
    let vs = alice.query(&["bob", "nobody", "alice"]).await;
    assert_eq!(vs[0], json!({"user":"bob","online":false,"last_seen":last_seen}), "{vs:?}");
    assert_eq!(vs[1], json!({"user":"nobody","online":false}), "{vs:?}");
    assert_online(&vs[2], "alice");
}

#[tokio::test]
async fn presence_sub_pushes_changes_until_an_empty_list() {
    let sys = System::start(2).await;
    let mut alice = Watcher::connect(&sys, 0, "alice", "web").await;
    // carol watches bob throughout, on alice's gateway: when she gets a push, alice would have.
    let mut carol = Watcher::connect(&sys, 0, "carol", "web").await;
    settle(&sys, &mut alice, 0).await;
    alice.subscribe(&["bob"]).await;
    carol.subscribe(&["bob"]).await;

    let since = now_ms();
    let mut bob = sys.connect(1, "bob", "phone").await;
    bob.sync().await;
    assert_online(&alice.next_push("bob", WAIT).await, "bob");
    assert_online(&carol.next_push("bob", WAIT).await, "bob");

    bob.close().await;
    let pushed = alice.next_push("bob", WAIT).await;
    let last_seen = assert_offline_since(&pushed, "bob", since);
    assert_eq!(carol.next_push("bob", WAIT).await, pushed);
    // A query agrees with the push.
    assert_eq!(alice.query_one("bob").await, pushed);

    // `[]` stops the pushes to alice; carol still gets them.
    alice.subscribe(&[]).await;
    let mut bob = sys.connect(1, "bob", "phone").await;
    bob.sync().await;
    assert_online(&carol.next_push("bob", WAIT).await, "bob");
    alice.expect_no_push(Duration::from_millis(500)).await;
    bob.close().await;
    let v = carol.next_push("bob", WAIT).await;
    assert!(assert_offline_since(&v, "bob", since) >= last_seen, "{v}");
    alice.expect_no_push(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_user_with_two_devices_is_online_while_either_is_connected() {
    let sys = System::start(2).await;
    let mut alice = Watcher::connect(&sys, 0, "alice", "web").await;
    settle(&sys, &mut alice, 0).await;
    alice.subscribe(&["bob"]).await;

    // Each device's first connection on a gateway announces a change: one push each.
    let mut phone = sys.connect(0, "bob", "phone").await;
    phone.sync().await;
    assert_online(&alice.next_push("bob", WAIT).await, "bob");
    let mut laptop = sys.connect(1, "bob", "laptop").await;
    laptop.sync().await;
    assert_online(&alice.next_push("bob", WAIT).await, "bob");

    // The phone leaves: the change is announced, and bob is still online (the laptop).
    phone.close().await;
    assert_online(&alice.next_push("bob", WAIT).await, "bob");
    assert_online(&alice.query_one("bob").await, "bob");

    // The phone comes back and the laptop leaves: still online.
    let mut phone = sys.connect(0, "bob", "phone").await;
    phone.sync().await;
    assert_online(&alice.next_push("bob", WAIT).await, "bob");
    let since = now_ms();
    laptop.close().await;
    assert_online(&alice.next_push("bob", WAIT).await, "bob");
    assert_online(&alice.query_one("bob").await, "bob");

    // Both gone: offline, last seen when the last one left.
    phone.close().await;
    let pushed = alice.next_push("bob", WAIT).await;
    assert_offline_since(&pushed, "bob", since);
    assert_eq!(alice.query_one("bob").await, pushed);
}

/// The last heartbeat gateway `id` recorded in KV `gateways` (ms since the epoch), if any.
async fn gateway_beat(kv: &async_nats::jetstream::kv::Store, id: &str) -> Option<u64> {
    let v = kv.get(id).await.unwrap_or_else(|e| panic!("reading gateways/{id}: {e}"))?;
    let beat: protocol::groups::GatewayBeat =
        serde_json::from_slice(&v).unwrap_or_else(|e| panic!("gateways/{id} is not a beat ({e})"));
    Some(beat.at)
}

#[tokio::test]
async fn users_of_a_killed_gateway_go_offline_at_its_last_beat() {
    let mut sys = System::start_with(2, &["--presence-beat-secs", "1", "--presence-timeout-secs", "4"]).await;
    let mut alice = Watcher::connect(&sys, 0, "alice", "web").await;
    settle(&sys, &mut alice, 0).await;
    alice.subscribe(&["bob"]).await;

    let connected_at = now_ms();
    let mut bob = sys.connect(1, "bob", "phone").await;
    let hello = bob.sync().await.hello;
    let gw1 = hello["gateway"].as_str().expect("hello.gateway").to_owned();
    assert_online(&alice.next_push("bob", WAIT).await, "bob");

    // Let bob's gateway beat at least once after bob connected, so "last beat" is after it.
    let js = sys.nats.jetstream().await;
    let beats = js.get_key_value(protocol::subjects::GATEWAYS_BUCKET).await.expect("KV gateways");
    let deadline = tokio::time::Instant::now() + WAIT;
    let beat_seen = loop {
        match gateway_beat(&beats, &gw1).await {
            Some(at) if at >= connected_at => break at,
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "gateway {gw1} did not beat after bob connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    sys.gateways[1].kill9();
    let killed_at = now_ms();
    drop(bob);

    let pushed = alice.next_push("bob", WAIT).await;
    // Last seen at the gateway's last beat: no earlier than the beat seen above.
    let last_seen = assert_offline_since(&pushed, "bob", beat_seen);
    assert!(last_seen <= killed_at, "last_seen {last_seen} after the kill ({killed_at}): {pushed}");
    let v = alice.query_one("bob").await;
    assert_eq!(v, pushed, "a query agrees with the push");
}

/// A gateway treats a gateway whose beat it has not read yet as dead: it re-reads the others'
/// beats only every `--presence-beat-secs` (5 s by default), so for up to that long after a
/// gateway starts, its users show offline on the other gateways, and the `presence` push of
/// their coming online says `"online":false` with a `last_seen`.
#[tokio::test]
async fn a_user_on_a_gateway_started_later_is_online_for_the_others() {
    let mut sys = System::start(1).await;
    let mut alice = Watcher::connect(&sys, 0, "alice", "web").await;
    alice.subscribe(&["bob"]).await;

    let gw = testkit::Gateway::start_on(&sys.nats, sys.secret(), &[]).await;
    sys.gateways.push(gw);
    let mut bob = sys.connect(1, "bob", "phone").await;
    let gw1 = bob.sync().await.hello["gateway"].clone();
    // bob is connected: the push announcing it, and a query after it, must say online.
    let pushed = alice.next_push("bob", WAIT).await;
    let queried = alice.query_one("bob").await;
    bob.ping_pong().await; // still connected
    assert!(
        online(&pushed) && online(&queried),
        "bob is connected to gateway {gw1}, but alice's gateway says: push {pushed}, then query {queried}"
    );
}
