//! Readiness of the gateway, as `/readyz` reports it: ready only while the backbone (NATS and
//! the streams) is reachable, the live multiplexer's NATS connection has its subscriptions in
//! place, every executor is listening, and the gateway is not draining.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Readiness {
    health: Arc<telemetry::Health>,
    backbone: AtomicBool,
    live: AtomicBool,
    listening: AtomicUsize,
    executors: usize,
    draining: AtomicBool,
}

impl Readiness {
    pub fn new(health: Arc<telemetry::Health>, executors: usize) -> Self {
        Readiness {
            health,
            backbone: AtomicBool::new(false),
            live: AtomicBool::new(false),
            listening: AtomicUsize::new(0),
            executors,
            draining: AtomicBool::new(false),
        }
    }

    pub fn set_backbone(&self, up: bool) {
        self.backbone.store(up, Ordering::SeqCst);
        self.update();
    }

    /// The live multiplexer is connected with every subscription confirmed (or not).
    pub fn set_live(&self, up: bool) {
        self.live.store(up, Ordering::SeqCst);
        self.update();
    }

    pub fn backbone(&self) -> bool {
        self.backbone.load(Ordering::SeqCst)
    }

    /// An executor has bound its listener.
    pub fn listening(&self) {
        self.listening.fetch_add(1, Ordering::SeqCst);
        self.update();
    }

    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.update();
    }

    fn update(&self) {
        let ready = self.backbone.load(Ordering::SeqCst)
            && self.live.load(Ordering::SeqCst)
            && self.listening.load(Ordering::SeqCst) >= self.executors
            && !self.draining.load(Ordering::SeqCst);
        self.health.set_ready(ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_everything_is() {
        let h = Arc::new(telemetry::Health::default());
        let r = Readiness::new(h.clone(), 2);
        r.set_backbone(true);
        r.set_live(true);
        assert!(!h.is_ready());
        r.listening();
        r.listening();
        assert!(h.is_ready());
        r.set_backbone(false);
        assert!(!h.is_ready());
        r.set_backbone(true);
        r.set_live(false);
        assert!(!h.is_ready());
        r.set_live(true);
        assert!(h.is_ready());
        r.drain();
        assert!(!h.is_ready());
    }
}
