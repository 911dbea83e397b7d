// Registry (identity + module twin) end to end with azure-iothub 1.16.6, unchanged.
//
// Seed flows: 000/002 (create a device, add a module identity, read and update the module
// twin, delete) and the REST error contract of shared/protocol.md E (409, 412, 404).
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { Registry } = require('azure-iothub');
const hub = require('./lib/hub');

const registry = Registry.fromConnectionString(hub.serviceConnectionString());
const created = [];

after(async () => {
  for (const deviceId of created) {
    await registry.delete(deviceId).catch(() => {});
  }
});

async function newDevice(prefix = 'node') {
  const deviceId = hub.uniqueId(prefix);
  const { responseBody: device } = await registry.create({ deviceId, status: 'enabled' });
  created.push(deviceId);
  return device;
}

function assertGeneratedKey(key) {
  assert.equal(typeof key, 'string');
  assert.ok(Buffer.from(key, 'base64').length >= 16, `not a generated key: ${key}`);
}

async function assertRejects(promise, errorName, statusCode) {
  await assert.rejects(promise, (err) => {
    assert.equal(err.constructor.name, errorName, `${err.constructor.name}: ${err.message}`);
    assert.equal(err.response && err.response.statusCode, statusCode);
    return true;
  });
}

test('create and get a device: keys are generated for the empty ones Node sends', async () => {
  const device = await newDevice();
  assert.equal(device.status, 'enabled');
  assert.equal(device.authentication.type, 'sas');
  assertGeneratedKey(device.authentication.symmetricKey.primaryKey);
  assertGeneratedKey(device.authentication.symmetricKey.secondaryKey);

  const { responseBody: fetched, httpResponse } = await registry.get(device.deviceId);
  assert.equal(httpResponse.statusCode, 200);
  assert.equal(fetched.deviceId, device.deviceId);
  assert.equal(fetched.etag, device.etag);
  assert.equal(fetched.authentication.symmetricKey.primaryKey, device.authentication.symmetricKey.primaryKey);
});

test('addModule, getModule, getModulesOnDevice', async () => {
  const device = await newDevice();
  const moduleIds = [hub.uniqueId('modA'), hub.uniqueId('modB')];
  for (const moduleId of moduleIds) {
    const { httpResponse } = await registry.addModule({ deviceId: device.deviceId, moduleId });
    assert.ok([200, 201].includes(httpResponse.statusCode), `addModule status ${httpResponse.statusCode}`);
  }

  const { responseBody: module } = await registry.getModule(device.deviceId, moduleIds[0]);
  assert.equal(module.deviceId, device.deviceId);
  assert.equal(module.moduleId, moduleIds[0]);
  assert.ok(module.etag);
  assert.equal(module.connectionState, 'Disconnected');
  assertGeneratedKey(module.authentication.symmetricKey.primaryKey);
  assertGeneratedKey(module.authentication.symmetricKey.secondaryKey);

  const { responseBody: modules } = await registry.getModulesOnDevice(device.deviceId);
  assert.deepEqual(modules.map((m) => m.moduleId).sort(), [...moduleIds].sort());
});

test('getModuleTwin and updateModuleTwin with the etag', async () => {
  const device = await newDevice();
  const moduleId = hub.uniqueId('mod');
  await registry.addModule({ deviceId: device.deviceId, moduleId });

  const { responseBody: twin } = await registry.getModuleTwin(device.deviceId, moduleId);
  assert.equal(twin.deviceId, device.deviceId);
  assert.equal(twin.moduleId, moduleId);
  assert.ok(twin.etag && twin.etag !== '*');
  assert.equal(twin.properties.desired.$version, 1);
  assert.equal(twin.properties.reported.$version, 1);

  const patch = { properties: { desired: { telemetryInterval: 122 } }, tags: { floor: 3 } };
  const { responseBody: updated, httpResponse } = await registry.updateModuleTwin(
    device.deviceId, moduleId, patch, twin.etag);
  assert.equal(httpResponse.statusCode, 200);
  assert.equal(updated.properties.desired.telemetryInterval, 122);
  assert.equal(updated.properties.desired.$version, 2);
  assert.equal(updated.properties.desired.$metadata.telemetryInterval.$lastUpdatedVersion, 2);
  assert.match(updated.properties.desired.$metadata.telemetryInterval.$lastUpdated, hub.ISO_8601);
  assert.deepEqual(updated.tags, { floor: 3 });
  assert.notEqual(updated.etag, twin.etag);

  // The same etag again is stale now.
  await assertRejects(
    registry.updateModuleTwin(device.deviceId, moduleId, { properties: { desired: { telemetryInterval: 1 } } }, twin.etag),
    'InvalidEtagError', 412);

  // Twin.update on the service Twin object uses the etag of its last GET.
  const { responseBody: fresh } = await registry.getModuleTwin(device.deviceId, moduleId);
  const { result: viaTwin } = await fresh.update({ properties: { desired: { mode: 'eco' } } });
  assert.equal(viaTwin.properties.desired.mode, 'eco');
  assert.equal(viaTwin.properties.desired.telemetryInterval, 122);
  assert.equal(viaTwin.properties.desired.$version, 3);
});

test('device twin: getTwin and updateTwin', async () => {
  const device = await newDevice();
  const { responseBody: twin } = await registry.getTwin(device.deviceId);
  assert.equal(twin.deviceId, device.deviceId);
  assert.equal(twin.moduleId, undefined);
  const { responseBody: updated } = await registry.updateTwin(
    device.deviceId, { properties: { desired: { fanOn: true } } }, twin.etag);
  assert.equal(updated.properties.desired.fanOn, true);
  assert.equal(updated.properties.desired.$version, 2);
});

test('removeModule then getModule is 404; delete device', async () => {
  const device = await newDevice();
  const moduleId = hub.uniqueId('mod');
  await registry.addModule({ deviceId: device.deviceId, moduleId });

  const { httpResponse } = await registry.removeModule(device.deviceId, moduleId);
  assert.equal(httpResponse.statusCode, 204);

  // Node maps 404 to DeviceNotFoundError only for ErrorCode:DeviceNotFound, else a plain Error.
  await assert.rejects(registry.getModule(device.deviceId, moduleId), (err) => {
    assert.equal(err.response && err.response.statusCode, 404);
    return true;
  });

  const deleted = await registry.delete(device.deviceId);
  assert.equal(deleted.httpResponse.statusCode, 204);
  await assertRejects(registry.get(device.deviceId), 'DeviceNotFoundError', 404);
});

test('removeModule with a Module object uses its etag; a stale one is 412', async () => {
  const device = await newDevice();
  const moduleId = hub.uniqueId('mod');
  const { responseBody: module } = await registry.addModule({ deviceId: device.deviceId, moduleId });
  // Changing the module identity changes its etag.
  await registry.updateModule({ ...module, managedBy: 'someone' }, true);

  // The promise form of removeModule(Module) throws ReferenceError('done') in 1.16.6
  // (registry.js _removeModule takes `done` from the missing 2nd argument): use the callback.
  const removeModuleObject = (m) => new Promise((resolve, reject) => {
    registry.removeModule(m, (err, _body, response) => (err ? reject(err) : resolve(response)));
  });
  await assertRejects(removeModuleObject(module), 'InvalidEtagError', 412);

  const { responseBody: current } = await registry.getModule(device.deviceId, moduleId);
  assert.equal(current.managedBy, 'someone');
  const response = await removeModuleObject(current);
  assert.equal(response.statusCode, 204);
});

test('duplicates are 409', async () => {
  const device = await newDevice();
  await assertRejects(registry.create({ deviceId: device.deviceId }), 'DeviceAlreadyExistsError', 409);

  const moduleId = hub.uniqueId('mod');
  await registry.addModule({ deviceId: device.deviceId, moduleId });
  await assertRejects(registry.addModule({ deviceId: device.deviceId, moduleId }), 'DeviceAlreadyExistsError', 409);
});

test('unknown identities are 404', async () => {
  await assertRejects(registry.get(hub.uniqueId('ghost')), 'DeviceNotFoundError', 404);
  await assertRejects(registry.getTwin(hub.uniqueId('ghost')), 'DeviceNotFoundError', 404);
  const device = await newDevice();
  await assert.rejects(registry.getModuleTwin(device.deviceId, hub.uniqueId('ghost')), (err) => {
    assert.equal(err.response && err.response.statusCode, 404);
    return true;
  });
});

test('a wrong policy key is 401', async () => {
  const device = await newDevice();
  const wrong = Registry.fromConnectionString(
    hub.serviceConnectionString('iothubowner', Buffer.alloc(32, 7).toString('base64')));
  await assertRejects(wrong.get(device.deviceId), 'UnauthorizedError', 401);
});

test('bulk addDevices and registry statistics', async () => {
  const before = (await registry.getRegistryStatistics()).responseBody;
  const ids = [hub.uniqueId('bulk'), hub.uniqueId('bulk')];
  const { responseBody: result } = await registry.addDevices(ids.map((deviceId) => ({ deviceId, status: 'disabled' })));
  created.push(...ids);
  assert.equal(result.isSuccessful, true, JSON.stringify(result));
  assert.deepEqual(result.errors, []);
  for (const id of ids) {
    const { responseBody: device } = await registry.get(id);
    assert.equal(device.status, 'disabled');
  }
  const after = (await registry.getRegistryStatistics()).responseBody;
  assert.equal(after.totalDeviceCount, before.totalDeviceCount + 2);
  assert.equal(after.disabledDeviceCount, before.disabledDeviceCount + 2);
});

test('edge devices: scope, system modules, leaf and nested children, children query', async () => {
  const edgeId = hub.uniqueId('nodeedge');
  const { responseBody: edge } = await registry.create({ deviceId: edgeId, capabilities: { iotEdge: true } });
  created.push(edgeId);
  assert.equal(edge.deviceScope, `ms-azure-iot-edge://${edgeId}-${edge.generationId}`);
  const { responseBody: modules } = await registry.getModulesOnDevice(edgeId);
  assert.deepEqual(modules.map((m) => m.moduleId).sort(), ['$edgeAgent', '$edgeHub']);
  for (const m of modules) assertGeneratedKey(m.authentication.symmetricKey.primaryKey);

  const leafId = hub.uniqueId('nodeleaf');
  const { responseBody: leaf } = await registry.create({ deviceId: leafId, deviceScope: edge.deviceScope });
  created.push(leafId);
  assert.equal(leaf.deviceScope, edge.deviceScope);
  assert.deepEqual(leaf.parentScopes, [edge.deviceScope]);
  // A scope no edge device has is refused, and the leaf keeps its parent.
  await assertRejects(registry.update({ ...leaf, deviceScope: require('node:crypto').randomUUID() }), 'ArgumentError', 400);
  assert.equal((await registry.get(leafId)).responseBody.deviceScope, edge.deviceScope);

  const childEdgeId = hub.uniqueId('nodeedgechild');
  const { responseBody: childEdge } = await registry.create({
    deviceId: childEdgeId, capabilities: { iotEdge: true }, parentScopes: [edge.deviceScope],
  });
  created.push(childEdgeId);
  assert.notEqual(childEdge.deviceScope, edge.deviceScope);
  assert.deepEqual(childEdge.parentScopes, [edge.deviceScope]);

  const query = registry.createQuery(`SELECT deviceId FROM devices WHERE array_contains(parentScopes, '${edge.deviceScope}')`);
  const { result } = await query.next();
  assert.deepEqual(result.map((d) => d.deviceId).sort(), [childEdgeId, leafId].sort());
});
