#!/usr/bin/env bash
# Compares this system with reference WebSocket servers in one run (`loadgen peer`, issues 5 and 9)
# and writes peer-<timestamp>.{json,md} into the output directory.
#
#   bench-results/peer.sh [--skip-build] [--quick] [--out DIR] [-- extra loadgen peer flags]
#
# 1. builds loadgen, gateway, storage, router and peer-tokio-ws (release) unless --skip-build;
#    installs Node and npm (Debian packages) when missing and the Node server's packages
#    (peers/node-ws: ws, bufferutil) with `npm ci` when node_modules does not match the lockfile;
# 2. starts on free loopback ports: nats-server (JetStream in a temporary store), storage, router
#    and one gateway (--cores $GATEWAY_CORES, $GATEWAY_FLAGS) — our system —, the tokio-tungstenite
#    reference server (peers/tokio-ws, one runtime worker per CPU) and the Node ws one
#    (peers/node-ws), all verifying the same fresh HS256 secret;
# 3. runs `loadgen peer` against the three in turn: CONNECTIONS idle connections each (memory per
#    connection from /proc VmRSS), then the echo and broadcast workloads at max rate for DURATION
#    each (messages per CPU second from /proc utime+stime);
# 4. stops everything it started and keeps the services' logs in <out>/logs-peer-<timestamp>/.
#
# Environment overrides: NATS_SERVER (path to nats-server), CONNECTIONS (5000), CONNECT_RATE
# (1000), HOLD (10s), USERS (100), FANOUT (9: groups of 10), WINDOW (32), DURATION (20s),
# GATEWAY_CORES (2), GATEWAY_FLAGS ("--messages-per-sec 0 --user-messages-per-sec 0": the gateway's send
# limit would otherwise cap the max-rate workloads; the references have none), WAIT_QUIET (1: wait
# until other processes leave the machine under QUIET_PCT (20) % busy before measuring).
# --quick: 500 connections, 40 users (fanout 4), 3 s per workload — a smoke test, not a result.
#
# Exit status: that of loadgen peer (0 clean; 1 ledger violations; 2 could not run; 3 errors).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/bench-results"
build=1
quick=0
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --skip-build) build=0 ;;
        --quick) quick=1 ;;
        --out) out="$2"; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo/!p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "peer.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"

CONNECTIONS="${CONNECTIONS:-5000}"
CONNECT_RATE="${CONNECT_RATE:-1000}"
HOLD="${HOLD:-10s}"
USERS="${USERS:-100}"
FANOUT="${FANOUT:-9}"
WINDOW="${WINDOW:-32}"
DURATION="${DURATION:-20s}"
GATEWAY_CORES="${GATEWAY_CORES:-2}"
GATEWAY_FLAGS="${GATEWAY_FLAGS---messages-per-sec 0 --user-messages-per-sec 0}"
WAIT_QUIET="${WAIT_QUIET:-1}"
QUIET_PCT="${QUIET_PCT:-20}"
if [[ $quick == 1 ]]; then
    CONNECTIONS=500 HOLD=2s USERS=40 FANOUT=4 DURATION=3s
fi

LOG_TAG=peer
# shellcheck source=bench-results/lib.sh
source "$root/bench-results/lib.sh"
NATS="$(find_nats)"

# Node and the Node server's packages.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "installing Debian packages: nodejs npm"
    sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
    timeout 600 $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 $sudo apt-get install -y -qq nodejs npm >/dev/null
fi
node_dir="$root/peers/node-ws"
if ! [[ -f "$node_dir/node_modules/.package-lock.json" && "$node_dir/node_modules/.package-lock.json" -nt "$node_dir/package-lock.json" ]]; then
    log "npm ci in peers/node-ws"
    (cd "$node_dir" && timeout 600 npm ci --no-audit --no-fund --loglevel=error)
fi

bins=(loadgen gateway storage router peer-tokio-ws)
if [[ $build == 1 ]]; then
    log "building (release): ${bins[*]}"
    (cd "$root" && cargo build --release -p loadgen -p gateway -p storage -p router -p peer-tokio-ws)
fi
bin="$root/target/release"
for b in "${bins[@]}"; do
    [[ -x "$bin/$b" ]] || { echo "peer.sh: $bin/$b missing (build it)" >&2; exit 2; }
done
# Snapshot the binaries: other builds may replace target/release/* while we run.
work="$(mktemp -d /tmp/bench-peer.XXXXXX)"
for b in "${bins[@]}"; do cp "$bin/$b" "$work/"; done
# Invoked as plain `loadgen` (from PATH) so recorded command lines read as typed.
export PATH="$work:$PATH"

nats_port="$(free_port)"; nats_mon="$(free_port)"; storage_metrics="$(free_port)"; router_metrics="$(free_port)"
gw_port="$(free_port)"; gw_metrics="$(free_port)"; tokio_port="$(free_port)"; node_port="$(free_port)"
nats_url="nats://127.0.0.1:$nats_port"
JWT_SECRET="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export JWT_SECRET

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
logs="$out/logs-peer-$stamp"
mkdir -p "$logs"
exec 2> >(tee -a "$logs/peer.log" >&2)
{
    echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "binaries: $([[ $build == 1 ]] && echo "built by this run" || echo "NOT rebuilt (--skip-build)")"
    for b in "${bins[@]}"; do echo "  $b  sha256 $(sha256sum "$work/$b" | cut -c1-16)"; done
    echo "node $(node --version); ws $(node -p "require('$node_dir/node_modules/ws/package.json').version")"
    echo "uncommitted changes (git status --porcelain):"
    git -C "$root" status --porcelain 2>/dev/null || true
} >"$logs/source.txt"

cleanup() { stop_all; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

ulimit -n "$(ulimit -Hn)"
start nats-server "$NATS" -js -sd "$work/jetstream" -a 127.0.0.1 -p "$nats_port" -m "$nats_mon"
nats_pid=$LAST_PID; wait_ready nats-server "http://127.0.0.1:$nats_mon/healthz" "$LAST_PID" "$logs/nats-server.log"
start storage "$work/storage" --nats-url "$nats_url" --metrics-addr "127.0.0.1:$storage_metrics"
storage_pid=$LAST_PID; wait_ready storage "http://127.0.0.1:$storage_metrics/readyz" "$LAST_PID" "$logs/storage.log"
start router "$work/router" --nats-url "$nats_url" --metrics-addr "127.0.0.1:$router_metrics"
router_pid=$LAST_PID; wait_ready router "http://127.0.0.1:$router_metrics/readyz" "$LAST_PID" "$logs/router.log"
# shellcheck disable=SC2086
start gateway "$work/gateway" --listen "127.0.0.1:$gw_port" --metrics-addr "127.0.0.1:$gw_metrics" \
    --nats-url "$nats_url" --cores "$GATEWAY_CORES" $GATEWAY_FLAGS
gw_pid=$LAST_PID; wait_ready gateway "http://127.0.0.1:$gw_metrics/readyz" "$LAST_PID" "$logs/gateway.log"
start peer-tokio-ws "$work/peer-tokio-ws" --listen "127.0.0.1:$tokio_port"
tokio_pid=$LAST_PID; wait_ready peer-tokio-ws "127.0.0.1:$tokio_port" "$LAST_PID" "$logs/peer-tokio-ws.log"
start peer-node-ws node "$node_dir/server.mjs" --listen "127.0.0.1:$node_port"
node_pid=$LAST_PID; wait_ready peer-node-ws "127.0.0.1:$node_port" "$LAST_PID" "$logs/peer-node-ws.log"
log "ready: gateway pid $gw_pid (nats-server $nats_pid, storage $storage_pid, router $router_pid), tokio $tokio_pid, node $node_pid"
wait_quiet

rc=0
loadgen peer \
    --gateway-url "ws://127.0.0.1:$gw_port/ws" --gateway-pid "$gw_pid" \
    --backend-pid "nats-server=$nats_pid" --backend-pid "storage=$storage_pid" --backend-pid "router=$router_pid" \
    --tokio-url "ws://127.0.0.1:$tokio_port/ws" --tokio-pid "$tokio_pid" \
    --node-url "ws://127.0.0.1:$node_port/ws" --node-pid "$node_pid" \
    --connections "$CONNECTIONS" --connect-rate "$CONNECT_RATE" --hold "$HOLD" \
    --users "$USERS" --fanout "$FANOUT" --window "$WINDOW" --duration "$DURATION" \
    --out "$out" "${extra[@]}" | tee "$logs/loadgen-peer.out" || rc=$?
log "loadgen peer exit status $rc; logs in $logs"
exit "$rc"
