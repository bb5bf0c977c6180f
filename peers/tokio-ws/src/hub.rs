//! Who is connected, the groups, and what each client frame does. No I/O: frames go out through
//! each connection's unbounded channel (the pattern of tokio-tungstenite's own chat example), and
//! the connection's writer numbers inbox items as it writes them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::channel::mpsc::UnboundedSender;
use serde::{Deserialize, Serialize};

/// Largest `body`, bytes (the gateway's default `max_body`).
pub const MAX_BODY: usize = 32 * 1024;
/// Most members of a group (the router's default `--max-members`).
pub const MAX_MEMBERS: usize = 1024;

/// What a connection's writer sends.
#[derive(Debug)]
pub enum Out {
    /// A complete frame.
    Frame(String),
    /// An inbox item (the JSON of `m`), shared by every recipient; the writer wraps it as
    /// `{"t":"msg","seq":N,"m":…}` with the connection's next sequence number.
    Item(Arc<str>),
}

pub type Tx = UnboundedSender<Out>;

/// One authenticated connection.
pub struct Conn {
    pub id: u64,
    pub user: String,
    pub device: String,
    pub tx: Tx,
}

struct Group {
    members: Vec<String>,
}

#[derive(Default)]
pub struct Hub {
    /// user → its connections (several devices).
    users: Mutex<HashMap<String, Vec<(u64, Tx)>>>,
    groups: Mutex<HashMap<String, Arc<Group>>>,
    next_sid: AtomicU64,
    next_gid: AtomicU64,
    next_conn: AtomicU64,
}

/// A client frame: the union of the fields of the frames this server knows.
#[derive(Deserialize)]
struct In<'a> {
    #[serde(borrow)]
    t: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    group: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    members: Option<Vec<Cow<'a, str>>>,
}

#[derive(Serialize)]
#[serde(tag = "k", rename_all = "snake_case")]
enum Item<'a> {
    Chat { from: &'a str, dev: &'a str, id: &'a str, body: &'a str, ts: u64 },
    Group { group: &'a str, from: &'a str, dev: &'a str, id: &'a str, sid: u64, n: usize, body: &'a str, ts: u64 },
}

#[derive(Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Reply<'a> {
    Hello {
        user: &'a str,
        device: &'a str,
        gateway: &'a str,
        heartbeat_ms: u64,
        max_body: usize,
        resume_from: u64,
    },
    Synced {
        seq: u64,
    },
    Sent {
        id: &'a str,
        sid: u64,
        ts: u64,
        dup: bool,
    },
    Group {
        id: &'a str,
        group: GroupView<'a>,
    },
    Pong,
    Error {
        code: &'a str,
        msg: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
}

#[derive(Serialize)]
struct GroupView<'a> {
    gid: &'a str,
    name: &'a str,
    created_by: &'a str,
    created_at: u64,
    admins: [&'a str; 1],
    members: &'a [String],
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn json(r: &Reply) -> String {
    serde_json::to_string(r).expect("replies serialise")
}

/// User and device ids: 1–64 bytes of `A-Z a-z 0-9 _ -` (PROTOCOL.md).
pub fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Hub {
    /// Registers a connection and queues its `hello` and `synced`.
    pub fn connect(&self, user: String, device: String, tx: Tx) -> Conn {
        let id = self.next_conn.fetch_add(1, Relaxed);
        let hello = Reply::Hello {
            user: &user,
            device: &device,
            gateway: "peer-tokio-ws",
            heartbeat_ms: 30_000,
            max_body: MAX_BODY,
            resume_from: 0,
        };
        let _ = tx.unbounded_send(Out::Frame(json(&hello)));
        let _ = tx.unbounded_send(Out::Frame(json(&Reply::Synced { seq: 0 })));
        self.users.lock().expect("users lock").entry(user.clone()).or_default().push((id, tx.clone()));
        Conn { id, user, device, tx }
    }

    pub fn disconnect(&self, c: &Conn) {
        let mut users = self.users.lock().expect("users lock");
        if let Some(list) = users.get_mut(&c.user) {
            list.retain(|(id, _)| *id != c.id);
            if list.is_empty() {
                users.remove(&c.user);
            }
        }
    }

    fn reply(&self, c: &Conn, r: &Reply) {
        let _ = c.tx.unbounded_send(Out::Frame(json(r)));
    }

    fn error(&self, c: &Conn, code: &str, msg: &str, id: Option<&str>) {
        self.reply(c, &Reply::Error { code, msg, id });
    }

    /// Queues `item` to every connection of each user in `to` (unknown or offline users get
    /// nothing: this server stores nothing).
    fn deliver<'u>(&self, to: impl IntoIterator<Item = &'u str>, item: &Item) {
        let item: Arc<str> = serde_json::to_string(item).expect("items serialise").into();
        let users = self.users.lock().expect("users lock");
        for u in to {
            for (_, tx) in users.get(u).map(Vec::as_slice).unwrap_or(&[]) {
                let _ = tx.unbounded_send(Out::Item(item.clone()));
            }
        }
    }

    /// A binary frame: refused, as the gateway does.
    pub fn binary(&self, c: &Conn) {
        self.error(c, "binary_unsupported", "binary frames are not accepted; send JSON text frames", None);
    }

    /// Handles one text frame of connection `c`.
    pub fn handle(&self, c: &Conn, text: &str) {
        let f: In = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) if e.is_data() => return self.error(c, "bad_field", &e.to_string(), None),
            Err(e) => return self.error(c, "bad_json", &e.to_string(), None),
        };
        let id = f.id.as_deref();
        match f.t.as_deref() {
            Some("send") => {
                let (Some(id), Some(to), Some(body)) = (id, f.to.as_deref(), f.body.as_deref()) else {
                    return self.error(c, "missing_field", "send needs id, to and body", id);
                };
                if body.len() > MAX_BODY {
                    return self.error(c, "too_large", "body exceeds max_body", Some(id));
                }
                let (sid, ts) = (self.next_sid.fetch_add(1, Relaxed) + 1, now_ms());
                self.deliver([to], &Item::Chat { from: &c.user, dev: &c.device, id, body, ts });
                self.reply(c, &Reply::Sent { id, sid, ts, dup: false });
            }
            Some("gsend") => {
                let (Some(id), Some(gid), Some(body)) = (id, f.group.as_deref(), f.body.as_deref()) else {
                    return self.error(c, "missing_field", "gsend needs id, group and body", id);
                };
                if body.len() > MAX_BODY {
                    return self.error(c, "too_large", "body exceeds max_body", Some(id));
                }
                let Some(g) = self.groups.lock().expect("groups lock").get(gid).cloned() else {
                    return self.error(c, "not_found", "no such group", Some(id));
                };
                if !g.members.contains(&c.user) {
                    return self.error(c, "forbidden", "not a member of the group", Some(id));
                }
                let (sid, ts) = (self.next_sid.fetch_add(1, Relaxed) + 1, now_ms());
                let n = g.members.len() - 1;
                let item = Item::Group { group: gid, from: &c.user, dev: &c.device, id, sid, n, body, ts };
                self.deliver(g.members.iter().map(String::as_str).filter(|m| *m != c.user), &item);
                self.reply(c, &Reply::Sent { id, sid, ts, dup: false });
            }
            Some("group_create") => {
                let Some(id) = id else {
                    return self.error(c, "missing_field", "group_create needs id", None);
                };
                let mut members = vec![c.user.clone()];
                for m in f.members.iter().flatten() {
                    if !valid_id(m) {
                        return self.error(c, "bad_field", "members: invalid user id", Some(id));
                    }
                    if !members.iter().any(|x| x == m) {
                        members.push(m.to_string());
                    }
                }
                if members.len() > MAX_MEMBERS {
                    return self.error(c, "limit_exceeded", "too many members", Some(id));
                }
                let gid = format!("g{:08x}", self.next_gid.fetch_add(1, Relaxed) + 1);
                let name = f.name.as_deref().unwrap_or("");
                let view = GroupView {
                    gid: &gid,
                    name,
                    created_by: &c.user,
                    created_at: now_ms(),
                    admins: [&c.user],
                    members: &members,
                };
                let answer = json(&Reply::Group { id, group: view });
                self.groups.lock().expect("groups lock").insert(gid, Arc::new(Group { members }));
                let _ = c.tx.unbounded_send(Out::Frame(answer));
            }
            // Nothing is stored, so there is nothing to remove.
            Some("ack") => {}
            Some("ping") => self.reply(c, &Reply::Pong),
            Some(_) | None => self.error(c, "unknown_type", "unknown or missing frame type `t`", id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc::{unbounded, UnboundedReceiver};
    use serde_json::Value;

    fn drain(rx: &mut UnboundedReceiver<Out>) -> Vec<Value> {
        let mut v = Vec::new();
        while let Ok(o) = rx.try_recv() {
            let s = match o {
                Out::Frame(s) => s,
                Out::Item(i) => format!(r#"{{"t":"msg","m":{i}}}"#),
            };
            v.push(serde_json::from_str(&s).unwrap());
        }
        v
    }

    #[test]
    fn send_group_and_errors() {
        let hub = Hub::default();
        let (ta, mut ra) = unbounded();
        let (tb, mut rb) = unbounded();
        let (tc, mut rc) = unbounded();
        let a = hub.connect("a".into(), "d".into(), ta);
        let _b = hub.connect("b".into(), "d".into(), tb);
        let c = hub.connect("c".into(), "d".into(), tc);
        assert_eq!(drain(&mut ra).iter().map(|f| f["t"].clone()).collect::<Vec<_>>(), ["hello", "synced"]);
        drain(&mut rb);
        drain(&mut rc);

        hub.handle(&a, r#"{"t":"send","id":"1","to":"b","body":"hi \"x\""}"#);
        let sent = drain(&mut ra);
        assert_eq!((sent[0]["t"].as_str(), sent[0]["id"].as_str()), (Some("sent"), Some("1")));
        let got = drain(&mut rb);
        assert_eq!(got[0]["m"]["k"], "chat");
        assert_eq!(got[0]["m"]["from"], "a");
        assert_eq!(got[0]["m"]["body"], "hi \"x\"");

        hub.handle(&a, r#"{"t":"group_create","id":"g","members":["b","c","a"]}"#);
        let g = drain(&mut ra);
        assert_eq!(g[0]["t"], "group");
        assert_eq!(g[0]["group"]["members"].as_array().unwrap().len(), 3);
        let gid = g[0]["group"]["gid"].as_str().unwrap().to_owned();
        hub.handle(&c, &format!(r#"{{"t":"gsend","id":"2","group":"{gid}","body":"yo"}}"#));
        assert_eq!(drain(&mut rc)[0]["t"], "sent");
        for rx in [&mut ra, &mut rb] {
            let m = drain(rx);
            assert_eq!((m[0]["m"]["k"].as_str(), m[0]["m"]["n"].as_u64()), (Some("group"), Some(2)));
        }

        hub.handle(&a, "{nope");
        hub.handle(&a, r#"{"t":"send","id":"3","to":"b"}"#);
        hub.handle(&a, r#"{"t":"send","id":4}"#);
        hub.handle(&a, r#"{"t":"gsend","id":"5","group":"gx","body":""}"#);
        hub.handle(&a, r#"{"t":"whatever"}"#);
        hub.handle(&a, r#"{"t":"ping"}"#);
        let codes: Vec<_> = drain(&mut ra).iter().map(|f| f["code"].as_str().unwrap_or("pong").to_owned()).collect();
        assert_eq!(codes, ["bad_json", "missing_field", "bad_field", "not_found", "unknown_type", "pong"]);

        hub.disconnect(&c);
        hub.handle(&a, r#"{"t":"send","id":"6","to":"c","body":"gone"}"#);
        assert!(drain(&mut rc).is_empty());
    }

    #[test]
    fn ids() {
        assert!(valid_id("a-b_9"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(65)));
    }
}
