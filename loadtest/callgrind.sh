#!/usr/bin/env bash
# Instructions (and heap allocations) per proxied request, counted by callgrind: steady on a
# loaded machine, where wall-clock rates are noise. switchyard (workers: 1, all threads counted)
# in front of one nginx backend registered in a dev Consul agent; N keep-alive GETs at c=1
# from oha after a warm-up, counted between `callgrind_control -z` and `-d`.
#
#   bash loadtest/callgrind.sh [BINARY]        # default target/release/switchyard
#   N=5000 bash loadtest/callgrind.sh
#   WORKERS=2 C=4 bash loadtest/callgrind.sh   # 2 workers (SO_REUSEPORT), 4 connections
#
# For a quicker build than the release profile's fat LTO:
#   CARGO_PROFILE_RELEASE_LTO=thin CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 cargo build --release
# Uses ports 18180-18182, 18300-18302 and 18500 on 127.0.0.1; files go to loadtest/out/callgrind.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$(realpath "${1:-$ROOT/target/release/switchyard}")"
N="${N:-2000}"; WORKERS="${WORKERS:-1}"; C="${C:-1}"
# CLOSE=1: a new connection per request (oha --disable-keepalive), for the per-connection cost.
# TLS=1: the requests go to the TLS listener (ECDSA P-256 certificate made by openssl here).
# UPSTREAM_TLS=1: the backend speaks HTTPS (`protocol: https`, same certificate; not verified:
# webpki refuses a self-signed CA certificate as a leaf, and keep-alive makes it one handshake).
OHA_ARGS=(--no-tui); [[ "${CLOSE:-0}" == 1 ]] && OHA_ARGS+=(--disable-keepalive)
TLS="${TLS:-0}"; UPSTREAM_TLS="${UPSTREAM_TLS:-0}"
D="$ROOT/loadtest/out/callgrind"; mkdir -p "$D"; cd "$D"
BPORT=18181; GPORT=18180; APORT=18182; CPORT=18500
# shellcheck source=loadtest/bench-lib.sh
source "$ROOT/loadtest/bench-lib.sh"
require_tools valgrind callgrind_control nginx consul oha curl
TLS_YAML=""; SERVICE_YAML=""; BACKEND_MODE=""
if [[ $TLS == 1 || $UPSTREAM_TLS == 1 ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout key.pem -out cert.pem 2> /dev/null
  chmod 600 key.pem
fi
if [[ $UPSTREAM_TLS == 1 ]]; then
  BACKEND_MODE=tls
  SERVICE_YAML="$(printf '    protocol: https\n    tls: {insecure_skip_verify: true}')"
fi
if [[ $TLS == 1 ]]; then
  TLS_YAML="$(printf 'tls:\n  listen: "127.0.0.1:18183"\n  certificates:\n    - {cert_file: %s/cert.pem, key_file: %s/key.pem}' "$D" "$D")"
  URL=https://127.0.0.1:18183/; OHA_ARGS+=(--insecure)
else
  URL=http://127.0.0.1:$GPORT/
fi
gateway_config $GPORT $APORT "$WORKERS" $CPORT "$TLS_YAML" "$SERVICE_YAML" > gateway.yaml
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
start_backend "$D" $BPORT $BACKEND_MODE
start_consul_with_backend "$D" $CPORT 18300 $BPORT
valgrind --tool=callgrind --callgrind-out-file="$D/callgrind.%p" "$BIN" --config gateway.yaml > gateway.log 2>&1 &
VPID=$!; PIDS+=($VPID)
wait_http $GPORT
oha "${OHA_ARGS[@]}" -n 500 -c "$C" "$URL" > /dev/null
callgrind_control -z $VPID > /dev/null
oha "${OHA_ARGS[@]}" -n "$N" -c "$C" "$URL" | grep -E "Success rate|\[200\]"
callgrind_control -d $VPID > /dev/null
sleep 1
OUT="$(ls -t "$D"/callgrind.$VPID.* | head -1)"
TOTAL="$(grep -h '^summary:\|^totals:' "$OUT" | head -1 | awk '{print $2}')"
MALLOCS="$(callgrind_annotate --tree=caller --threshold=100 "$OUT" 2>/dev/null \
  | awk '/^$/{b=""} {b=b"\n"$0} /\*  .*:malloc \[/{print b}' | grep -o '([0-9,]*x)' | tr -d '(x),' \
  | awk '{s+=$1} END {print s+0}')"
echo "instructions per request: $((TOTAL / N)) ($TOTAL for $N); malloc calls per request: $(awk -v m="$MALLOCS" -v n="$N" 'BEGIN {printf "%.1f", m/n}') ($OUT)"
