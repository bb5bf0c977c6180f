//! Observability shared by every service: logging setup, a readiness flag, and a tiny HTTP
//! endpoint for Prometheus scrapes and orchestrator probes.
//!
//! The HTTP side is deliberately not a general web server: it answers three fixed paths with
//! `Connection: close`, so a small hand-written HTTP/1.1 responder (bounded request size, timeouts,
//! a connection cap) is simpler to audit than pulling in a full HTTP stack for it.

mod config_file;
mod health;
mod http;
mod logging;
mod metrics;
mod sharded;
mod signals;

pub use config_file::{apply_config_file, env_pairs};
pub use health::Health;
pub use http::{serve, serve_listener, serve_registry, spawn};
pub use logging::init_logging;
pub use metrics::{encode_registry, METRICS_CONTENT_TYPE};
pub use sharded::{exponential, ShardedHistogram};
pub use signals::stop_signal;

/// The metrics renderer the HTTP endpoint calls on every `GET /metrics`.
pub type Render = std::sync::Arc<dyn Fn() -> String + Send + Sync>;
