# shellcheck shell=bash
# Scenarios beside steady state, sourced by loadtest/run.sh (which defines OUT, URL, PIDS,
# register/deregister, route_ids, wait_until, start_nginx, run_logged, ...). Both scenarios put
# load on switchyard with oha and keep oha's per-request records (--db-url, sqlite) so
# report.py can draw throughput, errors and p99 over time.
#
#   scenario_churn: one extra instance registered / deregistered in Consul every 100 ms
#   scenario_kill:  one of three backends SIGKILLed at second KILL_AT; its registration stays

BIN_SECONDS=0.25   # sampling interval of cpu_sampler.py; report.py bins by the same width

# Drops a pid from PIDS once it has been waited for, so cleanup never signals a reused pid.
forget_pid() {
  local gone="$1" kept=() pid
  for pid in "${PIDS[@]}"; do [[ "$pid" != "$gone" ]] && kept+=("$pid"); done
  PIDS=("${kept[@]}")
}
metrics_to() { curl -fsS --max-time 2 "http://127.0.0.1:$SY_ADMIN/metrics" >"$1"; }
# oha in the background: -w lets requests in flight at the deadline finish (so none are
# counted as aborted), --db-url keeps every answered request with its start time and status.
start_oha() { # dir seconds connections
  rm -f "$1/oha.db"
  printf '%s\n' "oha -z $2s -c $3 -w --no-tui --output-format json -o $1/oha.json --db-url $1/oha.db ${URL[switchyard]}" >>"$OUT/commands.txt"
  oha -z "$2s" -c "$3" -w --no-tui --output-format json -o "$1/oha.json" --db-url "$1/oha.db" \
    "${URL[switchyard]}" >"$1/oha.out" 2>&1 &
  OHA_PID=$!; started oha "$OHA_PID"
  # CPU used outside the load test, sampled alongside (see cpu_sampler.py).
  # shellcheck disable=SC2046 # one argument per pid
  python3 "$HERE/cpu_sampler.py" "$1/cpu.tsv" "$(($2 + 1))" "$BIN_SECONDS" $(tree_pids "${PIDS[@]}") &
  SAMPLER_PID=$!; started cpu_sampler "$SAMPLER_PID"
}
wait_oha() {
  local rc=0
  wait "$OHA_PID" || rc=$?
  forget_pid "$OHA_PID"
  wait "$SAMPLER_PID" || true
  forget_pid "$SAMPLER_PID"
  [[ $rc -eq 0 ]] || die "oha failed (exit $rc): $(cat "$1/oha.out")"
  [[ -s "$1/oha.json" && -s "$1/oha.db" ]] || die "oha wrote no results to $1"
}

scenario_churn() {
  local sc="$OUT/churn" load_secs=$((CHURN_SECONDS + 2))
  mkdir -p "$sc"
  log "scenario churn: oha -c $CONNS for ${load_secs}s through switchyard; from second 1, bench-churn (:$SPARE)"
  log "  is registered / deregistered in Consul every ${CHURN_EVERY_MS} ms for ${CHURN_SECONDS}s"
  metrics_to "$sc/metrics-before.txt"
  local hits_before=0
  [[ -f "$OUT/logs/churn-instance-access.log" ]] && hits_before=$(wc -l <"$OUT/logs/churn-instance-access.log")

  start_oha "$sc" "$load_secs" "$CONNS"
  local t0 start end n=0 registered=0 failed=0 next delay action
  t0=$(now_us)
  sleep 1
  start=$(now_us); end=$((start + CHURN_SECONDS * 1000000))
  printf 'offset_s\taction\tok\n' >"$sc/actions.tsv"
  printf '%s\n' "every ${CHURN_EVERY_MS} ms for ${CHURN_SECONDS}s, alternately: curl -X PUT --data '{\"ID\":\"bench-churn\",\"Name\":\"bench\",\"Address\":\"127.0.0.1\",\"Port\":$SPARE}' $CONSUL/v1/agent/service/register / curl -X PUT $CONSUL/v1/agent/service/deregister/bench-churn" >>"$OUT/commands.txt"
  while (($(now_us) < end)); do
    local ok=1
    if ((registered == 0)); then
      action=register
      if register bench-churn "$SPARE"; then registered=1; else ok=0; fi
    else
      action=deregister
      if deregister bench-churn; then registered=0; else ok=0; fi
    fi
    if ((ok == 0)); then failed=$((failed + 1)); fi
    n=$((n + 1))
    printf '%s\t%s\t%s\n' "$(secs_since "$t0")" "$action" "$ok" >>"$sc/actions.tsv"
    next=$((start + n * CHURN_EVERY_MS * 1000)); delay=$((next - $(now_us)))
    if ((delay > 0)); then sleep "$(printf '%d.%06d' $((delay / 1000000)) $((delay % 1000000)))"; fi
  done
  if ((registered)); then deregister bench-churn || true; fi
  local churn_end_offset
  churn_end_offset=$(secs_since "$t0")
  wait_oha "$sc"
  wait_until "switchyard back to bench-1..3" 10 routes_are "bench-1 bench-2 bench-3"
  metrics_to "$sc/metrics-after.txt"
  local hits_after=0
  [[ -f "$OUT/logs/churn-instance-access.log" ]] && hits_after=$(wc -l <"$OUT/logs/churn-instance-access.log")
  {
    echo "actions=$n"
    echo "failed_actions=$failed"
    echo "churn_start=$(printf '%d.%06d' $(((start - t0) / 1000000)) $(((start - t0) % 1000000)))"
    echo "churn_end=$churn_end_offset"
    echo "load_seconds=$load_secs"
    echo "connections=$CONNS"
    echo "churn_instance_hits=$((hits_after - hits_before))"
  } >"$sc/scenario.txt"
  echo "   $n Consul writes ($failed failed); churn instance served $((hits_after - hits_before)) requests"
}

scenario_kill() {
  local sc="$OUT/kill"
  mkdir -p "$sc"
  log "scenario kill: bench-3 replaced by bench-victim (its own nginx on :$VICTIM); oha -c $KILL_CONNS for ${KILL_SECONDS}s;"
  log "  SIGKILL to the victim nginx at second $KILL_AT; its Consul registration stays"
  start_nginx victim
  local victim_pid=$! workers
  wait_until "victim backend :$VICTIM" 10 http_ok "http://127.0.0.1:$VICTIM/"
  register bench-victim "$VICTIM"
  deregister bench-3
  wait_until "switchyard to route to bench-1, bench-2, bench-victim" 10 routes_are "bench-1 bench-2 bench-victim"
  workers="$(pgrep -P "$victim_pid" | paste -sd' ' -)"
  metrics_to "$sc/metrics-before.txt"

  start_oha "$sc" "$KILL_SECONDS" "$KILL_CONNS"
  local t0 killed_at
  t0=$(now_us)
  sleep "$KILL_AT"
  printf '%s\n' "at second $KILL_AT: kill -KILL <victim nginx master> <its worker>" >>"$OUT/commands.txt"
  # The braces' 2>/dev/null also silences bash's "Killed" job notice.
  {
    # shellcheck disable=SC2086 # $workers is a list of pids
    kill -KILL "$victim_pid" $workers
    killed_at=$(secs_since "$t0")
    wait "$victim_pid" || true
  } 2>/dev/null
  forget_pid "$victim_pid"
  http_ok "http://127.0.0.1:$VICTIM/" && die "the victim backend still answers after SIGKILL"
  wait_oha "$sc"
  metrics_to "$sc/metrics-after.txt"
  local routes_after
  routes_after="$(route_ids)"
  {
    echo "killed_at=$killed_at"
    echo "load_seconds=$KILL_SECONDS"
    echo "connections=$KILL_CONNS"
    echo "routes_after=$routes_after"
  } >"$sc/scenario.txt"
  echo "   killed at ${killed_at}s; switchyard still routes to: $routes_after"
  # Back to the steady-state registration.
  deregister bench-victim
  register bench-3 "$B3"
}
