#!/usr/bin/env bash
# The discovery-source comparison of issue 12, measured, in two parts written to
# docs/discovery-sources.md:
# 1. tests/sources_comparison.rs (ignored in CI): etcd (3 members) and ZooKeeper (3 servers)
#    with an in-process gateway, the recovery times broken down (election, first write
#    accepted, routed); Consul's column quoted from the existing benches.
# 2. loadtest/sources.py: all four sources (consul, etcd, zookeeper, dns) through the release
#    binary as its own process, one harness for all (propagation, outage, leader kill,
#    connections per 100 services).
#
# Knobs: CHANGES (adds and removes each, default 50), OUTAGE_S (default 30), OUT (the file),
# SWITCHYARD_BIN (part 2's binary; default: a release build), DNS_REFRESH (1s).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-etcd.sh >/dev/null
bash scripts/install-zookeeper.sh >/dev/null

export CHANGES="${CHANGES:-50}" OUTAGE_S="${OUTAGE_S:-30}"
OUT="${OUT:-docs/discovery-sources.md}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "sources.sh: CHANGES=$CHANGES OUTAGE_S=$OUTAGE_S (about $((2 * (OUTAGE_S + 40))) s)"
cargo test --quiet --test sources_comparison -- --ignored --nocapture --test-threads 1 2>&1 | tee "$log"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p "$(dirname "$OUT")"

python3 - "$log" "$OUT" "$CHANGES" "$OUTAGE_S" "$load_before" "$load_after" "$(git rev-parse --short HEAD)" <<'EOF'
import re, sys
log, out, changes, outage, before, after, commit = sys.argv[1:]
rows = {}
for line in open(log):
    m = re.search(r"ROW (\S+) (\S+) (.*)$", line.strip())
    if m:
        rows[(m.group(1), m.group(2))] = m.group(3)
get = lambda source, key: rows.get((source, key), "—")
table = [
    ("propagation, instance added: p50 / p99 ms", "propagation_add_ms_p50_p99",
     "3.2 / 8.7 (register, 1 service, per-service watch)"),
    ("propagation, instance removed: p50 / p99 ms", "propagation_remove_ms_p50_p99",
     "2.7 / 4.3 (deregister, 1 service)"),
    (f"failed requests, registry fully down ({outage} s, 2 request loops)", "outage_failed_requests",
     "0 (tests/drills.rs, asserted)"),
    ("request p99 during the outage, ms", "outage_p99_ms", "—"),
    ("restart → leader, ms", "restart_to_leader_ms", "—"),
    ("restart → a write accepted, ms", "restart_to_write_accepted_ms", "—"),
    ("restart → that change routed (resync), ms", "restart_to_change_routed_ms", "—"),
    ("failed requests, leader killed (2 request loops)", "leader_kill_failed_requests",
     "0 (tests/drills.rs, 3-server cluster, asserted)"),
    ("leader kill → a write accepted, ms", "leader_kill_to_write_accepted_ms", "—"),
    ("leader kill → that change routed, ms", "leader_kill_to_change_routed_ms", "—"),
    ("connections held per 100 services", "connections_per_100_services",
     "102 (100 blocking queries + 2 idle, `max_connections: 128`; README, Performance)"),
]
lines = [
    "# Discovery sources, measured side by side",
    "",
    "Written by `loadtest/sources.sh` (tests/sources_comparison.rs) at commit "
    f"`{commit}`; do not edit by hand. etcd 3.4 (3 members) and ZooKeeper 3.8 (3 servers) from",
    "Debian, all on 127.0.0.1 with distinct ports; the gateway runs in-process (the debug test",
    "build) with one service `web` routed at `/web`.",
    "",
    "- **Propagation**: from just before the registry write (etcd put/delete through one client;",
    "  ZooKeeper create of an ephemeral sequential node / delete through one session) to the",
    f"  gateway's admin `/routes` showing the change, polled back to back; {changes} adds and",
    f"  {changes} removes. Consul's column: `cargo bench --bench propagation` (release build,",
    "  loadtest/RESULTS.md), timed to the table change from the gateway's log.",
    "- **Outage**: every member SIGKILLed, restarted after the outage; 2 request loops through",
    "  the gateway meanwhile. *Resync* counts from the restart: the cluster's election and the",
    "  writer's own reconnect are in it (broken out in the rows above it). After 30 s down, a",
    "  source's jittered backoff (100 ms doubling to 5 s, as Consul's 200 ms to 5 s) sits at its",
    "  cap, so the gateway's own share (write accepted → routed) can reach 5 s; the",
    "  ZooKeeper source's lost session is replaced within that backoff too.",
    "- **Leader**: the leader SIGKILLed under 2 request loops; the time until a write is accepted",
    "  is the registry's (and the writer's) recovery, the rest is the gateway's.",
    "- **Connections**: ESTABLISHED TCP connections to the members' client ports with 100",
    "  services of that source synced, less those before the gateway started.",
    "",
    f"Machine: 2 shared cores, load average {before} before and {after} after the run.",
    "",
    "| measure | etcd | ZooKeeper | Consul (existing benches) |",
    "| --- | --- | --- | --- |",
]
for label, key, consul in table:
    lines.append(f"| {label} | {get('etcd', key)} | {get('zookeeper', key)} | {consul} |")
lines += [
    "",
    "Eureka, the comparison's fifth registry, has no server that installs on these machines (it",
    "ships through Maven only), so switchyard has no Eureka source rather than an untested one.",
    "",
]
open(out, "w").write("\n".join(lines))
print(f"sources.sh: wrote {out}")
EOF

# Part 2: the release binary, every source, one harness.
if [[ -z ${SWITCHYARD_BIN:-} ]]; then
  cargo build --release --locked --quiet --bin switchyard
  export SWITCHYARD_BIN=target/release/switchyard
fi
/usr/bin/python3 -c 'import kazoo' 2>/dev/null \
  || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-kazoo >/dev/null
table="$(mktemp)"
trap 'rm -f "$log" "$table"' EXIT
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/python3 loadtest/sources.py "$table"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
{
  echo "## All four sources through the release binary (loadtest/sources.py)"
  echo
  echo "The gateway as its own process (\`$SWITCHYARD_BIN\`, \`workers: 1\`), one service \`bench\`"
  echo "with 3 steady instances; load average $load_before before, $load_after after."
  echo
  echo "- **add / remove**: $CHANGES of each, from the registry call returning (Consul agent API;"
  echo "  etcd's JSON gateway; a kazoo session) to \`/routes\` showing it, polled every 2 ms. DNS:"
  echo "  Consul answers SRV with TTL 0, so \`dns.refresh\` (${DNS_REFRESH:-1s} here) paces it; each change"
  echo "  is made right after a lookup, so it waits a whole refresh: the figure is that floor."
  echo "- **outage**: every node stopped for $OUTAGE_S s under ~100 requests/s; *resync*: restart to a"
  echo "  new instance routed. The Consul dev agent keeps nothing: its instances register again."
  echo "- **leader killed** (etcd, ZooKeeper): under the same load; the first change after the"
  echo "  kill (the write retried until accepted), routed this long after the call returned."
  echo "- **connections**: established TCP connections to the registry with 100 services."
  echo
  cat "$table"
} >>"$OUT"
echo "sources.sh: appended part 2 to $OUT"
