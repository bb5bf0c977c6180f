// peer-node-ws: a reference WebSocket chat server on Node's `ws`, written the idiomatic way (one
// process, one event loop, an http server whose `upgrade` event authenticates and hands the socket
// to a `noServer` WebSocketServer), speaking the subset of PROTOCOL.md that `loadgen peer` drives:
// the authenticated upgrade, hello/synced, send, group_create, gsend, ack, ping. It mirrors
// peers/tokio-ws (see its comments): nothing stored, no retry dedup, receipts, cursors, presence
// or heartbeat timeout — all in its favour; the gateway's limits (64 KiB frames, 32 KiB bodies).
//
//   JWT_SECRET=... node server.mjs [--listen 127.0.0.1:8091]
//
// Tokens: HS256 JWTs verified with JWT_SECRET like the gateway (signature, exp, sub; the device
// from `dev`, else the `device` query parameter, else `default`).

import crypto from 'node:crypto';
import http from 'node:http';
import { WebSocketServer } from 'ws';

const MAX_BODY = 32 * 1024;
const MAX_FRAME = 64 * 1024;
const MAX_MEMBERS = 1024;
const LEEWAY_S = 30;
const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const listen = arg('--listen', '127.0.0.1:8091');
const secret = process.env.JWT_SECRET || '';
if (!secret) {
  console.error('peer-node-ws: JWT_SECRET must be set');
  process.exit(2);
}
const sep = listen.lastIndexOf(':');
const host = listen.slice(0, sep);
const port = Number(listen.slice(sep + 1));

// Returns {user, device} or null.
function verifyToken(token, key, deviceParam, nowS = Date.now() / 1000) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  let header, claims;
  try {
    header = JSON.parse(Buffer.from(parts[0], 'base64url'));
    claims = JSON.parse(Buffer.from(parts[1], 'base64url'));
  } catch {
    return null;
  }
  if (header?.alg !== 'HS256') return null;
  const want = crypto.createHmac('sha256', key).update(`${parts[0]}.${parts[1]}`).digest();
  const got = Buffer.from(parts[2], 'base64url');
  if (got.length !== want.length || !crypto.timingSafeEqual(got, want)) return null;
  if (typeof claims?.sub !== 'string' || typeof claims.exp !== 'number' || claims.exp + LEEWAY_S < nowS) return null;
  const device = typeof claims.dev === 'string' ? claims.dev : deviceParam || 'default';
  if (!ID_RE.test(claims.sub) || device.length > 32 || !ID_RE.test(device)) return null;
  return { user: claims.sub, device };
}

const users = new Map(); // user → Set of its sockets
const groups = new Map(); // gid → { members: [user] }
let nextSid = 0;
let nextGid = 0;

function send(ws, frame) {
  ws.send(JSON.stringify(frame));
}

function error(ws, code, msg, id) {
  send(ws, id === undefined ? { t: 'error', code, msg } : { t: 'error', code, msg, id });
}

// Queues an inbox item (serialised once) to every socket of `user`, each numbering its own items.
function deliver(user, item) {
  const socks = users.get(user);
  if (!socks) return;
  for (const s of socks) {
    s.seq += 1;
    s.send(`{"t":"msg","seq":${s.seq},"m":${item}}`);
  }
}

function handle(ws, f) {
  const id = typeof f.id === 'string' ? f.id : undefined;
  switch (f.t) {
    case 'send': {
      if (id === undefined || typeof f.to !== 'string' || typeof f.body !== 'string') {
        return error(ws, 'missing_field', 'send needs id, to and body (strings)', id);
      }
      if (Buffer.byteLength(f.body) > MAX_BODY) return error(ws, 'too_large', 'body exceeds max_body', id);
      const sid = ++nextSid;
      const ts = Date.now();
      deliver(f.to, JSON.stringify({ k: 'chat', from: ws.user, dev: ws.device, id, body: f.body, ts }));
      return send(ws, { t: 'sent', id, sid, ts, dup: false });
    }
    case 'gsend': {
      if (id === undefined || typeof f.group !== 'string' || typeof f.body !== 'string') {
        return error(ws, 'missing_field', 'gsend needs id, group and body (strings)', id);
      }
      if (Buffer.byteLength(f.body) > MAX_BODY) return error(ws, 'too_large', 'body exceeds max_body', id);
      const g = groups.get(f.group);
      if (!g) return error(ws, 'not_found', 'no such group', id);
      if (!g.members.includes(ws.user)) return error(ws, 'forbidden', 'not a member of the group', id);
      const sid = ++nextSid;
      const ts = Date.now();
      const item = JSON.stringify({
        k: 'group', group: f.group, from: ws.user, dev: ws.device, id, sid, n: g.members.length - 1, body: f.body, ts,
      });
      for (const m of g.members) if (m !== ws.user) deliver(m, item);
      return send(ws, { t: 'sent', id, sid, ts, dup: false });
    }
    case 'group_create': {
      if (id === undefined) return error(ws, 'missing_field', 'group_create needs id');
      const members = [ws.user];
      for (const m of Array.isArray(f.members) ? f.members : []) {
        if (typeof m !== 'string' || !ID_RE.test(m)) return error(ws, 'bad_field', 'members: invalid user id', id);
        if (!members.includes(m)) members.push(m);
      }
      if (members.length > MAX_MEMBERS) return error(ws, 'limit_exceeded', 'too many members', id);
      nextGid += 1;
      const gid = `g${nextGid.toString(16).padStart(8, '0')}`;
      groups.set(gid, { members });
      const group = {
        gid, name: typeof f.name === 'string' ? f.name : '', created_by: ws.user, created_at: Date.now(),
        admins: [ws.user], members,
      };
      return send(ws, { t: 'group', id, group });
    }
    case 'ack': // nothing is stored, so there is nothing to remove
      return undefined;
    case 'ping':
      return send(ws, { t: 'pong' });
    default:
      return error(ws, 'unknown_type', 'unknown or missing frame type `t`', id);
  }
}

const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME, clientTracking: false, perMessageDeflate: false });

wss.on('connection', (ws, who) => {
  ws.user = who.user;
  ws.device = who.device;
  ws.seq = 0;
  let socks = users.get(who.user);
  if (!socks) users.set(who.user, (socks = new Set()));
  socks.add(ws);
  send(ws, { t: 'hello', user: who.user, device: who.device, gateway: 'peer-node-ws', heartbeat_ms: 30000, max_body: MAX_BODY, resume_from: 0 });
  send(ws, { t: 'synced', seq: 0 });
  ws.on('message', (data, isBinary) => {
    if (isBinary) return error(ws, 'binary_unsupported', 'binary frames are not accepted; send JSON text frames');
    let f;
    try {
      f = JSON.parse(data);
    } catch (e) {
      return error(ws, 'bad_json', e.message);
    }
    if (typeof f !== 'object' || f === null || Array.isArray(f)) return error(ws, 'bad_json', 'not a JSON object');
    return handle(ws, f);
  });
  ws.on('error', () => {});
  ws.on('close', () => {
    socks.delete(ws);
    if (socks.size === 0 && users.get(who.user) === socks) users.delete(who.user);
  });
});

const server = http.createServer((req, res) => {
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('not_found\n');
});

function refuse(socket, status, reason) {
  socket.end(`HTTP/1.1 ${status}\r\nContent-Type: text/plain\r\nContent-Length: ${reason.length + 1}\r\nConnection: close\r\n\r\n${reason}\n`);
}

server.on('upgrade', (req, socket, head) => {
  socket.on('error', () => {});
  let url;
  try {
    url = new URL(req.url, 'http://peer');
  } catch {
    return refuse(socket, '400 Bad Request', 'bad_request');
  }
  if (url.pathname !== '/ws') return refuse(socket, '404 Not Found', 'not_found');
  const auth = req.headers.authorization;
  const token = auth?.startsWith('Bearer ') ? auth.slice(7) : url.searchParams.get('token');
  if (!token) return refuse(socket, '401 Unauthorized', 'token_missing');
  const who = verifyToken(token, secret, url.searchParams.get('device'));
  if (!who) return refuse(socket, '401 Unauthorized', 'token_invalid');
  return wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, who));
});

server.listen({ host, port, backlog: 4096 }, () => {
  console.error(`peer-node-ws: listening on ws://${listen}/ws (node ${process.version})`);
});
