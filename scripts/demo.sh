#!/usr/bin/env bash
# The switchyard demo: Consul, self-registering instances (three `hello` and a `hello-v2`
# canary, routed by their fabio `urlprefix-` tags with the canary at `weight=0.2`; two gRPC
# `greeter` from examples/grpc.rs, a WebSocket echo from examples/websocket.rs), the gateway with a TLS
# listener (a throwaway ECDSA certificate made by openssl), and traffic through it, all on
# 127.0.0.1. Installs Consul if it is missing. Ctrl-C or the end of the script stops
# everything it started.
#
#   ./scripts/demo.sh            # 300 requests, the same after one instance leaves, then one
#                                # HTTPS request, 4 gRPC calls and 1,000 WebSocket echoes
#   DEMO_KEEP=1 ./scripts/demo.sh  # keep everything running until Ctrl-C
#   DEMO_NO_OHA=1 ./scripts/demo.sh  # skip installing oha (no load phase then)
#   DEMO_REGISTRY=etcd ./scripts/demo.sh       # the hello instances register in etcd
#   DEMO_REGISTRY=zookeeper ./scripts/demo.sh  # ... or in ZooKeeper (one local server each;
#                                # the gateway routes them with `source: etcd|zookeeper`;
#                                # the canary and tag routes are Consul's, so not shown then)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
need() { command -v "$1" >/dev/null 2>&1 || { as_root apt-get update -qq && as_root apt-get install -y -qq "$2" >/dev/null; }; }
need curl curl
need openssl openssl
bash scripts/install-consul.sh
bash scripts/install-protoc.sh   # the build needs it (etcd-client compiles etcd's protos)
REGISTRY="${DEMO_REGISTRY:-consul}"
case "$REGISTRY" in
  consul) ;;
  etcd) bash scripts/install-etcd.sh ;;
  zookeeper) bash scripts/install-zookeeper.sh ;;
  *) echo "DEMO_REGISTRY must be consul, etcd or zookeeper, not $REGISTRY" >&2; exit 2 ;;
esac
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

echo "== building switchyard and the hello, grpc and websocket examples (release)"
cargo build --release --quiet --bin switchyard --example hello --example grpc --example websocket
# Where cargo put them: CARGO_TARGET_DIR when set (a shared build cache), else ./target.
RELEASE="${CARGO_TARGET_DIR:-target}/release"

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
GW=$(free_port); ADMIN=$(free_port); TLS=$(free_port)
CONSUL="http://127.0.0.1:$HTTP"

echo "== consul agent -dev on $CONSUL"
consul agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$HTTP" -dns-port -1 -grpc-port -1 \
  -serf-lan-port "$LAN" -serf-wan-port "$WAN" -server-port "$SRV" >"$WORK/consul.log" 2>&1 &
CONSUL_PID=$!
PIDS=("$CONSUL_PID")
for _ in $(seq 100); do
  [[ "$(curl -s "$CONSUL/v1/status/leader" || true)" == *:* ]] && break
  sleep 0.1
done

# etcd or ZooKeeper for the hello instances when DEMO_REGISTRY asks for one (one server).
HELLO_REGISTRY=()
HELLO_SOURCE=""
if [[ $REGISTRY == etcd ]]; then
  ETCD_CLIENT=$(free_port); ETCD_PEER=$(free_port)
  echo "== etcd on 127.0.0.1:$ETCD_CLIENT (the hello instances register there)"
  etcd --name demo --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "demo=http://127.0.0.1:$ETCD_PEER" >"$WORK/etcd.log" 2>&1 &
  PIDS+=($!); REGISTRY_PIDS=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ETCD_CLIENT/health" >/dev/null && break; sleep 0.1; done
  HELLO_REGISTRY=(--registry etcd --etcd "http://127.0.0.1:$ETCD_CLIENT")
  HELLO_SOURCE="    source: etcd"
  REGISTRY_YAML="etcd: {endpoints: [\"http://127.0.0.1:$ETCD_CLIENT\"]}"
elif [[ $REGISTRY == zookeeper ]]; then
  ZK=$(free_port)
  echo "== ZooKeeper on 127.0.0.1:$ZK (the hello instances register there)"
  mkdir -p "$WORK/zk"
  printf 'tickTime=500\ndataDir=%s\nclientPort=%s\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\n' \
    "$WORK/zk" "$ZK" >"$WORK/zk/zoo.cfg"
  ZOO_LOG_DIR="$WORK/zk" /usr/share/zookeeper/bin/zkServer.sh start-foreground "$WORK/zk/zoo.cfg" >"$WORK/zk.log" 2>&1 &
  PIDS+=($!); REGISTRY_PIDS=($!)
  for _ in $(seq 200); do [[ "$(echo ruok | timeout 1 bash -c "cat >/dev/tcp/127.0.0.1/$ZK" 2>/dev/null; echo $?)" == 0 ]] && break; sleep 0.1; done
  HELLO_REGISTRY=(--registry zookeeper --zookeeper "127.0.0.1:$ZK")
  HELLO_SOURCE="    source: zookeeper"
  REGISTRY_YAML="zookeeper: {servers: [\"127.0.0.1:$ZK\"]}"
fi

# Instances: 3 hello (HTTP), 2 greeter (gRPC, examples/grpc.rs), 1 ws (examples/websocket.rs).
HELLO_PIDS=()
INSTANCE_PIDS=()
start_instance() { # example id [more arguments of the example]
  "$RELEASE"/examples/"$1" --consul "$CONSUL" --id "$2" "${@:3}" >"$WORK/$2.log" 2>&1 &
  INSTANCE_PIDS+=($!)
  PIDS=("${INSTANCE_PIDS[@]}" "${REGISTRY_PIDS[@]:-}" "$CONSUL_PID")
}
for i in 1 2 3; do
  start_instance hello "hello-$i" "${HELLO_REGISTRY[@]}"; HELLO_PIDS+=("${INSTANCE_PIDS[-1]}")
done
HELLO_IDS="hello-1 hello-2 hello-3"
if [[ $REGISTRY == consul ]]; then
  # The canary: another service on the same route, a fifth of its traffic (fabio's weight=).
  start_instance hello hello-v2-1 --name hello-v2 --tags "demo,urlprefix-/hello weight=0.2"
  HELLO_IDS+=" hello-v2-1"
fi
start_instance grpc greeter-1
start_instance grpc greeter-2
start_instance websocket ws-1
for id in $HELLO_IDS greeter-1 greeter-2 ws-1; do
  for _ in $(seq 100); do grep -q listening "$WORK/$id.log" && break; sleep 0.1; done
  echo "   $(cat "$WORK/$id.log")"
done

echo "== a throwaway ECDSA P-256 certificate for localhost (openssl; key mode 600)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2>/dev/null
chmod 600 "$WORK/tls.key"

# The demo's config; every other key keeps its default (documented in gateway.yaml).
cat >"$WORK/gateway.yaml" <<EOF
listen: "127.0.0.1:$GW"
admin_listen: "127.0.0.1:$ADMIN"
consul: {address: "$CONSUL"}
server: {shutdown_grace: 2s}
tls:
  listen: "127.0.0.1:$TLS"
  certificates:
    - {cert_file: "$WORK/tls.pem", key_file: "$WORK/tls.key"}
$(if [[ $REGISTRY == consul ]]; then
  echo "tag_routes: {enabled: true}          # hello and hello-v2 are routed by their urlprefix- tags"
else
  echo "$REGISTRY_YAML"
fi)
services:
$(if [[ $REGISTRY != consul ]]; then printf '  - name: hello\n%s\n' "$HELLO_SOURCE"; fi)
  - name: greeter                     # gRPC: HTTP/2 without TLS to the instances
    protocol: h2c
    route: {path_prefix: /helloworld.Greeter/}
  - name: ws
    route: {path_prefix: /ws}
EOF
echo "== switchyard on 127.0.0.1:$GW, TLS on 127.0.0.1:$TLS (admin 127.0.0.1:$ADMIN)"
"$RELEASE"/switchyard --config "$WORK/gateway.yaml" >"$WORK/switchyard.log" 2>&1 &
GW_PID=$!
PIDS=("${INSTANCE_PIDS[@]}" "$GW_PID" "${REGISTRY_PIDS[@]:-}" "$CONSUL_PID")
for _ in $(seq 100); do
  [[ "$(curl -s "http://127.0.0.1:$ADMIN/readyz" || true)" == ready* ]] && break
  sleep 0.1
done
for _ in $(seq 100); do
  [[ $(curl -s "http://127.0.0.1:$ADMIN/routes" | grep -c '"id"') -ge $(($(wc -w <<<"$HELLO_IDS") + 3)) ]] && break
  sleep 0.1
done
echo "   /readyz: $(curl -s "http://127.0.0.1:$ADMIN/readyz")"

spread() {
  # $1 requests over one keep-alive connection; count answers per instance.
  local urls=()
  for _ in $(seq "$1"); do urls+=("http://127.0.0.1:$GW/hello"); done
  curl -s "${urls[@]}" | sort | uniq -c | sed 's/^/   /'
}

if [[ $REGISTRY == consul ]]; then
  echo "== 300 requests to http://127.0.0.1:$GW/hello (tag routes: hello-v2 weight=0.2, the rest round robin over hello's 3)"
else
  echo "== 300 requests to http://127.0.0.1:$GW/hello (source: $REGISTRY, round robin over 3 instances)"
fi
spread 300

echo "== hello-3 stops (deregisters on SIGTERM); 300 more requests"
kill "${HELLO_PIDS[2]}"; wait "${HELLO_PIDS[2]}" 2>/dev/null || true
spread 300

echo "== HTTPS: curl --cacert tls.pem https://localhost:$TLS/hello"
curl -sv --cacert "$WORK/tls.pem" --resolve "localhost:$TLS:127.0.0.1" "https://localhost:$TLS/hello" 2>&1 \
  | grep -E '^\* SSL connection|^\* ALPN: server accepted|^< HTTP|^hello' | sed 's/^/   /'

echo "== gRPC: 4 calls of helloworld.Greeter/SayHello through the gateway (the tonic example's client)"
"$RELEASE"/examples/grpc --call "127.0.0.1:$GW" --count 4 --name demo | sort | uniq -c | sed 's/^/   /'

echo "== WebSocket: 1,000 messages through the gateway to the echo example"
"$RELEASE"/examples/websocket --call "ws://127.0.0.1:$GW/ws" --count 1000 | sed 's/^/   /'

if command -v oha >/dev/null 2>&1; then
  echo "== oha: 5 s of load, 50 connections"
  oha -z 5s -c 50 --no-tui "http://127.0.0.1:$GW/hello" | sed -n '1,20p'
else
  echo "== (no oha: DEMO_NO_OHA was set; 'cargo install oha --locked' adds the load phase)"
fi

echo "== metrics"
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^switchyard_(requests_total|upstream_instances|tls_handshakes_total)' | sed 's/^/   /'

if [[ -n "${DEMO_KEEP:-}" ]]; then
  echo "== running; gateway http://127.0.0.1:$GW/hello and https://localhost:$TLS/hello, admin http://127.0.0.1:$ADMIN/routes. Ctrl-C stops."
  wait "$GW_PID"
fi
