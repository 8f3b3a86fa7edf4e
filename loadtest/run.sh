#!/usr/bin/env bash
# The switchyard load test: switchyard, nginx and HAProxy side by side in front of the same three
# nginx backends, plus two scenarios (Consul churn, a backend killed under load). One command:
#
#   bash loadtest/run.sh                 # 3 interleaved rounds, 10 s per c=50 run (~6 min)
#   QUICK=1 bash loadtest/run.sh         # smoke run: 1 round, 2 s runs, short scenarios
#   ROUNDS=5 DURATION=20 bash loadtest/run.sh
#   PIN=0 bash loadtest/run.sh           # do not pin the c=1 runs to one CPU (see README)
#   EDGE=0 bash loadtest/run.sh          # skip the TLS, HTTP/2 and gRPC rows (edge.sh)
#   PGO=1 bash loadtest/run.sh           # measure the profile-guided build (scripts/build-pgo.sh)
#   SWITCHYARD_BIN=path bash loadtest/run.sh  # measure that binary, built already (BUILD= names it)
#
# Writes loadtest/RESULTS.md, loadtest/chart.svg and loadtest/scenarios.svg; raw outputs, configs
# and logs go to loadtest/out/ (not committed). Everything listens on 127.0.0.1 on free ports,
# every load run is bounded in time, and every process started here is stopped on exit.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

# ---------------------------------------------------------------------------------------------
# Knobs
# ---------------------------------------------------------------------------------------------
positive() { local v="${1%s}"; [[ "$v" =~ ^[0-9]+$ && "$v" -gt 0 ]] || { echo "run.sh: '$1' is not a positive whole number" >&2; exit 2; }; echo "$v"; }
if [[ "${QUICK:-0}" == 1 ]]; then
  ROUNDS="${ROUNDS:-1}"; DURATION="${DURATION:-2}"; C1_DURATION="${C1_DURATION:-2}"
  CHURN_SECONDS="${CHURN_SECONDS:-3}"; KILL_SECONDS="${KILL_SECONDS:-4}"; KILL_AT="${KILL_AT:-2}"
else
  ROUNDS="${ROUNDS:-3}"; DURATION="${DURATION:-10}"; C1_DURATION="${C1_DURATION:-5}"
  CHURN_SECONDS="${CHURN_SECONDS:-10}"; KILL_SECONDS="${KILL_SECONDS:-10}"; KILL_AT="${KILL_AT:-3}"
fi
ROUNDS="$(positive "$ROUNDS")"; DURATION="$(positive "$DURATION")"; C1_DURATION="$(positive "$C1_DURATION")"
CHURN_SECONDS="$(positive "$CHURN_SECONDS")"; KILL_SECONDS="$(positive "$KILL_SECONDS")"; KILL_AT="$(positive "$KILL_AT")"
(( KILL_AT < KILL_SECONDS )) || { echo "run.sh: KILL_AT ($KILL_AT) must be below KILL_SECONDS ($KILL_SECONDS)" >&2; exit 2; }
PIN="${PIN:-1}"
EDGE="${EDGE:-1}"                               # the TLS / HTTP/2 / gRPC rows (edge.sh)
PGO="${PGO:-0}"                                 # 1: the profile-guided build (scripts/build-pgo.sh)
EDGE_DURATION="$(positive "${EDGE_DURATION:-$DURATION}")"
if [[ "$PIN" == 1 && $(nproc) -lt 2 ]]; then echo "run.sh: one CPU only; PIN=0"; PIN=0; fi
CONNS=50          # the c=50 runs
CHURN_EVERY_MS=100
KILL_CONNS=20

OUT="$HERE/out"
log() { printf '== %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools: Debian packages, oha from crates.io, consul via the project's installer
# ---------------------------------------------------------------------------------------------
# shellcheck source=loadtest/bench-lib.sh
source "$HERE/bench-lib.sh"
install_debs curl:curl nginx:nginx-light haproxy:haproxy wrk:wrk python3:python3 \
  h2load:nghttp2-client openssl:openssl || die "apt-get install failed"
if ! command -v oha >/dev/null 2>&1; then
  log "installing oha (cargo install oha --locked; takes a few minutes)"
  cargo install oha --locked
fi
bash scripts/install-consul.sh
for tool in consul nginx haproxy wrk oha curl python3 taskset h2load openssl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is still missing after the install step"
done

if [[ -n "${SWITCHYARD_BIN:-}" ]]; then
  [[ -x "$SWITCHYARD_BIN" ]] || die "SWITCHYARD_BIN=$SWITCHYARD_BIN is not an executable"
  log "measuring $SWITCHYARD_BIN (built already); building the gRPC example"
  cargo build --release --quiet --example grpc
  BUILD="${BUILD:-given binary}"
elif [[ "$PGO" == 1 ]]; then
  log "building switchyard with profile-guided optimization (scripts/build-pgo.sh; it builds the gRPC example too)"
  SWITCHYARD_BIN="$(bash scripts/build-pgo.sh)"
  BUILD="fat LTO + PGO (scripts/build-pgo.sh)"
else
  log "building switchyard and the gRPC example (cargo build --release)"
  cargo build --release --quiet --bin switchyard --example grpc
  SWITCHYARD_BIN="$ROOT/target/release/switchyard"
  BUILD="fat LTO (cargo build --release)"
fi
GREETER_BIN="$ROOT/target/release/examples/grpc"

# ---------------------------------------------------------------------------------------------
# Bookkeeping: output directory, process list, cleanup
# ---------------------------------------------------------------------------------------------
rm -rf "$OUT"
mkdir -p "$OUT/steady" "$OUT/logs" "$OUT/nginx-temp"
chmod 755 "$OUT"
: >"$OUT/commands.txt"

PIDS=()       # every long-running process started here, stopped in reverse order on exit
declare -A NAME=()  # pid -> what it is, for messages
started() { PIDS+=("$2"); NAME[$2]="$1"; }
# Fails at once, naming the process and its log, if anything started here has exited.
check_alive() {
  local pid
  for pid in "${PIDS[@]:-}"; do
    [[ -z "$pid" ]] && continue
    kill -0 "$pid" 2>/dev/null || die "${NAME[$pid]:-pid $pid} exited unexpectedly; see $OUT/logs/"
  done
}
exec 3>&1 4>&2   # the script's own stdout/stderr, for cleanup
cleanup() {
  local rc=$? i pid
  trap - EXIT INT TERM
  # A signal's trap can run inside a command whose output is redirected to a result file.
  exec 1>&3 2>&4
  log "stopping everything started by run.sh"
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[i]}" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [[ -z "$pid" ]] && continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "   pid $pid did not stop within 5 s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  if [[ $rc -ne 0 ]]; then
    echo "run.sh: FAILED (exit $rc). Logs and configs are in $OUT/logs and $OUT" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now_us() { echo "${EPOCHREALTIME//[.,]/}"; }
secs_since() { local d=$(($(now_us) - $1)); printf '%d.%06d' $((d / 1000000)) $((d % 1000000)); }
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# wait_until <what> <seconds> <command...>: poll every 0.1 s.
wait_until() {
  local what="$1" secs="$2"; shift 2
  local i
  for ((i = 0; i < secs * 10; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    check_alive
    sleep 0.1
  done
  die "timed out after ${secs}s waiting for $what"
}
# Records a command in commands.txt (for RESULTS.md) and runs it.
run_logged() {
  printf '%s\n' "$*" >>"$OUT/commands.txt"
  "$@"
}
# Sum of utime+stime (clock ticks) over the given pids and their children (nginx workers).
tree_pids() {
  local pid child
  for pid in "$@"; do
    echo "$pid"
    for child in $(pgrep -P "$pid" 2>/dev/null || true); do tree_pids "$child"; done
  done
}
cpu_ticks() {
  local total=0 pid stat fields
  for pid in $(tree_pids "$@"); do
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
    stat="${stat##*) }"                   # drop "pid (comm) "; comm may contain spaces
    read -r -a fields <<<"$stat"          # fields[0] is field 3 (state)
    total=$((total + fields[11] + fields[12]))   # fields 14 and 15: utime, stime
  done
  echo "$total"
}
# This script plus the children it has waited for (wrk, curl): fields 14-17.
self_ticks() {
  local stat fields
  stat="$(cat "/proc/$$/stat")"; stat="${stat##*) }"
  read -r -a fields <<<"$stat"
  echo $((fields[11] + fields[12] + fields[13] + fields[14]))
}
# The machine's busy time over all CPUs, from the first line of /proc/stat.
machine_busy() {
  local _cpu user nice system _idle _iowait irq softirq steal _rest
  read -r _cpu user nice system _idle _iowait irq softirq steal _rest </proc/stat
  echo $((user + nice + system + irq + softirq + steal))
}

# CPU placement of the c=1 runs (PIN=1). On a small VM a wake-up on another core costs tens of
# microseconds, so where the scheduler happens to put wrk, the proxy and the backend changed the
# c=1 p50 by 2-3x from one run to the next. For c=1 runs everything (wrk, the backends, the
# proxies) is pinned to CPU 0: no hop pays a cross-core wake-up, and the difference to `direct`
# is the proxy's own work on the request path. The c=50 runs are not pinned: there every
# process is busy, and pinning (tried: proxy alone on CPU 1, the rest on CPU 0) made RPS lower
# and p99 several times worse on a machine whose other tenants cannot be pinned away.
ALL_CPUS="0-$(($(nproc) - 1))"
pin() { # cpu-list pids... : every thread of these processes and of their children
  [[ "$PIN" == 1 ]] || return 0
  local cpus="$1" pid; shift
  for pid in $(tree_pids "$@"); do taskset -a -p -c "$cpus" "$pid" >/dev/null; done
}

# ---------------------------------------------------------------------------------------------
# Ports, body, configs
# ---------------------------------------------------------------------------------------------
CONSUL_HTTP=$(free_port); SERF_LAN=$(free_port); SERF_WAN=$(free_port); CONSUL_SERVER=$(free_port)
B1=$(free_port); B2=$(free_port); B3=$(free_port); SPARE=$(free_port); VICTIM=$(free_port)
SY_PORT=$(free_port); SY_ADMIN=$(free_port); NGX_PORT=$(free_port); HAP_PORT=$(free_port)
# TLS listeners of the three proxies, their gRPC (h2c) listeners, the gRPC instance.
SY_TLS=$(free_port); NGX_TLS=$(free_port); HAP_TLS=$(free_port)
NGX_GRPC=$(free_port); HAP_GRPC=$(free_port); GREETER=$(free_port)
CONSUL="http://127.0.0.1:$CONSUL_HTTP"

# A fixed 100-byte body per backend; the first word names the backend so the spread can be checked.
body() { python3 -c 'import sys; s = sys.argv[1] + " "; print((s + "x" * 100)[:100], end="")' "$1"; }

# One throwaway ECDSA P-256 certificate for all three TLS listeners (HAProxy wants the chain and
# the key in one file).
mkdir -p "$OUT/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$OUT/tls/key.pem" -out "$OUT/tls/cert.pem" 2>/dev/null || die "openssl could not make a certificate"
chmod 600 "$OUT/tls/key.pem"
(umask 077 && cat "$OUT/tls/cert.pem" "$OUT/tls/key.pem" >"$OUT/tls/haproxy.pem")

nginx_common() {
  cat <<EOF
worker_processes 1;
error_log $OUT/logs/$1.err warn;
pid $OUT/$1.pid;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $OUT/nginx-temp/$1-body;
  proxy_temp_path $OUT/nginx-temp/$1-proxy;
EOF
}
backend_server() { # name port [access-log]
  local log=""
  [[ -n "${3:-}" ]] && log="access_log $3;"
  cat <<EOF
  server {
    listen 127.0.0.1:$2;
    $log
    location / { default_type text/plain; return 200 '$(body "$1")'; }
  }
EOF
}

{
  nginx_common backends
  backend_server backend-1 "$B1"
  backend_server backend-2 "$B2"
  backend_server backend-3 "$B3"
  backend_server backend-churn "$SPARE" "$OUT/logs/churn-instance-access.log"
  echo "}"
} >"$OUT/backends.conf"

{
  nginx_common victim
  backend_server backend-victim "$VICTIM"
  echo "}"
} >"$OUT/victim.conf"

{
  nginx_common nginx-proxy
  cat <<EOF
  upstream bench {
    server 127.0.0.1:$B1;
    server 127.0.0.1:$B2;
    server 127.0.0.1:$B3;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGX_PORT;
    location / {
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  server {
    listen 127.0.0.1:$NGX_TLS ssl http2;
    ssl_certificate $OUT/tls/cert.pem;
    ssl_certificate_key $OUT/tls/key.pem;
    # Debian's nginx 1.22 offers TLS 1.0-1.2 unless told (1.3 is in the default only from
    # 1.23.4): without this line wrk and h2load negotiated TLS 1.2 with nginx and 1.3 with the
    # others, and the handshake row compared unlike handshakes. edge_sanity checks the version.
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  # nginx sends one gRPC call per upstream connection at a time: keep enough of them alive
  # for the 50 x 10 streams of the load (with 64 it reconnects all the time, at 1/4 the rate).
  upstream greeter {
    server 127.0.0.1:$GREETER;
    keepalive 512;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGX_GRPC http2;
    location / { grpc_pass grpc://greeter; }
  }
}
EOF
} >"$OUT/nginx-proxy.conf"

cat >"$OUT/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096

defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 30s
  http-reuse always

frontend bench
  bind 127.0.0.1:$HAP_PORT
  default_backend bench

frontend bench_tls
  bind 127.0.0.1:$HAP_TLS ssl crt $OUT/tls/haproxy.pem alpn h2,http/1.1
  default_backend bench

frontend grpc
  bind 127.0.0.1:$HAP_GRPC proto h2
  default_backend greeter

backend greeter
  server g1 127.0.0.1:$GREETER proto h2

backend bench
  balance roundrobin
  server b1 127.0.0.1:$B1
  server b2 127.0.0.1:$B2
  server b3 127.0.0.1:$B3
EOF

cat >"$OUT/switchyard.yaml" <<EOF
# Written by loadtest/run.sh. Retry, upstream and server settings are the defaults except
# shutdown_grace, shortened so the script's cleanup is quick.
listen: "127.0.0.1:$SY_PORT"
admin_listen: "127.0.0.1:$SY_ADMIN"
workers: 1
consul:
  address: "$CONSUL"
server:
  shutdown_grace: "2s"
tls:
  listen: "127.0.0.1:$SY_TLS"
  certificates:
    - cert_file: "$OUT/tls/cert.pem"
      key_file: "$OUT/tls/key.pem"
services:
  - name: bench
    route:
      path_prefix: "/"
  - name: greeter
    protocol: h2c
    route:
      path_prefix: "/helloworld.Greeter/"
EOF

# ---------------------------------------------------------------------------------------------
# Start: consul, backends, the three proxies
# ---------------------------------------------------------------------------------------------
start_nginx() { # name -> pid of the master (runs in the foreground: daemon off)
  nginx -t -q -e "$OUT/logs/$1.err" -p "$OUT" -c "$OUT/$1.conf" -g 'daemon off;' >>"$OUT/logs/$1.out" 2>&1 \
    || die "nginx rejected $OUT/$1.conf: $(cat "$OUT/logs/$1.out")"
  nginx -e "$OUT/logs/$1.err" -p "$OUT" -c "$OUT/$1.conf" -g 'daemon off;' >>"$OUT/logs/$1.out" 2>&1 &
  started "nginx ($1)" $!
}
http_ok() { curl -fs -o /dev/null --max-time 1 "$1"; }

log "consul agent -dev on $CONSUL"
consul agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$CONSUL_HTTP" -dns-port -1 -grpc-port -1 \
  -serf-lan-port "$SERF_LAN" -serf-wan-port "$SERF_WAN" -server-port "$CONSUL_SERVER" \
  >"$OUT/logs/consul.log" 2>&1 &
CONSUL_PID=$!; started consul "$CONSUL_PID"
consul_leader() { [[ "$(curl -s --max-time 1 "$CONSUL/v1/status/leader")" == *:* ]]; }
wait_until "a Consul leader" 30 consul_leader

log "nginx backends on 127.0.0.1:$B1 :$B2 :$B3 (+ churn instance :$SPARE), one master, 1 worker"
start_nginx backends; BACKENDS_PID=$!
for p in "$B1" "$B2" "$B3" "$SPARE"; do wait_until "backend :$p" 10 http_ok "http://127.0.0.1:$p/"; done
size=$(curl -fsS "http://127.0.0.1:$B1/" | wc -c)
[[ "$size" -eq 100 ]] || die "backend body is $size bytes, expected 100"

register() { # id port
  curl -fsS --max-time 2 -X PUT --data "{\"ID\":\"$1\",\"Name\":\"bench\",\"Address\":\"127.0.0.1\",\"Port\":$2}" \
    "$CONSUL/v1/agent/service/register" >/dev/null
}
deregister() { curl -fsS --max-time 2 -X PUT "$CONSUL/v1/agent/service/deregister/$1" >/dev/null; }
log "registering bench-1..3 in Consul as service 'bench'"
register bench-1 "$B1"; register bench-2 "$B2"; register bench-3 "$B3"

log "gRPC instance (examples/grpc.rs, tonic) on 127.0.0.1:$GREETER, registered as 'greeter'"
"$GREETER_BIN" --port "$GREETER" --consul "$CONSUL" --id greeter-1 >"$OUT/logs/greeter.log" 2>&1 &
GREETER_PID=$!; started greeter "$GREETER_PID"
greeter_registered() { grep -q listening "$OUT/logs/greeter.log"; }
wait_until "the gRPC instance to register" 20 greeter_registered

log "switchyard on 127.0.0.1:$SY_PORT, TLS :$SY_TLS (admin :$SY_ADMIN), workers: 1"
"$SWITCHYARD_BIN" --config "$OUT/switchyard.yaml" --check >/dev/null
"$SWITCHYARD_BIN" --config "$OUT/switchyard.yaml" >"$OUT/logs/switchyard.log" 2>&1 &
SY_PID=$!; started switchyard "$SY_PID"
# The sorted instance ids switchyard currently routes to for service `bench` (or $1).
route_ids() {
  curl -fsS --max-time 1 "http://127.0.0.1:$SY_ADMIN/routes" | python3 -c '
import json, sys
ids = [i["id"] for s in json.load(sys.stdin)["services"] if s["service"] == sys.argv[1] for i in s["instances"]]
print(" ".join(sorted(ids)))' "${1:-bench}"
}
routes_are() { [[ "$(route_ids)" == "$1" ]]; }
wait_until "switchyard /readyz" 20 http_ok "http://127.0.0.1:$SY_ADMIN/readyz"
wait_until "switchyard to route to bench-1..3" 20 routes_are "bench-1 bench-2 bench-3"
greeter_routed() { [[ "$(route_ids greeter)" == greeter-1 ]]; }
wait_until "switchyard to route to greeter-1" 20 greeter_routed

log "nginx reverse proxy on 127.0.0.1:$NGX_PORT (worker_processes 1, keepalive 64)"
start_nginx nginx-proxy; NGX_PID=$!
log "HAProxy on 127.0.0.1:$HAP_PORT (nbthread 1, http-reuse always)"
haproxy -c -q -f "$OUT/haproxy.cfg" || die "haproxy rejected $OUT/haproxy.cfg"
haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/logs/haproxy.log" 2>&1 &
HAP_PID=$!; started haproxy "$HAP_PID"

TARGETS=(direct switchyard nginx haproxy)
declare -A URL=(
  [direct]="http://127.0.0.1:$B1/"
  [switchyard]="http://127.0.0.1:$SY_PORT/"
  [nginx]="http://127.0.0.1:$NGX_PORT/"
  [haproxy]="http://127.0.0.1:$HAP_PORT/"
)
declare -A CPU_PIDS=([direct]="$BACKENDS_PID" [switchyard]="$SY_PID" [nginx]="$NGX_PID" [haproxy]="$HAP_PID")
for t in "${TARGETS[@]}"; do wait_until "$t" 10 http_ok "${URL[$t]}"; done
for t in "${TARGETS[@]}"; do echo "# $t: ${URL[$t]}"; done >>"$OUT/commands.txt"

# Every proxy must answer 200 with the 100-byte body and spread over all three backends.
log "sanity: 30 requests per target over one connection"
for t in "${TARGETS[@]}"; do
  urls=(); for _ in $(seq 30); do urls+=("${URL[$t]}"); done
  answers="$(curl -fsS "${urls[@]}" | fold -w 100 | cut -d' ' -f1 | sort | uniq -c | tr -s ' ' | paste -sd, -)"
  printf '   %-10s %s\n' "$t" "$answers"
  want=3; [[ $t == direct ]] && want=1
  [[ "$(echo "$answers" | tr ',' '\n' | grep -c backend-)" -eq $want ]] || die "$t does not spread over $want backend(s): $answers"
done

# ---------------------------------------------------------------------------------------------
# Record the environment
# ---------------------------------------------------------------------------------------------
{
  echo "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "nproc=$(nproc)"
  echo "cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "mem=$(free -h | awk '/^Mem:/ {print $2}')"
  echo "kernel=$(uname -sr)"
  echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "clk_tck=$(getconf CLK_TCK)"
  echo "rounds=$ROUNDS"
  echo "duration=$DURATION"
  echo "c1_duration=$C1_DURATION"
  echo "conns=$CONNS"
  echo "churn_seconds=$CHURN_SECONDS"
  echo "churn_every_ms=$CHURN_EVERY_MS"
  echo "kill_seconds=$KILL_SECONDS"
  echo "kill_at=$KILL_AT"
  echo "kill_conns=$KILL_CONNS"
  echo "quick=${QUICK:-0}"
  echo "pin=$PIN"
  echo "edge=$EDGE"
  echo "edge_duration=$EDGE_DURATION"
  echo "pgo=$PGO"
} >"$OUT/meta.txt"
{
  rev="$(git rev-parse --short HEAD)"; git diff --quiet HEAD -- src Cargo.toml Cargo.lock || rev="$rev (with uncommitted changes)"
  echo "switchyard: $rev ($("$SWITCHYARD_BIN" --version)), $BUILD"
  echo "nginx: $(nginx -v 2>&1)"
  echo "haproxy: $(haproxy -v | head -1)"
  echo "wrk: $(wrk -v 2>&1 | head -1)"
  echo "h2load: $(h2load --version | head -1)"
  echo "openssl: $(openssl version)"
  echo "oha: $(oha --version)"
  echo "consul: $(consul version | head -1)"
  echo "rustc: $(rustc --version)"
  echo "python3: $(python3 --version 2>&1)"
} >"$OUT/versions.txt"
sed 's/^/   /' "$OUT/versions.txt"
echo "   load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------------------------------------
# Steady state: interleaved rounds; the order of targets rotates each round
# ---------------------------------------------------------------------------------------------
# cpu.tsv: the proxy's CPU ticks during each run, and how much CPU everything outside the load
# test used meanwhile (machine busy ticks minus ours: every process started here, wrk, curl).
printf 'round\ttarget\tkind\tticks\tloadavg1\tother_ticks\tseconds\n' >"$OUT/steady/cpu.tsv"
measure() { # round target kind wrk-args...
  local round="$1" target="$2" kind="$3"; shift 3
  local before after load loadgen=() busy0 ours0 t0 busy1 ours1
  check_alive
  if [[ "$kind" == c1 && "$PIN" == 1 ]]; then
    pin 0 "${CPU_PIDS[@]}"; loadgen=(taskset -c 0)
    echo "# round $round, $target, $kind (first: taskset -a -p -c 0 <each backend and proxy process>)" >>"$OUT/commands.txt"
  else
    pin "$ALL_CPUS" "${CPU_PIDS[@]}"
    echo "# round $round, $target, $kind" >>"$OUT/commands.txt"
  fi
  load=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(now_us); busy0=$(machine_busy); ours0=$(($(cpu_ticks "${PIDS[@]}") + $(self_ticks)))
  before=$(cpu_ticks "${CPU_PIDS[$target]}")
  run_logged "${loadgen[@]}" wrk "$@" "${URL[$target]}" >"$OUT/steady/r$round-$target-$kind.txt" 2>&1 \
    || die "wrk failed against $target: $(cat "$OUT/steady/r$round-$target-$kind.txt")"
  after=$(cpu_ticks "${CPU_PIDS[$target]}")
  busy1=$(machine_busy); ours1=$(($(cpu_ticks "${PIDS[@]}") + $(self_ticks)))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$target" "$kind" "$((after - before))" "$load" \
    "$(((busy1 - busy0) - (ours1 - ours0)))" "$(secs_since "$t0")" >>"$OUT/steady/cpu.tsv"
  printf '   round %s %-10s %-3s %12s req/s  p50 %-9s p99 %s\n' "$round" "$target" "$kind" \
    "$(awk '/^Requests\/sec/ {print $2}' "$OUT/steady/r$round-$target-$kind.txt")" \
    "$(awk '$1 == "50%" {print $2}' "$OUT/steady/r$round-$target-$kind.txt")" \
    "$(awk '$1 == "99%" {print $2}' "$OUT/steady/r$round-$target-$kind.txt")"
}
log "steady state: $ROUNDS round(s); per target wrk -c$CONNS ${DURATION}s then -c1 ${C1_DURATION}s"
for ((round = 1; round <= ROUNDS; round++)); do
  for ((k = 0; k < ${#TARGETS[@]}; k++)); do
    t="${TARGETS[$(((k + round - 1) % ${#TARGETS[@]}))]}"
    measure "$round" "$t" c50 -t1 "-c$CONNS" "-d${DURATION}s" --latency
    measure "$round" "$t" c1 -t1 -c1 "-d${C1_DURATION}s" --latency
  done
done

# ---------------------------------------------------------------------------------------------
# TLS, HTTP/2 and gRPC rows (edge.sh): interleaved rounds like the steady state, no pinning.
# ---------------------------------------------------------------------------------------------
pin "$ALL_CPUS" "${CPU_PIDS[@]}"
if [[ "$EDGE" == 1 ]]; then
  # shellcheck source=loadtest/edge.sh
  source "$HERE/edge.sh"
  edge_rounds
fi

# ---------------------------------------------------------------------------------------------
# Scenarios: churn in Consul, a backend killed under load (both through switchyard).
# No pinning: the scheduler places every process.
# ---------------------------------------------------------------------------------------------
pin "$ALL_CPUS" "${CPU_PIDS[@]}"
# shellcheck source=loadtest/scenarios.sh
source "$HERE/scenarios.sh"
scenario_churn
scenario_kill

echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/meta.txt"

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
log "writing loadtest/RESULTS.md, loadtest/chart.svg, loadtest/scenarios.svg"
python3 "$HERE/report.py" "$OUT" "$HERE"
echo
awk '/^\| target \| c=50/ {on = 1} on && /^$/ {exit} on' "$HERE/RESULTS.md"
