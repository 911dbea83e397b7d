# iothub-emulator: a local Azure IoT Hub emulator, as a container.
#
#   docker build -t iothub-emulator .
#   docker run --rm -p 443:443 -p 8883:8883 -p 5671:5671 -v iothub-certs:/certs iothub-emulator
#
# The image runs as the non-root user `iothub` (uid 10001) and still serves 443 and 8883: the
# binary carries the CAP_NET_BIND_SERVICE file capability. The CA it creates on first start is
# in the /certs volume (trust /certs/ca.pem in clients); /data is for `--data-dir /data`.
# /certs is world-readable so that other containers mounting it read-only (as any user) can
# read ca.pem; ca.key is created 0600. Well-known credentials (emulator only, insecure): see
# the README, "Credentials".
#
# scripts/check-container.sh runs the runtime steps below on the host (no Docker engine needed):
# keep the two in step.

# --- build ------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace names the load tool, so its manifest and sources must be there (it is not built).
COPY bench ./bench
COPY config ./config
RUN cargo build --release --locked --bin iothub-emulator \
 && install -D -m 0755 target/release/iothub-emulator /out/iothub-emulator

# --- runtime ----------------------------------------------------------------------------------
FROM debian:bookworm-slim

# The binary links only libc, libm and libgcc_s (all in bookworm-slim). curl is for the
# HEALTHCHECK; libcap2-bin (setcap) is needed only while building the image and removed again
# in the same layer. No ca-certificates: the emulator makes no outgoing TLS connections.
COPY --from=builder /out/iothub-emulator /usr/local/bin/iothub-emulator
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends curl libcap2-bin; \
    setcap cap_net_bind_service=+ep /usr/local/bin/iothub-emulator; \
    getcap /usr/local/bin/iothub-emulator | grep -q cap_net_bind_service; \
    apt-get purge -y --auto-remove libcap2-bin; \
    rm -rf /var/lib/apt/lists/*; \
    useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin iothub; \
    mkdir -p /certs /data; \
    chown iothub:iothub /certs /data; \
    chmod 0755 /certs; \
    chmod 0700 /data

VOLUME ["/certs", "/data"]
# 443: service REST API, MQTT over WebSockets, /_emulator control API, web portal.
# 8883: MQTT over TLS. 5671: AMQP over TLS (devices, service C2D, Event Hub-compatible endpoint).
EXPOSE 443 8883 5671

# Liveness from inside the container (it listens on 0.0.0.0, so 127.0.0.1 reaches it; the
# certificate always covers 127.0.0.1). --insecure because this probe checks that the hub
# answers, not who it is, and still works with --tls-cert, where /certs/ca.pem is not used.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["curl", "-fsS", "--insecure", "--max-time", "2", "-o", "/dev/null", "https://127.0.0.1/_emulator/health"]

USER iothub
# Extra flags after the image name are appended: e.g. `--hostname iothub --san iothub` so
# that other containers can reach it by its compose service name, or `--data-dir /data`.
ENTRYPOINT ["iothub-emulator", "--bind", "0.0.0.0", "--certs-dir", "/certs"]
