"""File upload as Microsoft's Python file-upload sample does it, with azure-iot-device 2.14.0
(`get_storage_info_for_blob`, `notify_blob_upload_status`) and azure-storage-blob 12.31.1,
unchanged. The blob store is Azurite (npm `azurite`), started on the emulator's address with
the emulator's server certificate; the blob is read back from it with the account key.

The service side (the file notification receiver, AMQP) is checked by the Node suite
(e2e/node/file_upload.test.js): azure-iot-hub has no file notification receiver.
"""

from __future__ import annotations

import os

import pytest
from azure.core.exceptions import HttpResponseError
from azure.iot.device.aio import IoTHubDeviceClient
from azure.storage.blob import BlobClient, BlobServiceClient
from emulator import run, step


@pytest.fixture(scope="module")
def azurite(hub):
    hub.start_azurite()
    return hub


def device_client(hub, device):
    conn_str = hub.device_connection_string(device.device_id, device.authentication.symmetric_key.primary_key)
    return IoTHubDeviceClient.create_from_connection_string(
        conn_str, server_verification_cert=hub.ca_pem, connection_retry=False
    )


def blob_url(info: dict) -> str:
    return f"https://{info['hostName']}/{info['containerName']}/{info['blobName']}{info['sasToken']}"


def read_back(hub, blob_name: str) -> bytes:
    service = BlobServiceClient.from_connection_string(
        hub.storage_connection_string, connection_verify=str(hub.ca_path)
    )
    return service.get_blob_client("fileuploads", blob_name).download_blob().readall()


def test_upload_as_the_sample_does(azurite, new_device):
    hub = azurite
    device = new_device("pyupload")
    content = os.urandom(1024 * 1024 + 3)

    async def scenario():
        client = device_client(hub, device)
        await step(client.connect())
        try:
            info = await step(client.get_storage_info_for_blob("python/sample run.bin"))
            assert set(info) >= {"correlationId", "hostName", "containerName", "blobName", "sasToken"}
            assert info["blobName"] == f"{device.device_id}/python/sample run.bin"
            assert info["sasToken"].startswith("?")
            blob = BlobClient.from_blob_url(blob_url(info), connection_verify=str(hub.ca_path))
            blob.upload_blob(content)
            await step(client.notify_blob_upload_status(info["correlationId"], True, 200, "OK: uploaded"))
            return info
        finally:
            await step(client.shutdown())

    info = run(scenario())
    assert read_back(hub, info["blobName"]) == content


def test_a_failed_upload_is_reported_and_its_correlation_id_spent(azurite, new_device):
    hub = azurite
    device = new_device("pyuploadfail")

    async def scenario():
        client = device_client(hub, device)
        await step(client.connect())
        try:
            info = await step(client.get_storage_info_for_blob("never.txt"))
            await step(client.notify_blob_upload_status(info["correlationId"], False, 500, "gave up"))
            # Reported once; the hub no longer knows the correlation id.
            with pytest.raises(Exception):
                await step(client.notify_blob_upload_status(info["correlationId"], True, 200, "again"))
            # The SAS of another device's blob name is no use for this one's: the store says no.
            other = dict(info, blobName=f"someone-else/{info['blobName']}")
            with pytest.raises(HttpResponseError) as refused:
                BlobClient.from_blob_url(blob_url(other), connection_verify=str(hub.ca_path)).upload_blob(b"x")
            assert refused.value.status_code == 403
        finally:
            await step(client.shutdown())

    run(scenario())
