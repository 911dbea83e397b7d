"""Seeded hubs, persistence across a restart, and seed-file validation (issue 7), driven by the
official SDKs (azure-iot-hub 2.7.0, azure-iot-device 2.14.0 aio clients) against dedicated
emulators, not the session's: each test needs its own command line (--config, --data-dir) and
some stop the emulator.

- A hub seeded from a `--config` file answers the SDKs with the seeded, fixed keys: a module
  client connects with the seeded module key and `get_twin` shows the seeded desired and
  reported properties; the service (with a policy key fixed in the same file) sees the seeded
  tags.
- With `--data-dir`, state written through the SDKs survives SIGTERM (exit 0 within a few
  seconds) and a restart on the same address; a device client connected before the restart
  (connection_retry left on, default interval) reconnects by itself, gets a desired patch sent
  after the restart, and `get_twin` works.
- An invalid seed file stops start-up with a non-zero exit and `<file>:<line>: <reason>`.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from azure.iot.device.aio import IoTHubDeviceClient, IoTHubModuleClient
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties
from emulator import (
    DEVICE_HOSTNAME,
    emulator_binary,
    pick_address,
    start_emulator,
    unique_id,
)

STEP_TIMEOUT = 15  # seconds for one SDK call
SIGTERM_EXIT_WITHIN = 5  # seconds: "exit 0 within a few seconds"
# A client that saw the hub go away retries every connection_retry_interval (10 s by default)
# after a first immediate attempt, so coming back can take a little over 10 s.
RECONNECT_WITHIN = 40

# Fixed keys, as a CI suite would commit them next to its tests (base64 of 32 bytes).
DEVICE_ID = "seeded-device"
DEVICE_KEY = "c2VlZGVkLWRldmljZS1rZXktZm9yLWUyZS10ZXN0cyE="
MODULE_ID = "seeded-module"
MODULE_KEY = "c2VlZGVkLW1vZHVsZS1rZXktZm9yLWUyZS10ZXN0cyE="
POLICY = "backend"
POLICY_KEY = "YmFja2VuZC1wb2xpY3kta2V5LWZvci1lMmUtdGVzdHM="

DEVICE_TAGS = {"location": {"region": "US", "plant": "Redmond43"}}
DEVICE_DESIRED = {"telemetryInterval": 30}
DEVICE_REPORTED = {"connectivity": "cellular"}
MODULE_TAGS = {"env": "ci", "owner": {"team": "edge"}}
MODULE_DESIRED = {"conditions": {"temperature": {"warning": 75, "critical": 100}}, "mode": "eco"}
MODULE_REPORTED = {"firmware": "1.2.3", "battery": 97}

SEED_TOML = f"""\
# Seed file written by test_seed_and_restart.py
[[policies]]
name = "{POLICY}"
key = "{POLICY_KEY}"
permissions = ["ServiceConnect", "RegistryRead", "RegistryWrite"]

[[devices]]
id = "{DEVICE_ID}"
primary_key = "{DEVICE_KEY}"
tags = {{ location = {{ region = "US", plant = "Redmond43" }} }}
desired = {{ telemetryInterval = 30 }}
reported = {{ connectivity = "cellular" }}

  [[devices.modules]]
  id = "{MODULE_ID}"
  primary_key = "{MODULE_KEY}"
  tags = {{ env = "ci", owner = {{ team = "edge" }} }}
  desired = {{ conditions = {{ temperature = {{ warning = 75, critical = 100 }} }}, mode = "eco" }}
  reported = {{ firmware = "1.2.3", battery = 97 }}
"""


def run(coro):
    return asyncio.run(coro)


async def step(awaitable, timeout: float = STEP_TIMEOUT):
    return await asyncio.wait_for(awaitable, timeout)


def plain(section: dict) -> dict:
    """A twin section without the hub's bookkeeping ($version, $metadata)."""
    return {k: v for k, v in section.items() if not k.startswith("$")}


def with_log(emulator, message: str) -> str:
    return f"{message}\nemulator log ({emulator.log_path}):\n{emulator.log_tail()}"


@pytest.fixture
def workspace():
    """A directory for one test's certs and data, kept across restarts, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="iothub-e2e-seed-") as tmp:
        yield Path(tmp)


# -- (a) a seeded hub ------------------------------------------------------------------------


def test_seeded_hub_answers_the_sdks_with_the_seeded_keys_and_twins(workspace, monkeypatch):
    emulator = start_emulator(config_toml=SEED_TOML, certs_dir=workspace / "certs")
    try:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_path))
        # The service side signs with the policy key fixed in the seed file.
        registry = IoTHubRegistryManager.from_connection_string(
            emulator.service_connection_string(POLICY, POLICY_KEY)
        )

        module = registry.get_module(DEVICE_ID, MODULE_ID)
        assert module.authentication.symmetric_key.primary_key == MODULE_KEY
        device = registry.get_device(DEVICE_ID)
        assert device.authentication.symmetric_key.primary_key == DEVICE_KEY
        assert device.status == "enabled"

        module_twin = registry.get_module_twin(DEVICE_ID, MODULE_ID)
        assert module_twin.tags == MODULE_TAGS
        assert plain(module_twin.properties.desired) == MODULE_DESIRED
        assert plain(module_twin.properties.reported) == MODULE_REPORTED
        device_twin = registry.get_twin(DEVICE_ID)
        assert device_twin.tags == DEVICE_TAGS
        assert plain(device_twin.properties.desired) == DEVICE_DESIRED

        async def devices():
            module_client = IoTHubModuleClient.create_from_connection_string(
                emulator.device_connection_string(DEVICE_ID, MODULE_KEY, MODULE_ID),
                server_verification_cert=emulator.ca_pem,
                connection_retry=False,
            )
            device_client = IoTHubDeviceClient.create_from_connection_string(
                emulator.device_connection_string(DEVICE_ID, DEVICE_KEY),
                server_verification_cert=emulator.ca_pem,
                connection_retry=False,
            )
            try:
                await step(module_client.connect())
                twin = await step(module_client.get_twin())
                assert plain(twin["desired"]) == MODULE_DESIRED
                assert plain(twin["reported"]) == MODULE_REPORTED
                assert twin["desired"]["$version"] == module_twin.properties.desired["$version"]

                await step(device_client.connect())
                twin = await step(device_client.get_twin())
                assert plain(twin["desired"]) == DEVICE_DESIRED
                assert plain(twin["reported"]) == DEVICE_REPORTED
            finally:
                await step(module_client.shutdown(), timeout=20)
                await step(device_client.shutdown(), timeout=20)

        run(devices())
        assert registry.get_module(DEVICE_ID, MODULE_ID).connection_state == "Disconnected"
    except AssertionError as e:
        raise AssertionError(with_log(emulator, str(e))) from e
    finally:
        emulator.stop()


# -- (b) persistence and a restart -----------------------------------------------------------


def sigterm_and_wait(emulator) -> tuple[int, float]:
    """SIGTERM by pid; (exit code, seconds it took). SIGKILL if it takes too long."""
    started = time.monotonic()
    emulator.process.send_signal(signal.SIGTERM)
    try:
        code = emulator.process.wait(timeout=SIGTERM_EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        emulator.process.kill()
        emulator.process.wait(timeout=10)
        return -1, time.monotonic() - started
    return code, time.monotonic() - started


def twin_dict(twin: Twin) -> dict:
    data = twin.as_dict()
    # Connection state is live, not stored: everyone is disconnected after a restart.
    for live in ("connection_state", "last_activity_time"):
        data.pop(live, None)
    return data


class Restarted:
    """What a test body gets after the restart (see `restart_with_a_connected_client`)."""

    def __init__(self, emulator, registry, client, device_id, patches, desired_version_before):
        self.emulator = emulator
        self.registry = registry
        self.client = client
        self.device_id = device_id
        self.patches = patches
        self.desired_version_before = desired_version_before


def restart_with_a_connected_client(workspace, monkeypatch, after_reconnect) -> None:
    """The common part of the restart tests.

    Before: with --data-dir, the service creates a device and a module and updates the module
    twin (tags, desired); an IoTHubDeviceClient with connection_retry left on (default
    interval) connects, subscribes to desired patches and reports a property. Then SIGTERM
    (exit 0 within SIGTERM_EXIT_WITHIN s; the client notices), start again on the same data
    dir, address and CA: the module twin and identity are unchanged, and the client
    reconnects by itself. Then `await after_reconnect(Restarted)`.
    """
    certs_dir = workspace / "certs"
    data_dir = workspace / "data"
    first = start_emulator(certs_dir=certs_dir, extra_args=["--data-dir", str(data_dir)])
    emulators = [first]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(first.ca_path))
    registry = IoTHubRegistryManager.from_connection_string(first.service_connection_string())
    device_id = unique_id("persist")
    module_id = unique_id("mod")

    async def scenario():
        loop = asyncio.get_running_loop()
        states: asyncio.Queue = asyncio.Queue()
        patches: asyncio.Queue = asyncio.Queue()

        device = await asyncio.to_thread(registry.create_device_with_sas, device_id, None, None, "enabled")
        module = await asyncio.to_thread(registry.create_module_with_sas, device_id, module_id, None, None, None)
        twin = await asyncio.to_thread(registry.get_module_twin, device_id, module_id)
        await asyncio.to_thread(
            registry.update_module_twin,
            device_id,
            module_id,
            Twin(tags={"site": "lab"}, properties=TwinProperties(desired={"sampleRate": 5, "nested": {"a": [1, 2]}})),
            twin.etag,
        )
        module_before = twin_dict(await asyncio.to_thread(registry.get_module_twin, device_id, module_id))
        assert module_before["tags"] == {"site": "lab"}
        assert module_before["properties"]["desired"]["sampleRate"] == 5

        client = IoTHubDeviceClient.create_from_connection_string(
            first.device_connection_string(device_id, device.authentication.symmetric_key.primary_key),
            server_verification_cert=first.ca_pem,
        )
        try:
            await step(client.connect())
            client.on_twin_desired_properties_patch_received = (
                lambda patch: loop.call_soon_threadsafe(patches.put_nowait, patch)
            )
            await step(client.patch_twin_reported_properties({"beforeRestart": True}))
            desired_version_before = (await step(client.get_twin()))["desired"]["$version"]
            client.on_connection_state_change = lambda: loop.call_soon_threadsafe(
                states.put_nowait, client.connected
            )

            code, took = sigterm_and_wait(first)
            assert code == 0, with_log(first, f"SIGTERM: exit code {code} after {took:.1f}s")
            assert await step(states.get(), timeout=10) is False, "the client did not notice the shutdown"

            second = await asyncio.to_thread(
                start_emulator,
                certs_dir=certs_dir,
                extra_args=["--data-dir", str(data_dir)],
                address=first.address,
                log_suffix="-restart",
            )
            emulators.append(second)
            assert second.ca_pem == first.ca_pem
            registry_after = IoTHubRegistryManager.from_connection_string(second.service_connection_string())

            module_after = twin_dict(await asyncio.to_thread(registry_after.get_module_twin, device_id, module_id))
            assert module_after == module_before
            module_identity = await asyncio.to_thread(registry_after.get_module, device_id, module_id)
            assert (
                module_identity.authentication.symmetric_key.primary_key
                == module.authentication.symmetric_key.primary_key
            )

            try:
                back = await asyncio.wait_for(states.get(), RECONNECT_WITHIN)
            except asyncio.TimeoutError:
                raise AssertionError(with_log(second, f"the client did not reconnect within {RECONNECT_WITHIN}s"))
            assert back is True
            while not states.empty():  # a flap during the reconnect would show up here
                assert states.get_nowait() is True

            await after_reconnect(
                Restarted(second, registry_after, client, device_id, patches, desired_version_before)
            )
        finally:
            client.on_connection_state_change = None
            await step(client.shutdown(), timeout=20)

    try:
        run(scenario())
    finally:
        for emulator in emulators:
            emulator.stop()


async def update_desired_after_restart(r: Restarted) -> int:
    """The service writes desired `afterRestart` on the restarted hub; returns the new $version."""
    device_twin = await asyncio.to_thread(r.registry.get_twin, r.device_id)
    assert device_twin.properties.reported.get("beforeRestart") is True
    await asyncio.to_thread(
        r.registry.update_twin,
        r.device_id,
        Twin(properties=TwinProperties(desired={"afterRestart": 1})),
        device_twin.etag,
    )
    return device_twin.properties.desired["$version"] + 1


def test_state_survives_sigterm_and_a_restart_and_the_client_reconnects_and_gets_its_twin(workspace, monkeypatch):
    async def after_reconnect(r: Restarted):
        new_version = await update_desired_after_restart(r)
        twin = await step(r.client.get_twin())
        assert twin["desired"]["afterRestart"] == 1
        assert twin["desired"]["$version"] == new_version > r.desired_version_before
        assert twin["reported"]["beforeRestart"] is True
        # The client still writes: a reported patch after the restart is acknowledged and stored.
        await step(r.client.patch_twin_reported_properties({"afterRestart": True}))
        reported = (await asyncio.to_thread(r.registry.get_twin, r.device_id)).properties.reported
        assert reported["beforeRestart"] is True and reported["afterRestart"] is True

    restart_with_a_connected_client(workspace, monkeypatch, after_reconnect)


def test_a_client_that_reconnected_after_a_restart_gets_desired_patches(workspace, monkeypatch):
    """The SDK reconnects with clean_session=0 and does not subscribe again (protocol.md C.3),
    as after a server-side drop: patches reach it only if the hub kept its session (its
    subscriptions) across the restart, as IoT Hub keeps persistent sessions."""

    async def after_reconnect(r: Restarted):
        new_version = await update_desired_after_restart(r)

        async def patch_with(version: int) -> dict:
            while True:
                patch = await r.patches.get()
                if patch.get("$version") == version:
                    return patch

        try:
            patch = await asyncio.wait_for(patch_with(new_version), 30)
        except asyncio.TimeoutError:
            raise AssertionError(
                with_log(r.emulator, f"no desired patch $version {new_version} within 30 s after the restart")
            )
        assert patch == {"afterRestart": 1, "$version": new_version}

    restart_with_a_connected_client(workspace, monkeypatch, after_reconnect)


# -- (c) an invalid seed file ----------------------------------------------------------------

BAD_SEEDS = {
    "module-key-not-base64": (
        '[[devices]]\nid = "d1"\n\n  [[devices.modules]]\n  id = "m1"\n  primary_key = "not base64!"\n',
        4,
        ["module 'm1' of device 'd1'", "primaryKey", "base64"],
    ),
    "device-desired-key-with-a-dot": (
        '# comment\n\n[[devices]]\nid = "ok"\n\n[[devices]]\nid = "d2"\ndesired = { "a.b" = 1 }\n',
        6,
        ["device 'd2'", "a.b"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SEEDS))
def test_an_invalid_seed_file_stops_start_up_with_file_line_and_reason(workspace, case):
    text, line, reasons = BAD_SEEDS[case]
    config = workspace / "seed.toml"
    config.write_text(text)
    args = [
        str(emulator_binary()),
        "--bind", pick_address(),
        "--hostname", DEVICE_HOSTNAME,
        "--certs-dir", str(workspace / "certs"),
        "--config", str(config),
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=10)
        pytest.fail(f"the emulator did not stop on a bad seed file: {out}{err}")
    assert process.returncode != 0, out + err
    assert "iothub-emulator ready" not in out
    assert f"{config}:{line}:" in err, err
    for reason in reasons:
        assert reason in err, err
