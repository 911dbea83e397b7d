#!/usr/bin/env bash
# The one test command: Rust unit + integration tests, then the end-to-end suites that drive
# the emulator with the official Azure IoT SDKs (Python and Node), unchanged, over real TLS.
#
# Needs: Rust (cargo), Python 3.11+ with pip/venv, Node 20+ with npm, and Debian's chromium for
# the portal's browser test (installed with apt-get when /usr/bin/chromium is missing).
# The e2e suites bind a random 127.0.0.X on ports 443, 8883 and 5671 (the SDKs' fixed ports), so
# they need permission to bind privileged ports (root, or CAP_NET_BIND_SERVICE).
#
# Environment:
#   E2E=0            skip the end-to-end suites (cargo only)
#   PYTEST_ARGS=...  extra pytest arguments (e.g. "-k seed -x")
#   FUZZ_SMOKE=0     skip the fuzz smoke (scripts/fuzz-smoke.sh: every fuzz target, 15 s each)
#   CONTAINER_CHECK=0  skip scripts/check-container.sh (the Dockerfile's steps run on the
#                    host; needs root, builds target/release)
#
# Idempotent: the venv (e2e/python/.venv) and node_modules are reused when
# requirements.txt / package-lock.json have not changed since they were installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

phase() { printf '\n==> %s\n' "$*"; }

phase "cargo build --locked --workspace"
cargo build --locked --quiet --workspace

phase "cargo test --locked --workspace"
cargo test --locked --workspace

# --- Fuzz smoke: every target under fuzz/, built on stable, 15 s each from an empty corpus ---
if [[ "${FUZZ_SMOKE:-1}" == "0" ]]; then
  phase "FUZZ_SMOKE=0: skipping the fuzz smoke"
else
  phase "fuzz smoke (scripts/fuzz-smoke.sh)"
  bash "$ROOT/scripts/fuzz-smoke.sh"
fi

# --- Container: the Dockerfile's steps, run on this host (no Docker engine needed) ---------
# Release build as in the image's builder stage, then the runtime steps: setcap, a non-root
# user, its /certs and /data, 443/8883 bound as that user, HEALTHCHECK, SIGTERM exit 0.
if [[ "${CONTAINER_CHECK:-1}" == "0" ]]; then
  phase "CONTAINER_CHECK=0: skipping scripts/check-container.sh"
else
  phase "container check: the Dockerfile's steps on the host (scripts/check-container.sh)"
  env -u IOTHUB_EMULATOR_BIN bash "$ROOT/scripts/check-container.sh"
fi

if [[ "${E2E:-1}" == "0" ]]; then
  phase "E2E=0: skipping the SDK end-to-end suites"
  exit 0
fi

BIN="$ROOT/target/debug/iothub-emulator"
[[ -x "$BIN" ]] || { echo "missing $BIN after cargo build" >&2; exit 1; }
export IOTHUB_EMULATOR_BIN="$BIN"

# --- Python: venv + pinned requirements ---------------------------------------------------
PY_DIR="$ROOT/e2e/python"
VENV="$PY_DIR/.venv"
PY_STAMP="$VENV/.requirements.sha256"
PY_WANT="$(sha256sum "$PY_DIR/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$PY_STAMP" 2>/dev/null || true)" != "$PY_WANT" ]]; then
  phase "python venv: installing e2e/python/requirements.txt"
  PYTHON="${PYTHON:-python3}"
  "$PYTHON" -m venv --clear "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$PY_DIR/requirements.txt"
  echo "$PY_WANT" > "$PY_STAMP"
else
  phase "python venv: up to date"
fi

# --- Node: npm ci from the lockfile --------------------------------------------------------
NODE_DIR="$ROOT/e2e/node"
NODE_STAMP="$NODE_DIR/node_modules/.package-lock.sha256"
NODE_WANT="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ ! -d "$NODE_DIR/node_modules" ]] || [[ "$(cat "$NODE_STAMP" 2>/dev/null || true)" != "$NODE_WANT" ]]; then
  phase "node: npm ci"
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$NODE_WANT" > "$NODE_STAMP"
else
  phase "node: node_modules up to date"
fi

status=0

# --- Python e2e ----------------------------------------------------------------------------
rm -rf "$ROOT/e2e/logs"
phase "pytest e2e/python (azure-iot-hub + azure-iot-device + azure-eventhub)"
set +e
# shellcheck disable=SC2086
(cd "$PY_DIR" && "$VENV/bin/python" -m pytest -q ${PYTEST_ARGS:-})
py_status=$?
set -e
if [[ $py_status -eq 5 ]]; then
  echo "pytest collected no tests: treating as a failure" >&2
  py_status=1
fi
[[ $py_status -eq 0 ]] || status=1

# --- Node e2e ------------------------------------------------------------------------------
phase "node --test e2e/node (azure-iothub + azure-iot-device-mqtt + azure-iot-device-amqp)"
set +e
(cd "$NODE_DIR" && node run.mjs)
node_status=$?
set -e
[[ $node_status -eq 0 ]] || status=1

# --- Browser e2e: the web portal in Debian's chromium, driven by playwright-core -----------
# Debian's chromium, never a Playwright browser download. Installed only when missing (as root).
if [[ ! -x /usr/bin/chromium ]]; then
  phase "browser: installing Debian's chromium (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
BROWSER_DIR="$ROOT/e2e/browser"
BROWSER_STAMP="$BROWSER_DIR/node_modules/.package-lock.sha256"
BROWSER_WANT="$(sha256sum "$BROWSER_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ ! -d "$BROWSER_DIR/node_modules" ]] || [[ "$(cat "$BROWSER_STAMP" 2>/dev/null || true)" != "$BROWSER_WANT" ]]; then
  phase "browser: npm ci (playwright-core)"
  (cd "$BROWSER_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$BROWSER_WANT" > "$BROWSER_STAMP"
else
  phase "browser: node_modules up to date"
fi
phase "node --test e2e/browser (web portal in chromium; Python IoTHubModuleClient)"
set +e
(cd "$BROWSER_DIR" && node --test --test-concurrency=1 portal.test.mjs)
browser_status=$?
set -e
[[ $browser_status -eq 0 ]] || status=1

phase "summary: pytest exit $py_status, node exit $node_status, browser exit $browser_status"
exit $status
