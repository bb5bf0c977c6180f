#!/usr/bin/env bash
# Fault-injection suite: for each case, start a fresh system, run a chat workload with a delivery
# ledger, inject one fault mid-run, let the run finish, and record what was acknowledged,
# delivered, lost, duplicated, reordered, and how long deliveries took to resume.
#
#   faults/run.sh [--quick] [--cases "a b …"] [--skip-build] [--debug] [--out DIR]
#                 [--sync-interval VALUE] [--bin-dir DIR] [--list]
#
# Cases (all by default, in this order):
#   gateway-kill       2 gateways; kill -9 the one holding half the users; it is restarted 3 s
#                      later. Driver: faults/client.py chat (clients reconnect with jittered
#                      backoff to the other gateway, drain from `since`, re-send unanswered sends
#                      with the same id) — loadgen cannot reconnect.
#   router-kill        a 1024-member group (faults/client.py group); the router is killed -9
#                      the moment post K's fan-out has begun (sent tick back, first copy
#                      delivered), and restarted 2 s later. Every member must get every post
#                      once, in order.
#   storage-kill       loadgen chat; kill -9 storage, restart 2 s later.
#   storage-kill-churn the same fault under faults/client.py chat --churn: users keep leaving and
#                      coming back (so inboxes are drained and purged while storage dies and
#                      restarts; loadgen's users never reconnect, so they never read an inbox).
#   nats-kill          loadgen chat; kill -9 the single nats-server, restart it 2 s later on the
#                      same ports and store.
#   nats-kill-retry    the same fault under faults/client.py chat: clients stay connected and
#                      retry sends answered `unavailable` with the same id (as PROTOCOL.md says).
#   nats-kill-churn    the same fault under faults/client.py chat --churn.
#   nats-kill-group    the router-kill workload (1024-member group), but the nats-server is
#                      killed -9 as post K's fan-out begins, and restarted 2 s later.
#   cluster-node-kill  3 nats-servers (cluster on loopback), storage --replicas 3, services given
#                      all three URLs; loadgen chat; kill -9 the INBOX stream's leader, keep going
#                      on two nodes (12 s; quick: 10 s), bring it back on its store.
#   gateway-nats-cut   2 gateways, one reaching NATS through faults/tcpproxy.py; loadgen chat
#                      over both; the proxy drops that gateway's NATS connection (RST) and refuses
#                      it for 5 s, then lets it back (the gateway must resync its users from their
#                      inboxes).
#   sync-cost          JetStream sync_interval default (2m) vs `always`: loadgen baseline, loadgen
#                      chat at max rate and open loop, same binaries, one after the other.
#
# --quick: shorter runs (CI-sized, see scripts/faults-quick.sh). --debug: use target/debug
# binaries (built with `cargo build`), otherwise target/release. --bin-dir DIR: take gateway,
# storage, router and loadgen from DIR (implies --skip-build). --sync-interval: the
# JetStream sync_interval of the fault cases (default: not set, nats-server's 2m).
#
# Results: DIR (default bench-results/faults/<UTC stamp>/) gets one directory per case (logs,
# generated nats configs, the driver's JSON, result.json) and faults.md + faults.json (the
# table, machine, commands, commit). Exit status: 0 when every case passed (no loss, no
# duplicate, no reorder), 1 if any case failed, 2 if the suite could not run.
#
# Environment: FAULTS_RATE, FAULTS_USERS, FAULTS_DURATION, FAULTS_CHURN (override the sizes),
# NATS_SERVER (nats-server binary), GATEWAY_CORES (1), WAIT_QUIET (1: before each
# case wait, up to WAIT_QUIET_MAX=900 s, for running rustc/cargo to finish; the machine may be
# shared).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_CASES="gateway-kill router-kill storage-kill storage-kill-churn nats-kill nats-kill-retry nats-kill-churn nats-kill-group cluster-node-kill gateway-nats-cut sync-cost"
cases="$ALL_CASES"
quick=0 build=1 profile=release out="" sync_interval="" bin_dir=""
orig_args="$*"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1 ;;
        --cases) cases="$2"; shift ;;
        --skip-build) build=0 ;;
        --debug) profile=debug ;;
        --out) out="$2"; shift ;;
        --sync-interval) sync_interval="$2"; shift ;;
        --bin-dir) bin_dir="$(cd "$2" && pwd)"; build=0; shift ;;
        --list) echo "$ALL_CASES"; exit 0 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "faults/run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
for c in $cases; do
    [[ " $ALL_CASES " == *" $c "* ]] || { echo "faults/run.sh: unknown case $c (see --list)" >&2; exit 2; }
done

# Sizes. Modest rates: the machine is shared, and a fault suite is about correctness.
if [[ $quick == 1 ]]; then
    DURATION=20 FAULT_AT=5 GRACE=30 RATE=300 USERS=50
    GROUP_MEMBERS=1024 GROUP_POSTS=12 GROUP_RATE=2 GROUP_MARK=4
    SYNC_DURATION=5s SYNC_ROUNDS=1 SYNC_VARIANTS="1:default 1:always"
else
    DURATION=30 FAULT_AT=10 GRACE=40 RATE=500 USERS=100
    GROUP_MEMBERS=1024 GROUP_POSTS=30 GROUP_RATE=2 GROUP_MARK=12
    SYNC_DURATION=10s SYNC_ROUNDS=2 SYNC_VARIANTS="1:default 1:always 3:default 3:always"
fi
# Environment overrides (for reproductions): FAULTS_RATE, FAULTS_USERS, FAULTS_DURATION, FAULTS_CHURN.
RATE="${FAULTS_RATE:-$RATE}" USERS="${FAULTS_USERS:-$USERS}" DURATION="${FAULTS_DURATION:-$DURATION}"
RESTART_AFTER=2 GW_RESTART_AFTER=3 CUT_FOR=5 CHURN="${FAULTS_CHURN:-4}"
# router-kill runs the router with one PubAck outstanding: with the default (4096) a 1023-copy
# fan-out is published in ~40 ms, faster than the kill can follow its first delivered copy, so the
# kill would often land after the last copy was sent. One at a time stretches it to a few hundred
# ms, and the kill lands while copies are still being published (see copies_missing_at_kill and
# torn_posts_complete_after_s in the results).
ROUTER_FLAGS="${FAULTS_ROUTER_FLAGS---max-inflight 1}"
# Long enough to see the survivors elect a new INBOX leader before the node comes back.
CLUSTER_DOWN=$([[ $quick == 1 ]] && echo 10 || echo 12)

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="${out:-$root/bench-results/faults/$stamp}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
suite_t0=$(date +%s)

find_nats() {
    local c
    for c in "${NATS_SERVER:-}" "$root/.tools/bin/nats-server" "$(command -v nats-server || true)"; do
        if [[ -n "$c" && -x "$c" ]]; then echo "$c"; return; fi
    done
    echo "faults/run.sh: no nats-server (run scripts/install-nats.sh)" >&2
    exit 2
}
[[ -x "$root/.tools/bin/nats-server" || -n "${NATS_SERVER:-}" ]] || "$root/scripts/install-nats.sh"
NATS="$(find_nats)"
command -v jq >/dev/null || { echo "faults/run.sh: jq is required" >&2; exit 2; }
command -v curl >/dev/null || { echo "faults/run.sh: curl is required" >&2; exit 2; }

# The clients need `websockets` (pinned, in a venv of their own under .tools/).
PY="$root/.tools/faults-venv/bin/python"
if ! "$PY" -c 'import websockets' 2>/dev/null; then
    python3 -m venv "$root/.tools/faults-venv"
    "$root/.tools/faults-venv/bin/pip" install -q -r "$root/faults/requirements.txt"
fi

if [[ $build == 1 ]]; then
    if [[ $profile == release ]]; then
        (cd "$root" && cargo build --release -p gateway -p storage -p router -p loadgen)
    else
        (cd "$root" && cargo build -p gateway -p storage -p router -p loadgen)
    fi
fi
# Snapshot the binaries: other builds may replace target/*/ while the suite runs.
src="${bin_dir:-$root/target/$profile}"
snap="$(mktemp -d /tmp/faults-bin.XXXXXX)"
for b in gateway storage router loadgen; do
    [[ -x "$src/$b" ]] || { echo "faults/run.sh: $src/$b missing (build it)" >&2; exit 2; }
    cp "$src/$b" "$snap/"
done
bin="$snap"
export PATH="$bin:$PATH"   # loadgen records its command line as typed: `loadgen chat …`

JWT_SECRET="faults-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export JWT_SECRET

# shellcheck source=faults/lib.sh
source "$root/faults/lib.sh"

work_root="$(mktemp -d /tmp/faults-work.XXXXXX)"
cleanup() {
    stop_all 2>/dev/null || true
    rm -rf "$work_root" "$snap"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

exec 2> >(tee -a "$out/run.log" >&2)
{
    echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted changes (git status --porcelain):"
    git -C "$root" status --porcelain 2>/dev/null || true
} >"$out/source.txt"
flog "suite $stamp: cases: $cases; results in $out"
flog "nats-server: $NATS ($("$NATS" --version)); binaries: $src (snapshot in $snap)"

declare -A DESC=(
    [gateway-kill]="Two gateways, $USERS users in pairs across them (faults/client.py chat, $RATE msg/s, ${DURATION}s). At ${FAULT_AT}s the gateway holding half the users is killed with SIGKILL; it is started again ${GW_RESTART_AFTER}s later. Clients reconnect with full-jitter exponential backoff (0.1 s base, 2 s cap) to the next gateway, pass since=<highest seq held>, drain until synced, and re-send every unanswered send with its id."
    [router-kill]="A $GROUP_MEMBERS-member group over two gateways (faults/client.py group): $GROUP_POSTS posts at $GROUP_RATE/s. The router runs with ${ROUTER_FLAGS:-its defaults} (a 1023-copy fan-out then takes ~150 ms instead of ~40 ms, so that the kill lands while copies are still being published). The router is killed with SIGKILL the instant post $GROUP_MARK's fan-out has begun (its sent tick is back and its first copy reached a member; the rest of its $((GROUP_MEMBERS - 1)) copies are in flight) and started again ${RESTART_AFTER}s later. Recovery: from the kill to the first copy delivered after the longest pause."
    [storage-kill]="loadgen chat, $USERS users in pairs, $RATE msg/s for ${DURATION}s, one gateway. At ${FAULT_AT}s storage is killed with SIGKILL and started again ${RESTART_AFTER}s later."
    [storage-kill-churn]="faults/client.py chat --churn $CHURN: $USERS users in pairs, $RATE msg/s for ${DURATION}s, one gateway; every user leaves after an exponential time online (mean ${CHURN}s), stays away 0.2–2 s and comes back (half of them with since=, half from their stored cursor), so inboxes are drained and purged all along. At ${FAULT_AT}s storage is killed with SIGKILL and started again ${RESTART_AFTER}s later."
    [nats-kill-retry]="faults/client.py chat (no churn): $USERS users in pairs, $RATE msg/s for ${DURATION}s, one gateway. At ${FAULT_AT}s the nats-server is killed with SIGKILL and started again ${RESTART_AFTER}s later on the same ports and store. Clients stay connected and, as PROTOCOL.md says, retry a send answered unavailable with the same id (0.1–0.5 s later, holding their later sends back until it is answered)."
    [nats-kill-group]="The router-kill workload (a $GROUP_MEMBERS-member group over two gateways, $GROUP_POSTS posts at $GROUP_RATE/s), but the nats-server is killed with SIGKILL the instant post $GROUP_MARK's fan-out has begun, and started again ${RESTART_AFTER}s later on the same ports and store. The sender retries posts answered unavailable with the same id."
    [nats-kill-churn]="faults/client.py chat --churn $CHURN as in storage-kill-churn. At ${FAULT_AT}s the nats-server is killed with SIGKILL and started again ${RESTART_AFTER}s later on the same ports and store; clients disconnected meanwhile reconnect and re-send unanswered sends with the same id."
    [nats-kill]="loadgen chat, $USERS users in pairs, $RATE msg/s for ${DURATION}s, one gateway, one nats-server. At ${FAULT_AT}s the nats-server is killed with SIGKILL and started again ${RESTART_AFTER}s later with the same config, ports and store."
    [cluster-node-kill]="Three nats-servers clustered on loopback, every stream and bucket at 3 replicas (storage --replicas 3), every service given the three URLs. loadgen chat, $USERS users, $RATE msg/s for ${DURATION}s. At ${FAULT_AT}s the INBOX stream leader is killed with SIGKILL; the run goes on for ${CLUSTER_DOWN}s on two nodes, then the node is started again on its store."
    [gateway-nats-cut]="Two gateways; gw-a reaches NATS through faults/tcpproxy.py, gw-b directly. loadgen chat, $USERS users in pairs across the two gateways, $RATE msg/s for ${DURATION}s. At ${FAULT_AT}s the proxy resets gw-a's NATS connection and refuses reconnects for ${CUT_FOR}s, then forwards again."
)

# The machine may be shared: wait (bounded) for running builds to finish before each case.
wait_quiet() {
    [[ "${WAIT_QUIET:-1}" == 1 ]] || return 0
    local waited=0
    while pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null; do
        (( waited == 0 )) && flog "waiting for running builds (rustc/cargo) to finish"
        sleep 5; waited=$((waited + 5))
        (( waited >= ${WAIT_QUIET_MAX:-900} )) && { flog "still busy after ${waited}s; running anyway"; break; }
    done
    flog "load average: $(cat /proc/loadavg)"
}

# --- one case's frame ------------------------------------------------------------------------
begin_case() { # name fault driver
    wait_quiet
    CASE="$1"; FAULT="$2"; DRIVER="$3"
    case_dir="$out/$CASE"; work="$work_root/$CASE"
    mkdir -p "$case_dir" "$work"
    : >"$case_dir/events.jsonl"
    NOTES=()
    CASE_T0=$(date +%s)
    flog "=== case $CASE: $FAULT"
}

end_case() { # exit_status
    local rc="$1"
    stop_all
    local notes_json="[]"
    if ((${#NOTES[@]})); then notes_json="$(printf '%s\n' "${NOTES[@]}" | jq -R . | jq -s .)"; fi
    jq -n --arg case "$CASE" --arg fault "$FAULT" --arg driver "$DRIVER" --argjson rc "$rc" \
        --argjson runtime "$(($(date +%s) - CASE_T0))" --argjson notes "$notes_json" \
        '{case: $case, fault: $fault, driver: $driver, exit_status: $rc, runtime_s: $runtime, notes: $notes}' \
        >"$case_dir/meta.json"
    local line
    line="$(python3 "$root/faults/report.py" case "$case_dir" || true)"
    flog "case $CASE done in $(($(date +%s) - CASE_T0)) s: $line"
    rm -rf "$work"
}

# loadgen chat in the background; sets DRIVER_PID. Args: extra loadgen flags (urls, metrics).
start_loadgen() {
    loadgen chat "$@" --users "$USERS" --total-rate "$RATE" --duration "${DURATION}s" \
        --grace "${GRACE}s" --out "$case_dir" >"$case_dir/loadgen.out" 2> >(stamp_lines "$case_dir/loadgen.stderr") &
    DRIVER_PID=$!
    wait_for_line "$case_dir/loadgen.stderr" "sending for" 120 || { flog "loadgen did not start sending"; return 1; }
    DRIVER_T0=$(now)
}

start_client() { # mode args...
    local mode="$1"; shift
    "$PY" "$root/faults/client.py" "$mode" "$@" --out "$case_dir/client.json" >"$case_dir/client.log" 2>&1 &
    DRIVER_PID=$!
    local pat="sending"
    [[ $mode == group ]] && pat="creation event seen"
    wait_for_line "$case_dir/client.log" "$pat" 180 || { flog "client.py did not start"; return 1; }
    DRIVER_T0=$(now)
}

# Waits for the driver, bounded; its exit status goes to DRIVER_RC (not via $(…): a subshell
# cannot wait for its parent's children).
wait_driver() { # max_seconds
    local deadline=$(( $(date +%s) + $1 )) rc=0
    while kill -0 "$DRIVER_PID" 2>/dev/null && (( $(date +%s) < deadline )); do sleep 0.2; done
    if kill -0 "$DRIVER_PID" 2>/dev/null; then
        flog "driver still running after $1 s: killing it"
        kill -TERM "$DRIVER_PID" 2>/dev/null || true; sleep 2; kill -KILL "$DRIVER_PID" 2>/dev/null || true
    fi
    wait "$DRIVER_PID" || rc=$?
    DRIVER_RC=$rc
}

sleep_until() { # epoch seconds (float)
    local d
    d="$(python3 -c "import sys,time; print(max(0.0, float(sys.argv[1]) - time.time()))" "$1")"
    sleep "$d"
}

gw_open() { # gateway name → its open connections
    curl -fsS --max-time 2 "${GW_METRICS[$1]}" 2>/dev/null | awk '$1 == "gateway_connections_open" { print $2 }' | head -n1
}

driver_budget() { echo $(( DURATION + GRACE + 120 )); }

# --- the cases -------------------------------------------------------------------------------
case_gateway-kill() {
    begin_case gateway-kill "kill -9 of a gateway holding users; restarted ${GW_RESTART_AFTER}s later" "client.py chat (reconnecting)"
    start_nats 1 "$sync_interval" && start_storage && start_gateway gw-a "$NATS_URL" && start_gateway gw-b "$NATS_URL" || { end_case 2; return; }
    start_sampler "$(( $(date +%s) + DURATION + GRACE + 200 ))" "${GW_METRICS[gw-a]}" "${GW_METRICS[gw-b]}"
    start_client chat --url "${GW_WS[gw-a]}" --url "${GW_WS[gw-b]}" --users "$USERS" --total-rate "$RATE" \
        --duration "$DURATION" --grace "$GRACE" || { end_case 2; return; }
    sleep_until "$(python3 -c "print($DRIVER_T0 + $FAULT_AT)")"
    local held; held="$(gw_open gw-a)"
    event fault "kill -9 gw-a holding ${held:-?} connections"
    kill9 gw-a
    sleep "$GW_RESTART_AFTER"
    respawn gw-a "$case_dir/gw-a.log"
    event restarted "gw-a process started"
    gateway_ready gw-a
    event restore "gw-a restarted and ready"
    NOTES+=("gw-a held ${held:-?} of $USERS connections when it was killed.")
    wait_driver "$(driver_budget)"
    end_case "$DRIVER_RC"
}

# A 1024-member group run with one fault injected the instant post $GROUP_MARK's fan-out has
# begun. $1 = case, $2 = fault text, $3 = function injecting it, $4 = extra router flags.
group_case() {
    begin_case "$1" "$2" "client.py group"
    # shellcheck disable=SC2086
    start_nats 1 "$sync_interval" && start_storage && start_router ${4:-} && \
        start_gateway gw-a "$NATS_URL" && start_gateway gw-b "$NATS_URL" || { end_case 2; return; }
    start_sampler "$(( $(date +%s) + 600 ))" "${GW_METRICS[gw-a]}" "${GW_METRICS[gw-b]}"
    # The client writes one line into this FIFO the instant post $GROUP_MARK's fan-out has begun
    # (its `sent` is back and its first copy reached a member); the fault follows at once.
    local mark="$work/mark.fifo" mfd line
    mkfifo "$mark"
    exec {mfd}<>"$mark"
    start_client group --url "${GW_WS[gw-a]}" --url "${GW_WS[gw-b]}" --members "$GROUP_MEMBERS" \
        --messages "$GROUP_POSTS" --rate "$GROUP_RATE" --mark-after "$GROUP_MARK" --mark-file "$mark" \
        --grace 120 || { exec {mfd}>&-; end_case 2; return; }
    if ! read -r -t 150 -u "$mfd" line; then
        exec {mfd}>&-
        flog "post $GROUP_MARK's fan-out never began"; end_case 2; return
    fi
    "$3"
    exec {mfd}>&-
    wait_driver 400
    local ord
    ord="$(jq -r '"posts acknowledged \(.ledger.acknowledged) of \(.ledger.posts); group sids in the sender'"'"'s send order: \(.ledger.sids_in_send_order); sender errors: \(.errors)."' "$case_dir/client.json" 2>/dev/null || true)"
    NOTES+=("$ord")
    end_case "$DRIVER_RC"
}

kill_restart_router() {
    kill9 router
    event fault "kill -9 router as post $GROUP_MARK's fan-out began"
    sleep "$RESTART_AFTER"
    respawn router "$case_dir/router.log"
    event restarted "router process started"
    wait_http "http://$ROUTER_METRICS/readyz" router 60
    event restore "router restarted and ready"
}

case_router-kill() {
    group_case router-kill "kill -9 of the router mid fan-out of a ${GROUP_MEMBERS}-member group; restarted ${RESTART_AFTER}s later" kill_restart_router "$ROUTER_FLAGS"
}

case_nats-kill-group() {
    group_case nats-kill-group "kill -9 of the nats-server mid fan-out of a ${GROUP_MEMBERS}-member group; restarted ${RESTART_AFTER}s later" kill_restart_nats
}

case_storage-kill() {
    begin_case storage-kill "kill -9 of storage; restarted ${RESTART_AFTER}s later" "loadgen chat"
    start_nats 1 "$sync_interval" && start_storage && start_gateway gw-a "$NATS_URL" || { end_case 2; return; }
    start_sampler "$(( $(date +%s) + DURATION + GRACE + 200 ))" "${GW_METRICS[gw-a]}"
    start_loadgen --url "${GW_WS[gw-a]}" --metrics-url "${GW_METRICS[gw-a]}" || { end_case 2; return; }
    sleep_until "$(python3 -c "print($DRIVER_T0 + 0.5 + $FAULT_AT)")"
    event fault "kill -9 storage"
    kill9 storage
    sleep "$RESTART_AFTER"
    respawn storage "$case_dir/storage.log"
    event restarted "storage process started"
    wait_http "http://$STORAGE_METRICS/readyz" storage 60
    event restore "storage restarted and ready"
    wait_driver "$(driver_budget)"; local rc=$DRIVER_RC
    jsz_snapshot 0 "$case_dir/jsz-end.json"
    end_case "$rc"
}

# A client.py run with one fault: $1 = case, $2 = fault text, $3 = function injecting it,
# $4 = churn (mean seconds online; 0: users stay connected).
churn_case() {
    local churn="${4:-$CHURN}" driver="client.py chat"
    (( ${churn%.*} > 0 )) && driver+=" --churn $churn"
    begin_case "$1" "$2" "$driver"
    start_nats 1 "$sync_interval" && start_storage && start_gateway gw-a "$NATS_URL" || { end_case 2; return; }
    start_sampler "$(( $(date +%s) + DURATION + GRACE + 200 ))" "${GW_METRICS[gw-a]}"
    start_client chat --url "${GW_WS[gw-a]}" --users "$USERS" --total-rate "$RATE" --duration "$DURATION" \
        --grace "$GRACE" --churn "$churn" || { end_case 2; return; }
    sleep_until "$(python3 -c "print($DRIVER_T0 + $FAULT_AT)")"
    "$3"
    wait_driver "$(driver_budget)"; local rc=$DRIVER_RC
    jsz_snapshot 0 "$case_dir/jsz-end.json"
    NOTES+=("$(jq -r '"client.py: \(.churn_leaves) voluntary leaves, \(.reconnects) reconnects, \(.ledger.redelivered_same_seq) items redelivered with a seq already held (dropped), \(.ledger.resends) re-sends."' "$case_dir/client.json" 2>/dev/null || true)")
    end_case "$rc"
}

kill_restart_storage() {
    event fault "kill -9 storage"
    kill9 storage
    sleep "$RESTART_AFTER"
    respawn storage "$case_dir/storage.log"
    event restarted "storage process started"
    wait_http "http://$STORAGE_METRICS/readyz" storage 60
    event restore "storage restarted and ready"
}

kill_restart_nats() {
    event fault "kill -9 nats-server"
    kill9 nats0
    sleep "$RESTART_AFTER"
    respawn nats0 "$case_dir/nats-0.log"
    event restarted "nats-server process started"
    nats_ready 0
    event restore "nats-server healthy (JetStream recovered its store)"
}

case_storage-kill-churn() {
    churn_case storage-kill-churn "kill -9 of storage while users come and go; restarted ${RESTART_AFTER}s later" kill_restart_storage
}

case_nats-kill-retry() {
    churn_case nats-kill-retry "kill -9 of the nats-server under retrying clients; restarted ${RESTART_AFTER}s later" kill_restart_nats 0
}

case_nats-kill-churn() {
    churn_case nats-kill-churn "kill -9 of the nats-server while users come and go; restarted ${RESTART_AFTER}s later" kill_restart_nats
}

case_nats-kill() {
    begin_case nats-kill "kill -9 of the nats-server; restarted ${RESTART_AFTER}s later on the same store" "loadgen chat"
    start_nats 1 "$sync_interval" && start_storage && start_gateway gw-a "$NATS_URL" || { end_case 2; return; }
    start_sampler "$(( $(date +%s) + DURATION + GRACE + 200 ))" "${GW_METRICS[gw-a]}"
    start_loadgen --url "${GW_WS[gw-a]}" --metrics-url "${GW_METRICS[gw-a]}" || { end_case 2; return; }
    sleep_until "$(python3 -c "print($DRIVER_T0 + 0.5 + $FAULT_AT)")"
    jsz_snapshot 0 "$case_dir/jsz-before.json"
    event fault "kill -9 nats-server"
    kill9 nats0
    sleep "$RESTART_AFTER"
    respawn nats0 "$case_dir/nats-0.log"
    event restarted "nats-server process started"
    nats_ready 0
    event restore "nats-server healthy (JetStream recovered its store)"
    wait_driver "$(driver_budget)"; local rc=$DRIVER_RC
    jsz_snapshot 0 "$case_dir/jsz-end.json"
    end_case "$rc"
}

case_cluster-node-kill() {
    begin_case cluster-node-kill "3-node cluster, R3: kill -9 the INBOX leader, ${CLUSTER_DOWN}s on 2 nodes, bring it back" "loadgen chat"
    start_nats 3 "$sync_interval" && start_storage --replicas 3 && start_gateway gw-a "$NATS_URL" || { end_case 2; return; }
    start_sampler "$(( $(date +%s) + DURATION + GRACE + 200 ))" "${GW_METRICS[gw-a]}"
    jsz_snapshot 0 "$case_dir/jsz-start.json"
    local replicas
    replicas="$(jq -r '[.account_details[]?.stream_detail[]? | select(.name == "INBOX") | "\(.config.num_replicas) (raft group \(.cluster.raft_group), leader \(.cluster.leader))"] | first // "?"' "$case_dir/jsz-start.json")"
    NOTES+=("INBOX num_replicas as provisioned: $replicas.")
    start_loadgen --url "${GW_WS[gw-a]}" --metrics-url "${GW_METRICS[gw-a]}" || { end_case 2; return; }
    sleep_until "$(python3 -c "print($DRIVER_T0 + 0.5 + $FAULT_AT)")"
    local leader="" i victim=0
    for i in 0 1 2; do leader="$(stream_leader INBOX "$i" || true)"; [[ -n "$leader" ]] && break; done
    [[ "$leader" =~ ^n([0-9])$ ]] && victim="${BASH_REMATCH[1]}"
    event fault "kill -9 nats node n$victim (INBOX leader: ${leader:-unknown})"
    kill9 "nats$victim"
    sleep "$CLUSTER_DOWN"
    local other=$(( (victim + 1) % 3 ))
    local newleader; newleader="$(stream_leader INBOX "$other" || true)"
    event restarted "node n$victim started again (INBOX leader meanwhile: ${newleader:-none})"
    respawn "nats$victim" "$case_dir/nats-$victim.log"
    nats_ready "$victim"
    event restore "node n$victim healthy (caught up)"
    NOTES+=("Killed node n$victim, the INBOX leader (${leader:-unknown}); leader while it was down: ${newleader:-none}.")
    wait_driver "$(driver_budget)"; local rc=$DRIVER_RC
    jsz_snapshot "$victim" "$case_dir/jsz-end.json"
    end_case "$rc"
}

case_gateway-nats-cut() {
    begin_case gateway-nats-cut "gw-a's NATS connection reset and refused for ${CUT_FOR}s, then restored" "loadgen chat"
    start_nats 1 "$sync_interval" && start_storage || { end_case 2; return; }
    start_proxy proxy "127.0.0.1:${NATS_P[0]}" || { end_case 2; return; }
    start_gateway gw-a "nats://$PROXY_ADDR" && start_gateway gw-b "$NATS_URL" || { end_case 2; return; }
    start_sampler "$(( $(date +%s) + DURATION + GRACE + 200 ))" "${GW_METRICS[gw-a]}" "${GW_METRICS[gw-b]}"
    start_loadgen --url "${GW_WS[gw-a]}" --url "${GW_WS[gw-b]}" \
        --metrics-url "${GW_METRICS[gw-a]}" --metrics-url "${GW_METRICS[gw-b]}" || { end_case 2; return; }
    sleep_until "$(python3 -c "print($DRIVER_T0 + 0.5 + $FAULT_AT)")"
    event fault "proxy cuts gw-a's NATS connection"
    kill -USR1 "${PIDS[proxy]}"
    sleep "$CUT_FOR"
    kill -USR2 "${PIDS[proxy]}"
    event restore "proxy forwards again"
    wait_driver "$(driver_budget)"; local rc=$DRIVER_RC
    local reconnects resyncs
    reconnects="$(curl -fsS --max-time 2 "${GW_METRICS[gw-a]}" | awk '$1 ~ /^gateway_nats_reconnects/ { s += $2 } END { print s + 0 }')"
    resyncs="$(curl -fsS --max-time 2 "${GW_METRICS[gw-a]}" | awk '$1 ~ /^gateway_resyncs/ { s += $2 } END { print s + 0 }')"
    NOTES+=("gw-a after the run: gateway_nats_reconnects $reconnects, gateway_resyncs $resyncs.")
    end_case "$rc"
}

case_sync-cost() {
    begin_case sync-cost "JetStream sync_interval: default vs always" "loadgen baseline + chat"
    # Variants nodes:sync, interleaved over $SYNC_ROUNDS rounds (the machine may be noisy).
    local round spec nodes variant sync vd
    for ((round = 1; round <= SYNC_ROUNDS; round++)); do
        for spec in $SYNC_VARIANTS; do
            nodes="${spec%%:*}"; variant="${spec#*:}"
            sync=""; [[ $variant == always ]] && sync=always
            local name="r$nodes-$variant"
            vd="$case_dir/$name/round-$round"
            mkdir -p "$vd/max" "$vd/open"
            work="$work_root/sync-cost-$name-$round"; mkdir -p "$work"
            local save_case_dir="$case_dir"; case_dir="$vd"
            wait_quiet
            if ! { start_nats "$nodes" "$sync" && start_storage --replicas "$nodes" &&
                   start_gateway gw-a "$NATS_URL" --messages-per-sec 0 --user-messages-per-sec 0; }; then
                stop_all; case_dir="$save_case_dir"; flog "sync-cost $name: the system did not start"; continue
            fi
            curl -fsS --max-time 2 "http://127.0.0.1:${NATS_MON[0]}/varz" | jq '.jetstream.config' >"$vd/jetstream-config.json" || true
            flog "sync-cost $name round $round: baseline"
            loadgen baseline --nats-url "$NATS_URL" --duration "$SYNC_DURATION" --out "$vd" >"$vd/baseline.out" 2>&1 || true
            flog "sync-cost $name round $round: chat --rate max"
            loadgen chat --url "${GW_WS[gw-a]}" --metrics-url "${GW_METRICS[gw-a]}" --users 100 --rate max \
                --window 32 --duration "$SYNC_DURATION" --out "$vd/max" >"$vd/chat-max.out" 2>&1 || true
            flog "sync-cost $name round $round: chat --total-rate 1000"
            loadgen chat --url "${GW_WS[gw-a]}" --metrics-url "${GW_METRICS[gw-a]}" --users 100 --total-rate 1000 \
                --duration "$SYNC_DURATION" --out "$vd/open" >"$vd/chat-open.out" 2>&1 || true
            stop_all
            rm -rf "$work"
            case_dir="$save_case_dir"
        done
    done
    jq -n --arg d "Same binaries and machine, one gateway (--cores ${GATEWAY_CORES:-1} --messages-per-sec 0 --user-messages-per-sec 0) and storage --replicas N on N nats-servers (file store), variants interleaved over $SYNC_ROUNDS round(s), each round a fresh system: loadgen baseline ($SYNC_DURATION, raw JetStream publish to a scratch stream configured like INBOX — R1 even on the cluster), loadgen chat --rate max --window 32 (100 users, $SYNC_DURATION, closed loop), loadgen chat --total-rate 1000 (100 users, $SYNC_DURATION, open loop). 'default' = a nats config without sync_interval (nats-server's 2m); 'always' = jetstream { sync_interval: always } on every node. Figures are means over the rounds (each round's in faults.json)." \
        --arg h "$(cat "$root/faults/SYNC_INTERVAL.md")" --arg variants "$SYNC_VARIANTS" --argjson rounds "$SYNC_ROUNDS" \
        '{description: $d, how_to: $h, variants: ($variants | split(" ")), rounds: $rounds}' >"$case_dir/meta-sync.json"
    mv "$case_dir/meta-sync.json" "$case_dir/sync-meta.json"
    jq -n --arg case sync-cost --argjson runtime "$(($(date +%s) - CASE_T0))" \
        '{case: $case, fault: "none (measurement)", driver: "loadgen baseline + chat", exit_status: 0, runtime_s: $runtime, notes: []}' >"$case_dir/meta.json"
    flog "case sync-cost done in $(($(date +%s) - CASE_T0)) s"
}

# --- run -------------------------------------------------------------------------------------
for c in $cases; do
    "case_$c"
done

machine="$(nproc) × $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
commit="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
dirty=false; [[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]] && dirty=true
desc_json="$(for k in "${!DESC[@]}"; do jq -n --arg k "$k" --arg v "${DESC[$k]}" '{($k): $v}'; done | jq -s 'add')"
jq -n --arg started "$stamp" --arg machine "$machine" --arg commit "$commit" --argjson dirty "$dirty" \
    --arg nats "$("$NATS" --version)" --arg build "$src" --arg command "faults/run.sh $orig_args" \
    --arg mode "$([[ $quick == 1 ]] && echo quick || echo full)" --arg sync "$sync_interval" \
    --arg cases "$cases" --argjson desc "$desc_json" --argjson runtime "$(($(date +%s) - suite_t0))" \
    --arg loadavg "$(cat /proc/loadavg)" \
    '{started_at: $started, machine: $machine, commit: $commit, dirty: $dirty, nats_version: $nats,
      build: $build, command: $command, mode: $mode, sync_interval: $sync, cases: ($cases | split(" ")),
      descriptions: $desc, runtime_s: $runtime, loadavg_at_end: $loadavg}' >"$out/suite.json"
status=0
python3 "$root/faults/report.py" table "$out" >/dev/null || status=1
flog "done in $(($(date +%s) - suite_t0)) s; table: $out/faults.md"
cat "$out/faults.md" | sed -n '1,/^## /p' | head -n -1
exit "$status"
