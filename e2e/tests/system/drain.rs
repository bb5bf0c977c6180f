//! SIGTERM: the gateway drains its clients, stops being ready, exits 0, and loses nothing it
//! acknowledged.

use std::time::Duration;

use testkit::{http_get, Event, System};

use crate::{chat, seq, sid};

#[tokio::test]
async fn sigterm_drains_clients_and_keeps_what_was_acknowledged() {
    let mut sys = System::start(2).await;
    // bob has been here before, and is away now.
    let mut bob = sys.connect(1, "bob", "phone").await;
    bob.sync().await;
    bob.close().await;

    let mut alice = sys.connect(0, "alice", "web").await;
    alice.sync().await;
    alice.timeout = Duration::from_secs(30);
    let sent = alice.send_chat_ok("c-1", "bob", "sent before the drain").await;

    let readyz = sys.gateways[0].readyz_url();
    let gw = &mut sys.gateways[0];
    let client_side = async {
        // `reconnect`, then the close with 1001.
        let reconnect = match alice.next_event(Duration::from_secs(30)).await {
            Event::Frame(f) if f["t"] == "reconnect" => f,
            Event::Frame(f) => panic!("unexpected frame while draining: {f}"),
            Event::Closed(code) => panic!("closed ({code:?}) without a `reconnect` frame"),
            Event::Timeout => panic!("no `reconnect` within 30 s of SIGTERM"),
        };
        let code = alice.wait_closed(Duration::from_secs(30)).await;
        // Not ready any more: 503, or no answer at all once the process is gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let readiness = loop {
            match http_get(&readyz).await {
                Ok((503, _)) => break "503".to_string(),
                Err(_) => break "gone".to_string(),
                Ok((200, _)) => {}
                Ok((status, body)) => break format!("unexpected {status}: {body}"),
            }
            assert!(tokio::time::Instant::now() < deadline, "{readyz} still 200 after 30 s of draining");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (reconnect, code, readiness)
    };
    let (status, (reconnect, code, readiness)) = tokio::join!(gw.terminate(), client_side);
    assert_eq!(reconnect["t"], "reconnect", "{reconnect}");
    assert!(reconnect["reason"].is_string(), "{reconnect}");
    assert_eq!(code, Some(1001), "close code after `reconnect`");
    assert!(readiness == "503" || readiness == "gone", "/readyz while draining: {readiness}");
    let log = sys.gateways[0].proc.log_tail();
    let status = status.unwrap_or_else(|| panic!("the gateway did not exit within 30 s of SIGTERM\n{log}"));
    assert!(status.success(), "gateway exit status after SIGTERM: {status}\n{log}");

    // What alice had `sent` reaches bob, through the other gateway.
    let mut bob = sys.connect(1, "bob", "phone").await;
    let synced = bob.sync().await;
    assert_eq!(synced.items.len(), 1, "{:?}", synced.items);
    assert_eq!(seq(&synced.items[0]), sid(&sent));
    assert_eq!(chat(&synced.items[0])["body"], "sent before the drain");
}
