"""Device side of the module-twin seeds, driven by azure-iot-device 2.14.0 (aio clients,
unchanged) over MQTT/TLS on 8883 and MQTT over WebSockets on 443.

Seed flow proven here (004, Python, "Create a device application"), verbatim:
create_from_connection_string -> connect -> get_twin -> patch_twin_reported_properties ->
on_twin_desired_properties_patch_received gets the patch the backend wrote with
update_module_twin(..., etag). Then the backend sees the reported value. Run for a module
(IoTHubModuleClient) and for a device (IoTHubDeviceClient), over TCP and WebSockets.

Every SDK call runs under asyncio.wait_for, and retries are off (`connection_retry=False`)
except in the reconnect test, so a server bug fails fast instead of hiding behind a retry.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from azure.iot.device import exceptions as device_errors
from azure.iot.device.aio import IoTHubDeviceClient, IoTHubModuleClient
from azure.iot.hub.models import Twin, TwinProperties
from emulator import unique_id

STEP_TIMEOUT = 15  # seconds for any one SDK call
ISO_8601 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?(Z|[+-]\d\d:\d\d)$")

TRANSPORTS = pytest.mark.parametrize("websockets", [False, True], ids=["mqtt", "mqtt-ws"])


def run(coro):
    return asyncio.run(coro)


async def step(awaitable, timeout: float = STEP_TIMEOUT):
    return await asyncio.wait_for(awaitable, timeout)


def without_metadata(section: dict) -> dict:
    # The device-side twin needs no $metadata (protocol.md C.6); tolerate it if present.
    return {k: v for k, v in section.items() if k != "$metadata"}


class PatchInbox:
    """Collects desired-property patches delivered to the SDK's handler (which runs on an
    SDK thread) into an asyncio queue on the test's loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def handler(self, patch):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, patch)

    async def wait_for_version(self, version: int, timeout: float = 10) -> dict:
        """The first patch whose $version is `version` (skipping older ones, e.g. the
        SDK's artificial full-desired patch after a reconnect)."""

        async def wait():
            while True:
                patch = await self.queue.get()
                if patch.get("$version") == version:
                    return patch

        return await asyncio.wait_for(wait(), timeout)


def identity_for(kind: str, registry, new_device):
    """Create the identity under test; returns (client class, connection-string args, reader, updater)."""
    device = new_device("twin" + kind)
    if kind == "module":
        module = registry.create_module_with_sas(device.device_id, unique_id("mod"), None, None, None)
        key = module.authentication.symmetric_key.primary_key
        return (
            IoTHubModuleClient,
            (device.device_id, key, module.module_id),
            lambda: registry.get_module_twin(device.device_id, module.module_id),
            lambda patch, etag: registry.update_module_twin(device.device_id, module.module_id, patch, etag),
        )
    key = device.authentication.symmetric_key.primary_key
    return (
        IoTHubDeviceClient,
        (device.device_id, key, None),
        lambda: registry.get_twin(device.device_id),
        lambda patch, etag: registry.update_twin(device.device_id, patch, etag),
    )


@TRANSPORTS
@pytest.mark.parametrize("kind", ["module", "device"])
def test_seed_twin_flow(hub, registry, new_device, kind, websockets):
    client_class, (device_id, key, module_id), read_twin, update_twin = identity_for(kind, registry, new_device)
    conn_str = hub.device_connection_string(device_id, key, module_id)

    async def scenario():
        client = client_class.create_from_connection_string(
            conn_str,
            server_verification_cert=hub.ca_pem,
            websockets=websockets,
            connection_retry=False,
        )
        try:
            await step(client.connect())
            assert client.connected

            twin = await step(client.get_twin())
            assert set(twin) == {"desired", "reported"}, twin
            assert without_metadata(twin["desired"]) == {"$version": 1}
            assert without_metadata(twin["reported"]) == {"$version": 1}

            await step(client.patch_twin_reported_properties({"temperature": 42.5, "unit": {"scale": "C"}}))

            inbox = PatchInbox()
            client.on_twin_desired_properties_patch_received = inbox.handler

            service_twin = await asyncio.to_thread(read_twin)
            reported = service_twin.properties.reported
            assert reported["temperature"] == 42.5
            assert reported["unit"] == {"scale": "C"}
            assert reported["$version"] == 2
            assert ISO_8601.match(reported["$metadata"]["temperature"]["$lastUpdated"]), reported
            assert ISO_8601.match(reported["$metadata"]["unit"]["scale"]["$lastUpdated"]), reported
            assert "$lastUpdatedVersion" not in reported["$metadata"]["temperature"]

            updated = await asyncio.to_thread(
                update_twin, Twin(properties=TwinProperties(desired={"telemetryInterval": 122})), service_twin.etag
            )
            assert updated.properties.desired["$version"] == 2

            patch = await inbox.wait_for_version(2)
            assert patch == {"telemetryInterval": 122, "$version": 2}

            # A null in the service patch reaches the device as a null (deletion).
            await asyncio.to_thread(
                update_twin, Twin(properties=TwinProperties(desired={"telemetryInterval": None, "mode": "eco"})), None
            )
            patch = await inbox.wait_for_version(3)
            assert patch == {"telemetryInterval": None, "mode": "eco", "$version": 3}

            twin = await step(client.get_twin())
            assert without_metadata(twin["desired"]) == {"mode": "eco", "$version": 3}
            assert without_metadata(twin["reported"]) == {"temperature": 42.5, "unit": {"scale": "C"}, "$version": 2}

            # Reported null deletes.
            await step(client.patch_twin_reported_properties({"unit": None}))
            service_twin = await asyncio.to_thread(read_twin)
            assert "unit" not in service_twin.properties.reported
            assert service_twin.properties.reported["$version"] == 3
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


@TRANSPORTS
def test_connected_module_shows_connected_on_the_service_side(hub, registry, new_device, websockets):
    device = new_device()
    module = registry.create_module_with_sas(device.device_id, unique_id("mod"), None, None, None)
    conn_str = hub.device_connection_string(
        device.device_id, module.authentication.symmetric_key.primary_key, module.module_id
    )

    async def scenario():
        client = IoTHubModuleClient.create_from_connection_string(
            conn_str, server_verification_cert=hub.ca_pem, websockets=websockets, connection_retry=False
        )
        try:
            await step(client.connect())
            twin = await asyncio.to_thread(registry.get_module_twin, device.device_id, module.module_id)
            assert twin.connection_state == "Connected"
            fetched = await asyncio.to_thread(registry.get_module, device.device_id, module.module_id)
            assert fetched.connection_state == "Connected"
            await step(client.disconnect())
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


@TRANSPORTS
@pytest.mark.parametrize("kind", ["module", "device"])
def test_wrong_key_fails_connect_with_credential_error(hub, registry, new_device, kind, websockets):
    client_class, (device_id, _key, module_id), _, _ = identity_for(kind, registry, new_device)
    wrong_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    conn_str = hub.device_connection_string(device_id, wrong_key, module_id)

    async def scenario():
        client = client_class.create_from_connection_string(
            conn_str, server_verification_cert=hub.ca_pem, websockets=websockets, connection_retry=False
        )
        try:
            with pytest.raises(device_errors.CredentialError):
                await step(client.connect(), timeout=10)
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_unknown_module_fails_connect_with_credential_error(hub, registry, new_device):
    device = new_device()
    conn_str = hub.device_connection_string(
        device.device_id, device.authentication.symmetric_key.primary_key, unique_id("ghost")
    )

    async def scenario():
        client = IoTHubModuleClient.create_from_connection_string(
            conn_str, server_verification_cert=hub.ca_pem, connection_retry=False
        )
        try:
            with pytest.raises(device_errors.CredentialError):
                await step(client.connect(), timeout=10)
        finally:
            await step(client.shutdown(), timeout=20)

    run(scenario())


def test_desired_patches_still_arrive_after_a_server_side_drop(hub, registry, new_device):
    """Reconnect: the hub drops the module's connection (a second connection with the same
    identity takes the session over, protocol.md B "one connection per identity"). The SDK
    reconnects by itself with clean_session=0 and does NOT re-subscribe (protocol.md C.3),
    so desired patches keep arriving only if the emulator kept the session's subscriptions."""
    device = new_device()
    module = registry.create_module_with_sas(device.device_id, unique_id("mod"), None, None, None)
    conn_str = hub.device_connection_string(
        device.device_id, module.authentication.symmetric_key.primary_key, module.module_id
    )

    async def scenario():
        loop = asyncio.get_running_loop()
        states: asyncio.Queue = asyncio.Queue()
        client = IoTHubModuleClient.create_from_connection_string(
            conn_str, server_verification_cert=hub.ca_pem, connection_retry=True, connection_retry_interval=1
        )
        intruder = IoTHubModuleClient.create_from_connection_string(
            conn_str, server_verification_cert=hub.ca_pem, connection_retry=False
        )
        try:
            await step(client.connect())
            inbox = PatchInbox()
            client.on_twin_desired_properties_patch_received = inbox.handler
            client.on_connection_state_change = lambda: loop.call_soon_threadsafe(states.put_nowait, client.connected)

            # Take the session over, then let it go again.
            await step(intruder.connect())
            assert await step(states.get(), timeout=10) is False, "the first connection was not dropped"
            await step(intruder.disconnect(), timeout=20)
            assert await step(states.get(), timeout=20) is True, "the SDK did not reconnect"

            twin = await asyncio.to_thread(registry.get_module_twin, device.device_id, module.module_id)
            await asyncio.to_thread(
                registry.update_module_twin,
                device.device_id,
                module.module_id,
                Twin(properties=TwinProperties(desired={"afterReconnect": True})),
                twin.etag,
            )
            patch = await inbox.wait_for_version(2)
            assert patch == {"afterReconnect": True, "$version": 2}
        finally:
            client.on_connection_state_change = None
            await step(intruder.shutdown(), timeout=20)
            await step(client.shutdown(), timeout=20)

    run(scenario())
