"""A client container talking to the emulator container (see docker-compose.yml).

It trusts the emulator's CA only through the environment, as any unchanged SDK sample would:
REQUESTS_CA_BUNDLE for azure-iot-hub (service side), SSL_CERT_FILE for azure-iot-device (device
side), both pointing at the ca.pem of the emulator's certs volume, mounted read-only.

Creates (or re-creates) a device with the owner connection string, connects it over MQTT/TLS,
reads its twin, reports a property, and prints what the service then sees. Exit 0 on success.
"""

import os
import sys

from azure.iot.device import IoTHubDeviceClient
from azure.iot.hub import IoTHubRegistryManager

OWNER = os.environ["IOTHUB_CONNECTION_STRING"]
DEVICE_ID = os.environ.get("DEVICE_ID", "compose-device")
HOST = dict(part.split("=", 1) for part in OWNER.split(";"))["HostName"]

registry = IoTHubRegistryManager.from_connection_string(OWNER)
try:
    registry.delete_device(DEVICE_ID)
except Exception:  # not there yet
    pass
device = registry.create_device_with_sas(DEVICE_ID, None, None, "enabled")
key = device.authentication.symmetric_key.primary_key

client = IoTHubDeviceClient.create_from_connection_string(
    f"HostName={HOST};DeviceId={DEVICE_ID};SharedAccessKey={key}", connection_retry=False
)
client.connect()
print("device twin:", client.get_twin())
client.patch_twin_reported_properties({"hello": "from the client container"})
client.shutdown()

reported = registry.get_twin(DEVICE_ID).properties.reported
print("service sees reported:", {k: v for k, v in reported.items() if not k.startswith("$")})
sys.exit(0 if reported.get("hello") == "from the client container" else 1)
