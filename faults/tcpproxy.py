#!/usr/bin/env python3
"""A tiny TCP proxy whose link can be cut and restored, for fault injection.

    tcpproxy.py --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--pid-file F] [--log F]

Signals:
  SIGUSR1  cut: close every proxied connection (both sides, RST) and refuse new ones
  SIGUSR2  restore: accept and forward again
  SIGTERM  exit

Each state change is logged with a wall-clock timestamp. Standard library only.
"""
import argparse
import asyncio
import os
import signal
import socket
import struct
import sys
import time


def log(msg):
    print(f"{time.time():.3f} tcpproxy {msg}", flush=True)


class Proxy:
    def __init__(self, upstream):
        self.upstream = upstream
        self.cut = False
        self.conns = set()  # (client_writer, upstream_writer)
        self.accepted = 0

    async def handle(self, reader, writer):
        if self.cut:
            abort(writer)
            return
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError as e:
            log(f"upstream connect failed: {e}")
            abort(writer)
            return
        self.accepted += 1
        pair = (writer, uw)
        self.conns.add(pair)
        try:
            await asyncio.gather(pump(reader, uw), pump(ur, writer))
        finally:
            self.conns.discard(pair)
            abort(writer)
            abort(uw)

    def do_cut(self):
        self.cut = True
        n = len(self.conns)
        for cw, uw in list(self.conns):
            abort(cw)
            abort(uw)
        log(f"CUT: closed {n} connection(s), refusing new ones")

    def do_restore(self):
        self.cut = False
        log("RESTORED: forwarding again")


def abort(w):
    """Closes with RST (SO_LINGER 0), like a dropped link rather than a polite FIN."""
    try:
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()
    except Exception:
        pass


async def pump(r, w):
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError, asyncio.CancelledError):
        pass
    finally:
        abort(w)


def hostport(s):
    h, p = s.rsplit(":", 1)
    return h, int(p)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--pid-file")
    a = ap.parse_args()
    p = Proxy(hostport(a.upstream))
    lh, lp = hostport(a.listen)
    server = await asyncio.start_server(p.handle, lh, lp, reuse_address=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, p.do_cut)
    loop.add_signal_handler(signal.SIGUSR2, p.do_restore)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if a.pid_file:
        with open(a.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    log(f"listening on {a.listen} -> {a.upstream}")
    await stop.wait()
    server.close()
    log(f"exit after {p.accepted} proxied connection(s)")


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
