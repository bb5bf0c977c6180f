//! One glommio executor per core: its own SO_REUSEPORT listener, its connections, and the
//! dispatch of live copies from the bridge to the connections of the users it holds.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use fxhash::FxHashMap;
use glommio::net::TcpListener;
use glommio::{Latency, Shares, TaskQueueHandle};
use protocol::{TokenKeys, UserId};
use smallvec::SmallVec;

use crate::bridge::{Bridge, ExecEvent};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::{Kick, LiveCopy, Outbox};

/// A user's connections on one executor: nearly always one, kept inline (no allocation).
type Outboxes = SmallVec<[Rc<Outbox>; 1]>;

/// What every connection task of one executor shares.
pub struct ExecCtx {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub keys: Arc<TokenKeys>,
    pub bridge: Bridge,
    pub metrics: Arc<Metrics>,
    pub gateway_id: Arc<str>,
    pub limits: protocol::Limits,
    /// Each connection's own rate limits (from `cfg`).
    pub rates: crate::ratelimit::ConnRates,
    pub revocations: Arc<crate::revocation::Revocations>,
    /// Per-user limits, shared by every executor of this process.
    pub user_limits: Arc<crate::user_limits::UserLimits>,
    /// The TLS server side, when the listener has a certificate.
    pub tls: Option<futures_rustls::TlsAcceptor>,
    /// Connections by user, for live dispatch.
    sessions: RefCell<FxHashMap<UserId, Outboxes>>,
    /// Connections watching a user's presence (`presence_sub`).
    watchers: RefCell<FxHashMap<UserId, Outboxes>>,
    /// Set while the gateway drains: no new sessions.
    pub draining: Cell<bool>,
    /// Sends awaiting JetStream's ack, across this executor (drain waits for them).
    pub inflight: Cell<usize>,
    /// Whole seconds since the executor started, advanced by its once-a-second ticker: the
    /// clock of the connections' silence (see [`Outbox::seen`]).
    clock: Cell<u32>,
    epoch: std::time::Instant,
}

impl ExecCtx {
    /// The coarse clock (whole seconds since the executor started).
    pub fn clock(&self) -> u32 {
        self.clock.get()
    }

    /// Advances the coarse clock and closes every connection silent for longer than the
    /// heartbeat timeout. One pass over the executor's sessions a second replaces a timer per
    /// connection (a timer costs an allocation and a timer-wheel entry per connection, and
    /// re-arming it on every frame).
    fn tick(&self) {
        let now = u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX);
        self.clock.set(now);
        // Strictly longer than the timeout: `last_seen` may have been read up to a second
        // before the frame arrived, so this never closes a connection silent for less.
        let limit = u32::try_from(self.cfg.heartbeat_timeout_secs).unwrap_or(u32::MAX);
        for o in self.sessions.borrow().values().flatten() {
            if o.silent_for(now) > limit {
                o.kick(Kick::Silent);
            }
        }
    }

    pub fn register(&self, user: &UserId, outbox: &Rc<Outbox>) {
        self.sessions.borrow_mut().entry(user.clone()).or_default().push(outbox.clone());
    }

    pub fn unregister(&self, user: &UserId, outbox: &Rc<Outbox>) {
        remove(&mut self.sessions.borrow_mut(), user, outbox);
    }

    /// Starts pushing `user`'s presence changes to this connection.
    pub fn watch(&self, user: &UserId, outbox: &Rc<Outbox>) {
        self.watchers.borrow_mut().entry(user.clone()).or_default().push(outbox.clone());
        self.bridge.presence_watch(user.clone(), self.id, true);
    }

    pub fn unwatch(&self, user: &UserId, outbox: &Rc<Outbox>) {
        remove(&mut self.watchers.borrow_mut(), user, outbox);
        self.bridge.presence_watch(user.clone(), self.id, false);
    }

    fn dispatch(&self, ev: ExecEvent) {
        match ev {
            ExecEvent::Live { user, seq, prev, payload } => {
                if let Some(list) = self.sessions.borrow().get(&user) {
                    for o in list {
                        o.push(LiveCopy { seq, prev, payload: payload.clone() }, self.cfg.send_queue);
                    }
                }
            }
            ExecEvent::Ephemeral { user, frame, presence } => {
                let map = if presence { &self.watchers } else { &self.sessions };
                if let Some(list) = map.borrow().get(&user) {
                    for o in list {
                        o.push(LiveCopy { seq: 0, prev: 0, payload: frame.clone() }, self.cfg.send_queue);
                    }
                }
            }
            ExecEvent::Revoke { user, before } => {
                if let Some(list) = self.sessions.borrow().get(&user) {
                    for o in list.iter().filter(|o| o.issued_at() < before) {
                        o.kick(Kick::Revoked);
                    }
                }
            }
            ExecEvent::ResyncAll => {
                for o in self.sessions.borrow().values().flatten() {
                    o.request_resync();
                }
            }
            ExecEvent::Drain => {
                self.draining.set(true);
                for o in self.sessions.borrow().values().flatten() {
                    o.kick(Kick::Draining);
                }
            }
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.borrow().values().map(SmallVec::len).sum()
    }
}

/// Runs one executor until the gateway drains and its connections are gone.
pub async fn run(ctx: Rc<ExecCtx>, events: flume::Receiver<ExecEvent>, ready: Arc<crate::readiness::Readiness>) {
    // Tasks that are woken from the bridge thread must sit in a latency-sensitive queue: a
    // cross-thread wake-up into a NotImportant queue can take tens of milliseconds.
    let tq: TaskQueueHandle =
        glommio::executor().create_task_queue(Shares::default(), Latency::Matters(Duration::from_millis(1)), "conn");

    {
        let ctx = ctx.clone();
        glommio::spawn_local_into(
            async move {
                while let Ok(ev) = events.recv_async().await {
                    ctx.dispatch(ev);
                }
            },
            tq,
        )
        .expect("spawning the dispatcher")
        .detach();
    }

    // Once a second: the coarse clock and the heartbeat sweep, busy time for the metrics.
    {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_secs(1)).await;
                ctx.tick();
                ctx.metrics.executor_busy(ctx.id, glommio::executor().executor_stats().executor_runtime());
                // Forget users whose last connection closed long enough ago (one executor does it
                // for the process; connects and closes also sweep the shards they touch).
                if ctx.id == 0 {
                    ctx.user_limits.sweep();
                }
            }
        })
        .detach();
    }

    let listener = match TcpListener::bind(ctx.cfg.listen) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, addr = %ctx.cfg.listen, "cannot listen");
            std::process::exit(1);
        }
    };
    tracing::info!(executor = ctx.id, addr = %ctx.cfg.listen, tls = ctx.tls.is_some(), "listening");
    ready.listening();
    let mut task_size_logged = false;
    loop {
        let accepted = futures::future::select(Box::pin(listener.accept()), Box::pin(wait_draining(&ctx))).await;
        match accepted {
            futures::future::Either::Left((Ok(stream), _)) => {
                let task = crate::conn::handle(ctx.clone(), stream);
                if !task_size_logged {
                    // Every connection holds this much task state for its whole life: a number
                    // to watch when the session code changes (the per-connection memory budget).
                    task_size_logged = true;
                    tracing::info!(
                        executor = ctx.id,
                        bytes = std::mem::size_of_val(&task),
                        session_bytes = crate::conn::SESSION_BYTES,
                        "connection task state size"
                    );
                }
                match glommio::spawn_local_into(task, tq) {
                    Ok(task) => {
                        task.detach();
                    }
                    Err(e) => tracing::error!(error = %e, "cannot spawn connection task"),
                }
            }
            futures::future::Either::Left((Err(e), _)) => {
                // Out of descriptors or a connection reset before accept: keep serving, but
                // back off briefly so an fd exhaustion does not spin.
                tracing::warn!(error = %e, "accept failed");
                ctx.metrics.handshake_failed("accept_error");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            futures::future::Either::Right(_) => break,
        }
    }
    drop(listener);
    // Wait for the connections to go (they were kicked) and for in-flight sends to be acked.
    let deadline = std::time::Instant::now() + Duration::from_secs(ctx.cfg.drain_timeout_secs);
    while (ctx.session_count() > 0 || ctx.inflight.get() > 0) && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}

fn remove(map: &mut FxHashMap<UserId, Outboxes>, user: &UserId, outbox: &Rc<Outbox>) {
    if let Some(list) = map.get_mut(user) {
        list.retain(|o| !Rc::ptr_eq(o, outbox));
        if list.is_empty() {
            map.remove(user);
        }
    }
}

async fn wait_draining(ctx: &ExecCtx) {
    while !ctx.draining.get() {
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

impl ExecCtx {
    #[allow(clippy::too_many_arguments)] // what the executors share, each from main
    pub fn new(
        id: usize,
        cfg: Arc<Config>,
        keys: Arc<TokenKeys>,
        bridge: Bridge,
        metrics: Arc<Metrics>,
        gateway_id: Arc<str>,
        revocations: Arc<crate::revocation::Revocations>,
        user_limits: Arc<crate::user_limits::UserLimits>,
    ) -> Self {
        let limits = protocol::Limits { max_body: cfg.max_body };
        let rates = crate::ratelimit::ConnRates::of(&cfg);
        ExecCtx {
            id,
            cfg,
            keys,
            bridge,
            metrics,
            gateway_id,
            limits,
            rates,
            revocations,
            user_limits,
            tls: None,
            sessions: RefCell::new(FxHashMap::default()),
            watchers: RefCell::new(FxHashMap::default()),
            draining: Cell::new(false),
            inflight: Cell::new(0),
            clock: Cell::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    /// Serve TLS with this configuration (shared by every executor).
    pub fn with_tls(mut self, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        self.tls = tls.map(futures_rustls::TlsAcceptor::from);
        self
    }
}
