//! Group receipts aggregated over a full-size group: 1024 members, one message; the sender gets
//! exactly one `delivered` tick once all 1023 recipients acknowledged, exactly one `read` tick
//! once all read it, and `receipts` lists who has it.

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::System;

use crate::group_kit::*;

const MEMBERS: usize = 1024;
const WAIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_receipts_aggregate_over_1024_members() {
    let t0 = Instant::now();
    let mut phases: Vec<(&str, Duration)> = Vec::new();
    let lap = |name: &'static str, phases: &mut Vec<(&str, Duration)>| {
        phases.push((name, t0.elapsed()));
        eprintln!("{name}: {:?}", t0.elapsed());
    };
    // 1024 client sockets in this process, ~512 per gateway: far below the 20,000 fd limit.
    // Members that only listen are silent for long stretches: a long heartbeat timeout keeps
    // them connected.
    let sys = System::start_with(2, &["--heartbeat-timeout-secs", "600"]).await;
    let names = users("r", MEMBERS);
    let mut members = join_all(&sys, &names, 32).await;
    lap("connected", &mut phases);

    let (sender, rest) = members.split_first_mut().unwrap();
    let group = sender.create("everyone", &names[1..]).await;
    let gid = group["gid"].as_str().unwrap().to_owned();
    assert_eq!(member_list(&group).len(), MEMBERS, "{}", group["members"].as_array().unwrap().len());
    lap("created", &mut phases);
    wait_all(rest, WAIT, "shown the group's creation", |m| !m.events(&gid).is_empty()).await;
    lap("creation fanned out", &mut phases);

    let sid = sender.gsend_ok("hello", &gid, "hello everyone").await;
    wait_all(rest, WAIT, "shown the message", |m| m.msg_sids(&gid).contains(&sid)).await;
    lap("message fanned out", &mut phases);
    for m in rest.iter() {
        let msgs = m.msgs(&gid);
        assert_eq!(msgs.len(), 1, "{}: {}", m.user, brief(&m.log));
        assert_eq!(msgs[0]["n"], MEMBERS - 1, "{}", msgs[0]);
    }

    // The cap: a 1025th member is refused.
    let f = sender.op("group_add", json!({"group":gid,"members":["r1024"]})).await;
    assert_eq!((f["t"].as_str(), f["code"].as_str()), (Some("error"), Some("limit_exceeded")), "{f}");

    // Every recipient but the last acknowledges: no tick while one is missing.
    let (last, others) = rest.split_last_mut().unwrap();
    futures::future::join_all(others.iter_mut().map(|m| m.ack_all())).await;
    let asker = &mut others[511];
    let who =
        poll_receipts(asker, &gid, sid, |r| r["delivered"].as_array().is_some_and(|d| d.len() == MEMBERS - 2)).await;
    assert!(!who["delivered"].as_array().unwrap().contains(&json!(last.user)), "{who}");
    let delivered = |m: &Member| m.group_receipts(&gid).iter().filter(|r| r["status"] == "delivered").count();
    sender.soak(Duration::from_millis(300)).await;
    assert_eq!(delivered(sender), 0, "a delivered tick before the last recipient acked: {}", brief(&sender.log));
    lap("all acks but one", &mut phases);
    // The last one acknowledges: one `delivered` tick for the sender.
    last.ack_all().await;
    sender.wait_until(WAIT, "shown the delivered tick", |m| delivered(m) >= 1).await;
    lap("delivered tick", &mut phases);

    // Who has it, asked by a member: every recipient, nobody has read it yet.
    let asker = &mut rest[511];
    let id = asker.fresh_id("rc");
    let r = asker.request(json!({"t":"receipts","id":id,"group":gid,"sid":sid})).await;
    assert_eq!(r["t"], "receipts", "{r}");
    assert_eq!((&r["group"], &r["sid"], &r["recipients"]), (&json!(gid), &json!(sid), &json!(MEMBERS - 1)), "{r}");
    let mut got: Vec<String> = serde_json::from_value(r["delivered"].clone()).unwrap();
    got.sort();
    assert_eq!(got, names[1..], "delivered lists every recipient");
    assert_eq!(r["read"], json!([]), "nobody read it yet");
    // Members only.
    let mut outsider = Member::join(&sys, 1, "outsider").await;
    let id = outsider.fresh_id("rc");
    let r = outsider.request(json!({"t":"receipts","id":id,"group":gid,"sid":sid})).await;
    assert_eq!((r["t"].as_str(), r["code"].as_str()), (Some("error"), Some("forbidden")), "{r}");
    lap("receipts query", &mut phases);

    // Every recipient but the last reads it: no tick while one is missing; then the last.
    let (last, others) = rest.split_last_mut().unwrap();
    for m in others.iter_mut() {
        m.c.send_json(&json!({"t":"read","group":gid,"up_to":sid})).await;
    }
    let who =
        poll_receipts(&mut others[3], &gid, sid, |r| r["read"].as_array().is_some_and(|d| d.len() == MEMBERS - 2))
            .await;
    assert!(!who["read"].as_array().unwrap().contains(&json!(last.user)), "{who}");
    let read = |m: &Member| m.group_receipts(&gid).iter().filter(|r| r["status"] == "read").count();
    sender.soak(Duration::from_millis(300)).await;
    assert_eq!(read(sender), 0, "a read tick before the last recipient read: {}", brief(&sender.log));
    lap("all reads but one", &mut phases);
    last.c.send_json(&json!({"t":"read","group":gid,"up_to":sid})).await;
    sender.wait_until(WAIT, "shown the read tick", |m| read(m) >= 1).await;
    lap("read tick", &mut phases);
    sender.soak(Duration::from_secs(1)).await;
    sender.assert_no_duplicates();
    let ticks = sender.group_receipts(&gid);
    let summary: Vec<(u64, &str)> = ticks.iter().map(|t| (sid_of(t), t["status"].as_str().unwrap())).collect();
    assert_eq!(summary, vec![(sid, "delivered"), (sid, "read")], "exactly one tick per status: {}", brief(&sender.log));

    let asker = &mut rest[0];
    let id = asker.fresh_id("rc");
    let r = asker.request(json!({"t":"receipts","id":id,"group":gid,"sid":sid})).await;
    let mut got: Vec<String> = serde_json::from_value(r["read"].clone()).unwrap_or_else(|_| panic!("{r}"));
    got.sort();
    assert_eq!(got, names[1..], "read lists every recipient: {r}");
    lap("done", &mut phases);
    eprintln!("phases: {phases:?}");
}

/// Asks `receipts` (paced under the operation limit) until the answer satisfies `done`.
async fn poll_receipts(
    asker: &mut Member,
    gid: &str,
    sid: u64,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let id = asker.fresh_id("rc");
        let r = asker.request(json!({"t":"receipts","id":id,"group":gid,"sid":sid})).await;
        assert_eq!(r["t"], "receipts", "{r}");
        if done(&r) {
            return r;
        }
        let counts = (r["delivered"].as_array().map(Vec::len), r["read"].as_array().map(Vec::len));
        assert!(tokio::time::Instant::now() < deadline, "receipts never got there: (delivered, read) = {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
