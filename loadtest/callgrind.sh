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
OHA_ARGS=(--no-tui); [[ "${CLOSE:-0}" == 1 ]] && OHA_ARGS+=(--disable-keepalive)
TLS="${TLS:-0}"
D="$ROOT/loadtest/out/callgrind"; mkdir -p "$D"; cd "$D"
BPORT=18181; GPORT=18180; APORT=18182; CPORT=18500
for tool in valgrind callgrind_control nginx consul oha curl; do
  command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is missing" >&2; exit 1; }
done
cat > nginx.conf <<NG
worker_processes 1; daemon off; pid $D/nginx.pid; error_log $D/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$BPORT; keepalive_requests 1000000;
  location / { return 200 "hello from the backend\n"; } } }
NG
cat > gateway.yaml <<GW
listen: "127.0.0.1:$GPORT"
admin_listen: "127.0.0.1:$APORT"
workers: $WORKERS
consul:
  address: "http://127.0.0.1:$CPORT"
$( [[ $TLS == 1 ]] && printf 'tls:\n  listen: "127.0.0.1:18183"\n  certificates:\n    - {cert_file: %s/cert.pem, key_file: %s/key.pem}\n' "$D" "$D" )
services:
  - name: web
    route:
      path_prefix: "/"
GW
if [[ $TLS == 1 ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout key.pem -out cert.pem 2> /dev/null
  chmod 600 key.pem
  URL=https://127.0.0.1:18183/; OHA_ARGS+=(--insecure)
else
  URL=http://127.0.0.1:$GPORT/
fi
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
nginx -c "$D/nginx.conf" & PIDS+=($!)
rm -rf consul-data
consul agent -dev -bind 127.0.0.1 -http-port $CPORT -dns-port -1 -grpc-port -1 -server-port 18300 \
  -serf-lan-port 18301 -serf-wan-port 18302 -data-dir "$D/consul-data" > consul.log 2>&1 & PIDS+=($!)
for _ in $(seq 1 60); do curl -sf http://127.0.0.1:$CPORT/v1/status/leader | grep -q : && break; sleep 0.5; done
curl -sf -X PUT -d "{\"Name\":\"web\",\"ID\":\"web-1\",\"Address\":\"127.0.0.1\",\"Port\":$BPORT}" \
  http://127.0.0.1:$CPORT/v1/agent/service/register
valgrind --tool=callgrind --callgrind-out-file="$D/callgrind.%p" "$BIN" --config gateway.yaml > gateway.log 2>&1 &
VPID=$!; PIDS+=($VPID)
for _ in $(seq 1 120); do curl -sf -o /dev/null http://127.0.0.1:$GPORT/ && break; sleep 0.5; done
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
