#!/usr/bin/env bash
# New authenticated connections per second per gateway core (issue 9): one gateway process
# (`--cores $GATEWAY_CORES`, default 1), nats-server and storage on free loopback ports; then
# `loadgen connect` opens CONNECTIONS connections at each rate of RATES in turn, reading the
# gateway's (and nats-server's) CPU seconds during each ramp from /proc. On this 2-core box
# loadgen and nats-server share the cores with the gateway, so the per-core figure is
# connections ÷ gateway CPU seconds, not connections ÷ wall time.
#
#   bench-results/connect-rate.sh [--skip-build] [--out DIR]
#
# Environment: CONNECTIONS (19000), RATES ("2000 5000 10000 50000" connections/s), HOLD (5s),
# TIMEOUT (15s per handshake), GATEWAY_CORES (1), PROBE (1: the delivery probe after each hold,
# at PROBE_RATE 2000/s; 0 skips it), PERF_RATE (a rate of RATES during whose ramp `perf record -g`
# samples the gateway; empty: no profile), WAIT_QUIET (1), QUIET_PCT (20), NATS_SERVER, GATEWAY_BIN
# (a gateway binary to measure instead of target/release/gateway, for a side-by-side with an
# older build).
#
# Writes each run's connect-<stamp>.{json,md,svg} and a summary connect-rate-<stamp>.md (with
# perf-connect-<stamp>.txt when profiled) into the output directory (default bench-results/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/bench-results"
build=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --skip-build) build=0 ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo/!p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "connect-rate.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
CONNECTIONS="${CONNECTIONS:-19000}"
RATES="${RATES:-2000 5000 10000 50000}"
HOLD="${HOLD:-5s}"
TIMEOUT="${TIMEOUT:-15s}"
GATEWAY_CORES="${GATEWAY_CORES:-1}"
PROBE="${PROBE:-1}"
PROBE_RATE="${PROBE_RATE:-2000}"
PERF_RATE="${PERF_RATE:-}"
LOG_TAG=connect-rate
# shellcheck source=bench-results/lib.sh
source "$root/bench-results/lib.sh"
NATS="$(find_nats)"

if [[ $build == 1 ]]; then
    (cd "$root" && cargo build --release -p gateway -p storage -p loadgen)
fi
bin="$root/target/release"
work="$(mktemp -d /tmp/connect-rate.XXXXXX)"
cp "$bin/loadgen" "$bin/storage" "$work/"
# GATEWAY_BIN: another gateway build to measure (e.g. an older commit's, for a side-by-side).
cp "${GATEWAY_BIN:-$bin/gateway}" "$work/gateway"
log "gateway binary: ${GATEWAY_BIN:-$bin/gateway} (sha256 $(sha256sum "$work/gateway" | cut -c1-16))"
export PATH="$work:$PATH"
cleanup() { stop_all; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n "$(ulimit -Hn)"

JWT_SECRET="rate-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"; export JWT_SECRET
np="$(free_port)"; nm="$(free_port)"; sm="$(free_port)"; gp="$(free_port)"; gm="$(free_port)"
start nats-server "$NATS" -js -a 127.0.0.1 -p "$np" -m "$nm" -sd "$work/store"; nats_pid=$LAST_PID
wait_ready nats-server "http://127.0.0.1:$nm/healthz" "$nats_pid" "$work/nats-server.log"
start storage storage --nats-url "nats://127.0.0.1:$np" --metrics-addr "127.0.0.1:$sm"
wait_ready storage "http://127.0.0.1:$sm/readyz" "$LAST_PID" "$work/storage.log"
start gateway gateway --listen "127.0.0.1:$gp" --metrics-addr "127.0.0.1:$gm" \
    --nats-url "nats://127.0.0.1:$np" --cores "$GATEWAY_CORES"
gw_pid=$LAST_PID
wait_ready gateway "http://127.0.0.1:$gm/readyz" "$gw_pid" "$work/gateway.log"
log "nats-server $nats_pid, gateway $gw_pid (--cores $GATEWAY_CORES) on port $gp"

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
probe=(--probe-rate "$PROBE_RATE")
[[ "$PROBE" == 1 ]] || probe=(--no-probe)
jsons=()
status=0
for rate in $RATES; do
    # The previous run's connections must be gone from the gateway (and its per-user state, kept
    # 2 s after a user's last connection) before the next ramp is measured.
    for _ in $(seq 1 100); do
        open="$(curl -sf "http://127.0.0.1:$gm/metrics" | awk '$1 == "gateway_connections_open" { print $2 }')"
        [[ "${open:-0}" == 0 ]] && break
        sleep 0.2
    done
    sleep 3
    wait_quiet
    perf_pid=""
    if [[ "$rate" == "$PERF_RATE" ]]; then
        # The ramp lasts about CONNECTIONS / rate seconds after the workers start (~0.1 s).
        secs="$(awk -v c="$CONNECTIONS" -v r="$rate" 'BEGIN { printf "%.1f", c / r + 1 }')"
        /usr/bin/perf record -g -F 999 -p "$gw_pid" -o "$work/perf.data" -- sleep "$secs" >"$work/perf.log" 2>&1 &
        perf_pid=$!
        sleep 0.3
    fi
    log "rate $rate/s: $CONNECTIONS connections"
    rc=0
    loadgen connect --url "ws://127.0.0.1:$gp/ws" --metrics-url "http://127.0.0.1:$gm/metrics" \
        --gateway-pid "$gw_pid" --nats-pid "$nats_pid" --connections "$CONNECTIONS" --rate "$rate" \
        --timeout "$TIMEOUT" --settle 1s --hold "$HOLD" "${probe[@]}" --out "$out" | tee "$work/run-$rate.out" || rc=$?
    [[ $rc == 0 ]] || status=$rc
    if [[ -n "$perf_pid" ]]; then
        wait "$perf_pid" || true
        {
            echo "# perf record -g -F 999 -p <gateway> during the ramp at $rate/s ($CONNECTIONS connections), $stamp"
            echo "# by thread"
            /usr/bin/perf report -i "$work/perf.data" --no-children --stdio -g none --sort comm 2>/dev/null | grep -v '^$'
            echo
            echo "# by thread and shared object, entries above 1 %"
            /usr/bin/perf report -i "$work/perf.data" --no-children --stdio -g none --sort comm,dso --percent-limit 1 2>/dev/null | grep -v '^$'
            echo
            echo "# flat profile (self time), entries above 0.5 %"
            /usr/bin/perf report -i "$work/perf.data" --no-children --stdio -g none --percent-limit 0.5 2>/dev/null | grep -v '^$'
            echo
            echo "# with children (inclusive time), entries above 3 %"
            /usr/bin/perf report -i "$work/perf.data" --children --stdio -g none --percent-limit 3 2>/dev/null | grep -v '^$'
        } >"$out/perf-connect-$stamp.txt"
        log "profile: $out/perf-connect-$stamp.txt"
    fi
    json="$(sed -n 's/^results: \(.*\.json\) and .*/\1/p' "$work/run-$rate.out" | tail -n1)"
    [[ -z "$json" ]] || jsons+=("$json")
done

summary="$out/connect-rate-$stamp.md"
{
    echo "# Connection rate, one gateway process — $stamp"
    echo
    echo "* command: \`CONNECTIONS=$CONNECTIONS RATES=\"$RATES\" HOLD=$HOLD TIMEOUT=$TIMEOUT GATEWAY_CORES=$GATEWAY_CORES PROBE=$PROBE PROBE_RATE=$PROBE_RATE PERF_RATE=$PERF_RATE bench-results/connect-rate.sh\`"
    echo "* commit: \`$(git -C "$root" rev-parse HEAD)\`; machine: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); somaxconn $(cat /proc/sys/net/core/somaxconn), tcp_max_syn_backlog $(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)"
    echo "* one gateway (\`--cores $GATEWAY_CORES\`, default limits), nats-server and storage; loadgen connect workers on the same 2 cores; CPU seconds from /proc/<pid>/stat over each ramp (workers started → every connection synced or failed)"
    echo
    echo "| target /s | opened | failed (by cause) | ramp s | achieved /s | gateway CPU s (cores busy) | **connections per gateway CPU s** | nats-server CPU s | loadgen CPU s | synced p50 / p99 / max | probe | file |"
    echo "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"
    for j in "${jsons[@]}"; do
        jq -r '.results as $r | $r.ramp.cpu as $c | $r.handshake_latency.tcp_to_synced as $h |
            def ms: if . == null then "–" else (. / 1000 | tostring | .[0:6]) + " ms" end;
            def f(d): if . == null then "–" else (. * d | round / d | tostring) end;
            "| \(.config.rate) | \($r.opened) | \(if $r.failed == 0 then "0" else ($r.failures_by_cause | to_entries | map("\(.key) ×\(.value)") | join(", ")) end) | \($r.ramp.seconds | f(100)) | \($r.ramp.achieved_rate_per_s | round) | \($c.gateway_cpu_seconds | f(100)) (\($c.gateway_cores_busy | f(100))) | **\($c.connections_per_gateway_cpu_second | f(1))** | \($c.nats_server_cpu_seconds | f(100)) | \($c.loadgen_workers_cpu_seconds | f(100)) | \($h.p50_us | ms) / \($h.p99_us | ms) / \($h.max_us | ms) | \(if $r.probe == null then "off" else "\($r.probe.delivered)/\($r.probe.ring_connections) delivered, \($r.probe.lost) lost" end) | \(input_filename | split("/") | last) |"' "$j"
    done
} >"$summary"
cat "$summary"
exit "$status"
