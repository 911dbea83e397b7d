// The device HTTPS API with azure-iot-device 1.18.4 + azure-iot-device-http 1.14.4 (the `Http`
// transport), unchanged, against the emulator's port 443; azure-iothub 1.16.6 sends the
// cloud-to-device messages over AMQP.
//
// - Telemetry: sendEvent with system and application properties, sendEventBatch; read back
//   through GET /_emulator/telemetry.
// - C2D: on('message') polls GET …/devicebound (every second, the SDK's default); complete,
//   reject and abandon settle with the lock token from ETag; abandoned messages come back.
// Retries are off (NoRetry).
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { Registry, Client: ServiceClient } = require('azure-iothub');
const { Message: ServiceMessage } = require('azure-iot-common');
const { Client, Message } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { NoRetry } = require('azure-iot-common');
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
