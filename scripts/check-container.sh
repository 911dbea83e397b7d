#!/usr/bin/env bash
# Checks the Dockerfile's steps without a Docker engine, by running the same commands on this
# host (Debian bookworm, like the image):
#
#   builder   cargo build --release --locked --bin iothub-emulator
#   runtime   the binary needs only what debian:bookworm-slim has (libc, libm, libgcc_s);
#             copy it to <tmp>/usr/local/bin, `setcap cap_net_bind_service=+ep` on it;
#             a system user `iothub` (uid 10001 when free); /certs (0755) and /data (0700)
#             owned by it; run it AS that user with the ENTRYPOINT's flags
#             (--certs-dir <tmp>/certs, plus --data-dir <tmp>/data), bound to a spare 127.0.0.X
#             instead of 0.0.0.0, on the real ports 443 and 8883;
#   HEALTHCHECK  the Dockerfile's own command, run as that user;
#   stop      SIGTERM (docker stop) exits 0 within 10 s; a restart as the same user on the
#             same /data still has what was written.
#
# Also checks the negative: the same binary WITHOUT the capability cannot bind 443 as that user
# (when net.ipv4.ip_unprivileged_port_start says so), so the capability is what makes it work.
# If the temp filesystem cannot carry file capabilities (nosuid mount, no xattrs), it says so
# and falls back to an ambient capability for the run, checking everything else.
#
# Needs root (setcap, useradd, switching user), python3 and curl (installed with apt-get if
# missing, as is libcap2-bin for setcap). Leaves the `iothub` system user in place (no login
# shell, no home); removes everything else it made.
#
# Environment:
#   IOTHUB_EMULATOR_BIN=PATH   check this binary instead of building target/release
#   CONTAINER_CHECK_BUILD=0    do not run the builder step; use target/release (else target/debug)
#   TMPDIR=DIR                 where the image-like tree is made (default /tmp)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
DOCKERFILE="$ROOT/Dockerfile"
RUN_USER=iothub
RUN_UID=10001
PATH_IN_IMAGE=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

step() { printf -- '--- %s\n' "$*"; }
TMP=""
PID=""
LOG=""
fail() {
  echo "check-container: FAIL: $*" >&2
  if [[ -n "$LOG" && -f "$LOG" ]]; then
    echo "--- emulator log ($LOG):" >&2
    tail -n 40 "$LOG" >&2
  fi
  exit 1
}
cleanup() {
  if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
    kill -KILL "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  [[ -n "$TMP" ]] && rm -rf "$TMP"
}
trap cleanup EXIT

[[ "$(id -u)" -eq 0 ]] || fail "needs root (setcap, useradd, switching to the iothub user), as the image build does"
command -v python3 >/dev/null || fail "needs python3"

# --- 0. The Dockerfile still says what this script checks ---------------------------------
step "Dockerfile: the steps this script mirrors"
for needle in \
  'FROM rust:1-bookworm AS builder' \
  'cargo build --release --locked --bin iothub-emulator' \
  'FROM debian:bookworm-slim' \
  'COPY --from=builder /out/iothub-emulator /usr/local/bin/iothub-emulator' \
  'setcap cap_net_bind_service=+ep /usr/local/bin/iothub-emulator' \
  "useradd --system --uid $RUN_UID" \
  'chmod 0755 /certs' \
  'chmod 0700 /data' \
  'VOLUME ["/certs", "/data"]' \
  'EXPOSE 443 8883 5671' \
  'HEALTHCHECK' \
  "USER $RUN_USER" \
  'ENTRYPOINT ["iothub-emulator", "--bind", "0.0.0.0", "--certs-dir", "/certs"]'; do
  grep -qF -- "$needle" "$DOCKERFILE" || fail "the Dockerfile no longer contains '$needle': update scripts/check-container.sh with it"
done
# The HEALTHCHECK's exec-form command, as a bash array (its 127.0.0.1 becomes our address below).
mapfile -t HEALTHCHECK_CMD < <(python3 - "$DOCKERFILE" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
line = next(l for l in text.splitlines() if l.startswith("HEALTHCHECK"))
print("\n".join(json.loads(re.search(r"\bCMD\s+(\[.*\])", line).group(1))))
PY
)
[[ ${#HEALTHCHECK_CMD[@]} -gt 0 ]] || fail "cannot read the HEALTHCHECK command from the Dockerfile"

# --- 1. Builder -------------------------------------------------------------------------------
if [[ -n "${IOTHUB_EMULATOR_BIN:-}" ]]; then
  BIN="$IOTHUB_EMULATOR_BIN"
  step "builder: skipped, checking IOTHUB_EMULATOR_BIN=$BIN"
elif [[ "${CONTAINER_CHECK_BUILD:-1}" == "0" ]]; then
  BIN="$ROOT/target/release/iothub-emulator"
  [[ -x "$BIN" ]] || BIN="$ROOT/target/debug/iothub-emulator"
  step "builder: skipped (CONTAINER_CHECK_BUILD=0), checking $BIN"
else
  step "builder: cargo build --release --locked --bin iothub-emulator"
  cargo build --release --locked --bin iothub-emulator
  BIN="$ROOT/target/release/iothub-emulator"
fi
[[ -x "$BIN" ]] || fail "no binary at $BIN"

# --- 2. Runtime libraries: only what debian:bookworm-slim has ---------------------------------
step "runtime: shared libraries (bookworm-slim has libc6 and libgcc-s1; nothing else is installed for the binary)"
while read -r lib _; do
  case "$lib" in
    linux-vdso.so.*|linux-gate.so.*|libc.so.6|libm.so.6|libgcc_s.so.1|libpthread.so.0|libdl.so.2|librt.so.1|/lib64/ld-linux-*.so.*|/lib/ld-linux-*.so.*) ;;
    *) fail "the binary needs $lib, which debian:bookworm-slim does not have: add its package to the Dockerfile" ;;
  esac
done < <(ldd "$BIN")
if ldd "$BIN" | grep -q 'not found'; then fail "ldd: a library is missing"; fi
if [[ -r /etc/os-release ]] && ! grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then
  echo "note: this host is not Debian bookworm; the glibc the image has (2.36) is not checked here"
fi

# --- 3. Tools the image build uses --------------------------------------------------------------
missing=()
command -v setcap >/dev/null || missing+=(libcap2-bin)
command -v curl >/dev/null || missing+=(curl)
if [[ ${#missing[@]} -gt 0 ]]; then
  step "apt-get install ${missing[*]} (as the Dockerfile does)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
SETPRIV="$(command -v setpriv)" || fail "needs setpriv (util-linux) to run as the iothub user"

# --- 4. The user, the binary with its capability, the volumes -----------------------------------
if ! id -u "$RUN_USER" >/dev/null 2>&1; then
  uid_args=()
  getent passwd "$RUN_UID" >/dev/null || uid_args=(--uid "$RUN_UID")
  step "useradd --system ${uid_args[*]} --user-group $RUN_USER (left in place afterwards)"
  useradd --system "${uid_args[@]}" --user-group --home-dir /nonexistent --no-create-home \
    --shell /usr/sbin/nologin "$RUN_USER"
fi
RUN_UID_ACTUAL="$(id -u "$RUN_USER")"
[[ "$RUN_UID_ACTUAL" -ne 0 ]] || fail "user $RUN_USER is root"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/iothub-container-check.XXXXXX")"
chmod 0755 "$TMP"
IMAGE_BIN="$TMP/usr/local/bin/iothub-emulator"
NOCAP_BIN="$TMP/nocap/iothub-emulator"
install -D -m 0755 "$BIN" "$IMAGE_BIN"
install -D -m 0755 "$BIN" "$NOCAP_BIN"
CERTS="$TMP/certs"
DATA="$TMP/data"
mkdir -p "$CERTS" "$DATA"
chown "$RUN_USER:$RUN_USER" "$CERTS" "$DATA"
chmod 0755 "$CERTS"
chmod 0700 "$DATA"
LOG="$TMP/emulator.log"

step "setcap cap_net_bind_service=+ep (on $TMP, $(findmnt -no FSTYPE --target "$TMP" 2>/dev/null || echo '?'))"
FILE_CAPS=1
if ! setcap cap_net_bind_service=+ep "$IMAGE_BIN"; then
  FILE_CAPS=0
  echo "WARNING: setcap failed on $TMP: this filesystem cannot carry file capabilities here."
elif ! getcap "$IMAGE_BIN" | grep -q 'cap_net_bind_service[=+]ep'; then
  FILE_CAPS=0
  echo "WARNING: getcap does not show the capability on $IMAGE_BIN: $(getcap "$IMAGE_BIN")"
elif findmnt -no OPTIONS --target "$TMP" | tr ',' '\n' | grep -qx nosuid; then
  FILE_CAPS=0
  echo "WARNING: $TMP is on a nosuid mount, where the kernel ignores file capabilities."
fi
getcap "$IMAGE_BIN" || true
CAP_ARGS=()
if [[ "$FILE_CAPS" == 0 ]]; then
  echo "WARNING: falling back to an ambient CAP_NET_BIND_SERVICE for the runs below: everything"
  echo "         but the file capability itself is checked (the image build does setcap on its own layer)."
  CAP_ARGS=(--inh-caps=+net_bind_service --ambient-caps=+net_bind_service)
fi

pick_address() {
  python3 - <<'PY'
import random, socket
for _ in range(300):
    address = f"127.0.0.{random.randint(2, 250)}"
    ok = True
    for port in (443, 8883, 5671):
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                ok = False
                break
    if ok:
        print(address)
        break
else:
    raise SystemExit("no 127.0.0.X with 443, 8883 and 5671 free")
PY
}
ADDR="$(pick_address)"

# Runs a command as the image's user, with the image's environment (USER iothub: HOME from
# /etc/passwd, the image's PATH, nothing else) and WORKDIR /.
as_user() {
  (cd / && env -i HOME=/nonexistent PATH="$PATH_IN_IMAGE" \
    "$SETPRIV" --reuid="$RUN_USER" --regid="$RUN_USER" --init-groups "$@")
}

# --- 5. Negative: without the capability, the user cannot bind 443 -----------------------------
unpriv_start="$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null || echo 1024)"
if [[ "$unpriv_start" -gt 443 ]]; then
  step "without the capability, $RUN_USER cannot bind $ADDR:443 (ip_unprivileged_port_start=$unpriv_start)"
  set +e
  out="$(as_user -- timeout 20 "$NOCAP_BIN" --bind "$ADDR" --certs-dir "$CERTS" 2>&1)"
  rc=$?
  set -e
  [[ $rc -ne 0 && $rc -ne 124 ]] || fail "the binary without the capability did not fail to bind (exit $rc): $out"
  grep -q "cannot listen on $ADDR:443" <<<"$out" || fail "unexpected failure without the capability: $out"
  echo "ok: exit $rc: $(grep -o 'cannot listen on [^:]*:443[^.]*' <<<"$out" | head -n1)"
else
  echo "note: ip_unprivileged_port_start=$unpriv_start lets any user bind 443 here (as Docker sets it in"
  echo "      containers since 20.10); the negative check is skipped, the capability is still set and checked"
fi

# --- 6. Run as the user, like the container ------------------------------------------------------
start_emulator() {
  : >"$LOG"
  # setpriv execs the emulator: $PID is the emulator's own pid.
  (cd / && exec env -i HOME=/nonexistent PATH="$PATH_IN_IMAGE" \
    "$SETPRIV" --reuid="$RUN_USER" --regid="$RUN_USER" --init-groups "${CAP_ARGS[@]}" -- \
    "$IMAGE_BIN" --bind "$ADDR" --certs-dir "$CERTS" --data-dir "$DATA") >"$LOG" 2>&1 &
  PID=$!
  local deadline=$((SECONDS + 30))
  until grep -q 'iothub-emulator ready' "$LOG"; do
    kill -0 "$PID" 2>/dev/null || { wait "$PID" || true; fail "the emulator exited before it was ready"; }
    ((SECONDS < deadline)) || fail "not ready within 30 s"
    sleep 0.1
  done
}

sigterm_exit_0() {
  kill -TERM "$PID"
  local deadline=$((SECONDS + 10))
  while kill -0 "$PID" 2>/dev/null; do
    ((SECONDS < deadline)) || fail "still running 10 s after SIGTERM (docker stop would SIGKILL it)"
    sleep 0.1
  done
  local rc=0
  wait "$PID" || rc=$?
  PID=""
  [[ $rc -eq 0 ]] || fail "SIGTERM: exit code $rc, expected 0"
  echo "ok: SIGTERM -> exit 0"
}

OWNER_KEY="PCFd5Ixr95rqeCXdxUvRnBzqmtWpxg9nDnvYeGICeug="
owner_token() {
  python3 - "$ADDR" "$OWNER_KEY" <<'PY'
import base64, hashlib, hmac, sys, time, urllib.parse
host, key = sys.argv[1], sys.argv[2]
expiry = int(time.time()) + 600
sr = urllib.parse.quote_plus(host)
sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()).decode()
print(f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}&skn=iothubowner")
PY
}
api() { # METHOD PATH [curl args...] -> prints the HTTP status
  local method="$1" path="$2"
  shift 2
  curl -sS -o /dev/null -w '%{http_code}' --cacert "$CERTS/ca.pem" -X "$method" \
    -H "Authorization: $(owner_token)" "$@" "https://$ADDR$path?api-version=2021-04-12"
}

step "run as $RUN_USER: iothub-emulator --bind $ADDR --certs-dir $CERTS --data-dir $DATA"
start_emulator
read -r _ ruid euid suid fsuid < <(grep '^Uid:' "/proc/$PID/status")
capeff="$(awk '/^CapEff:/ {print $2}' "/proc/$PID/status")"
capprm="$(awk '/^CapPrm:/ {print $2}' "/proc/$PID/status")"
for u in "$ruid" "$euid" "$suid" "$fsuid"; do
  [[ "$u" == "$RUN_UID_ACTUAL" ]] || fail "the emulator runs as uid $ruid/$euid/$suid/$fsuid, not $RUN_UID_ACTUAL"
done
# CAP_NET_BIND_SERVICE is capability 10: 0x400, and nothing else.
[[ $((16#$capeff)) -eq $((1 << 10)) && $((16#$capprm)) -eq $((1 << 10)) ]] \
  || fail "capabilities: CapEff=$capeff CapPrm=$capprm, expected only cap_net_bind_service (0x400)"
echo "ok: pid $PID runs as uid $RUN_UID_ACTUAL with only cap_net_bind_service (CapEff=$capeff), listening on $ADDR:443 and :8883"

step "the volumes are the user's"
[[ "$(stat -c %u "$CERTS/ca.pem")" == "$RUN_UID_ACTUAL" ]] || fail "ca.pem is not owned by $RUN_USER"
[[ "$(stat -c %a "$CERTS/ca.key")" == 600 ]] || fail "ca.key mode is $(stat -c %a "$CERTS/ca.key"), expected 600"
[[ -n "$(find "$DATA" -mindepth 1 -user "$RUN_USER" -print -quit)" ]] || fail "nothing written by $RUN_USER in the data dir"
# A client container mounting /certs read-only as another user can read ca.pem.
as_user_nobody_ok="$(cd / && "$SETPRIV" --reuid=nobody --regid=nogroup --clear-groups -- cat "$CERTS/ca.pem" | head -n1 || true)"
[[ "$as_user_nobody_ok" == "-----BEGIN CERTIFICATE-----" ]] || fail "another user cannot read $CERTS/ca.pem"
echo "ok: ca.pem (readable by other users), ca.key (0600) and the store belong to $RUN_USER"

step "HTTPS: GET https://$ADDR/_emulator/health, trusting only the CA"
health="$(curl -fsS --max-time 5 --cacert "$CERTS/ca.pem" "https://$ADDR/_emulator/health")" || fail "health request failed"
grep -q healthy <<<"$health" || fail "health: $health"
echo "ok: $health"

step "HEALTHCHECK, as $RUN_USER: ${HEALTHCHECK_CMD[*]//127.0.0.1/$ADDR}"
as_user -- "${HEALTHCHECK_CMD[@]//127.0.0.1/$ADDR}" || fail "the Dockerfile's HEALTHCHECK command failed"
echo "ok"

step "MQTT/TLS: handshake on $ADDR:8883, trusting only the CA"
python3 - "$ADDR" "$CERTS/ca.pem" <<'PY' || fail "TLS handshake on 8883 failed"
import socket, ssl, sys
addr, ca = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection((addr, 8883), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        print("ok:", tls.version(), "certificate for", dict(x[0] for x in tls.getpeercert()["subject"]).get("commonName"))
PY

step "a write to the data volume: PUT /devices/container-check"
status="$(api PUT /devices/container-check -H 'Content-Type: application/json' -d '{"deviceId":"container-check"}')"
[[ "$status" == 200 ]] || fail "PUT device: HTTP $status"
echo "ok: 200"

step "docker stop: SIGTERM"
sigterm_exit_0

step "restart as $RUN_USER on the same volumes"
start_emulator
status="$(api GET /devices/container-check)"
[[ "$status" == 200 ]] || fail "after the restart, GET device: HTTP $status (the data volume did not keep it)"
echo "ok: the device is still there (HTTP 200)"
sigterm_exit_0

if [[ "$FILE_CAPS" == 1 ]]; then
  echo "check-container: OK (file capability, non-root user, volumes, HEALTHCHECK, SIGTERM, restart)"
else
  echo "check-container: OK, EXCEPT the file capability itself (this filesystem cannot carry it; an ambient capability stood in)"
fi
