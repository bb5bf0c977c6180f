#!/usr/bin/env bash
# The project's test command: installs what is missing, builds the service binaries the system
# tests run, and runs every test of the workspace. Extra arguments go to the test runner
# (e.g. `scripts/test.sh -E 'test(retry)'` with nextest). The exit code is the runner's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The pinned nats-server (a no-op when it is already there).
scripts/install-nats.sh

# The system tests (e2e/) start these binaries from target/debug/; build them first.
cargo build --workspace --bins

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    echo "cargo-nextest not found; using cargo test" >&2
    cargo test --workspace --no-fail-fast "$@"
fi
