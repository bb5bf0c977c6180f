#!/usr/bin/env bash
# Checks the observability of the system with a real Prometheus:
#
#   * installs Debian's `prometheus` (with `promtool`) and `prometheus-blackbox-exporter` if they
#     are missing (apt-get; their Debian services are stopped and disabled again);
#   * builds gateway, storage, router (and loadgen, if it compiles) in debug;
#   * starts its own nats-server (scripts/install-nats.sh) with a temp store, storage, router and
#     a gateway with --dev-tokens, all on free loopback ports;
#   * starts a blackbox exporter (ops/blackbox.yml) and Prometheus with ops/prometheus.yml (its
#     addresses replaced by those ports, 1 s scrape and rule evaluation) loading ops/alerts.yml;
#   * runs a short load: `loadgen chat` (1:1 traffic) and ops/prometheus-check.py group-load
#     (group and 1:1 traffic, an offline member who drains, a refused handshake, a bad frame);
#   * checks: `promtool check metrics` on each service's /metrics (errors fail, lint warnings are
#     reported), `promtool check rules` and `promtool test rules` (ops/alerts.test.yml),
#     `promtool check config`, every metric name of the dashboard and the alerts is exposed, every
#     dashboard query runs, every rule evaluates without error, and series queried through
#     Prometheus' HTTP API moved during the load (before/after table);
#   * stops everything it started (trap), bounded in time.
#
# Exit status: 0 when every check passed; 1 otherwise; 124 when PROM_CHECK_TIMEOUT expired.
# Artifacts (service logs, scrapes, the generated configs, query results) go to
# target/prometheus-check/.
#
# Environment (all optional):
#   PROM_CHECK_TIMEOUT    whole run, seconds, default 900 (includes apt-get and cargo build)
#   PROM_CHECK_LOAD_SECS  loadgen's sending time, seconds, default 10
#   PROM_CHECK_USERS      loadgen users, default 20 (at 5 msg/s each)
#   PROM_CHECK_SKIP_BUILD set: no cargo build, use the binaries in target/debug/ (e.g. right after
#                         the test command's `cargo build --workspace --bins`)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Bound the whole run. timeout(1) signals its whole process group, so every service started
# below gets the signal too, and the EXIT trap still stops them in order.
# Nested timeouts below use --foreground so that they stay in this group.
if [[ -z "${PROM_CHECK_UNDER_TIMEOUT:-}" ]]; then
    export PROM_CHECK_UNDER_TIMEOUT=1
    exec timeout --kill-after=20 "${PROM_CHECK_TIMEOUT:-900}" "$root/scripts/prometheus-check.sh" "$@"
fi

started_at=$(date +%s)
LOAD_SECS="${PROM_CHECK_LOAD_SECS:-10}"
USERS="${PROM_CHECK_USERS:-20}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin="$target_dir/debug"
art="$target_dir/prometheus-check"
helper="$root/ops/prometheus-check.py"
venv="$root/.tools/prometheus-check-venv"

say() { printf '\n== %s\n' "$*"; }
die() { echo "prometheus-check: FAILED: $*" >&2; exit 1; }

failures=()
# check NAME COMMAND...: runs COMMAND, records NAME as failed if it fails (output shown).
check() {
    local name="$1"
    shift
    if "$@"; then
        echo "-- ok: $name"
    else
        echo "-- FAILED: $name" >&2
        failures+=("$name")
    fi
}

# ----------------------------------------------------------------------------------------------
say "Prometheus, promtool and the blackbox exporter (Debian packages)"
need=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus-blackbox-exporter >/dev/null || need+=(prometheus-blackbox-exporter)
if ((${#need[@]})); then
    as_root=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || die "${need[*]} missing and not root (no sudo) to install them"
        as_root=(sudo -n)
    fi
    echo "installing ${need[*]} with apt-get"
    timeout --foreground 300 "${as_root[@]}" apt-get update -qq
    timeout --foreground 600 "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${need[@]}"
    # The packages enable (and, where the init system lets them, start) a system-wide service.
    # This check runs its own instances: leave none of Debian's running.
    for svc in "${need[@]}"; do
        if [[ -d /run/systemd/system ]]; then
            "${as_root[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
        else
            if [[ -x "/etc/init.d/$svc" ]]; then
                "${as_root[@]}" "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
            fi
            if command -v update-rc.d >/dev/null; then
                "${as_root[@]}" update-rc.d "$svc" disable >/dev/null 2>&1 || true
            fi
            # Unit symlinks for a later boot with systemd (works without a running systemd).
            if command -v systemctl >/dev/null; then
                "${as_root[@]}" systemctl disable "$svc" >/dev/null 2>&1 || true
            fi
        fi
        echo "Debian's $svc service: stopped and disabled (this check runs its own instance)"
    done
fi
promtool --version 2>&1 | head -n1
prometheus --version 2>&1 | head -n1
prometheus-blackbox-exporter --version 2>&1 | head -n1

# ----------------------------------------------------------------------------------------------
say "Building gateway, storage, router (and loadgen)"
use_loadgen=1
if [[ -n "${PROM_CHECK_SKIP_BUILD:-}" ]]; then
    echo "PROM_CHECK_SKIP_BUILD set: using the binaries in $bin"
    for b in gateway storage router; do
        [[ -x "$bin/$b" ]] || die "$bin/$b missing (PROM_CHECK_SKIP_BUILD is set)"
    done
    [[ -x "$bin/loadgen" ]] || use_loadgen=0
else
    timeout --foreground 1200 cargo build -p gateway -p storage -p router ||
        die "cargo build -p gateway -p storage -p router failed"
    if ! timeout --foreground 900 cargo build -p loadgen; then
        echo "loadgen does not build: the load is ops/prometheus-check.py group-load alone" >&2
        use_loadgen=0
    fi
fi
((use_loadgen)) || echo "no loadgen: the load is ops/prometheus-check.py group-load alone"
scripts/install-nats.sh

# The websockets package for the group load, in a venv of its own.
if ! "$venv/bin/python" -c 'import websockets' 2>/dev/null; then
    echo "creating $venv (websockets)"
    python3 -m venv "$venv"
    if [[ -f clients/requirements.txt ]]; then
        timeout --foreground 300 "$venv/bin/pip" install --quiet --disable-pip-version-check -r clients/requirements.txt
    else
        timeout --foreground 300 "$venv/bin/pip" install --quiet --disable-pip-version-check websockets
    fi
fi

# ----------------------------------------------------------------------------------------------
rm -rf "$art"
mkdir -p "$art"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/prometheus-check.XXXXXX")"

pids=()
names=()
stop_all() {
    local rc=$?
    trap - EXIT INT TERM
    # Newest first: Prometheus, the exporter, the load, gateway, router, storage, nats-server.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        if kill -0 "${pids[i]}" 2>/dev/null; then
            kill -TERM "${pids[i]}" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "${pids[i]}" 2>/dev/null || true
            wait "${pids[i]}" 2>/dev/null || true
        fi
    done
    rm -rf "$tmp"
    echo "runtime: $(($(date +%s) - started_at)) s; artifacts in ${art#"$root"/}/"
    exit "$rc"
}
trap stop_all EXIT
trap 'echo "prometheus-check: FAILED: interrupted (PROM_CHECK_TIMEOUT=${PROM_CHECK_TIMEOUT:-900} s expired, or a signal)" >&2; exit 124' INT TERM

# start NAME COMMAND...: in the background, output to $art/NAME.log.
start() {
    local name="$1"
    shift
    "$@" >"$art/$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
    echo "started $name (pid $!)"
}

# wait_url NAME URL: waits up to 60 s for a 200 from URL while NAME's process runs.
wait_url() {
    local name="$1" url="$2" pid="${pids[-1]}"
    for _ in $(seq 600); do
        if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
            echo "$name ready ($url)"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited; last lines of its log:" >&2
            tail -n 30 "$art/$name.log" >&2
            die "$name did not start"
        fi
        sleep 0.1
    done
    tail -n 30 "$art/$name.log" >&2
    die "$name not ready after 60 s ($url)"
}

# query PROMQL: the first value of an instant query now ("" when empty).
query() {
    curl -fsS --max-time 5 "http://$prom_addr/api/v1/query" --data-urlencode "query=$1" |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}

mapfile -t ports < <(python3 "$helper" ports 8)
nats_port=${ports[0]}
nats_mon=${ports[1]}
storage_addr=127.0.0.1:${ports[2]}
router_addr=127.0.0.1:${ports[3]}
gw_listen=127.0.0.1:${ports[4]}
gw_metrics=127.0.0.1:${ports[5]}
prom_addr=127.0.0.1:${ports[6]}
bb_addr=127.0.0.1:${ports[7]}
nats_url="nats://127.0.0.1:$nats_port"

say "Starting the system"
mkdir -p "$tmp/nats"
start nats-server "$root/.tools/bin/nats-server" -js -sd "$tmp/nats" -a 127.0.0.1 -p "$nats_port" -m "$nats_mon"
wait_url nats-server "http://127.0.0.1:$nats_mon/healthz?js-enabled-only=true"
start storage "$bin/storage" --nats-url "$nats_url" --metrics-addr "$storage_addr"
wait_url storage "http://$storage_addr/readyz"
start router "$bin/router" --nats-url "$nats_url" --metrics-addr "$router_addr"
wait_url router "http://$router_addr/readyz"
secret="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
JWT_SECRET="$secret" start gateway "$bin/gateway" --listen "$gw_listen" --metrics-addr "$gw_metrics" \
    --cores 1 --nats-url "$nats_url" --gateway-id "gw-promcheck" --dev-tokens
wait_url gateway "http://$gw_metrics/readyz"

say "Starting the blackbox exporter and Prometheus"
check "blackbox exporter config (ops/blackbox.yml)" \
    prometheus-blackbox-exporter --config.file=ops/blackbox.yml --config.check
start blackbox-exporter prometheus-blackbox-exporter --config.file=ops/blackbox.yml \
    --web.listen-address="$bb_addr"
wait_url blackbox-exporter "http://$bb_addr/-/healthy"

# ops/prometheus.yml with this run's addresses and 1 s intervals, next to a copy of the rules.
cp ops/alerts.yml "$tmp/alerts.yml"
python3 - ops/prometheus.yml "$tmp/prometheus.yml" "$gw_metrics" "$storage_addr" "$router_addr" "$bb_addr" <<'PY'
import re, sys
src, dst, gw, st, rt, bb = sys.argv[1:]
addr = {"9100": gw, "9101": st, "9102": rt, "9115": bb}
text = open(src).read()
text = re.sub(r"\b127\.0\.0\.1:(9100|9101|9102|9115)\b", lambda m: addr[m.group(1)], text)
text = re.sub(r"^(\s*(?:scrape|evaluation)_interval:)\s*\S+", r"\1 1s", text, flags=re.M)
open(dst, "w").write(text)
PY
cp "$tmp/prometheus.yml" "$art/prometheus.yml"
check "promtool check config ops/prometheus.yml (with ops/alerts.yml)" promtool check config ops/prometheus.yml
check "promtool check config (this run's config)" promtool check config "$tmp/prometheus.yml"
start prometheus prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
    --storage.tsdb.retention.time=1h --web.listen-address="$prom_addr" --log.level=warn
wait_url prometheus "http://$prom_addr/-/ready"

# Wait until every target has been scraped up (and readiness probed) at least a few times.
for i in $(seq 300); do
    up="$(query 'count(up{job=~"gateway|storage|router"} == 1)' || true)"
    ready="$(query 'count(probe_success{job="readyz"} == 1)' || true)"
    [[ "$up" == 3 && "$ready" == 3 ]] && break
    ((i == 300)) && die "Prometheus: targets up '$up' of 3, ready '$ready' of 3 after 30 s (see $art/prometheus.log)"
    sleep 0.1
done
echo "Prometheus ($prom_addr) scrapes 3 of 3 services up, 3 of 3 ready"
sleep 3
t_before="$(date +%s.%N)"
python3 "$helper" snapshot --prom "http://$prom_addr" --at "$t_before" >"$art/before.json"

# ----------------------------------------------------------------------------------------------
if ((use_loadgen)); then
    say "Load: ${LOAD_SECS}s of loadgen chat ($USERS users, 5 msg/s each) + group traffic"
else
    say "Load: group and 1:1 traffic (ops/prometheus-check.py group-load)"
fi
load_failed=0
if ((use_loadgen)); then
    JWT_SECRET="$secret" start loadgen timeout --foreground $((LOAD_SECS + 90)) "$bin/loadgen" chat \
        --url "ws://$gw_listen/ws" --metrics-url "http://$gw_metrics/metrics" \
        --users "$USERS" --rate 5 --duration "${LOAD_SECS}s" --grace 10s --source-ips 0
    loadgen_pid="${pids[-1]}"
fi
if ! timeout --foreground 120 "$venv/bin/python" "$helper" group-load --http "http://$gw_listen" --timeout 100; then
    echo "group load failed" >&2
    load_failed=1
fi
if ((use_loadgen)); then
    if wait "$loadgen_pid"; then
        echo "loadgen chat: exit 0"
    else
        rc=$?
        echo "loadgen chat: exit $rc (1: ledger violations, 2: could not run, 3: errors); its report:" >&2
        load_failed=1
    fi
    sed -n '/^chat:/,$p' "$art/loadgen.log"
fi
((load_failed)) && failures+=("load")
# Two scrapes and a rule evaluation after the load.
sleep 3
t_after="$(date +%s.%N)"
python3 "$helper" snapshot --prom "http://$prom_addr" --at "$t_after" >"$art/after.json"

# ----------------------------------------------------------------------------------------------
say "promtool check metrics (each service's /metrics after the load)"
lint_warnings=0
for svc in gateway storage router; do
    case $svc in
    gateway) addr=$gw_metrics ;;
    storage) addr=$storage_addr ;;
    router) addr=$router_addr ;;
    esac
    curl -fsS --max-time 5 -D "$art/$svc.metrics.headers" "http://$addr/metrics" >"$art/$svc.metrics" ||
        { failures+=("scrape $svc"); continue; }
    set +e
    promtool check metrics <"$art/$svc.metrics" >"$art/$svc.promtool" 2>&1
    rc=$?
    set -e
    series=$(grep -vc '^#' "$art/$svc.metrics" || true)
    families=$(grep -c '^# TYPE ' "$art/$svc.metrics" || true)
    ctype=$(grep -i '^content-type:' "$art/$svc.metrics.headers" | tr -d '\r' | cut -d' ' -f2-)
    case $rc in
    0) echo "-- ok: $svc: $families families, $series samples, no problems (Content-Type: $ctype)" ;;
    3)
        echo "-- $svc: $families families, $series samples, lint warnings:"
        sed 's/^/     /' "$art/$svc.promtool"
        lint_warnings=$((lint_warnings + $(wc -l <"$art/$svc.promtool")))
        ;;
    *)
        echo "-- FAILED: $svc: promtool check metrics exit $rc:" >&2
        sed 's/^/     /' "$art/$svc.promtool" >&2
        failures+=("promtool check metrics $svc")
        ;;
    esac
done

say "Alert rules"
check "promtool check rules ops/alerts.yml" promtool check rules ops/alerts.yml
check "promtool test rules ops/alerts.test.yml" promtool test rules ops/alerts.test.yml
rules_count="$(promtool check rules ops/alerts.yml | sed -n 's/.*SUCCESS: \([0-9]*\) rules found.*/\1/p')"
check "rules loaded in Prometheus and evaluated without error" \
    python3 "$helper" rules --prom "http://$prom_addr" --expect-rules "${rules_count:-0}"

say "Dashboard and alerts against the exposition"
check "every metric name of the dashboard and the alerts is exposed" \
    python3 "$helper" names "$art/gateway.metrics" "$art/storage.metrics" "$art/router.metrics" \
    --use ops/grafana-dashboard.json --use ops/alerts.yml
check "every dashboard query runs in Prometheus" \
    python3 "$helper" dashboard ops/grafana-dashboard.json --prom "http://$prom_addr" --at "$t_after"

say "Series through Prometheus' HTTP API, before and after the load"
check "series moved during the load" python3 "$helper" compare "$art/before.json" "$art/after.json"
python3 "$helper" compare "$art/before.json" "$art/after.json" >"$art/series.txt" 2>&1 || true

say "Result"
((lint_warnings)) && echo "promtool check metrics: $lint_warnings lint warning(s) (reported above, not failures)"
if ((${#failures[@]})); then
    printf 'FAILED: %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "prometheus-check: PASSED"
