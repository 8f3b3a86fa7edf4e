# syntax=docker/dockerfile:1
# switchyard's container image: built with the official Rust image, run on Debian slim as an
# unprivileged user. `docker build -t switchyard .`; running it: README, "Container image".

# ---- build ----------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# protoc and protobuf's well-known .proto files: the etcd-client crate compiles etcd's .proto
# files in its build script.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
# Cache mounts keep the crates.io downloads and compiled dependencies between builds (BuildKit,
# the default builder); the binary is copied out because the target mount is not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin switchyard \
    && install -m 0755 target/release/switchyard /usr/local/bin/switchyard

# ---- run ------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# curl only serves the HEALTHCHECK below: the slim image has no HTTP client. Versions are
# left to bookworm's archive so a rebuild picks up its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric UID, so `runAsNonRoot` style checks can verify it without /etc/passwd.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin switchyard

COPY --from=build /usr/local/bin/switchyard /usr/local/bin/switchyard
COPY gateway.yaml /etc/switchyard/gateway.yaml

# The binary reads --config, or SWITCHYARD_CONFIG when the flag is absent. Mount your own
# file over /etc/switchyard/gateway.yaml, or override single keys with SWITCHYARD__<KEY>.
ENV SWITCHYARD_CONFIG=/etc/switchyard/gateway.yaml
# admin_listen defaults to 127.0.0.1:8081, which inside a container is reachable only from the
# container itself: a published port, a Prometheus or an orchestrator's probe all arrive on
# the container's own interface. Keep the admin port off public networks: /routes shows
# internal addresses.
ENV SWITCHYARD__ADMIN_LISTEN=0.0.0.0:8081

USER 10001:10001
EXPOSE 8080 8081
# /healthz answers 200 while the process serves (readiness, /readyz, is for orchestrators
# that route traffic). Follows SWITCHYARD__ADMIN_LISTEN's port: change both together.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8081/healthz"]
# SIGTERM (docker stop) drains in-flight requests for server.shutdown_grace (30s by default):
# give `docker stop` a longer timeout than that (`--stop-timeout 35` / `-t 35`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchyard"]
