#!/usr/bin/env bash
# CPU per proxied request from 1 to 2 workers: switchyard `workers: 1` and `workers: 2`
# (current-thread runtimes on SO_REUSEPORT sockets) side by side with nginx at
# `worker_processes 1` and `2`, all in front of the same nginx backend, under
# `wrk -t2 -c50`. CPU per request is the proxy's utime+stime (all threads, or the master and
# its workers) over the run divided by the requests answered: a worker model that scales
# keeps it flat from 1 to 2 workers. Interleaved rounds; run it on a quiet machine.
#
#   bash loadtest/workers.sh [BINARY]      # default target/release/switchyard
#   ROUNDS=3 DURATION=10 bash loadtest/workers.sh
#
# Uses ports 18380-18389, 18650 and 18450-18452 on 127.0.0.1; files go to loadtest/out/workers.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$(realpath "${1:-$ROOT/target/release/switchyard}")"
ROUNDS="${ROUNDS:-2}"; DURATION="${DURATION:-8}"
D="$ROOT/loadtest/out/workers"; mkdir -p "$D"; cd "$D"
BPORT=18381; CPORT=18650
# shellcheck source=loadtest/bench-lib.sh
source "$ROOT/loadtest/bench-lib.sh"
require_tools nginx consul wrk curl
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
start_backend "$D" $BPORT
start_consul_with_backend "$D" $CPORT 18450 $BPORT

TARGETS=()
start_nginx() { # workers port
  cat > "nginx-$1.conf" <<NG
worker_processes $1; daemon off; pid $D/nginx-$1.pid; error_log $D/nginx-$1.err;
events { worker_connections 1024; }
http { access_log off; upstream b { server 127.0.0.1:$BPORT; keepalive 64; }
  server { listen 127.0.0.1:$2 reuseport; keepalive_requests 1000000;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NG
  nginx -c "$D/nginx-$1.conf" & PIDS+=($!)
  TARGETS+=("nginx-$1 $! $2")
}
start_switchyard() { # workers port admin-port
  gateway_config "$2" "$3" "$1" $CPORT > "switchyard-$1.yaml"
  "$BIN" --config "switchyard-$1.yaml" > "switchyard-$1.log" 2>&1 & PIDS+=($!)
  TARGETS+=("switchyard-$1 $! $2")
}
start_switchyard 1 18380 18382
start_switchyard 2 18383 18384
start_nginx 1 18385
start_nginx 2 18386
for target in "${TARGETS[@]}"; do
  read -r _ _ port <<< "$target"
  wait_http "$port"
done

# utime+stime of a process and its children (nginx's master and workers), in clock ticks.
ticks() {
  local total=0 pid
  for pid in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)
printf 'target\tround\trequests\trps\tcpu_us_per_request\n' > results.tsv
for round in $(seq 1 "$ROUNDS"); do
  for target in "${TARGETS[@]}"; do
    read -r name pid port <<< "$target"
    wrk -t2 -c50 -d2s "http://127.0.0.1:$port/" > /dev/null
    t0=$(ticks "$pid")
    out=$(wrk -t2 -c50 -d"${DURATION}s" "http://127.0.0.1:$port/")
    t1=$(ticks "$pid")
    requests=$(awk '/requests in/ {print $1}' <<< "$out")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' <<< "$out")
    [[ -z $errors ]] || echo "workers.sh: $name: $errors" >&2
    awk -v n="$requests" -v t=$((t1 - t0)) -v hz="$HZ" -v d="$DURATION" -v name="$name" -v r="$round" \
      'BEGIN { printf "%s\t%d\t%d\t%.0f\t%.1f\n", name, r, n, n / d, t * 1e6 / hz / n }' >> results.tsv
  done
done
echo "| target | req/s (median) | CPU per request (median) | rounds |"
echo "| --- | ---: | ---: | --- |"
for target in "${TARGETS[@]}"; do
  read -r name _ _ <<< "$target"
  awk -F'\t' -v name="$name" '$1 == name { r[++n] = $4; c[n] = $5; all = all sprintf("%s%.1f µs", n > 1 ? ", " : "", $5) }
    function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    END { printf "| %s | %d | %.1f µs | %s |\n", name, median(r, n), median(c, n), all }' results.tsv
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
