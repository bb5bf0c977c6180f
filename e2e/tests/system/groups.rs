//! Groups through the WebSocket interface: membership operations and their rules, the fan-out to
//! online and offline members across gateways, ordering with concurrent senders, membership
//! changes in the middle of traffic, and the rejection of non-members.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use testkit::System;

use crate::group_kit::*;

/// A well-formed group id that no group has.
const UNKNOWN: &str = "g0000000000000000000000000000dead";
const WAIT: Duration = Duration::from_secs(60);

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn gid_of(group: &Value) -> String {
    group["gid"].as_str().unwrap_or_else(|| panic!("no gid in {group}")).to_owned()
}

fn expect_error(f: &Value, code: &str) {
    assert_eq!((f["t"].as_str(), f["code"].as_str()), (Some("error"), Some(code)), "expected error {code}: {f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_membership_ops_follow_the_admin_rules_and_reach_every_timeline() {
    let sys = System::start(2).await;
    let mut alice = Member::join(&sys, 0, "alice").await;
    let mut bob = Member::join(&sys, 1, "bob").await;
    let mut carol = Member::join(&sys, 0, "carol").await;
    let mut dave = Member::join(&sys, 1, "dave").await;

    // Create: the creator is a member and the only admin.
    let g = alice.create("Climbing", &s(&["bob", "carol"])).await;
    let gid = gid_of(&g);
    assert_eq!(g["name"], "Climbing", "{g}");
    assert_eq!(g["created_by"], "alice", "{g}");
    assert_eq!(g["admins"], json!(["alice"]), "{g}");
    assert_eq!(member_list(&g), s(&["alice", "bob", "carol"]), "{g}");
    assert!(g["created_at"].as_u64().is_some_and(|t| t > 0), "{g}");

    // Info, from a member on the other gateway: the same state. List: the group, by name.
    let info = bob.op_ok("group_info", json!({"group":gid})).await;
    assert_eq!((info["t"].as_str(), &info["group"]), (Some("group"), &g), "{info}");
    let list = bob.op_ok("groups", json!({})).await;
    assert_eq!(list["t"], "groups", "{list}");
    assert_eq!(list["groups"], json!([{"gid":gid,"name":"Climbing"}]), "{list}");
    let list = dave.op_ok("groups", json!({})).await;
    assert_eq!(list["groups"], json!([]), "{list}");

    // Non-members see nothing; unknown groups are not found; only admins manage members.
    expect_error(&dave.op("group_info", json!({"group":gid})).await, "forbidden");
    expect_error(&dave.op("group_add", json!({"group":gid,"members":["dave"]})).await, "forbidden");
    expect_error(&alice.op("group_info", json!({"group":UNKNOWN})).await, "not_found");
    expect_error(&alice.op("group_add", json!({"group":UNKNOWN,"members":["dave"]})).await, "not_found");
    expect_error(&bob.op("group_add", json!({"group":gid,"members":["dave"]})).await, "forbidden");
    expect_error(&bob.op("group_remove", json!({"group":gid,"members":["carol"]})).await, "forbidden");
    // The error names the request it answers.
    let f = bob.op("group_add", json!({"group":gid,"members":["dave"]})).await;
    assert!(f["id"].as_str().is_some_and(|id| id.starts_with("op-bob-")), "{f}");

    // The admin adds dave and removes carol.
    let g = alice.op_ok("group_add", json!({"group":gid,"members":["dave"]})).await["group"].clone();
    assert_eq!(member_list(&g), s(&["alice", "bob", "carol", "dave"]), "{g}");
    let g = alice.op_ok("group_remove", json!({"group":gid,"members":["carol"]})).await["group"].clone();
    assert_eq!(member_list(&g), s(&["alice", "bob", "dave"]), "{g}");
    expect_error(&carol.op("group_info", json!({"group":gid})).await, "forbidden");
    assert_eq!(carol.op_ok("groups", json!({})).await["groups"], json!([]));
    let dave_list = dave.op_ok("groups", json!({})).await;
    assert_eq!(dave_list["groups"], json!([{"gid":gid,"name":"Climbing"}]), "{dave_list}");

    // Anyone may leave; the last admin leaving makes the earliest remaining member admin.
    let g = bob.op_ok("group_leave", json!({"group":gid})).await["group"].clone();
    assert_eq!(member_list(&g), s(&["alice", "dave"]), "{g}");
    expect_error(&bob.op("group_info", json!({"group":gid})).await, "forbidden");
    let g = alice.op_ok("group_leave", json!({"group":gid})).await["group"].clone();
    assert_eq!((member_list(&g), &g["admins"]), (s(&["dave"]), &json!(["dave"])), "{g}");
    expect_error(&alice.op("group_add", json!({"group":gid,"members":["carol"]})).await, "forbidden");
    let g = dave.op_ok("group_add", json!({"group":gid,"members":["bob"]})).await["group"].clone();
    assert_eq!(member_list(&g), s(&["bob", "dave"]), "{g}");

    // Every change is a `group_event` in the timeline of the members at that point, and of the
    // users it concerns: (event, by, members).
    let created = ("created", "alice", s(&["alice", "bob", "carol"]));
    let added_dave = ("added", "alice", s(&["dave"]));
    let removed_carol = ("removed", "alice", s(&["carol"]));
    let left_bob = ("left", "bob", s(&["bob"]));
    let left_alice = ("left", "alice", s(&["alice"]));
    let added_bob = ("added", "dave", s(&["bob"]));
    let want = [
        ("alice", vec![&created, &added_dave, &removed_carol, &left_bob, &left_alice]),
        ("bob", vec![&created, &added_dave, &removed_carol, &left_bob, &added_bob]),
        ("carol", vec![&created, &added_dave, &removed_carol]),
        ("dave", vec![&added_dave, &removed_carol, &left_bob, &left_alice, &added_bob]),
    ];
    let mut members = [alice, bob, carol, dave];
    for (m, (user, events)) in members.iter_mut().zip(&want) {
        assert_eq!(m.user, *user);
        let n = events.len();
        m.wait_until(WAIT, "shown every membership event", |m| m.events(&gid).len() >= n).await;
    }
    // Nothing more arrives (a bounded look, not a timing assertion: extras would be a bug).
    futures::future::join_all(members.iter_mut().map(|m| m.soak(Duration::from_millis(500)))).await;

    let mut sid_of_event: HashMap<String, u64> = HashMap::new();
    for (m, (user, events)) in members.iter().zip(&want) {
        m.assert_no_duplicates();
        let got = m.events(&gid);
        let summary: Vec<(String, String, Vec<String>)> = got
            .iter()
            .map(|e| {
                let ms: Vec<String> = serde_json::from_value(e["members"].clone()).unwrap();
                (e["event"].as_str().unwrap().to_owned(), e["by"].as_str().unwrap().to_owned(), ms)
            })
            .collect();
        let expected: Vec<(String, String, Vec<String>)> =
            events.iter().map(|(e, by, ms)| (e.to_string(), by.to_string(), ms.clone())).collect();
        assert_eq!(summary, expected, "{user}'s timeline: {}", brief(&m.log));
        let sids: Vec<u64> = got.iter().map(|e| sid_of(e)).collect();
        assert!(increasing(&sids), "{user}: events out of order {sids:?}");
        for e in &got {
            assert_eq!(e["name"], "Climbing", "{e}");
            assert!(e["ts"].as_u64().is_some(), "{e}");
            // Every member sees an event at the same position of the timeline.
            let key = format!("{}/{}/{}", e["event"], e["by"], e["members"]);
            let sid = sid_of(e);
            assert_eq!(*sid_of_event.entry(key.clone()).or_insert(sid), sid, "{user}: {key} at another sid");
        }
        assert!(m.msgs(&gid).is_empty(), "{user}: {}", brief(&m.log));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_fanout_reaches_online_members_on_two_gateways_and_offline_members_on_reconnect() {
    let sys = System::start(2).await;
    // dave has connected before (his device is known), then goes away.
    Member::join(&sys, 1, "dave").await.close().await;
    let mut alice = Member::join(&sys, 0, "alice").await;
    let mut bob = Member::join(&sys, 1, "bob").await;
    let mut carol = Member::join(&sys, 0, "carol").await;
    let g = alice.create("fanout", &s(&["bob", "carol", "dave"])).await;
    let gid = gid_of(&g);

    // Rounds of alice, bob, carol in turn; each send is answered `sent` with its sid.
    const ROUNDS: usize = 8;
    let mut sent: Vec<(u64, String, String)> = Vec::new(); // (sid, from, id)
    for r in 0..ROUNDS {
        for m in [&mut alice, &mut bob, &mut carol] {
            let id = format!("{}-{r}", m.user);
            let f = m.gsend(&id, &gid, &format!("{} says {r}", m.user)).await;
            assert_eq!(f["t"], "sent", "{f}");
            assert_eq!(f["dup"], false, "{f}");
            assert!(f["ts"].as_u64().is_some(), "{f}");
            sent.push((f["sid"].as_u64().unwrap_or_else(|| panic!("no sid: {f}")), m.user.clone(), id));
        }
    }
    // A retry with the same id: the same sid, nothing new stored.
    let (sid0, _, id0) = sent[0].clone();
    let f = alice.gsend(&id0, &gid, "alice says 0").await;
    assert_eq!((&f["t"], &f["sid"], &f["dup"]), (&json!("sent"), &json!(sid0), &json!(true)), "{f}");
    let all: Vec<u64> = sent.iter().map(|(s, _, _)| *s).collect();
    assert!(increasing(&all), "sequential sends get increasing sids: {all:?}");
    let by_sid: BTreeMap<u64, (String, String)> = sent.iter().map(|(s, f, i)| (*s, (f.clone(), i.clone()))).collect();

    let check = |m: &Member, own: &str| {
        m.assert_no_duplicates();
        let want: Vec<u64> = sent.iter().filter(|(_, f, _)| f != own).map(|(s, _, _)| *s).collect();
        assert_eq!(m.msg_sids(&gid), want, "{}: every other member's message once, in sid order", m.user);
        for msg in m.msgs(&gid) {
            let (from, id) = &by_sid[&sid_of(msg)];
            assert_eq!((&msg["from"], &msg["id"], &msg["dev"]), (&json!(from), &json!(id), &json!(DEVICE)), "{msg}");
            assert_eq!(msg["n"], 3, "three recipients: {msg}");
            assert_eq!(msg["body"].as_str().unwrap(), format!("{from} says {}", &id[id.len() - 1..]), "{msg}");
        }
        // One timeline: the created event first, then the messages, in sid order.
        let items: Vec<u64> = m.group_items(&gid).iter().map(|i| sid_of(i)).collect();
        assert!(increasing(&items), "{}: {}", m.user, brief(&m.log));
        assert_eq!(m.events(&gid).len(), 1, "{}: {}", m.user, brief(&m.log));
    };

    let n_others = 2 * ROUNDS;
    let mut online = [alice, bob, carol];
    wait_all(&mut online, WAIT, "shown every other member's message", |m| m.msgs(&gid).len() >= n_others).await;
    futures::future::join_all(online.iter_mut().map(|m| m.soak(Duration::from_millis(300)))).await;
    for m in &online {
        check(m, &m.user.clone());
    }

    // dave comes back (on the other gateway): everything, in order, once.
    let mut dave = Member::join(&sys, 0, "dave").await;
    let n_all = 3 * ROUNDS;
    dave.wait_until(WAIT, "shown every message", |m| m.msgs(&gid).len() >= n_all).await;
    dave.soak(Duration::from_millis(300)).await;
    check(&dave, "dave");
    let events = dave.events(&gid);
    assert_eq!(events[0]["event"], "created", "{}", brief(&dave.log));
    // Same order everywhere: each member's sequence is the timeline without its own messages.
    let dave_seq: Vec<u64> = dave.group_items(&gid).iter().map(|i| sid_of(i)).collect();
    for m in &online {
        let own: Vec<u64> = sent.iter().filter(|(_, f, _)| *f == m.user).map(|(s, _, _)| *s).collect();
        let theirs: Vec<u64> = dave_seq.iter().copied().filter(|s| !own.contains(s)).collect();
        let got: Vec<u64> = m.group_items(&gid).iter().map(|i| sid_of(i)).collect();
        assert_eq!(got, theirs, "{} and dave see the same order", m.user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_concurrent_senders_share_one_total_order() {
    const PER_SENDER: usize = 30;
    let sys = System::start(2).await;
    let mut s0 = Member::join(&sys, 0, "s0").await;
    let s1 = Member::join(&sys, 1, "s1").await;
    let s2 = Member::join(&sys, 0, "s2").await;
    let watcher = Member::join(&sys, 1, "watcher").await;
    let gid = gid_of(&s0.create("busy", &s(&["s1", "s2", "watcher"])).await);

    let mut members = [s0, s1, s2, watcher];
    // Every sender writes its 30 sends back to back, then reads; all at once.
    futures::future::join_all(members.iter_mut().map(|m| {
        let gid = gid.clone();
        async move {
            let sender = m.user != "watcher";
            if sender {
                for i in 0..PER_SENDER {
                    let id = format!("{}-{i:02}", m.user);
                    m.gsend_nowait(&id, &gid, &id).await;
                }
            }
            let others = if sender { 2 * PER_SENDER } else { 3 * PER_SENDER };
            let sents = if sender { PER_SENDER } else { 0 };
            m.wait_until(WAIT, "answered and shown the others' messages", |m| {
                m.stash.iter().filter(|f| f["t"] == "sent" || f["t"] == "error").count() >= sents
                    && m.msgs(&gid).len() >= others
            })
            .await;
        }
    }))
    .await;
    futures::future::join_all(members.iter_mut().map(|m| m.soak(Duration::from_millis(300)))).await;

    // Each sender's sids, in send order.
    let mut own: HashMap<String, Vec<u64>> = HashMap::new();
    for m in &members[..3] {
        let mut sids = Vec::new();
        for i in 0..PER_SENDER {
            let id = format!("{}-{i:02}", m.user);
            let f = m.stash.iter().find(|f| f["id"] == id).unwrap_or_else(|| panic!("no answer to {id}"));
            assert_eq!(f["t"], "sent", "{f}");
            sids.push(f["sid"].as_u64().unwrap());
        }
        assert!(increasing(&sids), "{}: sids follow the send order: {sids:?}", m.user);
        own.insert(m.user.clone(), sids);
    }
    let mut total: Vec<u64> = own.values().flatten().copied().collect();
    total.sort_unstable();
    total.dedup();
    assert_eq!(total.len(), 3 * PER_SENDER, "distinct sids");

    for m in &members {
        m.assert_no_duplicates();
        let mine = own.get(&m.user).cloned().unwrap_or_default();
        let want: Vec<u64> = total.iter().copied().filter(|s| !mine.contains(s)).collect();
        // The same total order everywhere: the timeline order, minus one's own messages.
        assert_eq!(m.msg_sids(&gid), want, "{}: {}", m.user, brief(&m.log));
        // Each sender's messages in its send order.
        let mut last: HashMap<String, i64> = HashMap::new();
        for msg in m.msgs(&gid) {
            let from = msg["from"].as_str().unwrap().to_owned();
            let body = msg["body"].as_str().unwrap();
            assert_eq!(body, msg["id"].as_str().unwrap(), "{msg}");
            let i: i64 = body.rsplit('-').next().unwrap().parse().unwrap();
            let prev = last.insert(from.clone(), i).unwrap_or(-1);
            assert_eq!(i, prev + 1, "{}: {from}'s messages in send order: {msg}", m.user);
            assert_eq!(own[&from][i as usize], sid_of(msg), "{msg}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_membership_changes_mid_traffic_apply_at_their_position() {
    let sys = System::start(2).await;
    let mut alice = Member::join(&sys, 0, "alice").await; // admin
    let mut bob = Member::join(&sys, 1, "bob").await; // streams messages
    let carol = Member::join(&sys, 0, "carol").await; // removed mid-traffic
    let dave = Member::join(&sys, 1, "dave").await; // bystander
    let erin = Member::join(&sys, 0, "erin").await; // added mid-traffic
    let gid = gid_of(&alice.create("moving", &s(&["bob", "carol", "dave"])).await);

    // bob streams (paced under the 50/s message limit) until the membership changes are done,
    // then 10 more; alice adds erin once traffic flows, and removes carol a little later.
    let changes_done = AtomicBool::new(false);
    let mut bob_sids: Vec<u64> = Vec::new();
    let stream = async {
        let mut extra = 0;
        for i in 0..400 {
            bob_sids.push(bob.gsend_ok(&format!("b-{i:03}"), &gid, &format!("m{i:03}")).await);
            tokio::time::sleep(Duration::from_millis(25)).await;
            if changes_done.load(Ordering::SeqCst) {
                extra += 1;
                if extra == 10 {
                    return;
                }
            }
        }
        panic!("membership changes not done after 400 messages");
    };
    let admin = async {
        alice.wait_until(WAIT, "shown 10 of bob's messages", |m| m.msgs(&gid).len() >= 10).await;
        let g = alice.op_ok("group_add", json!({"group":gid,"members":["erin"]})).await;
        assert_eq!(member_list(&g["group"]), s(&["alice", "bob", "carol", "dave", "erin"]));
        let n = alice.msgs(&gid).len();
        alice.wait_until(WAIT, "shown 10 more of bob's messages", |m| m.msgs(&gid).len() >= n + 10).await;
        let g = alice.op_ok("group_remove", json!({"group":gid,"members":["carol"]})).await;
        assert_eq!(member_list(&g["group"]), s(&["alice", "bob", "dave", "erin"]));
        changes_done.store(true, Ordering::SeqCst);
    };
    tokio::join!(stream, admin);
    // A fence: once anyone is shown `zed` added, every copy of every earlier entry is stored
    // (the router publishes a group's next entry only after all copies of the previous one).
    let fence = bob.gsend_ok("b-fence", &gid, "fence").await;
    bob_sids.push(fence);
    alice.op_ok("group_add", json!({"group":gid,"members":["zed"]})).await;

    let mut members = [alice, bob, carol, dave, erin];
    let zed_added = |m: &Member| m.events(&gid).iter().any(|e| e["members"] == json!(["zed"]));
    // carol (removed) is not shown `zed` added: wait for the others only.
    for m in members.iter_mut().filter(|m| m.user != "carol") {
        m.wait_until(WAIT, "shown zed added", zed_added).await;
    }
    let events = members[0].events(&gid).iter().map(|e| (*e).clone()).collect::<Vec<_>>();
    let sid_of_ev = |what: &str, who: &str| {
        events
            .iter()
            .find(|e| e["event"] == what && (what == "created" || e["members"] == json!([who])))
            .map(sid_of)
            .unwrap_or_else(|| panic!("no {what} {who} event: {events:?}"))
    };
    let (created, added, removed, zed) = (
        sid_of_ev("created", "alice"),
        sid_of_ev("added", "erin"),
        sid_of_ev("removed", "carol"),
        sid_of_ev("added", "zed"),
    );
    assert!(increasing(&[created, added, removed, fence, zed]), "{created} {added} {removed} {fence} {zed}");
    assert!(bob_sids.iter().any(|s| (added..removed).contains(s)), "messages between the changes: {bob_sids:?}");
    assert!(bob_sids.iter().any(|s| *s < added) && bob_sids.iter().any(|s| *s > removed), "{bob_sids:?}");

    // What each member must have: (events, messages), by sid.
    let range = |lo: u64, hi: u64| bob_sids.iter().copied().filter(|s| *s > lo && *s < hi).collect::<Vec<u64>>();
    let want: BTreeMap<&str, (Vec<u64>, Vec<u64>)> = [
        ("alice", (vec![created, added, removed, zed], bob_sids.clone())),
        ("bob", (vec![created, added, removed, zed], vec![])),
        ("carol", (vec![created, added, removed], range(0, removed))),
        ("dave", (vec![created, added, removed, zed], bob_sids.clone())),
        ("erin", (vec![added, removed, zed], range(added, u64::MAX))),
    ]
    .into_iter()
    .collect();
    let carol = &mut members[2];
    let n_carol = want["carol"].1.len();
    carol.wait_until(WAIT, "shown her messages", |m| m.msgs(&gid).len() >= n_carol).await;
    futures::future::join_all(members.iter_mut().map(|m| m.soak(Duration::from_millis(300)))).await;

    for m in &members {
        m.assert_no_duplicates();
        let (ev, msgs) = &want[m.user.as_str()];
        let got_ev: Vec<u64> = m.events(&gid).iter().map(|e| sid_of(e)).collect();
        assert_eq!(&got_ev, ev, "{}: events {}", m.user, brief(&m.log));
        assert_eq!(&m.msg_sids(&gid), msgs, "{}: messages {}", m.user, brief(&m.log));
        // The recipient count of each message follows the membership of its position.
        for msg in m.msgs(&gid) {
            let s = sid_of(msg);
            let n = if s > added && s < removed { 4 } else { 3 };
            assert_eq!(msg["n"], n, "{}: {msg}", m.user);
        }
    }

    // What the inboxes hold (not only what arrived live): carol's inbox, drained from the start
    // (she never acknowledged), has nothing after her removal.
    let [_, _, carol, _, erin] = members;
    carol.close().await;
    let carol = Member::join(&sys, 1, "carol").await;
    carol.assert_no_duplicates();
    let got: Vec<u64> = carol.group_items(&gid).iter().map(|i| sid_of(i)).collect();
    let mut expect: Vec<u64> = want["carol"].0.iter().chain(&want["carol"].1).copied().collect();
    expect.sort_unstable();
    assert_eq!(got, expect, "carol's stored timeline: {}", brief(&carol.log));
    erin.close().await;
    let erin = Member::join(&sys, 0, "erin").await;
    let got: Vec<u64> = erin.group_items(&gid).iter().map(|i| sid_of(i)).collect();
    let mut expect: Vec<u64> = want["erin"].0.iter().chain(&want["erin"].1).copied().collect();
    expect.sort_unstable();
    assert_eq!(got, expect, "erin's stored timeline: {}", brief(&erin.log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_send_from_a_non_member_is_refused_and_reaches_no_one() {
    let sys = System::start(2).await;
    let mut alice = Member::join(&sys, 0, "alice").await;
    let mut bob = Member::join(&sys, 1, "bob").await;
    let mut carol = Member::join(&sys, 1, "carol").await;
    let mut eve = Member::join(&sys, 1, "eve").await;
    let gid = gid_of(&alice.create("private", &s(&["bob", "carol"])).await);

    // A stranger: `forbidden`, with the request's id. An unknown group: `not_found`.
    let f = eve.gsend("e-1", &gid, "let me in").await;
    expect_error(&f, "forbidden");
    assert_eq!(f["id"], "e-1");
    expect_error(&eve.gsend("e-2", UNKNOWN, "anyone?").await, "not_found");
    expect_error(&alice.gsend("a-0", UNKNOWN, "anyone?").await, "not_found");
    // Retrying the refused id changes nothing.
    expect_error(&eve.gsend("e-1", &gid, "let me in").await, "forbidden");

    // carol posts (her gateway now caches the group), is removed through the other gateway,
    // and posts again at once: her gateway may still trust its cache for a moment and answer
    // `sent`, but the router re-checks at the message's position, so it must reach no one; and
    // within a bounded while her gateway answers `forbidden`.
    let before = carol.gsend_ok("c-0", &gid, "still in").await;
    alice.op_ok("group_remove", json!({"group":gid,"members":["carol"]})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut accepted_after_removal = Vec::new();
    for i in 1.. {
        let id = format!("c-{i}");
        let f = carol.gsend(&id, &gid, "after removal").await;
        if f["t"] == "error" {
            expect_error(&f, "forbidden");
            break;
        }
        assert_eq!(f["t"], "sent", "{f}");
        accepted_after_removal.push(f["sid"].as_u64().unwrap());
        assert!(tokio::time::Instant::now() < deadline, "carol's gateway still accepts her posts: {f}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("posts of the removed member answered `sent` by a stale gateway cache: {accepted_after_removal:?}");

    // A fence after all of that: the members see carol's first message and the fence, nothing
    // else; eve and carol see no message at all after the removal.
    let fence = alice.gsend_ok("a-fence", &gid, "fence").await;
    bob.wait_until(WAIT, "shown the fence", |m| m.msg_sids(&gid).contains(&fence)).await;
    alice.wait_until(WAIT, "shown carol's message", |m| m.msg_sids(&gid).contains(&before)).await;
    let mut members = [alice, bob, carol, eve];
    futures::future::join_all(members.iter_mut().map(|m| m.soak(Duration::from_millis(300)))).await;
    let [alice, bob, carol, eve] = &members;
    assert_eq!(bob.msg_sids(&gid), vec![before, fence], "{}", brief(&bob.log));
    assert_eq!(alice.msg_sids(&gid), vec![before], "{}", brief(&alice.log));
    assert!(carol.msgs(&gid).is_empty(), "{}", brief(&carol.log));
    assert!(eve.log.is_empty(), "eve was shown something: {}", brief(&eve.log));
    for m in &members {
        m.assert_no_duplicates();
    }
    if !accepted_after_removal.is_empty() {
        // The router dropped them (bounded wait for its counter).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while sys.router.metric("router_rejected_total").await < accepted_after_removal.len() as f64 {
            assert!(tokio::time::Instant::now() < deadline, "router_rejected_total below {accepted_after_removal:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// PROTOCOL.md: `gsend` is refused `forbidden` only for "not a member". Membership changes made
/// through another gateway are trusted by the member's gateway only after `GROUP_CACHE_TTL`
/// (2 s, gateway/src/bridge.rs) when it has the group cached. Starts a system where gateway 1
/// has the group (alice, bob) cached, with erin on gateway 1 too.
async fn cached_on_gateway_1() -> (System, Member, Member, Member, String) {
    let sys = System::start(2).await;
    let mut alice = Member::join(&sys, 0, "alice").await; // admin, on gateway 0
    let mut bob = Member::join(&sys, 1, "bob").await; // a member on gateway 1
    let erin = Member::join(&sys, 1, "erin").await; // not a member yet, on gateway 1
    let gid = gid_of(&alice.create("cached", &s(&["bob"])).await);
    bob.gsend_ok("b-0", &gid, "warming gateway 1's cache").await;
    (sys, alice, bob, erin, gid)
}

/// A member added through another gateway, once shown its own `added` event, can post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_member_added_through_another_gateway_can_post_once_shown_added() {
    let (_sys, mut alice, _bob, mut erin, gid) = cached_on_gateway_1().await;
    alice.op_ok("group_add", json!({"group":gid,"members":["erin"]})).await;
    erin.wait_until(WAIT, "shown her own `added` event", |m| !m.events(&gid).is_empty()).await;
    let f = erin.gsend("e-1", &gid, "hello, I'm new").await;
    assert_eq!(f["t"], "sent", "a member shown her `added` event is refused: {f}; timeline {}", brief(&erin.log));
}

/// A member removed through another gateway, once shown its own `removed` event, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_member_removed_through_another_gateway_is_refused_once_shown_removed() {
    let (_sys, mut alice, mut bob, _erin, gid) = cached_on_gateway_1().await;
    alice.op_ok("group_remove", json!({"group":gid,"members":["bob"]})).await;
    bob.wait_until(WAIT, "shown his own `removed` event", |m| m.events(&gid).len() >= 2).await;
    let f = bob.gsend("b-1", &gid, "am I still in?").await;
    expect_error(&f, "forbidden");
}
