// Module and device twins from the device side with azure-iot-device 1.18.4 +
// azure-iot-device-mqtt 1.16.4, unchanged, over MQTT/TLS (8883) and MQTT over WebSockets
// (443, /$iothub/websocket).
//
// Seed flow (000/002/004, device application): fromConnectionString -> open -> getTwin ->
// twin.properties.reported.update -> twin.on('properties.desired') receives the patch the
// backend writes with Registry.updateModuleTwin(etag). The backend then sees the reported
// values. Retries are off (NoRetry) so a server bug fails instead of being retried.
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { Registry } = require('azure-iothub');
const { ModuleClient, Client } = require('azure-iot-device');
const { Mqtt, MqttWs } = require('azure-iot-device-mqtt');
const { NoRetry } = require('azure-iot-common');
const hub = require('./lib/hub');

const STEP_MS = 15_000;
const registry = Registry.fromConnectionString(hub.serviceConnectionString());
const created = [];

after(async () => {
  for (const deviceId of created) {
    await registry.delete(deviceId).catch(() => {});
  }
});

/** Creates the identity; returns what the test needs to drive it from both sides. */
async function newIdentity(kind) {
  const deviceId = hub.uniqueId(`node${kind}`);
  const { responseBody: device } = await registry.create({ deviceId, status: 'enabled' });
  created.push(deviceId);
  if (kind === 'module') {
    const moduleId = hub.uniqueId('mod');
    await registry.addModule({ deviceId, moduleId });
    const { responseBody: module } = await registry.getModule(deviceId, moduleId);
    return {
      ClientClass: ModuleClient,
      connectionString: hub.deviceConnectionString(deviceId, module.authentication.symmetricKey.primaryKey, moduleId),
      readTwin: async () => (await registry.getModuleTwin(deviceId, moduleId)).responseBody,
      updateDesired: async (desired, etag) =>
        (await registry.updateModuleTwin(deviceId, moduleId, { properties: { desired } }, etag)).responseBody,
    };
  }
  return {
    ClientClass: Client,
    connectionString: hub.deviceConnectionString(deviceId, device.authentication.symmetricKey.primaryKey),
    readTwin: async () => (await registry.getTwin(deviceId)).responseBody,
    updateDesired: async (desired, etag) =>
      (await registry.updateTwin(deviceId, { properties: { desired } }, etag)).responseBody,
  };
}

function withoutMetadata(section) {
  // Devices need no $metadata (protocol.md C.6); tolerate it. Drop the SDK's update() too.
  const copy = {};
  for (const [k, v] of Object.entries(section)) {
    if (k !== '$metadata' && typeof v !== 'function') copy[k] = v;
  }
  return copy;
}

/** Records 'properties.desired' events; the first one on registration is the full desired. */
class DesiredInbox {
  constructor(twin) {
    this.events = [];
    this.waiters = [];
    twin.on('properties.desired', (delta) => {
      // The SDK keeps mutating its own object: keep a snapshot.
      this.events.push(JSON.parse(JSON.stringify(delta)));
      this.waiters.forEach((w) => w());
    });
  }

  /** The first event whose $version is `version`. */
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

for (const [transportName, Transport] of [['Mqtt', Mqtt], ['MqttWs', MqttWs]]) {
  for (const kind of ['module', 'device']) {
    test(`${kind} twin over ${transportName}: get, report, receive a service desired patch`, { timeout: 90_000 }, async (t) => {
      const identity = await newIdentity(kind);
      const client = identity.ClientClass.fromConnectionString(identity.connectionString, Transport);
      client.setRetryPolicy(new NoRetry());
      t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));

      await hub.withTimeout(client.open(), STEP_MS, 'open');

      const twin = await hub.withTimeout(client.getTwin(), STEP_MS, 'getTwin');
      assert.deepEqual(withoutMetadata(twin.properties.desired), { $version: 1 });
      assert.deepEqual(withoutMetadata(twin.properties.reported), { $version: 1 });

      await hub.withTimeout(reportedUpdate(twin, { temperature: 21.5, firmware: { version: '1.0.2' } }),
        STEP_MS, 'reported.update');

      const inbox = new DesiredInbox(twin);
      // Barrier: a twin GET sent after the listener's SUBSCRIBE comes back only after the
      // hub has processed that SUBSCRIBE (same connection, in order).
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

      // `{"properties":{"desired":null}}` clears the whole section: the device is told each
      // key that went, and a fresh GET has nothing but $version.
      await identity.updateDesired(null, '*');
      const cleared = await inbox.waitForVersion(4);
      assert.deepEqual(cleared, { mode: null, $version: 4 });
      assert.equal('mode' in twin.properties.desired, false);
      const fresh = await hub.withTimeout(client.getTwin(), STEP_MS, 'getTwin after clearing');
      assert.deepEqual(withoutMetadata(fresh.properties.desired), { $version: 4 });
    });
  }

  test(`wrong key over ${transportName}: open fails as not authorized`, { timeout: 30_000 }, async (t) => {
    const identity = await newIdentity('module');
    const wrong = identity.connectionString.replace(/SharedAccessKey=[^;]+/, `SharedAccessKey=${Buffer.alloc(32, 9).toString('base64')}`);
    const client = ModuleClient.fromConnectionString(wrong, Transport);
    client.setRetryPolicy(new NoRetry());
    t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));

    await assert.rejects(hub.withTimeout(client.open(), 10_000, 'open'), (err) => {
      assert.match(err.message, /Not authorized|Bad username or password/);
      return true;
    });
  });
}
