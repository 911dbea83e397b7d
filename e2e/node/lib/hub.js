// Shared helpers for the Node end-to-end suites.
//
// The emulator is started by ../run.mjs, which passes its address through the environment
// and sets NODE_EXTRA_CA_CERTS (read by Node only at process start, so it cannot be set
// from inside a test file). Run the suites with `node run.mjs [file...]`, not `node --test`.
'use strict';

const crypto = require('node:crypto');

const OWNER_KEY = 'PCFd5Ixr95rqeCXdxUvRnBzqmtWpxg9nDnvYeGICeug=';
const DEVICE_HOSTNAME = process.env.IOTHUB_E2E_DEVICE_HOSTNAME || 'localhost';

function address() {
  const value = process.env.IOTHUB_E2E_ADDRESS;
  if (!value || !process.env.NODE_EXTRA_CA_CERTS) {
    throw new Error('IOTHUB_E2E_ADDRESS / NODE_EXTRA_CA_CERTS are not set: run the suite with `node run.mjs` from e2e/node');
  }
  return value;
}

/** A service (policy) connection string: HostName is the 127.0.0.X the emulator binds. */
function serviceConnectionString(policy = 'iothubowner', key = OWNER_KEY) {
  return `HostName=${address()};SharedAccessKeyName=${policy};SharedAccessKey=${key}`;
}

/** A device or module connection string: HostName=localhost, the socket goes to the gateway. */
function deviceConnectionString(deviceId, key, moduleId) {
  const parts = [`HostName=${DEVICE_HOSTNAME}`, `DeviceId=${deviceId}`];
  if (moduleId) parts.push(`ModuleId=${moduleId}`);
  parts.push(`SharedAccessKey=${key}`, `GatewayHostName=${address()}`);
  return parts.join(';');
}

/** An id no other test uses (Azurite's getUniqueName). */
function uniqueId(prefix) {
  return `${prefix}-${crypto.randomUUID().replace(/-/g, '').slice(0, 12)}`;
}

/** Rejects if `promise` has not settled within `ms`, naming the step. */
function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const ISO_8601 = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?(Z|[+-]\d\d:\d\d)$/;

// Property values chosen to break naive encoders: bag separators, spaces, '+', '%', '/',
// unicode, an empty value.
const TRICKY = [
  ['a&b=c', 'x&y=z'],
  ['with space', 'two words'],
  ['plus', '1+1=2'],
  ['percent', '100%'],
  ['slash/key', 'a/b/c'],
  ['unicode', 'héllo wörld ✓ 温度'],
  ['empty', ''],
];

module.exports = {
  TRICKY,
  OWNER_KEY,
  ISO_8601,
  serviceConnectionString,
  deviceConnectionString,
  uniqueId,
  withTimeout,
};
