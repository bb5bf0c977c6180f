#!/usr/bin/env python3
"""Helpers of scripts/prometheus-check.sh (standard library only, except `group-load`, which needs
the `websockets` package).

    prometheus-check.py ports N                      N free loopback TCP ports, one per line
    prometheus-check.py group-load --http URL        group and 1:1 traffic, an offline member, a
                                                     refused handshake and a malformed frame
    prometheus-check.py names SCRAPE... --use FILE   every metric name FILE uses is exposed
    prometheus-check.py snapshot --prom URL --at T   the checked queries at time T, as JSON
    prometheus-check.py compare BEFORE AFTER         before/after table; fails unless they moved
    prometheus-check.py dashboard FILE --prom URL --at T   every panel query of FILE runs
    prometheus-check.py rules --prom URL             every rule loaded and evaluated without error
"""

import argparse
import asyncio
import json
import random
import re
import socket
import string
import sys
import time
import urllib.parse
import urllib.request

# (label, PromQL, expectation): "increase" must be higher after the load than before it; "equal3"
# must be 3 before and after (the three scrape targets up / ready); "number" must be a finite
# number after the load; "info" is only shown.
QUERIES = [
    ("targets up", 'count(up{job=~"gateway|storage|router"} == 1)', "equal3"),
    ("gateway_messages_published_total", "sum(gateway_messages_published_total)", "increase"),
    ("gateway_items_delivered_total", "sum(gateway_items_delivered_total) or vector(0)", "increase"),
    ('gateway_items_delivered_total{path="inbox"}', 'sum(gateway_items_delivered_total{path="inbox"}) or vector(0)', "increase"),
    ("gateway_acks_total", "sum(gateway_acks_total)", "increase"),
    ("gateway_receipts_published_total", "sum(gateway_receipts_published_total)", "increase"),
    ("gateway_connections_accepted_total", "sum(gateway_connections_accepted_total)", "increase"),
    ("gateway_handshake_failures_total", "sum(gateway_handshake_failures_total) or vector(0)", "increase"),
    ("gateway_send_to_deliver_seconds_count", "sum(gateway_send_to_deliver_seconds_count)", "increase"),
    ("gateway_publish_ack_seconds_count", "sum(gateway_publish_ack_seconds_count)", "increase"),
    ("gateway_inbox_drain_seconds_count", "sum(gateway_inbox_drain_seconds_count)", "increase"),
    ("gateway_executor_busy_seconds_total", "sum(gateway_executor_busy_seconds_total)", "increase"),
    ("storage_purges_total", "sum(storage_purges_total)", "increase"),
    ("storage_cursor_updates_total", "sum(storage_cursor_updates_total)", "increase"),
    ("storage_push_events_total", "sum(storage_push_events_total)", "increase"),
    ("storage_receipt_events_total", "sum(storage_receipt_events_total) or vector(0)", "increase"),
    ("router_group_entries_total", "sum(router_group_entries_total)", "increase"),
    ("router_fanout_deliveries_total", "sum(router_fanout_deliveries_total)", "increase"),
    ("router_ops_total", "sum(router_ops_total) or vector(0)", "increase"),
    ("send-to-deliver p99 (s, 1m)",
     "histogram_quantile(0.99, sum by (le) (rate(gateway_send_to_deliver_seconds_bucket[1m])))", "number"),
    ("publish-ack p50 (s, 1m)",
     "histogram_quantile(0.5, sum by (le) (rate(gateway_publish_ack_seconds_bucket[1m])))", "number"),
    ("executor busy ratio (1m)", "max(rate(gateway_executor_busy_seconds_total[1m]))", "number"),
    ("gateway_resident_memory_bytes", "max(gateway_resident_memory_bytes)", "info"),
    ("storage_inbox_messages", "sum(storage_inbox_messages)", "info"),
    ("router_consumer_pending (sum)", "sum(router_consumer_pending)", "info"),
    ("firing alerts", 'count(ALERTS{alertstate="firing"}) or vector(0)', "info"),
]


def cmd_ports(a):
    socks = []
    for _ in range(a.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    for s in socks:
        print(s.getsockname()[1])
        s.close()


# ---------------------------------------------------------------------------------------------
# group-load


def dev_token(http, user, device=None):
    q = urllib.parse.urlencode({"user": user, **({"device": device} if device else {})})
    with urllib.request.urlopen(f"{http}/dev/token?{q}", timeout=10) as r:
        return r.read().decode().strip()


class Client:
    """One WebSocket session that acks every inbox item and reads group messages."""

    def __init__(self, ws, user):
        self.ws = ws
        self.user = user
        self.frames = asyncio.Queue()
        self.items = []
        self.held = 0
        self.task = asyncio.create_task(self.pump())

    async def pump(self):
        import websockets

        try:
            async for raw in self.ws:
                f = json.loads(raw)
                if f.get("t") == "msg":
                    self.held = max(self.held, f.get("seq", 0))
                    m = f.get("m", {})
                    self.items.append(m)
                    await self.ws.send(json.dumps({"t": "ack", "seq": self.held}))
                    if m.get("k") == "group" and m.get("from") != self.user:
                        await self.ws.send(json.dumps({"t": "read", "group": m["group"], "up_to": m["sid"]}))
                else:
                    await self.frames.put(f)
        except websockets.ConnectionClosed:
            pass

    async def request(self, frame, timeout=10.0):
        await self.ws.send(json.dumps(frame))
        deadline = time.monotonic() + timeout
        while True:
            f = await asyncio.wait_for(self.frames.get(), max(0.01, deadline - time.monotonic()))
            if f.get("id") == frame.get("id"):
                return f

    async def wait_items(self, pred, n, timeout=15.0):
        deadline = time.monotonic() + timeout
        while sum(1 for m in self.items if pred(m)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.user}: {sum(1 for m in self.items if pred(m))} of {n} items")
            await asyncio.sleep(0.05)

    async def close(self):
        await self.ws.close()
        await asyncio.wait_for(self.task, 5)


async def group_load(a):
    import websockets

    http = a.http.rstrip("/")
    ws_url = "ws" + http[len("http"):] + "/ws"
    tag = "".join(random.choices(string.ascii_lowercase, k=6))
    alice, bob, carol, dave = (f"pc{tag}-{n}" for n in ("alice", "bob", "carol", "dave"))

    async def connect(user):
        tok = dev_token(http, user, "web")
        ws = await websockets.connect(f"{ws_url}?{urllib.parse.urlencode({'token': tok})}", open_timeout=10)
        return Client(ws, user)

    # A refused handshake (gateway_handshake_failures_total).
    try:
        ws = await websockets.connect(f"{ws_url}?token=not-a-token", open_timeout=10)
        await ws.close()
        raise SystemExit("the gateway accepted a forged token")
    except websockets.exceptions.InvalidStatus as e:
        print(f"group-load: forged token refused with HTTP {e.response.status_code}")

    a_, b_, c_ = await connect(alice), await connect(bob), await connect(carol)
    # A malformed frame (gateway_frame_errors_total); the connection stays open.
    err = await a_.request({"t": "no_such_frame", "id": "bad-1"})
    print(f"group-load: malformed frame answered with {err.get('t')} {err.get('code', '')}".rstrip())
    g = await a_.request({"t": "group_create", "id": "gc-1", "name": "prom check", "members": [bob, carol, dave]})
    if g.get("t") != "group":
        raise SystemExit(f"group_create failed: {g}")
    gid = g["group"]["gid"]
    sids = []
    for i in range(a.messages):
        s = await a_.request({"t": "gsend", "id": f"gs-{i}", "group": gid, "body": f"group message {i}"})
        if s.get("t") != "sent":
            raise SystemExit(f"gsend failed: {s}")
        sids.append(s["sid"])
        await asyncio.sleep(a.interval)
    is_group_msg = lambda m: m.get("k") == "group" and m.get("group") == gid  # noqa: E731
    await b_.wait_items(is_group_msg, a.messages)
    await c_.wait_items(is_group_msg, a.messages)
    # dave was offline: his copies wait in the inbox and come with the drain (path="inbox").
    d_ = await connect(dave)
    await d_.wait_items(is_group_msg, a.messages)
    # 1:1 messages too, so the load moves the 1:1 series without loadgen as well.
    for i in range(a.direct):
        s = await a_.request({"t": "send", "id": f"ds-{i}", "to": bob, "body": f"direct message {i}"})
        if s.get("t") != "sent":
            raise SystemExit(f"send failed: {s}")
        await asyncio.sleep(a.interval)
    await b_.wait_items(lambda m: m.get("k") == "chat" and m.get("from") == alice, a.direct)
    r = await a_.request({"t": "receipts", "id": "rc-1", "group": gid, "sid": sids[-1]})
    print(f"group-load: group {gid}: {a.messages} messages to 3 members, {a.direct} 1:1; dave drained "
          f"{sum(1 for m in d_.items if is_group_msg(m))} from his inbox; receipts answer: {r.get('t')}")
    # Give read receipts and acks time to reach storage before the connections close.
    await asyncio.sleep(1.0)
    for c in (a_, b_, c_, d_):
        await c.close()


def cmd_group_load(a):
    asyncio.run(asyncio.wait_for(group_load(a), a.timeout))


# ---------------------------------------------------------------------------------------------
# names


METRIC_RE = re.compile(r"\b((?:gateway|storage|router)_[a-z0-9_]+)\b")


def exposed_names(paths, bases=None):
    """Every sample name of the scrapes; histogram and summary family names go to `bases`."""
    names = set()
    for p in paths:
        for line in open(p, encoding="utf-8"):
            if line.startswith("# TYPE "):
                _, _, name, typ = line.split()[:4]
                names.add(name)
                if typ in ("histogram", "summary"):
                    if bases is not None:
                        bases.add(name)
                    names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
            elif line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def used_names(path):
    text = open(path, encoding="utf-8").read()
    exprs = []
    if path.endswith(".json"):
        def walk(v):
            if isinstance(v, dict):
                for k, x in v.items():
                    if k in ("expr", "query", "definition") and isinstance(x, str):
                        exprs.append(x)
                    else:
                        walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
        walk(json.loads(text))
    else:
        exprs = [m.group(1) for m in re.finditer(r"^\s*expr:\s*(.+?)\s*$", text, re.M)]
        exprs += [m.group(1) for m in re.finditer(r"^\s*expr:\s*[|>]-?\n((?:\s{6,}.*\n)+)", text, re.M)]
    # Label names such as gateway_id, and label values, are not metric names.
    return {n for e in exprs for n in METRIC_RE.findall(re.sub(r'"[^"]*"', '""', e)) if n != "gateway_id"}


def cmd_names(a):
    bases = set()
    exposed = exposed_names(a.scrapes, bases)
    bad = 0
    for f in a.use:
        used = used_names(f)
        missing = sorted(used - exposed)
        print(f"{f}: {len(used)} metric names used, all exposed" if not missing
              else f"{f}: NOT EXPOSED by any service: {', '.join(missing)}")
        bad += len(missing)
    used_anywhere = set().union(*(used_names(f) for f in a.use))
    unused = sorted(n for n in exposed - bases - used_anywhere if not n.endswith(("_sum", "_count")))
    if unused:
        print(f"exposed but not on the dashboard or in the alerts: {', '.join(unused)}")
    sys.exit(1 if bad else 0)


# ---------------------------------------------------------------------------------------------
# snapshot / compare / rules


def api(prom, path, **params):
    url = f"{prom.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"{url}: {body}")
    return body["data"]


def value(data):
    res = data["result"]
    if data["resultType"] == "scalar":
        return float(res[1])
    if not res:
        return None
    return float(res[0]["value"][1])


def cmd_snapshot(a):
    out = {"time": a.at, "values": {}}
    for label, q, _ in QUERIES:
        out["values"][label] = value(api(a.prom, "query", query=q, time=a.at))
    json.dump(out, sys.stdout, indent=1)


def fmt(v):
    if v is None:
        return "(none)"
    if v != v:
        return "NaN"
    return f"{v:.6g}"


def cmd_compare(a):
    before, after = (json.load(open(p)) for p in (a.before, a.after))
    failures = []
    print(f"{'series (PromQL in ops/prometheus-check.py)':<48} {'before':>12} {'after':>12}  check")
    for label, _q, want in QUERIES:
        b, f = before["values"].get(label), after["values"].get(label)
        if want == "increase":
            ok = b is not None and f is not None and f > b
            check = "increased" if ok else "DID NOT INCREASE"
        elif want == "equal3":
            ok = b == 3 and f == 3
            check = "3 of 3" if ok else "NOT ALL UP"
        elif want == "number":
            ok = f is not None and f == f and f not in (float("inf"), float("-inf"))
            check = "a number" if ok else "NOT A NUMBER"
        else:
            ok, check = True, ""
        if not ok:
            failures.append(label)
        print(f"{label:<48} {fmt(b):>12} {fmt(f):>12}  {check}")
    print(f"(instant queries at {before['time']:.3f} and {after['time']:.3f}: "
          f"{after['time'] - before['time']:.1f} s apart)")
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        sys.exit(1)


def cmd_dashboard(a):
    """Runs every panel query of the dashboard (variables: all instances, a 30 s rate window)."""
    d = json.load(open(a.dashboard))
    queries = []

    def walk(panels, row=""):
        for p in panels:
            if p.get("type") == "row":
                walk(p.get("panels", []), p.get("title", ""))
                row = p.get("title", "")
                continue
            for t in p.get("targets", []):
                queries.append((f"{row} / {p.get('title')}", t["expr"]))

    walk(d["panels"])
    errors, empty = [], []
    for title, expr in queries:
        e = expr.replace("$__rate_interval", "30s")
        e = re.sub(r"\$(gateway|storage|router)\b", ".*", e)
        try:
            data = api(a.prom, "query", query=e, time=a.at)
        except (SystemExit, OSError) as err:
            errors.append(f"{title}: {expr}: {err}")
            continue
        if not data["result"]:
            empty.append(f"{title}: {expr}")
    print(f"dashboard: {len(queries)} panel queries run against Prometheus: {len(errors)} failed, "
          f"{len(empty)} returned no series, {len(queries) - len(errors) - len(empty)} returned data")
    for x in empty:
        print(f"  no data: {x}")
    for x in errors:
        print(f"  FAILED: {x}")
    sys.exit(1 if errors else 0)


def cmd_rules(a):
    groups = api(a.prom, "rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    bad = [r for r in rules if r.get("health") != "ok"]
    never = [r for r in rules if r.get("lastEvaluation", "").startswith("0001-")]
    print(f"rules: {len(groups)} groups, {len(rules)} rules loaded from {a.expect}; "
          f"{len(rules) - len(bad) - len(never)} evaluated healthy")
    for r in bad:
        print(f"  rule {r['name']}: health {r.get('health')}: {r.get('lastError')}")
    for r in never:
        print(f"  rule {r['name']}: never evaluated")
    firing = [r for r in rules for al in r.get("alerts", []) if al.get("state") in ("firing", "pending")]
    for r in firing:
        for al in r["alerts"]:
            print(f"  alert {r['name']} is {al['state']}: {json.dumps(al.get('labels', {}))}")
    if not firing:
        print("  no alert pending or firing")
    if not rules or bad or never:
        sys.exit(1)
    if a.expect_rules and len(rules) != a.expect_rules:
        print(f"expected {a.expect_rules} rules (promtool check rules), Prometheus loaded {len(rules)}")
        sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("ports")
    c.add_argument("n", type=int)
    c.set_defaults(fn=cmd_ports)
    c = sub.add_parser("group-load")
    c.add_argument("--http", required=True, help="the gateway's listener, http://HOST:PORT")
    c.add_argument("--messages", type=int, default=20, help="group messages")
    c.add_argument("--direct", type=int, default=20, help="1:1 messages")
    c.add_argument("--interval", type=float, default=0.05)
    c.add_argument("--timeout", type=float, default=60)
    c.set_defaults(fn=cmd_group_load)
    c = sub.add_parser("names")
    c.add_argument("scrapes", nargs="+")
    c.add_argument("--use", action="append", required=True)
    c.set_defaults(fn=cmd_names)
    c = sub.add_parser("snapshot")
    c.add_argument("--prom", required=True)
    c.add_argument("--at", type=float, required=True)
    c.set_defaults(fn=cmd_snapshot)
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    c.set_defaults(fn=cmd_compare)
    c = sub.add_parser("dashboard")
    c.add_argument("dashboard")
    c.add_argument("--prom", required=True)
    c.add_argument("--at", type=float, required=True)
    c.set_defaults(fn=cmd_dashboard)
    c = sub.add_parser("rules")
    c.add_argument("--prom", required=True)
    c.add_argument("--expect", default="ops/alerts.yml")
    c.add_argument("--expect-rules", type=int, default=0)
    c.set_defaults(fn=cmd_rules)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
