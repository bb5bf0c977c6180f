//! The small KV reads and writes of the bridge: device cursors and user settings.

use super::*;

pub(super) async fn open_cursor(kv: &jetstream::kv::Store, user: &UserId, device: &DeviceId) -> anyhow::Result<u64> {
    let key = subjects::cursor_key(user, device);
    for _ in 0..3 {
        if let Some(v) = kv.get(&key).await? {
            return Ok(super::open::parse_cursor(&v));
        }
        // Register the device so that storage keeps the inbox until this device has it. A
        // concurrent connection of the same device may create it first: then read it again.
        if kv.create(&key, Bytes::from_static(b"0")).await.is_ok() {
            return Ok(0);
        }
    }
    anyhow::bail!("could not read or create the cursor {key}")
}

/// Cursor writes in the background, at most [`CursorWriter::IN_FLIGHT`] at a time. A mass
/// disconnect (a drain, a network cut) queues a 40-byte entry per connection rather than a task
/// with its own KV handle each (about 4 KB per closing connection, measured with heaptrack).
pub(super) struct CursorWriter {
    /// Shared by the writes in flight: a `Store` clone copies the bucket's whole stream
    /// configuration (maps included), too much to do per write.
    kv: Arc<jetstream::kv::Store>,
    metrics: Arc<Metrics>,
    queue: std::collections::VecDeque<((UserId, DeviceId), u64)>,
    in_flight: futures::stream::FuturesUnordered<futures::future::BoxFuture<'static, ()>>,
}

impl CursorWriter {
    pub(super) const IN_FLIGHT: usize = 64;

    pub(super) fn new(kv: jetstream::kv::Store, metrics: Arc<Metrics>) -> Self {
        CursorWriter { kv: Arc::new(kv), metrics, queue: Default::default(), in_flight: Default::default() }
    }

    /// Queues a write of `seq` as the device's cursor.
    pub(super) fn put(&mut self, key: (UserId, DeviceId), seq: u64) {
        self.queue.push_back((key, seq));
        self.start();
    }

    /// Writes queued or in flight.
    pub(super) fn pending(&self) -> usize {
        self.queue.len() + self.in_flight.len()
    }

    /// Waits for one write in flight to finish and starts the next queued ones; pending
    /// forever while none is in flight (for a `select!` branch guarded by `pending() > 0`).
    pub(super) async fn progress(&mut self) {
        if futures::StreamExt::next(&mut self.in_flight).await.is_none() {
            futures::future::pending::<()>().await;
        }
        self.start();
    }

    fn start(&mut self) {
        while self.in_flight.len() < Self::IN_FLIGHT {
            let Some(((user, device), seq)) = self.queue.pop_front() else { break };
            let (kv, metrics) = (self.kv.clone(), self.metrics.clone());
            self.in_flight.push(Box::pin(async move {
                let key = subjects::cursor_key(&user, &device);
                match kv.put(&key, seq.to_string().into()).await {
                    Ok(_) => {
                        metrics.cursor_writes.inc();
                    }
                    // A lost cursor write only means redelivery (deduplicated by clients) later.
                    Err(e) => tracing::warn!(error = %e, "cursor write failed"),
                }
            }));
        }
    }
}

/// Reads a user's settings, after changing its history retention when asked.
pub(super) async fn settings(
    kv: &jetstream::kv::Store,
    user: &UserId,
    history_days: Option<u32>,
) -> Result<UserSettings, PublishFailure> {
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "settings unavailable");
        PublishFailure::Unavailable
    };
    if let Some(days) = history_days {
        let s = UserSettings { history_days: days };
        let v = serde_json::to_vec(&s).expect("settings serialise");
        kv.put(user.as_str(), v.into()).await.map_err(|e| unavailable(&e))?;
        return Ok(s);
    }
    match kv.get(user.as_str()).await.map_err(|e| unavailable(&e))? {
        Some(v) => Ok(serde_json::from_slice(&v).unwrap_or_default()),
        None => Ok(UserSettings::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::NatsServer;

    #[tokio::test]
    async fn cursor_writes_are_bounded_in_flight_and_all_land() {
        let nats = NatsServer::start().await;
        let js = nats.jetstream().await;
        let kv = js.create_key_value(bus::streams::cursors_bucket(&Default::default())).await.expect("bucket");
        let mut writer = CursorWriter::new(kv.clone(), Arc::new(Metrics::new("test", 1)));
        let device = DeviceId::parse("phone").unwrap();
        let key = |i: u64| (UserId::parse(&format!("u{i}")).unwrap(), device.clone());
        // A mass disconnect: 500 writes queued at once, at most IN_FLIGHT of them started.
        for i in 0..500 {
            writer.put(key(i), i + 1);
            assert!(writer.in_flight.len() <= CursorWriter::IN_FLIGHT);
        }
        assert_eq!(writer.pending(), 500);
        while writer.pending() > 0 {
            tokio::time::timeout(Duration::from_secs(10), writer.progress()).await.expect("a write finishes");
            assert!(writer.in_flight.len() <= CursorWriter::IN_FLIGHT);
        }
        for i in 0..500 {
            let (user, device) = key(i);
            let v = kv.get(subjects::cursor_key(&user, &device)).await.unwrap().expect("written");
            assert_eq!(std::str::from_utf8(&v).unwrap(), (i + 1).to_string());
        }
    }
}
