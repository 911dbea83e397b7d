// File upload with azure-iot-device 1.18.4 (uploadToBlob, getBlobSharedAccessSignature,
// notifyBlobUploadStatus; the SDK's own @azure/storage-blob uploads the bytes) and the
// service's file notification receiver of azure-iothub 1.16.6 (AMQP), unchanged. The blob
// store is Azurite, started by run.mjs with the emulator's server certificate; the blobs are
// read back from it with @azure/storage-blob 12.34.0 and the account key.
//
// Also, with plain HTTPS requests and device SAS tokens: the SAS a device gets reaches its
// blob only; one device cannot finish another's upload; the 10-uploads-per-device limit
// (403006); malformed requests (400) change nothing.
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const https = require('node:https');
const { Readable } = require('node:stream');
const { Registry, Client: ServiceClient } = require('azure-iothub');
const { Client } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { Mqtt } = require('azure-iot-device-mqtt');
const { NoRetry } = require('azure-iot-common');
const { BlobServiceClient, BlockBlobClient } = require('@azure/storage-blob');
const hub = require('./lib/hub');

const STEP_MS = 20_000;
const registry = Registry.fromConnectionString(hub.serviceConnectionString());
const service = ServiceClient.fromConnectionString(hub.serviceConnectionString());
service.setRetryPolicy(new NoRetry());
const created = [];
const blobService = BlobServiceClient.fromConnectionString(process.env.IOTHUB_E2E_STORAGE_CONNECTION_STRING);

after(async () => {
  await service.close().catch(() => {});
  for (const deviceId of created) {
    await registry.delete(deviceId).catch(() => {});
  }
});

async function newDevice(prefix) {
  const deviceId = hub.uniqueId(prefix);
  const { responseBody: device } = await registry.create({ deviceId, status: 'enabled' });
  created.push(deviceId);
  return { deviceId, key: device.authentication.symmetricKey.primaryKey };
}

function openClient(t, { deviceId, key }, transport) {
  // File upload goes to HostName over HTTPS whatever the transport (the SDK ignores
  // GatewayHostName for it), so HostName is the emulator's address.
  const cs = `HostName=${process.env.IOTHUB_E2E_ADDRESS};DeviceId=${deviceId};SharedAccessKey=${key}`;
  const client = Client.fromConnectionString(cs, transport);
  client.setRetryPolicy(new NoRetry());
  t.after(() => hub.withTimeout(client.close(), STEP_MS, 'close').catch(() => {}));
  return client;
}

/** The service's file notifications, by blob name. */
class Notifications {
  static async open() {
    await hub.withTimeout(service.open(), STEP_MS, 'service open');
    const receiver = await hub.withTimeout(new Promise((resolve, reject) => {
      service.getFileNotificationReceiver((e, r) => (e ? reject(e) : resolve(r)));
    }), STEP_MS, 'file notification receiver');
    return new Notifications(receiver);
  }

  constructor(receiver) {
    this.receiver = receiver;
    this.seen = [];
    receiver.on('message', (msg) => this.seen.push(msg));
  }

  async next(blobName, ms = STEP_MS) {
    const deadline = Date.now() + ms;
    for (;;) {
      const i = this.seen.findIndex((m) => JSON.parse(m.data.toString()).blobName === blobName);
      if (i >= 0) {
        const [msg] = this.seen.splice(i, 1);
        await new Promise((resolve, reject) => this.receiver.complete(msg, (e) => (e ? reject(e) : resolve())));
        return JSON.parse(msg.data.toString());
      }
      if (Date.now() > deadline) throw new Error(`no file notification for ${blobName}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** Whether a notification for `blobName` arrives within `ms`. */
  async arrives(blobName, ms) {
    try {
      await this.next(blobName, ms);
      return true;
    } catch {
      return false;
    }
  }
}

let notifications;
async function fileNotifications() {
  notifications ??= await Notifications.open();
  return notifications;
}

async function readBlob(blobName) {
  const container = blobService.getContainerClient('fileuploads');
  return container.getBlobClient(blobName).downloadToBuffer();
}

for (const [name, transport] of [['Http', Http], ['Mqtt', Mqtt]]) {
  test(`uploadToBlob over the ${name} client: the blob is in Azurite and the service is notified`, { timeout: 90_000 }, async (t) => {
    const device = await newDevice(`upload${name.toLowerCase()}`);
    const client = openClient(t, device, transport);
    const received = await fileNotifications();
    await hub.withTimeout(client.open(), STEP_MS, 'open');
    const content = crypto.randomBytes(3 * 1024 * 1024 + 17);
    const blobName = `logs/${name}/run 1.bin`;
    await hub.withTimeout(client.uploadToBlob(blobName, Readable.from([content]), content.length), 60_000, 'uploadToBlob');

    const fullName = `${device.deviceId}/${blobName}`;
    const notification = await received.next(fullName);
    assert.equal(notification.deviceId, device.deviceId);
    assert.equal(notification.blobSizeInBytes, content.length);
    assert.match(notification.blobUri, /^https:\/\/.+\/fileuploads\//);
    assert.match(notification.lastUpdatedTime, hub.ISO_8601);
    assert.match(notification.enqueuedTimeUtc, hub.ISO_8601);
    assert.deepEqual(await readBlob(fullName), content, 'the bytes in Azurite are the bytes uploaded');
  });
}

test('getBlobSharedAccessSignature + notifyBlobUploadStatus: a failed upload sends no notification, the SAS reaches one blob', { timeout: 90_000 }, async (t) => {
  const device = await newDevice('uploadsteps');
  const client = openClient(t, device, Http);
  const received = await fileNotifications();
  await hub.withTimeout(client.open(), STEP_MS, 'open');

  const info = await hub.withTimeout(client.getBlobSharedAccessSignature('report.txt'), STEP_MS, 'get SAS');
  assert.equal(info.blobName, `${device.deviceId}/report.txt`);
  assert.equal(info.containerName, 'fileuploads');
  assert.ok(info.correlationId);
  assert.match(info.sasToken, /^\?sv=.*sig=/);
  const url = `https://${info.hostName}/${info.containerName}/${info.blobName}${info.sasToken}`;
  await new BlockBlobClient(url).upload('hello', 5);
  // The same SAS names that blob only: another blob with it is refused by the store.
  const other = `https://${info.hostName}/${info.containerName}/${device.deviceId}/other.txt${info.sasToken}`;
  await assert.rejects(new BlockBlobClient(other).upload('x', 1), (e) => e.statusCode === 403);

  await hub.withTimeout(client.notifyBlobUploadStatus(info.correlationId, false, 500, 'gave up'), STEP_MS, 'notify failure');
  assert.equal(await received.arrives(info.blobName, 2_000), false, 'a failed upload is not notified');
  // The correlation id is spent.
  await assert.rejects(client.notifyBlobUploadStatus(info.correlationId, true, 200, 'ok'));

  // A success is notified with the blob's real size.
  const second = await client.getBlobSharedAccessSignature('report.txt');
  await new BlockBlobClient(`https://${second.hostName}/${second.containerName}/${second.blobName}${second.sasToken}`).upload('hello world', 11);
  await client.notifyBlobUploadStatus(second.correlationId, true, 200, 'done');
  const notification = await received.next(second.blobName);
  assert.equal(notification.blobSizeInBytes, 11);
});

// ----- plain HTTPS, device SAS tokens ---------------------------------------------------------

function deviceToken(deviceId, key) {
  const sr = encodeURIComponent(`${process.env.IOTHUB_E2E_ADDRESS}/devices/${deviceId}`);
  const se = Math.floor(Date.now() / 1000) + 3600;
  const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(`${sr}\n${se}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}`;
}

function post(path, token, body) {
  return new Promise((resolve, reject) => {
    const payload = Buffer.from(typeof body === 'string' ? body : JSON.stringify(body));
    const req = https.request({
      host: process.env.IOTHUB_E2E_ADDRESS,
      port: 443,
      method: 'POST',
      path: `${path}?api-version=2021-04-12`,
      headers: { Authorization: token, 'Content-Type': 'application/json', 'Content-Length': payload.length },
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        resolve({ status: res.statusCode, text, json: text ? JSON.parse(text) : undefined });
      });
    });
    req.on('error', reject);
    req.end(payload);
  });
}

test('file upload over HTTPS: identities are isolated, the limit holds, bad input changes nothing', { timeout: 90_000 }, async () => {
  const a = await newDevice('uploada');
  const b = await newDevice('uploadb');
  const tokenA = deviceToken(a.deviceId, a.key);
  const tokenB = deviceToken(b.deviceId, b.key);

  // B's token on A's path: refused.
  const foreign = await post(`/devices/${a.deviceId}/files`, tokenB, { blobName: 'x.txt' });
  assert.equal(foreign.status, 401, foreign.text);

  const started = await post(`/devices/${a.deviceId}/files`, tokenA, { blobName: 'x.txt' });
  assert.equal(started.status, 200, started.text);
  const { correlationId } = started.json;

  // B cannot finish A's upload, even on its own path.
  const stolen = await post(`/devices/${b.deviceId}/files/notifications`, tokenB,
    { correlationId, isSuccess: false, statusCode: 500, statusDescription: 'no' });
  assert.equal(stolen.status, 400, stolen.text);
  assert.match(stolen.text, /ArgumentInvalid|400004/);

  // Malformed requests.
  for (const [path, body] of [
    [`/devices/${a.deviceId}/files`, {}],
    [`/devices/${a.deviceId}/files`, { blobName: 7 }],
    [`/devices/${a.deviceId}/files`, { blobName: '../up.txt' }],
    [`/devices/${a.deviceId}/files`, '{"blobName": '],
    [`/devices/${a.deviceId}/files/notifications`, { isSuccess: true }],
    [`/devices/${a.deviceId}/files/notifications`, { correlationId, isSuccess: 'yes' }],
    [`/devices/${a.deviceId}/files/notifications`, { correlationId: 'nope', isSuccess: false }],
  ]) {
    const res = await post(path, tokenA, body);
    assert.equal(res.status, 400, `${path} ${JSON.stringify(body)}: ${res.text}`);
  }

  // A's upload is still in progress after all that: A can finish it.
  const done = await post(`/devices/${a.deviceId}/files/notifications/${encodeURIComponent(correlationId)}`, tokenA,
    { isSuccess: false, statusCode: 500, statusDescription: 'abandoned' });
  assert.equal(done.status, 204, done.text);

  // Ten uploads in progress at most.
  for (let i = 0; i < 10; i++) {
    const res = await post(`/devices/${b.deviceId}/files`, tokenB, { blobName: `f${i}` });
    assert.equal(res.status, 200, res.text);
  }
  const eleventh = await post(`/devices/${b.deviceId}/files`, tokenB, { blobName: 'f10' });
  assert.equal(eleventh.status, 403, eleventh.text);
  assert.match(eleventh.text, /403006|DeviceMaximumActiveFileUploadLimitExceeded/);
});
