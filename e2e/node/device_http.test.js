// The device HTTPS API with azure-iot-device 1.18.4 + azure-iot-device-http 1.14.4 (the `Http`
// transport), unchanged, against the emulator's port 443; azure-iothub 1.16.6 sends the
// cloud-to-device messages over AMQP.
//
// - Telemetry: sendEvent with system and application properties, sendEventBatch; read back
//   through GET /_emulator/telemetry.
// - C2D: on('message') polls GET …/devicebound (every second, the SDK's default); complete,
//   reject and abandon settle with the lock token from ETag; abandoned messages come back.
// - SAS renewal: a client built from an expired token is refused (UnauthorizedError) and
//   sends once updateSharedAccessSignature gives it a fresh one.
// - X.509: a selfSigned device (certificate made with the openssl CLI) sends and receives with
//   its certificate in the TLS handshake; another key with the same CN is refused.
// Retries are off (NoRetry).
'use strict';

const crypto = require('node:crypto');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { Registry, Client: ServiceClient } = require('azure-iothub');
const { Message: ServiceMessage } = require('azure-iot-common');
const { Client, Message } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { NoRetry, SharedAccessSignature, errors } = require('azure-iot-common');
const hub = require('./lib/hub');
const control = require('./lib/control');

const STEP_MS = 15_000;
const registry = Registry.fromConnectionString(hub.serviceConnectionString());
const service = ServiceClient.fromConnectionString(hub.serviceConnectionString());
service.setRetryPolicy(new NoRetry());
const created = [];

after(async () => {
  await service.close().catch(() => {});
  for (const deviceId of created) {
    await registry.delete(deviceId).catch(() => {});
  }
});

async function newHttpDevice(t, prefix) {
  const deviceId = hub.uniqueId(prefix);
  const { responseBody: device } = await registry.create({ deviceId, status: 'enabled' });
  created.push(deviceId);
  // The HTTP transport connects to HostName itself (it ignores GatewayHostName).
  const connectionString =
    `HostName=${process.env.IOTHUB_E2E_ADDRESS};DeviceId=${deviceId};SharedAccessKey=${device.authentication.symmetricKey.primaryKey}`;
  const client = Client.fromConnectionString(connectionString, Http);
  client.setRetryPolicy(new NoRetry());
  t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));
  await hub.withTimeout(client.open(), STEP_MS, 'open');
  return { deviceId, client };
}

/** Messages the device's on('message') handler got, in order. */
class Inbox {
  constructor(client) {
    this.items = [];
    this.waiters = [];
    client.on('message', (msg) => {
      this.items.push(msg);
      this.waiters.splice(0).forEach((w) => w());
    });
  }

  async next(ms, what) {
    const deadline = Date.now() + ms;
    while (this.items.length === 0) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => { this.waiters.push(r); setTimeout(r, 200); });
    }
    return this.items.shift();
  }
}

test('http telemetry: sendEvent with properties and sendEventBatch', { timeout: 60_000 }, async (t) => {
  const { deviceId, client } = await newHttpDevice(t, 'nodehttp');
  const message = new Message(JSON.stringify({ temp: 21 }));
  message.messageId = 'http-1';
  message.correlationId = 'corr-1';
  message.contentType = 'application/json';
  message.contentEncoding = 'utf-8';
  message.properties.add('alert', 'high temp');
  await hub.withTimeout(client.sendEvent(message), STEP_MS, 'sendEvent');

  const batch = ['one', 'two', 'three'].map((body, i) => {
    const m = new Message(body);
    m.properties.add('n', String(i));
    return m;
  });
  await hub.withTimeout(client.sendEventBatch(batch), STEP_MS, 'sendEventBatch');

  const seen = await control.waitForTelemetry({ deviceId }, 4);
  assert.equal(seen.length, 4);
  assert.equal(seen[0].body, '{"temp":21}');
  assert.equal(seen[0].systemProperties['message-id'], 'http-1');
  assert.equal(seen[0].systemProperties['correlation-id'], 'corr-1');
  assert.equal(seen[0].systemProperties['content-type'], 'application/json');
  assert.equal(seen[0].systemProperties['content-encoding'], 'utf-8');
  assert.equal(seen[0].properties.alert, 'high temp');
  assert.deepEqual(seen.slice(1).map((m) => m.body), ['one', 'two', 'three']);
  assert.deepEqual(seen.slice(1).map((m) => m.properties.n), ['0', '1', '2']);
});

test('http C2D: receive, complete, reject and abandon with the lock token', { timeout: 90_000 }, async (t) => {
  const { deviceId, client } = await newHttpDevice(t, 'nodehttpc2d');
  const inbox = new Inbox(client);

  const first = new ServiceMessage('first ✓');
  first.messageId = hub.uniqueId('m');
  first.correlationId = 'corr-2';
  first.properties.add('k', 'v w');
  await hub.withTimeout(service.send(deviceId, first), STEP_MS, 'service send');
  const got = await inbox.next(15_000, 'first message');
  assert.equal(got.data.toString('utf8'), 'first ✓');
  assert.equal(got.messageId, first.messageId);
  assert.equal(got.correlationId, 'corr-2');
  assert.equal(got.to, `/devices/${deviceId}/messages/devicebound`);
  assert.ok(got.lockToken, 'a lock token from ETag');
  // The Node HTTP transport keeps the header prefix of application properties.
  assert.equal(got.properties.getValue('iothub-app-k'), 'v w');
  await hub.withTimeout(client.complete(got), STEP_MS, 'complete');

  const second = new ServiceMessage('second');
  second.messageId = hub.uniqueId('m');
  await hub.withTimeout(service.send(deviceId, second), STEP_MS, 'service send');
  const abandoned = await inbox.next(15_000, 'second message');
  assert.equal(abandoned.messageId, second.messageId);
  await hub.withTimeout(client.abandon(abandoned), STEP_MS, 'abandon');
  const again = await inbox.next(15_000, 'second message, redelivered');
  assert.equal(again.messageId, second.messageId);
  assert.notEqual(again.lockToken, abandoned.lockToken);
  await hub.withTimeout(client.reject(again), STEP_MS, 'reject');

  // Settling with a lock token that is no longer locked fails.
  await assert.rejects(hub.withTimeout(client.complete(again), STEP_MS, 'complete after reject'));
  const { responseBody: device } = await registry.get(deviceId);
  assert.equal(device.cloudToDeviceMessageCount, 0);
});

function deviceToken(deviceId, key, expiry) {
  const resource = encodeURIComponent(`${process.env.IOTHUB_E2E_ADDRESS}/devices/${deviceId}`);
  return SharedAccessSignature.create(resource, null, key, expiry).toString();
}

test('http SAS renewal: an expired token is refused, updateSharedAccessSignature recovers', { timeout: 60_000 }, async (t) => {
  const deviceId = hub.uniqueId('nodehttpsas');
  const { responseBody: device } = await registry.create({ deviceId, status: 'enabled' });
  created.push(deviceId);
  const key = device.authentication.symmetricKey.primaryKey;
  const expired = deviceToken(deviceId, key, Math.floor(Date.now() / 1000) - 60);
  const client = Client.fromSharedAccessSignature(expired, Http);
  client.setRetryPolicy(new NoRetry());
  t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));

  await assert.rejects(
    hub.withTimeout(client.sendEvent(new Message('too late')), STEP_MS, 'sendEvent, expired'),
    (err) => err instanceof errors.UnauthorizedError,
  );
  const fresh = deviceToken(deviceId, key, Math.floor(Date.now() / 1000) + 3600);
  await hub.withTimeout(client.updateSharedAccessSignature(fresh), STEP_MS, 'updateSharedAccessSignature');
  await hub.withTimeout(client.sendEvent(new Message('renewed')), STEP_MS, 'sendEvent, renewed');
  const seen = await control.waitForTelemetry({ deviceId }, 1);
  assert.deepEqual(seen.map((m) => m.body), ['renewed']);
});

/** A self-signed EC certificate for `cn` from the openssl CLI: { cert, key, thumbprint }. */
function selfSigned(cn) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'x509-'));
  try {
    const keyFile = path.join(dir, 'key.pem');
    const certFile = path.join(dir, 'cert.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
      '-nodes', '-subj', `/CN=${cn}`, '-days', '1', '-keyout', keyFile, '-out', certFile], { stdio: 'ignore' });
    const cert = fs.readFileSync(certFile, 'utf8');
    const thumbprint = new crypto.X509Certificate(cert).fingerprint.replace(/:/g, '');
    return { cert, key: fs.readFileSync(keyFile, 'utf8'), thumbprint };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('http X.509: a selfSigned device sends and receives with its certificate', { timeout: 90_000 }, async (t) => {
  const deviceId = hub.uniqueId('nodehttpx509');
  const own = selfSigned(deviceId);
  await registry.create({
    deviceId,
    status: 'enabled',
    authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: own.thumbprint } },
  });
  created.push(deviceId);
  const connect = () => {
    const client = Client.fromConnectionString(
      `HostName=${process.env.IOTHUB_E2E_ADDRESS};DeviceId=${deviceId};x509=true`, Http);
    client.setRetryPolicy(new NoRetry());
    t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));
    return client;
  };

  // The Http transport's setOptions never calls back for x509 options alone (the SDK's own
  // tests do not wait for it either), so it is not awaited.
  const client = connect();
  client.setOptions({ cert: own.cert, key: own.key });
  const inbox = new Inbox(client);
  await hub.withTimeout(client.open(), STEP_MS, 'open');
  await hub.withTimeout(client.sendEvent(new Message('from x509')), STEP_MS, 'sendEvent');
  const seen = await control.waitForTelemetry({ deviceId }, 1);
  assert.equal(seen[0].body, 'from x509');
  assert.equal(seen[0].systemProperties['iothub-connection-auth-method'], 'X509');

  const c2d = new ServiceMessage('to x509');
  c2d.messageId = hub.uniqueId('m');
  await hub.withTimeout(service.send(deviceId, c2d), STEP_MS, 'service send');
  const got = await inbox.next(15_000, 'the C2D message');
  assert.equal(got.messageId, c2d.messageId);
  await hub.withTimeout(client.complete(got), STEP_MS, 'complete');

  const other = selfSigned(deviceId);
  const impostor = connect();
  impostor.setOptions({ cert: other.cert, key: other.key });
  await assert.rejects(
    hub.withTimeout(impostor.sendEvent(new Message('impostor')), STEP_MS, 'sendEvent, wrong key'),
    (err) => err instanceof errors.UnauthorizedError,
  );
  const log = await control.readTelemetry({ deviceId, wait: 0 });
  assert.equal(log.messages.length, 1, 'the impostor stored nothing');
});
