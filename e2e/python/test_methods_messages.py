"""Direct methods, device-to-cloud telemetry and cloud-to-device messages, driven by
azure-iot-device 2.14.0 (aio clients) and azure-iot-hub 2.7.0, unchanged, over MQTT/TLS.

- Direct methods (shared/protocol.md C.4, C.7, E.2): `IoTHubRegistryManager.invoke_device_method`
  and `invoke_device_module_method` with `CloudToDeviceMethod`, answered by the device's
  `on_method_request_received` handler with `send_method_response`. Offline → 404
  (DeviceNotOnline), a handler that never answers → 504 (GatewayTimeout).
- Telemetry (C.4, C.5): `send_message` / `send_message_to_output`, read back through the
  emulator's control API `GET /_emulator/telemetry`. Every property must round-trip intact.
- Cloud-to-device: `POST /_emulator/devices/{id}/messages` (PY-HUB's `send_c2d_message` uses
  AMQP, which the emulator does not speak), received by `on_message_received`; the PUBACK
  completes it (`cloudToDeviceMessageCount` back to 0). Queued while offline, delivered later.
  Queue depth 50 → 403 DeviceMaximumQueueDepthExceeded.
- Control API extras: health, ca.pem, auth on the rest, and reset (on a dedicated emulator,
  because reset wipes everything the session's other tests created).

Every SDK call runs under asyncio.wait_for, and retries are off (`connection_retry=False`).
"""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
import requests
from msrest.exceptions import HttpOperationError

from azure.iot.device import Message, MethodResponse
from azure.iot.device.aio import IoTHubDeviceClient, IoTHubModuleClient
from azure.iot.hub.models import CloudToDeviceMethod
from emulator import (
    OWNER_KEY,
    OWNER_POLICY,
    STEP_TIMEOUT,
    TRICKY_PROPERTIES,
    run,
    service_sas_token,
    start_emulator,
    step,
    unique_id,
)



def http_status(excinfo) -> int:
    return excinfo.value.response.status_code


# --- control API helpers ------------------------------------------------------------------


def control(hub, method: str, path: str, *, auth: bool = True, timeout: float = 15, **kwargs):
    headers = kwargs.pop("headers", {})
    if auth:
        headers["Authorization"] = service_sas_token(hub.address, OWNER_POLICY, OWNER_KEY)
    return requests.request(
        method, hub.base_url + path, headers=headers, verify=str(hub.ca_path), timeout=timeout, **kwargs
    )


def read_telemetry(hub, device_id: str, module_id: str | None = None, *, after: int = 0, wait: int = 5, limit=None):
    params = {"deviceId": device_id, "after": after, "wait": wait}
    if module_id is not None:
        params["moduleId"] = module_id
    if limit is not None:
        params["limit"] = limit
    response = control(hub, "GET", "/_emulator/telemetry", params=params, timeout=wait + 10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_messages(hub, device_id: str, count: int, module_id: str | None = None, timeout: float = 10):
    """Long-polls the telemetry log until `count` messages of this identity are there."""
    deadline = time.monotonic() + timeout
    found, after = [], 0
    while len(found) < count and time.monotonic() < deadline:
        page = read_telemetry(hub, device_id, module_id, after=after, wait=2)
        found += page["messages"]
        after = page["next"]
    return found


def send_c2d(hub, device_id: str, body: dict):
    return control(hub, "POST", f"/_emulator/devices/{device_id}/messages", json=body)


class Inbox:
    """Collects what an SDK handler (running on an SDK thread) receives into an asyncio queue."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self, timeout: float = 10):
        return await asyncio.wait_for(self.queue.get(), timeout)


def device_client(hub, device, **kwargs):
    conn_str = hub.device_connection_string(device.device_id, device.authentication.symmetric_key.primary_key)
    return IoTHubDeviceClient.create_from_connection_string(
        conn_str, server_verification_cert=hub.ca_pem, connection_retry=False, **kwargs
    )


def module_client(hub, device, module):
    conn_str = hub.device_connection_string(
        device.device_id, module.authentication.symmetric_key.primary_key, module.module_id
    )
    return IoTHubModuleClient.create_from_connection_string(
        conn_str, server_verification_cert=hub.ca_pem, connection_retry=False
    )


# --- direct methods -----------------------------------------------------------------------


def method_scenario(registry, client, invoke):
    """Connect `client`, answer one method call, and check what both sides saw."""

    async def scenario():
        inbox = Inbox()

        async def handler(request):
            inbox.put((request.name, request.payload))
            response = MethodResponse.create_from_method_request(
                request, 201, {"echo": request.payload, "from": "device", "unicode": "\u00fc\u2713"}
            )
            await client.send_method_response(response)

        try:
            await step(client.connect())
            # The setter returns once the SUBSCRIBE to $iothub/methods/POST/# is acknowledged.
            client.on_method_request_received = handler
            payload = {"delay": 5, "nested": {"list": [1, 2, "three"], "flag": True}, "text": "a&b=c +"}
            result = await asyncio.to_thread(
                invoke,
                CloudToDeviceMethod(
                    method_name="reboot-now",
                    payload=payload,
                    response_timeout_in_seconds=10,
                    connect_timeout_in_seconds=0,
                ),
            )
            name, seen_payload = await inbox.get()
            assert name == "reboot-now"
            assert seen_payload == payload
            assert result.status == 201
            assert result.payload == {"echo": payload, "from": "device", "unicode": "\u00fc\u2713"}
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_module_method_round_trip(hub, registry, new_module):
    device, module = new_module("meth")
    client = module_client(hub, device, module)
    method_scenario(
        registry,
        client,
        lambda req: registry.invoke_device_module_method(device.device_id, module.module_id, req),
    )


def test_device_method_round_trip(hub, registry, new_device):
    device = new_device("meth")
    client = device_client(hub, device)
    method_scenario(registry, client, lambda req: registry.invoke_device_method(device.device_id, req))


def test_method_scalar_and_null_payloads(hub, registry, new_device):
    """A string payload reaches the device as that string; a response payload of None is
    sent as JSON null (PY-DEV json.dumps) and comes back as None."""
    device = new_device("methnull")
    client = device_client(hub, device)

    async def scenario():
        inbox = Inbox()

        async def handler(request):
            inbox.put(request.payload)
            await client.send_method_response(MethodResponse.create_from_method_request(request, 200, None))

        try:
            await step(client.connect())
            client.on_method_request_received = handler
            result = await asyncio.to_thread(
                registry.invoke_device_method,
                device.device_id,
                CloudToDeviceMethod(method_name="ping", payload="just text", response_timeout_in_seconds=10),
            )
            assert await inbox.get() == "just text"
            assert result.status == 200
            assert result.payload is None
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_method_on_offline_device_is_404(registry, new_device, raw):
    device = new_device("methoff")
    request = CloudToDeviceMethod(method_name="reboot", payload={}, response_timeout_in_seconds=5)
    with pytest.raises(HttpOperationError) as excinfo:
        registry.invoke_device_method(device.device_id, request)
    assert http_status(excinfo) == 404
    # The error code, as the hub reports it (shared/protocol.md F: 404103 DeviceNotOnline).
    response = raw.request(
        "POST",
        f"/twins/{device.device_id}/methods",
        json={"methodName": "reboot", "payload": {}, "responseTimeoutInSeconds": 5},
    )
    assert response.status_code == 404
    assert "DeviceNotOnline" in response.text or "404103" in response.text, response.text


def test_method_on_connected_but_unsubscribed_device_is_404(hub, registry, new_device):
    device = new_device("methnosub")
    client = device_client(hub, device)

    async def scenario():
        try:
            await step(client.connect())
            request = CloudToDeviceMethod(method_name="reboot", payload={}, response_timeout_in_seconds=5)
            with pytest.raises(HttpOperationError) as excinfo:
                await asyncio.to_thread(registry.invoke_device_method, device.device_id, request)
            assert http_status(excinfo) == 404
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_method_that_is_never_answered_is_504(hub, registry, new_module):
    device, module = new_module("methslow")
    client = module_client(hub, device, module)

    async def scenario():
        inbox = Inbox()
        try:
            await step(client.connect())
            client.on_method_request_received = lambda request: inbox.put(request.name)  # never answers
            request = CloudToDeviceMethod(method_name="hang", payload={"x": 1}, response_timeout_in_seconds=5)
            started = time.monotonic()
            with pytest.raises(HttpOperationError) as excinfo:
                await asyncio.wait_for(
                    asyncio.to_thread(registry.invoke_device_module_method, device.device_id, module.module_id, request),
                    30,
                )
            elapsed = time.monotonic() - started
            assert http_status(excinfo) == 504
            assert 4.0 <= elapsed <= 15.0, f"504 after {elapsed:.1f}s, expected about 5s"
            assert await inbox.get() == "hang"  # the device did get the request
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


# --- telemetry ----------------------------------------------------------------------------


def test_device_telemetry_with_properties_reaches_the_control_api(hub, new_device):
    device = new_device("d2c")
    client = device_client(hub, device)
    body = '{"temperature": 21.5, "text": "h\u00e9llo"}'

    async def scenario():
        try:
            await step(client.connect())
            message = Message(body)
            message.message_id = "mid-" + unique_id("m")
            message.correlation_id = "corr/1 +&="
            message.content_type = "application/json"
            message.content_encoding = "utf-8"
            message.custom_properties = dict(TRICKY_PROPERTIES)
            await step(client.send_message(message))
            plain = Message(b"\x00\x01\xfe\xff binary")
            await step(client.send_message(plain))
            return message
        finally:
            await step(client.shutdown(), timeout=20)

    sent = run(scenario())
    messages = wait_for_messages(hub, device.device_id, 2)
    assert len(messages) == 2, messages
    first, second = messages
    assert first["sequenceNumber"] < second["sequenceNumber"]

    assert first["deviceId"] == device.device_id
    assert first["moduleId"] is None
    assert first["outputName"] is None
    assert first["body"] == body
    assert base64.b64decode(first["bodyBase64"]) == body.encode()
    assert first["properties"] == TRICKY_PROPERTIES
    system = first["systemProperties"]
    assert system["message-id"] == sent.message_id
    assert system["correlation-id"] == "corr/1 +&="
    assert system["content-type"] == "application/json"
    assert system["content-encoding"] == "utf-8"
    assert system["iothub-connection-device-id"] == device.device_id
    assert "iothub-connection-module-id" not in system
    assert system["iothub-connection-auth-method"] == "SAS"
    assert system["iothub-enqueuedtime"] == first["enqueuedTime"]
    assert "iothub-outputname" not in system

    # A body that is not UTF-8 has no text form, only base64.
    assert second["body"] is None
    assert base64.b64decode(second["bodyBase64"]) == b"\x00\x01\xfe\xff binary"
    assert second["properties"] == {}
    assert "message-id" not in second["systemProperties"]


def test_telemetry_paging_with_after_and_limit(hub, new_device):
    device = new_device("d2cpage")
    client = device_client(hub, device)

    async def scenario():
        try:
            await step(client.connect())
            for i in range(5):
                await step(client.send_message(Message(f"msg {i}")))
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())
    page1 = read_telemetry(hub, device.device_id, limit=2, wait=0)
    assert [m["body"] for m in page1["messages"]] == ["msg 0", "msg 1"]
    assert page1["next"] == page1["messages"][-1]["sequenceNumber"]
    assert page1["lastSequenceNumber"] >= page1["next"]
    page2 = read_telemetry(hub, device.device_id, after=page1["next"], limit=10, wait=0)
    assert [m["body"] for m in page2["messages"]] == ["msg 2", "msg 3", "msg 4"]
    # Nothing newer: an empty page that keeps `next` where it was, after at most `wait` s.
    started = time.monotonic()
    page3 = read_telemetry(hub, device.device_id, after=page2["next"], wait=1)
    assert page3["messages"] == []
    assert page3["next"] == page2["next"]
    assert time.monotonic() - started < 8


def test_telemetry_long_poll_returns_when_a_message_arrives(hub, new_device):
    device = new_device("d2cwait")
    client = device_client(hub, device)
    last = read_telemetry(hub, device.device_id, wait=0)["lastSequenceNumber"]

    async def scenario():
        try:
            await step(client.connect())
            poll = asyncio.create_task(asyncio.to_thread(read_telemetry, hub, device.device_id, after=last, wait=20))
            await asyncio.sleep(1)
            assert not poll.done(), "the long poll returned before any message was sent"
            started = time.monotonic()
            await step(client.send_message(Message("wake up")))
            page = await asyncio.wait_for(poll, 25)
            assert time.monotonic() - started < 5, "the long poll did not wake up on the new message"
            assert [m["body"] for m in page["messages"]] == ["wake up"]
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_module_output_message_reaches_the_control_api(hub, new_module):
    device, module = new_module("out")
    client = module_client(hub, device, module)

    async def scenario():
        try:
            await step(client.connect())
            message = Message('{"alert":"high temp"}', message_id="out-mid-1", content_type="application/json",
                              content_encoding="utf-8")
            message.custom_properties = {"severity": "high", "a&b=c": "1+2 3"}
            await step(client.send_message_to_output(message, "out1"))
            await step(client.send_message(Message("plain module telemetry")))
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())
    messages = wait_for_messages(hub, device.device_id, 2, module_id=module.module_id)
    assert len(messages) == 2, messages
    output, plain = messages
    assert output["deviceId"] == device.device_id
    assert output["moduleId"] == module.module_id
    assert output["outputName"] == "out1"
    assert output["body"] == '{"alert":"high temp"}'
    assert output["properties"] == {"severity": "high", "a&b=c": "1+2 3"}
    system = output["systemProperties"]
    assert system["iothub-outputname"] == "out1"
    assert system["message-id"] == "out-mid-1"
    assert system["content-type"] == "application/json"
    assert system["content-encoding"] == "utf-8"
    assert system["iothub-connection-device-id"] == device.device_id
    assert system["iothub-connection-module-id"] == module.module_id
    assert system["iothub-connection-auth-method"] == "SAS"

    assert plain["moduleId"] == module.module_id
    assert plain["outputName"] is None
    assert "iothub-outputname" not in plain["systemProperties"]
    assert plain["body"] == "plain module telemetry"


# --- cloud to device ----------------------------------------------------------------------


def c2d_count(registry, device_id: str) -> int:
    return registry.get_device(device_id).cloud_to_device_message_count


async def wait_for_count(registry, device_id: str, expected: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = await asyncio.to_thread(c2d_count, registry, device_id)
        if count == expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.2)


def test_c2d_message_reaches_the_device_client_and_is_completed(hub, registry, new_device):
    device = new_device("c2d")
    client = device_client(hub, device)
    properties = dict(TRICKY_PROPERTIES)

    async def scenario():
        inbox = Inbox()
        try:
            await step(client.connect())
            client.on_message_received = inbox.put
            response = await asyncio.to_thread(
                send_c2d,
                hub,
                device.device_id,
                {
                    "body": "hello device \u2713",
                    "messageId": "c2d-mid-1",
                    "correlationId": "c2d-corr-1",
                    "contentType": "text/plain",
                    "contentEncoding": "utf-8",
                    "ttlSeconds": 600,
                    "ack": "full",
                    "properties": properties,
                },
            )
            assert response.status_code == 200, response.text
            assert response.json() == {"messageId": "c2d-mid-1"}
            message = await inbox.get()
            assert message.data == "hello device \u2713".encode()
            assert message.message_id == "c2d-mid-1"
            assert message.correlation_id == "c2d-corr-1"
            assert message.content_type == "text/plain"
            assert message.content_encoding == "utf-8"
            assert message.ack == "full"
            assert message.custom_properties == properties
            assert message.expiry_time_utc, "no $.exp on the delivery"
            # The SDK PUBACKs on receipt; that completes the message.
            assert await wait_for_count(registry, device.device_id, 0) == 0
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_c2d_json_and_base64_bodies(hub, registry, new_device):
    device = new_device("c2dbody")
    client = device_client(hub, device)

    async def scenario():
        inbox = Inbox()
        try:
            await step(client.connect())
            client.on_message_received = inbox.put
            r1 = await asyncio.to_thread(send_c2d, hub, device.device_id, {"body": {"cmd": "on", "level": 3}})
            r2 = await asyncio.to_thread(
                send_c2d, hub, device.device_id, {"bodyBase64": base64.b64encode(b"\x00\xffbin").decode()}
            )
            assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
            generated = r1.json()["messageId"]
            assert generated, "no generated messageId"
            first, second = await inbox.get(), await inbox.get()
            assert first.message_id == generated
            import json

            assert json.loads(first.data) == {"cmd": "on", "level": 3}
            assert second.data == b"\x00\xffbin"
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_c2d_sent_before_the_device_connects_is_delivered_on_subscribe(hub, registry, new_device):
    device = new_device("c2dq")
    for i in range(3):
        response = send_c2d(hub, device.device_id, {"body": f"queued {i}", "properties": {"n": str(i)}})
        assert response.status_code == 200, response.text
    assert c2d_count(registry, device.device_id) == 3
    client = device_client(hub, device)

    async def scenario():
        inbox = Inbox()
        try:
            await step(client.connect())
            client.on_message_received = inbox.put
            got = [await inbox.get() for _ in range(3)]
            assert [m.data for m in got] == [b"queued 0", b"queued 1", b"queued 2"]
            assert [m.custom_properties for m in got] == [{"n": "0"}, {"n": "1"}, {"n": "2"}]
            assert await wait_for_count(registry, device.device_id, 0) == 0
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_c2d_sent_while_offline_is_delivered_on_reconnect(hub, registry, new_device):
    """Subscribed in a first connection (clean session off); the message is sent while the
    device is disconnected; the second connection gets it without the app doing anything."""
    device = new_device("c2drecon")
    client = device_client(hub, device)

    async def scenario():
        inbox = Inbox()
        try:
            await step(client.connect())
            client.on_message_received = inbox.put
            await step(client.disconnect())
            response = await asyncio.to_thread(send_c2d, hub, device.device_id, {"body": "while you were away"})
            assert response.status_code == 200, response.text
            assert await asyncio.to_thread(c2d_count, registry, device.device_id) == 1
            await step(client.connect())
            message = await inbox.get()
            assert message.data == b"while you were away"
            assert await wait_for_count(registry, device.device_id, 0) == 0
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_c2d_errors_unknown_device_and_queue_depth(hub, registry, new_device):
    response = send_c2d(hub, unique_id("ghost"), {"body": "x"})
    assert response.status_code == 404, response.text

    device = new_device("c2dfull")
    for i in range(50):
        response = send_c2d(hub, device.device_id, {"body": f"m{i}"})
        assert response.status_code == 200, (i, response.text)
    response = send_c2d(hub, device.device_id, {"body": "one too many"})
    assert response.status_code == 403, response.text
    assert "DeviceMaximumQueueDepthExceeded" in response.text or "403004" in response.text, response.text
    assert c2d_count(registry, device.device_id) == 50


def test_c2d_bad_requests_are_400(hub, new_device):
    device = new_device("c2dbad")
    for body in (
        {"body": "x", "bodyBase64": "eA=="},
        {"bodyBase64": "not base64!!"},
        {"ack": "sometimes"},
        {"ttlSeconds": 0},
        {"properties": {"k": 1}},
    ):
        response = send_c2d(hub, device.device_id, body)
        assert response.status_code == 400, (body, response.status_code, response.text)


# --- control API extras -------------------------------------------------------------------


def test_control_health_and_ca_need_no_auth(hub):
    health = control(hub, "GET", "/_emulator/health", auth=False)
    assert health.status_code == 200, health.text
    ca = control(hub, "GET", "/_emulator/ca.pem", auth=False)
    assert ca.status_code == 200
    assert ca.text == hub.ca_pem


def test_control_telemetry_and_c2d_need_the_owner_token(hub, new_device):
    device = new_device("ctlauth")
    assert control(hub, "GET", "/_emulator/telemetry", auth=False, params={"wait": 0}).status_code == 401
    response = control(hub, "POST", f"/_emulator/devices/{device.device_id}/messages", auth=False, json={"body": "x"})
    assert response.status_code == 401
    bad = service_sas_token(hub.address, OWNER_POLICY, base64.b64encode(b"\x02" * 32).decode())
    response = control(hub, "GET", "/_emulator/telemetry", auth=False, headers={"Authorization": bad}, params={"wait": 0})
    assert response.status_code == 401
    assert control(hub, "POST", "/_emulator/reset", auth=False).status_code == 401


def test_control_reset_on_a_dedicated_emulator():
    """Reset wipes the whole hub, so it runs on its own emulator, not the session's."""
    emulator = start_emulator()
    try:
        session = requests.Session()

        def call(method, path, **kwargs):
            headers = {"Authorization": service_sas_token(emulator.address, OWNER_POLICY, OWNER_KEY)}
            return session.request(
                method,
                emulator.base_url + path,
                params={"api-version": "2021-04-12"},
                headers=headers,
                verify=str(emulator.ca_path),
                timeout=15,
                **kwargs,
            )

        device_id = unique_id("reset")
        created = call("PUT", f"/devices/{device_id}", json={"deviceId": device_id})
        assert created.status_code == 200, created.text
        assert call("POST", f"/_emulator/devices/{device_id}/messages", json={"body": "x"}).status_code == 200
        assert call("GET", f"/devices/{device_id}").status_code == 200

        reset = call("POST", "/_emulator/reset")
        assert reset.status_code == 204, reset.text
        assert call("GET", f"/devices/{device_id}").status_code == 404
        stats = call("GET", "/statistics/devices")
        assert stats.status_code == 200 and stats.json()["totalDeviceCount"] == 0, stats.text
        # The hub still works after the reset.
        again = call("PUT", f"/devices/{device_id}", json={"deviceId": device_id})
        assert again.status_code == 200, again.text
        assert again.json()["cloudToDeviceMessageCount"] == 0
    finally:
        emulator.stop()
