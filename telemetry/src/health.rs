//! Readiness, as seen by load balancers and orchestrators. Liveness needs no state: a process that
//! answers `/healthz` is alive.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the service can do its job right now (dependencies connected, state loaded). Starts
/// not ready. Cheap to read and write from any thread; share it in an `Arc`.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// A new flag, not ready.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self, ready: bool) {
        // Relaxed is enough: the flag orders nothing else, it is only reported.
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_not_ready_and_toggles() {
        let h = Health::new();
        assert!(!h.is_ready());
        h.set_ready(true);
        assert!(h.is_ready());
        h.set_ready(false);
        assert!(!h.is_ready());
    }
}
