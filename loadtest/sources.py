#!/usr/bin/python3
"""Discovery sources side by side (issue 12's comparison), part 2 of loadtest/sources.sh.

For each source (consul, etcd, zookeeper, dns) this starts the registry here on 127.0.0.1
(etcd and ZooKeeper as 3-node clusters), a few HTTP instances and the gateway, then measures:

- propagation: the time from the registry call returning to the gateway's `/routes` showing
  the change (add, then remove; CHANGES of each), polled every POLL_MS;
- outage: the registry (every node) stopped for OUTAGE_S under a light load through the
  gateway: failed requests, then the time from its restart to a new instance routed;
- leader loss (etcd, zookeeper): the leader killed under load: failed requests, and the
  propagation of the first change made after the kill;
- connections: TCP connections from the gateway to the registry with 100 services.

It prints one JSON line per source and writes the markdown table to the path given;
sources.sh appends it to docs/discovery-sources.md.
"""

import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHANGES = int(os.environ.get("CHANGES", "50"))
OUTAGE_S = float(os.environ.get("OUTAGE_S", "30"))
POLL_MS = 2
BIN = os.environ.get("SWITCHYARD_BIN", "target/release/switchyard")
ZK_SERVER = "/usr/share/zookeeper/bin/zkServer.sh"
WORK = tempfile.mkdtemp(prefix="switchyard-sources-")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=5):
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def until(condition, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except OSError:
            pass
        time.sleep(step)
    return False


def spawn(args, log_name, **kw):
    log = open(os.path.join(WORK, log_name), "ab")
    return subprocess.Popen(args, stdout=log, stderr=log, **kw)


class Instance(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_instances(count):
    ports = []
    for _ in range(count):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Instance)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ports.append(server.server_address[1])
    return ports


# --- registries ------------------------------------------------------------------------


class Consul:
    """A dev agent (no state kept: outage rows come from the gateway's own drills)."""

    def __init__(self):
        self.http_port, self.dns_port = free_port(), free_port()
        self.others = [free_port() for _ in range(3)]
        self.start()

    def start(self):
        serf_lan, serf_wan, server = self.others
        self.proc = spawn(
            ["consul", "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
             "-http-port", str(self.http_port), "-dns-port", str(self.dns_port),
             "-grpc-port", "-1", "-serf-lan-port", str(serf_lan),
             "-serf-wan-port", str(serf_wan), "-server-port", str(server)],
            "consul.log")
        url = f"http://127.0.0.1:{self.http_port}/v1/status/leader"
        assert until(lambda: len(http("GET", url)[1]) > 4, 30), "consul did not start"

    def url(self, path):
        return f"http://127.0.0.1:{self.http_port}{path}"

    def add(self, service, ident, port):
        http("PUT", self.url("/v1/agent/service/register"),
             {"ID": ident, "Name": service, "Address": "127.0.0.1", "Port": port})
        return ident

    def remove(self, service, handle):
        http("PUT", self.url(f"/v1/agent/service/deregister/{handle}"), b"")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Etcd:
    """A 3-node etcd cluster; instances are keys `<prefix><id>` = `host:port`."""

    def __init__(self):
        self.nodes = [{"client": free_port(), "peer": free_port(), "proc": None} for _ in range(3)]
        self.cluster = ",".join(f"n{i}=http://127.0.0.1:{n['peer']}" for i, n in enumerate(self.nodes))
        for i in range(3):
            self.start(i, "new")
        assert until(lambda: self.leader() is not None, 30), "etcd did not elect a leader"

    def start(self, i, state="existing"):
        node = self.nodes[i]
        node["proc"] = spawn(
            ["etcd", "--name", f"n{i}", "--data-dir", os.path.join(WORK, f"etcd{i}"),
             "--listen-client-urls", f"http://127.0.0.1:{node['client']}",
             "--advertise-client-urls", f"http://127.0.0.1:{node['client']}",
             "--listen-peer-urls", f"http://127.0.0.1:{node['peer']}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{node['peer']}",
             "--initial-cluster", self.cluster, "--initial-cluster-state", state,
             "--initial-cluster-token", "sources"],
            f"etcd{i}.log")

    def kill(self, i):
        self.nodes[i]["proc"].kill()
        self.nodes[i]["proc"].wait()

    def endpoints(self):
        return [f"http://127.0.0.1:{n['client']}" for n in self.nodes]

    def call(self, path, body):
        for endpoint in self.endpoints():
            try:
                return json.loads(http("POST", endpoint + path, body, timeout=2)[1])
            except OSError:
                continue
        raise OSError("no etcd endpoint answered")

    def leader(self):
        for i, endpoint in enumerate(self.endpoints()):
            try:
                status = json.loads(http("POST", endpoint + "/v3/maintenance/status", {}, 1)[1])
            except OSError:
                continue
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                return i
        return None

    def add(self, service, ident, port):
        key = f"/services/{service}/{ident}"
        b64 = lambda t: base64.b64encode(t.encode()).decode()
        self.call("/v3/kv/put", {"key": b64(key), "value": b64(f"127.0.0.1:{port}")})
        return key

    def remove(self, service, key):
        self.call("/v3/kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})

    def stop(self):
        for i in range(3):
            self.kill(i)


class ZooKeeper:
    """A 3-node ensemble; instances are ephemeral sequential nodes under /services/<name>."""

    def __init__(self):
        import logging

        from kazoo.client import KazooClient  # Debian's python3-kazoo

        logging.getLogger("kazoo").setLevel(logging.CRITICAL)  # reconnect chatter in drills

        self.nodes = [{"client": free_port(), "peer": free_port(), "election": free_port(),
                       "proc": None} for _ in range(3)]
        for i in range(3):
            self.configure(i)
            self.start(i)
        hosts = ",".join(f"127.0.0.1:{n['client']}" for n in self.nodes)
        # The registrar's session must outlive the outage drill: kazoo's reconnect delay
        # grows to a minute by default, and a session that expired (10 s) took the steady
        # instances' ephemeral nodes with it (175 failed requests, the registry doing its job).
        self.client = KazooClient(hosts=hosts, timeout=60,
                                  connection_retry={"max_tries": -1, "max_delay": 1})
        self.client.start(timeout=60)

    def configure(self, i):
        data = os.path.join(WORK, f"zk{i}")
        os.makedirs(data, exist_ok=True)
        with open(os.path.join(data, "myid"), "w") as f:
            f.write(f"{i + 1}\n")
        servers = "\n".join(f"server.{j + 1}=127.0.0.1:{n['peer']}:{n['election']}"
                            for j, n in enumerate(self.nodes))
        with open(os.path.join(data, "zoo.cfg"), "w") as f:
            f.write(f"tickTime=500\ninitLimit=20\nsyncLimit=10\ndataDir={data}\n"
                    f"clientPort={self.nodes[i]['client']}\nclientPortAddress=127.0.0.1\n"
                    f"admin.enableServer=false\n4lw.commands.whitelist=*\n"
                    f"maxSessionTimeout=120000\n{servers}\n")

    def start(self, i):
        cfg = os.path.join(WORK, f"zk{i}", "zoo.cfg")
        env = dict(os.environ, ZOO_LOG_DIR=os.path.join(WORK, f"zk{i}"))
        self.nodes[i]["proc"] = spawn([ZK_SERVER, "start-foreground", cfg], f"zk{i}.log", env=env)

    def kill(self, i):
        self.nodes[i]["proc"].kill()
        self.nodes[i]["proc"].wait()

    def servers(self):
        return [f"127.0.0.1:{n['client']}" for n in self.nodes]

    def leader(self):
        for i, node in enumerate(self.nodes):
            try:
                with socket.create_connection(("127.0.0.1", node["client"]), 1) as s:
                    s.sendall(b"srvr")
                    if b"Mode: leader" in s.recv(4096):
                        return i
            except OSError:
                continue
        return None

    def add(self, service, ident, port):
        return self.client.create(f"/services/{service}/instance-", f"127.0.0.1:{port}".encode(),
                                  ephemeral=True, sequence=True, makepath=True)

    def remove(self, service, path):
        self.client.delete(path)

    def stop(self):
        self.client.stop()
        for i in range(3):
            self.kill(i)


# --- the gateway ----------------------------------------------------------------------


class Gateway:
    def __init__(self, yaml):
        self.port, self.admin = free_port(), free_port()
        path = os.path.join(WORK, f"gateway-{self.port}.yaml")
        with open(path, "w") as f:
            f.write(f'listen: "127.0.0.1:{self.port}"\nadmin_listen: "127.0.0.1:{self.admin}"\n'
                    f"workers: 1\n{yaml}")
        self.proc = spawn([BIN, "--config", path], f"gateway-{self.port}.log",
                          env=dict(os.environ, RUST_LOG="warn"))
        assert until(lambda: http("GET", self.admin_url("/healthz"))[0] == 200, 30), "gateway"

    def admin_url(self, path):
        return f"http://127.0.0.1:{self.admin}{path}"

    def authorities(self, service):
        routes = json.loads(http("GET", self.admin_url("/routes"))[1])
        for entry in routes["services"]:
            if entry["service"] == service:
                return {f"{i['address']}:{i['port']}" for i in entry["instances"]}
        return set()

    def connections_to(self, ports):
        out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True,
                             text=True).stdout
        mine = [l for l in out.splitlines() if f"pid={self.proc.pid}," in l]
        return sum(1 for l in mine if int(l.split()[3].rsplit(":", 1)[1]) in ports)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def propagation(gateway, service, seen, timeout=10):
    """Seconds until `seen(authorities)` holds, polled every POLL_MS; None past `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if seen(gateway.authorities(service)):
            return time.monotonic() - started
        time.sleep(POLL_MS / 1000)
    return None


def measure_changes(registry, gateway, service, ports):
    adds, removes = [], []
    for n in range(CHANGES):
        port = ports[n % len(ports)]
        authority = f"127.0.0.1:{port}"
        handle = registry.add(service, f"{service}-p{n}", port)
        adds.append(propagation(gateway, service, lambda a: authority in a))
        registry.remove(service, handle)
        removes.append(propagation(gateway, service, lambda a: authority not in a))
    return adds, removes


class Load:
    """Requests through the gateway at ~100/s; counts answers other than 200."""

    def __init__(self, url):
        self.url, self.ok, self.failed, self.running = url, 0, 0, True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running:
            try:
                status = http("GET", self.url, timeout=2)[0]
            except OSError:
                status = 0
            if status == 200:
                self.ok += 1
            else:
                self.failed += 1
            time.sleep(0.01)

    def stop(self):
        self.running = False
        self.thread.join()
        return self.ok, self.failed


def percentile(values, q):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(values):
    missing = sum(1 for v in values if v is None)
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    text = "—" if p50 is None else f"{p50 * 1000:.1f} / {p99 * 1000:.1f}"
    return text + (f" ({missing} not seen in 10 s)" if missing else "")


# --- one source ------------------------------------------------------------------------


def gateway_yaml(source, registry, services):
    names = "".join(f"  - name: {s}\n" + ("" if source == "consul" else f"    source: {source}\n")
                    for s in services)
    head = {
        "consul": lambda: f"consul:\n  address: \"http://127.0.0.1:{registry.http_port}\"\n",
        "dns": lambda: (f"dns:\n  servers: [\"127.0.0.1:{registry.dns_port}\"]\n"
                        f"  refresh: {os.environ.get('DNS_REFRESH', '1s')}\n"),
        "etcd": lambda: "etcd:\n  endpoints: [" + ", ".join(f'"{e}"' for e in registry.endpoints()) + "]\n",
        "zookeeper": lambda: ("zookeeper:\n  servers: [" + ", ".join(f'"{s}"' for s in registry.servers())
                              + "]\n  session_timeout: 10s\n"),
    }[source]()
    return head + "services:\n" + names


def start_registry(source):
    return {"consul": Consul, "dns": Consul, "etcd": Etcd, "zookeeper": ZooKeeper}[source]()


def leader_drill(source, registry, gateway, ports):
    """Kills the leader under load; returns (failed, ok, propagation of a change after it)."""
    if source not in ("etcd", "zookeeper"):
        return None
    load = Load(f"http://127.0.0.1:{gateway.port}/bench")
    time.sleep(1)
    leader = registry.leader()
    registry.kill(leader)
    authority = f"127.0.0.1:{ports[-1]}"
    deadline = time.monotonic() + 30
    handle = None
    while handle is None and time.monotonic() < deadline:
        try:
            handle = registry.add("bench", "after-leader", ports[-1])
        except Exception:  # the registry is electing; the call is retried
            time.sleep(0.05)
    added_at = time.monotonic()
    seen = propagation(gateway, "bench", lambda a: authority in a, timeout=30)
    time.sleep(2)
    registry.start(leader)
    registry.remove("bench", handle)
    ok, failed = load.stop()
    return {"failed": failed, "ok": ok, "change_after_kill_s": seen,
            "call_took_s": added_at - (deadline - 30)}


def outage_drill(source, registry, gateway, ports):
    """Stops every registry node for OUTAGE_S under load; returns failures and resync time."""
    load = Load(f"http://127.0.0.1:{gateway.port}/bench")
    time.sleep(1)
    if source in ("consul", "dns"):
        registry.stop()
        time.sleep(OUTAGE_S)
        registry.start()  # a dev agent keeps nothing: the instances register again
        for n, port in enumerate(ports[:3]):
            registry.add("bench", f"steady-{n}", port)
        restarted = time.monotonic()
    else:
        for i in range(3):
            registry.kill(i)
        time.sleep(OUTAGE_S)
        for i in range(3):
            registry.start(i)
        restarted = time.monotonic()
    authority = f"127.0.0.1:{ports[-2]}"
    handle = None
    while handle is None and time.monotonic() - restarted < 60:
        try:
            handle = registry.add("bench", "after-outage", ports[-2])
        except Exception:
            time.sleep(0.05)
    seen = propagation(gateway, "bench", lambda a: authority in a, timeout=60)
    resync = None if seen is None else time.monotonic() - restarted
    ok, failed = load.stop()
    return {"failed": failed, "ok": ok, "resync_s": resync}


def connections(source, registry):
    if source == "consul":
        ports = {registry.http_port}
    elif source == "dns":
        ports = {registry.dns_port}  # UDP: no connections held
    elif source == "etcd":
        ports = {n["client"] for n in registry.nodes}
    else:
        ports = {n["client"] for n in registry.nodes}
    names = [f"s{n:03}" for n in range(100)]
    gateway = Gateway(gateway_yaml(source, registry, names))
    try:
        until(lambda: http("GET", gateway.admin_url("/readyz"))[0] == 200, 60)
        time.sleep(1)
        return gateway.connections_to(ports)
    finally:
        gateway.stop()


def run(source):
    registry = start_registry(source)
    ports = start_instances(6)
    try:
        for n, port in enumerate(ports[:3]):
            registry.add("bench", f"steady-{n}", port)
        gateway = Gateway(gateway_yaml(source, registry, ["bench"]))
        try:
            steady = {f"127.0.0.1:{p}" for p in ports[:3]}
            assert until(lambda: steady <= gateway.authorities("bench"), 60), f"{source}: no table"
            adds, removes = measure_changes(registry, gateway, "bench", ports[3:4])
            result = {"source": source, "add": adds, "remove": removes,
                      "add_summary": summary(adds), "remove_summary": summary(removes)}
            result["leader"] = leader_drill(source, registry, gateway, ports)
            result["outage"] = outage_drill(source, registry, gateway, ports)
        finally:
            gateway.stop()
        result["connections_100"] = connections(source, registry)
        return result
    finally:
        registry.stop()


def markdown(results):
    rows = ["| source | add p50 / p99 (ms) | remove p50 / p99 (ms) | 30 s outage: failed requests | "
            "resync after outage | leader killed: failed requests | first change after the kill | "
            "connections per 100 services |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        outage, leader = r["outage"], r["leader"]
        secs = lambda v: "—" if v is None else f"{v:.2f} s"
        rows.append(
            f"| {r['source']} | {r['add_summary']} | {r['remove_summary']} | "
            f"{outage['failed']} of {outage['ok'] + outage['failed']} | {secs(outage['resync_s'])} | "
            + (f"{leader['failed']} of {leader['ok'] + leader['failed']} | {secs(leader['change_after_kill_s'])} | "
               if leader else "— | — | ")
            + f"{r['connections_100']} |")
    return "\n".join(rows) + "\n"


def main():
    sources = sys.argv[2:] or ["consul", "etcd", "zookeeper", "dns"]
    results = []
    for source in sources:
        result = run(source)
        print(json.dumps({k: v for k, v in result.items() if k not in ("add", "remove")}), flush=True)
        results.append(result)
    with open(sys.argv[1], "w") as f:
        f.write(markdown(results))


if __name__ == "__main__":
    main()
