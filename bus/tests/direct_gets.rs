//! `bus::inbox::DirectGets` (batched direct gets over one shared reply subscription) against a
//! real nats-server, with the system's authorization on and the gateway's identity: what it reads
//! must be what the per-call `fetch_after` / `kv_last_values` read, each request must get its
//! own replies when many run at once, and failures must come back as errors.

use bus::inbox::{self, DirectGets};
use bus::Role;
use protocol::{subjects, UserId};
use testkit::NatsServer;

async fn provisioned() -> (NatsServer, async_nats::Client, async_nats::jetstream::Context) {
    let server = NatsServer::start_with_auth().await;
    let js = server.jetstream().await;
    bus::provision(&js, &bus::StreamSettings::default()).await.expect("provisioning");
    let gateway = server.client_as(Role::Gateway).await;
    (server, gateway, js)
}

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("a valid user id")
}

/// Stores `n` items in `user`'s inbox; returns their sequences.
async fn store(js: &async_nats::jetstream::Context, user: &UserId, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        let ack = js.publish(subjects::inbox(user), format!("{user} {i}").into()).await.expect("publish");
        seqs.push(ack.await.expect("stored").sequence);
    }
    seqs
}

#[tokio::test]
async fn inbox_reads_match_the_per_call_reads() {
    let (server, gateway, js) = provisioned().await;
    let (alice, bob) = (user("alice"), user("bob"));
    let a = store(&js, &alice, 5).await;
    store(&js, &bob, 3).await;
    let a2 = store(&js, &alice, 2).await;
    let alice_all: Vec<u64> = a.iter().chain(&a2).copied().collect();

    let direct = DirectGets::new(&gateway).await.expect("reply subscription");
    let shared = direct.fetch_after(&alice, 0, 100).await.expect("shared read");
    let single = inbox::fetch_after(&gateway, &alice, 0, 100).await.expect("per-call read");
    assert_eq!(shared.iter().map(|i| i.seq).collect::<Vec<_>>(), alice_all);
    assert_eq!(single.iter().map(|i| i.seq).collect::<Vec<_>>(), alice_all);
    assert_eq!(shared[0].payload, "alice 0");
    assert_eq!(shared.last().unwrap().payload, "alice 1");

    // A batch stops at `max`; reading on from its last item returns the rest, then nothing.
    let first = direct.fetch_after(&alice, 0, 3).await.expect("first batch");
    assert_eq!(first.iter().map(|i| i.seq).collect::<Vec<_>>(), alice_all[..3]);
    let rest = direct.fetch_after(&alice, first[2].seq, 100).await.expect("rest");
    assert_eq!(rest.iter().map(|i| i.seq).collect::<Vec<_>>(), alice_all[3..]);
    assert!(direct.fetch_after(&alice, *alice_all.last().unwrap(), 100).await.expect("past the end").is_empty());
    assert!(direct.fetch_after(&user("carol"), 0, 100).await.expect("empty inbox").is_empty());
    assert!(server.violations().is_empty(), "refused: {:?}", server.violations());
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_replies() {
    let (server, gateway, js) = provisioned().await;
    let users: Vec<UserId> = (0..20).map(|i| user(&format!("user{i}"))).collect();
    let mut expected = Vec::new();
    for (i, u) in users.iter().enumerate() {
        expected.push(store(&js, u, i % 4).await);
    }
    let direct = DirectGets::new(&gateway).await.expect("reply subscription");
    // Every user read five times over, all at once.
    let reads = (0..5).flat_map(|_| users.iter().enumerate()).map(|(i, u)| {
        let direct = direct.clone();
        async move { (i, direct.fetch_after(u, 0, 100).await) }
    });
    for (i, got) in futures::future::join_all(reads).await {
        let got = got.expect("read");
        assert_eq!(got.iter().map(|it| it.seq).collect::<Vec<_>>(), expected[i], "user{i}");
        assert!(got.iter().all(|it| it.payload.starts_with(format!("user{i} ").as_bytes())), "user{i}");
    }
    assert!(server.violations().is_empty(), "refused: {:?}", server.violations());
}

#[tokio::test]
async fn kv_listing_leaves_out_deleted_keys_like_the_per_call_read() {
    let (server, gateway, js) = provisioned().await;
    let kv = js.get_key_value(subjects::CURSORS_BUCKET).await.expect("cursors bucket");
    kv.put("bob.phone", "42".into()).await.expect("put");
    kv.put("bob.laptop", "7".into()).await.expect("put");
    kv.put("bob.tablet", "3".into()).await.expect("put");
    kv.put("bobby.phone", "9".into()).await.expect("put");
    kv.delete("bob.tablet").await.expect("delete");
    let direct = DirectGets::new(&gateway).await.expect("reply subscription");
    let mut shared = direct.kv_last_values(subjects::CURSORS_BUCKET, "bob.*", 1024).await.expect("shared listing");
    let mut single = inbox::kv_last_values(&gateway, subjects::CURSORS_BUCKET, "bob.*", 1024).await.expect("listing");
    shared.sort();
    single.sort();
    let want =
        vec![("bob.laptop".to_owned(), bytes::Bytes::from("7")), ("bob.phone".to_owned(), bytes::Bytes::from("42"))];
    assert_eq!(shared, want);
    assert_eq!(single, want);
    assert!(direct.kv_last_values(subjects::CURSORS_BUCKET, "nobody.*", 1024).await.expect("empty").is_empty());
    assert!(server.violations().is_empty(), "refused: {:?}", server.violations());
}

#[tokio::test]
async fn a_failed_request_is_an_error_and_the_next_one_still_works() {
    let (server, gateway, js) = provisioned().await;
    let alice = user("alice");
    let seqs = store(&js, &alice, 2).await;
    let direct = DirectGets::new(&gateway).await.expect("reply subscription");
    // A request the server refuses (both a sequence and a last-per-subject read).
    let bad = serde_json::json!({ "seq": 1, "last_by_subj": "inbox.alice", "batch": 10 });
    let err = direct.batch(subjects::INBOX_STREAM, bad, 10).await.expect_err("a refused request");
    assert!(format!("{err:#}").contains("direct get failed"), "{err:#}");
    let got = direct.fetch_after(&alice, 0, 10).await.expect("read after a failure");
    assert_eq!(got.iter().map(|i| i.seq).collect::<Vec<_>>(), seqs);
    drop(server);
}
