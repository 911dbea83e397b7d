// POST /devices/query with azure-iothub 1.16.6, unchanged: Registry.createQuery(sql, pageSize)
// returns a Query (dist/query.js) whose next()/nextAsTwin() send x-ms-max-item-count and the
// x-ms-continuation of the previous page, and set `hasMoreResults = continuationToken !==
// undefined` (query.js `next`), so the last page must come without the header at all.
//
// Every test tags its own twins with tags.run = <uuid> and filters on it.
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Registry } = require('azure-iothub');
const hub = require('./lib/hub');

const registry = Registry.fromConnectionString(hub.serviceConnectionString());
const created = [];

after(async () => {
  for (const deviceId of created) {
    await registry.delete(deviceId).catch(() => {});
  }
});

const newRun = () => crypto.randomUUID().replace(/-/g, '');

/** `n` devices whose twins carry tags { run, ...extra(i) }; returns their ids. */
async function taggedDevices(run, n, extra = () => ({})) {
  const ids = [];
  for (let i = 0; i < n; i++) {
    const deviceId = hub.uniqueId('nq');
    await registry.create({ deviceId, status: 'enabled' });
    created.push(deviceId);
    await registry.updateTwin(deviceId, { tags: { run, ...extra(i) } }, '*');
    ids.push(deviceId);
  }
  return ids;
}

/** Promise form: nextAsTwin() resolves { result, message } (interfaces.js). */
async function allTwins(query, maxPages = 50) {
  const pages = [];
  while (query.hasMoreResults) {
    if (pages.length === maxPages) assert.fail('the query never stopped returning a continuation token');
    const { result, message } = await hub.withTimeout(query.nextAsTwin(), 10_000, 'nextAsTwin');
    pages.push({ twins: result, itemType: message.headers['x-ms-item-type'], token: query.continuationToken });
  }
  return pages;
}

test('nextAsTwin pages through 7 devices 3 at a time until hasMoreResults is false', async () => {
  const run = newRun();
  const ids = await taggedDevices(run, 7, (i) => ({ i }));
  const query = registry.createQuery(`SELECT * FROM devices WHERE tags.run = '${run}'`, 3);
  assert.equal(query.hasMoreResults, true);

  const pages = await allTwins(query);

  assert.deepEqual(pages.map((p) => p.twins.length), [3, 3, 1]);
  assert.equal(typeof pages[0].token, 'string');
  assert.ok(pages[0].token && pages[1].token && pages[0].token !== pages[1].token);
  assert.equal(pages[2].token, undefined);
  assert.equal(query.hasMoreResults, false);
  assert.deepEqual(pages.map((p) => p.itemType), ['twin', 'twin', 'twin']);

  const twins = pages.flatMap((p) => p.twins);
  const seen = twins.map((t) => t.deviceId);
  assert.equal(new Set(seen).size, 7, `duplicates in ${seen}`);
  assert.deepEqual(seen, [...ids].sort()); // identity order, each device once
  for (const twin of twins) {
    assert.equal(twin.constructor.name, 'Twin');
    assert.equal(twin.tags.run, run);
    assert.equal(twin.moduleId, undefined);
    assert.ok(twin.etag && twin.etag !== '*');
    assert.equal(twin.properties.desired.$version, 1);
  }

  // A Twin from a query is a live service Twin: get() re-reads it from the registry.
  const { result: refreshed } = await twins[0].get();
  assert.equal(refreshed.deviceId, twins[0].deviceId);
  assert.equal(refreshed.tags.i, twins[0].tags.i);
});

test('nextAsTwin callback form and an explicit continuation token', async () => {
  const run = newRun();
  const ids = await taggedDevices(run, 3);
  const query = registry.createQuery(`SELECT * FROM devices WHERE tags.run = '${run}'`, 2);

  const nextAsTwin = (token) => new Promise((resolve, reject) => {
    const cb = (err, twins, response) => (err ? reject(err) : resolve({ twins, response }));
    if (token) query.nextAsTwin(token, cb); else query.nextAsTwin(cb);
  });
  const first = await nextAsTwin();
  assert.equal(first.response.statusCode, 200);
  assert.deepEqual(first.twins.map((t) => t.deviceId), [...ids].sort().slice(0, 2));
  const token = query.continuationToken;
  assert.ok(token);

  const second = await nextAsTwin(token);
  assert.deepEqual(second.twins.map((t) => t.deviceId), [...ids].sort().slice(2));
  assert.equal(query.hasMoreResults, false);

  // The same token again replays the same page.
  const again = await nextAsTwin(token);
  assert.deepEqual(again.twins.map((t) => t.deviceId), second.twins.map((t) => t.deviceId));
});

test('tag and desired-property filters', async () => {
  const run = newRun();
  const envs = ['prod', 'test', 'prod', 'dev'];
  const ids = await taggedDevices(run, 4, (i) => ({ env: envs[i], floor: i }));
  await registry.updateTwin(ids[1], { properties: { desired: { telemetryInterval: 122 } } }, '*');

  const where = async (cond) => {
    const pages = await allTwins(registry.createQuery(`SELECT * FROM devices WHERE tags.run = '${run}' AND ${cond}`));
    return pages.flatMap((p) => p.twins.map((t) => t.deviceId));
  };
  const pick = (...idx) => idx.map((i) => ids[i]).sort();

  assert.deepEqual(await where(`tags.env = 'prod'`), pick(0, 2));
  assert.deepEqual(await where(`tags.env IN ['test', 'dev'] AND tags.floor > 1`), pick(3));
  assert.deepEqual(await where(`NOT (tags.env = 'prod') OR tags.floor = 0`), pick(0, 1, 3));
  assert.deepEqual(await where(`properties.desired.telemetryInterval = 122`), pick(1));
  assert.deepEqual(await where(`STARTSWITH(tags.env, 'de')`), pick(3));
});

test('module twins: FROM devices.modules pages in identity order', async () => {
  const run = newRun();
  const expected = [];
  for (let d = 0; d < 2; d++) {
    const deviceId = hub.uniqueId('nqm');
    await registry.create({ deviceId, status: 'enabled' });
    created.push(deviceId);
    await registry.updateTwin(deviceId, { tags: { run } }, '*'); // must not show up as a module
    for (let m = 0; m < 2; m++) {
      const moduleId = hub.uniqueId('m');
      await registry.addModule({ deviceId, moduleId });
      await registry.updateModuleTwin(deviceId, moduleId, { tags: { run, m } }, '*');
      expected.push(`${deviceId}/${moduleId}`);
    }
  }
  expected.sort();

  const pages = await allTwins(registry.createQuery(`SELECT * FROM devices.modules WHERE tags.run = '${run}'`, 3));

  assert.deepEqual(pages.map((p) => p.twins.length), [3, 1]);
  const twins = pages.flatMap((p) => p.twins);
  assert.deepEqual(twins.map((t) => `${t.deviceId}/${t.moduleId}`), expected);
  for (const twin of twins) assert.equal(twin.tags.run, run);

  const { result } = await registry.createQuery(
    `SELECT COUNT() AS n FROM devices.modules WHERE tags.run = '${run}' AND tags.m = 1`).next();
  assert.deepEqual(result, [{ n: 2 }]);
});

test('next() for SELECT COUNT() AS n and GROUP BY returns raw rows in one page', async () => {
  const run = newRun();
  const envs = ['prod', 'test', 'prod', 'dev', 'prod'];
  await taggedDevices(run, envs.length, (i) => ({ env: envs[i] }));

  const count = registry.createQuery(`SELECT COUNT() AS n FROM devices WHERE tags.run = '${run}'`, 2);
  const { result, message } = await count.next();
  assert.deepEqual(result, [{ n: 5 }]);
  assert.equal(message.headers['x-ms-item-type'], 'raw');
  assert.equal(count.hasMoreResults, false);

  const grouped = registry.createQuery(
    `SELECT tags.env AS env, COUNT() AS numberOfDevices FROM devices WHERE tags.run = '${run}' GROUP BY tags.env`);
  const { result: groups } = await grouped.next();
  assert.equal(grouped.hasMoreResults, false);
  const byEnv = Object.fromEntries(groups.map((g) => [g.env, g.numberOfDevices]));
  assert.deepEqual(byEnv, { prod: 3, test: 1, dev: 1 });
  assert.equal(groups.length, 3);

  const none = await registry.createQuery(`SELECT COUNT() AS n FROM devices WHERE tags.run = '${newRun()}'`).next();
  assert.deepEqual(none.result, [{ n: 0 }]);
});

test('next() for a projection pages raw objects', async () => {
  const run = newRun();
  const ids = await taggedDevices(run, 3, (i) => (i < 2 ? { x: i * 10 } : {}));
  const query = registry.createQuery(`SELECT deviceId, tags.x AS x FROM devices WHERE tags.run = '${run}'`, 2);

  // The promise form of next() with no argument does not use query.continuationToken
  // (dist/query.js L40: the else branch takes the token from the undefined first argument),
  // so it would fetch page 1 forever; pass the token explicitly. nextAsTwin() has no such
  // problem: it uses `continuationToken || this.continuationToken` (L70).
  const rows = [];
  let pages = 0;
  while (query.hasMoreResults && pages < 10) {
    const { result } = await query.next(query.continuationToken);
    rows.push(...result);
    pages++;
  }
  assert.equal(pages, 2);
  const sorted = [...ids].sort();
  const xOf = (id) => { const i = ids.indexOf(id); return i < 2 ? { x: i * 10 } : {}; };
  assert.deepEqual(rows, sorted.map((deviceId) => ({ deviceId, ...xOf(deviceId) })));
});

test('a query syntax error is 400 ArgumentError', async () => {
  for (const sql of ['SELECT * FROM devices WHERE', 'SELECT * FROM nowhere']) {
    await assert.rejects(registry.createQuery(sql).nextAsTwin(), (err) => {
      assert.equal(err.constructor.name, 'ArgumentError', `${err.constructor.name}: ${err.message}`);
      assert.equal(err.response && err.response.statusCode, 400);
      return true;
    });
  }
});
