// Interop test: a scripted conversation with a dev-mode gateway through the Node `ws` client,
// checking every frame against PROTOCOL.md. Starts nothing itself.
//
//   CHAT_HTTP_URL=http://127.0.0.1:8080 [CHAT_GROUPS=1] node interop.mjs
//
// Exits 0 when every step passed, 1 on the first mismatch (printing the frames around it).
import WebSocket from 'ws';

const HTTP = (process.env.CHAT_HTTP_URL || 'http://127.0.0.1:8080').replace(/\/$/, '');
const WS = `${HTTP.replace(/^http/, 'ws')}/ws`;
const GROUPS = (process.env.CHAT_GROUPS ?? '1') === '1';
const WAIT = Number(process.env.CHAT_WAIT_SECS || 10) * 1000;
const RUN = Math.random().toString(36).slice(2, 8);

class Mismatch extends Error {}

function check(cond, what, ...frames) {
  if (!cond) throw new Mismatch(what + frames.map((f) => `\n    ${JSON.stringify(f)}`).join(''));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function token(user, device) {
  const q = new URLSearchParams({ user, ...(device ? { device } : {}) });
  const r = await fetch(`${HTTP}/dev/token?${q}`, { signal: AbortSignal.timeout(WAIT) });
  check(r.ok, `/dev/token answered ${r.status}`);
  return (await r.text()).trim();
}

// One connection. Every frame received is kept in `inbox` until a step takes it.
class Client {
  constructor(user, device) {
    Object.assign(this, { user, device, inbox: [], order: [], held: 0, closed: null, waiters: new Set() });
  }

  async connect(since) {
    const q = new URLSearchParams({ token: await token(this.user, this.device) });
    if (since != null) q.set('since', String(since));
    const ws = new WebSocket(`${WS}?${q}`, { handshakeTimeout: WAIT });
    this.ws = ws;
    this.closed = null;
    ws.on('message', (data, isBinary) => {
      try {
        check(!isBinary, `server sent a binary frame (${data.length} bytes)`);
        const f = JSON.parse(data.toString('utf8'));
        check(f && typeof f === 'object' && typeof f.t === 'string', 'frame is an object with t', f);
        if (f.t === 'msg') {
          check(f.seq > this.held, `msg seqs increase (held ${this.held})`, f);
          this.held = f.seq;
        }
        this.inbox.push(f);
        this.order.push(f);
      } catch (e) {
        this.readError = e;
      }
      this.wake();
    });
    ws.on('close', (code, reason) => {
      this.closed = { code, reason: reason.toString() };
      this.wake();
    });
    await new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
      ws.once('unexpected-response', (_req, res) => reject(new Mismatch(`handshake answered ${res.statusCode}`)));
    });
    ws.on('error', (e) => { this.readError = e; this.wake(); });
    const hello = await this.expect((f) => f.t === 'hello', 'hello');
    check(hello.user === this.user && hello.device === this.device, 'hello names user and device', hello);
    check(Number.isInteger(hello.heartbeat_ms) && hello.heartbeat_ms > 0, 'hello.heartbeat_ms', hello);
    check(Number.isInteger(hello.max_body) && hello.max_body > 0, 'hello.max_body', hello);
    check(typeof hello.gateway === 'string' && Number.isInteger(hello.resume_from), 'hello fields', hello);
    if (since != null) check(hello.resume_from >= since, 'resume_from >= since', hello);
    return hello;
  }

  wake() {
    for (const w of this.waiters) w();
    this.waiters.clear();
  }

  send(frame) {
    this.ws.send(typeof frame === 'string' || Buffer.isBuffer(frame) ? frame : JSON.stringify(frame));
  }

  // Takes the first frame matching `pred` (waiting for it); other frames stay.
  async expect(pred, what, timeout = WAIT) {
    const deadline = Date.now() + timeout;
    for (;;) {
      if (this.readError) throw this.readError;
      const i = this.inbox.findIndex(pred);
      if (i >= 0) return this.inbox.splice(i, 1)[0];
      const left = deadline - Date.now();
      if (left <= 0 || this.closed) {
        throw new Mismatch(`${this.user}: no ${what} within ${timeout / 1000} s${this.closed ? ` (socket closed: ${JSON.stringify(this.closed)})` : ''}; frames held:${
          this.inbox.slice(-12).map((f) => `\n    ${JSON.stringify(f)}`).join('')}`);
      }
      await new Promise((r) => {
        const t = setTimeout(r, left);
        this.waiters.add(() => { clearTimeout(t); r(); });
      });
    }
  }

  expectItem(pred, what, timeout) {
    return this.expect((f) => f.t === 'msg' && pred(f.m), what, timeout);
  }

  async expectNone(pred, what, ms = 500) {
    await sleep(ms);
    const bad = this.inbox.filter(pred);
    check(!bad.length, `${this.user}: unexpected ${what}`, ...bad);
  }

  ack(seq) {
    this.send({ t: 'ack', seq: seq ?? this.held });
  }

  async close() {
    if (this.closed) return;
    const done = new Promise((r) => this.ws.once('close', r));
    this.ws.close(1000);
    await Promise.race([done, sleep(WAIT)]);
  }
}

const c = {};
const steps = [];
const step = (name, fn) => steps.push({ name, fn });

step('connect_and_sync', async () => {
  c.alice = new Client(`alice_${RUN}`, 'node-a');
  c.bob = new Client(`bob_${RUN}`, 'node-b');
  for (const cl of [c.alice, c.bob]) {
    const hello = await cl.connect();
    check(hello.resume_from === 0, 'a new device resumes from 0', hello);
    const synced = await cl.expect((f) => f.t === 'synced', 'synced');
    check(synced.seq === 0, 'an empty inbox syncs at 0', synced);
  }
});

step('send_and_tick', async () => {
  c.mid = `node-${RUN}-1`;
  const frame = { t: 'send', id: c.mid, to: c.bob.user, body: 'hello from node ✓' };
  c.alice.send(frame);
  const sent = await c.alice.expect((f) => f.t === 'sent' && f.id === c.mid, 'sent');
  check(Number.isInteger(sent.sid) && sent.sid > 0 && Number.isInteger(sent.ts), 'sent fields', sent);
  check(sent.dup === false, 'first send is not a dup', sent);
  c.sid = sent.sid;
  c.alice.send(frame);
  const again = await c.alice.expect((f) => f.t === 'sent' && f.id === c.mid, 'sent (retry)');
  check(again.dup === true && again.sid === c.sid, 'a retry with the same id is a dup with the same sid', again);
});

step('delivery', async () => {
  const f = await c.bob.expectItem((m) => m.k === 'chat' && m.id === c.mid, 'chat item');
  const m = f.m;
  check(f.seq === c.sid, 'msg seq equals the sender\'s sid', f);
  check(m.from === c.alice.user && m.dev === 'node-a' && m.body === 'hello from node ✓', 'chat fields', f);
  check(Number.isInteger(m.ts), 'chat ts', f);
  await c.bob.expectNone((f2) => f2.t === 'msg' && f2.m.id === c.mid, 'second copy of the message');
});

step('ack_and_receipt', async () => {
  c.bob.ack(c.sid);
  const f = await c.alice.expectItem((m) => m.k === 'receipt' && m.status === 'delivered', 'delivered receipt');
  check(f.m.from === c.bob.user && f.m.up_to >= c.sid, 'delivered receipt fields', f);
  c.alice.ack();
});

step('read_receipt', async () => {
  c.bob.send({ t: 'read', conv: c.alice.user, up_to: c.sid });
  const f = await c.alice.expectItem((m) => m.k === 'receipt' && m.status === 'read', 'read receipt');
  check(f.m.from === c.bob.user && f.m.up_to >= c.sid, 'read receipt fields', f);
  c.alice.ack();
});

step('malformed_frames', async () => {
  const b = c.bob;
  const cases = [
    ['{not json', 'bad_json'],
    ['{"t":"nope"}', 'unknown_type'],
    ['{"body":"no type"}', 'unknown_type'],
    [JSON.stringify({ t: 'send', id: 'node-missing', to: c.alice.user }), 'missing_field', 'node-missing'],
    [JSON.stringify({ t: 'ack', seq: 'seven' }), 'bad_field'],
    [JSON.stringify({ t: 'send', id: 'has space', to: c.alice.user, body: 'x' }), 'bad_field'],
    [JSON.stringify({ t: 'send', id: 'node-baduser', to: 'no.dots', body: 'x' }), 'bad_field'],
    [JSON.stringify({ t: 'read', up_to: 1 }), null], // neither conv nor group
  ];
  for (const [text, code, id] of cases) {
    b.send(text);
    const e = await b.expect((f) => f.t === 'error', `error for ${text}`);
    if (code) check(e.code === code, `${text} → ${code}`, e);
    else check(['missing_field', 'bad_field'].includes(e.code), `${text} → missing_field or bad_field`, e);
    check(typeof e.msg === 'string' && e.msg.length > 0, 'error has a message', e);
    if (id) check(e.id === id, 'error carries the frame\'s id', e);
  }
  b.send(JSON.stringify({ t: 'send', id: 'node-big', to: c.alice.user, body: 'x'.repeat(64 * 1024 - 2048) }));
  let e = await b.expect((f) => f.t === 'error', 'error for a too large body');
  check(e.code === 'too_large' && e.id === 'node-big', 'too_large with the id', e);
  b.send(Buffer.from([1, 2, 3]));
  e = await b.expect((f) => f.t === 'error', 'error for a binary frame');
  check(e.code === 'binary_unsupported', 'binary frame → binary_unsupported', e);
  // A WebSocket-level ping is answered by a pong and counts as a heartbeat.
  const pong = new Promise((r) => b.ws.once('pong', r));
  b.ws.ping('hb');
  await Promise.race([pong, sleep(WAIT).then(() => { throw new Mismatch('no WebSocket pong'); })]);
  b.send({ t: 'ping', extra: 'unknown fields are ignored' });
  await b.expect((f) => f.t === 'pong', 'pong after the errors');
  check(!b.closed, 'the connection is still open after error frames');
});

step('presence_and_typing', async () => {
  c.alice.send({ t: 'presence', id: 'node-p1', users: [c.bob.user, `nobody_${RUN}`] });
  const p = await c.alice.expect((f) => f.t === 'presence' && f.id === 'node-p1', 'presence answer');
  const by = Object.fromEntries(p.users.map((u) => [u.user, u]));
  check(by[c.bob.user]?.online === true, 'bob is online', p);
  check(by[`nobody_${RUN}`]?.online === false, 'an unknown user is offline', p);
  c.alice.send({ t: 'presence_sub', users: [c.bob.user] });
  c.alice.send({ t: 'typing', conv: c.bob.user });
  const t = await c.bob.expect((f) => f.t === 'typing', 'typing');
  check(t.from === c.alice.user && !('group' in t), 'typing names the typer', t);
});

step('offline_delivery', async () => {
  const held = c.bob.held;
  await c.bob.close();
  const p = await c.alice.expect((f) => f.t === 'presence' && !('id' in f)
    && f.users.some((u) => u.user === c.bob.user && !u.online), 'presence push: bob offline');
  check(p.users.filter((u) => u.user === c.bob.user).every((u) => Number.isInteger(u.last_seen)), 'last_seen', p);
  const ids = [0, 1, 2].map((i) => `node-${RUN}-off${i}`);
  ids.forEach((id, i) => c.alice.send({ t: 'send', id, to: c.bob.user, body: `while you were away ${i}` }));
  const sids = [];
  for (const id of ids) sids.push((await c.alice.expect((f) => f.t === 'sent' && f.id === id, `sent ${id}`)).sid);
  check(sids.every((s, i) => i === 0 || s > sids[i - 1]), 'sids increase in send order', sids);
  await c.alice.expectNone((f) => f.t === 'msg' && f.m.k === 'receipt' && f.m.up_to > c.sid, 'receipt while bob is offline');
  c.bob = new Client(c.bob.user, 'node-b');
  c.bob.held = held;
  const hello = await c.bob.connect(held);
  check(hello.resume_from === held, 'resume_from is the highest seq held', hello);
  const got = [];
  for (const id of ids) got.push(await c.bob.expectItem((m) => m.k === 'chat' && m.id === id, `offline ${id}`));
  check(got.map((f) => f.seq).join() === sids.join(), 'offline messages in order, seq == sid', ...got);
  const synced = await c.bob.expect((f) => f.t === 'synced', 'synced after the drain');
  check(synced.seq >= sids[2], 'synced covers the drained items', synced);
  check(got.every((f) => c.bob.order.indexOf(f) < c.bob.order.indexOf(synced)), 'synced after the drained items');
  c.bob.ack();
  const f = await c.alice.expectItem((m) => m.k === 'receipt' && m.status === 'delivered' && m.up_to >= sids[2],
    'delivered receipt for the offline messages');
  check(f.m.from === c.bob.user, 'receipt from bob', f);
  c.alice.ack();
});

step('redelivery_without_ack', async () => {
  const id = `node-${RUN}-unacked`;
  c.alice.send({ t: 'send', id, to: c.bob.user, body: 'ack me later' });
  const s = await c.alice.expect((f) => f.t === 'sent' && f.id === id, 'sent');
  await c.bob.expectItem((m) => m.k === 'chat' && m.id === id, 'live copy');
  await c.bob.close();
  c.bob = new Client(c.bob.user, 'node-b');
  await c.bob.connect();
  const f = await c.bob.expectItem((m) => m.k === 'chat' && m.id === id, 'the unacknowledged item again');
  check(f.seq === s.sid, 'same seq on redelivery', f);
  await c.bob.expect((f2) => f2.t === 'synced', 'synced');
  c.bob.ack();
});

step('groups', async () => {
  if (!GROUPS) {
    console.log('  (skipped: CHAT_GROUPS=0, no router)');
    return;
  }
  const { alice: a, bob: b } = c;
  a.send({ t: 'group_create', id: 'node-g1', name: `node ${RUN}`, members: [b.user] });
  const g = await a.expect((f) => f.id === 'node-g1', 'group_create answer');
  check(g.t === 'group', 'group_create → group', g);
  const gid = g.group.gid;
  check([...g.group.members].sort().join() === [a.user, b.user].sort().join() && g.group.admins.join() === a.user,
    'group members', g);
  for (const cl of [a, b]) {
    const ev = await cl.expectItem((m) => m.k === 'group_event' && m.group === gid, 'group_event created');
    check(ev.m.event === 'created' && ev.m.by === a.user, 'created event', ev);
    cl.ack();
  }
  a.send({ t: 'gsend', id: 'node-gm1', group: gid, body: 'hi group' });
  const s = await a.expect((f) => f.id === 'node-gm1', 'gsend answer');
  check(s.t === 'sent' && s.sid > 0, 'gsend → sent', s);
  const f = await b.expectItem((m) => m.k === 'group' && m.id === 'node-gm1', 'group message');
  check(f.m.group === gid && f.m.from === a.user && f.m.sid === s.sid && f.m.n === 1 && f.m.body === 'hi group',
    'group message fields', f);
  b.ack();
  let r = await a.expectItem((m) => m.k === 'group_receipt' && m.status === 'delivered', 'group_receipt delivered');
  check(r.m.group === gid && r.m.sid === s.sid, 'group_receipt fields', r);
  b.send({ t: 'read', group: gid, up_to: s.sid });
  r = await a.expectItem((m) => m.k === 'group_receipt' && m.status === 'read', 'group_receipt read');
  check(r.m.sid === s.sid, 'read group_receipt sid', r);
  a.ack();
  // group_add by a non-admin is forbidden.
  b.send({ t: 'group_add', id: 'node-g2', group: gid, members: [`carol_${RUN}`] });
  const e = await b.expect((x) => x.id === 'node-g2', 'group_add answer');
  check(e.t === 'error' && e.code === 'forbidden', 'non-admin group_add → forbidden', e);
  a.send({ t: 'gsend', id: 'node-gm2', group: 'gnosuchgroup', body: 'x' });
  const nf = await a.expect((x) => x.id === 'node-gm2', 'gsend to an unknown group');
  check(nf.t === 'error' && nf.code === 'not_found', 'unknown group → not_found', nf);
});

step('refused_handshakes', async () => {
  for (const [url, status] of [
    [`${WS}?token=not.a.jwt`, 401],
    [`${WS}?${new URLSearchParams({ token: await token(`dave_${RUN}`), device: 'bad.device' })}`, 400],
  ]) {
    const got = await new Promise((resolve) => {
      const ws = new WebSocket(url, { handshakeTimeout: WAIT });
      ws.once('unexpected-response', (_req, res) => { resolve(res.statusCode); ws.terminate(); });
      ws.once('open', () => { resolve('open'); ws.close(); });
      ws.once('error', (e) => resolve(`error ${e.message}`));
    });
    check(got === status, `handshake answered ${got}, want ${status}`);
  }
});

let passed = 0;
let failed = 0;
console.log(`node ws against ${WS} (run ${RUN}, groups: ${GROUPS})`);
for (const { name, fn } of steps) {
  const t0 = Date.now();
  try {
    await Promise.race([fn(), sleep(60000).then(() => { throw new Mismatch('step timed out after 60 s'); })]);
    passed++;
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e instanceof Mismatch ? e.message : e.stack}`);
    break;
  }
}
for (const cl of [c.alice, c.bob]) if (cl?.ws) await cl.close();
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed === steps.length ? 0 : 1);
