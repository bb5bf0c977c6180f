//! One client connection: the HTTP upgrade, then the session — hello, inbox drain, live
//! delivery, client frames — until the client leaves, goes silent, or the gateway drains.

use std::borrow::Cow;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt, StreamExt};
use glommio::net::TcpStream;
use protocol::groups::{GroupEntry, GroupReply, GroupRequest, UserSettings, WhoReadReply, WhoReadRequest};
use protocol::item::{InboxItem, ReceiptStatus};
use protocol::{
    decode_client_frame, ids, render_item, subjects, ClientFrame, ConvSummary, Conversation, DeviceId, ErrorCode,
    PresenceView, ServerFrame, UserId,
};

use crate::bridge::{Mirror, OpenFailure, PublishFailure, Stored};
use crate::delivery::{Delivery, Live, ReceiptTarget};
use crate::executor::ExecCtx;
use crate::handshake::{self, Request};
use crate::outbox::{Kick, Outbox};
use crate::ratelimit::{ConnLimits, Kind, Scope};
use crate::stream::{self, ClientStream};
use crate::wsio::{Message, ReadError, WsIo};
use bus::inbox::StoredItem;
use protocol::ClientMsgId;

type Ws = WsIo<ClientStream>;

/// Serves one accepted socket until it closes.
///
/// Every connection's task holds its state for the connection's whole life, so the state of an
/// idle session is what a million connections multiply: the handshake and every step that is
/// not waiting run in their own short-lived allocations (`Box::pin`), and the task itself keeps
/// only the session and its idle wait (the size is logged at start-up, see executor.rs).
///
/// Not an `async fn`: the arguments of one stay in its state for its whole life (128 bytes of
/// socket and context here), so they go straight into the boxed handshake instead.
pub fn handle(ctx: Rc<ExecCtx>, tcp: TcpStream) -> impl std::future::Future<Output = ()> {
    let accepting = Box::pin(accept(ctx, tcp));
    async move {
        let Some((mut session, since)) = accepting.await else { return };
        let reason = session.run(since).await;
        session.finish(reason);
    }
}

/// TLS if configured, the HTTP upgrade: request head, policy and authentication, limits; the
/// session on success.
async fn accept(ctx: Rc<ExecCtx>, tcp: TcpStream) -> Option<(Session, u64)> {
    ctx.metrics.connections_accepted.inc();
    let _ = tcp.set_nodelay(true);
    // One budget for the whole opening: the TLS handshake (if any) and the HTTP upgrade request.
    let timer = glommio::timer::sleep(Duration::from_secs(ctx.cfg.handshake_timeout_secs)).fuse();
    futures::pin_mut!(timer);
    let mut stream = stream::open(&ctx, tcp, timer.as_mut()).await?;
    let head = {
        let read = read_head(&mut stream).fuse();
        futures::pin_mut!(read);
        futures::select_biased! {
            r = read => Some(r),
            _ = timer.as_mut() => None,
        }
    };
    let (request, leftover) = match head {
        Some(Ok(r)) => r,
        Some(Err(cause)) => {
            ctx.metrics.handshake_failed(cause);
            if cause == "malformed_request" || cause == "head_too_large" {
                let _ = respond(&mut stream, 400, "Bad Request", "bad request\n").await;
            }
            return None;
        }
        None => {
            ctx.metrics.handshake_failed("handshake_timeout");
            return None;
        }
    };
    let upgrade = match request {
        Request::Upgrade(up) => up,
        Request::DevToken { user, device } => {
            if !ctx.cfg.dev_tokens {
                let _ = respond(&mut stream, 404, "Not Found", "not found\n").await;
            } else if protocol::UserId::parse(&user).is_err()
                || device.as_deref().is_some_and(|d| DeviceId::parse(d).is_err())
            {
                let _ = respond(&mut stream, 400, "Bad Request", "invalid user or device id\n").await;
            } else {
                let token = ctx.keys.mint(&user, device.as_deref(), 24 * 3600);
                let _ = respond(&mut stream, 200, "OK", &token).await;
            }
            return None;
        }
        Request::Asset(content_type, body) => {
            if ctx.cfg.dev_tokens {
                let head = handshake::asset_response(content_type, body.len());
                if stream.write_all(head.as_bytes()).await.is_ok() {
                    let _ = stream.write_all(body).await;
                }
                let _ = stream.close().await;
            } else {
                let _ = respond(&mut stream, 404, "Not Found", "not found\n").await;
            }
            return None;
        }
        Request::Refuse(status, reason) => {
            ctx.metrics.handshake_failed("bad_request");
            let _ = respond(&mut stream, status, reason, &format!("{reason}\n")).await;
            return None;
        }
    };
    if ctx.draining.get() {
        ctx.metrics.handshake_failed("draining");
        let _ = respond(&mut stream, 503, "Service Unavailable", "draining, reconnect elsewhere\n").await;
        return None;
    }
    if !handshake::origin_allowed(&ctx.cfg.allowed_origins, upgrade.origin.as_deref()) {
        ctx.metrics.handshake_failed("origin_refused");
        let _ = respond(&mut stream, 403, "Forbidden", "origin not allowed\n").await;
        return None;
    }
    let (user, device, issued_at) = match handshake::authenticate(&ctx.keys, &upgrade) {
        Ok(id) => id,
        Err(e) => {
            ctx.metrics.handshake_failed(e.cause());
            let (status, reason) = e.status();
            let _ = respond(&mut stream, status, reason, &format!("{}\n", e.cause())).await;
            return None;
        }
    };
    if ctx.revocations.is_revoked(user.as_str(), issued_at) {
        ctx.metrics.handshake_failed("token_revoked");
        let _ = respond(&mut stream, 401, "Unauthorized", "token_revoked\n").await;
        return None;
    }
    // The user's share of the per-user limits; held (and counted) until this function returns.
    let Ok(user_slot) = ctx.user_limits.connect(&user) else {
        ctx.metrics.handshake_failed("too_many_connections");
        ctx.metrics.rate_limited("user", "connections");
        let _ = respond(&mut stream, 429, "Too Many Requests", "too_many_connections\n").await;
        return None;
    };
    if stream.write_all(handshake::switching_protocols(&upgrade.key).as_bytes()).await.is_err() {
        ctx.metrics.handshake_failed("io_error");
        return None;
    }
    let _ = stream.tcp().set_write_timeout(Some(Duration::from_secs(ctx.cfg.write_timeout_secs)));
    let limits = wscodec::Limits { max_frame: ctx.cfg.max_frame, max_message: ctx.cfg.max_frame };
    let ws = WsIo::new(stream, limits, leftover);

    ctx.metrics.connections_open.inc();
    let outbox = Rc::new(Outbox::new(issued_at, ctx.clock()));
    ctx.register(&user, &outbox);
    let session = Session {
        ctx: ctx.clone(),
        ws,
        user: user.clone(),
        device,
        outbox: outbox.clone(),
        delivery: Delivery::new(0),
        mirror: false,
        acked: false,
        watching: Box::default(),
        limits: ConnLimits::new(ctx.rates, user_slot, Instant::now()),
        history_days: 0,
        send_chain: None,
        retry_first: None,
    };
    Some((session, upgrade.since.unwrap_or(0)))
}

/// Reads the HTTP request head (bounded in size) and returns it with any bytes after it.
async fn read_head(stream: &mut ClientStream) -> Result<(Request, Vec<u8>), &'static str> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| "io_error")?;
        if n == 0 {
            return Err("closed_before_upgrade");
        }
        buf.extend_from_slice(&chunk[..n]);
        match handshake::parse_head(&buf) {
            Ok(Some((req, len))) => return Ok((req, buf.split_off(len))),
            Ok(None) if buf.len() >= handshake::MAX_HEAD => return Err("head_too_large"),
            Ok(None) => {}
            Err(_) => return Err("malformed_request"),
        }
    }
}

async fn respond(stream: &mut ClientStream, status: u16, reason: &str, body: &str) -> std::io::Result<()> {
    stream.write_all(handshake::plain_response(status, reason, body).as_bytes()).await?;
    stream.close().await
}

/// The answer to a client request that waited on the backbone, in request order.
enum Reply {
    /// A send (1:1 or group): `sent`, or an error.
    Sent(String, Result<Stored, PublishFailure>),
    /// A send refused unsent because an earlier one (the second id) awaits its retry.
    Refused(String, String),
    /// A membership operation.
    Group(String, Result<GroupReply, PublishFailure>),
    /// A "who read this" query.
    WhoRead(String, String, u64, Result<WhoReadReply, PublishFailure>),
    /// A presence query.
    Presence(String, Vec<PresenceView>),
    /// A settings read or change.
    Settings(String, Result<UserSettings, PublishFailure>),
    /// A history page.
    History(String, Result<(Vec<(u64, bytes::Bytes)>, bool), PublishFailure>),
}

type Pending = FuturesOrdered<futures::future::LocalBoxFuture<'static, Reply>>;

/// What woke the session loop.
enum Wake {
    Outbox,
    Published(Reply),
    Frame(Option<Result<Message, ReadError>>),
}

struct Session {
    ctx: Rc<ExecCtx>,
    ws: Ws,
    user: UserId,
    device: DeviceId,
    outbox: Rc<Outbox>,
    delivery: Delivery,
    /// The user has other devices: keep copies of what this one sends and reads for them.
    mirror: bool,
    /// The client acknowledged something on this connection: its cursor is written at close.
    acked: bool,
    /// Users whose presence changes are pushed to this connection.
    watching: Box<[UserId]>,
    /// Rate limits of this connection and of its user on this gateway.
    limits: ConnLimits,
    /// Days of server-side history the user opted into (0: off).
    history_days: u32,
    /// Completion of this connection's last send (true when stored), for [`Session::send_in_order`];
    /// cleared whenever nothing is in flight.
    send_chain: Option<futures::channel::oneshot::Receiver<bool>>,
    /// The first send that failed for want of the backbone (`unavailable`, `internal`): later
    /// sends are refused until the client sends this id again, so that nothing it sent after it
    /// is stored before it (boxed: an 8-byte field while unset).
    retry_first: Option<Box<ClientMsgId>>,
}

/// Bytes of a session's own state (part of the connection task's state).
pub const SESSION_BYTES: usize = std::mem::size_of::<Session>();

/// One send of this executor awaiting its answer (`ExecCtx::inflight`), for as long as it lives.
struct Inflight(Rc<ExecCtx>);

impl Inflight {
    fn count(ctx: Rc<ExecCtx>) -> Self {
        ctx.inflight.set(ctx.inflight.get() + 1);
        Inflight(ctx)
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.inflight.set(self.0.inflight.get() - 1);
    }
}

/// Why a session ended, as a metrics label; the close frame (if any) was already sent.
type Reason = &'static str;

impl Session {
    /// Unregisters the connection everywhere and records its cursor.
    fn finish(mut self, reason: Reason) {
        let ctx = self.ctx.clone();
        for u in std::mem::take(&mut self.watching) {
            ctx.unwatch(&u, &self.outbox);
        }
        ctx.unregister(&self.user, &self.outbox);
        ctx.bridge.unsubscribe(self.user.clone(), ctx.id);
        // Written now (not debounced) so the next connection of the device resumes from it; a
        // connection that acknowledged nothing leaves the stored cursor as it found it (a mass
        // disconnect of idle clients writes nothing).
        if self.acked {
            ctx.bridge.cursor(self.user, self.device, self.delivery.acked(), true);
        }
        ctx.metrics.connections_open.dec();
        ctx.metrics.closed(reason);
    }

    /// Whether a frame of `kind` is within this connection's and its user's rates.
    fn limit(&mut self, kind: Kind) -> Result<(), Scope> {
        let ctx = &self.ctx;
        self.limits.check(kind, ctx.rates, &ctx.metrics)
    }

    async fn run(&mut self, since: u64) -> Reason {
        match Box::pin(self.start(since)).await {
            Ok(()) => {}
            Err(reason) => return reason,
        }
        // Requests awaiting their answers, in the order they came; allocated only while there
        // are some (an idle connection holds none).
        let mut pending: Option<Box<Pending>> = None;
        loop {
            if let Some(kick) = self.outbox.kicked() {
                if kick == Kick::Draining {
                    let reason = kick.close().1;
                    let _ = Box::pin(self.send(ServerFrame::Reconnect { reason }.to_json())).await;
                }
                let (code, reason) = kick.close();
                Box::pin(self.close(code, reason)).await;
                return kick.metric_reason();
            }
            if self.outbox.take_resync() {
                self.ctx.metrics.resyncs.inc();
                if let Err(reason) = Box::pin(self.drain(false, None)).await {
                    return reason;
                }
            }
            // What woke the loop is turned into its (boxed) step before anything is awaited, so
            // that the wake-up itself (a reply or a frame) never sits in the task's idle state.
            let step: futures::future::LocalBoxFuture<'_, Result<(), Reason>> = match self.next_wake(&mut pending).await
            {
                Wake::Outbox => Box::pin(self.deliver_live()),
                Wake::Published(reply) => Box::pin(self.answer(reply)),
                Wake::Frame(None) => return "client_closed",
                Wake::Frame(Some(Err(e))) => {
                    let this = &mut *self;
                    Box::pin(async move { Err(this.fail(e).await) })
                }
                Wake::Frame(Some(Ok(msg))) => {
                    self.outbox.seen(self.ctx.clock());
                    let in_flight = pending.get_or_insert_with(|| Box::new(FuturesOrdered::new()));
                    Box::pin(self.on_message(msg, in_flight))
                }
            };
            if let Err(reason) = step.await {
                return reason;
            }
        }
    }

    /// The idle wait, as one poll over the session's own state, so that waiting holds no future
    /// of its own: live copies or a kick first, then answers to requests, then the client's
    /// next frame (not read while `max_inflight` requests are outstanding). Silence is the
    /// executor's business (its sweep kicks the connection).
    fn next_wake<'a>(
        &'a mut self,
        pending: &'a mut Option<Box<Pending>>,
    ) -> impl std::future::Future<Output = Wake> + 'a {
        std::future::poll_fn(move |cx| {
            if self.outbox.poll_ready(cx).is_ready() {
                return Poll::Ready(Wake::Outbox);
            }
            if let Some(p) = pending.as_mut() {
                match p.poll_next_unpin(cx) {
                    Poll::Ready(Some(reply)) => return Poll::Ready(Wake::Published(reply)),
                    Poll::Ready(None) => {
                        // Nothing in flight: release the queue and the last send's completion
                        // (an idle connection holds neither; a failure among them is kept in
                        // `retry_first`, which is what orders the sends after it).
                        *pending = None;
                        self.send_chain = None;
                    }
                    Poll::Pending => {}
                }
            }
            let can_read = pending.as_ref().map_or(0, |p| p.len()) < self.ctx.cfg.max_inflight;
            if can_read {
                if let Poll::Ready(frame) = self.ws.poll_next(cx) {
                    return Poll::Ready(Wake::Frame(frame));
                }
            }
            Poll::Pending
        })
    }

    /// Subscribe to live copies, then drain the inbox: nothing stored after the subscription
    /// can be missed, and what arrives both ways is deduplicated by sequence. The bridge does
    /// the subscription and the reads (cursor, devices, settings, first drain batch) in one
    /// request, concurrently where they are independent.
    async fn start(&mut self, since: u64) -> Result<(), Reason> {
        let ctx = self.ctx.clone();
        let opened =
            match ctx.bridge.open(self.user.clone(), self.device.clone(), ctx.id, since, ctx.cfg.drain_batch).await {
                Ok(o) => o,
                Err(failure) => {
                    if let OpenFailure::Backbone(e) = &failure {
                        tracing::warn!(error = %format!("{e:#}"), "connection setup read failed");
                    }
                    self.close(1013, "backbone unavailable, retry later").await;
                    return Err("backbone_unavailable");
                }
            };
        let cursor = opened.cursor;
        // With other devices registered, what this one sends and reads is copied for them.
        self.mirror = opened.devices > 1;
        self.history_days = opened.history_days;

        self.delivery = Delivery::new(cursor);
        if since > cursor {
            self.implicit_ack(since).await;
        }
        let resume = self.delivery.sent();
        let hello = ServerFrame::Hello {
            user: self.user.as_str(),
            device: self.device.as_str(),
            gateway: &ctx.gateway_id,
            heartbeat_ms: ctx.cfg.heartbeat_timeout_secs * 1000,
            max_body: ctx.cfg.max_body,
            resume_from: resume,
        }
        .to_json();
        self.send(hello).await?;
        // The first batch was read after the cursor, which is where the drain starts when it
        // is there at all (`since` not beyond the cursor).
        self.drain(true, opened.first_batch).await
    }

    /// A client resuming with `since` above the stored cursor holds those items (its acks were
    /// lost, or a write was debounced away): treat `since` as its ack, so the cursor advances
    /// and the senders get their delivery receipts. A `since` beyond anything the inbox stream
    /// ever stored comes from another server (a reset store) and is ignored, so the client is
    /// sent what it does not have; `hello.resume_from` tells it where the server resumes.
    async fn implicit_ack(&mut self, since: u64) {
        let last = match self.ctx.bridge.inbox_last_seq().await {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "inbox stream state unavailable; since ignored");
                return;
            }
        };
        if since > last {
            return;
        }
        // Read what the client holds to know whom to send receipts (bounded: receipts are
        // cumulative per conversation, so the newest items of a long gap say enough).
        const MAX_READ: usize = 4096;
        let mut read = 0;
        while read < MAX_READ && self.delivery.sent() < since {
            let Ok(batch) = self.ctx.bridge.fetch(self.user.clone(), self.delivery.sent(), 256).await else { break };
            if batch.is_empty() {
                break;
            }
            let full = batch.len() == 256;
            let mut taken = 0;
            for item in batch.into_iter().take_while(|i| i.seq <= since) {
                taken += 1;
                let target = ItemHead::parse(&item.payload).and_then(|h| h.receipt_target());
                self.delivery.mark_sent(item.seq, target);
            }
            read += taken;
            // Go on only after a full batch wholly at or below `since`. A batch whose first item
            // is already beyond `since` (the client holds items the inbox no longer has, e.g.
            // after a store restart) made no progress: asking again would loop forever.
            if !full || taken < 256 {
                break;
            }
        }
        self.delivery.skip_to(since);
        self.record_ack(since);
    }

    /// Sends every inbox item after the last one sent, oldest first, starting with `first` (the
    /// first batch after the last item sent, already read) if given.
    async fn drain(&mut self, announce: bool, mut first: Option<Vec<StoredItem>>) -> Result<(), Reason> {
        let started = Instant::now();
        let mut count = 0u64;
        let mut convs: Vec<ConvSummary> = Vec::new();
        // Live copies queued now are older than what the drain reads; drop them (a copy that
        // arrives later is deduplicated by sequence). Not when the first batch was read before
        // now: copies of items stored since then may be queued, and the drain may not read
        // those items (an empty batch ends it); they are delivered after it, or resync.
        if first.is_none() {
            self.outbox.take_all();
        }
        loop {
            let read = match first.take() {
                Some(batch) => Ok(batch),
                None => self.ctx.bridge.fetch(self.user.clone(), self.delivery.sent(), self.ctx.cfg.drain_batch).await,
            };
            let batch = match read {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "inbox read failed");
                    self.close(1013, "backbone unavailable, retry later").await;
                    return Err("backbone_unavailable");
                }
            };
            if batch.is_empty() {
                break;
            }
            for item in batch {
                if item.seq <= self.delivery.sent() {
                    continue;
                }
                if let Some(head) = self.feed_item(item.seq, &item.payload, "inbox").await? {
                    head.summarize(item.seq, &mut convs);
                }
                count += 1;
            }
            self.flush().await?;
        }
        let m = &self.ctx.metrics;
        let shard = self.ctx.id;
        m.drain_items.observe(shard, count as f64);
        m.drain_seconds.observe(shard, started.elapsed().as_secs_f64());
        if announce {
            if !convs.is_empty() {
                self.send(ServerFrame::Conversations { convs: &convs }.to_json()).await?;
            }
            self.send(ServerFrame::Synced { seq: self.delivery.sent() }.to_json()).await?;
        }
        Ok(())
    }

    async fn deliver_live(&mut self) -> Result<(), Reason> {
        let copies = self.outbox.take_all();
        let mut wrote = false;
        for c in copies {
            if c.seq == 0 {
                // An ephemeral frame (typing, presence), already rendered.
                let text = String::from_utf8_lossy(&c.payload);
                self.ctx.metrics.frames_out.inc();
                self.ws.feed_text(text.as_bytes()).await.map_err(|_| "io_error")?;
                wrote = true;
                continue;
            }
            match self.delivery.classify_live(c.seq, c.prev) {
                Live::Duplicate => {}
                Live::Deliver => {
                    self.feed_item(c.seq, &c.payload, "live").await?;
                    wrote = true;
                }
                Live::Gap => {
                    // Stop here: the drain reads this copy and the rest from the inbox.
                    self.outbox.request_resync();
                    break;
                }
            }
        }
        if wrote {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes an inbox item to the client; returns what the item says about its conversation.
    async fn feed_item<'p>(
        &mut self,
        seq: u64,
        payload: &'p [u8],
        path: &'static str,
    ) -> Result<Option<ItemHead<'p>>, Reason> {
        let head = ItemHead::parse(payload);
        if head.as_ref().is_some_and(|h| h.is_own_sync(self.user.as_str(), self.device.as_str())) {
            // This device's own send or read, copied for the user's other devices and history:
            // the device has it already. With nothing else awaiting the client's ack, count it
            // as acknowledged, so the inbox can move on past it.
            let settled = self.delivery.acked() == self.delivery.sent();
            self.delivery.mark_sent(seq, None);
            if settled {
                self.record_ack(seq);
            }
            return Ok(None);
        }
        let frame = render_item(seq, payload);
        self.ws.feed_text(frame.as_bytes()).await.map_err(|_| "io_error")?;
        self.delivery.mark_sent(seq, head.as_ref().and_then(ItemHead::receipt_target));
        let m = &self.ctx.metrics;
        m.frames_out.inc();
        m.delivered(path);
        if let Some(ts) = head.as_ref().and_then(|h| h.ts) {
            m.send_to_deliver_seconds.observe(self.ctx.id, protocol::now_ms().saturating_sub(ts) as f64 / 1000.0);
        }
        Ok(head)
    }

    async fn on_message(&mut self, msg: Message, pending: &mut Pending) -> Result<(), Reason> {
        self.ctx.metrics.frames_in.inc();
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary => {
                return self
                    .error(ErrorCode::BinaryUnsupported, "binary frames are not supported; send JSON text frames", None)
                    .await;
            }
            // The Pong answering a Ping is queued by WsIo; flushing sends it.
            Message::Ping | Message::Pong => return self.flush().await,
            Message::Close => {
                // WsIo queued the reply to the Close; flushing sends it (RFC 6455 §5.5.1: the
                // receiver answers with a Close before the connection ends).
                let _ = self.ws.flush().await;
                return Err("client_closed");
            }
        };
        let frame = match decode_client_frame(text.as_bytes(), &self.ctx.limits) {
            Ok(f) => f,
            Err(e) => return self.error(e.code, &e.msg, e.id.as_deref()).await,
        };
        let limited = match &frame {
            ClientFrame::Send { id, .. } | ClientFrame::GroupSend { id, .. } => {
                self.limit(Kind::Messages).err().map(|scope| (id, scope))
            }
            // History pages and settings cost NATS requests too (a backwards page up to one per item).
            ClientFrame::Group { id, .. }
            | ClientFrame::WhoRead { id, .. }
            | ClientFrame::Presence { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::Settings { id, .. } => self.limit(Kind::Ops).err().map(|scope| (id, scope)),
            _ => None,
        };
        if let Some((id, scope)) = limited {
            let id = id.to_string();
            return self.error(ErrorCode::RateLimited, scope.message(), Some(&id)).await;
        }
        match frame {
            ClientFrame::Ping => self.send(ServerFrame::Pong.to_json()).await,
            ClientFrame::Ack { seq } => {
                self.ctx.metrics.acks.inc();
                self.record_ack(seq);
                Ok(())
            }
            ClientFrame::Send { id, to, body, media } => {
                let ts = protocol::now_ms();
                let outgoing = InboxItem::Outgoing {
                    to: to.to_string(),
                    dev: self.device.to_string(),
                    id: id.to_string(),
                    sid: 0,
                    body: body.clone(),
                    media: media.clone(),
                    ts,
                };
                let mirrors = self.copies_of_sent(outgoing, &id);
                let item = InboxItem::Chat {
                    from: self.user.to_string(),
                    dev: self.device.to_string(),
                    id: id.to_string(),
                    body,
                    media,
                    ts,
                };
                let msg_id = ids::direct_msg_dedup_id(&self.user, &self.device, &id);
                let bridge = self.ctx.bridge.clone();
                let payload = item.to_bytes().into();
                self.send_in_order(pending, id, move || {
                    bridge.publish_cmd(subjects::inbox(&to), msg_id, payload, mirrors, true)
                });
                Ok(())
            }
            ClientFrame::GroupSend { id, group, body, media } => {
                let ts = protocol::now_ms();
                let own = InboxItem::Group {
                    group: group.to_string(),
                    from: self.user.to_string(),
                    dev: self.device.to_string(),
                    id: id.to_string(),
                    sid: 0,
                    n: 0,
                    body: body.clone(),
                    media: media.clone(),
                    ts,
                };
                // The fan-out skips the sender, so its other devices and its history get copies.
                let mirrors = self.copies_of_sent(own, &id);
                let entry = GroupEntry::Post {
                    from: self.user.to_string(),
                    dev: self.device.to_string(),
                    id: id.to_string(),
                    body,
                    media,
                    ts,
                };
                let payload = serde_json::to_vec(&entry).expect("group entry serialises");
                let msg_id = ids::group_msg_dedup_id(&self.user, &self.device, &id);
                let bridge = self.ctx.bridge.clone();
                let sender = self.user.clone();
                self.send_in_order(pending, id, move || {
                    bridge.group_publish_cmd(group, sender, msg_id, payload.into(), mirrors)
                });
                Ok(())
            }
            ClientFrame::Group { id, op } => {
                let bridge = self.ctx.bridge.clone();
                let req = GroupRequest { by: self.user.to_string(), op };
                self.wait(pending, async move { Reply::Group(id.to_string(), bridge.group_op(req).await) });
                Ok(())
            }
            ClientFrame::WhoRead { id, group, sid } => {
                let bridge = self.ctx.bridge.clone();
                let user = self.user.clone();
                self.wait(pending, async move {
                    let res = match bridge.group_check(group.clone(), user.clone()).await {
                        Ok(()) => {
                            bridge
                                .who_read(WhoReadRequest { by: user.to_string(), group: group.to_string(), sid })
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    Reply::WhoRead(id.to_string(), group.to_string(), sid, res)
                });
                Ok(())
            }
            ClientFrame::Read { conv, up_to } => {
                let b = &self.ctx.bridge;
                if self.mirror {
                    b.read_mark(self.user.clone(), conv.clone(), self.device.to_string(), up_to);
                }
                match conv {
                    Conversation::Direct(peer) => {
                        b.receipt(self.user.clone(), peer.to_string(), ReceiptStatus::Read, up_to)
                    }
                    Conversation::Group(g) => {
                        b.group_receipt(self.user.clone(), g.to_string(), ReceiptStatus::Read, up_to)
                    }
                }
                Ok(())
            }
            ClientFrame::Settings { id, history_days } => {
                let bridge = self.ctx.bridge.clone();
                let user = self.user.clone();
                self.wait(pending, async move {
                    Reply::Settings(id.to_string(), bridge.settings(user, history_days).await)
                });
                Ok(())
            }
            ClientFrame::History { id, conv, before, after, limit } => {
                let key = match &conv {
                    Conversation::Direct(peer) => subjects::conversation_key(Some(peer.as_str()), None),
                    Conversation::Group(g) => subjects::conversation_key(None, Some(g.as_str())),
                }
                .expect("a conversation has a key");
                let bridge = self.ctx.bridge.clone();
                let user = self.user.clone();
                self.wait(pending, async move {
                    Reply::History(id.to_string(), bridge.history(user, key, before, after, limit).await)
                });
                Ok(())
            }
            ClientFrame::Typing { conv } => {
                if self.limit(Kind::Typing).is_ok() {
                    self.ctx.bridge.typing(self.user.clone(), conv);
                } else {
                    self.ctx.metrics.typing_dropped.inc();
                }
                Ok(())
            }
            ClientFrame::Presence { id, users } => {
                let bridge = self.ctx.bridge.clone();
                self.wait(pending, async move { Reply::Presence(id.to_string(), bridge.presence(users).await) });
                Ok(())
            }
            ClientFrame::PresenceSub { users } => {
                for u in std::mem::take(&mut self.watching) {
                    self.ctx.unwatch(&u, &self.outbox);
                }
                for u in &users {
                    self.ctx.watch(u, &self.outbox);
                }
                self.watching = users.into_boxed_slice();
                Ok(())
            }
        }
    }

    /// The copy of a message this device sends, kept in the user's own inbox once its server id
    /// is known: for its other devices (when it has some) and for its history (when it opted in
    /// — storage moves delivered inbox items into history in inbox order, so the user's own
    /// messages interleave correctly with the ones it received).
    fn copies_of_sent(&self, item: InboxItem, id: &ClientMsgId) -> Vec<Mirror> {
        if !self.mirror && self.history_days == 0 {
            return Vec::new();
        }
        vec![Mirror {
            subject: subjects::inbox(&self.user),
            item,
            msg_id: ids::outgoing_dedup_id(&self.user, &self.device, id),
        }]
    }

    /// Applies a cumulative ack: the device cursor, and delivery receipts for the senders.
    fn record_ack(&mut self, seq: u64) {
        if let Some(acked) = self.delivery.ack(seq) {
            self.acked = true;
            let b = &self.ctx.bridge;
            b.cursor(self.user.clone(), self.device.clone(), acked.cursor, false);
            for (sender, up_to) in acked.receipts {
                b.receipt(self.user.clone(), sender, ReceiptStatus::Delivered, up_to);
            }
            for (group, up_to) in acked.group_receipts {
                b.group_receipt(self.user.clone(), group, ReceiptStatus::Delivered, up_to);
            }
        }
    }

    /// Queues a send so that a connection's messages are stored strictly in the order it sent
    /// them: each publish is issued only once the previous send of this connection is stored,
    /// and when one fails for want of the backbone, every send queued behind it fails too (the
    /// client retries them, in order, with the same ids). Without this barrier, a publish lost
    /// in a NATS reconnect could be retried after later ones that async-nats buffered and
    /// delivered — a reordering.
    ///
    /// A send that failed (`unavailable`, `internal`) blocks the ones after it until the client
    /// sends it again ([`Session::retry_first`]): without that, a send the client pipelined
    /// before it learned of the failure would be stored before the retry (the fault suite's
    /// retrying clients saw exactly that).
    fn send_in_order<F>(&mut self, pending: &mut Pending, id: ClientMsgId, issue: F)
    where
        F: FnOnce() -> futures::channel::oneshot::Receiver<Result<Stored, PublishFailure>> + 'static,
    {
        if let Some(first) = &self.retry_first {
            if **first != id {
                let msg = Reply::Refused(id.to_string(), first.to_string());
                self.wait(pending, async move { msg });
                return;
            }
            self.retry_first = None;
            // The refused send and those queued behind it have failed by now: this retry starts
            // a new chain rather than inherit their failure.
            if let Some(mut previous) = self.send_chain.take() {
                if !matches!(previous.try_recv(), Ok(Some(false))) {
                    self.send_chain = Some(previous);
                }
            }
        }
        let (done, done_rx) = futures::channel::oneshot::channel::<bool>();
        let previous = self.send_chain.replace(done_rx);
        self.wait(pending, async move {
            if let Some(previous) = previous {
                if !previous.await.unwrap_or(false) {
                    let _ = done.send(false);
                    return Reply::Sent(id.to_string(), Err(PublishFailure::Unavailable));
                }
            }
            let res = issue().await.unwrap_or(Err(PublishFailure::Unavailable));
            let stored = !matches!(res, Err(PublishFailure::Unavailable) | Err(PublishFailure::Internal));
            let _ = done.send(stored);
            Reply::Sent(id.to_string(), res)
        });
    }

    fn wait(&self, pending: &mut Pending, fut: impl std::future::Future<Output = Reply> + 'static) {
        // Counted until answered or dropped with the session (a session that ends with sends in
        // flight must not leave the executor's drain waiting for them until its deadline).
        let guard = Inflight::count(self.ctx.clone());
        pending.push_back(
            async move {
                let reply = fut.await;
                drop(guard);
                reply
            }
            .boxed_local(),
        );
    }

    async fn answer(&mut self, reply: Reply) -> Result<(), Reason> {
        match reply {
            Reply::Sent(id, Ok(stored)) => {
                let f = ServerFrame::Sent { id: &id, sid: stored.seq, ts: protocol::now_ms(), dup: stored.duplicate };
                self.send(f.to_json()).await
            }
            Reply::Group(id, Ok(GroupReply::Group { group })) => {
                self.send(ServerFrame::Group { id: &id, group: &group }.to_json()).await
            }
            Reply::Group(id, Ok(GroupReply::Groups { groups })) => {
                self.send(ServerFrame::Groups { id: &id, groups: &groups }.to_json()).await
            }
            Reply::Group(id, Ok(GroupReply::Error { code, msg })) => self.error(code, &msg, Some(&id)).await,
            Reply::WhoRead(id, group, sid, Ok(WhoReadReply::Receipts { recipients, delivered, read })) => {
                let f = ServerFrame::Receipts {
                    id: &id,
                    group: &group,
                    sid,
                    recipients,
                    delivered: &delivered,
                    read: &read,
                };
                self.send(f.to_json()).await
            }
            Reply::WhoRead(id, _, _, Ok(WhoReadReply::Error { code, msg })) => self.error(code, &msg, Some(&id)).await,
            Reply::Settings(id, Ok(s)) => {
                self.history_days = s.history_days;
                self.send(ServerFrame::Settings { id: &id, history_days: s.history_days }.to_json()).await
            }
            Reply::History(id, Ok((items, more))) => {
                let items: Vec<(u64, &[u8])> = items.iter().map(|(seq, b)| (*seq, &b[..])).collect();
                self.send(protocol::render_history(&id, &items, more)).await
            }
            Reply::Settings(id, Err(e)) | Reply::History(id, Err(e)) => self.fail_reply(&id, e).await,
            Reply::Presence(id, users) => {
                self.send(ServerFrame::Presence { id: Some(&id), users: &users }.to_json()).await
            }
            Reply::Sent(id, Err(e)) => {
                if matches!(e, PublishFailure::Unavailable | PublishFailure::Internal) && self.retry_first.is_none() {
                    self.retry_first = ClientMsgId::parse(&id).ok().map(Box::new);
                }
                self.fail_reply(&id, e).await
            }
            Reply::Refused(id, first) => {
                let msg = format!("not sent: retry {first} first (a send before this one was refused)");
                self.error(ErrorCode::Unavailable, &msg, Some(&id)).await
            }
            Reply::Group(id, Err(e)) | Reply::WhoRead(id, _, _, Err(e)) => self.fail_reply(&id, e).await,
        }
    }

    async fn fail_reply(&mut self, id: &str, e: PublishFailure) -> Result<(), Reason> {
        let (code, msg) = match e {
            PublishFailure::Unavailable => {
                (ErrorCode::Unavailable, "not confirmed by the backbone; retry with the same id")
            }
            PublishFailure::Internal => (ErrorCode::Internal, "server failure; retry with the same id"),
            PublishFailure::NotFound => (ErrorCode::NotFound, "no such group"),
            PublishFailure::Forbidden => (ErrorCode::Forbidden, "not a member of this group"),
        };
        self.error(code, msg, Some(id)).await
    }

    async fn error(&mut self, code: ErrorCode, msg: &str, id: Option<&str>) -> Result<(), Reason> {
        let label = serde_json::to_value(code).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        self.ctx.metrics.frame_error(code_label(&label));
        self.send(ServerFrame::Error { code, msg, id }.to_json()).await
    }

    async fn send(&mut self, text: String) -> Result<(), Reason> {
        self.ctx.metrics.frames_out.inc();
        self.ws.send_text(text.as_bytes()).await.map_err(|_| "io_error")
    }

    async fn flush(&mut self) -> Result<(), Reason> {
        self.ws.flush().await.map_err(|_| "io_error")
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let _ = self.ws.close(code, reason).await;
    }

    async fn fail(&mut self, e: ReadError) -> Reason {
        match e {
            ReadError::Violation(v) => {
                self.close(v.code, v.reason).await;
                if v.code == 1009 {
                    "too_large"
                } else {
                    "protocol_error"
                }
            }
            ReadError::Io(e) => {
                tracing::debug!(error = %e, "connection read failed");
                "io_error"
            }
        }
    }
}

fn code_label(s: &str) -> &'static str {
    match s {
        "bad_json" => "bad_json",
        "unknown_type" => "unknown_type",
        "missing_field" => "missing_field",
        "bad_field" => "bad_field",
        "too_large" => "too_large",
        "binary_unsupported" => "binary_unsupported",
        "rate_limited" => "rate_limited",
        "unavailable" => "unavailable",
        "not_found" => "not_found",
        "forbidden" => "forbidden",
        "limit_exceeded" => "limit_exceeded",
        _ => "internal",
    }
}

/// The fields of a stored item the gateway needs: its kind, its sender and its timestamp.
#[derive(serde::Deserialize)]
struct ItemHead<'a> {
    #[serde(borrow)]
    k: Cow<'a, str>,
    #[serde(borrow, default)]
    from: Option<Cow<'a, str>>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(borrow, default)]
    group: Option<Cow<'a, str>>,
    #[serde(default)]
    sid: Option<u64>,
    #[serde(borrow, default)]
    dev: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
}

impl<'a> ItemHead<'a> {
    fn parse(b: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(b).ok()
    }

    /// Adds this item (at inbox `seq`) to the per-conversation summary sent after a drain:
    /// messages count as unread; this user's own messages from other devices and membership
    /// events only move the conversation's last server id.
    fn summarize(&self, seq: u64, convs: &mut Vec<ConvSummary>) {
        let (conv, group, sid, unread) = match &*self.k {
            "chat" => (self.from.as_deref(), None, seq, 1),
            "outgoing" => (self.to.as_deref(), None, self.sid.unwrap_or(0), 0),
            "group" => (None, self.group.as_deref(), self.sid.unwrap_or(0), 1),
            "group_event" => (None, self.group.as_deref(), self.sid.unwrap_or(0), 0),
            _ => return,
        };
        if conv.is_none() && group.is_none() {
            return;
        }
        let same = |c: &&mut ConvSummary| c.conv.as_deref() == conv && c.group.as_deref() == group;
        match convs.iter_mut().find(same) {
            Some(c) => {
                c.last_sid = c.last_sid.max(sid);
                c.unread += unread;
            }
            None => convs.push(ConvSummary {
                conv: conv.map(str::to_owned),
                group: group.map(str::to_owned),
                last_sid: sid,
                unread,
            }),
        }
    }

    /// A copy of something this very device did (sent or read), kept for the other devices.
    fn is_own_sync(&self, user: &str, device: &str) -> bool {
        let own_device = self.dev.as_deref() == Some(device);
        match &*self.k {
            "outgoing" | "read_mark" => own_device,
            "group" => own_device && self.from.as_deref() == Some(user),
            _ => false,
        }
    }

    /// Messages earn delivery receipts; receipts and events do not.
    fn receipt_target(&self) -> Option<ReceiptTarget> {
        match &*self.k {
            "chat" => Some(ReceiptTarget::Direct(self.from.as_deref()?.to_owned())),
            "group" => Some(ReceiptTarget::Group(self.group.as_deref()?.to_owned(), self.sid?)),
            _ => None,
        }
    }
}
