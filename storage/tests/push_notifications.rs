//! Push-notification events through a real nats-server and the storage binary: pushable items
//! (header `Chat-Push: 1`) stored in `inbox.<user>` for a user without a live device give events
//! on `push.<user>`, debounced per user; nothing for online users or items without the header;
//! the trailing event of a window; items stored while storage was down.
//!
//! Needs the storage binary (`cargo test -p storage` builds it) and nats-server (see testkit).
//! No assertion depends on how long anything takes: "no event" is shown by the metrics saying the
//! item was handled, then by an event for another user arriving first (events of one storage
//! process reach a subscriber in the order they were published, and items are handled in stream
//! order).

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use protocol::groups::{GatewayBeat, PresenceRecord};
use protocol::subjects;
use testkit::{NatsServer, Storage};

/// Upper bound of every wait: generous, debug builds on busy cores.
const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, PartialEq, Eq)]
struct Event {
    user: String,
    pending: u64,
    first_seq: u64,
    last_seq: u64,
}

async fn next_event(sub: &mut async_nats::Subscriber) -> (String, Event) {
    let msg = tokio::time::timeout(WAIT, sub.next()).await.expect("a push event in time").expect("subscription open");
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).expect("a JSON push event");
    assert!(v["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000), "ts in ms: {v}");
    let ev = Event {
        user: v["user"].as_str().expect("user").to_owned(),
        pending: v["pending"].as_u64().expect("pending"),
        first_seq: v["first_seq"].as_u64().expect("first_seq"),
        last_seq: v["last_seq"].as_u64().expect("last_seq"),
    };
    (msg.subject.to_string(), ev)
}

/// Stores an item in `inbox.<user>`, with `Chat-Push: <push>` when given; returns its sequence.
async fn store(js: &jetstream::Context, user: &str, push: Option<&str>) -> u64 {
    let mut m = jetstream::message::PublishMessage::build().payload(format!("{{\"for\":\"{user}\"}}").into());
    if let Some(v) = push {
        m = m.header("Chat-Push", v);
    }
    js.send_publish(format!("inbox.{user}"), m).await.expect("publishing").await.expect("stored").sequence
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
    panic!("{line_prefix}: want {want}, last {last:?}\n{}", storage.proc.log_tail());
}

/// Waits until storage's INBOX consumer exists (it starts from new items when created).
async fn wait_consumer(js: &jetstream::Context, storage: &Storage) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let stream = js.get_stream(subjects::INBOX_STREAM).await.expect("INBOX provisioned");
    while stream.consumer_info("push-notifier").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no push-notifier consumer\n{}", storage.proc.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts NATS and storage with `extra` flags, waits for storage's consumer.
async fn start(extra: &[&str]) -> (NatsServer, Storage, async_nats::Client, jetstream::Context) {
    let nats = NatsServer::start_from_env().await;
    let storage = Storage::start_on(&nats, extra).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    wait_consumer(&js, &storage).await;
    (nats, storage, client, js)
}

/// Stores a pushable item for a fresh user and returns the next event, which must be that
/// user's: every item handled before it gave no event.
async fn control(js: &jetstream::Context, sub: &mut async_nats::Subscriber, user: &str) {
    let seq = store(js, user, Some("1")).await;
    let (subject, ev) = next_event(sub).await;
    assert_eq!(subject, format!("push.{user}"), "an unexpected event before {user}'s: {ev:?}");
    assert_eq!(ev, Event { user: user.into(), pending: 1, first_seq: seq, last_seq: seq });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_users_get_one_event_per_window_online_users_and_other_items_none() {
    // A window longer than the test: no trailing events here. A presence timeout long enough
    // that a beat written now stays fresh however slow the machine is.
    let (_nats, storage, client, js) =
        start(&["--push-debounce-secs", "3600", "--push-presence-timeout-secs", "3600"]).await;
    let mut sub = client.subscribe("push.>").await.unwrap();
    client.flush().await.unwrap();

    // bob has no presence at all: one event at once.
    let s1 = store(&js, "bob", Some("1")).await;
    let (subject, ev) = next_event(&mut sub).await;
    assert_eq!(subject, "push.bob");
    assert_eq!(ev, Event { user: "bob".into(), pending: 1, first_seq: s1, last_seq: s1 });

    // More within the window: counted, no event.
    for _ in 0..3 {
        store(&js, "bob", Some("1")).await;
    }
    wait_metric(&storage, "storage_push_suppressed_total{reason=\"debounced\"}", 3).await;
    assert_eq!(metric(&storage, "storage_push_events_total").await, Some(1));
    assert_eq!(metric(&storage, "storage_push_tracked_users").await, Some(1));
    control(&js, &mut sub, "zed1").await;

    // carol is online on a gateway with a fresh beat: no event.
    let now = protocol::now_ms();
    let gateways = js.get_key_value(subjects::GATEWAYS_BUCKET).await.unwrap();
    let presence = js.get_key_value(subjects::PRESENCE_BUCKET).await.unwrap();
    gateways.put("gw1", serde_json::to_vec(&GatewayBeat { at: now }).unwrap().into()).await.unwrap();
    let online = serde_json::to_vec(&PresenceRecord { online: true, at: now }).unwrap();
    presence.put(subjects::presence_key("carol", "gw1"), online.clone().into()).await.unwrap();
    // erin is "online" on a gateway whose last beat is two hours old: a dead gateway, so offline.
    gateways.put("gw2", serde_json::to_vec(&GatewayBeat { at: now - 7_200_000 }).unwrap().into()).await.unwrap();
    presence.put(subjects::presence_key("erin", "gw2"), online.into()).await.unwrap();
    wait_metric(&storage, "storage_push_online_records", 2).await;
    wait_metric(&storage, "storage_push_gateways", 2).await;

    store(&js, "carol", Some("1")).await;
    wait_metric(&storage, "storage_push_suppressed_total{reason=\"online\"}", 1).await;
    control(&js, &mut sub, "erin").await;

    // Items without the header (receipts, copies, events...) or with another value: no event.
    store(&js, "dave", None).await;
    store(&js, "dave", Some("0")).await;
    control(&js, &mut sub, "zed2").await;

    // carol goes offline: her next item is announced.
    let offline = serde_json::to_vec(&PresenceRecord { online: false, at: now }).unwrap();
    presence.put(subjects::presence_key("carol", "gw1"), offline.into()).await.unwrap();
    wait_metric(&storage, "storage_push_online_records", 1).await;
    control(&js, &mut sub, "carol").await;

    assert_eq!(metric(&storage, "storage_push_events_total").await, Some(5));
    assert_eq!(metric(&storage, "storage_push_suppressed_total{reason=\"debounced\"}").await, Some(3));
    assert_eq!(metric(&storage, "storage_push_suppressed_total{reason=\"online\"}").await, Some(1));
    assert_eq!(metric(&storage, "storage_push_restarts_total").await, Some(0), "{}", storage.proc.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_end_with_one_event_for_what_they_counted_and_a_restart_resumes() {
    let (_nats, mut storage, client, js) = start(&["--push-debounce-secs", "1"]).await;
    let mut sub = client.subscribe("push.bob").await.unwrap();
    client.flush().await.unwrap();

    // However the items fall into windows, the events cover each item exactly once, in order.
    let mut seqs = Vec::new();
    for _ in 0..6 {
        seqs.push(store(&js, "bob", Some("1")).await);
    }
    let mut covered = 0;
    let mut events = Vec::new();
    while covered < seqs.len() {
        let (_, ev) = next_event(&mut sub).await;
        assert_eq!(ev.first_seq, seqs[covered], "events so far {events:?}");
        covered += ev.pending as usize;
        assert!(covered <= seqs.len(), "events so far {events:?}, then {ev:?}");
        assert_eq!(ev.last_seq, seqs[covered - 1], "events so far {events:?}");
        events.push(ev);
    }
    assert!(events.len() >= 2, "the first item is announced alone: {events:?}");
    assert_eq!(events[0].pending, 1);

    // Items stored while storage is down are announced once it is back (durable consumer). The
    // server must have seen the dead process go first: a pull request of the killed process
    // still open there would take the item with it (the consumer has no acks by design: at most
    // what a dying process had pulled is lost, notifier.rs).
    storage.proc.kill9();
    let stream = js.get_stream(subjects::INBOX_STREAM).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while stream.consumer_info(subjects::PUSH_NOTIFIER_CONSUMER).await.map(|i| i.num_waiting).unwrap_or(1) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the killed storage's pull requests never went away");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = store(&js, "bob", Some("1")).await;
    storage.restart().await;
    let (_, ev) = next_event(&mut sub).await;
    assert_eq!(ev, Event { user: "bob".into(), pending: 1, first_seq: s, last_seq: s });
}
