#!/usr/bin/env bash
# The project's test command: installs what is missing, builds the service binaries, runs the
# interop/browser suite, the Prometheus check and the CI-sized fault suite
# (scripts/interop-test.sh, scripts/prometheus-check.sh, scripts/faults-quick.sh;
# SKIP_EXTERNAL_SUITES=1 skips them), then every test of the workspace, then the system tests
# again on a nats-server with per-service authorization (TESTKIT_NATS_AUTH=1). Extra arguments
# go to the test runner (e.g. `scripts/test.sh -E 'test(retry)'` with nextest; then the second
# pass is skipped). The exit code is non-zero if anything failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The pinned nats-server (a no-op when it is already there).
scripts/install-nats.sh

# The system tests (e2e/) and the suites below start these binaries from target/debug/.
cargo build --workspace --bins

# Suites outside cargo: clients from other ecosystems and a real browser against a running
# system, and a real Prometheus scraping one under load. They run first so that the test
# runner's summary is the last thing printed; a failure still fails the command.
failed=0
if [[ "${SKIP_EXTERNAL_SUITES:-0}" != 1 ]]; then
    scripts/interop-test.sh || { echo "interop suite FAILED" >&2; failed=1; }
    PROM_CHECK_SKIP_BUILD=1 scripts/prometheus-check.sh || { echo "prometheus check FAILED" >&2; failed=1; }
    scripts/faults-quick.sh --debug --skip-build || { echo "fault suite (quick) FAILED" >&2; failed=1; }
fi

status=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
    echo "cargo-nextest not found; using cargo test" >&2
    cargo test --workspace --no-fail-fast "$@" || status=$?
fi
# The system tests once more on a nats-server with the generated per-service authorization
# (chatctl nats-config): any subject a change needs but its role may not use fails here.
if cargo nextest --version >/dev/null 2>&1 && [[ $# == 0 ]]; then
    TESTKIT_NATS_AUTH=1 cargo nextest run --workspace --no-fail-fast -E 'package(e2e)' || status=$?
fi
if [[ $failed != 0 && $status == 0 ]]; then
    status=1
fi
exit $status
