// Direct methods, telemetry and cloud-to-device messages with azure-iot-device 1.18.4 +
// azure-iot-device-mqtt 1.16.4 on the device side and azure-iothub 1.16.6 on the service side,
// unchanged, over MQTT/TLS (8883) and HTTPS (443).
//
// - Methods: Client.onDeviceMethod / ModuleClient.onMethod answered with response.send, invoked
//   with azure-iothub Client.invokeDeviceMethod (device and module forms). Offline → 404,
//   unanswered → 504 (shared/protocol.md C.7).
// - Telemetry: sendEvent / sendOutputEvent with properties, read back via GET /_emulator/telemetry.
// - C2D: injected with POST /_emulator/devices/{id}/messages (azure-iothub's Client.send uses
//   AMQP, which the emulator does not speak), received with on('message') + complete; the
//   registry's cloudToDeviceMessageCount drops back to 0.
// Retries are off (NoRetry) on every client.
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { Registry, Client: ServiceClient } = require('azure-iothub');
const { Client, ModuleClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { NoRetry } = require('azure-iot-common');
const hub = require('./lib/hub');
const control = require('./lib/control');

const STEP_MS = 15_000;
const registry = Registry.fromConnectionString(hub.serviceConnectionString());
const service = ServiceClient.fromConnectionString(hub.serviceConnectionString());
service.setRetryPolicy(new NoRetry());
const created = [];

after(async () => {
  for (const deviceId of created) {
    await registry.delete(deviceId).catch(() => {});
  }
});

const { TRICKY } = hub;

async function newDevice(prefix) {
  const deviceId = hub.uniqueId(prefix);
  const { responseBody: device } = await registry.create({ deviceId, status: 'enabled' });
  created.push(deviceId);
  return device;
}

async function openDevice(t, device) {
  const client = Client.fromConnectionString(
    hub.deviceConnectionString(device.deviceId, device.authentication.symmetricKey.primaryKey), Mqtt);
  client.setRetryPolicy(new NoRetry());
  t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));
  await hub.withTimeout(client.open(), STEP_MS, 'open');
  return client;
}

async function openModule(t, deviceId) {
  const moduleId = hub.uniqueId('mod');
  await registry.addModule({ deviceId, moduleId });
  const { responseBody: module } = await registry.getModule(deviceId, moduleId);
  const client = ModuleClient.fromConnectionString(
    hub.deviceConnectionString(deviceId, module.authentication.symmetricKey.primaryKey, moduleId), Mqtt);
  client.setRetryPolicy(new NoRetry());
  t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));
  await hub.withTimeout(client.open(), STEP_MS, 'open');
  return { client, moduleId };
}

/** Barrier: onDeviceMethod/on('message') subscribe without a callback. A QoS 1 publish sent
 *  after the SUBSCRIBE on the same connection is acknowledged only after the hub has handled
 *  that SUBSCRIBE. */
function barrier(client) {
  return hub.withTimeout(client.sendEvent(new Message('barrier')), STEP_MS, 'barrier sendEvent');
}

function statusOf(err) {
  return err && err.response && err.response.statusCode;
}

test('device method: onDeviceMethod answers invokeDeviceMethod', { timeout: 60_000 }, async (t) => {
  const device = await newDevice('nodemeth');
  const client = await openDevice(t, device);
  const seen = [];
  client.onDeviceMethod('reboot-now', (request, response) => {
    seen.push({ name: request.methodName, payload: request.payload });
    response.send(201, { echo: request.payload, from: 'node device', unicode: 'ü✓' }, (err) => {
      if (err) seen.push({ sendError: err.message });
    });
  });
  await barrier(client);

  const payload = { delay: 5, nested: { list: [1, 2, 'three'], flag: true }, text: 'a&b=c +' };
  const { result } = await hub.withTimeout(
    service.invokeDeviceMethod(device.deviceId, { methodName: 'reboot-now', payload, responseTimeoutInSeconds: 10 }),
    STEP_MS, 'invokeDeviceMethod');
  assert.deepEqual(seen, [{ name: 'reboot-now', payload }]);
  assert.equal(result.status, 201);
  assert.deepEqual(result.payload, { echo: payload, from: 'node device', unicode: 'ü✓' });
});

test('module method: ModuleClient.onMethod answers invokeDeviceMethod(deviceId, moduleId, ...)', { timeout: 60_000 }, async (t) => {
  const device = await newDevice('nodemmeth');
  const { client, moduleId } = await openModule(t, device.deviceId);
  client.onMethod('getConfig', (request, response) => {
    response.send(200, { got: request.payload, module: moduleId }, () => {});
  });
  await barrier(client);

  const { result } = await hub.withTimeout(
    service.invokeDeviceMethod(device.deviceId, moduleId, { methodName: 'getConfig', payload: 'plain string', responseTimeoutInSeconds: 10 }),
    STEP_MS, 'invokeDeviceMethod (module)');
  assert.deepEqual(result, { status: 200, payload: { got: 'plain string', module: moduleId } });
});

test('method on an offline device: 404', { timeout: 30_000 }, async () => {
  const device = await newDevice('nodemoff');
  await assert.rejects(
    hub.withTimeout(service.invokeDeviceMethod(device.deviceId, { methodName: 'reboot', payload: {}, responseTimeoutInSeconds: 5 }),
      STEP_MS, 'invokeDeviceMethod offline'),
    (err) => {
      assert.equal(statusOf(err), 404, `${err.constructor.name}: ${err.message}`);
      return true;
    });
});

test('method the device never answers: 504 GatewayTimeoutError after ~5 s', { timeout: 60_000 }, async (t) => {
  const device = await newDevice('nodemslow');
  const client = await openDevice(t, device);
  let called = 0;
  client.onDeviceMethod('hang', () => { called += 1; }); // never calls response.send
  await barrier(client);

  const started = Date.now();
  await assert.rejects(
    hub.withTimeout(service.invokeDeviceMethod(device.deviceId, { methodName: 'hang', payload: null, responseTimeoutInSeconds: 5 }),
      30_000, 'invokeDeviceMethod unanswered'),
    (err) => {
      assert.equal(statusOf(err), 504, `${err.constructor.name}: ${err.message}`);
      assert.equal(err.constructor.name, 'GatewayTimeoutError');
      return true;
    });
  const elapsed = (Date.now() - started) / 1000;
  assert.ok(elapsed >= 4 && elapsed <= 15, `504 after ${elapsed} s`);
  assert.equal(called, 1);
});

test('sendEvent with system and custom properties is readable via the control API', { timeout: 60_000 }, async (t) => {
  const device = await newDevice('noded2c');
  const client = await openDevice(t, device);
  const body = JSON.stringify({ temperature: 22.5, text: 'héllo' });
  const message = new Message(body);
  message.messageId = hub.uniqueId('mid');
  message.correlationId = 'corr/1 +&=';
  message.contentType = 'application/json';
  message.contentEncoding = 'utf-8';
  for (const [k, v] of TRICKY) message.properties.add(k, v);
  await hub.withTimeout(client.sendEvent(message), STEP_MS, 'sendEvent');

  const [got] = await control.waitForTelemetry({ deviceId: device.deviceId }, 1);
  assert.ok(got, 'no telemetry recorded');
  assert.equal(got.deviceId, device.deviceId);
  assert.equal(got.moduleId, null);
  assert.equal(got.body, body);
  assert.equal(Buffer.from(got.bodyBase64, 'base64').toString('utf8'), body);
  assert.deepEqual(got.properties, Object.fromEntries(TRICKY));
  const sys = got.systemProperties;
  assert.equal(sys['message-id'], message.messageId);
  assert.equal(sys['correlation-id'], 'corr/1 +&=');
  assert.equal(sys['content-type'], 'application/json');
  assert.equal(sys['content-encoding'], 'utf-8');
  assert.equal(sys['iothub-connection-device-id'], device.deviceId);
  assert.equal(sys['iothub-connection-auth-method'], 'SAS');
  assert.match(sys['iothub-enqueuedtime'], hub.ISO_8601);
});

test('module sendOutputEvent carries the output name', { timeout: 60_000 }, async (t) => {
  const device = await newDevice('nodeout');
  const { client, moduleId } = await openModule(t, device.deviceId);
  const message = new Message('{"alert":"high"}');
  message.properties.add('severity', 'high');
  await hub.withTimeout(client.sendOutputEvent('out1', message), STEP_MS, 'sendOutputEvent');

  const [got] = await control.waitForTelemetry({ deviceId: device.deviceId, moduleId }, 1);
  assert.ok(got, 'no telemetry recorded');
  assert.equal(got.moduleId, moduleId);
  assert.equal(got.outputName, 'out1');
  assert.equal(got.systemProperties['iothub-outputname'], 'out1');
  assert.equal(got.systemProperties['iothub-connection-module-id'], moduleId);
  assert.deepEqual(got.properties, { severity: 'high' });
  assert.equal(got.body, '{"alert":"high"}');
});

test("C2D: on('message') receives the injected message; complete empties the queue", { timeout: 60_000 }, async (t) => {
  const device = await newDevice('nodec2d');
  const client = await openDevice(t, device);
  const received = [];
  let wake = () => {};
  client.on('message', (msg) => {
    received.push(msg);
    client.complete(msg, () => {});
    wake();
  });
  client.on('error', () => {});

  const res = await control.sendC2d(device.deviceId, {
    body: 'hello node ✓',
    messageId: 'node-c2d-1',
    correlationId: 'node-corr-1',
    contentType: 'text/plain',
    contentEncoding: 'utf-8',
    ttlSeconds: 600,
    ack: 'full',
    properties: Object.fromEntries(TRICKY),
  });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.deepEqual(res.body, { messageId: 'node-c2d-1' });

  await hub.withTimeout(new Promise((resolve) => {
    wake = resolve;
    if (received.length) resolve();
  }), 10_000, 'C2D delivery');
  const [msg] = received;
  assert.equal(msg.data.toString('utf8'), 'hello node ✓');
  assert.equal(msg.messageId, 'node-c2d-1');
  assert.equal(msg.correlationId, 'node-corr-1');
  assert.equal(msg.contentType, 'text/plain');
  assert.equal(msg.contentEncoding, 'utf-8');
  assert.ok(msg.expiryTimeUtc, 'no $.exp');
  for (const [k, v] of TRICKY) {
    assert.equal(msg.properties.getValue(k), v, `property ${k}`);
  }
  assert.equal(msg.properties.getValue('iothub-ack'), 'full');

  // Completed by the PUBACK: the registry's count goes back to 0.
  const deadline = Date.now() + 10_000;
  let count;
  do {
    ({ cloudToDeviceMessageCount: count } = (await registry.get(device.deviceId)).responseBody);
    if (count === 0) break;
    await new Promise((r) => setTimeout(r, 200));
  } while (Date.now() < deadline);
  assert.equal(count, 0);
});

test('C2D queued before the device subscribes is delivered on subscribe', { timeout: 60_000 }, async (t) => {
  const device = await newDevice('nodec2dq');
  for (const body of ['first', 'second']) {
    const res = await control.sendC2d(device.deviceId, { body });
    assert.equal(res.status, 200, JSON.stringify(res.body));
  }
  assert.equal((await registry.get(device.deviceId)).responseBody.cloudToDeviceMessageCount, 2);
  const client = await openDevice(t, device);
  const bodies = [];
  await hub.withTimeout(new Promise((resolve) => {
    client.on('message', (msg) => {
      bodies.push(msg.data.toString());
      client.complete(msg, () => {});
      if (bodies.length === 2) resolve();
    });
  }), 10_000, `queued C2D delivery; got ${JSON.stringify(bodies)}`);
  assert.deepEqual(bodies, ['first', 'second']);
});

test('C2D errors: unknown device 404, 51st pending message 403', { timeout: 60_000 }, async () => {
  const ghost = await control.sendC2d(hub.uniqueId('ghost'), { body: 'x' });
  assert.equal(ghost.status, 404);
  const device = await newDevice('nodec2dfull');
  for (let i = 0; i < 50; i++) {
    const res = await control.sendC2d(device.deviceId, { body: `m${i}` });
    assert.equal(res.status, 200, `message ${i}: ${JSON.stringify(res.body)}`);
  }
  const full = await control.sendC2d(device.deviceId, { body: 'one too many' });
  assert.equal(full.status, 403);
  assert.match(JSON.stringify(full.body), /DeviceMaximumQueueDepthExceeded|403004/);
});

test('control API: health and ca.pem without auth, telemetry needs a token', async () => {
  const health = await control.request('GET', '/_emulator/health', { auth: false });
  assert.equal(health.status, 200);
  const ca = await control.request('GET', '/_emulator/ca.pem', { auth: false });
  assert.equal(ca.status, 200);
  assert.equal(ca.body, require('node:fs').readFileSync(process.env.IOTHUB_E2E_CA_PATH, 'utf8'));
  const denied = await control.request('GET', '/_emulator/telemetry?wait=0', { auth: false });
  assert.equal(denied.status, 401);
});
