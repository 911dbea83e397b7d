// The web portal in a real browser: Playwright (playwright-core) driving Debian's chromium,
// headless, against a freshly started emulator. The seed article's portal flow
// (shared/seeds/001): create device01, add module identity myFirstModule, copy its primary
// connection string, run the module application with exactly that string (Python
// IoTHubModuleClient, module_client.py), watch it turn Connected, edit a desired property in
// the page and see the module receive it, see its reported property appear in the page. Then
// the live view (direct method + telemetry), the devices list (X.509 device, disable, search,
// delete, a refused id), and a screenshot of each main page into screenshots/.
//
//   cargo build && cd e2e/browser && npm ci && node --test portal.test.mjs
//
// Needs /usr/bin/chromium (apt-get install chromium), e2e/python/.venv with azure-iot-device
// (scripts/test.sh creates both), and the right to bind port 443 on 127.0.0.X.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { repoRoot, sleep, startEmulator, stopProcess, tail, verifiedServerSpki } from './lib/emulator.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--headless',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];
const PYTHON = process.env.E2E_PYTHON || path.join(repoRoot, 'e2e', 'python', '.venv', 'bin', 'python');
const SCREENSHOTS = path.join(here, 'screenshots');
const STEP_MS = 20_000;

let emulator;
let userDataDir;
let context;
let page;
let base;
let moduleUrl;
let connectionString;
let helper;
const helperEvents = [];
let helperStderr = '';

// ----- the Python module application -----

function startHelper(conn) {
  if (!fs.existsSync(PYTHON)) throw new Error(`${PYTHON} is missing: run scripts/test.sh once (it creates e2e/python/.venv)`);
  const child = spawn(PYTHON, [path.join(here, 'module_client.py'), conn, emulator.address, emulator.caPath], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    try {
      helperEvents.push(JSON.parse(line));
    } catch {
      helperStderr += `stdout: ${line}\n`;
    }
  });
  child.stderr.on('data', (d) => { helperStderr += d; });
  return child;
}

/** The first helper event (after index `from`) matching `pred`; fails after STEP_MS. */
async function helperEvent(pred, what, from = 0) {
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    const found = helperEvents.slice(from).find(pred);
    if (found) return found;
    if (helper.exitCode !== null) throw new Error(`module_client.py exited (${helper.exitCode}) before ${what}:\n${helperStderr}`);
    if (Date.now() > deadline) throw new Error(`module_client.py: no ${what} within ${STEP_MS} ms; events ${JSON.stringify(helperEvents)}\n${helperStderr}`);
    await sleep(50);
  }
}

async function stopHelper() {
  if (!helper || helper.exitCode !== null) return;
  helper.stdin.end();
  const exited = new Promise((r) => helper.once('exit', r));
  if (!(await Promise.race([exited.then(() => true), sleep(10_000).then(() => false)]))) {
    await stopProcess(helper, 5_000);
  }
}

// ----- browser helpers -----

/** Polls `fn` until it returns truthy. */
async function eventually(fn, what, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

const twinView = () => page.locator('[data-twin-view]');
const twinEditor = (p = page) => p.getByLabel('Tags and desired properties (JSON)');

async function shot(name, options = {}) {
  fs.mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOTS, name), animations: 'disabled', ...options });
}

before(async () => {
  emulator = await startEmulator();
  base = `https://${emulator.address}`;
  // Trust exactly the server key that chains to the emulator's CA (checked by Node with the CA).
  const spki = await verifiedServerSpki(emulator.address, emulator.caPath);
  userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'iothub-portal-chromium-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [...CHROMIUM_ARGS, `--ignore-certificate-errors-spki-list=${spki}`],
    viewport: { width: 1280, height: 900 },
    deviceScaleFactor: 1,
    permissions: ['clipboard-read', 'clipboard-write'],
    reducedMotion: 'reduce',
  });
  page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(STEP_MS);
  // Confirmation dialogs (delete, regenerate) are accepted.
  context.on('page', (p) => p.on('dialog', (d) => d.accept()));
  page.on('dialog', (d) => d.accept());
  page.on('pageerror', (e) => console.log(`# page error: ${e.message}`));
});

after(async () => {
  await stopHelper();
  if (context) await context.close().catch(() => {});
  if (userDataDir) fs.rmSync(userDataDir, { recursive: true, force: true });
  if (emulator) {
    if (process.exitCode) console.log(`# emulator log tail (${emulator.logPath}):\n${tail(emulator.logPath)}`);
    await emulator.stop();
  }
});

// ----- the seed flow -----

test('the portal opens without sign-in on loopback and lists no devices', async () => {
  const response = await page.goto(`${base}/`);
  assert.equal(response.status(), 200);
  await page.getByRole('heading', { name: 'Devices', level: 1 }).waitFor();
  await page.getByText('No devices yet').waitFor();
  // Keyboard: the first Tab reaches the skip link, which moves focus to the content.
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Skip to content');
});

test('create device01 in the page (generated keys)', async () => {
  await page.getByRole('link', { name: 'Add device' }).click();
  await page.getByLabel('Device ID').fill('device01');
  await page.getByRole('button', { name: 'Save' }).click();
  await page.waitForURL(/\/\?created=device01$/);
  await page.getByRole('link', { name: 'device01', exact: true }).waitFor();
  await page.getByText('Device device01 created.').waitFor();
});

test('add module identity myFirstModule and open its details', async () => {
  await page.getByRole('link', { name: 'device01', exact: true }).click();
  await page.getByRole('heading', { level: 1, name: /device01/ }).waitFor();
  await page.getByRole('link', { name: 'Add module identity' }).click();
  await page.getByLabel('Module identity name').fill('myFirstModule');
  await page.getByRole('button', { name: 'Save' }).click();
  await page.waitForURL(/\/portal\/devices\/device01\?created=myFirstModule$/);
  await page.getByRole('link', { name: 'myFirstModule', exact: true }).click();
  await page.waitForURL(/\/portal\/devices\/device01\/modules\/myFirstModule$/);
  moduleUrl = page.url();
  await page.getByRole('heading', { level: 1, name: /myFirstModule/ }).waitFor();
  assert.equal(await page.locator('[data-field="module.connectionState"]').textContent(), 'Disconnected');
});

test('copy the primary connection string from the page', async () => {
  await page.getByRole('button', { name: 'Copy Primary connection string' }).click();
  await page.getByText('Primary connection string copied to the clipboard.').waitFor();
  connectionString = await page.evaluate(() => navigator.clipboard.readText());
  assert.match(
    connectionString,
    /^HostName=localhost;DeviceId=device01;ModuleId=myFirstModule;SharedAccessKey=[A-Za-z0-9+/]+=*$/,
  );
  assert.equal(connectionString, await page.locator('#primary-connection-string').inputValue());
});

test('a Python IoTHubModuleClient connects with exactly that string; the page shows Connected', async () => {
  helper = startHelper(connectionString);
  await helperEvent((e) => e.event === 'launched', 'connect + first reported patch');
  await page.locator('[data-field="module.connectionState"]', { hasText: /^Connected$/ }).waitFor();
  await twinView().filter({ hasText: 'DateTimeLastAppLaunch' }).waitFor();
  const last = await page.locator('[data-field="module.lastActivityTime"]').textContent();
  assert.notEqual(last, 'Never');
});

test('edit a desired property in the page; the module handler receives it', async () => {
  const editor = twinEditor();
  // The editor follows the twin while it is not being edited: it already holds the etag of the
  // version with DateTimeLastAppLaunch.
  await eventually(
    async () => (await editor.getAttribute('data-etag')) === JSON.parse(await twinView().textContent()).etag,
    'the editor to hold the current etag',
  );
  const doc = JSON.parse(await editor.inputValue());
  assert.deepEqual(doc, { tags: {}, properties: { desired: {} } });
  doc.properties.desired.telemetryInterval = 122;
  doc.tags.site = 'portal-test';
  await editor.fill(JSON.stringify(doc, null, 2));
  const from = helperEvents.length;
  await page.getByRole('button', { name: 'Save', exact: true }).click();
  await page.getByText(/Twin saved \(desired version 2\)/).waitFor();
  const received = await helperEvent((e) => e.event === 'desired', 'the desired patch', from);
  assert.deepEqual(received.patch, { telemetryInterval: 122, $version: 2 });
});

test("the module's reported property appears in the page", async () => {
  await helperEvent((e) => e.event === 'reported', 'the reported answer');
  await twinView().filter({ hasText: 'DateTimeLastDesiredPropertyChangeReceived' }).waitFor();
  const twin = JSON.parse(await twinView().textContent());
  assert.equal(twin.properties.desired.telemetryInterval, 122);
  assert.equal(twin.tags.site, 'portal-test');
  assert.ok(twin.properties.reported.DateTimeLastDesiredPropertyChangeReceived);
  // Reported properties are not in the editor: they are read-only.
  assert.ok(!(await twinEditor().inputValue()).includes('DateTimeLast'));
});

test('a save over a twin that changed since it was loaded is refused (etag)', async () => {
  const editor = twinEditor();
  const stale = JSON.parse(await editor.inputValue());
  stale.properties.desired.stale = true;
  await editor.fill(JSON.stringify(stale, null, 2));

  // Meanwhile another tab saves a change.
  const other = await context.newPage();
  await other.goto(moduleUrl);
  const doc = JSON.parse(await twinEditor(other).inputValue());
  doc.properties.desired.fromOtherTab = 1;
  await twinEditor(other).fill(JSON.stringify(doc, null, 2));
  await other.getByRole('button', { name: 'Save', exact: true }).click();
  await other.getByText(/Twin saved/).waitFor();
  await other.close();

  await page.getByRole('button', { name: 'Save', exact: true }).click();
  await page.getByText(/PreconditionFailed, HTTP 412/).waitFor();
  await page.getByRole('button', { name: 'Discard changes' }).click();
  // Discarding loads the twin as it is now on the hub.
  const now = await eventually(async () => {
    const doc = JSON.parse(await editor.inputValue());
    return doc.properties.desired.fromOtherTab === 1 && doc;
  }, 'the editor to show the other tab\'s change');
  assert.equal(now.properties.desired.stale, undefined);
  await helperEvent((e) => e.event === 'desired' && e.patch.fromOtherTab === 1, 'the other tab\'s patch');
  assert.ok(!helperEvents.some((e) => e.event === 'desired' && 'stale' in e.patch));
});

test('live view: invoke a direct method and see the telemetry it causes', async () => {
  await page.getByRole('link', { name: 'Telemetry & methods' }).click();
  await page.waitForURL(/\/modules\/myFirstModule\/live$/);
  await page.getByText(/No messages yet|Listening/).waitFor();
  await page.getByLabel('Method name').fill('ping');
  await page.getByLabel('Payload (JSON)').fill('{"hello": "portal"}');
  await page.getByRole('button', { name: 'Invoke method' }).click();
  await page.getByText('ping answered with status 200').waitFor();
  const answer = JSON.parse(await page.locator('[data-method-result] pre').textContent());
  assert.deepEqual(answer, { echo: { hello: 'portal' } });
  const message = page.locator('.messages li', { hasText: '"method": "ping"' });
  await message.waitFor();
  assert.match(await message.textContent(), /device01\/myFirstModule/);
  assert.match(await message.textContent(), /portal-test/);
  // No routes configured: the fallback route took it to the built-in endpoint.
  assert.match(await message.textContent(), /Routes fallback route/);
  assert.match(await message.textContent(), /To events/);
  await shot('live.png');
});

test('devices list: X.509 device, a refused id, disable, search, delete', async () => {
  await page.goto(`${base}/portal/add-device`);
  // An id the registry refuses gets the REST API's 400.
  await page.getByLabel('Device ID').fill('bad id');
  await page.getByRole('button', { name: 'Save' }).click();
  await page.getByText(/is invalid.*ArgumentInvalid, HTTP 400/).waitFor();
  await page.getByLabel('Device ID').fill('device02');
  await page.getByLabel('X.509 self-signed').check();
  await page.getByLabel('Primary thumbprint').fill('a'.repeat(40));
  await page.getByRole('button', { name: 'Save' }).click();
  await page.waitForURL(/\?created=device02$/);
  const row = page.locator('tr[data-id="device02"]');
  assert.match(await row.textContent(), /X\.509 self-signed/);

  await page.getByRole('button', { name: 'Disable device02' }).click();
  await row.locator('.badge', { hasText: /^Disabled$/ }).waitFor();
  await page.getByText('device02 is now disabled.').waitFor();

  await page.getByLabel('Search by device ID').fill('02');
  await page.locator('tr[data-id="device01"]').waitFor({ state: 'hidden' });
  await page.getByLabel('Search by device ID').fill('');
  await page.locator('tr[data-id="device01"]').waitFor();

  await page.getByRole('button', { name: 'Delete device02' }).click();
  await row.waitFor({ state: 'detached' });
});

test('screenshots of the main pages', async () => {
  await page.goto(`${base}/`);
  // device01 itself is not connected (its module is); the row shows the device's own state.
  await page.locator('tr[data-id="device01"]').waitFor();
  await shot('devices.png');
  await page.goto(`${base}/portal/devices/device01`);
  await page.getByRole('link', { name: 'myFirstModule', exact: true }).waitFor();
  await shot('device.png');
  await page.goto(moduleUrl);
  await twinView().filter({ hasText: 'DateTimeLastDesiredPropertyChangeReceived' }).waitFor();
  await shot('module.png', { fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${base}/`);
  await page.locator('tr[data-id="device01"]').waitFor();
  await shot('devices-phone.png');
  await page.setViewportSize({ width: 1280, height: 900 });
});
