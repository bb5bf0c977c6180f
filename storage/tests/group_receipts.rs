//! Group receipts through a real nats-server and the storage binary: events on RECEIPTS in,
//! aggregate ticks in the sender's inbox and "who read" answers out, and the same answers after a
//! storage restart (rebuilt from the stream).
//!
//! Needs the storage binary (`cargo test -p storage` builds it) and nats-server (see testkit).

use std::time::Duration;

use async_nats::jetstream;
use futures::future::try_join_all;
use protocol::groups::{ReceiptEvent, WhoReadReply, WhoReadRequest};
use protocol::item::{InboxItem, ReceiptStatus};
use protocol::{subjects, ErrorCode, UserId};
use testkit::{NatsServer, Storage};

/// Upper bound of every wait: generous, debug builds on busy cores. Waits end as soon as the
/// condition holds; nothing here asserts on how long anything took.
const WAIT: Duration = Duration::from_secs(60);

const GROUP: &str = "grp1";
const SID: u64 = 17;

async fn publish_all(js: &jetstream::Context, events: &[ReceiptEvent]) {
    let mut acks = Vec::with_capacity(events.len());
    for ev in events {
        let group = match ev {
            ReceiptEvent::Sent { group, .. }
            | ReceiptEvent::Delivered { group, .. }
            | ReceiptEvent::Read { group, .. } => group,
        };
        let payload = serde_json::to_vec(ev).unwrap();
        acks.push(js.publish(subjects::receipts(group), payload.into()).await.expect("publishing an event"));
    }
    try_join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await.expect("events stored");
}

async fn who_read(client: &async_nats::Client, sid: u64) -> Option<WhoReadReply> {
    let req = WhoReadRequest { by: "alice".into(), group: GROUP.into(), sid };
    let fut = client.request(subjects::RECEIPT_QUERY_SERVICE, serde_json::to_vec(&req).unwrap().into());
    // No responder yet (storage restarting) or a slow answer: the caller asks again.
    let msg = tokio::time::timeout(Duration::from_secs(5), fut).await.ok()?.ok()?;
    Some(serde_json::from_slice(&msg.payload).expect("a WhoReadReply"))
}

/// Asks until the answer is `Receipts` satisfying `ok`; panics with the last answer otherwise.
async fn wait_receipts(client: &async_nats::Client, what: &str, ok: impl Fn(usize, &[String], &[String]) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        last = who_read(client, SID).await;
        if let Some(WhoReadReply::Receipts { recipients, delivered, read }) = &last {
            if ok(*recipients, delivered, read) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: last answer {last:?}");
}

/// The group receipts stored in `user`'s inbox, oldest first.
async fn group_receipts(client: &async_nats::Client, user: &str) -> Vec<(String, u64, ReceiptStatus)> {
    let user = UserId::parse(user).unwrap();
    let items = bus::inbox::fetch_after(client, &user, 0, 1000).await.expect("reading the inbox");
    items
        .iter()
        .filter_map(|i| match InboxItem::from_bytes(&i.payload).expect("an inbox item") {
            InboxItem::GroupReceipt { group, sid, status, .. } => Some((group, sid, status)),
            _ => None,
        })
        .collect()
}

async fn wait_inbox(client: &async_nats::Client, want: &[(String, u64, ReceiptStatus)]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    while tokio::time::Instant::now() < deadline {
        got = group_receipts(client, "alice").await;
        if got.len() >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got, want, "alice's group receipts");
}

async fn metric(storage: &Storage, line_prefix: &str) -> Option<u64> {
    let (_, text) = testkit::http_get(&storage.metrics_url()).await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
}

async fn wait_metric(storage: &Storage, line_prefix: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        last = metric(storage, line_prefix).await;
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{line_prefix}: want {want}, last {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_receipts_aggregate_and_survive_a_restart() {
    let nats = NatsServer::start_from_env().await;
    // A long duplicate window, so the ticks a restart re-emits are recognised however slow the
    // machine is (the default is two minutes).
    let mut storage = Storage::start_on(&nats, &["--duplicate-window-secs", "3600"]).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());

    // Zero-padded, so the sorted lists in the answers are in index order.
    let members: Vec<String> = (0..1024).map(|i| format!("member{i:04}")).collect();
    let sent =
        ReceiptEvent::Sent { group: GROUP.into(), sid: SID, sender: "alice".into(), recipients: members.clone() };
    let delivered = |m: &String| ReceiptEvent::Delivered { group: GROUP.into(), by: m.clone(), up_to: SID };
    let read = |m: &String| ReceiptEvent::Read { group: GROUP.into(), by: m.clone(), up_to: SID + 3 };

    publish_all(&js, &[sent]).await;
    wait_receipts(&client, "the message is known", |n, d, r| n == 1024 && d.is_empty() && r.is_empty()).await;

    // Everyone but the last member has it: no tick yet.
    publish_all(&js, &members[..1023].iter().map(delivered).collect::<Vec<_>>()).await;
    wait_receipts(&client, "1023 delivered", |_, d, _| d.len() == 1023).await;
    assert_eq!(group_receipts(&client, "alice").await, vec![]);

    let d_tick = (GROUP.to_owned(), SID, ReceiptStatus::Delivered);
    let r_tick = (GROUP.to_owned(), SID, ReceiptStatus::Read);
    publish_all(&js, &[delivered(&members[1023])]).await;
    wait_inbox(&client, std::slice::from_ref(&d_tick)).await;
    wait_receipts(&client, "all delivered, none read", |_, d, r| d == members.as_slice() && r.is_empty()).await;

    // Reads (cumulative past the message); repeats from a second device change nothing.
    publish_all(&js, &members.iter().map(read).collect::<Vec<_>>()).await;
    publish_all(&js, &members[..10].iter().map(read).collect::<Vec<_>>()).await;
    wait_receipts(&client, "everyone read", |n, d, r| n == 1024 && d == members.as_slice() && r == members.as_slice())
        .await;
    wait_inbox(&client, &[d_tick.clone(), r_tick.clone()]).await;
    wait_metric(&storage, "storage_group_receipts_emitted_total{status=\"delivered\"}", 1).await;
    wait_metric(&storage, "storage_group_receipts_emitted_total{status=\"read\"}", 1).await;
    assert_eq!(metric(&storage, "storage_receipt_entries").await, Some(0));
    assert_eq!(metric(&storage, "storage_receipt_events_total{kind=\"sent\"}").await, Some(1));
    assert_eq!(metric(&storage, "storage_receipt_events_total{kind=\"delivered\"}").await, Some(1024));
    assert_eq!(metric(&storage, "storage_receipt_events_total{kind=\"read\"}").await, Some(1034));
    assert!(matches!(who_read(&client, SID + 1).await, Some(WhoReadReply::Error { code: ErrorCode::NotFound, .. })));

    // A restart rebuilds the book from the stream: the same answer, and the ticks it re-emits
    // are dropped as duplicates, so alice still has exactly one of each.
    storage.restart().await;
    wait_receipts(&client, "everyone read, after a restart", |n, d, r| {
        n == 1024 && d == members.as_slice() && r == members.as_slice()
    })
    .await;
    wait_metric(&storage, "storage_group_receipt_duplicates_total", 2).await;
    wait_metric(&storage, "storage_receipt_events_total{kind=\"read\"}", 1034).await;
    assert_eq!(group_receipts(&client, "alice").await, vec![d_tick, r_tick]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_receipts_are_rebuilt_after_a_restart() {
    let nats = NatsServer::start_from_env().await;
    let mut storage = Storage::start_on(&nats, &["--duplicate-window-secs", "3600"]).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());

    // Zero-padded, so the sorted lists in the answers are in index order.
    let members: Vec<String> = (0..50).map(|i| format!("m{i:02}")).collect();
    let sent =
        ReceiptEvent::Sent { group: GROUP.into(), sid: SID, sender: "alice".into(), recipients: members.clone() };
    let mut events = vec![sent];
    events.extend(members.iter().map(|m| ReceiptEvent::Delivered { group: GROUP.into(), by: m.clone(), up_to: SID }));
    // Half of them read before the restart.
    events.extend(members[..25].iter().map(|m| ReceiptEvent::Read { group: GROUP.into(), by: m.clone(), up_to: SID }));
    publish_all(&js, &events).await;
    let d_tick = (GROUP.to_owned(), SID, ReceiptStatus::Delivered);
    wait_inbox(&client, std::slice::from_ref(&d_tick)).await;
    wait_receipts(&client, "25 read", |_, d, r| d.len() == 50 && r.len() == 25).await;

    storage.restart().await;
    wait_receipts(&client, "25 read, after a restart", |_, d, r| d.len() == 50 && r == &members[..25]).await;
    let reads: Vec<_> =
        members[25..].iter().map(|m| ReceiptEvent::Read { group: GROUP.into(), by: m.clone(), up_to: SID }).collect();
    publish_all(&js, &reads).await;
    wait_inbox(&client, &[d_tick, (GROUP.to_owned(), SID, ReceiptStatus::Read)]).await;
    wait_receipts(&client, "everyone read", |n, _, r| n == 50 && r == members.as_slice()).await;
    // The restarted process re-emitted the delivered tick (a duplicate) and emitted the read one.
    wait_metric(&storage, "storage_group_receipt_duplicates_total", 1).await;
    wait_metric(&storage, "storage_group_receipts_emitted_total{status=\"read\"}", 1).await;
    assert_eq!(group_receipts(&client, "alice").await.len(), 2);
}
