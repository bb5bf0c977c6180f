#!/usr/bin/env bash
# Fuzzes the decoders that face the network, each target for a bounded time, with cargo-fuzz
# (libFuzzer + AddressSanitizer). The targets live in fuzz/ (its own workspace, not a member of
# the main one):
#   client_frame  protocol::decode_client_frame: every client text frame
#   http_head     gateway/src/handshake.rs parse_head (+ token verification on what it parsed):
#                 every connection's first bytes
#   stored_json   InboxItem::from_bytes / render_item and the protocol::groups JSON contract
#   ws_frames     wscodec::Decoder: every byte a client sends after the upgrade, in arbitrary
#                 read chunks (the same messages and violations whatever the chunking)
#   nats_proto    gateway/src/bridge/live_mux/proto.rs: the NATS server operations the gateway's
#                 live connection parses (MSG, HMSG and header blocks, INFO, -ERR ...), split anywhere
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 60 s each, every target)
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=address and friends). With only a stable
# toolchain, RUSTC_BOOTSTRAP=1 lets stable rustc accept them (this script sets it; use nightly
# with TOOLCHAIN=nightly if you prefer). cargo-fuzz itself is a normal crate, installed with the
# stable toolchain into .tools/cargo/.
#
# The corpus grows in fuzz/corpus/<target>/ (not committed); fuzz/seeds/<target>/ holds the
# committed seeds, fuzz/dicts/ the dictionaries. A crash or failed check stops that target and
# leaves its input in fuzz/artifacts/<target>/; the script goes on with the others, prints how
# to reproduce, and exits 1. Turn every crash into a regression test (protocol's unit tests).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

CARGO_FUZZ_VERSION=0.13.2
secs="${1:-60}"
shift || true
targets=("$@")
((${#targets[@]})) || targets=(client_frame http_head stored_json ws_frames nats_proto)
[[ "$secs" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS must be a number, got $secs" >&2; exit 2; }

export PATH="$root/.tools/cargo/bin:$PATH"
if [[ "$(cargo-fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into .tools/cargo (stable toolchain)..."
    cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$root/.tools/cargo"
fi
toolchain=()
if [[ -n "${TOOLCHAIN:-}" ]]; then
    toolchain=("+$TOOLCHAIN")
else
    export RUSTC_BOOTSTRAP=1
fi

declare -A dict=([client_frame]=json [stored_json]=json [http_head]=http [nats_proto]=nats [ws_frames]=ws)
declare -A max_len=([client_frame]=8192 [stored_json]=8192 [http_head]=9216 [nats_proto]=8192 [ws_frames]=8192)

# -a: debug assertions (integer overflow checks) in the fuzzed code.
mkdir -p artifacts
if ! cargo "${toolchain[@]+"${toolchain[@]}"}" fuzz build -a >artifacts/build.txt 2>&1; then
    tail -n 40 artifacts/build.txt >&2
    echo "fuzz.sh: building the fuzz targets failed (full log: fuzz/artifacts/build.txt)" >&2
    exit 2
fi
summary=()
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/last-run.txt"
    echo "== $t: ${secs} s"
    set +e
    # timeout: a hard bound on top of libFuzzer's own -max_total_time (build time included).
    timeout --kill-after=10 $((secs + 300)) cargo "${toolchain[@]+"${toolchain[@]}"}" fuzz run -a "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -dict="dicts/${dict[$t]}.dict" -max_len="${max_len[$t]}" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    runs="$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n1)"
    cov="$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -n1)"
    if ((rc == 0)); then
        summary+=("$t: ok, ${runs:-?} execs in ${secs} s (${cov:-no coverage line})")
    else
        crash="$(grep -oE "artifacts/$t/[a-z]+-[0-9a-f]+" "$log" | tail -n1 || true)"
        summary+=("$t: FAILED (exit $rc) after ${runs:-?} execs; input: ${crash:-see $log}")
        failed+=("$t")
        grep -E 'panicked at|assertion|ERROR: AddressSanitizer|ERROR: libFuzzer|SUMMARY' "$log" | head -n 8 >&2 || true
    fi
done

echo
echo "fuzz summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), ${secs} s per target):"
printf '  %s\n' "${summary[@]}" | tee artifacts/summary.txt
if ((${#failed[@]})); then
    echo
    echo "reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<file>" >&2
    echo "then add a regression test for the input (protocol's unit tests) before fixing." >&2
    exit 1
fi
