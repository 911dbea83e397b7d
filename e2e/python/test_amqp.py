"""AMQP 1.0 (issue 9) with the official Python SDKs, unchanged, over TLS, plus the Node AMQP
device for the cross-SDK cases:

- Service-side cloud-to-device: `IoTHubRegistryManager.send_c2d_message(device_id, payload,
  properties={...})` (azure-iot-hub 2.7.0, uamqp 1.6.11, SASL MSSBCBS on 5671), received by
  - a Python `IoTHubDeviceClient` over MQTT/TLS (`on_message_received`): the custom properties
    and the system properties the SDK exposes (message_id, correlation_id, content_type,
    content_encoding, ack); the per-device queue is shared, so the MQTT PUBACK completes it;
  - a Node `Client` with azure-iot-device-amqp `Amqp` (e2e/node/lib/amqp_device_cli.js,
    spawned with NODE_EXTRA_CA_CERTS), which completes it over AMQP.
  - An unknown device makes `send_c2d_message` raise.
- The Event Hub-compatible endpoint: azure-eventhub 5.15.1 `EventHubConsumerClient`
  (pyamqp, SASL ANONYMOUS + CBS) reads the telemetry of a Python MQTT device and module and of a
  Node AMQP device, with the IoT Hub system properties (`iothub-connection-device-id`,
  `-module-id`, `iothub-enqueuedtime`, `x-opt-sequence-number`, `x-opt-offset`,
  `x-opt-enqueued-time`, `message-id`, `content-type`, `content-encoding`) and the application
  properties. Starting positions "-1" (from the start) and an enqueued time.

Every blocking SDK call runs under a time limit, and retries are off where the SDK allows it.
The SDK facts these rely on are in docs/amqp-sdk-notes.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import subprocess
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from azure.iot.device import Message
from azure.iot.device.aio import IoTHubDeviceClient, IoTHubModuleClient
from emulator import REPO_ROOT, STEP_TIMEOUT, TRICKY_PROPERTIES, run, step, unique_id

NODE_DIR = REPO_ROOT / "e2e" / "node"
NODE_CLI = NODE_DIR / "lib" / "amqp_device_cli.js"
PARTITION_IDS = ["0", "1", "2", "3"]


def call_with_timeout(fn, *args, timeout: float = 30.0, **kwargs):
    """Runs a blocking SDK call (uamqp) on a daemon thread; raises TimeoutError if it has not
    returned in `timeout` s, so a server that never answers fails the test instead of hanging
    it (the stuck thread cannot block interpreter exit)."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"call-{getattr(fn, '__name__', 'sdk')}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not return within {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class Inbox:
    """Collects what an SDK handler (on an SDK thread) receives into an asyncio queue."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self, timeout: float = 15):
        return await asyncio.wait_for(self.queue.get(), timeout)


def device_client(hub, device):
    conn_str = hub.device_connection_string(device.device_id, device.authentication.symmetric_key.primary_key)
    return IoTHubDeviceClient.create_from_connection_string(
        conn_str, server_verification_cert=hub.ca_pem, connection_retry=False
    )


def module_client(hub, device, module):
    conn_str = hub.device_connection_string(
        device.device_id, module.authentication.symmetric_key.primary_key, module.module_id
    )
    return IoTHubModuleClient.create_from_connection_string(
        conn_str, server_verification_cert=hub.ca_pem, connection_retry=False
    )


def wait_for_c2d_count(registry, device_id: str, expected: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = registry.get_device(device_id).cloud_to_device_message_count
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def c2d_sender(hub, monkeypatch):
    """A dedicated `IoTHubRegistryManager` for `send_c2d_message`.

    uamqp trusts a CA through OpenSSL's SSL_CERT_FILE (shared/protocol-amqp.md, CA table;
    `IoTHubRegistryManager` exposes no `verify`). Its AMQP connection opens on the first send
    and stays open until the manager is deleted, so each test gets its own manager and closes
    that connection at the end."""
    from azure.iot.hub import IoTHubRegistryManager

    monkeypatch.setenv("SSL_CERT_FILE", str(hub.ca_path))
    manager = IoTHubRegistryManager.from_connection_string(hub.service_connection_string())
    try:
        yield manager
    finally:
        try:
            call_with_timeout(manager.amqp_svc_client.disconnect_sync, timeout=10)
        except Exception:  # the emulator may have dropped it already
            pass


class NodeAmqpDevice:
    """e2e/node/lib/amqp_device_cli.js: a Node `Client` over `Amqp`/`AmqpWs`, one JSON event a
    line on stdout. Stopped by pid."""

    def __init__(self, hub, connection_string: str, *, transport: str = "Amqp", receive: int = 0,
                 send=(), timeout_ms: int = 45_000):
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not on PATH (the cross-SDK AMQP tests spawn a Node AMQP device)")
        if not (NODE_DIR / "node_modules" / "azure-iot-device-amqp").is_dir():
            pytest.fail(f"{NODE_DIR}/node_modules lacks azure-iot-device-amqp: run `npm ci` there (scripts/test.sh does)")
        config = {
            "connectionString": connection_string,
            "transport": transport,
            "receive": receive,
            "send": list(send),
            "timeoutMs": timeout_ms,
        }
        env = dict(os.environ)
        # Node reads NODE_EXTRA_CA_CERTS only at start-up (shared/protocol.md C.1).
        env["NODE_EXTRA_CA_CERTS"] = str(hub.ca_path)
        self.process = subprocess.Popen(
            [node, str(NODE_CLI), json.dumps(config)],
            cwd=NODE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.events: queue.Queue = queue.Queue()
        self.seen: list = []
        self.stderr_lines: list = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self):
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "output", "line": line.rstrip()})
        self.events.put({"event": "exit"})

    def _read_stderr(self):
        for line in self.process.stderr:
            self.stderr_lines.append(line.rstrip())

    def wait_for(self, name: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = self.events.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise AssertionError(self._describe(f"no '{name}' event within {timeout} s")) from None
            self.seen.append(event)
            if event.get("event") == name:
                return event
            if event.get("event") in ("error", "exit"):
                raise AssertionError(self._describe(f"waiting for '{name}', got {event}"))

    def _describe(self, what: str) -> str:
        return f"Node AMQP device: {what}; events {self.seen}; stderr {self.stderr_lines[-20:]}"

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture
def node_device(hub):
    """Factory for `NodeAmqpDevice`; every process is stopped by pid after the test."""
    started = []

    def make(*args, **kwargs):
        device = NodeAmqpDevice(hub, *args, **kwargs)
        started.append(device)
        return device

    yield make
    for device in started:
        device.stop()


# --- Event Hub-compatible endpoint helpers --------------------------------------------------


def eventhub_consumer(hub):
    from azure.eventhub.aio import EventHubConsumerClient

    # pyamqp loads only `connection_verify` (or certifi), never SSL_CERT_FILE
    # (shared/protocol-amqp.md, CA table). retry_total=0: a server error fails fast.
    return EventHubConsumerClient.from_connection_string(
        hub.eventhub_connection_string,
        consumer_group="$Default",
        connection_verify=str(hub.ca_path),
        retry_total=0,
    )


async def receive_events(hub, predicate, count: int, *, starting_position="-1", timeout: float = 30):
    """Receives from every partition until `count` events match `predicate` (or `timeout`
    passes: then the assertion names what arrived and any errors the SDK reported). Returns
    [(partition_id, event), ...] in arrival order."""
    client = eventhub_consumer(hub)
    found: list = []
    errors: list = []
    done = asyncio.Event()

    async def on_event(partition_context, event):
        if event is not None and predicate(event):
            found.append((partition_context.partition_id, event))
            if len(found) >= count:
                done.set()

    async def on_error(partition_context, error):
        errors.append((getattr(partition_context, "partition_id", None), repr(error)))

    task = asyncio.create_task(
        client.receive(on_event=on_event, on_error=on_error, starting_position=starting_position)
    )
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        await asyncio.wait_for(client.close(), 15)
        try:
            await asyncio.wait_for(task, 15)
        except Exception as exc:  # receive() ending with an error is reported below
            errors.append((None, repr(exc)))
    assert len(found) >= count, (
        f"{len(found)} of {count} events within {timeout} s; errors {errors}; "
        f"found {[(pid, e.system_properties) for pid, e in found]}"
    )
    return found


def from_device(device_id: str, module_id: str | None = None):
    def predicate(event) -> bool:
        sp = event.system_properties
        if sp.get(b"iothub-connection-device-id") != device_id.encode():
            return False
        return module_id is None or sp.get(b"iothub-connection-module-id") == module_id.encode()

    return predicate


def check_event_metadata(partition_id: str, event, *, device_id: str, module_id: str | None, sent_after: datetime):
    """What every event read from the Event Hub-compatible endpoint carries."""
    sp = event.system_properties
    assert partition_id in PARTITION_IDS
    assert sp[b"iothub-connection-device-id"] == device_id.encode()
    if module_id is None:
        assert b"iothub-connection-module-id" not in sp
    else:
        assert sp[b"iothub-connection-module-id"] == module_id.encode()
    assert b"iothub-enqueuedtime" in sp, sp
    assert isinstance(sp[b"x-opt-sequence-number"], int), sp
    assert event.sequence_number == sp[b"x-opt-sequence-number"]
    assert isinstance(sp[b"x-opt-offset"], bytes), sp  # a string on the wire
    assert event.offset is not None and event.offset.lstrip("-").isdigit(), event.offset
    assert isinstance(sp[b"x-opt-enqueued-time"], int), sp  # a timestamp on the wire
    enqueued = event.enqueued_time
    now = datetime.now(timezone.utc)
    assert sent_after - timedelta(seconds=5) <= enqueued <= now + timedelta(seconds=5), (enqueued, sent_after, now)


# --- cloud-to-device: send_c2d_message ----------------------------------------------------


def c2d_properties(message_id: str) -> dict:
    """send_c2d_message's `properties`: the system ones it maps to the AMQP properties section,
    `iothub-ack` (an application property, which IoT Hub reads as the ack request) and the
    custom ones."""
    return {
        "messageId": message_id,
        "correlationId": "corr/1 +&=",
        "contentType": "text/plain",
        "contentEncoding": "utf-8",
        "iothub-ack": "full",
        **TRICKY_PROPERTIES,
    }


@pytest.mark.timeout(90)
def test_amqp_send_c2d_message_reaches_a_python_mqtt_device(hub, registry, new_device, c2d_sender):
    device = new_device("amqpc2dpy")
    client = device_client(hub, device)
    message_id = unique_id("c2dmid")

    async def scenario():
        inbox = Inbox()
        try:
            await step(client.connect())
            client.on_message_received = inbox.put
            await asyncio.to_thread(
                call_with_timeout,
                c2d_sender.send_c2d_message,
                device.device_id,
                "hello from uamqp \u2713",
                properties=c2d_properties(message_id),
            )
            message = await inbox.get()
            assert message.data == "hello from uamqp \u2713".encode()
            assert message.message_id == message_id
            assert message.correlation_id == "corr/1 +&="
            assert message.content_type == "text/plain"
            assert message.content_encoding == "utf-8"
            assert message.ack == "full"
            assert message.custom_properties == TRICKY_PROPERTIES
            # The SDK PUBACKs on receipt; that completes the message in the shared queue.
            assert await asyncio.to_thread(wait_for_c2d_count, registry, device.device_id, 0) == 0
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())
    # `iothub-ack: full` left a Success record, which the HTTP runtime client reads under a
    # lock token (ETag) and completes.
    record = http_feedback_for(hub, message_id)
    assert record["statusCode"] == "Success" and record["deviceId"] == device.device_id, record


def http_feedback_for(hub, message_id: str, timeout: float = 15) -> dict:
    """Receives feedback batches with IoTHubHttpRuntimeManager (HTTPS), completing each, until
    one holds a record for `message_id`; returns that record."""
    from azure.iot.hub import IoTHubHttpRuntimeManager

    runtime = IoTHubHttpRuntimeManager.from_connection_string(hub.service_connection_string())
    operations = runtime.protocol.cloud_to_device_messages
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        raw = operations.receive_feedback_notification(raw=True)
        if raw.response.status_code == 204:
            time.sleep(0.2)
            continue
        batch = raw.response.json()
        seen.extend(batch)
        runtime.complete_feedback_notification(raw.response.headers["ETag"].strip('"'))
        for record in batch:
            if record["originalMessageId"] == message_id:
                return record
    raise AssertionError(f"no feedback for {message_id}; saw {seen}")


@pytest.mark.timeout(90)
def test_amqp_send_c2d_message_reaches_a_node_amqp_device(hub, registry, new_device, c2d_sender, node_device):
    device = new_device("amqpc2dnode")
    message_id = unique_id("c2dmid")
    node = node_device(
        hub.device_connection_string(device.device_id, device.authentication.symmetric_key.primary_key),
        receive=1,
    )
    node.wait_for("open")
    node.wait_for("listening")

    call_with_timeout(
        c2d_sender.send_c2d_message, device.device_id, "hello node over amqp \u2713",
        properties=c2d_properties(message_id),
    )

    got = node.wait_for("message")
    assert got["data"] == "hello node over amqp \u2713"
    assert got["messageId"] == message_id
    assert got["correlationId"] == "corr/1 +&="
    assert got["contentType"] == "text/plain"
    assert got["contentEncoding"] == "utf-8"
    assert got["properties"] == TRICKY_PROPERTIES
    node.wait_for("completed")
    assert wait_for_c2d_count(registry, device.device_id, 0) == 0
    node.wait_for("done")  # client.close(): the connection closes cleanly
    # The ack request reaches the device as over MQTT (`iothub-ack` → the SDK's msg.ack).
    assert got["ack"] == "full"


@pytest.mark.timeout(60)
def test_amqp_send_c2d_message_to_an_unknown_device_raises(hub, c2d_sender):
    started = time.monotonic()
    with pytest.raises(Exception) as excinfo:
        call_with_timeout(c2d_sender.send_c2d_message, unique_id("ghost"), "nobody home", timeout=30)
    # A refusal, not the helper's time limit (a server that never settles would be a bug too).
    assert not isinstance(excinfo.value, TimeoutError), excinfo.value
    assert time.monotonic() - started < 30


# --- Event Hub-compatible endpoint ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_amqp_eventhub_properties_name_four_partitions(hub):
    entity = dict(part.split("=", 1) for part in hub.eventhub_connection_string.split(";") if "=" in part)["EntityPath"]

    async def scenario():
        client = eventhub_consumer(hub)
        async with client:
            properties = await step(client.get_eventhub_properties())
            partition_ids = await step(client.get_partition_ids())
            partition = await step(client.get_partition_properties("0"))
        return properties, partition_ids, partition

    properties, partition_ids, partition = run(scenario())
    assert properties["eventhub_name"] == entity
    assert properties["partition_ids"] == PARTITION_IDS
    assert isinstance(properties["created_at"], datetime)
    assert partition_ids == PARTITION_IDS
    assert partition["eventhub_name"] == entity
    assert partition["id"] == "0"


@pytest.mark.timeout(120)
def test_amqp_eventhub_consumer_reads_python_mqtt_telemetry(hub, new_module):
    device, module = new_module("ehpy")
    device_id, module_id = device.device_id, module.module_id
    d_client = device_client(hub, device)
    m_client = module_client(hub, device, module)
    body = '{"temperature": 21.5, "text": "h\u00e9llo"}'
    # The second id looks like a UUID, as the SDKs' generated ids do: IoT Hub forwards it as
    # the string the device sent, not as an AMQP uuid.
    message_ids = [unique_id("ehmid"), str(uuid.uuid4())]
    sent_after = datetime.now(timezone.utc)

    async def send():
        try:
            await step(d_client.connect())
            await step(m_client.connect())
            for message_id in message_ids:
                message = Message(body, message_id=message_id, content_type="application/json", content_encoding="utf-8")
                message.correlation_id = "corr/1 +&="
                message.custom_properties = dict(TRICKY_PROPERTIES)
                await step(d_client.send_message(message))
            module_message = Message("module says hi", message_id="ehmod-1")
            module_message.custom_properties = {"severity": "high"}
            await step(m_client.send_message(module_message))
            # No id, no content type: no properties section at all (not one of nulls).
            await step(m_client.send_message(Message("bare")))
        finally:
            await step(d_client.shutdown(), timeout=20)
            await step(m_client.shutdown(), timeout=20)

    run(send())
    device_events = run(receive_events(hub, from_device(device_id), 4, starting_position="-1"))
    bare = [e for _, e in device_events if e.body_as_str() == "bare"]
    assert len(bare) == 1 and bare[0].message.properties is None, [e.message.properties for e in bare]
    device_events = [(pid, e) for pid, e in device_events if e.body_as_str() != "bare"]
    # The device's own two messages (its module's message also has its device id).
    own = [(pid, e) for pid, e in device_events if b"iothub-connection-module-id" not in e.system_properties]
    module_events = [(pid, e) for pid, e in device_events if b"iothub-connection-module-id" in e.system_properties]
    assert len(own) == 2 and len(module_events) == 1, [e.system_properties for _, e in device_events]

    for (partition_id, event), message_id in zip(own, message_ids):
        check_event_metadata(partition_id, event, device_id=device_id, module_id=None, sent_after=sent_after)
        sp = event.system_properties
        assert sp[b"message-id"] == message_id.encode()
        assert sp[b"correlation-id"] == b"corr/1 +&="
        assert sp[b"content-type"] == b"application/json"
        assert sp[b"content-encoding"] == b"utf-8"
        assert event.body_as_str() == body
        assert event.properties == {k.encode(): v.encode() for k, v in TRICKY_PROPERTIES.items()}
    # One device, one partition, in order.
    (p1, e1), (p2, e2) = own
    assert p1 == p2
    assert e1.sequence_number < e2.sequence_number
    assert e1.offset != e2.offset

    partition_id, event = module_events[0]
    check_event_metadata(partition_id, event, device_id=device_id, module_id=module_id, sent_after=sent_after)
    assert event.system_properties[b"message-id"] == b"ehmod-1"
    assert event.body_as_str() == "module says hi"
    assert event.properties == {b"severity": b"high"}


@pytest.mark.timeout(120)
def test_amqp_eventhub_consumer_reads_node_amqp_telemetry_from_an_enqueued_time(hub, new_device, node_device):
    device = new_device("ehnode")
    message_id = unique_id("ehnodemid")
    body = '{"humidity": 40, "text": "\u00fc\u2713"}'
    # An enqueued-time starting position (x-opt-enqueued-time filter) a little before the send.
    start = datetime.now(timezone.utc) - timedelta(seconds=2)
    node = node_device(
        hub.device_connection_string(device.device_id, device.authentication.symmetric_key.primary_key),
        send=[{
            "body": body,
            "messageId": message_id,
            "correlationId": "node-corr-1",
            "contentType": "application/json",
            "contentEncoding": "utf-8",
            "properties": TRICKY_PROPERTIES,
        }],
    )
    node.wait_for("open")
    node.wait_for("sent")

    [(partition_id, event)] = run(receive_events(hub, from_device(device.device_id), 1, starting_position=start))
    check_event_metadata(partition_id, event, device_id=device.device_id, module_id=None, sent_after=start)
    sp = event.system_properties
    assert sp[b"message-id"] == message_id.encode()
    assert sp[b"correlation-id"] == b"node-corr-1"
    assert sp[b"content-type"] == b"application/json"
    assert sp[b"content-encoding"] == b"utf-8"
    assert event.body_as_str() == body
    assert event.properties == {k.encode(): v.encode() for k, v in TRICKY_PROPERTIES.items()}
    node.wait_for("done")  # client.close(): the connection closes cleanly
