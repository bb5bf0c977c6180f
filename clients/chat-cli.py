#!/usr/bin/env python3
"""A small command-line client for scripting and debugging the chat gateway (PROTOCOL.md).

Every frame received is printed on stdout as one JSON line; with -v, every frame sent is printed
on stderr as `> {...}`. Tokens come from the gateway's dev endpoint (`gateway --dev-tokens`)
unless --token is given.

    chat-cli.py --url ws://127.0.0.1:8080 --user alice send bob "hi"
    chat-cli.py --url http://127.0.0.1:8080 --user bob listen            # Ctrl-C to stop
    chat-cli.py --user bob listen --count 3 --timeout 10 --no-ack
    chat-cli.py --user alice gsend g7f3a09c1 "on my way"
    chat-cli.py --user alice group-create Climbing bob carol
    chat-cli.py --user alice presence bob carol
    chat-cli.py --user alice raw '{"t":"groups","id":"c-1"}'
    chat-cli.py --user alice shell                                       # stdin lines are frames

Needs the `websockets` package (scripts/interop-test.sh installs it into .tools/interop-venv).
Exit code: 0 on success, 1 when the server answered with an error frame or the wait timed out,
2 when the connection could not be opened.
"""

import argparse
import asyncio
import json
import os
import random
import string
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

try:
    import websockets
    from websockets.exceptions import InvalidStatus
except ImportError:  # pragma: no cover - a hint instead of a traceback
    sys.exit("chat-cli.py needs `websockets`: .tools/interop-venv/bin/python clients/chat-cli.py … "
             "(scripts/interop-test.sh creates that venv), or pip install websockets")


def urls(url):
    """(http base, ws endpoint) from either form of --url."""
    u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme, u.scheme)
    base = f"{scheme}://{u.netloc}"
    return base, ("wss" if scheme == "https" else "ws") + f"://{u.netloc}/ws"


def dev_token(base, user, device):
    q = urllib.parse.urlencode({"user": user, **({"device": device} if device else {})})
    try:
        with urllib.request.urlopen(f"{base}/dev/token?{q}", timeout=10) as r:
            return r.read().decode().strip()
    except urllib.error.HTTPError as e:
        sys.exit(f"/dev/token: HTTP {e.code} {e.read().decode().strip()} (is the gateway in --dev-tokens mode?)")
    except OSError as e:
        sys.exit(f"/dev/token: {e}")


def new_id(prefix="cli"):
    return f"{prefix}-{int(time.time() * 1000):x}-{''.join(random.choices(string.ascii_lowercase, k=4))}"


class Session:
    def __init__(self, args):
        self.args = args
        self.ws = None
        self.held = 0

    async def open(self):
        a = self.args
        base, endpoint = urls(a.url)
        token = a.token or dev_token(base, a.user, a.device)
        q = {"token": token}
        if a.device:
            q["device"] = a.device
        if a.since is not None:
            q["since"] = str(a.since)
        try:
            self.ws = await websockets.connect(f"{endpoint}?{urllib.parse.urlencode(q)}", open_timeout=10)
        except InvalidStatus as e:
            print(f"handshake refused: HTTP {e.response.status_code} {e.response.body.decode(errors='replace').strip()}",
                  file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            print(f"cannot connect to {endpoint}: {e}", file=sys.stderr)
            sys.exit(2)

    async def send(self, frame):
        text = frame if isinstance(frame, str) else json.dumps(frame, ensure_ascii=False)
        if self.args.verbose:
            print(f"> {text}", file=sys.stderr, flush=True)
        await self.ws.send(text)

    async def frames(self, timeout=None):
        """Yields decoded frames (printing each), acking inbox items unless --no-ack."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except asyncio.TimeoutError:
                return
            except websockets.ConnectionClosed as e:
                rcvd = e.rcvd
                print(json.dumps({"t": "_closed", "code": rcvd.code if rcvd else 1006,
                                  "reason": rcvd.reason if rcvd else ""}), flush=True)
                return
            print(raw if isinstance(raw, str) else json.dumps({"t": "_binary", "len": len(raw)}), flush=True)
            try:
                f = json.loads(raw)
            except ValueError:
                continue
            if f.get("t") == "msg":
                self.held = max(self.held, f.get("seq", 0))
                if not self.args.no_ack:
                    await self.send({"t": "ack", "seq": self.held})
            yield f

    async def until_synced(self):
        async for f in self.frames(self.args.timeout):
            if f.get("t") == "synced":
                return True
        return False

    async def answer(self, fid):
        """Waits for the frame answering request `fid` (printing everything meanwhile)."""
        async for f in self.frames(self.args.timeout):
            if f.get("id") == fid:
                return 1 if f.get("t") == "error" else 0
        print(f"no answer to {fid} within {self.args.timeout} s", file=sys.stderr)
        return 1


async def run(args):
    s = Session(args)
    await s.open()
    try:
        if not await s.until_synced():
            print("no synced frame", file=sys.stderr)
            return 1
        cmd = args.cmd
        if cmd == "listen":
            n = 0
            async for _ in s.frames(args.timeout if args.timeout_set else None):
                n += 1
                if args.count and n >= args.count:
                    break
            return 0
        if cmd == "raw":
            await s.send(args.frame)
            try:
                fid = json.loads(args.frame).get("id")
            except (ValueError, AttributeError):
                fid = None
            if fid:
                return await s.answer(fid)
            errors = 0
            async for f in s.frames(args.wait):
                errors += f.get("t") == "error"
            return 1 if errors else 0
        if cmd == "shell":
            return await shell(s)
        fid = args.id or new_id()
        frame = {
            "send": lambda: {"t": "send", "id": fid, "to": args.to, "body": args.body},
            "gsend": lambda: {"t": "gsend", "id": fid, "group": args.group, "body": args.body},
            "group-create": lambda: {"t": "group_create", "id": fid, "name": args.name, "members": args.members},
            "group-add": lambda: {"t": "group_add", "id": fid, "group": args.group, "members": args.members},
            "group-info": lambda: {"t": "group_info", "id": fid, "group": args.group},
            "groups": lambda: {"t": "groups", "id": fid},
            "presence": lambda: {"t": "presence", "id": fid, "users": args.users},
        }[cmd]()
        await s.send(frame)
        return await s.answer(fid)
    finally:
        await s.ws.close()


async def shell(s):
    """Sends each stdin line as a text frame while printing what arrives."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def pump():
        async for _ in s.frames():
            pass

    recv = asyncio.create_task(pump())
    while not recv.done():
        line = await reader.readline()
        if not line:
            break
        if line.strip():
            await s.send(line.decode().strip())
    await asyncio.sleep(0.3)
    recv.cancel()
    return 0


def add_common(parser, suppress):
    def d(v):
        return argparse.SUPPRESS if suppress else v

    parser.add_argument("--url", default=d(os.environ.get("CHAT_HTTP_URL", "http://127.0.0.1:8080")),
                        help="the gateway: ws://HOST:PORT[/ws] or http://HOST:PORT (env CHAT_HTTP_URL)")
    parser.add_argument("--user", default=d(None), help="user id (required)")
    parser.add_argument("--device", default=d("cli"), help="device id (default: cli)")
    parser.add_argument("--token", default=d(None), help="a token instead of one from /dev/token")
    parser.add_argument("--since", type=int, default=d(None), help="the highest inbox seq already held")
    parser.add_argument("--timeout", type=float, default=d(None),
                        help="seconds to wait for answers (default 10); for listen: stop after it")
    parser.add_argument("--no-ack", action="store_true", default=d(False), help="never acknowledge inbox items")
    parser.add_argument("-v", "--verbose", action="store_true", default=d(False), help="print sent frames on stderr")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    # The common options work before or after the command (`… listen --timeout 5`).
    common = argparse.ArgumentParser(add_help=False)
    add_common(p, suppress=False)
    add_common(common, suppress=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser(parents=[common], name="send", help="send a 1:1 message, wait for sent")
    c.add_argument("to")
    c.add_argument("body")
    c.add_argument("--id")
    c = sub.add_parser(parents=[common], name="gsend", help="send to a group, wait for sent")
    c.add_argument("group")
    c.add_argument("body")
    c.add_argument("--id")
    c = sub.add_parser(parents=[common], name="listen", help="print frames until Ctrl-C (or --count / --timeout)")
    c.add_argument("--count", type=int, default=0, help="stop after this many frames after synced")
    c = sub.add_parser(parents=[common], name="group-create", help="create a group")
    c.add_argument("name")
    c.add_argument("members", nargs="*")
    c.add_argument("--id")
    c = sub.add_parser(parents=[common], name="group-add", help="add members to a group")
    c.add_argument("group")
    c.add_argument("members", nargs="+")
    c.add_argument("--id")
    c = sub.add_parser(parents=[common], name="group-info", help="a group's state")
    c.add_argument("group")
    c.add_argument("--id")
    c = sub.add_parser(parents=[common], name="groups", help="the groups of the user")
    c.add_argument("--id")
    c = sub.add_parser(parents=[common], name="presence", help="online / last seen of users")
    c.add_argument("users", nargs="+")
    c.add_argument("--id")
    c = sub.add_parser(parents=[common], name="raw", help="send one raw text frame; wait for the answer with its id (or --wait s)")
    c.add_argument("frame")
    c.add_argument("--wait", type=float, default=1.0)
    sub.add_parser(parents=[common], name="shell", help="send each stdin line as a frame, print what arrives")
    args = p.parse_args()
    if not args.user:
        p.error("--user is required")
    args.timeout_set = args.timeout is not None
    if args.timeout is None:
        args.timeout = 10.0
    try:
        sys.exit(asyncio.run(run(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
