#!/usr/bin/env python3
"""Fault-injection clients with a delivery ledger, for the cases `loadgen chat` cannot drive.

loadgen's `chat` opens every connection once and never reconnects (a dropped connection ends that
user's part of the run), and it has no group scenario. This script is a well-behaved client
(PROTOCOL.md): on a lost connection it reconnects with jittered exponential backoff, passes
`since` = the highest inbox seq it holds, drains until `synced`, drops items whose `seq` it
already holds, and re-sends every unanswered send with the same `id` (the server deduplicates).

    client.py chat  --url WS [--url WS2 ...] --users N --total-rate R --duration S --grace S --out F
    client.py group --url WS [--url WS2 ...] --members 1024 --messages M --rate R --out F
                    [--mark-after K --mark-file F]

Both need JWT_SECRET in the environment (HS256 tokens are minted locally, like loadgen).

The ledger (both modes):
  acknowledged   sends answered by `sent` (1:1), or group posts answered by `sent`
  delivered      acknowledged messages (1:1) / copies (group) that reached their recipient once
  lost           acknowledged but never delivered (violation)
  duplicates     the same message shown again under a *different* inbox seq, i.e. stored twice
                 (violation; the protocol's dedup ids must prevent it)
  reordered      a sender's messages (1:1) or a group's sids (group) out of order (violation)
  seq_regressions  an item whose seq is not above the previous one on the *same* connection
                 (violation)
  redelivered    an item with a seq the client already held, after a reconnect: allowed by the
                 protocol (at-least-once delivery, dropped by seq), reported for information
Timestamps of every first delivery are kept in 100 ms bins for the recovery time.
"""
import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import sys
import time
from collections import OrderedDict

import websockets

BIN = 0.1


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def mint(secret, user, dev="faults", ttl=6 * 3600):
    now = int(time.time())
    h = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    p = b64(json.dumps({"sub": user, "exp": now + ttl, "iat": now, "dev": dev}, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(sig)}"


def log(msg):
    print(f"[client {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Stats:
    def __init__(self):
        self.bins = {}  # int(ts / BIN) -> first deliveries
        self.connects = 0
        self.reconnects = 0
        self.disconnects = {}
        self.connect_failures = {}
        self.redelivered = 0
        self.seq_regressions = 0
        self.duplicates = 0
        self.reordered = 0
        self.errors = {}
        self.resends = 0
        self.dup_ticks = 0  # `sent` with dup: true (a re-sent message the server already had)
        self.churn_leaves = 0  # voluntary disconnects (--churn)
        self.lat = []  # send->deliver seconds of first deliveries
        self.lat_bins = {}  # bin -> highest send->deliver seconds of a first delivery in it
        self.reconnect_times = []  # seconds from disconnect to synced again

    def deliver(self, now):
        k = int(now / BIN)
        self.bins[k] = self.bins.get(k, 0) + 1

    def latency(self, now, lat):
        self.lat.append(lat)
        k = int(now / BIN)
        if lat > self.lat_bins.get(k, -1.0):
            self.lat_bins[k] = lat


class Conn:
    """One user's connection, reconnecting forever until `stop` is set."""

    def __init__(self, idx, user, token, urls, stats, on_item, on_frame, stop, backoff_base, backoff_cap):
        self.idx = idx
        self.user = user
        self.token = token
        self.urls = urls
        self.url_i = idx % len(urls)
        self.stats = stats
        self.on_item = on_item
        self.on_frame = on_frame
        self.stop = stop
        self.ws = None
        self.synced = asyncio.Event()
        self.last_seq = 0  # highest inbox seq held (across connections)
        self.acked_seq = 0
        self.conn_seq = 0  # highest seq on the current connection
        self.since_ack = 0
        self.ack_now = asyncio.Event()
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.ever_connected = False
        self.down_since = None
        self.on_synced = None  # callback after each (re)sync
        self.first_synced = asyncio.Event()
        self.gen = 0  # connection generation, +1 per connect
        self.ack_interval = 0.05
        self.use_since = True  # pass since=<highest seq held> on reconnect (else: the cursor)
        self.churn = 0.0  # mean seconds online before leaving voluntarily (0: never)
        self.leaving = False
        self.history = []  # [ts, event, gen]: connection life, for explaining violations

    async def send(self, obj):
        ws = self.ws
        if ws is None or not self.synced.is_set():
            return False
        try:
            await ws.send(json.dumps(obj, separators=(",", ":")))
            return True
        except Exception:
            return False

    async def run(self):
        attempt = 0
        while not self.stop.is_set():
            url = self.urls[self.url_i % len(self.urls)]
            q = f"{url}?token={self.token}"
            if self.last_seq and self.use_since:
                q += f"&since={self.last_seq}"
            try:
                ws = await asyncio.wait_for(
                    websockets.connect(q, max_size=1 << 20, ping_interval=None, open_timeout=10, close_timeout=1),
                    15,
                )
            except Exception as e:
                c = type(e).__name__
                self.stats.connect_failures[c] = self.stats.connect_failures.get(c, 0) + 1
                attempt += 1
                # Full jitter: uniform(0, min(cap, base * 2^attempt)), and try the next gateway.
                await asyncio.sleep(random.uniform(0, min(self.backoff_cap, self.backoff_base * (2 ** attempt))))
                self.url_i += 1
                continue
            attempt = 0
            self.ws = ws
            self.gen += 1
            self.history.append([round(time.time(), 4), "open", self.gen])
            self.conn_seq = 0
            self.stats.connects += 1
            if self.ever_connected:
                self.stats.reconnects += 1
            self.ever_connected = True
            reason = "eof"
            pinger = asyncio.create_task(self.pinger(ws))
            acker = asyncio.create_task(self.acker(ws))
            churner = None
            if self.churn > 0:
                churner = asyncio.create_task(self.leave_after(ws, random.expovariate(1.0 / self.churn)))
            try:
                async for raw in ws:
                    self.handle(raw)
                    if self.stop.is_set():
                        break
            except websockets.ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else 1006
                reason = f"closed_{code}"
            except Exception as e:
                reason = type(e).__name__
            finally:
                pinger.cancel()
                acker.cancel()
                if churner is not None:
                    churner.cancel()
                self.synced.clear()
                self.ws = None
            if self.stop.is_set():
                try:
                    await asyncio.wait_for(ws.close(), 1)
                except Exception:
                    pass
                break
            self.history.append([round(time.time(), 4), "left" if self.leaving else f"lost {reason}", self.gen])
            if self.leaving:
                # A voluntary absence (churn): offline for a while, then back to the same gateway.
                self.leaving = False
                self.stats.churn_leaves += 1
                await asyncio.sleep(random.uniform(0.2, 2.0))
                continue
            self.stats.disconnects[reason] = self.stats.disconnects.get(reason, 0) + 1
            self.down_since = time.time()
            self.url_i += 1  # the gateway we were on may be dead: try the next one first
            await asyncio.sleep(random.uniform(0, self.backoff_base))

    def handle(self, raw):
        f = json.loads(raw)
        t = f.get("t")
        if t == "msg":
            seq = f["seq"]
            if seq <= self.conn_seq:
                self.stats.seq_regressions += 1
                return
            self.conn_seq = seq
            if seq <= self.last_seq:
                self.stats.redelivered += 1
                return
            self.last_seq = seq
            self.on_item(self, seq, f.get("m") or {})
            self.since_ack += 1
            if self.since_ack >= 32:
                self.ack_now.set()
        elif t == "synced":
            self.history.append([round(time.time(), 4), "synced", self.gen])
            self.synced.set()
            self.first_synced.set()
            if self.down_since is not None:
                self.stats.reconnect_times.append(time.time() - self.down_since)
                self.down_since = None
            if self.on_synced:
                self.on_synced(self)
        elif t == "error":
            c = f.get("code", "?")
            self.stats.errors[c] = self.stats.errors.get(c, 0) + 1
            self.on_frame(self, f)
        elif t in ("hello", "pong"):
            pass
        else:
            self.on_frame(self, f)

    async def leave_after(self, ws, after):
        await asyncio.sleep(after)
        if self.churn <= 0 or self.stop.is_set():
            return
        self.leaving = True
        try:
            if self.last_seq > self.acked_seq:  # a polite client acks what it has before leaving
                await ws.send(json.dumps({"t": "ack", "seq": self.last_seq}))
                self.acked_seq = self.last_seq
            await asyncio.wait_for(ws.close(1000), 2)
        except Exception:
            pass

    async def pinger(self, ws):
        try:
            while True:
                await asyncio.sleep(5)
                await ws.send('{"t":"ping"}')
        except Exception:
            pass

    async def acker(self, ws):
        try:
            while True:
                try:
                    await asyncio.wait_for(self.ack_now.wait(), self.ack_interval)
                except asyncio.TimeoutError:
                    pass
                self.ack_now.clear()
                if self.last_seq > self.acked_seq and self.synced.is_set():
                    s = self.last_seq
                    await ws.send(json.dumps({"t": "ack", "seq": s}))
                    self.acked_seq = s
                    self.since_ack = 0
        except Exception:
            pass


async def open_all(users, secret, urls, stats, on_item, on_frame, stop, rate, a):
    conns = []
    tasks = []
    for i, u in enumerate(users):
        c = Conn(i, u, mint(secret, u), urls, stats, on_item, on_frame, stop, a.backoff_base, a.backoff_cap)
        c.ack_interval = a.ack_interval
        c.churn = getattr(a, "churn", 0.0)
        # Every other pair of users resumes from its stored cursor alone (no `since`), so both
        # resume paths are exercised and redelivery of unacknowledged items shows up.
        c.use_since = a.since == "all" or (a.since == "half" and (i // 2) % 2 == 0)
        conns.append(c)
        tasks.append(asyncio.create_task(c.run()))
        await asyncio.sleep(1.0 / rate)
    deadline = time.time() + 60
    for c in conns:
        await asyncio.wait_for(c.first_synced.wait(), max(0.1, deadline - time.time()))
    return conns, tasks


def summarize_lat(lat):
    if not lat:
        return {}
    s = sorted(lat)
    q = lambda p: round(s[min(len(s) - 1, int(p * len(s)))], 4)
    return {"count": len(s), "p50_s": q(0.5), "p99_s": q(0.99), "max_s": round(s[-1], 4)}


# ---------------------------------------------------------------------------------------------
# 1:1 chat with reconnects


async def run_chat(a, secret):
    prefix = a.prefix or f"fc{random.randrange(16**6):06x}"
    n = a.users
    users = [f"{prefix}-{i}" for i in range(n)]
    peer = lambda i: i ^ 1 if (i ^ 1) < n else 0  # pairs, like loadgen
    stats = Stats()
    stop = asyncio.Event()
    # Sender books, per user: mseq -> entry (unanswered sends, in send order).
    unanswered = [OrderedDict() for _ in range(n)]
    wake = [asyncio.Event() for _ in range(n)]
    acked = [set() for _ in range(n)]
    issued = [0] * n
    failed_final = [0] * n
    # Receiver books: (sender, mseq) -> copies; highest mseq per sender (order).
    got = [dict() for _ in range(n)]
    max_from = [dict() for _ in range(n)]
    # Per message, what happened to it (for explaining violations): (sender, mseq) -> list of
    # [ts, what, detail]; and the violations themselves.
    trace = {}
    violations_seen = []

    def tr(s_, k, what, detail=None):
        trace.setdefault((s_, k), []).append([round(time.time(), 4), what, detail])

    def on_item(c, seq, m):
        if m.get("k") != "chat":
            return
        frm = m.get("from", "")
        try:
            s = int(frm.rsplit("-", 1)[1])
            mseq, intended = m["body"].split(" ")[:2]
            mseq, intended = int(mseq), float(intended)
        except Exception:
            stats.errors["unreadable"] = stats.errors.get("unreadable", 0) + 1
            return
        key = (s, mseq)
        g = got[c.idx]
        tr(s, mseq, "delivered", {"seq": seq, "gen": c.gen})
        if key in g:
            g[key] += 1
            stats.duplicates += 1
            violations_seen.append({"kind": "duplicate", "sender": s, "mseq": mseq, "receiver": c.idx, "seq": seq})
            return
        g[key] = 1
        now = time.time()
        stats.deliver(now)
        stats.latency(now, now - intended)
        mx = max_from[c.idx].get(s, -1)
        if mseq < mx:
            stats.reordered += 1
            violations_seen.append({"kind": "reordered", "sender": s, "mseq": mseq, "after_mseq": mx,
                                    "receiver": c.idx, "seq": seq, "ts": round(now, 4)})
        else:
            max_from[c.idx][s] = mseq

    def on_frame(c, f):
        t = f.get("t")
        fid = f.get("id")
        if not fid or not fid.startswith("m"):
            return
        try:
            mseq = int(fid[1:])
        except ValueError:
            return
        book = unanswered[c.idx]
        tr(c.idx, mseq, t, {"sid": f.get("sid"), "dup": f.get("dup"), "code": f.get("code"), "gen": c.gen})
        if t == "sent":
            if f.get("dup"):
                stats.dup_ticks += 1
            acked[c.idx].add(mseq)
            book.pop(mseq, None)
        elif t == "error":
            code = f.get("code")
            e = book.get(mseq)
            if e is not None and code in ("unavailable", "internal", "rate_limited"):
                e["retry_at"] = time.time() + random.uniform(0.1, 0.5)
                wake[c.idx].set()
            elif e is not None:
                book.pop(mseq)
                failed_final[c.idx] += 1

    def on_synced(c):
        wake[c.idx].set()

    async def user_writer(c):
        # Sends, in order, every unanswered message not yet sent on the current connection,
        # retries after a retryable error (holding later ones back, to keep the order), and
        # re-sends what a live connection left unanswered for 10 s. Always the same id.
        i = c.idx
        book = unanswered[i]
        while not stop.is_set():
            try:
                await asyncio.wait_for(wake[i].wait(), 0.1)
            except asyncio.TimeoutError:
                pass
            wake[i].clear()
            if not c.synced.is_set():
                continue
            now = time.time()
            for k, e in list(book.items()):
                if e["retry_at"] is not None and e["retry_at"] > now:
                    break
                due = e["gen"] != c.gen or e["retry_at"] is not None or now - e["sent_at"] > 10
                if not due:
                    continue
                if not await c.send(e["frame"]):
                    break
                tr(i, k, "send", {"gen": c.gen, "retry": e["gen"] is not None})
                if e["gen"] is not None:
                    stats.resends += 1
                e.update(gen=c.gen, sent_at=now, retry_at=None)

    conns, tasks = await open_all(users, secret, a.url, stats, on_item, on_frame, stop, a.connect_rate, a)
    for c in conns:
        c.on_synced = on_synced
    writers = [asyncio.create_task(user_writer(c)) for c in conns]
    log(f"chat: {n} users connected; sending {a.total_rate} msg/s for {a.duration}s")
    rate_u = a.total_rate / n
    t0 = time.time() + 0.2
    end = t0 + a.duration

    async def sender(c):
        i = c.idx
        k = 0
        phase = (i / n) / rate_u
        while True:
            at = t0 + phase + k / rate_u
            if at >= end:
                return
            await asyncio.sleep(max(0, at - time.time()))
            frame = {"t": "send", "id": f"m{k}", "to": users[peer(i)], "body": f"{k} {at:.6f} " + "x" * 40}
            unanswered[i][k] = {"frame": frame, "gen": None, "sent_at": 0.0, "retry_at": None}
            issued[i] += 1
            wake[i].set()
            k += 1

    await asyncio.gather(*(sender(c) for c in conns))
    for c in conns:
        c.churn = 0  # everyone comes back (or stays) online for the grace period
    log("chat: sending done; grace")

    def outstanding():
        missing = 0
        for s in range(n):
            r = peer(s)
            for k in acked[s]:
                if (s, k) not in got[r]:
                    missing += 1
        pending = sum(len(b) for b in unanswered)
        return missing, pending

    grace_end = time.time() + a.grace
    while time.time() < grace_end:
        missing, pending = outstanding()
        if missing == 0 and pending == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # late duplicates
    stop.set()
    for w in writers:
        w.cancel()
    for c in conns:
        if c.ws is not None:
            try:
                await asyncio.wait_for(c.ws.close(), 1)
            except Exception:
                pass
    await asyncio.wait(tasks, timeout=5)

    lost = 0
    delivered = 0
    delivered_unacked = 0
    for s in range(n):
        r = peer(s)
        for k in range(issued[s]):
            inbox = (s, k) in got[r]
            if k in acked[s]:
                if inbox:
                    delivered += 1
                else:
                    lost += 1
            elif inbox:
                delivered_unacked += 1
    acknowledged = sum(len(x) for x in acked)
    explain = {}
    for v in violations_seen:
        for k in range(max(0, v["mseq"] - 1), v.get("after_mseq", v["mseq"]) + 2):
            explain[f"{v['sender']}:{k}"] = trace.get((v["sender"], k), [])
    for s_ in range(n):
        for k in acked[s_]:
            if (s_, k) not in got[peer(s_)] and len(explain) < 200:
                explain[f"{s_}:{k}"] = trace.get((s_, k), [])
    stats.explain = {
        "violations": violations_seen[:100],
        "traces": explain,
        "sender_connections": {str(v["sender"]): conns[v["sender"]].history for v in violations_seen[:20]},
    }
    ledger = {
        "issued": sum(issued),
        "acknowledged": acknowledged,
        "delivered": delivered,
        "lost": lost,
        "duplicates": stats.duplicates,
        "reordered": stats.reordered,
        "seq_regressions": stats.seq_regressions,
        "redelivered_same_seq": stats.redelivered,
        "unanswered_at_end": sum(len(b) for b in unanswered),
        "failed_final": sum(failed_final),
        "delivered_unacknowledged": delivered_unacked,
        "resends": stats.resends,
        "dup_flagged_ticks": stats.dup_ticks,
    }
    return finish(a, "chat", ledger, stats, {"users": n, "prefix": prefix, "t0": t0, "end": end})


# ---------------------------------------------------------------------------------------------
# One big group


async def run_group(a, secret):
    prefix = a.prefix or f"fg{random.randrange(16**6):06x}"
    n = a.members
    users = [f"{prefix}-{i}" for i in range(n)]
    stats = Stats()
    stop = asyncio.Event()
    gid = None
    created = asyncio.Event()
    group_frame = {}
    events_seen = [0] * n
    copies = [dict() for _ in range(n)]  # member -> {sid: count}
    last_sid = [0] * n
    sent = {}  # post k -> sid
    answered = {}  # post k -> frame
    first_copy_at = {}  # sid -> ts of first copy anywhere
    copy_times = {}  # sid -> delivery times of its copies
    gviol = []  # the first violations, for explaining them
    post_log = []  # [ts, frame kind, id, sid or code] of the sender's answers
    marked = {"at": None, "copies": None}

    def mark():
        # Signals the shell (a FIFO it is reading, or a plain file) the instant post K's fan-out
        # has begun: its `sent` is back and its first copy reached a member.
        marked["at"] = time.time()
        marked["copies"] = sum(len(x) for x in copies)
        line = f"{marked['at']}\n".encode()
        try:
            fd = os.open(a.mark_file, os.O_WRONLY | os.O_NONBLOCK | os.O_CREAT)
            os.write(fd, line)
            os.close(fd)
        except OSError as e:
            log(f"mark: {e}")

    def maybe_mark():
        if a.mark_after is None or not a.mark_file or marked["at"] is not None:
            return
        sid = sent.get(a.mark_after)
        if sid is not None and sid in first_copy_at:
            mark()

    def on_item(c, seq, m):
        k = m.get("k")
        if k == "group_event":
            events_seen[c.idx] += 1
            return
        if k != "group" or m.get("group") != gid:
            return
        sid = m["sid"]
        d = copies[c.idx]
        if sid in d:
            d[sid] += 1
            stats.duplicates += 1
            if len(gviol) < 100:
                gviol.append({"kind": "duplicate", "member": c.idx, "sid": sid, "seq": seq, "ts": round(time.time(), 4)})
            return
        d[sid] = 1
        now = time.time()
        stats.deliver(now)
        copy_times.setdefault(sid, []).append(now)
        if sid not in first_copy_at:
            first_copy_at[sid] = now
            maybe_mark()
        try:
            stats.latency(now, now - float(m["body"].split(" ")[1]))
        except Exception:
            pass
        if sid < last_sid[c.idx]:
            stats.reordered += 1
            if len(gviol) < 100:
                gviol.append({"kind": "reordered", "member": c.idx, "sid": sid, "after_sid": last_sid[c.idx],
                              "seq": seq, "ts": round(now, 4)})
        else:
            last_sid[c.idx] = sid

    def on_frame(c, f):
        nonlocal gid
        if c.idx != 0:
            return
        fid = f.get("id", "")
        if f.get("t") == "group" and fid == "create":
            gid = f["group"]["gid"]
            group_frame.update(f["group"])
            created.set()
        elif fid.startswith("g"):
            k = int(fid[1:])
            answered[k] = f
            post_log.append([round(time.time(), 4), f.get("t"), fid, f.get("sid") or f.get("code")])
            if f.get("t") == "sent":
                sent[k] = f["sid"]
                maybe_mark()
        elif f.get("t") == "error" and fid == "create":
            log(f"group_create failed: {f}")
            created.set()

    t_conn = time.time()
    conns, tasks = await open_all(users, secret, a.url, stats, on_item, on_frame, stop, a.connect_rate, a)
    log(f"group: {n} members connected in {time.time() - t_conn:.1f}s")
    sender = conns[0]
    await sender.send({"t": "group_create", "id": "create", "name": "faults", "members": users[1:]})
    await asyncio.wait_for(created.wait(), 60)
    if gid is None:
        return 2
    log(f"group {gid} created with {len(group_frame.get('members', []))} members")
    deadline = time.time() + 120
    while min(events_seen[1:]) < 1 and time.time() < deadline:
        await asyncio.sleep(0.2)
    log(f"group: creation event seen by {sum(1 for e in events_seen[1:] if e)} of {n - 1} members")

    t0 = time.time() + 0.2
    for k in range(a.messages):
        at = t0 + k / a.rate
        await asyncio.sleep(max(0, at - time.time()))
        f = {"t": "gsend", "id": f"g{k}", "group": gid, "body": f"{k} {at:.6f} post"}
        while not await sender.send(f):
            await asyncio.sleep(0.05)
    # Retry posts answered by a retryable error (none expected: the router is not on this path).
    deadline = time.time() + a.grace
    while len(sent) < a.messages and time.time() < deadline:
        await asyncio.sleep(0.1)
        for k in range(a.messages):
            fr = answered.get(k)
            if fr is not None and fr.get("t") == "error" and fr.get("code") in ("unavailable", "internal", "rate_limited"):
                answered.pop(k)
                await sender.send({"t": "gsend", "id": f"g{k}", "group": gid, "body": f"{k} {t0 + k / a.rate:.6f} post"})
    log(f"group: {len(sent)} of {a.messages} posts acknowledged; waiting for the fan-out")
    want = set(sent.values())
    while time.time() < deadline:
        if all(want <= set(copies[i]) for i in range(1, n)):
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    stop.set()
    for c in conns:
        if c.ws is not None:
            try:
                await asyncio.wait_for(c.ws.close(), 1)
            except Exception:
                pass
    await asyncio.wait(tasks, timeout=5)

    order = [sent[k] for k in sorted(sent)]
    lost = sum(1 for i in range(1, n) for s in want if s not in copies[i])
    delivered = sum(1 for i in range(1, n) for s in want if s in copies[i])
    members_complete = sum(1 for i in range(1, n) if want <= set(copies[i]))
    ledger = {
        "posts": a.messages,
        "acknowledged": len(sent),
        "recipients": n - 1,
        "expected_copies": len(sent) * (n - 1),
        "delivered": delivered,
        "lost": lost,
        "duplicates": stats.duplicates,
        "reordered": stats.reordered,
        "seq_regressions": stats.seq_regressions,
        "redelivered_same_seq": stats.redelivered,
        "members_complete": members_complete,
        "sids_in_send_order": order == sorted(order),
        "sender_got_own_copies": len(copies[0]),
    }
    extra = {
        "members": n,
        "gid": gid,
        "prefix": prefix,
        "t0": t0,
        "mark_after": a.mark_after,
        "marked_at": marked["at"],
        "copies_before_mark": marked["copies"],
        "first_copy_at": {str(s): round(t, 4) for s, t in first_copy_at.items()},
        "copy_times": {str(s): [round(t, 4) for t in sorted(v)] for s, v in copy_times.items()},
        "sids": order,
        "explain": {"violations": gviol, "sender_answers": post_log},
    }
    return finish(a, "group", ledger, stats, extra)


def finish(a, mode, ledger, stats, extra):
    violations = ledger["lost"] + ledger["duplicates"] + ledger["reordered"] + ledger["seq_regressions"]
    doc = {
        "mode": mode,
        "ledger": ledger,
        "violations": violations,
        "connects": stats.connects,
        "reconnects": stats.reconnects,
        "explain": getattr(stats, "explain", None),
        "churn_leaves": stats.churn_leaves,
        "disconnects": stats.disconnects,
        "connect_failures": stats.connect_failures,
        "reconnect_to_synced_s": summarize_lat(stats.reconnect_times),
        "errors": stats.errors,
        "send_to_deliver": summarize_lat(stats.lat),
        "bins": {
            "width_s": BIN,
            "first_deliveries": {str(k): v for k, v in sorted(stats.bins.items())},
            "max_latency_s": {str(k): round(v, 4) for k, v in sorted(stats.lat_bins.items())},
        },
        **extra,
    }
    with open(a.out, "w") as f:
        json.dump(doc, f)
    log(f"{mode}: ledger {json.dumps(ledger)}; reconnects {stats.reconnects}; violations {violations}")
    return 1 if violations else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("chat", "group"):
        p = sub.add_parser(name)
        p.add_argument("--url", action="append", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--prefix")
        p.add_argument("--grace", type=float, default=30)
        p.add_argument("--connect-rate", type=float, default=200)
        p.add_argument("--backoff-base", type=float, default=0.1, help="reconnect backoff base, seconds")
        p.add_argument("--backoff-cap", type=float, default=2.0, help="reconnect backoff cap, seconds")
        p.add_argument("--since", choices=["all", "half", "none"], default="half",
                       help="which users pass since=<highest seq held> when they reconnect")
        p.add_argument("--ack-interval", type=float, default=0.05 if name == "chat" else 1.0,
                       help="cumulative ack at most this often (also after 32 items)")
    c = sub.choices["chat"]
    c.add_argument("--users", type=int, default=100)
    c.add_argument("--total-rate", type=float, default=200)
    c.add_argument("--duration", type=float, default=20)
    c.add_argument("--churn", type=float, default=0,
                   help="users leave voluntarily after an exponential time online with this mean (s), "
                        "stay away 0.2–2 s, and come back (0: never)")
    g = sub.choices["group"]
    g.add_argument("--members", type=int, default=1024)
    g.add_argument("--messages", type=int, default=30)
    g.add_argument("--rate", type=float, default=3, help="posts per second")
    g.add_argument("--mark-after", type=int,
                   help="write to --mark-file (a FIFO or a file) once post K is acknowledged and its first copy arrived")
    g.add_argument("--mark-file")
    a = ap.parse_args()
    secret = os.environ.get("JWT_SECRET", "")
    if len(secret) < 16:
        print("client.py: JWT_SECRET (>= 16 bytes) is required", file=sys.stderr)
        return 2
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fn = run_chat if a.cmd == "chat" else run_group
    return asyncio.run(fn(a, secret))


if __name__ == "__main__":
    sys.exit(main())
