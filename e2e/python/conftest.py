"""Fixtures for the Python end-to-end suite.

One emulator process per pytest session (started lazily by the `hub` fixture, stopped by
pid at the end). It is started with a config that sets the `registryRead` policy key, so
the permission test knows it. Every test creates its own ids, so order does not matter.
"""

from __future__ import annotations

import os

import pytest
import requests

from emulator import (
    REGISTRY_READ_KEY,
    REGISTRY_READ_POLICY,
    Emulator,
    service_sas_token,
    start_emulator,
    unique_id,
)

CONFIG_TOML = f"""\
[[policies]]
name = "{REGISTRY_READ_POLICY}"
key = "{REGISTRY_READ_KEY}"
permissions = ["RegistryRead"]
"""


@pytest.fixture(scope="session")
def hub():
    emulator = start_emulator(config_toml=CONFIG_TOML)
    # azure-iot-hub (msrest/requests) trusts a custom CA only through REQUESTS_CA_BUNDLE
    # (shared/protocol.md E.1); it is read per request, so setting it here is enough.
    os.environ["REQUESTS_CA_BUNDLE"] = str(emulator.ca_path)
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the tail of the emulator log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "hub" in getattr(item, "funcargs", {}):
        emulator: Emulator = item.funcargs["hub"]
        report.sections.append(("emulator log (tail)", emulator.log_tail()))


@pytest.fixture(scope="session")
def registry(hub):
    from azure.iot.hub import IoTHubRegistryManager

    return IoTHubRegistryManager.from_connection_string(hub.service_connection_string())


@pytest.fixture
def new_device(registry):
    """Factory: create a SAS device with generated keys; deleted again after the test."""
    created = []

    def make(prefix: str = "dev", status: str = "enabled"):
        device_id = unique_id(prefix)
        device = registry.create_device_with_sas(device_id, None, None, status)
        created.append(device_id)
        return device

    yield make
    for device_id in created:
        try:
            registry.delete_device(device_id)
        except Exception:  # already deleted by the test, or the emulator is gone
            pass


@pytest.fixture
def new_module(registry, new_device):
    """Factory: create a device and a SAS module on it; returns (device, module)."""

    def make(prefix: str = "mod"):
        device = new_device(prefix + "dev")
        module = registry.create_module_with_sas(device.device_id, unique_id(prefix), None, None, None)
        return device, module

    return make


class RawService:
    """Plain `requests` against the REST API, to look at the exact JSON on the wire."""

    def __init__(self, hub: Emulator, api_version: str = "2021-04-12"):
        self.hub = hub
        self.api_version = api_version
        self.session = requests.Session()

    def request(self, method: str, path: str, json=None, headers=None, policy="iothubowner", key=None):
        from emulator import OWNER_KEY

        all_headers = {
            "Authorization": service_sas_token(self.hub.address, policy, key or OWNER_KEY),
            "Accept": "application/json",
        }
        if json is not None:
            all_headers["Content-Type"] = "application/json; charset=utf-8"
        all_headers.update(headers or {})
        return self.session.request(
            method,
            self.hub.base_url + path,
            params={"api-version": self.api_version},
            json=json,
            headers=all_headers,
            # Per request: a REQUESTS_CA_BUNDLE in the environment beats Session.verify.
            verify=str(self.hub.ca_path),
            timeout=15,
        )


@pytest.fixture
def raw(hub):
    return RawService(hub)
