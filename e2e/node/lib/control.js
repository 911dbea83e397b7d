// The emulator's control API (`/_emulator/...`) for the Node suites: read the telemetry log,
// inject cloud-to-device messages. Plain `https` (it honours NODE_EXTRA_CA_CERTS, which
// Node 20's global fetch does not), with an owner SAS token built the way azure-iothub builds
// one (sr = encodeURIComponent(host), HMAC over `${sr}\n${expiry}`).
'use strict';

const crypto = require('node:crypto');
const https = require('node:https');
const { OWNER_KEY } = require('./hub');

function address() {
  const value = process.env.IOTHUB_E2E_ADDRESS;
  if (!value) throw new Error('IOTHUB_E2E_ADDRESS is not set: run the suite with `node run.mjs`');
  return value;
}

function ownerToken(policy = 'iothubowner', key = OWNER_KEY, ttlSeconds = 3600) {
  const sr = encodeURIComponent(address());
  const se = Math.floor(Date.now() / 1000) + ttlSeconds;
  const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(`${sr}\n${se}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}&skn=${policy}`;
}

/** One HTTPS request to the emulator; resolves { status, body (parsed JSON or text) }. */
function request(method, path, { json, auth = true, timeoutMs = 15_000 } = {}) {
  return new Promise((resolve, reject) => {
    const headers = {};
    if (auth) headers.Authorization = ownerToken();
    const payload = json === undefined ? undefined : Buffer.from(JSON.stringify(json));
    if (payload) {
      headers['Content-Type'] = 'application/json; charset=utf-8';
      headers['Content-Length'] = payload.length;
    }
    const req = https.request({ host: address(), port: 443, method, path, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let body = text;
        if ((res.headers['content-type'] || '').includes('application/json') && text) {
          try { body = JSON.parse(text); } catch { /* keep the text */ }
        }
        resolve({ status: res.statusCode, body });
      });
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`timed out after ${timeoutMs} ms: ${method} ${path}`)));
    req.on('error', reject);
    if (payload) req.write(payload);
    req.end();
  });
}

/** GET /_emulator/telemetry for one identity; `wait` long-polls for a first message. */
async function readTelemetry({ deviceId, moduleId, after = 0, limit, wait = 5 }) {
  const q = new URLSearchParams({ deviceId, after: String(after), wait: String(wait) });
  if (moduleId) q.set('moduleId', moduleId);
  if (limit) q.set('limit', String(limit));
  const res = await request('GET', `/_emulator/telemetry?${q}`, { timeoutMs: (wait + 10) * 1000 });
  if (res.status !== 200) throw new Error(`telemetry read: ${res.status} ${JSON.stringify(res.body)}`);
  return res.body;
}

/** Long-polls until `count` messages of the identity are in the log (or `timeoutMs` passes). */
async function waitForTelemetry(filter, count, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  let after = 0;
  const found = [];
  while (found.length < count && Date.now() < deadline) {
    const page = await readTelemetry({ ...filter, after, wait: 2 });
    found.push(...page.messages);
    after = page.next;
  }
  return found;
}

/** POST /_emulator/devices/{id}/messages. */
function sendC2d(deviceId, message) {
  return request('POST', `/_emulator/devices/${encodeURIComponent(deviceId)}/messages`, { json: message });
}

module.exports = { ownerToken, request, readTelemetry, waitForTelemetry, sendC2d };
