//! Writes to JetStream and core NATS on behalf of the connections: publishes answered with
//! their PubAck, copies of sent messages, receipts, ephemeral frames, and service requests.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) async fn publish(
    js: &jetstream::Context,
    metrics: &Arc<Metrics>,
    subject: String,
    msg_id: String,
    payload: Bytes,
    mirrors: Vec<Mirror>,
    push: bool,
    reply: oneshot::Sender<Result<Stored, PublishFailure>>,
) {
    let started = Instant::now();
    let mut message = PublishMessage::build().message_id(msg_id).payload(payload);
    if push {
        message = message.header(PUSH_HEADER, "1");
    }
    let fut = match js.send_publish(subject, message).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "publish failed");
            metrics.publish_errors.inc();
            let _ = reply.send(Err(PublishFailure::Unavailable));
            return;
        }
    };
    let metrics = metrics.clone();
    let js = js.clone();
    tokio::spawn(async move {
        let r = match fut.await {
            Ok(ack) => {
                metrics.publish_ack_seconds.observe(metrics.bridge_shard(), started.elapsed().as_secs_f64());
                metrics.messages_published.inc();
                if ack.duplicate {
                    metrics.messages_duplicate.inc();
                }
                if !ack.duplicate {
                    for m in mirrors {
                        publish_mirror(&js, m, ack.sequence).await;
                    }
                }
                Ok(Stored { seq: ack.sequence, duplicate: ack.duplicate })
            }
            Err(e) => {
                metrics.publish_errors.inc();
                tracing::warn!(error = %e, "publish not acknowledged");
                Err(match e.kind() {
                    PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::StreamNotFound => {
                        PublishFailure::Unavailable
                    }
                    _ => PublishFailure::Internal,
                })
            }
        };
        let _ = reply.send(r);
    });
}

/// Header marking a frame on `live.<user>` that was never stored (typing).
use super::live_mux::EPHEMERAL_HEADER;

/// Header marking an inbox item that deserves a push notification (storage/README.md).
use protocol::subjects::PUSH_HEADER;

pub(super) async fn publish_ephemeral(client: &async_nats::Client, to: &UserId, frame: String) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(EPHEMERAL_HEADER, "1");
    let _ = client.publish_with_headers(subjects::live(to), headers, frame.into()).await;
}

/// Stores a copy of a sent message, now that its server id is known.
pub(super) async fn publish_mirror(js: &jetstream::Context, m: Mirror, sid: u64) {
    let item = match m.item {
        InboxItem::Outgoing { to, dev, id, body, media, ts, .. } => {
            InboxItem::Outgoing { to, dev, id, sid, body, media, ts }
        }
        InboxItem::Group { group, from, dev, id, n, body, media, ts, .. } => {
            InboxItem::Group { group, from, dev, id, sid, n, body, media, ts }
        }
        other => other,
    };
    let message = PublishMessage::build().message_id(m.msg_id).payload(item.to_bytes().into());
    let res = async { js.send_publish(m.subject, message).await?.await }.await;
    if let Err(e) = res {
        // The message itself is stored and acknowledged; only the copy (for the sender's other
        // devices, or its history) is missing.
        tracing::warn!(error = %e, "copy of a sent message failed");
    }
}

pub(super) fn spawn_receipt(
    js: &jetstream::Context,
    metrics: &Arc<Metrics>,
    retry: &tokio::sync::mpsc::UnboundedSender<Internal>,
    key: ReceiptKey,
    up_to: u64,
) {
    let (by, to, status, is_group) = &key;
    let (subject, msg_id, payload) = if *is_group {
        let ev = match status {
            ReceiptStatus::Delivered => ReceiptEvent::Delivered { group: to.clone(), by: by.to_string(), up_to },
            ReceiptStatus::Read => ReceiptEvent::Read { group: to.clone(), by: by.to_string(), up_to },
        };
        let id = format!("gr|{}|{}|{}|{}", by, to, status.as_str(), up_to);
        (subjects::receipts(to), id, serde_json::to_vec(&ev).expect("receipt event serialises"))
    } else {
        let Ok(to_user) = UserId::parse(to) else { return };
        let item = InboxItem::Receipt { from: by.to_string(), status: *status, up_to, ts: protocol::now_ms() };
        (subjects::inbox(&to_user), ids::receipt_dedup_id(by, &to_user, status.as_str(), up_to), item.to_bytes())
    };
    let (js, metrics, retry) = (js.clone(), metrics.clone(), retry.clone());
    tokio::spawn(async move {
        let res = async {
            js.send_publish(subject, PublishMessage::build().message_id(msg_id).payload(payload.into())).await?.await
        }
        .await;
        match res {
            Ok(_) => {
                metrics.receipts_published.inc();
            }
            Err(e) => {
                tracing::warn!(error = %e, "receipt publish failed; will retry");
                let _ = retry.send(Internal::RetryReceipt(key, up_to));
            }
        }
    });
}

/// A JSON request to one of the services (router, storage) over core NATS.
pub(super) async fn request_json<Q: serde::Serialize, R: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    subject: &str,
    req: &Q,
) -> Result<R, PublishFailure> {
    let body = serde_json::to_vec(req).map_err(|_| PublishFailure::Internal)?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(subject.to_owned(), body.into()))
        .await
        .map_err(|_| PublishFailure::Unavailable)?
        .map_err(|e| {
            tracing::warn!(error = %e, subject, "service request failed");
            PublishFailure::Unavailable
        })?;
    serde_json::from_slice(&resp.payload).map_err(|e| {
        tracing::warn!(error = %e, subject, "unreadable service reply");
        PublishFailure::Internal
    })
}
