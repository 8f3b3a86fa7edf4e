#!/usr/bin/env bash
# A profile-guided (PGO) release build of the gateway: an instrumented build serves ~35 s of
# the load test's kinds of traffic (plain HTTP/1.1 keep-alive, c=1 and a connection per
# request, request bodies, HTTPS keep-alive and full handshakes, HTTP/2, gRPC over h2c to a
# tonic instance, an instance that speaks HTTPS, WebSocket echoes, admin scrapes, unrouted
# paths) on 127.0.0.1, and the release profile (fat LTO) is built again with the profile it
# wrote. On the load test's path this costs ~14%
# fewer instructions per proxied request than `cargo build --release` (callgrind) and ~25%
# less user time (see the README's Performance section).
#
#   bash scripts/build-pgo.sh      # prints the binary's path: target/pgo/<host>/release/switchyard
#
# Installs what it uses when missing: rustup's llvm-tools (llvm-profdata), nginx, wrk,
# h2load, curl, openssl and python3 (apt), Consul, protoc; the gRPC and WebSocket examples it
# calls are built with `cargo build --release`. Both builds take as long as a release build each;
# their target directories are target/pgo-gen and target/pgo. Uses free ports on 127.0.0.1
# and stops everything it started.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
# shellcheck source=loadtest/bench-lib.sh
source "$ROOT/loadtest/bench-lib.sh"

HOST="$(rustc -vV | awk '/^host:/ {print $2}')"
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata"
GEN="$ROOT/target/pgo-gen"
RAW="$GEN/profiles"
OUT="$ROOT/target/pgo"
WORK="$GEN/train"
EXAMPLES="$ROOT/target/release/examples"

install_tools() {
  [[ -x "$PROFDATA" ]] || rustup component add llvm-tools-preview >&2
  install_debs curl:curl nginx:nginx-light wrk:wrk h2load:nghttp2-client openssl:openssl \
    python3:python3 >&2
  bash scripts/install-consul.sh >&2
  bash scripts/install-protoc.sh >&2
  require_tools curl nginx wrk h2load openssl python3 consul
}

# `--target` keeps RUSTFLAGS off build scripts and proc macros: only what ships is
# instrumented, and only it is built with the profile.
build() { # target-dir rustflags binaries...
  local dir="$1" flags="$2"
  shift 2
  RUSTFLAGS="$flags" cargo build --release --quiet --target "$HOST" --target-dir "$dir" "$@" >&2
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# A free port whose next two are free too (Consul's server and serf ports).
free_port_triple() {
  python3 -c 'import socket
while True:
    s = [socket.socket() for _ in range(3)]
    try:
        s[0].bind(("127.0.0.1", 0)); p = s[0].getsockname()[1]
        s[1].bind(("127.0.0.1", p + 1)); s[2].bind(("127.0.0.1", p + 2)); print(p); break
    except OSError: pass'
}

# The training run's gateway config: `web` on `/`, `greeter` (h2c) on its gRPC path, `secure`
# (an HTTPS instance with the training's self-signed certificate, so not verified) on
# `/secure/`, `ws` (WebSocket) on `/ws`, TLS.
training_config() { # listen admin consul tls
  gateway_config "$1" "$2" 1 "$3" "$(printf 'tls:\n  listen: "127.0.0.1:%s"\n  certificates:\n    - {cert_file: %s/cert.pem, key_file: %s/key.pem}' "$4" "$WORK" "$WORK")"
  printf '  - name: greeter\n    protocol: h2c\n    route:\n      path_prefix: "/helloworld.Greeter/"\n'
  printf '  - name: secure\n    protocol: https\n    tls: {insecure_skip_verify: true}\n    route:\n      path_prefix: "/secure/"\n'
  printf '  - name: ws\n    route:\n      path_prefix: "/ws"\n'
}

# Waits (up to 30 s) until the gateway on admin port $2 routes to instance $1.
routed() { # instance admin-port
  local _
  for _ in $(seq 1 60); do
    # Read whole first: `curl | grep -q` fails under pipefail when grep exits before curl
    # has written the body (curl: (23) Failed writing body), as the training's larger
    # /routes did.
    [[ "$(curl -fsS "http://127.0.0.1:$2/routes")" == *"\"$1\""* ]] && return 0
    sleep 0.5
  done
  return 1
}

# The traffic the profile is made of; every run is short and bounded.
drive() { # plain-port tls-port admin-port
  local plain="http://127.0.0.1:$1/" tls="https://127.0.0.1:$2/" i
  wrk -t1 -c50 -d4s "$plain"
  wrk -t1 -c1 -d2s "$plain"
  wrk -t1 -c20 -d2s -H 'Connection: close' "$plain"
  head -c 2000 /dev/zero | tr '\0' x >"$WORK/body.bin"
  h2load -t1 -c10 -m1 -D 2 --h1 -d "$WORK/body.bin" "$plain"
  wrk -t1 -c50 -d4s "$tls"
  wrk -t1 -c20 -d2s -H 'Connection: close' "$tls"
  h2load -t1 -c20 -m10 -D 4 "$tls"
  printf '\0\0\0\0\007\012\005bench' >"$WORK/grpc.bin"
  h2load -t1 -c10 -m10 -D 3 -d "$WORK/grpc.bin" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$1/helloworld.Greeter/SayHello"
  wrk -t1 -c20 -d3s "${plain}secure/"
  for i in 1 2 3 4 5; do "$EXAMPLES/websocket" --call "ws://127.0.0.1:$1/ws" --count 1000; done
  for i in $(seq 1 50); do
    curl -fsS -o /dev/null "http://127.0.0.1:$3/metrics"
    curl -sS -o /dev/null "http://127.0.0.1:$3/routes"
    curl -sS -o /dev/null "${plain}no/such/route"
  done
}

# Starts example $1 (grpc, websocket) as instance $2, registered in the Consul on port $3.
start_example() { # example id consul-port
  "$EXAMPLES/$1" --port 0 --consul "http://127.0.0.1:$3" --id "$2" >"$WORK/$2.log" 2>&1 &
  PIDS+=($!)
}

# Starts the HTTPS backend (nginx, the training's certificate) and registers it as `secure`.
start_secure_backend() { # port consul-port
  mkdir -p "$WORK/secure" && cp "$WORK/cert.pem" "$WORK/key.pem" "$WORK/secure/"
  start_backend "$WORK/secure" "$1" tls
  curl -fsS -X PUT -d "{\"Name\":\"secure\",\"ID\":\"secure-1\",\"Address\":\"127.0.0.1\",\"Port\":$1}" \
    "http://127.0.0.1:$2/v1/agent/service/register"
}

train() { # instrumented-binary
  local gw admin backend secure tls consul serf gateway id
  rm -rf "$WORK" "$RAW" && mkdir -p "$WORK"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
  chmod 600 "$WORK/key.pem"
  gw=$(free_port); admin=$(free_port); backend=$(free_port); secure=$(free_port); tls=$(free_port)
  consul=$(free_port)
  serf=$(free_port_triple)
  trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
  start_backend "$WORK" "$backend"
  start_consul_with_backend "$WORK" "$consul" "$serf" "$backend"
  start_secure_backend "$secure" "$consul"
  start_example grpc greeter-1 "$consul"
  start_example websocket ws-1 "$consul"
  training_config "$gw" "$admin" "$consul" "$tls" >"$WORK/gateway.yaml"
  LLVM_PROFILE_FILE="$RAW/switchyard-%p.profraw" "$1" --config "$WORK/gateway.yaml" >"$WORK/gateway.log" 2>&1 &
  gateway=$!; PIDS+=("$gateway")
  wait_http "$gw"
  for id in greeter-1 ws-1 secure-1; do
    routed "$id" "$admin" || { echo "build-pgo.sh: $id was not routed within 30 s" >&2; exit 1; }
  done
  drive "$gw" "$tls" "$admin" >"$WORK/drive.log" 2>&1
  kill -TERM "$gateway" && wait "$gateway" # the profile is written at exit
  compgen -G "$RAW/*.profraw" >/dev/null || { echo "build-pgo.sh: the training run wrote no profile" >&2; exit 1; }
}

install_tools
echo "== the gRPC and WebSocket instances the training calls (cargo build --release)" >&2
cargo build --release --quiet --example grpc --example websocket >&2
echo "== instrumented build (target/pgo-gen)" >&2
build "$GEN" "-Cprofile-generate=$RAW" --bin switchyard
echo "== training run" >&2
train "$GEN/$HOST/release/switchyard"
"$PROFDATA" merge -o "$GEN/merged.profdata" "$RAW"
echo "== optimized build (target/pgo)" >&2
build "$OUT" "-Cprofile-use=$GEN/merged.profdata" --bin switchyard
echo "$OUT/$HOST/release/switchyard"
