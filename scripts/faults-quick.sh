#!/usr/bin/env bash
# CI-sized fault-injection check: faults/run.sh --quick over seven of the fault cases (not the
# sync_interval measurement). Each case starts a fresh system, runs a short chat workload with a
# delivery ledger (20 s at 300 msg/s; the router case: a 1024-member group, 12 posts), injects
# one fault, and fails if an acknowledged message is lost, duplicated or reordered.
#
#   scripts/faults-quick.sh [--debug] [--skip-build] [--out DIR] [--cases "…"]
#
# Builds release binaries (`cargo build --release -p gateway -p storage -p router -p loadgen`)
# unless --skip-build; --debug uses target/debug instead (slower to run, quicker to build).
# Takes about 2.5 minutes on 2 cores with release or debug binaries (plus the build). Results and logs:
# bench-results/faults/quick-<UTC stamp>/ (faults.md, faults.json, one directory per case).
# Exit status: 0 all cases passed; 1 a case lost, duplicated or reordered messages; 2 setup.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# nats-kill-retry / nats-kill-churn / nats-kill-group are left to the full suite: the first two
# fail intermittently on a known ordering bug (see bench-results/faults/README.md).
cases="gateway-kill router-kill storage-kill-churn nats-kill nats-kill-retry cluster-node-kill gateway-nats-cut"
args=()
out="$root/bench-results/faults/quick-$(date -u +%Y%m%dT%H%M%SZ)"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cases) cases="$2"; shift ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) args+=("$1") ;;
    esac
    shift
done
# In CI nothing else builds on the machine: do not wait for other cargo processes.
export WAIT_QUIET="${WAIT_QUIET:-0}"
exec "$root/faults/run.sh" --quick --cases "$cases" --out "$out" "${args[@]}"
