#!/usr/bin/env node
// Runs the Node end-to-end suites against one iothub-emulator process.
//
//   node run.mjs                      # every *.test.js in this folder
//   node run.mjs registry.test.js     # one file
//   node run.mjs --test-name-pattern=C2D amqp.test.js   # flags go to node --test
//
// Why a launcher: the Node SDKs trust a private CA only through NODE_EXTRA_CA_CERTS, which
// Node reads once at process start (shared/protocol.md C.1, E.1). So this script starts the
// emulator first, then runs `node --test` with NODE_EXTRA_CA_CERTS pointing at the
// emulator's CA and the emulator's address in IOTHUB_E2E_ADDRESS, then stops the emulator
// by pid (SIGTERM, then SIGKILL) and exits with the test runner's status.
//
// The emulator keeps its default ports (443 REST + MQTT/AMQP over WebSockets, 8883 MQTT/TLS,
// 5671 AMQP/TLS): the Node service SDK can only reach 443 and the AMQP transports use 5671.
// It binds a spare 127.0.0.X so those ports are free.
// IOTHUB_EMULATOR_BIN overrides the binary (default ../../target/debug/iothub-emulator).
//
// File upload needs a blob store: the launcher also starts Azurite (npm `azurite`, blob service
// only) on the same address, port 10000, serving HTTPS with the emulator's server certificate
// (the device SDKs upload over HTTPS only) in loose mode (the SDK's storage client sends headers
// strict Azurite refuses), and hands the emulator its connection string.
// The tests get it in IOTHUB_E2E_STORAGE_CONNECTION_STRING.
//
// Message routing: the emulator always gets `--config routing.toml` (this folder), whose
// `[routing]` table is what routing.test.js needs and leaves the other files' view as on a
// new hub: hub events (twin change, lifecycle, connection state) go to the built-in endpoint,
// which no other file reads; device messages with the application property
// `routingTest = 'hot'` go to the custom endpoint `hot`; the fallback route keeps every other
// device message on the built-in endpoint. The tests get the Event Hub-compatible endpoint's
// connection string (from the banner, with Endpoint=sb://<address>/ so the AMQP socket goes
// to the emulator's 5671) in IOTHUB_E2E_EVENTHUB_CONNECTION_STRING; a custom endpoint is the
// same string with EntityPath=<endpoint name>.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '..', '..');
const binary = process.env.IOTHUB_EMULATOR_BIN || path.join(repoRoot, 'target', 'debug', 'iothub-emulator');
const logDir = path.join(repoRoot, 'e2e', 'logs');
const READY = 'iothub-emulator ready';
const ROUTING_CONFIG = path.join(here, 'routing.toml');
const PORTS = [443, 8883, 5671, 10000]; // HTTPS and MQTT/AMQP over WebSockets; MQTT/TLS; AMQP/TLS; Azurite
const AZURITE_PORT = 10000;
// Azurite's well-known development account (Microsoft's Azurite documentation).
const AZURITE_ACCOUNT = 'devstoreaccount1';
const AZURITE_KEY = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';
const storageConnectionString = (address) =>
  `DefaultEndpointsProtocol=https;AccountName=${AZURITE_ACCOUNT};AccountKey=${AZURITE_KEY};BlobEndpoint=https://${address}:${AZURITE_PORT}/${AZURITE_ACCOUNT}`;

function portFree(address, port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen({ host: address, port, exclusive: true }, () => server.close(() => resolve(true)));
  });
}

async function pickAddress() {
  for (let i = 0; i < 200; i++) {
    const address = `127.0.0.${2 + Math.floor(Math.random() * 249)}`;
    const free = await Promise.all(PORTS.map((p) => portFree(address, p)));
    if (free.every(Boolean)) return address;
  }
  throw new Error('no 127.0.0.X with ports 443, 8883, 5671 and 10000 free');
}

// The banner's "Event Hub-compatible endpoint: Endpoint=sb://<hostname>/;...", pointed at the
// address the emulator binds (its hostname, localhost, resolves elsewhere).
function eventHubConnectionString(log, address) {
  const match = /^Event Hub-compatible endpoint: (Endpoint=sb:\/\/[^/]+\/;\S+)$/m.exec(log);
  if (!match) throw new Error('emulator banner has no "Event Hub-compatible endpoint:" line');
  return match[1].replace(/^Endpoint=sb:\/\/[^/]+\//, `Endpoint=sb://${address}/`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function tail(file, lines = 60) {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
  } catch {
    return '<no log>';
  }
}

async function startEmulator() {
  if (!fs.existsSync(binary)) throw new Error(`emulator binary not found: ${binary} (run cargo build --locked)`);
  fs.mkdirSync(logDir, { recursive: true });
  let lastError = 'no attempt';
  for (let attempt = 0; attempt < 5; attempt++) {
    const address = await pickAddress();
    const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'iothub-e2e-node-'));
    const certsDir = path.join(workDir, 'certs');
    const args = ['--bind', address, '--hostname', 'localhost', '--certs-dir', certsDir,
      '--storage-connection-string', storageConnectionString(address), '--config', ROUTING_CONFIG];
    const logPath = path.join(logDir, `node-emulator-${address}.log`);
    const fd = fs.openSync(logPath, 'w');
    fs.writeSync(fd, `$ ${binary} ${args.join(' ')}\n`);
    const child = spawn(binary, args, { stdio: ['ignore', fd, fd] });
    fs.closeSync(fd);
    let exited = false;
    child.once('exit', () => { exited = true; });

    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline && !exited) {
      const log = fs.readFileSync(logPath, 'utf8');
      if (log.includes(READY)) {
        try {
          const caPath = path.join(certsDir, 'ca.pem');
          if (!fs.existsSync(caPath)) throw new Error(`emulator ready but ${caPath} is missing`);
          return { child, address, caPath, logPath, workDir, eventHubConnectionString: eventHubConnectionString(log, address) };
        } catch (e) {
          await stop(child);
          throw e;
        }
      }
      await sleep(50);
    }
    if (!exited) await stop(child);
    fs.rmSync(workDir, { recursive: true, force: true });
    lastError = `${exited ? `exited (${child.exitCode})` : 'not ready in 60 s'}; log ${logPath}:\n${tail(logPath, 40)}`;
  }
  throw new Error(`could not start the emulator: ${lastError}`);
}

function connects(address, port) {
  return new Promise((resolve) => {
    const socket = net.connect({ host: address, port }, () => { socket.destroy(); resolve(true); });
    socket.once('error', () => resolve(false));
  });
}

// Azurite's blob service on the emulator's address, with the emulator's server certificate.
async function startAzurite(emulator) {
  const bin = path.join(here, 'node_modules', 'azurite', 'dist', 'src', 'blob', 'main.js');
  if (!fs.existsSync(bin)) throw new Error(`azurite not installed: ${bin} (run npm ci)`);
  const certsDir = path.dirname(emulator.caPath);
  const args = [bin, '--blobHost', emulator.address, '--blobPort', String(AZURITE_PORT),
    '--cert', path.join(certsDir, 'server.pem'), '--key', path.join(certsDir, 'server.key'),
    '--location', path.join(emulator.workDir, 'azurite'), '--silent', '--loose', '--skipApiVersionCheck', '--disableTelemetry'];
  const logPath = path.join(logDir, `node-azurite-${emulator.address}.log`);
  const fd = fs.openSync(logPath, 'w');
  const child = spawn(process.execPath, args, { stdio: ['ignore', fd, fd] });
  fs.closeSync(fd);
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline && child.exitCode === null) {
    if (await connects(emulator.address, AZURITE_PORT)) return { child, logPath };
    await sleep(100);
  }
  await stop(child);
  throw new Error(`azurite did not start; log ${logPath}:\n${tail(logPath, 40)}`);
}

async function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const done = await Promise.race([exited.then(() => true), sleep(10_000).then(() => false)]);
  if (!done) {
    child.kill('SIGKILL');
    await exited;
  }
}

// Arguments starting with '-' go to `node --test` (e.g. --test-name-pattern=close); the rest
// are test files.
const args = process.argv.slice(2);
const flags = args.filter((a) => a.startsWith('-'));
const files = args.filter((a) => !a.startsWith('-'));
const testFiles = files.length
  ? files
  : fs.readdirSync(here).filter((f) => f.endsWith('.test.js')).sort();

if (testFiles.length === 0) {
  console.error('no *.test.js files found');
  process.exit(1);
}

const emulator = await startEmulator();
console.log(`# emulator ${emulator.address} (log ${path.relative(process.cwd(), emulator.logPath)})`);
let azurite;
try {
  azurite = await startAzurite(emulator);
} catch (e) {
  await stop(emulator.child);
  throw e;
}

let status = 1;
try {
  // --test-force-exit: a file whose tests are done exits even if a client the server never
  // let close still holds a socket (a hang there would stall the whole run).
  const runner = spawn(process.execPath, ['--test', '--test-concurrency=1', '--test-force-exit', ...flags, ...testFiles], {
    cwd: here,
    stdio: 'inherit',
    env: {
      ...process.env,
      NODE_EXTRA_CA_CERTS: emulator.caPath,
      IOTHUB_E2E_ADDRESS: emulator.address,
      IOTHUB_E2E_CA_PATH: emulator.caPath,
      IOTHUB_E2E_DEVICE_HOSTNAME: 'localhost',
      IOTHUB_E2E_STORAGE_CONNECTION_STRING: storageConnectionString(emulator.address),
      IOTHUB_E2E_EVENTHUB_CONNECTION_STRING: emulator.eventHubConnectionString,
    },
  });
  const forward = (signal) => runner.kill(signal);
  process.on('SIGINT', forward);
  process.on('SIGTERM', forward);
  status = await new Promise((resolve) => runner.once('exit', (code, signal) => resolve(code ?? (signal ? 1 : 0))));
} finally {
  await stop(azurite.child);
  await stop(emulator.child);
  fs.rmSync(emulator.workDir, { recursive: true, force: true });
}
if (status !== 0) {
  console.log(`# emulator log tail (${emulator.logPath}):\n${tail(emulator.logPath)}`);
}
process.exit(status);
