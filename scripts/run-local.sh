#!/usr/bin/env bash
# Runs the whole system locally: nats-server (unless one is reachable on NATS_URL), storage, the
# router and a gateway with dev tokens. Logs, the NATS store and the dev secret go to .run/.
# Ctrl-C stops everything this script started.
#
# A nats-server started here runs with the generated authorization (`chatctl nats-config`, into
# .run/nats-auth/: auth.conf and one nkey seed per role, kept across runs) and each service
# connects with its own role's seed. A nats-server already running on NATS_URL is used as it is,
# without credentials (set NATS_NKEY_FILE etc. per service yourself if it requires them).
#
# Environment (all optional):
#   NATS_URL          default nats://127.0.0.1:4222
#   GATEWAY_LISTEN    default 127.0.0.1:8080   (WebSocket /ws and /dev/token)
#   GATEWAY_METRICS   default 127.0.0.1:9100
#   STORAGE_METRICS   default 127.0.0.1:9101
#   NATS_MONITOR_PORT default 8222            (only for a nats-server started here)
#   GATEWAY_CORES     default 1
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
GATEWAY_LISTEN="${GATEWAY_LISTEN:-127.0.0.1:8080}"
GATEWAY_METRICS="${GATEWAY_METRICS:-127.0.0.1:9100}"
STORAGE_METRICS="${STORAGE_METRICS:-127.0.0.1:9101}"
ROUTER_METRICS="${ROUTER_METRICS:-127.0.0.1:9102}"
NATS_MONITOR_PORT="${NATS_MONITOR_PORT:-8222}"
GATEWAY_CORES="${GATEWAY_CORES:-1}"
run="$root/.run"
bin="$root/target/release"
mkdir -p "$run"

pids=()
names=()
stop_all() {
    trap - INT TERM EXIT
    # Newest first: gateway, router, storage, then nats-server.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        if kill -0 "${pids[i]}" 2>/dev/null; then
            echo "stopping ${names[i]} (pid ${pids[i]})"
            kill -TERM "${pids[i]}" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "${pids[i]}" 2>/dev/null || true
        fi
    done
}
trap 'stop_all; exit 130' INT TERM
trap stop_all EXIT

# start NAME COMMAND...: runs COMMAND in the background with output to .run/NAME.log.
start() {
    local name="$1"
    shift
    "$@" >>"$run/$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
    echo "started $name (pid $!), log: .run/$name.log"
}

# http_ok HOST:PORT PATH: true when GET answers 200 (bash's /dev/tcp, no curl needed). A subshell,
# so the socket never leaks into the script.
http_ok() (
    host="${1%:*}"
    port="${1##*:}"
    { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" >&3
    read -r -t 2 _ status _ <&3 || exit 1
    [[ "$status" == "200" ]]
)

# wait_ok NAME HOST:PORT PATH: waits up to 60 s for a 200; gives up if NAME's process died.
wait_ok() {
    local name="$1" pid="${pids[-1]}"
    for _ in $(seq 600); do
        http_ok "$2" "$3" && { echo "$name ready"; return 0; }
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited; last lines of .run/$name.log:" >&2
            tail -n 30 "$run/$name.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "$name not ready after 60 s (GET http://$2$3); see .run/$name.log" >&2
    exit 1
}

echo "building release binaries..."
cargo build --release --workspace --bins
scripts/install-nats.sh

# NATS: use the one on NATS_URL if it answers, else start one with JetStream (only locally).
hostport="${NATS_URL#*://}"
hostport="${hostport%%,*}"
hostport="${hostport##*@}"
nats_host="${hostport%:*}"
nats_port="${hostport##*:}"
if (exec 3<>"/dev/tcp/$nats_host/$nats_port") 2>/dev/null; then
    echo "using the nats-server already running on $NATS_URL"
else
    case "$nats_host" in
    127.0.0.1 | localhost) ;;
    *)
        echo "no nats-server reachable on $NATS_URL" >&2
        exit 1
        ;;
    esac
    mkdir -p "$run/nats"
    # Per-service identities and permissions; seeds already there are kept, the permissions are
    # rewritten for this version.
    "$bin/chatctl" nats-config --dir "$run/nats-auth" >/dev/null
    printf '# written by scripts/run-local.sh\ninclude "nats-auth/auth.conf"\n' >"$run/nats-server.conf"
    # A store from a run without authorization keeps its streams in the global account: move them
    # to the services' account (single server, stopped: renaming the directory is enough).
    if [[ -d "$run/nats/jetstream/\$G" && ! -e "$run/nats/jetstream/CHAT" ]]; then
        mv "$run/nats/jetstream/\$G" "$run/nats/jetstream/CHAT"
        echo "moved the streams of .run/nats to account CHAT"
    fi
    start nats-server "$root/.tools/bin/nats-server" -c "$run/nats-server.conf" -js -sd "$run/nats" \
        -a 127.0.0.1 -p "$nats_port" -m "$NATS_MONITOR_PORT"
    wait_ok nats-server "127.0.0.1:$NATS_MONITOR_PORT" "/healthz?js-enabled-only=true"
    nats_auth="$run/nats-auth"
fi

# nats_args ROLE: sets `nargs` to the NATS flags of a service of ROLE (with its seed when the
# server was started here).
nats_args() {
    nargs=(--nats-url "$NATS_URL")
    if [[ -n "${nats_auth:-}" ]]; then
        nargs+=(--nats-nkey-file "$nats_auth/$1.nk")
    fi
}

# storage provisions the streams the gateway waits for.
nats_args storage
start storage "$bin/storage" "${nargs[@]}" --metrics-addr "$STORAGE_METRICS"
wait_ok storage "$STORAGE_METRICS" /readyz

# The router serves group membership and fans group messages out.
nats_args router
start router "$bin/router" "${nargs[@]}" --metrics-addr "$ROUTER_METRICS"
wait_ok router "$ROUTER_METRICS" /readyz

# A dev secret, generated once and kept so dev tokens stay valid across runs.
if [[ ! -s "$run/jwt-secret" ]]; then
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$run/jwt-secret")
fi
nats_args gateway
JWT_SECRET="$(cat "$run/jwt-secret")" start gateway "$bin/gateway" \
    --listen "$GATEWAY_LISTEN" --metrics-addr "$GATEWAY_METRICS" --cores "$GATEWAY_CORES" \
    "${nargs[@]}" --dev-tokens
wait_ok gateway "$GATEWAY_METRICS" /readyz

cat <<INFO

The system is up (Ctrl-C stops it).
  web client:  http://$GATEWAY_LISTEN/   (sign in with any name)
  WebSocket:   ws://$GATEWAY_LISTEN/ws?token=<token>
  dev token:   http://$GATEWAY_LISTEN/dev/token?user=alice   (add &device=web for a device)
  metrics:     http://$GATEWAY_METRICS/metrics (gateway), http://$STORAGE_METRICS/metrics (storage), http://$ROUTER_METRICS/metrics (router)
  NATS:        $NATS_URL${nats_auth:+  (authorization: .run/nats-auth/auth.conf; e.g. chatctl --nats-nkey-file .run/nats-auth/admin.nk revoke --user U)}
  logs:        .run/*.log   dev secret: .run/jwt-secret
INFO

# Run until Ctrl-C, or until one of the services dies.
set +e
wait -n "${pids[@]}"
echo "a service exited; stopping the others (see .run/*.log)" >&2
exit 1
