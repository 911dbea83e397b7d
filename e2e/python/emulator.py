"""Start and stop one `iothub-emulator` process for an end-to-end suite, plus the small
helpers the tests share (SAS tokens, connection strings, unique ids).

Why a random loopback address: the Python device SDK hard-codes port 8883 (MQTT/TLS) and
443 (MQTT over WebSockets), the Node service SDK can only reach port 443
(shared/protocol.md C.1 and E.1), and every AMQP client (Node device/service, uamqp,
azure-eventhub) uses 5671 (shared/protocol-amqp.md). Those ports may already be taken on
127.0.0.1, so the emulator is bound to a spare 127.0.0.X and keeps its default ports. Devices connect with
`HostName=localhost;...;GatewayHostName=127.0.0.X`; service clients use
`HostName=127.0.0.X`. The emulator's certificate covers both names.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = REPO_ROOT / "target" / "debug" / "iothub-emulator"

STEP_TIMEOUT = 15  # seconds for any one SDK call

# Custom properties chosen to break naive encoders: bag separators, spaces, '+', '%', '/',
# unicode, an empty value.
TRICKY_PROPERTIES = {
    "a&b=c": "x&y=z",
    "with space": "two words",
    "plus": "1+1=2",
    "percent": "100%",
    "slash/key": "a/b/c",
    "unicode": "h\u00e9llo w\u00f6rld \u2713 \u6e29\u5ea6",
    "empty": "",
    "dollar$": "$.mid",
}


def run(coro):
    """Runs an SDK coroutine to completion (the tests are synchronous)."""
    return asyncio.run(coro)


async def step(awaitable, timeout: float = STEP_TIMEOUT):
    """One SDK call, bounded in time so that a hung call fails its test."""
    return await asyncio.wait_for(awaitable, timeout)
LOG_DIR = REPO_ROOT / "e2e" / "logs"

READY_LINE = "iothub-emulator ready"
DEVICE_HOSTNAME = "localhost"

# The emulator's built-in owner policy key (README / protocol contract).
OWNER_POLICY = "iothubowner"
OWNER_KEY = "PCFd5Ixr95rqeCXdxUvRnBzqmtWpxg9nDnvYeGICeug="

# A registryRead key we choose and hand to the emulator through --config, so the test
# knows it without depending on the emulator's built-in value.
REGISTRY_READ_POLICY = "registryRead"
REGISTRY_READ_KEY = base64.b64encode(hashlib.sha256(b"iothub-emulator e2e registryRead").digest()).decode()

HTTPS_PORT = 443
MQTT_PORT = 8883
AMQP_PORT = 5671
# Azurite's blob port, on the emulator's address (file upload; see `Emulator.start_azurite`).
AZURITE_PORT = 10000
# Azurite's well-known development account (Microsoft's Azurite documentation).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_MAIN = REPO_ROOT / "e2e" / "node" / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"


def storage_connection_string(address: str) -> str:
    """The connection string of the Azurite account on `address` (HTTPS)."""
    return (
        f"DefaultEndpointsProtocol=https;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=https://{address}:{AZURITE_PORT}/{AZURITE_ACCOUNT}"
    )

# The start-up banner names the Event Hub-compatible endpoint (issue 9):
#   Event Hub-compatible endpoint: Endpoint=sb://<host>/;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...
EVENTHUB_BANNER = "Event Hub-compatible endpoint:"


def unique_id(prefix: str) -> str:
    """A device or module id no other test uses (Azurite's getUniqueName habit)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def service_sas_token(host: str, policy: str, key: str, ttl: int = 3600) -> str:
    """A policy SAS token exactly as azure-iot-hub builds it (shared/protocol.md B):
    `sr` is quote_plus(host), the HMAC covers the encoded `sr` + "\\n" + expiry."""
    expiry = int(time.time()) + ttl
    sr = urllib.parse.quote_plus(host)
    to_sign = f"{sr}\n{expiry}".encode()
    sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign, hashlib.sha256).digest()).decode()
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}&skn={policy}"


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _pick_address(rng: random.Random) -> str:
    """A 127.0.0.X (X in 2..250) where 443, 8883, 5671 and 10000 can all still be bound."""
    for _ in range(200):
        address = f"127.0.0.{rng.randint(2, 250)}"
        if all(_port_free(address, port) for port in (HTTPS_PORT, MQTT_PORT, AMQP_PORT, AZURITE_PORT)):
            return address
    raise RuntimeError("no 127.0.0.X with ports 443, 8883, 5671 and 10000 free")


def parse_eventhub_banner(log_text: str, address: str) -> Optional[str]:
    """The Event Hub-compatible connection string from the start-up banner, with the host
    replaced by `address` (the banner names the hub's host name, `localhost`; the tests reach
    the emulator on its bind address, which the certificate also covers). None when the banner
    has no such line (an emulator without AMQP)."""
    at = log_text.find(EVENTHUB_BANNER)
    if at < 0:
        return None
    # The connection string follows on the same line or on the next one.
    match = re.search(r"Endpoint=sb://\S+", log_text[at:])
    if match is None:
        return None
    rest = match.group(0)
    fields = dict(part.split("=", 1) for part in rest.split(";") if "=" in part)
    needed = ("Endpoint", "SharedAccessKeyName", "SharedAccessKey", "EntityPath")
    if not all(fields.get(k) for k in needed):
        return None
    return (
        f"Endpoint=sb://{address}/;SharedAccessKeyName={fields['SharedAccessKeyName']};"
        f"SharedAccessKey={fields['SharedAccessKey']};EntityPath={fields['EntityPath']}"
    )


@dataclass
class Emulator:
    """A running emulator. `address` is the 127.0.0.X it is bound to."""

    address: str
    work_dir: Path
    certs_dir: Path
    log_path: Path
    process: subprocess.Popen
    ca_path: Path = field(init=False)
    ca_pem: str = field(init=False)
    azurite: Optional[subprocess.Popen] = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.ca_path = self.certs_dir / "ca.pem"
        self.ca_pem = self.ca_path.read_text()

    # -- connection strings ------------------------------------------------------------

    def service_connection_string(self, policy: str = OWNER_POLICY, key: str = OWNER_KEY) -> str:
        return f"HostName={self.address};SharedAccessKeyName={policy};SharedAccessKey={key}"

    def device_connection_string(self, device_id: str, key: str, module_id: Optional[str] = None) -> str:
        parts = [f"HostName={DEVICE_HOSTNAME}", f"DeviceId={device_id}"]
        if module_id is not None:
            parts.append(f"ModuleId={module_id}")
        parts += [f"SharedAccessKey={key}", f"GatewayHostName={self.address}"]
        # Never a trailing ';' (azure-iot-device rejects it, protocol.md A).
        return ";".join(parts)

    @property
    def base_url(self) -> str:
        return f"https://{self.address}"

    @property
    def eventhub_connection_string(self) -> str:
        """`Endpoint=sb://127.0.0.X/;SharedAccessKeyName=iothubowner;SharedAccessKey=...;EntityPath=...`,
        built from the banner's `Event Hub-compatible endpoint:` line and the bind address."""
        value = parse_eventhub_banner(self.log_path.read_text(errors="replace"), self.address)
        if value is None:
            raise AssertionError(
                f"the emulator printed no '{EVENTHUB_BANNER} Endpoint=sb://...;EntityPath=...' line "
                f"(log {self.log_path})"
            )
        return value

    # -- lifecycle ---------------------------------------------------------------------

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    @property
    def storage_connection_string(self) -> str:
        return storage_connection_string(self.address)

    def start_azurite(self, timeout: float = 30.0) -> None:
        """Starts Azurite's blob service (npm `azurite`, installed in e2e/node by the test
        command) on this emulator's address, port 10000, serving HTTPS with the emulator's
        server certificate (the device SDKs upload over HTTPS only), in loose mode. Stopped by
        `stop()`. Idempotent."""
        if self.azurite is not None:
            return
        if not AZURITE_MAIN.exists():
            raise RuntimeError(f"azurite is not installed: {AZURITE_MAIN} (npm ci in e2e/node)")
        log_path = LOG_DIR / f"python-azurite-{self.address}.log"
        log = open(log_path, "wb")
        args = [
            shutil.which("node") or "node", str(AZURITE_MAIN),
            "--blobHost", self.address, "--blobPort", str(AZURITE_PORT),
            "--cert", str(self.certs_dir / "server.pem"), "--key", str(self.certs_dir / "server.key"),
            "--location", str(self.work_dir / "azurite"),
            "--silent", "--loose", "--skipApiVersionCheck", "--disableTelemetry",
        ]
        self.azurite = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.azurite.poll() is None:
            try:
                socket.create_connection((self.address, AZURITE_PORT), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"azurite did not start; log {log_path}:\n{log_path.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL if it has not exited after 10 s (Azurite too, if started)."""
        if self.azurite is not None and self.azurite.poll() is None:
            self.azurite.terminate()
            try:
                self.azurite.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.azurite.kill()
                self.azurite.wait(timeout=10)
        if self.process.poll() is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def emulator_binary(binary: Optional[Path] = None) -> Path:
    """The binary under test: $IOTHUB_EMULATOR_BIN, else `binary`, else target/debug."""
    binary = Path(os.environ.get("IOTHUB_EMULATOR_BIN", binary or DEFAULT_BINARY))
    if not binary.exists():
        raise RuntimeError(f"emulator binary not found: {binary} (run `cargo build --locked` first)")
    return binary


def pick_address() -> str:
    """A spare 127.0.0.X where 443, 8883 and 5671 can be bound right now."""
    return _pick_address(random.SystemRandom())


def start_emulator(
    binary: Optional[Path] = None,
    config_toml: Optional[str] = None,
    ready_timeout: float = 60.0,
    attempts: int = 5,
    extra_args: Sequence[str] = (),
    address: Optional[str] = None,
    certs_dir: Optional[Path] = None,
    log_suffix: str = "",
) -> Emulator:
    """Start the emulator on a spare 127.0.0.X with its default ports (443, 8883 and 5671).

    The emulator's stdout/stderr go to a log file under e2e/logs/ (kept for debugging);
    readiness is the `iothub-emulator ready` line appearing there.

    `extra_args` are appended to the command line (e.g. `["--data-dir", dir]`). To restart an
    emulator where it was (same address, same CA, so connected SDK clients can come back),
    pass the old `address` and `certs_dir`: they are used as given (only one attempt on a
    fixed address) and `certs_dir` is not deleted by `stop()`. `log_suffix` keeps a
    restart's log apart from the first run's (`python-emulator-127.0.0.X<suffix>.log`).
    """
    binary = emulator_binary(binary)
    if address is not None:
        attempts = 1

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    rng = random.SystemRandom()
    last_error = "no attempt made"

    for _ in range(attempts):
        bind_address = address or _pick_address(rng)
        work_dir = Path(tempfile.mkdtemp(prefix="iothub-e2e-"))
        run_certs_dir = Path(certs_dir) if certs_dir is not None else work_dir / "certs"
        args = [
            str(binary),
            "--bind", bind_address,
            "--hostname", DEVICE_HOSTNAME,
            "--certs-dir", str(run_certs_dir),
            # File upload goes to an Azurite on the same address (started by the tests that
            # need it, `Emulator.start_azurite`).
            "--storage-connection-string", storage_connection_string(bind_address),
        ]
        if config_toml is not None:
            config_path = work_dir / "config.toml"
            config_path.write_text(config_toml)
            args += ["--config", str(config_path)]
        args += [str(a) for a in extra_args]

        log_path = LOG_DIR / f"python-emulator-{bind_address}{log_suffix}.log"
        log = open(log_path, "wb")
        log.write(("$ " + " ".join(args) + "\n").encode())
        log.flush()
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if READY_LINE in log_path.read_text(errors="replace"):
                if not (run_certs_dir / "ca.pem").exists():
                    process.kill()
                    process.wait()
                    raise RuntimeError(f"emulator ready but {run_certs_dir}/ca.pem missing")
                return Emulator(address=bind_address, work_dir=work_dir, certs_dir=run_certs_dir, log_path=log_path, process=process)
            if process.poll() is not None:
                break
            time.sleep(0.05)

        if process.poll() is None:
            process.kill()
            process.wait()
            last_error = f"not ready within {ready_timeout}s"
        else:
            last_error = f"exited with {process.returncode}"
        last_error += f"; log {log_path}:\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        shutil.rmtree(work_dir, ignore_errors=True)
        # A port may have been taken between the check and the bind: try another address.

    raise RuntimeError(f"could not start the emulator: {last_error}")
