# Shared set-up of the single-machine measurement scripts (callgrind.sh, syscalls.sh,
# workers.sh) and of scripts/build-pgo.sh's training run: one nginx backend answering a fixed
# 200, a dev Consul agent with the backend registered as service `web`, and a gateway config
# routing `/` to it; run.sh takes only the installer. Sourced, not run. Every process started
# is added to PIDS; the caller's EXIT trap stops them.

PIDS=()

# Exits naming the first of the given commands that is missing.
require_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" > /dev/null || { echo "$(basename "$0"): $tool is missing" >&2; exit 1; }
  done
}

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# Installs the Debian packages of the given `command:package` pairs whose command is missing.
install_debs() {
  local missing=() pair policy=/usr/sbin/policy-rc.d created=0 status=0
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  echo "== installing ${missing[*]} (apt)"
  # Debian's postinst would start system-wide nginx/haproxy services listening on all
  # interfaces; a policy-rc.d that says "no" for the duration of the install prevents that.
  if [[ ! -e "$policy" ]]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"; created=1
  fi
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || status=$?
  [[ $created == 1 ]] && as_root rm -f "$policy"
  return "$status"
}

# Starts an nginx (1 worker) on 127.0.0.1:$2 that answers every request with a fixed 200;
# its config and logs go to directory $1. With $3 = tls it speaks HTTPS, with the certificate
# and key in $1/cert.pem and $1/key.pem.
start_backend() {
  local listen="listen 127.0.0.1:$2;"
  [[ "${3:-}" == tls ]] && listen="listen 127.0.0.1:$2 ssl; ssl_certificate $1/cert.pem; ssl_certificate_key $1/key.pem;"
  cat > "$1/backend.conf" <<NG
worker_processes 1; daemon off; pid $1/backend.pid; error_log $1/backend.err;
events { worker_connections 1024; }
http { access_log off; server { $listen keepalive_requests 1000000;
  location / { return 200 "hello from the backend\n"; } } }
NG
  nginx -c "$1/backend.conf" & PIDS+=($!)
}

# Starts `consul agent -dev` in directory $1 with its HTTP API on $2 and its server and serf
# ports on $3, $3+1 and $3+2, waits for its leader, and registers the backend on port $4 as
# service `web` (instance `web-1`).
start_consul_with_backend() {
  rm -rf "$1/consul-data"
  consul agent -dev -bind 127.0.0.1 -http-port "$2" -dns-port -1 -grpc-port -1 -server-port "$3" \
    -serf-lan-port $(($3 + 1)) -serf-wan-port $(($3 + 2)) -data-dir "$1/consul-data" \
    > "$1/consul.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 1 60); do [[ "$(curl -sf "http://127.0.0.1:$2/v1/status/leader")" == *:* ]] && break; sleep 0.5; done
  curl -sf -X PUT -d "{\"Name\":\"web\",\"ID\":\"web-1\",\"Address\":\"127.0.0.1\",\"Port\":$4}" \
    "http://127.0.0.1:$2/v1/agent/service/register"
}

# Prints a gateway config: listen on $1, admin on $2, `workers: $3`, Consul at port $4, the
# service `web` on `/`; extra top-level YAML (e.g. a `tls:` section) from $5, extra keys of
# the service (e.g. `protocol: https`, indented four spaces) from $6.
gateway_config() {
  cat <<GW
listen: "127.0.0.1:$1"
admin_listen: "127.0.0.1:$2"
workers: $3
consul:
  address: "http://127.0.0.1:$4"
${5:-}
services:
  - name: web
    route:
      path_prefix: "/"
${6:-}
GW
}

# Waits (up to a minute) until http://127.0.0.1:$1/ answers.
wait_http() {
  for _ in $(seq 1 120); do curl -sf -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.5; done
  echo "$(basename "$0"): nothing answers on 127.0.0.1:$1" >&2
  return 1
}
