//! Shared helpers of the group tests: a group member behind a real WebSocket client that keeps
//! every inbox item it is shown (dropping repeats the way PROTOCOL.md tells a client to, and
//! counting them), answers to requests by `id`, and bounded waits.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{json, Value};
use testkit::{Event, Inbox, System, WsClient};

/// The device every member connects with.
pub const DEVICE: &str = "d";

/// A user connected to a gateway.
pub struct Member {
    pub user: String,
    pub c: WsClient,
    /// What a client keeps to drop redeliveries (by `seq`, chat `(from,id)`, group `(group,sid)`).
    pub inbox: Inbox,
    /// The new `msg` frames (repeats dropped), in arrival order.
    pub log: Vec<Value>,
    /// `(group, sid)` of group items (`group` or `group_event`) already shown.
    seen: HashSet<(String, u64)>,
    /// `(group, sid)` of group items that came again under another `seq`: stored twice.
    pub dup_group_items: Vec<(String, u64)>,
    /// Answers (non-`msg` frames) that arrived while waiting for something else.
    pub stash: Vec<Value>,
    next_id: u64,
    /// When this member last sent a protocol `ping` (see [`Member::next_frame`]).
    last_ping: tokio::time::Instant,
}

impl Member {
    /// Connects `user` to gateway `gw` and reads up to `synced`, keeping the backlog.
    pub async fn join(sys: &System, gw: usize, user: &str) -> Member {
        let c = sys.connect(gw, user, DEVICE).await;
        Self::from_client(user, c).await
    }

    /// Reads `hello`..`synced` from a freshly opened client.
    pub async fn from_client(user: &str, mut c: WsClient) -> Member {
        c.timeout = Duration::from_secs(30);
        let synced = c.sync().await;
        let mut m = Member {
            user: user.to_owned(),
            c,
            inbox: Inbox::new(),
            log: Vec::new(),
            seen: HashSet::new(),
            dup_group_items: Vec::new(),
            stash: Vec::new(),
            next_id: 0,
            last_ping: tokio::time::Instant::now(),
        };
        for f in &synced.items {
            m.record(f);
        }
        m
    }

    /// A fresh client id for a request of this member.
    pub fn fresh_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}-{}", self.user, self.next_id)
    }

    /// Records a `msg` frame: kept unless it is a repeat.
    pub fn record(&mut self, f: &Value) {
        if !self.inbox.record(f) {
            return;
        }
        let m = &f["m"];
        if m["k"] == "group" || m["k"] == "group_event" {
            let key = (m["group"].as_str().unwrap_or_default().to_owned(), m["sid"].as_u64().unwrap_or(0));
            // `Inbox` already counts repeated `group` items; count repeated events here too.
            if !self.seen.insert(key.clone()) {
                self.dup_group_items.push(key);
                return;
            }
        }
        self.log.push(f.clone());
    }

    /// Handles one frame: `msg` frames are recorded (`None`), anything else is returned.
    fn absorb(&mut self, f: Value) -> Option<Value> {
        if f["t"] == "msg" {
            self.record(&f);
            None
        } else {
            Some(f)
        }
    }

    /// The next frame within `left`. A protocol `ping` goes out every 10 s while waiting, so the
    /// heartbeat timeout never closes a member that only listens.
    async fn next_frame(&mut self, left: Duration) -> Option<Value> {
        const EVERY: Duration = Duration::from_secs(10);
        let deadline = tokio::time::Instant::now() + left;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            if now >= self.last_ping + EVERY {
                self.c.send_json(&json!({"t":"ping"})).await;
                self.last_ping = now;
            }
            let until = deadline.min(self.last_ping + EVERY);
            match self.c.next_event(until - now).await {
                Event::Frame(f) => return Some(f),
                Event::Closed(code) => panic!("{}: connection closed ({code:?})", self.user),
                Event::Timeout => {}
            }
        }
    }

    /// Sends `frame` (which has an `id`) and returns the answer with that `id` (any type),
    /// recording the items that arrive meanwhile and stashing other answers.
    pub async fn request(&mut self, frame: Value) -> Value {
        let id = frame["id"].as_str().expect("request with an id").to_owned();
        self.c.send_json(&frame).await;
        self.answer(&id, Duration::from_secs(30)).await
    }

    /// The answer with `id`: from the stash, or read (recording items) within `within`.
    pub async fn answer(&mut self, id: &str, within: Duration) -> Value {
        if let Some(i) = self.stash.iter().position(|f| f["id"] == id) {
            return self.stash.remove(i);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self
                .next_frame(left)
                .await
                .unwrap_or_else(|| panic!("{}: no answer to `{id}` within {within:?}", self.user));
            if let Some(f) = self.absorb(f) {
                if f["id"] == id {
                    return f;
                }
                if f["t"] != "pong" {
                    self.stash.push(f);
                }
            }
        }
    }

    /// A membership request (`t` plus `fields`) that must succeed; returns the answer.
    pub async fn op_ok(&mut self, t: &str, fields: Value) -> Value {
        let f = self.op(t, fields).await;
        assert_ne!(f["t"], "error", "{}: {t} failed: {f}", self.user);
        f
    }

    /// A membership request (`t` plus `fields`); returns the answer (`group`, `groups`, `error`).
    pub async fn op(&mut self, t: &str, mut fields: Value) -> Value {
        let id = self.fresh_id("op");
        fields["t"] = json!(t);
        fields["id"] = json!(id);
        self.request(fields).await
    }

    /// `group_create`; returns the group state (`group` of the answer).
    pub async fn create(&mut self, name: &str, members: &[String]) -> Value {
        let f = self.op_ok("group_create", json!({"name":name,"members":members})).await;
        assert_eq!(f["t"], "group", "{f}");
        f["group"].clone()
    }

    /// `gsend` without waiting for the answer.
    pub async fn gsend_nowait(&mut self, id: &str, gid: &str, body: &str) {
        self.c.send_json(&json!({"t":"gsend","id":id,"group":gid,"body":body})).await;
    }

    /// `gsend` and its answer (`sent` or `error`).
    pub async fn gsend(&mut self, id: &str, gid: &str, body: &str) -> Value {
        self.request(json!({"t":"gsend","id":id,"group":gid,"body":body})).await
    }

    /// `gsend` that must be answered `sent`; returns the `sid`.
    pub async fn gsend_ok(&mut self, id: &str, gid: &str, body: &str) -> u64 {
        let f = self.gsend(id, gid, body).await;
        assert_eq!(f["t"], "sent", "{}: gsend {id}: {f}", self.user);
        f["sid"].as_u64().unwrap_or_else(|| panic!("sent without sid: {f}"))
    }

    /// Reads (recording items, stashing answers) until `done(self)` holds; panics after
    /// `within` with what the member has.
    pub async fn wait_until(&mut self, within: Duration, what: &str, done: impl Fn(&Member) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Some(f) => {
                    if let Some(f) = self.absorb(f) {
                        if f["t"] != "pong" {
                            self.stash.push(f);
                        }
                    }
                }
                None => panic!(
                    "{}: not {what} within {within:?}; has {} items: {}",
                    self.user,
                    self.log.len(),
                    brief(&self.log)
                ),
            }
        }
    }

    /// Reads for `d`, recording whatever arrives (to catch extras after the expected items).
    pub async fn soak(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            if let Some(f) = self.next_frame(left).await {
                if let Some(f) = self.absorb(f) {
                    if f["t"] != "pong" {
                        self.stash.push(f);
                    }
                }
            }
        }
    }

    /// The items of group `gid` (`group` and `group_event`), in arrival order.
    pub fn group_items(&self, gid: &str) -> Vec<&Value> {
        self.log.iter().map(|f| &f["m"]).filter(|m| m["group"] == gid && m["k"] != "group_receipt").collect()
    }

    /// The `group` messages of `gid`, in arrival order.
    pub fn msgs(&self, gid: &str) -> Vec<&Value> {
        self.log.iter().map(|f| &f["m"]).filter(|m| m["k"] == "group" && m["group"] == gid).collect()
    }

    /// The sids of the `group` messages of `gid`, in arrival order.
    pub fn msg_sids(&self, gid: &str) -> Vec<u64> {
        self.msgs(gid).iter().map(|m| sid_of(m)).collect()
    }

    /// The `group_event` items of `gid`, in arrival order.
    pub fn events(&self, gid: &str) -> Vec<&Value> {
        self.log.iter().map(|f| &f["m"]).filter(|m| m["k"] == "group_event" && m["group"] == gid).collect()
    }

    /// The `group_receipt` items of `gid`, in arrival order.
    pub fn group_receipts(&self, gid: &str) -> Vec<&Value> {
        self.log.iter().map(|f| &f["m"]).filter(|m| m["k"] == "group_receipt" && m["group"] == gid).collect()
    }

    /// Acknowledges everything held.
    pub async fn ack_all(&mut self) {
        let s = self.inbox.max_seq();
        if s > 0 {
            self.c.ack(s).await;
        }
    }

    /// No item was shown twice (same `seq`, or the same `(group, sid)` under another `seq`).
    pub fn assert_no_duplicates(&self) {
        self.inbox.assert_no_duplicates();
        assert!(self.dup_group_items.is_empty(), "{}: group items stored twice: {:?}", self.user, self.dup_group_items);
    }

    pub async fn close(self) {
        self.c.close().await
    }
}

pub fn sid_of(m: &Value) -> u64 {
    m["sid"].as_u64().unwrap_or_else(|| panic!("no sid in {m}"))
}

/// `(kind, sid, from/event)` of each item, for failure messages.
pub fn brief(log: &[Value]) -> String {
    let parts: Vec<String> = log
        .iter()
        .map(|f| {
            let m = &f["m"];
            match m["k"].as_str() {
                Some("group") => format!("g{}:{}", m["sid"], m["body"].as_str().unwrap_or_default()),
                Some("group_event") => {
                    format!("e{}:{}{}", m["sid"], m["event"].as_str().unwrap_or_default(), m["members"])
                }
                Some("group_receipt") => format!("r{}:{}", m["sid"], m["status"].as_str().unwrap_or_default()),
                _ => format!("{}@{}", m["k"].as_str().unwrap_or("?"), f["seq"]),
            }
        })
        .collect();
    if parts.len() > 40 {
        format!("[{} ... {}] ({} items)", parts[..20].join(" "), parts[parts.len() - 20..].join(" "), parts.len())
    } else {
        format!("[{}]", parts.join(" "))
    }
}

/// Users `<prefix>0000` .. `<prefix><n-1>`.
pub fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:04}")).collect()
}

/// Connects `users` (user `i` to gateway `i % gateways`), `concurrency` at a time; returns them
/// in the order of `users`.
pub async fn join_all(sys: &System, users: &[String], concurrency: usize) -> Vec<Member> {
    let gws = sys.gateways.len();
    let mut joined: Vec<(usize, Member)> = futures::stream::iter(users.iter().enumerate())
        .map(|(i, u)| async move { (i, Member::join(sys, i % gws, u).await) })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    joined.sort_by_key(|(i, _)| *i);
    joined.into_iter().map(|(_, m)| m).collect()
}

/// Waits, concurrently, until every member satisfies `done`.
pub async fn wait_all(members: &mut [Member], within: Duration, what: &str, done: impl Fn(&Member) -> bool + Copy) {
    futures::future::join_all(members.iter_mut().map(|m| m.wait_until(within, what, done))).await;
}

/// Whether `v` is strictly increasing.
pub fn increasing(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

/// The sorted member list of a `group` state.
pub fn member_list(group: &Value) -> Vec<String> {
    let mut v: Vec<String> = group["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {group}"))
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}
