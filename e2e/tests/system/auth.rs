//! The handshake: tokens and ids are checked before any socket is opened.

use protocol::{Claims, TokenKeys};
use testkit::{System, WsClient};

#[tokio::test]
async fn bad_tokens_are_refused_with_401() {
    let sys = System::start(1).await;
    let url = sys.ws_url(0);
    let forged = TokenKeys::hs256(b"not the gateway's secret", 0).mint("alice", Some("web"), 3600);
    let expired = sys.keys().mint_claims(&Claims {
        sub: "alice".into(),
        exp: protocol::now_ms() / 1000 - 3600, // far beyond any clock-skew allowance
        iat: None,
        dev: Some("web".into()),
    });
    for (what, token) in
        [("missing", ""), ("garbage", "not-a-jwt"), ("forged", forged.as_str()), ("expired", expired.as_str())]
    {
        let res = WsClient::connect(&url, token, Some("web"), None).await;
        assert_eq!(res.err(), Some(401), "{what} token in the query");
        if !token.is_empty() {
            let res = WsClient::connect_request(&url, Some(token)).await;
            assert_eq!(res.err(), Some(401), "{what} token in the Authorization header");
        }
    }

    // The right token opens a socket, in the query or the header.
    let token = sys.token("alice", Some("web"));
    let mut c = WsClient::open(&url, &token, None, None).await;
    assert_eq!(c.expect_type("hello").await["user"], "alice");
    let mut c = WsClient::connect_request(&url, Some(&token)).await.expect("bearer token accepted");
    assert_eq!(c.expect_type("hello").await["device"], "web");
}

#[tokio::test]
async fn device_comes_from_the_token_or_the_query_and_bad_ids_get_400() {
    let sys = System::start(1).await;
    let url = sys.ws_url(0);
    let no_dev = sys.token("alice", None);

    let mut c = WsClient::open(&url, &no_dev, Some("tablet"), None).await;
    assert_eq!(c.expect_type("hello").await["device"], "tablet");
    let mut c = WsClient::open(&url, &no_dev, None, None).await;
    assert_eq!(c.expect_type("hello").await["device"], "default");
    // The token's device wins over the query's.
    let mut c = WsClient::open(&url, &sys.token("alice", Some("web")), Some("tablet"), None).await;
    assert_eq!(c.expect_type("hello").await["device"], "web");

    for bad in ["bad.device", &"d".repeat(33)] {
        let res = WsClient::connect(&url, &no_dev, Some(bad), None).await;
        assert_eq!(res.err(), Some(400), "device {bad:?}");
    }
    let res = WsClient::connect(&url, &sys.token("bad.user", None), None, None).await;
    assert!(matches!(res.err(), Some(400 | 401)), "a token whose subject is not a valid user id is refused");
}
