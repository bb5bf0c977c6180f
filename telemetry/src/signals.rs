//! Shutdown signals, the same for every service: SIGTERM (orchestrators) or SIGINT (Ctrl-C).

use anyhow::Context as _;

/// Installs the handlers now and returns a future that resolves at the first SIGTERM or SIGINT.
/// Needs a tokio runtime.
pub fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
