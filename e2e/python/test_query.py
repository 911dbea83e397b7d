"""`POST /devices/query` driven by azure-iot-hub 2.7.0 unchanged:
`IoTHubRegistryManager.query_iot_hub(QuerySpecification(query=...), continuation_token, max_item_count)`.

Seed 004 imports `QuerySpecification`/`QueryResult` from `azure.iot.hub.models`; this file
proves what the SDK hands back (`QueryResult.items`, `.continuation_token`, `.type`):
paging with `x-ms-max-item-count` and the opaque `x-ms-continuation` (absent on the last
page, so the SDK's token is None), tag/desired/reported filters, module twins, COUNT(),
GROUP BY, projections, TOP and the 400 for a bad query.

Every test tags its own twins with `tags.run = <uuid>` and filters on it, so the hub's other
devices (from other tests in the session) never show up in the results.

The SDK deserializes every item as `Twin` (query_operations.py: `self._deserialize("[Twin]",
response)`), also for raw results: keys a Twin does not know (aliases such as `n`) land in
`item.additional_properties`. And `query_iot_hub` returns the `QueryResult` class defined in
`azure/iot/hub/iothub_registry_manager.py` (L26, built at L789), not the
`azure.iot.hub.models.QueryResult` that seed 004 imports; both have the same three fields.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from msrest.exceptions import HttpOperationError

from azure.iot.device.aio import IoTHubDeviceClient, IoTHubModuleClient
from azure.iot.hub.iothub_registry_manager import QueryResult
from azure.iot.hub.models import QuerySpecification, Twin, TwinProperties
from emulator import unique_id

STEP_TIMEOUT = 15  # seconds for any one device SDK call


def new_run() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def tagged_devices(registry, new_device):
    """Factory: `n` devices whose twins carry tags {"run": run, **extra(i)}; returns their ids."""

    def make(run: str, n: int, extra=lambda i: {}, prefix: str = "q"):
        ids = []
        for i in range(n):
            device = new_device(prefix)
            registry.update_twin(device.device_id, Twin(tags={"run": run, **extra(i)}), "*")
            ids.append(device.device_id)
        return ids

    return make


def query(registry, text: str, token=None, page_size=None) -> QueryResult:
    return registry.query_iot_hub(QuerySpecification(query=text), token, page_size)


def query_all(registry, text: str, page_size=None, max_pages: int = 50):
    """All pages of a query: (list of QueryResult pages)."""
    pages = []
    token = None
    for _ in range(max_pages):
        result = query(registry, text, token, page_size)
        pages.append(result)
        token = result.continuation_token
        if token is None:
            return pages
        assert isinstance(token, str) and token, f"continuation token {token!r}"
    pytest.fail(f"query never stopped returning a continuation token: {text}")


def ids_of(registry, text: str, page_size=None) -> list:
    return [item.device_id for page in query_all(registry, text, page_size) for item in page.items]


# --- paging --------------------------------------------------------------------------------


def test_seven_devices_in_pages_of_three(registry, tagged_devices):
    run = new_run()
    ids = tagged_devices(run, 7, extra=lambda i: {"i": i})
    text = f"SELECT * FROM devices WHERE tags.run = '{run}'"

    pages = query_all(registry, text, page_size=3)

    assert [len(p.items) for p in pages] == [3, 3, 1]
    assert [p.continuation_token is None for p in pages] == [False, False, True]
    assert len({p.continuation_token for p in pages[:2]}) == 2  # each page resumes elsewhere
    for page in pages:
        assert isinstance(page, QueryResult)
        assert page.type == "twin"
        for item in page.items:
            assert isinstance(item, Twin)
            assert item.tags["run"] == run
            assert item.etag and isinstance(item.version, int)
            assert item.properties.desired["$version"] == 1
            assert item.module_id is None
    seen = [item.device_id for p in pages for item in p.items]
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == set(ids)
    assert seen == sorted(seen)  # identity order
    # The twin carries what the twin GET carries.
    first = pages[0].items[0]
    assert first.tags == registry.get_twin(first.device_id).tags


def test_one_page_when_everything_fits_and_the_default_page_size(registry, tagged_devices):
    run = new_run()
    ids = tagged_devices(run, 3)
    for page_size in (3, 1000, None):
        result = query(registry, f"SELECT * FROM devices WHERE tags.run = '{run}'", None, page_size)
        assert result.continuation_token is None, page_size
        assert sorted(i.device_id for i in result.items) == sorted(ids)


def test_no_match_is_an_empty_last_page(registry):
    result = query(registry, f"SELECT * FROM devices WHERE tags.run = '{new_run()}'", None, 10)
    assert result.items == []
    assert result.continuation_token is None
    assert result.type == "twin"


def test_top_caps_the_results_across_pages(registry, tagged_devices):
    run = new_run()
    ids = tagged_devices(run, 6)
    pages = query_all(registry, f"SELECT TOP 4 * FROM devices WHERE tags.run = '{run}'", page_size=3)
    assert [len(p.items) for p in pages] == [3, 1]
    assert [i.device_id for p in pages for i in p.items] == sorted(ids)[:4]


def test_changes_between_pages_follow_the_cursor(registry, tagged_devices):
    """The token is a cursor in identity order: a twin already served is not served again
    after it changes; a device created behind the cursor is not seen, one ahead of it is."""
    run = new_run()
    ids = tagged_devices(run, 4, prefix="q")
    text = f"SELECT * FROM devices WHERE tags.run = '{run}'"
    first = query(registry, text, None, 2)
    assert first.continuation_token
    assert [i.device_id for i in first.items] == sorted(ids)[:2]

    registry.update_twin(first.items[0].device_id, Twin(tags={"touched": True}), "*")
    (behind,) = tagged_devices(run, 1, prefix="a")  # "a-…" sorts before every "q-…"
    (ahead,) = tagged_devices(run, 1, prefix="z")  # "z-…" sorts after them

    rest = []
    token = first.continuation_token
    for _ in range(10):
        page = query(registry, text, token, 2)
        rest += [i.device_id for i in page.items]
        token = page.continuation_token
        if token is None:
            break
    assert rest == sorted(ids)[2:] + [ahead]
    assert behind not in rest


# --- WHERE on tags, desired and reported properties ---------------------------------------


def test_tag_filters(registry, tagged_devices):
    run = new_run()
    envs = ["prod", "prod", "test", "dev", "prod"]
    ids = tagged_devices(
        run,
        5,
        extra=lambda i: {"env": envs[i], "floor": i, "location": {"region": "US" if i < 2 else "EU"}},
    )
    by_index = lambda *indexes: sorted(ids[i] for i in indexes)  # noqa: E731
    where = lambda cond: ids_of(registry, f"SELECT * FROM devices WHERE tags.run = '{run}' AND {cond}")  # noqa: E731

    assert where("tags.env = 'prod'") == by_index(0, 1, 4)
    assert where("tags.env != 'prod'") == by_index(2, 3)
    assert where("tags.floor >= 2 AND tags.floor < 4") == by_index(2, 3)
    assert where("(tags.env = 'test' OR tags.floor = 0)") == by_index(0, 2)
    assert where("NOT (tags.env = 'prod')") == by_index(2, 3)
    assert where("tags.env IN ['test', 'dev']") == by_index(2, 3)
    assert where("tags.env NIN ['test', 'dev']") == by_index(0, 1, 4)
    assert where("tags.location.region = 'US'") == by_index(0, 1)
    assert where("STARTSWITH(tags.env, 'pr')") == by_index(0, 1, 4)
    assert where("IS_DEFINED(tags.nothing)") == []
    assert where("IS_DEFINED(tags.floor)") == by_index(0, 1, 2, 3, 4)
    # Double-quoted strings and case-insensitive keywords.
    assert ids_of(registry, f'select * from devices where tags.run = "{run}" and tags.env = "dev"') == by_index(3)


def test_desired_property_filter(registry, tagged_devices):
    run = new_run()
    ids = tagged_devices(run, 3)
    registry.update_twin(ids[0], Twin(properties=TwinProperties(desired={"telemetryInterval": 122})), "*")
    registry.update_twin(ids[1], Twin(properties=TwinProperties(desired={"telemetryInterval": 30})), "*")

    base = f"SELECT * FROM devices WHERE tags.run = '{run}'"
    assert ids_of(registry, base + " AND properties.desired.telemetryInterval = 122") == [ids[0]]
    assert ids_of(registry, base + " AND properties.desired.telemetryInterval > 10") == sorted(ids[:2])
    assert ids_of(registry, base + " AND properties.desired.$version = 1") == [ids[2]]
    assert ids_of(registry, base + " AND NOT IS_DEFINED(properties.desired.telemetryInterval)") == [ids[2]]


async def _report(client, patch):
    await asyncio.wait_for(client.connect(), STEP_TIMEOUT)
    try:
        await asyncio.wait_for(client.patch_twin_reported_properties(patch), STEP_TIMEOUT)
    finally:
        await asyncio.wait_for(client.shutdown(), STEP_TIMEOUT)


def report_as_device(hub, device_id: str, key: str, patch: dict, module_id=None) -> None:
    """Connect with azure-iot-device (MQTT/TLS) and patch the reported properties."""
    client_class = IoTHubModuleClient if module_id else IoTHubDeviceClient
    client = client_class.create_from_connection_string(
        hub.device_connection_string(device_id, key, module_id),
        server_verification_cert=hub.ca_pem,
        connection_retry=False,
    )
    asyncio.run(_report(client, patch))


def test_reported_property_filter(hub, registry, tagged_devices):
    run = new_run()
    ids = tagged_devices(run, 3)
    temperatures = {ids[0]: 31.5, ids[1]: 12}
    for device_id, temperature in temperatures.items():
        key = registry.get_device(device_id).authentication.symmetric_key.primary_key
        report_as_device(hub, device_id, key, {"temperature": temperature, "telemetryConfig": {"status": "Success"}})

    base = f"SELECT * FROM devices WHERE tags.run = '{run}'"
    assert ids_of(registry, base + " AND properties.reported.temperature > 20") == [ids[0]]
    assert ids_of(registry, base + " AND properties.reported.telemetryConfig.status = 'Success'") == sorted(ids[:2])
    assert ids_of(registry, base + " AND IS_DEFINED(properties.reported.temperature)") == sorted(ids[:2])
    assert ids_of(registry, base + " AND properties.reported.$version > 1") == sorted(ids[:2])

    # SELECT * items carry the reported section.
    (item,) = query(registry, base + " AND properties.reported.temperature < 20").items
    assert item.device_id == ids[1]
    assert item.properties.reported["temperature"] == 12
    assert item.properties.reported["telemetryConfig"] == {"status": "Success"}


# --- module twins ----------------------------------------------------------------------------


def test_module_query_pages_and_filters(hub, registry, new_device):
    run = new_run()
    devices = [new_device("qm").device_id for _ in range(2)]
    modules = []  # (device_id, module_id)
    for device_id in devices:
        for n in range(2):
            module_id = unique_id("m")
            registry.create_module_with_sas(device_id, module_id, None, None, None)
            registry.update_module_twin(device_id, module_id, Twin(tags={"run": run, "n": n}), "*")
            modules.append((device_id, module_id))
    # The device twins themselves are tagged too: FROM devices.modules must not return them.
    for device_id in devices:
        registry.update_twin(device_id, Twin(tags={"run": run}), "*")

    pages = query_all(registry, f"SELECT * FROM devices.modules WHERE tags.run = '{run}'", page_size=3)

    assert [len(p.items) for p in pages] == [3, 1]
    got = [(i.device_id, i.module_id) for p in pages for i in p.items]
    assert got == sorted(modules)  # identity order: device id, then module id
    for page in pages:
        assert page.type == "twin"
        for item in page.items:
            assert item.tags["run"] == run
            assert item.module_id

    filtered = query(registry, f"SELECT * FROM devices.modules WHERE tags.run = '{run}' AND tags.n = 1").items
    assert sorted((i.device_id, i.module_id) for i in filtered) == sorted(m for m in modules if modules.index(m) % 2 == 1)
    by_device = query(
        registry, f"SELECT * FROM devices.modules WHERE tags.run = '{run}' AND deviceId = '{devices[0]}'"
    ).items
    assert sorted(i.module_id for i in by_device) == sorted(m for d, m in modules if d == devices[0])

    # FROM devices sees only the device twins.
    assert ids_of(registry, f"SELECT * FROM devices WHERE tags.run = '{run}'") == sorted(devices)

    count = query(registry, f"SELECT COUNT() AS n FROM devices.modules WHERE tags.run = '{run}'")
    assert count.items[0].additional_properties == {"n": 4}


def test_module_reported_property_query(hub, registry, new_device):
    run = new_run()
    device_id = new_device("qmr").device_id
    module_ids = [unique_id("m") for _ in range(2)]
    for module_id in module_ids:
        registry.create_module_with_sas(device_id, module_id, None, None, None)
        registry.update_module_twin(device_id, module_id, Twin(tags={"run": run}), "*")
    key = registry.get_module(device_id, module_ids[0]).authentication.symmetric_key.primary_key
    report_as_device(hub, device_id, key, {"mode": "eco"}, module_id=module_ids[0])

    items = query(
        registry, f"SELECT * FROM devices.modules WHERE tags.run = '{run}' AND properties.reported.mode = 'eco'"
    ).items
    assert [(i.device_id, i.module_id) for i in items] == [(device_id, module_ids[0])]
    assert items[0].properties.reported["mode"] == "eco"


# --- aggregates and projections ---------------------------------------------------------------


def test_count(registry, tagged_devices):
    run = new_run()
    tagged_devices(run, 5, extra=lambda i: {"even": i % 2 == 0})

    result = query(registry, f"SELECT COUNT() AS n FROM devices WHERE tags.run = '{run}'", None, 2)
    assert result.type == "raw"
    assert result.continuation_token is None  # aggregates come back as one page
    assert len(result.items) == 1
    assert result.items[0].additional_properties == {"n": 5}
    assert result.items[0].device_id is None

    even = query(registry, f"SELECT COUNT() AS n FROM devices WHERE tags.run = '{run}' AND tags.even = true")
    assert even.items[0].additional_properties == {"n": 3}

    none = query(registry, f"SELECT COUNT() AS n FROM devices WHERE tags.run = '{new_run()}'")
    assert [i.additional_properties for i in none.items] == [{"n": 0}]


def test_group_by_counts(registry, tagged_devices):
    run = new_run()
    envs = ["prod", "test", "prod", "dev", "prod", "test"]
    tagged_devices(run, len(envs), extra=lambda i: {"env": envs[i]})

    result = query(
        registry,
        f"SELECT tags.env AS env, COUNT() AS numberOfDevices FROM devices "
        f"WHERE tags.run = '{run}' GROUP BY tags.env",
    )

    assert result.type == "raw"
    assert result.continuation_token is None
    groups = {i.additional_properties["env"]: i.additional_properties["numberOfDevices"] for i in result.items}
    assert groups == {"prod": 3, "test": 2, "dev": 1}
    assert len(result.items) == 3


def test_projection(registry, tagged_devices):
    run = new_run()
    ids = tagged_devices(run, 3, extra=lambda i: {"x": i * 10} if i < 2 else {})

    pages = query_all(registry, f"SELECT deviceId, tags.x AS x FROM devices WHERE tags.run = '{run}'", page_size=2)

    assert [len(p.items) for p in pages] == [2, 1]
    assert {p.type for p in pages} == {"raw"}
    items = [i for p in pages for i in p.items]
    assert [i.device_id for i in items] == sorted(ids)
    xs = {i.device_id: i.additional_properties for i in items}
    by_id = {device_id: n for n, device_id in enumerate(ids)}
    for device_id, extra in xs.items():
        n = by_id[device_id]
        # An undefined projected value is left out of the item.
        assert extra == ({"x": n * 10} if n < 2 else {}), (device_id, extra)
    # Nothing else of the twin comes back.
    assert all(i.tags is None and i.properties is None and i.etag is None for i in items)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "SELECT * FROM devices WHERE",
        "SELECT * FROM nowhere",
        "SELECT * FROM devices WHERE tags.x = 'unterminated",
        "SELECT * FROM devices WHERE NO_SUCH_FUNCTION(tags.x)",
        "DELETE FROM devices",
    ],
    ids=["dangling-where", "unknown-source", "unterminated-string", "unknown-function", "not-select"],
)
def test_bad_query_is_400(registry, text):
    with pytest.raises(HttpOperationError) as excinfo:
        query(registry, text)
    assert excinfo.value.response.status_code == 400


def test_garbage_continuation_token_is_400(registry):
    with pytest.raises(HttpOperationError) as excinfo:
        query(registry, "SELECT * FROM devices", "not a token!", 10)
    assert excinfo.value.response.status_code == 400
