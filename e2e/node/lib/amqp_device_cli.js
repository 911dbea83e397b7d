#!/usr/bin/env node
// A Node AMQP device for the Python suite's cross-SDK tests (e2e/python/test_amqp.py):
// azure-iot-device 1.18.4 `Client` with azure-iot-device-amqp 1.14.4 `Amqp` (or `AmqpWs`),
// unchanged, retries off. It is not a test file: Python spawns it with NODE_EXTRA_CA_CERTS set
// (Node reads that variable only at start-up) and reads its stdout.
//
//   node lib/amqp_device_cli.js '<json>'
//
// JSON: { "connectionString": "...", "transport": "Amqp" | "AmqpWs",
//         "receive": <number of C2D messages to wait for, each completed>,
//         "send": [ { "body", "messageId", "correlationId", "contentType", "contentEncoding",
//                     "properties": { k: v } } ],
//         "timeoutMs": <overall limit> }
//
// Output: one JSON object a line:
//   {"event":"open"}                  connected and authenticated (CBS put-token accepted)
//   {"event":"listening"}             on('message') registered (the C2D link attaches now)
//   {"event":"message", ...}          a C2D message (data, messageId, ..., properties), then completed
//   {"event":"completed","messageId"} its complete() settled
//   {"event":"sent","messageId"}      a sendEvent was accepted
//   {"event":"done"}                  everything asked for happened; exit 0
//   {"event":"error","name","message"} then exit 1; the overall timeout exits 2.
'use strict';

const { Client, Message } = require('azure-iot-device');
const { Amqp, AmqpWs } = require('azure-iot-device-amqp');
const { NoRetry } = require('azure-iot-common');

const config = JSON.parse(process.argv[2] || '{}');
const emit = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);

function propertiesOf(message) {
  const out = {};
  for (let i = 0; i < message.properties.count(); i++) {
    const { key, value } = message.properties.getItem(i);
    out[key] = value;
  }
  return out;
}

async function main() {
  const Transport = config.transport === 'AmqpWs' ? AmqpWs : Amqp;
  const client = Client.fromConnectionString(config.connectionString, Transport);
  client.setRetryPolicy(new NoRetry());
  client.on('error', (err) => emit({ event: 'error', name: err.constructor.name, message: String(err.message) }));

  const timer = setTimeout(() => {
    emit({ event: 'error', name: 'Timeout', message: `not done after ${config.timeoutMs} ms` });
    process.exit(2);
  }, config.timeoutMs || 30_000);

  await client.open();
  emit({ event: 'open' });

  const wanted = config.receive || 0;
  let received = 0;
  const allReceived = new Promise((resolve, reject) => {
    if (wanted === 0) return resolve();
    client.on('message', (msg) => {
      emit({
        event: 'message',
        data: msg.data === undefined ? null : Buffer.from(msg.data).toString('utf8'),
        messageId: msg.messageId,
        correlationId: msg.correlationId,
        contentType: msg.contentType || null,
        contentEncoding: msg.contentEncoding || null,
        ack: msg.ack || null,
        expiryTimeUtc: msg.expiryTimeUtc === undefined ? null : String(msg.expiryTimeUtc),
        properties: propertiesOf(msg),
      });
      client.complete(msg).then(() => {
        emit({ event: 'completed', messageId: msg.messageId });
        received += 1;
        if (received >= wanted) resolve();
      }, reject);
    });
    emit({ event: 'listening' });
  });

  for (const spec of config.send || []) {
    const message = new Message(spec.body);
    if (spec.messageId) message.messageId = spec.messageId;
    if (spec.correlationId) message.correlationId = spec.correlationId;
    if (spec.contentType) message.contentType = spec.contentType;
    if (spec.contentEncoding) message.contentEncoding = spec.contentEncoding;
    for (const [k, v] of Object.entries(spec.properties || {})) message.properties.add(k, v);
    await client.sendEvent(message);
    emit({ event: 'sent', messageId: spec.messageId || null });
  }

  await allReceived;
  await client.close();
  clearTimeout(timer);
  emit({ event: 'done' });
}

main().then(
  () => process.exit(0),
  (err) => {
    emit({ event: 'error', name: err.constructor.name, message: String(err.message) });
    process.exit(1);
  },
);
