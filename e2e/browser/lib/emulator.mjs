// Starts and stops one iothub-emulator for the browser test, like e2e/node/run.mjs does: its
// default ports (443 HTTPS, 8883 MQTT/TLS, which the Python device SDK needs, 5671 AMQP/TLS)
// on a spare 127.0.0.X, a fresh certs dir, output in e2e/logs/browser-emulator-127.0.0.X.log,
// stopped by pid (SIGTERM, then SIGKILL).

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '..', '..', '..');
const binary = process.env.IOTHUB_EMULATOR_BIN || path.join(repoRoot, 'target', 'debug', 'iothub-emulator');
const logDir = path.join(repoRoot, 'e2e', 'logs');
const READY = 'iothub-emulator ready';
const PORTS = [443, 8883, 5671]; // HTTPS and MQTT/AMQP over WebSockets; MQTT/TLS; AMQP/TLS

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

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
  throw new Error('no 127.0.0.X with ports 443, 8883 and 5671 free');
}

export function tail(file, lines = 60) {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
  } catch {
    return '<no log>';
  }
}

export async function stopProcess(child, graceMs = 10_000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const done = await Promise.race([exited.then(() => true), sleep(graceMs).then(() => false)]);
  if (!done) {
    child.kill('SIGKILL');
    await exited;
  }
}

/** Starts the emulator; resolves to { child, address, caPath, logPath, workDir, stop() }. */
export async function startEmulator() {
  if (!fs.existsSync(binary)) throw new Error(`emulator binary not found: ${binary} (run cargo build --locked)`);
  fs.mkdirSync(logDir, { recursive: true });
  let lastError = 'no attempt';
  for (let attempt = 0; attempt < 5; attempt++) {
    const address = await pickAddress();
    const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'iothub-e2e-browser-'));
    const certsDir = path.join(workDir, 'certs');
    const args = ['--bind', address, '--hostname', 'localhost', '--certs-dir', certsDir];
    const logPath = path.join(logDir, `browser-emulator-${address}.log`);
    const fd = fs.openSync(logPath, 'w');
    fs.writeSync(fd, `$ ${binary} ${args.join(' ')}\n`);
    const child = spawn(binary, args, { stdio: ['ignore', fd, fd] });
    fs.closeSync(fd);
    let exited = false;
    child.once('exit', () => { exited = true; });
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline && !exited) {
      if (fs.readFileSync(logPath, 'utf8').includes(READY)) {
        const caPath = path.join(certsDir, 'ca.pem');
        if (!fs.existsSync(caPath)) throw new Error(`emulator ready but ${caPath} is missing`);
        return {
          child,
          address,
          caPath,
          logPath,
          workDir,
          async stop() {
            await stopProcess(child);
            fs.rmSync(workDir, { recursive: true, force: true });
          },
        };
      }
      await sleep(50);
    }
    if (!exited) await stopProcess(child);
    fs.rmSync(workDir, { recursive: true, force: true });
    lastError = `${exited ? `exited (${child.exitCode})` : 'not ready in 60 s'}; log ${logPath}:\n${tail(logPath, 40)}`;
  }
  throw new Error(`could not start the emulator: ${lastError}`);
}

/**
 * Connects to the emulator's HTTPS port, verifying its certificate against the emulator's CA
 * (and the address against its names), and returns the base64 SHA-256 of the server key's
 * SubjectPublicKeyInfo: what Chromium's --ignore-certificate-errors-spki-list pins. So the
 * browser trusts exactly the certificate that chains to the CA, and nothing else.
 */
export function verifiedServerSpki(address, caPath) {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: address, port: 443, ca: fs.readFileSync(caPath) }, () => {
      try {
        const cert = new crypto.X509Certificate(socket.getPeerCertificate().raw);
        const spki = cert.publicKey.export({ type: 'spki', format: 'der' });
        resolve(crypto.createHash('sha256').update(spki).digest('base64'));
      } catch (e) {
        reject(e);
      } finally {
        socket.end();
      }
    });
    socket.once('error', reject);
  });
}
