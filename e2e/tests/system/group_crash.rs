//! The router killed (`kill -9`) in the middle of a group fan-out: after its restart every
//! member has every message exactly once, in order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testkit::System;

use crate::group_kit::*;

/// Members of the group (the sender among them); connections alternate between 2 gateways.
const MEMBERS: usize = 200;
const MESSAGES: usize = 20;
const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_router_kill9_mid_fanout_delivers_every_message_once_in_order() {
    let t0 = Instant::now();
    // Members that only listen send nothing for long stretches: a long heartbeat timeout keeps
    // the test about the router, not about idle clients.
    let mut sys = System::start_with(2, &["--heartbeat-timeout-secs", "600"]).await;
    let names = users("m", MEMBERS);
    let mut members = join_all(&sys, &names, 16).await;
    let t_joined = t0.elapsed();
    let (sender, rest) = members.split_first_mut().unwrap();
    let group = sender.create("crowd", &names[1..]).await;
    let gid = group["gid"].as_str().unwrap().to_owned();
    assert_eq!(member_list(&group).len(), MEMBERS);
    wait_all(rest, WAIT, "shown the group's creation", |m| !m.events(&gid).is_empty()).await;
    let t_created = t0.elapsed();

    // The sender posts back to back; the members read all along. As soon as the last `sent`
    // arrives, the router is killed, then started again.
    let progress: Vec<AtomicUsize> = (0..rest.len()).map(|_| AtomicUsize::new(0)).collect();
    let mut at_kill = 0;
    let mut sids = Vec::new();
    let post_and_kill = async {
        for i in 0..MESSAGES {
            sender.gsend_nowait(&format!("p-{i:02}"), &gid, &format!("post {i:02}")).await;
        }
        sender
            .wait_until(WAIT, "answered every post", |m| {
                m.stash.iter().filter(|f| f["t"] == "sent").count() >= MESSAGES
            })
            .await;
        sys.router.proc.kill9();
        at_kill = progress.iter().map(|p| p.load(Ordering::SeqCst)).sum::<usize>();
        for i in 0..MESSAGES {
            let f = sender.stash.iter().find(|f| f["id"] == format!("p-{i:02}")).unwrap();
            sids.push(f["sid"].as_u64().unwrap());
        }
        sys.router.restart().await;
    };
    let read = futures::future::join_all(rest.iter_mut().zip(&progress).map(|(m, p)| {
        let gid = gid.clone();
        async move {
            m.wait_until(WAIT, "shown every post", |m| {
                let n = m.msgs(&gid).len();
                p.store(n, Ordering::SeqCst);
                n >= MESSAGES
            })
            .await
        }
    }));
    tokio::join!(post_and_kill, read);
    let t_delivered = t0.elapsed();
    futures::future::join_all(rest.iter_mut().map(|m| m.soak(Duration::from_millis(500)))).await;
    let copies = (MEMBERS - 1) * MESSAGES;
    eprintln!(
        "router killed with {at_kill} of {copies} copies shown; joined {t_joined:?}, created {t_created:?}, \
         all delivered {t_delivered:?}"
    );
    if at_kill >= copies {
        eprintln!("warning: the fan-out had already finished when the router was killed");
    }

    assert!(increasing(&sids), "the posts' sids follow the send order: {sids:?}");
    for m in rest.iter() {
        m.assert_no_duplicates();
        assert_eq!(m.msg_sids(&gid), sids, "{}: every post once, in order: {}", m.user, brief(&m.log));
        let bodies: Vec<&str> = m.msgs(&gid).iter().map(|x| x["body"].as_str().unwrap()).collect();
        let want: Vec<String> = (0..MESSAGES).map(|i| format!("post {i:02}")).collect();
        assert_eq!(bodies, want, "{}", m.user);
    }
    // The sender is not shown its own posts.
    assert!(sender.msgs(&gid).is_empty(), "{}", brief(&sender.log));

    // And the restarted router keeps working: one more post reaches everyone once.
    let last = sender.gsend_ok("p-last", &gid, "after the restart").await;
    wait_all(rest, WAIT, "shown the post after the restart", |m| m.msg_sids(&gid).contains(&last)).await;
    for m in rest.iter() {
        m.assert_no_duplicates();
        assert_eq!(m.msgs(&gid).len(), MESSAGES + 1, "{}", m.user);
    }
}
