#!/usr/bin/env bash
# Interop tests: the protocol (PROTOCOL.md) spoken by clients this project did not write.
#
# Installs what is missing (Debian's chromium + chromium-driver, the npm packages of
# clients/interop-node and clients/browser-test with `npm ci`, a Python venv with `websockets` in
# .tools/interop-venv), builds the service binaries, starts its own nats-server (the pinned one),
# storage, router (when it builds) and a gateway with --dev-tokens on free ports, then runs:
#   1. clients/interop-python/interop_test.py   (Python websockets)
#   2. clients/interop-node/interop.mjs         (Node ws)
#   3. clients/browser-test/browser.mjs         (the web client in headless Chromium, Playwright)
# Everything started is stopped on exit. Exit code: 0 when every test passed.
#
# Usage: scripts/interop-test.sh [--serve]
#   --serve   start the system, print its URLs and wait (Ctrl-C stops it); runs no test
# Environment (all optional):
#   INTEROP_RELEASE=1   build and run the release binaries (default: debug, as scripts/test.sh)
#   INTEROP_ONLY=python,node,browser   run only these tests
#   INTEROP_NO_INSTALL=1   install nothing (fail if something is missing)
#   INTEROP_TEST_TIMEOUT   seconds each test may take (default 180)
#   INTEROP_BUILD_TIMEOUT  seconds each cargo build may take (default 1800)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
started_at=$SECONDS

serve=0
[[ "${1:-}" == "--serve" ]] && serve=1
only="${INTEROP_ONLY:-python,node,browser}"
test_timeout="${INTEROP_TEST_TIMEOUT:-180}"
venv="$root/.tools/interop-venv"
artifacts="$root/target/browser-artifacts"

log() { printf '[interop %3ds] %s\n' "$((SECONDS - started_at))" "$*"; }
die() { log "FAILED: $*" >&2; exit 1; }
wants() { [[ ",$only," == *",$1,"* ]]; }

# ---------------------------------------------------------------- install what is missing

apt_install() {
    [[ -z "${INTEROP_NO_INSTALL:-}" ]] || die "missing: $* (INTEROP_NO_INSTALL is set)"
    local sudo=""
    [[ "$(id -u)" == 0 ]] || sudo="sudo"
    log "installing Debian packages: $*"
    timeout 600 $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 $sudo apt-get install -y -qq "$@" >/dev/null
}

# npm_ci DIR: `npm ci` unless node_modules already matches the lockfile.
npm_ci() {
    local dir="$1"
    if [[ -f "$dir/node_modules/.package-lock.json" && "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ]]; then
        return 0
    fi
    [[ -z "${INTEROP_NO_INSTALL:-}" ]] || die "$dir: node_modules missing (INTEROP_NO_INSTALL is set)"
    log "npm ci in ${dir#"$root"/}"
    (cd "$dir" && timeout 600 npm ci --no-audit --no-fund --loglevel=error)
}

if wants node || wants browser; then
    command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
fi
if wants browser && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
    apt_install chromium chromium-driver
fi
wants node && npm_ci "$root/clients/interop-node"
wants browser && npm_ci "$root/clients/browser-test"
# The venv is (re)made when clients/requirements.txt differs from what it was made with.
if wants python && ! cmp -s "$root/clients/requirements.txt" "$venv/requirements.txt"; then
    [[ -z "${INTEROP_NO_INSTALL:-}" ]] || die "the Python venv $venv is missing (INTEROP_NO_INSTALL is set)"
    log "creating the Python venv in .tools/interop-venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || { apt_install python3-venv && python3 -m venv "$venv"; }
    timeout 600 "$venv/bin/pip" install -q --disable-pip-version-check -r "$root/clients/requirements.txt"
    cp "$root/clients/requirements.txt" "$venv/requirements.txt"
fi
scripts/install-nats.sh >/dev/null

# ---------------------------------------------------------------- build

profile=debug
cargo_flags=()
if [[ -n "${INTEROP_RELEASE:-}" ]]; then
    profile=release
    cargo_flags=(--release)
fi
bin="$root/target/$profile"
build_timeout="${INTEROP_BUILD_TIMEOUT:-1800}"
log "building gateway and storage ($profile)"
timeout "$build_timeout" cargo build -q "${cargo_flags[@]}" -p gateway -p storage
groups=0
if timeout "$build_timeout" cargo build -q "${cargo_flags[@]}" -p router 2>"${TMPDIR:-/tmp}/interop-router-build.log"; then
    groups=1
else
    log "router does not build (first errors below): group tests are skipped"
    grep -m 5 -A 3 '^error' "${TMPDIR:-/tmp}/interop-router-build.log" >&2 || true
fi

# ---------------------------------------------------------------- start the system

run="$(mktemp -d "${TMPDIR:-/tmp}/interop-test.XXXXXX")"
pids=()
names=()
stop_all() {
    local code=$?
    trap - INT TERM EXIT
    if [[ $code -ne 0 && $code -ne 130 ]]; then
        for n in "${names[@]}"; do
            echo "---- last lines of $n.log ----" >&2
            tail -n 20 "$run/$n.log" >&2 || true
        done
    fi
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        if kill -0 "${pids[i]}" 2>/dev/null; then
            kill -TERM "${pids[i]}" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "${pids[i]}" 2>/dev/null || true
        fi
    done
    rm -rf "$run"
    exit "$code"
}
trap 'exit 130' INT TERM
trap stop_all EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start() {
    local name="$1"
    shift
    "$@" >"$run/$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
}

# http_ok HOST:PORT PATH: true when GET answers 200 (bash's /dev/tcp, no curl needed).
http_ok() (
    host="${1%:*}"
    port="${1##*:}"
    { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" >&3
    read -r -t 2 _ status _ <&3 || exit 1
    [[ "$status" == "200" ]]
)

# wait_ok NAME HOST:PORT PATH: up to 60 s for a 200, unless NAME's process died.
wait_ok() {
    local name="$1" pid="${pids[-1]}"
    for _ in $(seq 600); do
        http_ok "$2" "$3" && return 0
        kill -0 "$pid" 2>/dev/null || die "$name exited"
        sleep 0.1
    done
    die "$name not ready after 60 s (GET http://$2$3)"
}

nats_port=$(free_port)
nats_mon=$(free_port)
mkdir -p "$run/nats"
start nats-server "$root/.tools/bin/nats-server" -js -sd "$run/nats" -a 127.0.0.1 -p "$nats_port" -m "$nats_mon"
wait_ok nats-server "127.0.0.1:$nats_mon" "/healthz?js-enabled-only=true"
nats_url="nats://127.0.0.1:$nats_port"

storage_metrics="127.0.0.1:$(free_port)"
start storage "$bin/storage" --nats-url "$nats_url" --metrics-addr "$storage_metrics"
wait_ok storage "$storage_metrics" /readyz

if [[ $groups == 1 ]]; then
    router_metrics="127.0.0.1:$(free_port)"
    start router "$bin/router" --nats-url "$nats_url" --metrics-addr "$router_metrics"
    wait_ok router "$router_metrics" /readyz
fi

gw_port=$(free_port)
gw_metrics="127.0.0.1:$(free_port)"
JWT_SECRET="interop-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')" \
    start gateway "$bin/gateway" --listen "127.0.0.1:$gw_port" --metrics-addr "$gw_metrics" --cores 1 \
    --gateway-id "gw-interop-$gw_port" --nats-url "$nats_url" --dev-tokens
wait_ok gateway "$gw_metrics" /readyz
for _ in $(seq 100); do http_ok "127.0.0.1:$gw_port" /dev/token?user=probe && break; sleep 0.1; done
http_ok "127.0.0.1:$gw_port" /dev/token?user=probe || die "the gateway's listener does not answer"

export CHAT_HTTP_URL="http://127.0.0.1:$gw_port"
export CHAT_GROUPS="$groups"
export CHAT_ARTIFACTS="$artifacts"
log "system up: $CHAT_HTTP_URL (groups: $([[ $groups == 1 ]] && echo yes || echo no))"

if [[ $serve == 1 ]]; then
    cat <<INFO
  web client:  $CHAT_HTTP_URL/
  WebSocket:   ws://127.0.0.1:$gw_port/ws?token=<token>
  dev token:   $CHAT_HTTP_URL/dev/token?user=alice&device=web
  NATS:        $nats_url     logs: $run/*.log
  e.g.         CHAT_HTTP_URL=$CHAT_HTTP_URL CHAT_GROUPS=$groups node clients/interop-node/interop.mjs
Ctrl-C stops everything.
INFO
    set +e
    wait -n "${pids[@]}"
    die "a service exited"
fi

# ---------------------------------------------------------------- run the tests

passed=0
failed=0
failures=()
run_test() {
    local name="$1"
    shift
    wants "$name" || return 0
    local t0=$SECONDS
    log "running $name: $*"
    if timeout --kill-after=10 "$test_timeout" "$@"; then
        passed=$((passed + 1))
        log "$name passed in $((SECONDS - t0)) s"
    else
        local rc=$?
        failed=$((failed + 1))
        failures+=("$name")
        log "$name FAILED (exit $rc) after $((SECONDS - t0)) s"
    fi
    # Every service must have survived the test.
    for i in "${!pids[@]}"; do
        kill -0 "${pids[i]}" 2>/dev/null || die "${names[i]} died during the $name test"
    done
}

run_test python "$venv/bin/python" "$root/clients/interop-python/interop_test.py"
run_test node node "$root/clients/interop-node/interop.mjs"
run_test browser node "$root/clients/browser-test/browser.mjs"

log "interop: $passed passed, $failed failed${failures:+ (${failures[*]})} in $((SECONDS - started_at)) s"
[[ $failed -eq 0 ]]
