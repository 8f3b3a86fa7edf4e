#!/usr/bin/env bash
# Installs ZooKeeper when it is missing: Debian's own `zookeeper` package (3.8 in bookworm, with
# a JRE through its dependencies), from the machine's configured apt sources only. The tests
# start their own ensemble on free loopback ports (tests/common/zookeeper.rs) with
# /usr/share/zookeeper/bin/zkServer.sh; the package's own service is not used.
set -euo pipefail

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

ZK_SERVER=/usr/share/zookeeper/bin/zkServer.sh
if [[ -x $ZK_SERVER ]] && command -v java >/dev/null 2>&1; then
  echo "zookeeper already installed: $ZK_SERVER ($(dpkg-query -W -f='${Version}' zookeeper 2>/dev/null || echo '?'))"
  exit 0
fi
echo "install-zookeeper: installing zookeeper (Debian)"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  zookeeper default-jre-headless >/dev/null
echo "install-zookeeper: zookeeper $(dpkg-query -W -f='${Version}' zookeeper)"
