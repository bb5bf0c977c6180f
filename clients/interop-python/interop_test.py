#!/usr/bin/env python3
"""Interop test: a scripted conversation with a dev-mode gateway through Python `websockets`,
checking every frame against PROTOCOL.md. Starts nothing itself.

    CHAT_HTTP_URL=http://127.0.0.1:8080 [CHAT_GROUPS=1] python interop_test.py

Exits 0 when every step passed, 1 on the first mismatch (printing the frames around it).
"""

import asyncio
import json
import os
import random
import string
import sys
import time
import urllib.parse
import urllib.request

import websockets
from websockets.exceptions import InvalidStatus

HTTP = os.environ.get("CHAT_HTTP_URL", "http://127.0.0.1:8080").rstrip("/")
WS = "ws" + HTTP[len("http"):] + "/ws"
GROUPS = os.environ.get("CHAT_GROUPS", "1") == "1"
WAIT = float(os.environ.get("CHAT_WAIT_SECS", "10"))
RUN = "".join(random.choices(string.ascii_lowercase + string.digits, k=6))


class Mismatch(Exception):
    pass


def check(cond, what, *frames):
    if not cond:
        detail = "".join(f"\n    {json.dumps(f)}" for f in frames)
        raise Mismatch(f"{what}{detail}")


def token(user, device=None):
    q = {"user": user}
    if device:
        q["device"] = device
    with urllib.request.urlopen(f"{HTTP}/dev/token?{urllib.parse.urlencode(q)}", timeout=WAIT) as r:
        check(r.status == 200, f"/dev/token answered {r.status}")
        return r.read().decode().strip()


class Client:
    """One connection. Every frame received is kept in `inbox` until a step takes it."""

    def __init__(self, user, device):
        self.user, self.device = user, device
        self.inbox = []
        self.order = []  # every frame, in arrival order
        self.arrived = asyncio.Event()
        self.ws = None
        self.reader = None
        self.closed = None  # (code, reason) once the socket is closed
        self.held = 0  # highest inbox seq received

    async def connect(self, since=None):
        q = {"token": token(self.user, self.device)}
        if since is not None:
            q["since"] = str(since)
        self.ws = await websockets.connect(f"{WS}?{urllib.parse.urlencode(q)}", open_timeout=WAIT)
        self.closed = None
        self.reader = asyncio.create_task(self._read())
        hello = await self.expect(lambda f: f["t"] == "hello", "hello")
        check(hello["user"] == self.user and hello["device"] == self.device, "hello names user and device", hello)
        check(isinstance(hello["heartbeat_ms"], int) and hello["heartbeat_ms"] > 0, "hello.heartbeat_ms", hello)
        check(isinstance(hello["max_body"], int) and hello["max_body"] > 0, "hello.max_body", hello)
        check(isinstance(hello["gateway"], str) and isinstance(hello["resume_from"], int), "hello fields", hello)
        if since is not None:
            check(hello["resume_from"] >= since, "resume_from >= since", hello)
        return hello

    async def _read(self):
        try:
            async for raw in self.ws:
                check(isinstance(raw, str), f"server sent a binary frame: {raw!r}")
                f = json.loads(raw)
                check(isinstance(f, dict) and isinstance(f.get("t"), str), "frame is an object with t", f)
                if f["t"] == "msg":
                    check(f["seq"] > self.held, f"msg seqs increase (held {self.held})", f)
                    self.held = f["seq"]
                self.inbox.append(f)
                self.order.append(f)
                self.arrived.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = (self.ws.close_code or 1006, self.ws.close_reason or "")
            self.arrived.set()

    async def send(self, frame):
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def expect(self, pred, what, timeout=WAIT):
        """Takes the first frame matching `pred` (waiting for it); other frames stay."""
        deadline = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.inbox):
                if pred(f):
                    return self.inbox.pop(i)
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise Mismatch(
                    f"{self.user}: no {what} within {timeout:.0f} s"
                    f"{' (socket closed: %s)' % (self.closed,) if self.closed else ''}; frames held:"
                    + "".join(f"\n    {json.dumps(f)}" for f in self.inbox[-12:])
                )
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def expect_item(self, pred, what, timeout=WAIT):
        return await self.expect(lambda f: f["t"] == "msg" and pred(f["m"]), what, timeout)

    async def expect_none(self, pred, what, secs=0.5):
        await asyncio.sleep(secs)
        bad = [f for f in self.inbox if pred(f)]
        check(not bad, f"{self.user}: unexpected {what}", *bad)

    async def ack(self, seq=None):
        await self.send({"t": "ack", "seq": self.held if seq is None else seq})

    async def close(self):
        await self.ws.close()
        await asyncio.gather(self.reader, return_exceptions=True)


STEPS = []


def step(fn):
    STEPS.append(fn)
    return fn


class Ctx:
    pass


@step
async def connect_and_sync(c):
    """hello, then synced with seq 0 for a brand-new user."""
    c.alice = Client(f"alice_{RUN}", "py-a")
    c.bob = Client(f"bob_{RUN}", "py-b")
    for cl in (c.alice, c.bob):
        hello = await cl.connect()
        check(hello["resume_from"] == 0, "a new device resumes from 0", hello)
        synced = await cl.expect(lambda f: f["t"] == "synced", "synced")
        check(synced["seq"] == 0, "an empty inbox syncs at 0", synced)


@step
async def send_and_tick(c):
    """send → sent (one tick) with a sid, ts and dup=false; a retry is a duplicate."""
    c.mid = f"py-{RUN}-1"
    await c.alice.send({"t": "send", "id": c.mid, "to": c.bob.user, "body": "hello from python ✓"})
    sent = await c.alice.expect(lambda f: f["t"] == "sent" and f.get("id") == c.mid, "sent")
    check(isinstance(sent["sid"], int) and sent["sid"] > 0 and isinstance(sent["ts"], int), "sent fields", sent)
    check(sent["dup"] is False, "first send is not a dup", sent)
    c.sid = sent["sid"]
    await c.alice.send({"t": "send", "id": c.mid, "to": c.bob.user, "body": "hello from python ✓"})
    again = await c.alice.expect(lambda f: f["t"] == "sent" and f.get("id") == c.mid, "sent (retry)")
    check(again["dup"] is True and again["sid"] == c.sid, "a retry with the same id is a dup with the same sid", again)


@step
async def delivery(c):
    """The recipient gets the message once, as a chat item whose seq is the sender's sid."""
    f = await c.bob.expect_item(lambda m: m["k"] == "chat" and m["id"] == c.mid, "chat item")
    m = f["m"]
    check(f["seq"] == c.sid, "msg seq equals the sender's sid", f)
    check(m["from"] == c.alice.user and m["dev"] == "py-a" and m["body"] == "hello from python ✓", "chat fields", f)
    check(isinstance(m["ts"], int), "chat ts", f)
    await c.bob.expect_none(lambda f: f["t"] == "msg" and f["m"].get("id") == c.mid, "second copy of the message")


@step
async def ack_and_receipt(c):
    """ack → the sender gets a delivered receipt covering the sid."""
    await c.bob.ack(c.sid)
    f = await c.alice.expect_item(lambda m: m["k"] == "receipt" and m["status"] == "delivered", "delivered receipt")
    m = f["m"]
    check(m["from"] == c.bob.user and m["up_to"] >= c.sid, "delivered receipt fields", f)
    await c.alice.ack()


@step
async def read_receipt(c):
    """read → the sender gets a read receipt (blue ticks)."""
    await c.bob.send({"t": "read", "conv": c.alice.user, "up_to": c.sid})
    f = await c.alice.expect_item(lambda m: m["k"] == "receipt" and m["status"] == "read", "read receipt")
    check(f["m"]["from"] == c.bob.user and f["m"]["up_to"] >= c.sid, "read receipt fields", f)
    await c.alice.ack()


@step
async def malformed_frames(c):
    """Malformed frames get an error frame with the right code; the connection stays open."""
    b = c.bob
    cases = [
        ("{not json", "bad_json", None),
        ('{"t":"nope"}', "unknown_type", None),
        ('{"body":"no type"}', "unknown_type", None),
        (json.dumps({"t": "send", "id": "py-missing", "to": c.alice.user}), "missing_field", "py-missing"),
        (json.dumps({"t": "ack", "seq": "seven"}), "bad_field", None),
        (json.dumps({"t": "send", "id": "has space", "to": c.alice.user, "body": "x"}), "bad_field", None),
        (json.dumps({"t": "send", "id": "py-baduser", "to": "no.dots", "body": "x"}), "bad_field", None),
    ]
    for text, code, fid in cases:
        await b.send(text)
        e = await b.expect(lambda f: f["t"] == "error", f"error for {text}")
        check(e["code"] == code, f"{text} → {code}", e)
        check(isinstance(e["msg"], str) and e["msg"], "error has a message", e)
        if fid:
            check(e.get("id") == fid, "error carries the frame's id", e)
    big = "x" * (64 * 1024 - 2048)  # over max_body (32 KiB) but under the frame limit
    await b.send(json.dumps({"t": "send", "id": "py-big", "to": c.alice.user, "body": big}))
    e = await b.expect(lambda f: f["t"] == "error", "error for a too large body")
    check(e["code"] == "too_large" and e.get("id") == "py-big", "too_large with the id", e)
    await b.send(b"\x01\x02binary")
    e = await b.expect(lambda f: f["t"] == "error", "error for a binary frame")
    check(e["code"] == "binary_unsupported", "binary frame → binary_unsupported", e)
    await b.send({"t": "ping", "extra": "unknown fields are ignored"})
    await b.expect(lambda f: f["t"] == "pong", "pong after the errors")
    check(b.closed is None, "the connection is still open after error frames")


@step
async def presence_and_typing(c):
    """presence answers with the same id; typing reaches an online recipient."""
    await c.alice.send({"t": "presence", "id": "py-p1", "users": [c.bob.user, f"nobody_{RUN}"]})
    p = await c.alice.expect(lambda f: f["t"] == "presence" and f.get("id") == "py-p1", "presence answer")
    by = {u["user"]: u for u in p["users"]}
    check(by.get(c.bob.user, {}).get("online") is True, "bob is online", p)
    check(by.get(f"nobody_{RUN}", {}).get("online") is False, "an unknown user is offline", p)
    await c.alice.send({"t": "presence_sub", "users": [c.bob.user]})
    await c.alice.send({"t": "typing", "conv": c.bob.user})
    t = await c.bob.expect(lambda f: f["t"] == "typing", "typing")
    check(t.get("from") == c.alice.user and "group" not in t, "typing names the typer", t)


@step
async def offline_delivery(c):
    """The recipient goes away; what is sent meanwhile is delivered on reconnect with since."""
    held = c.bob.held
    await c.bob.close()
    # The presence push for bob going offline (alice subscribed above).
    p = await c.alice.expect(
        lambda f: f["t"] == "presence" and "id" not in f and any(u["user"] == c.bob.user and not u["online"] for u in f["users"]),
        "presence push: bob offline",
    )
    check(all(isinstance(u.get("last_seen"), int) for u in p["users"] if u["user"] == c.bob.user), "last_seen", p)
    ids = [f"py-{RUN}-off{i}" for i in range(3)]
    sids = []
    for i, mid in enumerate(ids):
        await c.alice.send({"t": "send", "id": mid, "to": c.bob.user, "body": f"while you were away {i}"})
    for mid in ids:
        s = await c.alice.expect(lambda f, mid=mid: f["t"] == "sent" and f.get("id") == mid, f"sent {mid}")
        sids.append(s["sid"])
    check(sids == sorted(sids) and len(set(sids)) == 3, "sids increase in send order", *sids)
    await c.alice.expect_none(lambda f: f["t"] == "msg" and f["m"]["k"] == "receipt" and f["m"]["up_to"] > c.sid,
                              "receipt while bob is offline")
    c.bob = Client(c.bob.user, "py-b")
    c.bob.held = held
    hello = await c.bob.connect(since=held)
    check(hello["resume_from"] == held, "resume_from is the highest seq held", hello)
    got = [await c.bob.expect_item(lambda m, mid=mid: m["k"] == "chat" and m["id"] == mid, f"offline {mid}") for mid in ids]
    check([f["seq"] for f in got] == sids, "offline messages in order, seq == sid", *got)
    synced = await c.bob.expect(lambda f: f["t"] == "synced", "synced after the drain")
    check(synced["seq"] >= sids[-1], "synced covers the drained items", synced)
    check(all(c.bob.order.index(synced) > c.bob.order.index(f) for f in got), "synced after the drained items")
    await c.bob.ack()
    f = await c.alice.expect_item(lambda m: m["k"] == "receipt" and m["status"] == "delivered" and m["up_to"] >= sids[-1],
                                  "delivered receipt for the offline messages")
    check(f["m"]["from"] == c.bob.user, "receipt from bob", f)
    await c.alice.ack()


@step
async def redelivery_without_ack(c):
    """At least once: an item received but not acknowledged comes again after a reconnect."""
    mid = f"py-{RUN}-unacked"
    await c.alice.send({"t": "send", "id": mid, "to": c.bob.user, "body": "ack me later"})
    s = await c.alice.expect(lambda f: f["t"] == "sent" and f.get("id") == mid, "sent")
    await c.bob.expect_item(lambda m: m["k"] == "chat" and m["id"] == mid, "live copy")
    await c.bob.close()
    c.bob = Client(c.bob.user, "py-b")
    await c.bob.connect()  # no since: the server resumes from its cursor
    f = await c.bob.expect_item(lambda m: m["k"] == "chat" and m["id"] == mid, "the unacknowledged item again")
    check(f["seq"] == s["sid"], "same seq on redelivery", f)
    await c.bob.expect(lambda f: f["t"] == "synced", "synced")
    await c.bob.ack()


@step
async def groups(c):
    """group_create → group; events in both timelines; gsend → sent; delivery; group receipts."""
    if not GROUPS:
        print("  (skipped: CHAT_GROUPS=0, no router)")
        return
    a, b = c.alice, c.bob
    await a.send({"t": "group_create", "id": "py-g1", "name": f"py {RUN}", "members": [b.user]})
    g = await a.expect(lambda f: f.get("id") == "py-g1", "group_create answer")
    check(g["t"] == "group", "group_create → group", g)
    grp = g["group"]
    gid = grp["gid"]
    check(sorted(grp["members"]) == sorted([a.user, b.user]) and grp["admins"] == [a.user], "group members", g)
    for cl in (a, b):
        ev = await cl.expect_item(lambda m: m["k"] == "group_event" and m["group"] == gid, "group_event created")
        check(ev["m"]["event"] == "created" and ev["m"]["by"] == a.user, "created event", ev)
    await b.ack()
    await a.ack()
    await b.send({"t": "groups", "id": "py-g2"})
    gl = await b.expect(lambda f: f.get("id") == "py-g2", "groups answer")
    check(gl["t"] == "groups" and any(x["gid"] == gid for x in gl["groups"]), "groups lists the group", gl)
    await a.send({"t": "gsend", "id": "py-gm1", "group": gid, "body": "hi group"})
    s = await a.expect(lambda f: f.get("id") == "py-gm1", "gsend answer")
    check(s["t"] == "sent" and s["sid"] > 0, "gsend → sent", s)
    f = await b.expect_item(lambda m: m["k"] == "group" and m["id"] == "py-gm1", "group message")
    m = f["m"]
    check(m["group"] == gid and m["from"] == a.user and m["sid"] == s["sid"] and m["n"] == 1 and m["body"] == "hi group",
          "group message fields", f)
    await b.ack()
    r = await a.expect_item(lambda m: m["k"] == "group_receipt" and m["status"] == "delivered", "group_receipt delivered")
    check(r["m"]["group"] == gid and r["m"]["sid"] == s["sid"], "group_receipt fields", r)
    await b.send({"t": "read", "group": gid, "up_to": s["sid"]})
    r = await a.expect_item(lambda m: m["k"] == "group_receipt" and m["status"] == "read", "group_receipt read")
    check(r["m"]["sid"] == s["sid"], "read group_receipt sid", r)
    await a.ack()
    await a.send({"t": "receipts", "id": "py-g3", "group": gid, "sid": s["sid"]})
    w = await a.expect(lambda f: f.get("id") == "py-g3", "receipts answer")
    check(w["t"] == "receipts" and w["recipients"] == 1 and b.user in w["read"], "who read", w)
    await b.send({"t": "typing", "group": gid})
    t = await a.expect(lambda f: f["t"] == "typing" and f.get("group") == gid, "group typing")
    check(t["from"] == b.user, "group typing from", t)
    # Not a member: forbidden; no such group: not_found.
    outsider = Client(f"carol_{RUN}", "py-c")
    await outsider.connect()
    await outsider.send({"t": "gsend", "id": "py-gm2", "group": gid, "body": "let me in"})
    e = await outsider.expect(lambda f: f.get("id") == "py-gm2", "error for a non-member")
    check(e["t"] == "error" and e["code"] == "forbidden", "non-member gsend → forbidden", e)
    await outsider.send({"t": "group_info", "id": "py-g4", "group": "gdoesnotexist"})
    e = await outsider.expect(lambda f: f.get("id") == "py-g4", "error for an unknown group")
    check(e["t"] == "error" and e["code"] == "not_found", "unknown group → not_found", e)
    await outsider.close()


@step
async def refused_handshakes(c):
    """A forged token is refused with 401 before any WebSocket exists; a bad device with 400."""
    for url, status in [
        (f"{WS}?token=not.a.jwt", 401),
        (f"{WS}?{urllib.parse.urlencode({'token': token(f'dave_{RUN}'), 'device': 'bad.device'})}", 400),
    ]:
        try:
            ws = await websockets.connect(url, open_timeout=WAIT)
            await ws.close()
            raise Mismatch(f"{url} was accepted")
        except InvalidStatus as e:
            check(e.response.status_code == status, f"handshake answered {e.response.status_code}, want {status}")


async def main():
    c = Ctx()
    passed = failed = 0
    print(f"python websockets {websockets.__version__} against {WS} (run {RUN}, groups: {GROUPS})")
    for fn in STEPS:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(fn(c), 60)
            passed += 1
            print(f"ok   {fn.__name__} ({(time.monotonic() - t0) * 1000:.0f} ms)")
        except Exception as e:  # noqa: BLE001 - report and stop: later steps depend on this one
            failed += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}")
            break
    for cl in (getattr(c, "alice", None), getattr(c, "bob", None)):
        if cl and cl.ws:
            await cl.close()
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed == len(STEPS) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
