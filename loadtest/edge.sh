# shellcheck shell=bash
# TLS, HTTP/2 and gRPC rows (issue 9), sourced by loadtest/run.sh (which defines OUT, PIDS,
# CPU_PIDS, cpu_ticks, machine_busy, self_ticks, run_logged, check_alive, ...). switchyard,
# nginx and HAProxy terminate TLS with the same ECDSA P-256 certificate (one worker each) in
# front of the same 3 backends; gRPC goes to one tonic instance (examples/grpc.rs) directly or
# through each proxy over h2c. Interleaved rounds, the order of targets rotating each round.
#
#   tls   keep-alive HTTPS (HTTP/1.1), wrk -t1 -c50
#   h2    HTTP/2 over TLS (ALPN h2), h2load -c50 -m10 (10 streams per connection)
#   hs    full TLS handshakes: wrk -t1 -c50 with `Connection: close`, so every request opens a
#         new connection with a full handshake (wrk keeps no session, so none is resumed)
#   fresh the hs load again, while tls_probe.py opens one connection at a time and times its
#         request from connect to the last byte (wrk's latency leaves out the handshake's wait);
#         only the probe's timings are reported from these runs
#   grpc  unary helloworld.Greeter/SayHello over h2c, h2load -c50 -m10 with a prepared body

EDGE_KINDS=(tls h2 hs fresh grpc)
declare -A EDGE_TARGETS=(
  [tls]="switchyard nginx haproxy" [h2]="switchyard nginx haproxy"
  [hs]="switchyard nginx haproxy" [fresh]="switchyard nginx haproxy" [grpc]="direct switchyard nginx haproxy"
)
declare -A TLS_URL=(
  [switchyard]="https://127.0.0.1:$SY_TLS/"
  [nginx]="https://127.0.0.1:$NGX_TLS/"
  [haproxy]="https://127.0.0.1:$HAP_TLS/"
)
SAY_HELLO=/helloworld.Greeter/SayHello
declare -A GRPC_ADDR=(
  [direct]="127.0.0.1:$GREETER"
  [switchyard]="127.0.0.1:$SY_PORT"
  [nginx]="127.0.0.1:$NGX_GRPC"
  [haproxy]="127.0.0.1:$HAP_GRPC"
)
declare -A EDGE_CPU_PIDS=(
  [direct]="$GREETER_PID" [switchyard]="$SY_PID" [nginx]="$NGX_PID" [haproxy]="$HAP_PID"
)

handshakes_total() {
  curl -fsS --max-time 2 "http://127.0.0.1:$SY_ADMIN/metrics" \
    | awk '/^switchyard_tls_handshakes_total\{result="ok"\}/ {v = $2} END {print v + 0}'
}

# One run: kind target; the tool's output in edge/r<round>-<kind>-<target>.txt (and h2load's
# per-request log in .log), CPU ticks of the target and of the rest of the machine in edge/cpu.tsv.
edge_measure() { # round kind target
  local round="$1" kind="$2" target="$3" file cmd=() before after t0 busy0 ours0 busy1 ours1 hs0=- hs1=- probe=
  file="$OUT/edge/r$round-$kind-$target"
  case "$kind" in
    tls) cmd=(wrk -t1 "-c$CONNS" "-d${EDGE_DURATION}s" --latency "${TLS_URL[$target]}") ;;
    hs | fresh) cmd=(wrk -t1 "-c$CONNS" "-d${EDGE_DURATION}s" --latency -H "Connection: close" "${TLS_URL[$target]}") ;;
    h2) cmd=(h2load -t1 "-c$CONNS" -m10 -D "$EDGE_DURATION" "--log-file=$file.log" "${TLS_URL[$target]}") ;;
    grpc) cmd=(h2load -t1 "-c$CONNS" -m10 -D "$EDGE_DURATION" "--log-file=$file.log"
                 -d "$OUT/edge/grpc-body.bin" -H "content-type: application/grpc" -H "te: trailers"
                 "http://${GRPC_ADDR[$target]}$SAY_HELLO") ;;
  esac
  check_alive
  echo "# edge round $round, $kind, $target" >>"$OUT/commands.txt"
  [[ "$target" == switchyard && "$kind" =~ ^(tls|h2|hs)$ ]] && hs0=$(handshakes_total)
  t0=$(now_us); busy0=$(machine_busy); ours0=$(($(cpu_ticks "${PIDS[@]}") + $(self_ticks)))
  before=$(cpu_ticks "${EDGE_CPU_PIDS[$target]}")
  if [[ "$kind" == fresh ]]; then run_probe "$target" "$file" & probe=$!; fi
  run_logged "${cmd[@]}" >"$file.txt" 2>&1 || die "${cmd[0]} failed against $target ($kind): $(tail -5 "$file.txt")"
  [[ -n "$probe" ]] && { wait "$probe" || die "tls_probe.py failed against $target: $(tail -5 "$file.probe.err")"; }
  after=$(cpu_ticks "${EDGE_CPU_PIDS[$target]}")
  busy1=$(machine_busy); ours1=$(($(cpu_ticks "${PIDS[@]}") + $(self_ticks)))
  [[ "$hs0" != - ]] && hs1=$(handshakes_total)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$kind" "$target" "$((after - before))" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$(((busy1 - busy0) - (ours1 - ours0)))" "$(secs_since "$t0")" \
    "$([[ "$hs0" != - ]] && echo $((${hs1%.*} - ${hs0%.*})) || echo -)" >>"$OUT/edge/cpu.tsv"
  if [[ "${cmd[0]}" == wrk ]]; then
    printf '   round %s %-4s %-10s %10s req/s  p99 %s\n' "$round" "$kind" "$target" \
      "$(awk '/^Requests\/sec/ {print $2}' "$file.txt")" "$(awk '$1 == "99%" {print $2}' "$file.txt")"
  else
    printf '   round %s %-4s %-10s %10s req/s  %s\n' "$round" "$kind" "$target" \
      "$(awk '/^finished in/ {print $4}' "$file.txt")" "$(grep -m1 '^requests:' "$file.txt")"
  fi
}

# tls_probe.py against `target` from 0.5 s into the run to 0.5 s before its end (at least 1 s),
# one request on a new connection at a time, 20 ms apart (run in the background). Timings: <file>.probe.tsv.
run_probe() { # target file
  local url="${TLS_URL[$1]}" port
  port="${url##*:}"
  sleep 0.5
  printf 'python3 %s/tls_probe.py 127.0.0.1 %s ...\n' "$HERE" "${port%/}" >>"$OUT/commands.txt"
  exec python3 "$HERE/tls_probe.py" 127.0.0.1 "${port%/}" "$OUT/tls/cert.pem" \
    "$((EDGE_DURATION > 2 ? EDGE_DURATION - 1 : 1))" 20 >"$2.probe.tsv" 2>"$2.probe.err"
}

# What an OpenSSL client (the library of wrk and h2load) negotiates with `target`: protocol,
# cipher suite and key exchange group, tab-separated.
tls_negotiated() { # target
  local port="${TLS_URL[$1]##*:}"
  openssl s_client -connect "127.0.0.1:${port%/}" -brief </dev/null 2>&1 | awk -F': ' '
    /^Protocol version/ {p = $2} /^Ciphersuite/ {c = $2} /^(Server|Peer) Temp Key/ {split($2, k, ","); g = k[1]}
    END {printf "%s\t%s\t%s\n", p, c, g}'
}

# Before measuring: every TLS listener answers over HTTP/1.1 and HTTP/2 with the certificate
# (curl checks it against the file) and negotiates TLS 1.3 with an OpenSSL client (the rows
# compare like handshakes), and every gRPC target answers SayHello (the tonic client).
edge_sanity() {
  local t proto answer tls
  printf 'target\tprotocol\tcipher\tgroup\n' >"$OUT/edge/tls.tsv"
  for t in switchyard nginx haproxy; do
    tls=$(tls_negotiated "$t")
    [[ "$tls" == TLSv1.3$'\t'* ]] || die "$t: an OpenSSL client negotiated ${tls%%$'\t'*}, not TLS 1.3"
    printf '%s\t%s\n' "$t" "$tls" >>"$OUT/edge/tls.tsv"
    printf '   %-10s openssl   %s\n' "$t" "${tls//$'\t'/ }"
    for proto in --http1.1 --http2; do
      answer=$(curl -fsS --max-time 2 "$proto" --cacert "$OUT/tls/cert.pem" \
        -w ' %{http_version}' "${TLS_URL[$t]}") || die "$t: no HTTPS answer ($proto)"
      [[ "$answer" == backend-* ]] || die "$t: unexpected HTTPS answer: $answer"
      printf '   %-10s %-9s %s\n' "$t" "$proto" "HTTP/${answer##* } ${answer%% *}"
    done
  done
  for t in direct switchyard nginx haproxy; do
    answer=$("$GREETER_BIN" --call "${GRPC_ADDR[$t]}" --name bench 2>&1) || die "$t: gRPC call failed: $answer"
    [[ "$answer" == "hello bench from greeter-1" ]] || die "$t: unexpected gRPC answer: $answer"
    printf '   %-10s gRPC      %s\n' "$t" "$answer"
  done
}

edge_rounds() {
  mkdir -p "$OUT/edge"
  # The gRPC request: a 5-byte gRPC frame header and HelloRequest { name: "bench" } (field 1,
  # length-delimited: 0x0a, 5 bytes).
  printf '\0\0\0\0\007\012\005bench' >"$OUT/edge/grpc-body.bin"
  printf 'round\tkind\ttarget\tticks\tloadavg1\tother_ticks\tseconds\thandshakes\n' >"$OUT/edge/cpu.tsv"
  log "edge sanity: HTTPS over HTTP/1.1 and HTTP/2 on each TLS listener, one gRPC call per target"
  edge_sanity
  log "edge rows: $ROUNDS round(s) of ${EDGE_DURATION}s runs: ${EDGE_KINDS[*]}"
  local round kind targets k n
  for ((round = 1; round <= ROUNDS; round++)); do
    for kind in "${EDGE_KINDS[@]}"; do
      read -r -a targets <<<"${EDGE_TARGETS[$kind]}"
      n=${#targets[@]}
      for ((k = 0; k < n; k++)); do
        edge_measure "$round" "$kind" "${targets[$(((k + round - 1) % n))]}"
      done
    done
  done
}
