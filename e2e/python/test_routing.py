"""Message routing and IoT Hub's non-telemetry events (issue 19), read with the official
Event Hubs SDK (azure-eventhub 5.15.1, `EventHubConsumerClient`), with azure-iot-hub 2.7.0 and
azure-iot-device 2.14.0 making the changes.

One emulator for this module, started with a `[routing]` table:
- twin change, lifecycle and connection state events routed to the built-in endpoint;
- a custom endpoint `hot` (an Event Hub-compatible entity of its own) that gets device messages
  whose JSON body has `temperature > 30` or whose `level` property is `critical`, enriched
  with the device's `site` tag and the hub name;
- the fallback route on: device messages no route selects go to the built-in endpoint.

The rules checked are Microsoft's ("Azure IoT Hub non-telemetry event schemas", "IoT Hub
message routing query syntax", "Message enrichments"), not the emulator's code.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest

from azure.iot.device import Message
from azure.iot.device.aio import IoTHubDeviceClient
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties
from emulator import STEP_TIMEOUT, emulator_binary, run, start_emulator, step, unique_id

ROUTING_TOML = """\
[routing]
[[routing.endpoints]]
name = "hot"

[[routing.routes]]
name = "twins"
source = "TwinChangeEvents"
endpoints = ["events"]

[[routing.routes]]
name = "lifecycle"
source = "DeviceLifecycleEvents"
endpoints = ["events"]

[[routing.routes]]
name = "connections"
source = "DeviceConnectionStateEvents"
endpoints = ["events"]

[[routing.routes]]
name = "hot-telemetry"
source = "DeviceMessages"
condition = "$body.temperature > 30 OR level = 'critical'"
endpoints = ["hot"]

[[routing.enrichments]]
key = "site"
value = "$twin.tags.site"
endpoints = ["hot"]

[[routing.enrichments]]
key = "hub"
value = "$iothubname"
endpoints = ["hot"]
"""


@pytest.fixture(scope="module")
def routed_hub():
    emulator = start_emulator(config_toml=ROUTING_TOML)
    os.environ["REQUESTS_CA_BUNDLE"] = str(emulator.ca_path)
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def manager(routed_hub):
    return IoTHubRegistryManager.from_connection_string(routed_hub.service_connection_string())


def entity_connection_string(hub, entity: str) -> str:
    base = hub.eventhub_connection_string.rsplit(";EntityPath=", 1)[0]
    return f"{base};EntityPath={entity}"


def hub_name(hub) -> str:
    return hub.eventhub_connection_string.rsplit(";EntityPath=", 1)[1]


async def collect(hub, entity: str, predicate, count: int, timeout: float = 30.0) -> list:
    """Events of `entity` matching `predicate`, from the start, until `count` arrived (fails
    when fewer arrive within `timeout`; more may have arrived by then)."""
    from azure.eventhub.aio import EventHubConsumerClient

    client = EventHubConsumerClient.from_connection_string(
        entity_connection_string(hub, entity),
        consumer_group="$Default",
        connection_verify=str(hub.ca_path),
        retry_total=0,
    )
    found: list = []
    errors: list = []
    done = asyncio.Event()

    async def on_event(partition_context, event):
        if event is not None and predicate(event):
            found.append(event)
            if len(found) >= count:
                done.set()

    async def on_error(partition_context, error):
        errors.append(repr(error))

    task = asyncio.create_task(
        client.receive(on_event=on_event, on_error=on_error, starting_position="-1")
    )
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    finally:
        await asyncio.wait_for(client.close(), 15)
        try:
            await asyncio.wait_for(task, 15)
        except Exception as exc:
            errors.append(repr(exc))
    assert len(found) >= count, (
        f"{len(found)} of {count} events of {entity} within {timeout} s; errors {errors}; "
        f"found {[(e.system_properties, e.properties) for e in found]}"
    )
    return found


def of_device(device_id: str):
    return lambda e: e.system_properties.get(b"iothub-connection-device-id") == device_id.encode()


def props(event) -> dict:
    return {k.decode(): (v.decode() if isinstance(v, bytes) else v) for k, v in (event.properties or {}).items()}


def source(event) -> str:
    return event.system_properties[b"iothub-message-source"].decode()


def device_client(hub, device_id: str, key: str):
    return IoTHubDeviceClient.create_from_connection_string(
        hub.device_connection_string(device_id, key), server_verification_cert=hub.ca_pem, connection_retry=False
    )


@pytest.mark.timeout(180)
def test_lifecycle_twin_and_connection_events_reach_the_built_in_endpoint(routed_hub, manager):
    hub = routed_hub
    device_id = unique_id("events")
    device = manager.create_device_with_sas(device_id, None, None, "enabled")
    key = device.authentication.symmetric_key.primary_key
    manager.create_module_with_sas(device_id, "m1", None, None, None)

    twin = manager.get_twin(device_id)
    manager.update_twin(
        device_id, Twin(tags={"site": "north"}, properties=TwinProperties(desired={"interval": 5})), twin.etag
    )

    async def device_side():
        client = device_client(hub, device_id, key)
        try:
            await step(client.connect())
            await step(client.patch_twin_reported_properties({"fw": "1.2", "gone": None}))
        finally:
            await step(client.shutdown(), timeout=20)

    run(device_side())
    # The disconnect is recorded when the emulator sees the connection end: wait for it, so
    # that the events below come in a known order.
    for _ in range(100):
        if manager.get_device(device_id).connection_state == "Disconnected":
            break
        time.sleep(0.1)
    time.sleep(0.3)
    manager.replace_twin(device_id, Twin(tags={"site": "south"}, properties=TwinProperties(desired={"mode": "eco"})))
    manager.delete_module(device_id, "m1")
    manager.delete_device(device_id)

    # 2 created + 1 updateTwin (service) + connected + updateTwin (reported) + disconnected
    # + replaceTwin + 2 deleted.
    events = run(collect(hub, hub_name(hub), of_device(device_id), 9, timeout=40))
    summary = [(source(e), props(e).get("opType"), props(e).get("moduleId")) for e in events]
    assert summary == [
        ("deviceLifecycleEvents", "createDeviceIdentity", None),
        ("deviceLifecycleEvents", "createDeviceIdentity", "m1"),
        ("twinChangeEvents", "updateTwin", None),
        ("deviceConnectionStateEvents", "deviceConnected", None),
        ("twinChangeEvents", "updateTwin", None),
        ("deviceConnectionStateEvents", "deviceDisconnected", None),
        ("twinChangeEvents", "replaceTwin", None),
        ("deviceLifecycleEvents", "deleteDeviceIdentity", "m1"),
        ("deviceLifecycleEvents", "deleteDeviceIdentity", None),
    ], summary

    name = hub_name(hub)
    schemas = {
        "deviceLifecycleEvents": "deviceLifecycleNotification",
        "twinChangeEvents": "twinChangeNotification",
        "deviceConnectionStateEvents": "deviceConnectionStateNotification",
    }
    for e in events:
        p = props(e)
        sp = e.system_properties
        assert p["hubName"] == name and p["deviceId"] == device_id, p
        assert p["iothub-message-schema"] == schemas[source(e)], p
        assert "T" in p["operationTimestamp"] and p["operationTimestamp"].endswith("Z"), p
        assert sp[b"content-type"] == b"application/json" and sp[b"content-encoding"] == b"utf-8", sp
        assert sp[b"user-id"] == name.encode(), sp
        assert sp.get(b"correlation-id"), sp
        assert b"iothub-connection-auth-method" not in sp, sp

    created, module_created, service_patch, connected, reported, disconnected, replaced, module_deleted, deleted = (
        e.body_as_json() for e in events
    )
    assert created["deviceId"] == device_id and "moduleId" not in created
    assert created["properties"]["desired"]["$version"] == 1 and "etag" in created and "version" in created
    assert module_created["moduleId"] == "m1"
    assert events[1].system_properties[b"iothub-connection-module-id"] == b"m1"

    # An update carries the twin's version and what changed, with its metadata.
    assert service_patch["tags"] == {"site": "north"}
    desired = service_patch["properties"]["desired"]
    assert desired["interval"] == 5 and desired["$version"] == 2
    assert desired["$metadata"]["interval"]["$lastUpdatedVersion"] == 2
    assert "$lastUpdated" in desired["$metadata"]
    assert reported["properties"]["reported"]["fw"] == "1.2"
    assert reported["properties"]["reported"]["gone"] is None
    assert "fw" in reported["properties"]["reported"]["$metadata"]
    assert reported["version"] > service_patch["version"]

    # Connection state: a 64-digit hexadecimal sequence number that grows.
    seq = [connected["sequenceNumber"], disconnected["sequenceNumber"]]
    assert all(len(s) == 64 and int(s, 16) >= 0 for s in seq) and seq[0] < seq[1], seq

    # A replacement carries the whole twin document.
    assert replaced["deviceId"] == device_id and replaced["tags"] == {"site": "south"}
    assert replaced["properties"]["desired"]["mode"] == "eco"
    assert "interval" not in replaced["properties"]["desired"]
    assert replaced["properties"]["reported"]["fw"] == "1.2"
    assert deleted["deviceId"] == device_id and module_deleted["moduleId"] == "m1"


@pytest.mark.timeout(180)
def test_device_messages_go_to_the_endpoints_their_conditions_select(routed_hub, manager):
    hub = routed_hub
    device_id = unique_id("routed")
    device = manager.create_device_with_sas(device_id, None, None, "enabled")
    key = device.authentication.symmetric_key.primary_key
    twin = manager.get_twin(device_id)
    manager.update_twin(device_id, Twin(tags={"site": "north"}), twin.etag)

    def json_message(body: dict, message_id: str) -> Message:
        return Message(json.dumps(body), message_id=message_id, content_type="application/json", content_encoding="utf-8")

    async def send():
        client = device_client(hub, device_id, key)
        try:
            await step(client.connect())
            await step(client.send_message(json_message({"temperature": 35}, "hot-body")))
            await step(client.send_message(json_message({"temperature": 20}, "cool-body")))
            # JSON text, but not declared JSON: `$body` is undefined for it.
            await step(client.send_message(Message(json.dumps({"temperature": 99}), message_id="undeclared")))
            critical = Message("disk full", message_id="critical")
            critical.custom_properties = {"level": "critical"}
            await step(client.send_message(critical))
        finally:
            await step(client.shutdown(), timeout=20)

    run(send())
    hot = run(collect(hub, "hot", of_device(device_id), 2))
    assert [e.system_properties[b"message-id"] for e in hot] == [b"hot-body", b"critical"]
    for e in hot:
        p = props(e)
        assert p["site"] == "north" and p["hub"] == hub_name(hub), p
        assert source(e) == "Telemetry"
    assert hot[1].body_as_str() == "disk full" and props(hot[1])["level"] == "critical"

    # The built-in endpoint gets only what no route selected (the fallback route), without the
    # `hot` endpoint's enrichments; no hub event of this device is telemetry-sourced.
    built_in = run(
        collect(hub, hub_name(hub), lambda e: of_device(device_id)(e) and source(e) == "Telemetry", 2)
    )
    assert [e.system_properties[b"message-id"] for e in built_in] == [b"cool-body", b"undeclared"]
    assert all("site" not in props(e) for e in built_in)

    # The control API shows which route selected each message and where it went.
    import requests

    from emulator import service_sas_token, OWNER_KEY, OWNER_POLICY

    token = service_sas_token(hub.address, OWNER_POLICY, OWNER_KEY)
    log = requests.get(
        f"{hub.base_url}/_emulator/telemetry",
        params={"deviceId": device_id},
        headers={"Authorization": token},
        verify=str(hub.ca_path),
        timeout=STEP_TIMEOUT,
    ).json()["messages"]
    by_id = {m["systemProperties"]["message-id"]: m for m in log}
    assert by_id["hot-body"]["routes"] == ["hot-telemetry"]
    assert by_id["hot-body"]["endpoints"] == [{"name": "hot", "enrichments": {"site": "north", "hub": hub_name(hub)}}]
    assert by_id["cool-body"]["routes"] == ["$fallback"]
    assert by_id["cool-body"]["endpoints"] == [{"name": "events", "enrichments": {}}]


def test_a_bad_route_stops_start_up_with_the_file_line_and_reason(tmp_path):
    config = tmp_path / "hub.toml"
    config.write_text(
        '[routing]\n[[routing.routes]]\nname = "broken"\nsource = "DeviceMessages"\n'
        'condition = "temperature >"\nendpoints = ["events"]\n'
    )
    result = subprocess.run(
        [str(emulator_binary()), "--config", str(config), "--bind", "127.0.0.1", "--https-port", "0",
         "--mqtt-port", "0", "--amqp-port", "0", "--certs-dir", str(tmp_path / "certs")],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert f"{config}:2: route 'broken': condition: Syntax error" in result.stderr, result.stderr
