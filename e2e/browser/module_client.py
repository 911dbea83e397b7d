"""The device side of the portal browser test: the seed article's module application, in Python.

    module_client.py <connection string> <gateway address> <ca.pem>

It connects an `IoTHubModuleClient` with exactly the connection string the test copied from the
portal, plus `GatewayHostName=<gateway>` so that the socket reaches the emulator's 127.0.0.X
while `HostName` (MQTT username, SAS audience) stays as the portal printed it, and trusts the
emulator's CA with `server_verification_cert`. Then, as in the article:

- reports `DateTimeLastAppLaunch`;
- prints every desired-properties patch and answers it by reporting
  `DateTimeLastDesiredPropertyChangeReceived`;
- answers direct methods with status 200 and `{"echo": <payload>}`, and sends one telemetry
  message per call.

Every event is one JSON line on stdout, for the test to wait on. It runs until stdin closes.
"""

import asyncio
import datetime
import json
import sys

from azure.iot.device import Message, MethodResponse
from azure.iot.device.aio import IoTHubModuleClient


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


async def main() -> None:
    connection_string, gateway, ca_path = sys.argv[1:4]
    with open(ca_path, encoding="utf-8") as f:
        ca_pem = f.read()
    client = IoTHubModuleClient.create_from_connection_string(
        f"{connection_string};GatewayHostName={gateway}",
        server_verification_cert=ca_pem,
        connection_retry=False,
    )
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    # SDK handlers run on SDK threads: hand everything to this loop.
    client.on_twin_desired_properties_patch_received = lambda patch: loop.call_soon_threadsafe(
        inbox.put_nowait, ("desired", patch)
    )
    client.on_method_request_received = lambda request: loop.call_soon_threadsafe(
        inbox.put_nowait, ("method", request)
    )

    await asyncio.wait_for(client.connect(), 30)
    emit("connected")
    twin = await asyncio.wait_for(client.get_twin(), 30)
    emit("twin", twin=twin)
    await client.patch_twin_reported_properties({"DateTimeLastAppLaunch": now()})
    emit("launched")

    async def work() -> None:
        while True:
            kind, item = await inbox.get()
            if kind == "desired":
                emit("desired", patch=item)
                await client.patch_twin_reported_properties({"DateTimeLastDesiredPropertyChangeReceived": now()})
                emit("reported")
            else:
                emit("method", name=item.name, payload=item.payload)
                message = Message(json.dumps({"method": item.name, "payload": item.payload}))
                message.content_type = "application/json"
                message.content_encoding = "utf-8"
                message.custom_properties["source"] = "portal-test"
                await client.send_message(message)
                response = MethodResponse.create_from_method_request(item, 200, {"echo": item.payload})
                await client.send_method_response(response)

    worker = asyncio.create_task(work())
    # Until the test closes stdin.
    await loop.run_in_executor(None, sys.stdin.read)
    worker.cancel()
    await client.shutdown()
    emit("stopped")


if __name__ == "__main__":
    asyncio.run(main())
