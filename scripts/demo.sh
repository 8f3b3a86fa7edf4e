#!/usr/bin/env bash
# The switchyard demo: Consul, three self-registering `hello` instances, the gateway, and some
# traffic through it, all on 127.0.0.1. Installs Consul if it is missing. Ctrl-C or the end of
# the script stops everything it started.
#
#   ./scripts/demo.sh            # 300 requests, then the same after one instance leaves
#   DEMO_KEEP=1 ./scripts/demo.sh  # keep everything running until Ctrl-C
#   DEMO_NO_OHA=1 ./scripts/demo.sh  # skip installing oha (no load phase then)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
need() { command -v "$1" >/dev/null 2>&1 || { as_root apt-get update -qq && as_root apt-get install -y -qq "$2" >/dev/null; }; }
need curl curl
bash scripts/install-consul.sh
if ! command -v oha >/dev/null 2>&1 && [[ -z "${DEMO_NO_OHA:-}" ]]; then
  echo "== installing oha, the load generator (cargo install oha --locked; once, a few minutes)"
  cargo install oha --locked --quiet
  export PATH="$HOME/.cargo/bin:$PATH"
fi

free_port() {
  # Ask the kernel for a free port.
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000))
}

echo "== building switchyard and the hello example (release)"
cargo build --release --quiet --bin switchyard --example hello

WORK="$(mktemp -d -t switchyard-demo.XXXXXX)"
PIDS=()
cleanup() {
  echo "== stopping"
  # Instances first (they deregister themselves), then the gateway, then Consul.
  for pid in "${PIDS[@]:-}"; do [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

HTTP=$(free_port); LAN=$(free_port); WAN=$(free_port); SRV=$(free_port)
GW=$(free_port); ADMIN=$(free_port)
CONSUL="http://127.0.0.1:$HTTP"

echo "== consul agent -dev on $CONSUL"
consul agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$HTTP" -dns-port -1 -grpc-port -1 \
  -serf-lan-port "$LAN" -serf-wan-port "$WAN" -server-port "$SRV" >"$WORK/consul.log" 2>&1 &
CONSUL_PID=$!
for _ in $(seq 100); do
  [[ "$(curl -s "$CONSUL/v1/status/leader" || true)" == *:* ]] && break
  sleep 0.1
done

HELLO_PIDS=()
for i in 1 2 3; do
  ./target/release/examples/hello --consul "$CONSUL" --id "hello-$i" --tags demo >"$WORK/hello-$i.log" 2>&1 &
  HELLO_PIDS+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 100); do grep -q listening "$WORK/hello-$i.log" && break; sleep 0.1; done
  echo "   $(cat "$WORK/hello-$i.log")"
done

echo "== switchyard on 127.0.0.1:$GW (admin 127.0.0.1:$ADMIN), config gateway.yaml"
SWITCHYARD__LISTEN="127.0.0.1:$GW" SWITCHYARD__ADMIN_LISTEN="127.0.0.1:$ADMIN" \
  SWITCHYARD__CONSUL__ADDRESS="$CONSUL" ./target/release/switchyard --config gateway.yaml \
  >"$WORK/switchyard.log" 2>&1 &
GW_PID=$!
PIDS=("${HELLO_PIDS[@]}" "$GW_PID" "$CONSUL_PID")
for _ in $(seq 100); do
  [[ "$(curl -s "http://127.0.0.1:$ADMIN/readyz" || true)" == ready* ]] && break
  sleep 0.1
done
for _ in $(seq 100); do
  [[ $(curl -s "http://127.0.0.1:$ADMIN/routes" | grep -c '"id"') -ge 3 ]] && break
  sleep 0.1
done
echo "   /readyz: $(curl -s "http://127.0.0.1:$ADMIN/readyz")"

spread() {
  # $1 requests over one keep-alive connection; count answers per instance.
  local urls=()
  for _ in $(seq "$1"); do urls+=("http://127.0.0.1:$GW/hello"); done
  curl -s "${urls[@]}" | sort | uniq -c | sed 's/^/   /'
}

echo "== 300 requests to http://127.0.0.1:$GW/hello (round robin over 3 instances)"
spread 300

echo "== hello-3 stops (deregisters on SIGTERM); 300 more requests"
kill "${HELLO_PIDS[2]}"; wait "${HELLO_PIDS[2]}" 2>/dev/null || true
spread 300

if command -v oha >/dev/null 2>&1; then
  echo "== oha: 5 s of load, 50 connections"
  oha -z 5s -c 50 --no-tui "http://127.0.0.1:$GW/hello" | sed -n '1,20p'
else
  echo "== (no oha: DEMO_NO_OHA was set; 'cargo install oha --locked' adds the load phase)"
fi

echo "== metrics"
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^switchyard_(requests_total|upstream_instances|table_updates_total)' | sed 's/^/   /'

if [[ -n "${DEMO_KEEP:-}" ]]; then
  echo "== running; gateway http://127.0.0.1:$GW/hello, admin http://127.0.0.1:$ADMIN/routes. Ctrl-C stops."
  wait "$GW_PID"
fi
