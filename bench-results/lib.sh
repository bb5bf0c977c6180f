# Helpers shared by the benchmark scripts (run-all.sh, peer.sh, many-connections.sh,
# connect-rate.sh). Source it after setting LOG_TAG (the prefix of log lines) and `root`:
#
#   LOG_TAG=run-all; source "$root/bench-results/lib.sh"
#
# Process bookkeeping: `start NAME CMD...` runs a service in the background with its output in
# $logs/NAME.log (or $work/NAME.log when $logs is unset) and records it in `pids`/`names`;
# `stop_all` stops them newest first. Scripts that track a pid themselves use `stop_pid`.

log() { printf '[%s %s] %s\n' "${LOG_TAG:-bench}" "$(date -u +%H:%M:%S)" "$*" >&2; }

# The nats-server binary: $NATS_SERVER, the repository's .tools/bin, or PATH.
find_nats() {
    local c
    for c in "${NATS_SERVER:-}" "$root/.tools/bin/nats-server" "$(command -v nats-server || true)"; do
        if [[ -n "$c" && -x "$c" ]]; then echo "$c"; return; fi
    done
    echo "${LOG_TAG:-bench}: no nats-server (set NATS_SERVER, or run scripts/install-nats.sh)" >&2
    exit 2
}

# A free TCP port on the loopback (bound and released: another process could take it first,
# which on a machine running one benchmark at a time does not happen in practice).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_ready NAME TARGET [PID [LOGFILE]]: waits up to 30 s until TARGET answers — an http(s) URL
# with 200, a host:port by accepting a TCP connection. Exits 2 if it does not, or as soon as PID
# (when given) has exited, showing the end of LOGFILE.
wait_ready() {
    local name="$1" target="$2" pid="${3:-}" logfile="${4:-}"
    for _ in $(seq 1 300); do
        if python3 - "$target" <<'PY' 2>/dev/null; then return 0; fi
import socket, sys, urllib.request
t = sys.argv[1]
if t.startswith("http"):
    sys.exit(0 if urllib.request.urlopen(t, timeout=1).status == 200 else 1)
host, port = t.rsplit(":", 1)
socket.create_connection((host, int(port)), timeout=1).close()
PY
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited${logfile:+; see $logfile}"
            [[ -z "$logfile" ]] || tail -n 20 "$logfile" >&2
            exit 2
        fi
        sleep 0.1
    done
    log "$name did not become ready at $target"
    exit 2
}

# stop_pid PID NAME: SIGTERM, up to 10 s for it to exit, then SIGKILL.
stop_pid() {
    local pid="$1" name="$2"
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) did not stop in 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    fi
}

pids=()
names=()
# start NAME CMD...: runs CMD in the background, output in the log directory; sets LAST_PID.
start() {
    local name="$1"; shift
    "$@" >"${logs:-$work}/$name.log" 2>&1 </dev/null &
    LAST_PID=$!
    pids+=("$LAST_PID"); names+=("$name")
}
# Stops everything `start` started, newest first.
stop_all() {
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${pids[$i]}" "${names[$i]}"
    done
}

# CPU seconds (user + system, all threads) a process has used; 0 when it is gone.
cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# Jiffies the whole machine spent busy (all CPUs), from /proc/stat.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }

# The machine may be shared (other engineers' builds and tests): with WAIT_QUIET=1 (default),
# waits until all CPUs together are under QUIET_PCT % (default 20) busy over 3 s, for up to 30
# minutes, then measures anyway.
wait_quiet() {
    [[ "${WAIT_QUIET:-1}" == 1 ]] || return 0
    local waited=0 hz ncpu a b pct quiet="${QUIET_PCT:-20}"
    hz="$(getconf CLK_TCK)"; ncpu="$(nproc)"
    while :; do
        a="$(busy_ticks)"; sleep 3; b="$(busy_ticks)"
        pct=$(( (b - a) * 100 / (3 * hz * ncpu) ))
        if [[ $pct -lt $quiet ]]; then break; fi
        if [[ $waited -ge 1800 ]]; then log "machine still ${pct}% busy after 30 min; measuring anyway"; break; fi
        if [[ $((waited % 60)) == 0 ]]; then
            log "machine ${pct}% busy with other work ($(ps -eo pcpu=,comm= --sort=-pcpu | head -n3 | tr -s ' ' | paste -sd, -)); waiting"
        fi
        sleep 7; waited=$((waited + 10))
    done
    log "machine quiet (${pct}% busy over 3 s); load average $(cut -d' ' -f1-3 /proc/loadavg)"
}
