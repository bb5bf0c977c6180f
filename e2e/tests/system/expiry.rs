//! Undelivered messages are kept up to the inbox max age and then dropped, counted by
//! `storage_inbox_expired_undelivered_total` (short ages here; 30 days by default).

use std::time::Duration;

use testkit::{Gateway, NatsServer, Router, Storage, WsClient};

#[tokio::test]
async fn undelivered_messages_expire_at_the_inbox_max_age_and_are_counted() {
    let nats = NatsServer::start_from_env().await;
    // JetStream wants the duplicate window within every stream's max age.
    let storage = Storage::start_on(
        &nats,
        &["--inbox-max-age-secs", "3", "--duplicate-window-secs", "1", "--group-max-age-secs", "60"],
    )
    .await;
    let _router = Router::start_on(&nats, &[]).await;
    let secret = "expiry-test-secret-0123456789";
    let gw = Gateway::start_on(&nats, secret, &[]).await;
    let keys = protocol::TokenKeys::hs256(secret.as_bytes(), 5);

    let mut alice = WsClient::open(&gw.ws_url(), &keys.mint("alice", Some("web"), 3600), None, None).await;
    alice.sync().await;
    for i in 0..3 {
        alice.send_chat_ok(&format!("x{i}"), "bob", "you will never read this").await;
    }

    // Nobody reads bob's inbox; after the max age the stream drops the messages and storage
    // counts them (its stats run every 5 s).
    let metrics = storage.metrics_url();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let expired = loop {
        let (_, text) = testkit::http_get(&metrics).await.expect("storage metrics");
        let v: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("storage_inbox_expired_undelivered_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        if v >= 3.0 || tokio::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(expired, 3.0, "three undelivered messages expired");

    let mut bob = WsClient::open(&gw.ws_url(), &keys.mint("bob", Some("phone"), 3600), None, None).await;
    let synced = bob.sync().await;
    assert!(synced.items.is_empty(), "expired messages are gone: {:?}", synced.items);
}
