// Browser end-to-end test of the web client (gateway/web/) served by a dev-mode gateway, in
// Debian's headless Chromium driven by playwright-core. Starts no server itself.
//
//   CHAT_HTTP_URL=http://127.0.0.1:8080 [CHAT_GROUPS=1] [CHAT_ARTIFACTS=dir] node browser.mjs
//
// Two people, A and B, each in their own browser context (own localStorage, own device id):
// A sends, B sees it, B reads, A sees the blue tick; typing and presence; B goes offline (its
// page is closed), A sends, B comes back and gets it; a group; an error frame shown; a dropped
// socket reconnects and flushes what was queued. Screenshots of both pages at each step go to
// CHAT_ARTIFACTS (default <repo>/target/browser-artifacts).
import { mkdirSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const HTTP = (process.env.CHAT_HTTP_URL || 'http://127.0.0.1:8080').replace(/\/$/, '');
const GROUPS = (process.env.CHAT_GROUPS ?? '1') === '1';
const ARTIFACTS = resolve(process.env.CHAT_ARTIFACTS || join(here, '../../target/browser-artifacts'));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = Number(process.env.CHAT_WAIT_SECS || 10) * 1000;
// Iterating on the client: serve gateway/web/ from the work tree instead of the gateway's
// compiled-in copy (no gateway rebuild). The real test run never sets this.
const WEB_DIR = process.env.CHAT_WEB_DIR;
const RUN = Math.random().toString(36).slice(2, 7);
const ALICE = `alice_${RUN}`;
const BOB = `bob_${RUN}`;

rmSync(ARTIFACTS, { recursive: true, force: true });
mkdirSync(ARTIFACTS, { recursive: true });

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    // A document fulfilled by the test (CHAT_WEB_DIR) has no address space of its own, and
    // Chromium would block its WebSocket to loopback.
    ...(WEB_DIR ? ['--disable-features=LocalNetworkAccessChecks'] : [])],
});
const pageErrors = [];
let offline = false;
let shot = 0;
const pages = {}; // 'a' | 'b' -> page (absent while closed)

async function newPage(ctx, who) {
  const page = await ctx.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('pageerror', (e) => pageErrors.push(`${who}: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    // While the test has taken the network away, failed fetches are what should happen.
    if (offline && /ERR_INTERNET_DISCONNECTED|WebSocket connection/.test(m.text())) return;
    pageErrors.push(`${who} console: ${m.text()}`);
  });
  pages[who] = page;
  if (WEB_DIR) {
    for (const [path, type] of [['/', 'text/html'], ['/app.js', 'text/javascript'], ['/app.css', 'text/css']]) {
      await page.route(`${HTTP}${path}`, (route) => route.fulfill({
        contentType: `${type}; charset=utf-8`, path: join(WEB_DIR, path === '/' ? 'index.html' : path.slice(1)),
      }));
    }
  }
  await page.goto(`${HTTP}/`);
  return page;
}

// Screenshots of every open page for this step.
async function snap(name) {
  shot += 1;
  for (const [who, page] of Object.entries(pages)) {
    if (page.isClosed()) continue;
    await page.screenshot({ path: join(ARTIFACTS, `${String(shot).padStart(2, '0')}-${name}-${who}.png`) });
  }
}

const online = (page) => page.locator('#conn[data-state="online"]').waitFor();
const msg = (page, text) => page.locator('#messages .msg', { hasText: text });
const tick = (page, text, status) => page.locator(`#messages .msg.mine[data-status="${status}"]`, { hasText: text }).waitFor();

async function signIn(page, user) {
  await page.locator('#login-name').fill(user);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await online(page);
}

async function openChat(page, user) {
  await page.locator('#new-chat-user').fill(user);
  await page.locator('#new-chat').getByRole('button', { name: 'Open' }).click();
  await page.locator('#chat-title', { hasText: user }).waitFor();
}

async function say(page, text) {
  await page.locator('#composer-input').fill(text);
  await page.locator('#composer-input').press('Enter');
}

async function expectCount(locator, n, what) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const got = await locator.count();
    if (got === n) return;
    if (Date.now() > deadline) throw new Error(`${what}: ${got} elements, want ${n}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const steps = [];
const step = (name, fn) => steps.push({ name, fn });
const ctxA = await browser.newContext({ viewport: { width: 1100, height: 720 } });
const ctxB = await browser.newContext({ viewport: { width: 1100, height: 720 } });

step('sign_in', async () => {
  const a = await newPage(ctxA, 'a');
  const b = await newPage(ctxB, 'b');
  await a.locator('#login-name').waitFor();
  await snap('login');
  await signIn(a, ALICE);
  await signIn(b, BOB);
  await snap('signed-in');
});

step('a_sends_b_sees_it', async () => {
  const { a, b } = pages;
  await openChat(a, BOB);
  await a.locator('#chat-sub', { hasText: 'online' }).waitFor(); // presence of the open chat
  await say(a, 'Hi Bob, how are you?');
  await tick(a, 'Hi Bob', 'delivered'); // B's page acked it while not reading: two grey ticks
  const conv = b.locator(`#conv-list [data-conv="u:${ALICE}"]`);
  await conv.locator('.badge', { hasText: '1' }).waitFor(); // unread, not read yet
  await snap('a-sent-b-unread');
  if (await a.locator('#messages .msg.mine[data-status="read"]').count()) throw new Error('read before B opened it');
});

step('b_reads_a_sees_blue', async () => {
  const { a, b } = pages;
  await b.locator(`#conv-list [data-conv="u:${ALICE}"]`).click();
  await msg(b, 'Hi Bob').waitFor();
  await tick(a, 'Hi Bob', 'read');
  await expectCount(b.locator(`#conv-list [data-conv="u:${ALICE}"] .badge`), 0, 'unread badge after reading');
  await b.locator('#chat-sub', { hasText: 'online' }).waitFor();
  await snap('b-read-a-blue');
});

step('typing', async () => {
  const { a, b } = pages;
  await b.locator('#composer-input').pressSequentially('Hello Al', { delay: 30 });
  await a.locator('#chat-sub', { hasText: 'typing…' }).waitFor();
  await snap('b-typing');
  await b.locator('#composer-input').press('Enter');
  await msg(a, 'Hello Al').waitFor();
  await tick(b, 'Hello Al', 'read'); // A has the chat open
  await a.locator('#chat-sub', { hasText: 'online' }).waitFor(); // typing cleared by the message
});

step('b_offline_a_sends_b_returns', async () => {
  const { a, b } = pages;
  await b.close(); // B leaves: its socket closes with the page
  delete pages.b;
  await a.locator('#chat-sub', { hasText: 'last seen' }).waitFor();
  await say(a, 'Are you there?');
  await tick(a, 'Are you there?', 'sent'); // one tick: stored, not delivered
  await say(a, 'Second while away');
  await tick(a, 'Second while away', 'sent');
  await snap('b-offline-a-one-tick');
  // B comes back: same browser profile, so same device and local history; signed in again
  // automatically, resumes with since = highest seq held.
  const b2 = await newPage(ctxB, 'b');
  await online(b2);
  await msg(b2, 'Hi Bob').waitFor(); // local history kept
  await msg(b2, 'Second while away').waitFor();
  await tick(a, 'Second while away', 'read'); // the chat was open on B: read at once
  for (const text of ['Hi Bob', 'Hello Al', 'Are you there?', 'Second while away']) {
    await expectCount(msg(b2, text), 1, `B shows "${text}" once`);
  }
  await a.locator('#chat-sub', { hasText: 'online' }).waitFor();
  await snap('b-back-a-blue');
});

step('error_frame_shown', async () => {
  const { a } = pages;
  await a.evaluate(() => window.chat.sendRaw('{"t":"send","id":"x1","to":"nobody"}'));
  await a.locator('.toast-error', { hasText: 'missing_field' }).waitFor();
  await a.evaluate(() => window.chat.sendRaw('{oops'));
  await a.locator('.toast-error', { hasText: 'bad_json' }).waitFor();
  await snap('error-frames');
  while (await a.locator('.toast .close').count()) await a.locator('.toast .close').first().click();
});

step('reconnect_flushes_queue', async () => {
  const { a, b } = pages;
  // The network goes away under a live socket: the client notices, fails to reconnect (no
  // token, no socket) with growing jittered delays, queues what is sent meanwhile, and flushes
  // it once back.
  offline = true;
  await ctxA.setOffline(true);
  await a.evaluate(() => window.chat.disconnect());
  await a.locator('#conn[data-state="waiting"]').waitFor();
  await say(a, 'Queued while offline');
  await tick(a, 'Queued while offline', 'pending');
  await a.waitForTimeout(1200); // a retry or two fail
  await a.locator('#conn[data-state="waiting"]').waitFor();
  await snap('a-reconnecting');
  await ctxA.setOffline(false);
  await online(a);
  offline = false;
  await tick(a, 'Queued while offline', 'read');
  await expectCount(msg(b, 'Queued while offline'), 1, 'B shows the queued message once');
  await snap('a-reconnected');
});

step('group', async () => {
  if (!GROUPS) {
    console.log('  (skipped: CHAT_GROUPS=0, no router)');
    return;
  }
  const { a, b } = pages;
  const name = `Climbing ${RUN}`;
  await a.getByRole('button', { name: 'New group…' }).click();
  await a.locator('#group-name').fill(name);
  await a.locator('#group-members').fill(BOB);
  await snap('group-dialog');
  await a.locator('#group-submit').click();
  await a.locator('#chat-title', { hasText: name }).waitFor();
  await a.locator('#messages .event', { hasText: 'created the group' }).waitFor();
  await b.locator('#conv-list .conv', { hasText: name }).waitFor();
  await say(a, 'Who is in for Saturday?');
  await tick(a, 'Who is in for Saturday?', 'delivered');
  await snap('group-a-sent');
  await b.locator('#conv-list .conv', { hasText: name }).click();
  await msg(b, 'Who is in for Saturday?').waitFor();
  await b.locator('#messages .msg .from', { hasText: ALICE }).waitFor();
  await tick(a, 'Who is in for Saturday?', 'read');
  await say(b, 'Me!');
  await msg(a, 'Me!').waitFor();
  await tick(b, 'Me!', 'read');
  await snap('group-read');
  // The admin adds a member; both timelines show it.
  const carol = `carol_${RUN}`;
  await a.getByRole('button', { name: 'Add members…' }).click();
  await a.locator('#group-members').fill(carol);
  await a.locator('#group-submit').click();
  await a.locator('#messages .event', { hasText: `you added ${carol}` }).waitFor();
  await a.locator('#chat-sub', { hasText: carol }).waitFor();
  await b.locator('#messages .event', { hasText: `${ALICE} added ${carol}` }).waitFor();
  if (await b.getByRole('button', { name: 'Add members…' }).isVisible()) throw new Error('B is no admin');
  await snap('group-member-added');
});

let passed = 0;
let failed = 0;
console.log(`browser (${CHROMIUM}) against ${HTTP} (run ${RUN}, groups: ${GROUPS}), screenshots in ${ARTIFACTS}`);
for (const { name, fn } of steps) {
  const t0 = Date.now();
  try {
    await fn();
    if (pageErrors.length) throw new Error(`errors in the page:\n    ${pageErrors.join('\n    ')}`);
    passed++;
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e.message}`);
    try { await snap(`FAILED-${name}`); } catch { /* the page may be gone */ }
    break;
  }
}
await browser.close();
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed === steps.length ? 0 : 1);
