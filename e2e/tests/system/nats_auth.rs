//! The system under the generated NATS authorization (`bus::auth`, `chatctl nats-config`): every
//! service connects with its own role's nkey and may use only its role's subjects.
//!
//! * the main flows work, and the server refuses nothing along the way (any permission violation
//!   in the nats-server log fails the test, naming the subject);
//! * with the gateway's identity, administering streams, touching the router's consumers,
//!   purging inboxes, forging membership and reading the JetStream API are refused by the server;
//!   with storage's and the router's identities their own operations work;
//! * a service with unknown credentials (or another role's) says so in its log and never reports
//!   ready.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt as _;
use serde_json::{json, Value};
use testkit::{Gateway, NatsServer, Role, Router, Storage, System};

use crate::group_kit::Member;
use crate::{chat, seq, sid, wait_purged};

const WAIT: Duration = Duration::from_secs(30);

/// Fails with the server's refusals, if it refused anything.
fn assert_no_violations(nats: &NatsServer) {
    let v = nats.violations();
    assert!(v.is_empty(), "nats-server refused {} operation(s):\n{}", v.len(), v.join("\n"));
}

/// Waits (bounded) until the server log has a violation line mentioning `needle`.
async fn wait_violation(nats: &NatsServer, needle: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !nats.violations().iter().any(|l| l.contains(needle)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no violation about {needle} in the server log; violations: {:#?}",
            nats.violations()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_works_with_each_service_on_its_own_credentials() {
    let sys = System::start_with_auth(2, &[]).await;
    let mut ga = Member::join(&sys, 0, "alice").await;
    let mut gb = Member::join(&sys, 1, "bob").await;
    let (alice, bob) = (&mut ga.c, &mut gb.c);

    // Presence: alice follows bob (presence.bob) and asks: bob is online (KV presence, gateway
    // beats, batched direct gets).
    alice.send_json(&json!({"t":"presence_sub","users":["bob"]})).await;
    alice.send_json(&json!({"t":"presence","id":"p1","users":["bob"]})).await;
    let p = alice.recv_until(|f| f["t"] == "presence" && f["id"] == "p1").await;
    assert_eq!(p["users"][0]["online"], true, "{p}");
    // Typing: an ephemeral frame through live.<user>.
    alice.send_json(&json!({"t":"typing","conv":"bob"})).await;
    assert_eq!(bob.expect_type("typing").await["from"], "alice");

    // 1:1 delivery, the delivered receipt, and the purge once bob acknowledged.
    let sent = alice.send_chat_ok("c-1", "bob", "hello under auth").await;
    let msg = bob.recv_until(|f| f["t"] == "msg" && f["m"]["k"] == "chat").await;
    assert_eq!(chat(&msg)["body"], "hello under auth");
    assert_eq!(seq(&msg), sid(&sent));
    bob.ack(seq(&msg)).await;
    let r = alice.recv_until(|f| f["t"] == "msg" && f["m"]["k"] == "receipt").await;
    assert_eq!((&r["m"]["status"], &r["m"]["up_to"]), (&json!("delivered"), &json!(sid(&sent))), "{r}");
    let inbox = sys.nats.jetstream().await.get_stream("INBOX").await.expect("INBOX");
    wait_purged(&inbox, seq(&msg), WAIT).await;

    // Offline delivery: carol drains her inbox on connect.
    alice.send_chat_ok("c-2", "carol", "for later").await;
    let mut carol = sys.connect(0, "carol", "tablet").await;
    let synced = carol.sync().await;
    assert_eq!(synced.items.iter().map(|f| chat(f)["body"].clone()).collect::<Vec<_>>(), [json!("for later")]);
    drop(carol);

    // A group (router: svc.groups, KV, fan-out consumers), its fan-out, and the group receipts
    // (storage: RECEIPTS, svc.receipts).
    let group = ga.create("auth", &["bob".to_owned()]).await;
    let gid = group["gid"].as_str().unwrap().to_owned();
    let gsid = ga.gsend_ok("g-1", &gid, "hello group").await;
    gb.wait_until(WAIT, "shown the group message", |m| m.msg_sids(&gid).contains(&gsid)).await;
    gb.ack_all().await;
    ga.wait_until(WAIT, "shown the delivered tick", |m| {
        m.group_receipts(&gid).iter().any(|r| r["status"] == "delivered")
    })
    .await;
    let id = ga.fresh_id("rc");
    let who = ga.request(json!({"t":"receipts","id":id,"group":gid,"sid":gsid})).await;
    assert_eq!(who["delivered"], json!(["bob"]), "{who}");

    // History: bob opts in (KV settings); storage moves delivered items to HISTORY; bob pages it.
    let h = gb.request(json!({"t":"settings","id":"s1","history_days":7})).await;
    assert_eq!(h["history_days"], 7, "{h}");
    ga.c.send_chat_ok("c-3", "bob", "keep me").await;
    gb.wait_until(WAIT, "shown c-3", |m| m.log.iter().any(|f| f["m"]["id"] == "c-3")).await;
    gb.ack_all().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let id = gb.fresh_id("h");
        let page = gb.request(json!({"t":"history","id":id,"conv":"alice","limit":10})).await;
        let bodies: Vec<&Value> =
            page["items"].as_array().map(|i| i.iter().map(|i| &i["m"]["body"]).collect()).unwrap_or_default();
        if bodies.contains(&&json!("keep me")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "c-3 never reached bob's history: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Push: a message for a user who never connected makes storage publish push.dave, which the
    // push role may read.
    let push = sys.nats.client_as(Role::Push).await;
    let mut pushes = push.subscribe("push.>").await.expect("subscribe push.>");
    push.flush().await.expect("flush");
    ga.c.send_chat_ok("c-4", "dave", "wake up").await;
    let ev = tokio::time::timeout(WAIT, pushes.next()).await.expect("a push event").expect("subscription open");
    assert_eq!(ev.subject.as_str(), "push.dave");

    // Revocation with the admin identity (chatctl): bob's session is closed.
    let admin_key = sys.nats.auth().unwrap().nkey_file(Role::Admin);
    let out = tokio::process::Command::new(testkit::bin_path("chatctl"))
        .args(["--nats-url", &sys.nats_url(), "--nats-nkey-file", &admin_key.display().to_string()])
        .args(["revoke", "--user", "bob"])
        .output()
        .await
        .expect("running chatctl");
    assert!(out.status.success(), "chatctl revoke: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(gb.c.wait_closed(WAIT).await, Some(1008), "bob's session closed by the revocation");
    // ... and alice, following bob, is told he is offline.
    let off =
        ga.c.recv_until(|f| f["t"] == "presence" && f.get("id").is_none() && f["users"][0]["online"] == false).await;
    assert_eq!(off["users"][0]["user"], "bob", "{off}");

    assert_no_violations(&sys.nats);
}

/// A JetStream context of `client` that gives up quickly: a refused request gets no answer.
fn quick_js(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_may_do_its_own_job_and_no_other() {
    let mut nats = NatsServer::start_with_auth().await;
    let _storage = Storage::start_on(&nats, &[]).await;
    let _router = Router::start_on(&nats, &[]).await;
    assert_no_violations(&nats);
    nats.expect_violations();

    // The gateway's identity: every administrative operation is refused by the server.
    let gw = quick_js(nats.client_as(Role::Gateway).await);
    let evil = stream::Config { name: "EVIL".into(), subjects: vec!["evil.>".into()], ..Default::default() };
    let inbox = gw.get_stream("INBOX").await.expect("the gateway may read INBOX's info");
    let groups = gw.get_stream("GROUPS").await.expect("the gateway may read GROUPS' info");
    let (create, delete, purge, drop_consumer, new_consumer, forge) = tokio::join!(
        gw.create_stream(evil),
        gw.delete_stream("INBOX"),
        async { inbox.purge().await },
        groups.delete_consumer("fanout-p0"),
        groups.create_consumer(pull::Config { durable_name: Some("evil".into()), ..Default::default() }),
        async {
            match gw.publish("$KV.groups.g1", "{}".into()).await {
                Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        },
    );
    assert!(create.is_err() && delete.is_err() && purge.is_err(), "stream administration went through");
    assert!(drop_consumer.is_err() && new_consumer.is_err(), "the router's consumers were touched");
    assert!(forge.is_err(), "a membership write went through");
    let gw_client = gw.client();
    let _spy = gw_client.subscribe("$JS.API.>").await.expect("the subscribe is sent");
    gw_client.flush().await.expect("flush");
    for subject in [
        "$JS.API.STREAM.CREATE.EVIL",
        "$JS.API.STREAM.DELETE.INBOX",
        "$JS.API.STREAM.PURGE.INBOX",
        "$JS.API.CONSUMER.DELETE.GROUPS.fanout-p0",
        "$JS.API.CONSUMER.CREATE.GROUPS.evil",
        "$KV.groups.g1",
    ] {
        wait_violation(&nats, &format!("\"{subject}\"")).await;
    }
    wait_violation(&nats, "Subscription Violation").await;

    // Nothing changed: INBOX is there, the router's consumers too, no EVIL stream.
    let js = nats.jetstream().await;
    js.get_stream("INBOX").await.expect("INBOX still exists");
    assert!(js.get_stream("EVIL").await.is_err());
    let groups = js.get_stream("GROUPS").await.expect("GROUPS");
    groups.consumer_info("fanout-p0").await.expect("the router's consumer still exists");
    assert!(groups.consumer_info("evil").await.is_err());

    // Storage's identity: provisioning and purges work; the router's consumers are out of reach.
    let st = quick_js(nats.client_as(Role::Storage).await);
    st.create_or_update_stream(bus::streams::inbox_stream(&bus::StreamSettings::default()))
        .await
        .expect("storage updates INBOX");
    let st_inbox = st.get_stream("INBOX").await.expect("INBOX");
    st_inbox.purge().filter("inbox.nobody").await.expect("storage purges an inbox");
    let st_groups = st.get_stream("GROUPS").await.expect("GROUPS");
    assert!(st_groups.delete_consumer("fanout-p1").await.is_err());
    wait_violation(&nats, "\"$JS.API.CONSUMER.DELETE.GROUPS.fanout-p1\"").await;

    // The router's identity: its consumers, yes; purging inboxes, no.
    let rt = quick_js(nats.client_as(Role::Router).await);
    let rt_groups = rt.get_stream("GROUPS").await.expect("GROUPS");
    rt_groups
        .create_consumer(pull::Config { durable_name: Some("fanout-test".into()), ..Default::default() })
        .await
        .expect("the router creates a GROUPS consumer");
    rt_groups.delete_consumer("fanout-test").await.expect("the router deletes a GROUPS consumer");
    assert!(rt.get_stream("INBOX").await.expect("INBOX").purge().await.is_err());
    wait_violation(&nats, "Publish Violation").await;
    let purges: Vec<String> =
        nats.violations().into_iter().filter(|l| l.contains("\"$JS.API.STREAM.PURGE.INBOX\"")).collect();
    assert_eq!(purges.len(), 2, "the gateway's and the router's purges, and only those: {purges:#?}");

    // The bench identity (loadgen baseline) may create and delete streams, but in an account of
    // its own: the chat's streams do not exist there.
    let bench = quick_js(nats.client_as(Role::Bench).await);
    assert!(bench.get_stream("INBOX").await.is_err(), "the bench account sees INBOX");
    let scratch = stream::Config { name: "LGBASE_T".into(), subjects: vec!["lgbase.t.*".into()], ..Default::default() };
    bench.create_stream(scratch).await.expect("bench creates a scratch stream");
    assert!(js.get_stream("LGBASE_T").await.is_err(), "the scratch stream is in the chat's account");
    bench.delete_stream("LGBASE_T").await.expect("bench deletes it");
}

/// Waits until `proc`'s log contains `needle` (bounded).
async fn wait_log(proc: &testkit::Proc, needle: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !proc.logs().contains(needle) {
        assert!(tokio::time::Instant::now() < deadline, "{} never logged {needle:?}\n{}", proc.name(), proc.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_not_ready(readyz: &str) {
    if let Ok((200, body)) = testkit::http_get(readyz).await {
        panic!("{readyz} says ready: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_reported_and_never_ready() {
    let mut nats = NatsServer::start_with_auth().await;
    nats.expect_violations();
    let dir = tempfile::tempdir().unwrap();

    // An identity the server does not know: the connection is refused.
    let stranger = bus::auth::Identity::generate(Role::Storage).unwrap();
    let stranger_file = dir.path().join("stranger.nk");
    std::fs::write(&stranger_file, stranger.seed()).unwrap();
    let args =
        vec!["--nats-url".to_owned(), nats.url(), "--nats-nkey-file".to_owned(), stranger_file.display().to_string()];
    let storage = Storage::spawn(&args, &[]);
    wait_log(&storage.proc, "NATS refused this service's credentials").await;
    assert_not_ready(&storage.readyz_url()).await;
    wait_violation(&nats, &format!("authentication error - Nkey \"{}\"", stranger.public_key)).await;

    // A known identity of the wrong role (push for the router): connected, but refused every
    // operation, and never ready.
    let push_key = nats.auth().unwrap().nkey_file(Role::Push);
    let args = vec!["--nats-url".to_owned(), nats.url(), "--nats-nkey-file".to_owned(), push_key.display().to_string()];
    let router = Router::spawn(&args, &[]);
    wait_log(&router.proc, "its NATS permissions do not cover it").await;
    assert_not_ready(&router.readyz_url()).await;

    // A gateway with no credentials at all on a server that requires them.
    let gateway = Gateway::spawn(&["--nats-url".to_owned(), nats.url()], "a-secret-of-16-bytes", &[]);
    wait_log(&gateway.proc, "NATS refused this service's credentials").await;
    assert_not_ready(&gateway.readyz_url()).await;

    // A seed file that is not one: the service exits at once, naming the file.
    let junk = dir.path().join("junk.nk");
    std::fs::write(&junk, "not a seed").unwrap();
    let args = vec!["--nats-url".to_owned(), nats.url(), "--nats-nkey-file".to_owned(), junk.display().to_string()];
    let mut bad = Storage::spawn(&args, &[]);
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = bad.proc.try_status() {
            break st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "storage kept running with a junk seed\n{}",
            bad.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    assert!(bad.proc.logs().contains(&junk.display().to_string()), "{}", bad.proc.log_tail());
}
