// Message routing and IoT Hub's non-telemetry events, read with the official Event Hubs SDK
// (@azure/event-hubs 5.12.2, `EventHubConsumerClient` over AMQP/TLS on 5671), with
// azure-iothub 1.16.6 (`Registry`) and azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4
// (`Mqtt`) making the changes.
//
// The emulator runs with run.mjs's routing.toml:
// - twin change, lifecycle and connection state events routed to the built-in endpoint;
// - a custom endpoint `hot` (an Event Hub-compatible entity of its own) that gets device
//   messages whose `routingTest` property is `hot`, enriched with the sender's `site` tag and
//   the hub name;
// - the fallback route on: device messages no route selects go to the built-in endpoint.
// run.mjs hands over the built-in endpoint's connection string (Endpoint=sb://<address>/) in
// IOTHUB_E2E_EVENTHUB_CONNECTION_STRING; `hot` is the same string with EntityPath=hot.
//
// The rules checked are Microsoft's ("Azure IoT Hub non-telemetry event schemas", "IoT Hub
// message routing", "Message enrichments"), not the emulator's code. Retries are off.
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { EventHubConsumerClient, earliestEventPosition } = require('@azure/event-hubs');
const { Registry } = require('azure-iothub');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { NoRetry } = require('azure-iot-common');
const hub = require('./lib/hub');
const control = require('./lib/control');

const STEP_MS = 15_000;
const WAIT_MS = 30_000;
const registry = Registry.fromConnectionString(hub.serviceConnectionString());
const created = [];

after(async () => {
  for (const deviceId of created) {
    await registry.delete(deviceId).catch(() => {});
  }
});

function builtInConnectionString() {
  const value = process.env.IOTHUB_E2E_EVENTHUB_CONNECTION_STRING;
  if (!value) throw new Error('IOTHUB_E2E_EVENTHUB_CONNECTION_STRING is not set: run the suite with `node run.mjs`');
  return value;
}

/** The built-in endpoint's entity name: the hub's name. */
function hubName() {
  return /;EntityPath=([^;]+)$/.exec(builtInConnectionString())[1];
}

function entityConnectionString(entity) {
  return builtInConnectionString().replace(/;EntityPath=[^;]+$/, `;EntityPath=${entity}`);
}

/**
 * Reads `entity` from the start of every partition, keeping the events `predicate` accepts,
 * until `isDone(found)`; fails after `timeoutMs` with what arrived and the SDK's errors.
 * Bodies are Buffers (skipParsingBodyAsJson).
 */
async function collect(t, entity, predicate, isDone, what, timeoutMs = WAIT_MS) {
  const client = new EventHubConsumerClient('$Default', entityConnectionString(entity), {
    retryOptions: { maxRetries: 0 },
  });
  t.after(() => client.close().catch(() => {}));
  const found = [];
  const errors = [];
  let subscription;
  const finished = new Promise((resolve) => {
    subscription = client.subscribe({
      processEvents: async (events) => {
        for (const event of events) {
          if (predicate(event)) found.push(event);
        }
        if (isDone(found)) resolve();
      },
      processError: async (err, context) => {
        errors.push(`partition ${context.partitionId}: ${err.name}: ${err.message}`);
      },
    }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1, maxBatchSize: 100, skipParsingBodyAsJson: true });
  });
  try {
    await hub.withTimeout(finished, timeoutMs, `${what} on ${entity}`).catch((e) => {
      throw new Error(`${e.message}; errors ${JSON.stringify(errors)}; found ${JSON.stringify(found.map(summary))}`);
    });
  } finally {
    await subscription.close().catch(() => {});
    await client.close().catch(() => {});
  }
  return found;
}

const ofDevice = (deviceId) => (e) => e.systemProperties?.['iothub-connection-device-id'] === deviceId;
const source = (e) => e.systemProperties['iothub-message-source'];
// Bodies (skipParsingBodyAsJson) come as Buffers. AMQP's binary user-id comes as a
// {0: byte, 1: byte, …} object: the SDK copies every object in systemProperties
// (convertDatesToNumbers) and @azure/core-amqp's raw message drops user_id altogether.
function text(value) {
  if (value instanceof Uint8Array) return Buffer.from(value).toString('utf8');
  if (value && typeof value === 'object') {
    return Buffer.from(Object.keys(value).sort((a, b) => a - b).map((k) => value[k])).toString('utf8');
  }
  return value;
}
const json = (e) => JSON.parse(text(e.body));
const summary = (e) => ({
  source: e.systemProperties?.['iothub-message-source'],
  opType: e.properties?.opType,
  moduleId: e.properties?.moduleId,
  messageId: e.messageId,
});

function reportedUpdate(twin, patch) {
  return new Promise((resolve, reject) => {
    twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()));
  });
}

async function newDevice(prefix) {
  const deviceId = hub.uniqueId(prefix);
  const { responseBody: device } = await registry.create({ deviceId, status: 'enabled' });
  created.push(deviceId);
  return { deviceId, key: device.authentication.symmetricKey.primaryKey };
}

async function openMqtt(t, deviceId, key) {
  const client = Client.fromConnectionString(hub.deviceConnectionString(deviceId, key), Mqtt);
  client.setRetryPolicy(new NoRetry());
  t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));
  await hub.withTimeout(client.open(), STEP_MS, 'open');
  return client;
}

test('lifecycle, twin change and connection state events reach the built-in endpoint', { timeout: 120_000 }, async (t) => {
  const { deviceId, key } = await newDevice('noderoute-events');
  await registry.addModule({ deviceId, moduleId: 'm1' });

  const { responseBody: twin0 } = await registry.getTwin(deviceId);
  await registry.updateTwin(deviceId, { tags: { site: 'north' }, properties: { desired: { interval: 5 } } }, twin0.etag);

  const client = await openMqtt(t, deviceId, key);
  const deviceTwin = await hub.withTimeout(client.getTwin(), STEP_MS, 'getTwin');
  await hub.withTimeout(reportedUpdate(deviceTwin, { fw: '1.2', gone: null }), STEP_MS, 'reported.update');
  await hub.withTimeout(client.close(), STEP_MS, 'close');
  // The disconnect is recorded when the emulator sees the connection end: wait for it, so
  // that the deletions below come after it.
  const deadline = Date.now() + STEP_MS;
  while ((await registry.get(deviceId)).responseBody.connectionState !== 'Disconnected') {
    assert.ok(Date.now() < deadline, 'the device is still Connected after close()');
    await new Promise((r) => setTimeout(r, 100));
  }
  await registry.removeModule(deviceId, 'm1');
  await registry.delete(deviceId);

  const events = await collect(t, hubName(), ofDevice(deviceId), (found) => found.length >= 8, `8 events of ${deviceId}`);
  assert.deepEqual(events.map((e) => [source(e), e.properties.opType, e.properties.moduleId]), [
    ['deviceLifecycleEvents', 'createDeviceIdentity', undefined],
    ['deviceLifecycleEvents', 'createDeviceIdentity', 'm1'],
    ['twinChangeEvents', 'updateTwin', undefined],
    ['deviceConnectionStateEvents', 'deviceConnected', undefined],
    ['twinChangeEvents', 'updateTwin', undefined],
    ['deviceConnectionStateEvents', 'deviceDisconnected', undefined],
    ['deviceLifecycleEvents', 'deleteDeviceIdentity', 'm1'],
    ['deviceLifecycleEvents', 'deleteDeviceIdentity', undefined],
  ]);

  const schemas = {
    deviceLifecycleEvents: 'deviceLifecycleNotification',
    twinChangeEvents: 'twinChangeNotification',
    deviceConnectionStateEvents: 'deviceConnectionStateNotification',
  };
  for (const e of events) {
    const p = e.properties;
    assert.equal(p.hubName, hubName(), JSON.stringify(p));
    assert.equal(p.deviceId, deviceId);
    assert.equal(p['iothub-message-schema'], schemas[source(e)]);
    assert.match(p.operationTimestamp, hub.ISO_8601);
    assert.ok(p.operationTimestamp.endsWith('Z'), p.operationTimestamp);
    assert.equal(e.contentType, 'application/json');
    assert.equal(e.systemProperties.contentEncoding, 'utf-8');
    assert.equal(text(e.systemProperties.userId), hubName());
    assert.ok(e.correlationId, 'correlation-id');
    assert.equal(e.systemProperties['iothub-connection-auth-method'], undefined);
  }

  const [created1, moduleCreated, servicePatch, connected, reported, disconnected, moduleDeleted, deleted] = events.map(json);
  // Lifecycle: the identity's twin.
  assert.equal(created1.deviceId, deviceId);
  assert.equal('moduleId' in created1, false);
  assert.equal(created1.properties.desired.$version, 1);
  assert.ok('etag' in created1 && 'version' in created1, JSON.stringify(created1));
  assert.equal(moduleCreated.moduleId, 'm1');
  assert.equal(events[1].systemProperties['iothub-connection-module-id'], 'm1');
  assert.equal(deleted.deviceId, deviceId);
  assert.equal(moduleDeleted.moduleId, 'm1');

  // A service update: the twin's version and what changed, with its metadata.
  assert.equal(typeof servicePatch.version, 'number');
  assert.deepEqual(servicePatch.tags, { site: 'north' });
  const desired = servicePatch.properties.desired;
  assert.equal(desired.interval, 5);
  assert.equal(desired.$version, 2);
  assert.equal(desired.$metadata.interval.$lastUpdatedVersion, 2);
  assert.match(desired.$metadata.$lastUpdated, hub.ISO_8601);

  // A device's reported patch.
  assert.equal(reported.properties.reported.fw, '1.2');
  assert.equal(reported.properties.reported.gone, null);
  assert.ok('fw' in reported.properties.reported.$metadata, JSON.stringify(reported));
  assert.equal(typeof reported.properties.reported.$version, 'number');
  assert.ok(reported.version > servicePatch.version, `${reported.version} > ${servicePatch.version}`);

  // Connection state: a 64-digit hexadecimal sequence number that grows.
  const seq = [connected.sequenceNumber, disconnected.sequenceNumber];
  for (const s of seq) assert.match(s, /^[0-9A-Fa-f]{64}$/);
  assert.ok(BigInt(`0x${seq[0]}`) < BigInt(`0x${seq[1]}`), JSON.stringify(seq));
  assert.deepEqual(Object.keys(connected), ['sequenceNumber']);
});

test('a device message the DeviceMessages route selects goes to `hot` only, enriched; others to the built-in endpoint', { timeout: 120_000 }, async (t) => {
  const { deviceId, key } = await newDevice('noderoute-msgs');
  const { responseBody: twin0 } = await registry.getTwin(deviceId);
  await registry.updateTwin(deviceId, { tags: { site: 'north' } }, twin0.etag);

  const client = await openMqtt(t, deviceId, key);
  const send = (messageId, body, properties = {}, json = false) => {
    const message = new Message(body);
    message.messageId = messageId;
    if (json) {
      message.contentType = 'application/json';
      message.contentEncoding = 'utf-8';
    }
    for (const [k, v] of Object.entries(properties)) message.properties.add(k, v);
    return hub.withTimeout(client.sendEvent(message), STEP_MS, `sendEvent ${messageId}`);
  };
  await send('cold-1', 'plain');
  await send('hot-1', 'disk full', { routingTest: 'hot', level: 'critical' });
  await send('other-1', 'not hot', { routingTest: 'cold' });
  await send('hot-2', JSON.stringify({ temperature: 35 }), { routingTest: 'hot' }, true);
  await send('cold-2', 'plain again');

  // One device's messages are in one partition, in order: everything routed to an endpoint
  // before its last expected message has arrived by then.
  const hot = await collect(t, 'hot', ofDevice(deviceId), (found) => found.some((e) => e.messageId === 'hot-2'), 'hot-2');
  assert.deepEqual(hot.map((e) => e.messageId), ['hot-1', 'hot-2']);
  for (const e of hot) {
    assert.equal(source(e), 'Telemetry');
    assert.equal(e.properties.routingTest, 'hot');
    assert.equal(e.properties.site, 'north', JSON.stringify(e.properties));
    assert.equal(e.properties.hub, hubName(), JSON.stringify(e.properties));
  }
  assert.equal(text(hot[0].body), 'disk full');
  assert.equal(hot[0].properties.level, 'critical');
  assert.deepEqual(json(hot[1]), { temperature: 35 });
  assert.equal(hot[1].contentType, 'application/json');

  const builtIn = await collect(t, hubName(), (e) => ofDevice(deviceId)(e) && source(e) === 'Telemetry',
    (found) => found.some((e) => e.messageId === 'cold-2'), 'cold-2');
  assert.deepEqual(builtIn.map((e) => e.messageId), ['cold-1', 'other-1', 'cold-2']);
  for (const e of builtIn) {
    assert.equal(e.properties?.site, undefined, JSON.stringify(e.properties));
    assert.equal(e.properties?.hub, undefined, JSON.stringify(e.properties));
  }
  assert.equal(text(builtIn[0].body), 'plain');
  assert.equal(builtIn[1].properties.routingTest, 'cold');

  // The control API shows which route selected each message and where it went (hot-2 and
  // cold-2 came last on their endpoints, so the reads above do not show where else they went).
  const log = await control.readTelemetry({ deviceId, wait: 0 });
  const byId = Object.fromEntries(log.messages.map((m) => [m.systemProperties['message-id'], m]));
  assert.deepEqual(byId['hot-2'].routes, ['hot-telemetry']);
  assert.deepEqual(byId['hot-2'].endpoints, [{ name: 'hot', enrichments: { site: 'north', hub: hubName() } }]);
  assert.deepEqual(byId['cold-2'].routes, ['$fallback']);
  assert.deepEqual(byId['cold-2'].endpoints, [{ name: 'events', enrichments: {} }]);
});
