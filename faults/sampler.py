#!/usr/bin/env python3
"""Polls Prometheus endpoints every --interval and appends one JSON line per sample:

    {"ts": <epoch s>, "url": ..., "ok": true, "m": {"gateway_items_delivered": 1234, ...}}

Counters are summed over their labels. Runs until --until (epoch seconds) or SIGTERM.
Standard library only.
"""
import argparse
import json
import signal
import sys
import time
import urllib.request

stop = False


def on_term(*_):
    global stop
    stop = True


def scrape(url, names, timeout):
    body = urllib.request.urlopen(url, timeout=timeout).read().decode()
    out = {n: 0.0 for n in names}
    for line in body.splitlines():
        if not line or line[0] == "#":
            continue
        key, _, val = line.rpartition(" ")
        fam = key.split("{", 1)[0]
        if fam.endswith("_total"):
            fam = fam[: -len("_total")]
        if fam in out:
            try:
                out[fam] += float(val)
            except ValueError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", action="append", required=True)
    ap.add_argument("--metric", action="append", required=True)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--until", type=float, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    with open(a.out, "a") as f:
        nxt = time.time()
        while not stop and time.time() < a.until:
            for url in a.url:
                ts = time.time()
                try:
                    m = scrape(url, a.metric, timeout=max(a.interval, 0.2))
                    f.write(json.dumps({"ts": round(ts, 4), "url": url, "ok": True, "m": m}) + "\n")
                except Exception as e:  # a dead service: recorded, not fatal
                    f.write(json.dumps({"ts": round(ts, 4), "url": url, "ok": False, "err": type(e).__name__}) + "\n")
            f.flush()
            nxt += a.interval
            time.sleep(max(0.0, nxt - time.time()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
