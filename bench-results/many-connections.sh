#!/usr/bin/env bash
# The largest number of concurrent connections this box holds: several gateway processes on one
# port (SO_REUSEPORT spreads the accepts), several loadgen worker processes, many loopback
# source addresses. Each process may hold at most ~20,000 descriptors, so a gateway process is
# given at most ~19,000 connections and loadgen spreads itself over workers of --per-worker.
#
#   bench-results/many-connections.sh [--skip-build] [--out DIR]
#
# After the hold, loadgen's delivery probe has every held connection send one message to another
# held connection (PROBE_RATE per second in all) and checks that each receives exactly one.
#
# Environment: CONNECTIONS (100000), GATEWAYS (ceil(CONNECTIONS / 16000)), RATE (2000/s),
# HOLD (30s), SOURCE_IPS (16), PROBE_RATE (2000/s; PROBE=0 skips the probe), NATS_SERVER.
# Writes loadgen connect's JSON/Markdown/SVG into the
# output directory (default bench-results/) plus many-<stamp>.md: the kernel's own memory for
# the sockets (Slab and TCP buffer pages from /proc, before and with the connections) beside
# the processes' RSS, so the whole cost per connection is known.
#
# Sysctls it sets when run as root (see `loadgen connect --help`): fs.file-max, fs.nr_open,
# net.ipv4.ip_local_port_range, net.core.somaxconn, net.ipv4.tcp_max_syn_backlog.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/bench-results"
build=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --skip-build) build=0 ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo pipefail/{/^set -euo/!p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "many-connections.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
CONNECTIONS="${CONNECTIONS:-100000}"
GATEWAYS="${GATEWAYS:-$(( (CONNECTIONS + 15999) / 16000 ))}"
RATE="${RATE:-2000}"
HOLD="${HOLD:-30s}"
SOURCE_IPS="${SOURCE_IPS:-16}"
PROBE="${PROBE:-1}"
PROBE_RATE="${PROBE_RATE:-2000}"
LOG_TAG=many
# shellcheck source=bench-results/lib.sh
source "$root/bench-results/lib.sh"
[[ -x "${NATS_SERVER:-$root/.tools/bin/nats-server}" ]] || "$root/scripts/install-nats.sh"
NATS="$(find_nats)"
if [[ $build == 1 ]]; then
    (cd "$root" && cargo build --release -p gateway -p storage -p loadgen)
fi
bin="$root/target/release"
work="$(mktemp -d /tmp/many-conn.XXXXXX)"
cp "$bin/loadgen" "$bin/gateway" "$bin/storage" "$work/"
export PATH="$work:$PATH"
mkdir -p "$out"

if [[ $EUID == 0 ]]; then
    sysctl -qw fs.file-max=4000000 fs.nr_open=1100000 net.ipv4.ip_local_port_range="1024 65535" \
        net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 || true
fi
ulimit -n "$(ulimit -Hn)"

cleanup() { stop_all; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

JWT_SECRET="many-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"; export JWT_SECRET
np="$(free_port)"; nm="$(free_port)"; sm="$(free_port)"; gp="$(free_port)"
start nats-server "$NATS" -js -a 127.0.0.1 -p "$np" -m "$nm" -sd "$work/store"; nats_pid=$LAST_PID
wait_ready nats-server "http://127.0.0.1:$nm/healthz" "$nats_pid" "$work/nats-server.log"
start storage storage --nats-url "nats://127.0.0.1:$np" --metrics-addr "127.0.0.1:$sm"
wait_ready storage "http://127.0.0.1:$sm/readyz" "$LAST_PID" "$work/storage.log"
metrics=()
gw_pids=()
for g in $(seq 1 "$GATEWAYS"); do
    m="$(free_port)"
    start "gateway-$g" gateway --listen "127.0.0.1:$gp" --metrics-addr "127.0.0.1:$m" \
        --nats-url "nats://127.0.0.1:$np" --cores 1 --gateway-id "many-$g"
    metrics+=(--metrics-url "http://127.0.0.1:$m/metrics")
    gw_pids+=(--gateway-pid "$LAST_PID")
done
for a in "${metrics[@]}"; do [[ $a == --metrics-url ]] || wait_ready gateway "${a%/metrics}/readyz"; done
log "nats-server, storage and $GATEWAYS gateway processes on port $gp"

kernel() { # Slab kB, TCP pages, TCP sockets in use
    echo "$(awk '/^Slab:/ {print $2}' /proc/meminfo) $(awk '/^TCP:/ {print $11, $3}' /proc/net/sockstat)"
}
rss_kb() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/ {print $2}' /proc/$p/status 2>/dev/null || echo 0))); done; echo $t; }
read -r slab0 tcpmem0 socks0 <<<"$(kernel)"
nats0="$(rss_kb "$nats_pid")"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
# Sample the kernel every 2 s; keep the sample with the most TCP sockets (connections held).
(
    best=0
    while sleep 2; do
        read -r slab tcpmem socks <<<"$(kernel)"
        if ((socks > best)); then
            best=$socks
            echo "$slab $tcpmem $socks" >"$work/kernel.last"
            rss_kb "$nats_pid" >"$work/nats.last"
        fi
    done
) & sampler=$!
status=0
probe=(--probe-rate "$PROBE_RATE")
[[ "$PROBE" == 1 ]] || probe=(--no-probe)
loadgen connect --url "ws://127.0.0.1:$gp/ws" "${metrics[@]}" "${gw_pids[@]}" --nats-pid "$nats_pid" \
    --connections "$CONNECTIONS" --rate "$RATE" --hold "$HOLD" --source-ips "$SOURCE_IPS" "${probe[@]}" \
    --out "$out" || status=$?
kill "$sampler" 2>/dev/null || true
read -r slab1 tcpmem1 socks1 <"$work/kernel.last"
nats1="$(cat "$work/nats.last")"
page_kb=$(( $(getconf PAGESIZE) / 1024 ))
sockets=$((socks1 - socks0))
{
    echo "# Many connections — $stamp"
    echo
    echo "* command: \`CONNECTIONS=$CONNECTIONS GATEWAYS=$GATEWAYS RATE=$RATE HOLD=$HOLD SOURCE_IPS=$SOURCE_IPS PROBE=$PROBE PROBE_RATE=$PROBE_RATE bench-results/many-connections.sh\`"
    echo "* commit: \`$(git -C "$root" rev-parse HEAD)\`; machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
    echo "* $GATEWAYS gateway processes (\`--cores 1\` each) on one port (SO_REUSEPORT), loadgen connect workers of ≤ 19,000 connections, $SOURCE_IPS source addresses; loadgen exit status $status (its report: connect-*.md of this run)"
    echo
    echo "| what (at the sample with the most TCP sockets) | before | with | growth | per connection |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    echo "| TCP sockets in use (both ends) | $socks0 | $socks1 | $sockets | 2 |"
    echo "| kernel Slab (kB) | $slab0 | $slab1 | $((slab1 - slab0)) | $(( (slab1 - slab0) * 1024 / CONNECTIONS )) B |"
    echo "| kernel TCP buffer pages (kB) | $((tcpmem0 * page_kb)) | $((tcpmem1 * page_kb)) | $(( (tcpmem1 - tcpmem0) * page_kb )) | $(( (tcpmem1 - tcpmem0) * page_kb * 1024 / CONNECTIONS )) B |"
    echo "| nats-server RSS (kB) | $nats0 | $nats1 | $((nats1 - nats0)) | $(( (nats1 - nats0) * 1024 / CONNECTIONS )) B |"
    echo
    echo "The kernel figures count both ends of each loopback connection (the client's socket is in"
    echo "loadgen's process); a real deployment's gateway host carries about half of them."
} >"$out/many-$stamp.md"
cat "$out/many-$stamp.md"
exit "$status"
