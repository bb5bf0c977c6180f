//! Test harness for system tests: a real `nats-server` with JetStream on a free port and its own
//! store, the workspace's service binaries as child processes (gateways plain or TLS, with a
//! certificate generated at test time), and WebSocket clients (`ws://` or `wss://`) that speak
//! PROTOCOL.md. Modelled on the nats.rs test crate: every test starts what it needs and everything
//! is killed and reaped when the handles drop.
//!
//! The service binaries are the ones `cargo build --workspace --bins` put next to the test
//! binary (`target/<profile>/`); nats-server comes from `NATS_SERVER_BIN`, `.tools/bin/` (see
//! `scripts/install-nats.sh`) or `PATH`.

mod http;
mod nats;
mod proc;
mod services;
mod tls;
mod ws;

use std::net::TcpListener;
use std::path::{Path, PathBuf};

pub use bus::Role;
pub use http::{http_get, wait_http_ok};
pub use nats::{auth_from_env, nats_server_bin, NatsAuth, NatsServer};
pub use proc::Proc;
pub use services::{Gateway, Router, Storage, System};
pub use tls::{ClientTls, TestCert};
pub use ws::{ws_request_url, Event, Inbox, Synced, WsClient};

/// How long services get to become ready. Generous: debug builds on 2 busy cores.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it; it is released at once,
/// so a race with another process is possible but rare).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("binding 127.0.0.1:0").port()
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit lives inside the workspace").to_path_buf()
}

/// The path of a workspace binary built by `cargo build --workspace --bins` with the same profile
/// as the running test. Panics with what to run when it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let path = profile_dir(&exe).join(name);
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}: run `cargo build --workspace --bins` first \
             (same profile as the tests)",
            path.display()
        );
    }
    path
}

/// `target/<profile>/` for a test executable: tests run from `target/<profile>/deps/`.
fn profile_dir(exe: &Path) -> PathBuf {
    let dir = exe.parent().expect("executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_strips_deps() {
        assert_eq!(profile_dir(Path::new("/w/target/debug/deps/e2e-123")), Path::new("/w/target/debug"));
        assert_eq!(profile_dir(Path::new("/w/target/release/gateway")), Path::new("/w/target/release"));
    }

    #[test]
    fn free_ports_are_bindable() {
        let p = free_port();
        assert_ne!(p, 0);
        TcpListener::bind(("127.0.0.1", p)).expect("port is free");
    }

    #[test]
    fn missing_binary_panics_with_the_build_command() {
        let err = std::panic::catch_unwind(|| bin_path("no-such-binary-xyz")).unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
    }
}
