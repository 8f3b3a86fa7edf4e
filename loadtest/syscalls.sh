#!/usr/bin/env bash
# System calls per proxied request and the user/system split of CPU per request, switchyard
# (workers: 1) against nginx as a reverse proxy (1 worker, upstream keepalive), both in front
# of the same nginx backend: where the CPU gap between them is, kernel or user space.
#
#   bash loadtest/syscalls.sh [BINARY]        # default target/release/switchyard
#   N=20000 bash loadtest/syscalls.sh         # requests counted under strace (c=1)
#
# Part 1: `strace -c -f` attached to each proxy during N keep-alive GETs at c=1 (oha).
# Part 2: utime/stime from /proc/<pid>/stat over `wrk -t1 -c50 -d8s`, two rounds each; these
# are wall-clock figures, as noisy as the machine (run it quiet).
# Part 3: `perf record -g` (cpu-clock samples of each proxy alone) over 6 s of `wrk -t1 -c50`:
# the share of its CPU in user space and in the kernel's paths (shares hold up under noise
# better than Part 2's microseconds).
# Uses ports 18280-18283, 18600 and 18400-18402 on 127.0.0.1; files go to loadtest/out/syscalls.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$(realpath "${1:-$ROOT/target/release/switchyard}")"
N="${N:-5000}"
D="$ROOT/loadtest/out/syscalls"; mkdir -p "$D"; cd "$D"
GPORT=18280; BPORT=18281; APORT=18282; NPORT=18283; CPORT=18600
# shellcheck source=loadtest/bench-lib.sh
source "$ROOT/loadtest/bench-lib.sh"
install_debs perf:linux-perf >&2 || { echo "syscalls.sh: apt-get install linux-perf failed" >&2; exit 1; }
require_tools strace nginx consul oha wrk curl perf
cat > proxy.conf <<NG
worker_processes 1; daemon off; master_process off; pid $D/proxy.pid; error_log $D/proxy.err;
events { worker_connections 1024; }
http { access_log off; upstream b { server 127.0.0.1:$BPORT; keepalive 64; }
  server { listen 127.0.0.1:$NPORT; keepalive_requests 1000000;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NG
gateway_config $GPORT $APORT 1 $CPORT > gateway.yaml
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
start_backend "$D" $BPORT
nginx -c "$D/proxy.conf" & NGPID=$!; PIDS+=($NGPID)
start_consul_with_backend "$D" $CPORT 18400 $BPORT
"$BIN" --config gateway.yaml > gateway.log 2>&1 & GWPID=$!; PIDS+=($GWPID)
wait_http $GPORT
wait_http $NPORT
TARGETS=("switchyard $GWPID $GPORT" "nginx $NGPID $NPORT")

echo "## System calls per request (strace -c, $N keep-alive GETs at c=1)"
for target in "${TARGETS[@]}"; do
  read -r name pid port <<< "$target"
  oha --no-tui -n 500 -c 1 "http://127.0.0.1:$port/" > /dev/null
  strace -c -f -p "$pid" -o "$D/strace.$name" 2> /dev/null & SPID=$!
  sleep 1  # strace attached
  summary="$(oha --no-tui -n "$N" -c 1 "http://127.0.0.1:$port/")"
  grep -q "Success rate:.*100.00%" <<< "$summary" \
    || echo "syscalls.sh: $name answered some requests with errors" >&2
  kill -INT $SPID; wait $SPID || true
  awk -v n="$N" -v name="$name" 'NR > 2 && $NF != "total" && $4 + 0 >= n / 100 { per[$NF] = $4 / n; sum += $4 / n }
    END { printf "%-10s %.2f:", name, sum; for (s in per) printf " %s %.2f", s, per[s]; print "" }' "$D/strace.$name"
done

echo "## CPU per request, user and system (wrk -t1 -c50 -d8s, /proc/<pid>/stat)"
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
for round in 1 2; do
  for target in "${TARGETS[@]}"; do
    read -r name pid port <<< "$target"
    wrk -t1 -c50 -d2s "http://127.0.0.1:$port/" > /dev/null
    read -r u0 s0 < <(ticks "$pid")
    requests=$(wrk -t1 -c50 -d8s "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
    read -r u1 s1 < <(ticks "$pid")
    awk -v n="$requests" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v name="$name" -v r="$round" -v hz="$(getconf CLK_TCK)" \
      'BEGIN { printf "%-10s round %d: %d requests, user %.1f us, system %.1f us, total %.1f us per request\n", name, r, n, u * 1e6 / hz / n, s * 1e6 / hz / n, (u + s) * 1e6 / hz / n }'
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# Inclusive shares of the kernel paths (perf's "children" column): sending includes the
# loopback delivery to the receiver (net_rx_action runs in the sender's system call), and a
# context switch can happen inside any of them; "user" is the proxy's binary, libc and vdso.
echo "## Where each proxy's CPU goes (perf record -g, cpu-clock, wrk -t1 -c50, % of its samples)"
kernel_paths() { # perf.data
  perf report -i "$1" --children --sort sym -g none --stdio 2> /dev/null | awk '
    $3 == "[k]" { sub("%", "", $1); share[$4] = $1 }
    $3 == "[k]" && $4 ~ /^(do_syscall_64|entry_SYSCALL_64|syscall_exit_to_user_mode|syscall_return_via_sysret)/ { entry += $2 }
    END { printf "send %5.1f (loopback delivery %4.1f) | recv %4.1f | epoll_wait %4.1f | context switches %4.1f | system call entry and exit %4.1f\n",
      share["tcp_sendmsg"], share["net_rx_action"], share["tcp_recvmsg"], share["do_epoll_wait"], share["__schedule"], entry }'
}
user_share() { # perf.data
  perf report -i "$1" --no-children --sort dso -g none --stdio 2> /dev/null | awk '
    /^ +[0-9]/ { sub("%", "", $1); if ($2 == "[kernel.kallsyms]") k += $1; else u += $1 }
    END { printf "user %4.1f, kernel %4.1f", u, k }'
}
for target in "${TARGETS[@]}"; do
  read -r name pid port <<< "$target"
  wrk -t1 -c50 -d8s "http://127.0.0.1:$port/" > /dev/null & WRK=$!
  sleep 1  # past wrk's connection set-up
  perf record -q -g -o "$D/perf.$name" -p "$pid" -- sleep 6 2> /dev/null
  wait $WRK
  printf '%-10s %s | %s\n' "$name" "$(user_share "$D/perf.$name")" "$(kernel_paths "$D/perf.$name")"
done
