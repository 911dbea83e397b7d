"""Service side of the module-identity seeds, driven by azure-iot-hub 2.7.0 unchanged.

Seed flows proven here:
- 004 (Python): IoTHubRegistryManager.from_connection_string -> get_module_twin ->
  update_module_twin(Twin(properties=TwinProperties(desired={"telemetryInterval": 122})), etag)
  and replace_module_twin; QuerySpecification/query_iot_hub.
- 003 (CLI): device-identity create, module-identity create, module-twin update --desired
  '{"conditions":...}' and the exact JSON the CLI prints (checked raw, as the CLI sends it).
- 000/002 (overview/.NET): create device, add module, read module twin, delete.

Also the REST error contract of shared/protocol.md E (409/412/404/401) and the registry
extras the SDK exposes (device twin, statistics, bulk create).
"""

from __future__ import annotations

import base64
import re

import pytest
from msrest.exceptions import HttpOperationError

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import (
    AuthenticationMechanism,
    ExportImportDevice,
    QuerySpecification,
    SymmetricKey,
    Twin,
    TwinProperties,
)
from emulator import OWNER_POLICY, REGISTRY_READ_KEY, REGISTRY_READ_POLICY, unique_id

ISO_8601 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?(Z|[+-]\d\d:\d\d)$")
SOME_OTHER_KEY = base64.b64encode(b"\x01" * 32).decode()


def http_status(excinfo) -> int:
    return excinfo.value.response.status_code


def assert_generated_key(key) -> None:
    assert isinstance(key, str) and key, f"expected a generated key, got {key!r}"
    assert len(base64.b64decode(key, validate=True)) >= 16


def desired(twin) -> dict:
    return twin.properties.desired


def patch_desired(props: dict) -> Twin:
    return Twin(properties=TwinProperties(desired=props))


# --- identities -------------------------------------------------------------------------


@pytest.mark.parametrize("empty_key", [None, ""], ids=["none", "empty-string"])
def test_create_device_with_sas_generates_keys(registry, new_device, empty_key):
    device_id = unique_id("dev")
    device = registry.create_device_with_sas(device_id, empty_key, empty_key, "enabled")
    try:
        assert device.device_id == device_id
        assert device.status == "enabled"
        assert device.connection_state == "Disconnected"
        assert device.etag
        assert device.authentication.type == "sas"
        keys = device.authentication.symmetric_key
        assert_generated_key(keys.primary_key)
        assert_generated_key(keys.secondary_key)
        assert keys.primary_key != keys.secondary_key

        fetched = registry.get_device(device_id)
        assert fetched.device_id == device_id
        assert fetched.etag == device.etag
        assert fetched.authentication.symmetric_key.primary_key == keys.primary_key
        assert fetched.authentication.symmetric_key.secondary_key == keys.secondary_key
    finally:
        registry.delete_device(device_id)


def test_create_device_with_given_keys_keeps_them(registry):
    device_id = unique_id("dev")
    primary = base64.b64encode(b"p" * 32).decode()
    secondary = base64.b64encode(b"s" * 32).decode()
    device = registry.create_device_with_sas(device_id, primary, secondary, "disabled")
    try:
        assert device.status == "disabled"
        assert device.authentication.symmetric_key.primary_key == primary
        assert device.authentication.symmetric_key.secondary_key == secondary
    finally:
        registry.delete_device(device_id)


def test_create_module_with_sas_generates_keys_and_get_module_returns_it(registry, new_device):
    device = new_device()
    module_id = unique_id("mod")

    module = registry.create_module_with_sas(device.device_id, module_id, None, None, None)

    assert module.module_id == module_id
    assert module.device_id == device.device_id
    assert module.etag
    assert module.connection_state == "Disconnected"
    assert module.authentication.type == "sas"
    assert_generated_key(module.authentication.symmetric_key.primary_key)
    assert_generated_key(module.authentication.symmetric_key.secondary_key)
    # Module keys are the module's own, not the device's.
    assert module.authentication.symmetric_key.primary_key != device.authentication.symmetric_key.primary_key

    fetched = registry.get_module(device.device_id, module_id)
    assert fetched.module_id == module_id
    assert fetched.device_id == device.device_id
    assert fetched.etag == module.etag
    assert fetched.authentication.symmetric_key.primary_key == module.authentication.symmetric_key.primary_key


def test_create_module_with_given_keys_and_managed_by(registry, new_device):
    device = new_device()
    primary = base64.b64encode(b"m" * 32).decode()
    secondary = base64.b64encode(b"n" * 32).decode()
    module = registry.create_module_with_sas(device.device_id, unique_id("mod"), "someEdgeDevice", primary, secondary)
    assert module.managed_by == "someEdgeDevice"
    assert module.authentication.symmetric_key.primary_key == primary
    assert module.authentication.symmetric_key.secondary_key == secondary


def test_get_modules_lists_every_module_of_the_device(registry, new_device):
    device = new_device()
    other = new_device()
    ids = {unique_id("modA"), unique_id("modB"), unique_id("modC")}
    for module_id in ids:
        registry.create_module_with_sas(device.device_id, module_id, None, None, None)
    registry.create_module_with_sas(other.device_id, unique_id("elsewhere"), None, None, None)

    modules = registry.get_modules(device.device_id)

    assert {m.module_id for m in modules} == ids
    assert all(m.device_id == device.device_id for m in modules)


def test_delete_module_then_get_is_404(registry, new_module):
    device, module = new_module()

    registry.delete_module(device.device_id, module.module_id)

    with pytest.raises(HttpOperationError) as excinfo:
        registry.get_module(device.device_id, module.module_id)
    assert http_status(excinfo) == 404
    with pytest.raises(HttpOperationError) as excinfo:
        registry.get_module_twin(device.device_id, module.module_id)
    assert http_status(excinfo) == 404
    assert module.module_id not in {m.module_id for m in registry.get_modules(device.device_id)}


def test_delete_device_removes_its_modules(registry):
    device_id = unique_id("dev")
    registry.create_device_with_sas(device_id, None, None, "enabled")
    module_id = unique_id("mod")
    registry.create_module_with_sas(device_id, module_id, None, None, None)

    registry.delete_device(device_id)

    for call in (lambda: registry.get_device(device_id), lambda: registry.get_module(device_id, module_id)):
        with pytest.raises(HttpOperationError) as excinfo:
            call()
        assert http_status(excinfo) == 404


def test_duplicate_device_is_409(registry, new_device):
    device = new_device()
    with pytest.raises(HttpOperationError) as excinfo:
        registry.create_device_with_sas(device.device_id, None, None, "enabled")
    assert http_status(excinfo) == 409


def test_duplicate_module_is_409(registry, new_module):
    device, module = new_module()
    with pytest.raises(HttpOperationError) as excinfo:
        registry.create_module_with_sas(device.device_id, module.module_id, None, None, None)
    assert http_status(excinfo) == 409


def test_unknown_device_and_module_are_404(registry, new_device):
    device = new_device()
    calls = [
        lambda: registry.get_device(unique_id("nope")),
        lambda: registry.get_module(device.device_id, unique_id("nope")),
        lambda: registry.get_module_twin(device.device_id, unique_id("nope")),
        lambda: registry.get_twin(unique_id("nope")),
        lambda: registry.create_module_with_sas(unique_id("nodevice"), "m1", None, None, None),
    ]
    for call in calls:
        with pytest.raises(HttpOperationError) as excinfo:
            call()
        assert http_status(excinfo) == 404


def test_wrong_policy_key_is_401(hub, new_device):
    device = new_device()
    wrong = IoTHubRegistryManager.from_connection_string(hub.service_connection_string(OWNER_POLICY, SOME_OTHER_KEY))
    with pytest.raises(HttpOperationError) as excinfo:
        wrong.get_device(device.device_id)
    assert http_status(excinfo) == 401

    unknown_policy = IoTHubRegistryManager.from_connection_string(
        hub.service_connection_string("noSuchPolicy", SOME_OTHER_KEY)
    )
    with pytest.raises(HttpOperationError) as excinfo:
        unknown_policy.get_device(device.device_id)
    assert http_status(excinfo) == 401


def test_registry_read_policy_can_read_but_not_write(hub, new_device):
    device = new_device()
    reader = IoTHubRegistryManager.from_connection_string(
        hub.service_connection_string(REGISTRY_READ_POLICY, REGISTRY_READ_KEY)
    )

    assert reader.get_device(device.device_id).device_id == device.device_id

    device_id = unique_id("ro")
    with pytest.raises(HttpOperationError) as excinfo:
        reader.create_device_with_sas(device_id, None, None, "enabled")
    assert http_status(excinfo) == 401
    with pytest.raises(HttpOperationError) as excinfo:
        reader.create_module_with_sas(device.device_id, unique_id("ro"), None, None, None)
    assert http_status(excinfo) == 401
    # Nothing was created behind the 401.
    with pytest.raises(HttpOperationError) as excinfo:
        reader.get_device(device_id)
    assert http_status(excinfo) == 404


# --- module twins (seed 004 backend) ------------------------------------------------------


def test_new_module_twin_has_identity_fields_and_empty_properties(registry, new_module):
    device, module = new_module()

    twin = registry.get_module_twin(device.device_id, module.module_id)

    assert twin.device_id == device.device_id
    assert twin.module_id == module.module_id
    assert twin.etag
    assert isinstance(twin.version, int)
    assert twin.status == "enabled"
    assert twin.connection_state == "Disconnected"
    assert twin.authentication_type == "sas"
    assert desired(twin)["$version"] == 1
    assert twin.properties.reported["$version"] == 1
    assert {k for k in desired(twin) if not k.startswith("$")} == set()
    assert {k for k in twin.properties.reported if not k.startswith("$")} == set()


def test_update_module_twin_with_etag_sets_desired_and_metadata(registry, new_module):
    """Seed 004: get_module_twin, then update_module_twin(Twin(...), module_twin.etag)."""
    device, module = new_module()
    module_twin = registry.get_module_twin(device.device_id, module.module_id)

    updated = registry.update_module_twin(
        device.device_id, module.module_id, patch_desired({"telemetryInterval": 122}), module_twin.etag
    )

    d = desired(updated)
    assert d["telemetryInterval"] == 122
    assert d["$version"] == 2
    meta = d["$metadata"]
    assert ISO_8601.match(meta["$lastUpdated"]), meta
    assert meta["$lastUpdatedVersion"] == 2
    assert ISO_8601.match(meta["telemetryInterval"]["$lastUpdated"]), meta
    assert meta["telemetryInterval"]["$lastUpdatedVersion"] == 2
    assert updated.etag and updated.etag != module_twin.etag
    assert updated.version > module_twin.version
    assert updated.properties.reported["$version"] == 1

    again = registry.get_module_twin(device.device_id, module.module_id)
    assert desired(again)["telemetryInterval"] == 122
    assert desired(again)["$version"] == 2
    assert again.etag == updated.etag


def test_update_module_twin_with_stale_etag_is_412(registry, new_module):
    device, module = new_module()
    stale = registry.get_module_twin(device.device_id, module.module_id).etag
    registry.update_module_twin(device.device_id, module.module_id, patch_desired({"a": 1}), stale)

    with pytest.raises(HttpOperationError) as excinfo:
        registry.update_module_twin(device.device_id, module.module_id, patch_desired({"a": 2}), stale)
    assert http_status(excinfo) == 412

    twin = registry.get_module_twin(device.device_id, module.module_id)
    assert desired(twin)["a"] == 1
    assert desired(twin)["$version"] == 2


def test_update_module_twin_merges_and_null_deletes(registry, new_module):
    device, module = new_module()
    registry.update_module_twin(device.device_id, module.module_id, patch_desired({"a": {"b": 1, "c": 2}, "keep": "x"}))

    updated = registry.update_module_twin(
        device.device_id, module.module_id, patch_desired({"a": {"b": None, "d": 3}})
    )

    d = desired(updated)
    assert d["a"] == {"c": 2, "d": 3}
    assert d["keep"] == "x"
    assert d["$version"] == 3
    assert "b" not in d["$metadata"]["a"]
    assert d["$metadata"]["a"]["d"]["$lastUpdatedVersion"] == 3
    assert d["$metadata"]["keep"]["$lastUpdatedVersion"] == 2


def test_replace_module_twin_replaces_desired_and_tags(registry, new_module):
    device, module = new_module()
    first = registry.update_module_twin(
        device.device_id, module.module_id, Twin(tags={"old": True}, properties=TwinProperties(desired={"old": 1}))
    )

    replaced = registry.replace_module_twin(
        device.device_id,
        module.module_id,
        Twin(tags={"env": "e2e"}, properties=TwinProperties(desired={"new": {"x": 2}})),
        first.etag,
    )

    d = desired(replaced)
    assert d["new"] == {"x": 2}
    assert "old" not in d
    assert d["$version"] == desired(first)["$version"] + 1
    assert replaced.tags == {"env": "e2e"}
    assert replaced.etag != first.etag

    fetched = registry.get_module_twin(device.device_id, module.module_id)
    assert fetched.tags == {"env": "e2e"}
    assert "old" not in desired(fetched)


def test_cli_seed_module_twin_update_returns_the_documented_json(registry, new_device, raw):
    """Seed 003: `az iot hub module-twin update --desired '{"conditions":...}'`.

    The CLI (ext 0.25) sends PATCH /twins/{d}/modules/{m}?api-version=2024-03-31 with
    If-Match: "*" and prints the response body; check every field the article shows."""
    device = new_device("SampleDevice")
    module_id = unique_id("SampleModule")
    registry.create_module_with_sas(device.device_id, module_id, None, None, None)
    path = f"/twins/{device.device_id}/modules/{module_id}"
    raw.api_version = "2024-03-31"
    before = raw.request("GET", path)
    assert before.status_code == 200, before.text

    response = raw.request(
        "PATCH",
        path,
        json={"properties": {"desired": {"conditions": {"temperature": {"warning": 75, "critical": 100}}}}},
        headers={"If-Match": '"*"'},
    )

    assert response.status_code == 200, response.text
    assert "application/json" in response.headers.get("Content-Type", "")
    twin = response.json()
    assert twin["authenticationType"] == "sas"
    assert twin["cloudToDeviceMessageCount"] == 0
    assert twin["connectionState"] == "Disconnected"
    assert isinstance(twin["deviceEtag"], str) and twin["deviceEtag"]
    assert twin["deviceId"] == device.device_id
    assert isinstance(twin["etag"], str) and twin["etag"] and twin["etag"] != before.json()["etag"]
    assert ISO_8601.match(twin["lastActivityTime"]), twin["lastActivityTime"]
    assert twin["modelId"] == ""
    assert twin["moduleId"] == module_id
    assert twin["status"] == "enabled"
    assert ISO_8601.match(twin["statusUpdateTime"]), twin["statusUpdateTime"]
    assert isinstance(twin["version"], int) and twin["version"] > before.json()["version"]
    assert twin["x509Thumbprint"] == {"primaryThumbprint": None, "secondaryThumbprint": None}

    d = twin["properties"]["desired"]
    assert d["conditions"] == {"temperature": {"critical": 100, "warning": 75}}
    assert d["$version"] == 2
    meta = d["$metadata"]

    def check_node(node, expected_children):
        assert ISO_8601.match(node["$lastUpdated"]), node
        assert node["$lastUpdatedVersion"] == 2
        assert set(node) == {"$lastUpdated", "$lastUpdatedVersion", *expected_children}, node

    check_node(meta, {"conditions"})
    check_node(meta["conditions"], {"temperature"})
    check_node(meta["conditions"]["temperature"], {"critical", "warning"})
    check_node(meta["conditions"]["temperature"]["critical"], set())
    check_node(meta["conditions"]["temperature"]["warning"], set())

    reported = twin["properties"]["reported"]
    assert reported["$version"] == 1
    assert set(reported["$metadata"]) == {"$lastUpdated"}
    assert ISO_8601.match(reported["$metadata"]["$lastUpdated"])
    assert set(reported) == {"$metadata", "$version"}

    # `module-twin show` afterwards returns the same document.
    shown = raw.request("GET", path)
    assert shown.status_code == 200
    assert shown.json()["properties"]["desired"] == d
    assert shown.json()["etag"] == twin["etag"]


def test_module_twin_raw_error_bodies_follow_the_legacy_shape(new_device, raw):
    """protocol.md E.3: `{"Message":"ErrorCode:<Name>;...","ExceptionMessage":...}` (Node parses it)."""
    device = new_device()
    response = raw.request("GET", f"/devices/{device.device_id}/modules/{unique_id('missing')}")
    assert response.status_code == 404
    assert "application/json" in response.headers.get("Content-Type", "")
    body = response.json()
    assert body["Message"].startswith("ErrorCode:ModuleNotFound;"), body

    response = raw.request("GET", f"/devices/{unique_id('missing')}")
    assert response.status_code == 404
    assert response.json()["Message"].startswith("ErrorCode:DeviceNotFound;")


# --- device twins, statistics, bulk, query ----------------------------------------------


def test_device_twin_get_and_update(registry, new_device):
    device = new_device()
    twin = registry.get_twin(device.device_id)
    assert twin.device_id == device.device_id
    assert twin.module_id is None
    assert desired(twin)["$version"] == 1

    updated = registry.update_twin(
        device.device_id,
        Twin(tags={"location": {"region": "US"}}, properties=TwinProperties(desired={"fanOn": True})),
        twin.etag,
    )

    assert updated.tags == {"location": {"region": "US"}}
    assert desired(updated)["fanOn"] is True
    assert desired(updated)["$version"] == 2
    assert desired(updated)["$metadata"]["fanOn"]["$lastUpdatedVersion"] == 2

    with pytest.raises(HttpOperationError) as excinfo:
        registry.update_twin(device.device_id, patch_desired({"fanOn": False}), twin.etag)
    assert http_status(excinfo) == 412


def test_device_registry_statistics_count_enabled_and_disabled(registry, new_device):
    before = registry.get_device_registry_statistics()
    assert before.total_device_count == before.enabled_device_count + before.disabled_device_count

    new_device("on", status="enabled")
    new_device("off", status="disabled")

    after = registry.get_device_registry_statistics()
    assert after.total_device_count == before.total_device_count + 2
    assert after.enabled_device_count == before.enabled_device_count + 1
    assert after.disabled_device_count == before.disabled_device_count + 1


def test_bulk_create_or_update_devices_creates_all(registry):
    ids = [unique_id("bulk") for _ in range(3)]
    primary = base64.b64encode(b"k" * 32).decode()
    devices = [
        ExportImportDevice(
            id=device_id,
            import_mode="create",
            status="enabled",
            authentication=AuthenticationMechanism(
                type="sas", symmetric_key=SymmetricKey(primary_key=primary, secondary_key=primary)
            ),
        )
        for device_id in ids
    ]
    try:
        result = registry.bulk_create_or_update_devices(devices)

        assert result.is_successful is True
        assert not result.errors
        for device_id in ids:
            device = registry.get_device(device_id)
            assert device.status == "enabled"
            assert device.authentication.symmetric_key.primary_key == primary

        # Creating one of them again is reported per device, not as a transport error.
        again = registry.bulk_create_or_update_devices(devices[:1])
        assert again.is_successful is False
        assert [e.device_id for e in again.errors] == [ids[0]]
    finally:
        for device_id in ids:
            try:
                registry.delete_device(device_id)
            except HttpOperationError:
                pass


def test_query_iot_hub_finds_the_device_twin(registry, new_device):
    """Seed 004 imports QuerySpecification/QueryResult; `SELECT * FROM devices` pages to the end."""
    device = new_device()
    registry.update_twin(device.device_id, Twin(tags={"e2e": "query"}))

    seen = {}
    token = None
    for _ in range(100):
        result = registry.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"), token, 100)
        for item in result.items:
            seen[item.device_id] = item
        token = result.continuation_token
        if not token:
            break
    else:
        pytest.fail("query never stopped returning a continuation token")

    assert device.device_id in seen
    assert seen[device.device_id].tags == {"e2e": "query"}
