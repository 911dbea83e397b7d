// AMQP 1.0 (issue 9) with the official Node SDKs, unchanged, over TLS:
// azure-iot-device 1.18.4 + azure-iot-device-amqp 1.14.4 (`Amqp` on 5671, `AmqpWs` on
// wss://…:443/$iothub/websocket) on the device side, azure-iothub 1.16.6 on the service side
// (`Client.send` and the feedback receiver over AMQP on 5671; `invokeDeviceMethod` and the
// registry over HTTPS).
//
// - Seed flow (000/002/004 device application, with the .NET default transport's Node twin):
//   ModuleClient/Client.fromConnectionString(cs, Amqp | AmqpWs) → open → getTwin →
//   twin.properties.reported.update → twin.on('properties.desired') receives the patch the
//   backend writes with Registry.updateModuleTwin/updateTwin (etag) → the backend sees the
//   reported values.
// - Direct methods over the AMQP method links, invoked with Client.invokeDeviceMethod.
// - C2D: azure-iothub Client.send (AMQP) → device Client(Amqp | AmqpWs) on('message') →
//   complete / abandon (redelivered) / reject; the registry's cloudToDeviceMessageCount drops
//   to 0; the feedback receiver gets the `Success` record.
// - Telemetry: sendEvent / sendOutputEvent over Amqp, read back via GET /_emulator/telemetry.
// - Negative: a wrong key fails open() with UnauthorizedError; Client.send to an unknown device
//   → DeviceNotFoundError; the 51st pending message → DeviceMaximumQueueDepthExceededError.
// Retries are off (NoRetry) on every client. SDK facts behind these: docs/amqp-sdk-notes.md.
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { Registry, Client: ServiceClient } = require('azure-iothub');
const { Client, ModuleClient, Message } = require('azure-iot-device');
const { Amqp, AmqpWs } = require('azure-iot-device-amqp');
const { NoRetry, Message: ServiceMessage } = require('azure-iot-common');
const hub = require('./lib/hub');
const control = require('./lib/control');

const STEP_MS = 15_000;
const TRANSPORTS = [['Amqp', Amqp], ['AmqpWs', AmqpWs]];
const registry = Registry.fromConnectionString(hub.serviceConnectionString());
const service = ServiceClient.fromConnectionString(hub.serviceConnectionString());
service.setRetryPolicy(new NoRetry());
const created = [];

after(async () => {
  await hub.withTimeout(service.close(), STEP_MS, 'service close').catch(() => {});
  for (const deviceId of created) {
    await registry.delete(deviceId).catch(() => {});
  }
});

const { TRICKY } = hub;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function newDevice(prefix) {
  const deviceId = hub.uniqueId(prefix);
  const { responseBody: device } = await registry.create({ deviceId, status: 'enabled' });
  created.push(deviceId);
  return device;
}

/** Creates a device (and a module); returns what a test needs to drive it from both sides. */
async function newIdentity(kind) {
  const device = await newDevice(`amqp${kind}`);
  const { deviceId } = device;
  if (kind === 'module') {
    const moduleId = hub.uniqueId('mod');
    await registry.addModule({ deviceId, moduleId });
    const { responseBody: module } = await registry.getModule(deviceId, moduleId);
    return {
      deviceId,
      moduleId,
      ClientClass: ModuleClient,
      connectionString: hub.deviceConnectionString(deviceId, module.authentication.symmetricKey.primaryKey, moduleId),
      readTwin: async () => (await registry.getModuleTwin(deviceId, moduleId)).responseBody,
      updateDesired: async (desired, etag) =>
        (await registry.updateModuleTwin(deviceId, moduleId, { properties: { desired } }, etag)).responseBody,
    };
  }
  return {
    deviceId,
    moduleId: undefined,
    ClientClass: Client,
    connectionString: hub.deviceConnectionString(deviceId, device.authentication.symmetricKey.primaryKey),
    readTwin: async () => (await registry.getTwin(deviceId)).responseBody,
    updateDesired: async (desired, etag) =>
      (await registry.updateTwin(deviceId, { properties: { desired } }, etag)).responseBody,
  };
}

/** Opens `identity`'s client over `Transport` (retries off); closed after the test. */
async function openClient(t, identity, Transport) {
  const client = identity.ClientClass.fromConnectionString(identity.connectionString, Transport);
  client.setRetryPolicy(new NoRetry());
  client.on('error', () => {}); // surfaced through the awaited calls instead
  t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));
  await hub.withTimeout(client.open(), STEP_MS, 'open');
  return client;
}

function withoutMetadata(section) {
  const copy = {};
  for (const [k, v] of Object.entries(section)) {
    if (k !== '$metadata' && typeof v !== 'function') copy[k] = v;
  }
  return copy;
}

/** A queue of whatever an SDK event hands over, with a timed `next()`. */
class Inbox {
  constructor() {
    this.items = [];
    this.waiters = [];
  }

  push(item) {
    this.items.push(item);
    this.waiters.splice(0).forEach((w) => w());
  }

  next(ms, what) {
    return hub.withTimeout(new Promise((resolve) => {
      const check = () => {
        if (this.items.length) resolve(this.items.shift());
        else this.waiters.push(check);
      };
      check();
    }), ms, what);
  }
}

/** Records 'properties.desired' events (snapshots: the SDK keeps mutating its own object). */
class DesiredInbox {
  constructor(twin) {
    this.events = [];
    this.waiters = [];
    twin.on('properties.desired', (delta) => {
      this.events.push(JSON.parse(JSON.stringify(delta)));
      this.waiters.forEach((w) => w());
    });
  }

  waitForVersion(version, ms = 10_000) {
    const find = () => this.events.find((e) => e.$version === version);
    return hub.withTimeout(new Promise((resolve) => {
      const check = () => {
        const hit = find();
        if (hit) resolve(hit);
      };
      this.waiters.push(check);
      check();
    }), ms, `desired patch with $version ${version}; got ${JSON.stringify(this.events)}`);
  }
}

function reportedUpdate(twin, patch) {
  return new Promise((resolve, reject) => {
    twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()));
  });
}

function statusOf(err) {
  return err && err.response && err.response.statusCode;
}

/**
 * invokeDeviceMethod once the device's method links are attached. The SDK attaches them
 * asynchronously after onMethod/onDeviceMethod and reports no completion, so a call that
 * arrives first gets 404 (DeviceNotOnline): retry that, for a few seconds only.
 */
async function invokeWhenListening(deviceId, moduleId, params) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      const call = moduleId
        ? service.invokeDeviceMethod(deviceId, moduleId, params)
        : service.invokeDeviceMethod(deviceId, params);
      return await hub.withTimeout(call, STEP_MS, `invokeDeviceMethod ${params.methodName}`);
    } catch (err) {
      if (statusOf(err) !== 404 || Date.now() > deadline) throw err;
      await sleep(250);
    }
  }
}

/** Polls the registry until the device's cloudToDeviceMessageCount is `expected`. */
async function waitForC2dCount(deviceId, expected, ms = 10_000) {
  const deadline = Date.now() + ms;
  let count;
  for (;;) {
    ({ cloudToDeviceMessageCount: count } = (await registry.get(deviceId)).responseBody);
    if (count === expected || Date.now() > deadline) return count;
    await sleep(200);
  }
}

// --- twin: the seed flow ------------------------------------------------------------------

for (const [transportName, Transport] of TRANSPORTS) {
  for (const kind of ['module', 'device']) {
    test(`${kind} twin over ${transportName}: get, report, receive a service desired patch`, { timeout: 90_000 }, async (t) => {
      const identity = await newIdentity(kind);
      const client = await openClient(t, identity, Transport);

      const twin = await hub.withTimeout(client.getTwin(), STEP_MS, 'getTwin');
      assert.deepEqual(withoutMetadata(twin.properties.desired), { $version: 1 });
      assert.deepEqual(withoutMetadata(twin.properties.reported), { $version: 1 });

      await hub.withTimeout(reportedUpdate(twin, { temperature: 21.5, firmware: { version: '1.0.2' } }),
        STEP_MS, 'reported.update');

      const inbox = new DesiredInbox(twin);
      // Barrier: the listener's PUT /notifications/twin/properties/desired and this GET go out
      // on the same pre-settled twin sender link, in order; the GET's response comes back only
      // after the hub has handled the PUT.
      await hub.withTimeout(twin.get(), STEP_MS, 'twin.get');

      const serviceTwin = await identity.readTwin();
      assert.equal(serviceTwin.properties.reported.temperature, 21.5);
      assert.deepEqual(serviceTwin.properties.reported.firmware, { version: '1.0.2' });
      assert.equal(serviceTwin.properties.reported.$version, 2);
      assert.match(serviceTwin.properties.reported.$metadata.temperature.$lastUpdated, hub.ISO_8601);
      assert.equal(serviceTwin.connectionState, 'Connected');

      const updated = await identity.updateDesired({ telemetryInterval: 122 }, serviceTwin.etag);
      assert.equal(updated.properties.desired.$version, 2);

      const patch = await inbox.waitForVersion(2);
      assert.deepEqual(patch, { telemetryInterval: 122, $version: 2 });
      assert.equal(twin.properties.desired.telemetryInterval, 122);

      // A deletion travels as null and the SDK drops the key from its copy.
      await identity.updateDesired({ telemetryInterval: null, mode: 'eco' }, '*');
      const deletion = await inbox.waitForVersion(3);
      assert.deepEqual(deletion, { telemetryInterval: null, mode: 'eco', $version: 3 });
      assert.equal('telemetryInterval' in twin.properties.desired, false);
      assert.equal(twin.properties.desired.mode, 'eco');

      // A second GET on the same link shows both sides at their new versions.
      await hub.withTimeout(twin.get(), STEP_MS, 'twin.get (after)');
      assert.equal(twin.properties.desired.$version, 3);
      assert.equal(twin.properties.reported.$version, 2);
      assert.equal(twin.properties.reported.temperature, 21.5);
    });
  }
}

// --- direct methods -----------------------------------------------------------------------

for (const [transportName, Transport] of TRANSPORTS) {
  test(`module method over ${transportName}: onMethod answers invokeDeviceMethod(deviceId, moduleId, ...)`, { timeout: 60_000 }, async (t) => {
    const identity = await newIdentity('module');
    const client = await openClient(t, identity, Transport);
    const seen = [];
    client.onMethod('getConfig', (request, response) => {
      seen.push({ name: request.methodName, payload: request.payload });
      response.send(200, { got: request.payload, module: identity.moduleId, unicode: 'ü✓' }, (err) => {
        if (err) seen.push({ sendError: `${err.constructor.name}: ${err.message}` });
      });
    });

    const payload = { delay: 5, nested: { list: [1, 2, 'three'], flag: true }, text: 'a&b=c +' };
    const { result } = await invokeWhenListening(identity.deviceId, identity.moduleId,
      { methodName: 'getConfig', payload, responseTimeoutInSeconds: 10 });
    assert.deepEqual(result, { status: 200, payload: { got: payload, module: identity.moduleId, unicode: 'ü✓' } });
    assert.deepEqual(seen, [{ name: 'getConfig', payload }]);
  });
}

test('device method over Amqp: onDeviceMethod answers with a status and a scalar payload', { timeout: 60_000 }, async (t) => {
  const identity = await newIdentity('device');
  const client = await openClient(t, identity, Amqp);
  const seen = [];
  client.onDeviceMethod('reboot-now', (request, response) => {
    seen.push(request.payload);
    response.send(201, 'rebooting', () => {});
  });

  const { result } = await invokeWhenListening(identity.deviceId, undefined,
    { methodName: 'reboot-now', payload: 'plain string', responseTimeoutInSeconds: 10 });
  assert.deepEqual(result, { status: 201, payload: 'rebooting' });
  assert.deepEqual(seen, ['plain string']);
});

// --- cloud-to-device ----------------------------------------------------------------------

// One feedback receiver for the whole file: the hub's feedback queue has competing consumers,
// as IoT Hub's does, so a second receiver per test could take a batch meant for the first.
let feedbackRecordsPromise;
function feedbackRecords() {
  feedbackRecordsPromise ??= (async () => {
    const { result: feedback } = await hub.withTimeout(service.getFeedbackReceiver(), STEP_MS, 'getFeedbackReceiver');
    const records = [];
    feedback.on('message', (msg) => {
      for (const record of JSON.parse(msg.data.toString('utf8'))) records.push(record);
    });
    return records;
  })();
  return feedbackRecordsPromise;
}

for (const [transportName, Transport] of TRANSPORTS) {
  test(`C2D over ${transportName}: Client.send (AMQP) → on('message') → complete; feedback Success`, { timeout: 60_000 }, async (t) => {
    const identity = await newIdentity('device');
    const client = await openClient(t, identity, Transport);
    const inbox = new Inbox();
    client.on('message', (msg) => inbox.push(msg));

    const records = await feedbackRecords();

    const messageId = hub.uniqueId('c2d');
    const message = new ServiceMessage('hello amqp device ✓');
    message.messageId = messageId;
    message.correlationId = 'corr/1 +&=';
    message.contentType = 'text/plain';
    message.contentEncoding = 'utf-8';
    message.ack = 'full';
    for (const [k, v] of TRICKY) message.properties.add(k, v);
    await hub.withTimeout(service.send(identity.deviceId, message), STEP_MS, 'service send');

    const msg = await inbox.next(10_000, 'C2D delivery');
    assert.equal(msg.data.toString('utf8'), 'hello amqp device ✓');
    assert.equal(msg.messageId, messageId);
    assert.equal(msg.correlationId, 'corr/1 +&=');
    assert.equal(msg.contentType, 'text/plain');
    assert.equal(msg.contentEncoding, 'utf-8');
    for (const [k, v] of TRICKY) {
      assert.equal(msg.properties.getValue(k), v, `property ${k}`);
    }

    await hub.withTimeout(client.complete(msg), STEP_MS, 'complete');
    assert.equal(await waitForC2dCount(identity.deviceId, 0), 0);

    // ack=full: the feedback receiver gets a Success record for this message.
    const deadline = Date.now() + 15_000;
    while (!records.some((r) => r.originalMessageId === messageId) && Date.now() < deadline) await sleep(100);
    const record = records.find((r) => r.originalMessageId === messageId);
    assert.ok(record, `no feedback for ${messageId}; got ${JSON.stringify(records)}`);
    assert.equal(record.deviceId, identity.deviceId);
    assert.equal(record.statusCode, 'Success');
    assert.match(record.enqueuedTimeUtc, hub.ISO_8601);

    // The device sees the ack request as MQTT devices do (`iothub-ack` application property,
    // which the SDK surfaces as msg.ack, not as a custom property).
    assert.equal(msg.ack, 'full');
    assert.equal(msg.properties.getValue('iothub-ack'), undefined, 'iothub-ack is surfaced as msg.ack');
  });
}

test('C2D over Amqp: abandon redelivers the message, reject removes it', { timeout: 60_000 }, async (t) => {
  const identity = await newIdentity('device');
  const client = await openClient(t, identity, Amqp);
  const inbox = new Inbox();
  client.on('message', (msg) => inbox.push(msg));

  const message = new ServiceMessage('try again');
  message.messageId = hub.uniqueId('c2dab');
  await hub.withTimeout(service.send(identity.deviceId, message), STEP_MS, 'service send');

  const first = await inbox.next(10_000, 'first delivery');
  assert.equal(first.messageId, message.messageId);
  await hub.withTimeout(client.abandon(first), STEP_MS, 'abandon');

  const second = await inbox.next(10_000, 'redelivery after abandon');
  assert.equal(second.messageId, message.messageId);
  assert.equal(second.data.toString(), 'try again');
  await hub.withTimeout(client.reject(second), STEP_MS, 'reject');

  assert.equal(await waitForC2dCount(identity.deviceId, 0), 0);
  await sleep(500);
  assert.equal(inbox.items.length, 0, 'a rejected message is not delivered again');
});

test('C2D over Amqp: a message left unsettled at close is delivered again on the next connection', { timeout: 60_000 }, async (t) => {
  const identity = await newIdentity('device');
  const message = new ServiceMessage('settle me next time');
  message.messageId = hub.uniqueId('c2dun');
  await hub.withTimeout(service.send(identity.deviceId, message), STEP_MS, 'service send');

  const first = await openClient(t, identity, Amqp);
  const inbox1 = new Inbox();
  first.on('message', (msg) => inbox1.push(msg));
  const held = await inbox1.next(10_000, 'first delivery');
  assert.equal(held.messageId, message.messageId);
  // close() detaches the C2D link with the delivery still unsettled; the hub must still answer
  // the Detach, End and Close.
  await hub.withTimeout(first.close(), 10_000, 'close with an unsettled delivery');

  const second = await openClient(t, identity, Amqp);
  const inbox2 = new Inbox();
  second.on('message', (msg) => inbox2.push(msg));
  const again = await inbox2.next(10_000, 'redelivery on the next connection');
  assert.equal(again.messageId, message.messageId);
  await hub.withTimeout(second.complete(again), STEP_MS, 'complete');
  assert.equal(await waitForC2dCount(identity.deviceId, 0), 0);
});

test('C2D queued before the AMQP device connects is delivered when it subscribes', { timeout: 60_000 }, async (t) => {
  const identity = await newIdentity('device');
  for (const body of ['first', 'second']) {
    await hub.withTimeout(service.send(identity.deviceId, new ServiceMessage(body)), STEP_MS, 'service send');
  }
  assert.equal(await waitForC2dCount(identity.deviceId, 2), 2);

  const client = await openClient(t, identity, Amqp);
  const inbox = new Inbox();
  client.on('message', (msg) => inbox.push(msg));
  const bodies = [];
  for (let i = 0; i < 2; i++) {
    const msg = await inbox.next(10_000, `queued delivery ${i + 1}; got ${JSON.stringify(bodies)}`);
    bodies.push(msg.data.toString());
    await hub.withTimeout(client.complete(msg), STEP_MS, 'complete');
  }
  assert.deepEqual(bodies, ['first', 'second']);
  assert.equal(await waitForC2dCount(identity.deviceId, 0), 0);
});

// --- telemetry ----------------------------------------------------------------------------

test('sendEvent over Amqp with system and custom properties reaches the hub', { timeout: 60_000 }, async (t) => {
  const identity = await newIdentity('device');
  const client = await openClient(t, identity, Amqp);
  const body = JSON.stringify({ temperature: 22.5, text: 'héllo' });
  const message = new Message(body);
  message.messageId = hub.uniqueId('mid');
  message.correlationId = 'corr/1 +&=';
  message.contentType = 'application/json';
  message.contentEncoding = 'utf-8';
  for (const [k, v] of TRICKY) message.properties.add(k, v);
  await hub.withTimeout(client.sendEvent(message), STEP_MS, 'sendEvent');

  const [got] = await control.waitForTelemetry({ deviceId: identity.deviceId }, 1);
  assert.ok(got, 'no telemetry recorded');
  assert.equal(got.deviceId, identity.deviceId);
  assert.equal(got.moduleId, null);
  assert.equal(got.body, body);
  assert.deepEqual(got.properties, Object.fromEntries(TRICKY));
  const sys = got.systemProperties;
  assert.equal(sys['message-id'], message.messageId);
  assert.equal(sys['correlation-id'], 'corr/1 +&=');
  assert.equal(sys['content-type'], 'application/json');
  assert.equal(sys['content-encoding'], 'utf-8');
  assert.equal(sys['iothub-connection-device-id'], identity.deviceId);
  assert.equal(sys['iothub-connection-auth-method'], 'SAS');
  assert.match(sys['iothub-enqueuedtime'], hub.ISO_8601);
});

test('module sendOutputEvent over AmqpWs carries the module id and the output name', { timeout: 60_000 }, async (t) => {
  const identity = await newIdentity('module');
  const client = await openClient(t, identity, AmqpWs);
  const message = new Message('{"alert":"high"}');
  message.properties.add('severity', 'high');
  await hub.withTimeout(client.sendOutputEvent('out1', message), STEP_MS, 'sendOutputEvent');

  const [got] = await control.waitForTelemetry({ deviceId: identity.deviceId, moduleId: identity.moduleId }, 1);
  assert.ok(got, 'no telemetry recorded');
  assert.equal(got.moduleId, identity.moduleId);
  assert.equal(got.outputName, 'out1');
  assert.equal(got.systemProperties['iothub-outputname'], 'out1');
  assert.equal(got.systemProperties['iothub-connection-module-id'], identity.moduleId);
  assert.deepEqual(got.properties, { severity: 'high' });
  assert.equal(got.body, '{"alert":"high"}');
});

// --- connection lifecycle -----------------------------------------------------------------

for (const [transportName, Transport] of TRANSPORTS) {
  test(`close over ${transportName} after using every link completes (the hub answers End and Close)`, { timeout: 60_000 }, async (t) => {
    const identity = await newIdentity('device');
    const client = await openClient(t, identity, Transport);
    await hub.withTimeout(client.getTwin(), STEP_MS, 'getTwin');
    await hub.withTimeout(client.sendEvent(new Message('before close')), STEP_MS, 'sendEvent');
    client.on('message', () => {});
    client.onDeviceMethod('noop', (request, response) => response.send(200, null, () => {}));
    await invokeWhenListening(identity.deviceId, undefined, { methodName: 'noop', payload: null, responseTimeoutInSeconds: 5 });
    // The SDK detaches every link, ends the session, then sends Close and waits for the reply.
    await hub.withTimeout(client.close(), 10_000, 'close');
  });
}

// --- errors -------------------------------------------------------------------------------

for (const [transportName, Transport] of TRANSPORTS) {
  test(`wrong key over ${transportName}: open fails with UnauthorizedError`, { timeout: 30_000 }, async (t) => {
    const identity = await newIdentity('device');
    const wrong = identity.connectionString.replace(/SharedAccessKey=[^;]+/, `SharedAccessKey=${Buffer.alloc(32, 9).toString('base64')}`);
    const client = Client.fromConnectionString(wrong, Transport);
    client.setRetryPolicy(new NoRetry());
    client.on('error', () => {});
    t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));

    await assert.rejects(hub.withTimeout(client.open(), 10_000, 'open'), (err) => {
      assert.equal(err.constructor.name, 'UnauthorizedError', `${err.constructor.name}: ${err.message}`);
      return true;
    });
  });
}

test('Client.send to an unknown device: DeviceNotFoundError', { timeout: 30_000 }, async () => {
  await assert.rejects(
    hub.withTimeout(service.send(hub.uniqueId('ghost'), new ServiceMessage('x')), STEP_MS, 'send to ghost'),
    (err) => {
      assert.equal(err.constructor.name, 'DeviceNotFoundError', `${err.constructor.name}: ${err.message}`);
      return true;
    });
});

test('Client.send beyond 50 pending messages: DeviceMaximumQueueDepthExceededError', { timeout: 60_000 }, async () => {
  const device = await newDevice('amqpc2dfull');
  for (let i = 0; i < 50; i++) {
    await hub.withTimeout(service.send(device.deviceId, new ServiceMessage(`m${i}`)), STEP_MS, `send ${i}`);
  }
  await assert.rejects(
    hub.withTimeout(service.send(device.deviceId, new ServiceMessage('one too many')), STEP_MS, 'send 51'),
    (err) => {
      assert.equal(err.constructor.name, 'DeviceMaximumQueueDepthExceededError', `${err.constructor.name}: ${err.message}`);
      return true;
    });
  // The service connection is still usable after a rejected delivery.
  const other = await newDevice('amqpc2dafter');
  await hub.withTimeout(service.send(other.deviceId, new ServiceMessage('still fine')), STEP_MS, 'send after rejection');
  assert.equal(await waitForC2dCount(other.deviceId, 1), 1);
});
