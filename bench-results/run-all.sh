#!/usr/bin/env bash
# Runs the whole benchmark suite against a system of its own and writes the results here.
#
#   bench-results/run-all.sh [--skip-build] [--quick] [--out DIR]
#
# 1. builds loadgen, gateway, storage and router (release) unless --skip-build;
# 2. starts nats-server (free port, JetStream in a temporary store), storage, the router and one
#    gateway (--cores 2), waiting for each to be ready;
# 3. runs, writing <scenario>-<timestamp>.{json,md} into the output directory:
#      baseline  raw JetStream publish (INBOX-like scratch stream) + publish→republish round trip
#      chat      100 users in pairs at max rate (closed loop, window $CHAT_WINDOW per connection)
#      chat      the same users, open loop at half the delivered rate the max run reached
#      offline   $OFFLINE_SENDERS senders fill the inboxes of $OFFLINE_RECIPIENTS offline recipients
#                ($OFFLINE_MESSAGES messages per sender), then the recipients connect at once
#                and drain
#      storm     $STORM_CLIENTS clients receiving from $STORM_SENDERS senders; loadgen resets every
#                client socket at once; the clients reconnect with backoff and drain
#      storm     the same, but the gateway is killed (SIGKILL) and started again
#      group     one $GROUP_MEMBERS-member group, all online, one member posting $GROUP_RATE/s
#                ($GROUP_MESSAGES posts): send → last member delivered (needs the router)
#      connect   19,000 authenticated idle connections, against a freshly restarted gateway so
#                that its RSS before the ramp is a clean 0-connection baseline; the gateway's and
#                nats-server's CPU during the ramp (connections per gateway CPU second), then the
#                delivery probe (every connection sends one message and must receive one)
#    and a latency plot (<scenario>-<timestamp>.svg) next to each;
# 4. stops everything it started and keeps the services' logs in <out>/logs-<timestamp>/.
#
# Environment overrides: NATS_SERVER (path to nats-server), CHAT_USERS (100), CHAT_WINDOW (32),
# CHAT_DURATION (30s), BASELINE_DURATION (15s), CONNECTIONS (19000), CONNECT_RATE (2000),
# HOLD (30s), OFFLINE_RECIPIENTS (1000), OFFLINE_SENDERS (100), OFFLINE_MESSAGES (1000),
# STORM_CLIENTS (5000), STORM_SENDERS (20), STORM_RATE (25 msg/s per sender), STORM_BEFORE (10s),
# STORM_AFTER (10s), GROUP_MEMBERS (1024), GROUP_MESSAGES (100), GROUP_RATE (5), GATEWAY_CORES (2), QUIET_PCT (20), MAX_OTHER_PCT (10), ATTEMPTS (3), GATEWAY_FLAGS (extra gateway flags, default
# "--messages-per-sec 0 --user-messages-per-sec 0": the gateway's per-connection and per-user
# send limits, 50 and 100 msg/s by default, would otherwise cap 100 users at 5,000 msg/s and the
# max-rate run would measure the policy, not the system), WAIT_QUIET (1: before each measurement wait until other processes leave the machine
# under QUIET_PCT % busy, since it may be shared). A measurement during which other processes
# used more than MAX_OTHER_PCT % of the machine is discarded (kept under logs-*/discarded/) and
# repeated, up to ATTEMPTS times; cpu-accounting.tsv in the logs shows where the CPU went.
#
# Exit status: 0 when every scenario passed, otherwise the last non-zero loadgen status.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/bench-results"
build=1
quick=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --skip-build) build=0 ;;
        --quick) quick=1 ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo/!p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run-all.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"

CHAT_USERS="${CHAT_USERS:-100}"
CHAT_WINDOW="${CHAT_WINDOW:-32}"
CHAT_DURATION="${CHAT_DURATION:-30s}"
BASELINE_DURATION="${BASELINE_DURATION:-15s}"
CONNECTIONS="${CONNECTIONS:-19000}"
CONNECT_RATE="${CONNECT_RATE:-2000}"
HOLD="${HOLD:-30s}"
OFFLINE_RECIPIENTS="${OFFLINE_RECIPIENTS:-1000}"
OFFLINE_SENDERS="${OFFLINE_SENDERS:-100}"
OFFLINE_MESSAGES="${OFFLINE_MESSAGES:-1000}"
STORM_CLIENTS="${STORM_CLIENTS:-5000}"
STORM_SENDERS="${STORM_SENDERS:-20}"
STORM_RATE="${STORM_RATE:-25}"
STORM_BEFORE="${STORM_BEFORE:-10s}"
STORM_AFTER="${STORM_AFTER:-10s}"
GROUP_MEMBERS="${GROUP_MEMBERS:-1024}"
GROUP_MESSAGES="${GROUP_MESSAGES:-100}"
GROUP_RATE="${GROUP_RATE:-5}"
GATEWAY_CORES="${GATEWAY_CORES:-2}"
GATEWAY_FLAGS="${GATEWAY_FLAGS---messages-per-sec 0 --user-messages-per-sec 0}"
WAIT_QUIET="${WAIT_QUIET:-1}"
if [[ $quick == 1 ]]; then
    CHAT_DURATION=5s BASELINE_DURATION=3s CONNECTIONS=1000 HOLD=5s
    OFFLINE_RECIPIENTS=100 OFFLINE_SENDERS=20 OFFLINE_MESSAGES=100
    STORM_CLIENTS=500 STORM_BEFORE=3s STORM_AFTER=3s
    GROUP_MEMBERS=64 GROUP_MESSAGES=10
fi

LOG_TAG=run-all
# shellcheck source=bench-results/lib.sh
source "$root/bench-results/lib.sh"
NATS="$(find_nats)"

if [[ $build == 1 ]]; then
    log "building (release): loadgen gateway storage router"
    (cd "$root" && cargo build --release -p loadgen -p gateway -p storage -p router)
fi
bin="$root/target/release"
for b in loadgen gateway storage router; do
    [[ -x "$bin/$b" ]] || { echo "run-all.sh: $bin/$b missing (build it)" >&2; exit 2; }
done
# Snapshot the binaries: other builds may replace target/release/* while we run.
work="$(mktemp -d /tmp/bench-run.XXXXXX)"
cp "$bin/loadgen" "$bin/gateway" "$bin/storage" "$bin/router" "$work/"
# Invoked as plain `loadgen` (from PATH) so recorded command lines read as typed.
export PATH="$work:$PATH"

nats_port="$(free_port)"; nats_mon="$(free_port)"; storage_metrics="$(free_port)"; router_metrics="$(free_port)"
gw_port="$(free_port)"; gw_metrics="$(free_port)"
nats_url="nats://127.0.0.1:$nats_port"
ws_url="ws://127.0.0.1:$gw_port/ws"
metrics_url="http://127.0.0.1:$gw_metrics/metrics"
# A fresh secret per run (≥ 16 bytes), shared by the gateway and loadgen through the environment.
JWT_SECRET="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export JWT_SECRET

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
logs="$out/logs-$stamp"
mkdir -p "$logs"
runlog="$logs/run-all.log"
exec 2> >(tee -a "$runlog" >&2)
# What the binaries were built from (other engineers may have uncommitted work in the tree).
{
    echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [[ $build == 1 ]]; then
        echo "binaries: built by this run from the working tree below"
    else
        echo "binaries: NOT rebuilt (--skip-build); as found in target/release:"
    fi
    for b in loadgen gateway storage router; do
        echo "  $b  $(date -u -r "$bin/$b" +%Y-%m-%dT%H:%M:%SZ)  sha256 $(sha256sum "$work/$b" | cut -c1-16)"
    done
    echo "uncommitted changes (git status --porcelain):"
    git -C "$root" status --porcelain 2>/dev/null || true
} >"$logs/source.txt"

nats_pid="" storage_pid="" router_pid="" gw_pid=""
cleanup() {
    # The storm scenario may have restarted the gateway: its pid is in the pid file.
    stop_pid "$(cat "$work/gateway.pid" 2>/dev/null || echo "$gw_pid")" gateway
    stop_pid "$router_pid" router
    stop_pid "$storage_pid" storage
    stop_pid "$nats_pid" nats-server
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

children_cpu() { # sets CHILD_CPU: CPU seconds of the shell's reaped children (loadgen and its
    # workers). `times` must run in this shell, not in a $(…) subshell, which has no children.
    times >"$work/times"
    CHILD_CPU="$(tail -n1 "$work/times" | awk '{
        split($1, u, /[ms]/); split($2, s, /[ms]/);
        printf "%.2f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }')"
}

# The gateway is started by a script that records its pid in $work/gateway.pid. The storm
# scenario runs it as its --restart-cmd after killing the gateway with kill-gateway.sh (its
# --kill-cmd), which first records the CPU seconds the gateway had used, so that the CPU
# accounting spans both lives. JWT_SECRET reaches the gateway through the environment.
cat >"$work/start-gateway.sh" <<START
#!/usr/bin/env bash
ulimit -n "\$(ulimit -Hn)"
"$work/gateway" --listen "127.0.0.1:$gw_port" --metrics-addr "127.0.0.1:$gw_metrics" \\
    --nats-url "$nats_url" --cores "$GATEWAY_CORES" $GATEWAY_FLAGS >>"$logs/gateway.log" 2>&1 </dev/null &
echo \$! >"$work/gateway.pid"
START
cat >"$work/kill-gateway.sh" <<KILL
#!/usr/bin/env bash
set -e
pid="\$(cat "$work/gateway.pid")"
awk -v hz="\$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print (\$12 + \$13) / hz }' "/proc/\$pid/stat" >"$work/gateway.cpu_at_kill"
kill -KILL "\$pid"
KILL
chmod +x "$work/start-gateway.sh" "$work/kill-gateway.sh"

start_gateway() {
    "$work/start-gateway.sh"
    gw_pid="$(cat "$work/gateway.pid")"
    wait_ready gateway "http://127.0.0.1:$gw_metrics/readyz"
    log "gateway ready (pid $gw_pid) on $ws_url, metrics $metrics_url, flags: --cores $GATEWAY_CORES $GATEWAY_FLAGS"
}

log "nats-server: $NATS ($("$NATS" --version 2>/dev/null || echo '?'))"
"$NATS" -js -sd "$work/jetstream" -a 127.0.0.1 -p "$nats_port" -m "$nats_mon" >"$logs/nats-server.log" 2>&1 &
nats_pid=$!
wait_ready nats-server "http://127.0.0.1:$nats_mon/healthz" "$nats_pid" "$logs/nats-server.log"
"$work/storage" --nats-url "$nats_url" --metrics-addr "127.0.0.1:$storage_metrics" >"$logs/storage.log" 2>&1 &
storage_pid=$!
wait_ready storage "http://127.0.0.1:$storage_metrics/readyz" "$storage_pid" "$logs/storage.log"
"$work/router" --nats-url "$nats_url" --metrics-addr "127.0.0.1:$router_metrics" >"$logs/router.log" 2>&1 &
router_pid=$!
wait_ready router "http://127.0.0.1:$router_metrics/readyz" "$router_pid" "$logs/router.log"
start_gateway

status=0
results_of() { # loadgen output → the JSON path it wrote
    sed -n 's/^results: \(.*\.json\) and .*/\1/p' "$1" | tail -n1
}
printf 'scenario\tattempt\tkept\twall_s\tmachine_busy_cpu_s\tnats_server_cpu_s\tstorage_cpu_s\trouter_cpu_s\tgateway_cpu_s\tloadgen_cpu_s\tother_processes_cpu_s\tother_pct_of_machine\n' >"$logs/cpu-accounting.tsv"
MAX_OTHER_PCT="${MAX_OTHER_PCT:-10}"
ATTEMPTS="${ATTEMPTS:-3}"
run_loadgen() { # name args... — runs once more (up to ATTEMPTS) when other processes took more
    # than MAX_OTHER_PCT % of the machine meanwhile; discarded results go to <logs>/discarded/.
    local name="$1"; shift
    local attempt rc hz ncpu t0 t1 b0 b1 n0 n1 s0 s1 r0 r1 g0 g1 l0 l1 row other_pct files
    hz="$(getconf CLK_TCK)"; ncpu="$(nproc)"
    for attempt in $(seq 1 "$ATTEMPTS"); do
        wait_quiet
        log "loadgen $name (attempt $attempt): $*"
        rc=0
        t0="$(date +%s.%N)"; b0="$(busy_ticks)"; children_cpu; l0="$CHILD_CPU"
        n0="$(cpu_seconds "$nats_pid")"; s0="$(cpu_seconds "$storage_pid")"; g0="$(cpu_seconds "$gw_pid")"
        r0="$(cpu_seconds "$router_pid")"
        rm -f "$work/gateway.cpu_at_kill"
        loadgen "$@" --out "$out" | tee "$logs/$name.out" || rc=$?
        t1="$(date +%s.%N)"; b1="$(busy_ticks)"; children_cpu; l1="$CHILD_CPU"
        n1="$(cpu_seconds "$nats_pid")"; s1="$(cpu_seconds "$storage_pid")"; r1="$(cpu_seconds "$router_pid")"
        if [[ "$(cat "$work/gateway.pid")" != "$gw_pid" ]]; then
            # Killed and started again during the run (storm): its first life up to the kill,
            # plus the new one so far.
            gw_pid="$(cat "$work/gateway.pid")"
            wait_ready gateway "http://127.0.0.1:$gw_metrics/readyz"
            g1="$(awk -v k="$(cat "$work/gateway.cpu_at_kill" 2>/dev/null || echo "$g0")" \
                -v n="$(cpu_seconds "$gw_pid")" 'BEGIN { print k + n }')"
            log "the gateway was restarted during $name (pid now $gw_pid)"
        else
            g1="$(cpu_seconds "$gw_pid")"
        fi
        row="$(awk -v t0="$t0" -v t1="$t1" -v hz="$hz" -v ncpu="$ncpu" -v b0="$b0" -v b1="$b1" \
            -v n0="$n0" -v n1="$n1" -v s0="$s0" -v s1="$s1" -v r0="$r0" -v r1="$r1" -v g0="$g0" -v g1="$g1" \
            -v l0="$l0" -v l1="$l1" 'BEGIN {
                busy = (b1 - b0) / hz; dn = n1 - n0; ds = s1 - s0; dr = r1 - r0; dg = g1 - g0; dl = l1 - l0;
                other = busy - dn - ds - dr - dg - dl; if (other < 0) other = 0;
                printf "%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.0f", t1 - t0, busy, dn, ds, dr, dg, dl, other,
                    100 * other / ((t1 - t0) * ncpu) }')"
        other_pct="$(cut -f9 <<<"$row")"
        log "loadgen $name exit status $rc; CPU during the run: $(awk -F'\t' '{ printf "wall %ss, machine busy %ss = nats-server %s + storage %s + router %s + gateway %s + loadgen %s + other processes %s (%s%% of the machine)", $1, $2, $3, $4, $5, $6, $7, $8, $9 }' <<<"$row")"
        if [[ $other_pct -gt $MAX_OTHER_PCT && $attempt -lt $ATTEMPTS ]]; then
            printf '%s\t%s\tno\t%s\n' "$name" "$attempt" "$row" >>"$logs/cpu-accounting.tsv"
            mkdir -p "$logs/discarded"
            files="$(sed -n -e 's/^results: \(.*\.json\) and \(.*\.md\)$/\1 \2/p' \
                -e 's/^plot: \(.*\.svg\)$/\1/p' "$logs/$name.out")"
            # shellcheck disable=SC2086
            [[ -z "$files" ]] || mv $files "$logs/discarded/"
            cp "$logs/$name.out" "$logs/discarded/$name-attempt$attempt.out"
            log "discarding $name attempt $attempt: other processes used ${other_pct}% of the machine (> ${MAX_OTHER_PCT}%)"
            continue
        fi
        printf '%s\t%s\tyes\t%s\n' "$name" "$attempt" "$row" >>"$logs/cpu-accounting.tsv"
        break
    done
    if [[ $rc != 0 ]]; then status=$rc; fi
    return 0
}

run_loadgen baseline baseline --nats-url "$nats_url" --duration "$BASELINE_DURATION" --round-trip
baseline_json="$(results_of "$logs/baseline.out")"
[[ -n "$baseline_json" ]] || { log "baseline wrote no results"; exit 2; }

run_loadgen chat-max chat --url "$ws_url" --metrics-url "$metrics_url" --users "$CHAT_USERS" \
    --rate max --window "$CHAT_WINDOW" --duration "$CHAT_DURATION" --baseline "$baseline_json"
max_json="$(results_of "$logs/chat-max.out")"
[[ -n "$max_json" ]] || { log "chat at max rate wrote no results"; exit 2; }
half="$(jq -r '.results.throughput.delivered_per_s / 2 | floor' "$max_json")"
log "max delivered rate $(jq -r '.results.throughput.delivered_per_s | floor' "$max_json") msg/s → half-rate run at $half msg/s"

run_loadgen chat-half chat --url "$ws_url" --metrics-url "$metrics_url" --users "$CHAT_USERS" \
    --total-rate "$half" --duration "$CHAT_DURATION" --baseline "$baseline_json"

run_loadgen offline offline --url "$ws_url" --metrics-url "$metrics_url" \
    --recipients "$OFFLINE_RECIPIENTS" --senders "$OFFLINE_SENDERS" --messages "$OFFLINE_MESSAGES"

run_loadgen storm-reset storm --url "$ws_url" --metrics-url "$metrics_url" --clients "$STORM_CLIENTS" \
    --senders "$STORM_SENDERS" --rate "$STORM_RATE" --connect-rate 1000 \
    --before "$STORM_BEFORE" --after "$STORM_AFTER"

run_loadgen storm-kill storm --url "$ws_url" --metrics-url "$metrics_url" --clients "$STORM_CLIENTS" \
    --senders "$STORM_SENDERS" --rate "$STORM_RATE" --connect-rate 1000 \
    --before "$STORM_BEFORE" --after "$STORM_AFTER" \
    --kill-cmd "$work/kill-gateway.sh" --restart-cmd "$work/start-gateway.sh"

run_loadgen group group --url "$ws_url" --metrics-url "$metrics_url" \
    --members "$GROUP_MEMBERS" --messages "$GROUP_MESSAGES" --rate "$GROUP_RATE"

log "restarting the gateway for a clean memory baseline"
stop_pid "$gw_pid" gateway
start_gateway
sleep 2
run_loadgen connect connect --url "$ws_url" --metrics-url "$metrics_url" \
    --gateway-pid "$gw_pid" --nats-pid "$nats_pid" \
    --connections "$CONNECTIONS" --rate "$CONNECT_RATE" --hold "$HOLD"

# Snapshot of the backbone after the runs, for the record.
python3 - "http://127.0.0.1:$nats_mon/varz" >"$logs/nats-varz.json" <<'PY' || true
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
PY
log "done; results in $out, logs in $logs (exit status $status)"
exit "$status"
