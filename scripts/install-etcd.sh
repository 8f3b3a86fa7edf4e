#!/usr/bin/env bash
# Installs etcd (server and etcdctl) when it is not on PATH: Debian's own `etcd-server` and
# `etcd-client` packages (3.4 in bookworm), from the machine's configured apt sources only.
# The tests start their own members on free loopback ports (tests/common/etcd.rs); the
# package's systemd unit is not used (policy-rc.d keeps it from starting where one exists).
set -euo pipefail

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

if command -v etcd >/dev/null 2>&1 && command -v etcdctl >/dev/null 2>&1; then
  echo "etcd already installed: $(command -v etcd) ($(etcd --version | head -1))"
  exit 0
fi
echo "install-etcd: installing etcd-server and etcd-client (Debian)"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  etcd-server etcd-client >/dev/null
echo "install-etcd: $(etcd --version | head -1)"
