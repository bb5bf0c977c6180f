#!/usr/bin/env bash
# WebSocket conformance of the gateway: runs the Autobahn TestSuite's fuzzingclient cases against
# a real gateway, with kosoku (PyPI: a Rust runner that drives Autobahn's own case files under
# Python 3; no Docker, no Python 2).
#
# Starts its own nats-server (.tools/bin/nats-server, scripts/install-nats.sh), storage and a
# gateway with --dev-tokens on free loopback ports, gets a dev token, and points the suite at
# ws://127.0.0.1:<port>/ws?token=<token>. Writes into bench-results/autobahn/ (or $OUT):
#   index.json    Autobahn's own index format (behavior / behaviorClose / close code per case)
#   results.json  per case: Autobahn's verdicts, what was received, and this script's
#                 classification (see summary.md for what the classes mean)
#   summary.md    pass / non-strict / fail per case group, and each failure class explained
#   cases/        Autobahn's full per-case report (wire log included) for every case that is not
#                 explained by the application protocol (the ones worth reading)
#
# Usage: scripts/autobahn.sh [--release] [--raw] [-i CASE]... [-x CASE]...
#   -i / -x  case ids or globs to include / exclude (default: everything but 12.* and 13.*,
#            permessage-deflate, which the gateway does not negotiate)
#   --release  test target/release binaries (default: target/debug)
#   --raw      run the cases unadapted (results in bench-results/autobahn/raw/); by default a
#              small adapter maps the gateway's protocol answers back to the echo the cases expect
# Environment: OUT (result dir), PARALLEL (cases at once, default 2), SUITE_TIMEOUT_SECS
# (a bound on the whole suite run, default 1500).
#
# Our protocol is JSON in text frames: the gateway answers every text message that is not a
# protocol frame with an `error` frame (and binary messages with `binary_unsupported`), and greets
# each connection with `hello` and `synced`. The suite expects an echo server, so its verdicts on
# echo cases are "FAILED" for application reasons; the classification below tells those apart from
# framing, UTF-8 and close-handshake failures, which are the ones that matter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

KOSOKU_VERSION=0.1.0
KOSOKU_SHA256=a9b34e593defe29d931e346c88947b58a015495f09dd13643e4cc952c75602ac

profile=debug
mode=adapted
includes=()
excludes=()
while (($#)); do
    case "$1" in
    --release) profile=release ;;
    --raw) mode=raw ;;
    -i) includes+=("$2"); shift ;;
    -x) excludes+=("$2"); shift ;;
    -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "autobahn.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if ((${#excludes[@]} == 0 && ${#includes[@]} == 0)); then
    excludes=("12.*" "13.*")
fi

if [[ "$mode" == raw ]]; then
    OUT="${OUT:-$root/bench-results/autobahn/raw}"
else
    OUT="${OUT:-$root/bench-results/autobahn}"
fi
PARALLEL="${PARALLEL:-2}"
SUITE_TIMEOUT_SECS="${SUITE_TIMEOUT_SECS:-1500}"

# --- tools ---------------------------------------------------------------------------------
scripts/install-nats.sh >/dev/null
venv="$root/.tools/autobahn-venv"
if ! "$venv/bin/python" -c "import kosoku, importlib.metadata as m; assert m.version('kosoku') == '$KOSOKU_VERSION'" 2>/dev/null; then
    python="$(command -v python3)"
    "$python" -c 'import sys; assert sys.version_info >= (3, 10), "kosoku needs Python >= 3.10"'
    "$python" -m venv "$venv"
    req="$(mktemp)"
    echo "kosoku==$KOSOKU_VERSION --hash=sha256:$KOSOKU_SHA256" >"$req"
    # The wheel has no dependencies; hash-checking mode accepts only the pinned file.
    "$venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes --no-deps \
        --only-binary=:all: -r "$req"
    rm -f "$req"
fi

if [[ "$profile" == release ]]; then
    cargo build --release -p gateway -p storage
else
    cargo build -p gateway -p storage
fi
bin="$root/target/$profile"

# --- the system under test -----------------------------------------------------------------
work="$(mktemp -d -t autobahn-XXXXXX)"
pids=()
cleanup() {
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
    done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        for _ in $(seq 50); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "${pids[i]}" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# http_get HOST:PORT PATH: prints the body of a 200 answer, fails otherwise.
http_get() {
    python3 - "$1" "$2" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}{sys.argv[2]}", timeout=2) as r:
        sys.stdout.write(r.read().decode())
except Exception:
    sys.exit(1)
PY
}

# wait_ok NAME PID HOST:PORT PATH: up to 60 s for a 200, failing early if the process died.
wait_ok() {
    for _ in $(seq 300); do
        http_get "$3" "$4" >/dev/null && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            echo "$1 exited; last lines of its log:" >&2
            tail -n 30 "$work/$1.log" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "$1 not ready after 60 s" >&2
    tail -n 30 "$work/$1.log" >&2
    exit 1
}

nats_port="$(free_port)"
nats_mon="$(free_port)"
"$root/.tools/bin/nats-server" -js -sd "$work/nats" -a 127.0.0.1 -p "$nats_port" -m "$nats_mon" \
    >"$work/nats-server.log" 2>&1 &
pids+=("$!")
wait_ok nats-server "$!" "127.0.0.1:$nats_mon" "/healthz?js-enabled-only=true"
nats_url="nats://127.0.0.1:$nats_port"

storage_metrics="127.0.0.1:$(free_port)"
"$bin/storage" --nats-url "$nats_url" --metrics-addr "$storage_metrics" >"$work/storage.log" 2>&1 &
pids+=("$!")
wait_ok storage "$!" "$storage_metrics" /readyz

gw_listen="127.0.0.1:$(free_port)"
gw_metrics="127.0.0.1:$(free_port)"
JWT_SECRET="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" "$bin/gateway" \
    --listen "$gw_listen" --metrics-addr "$gw_metrics" --cores 1 --nats-url "$nats_url" \
    --gateway-id autobahn-gw --dev-tokens >"$work/gateway.log" 2>&1 &
gw_pid="$!"
pids+=("$gw_pid")
wait_ok gateway "$gw_pid" "$gw_metrics" /readyz
for _ in $(seq 100); do
    token="$(http_get "$gw_listen" "/dev/token?user=autobahn&device=suite" || true)"
    [[ -n "$token" ]] && break
    sleep 0.1
done
[[ -n "$token" ]] || { echo "no dev token from the gateway" >&2; exit 1; }
url="ws://$gw_listen/ws?token=$token"
echo "gateway up on $gw_listen (profile $profile); running the suite (parallel $PARALLEL)"

# --- the suite -----------------------------------------------------------------------------
mkdir -p "$OUT"
rm -rf "$OUT/cases"
inc_json="$(printf '%s\n' "${includes[@]+"${includes[@]}"}" | python3 -c 'import json,sys; print(json.dumps([l for l in sys.stdin.read().split("\n") if l]))')"
exc_json="$(printf '%s\n' "${excludes[@]+"${excludes[@]}"}" | python3 -c 'import json,sys; print(json.dumps([l for l in sys.stdin.read().split("\n") if l]))')"
set +e
timeout --kill-after=10 "$SUITE_TIMEOUT_SECS" "$venv/bin/python" - "$url" "$OUT" "$inc_json" "$exc_json" "$PARALLEL" "$profile" "$mode" <<'PY'
import asyncio, json, os, sys, time
from collections import Counter, OrderedDict

import kosoku
import kosoku.cases as kcases  # builds the case index; the runner reuses these classes
from kosoku._caseindex import _case_id
from kosoku._report import case_to_dict
import case as autobahn_case

url, out, inc, exc, parallel, profile, mode = sys.argv[1:8]
inc, exc, parallel = json.loads(inc) or None, json.loads(exc) or None, int(parallel)
ADAPT = mode == "adapted"

# What the gateway sent at the application level, per case: hello, synced, error:<code>.
APP = {}


def gw_frame(msg, binary):
    """The gateway's own protocol frame (hello / synced / error), or None."""
    if binary:
        return None
    try:
        v = json.loads(msg if isinstance(msg, str) else bytes(msg).decode("utf-8"))
    except Exception:
        return None
    return v if isinstance(v, dict) and v.get("t") in ("hello", "synced", "error") else None


def note(case, v):
    APP.setdefault(_case_id(type(case).__name__), []).append(
        v["t"] if v["t"] != "error" else "error:%s" % v.get("code"))


# The protocol adapter (default; --raw turns it off). The suite expects an echo server; the
# gateway greets with hello + synced and answers each complete, valid text message with
# `error bad_json` (each binary message with `binary_unsupported`). The adapter drops the
# greeting and counts each such answer as the echo the case expects at that position, provided
# its kind (text / binary) matches. Anything else is passed through unchanged. The case then
# drives the closing handshake itself, as it would against an echo server, so Autobahn's
# framing, fragmentation, UTF-8 and close verdicts are measured instead of being drowned by the
# missing echo. (The echo's *content* is not checked: the gateway does not echo.)
if ADAPT:
    Case = autobahn_case.Case
    base_on_message = Case.onMessage

    def adapted_base(self, msg, binary):
        v = gw_frame(msg, binary)
        if v is not None:
            note(self, v)
            if v["t"] in ("hello", "synced"):
                return None
            if v["t"] == "error" and v.get("code") in ("bad_json", "binary_unsupported"):
                want_bin = v["code"] == "binary_unsupported"
                k = sum(1 for e in self.received if e[0] == "message")
                for outcome in self.expected.values():
                    msgs = [e for e in outcome if e[0] == "message"]
                    if k < len(msgs) and msgs[k][2] == want_bin:
                        msg, binary = msgs[k][1], msgs[k][2]
                        break
        return base_on_message(self, msg, binary)

    Case.onMessage = adapted_base

    def wrap_custom(cls):
        orig = cls.__dict__["onMessage"]

        def adapted(self, msg, binary):
            v = gw_frame(msg, binary)
            if v is not None:
                note(self, v)
                if v["t"] in ("hello", "synced"):
                    return None
                n = getattr(self, "DATALEN", None) or getattr(self, "LEN", None) or 0
                if v["t"] == "error" and v.get("code") == "bad_json":
                    msg, binary = "*" * n, False
                elif v["t"] == "error" and v.get("code") == "binary_unsupported":
                    msg, binary = b"\xfe" * n, True
            return orig(self, msg, binary)

        cls.onMessage = adapted

    for cls in kcases.CASES.values():
        if cls is not Case and "onMessage" in cls.__dict__:
            wrap_custom(cls)
else:
    Case = autobahn_case.Case
    base_on_message = Case.onMessage

    def noting(self, msg, binary):
        v = gw_frame(msg, binary)
        if v is not None:
            note(self, v)
        return base_on_message(self, msg, binary)

    Case.onMessage = noting

started = time.time()
try:
    results = asyncio.run(kosoku.run_fuzzingclient(url, inc, exc, concurrency=parallel))
except kosoku.FailureError as e:
    results = e.results
elapsed = time.time() - started

GOOD = {"OK", "NON-STRICT", "INFORMATIONAL"}


def app_frames(d):
    """Splits what the gateway sent into its greeting (hello, synced), its error frames (codes)
    and everything else (pings, pongs, other messages). Uses the frames recorded by the hook
    (the report's copies of received messages are truncated)."""
    app = APP.get(d["id"], [])
    greet = [a for a in app if a in ("hello", "synced")]
    errors = [a[6:] for a in app if a.startswith("error:")]
    n_msgs = sum(1 for e in d["received"] if e[0] == "message")
    other = [e for e in d["received"] if e[0] != "message"]
    # Messages the hook did not recognise as gateway frames (raw mode records every message).
    if not ADAPT and n_msgs > len(app):
        other.append(("message", "<%d unrecognised>" % (n_msgs - len(app))))
    return greet, errors, other


def classify(d):
    """One of:
    pass            Autobahn's verdicts are OK / NON-STRICT / INFORMATIONAL
    size-limit      the gateway closed with 1009: a frame or message exceeded its 64 KiB limit
    app-echo        (--raw only) the close was right; only the echo differs: the gateway
                    answered each expected echo with an `error` frame (after hello/synced)
    app-greeting    (--raw only) the case expects no messages at all (only pings/pongs/close);
                    the only difference is the gateway's hello/synced
    app-timeout     (--raw only) the case waits for an echo before it starts the closing
                    handshake; it never came, so the suite dropped the connection itself
    protocol        anything else: a real framing / UTF-8 / close-handshake deviation
    """
    b, bc = d["behavior"], d["behaviorClose"]
    if b in GOOD and bc in GOOD:
        return "pass"
    if d.get("remoteCloseCode") == 1009:
        return "size-limit"
    if ADAPT:
        return "protocol"
    greet, errors, other = app_frames(d)
    for verdict, exp in d["expected"].items():
        exp_msgs = [e for e in exp if e[0] == "message"]
        exp_other = [tuple(e) for e in exp if e[0] != "message"]
        if exp_other != [tuple(e) for e in other]:
            continue
        want = ["binary_unsupported" if m[2] else "bad_json" for m in exp_msgs]
        if errors == want:
            if bc in GOOD:
                return "app-echo" if want else "app-greeting"
            if d["expectedClose"].get("closedByMe") and d["droppedByMe"] and not d["remoteCloseCode"]:
                return "app-timeout"
    return "protocol"


cases = [case_to_dict(r) for r in results]


def observed(d, app):
    """What happened at the end of the connection, in words."""
    who = "suite" if d["closedByMe"] else "gateway"
    parts = []
    if d["localCloseCode"] is not None:
        parts.append(f"suite sent close {d['localCloseCode']}")
    if d["remoteCloseCode"] is not None:
        parts.append(f"gateway sent close {d['remoteCloseCode']} ({d['remoteCloseReason'] or ''})")
    else:
        parts.append("gateway sent no close frame")
    if d["droppedByMe"]:
        parts.append("suite dropped TCP")
    if d["wasCloseHandshakeTimeout"]:
        parts.append("close handshake timed out")
    if d["wasServerConnectionDropTimeout"]:
        parts.append("gateway did not drop TCP in time")
    parts.append("clean" if d["wasClean"] else "not clean")
    answers = Counter(a for a in app if a.startswith("error:"))
    if answers:
        parts.append("gateway answered " + ", ".join(f"{n}x {a[6:]}" for a, n in answers.items()))
    return "; ".join(parts)


def failure_kind(d):
    """A protocol-level failure, by what the gateway did (see KINDS)."""
    if d["closedByMe"] and d["remoteCloseCode"] is None and not d["wasClean"] and not d["droppedByMe"]:
        return "close-not-answered"
    if d["behaviorClose"] == "WRONG CODE":
        return "wrong-close-code"
    if not d["closedByMe"] and d["expectedClose"].get("closedByMe") is False and d["droppedByMe"]:
        return "not-failed-by-gateway"
    if d["behaviorClose"] in GOOD:
        return "exchange-differs"
    return "other"


KINDS = {
    "close-not-answered": (
        "The suite started the closing handshake (a Close frame, sometimes after a message or "
        "ping; with or without a code); the gateway never sent its Close frame back and closed "
        "the TCP connection. RFC "
        "6455 §5.5.1: an endpoint that receives a Close frame MUST send a Close frame in "
        "response. Cause (gateway/src/conn.rs): `on_message` returns `Err(\"client_closed\")` on "
        "`Message::Close` and the session ends without flushing; tungstenite only queues the "
        "close reply, and writes it on the next read/write/flush, which never happens."),
    "wrong-close-code": "The gateway failed the connection, but with another close code than the spec asks for.",
    "not-failed-by-gateway": (
        "The gateway should have failed the connection (e.g. invalid UTF-8, a protocol error) but "
        "did not; the suite dropped it after its timeout."),
    "exchange-differs": "The close was right but the frames exchanged before it differ from what the case expects.",
    "other": "See the case's report in cases/.",
}

rows = []
for d in cases:
    app = APP.get(d["id"], [])
    cls = classify(d)
    rows.append(OrderedDict(
        id=d["id"],
        cls=cls,
        kind=failure_kind(d) if cls == "protocol" else None,
        behavior=d["behavior"],
        behaviorClose=d["behaviorClose"],
        remoteCloseCode=d["remoteCloseCode"],
        remoteCloseReason=d["remoteCloseReason"],
        localCloseCode=d["localCloseCode"],
        closedByMe=d["closedByMe"],
        wasClean=d["wasClean"],
        droppedByMe=d["droppedByMe"],
        failedByMe=d["failedByMe"],
        duration_ms=d["duration"],
        result=d["result"],
        resultClose=d["resultClose"],
        observed=observed(d, app),
        description=d["description"],
        expectation=d["expectation"],
        expectedClose=d["expectedClose"],
        gateway_app_frames=dict(Counter(app)),
        received=[e if len(str(e)) < 200 else str(e)[:200] + "..." for e in d["received"][:20]],
    ))

index = {}
for d in cases:
    index.setdefault(d["agent"], {})[d["id"]] = {
        "behavior": d["behavior"], "behaviorClose": d["behaviorClose"],
        "remoteCloseCode": d["remoteCloseCode"], "duration": d["duration"],
    }
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump(index, f, indent=1, sort_keys=True)
meta = {
    "runner": "kosoku " + __import__("importlib.metadata").metadata.version("kosoku"),
    "mode": mode,
    "gateway_profile": profile,
    "include": inc, "exclude": exc, "parallel": parallel,
    "cases": len(rows), "seconds": round(elapsed, 1),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"meta": meta, "cases": rows}, f, indent=1)
os.makedirs(os.path.join(out, "cases"), exist_ok=True)
for d, r in zip(cases, rows):
    if r["cls"] == "protocol":
        with open(os.path.join(out, "cases", d["id"] + ".json"), "w") as f:
            json.dump(d, f, indent=1, default=str)


# --- summary.md ---
def group_of(cid):
    return ".".join(cid.split(".")[:2]) if cid.split(".")[0] in ("1", "6", "7", "9") else cid.split(".")[0]


TITLES = {
    "1": "Framing", "2": "Pings/Pongs", "3": "Reserved bits", "4": "Opcodes", "5": "Fragmentation",
    "6": "UTF-8 handling", "7": "Close handling", "9": "Limits/performance",
    "10": "Auto-fragmentation",
}
groups = OrderedDict()
for r in rows:
    groups.setdefault(group_of(r["id"]), []).append(r)


def key(g):
    return [int(p) for p in g.split(".")]


classes = (["pass", "size-limit", "protocol"] if ADAPT
           else ["pass", "app-echo", "app-greeting", "app-timeout", "size-limit", "protocol"])
fail_classes = classes[1:]
lines = []
lines.append("# Autobahn TestSuite (fuzzingclient) against the gateway\n")
lines.append(
    f"Runner: {meta['runner']} (Autobahn's own case files under Python 3; no Docker, no Python 2). "
    f"Mode: **{mode}**. Gateway: `target/{profile}` binary, `--cores 1`, defaults otherwise "
    f"(64 KiB frame and message limit, no permessage-deflate). {len(rows)} cases in "
    f"{meta['seconds']} s, {parallel} at a time, {meta['date']}. Excluded: "
    f"{', '.join(exc or []) or 'none'}"
    f"{' (12.* and 13.* are permessage-deflate, which the gateway does not negotiate)' if exc and '12.*' in exc else ''}."
    f" Produced by `scripts/autobahn.sh{'' if ADAPT else ' --raw'}`.\n")
if ADAPT:
    lines.append(
        "Mode **adapted**: the suite expects an echo server; the gateway speaks PROTOCOL.md (JSON "
        "in text frames). It greets each connection with `hello` and `synced` and answers each "
        "complete, valid text message that is not a protocol frame with an `error` frame "
        "(`bad_json`) and each binary message with `binary_unsupported`. The script's adapter "
        "drops the greeting and counts each such answer as the echo the case expects at that "
        "position (when its kind, text or binary, matches); everything else goes to the case "
        "unchanged. So the verdicts below measure framing, fragmentation, UTF-8 validation and "
        "the closing handshake, not the echo (whose content the gateway never sends). "
        "`scripts/autobahn.sh --raw` runs the cases unadapted (see `raw/`).\n")
else:
    lines.append(
        "Mode **raw**: the cases as they are. Against a JSON protocol they fail for application "
        "reasons (no echo, an extra greeting); the classes below tell those apart.\n")
tot = Counter(r["cls"] for r in rows)
beh = Counter((r["behavior"], r["behaviorClose"]) for r in rows)
lines.append("## Totals\n")
lines.append("| class | cases |\n| --- | --- |")
for c in classes:
    lines.append(f"| {c} | {tot.get(c, 0)} |")
lines.append("")
lines.append("Autobahn's verdicts (behavior / close behavior):\n")
lines.append("| behavior | behaviorClose | cases |\n| --- | --- | --- |")
for (b, bc), n in sorted(beh.items(), key=lambda x: -x[1]):
    lines.append(f"| {b} | {bc} | {n} |")
lines.append("")
lines.append("## Per group\n")
lines.append("**pass** = OK/OK, **non-strict** = passed with NON-STRICT or INFORMATIONAL (acceptable "
             "to Autobahn), **fail** = anything else, split by class in the last columns.\n")
lines.append("| group | what | cases | pass | non-strict | fail | " + " | ".join(fail_classes) + " |")
lines.append("| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in fail_classes) + " |")
for g in sorted(groups, key=key):
    rs = groups[g]
    ok = sum(1 for r in rs if r["behavior"] == "OK" and r["behaviorClose"] == "OK")
    ns = sum(1 for r in rs if r["cls"] == "pass") - ok
    fail = len(rs) - ok - ns
    c = Counter(r["cls"] for r in rs)
    lines.append(f"| {g} | {TITLES.get(g.split('.')[0], '')} | {len(rs)} | {ok} | {ns} | {fail} | "
                 + " | ".join(str(c.get(k, 0)) for k in fail_classes) + " |")
lines.append("")
lines.append("## Failure classes\n")
expl = {
    "size-limit": "the gateway closed with 1009 (message too big): a frame or message exceeded its "
                  "64 KiB limit (`--max-frame`, PROTOCOL.md). By design for a chat gateway; these "
                  "cases send up to 16 MiB and expect it echoed.",
    "app-echo": "not a WebSocket failure: the close was right and the gateway answered each echo "
                "the case expected with exactly one `error` frame (`bad_json` for text, "
                "`binary_unsupported` for binary) after its `hello`/`synced` greeting. The "
                "message was reassembled and accepted as valid text; only the answer differs.",
    "app-greeting": "the case expects no message at all (only pings/pongs and a close); the "
                    "difference is the gateway's `hello`/`synced` greeting.",
    "app-timeout": "the case waits for its echo before starting the closing handshake; the "
                   "gateway's answer was the expected `error` frame instead, so the suite never "
                   "closed and dropped the connection after its timeout (\"failed by the wrong "
                   "endpoint\"). Application-level, like app-echo.",
    "protocol": "a framing, UTF-8 or closing-handshake deviation. Broken down below; full "
                "reports (wire log included) are in `cases/`.",
}
for c in fail_classes:
    lines.append(f"* **{c}** — {expl[c]}")
lines.append("")
prot = [r for r in rows if r["cls"] == "protocol"]
lines.append(f"## Protocol-level failures ({len(prot)})\n")
if prot:
    kinds = Counter(r["kind"] for r in prot)
    exchange_ok = sum(1 for r in prot if r["behavior"] in GOOD)
    lines.append(
        f"In short: {len(prot)} cases, by kind: "
        + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
        + f". In {exchange_ok} of them the message exchange itself passed (behavior "
        "OK/NON-STRICT/INFORMATIONAL) and only the closing handshake failed.\n")
if not prot:
    lines.append("None.\n")
else:
    by_kind = OrderedDict()
    for r in prot:
        by_kind.setdefault(r["kind"], []).append(r)
    for k, rs in by_kind.items():
        lines.append(f"### {k} ({len(rs)}): {', '.join(r['id'] for r in rs)}\n")
        lines.append(KINDS[k] + "\n")
    lines.append("| case | behavior | close | what the case does | what happened |")
    lines.append("| --- | --- | --- | --- | --- |")
    for r in prot:
        desc = " ".join(r["description"].split())[:140].replace("|", "\\|")
        lines.append(f"| {r['id']} | {r['behavior']} | {r['behaviorClose']} | {desc} | {r['observed'].replace('|', '/')} |")
    lines.append("")
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"{len(rows)} cases in {elapsed:.0f} s ({mode}): " + ", ".join(f"{c} {tot.get(c, 0)}" for c in classes))
print(f"wrote {out}/summary.md, results.json, index.json")
PY
rc=$?
set -e
if ! kill -0 "$gw_pid" 2>/dev/null; then
    echo "the gateway DIED during the suite; last lines of its log:" >&2
    tail -n 40 "$work/gateway.log" >&2
    rc=1
fi
tail -n 200 "$work/gateway.log" >"$OUT/gateway-log-tail.txt" 2>/dev/null || true
exit "$rc"
