// The chat web client: plain JavaScript, no framework, no build step. It speaks PROTOCOL.md over
// one WebSocket to the gateway that served it (dev mode: tokens come from /dev/token).
//
// State that survives a reload lives in localStorage under chat.v1.<user>.<device>: the
// conversations, their messages and the highest inbox seq held (sent as `since` on reconnect).
'use strict';
(() => {
  const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const DEV_RE = /^[A-Za-z0-9_-]{1,32}$/;
  const MAX_MSGS = 500; // per conversation, kept locally
  const RANK = { failed: -1, pending: 0, sent: 1, delivered: 2, read: 3 };
  const TICK_LABEL = {
    pending: 'sending', sent: 'sent', delivered: 'delivered', read: 'read', failed: 'not sent',
  };
  const BACKOFF_BASE = 500;
  const BACKOFF_CAP = 30000;
  const TYPING_EVERY = 3000; // resend `typing` this often while the user types
  const TYPING_SHOW = 5000; // show "typing…" this long after the last indicator

  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;

  // h('li', {class: 'x', onclick: f}, 'text', child…): builds an element. Text is never parsed
  // as HTML.
  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k === 'class') e.className = v;
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const k of kids.flat()) {
      if (k == null || k === false) continue;
      e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return e;
  }

  function rand(n) {
    const a = new Uint8Array(n);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => 'abcdefghijklmnopqrstuvwxyz0123456789'[b % 36]).join('');
  }

  function deviceId() {
    let d = localStorage.getItem('chat.device');
    if (!d || !DEV_RE.test(d)) {
      d = `web-${rand(8)}`;
      localStorage.setItem('chat.device', d);
    }
    return d;
  }

  // ---------------------------------------------------------------- state

  let S = null; // persisted: {v, user, device, lastSeq, open, convs: {key: conv}}
  let saveTimer = 0;

  function storeKey() {
    return `chat.v1.${S.user}.${S.device}`;
  }

  function loadState(user, device) {
    const fresh = { v: 1, user, device, lastSeq: 0, open: null, convs: {} };
    try {
      const s = JSON.parse(localStorage.getItem(`chat.v1.${user}.${device}`) || 'null');
      if (s && s.v === 1 && s.user === user && typeof s.lastSeq === 'number') return s;
    } catch (e) {
      console.warn('discarding unreadable local history', e);
    }
    return fresh;
  }

  let warnedQuota = false;
  function saveNow() {
    clearTimeout(saveTimer);
    saveTimer = 0;
    if (!S) return;
    try {
      localStorage.setItem(storeKey(), JSON.stringify(S));
    } catch (e) {
      if (!warnedQuota) toast('warn', 'Local history could not be saved', String(e));
      warnedQuota = true;
    }
  }

  function saveSoon() {
    if (!saveTimer) saveTimer = setTimeout(saveNow, 300);
  }

  function convKey(kind, id) {
    return (kind === 'group' ? 'g:' : 'u:') + id;
  }

  function conv(kind, id) {
    const key = convKey(kind, id);
    let c = S.convs[key];
    if (!c) {
      c = S.convs[key] = {
        key, kind, id, name: kind === 'group' ? id : id, members: [], admins: [], left: false,
        msgs: [], readUpTo: 0, readSent: 0, peerDelivered: 0, peerRead: 0, grc: {}, last: 0,
      };
    }
    return c;
  }

  function addMsg(c, m) {
    c.msgs.push(m);
    if (c.msgs.length > MAX_MSGS) c.msgs.splice(0, c.msgs.length - MAX_MSGS);
    c.last = Math.max(c.last, m.ts || Date.now());
  }

  function tickOf(c, m) {
    if (m.error) return 'failed';
    if (!m.sid) return 'pending';
    if (c.kind === 'direct') {
      if (m.sid <= c.peerRead) return 'read';
      if (m.sid <= c.peerDelivered) return 'delivered';
      return 'sent';
    }
    return c.grc[m.sid] || 'sent';
  }

  // The sid up to which the user has seen what others wrote here (the value for `read`).
  function latestIncoming(c) {
    let max = 0;
    for (const m of c.msgs) if (!m.mine && m.kind === 'msg' && m.sid > max) max = m.sid;
    return max;
  }

  function unread(c) {
    let n = 0;
    for (const m of c.msgs) if (!m.mine && m.kind === 'msg' && m.sid > c.readUpTo) n++;
    return n;
  }

  // ---------------------------------------------------------------- connection

  let ws = null;
  let connecting = false; // fetching a token
  let attempt = 0;
  let retryTimer = 0;
  let retryAt = 0;
  let countdown = 0;
  let pingTimer = 0;
  let heartbeatMs = 30000;
  let lastRx = 0;
  let synced = false;
  let stopped = true;
  let ackTimer = 0;
  let ackedSeq = 0;
  let reqN = 0;
  const requests = new Map(); // request id -> {kind, ...}

  function nextId(prefix) {
    return `${prefix}-${S.device}-${Date.now().toString(36)}-${(++reqN).toString(36)}${rand(3)}`;
  }

  function setConn(state, text) {
    $('conn').dataset.state = state;
    $('conn-text').textContent = text || state;
    $('conn-retry').hidden = state !== 'waiting';
  }

  function send(frame) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  async function connect() {
    clearTimeout(retryTimer);
    clearInterval(countdown);
    retryTimer = 0;
    if (stopped || ws || connecting) return;
    setConn('connecting', 'connecting…');
    let token;
    connecting = true;
    try {
      const r = await fetch(`/dev/token?user=${enc(S.user)}&device=${enc(S.device)}`, { cache: 'no-store' });
      const text = (await r.text()).trim();
      if (r.status === 400) {
        signOut();
        $('login-error').textContent = `The server refused the name: ${text}`;
        return;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status} ${text}`);
      token = text;
    } catch (e) {
      scheduleReconnect(`no token (${e.message})`);
      return;
    } finally {
      connecting = false;
    }
    if (stopped || ws) return;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = `${proto}//${location.host}/ws?token=${enc(token)}&device=${enc(S.device)}&since=${S.lastSeq}`;
    const sock = new WebSocket(url);
    ws = sock;
    synced = false;
    ackedSeq = 0;
    sock.onmessage = (ev) => {
      if (sock !== ws) return;
      lastRx = Date.now();
      onFrame(ev.data);
    };
    sock.onclose = (ev) => {
      if (sock !== ws) return;
      ws = null;
      synced = false;
      clearInterval(pingTimer);
      const why = {
        1000: 'closed', 1001: 'server going away', 1006: 'connection lost',
        1009: 'frame too large', 1011: 'server error', 1013: 'server busy',
      }[ev.code] || `closed (${ev.code})`;
      if (ev.code === 1009 || ev.code === 1011) toast('error', `Connection closed: ${why}`, ev.reason);
      scheduleReconnect(ev.reason ? `${why}: ${ev.reason}` : why);
      renderChat();
    };
  }

  // Jittered exponential backoff: a random delay in [d/2, d], d doubling from 0.5 s to 30 s.
  function scheduleReconnect(why) {
    if (stopped) return;
    const d = Math.min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt);
    const delay = Math.round(d / 2 + (Math.random() * d) / 2);
    attempt = Math.min(attempt + 1, 16);
    retryAt = Date.now() + delay;
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, delay);
    presence.clear(); // stale until the next connection asks again
    renderHead();
    clearInterval(countdown);
    const show = () => {
      if (!retryTimer || stopped) {
        clearInterval(countdown);
        return;
      }
      const s = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
      setConn('waiting', `offline — ${why}; retrying in ${s} s`);
    };
    show();
    countdown = setInterval(show, 1000);
  }

  function dropConnection() {
    const sock = ws;
    if (sock) {
      ws = null;
      sock.onclose = null;
      sock.close(1000);
    }
    clearInterval(pingTimer);
    synced = false;
  }

  function startHeartbeat() {
    clearInterval(pingTimer);
    const every = Math.max(1000, Math.min(heartbeatMs / 3, 15000));
    pingTimer = setInterval(() => {
      // Silent for longer than the heartbeat: the socket is probably dead; start again.
      if (Date.now() - lastRx > heartbeatMs + every) {
        dropConnection();
        scheduleReconnect('no answer from the server');
        return;
      }
      send({ t: 'ping' });
    }, every);
  }

  function ackSoon() {
    if (!ackTimer) ackTimer = setTimeout(flushAck, 50);
  }

  // Saves what was received, then acknowledges it (cumulative).
  function flushAck() {
    clearTimeout(ackTimer);
    ackTimer = 0;
    saveNow();
    if (S.lastSeq > ackedSeq && send({ t: 'ack', seq: S.lastSeq })) ackedSeq = S.lastSeq;
  }

  // ---------------------------------------------------------------- frames from the server

  function onFrame(data) {
    let f;
    try {
      f = JSON.parse(data);
    } catch (e) {
      toast('error', 'Unreadable frame from the server', String(data).slice(0, 200));
      return;
    }
    switch (f.t) {
      case 'hello':
        heartbeatMs = f.heartbeat_ms || 30000;
        startHeartbeat();
        setConn('syncing', 'syncing…');
        break;
      case 'msg':
        onItem(f.seq, f.m || {});
        break;
      case 'synced':
        synced = true;
        attempt = 0;
        setConn('online', 'online');
        flushAck();
        resendPending();
        send({ t: 'groups', id: remember({ kind: 'groups' }) });
        openChanged();
        break;
      case 'sent':
        onSent(f);
        break;
      case 'pong':
        break;
      case 'presence':
        onPresence(f);
        break;
      case 'typing':
        onTyping(f);
        break;
      case 'group':
        onGroup(f);
        break;
      case 'groups':
        requests.delete(f.id);
        for (const g of f.groups || []) {
          const c = conv('group', g.gid);
          if (g.name) c.name = g.name;
          if (!c.members.length) send({ t: 'group_info', id: remember({ kind: 'info' }), group: g.gid });
        }
        renderList();
        saveSoon();
        break;
      case 'receipts':
        onReceipts(f);
        break;
      case 'reconnect':
        setConn('connecting', `server asks to reconnect (${f.reason || 'no reason'})`);
        break; // the server closes with 1001 next; onclose schedules the reconnect
      case 'error':
        onError(f);
        break;
      default:
        console.debug('ignoring unknown frame', f);
    }
  }

  function onItem(seq, m) {
    if (typeof seq !== 'number') return;
    if (seq <= S.lastSeq) {
      ackSoon(); // already held (a redelivery after a reconnect)
      return;
    }
    S.lastSeq = seq;
    switch (m.k) {
      case 'chat': {
        const c = conv('direct', m.from);
        if (!c.msgs.some((x) => x.kind === 'msg' && x.from === m.from && x.id === m.id)) {
          addMsg(c, { kind: 'msg', sid: seq, from: m.from, id: m.id, body: m.body, ts: m.ts, mine: false });
        }
        stopTyping(c, m.from);
        notify(c);
        break;
      }
      case 'receipt': {
        const c = conv('direct', m.from);
        c.peerDelivered = Math.max(c.peerDelivered, m.up_to);
        if (m.status === 'read') c.peerRead = Math.max(c.peerRead, m.up_to);
        break;
      }
      case 'outgoing': {
        const c = conv('direct', m.to);
        const mine = c.msgs.find((x) => x.mine && x.id === m.id);
        if (mine) mine.sid = m.sid;
        else addMsg(c, { kind: 'msg', sid: m.sid, from: S.user, id: m.id, body: m.body, ts: m.ts, mine: true });
        break;
      }
      case 'read_mark': {
        const c = m.group ? conv('group', m.group) : conv('direct', m.conv);
        c.readUpTo = Math.max(c.readUpTo, m.up_to);
        c.readSent = Math.max(c.readSent, m.up_to);
        break;
      }
      case 'group': {
        const c = conv('group', m.group);
        if (!c.msgs.some((x) => x.kind === 'msg' && x.sid === m.sid)) {
          addMsg(c, {
            kind: 'msg', sid: m.sid, from: m.from, id: m.id, body: m.body, ts: m.ts, mine: m.from === S.user,
          });
        }
        stopTyping(c, m.from);
        if (!c.members.length) send({ t: 'group_info', id: remember({ kind: 'info' }), group: m.group });
        notify(c);
        break;
      }
      case 'group_event': {
        const c = conv('group', m.group);
        if (m.name) c.name = m.name;
        if (!c.msgs.some((x) => x.kind === 'event' && x.sid === m.sid)) {
          addMsg(c, { kind: 'event', sid: m.sid, ts: m.ts, text: eventText(m) });
          const ms = m.members || [];
          if (m.event === 'created' || m.event === 'added') {
            for (const u of ms) if (!c.members.includes(u)) c.members.push(u);
            if (m.event === 'created' && !c.members.includes(m.by)) c.members.unshift(m.by);
            if (ms.includes(S.user)) c.left = false;
          } else if (m.event === 'removed' || m.event === 'left') {
            c.members = c.members.filter((u) => !ms.includes(u));
            if (ms.includes(S.user)) c.left = true;
          }
        }
        if (!c.left) send({ t: 'group_info', id: remember({ kind: 'info' }), group: m.group });
        break;
      }
      case 'group_receipt': {
        const c = conv('group', m.group);
        if ((RANK[m.status] || 0) > (RANK[c.grc[m.sid]] || 0)) c.grc[m.sid] = m.status;
        break;
      }
      default:
        console.debug('ignoring unknown item', m);
    }
    ackSoon();
    render();
  }

  function eventText(m) {
    const who = (u) => (u === S.user ? 'you' : u);
    const list = (m.members || []).filter((u) => m.event !== 'created' || u !== m.by).map(who).join(', ');
    switch (m.event) {
      case 'created': return `${who(m.by)} created the group “${m.name}”${list ? ` with ${list}` : ''}`;
      case 'added': return `${who(m.by)} added ${list}`;
      case 'removed': return `${who(m.by)} removed ${list}`;
      case 'left': return `${list || who(m.by)} left`;
      default: return `${who(m.by)}: ${m.event} ${list}`;
    }
  }

  function findMine(id) {
    for (const c of Object.values(S.convs)) {
      const m = c.msgs.find((x) => x.mine && x.id === id);
      if (m) return [c, m];
    }
    return [null, null];
  }

  function onSent(f) {
    const [c, m] = findMine(f.id);
    if (!m) return;
    // Inbox sequences only grow (one stream for every inbox): a new 1:1 message stored below a
    // seq this device already held when it sent means the server's store was wiped (dev servers
    // are ephemeral); start again from the beginning of the new inbox.
    if (c.kind === 'direct' && !f.dup && m.atSeq && f.sid <= m.atSeq) {
      toast('warn', 'The server was reset', 'Local history is kept; fetching the new inbox from the start.');
      S.lastSeq = 0;
      saveNow();
      dropConnection();
      setTimeout(connect, 0);
    }
    m.sid = f.sid;
    delete m.error;
    render();
    saveSoon();
  }

  function onError(f) {
    const req = f.id ? requests.get(f.id) : null;
    const [, m] = f.id ? findMine(f.id) : [null, null];
    if (m && !m.sid) {
      m.error = f.code;
      m.errorMsg = f.msg;
      toast('error', `Message not sent (${f.code})`, f.msg);
      render();
      saveSoon();
      return;
    }
    if (req) {
      requests.delete(f.id);
      if (req.kind === 'create' || req.kind === 'add') {
        $('group-error').textContent = `${f.code}: ${f.msg}`;
      }
    }
    toast('error', `Server error: ${f.code}`, f.msg + (f.id ? ` (id ${f.id})` : ''));
  }

  function remember(req) {
    const id = nextId(req.kind);
    requests.set(id, req);
    return id;
  }

  function onGroup(f) {
    const req = requests.get(f.id);
    requests.delete(f.id);
    const g = f.group;
    if (!g || !g.gid) return;
    const c = conv('group', g.gid);
    c.name = g.name;
    c.members = g.members || [];
    c.admins = g.admins || [];
    c.left = !c.members.includes(S.user);
    if (!c.last) c.last = g.created_at || Date.now();
    if (req && (req.kind === 'create' || req.kind === 'add')) {
      $('group-dialog').close();
      if (req.kind === 'create') openConv(c.key);
      toast('info', req.kind === 'create' ? `Group “${g.name}” created` : 'Members added', '');
    }
    if (req && req.kind === 'leave') toast('info', `You left “${g.name}”`, '');
    render();
    saveSoon();
  }

  function onReceipts(f) {
    requests.delete(f.id);
    const read = (f.read || []).join(', ') || 'nobody yet';
    const got = (f.delivered || []).join(', ') || 'nobody yet';
    toast('info', `Message ${f.sid}: ${f.recipients} recipient(s)`, `Delivered to: ${got}. Read by: ${read}.`);
  }

  // ---------------------------------------------------------------- presence and typing

  const presence = new Map(); // user -> {online, last_seen}
  const typing = new Map(); // conv key -> Map(user -> expiry ms)

  function onPresence(f) {
    requests.delete(f.id);
    for (const p of f.users || []) presence.set(p.user, p);
    renderHead();
  }

  function onTyping(f) {
    const c = f.group ? S.convs[convKey('group', f.group)] : conv('direct', f.from);
    if (!c || !f.from) return;
    let t = typing.get(c.key);
    if (!t) typing.set(c.key, (t = new Map()));
    t.set(f.from, Date.now() + TYPING_SHOW);
    setTimeout(() => { renderHead(); renderList(); }, TYPING_SHOW + 50);
    renderHead();
    renderList();
  }

  function stopTyping(c, user) {
    const t = typing.get(c.key);
    if (t) t.delete(user);
  }

  function typers(c) {
    const t = typing.get(c.key);
    if (!t) return [];
    const now = Date.now();
    return [...t].filter(([, exp]) => exp > now).map(([u]) => u);
  }

  let typingSentAt = 0;
  function userTyped() {
    const c = openConvObj();
    if (!c || !synced || Date.now() - typingSentAt < TYPING_EVERY) return;
    if (!$('composer-input').value.trim()) return;
    typingSentAt = Date.now();
    send(c.kind === 'group' ? { t: 'typing', group: c.id } : { t: 'typing', conv: c.id });
  }

  function fmtTime(ts) {
    if (!ts) return '';
    const d = new Date(ts);
    const now = new Date();
    const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    if (d.toDateString() === now.toDateString()) return hm;
    return `${d.toLocaleDateString([], { day: 'numeric', month: 'short' })} ${hm}`;
  }

  // ---------------------------------------------------------------- sending

  function sendMessage(text) {
    const c = openConvObj();
    if (!c || !text) return;
    if (c.kind === 'group' && c.left) {
      toast('error', 'You are not a member of this group', '');
      return;
    }
    const id = `m-${Date.now().toString(36)}-${rand(6)}`;
    const m = { kind: 'msg', id, from: S.user, body: text, ts: Date.now(), sid: 0, mine: true };
    addMsg(c, m);
    transmit(c, m);
    typingSentAt = 0;
    render();
    saveSoon();
  }

  function transmit(c, m) {
    if (!synced) return; // sent after the next `synced`
    m.atSeq = S.lastSeq;
    if (c.kind === 'group') send({ t: 'gsend', id: m.id, group: c.id, body: m.body });
    else send({ t: 'send', id: m.id, to: c.id, body: m.body });
  }

  // After a (re)connect: everything not yet confirmed goes again, with the same id (the server
  // deduplicates retries), as do failures the server said to retry.
  function resendPending() {
    for (const c of Object.values(S.convs)) {
      for (const m of c.msgs) {
        if (m.mine && !m.sid && (!m.error || m.error === 'unavailable' || m.error === 'internal')) {
          delete m.error;
          transmit(c, m);
        }
      }
    }
    render();
  }

  function retry(c, m) {
    delete m.error;
    transmit(c, m);
    render();
  }

  // ---------------------------------------------------------------- the open conversation

  function openConvObj() {
    return S && S.open ? S.convs[S.open] : null;
  }

  function openConv(key) {
    S.open = key;
    render();
    openChanged();
    saveSoon();
    const input = $('composer-input');
    if (!input.closest('[hidden]')) input.focus();
  }

  // Presence of the open chat (query + follow), and read receipts for it.
  function openChanged() {
    const c = openConvObj();
    if (!synced) return;
    if (c && c.kind === 'direct') {
      send({ t: 'presence', id: remember({ kind: 'presence' }), users: [c.id] });
      send({ t: 'presence_sub', users: [c.id] });
    } else {
      send({ t: 'presence_sub', users: [] });
    }
    markRead();
  }

  // A conversation that is open in a visible page has been read.
  function markRead() {
    const c = openConvObj();
    if (!c || document.visibilityState !== 'visible') return;
    const upTo = latestIncoming(c);
    if (upTo > c.readUpTo) {
      c.readUpTo = upTo;
      renderList();
      saveSoon();
    }
    if (upTo > c.readSent && synced) {
      const ok = send(c.kind === 'group' ? { t: 'read', group: c.id, up_to: upTo } : { t: 'read', conv: c.id, up_to: upTo });
      if (ok) c.readSent = upTo;
    }
  }

  function notify(c) {
    if (S.open === c.key) queueMicrotask(markRead);
  }

  // ---------------------------------------------------------------- rendering

  function render() {
    renderList();
    renderChat();
  }

  function renderList() {
    if (!S) return;
    const list = $('conv-list');
    const convs = Object.values(S.convs).sort((a, b) => b.last - a.last);
    list.replaceChildren(...convs.map((c) => {
      const last = [...c.msgs].reverse().find((m) => m.kind === 'msg');
      const n = unread(c);
      const t = typers(c);
      const preview = t.length ? 'typing…' : last ? `${last.mine ? 'You: ' : c.kind === 'group' ? `${last.from}: ` : ''}${last.body}` : '';
      return h('li', null, h('button', {
        type: 'button', class: 'conv', 'aria-current': S.open === c.key ? 'true' : null,
        'data-conv': c.key, onclick: () => openConv(c.key),
        'aria-label': `${c.kind === 'group' ? 'Group' : 'Chat with'} ${c.name}${n ? `, ${n} unread` : ''}`,
      },
      h('span', { class: 'avatar', 'aria-hidden': 'true', 'data-kind': c.kind }, (c.name || '?').slice(0, 1).toUpperCase()),
      h('span', { class: 'conv-text' },
        h('span', { class: 'conv-name' }, c.name, c.left ? ' (left)' : ''),
        h('span', { class: `conv-preview${t.length ? ' typing' : ''}` }, preview)),
      h('span', { class: 'conv-meta' },
        h('span', { class: 'muted small' }, last ? fmtTime(last.ts) : ''),
        n ? h('span', { class: 'badge', 'aria-hidden': 'true' }, n) : null)));
    }));
    if (!convs.length) list.replaceChildren(h('li', { class: 'muted small pad' }, 'No conversations yet.'));
  }

  function renderHead() {
    const c = openConvObj();
    const sub = $('chat-sub');
    $('add-members').hidden = !c || c.kind !== 'group' || c.left || !c.admins.includes(S.user);
    $('leave-group').hidden = !c || c.kind !== 'group' || c.left;
    if (!c) {
      $('chat-title').textContent = 'No conversation open';
      sub.textContent = '';
      return;
    }
    $('chat-title').textContent = c.kind === 'group' ? c.name : c.id;
    const t = typers(c);
    let text = '';
    let cls = 'muted';
    if (t.length) {
      text = c.kind === 'group' ? `${t.join(', ')} ${t.length > 1 ? 'are' : 'is'} typing…` : 'typing…';
      cls = 'typing';
    } else if (c.kind === 'group') {
      text = c.left ? 'You are no longer a member' : c.members.map((u) => (u === S.user ? 'you' : u)).join(', ');
    } else {
      const p = presence.get(c.id);
      if (p && p.online) {
        text = 'online';
        cls = 'online';
      } else if (p && p.last_seen) text = `last seen ${fmtTime(p.last_seen)}`;
      else if (p) text = 'offline';
    }
    sub.textContent = text;
    sub.className = cls;
  }

  function tickEl(c, m) {
    const st = tickOf(c, m);
    const glyph = { pending: '◷', sent: '✓', delivered: '✓✓', read: '✓✓', failed: '!' }[st];
    const attrs = { class: `tick tick-${st}`, 'data-status': st, title: TICK_LABEL[st], 'aria-label': TICK_LABEL[st] };
    if (c.kind === 'group' && m.sid) {
      // Who got it / read it, on demand.
      return h('button', {
        type: 'button', ...attrs, class: `${attrs.class} link`, 'aria-label': `${TICK_LABEL[st]}; show who received it`,
        onclick: () => send({ t: 'receipts', id: remember({ kind: 'receipts' }), group: c.id, sid: m.sid }),
      }, glyph);
    }
    return h('span', attrs, glyph);
  }

  function renderChat() {
    renderHead();
    const c = openConvObj();
    $('empty').hidden = !!c;
    $('composer').hidden = !c;
    const box = $('messages');
    box.hidden = !c;
    if (!c) {
      box.replaceChildren();
      return;
    }
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    box.replaceChildren(...c.msgs.map((m) => {
      if (m.kind === 'event') return h('li', { class: 'event', 'data-sid': m.sid }, m.text);
      const st = m.mine ? tickOf(c, m) : null;
      return h('li', { class: `msg ${m.mine ? 'mine' : 'theirs'}`, 'data-sid': m.sid || null, 'data-id': m.id, 'data-status': st },
        c.kind === 'group' && !m.mine ? h('span', { class: 'from' }, m.from) : null,
        h('span', { class: 'sr-only' }, m.mine ? 'You: ' : c.kind === 'direct' ? `${m.from}: ` : ''),
        h('span', { class: 'body' }, m.body),
        h('span', { class: 'meta' },
          h('time', { datetime: new Date(m.ts || 0).toISOString() }, fmtTime(m.ts)),
          m.mine ? tickEl(c, m) : null),
        st === 'failed'
          ? h('span', { class: 'failed' }, `Not sent: ${m.error}${m.errorMsg ? ` (${m.errorMsg})` : ''} `,
            h('button', { type: 'button', class: 'link', onclick: () => retry(c, m) }, 'Retry'))
          : null);
    }));
    if (atBottom || c.msgs.length && c.msgs[c.msgs.length - 1].mine) box.scrollTop = box.scrollHeight;
  }

  // Errors and notices stay visible until dismissed (errors) or for a few seconds (the rest).
  function toast(level, title, detail) {
    const t = h('div', { class: `toast toast-${level}`, 'data-level': level },
      h('strong', null, title), detail ? h('span', null, ` ${detail}`) : null,
      h('button', { type: 'button', class: 'link close', 'aria-label': 'Dismiss', onclick: () => t.remove() }, '×'));
    const box = $('toasts');
    box.append(t);
    while (box.children.length > 5) box.firstChild.remove();
    if (level !== 'error') setTimeout(() => t.remove(), 6000);
  }

  // ---------------------------------------------------------------- sign in / out and UI wiring

  function signIn(user) {
    S = loadState(user, deviceId());
    localStorage.setItem('chat.user', user);
    $('login').hidden = true;
    $('app').hidden = false;
    $('me-name').textContent = user;
    $('me-device').textContent = `device ${S.device}`;
    document.title = `chat — ${user}`;
    stopped = false;
    attempt = 0;
    render();
    connect();
  }

  function signOut() {
    stopped = true;
    clearTimeout(retryTimer);
    retryTimer = 0;
    dropConnection();
    if (S) saveNow();
    S = null;
    localStorage.removeItem('chat.user');
    presence.clear();
    typing.clear();
    $('app').hidden = true;
    $('login').hidden = false;
    document.title = 'chat';
    setConn('offline', 'offline');
    $('login-name').focus();
  }

  function parseUsers(s) {
    return s.split(/[\s,]+/).map((u) => u.trim()).filter(Boolean);
  }

  let groupMode = 'create';
  function openGroupDialog(mode) {
    groupMode = mode;
    const c = openConvObj();
    $('group-dialog-title').textContent = mode === 'create' ? 'New group' : `Add members to “${c.name}”`;
    $('group-name-row').hidden = mode !== 'create';
    $('group-name').required = mode === 'create';
    $('group-submit').textContent = mode === 'create' ? 'Create' : 'Add';
    $('group-error').textContent = '';
    $('group-name').value = '';
    $('group-members').value = '';
    $('group-dialog').showModal();
    $(mode === 'create' ? 'group-name' : 'group-members').focus();
  }

  function submitGroup(ev) {
    ev.preventDefault();
    const members = parseUsers($('group-members').value);
    const bad = members.find((u) => !ID_RE.test(u));
    if (bad) {
      $('group-error').textContent = `“${bad}” is not a valid user name.`;
      return;
    }
    if (!synced) {
      $('group-error').textContent = 'Not connected; try again in a moment.';
      return;
    }
    if (groupMode === 'create') {
      const name = $('group-name').value.trim();
      if (!name) {
        $('group-error').textContent = 'The group needs a name.';
        return;
      }
      send({ t: 'group_create', id: remember({ kind: 'create' }), name, members });
    } else {
      const c = openConvObj();
      if (!members.length) {
        $('group-error').textContent = 'Name at least one user.';
        return;
      }
      send({ t: 'group_add', id: remember({ kind: 'add' }), group: c.id, members });
    }
    $('group-error').textContent = 'Working…';
  }

  function wire() {
    $('login-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const user = $('login-name').value.trim();
      if (!ID_RE.test(user)) {
        $('login-error').textContent = 'Use 1–64 letters, digits, _ or -.';
        return;
      }
      $('login-error').textContent = '';
      signIn(user);
    });
    $('sign-out').addEventListener('click', signOut);
    $('conn-retry').addEventListener('click', () => { attempt = 0; connect(); });
    $('new-chat').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const u = $('new-chat-user').value.trim();
      if (!ID_RE.test(u)) {
        toast('error', 'Not a valid user name', 'Use 1–64 letters, digits, _ or -.');
        return;
      }
      const c = conv('direct', u);
      if (!c.last) c.last = Date.now();
      $('new-chat-user').value = '';
      openConv(c.key);
    });
    $('new-group').addEventListener('click', () => openGroupDialog('create'));
    $('add-members').addEventListener('click', () => openGroupDialog('add'));
    $('leave-group').addEventListener('click', () => {
      const c = openConvObj();
      if (c && confirm(`Leave “${c.name}”?`)) send({ t: 'group_leave', id: remember({ kind: 'leave' }), group: c.id });
    });
    $('group-form').addEventListener('submit', submitGroup);
    $('group-cancel').addEventListener('click', () => $('group-dialog').close());
    const input = $('composer-input');
    $('composer').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      input.value = '';
      sendMessage(text);
    });
    input.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $('composer').requestSubmit();
      }
    });
    input.addEventListener('input', userTyped);
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') markRead();
    });
    window.addEventListener('online', () => {
      if (!ws && !stopped) { attempt = 0; connect(); }
    });
    window.addEventListener('pagehide', () => { if (S) saveNow(); });
  }

  // A small handle for debugging from the console (and for the browser test).
  window.chat = {
    state: () => S,
    connected: () => synced,
    sendRaw: (text) => ws && ws.readyState === WebSocket.OPEN && (ws.send(text), true),
    disconnect: () => { dropConnection(); scheduleReconnect('disconnected by hand'); },
  };

  wire();
  const saved = localStorage.getItem('chat.user');
  if (saved && ID_RE.test(saved)) signIn(saved);
  else {
    $('login').hidden = false;
    $('login-name').focus();
  }
})();
