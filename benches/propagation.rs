//! Propagation and scale benchmark against a real Consul (`cargo bench --bench propagation`).
//!
//! For 1, 100 and 1,000 watched services (10 instances each) it measures the time from a
//! Consul API call to the gateway's table change, read from the release binary's "table
//! updated" log line, and the gateway's connections to Consul, RSS and idle CPU. Each round
//! makes every kind of [`KINDS`] once on a random service: through the catalog API (node
//! "external", the check's status set by the call) an instance registered passing,
//! deregistered, registered critical then turned passing, turned critical; through the
//! agent API (as an application registers itself) an instance with a TTL check registered
//! passing, failed, passed and deregistered.
//!
//! Knobs: `SIZES=1,100` (services), `CHANGES=40` (rounds), `GAP_MS=100` (pause before each
//! measured change), `BENCH_CONSUL=watch: catalog,max_connections: 16` (extra `consul:` keys),
//! `BENCH_CONSUL_HCL='limits { http_max_conns_per_client = 4096 }'` (extra configuration of
//! the Consul agent, passed as `consul agent -hcl`; by default Consul refuses more than 200
//! connections per client address), `BENCH_CONSUL_TLS=1` (the gateway watches the agent over
//! HTTPS, with a client certificate: HTTP/2, many long-polls per connection), `BENCH_RUST_LOG` and `BENCH_LOG_FILE` (keep the
//! gateway's log, one file per size), `SWITCHYARD_BIN` (measure that binary instead of
//! building the release one).
//! Targets (issue 10): p99 < 10 ms at 100 services, < 50 ms at 1,000; at most
//! `consul.max_connections` (128) connections to Consul; RSS < 64 MiB.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

const INSTANCES: usize = 10;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let sizes: Vec<usize> = std::env::var("SIZES")
        .unwrap_or_else(|_| "1,100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let changes: usize = std::env::var("CHANGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    // SWITCHYARD_BIN: measure that binary (e.g. a copy of an earlier build) instead.
    if std::env::var_os("SWITCHYARD_BIN").is_none() {
        let status = Command::new("cargo")
            .args(["build", "--release", "--quiet", "--bin", "switchyard"])
            .status()
            .expect("cargo build");
        assert!(status.success());
    }
    println!("| services | mode | change | p50 | p99 | max | n |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut footprint = Vec::new();
    for size in sizes {
        footprint.push(runtime.block_on(run(size, changes)));
    }
    println!();
    println!("| services | instances | connections to Consul | RSS | idle CPU (5 s) |");
    println!("| --- | --- | --- | --- | --- |");
    for line in footprint {
        println!("{line}");
    }
}

struct Gateway {
    child: std::process::Child,
    updates: mpsc::Receiver<(String, Instant)>,
    admin: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn catalog(client: &reqwest::Client, consul: &str, op: &str, body: serde_json::Value) {
    let response = client
        .put(format!("{consul}/v1/catalog/{op}"))
        .json(&body)
        .send()
        .await
        .expect("consul catalog call");
    assert!(
        response.status().is_success(),
        "{op}: {}",
        response.status()
    );
}

fn instance(service: usize, n: usize, port: u16, status: &str) -> serde_json::Value {
    let id = format!("svc{service}-{n}");
    json!({
        "Node": "external", "Address": "127.0.0.1",
        "Service": {"ID": id, "Service": format!("svc{service}"), "Address": "127.0.0.1", "Port": port},
        "Checks": [{"CheckID": format!("check-{id}"), "Name": "external", "Status": status, "ServiceID": id}],
    })
}

/// The measured kinds, in the order of the table.
const KINDS: [&str; 8] = [
    "register",
    "deregister",
    "critical -> passing",
    "check critical",
    "ttl register",
    "ttl critical",
    "ttl passing",
    "ttl deregister",
];

/// A change made through Consul's API.
enum Call {
    /// `PUT /v1/catalog/<op>` (an instance of the node "external", its check's status set
    /// by the call).
    Catalog(&'static str, serde_json::Value),
    /// `PUT /v1/agent/<path>`: a service of the agent itself with a TTL check, as an
    /// application registers itself.
    Agent(String, Option<serde_json::Value>),
}

impl Call {
    async fn send(&self, client: &reqwest::Client, consul: &str) {
        match self {
            Call::Catalog(op, body) => catalog(client, consul, op, body.clone()).await,
            Call::Agent(path, body) => {
                let mut request = client.put(format!("{consul}/v1/agent/{path}"));
                if let Some(body) = body {
                    request = request.json(body);
                }
                let response = request.send().await.expect("consul agent call");
                assert!(
                    response.status().is_success(),
                    "{path}: {}",
                    response.status()
                );
            }
        }
    }
}

/// One change of a round: measured under `measured`, or only made; `updates` when it
/// changes the table.
struct Step {
    measured: Option<&'static str>,
    call: Call,
    updates: bool,
}

fn step(measured: Option<&'static str>, call: Call, updates: bool) -> Step {
    Step {
        measured,
        call,
        updates,
    }
}

/// One round on `service` with the extra instance `extra`: every kind of [`KINDS`] once.
fn steps(service: usize, extra: usize) -> Vec<Step> {
    let id = format!("svc{service}-{extra}");
    let deregister = json!({"Node": "external", "ServiceID": id});
    let with = |status| Call::Catalog("register", instance(service, extra, 30000, status));
    let ttl_id = format!("svc{service}-ttl{extra}");
    let ttl = json!({
        "ID": ttl_id, "Name": format!("svc{service}"), "Address": "127.0.0.1", "Port": 30001,
        "Check": {"CheckID": format!("ttl-{ttl_id}"), "TTL": "10m", "Status": "passing"},
    });
    let agent = |path: String| Call::Agent(path, None);
    vec![
        step(Some("register"), with("passing"), true),
        step(
            Some("deregister"),
            Call::Catalog("deregister", deregister.clone()),
            true,
        ),
        step(None, with("critical"), false),
        step(Some("critical -> passing"), with("passing"), true),
        step(Some("check critical"), with("critical"), true),
        step(None, Call::Catalog("deregister", deregister), false),
        step(
            Some("ttl register"),
            Call::Agent("service/register".into(), Some(ttl)),
            true,
        ),
        step(
            Some("ttl critical"),
            agent(format!("check/fail/ttl-{ttl_id}")),
            true,
        ),
        step(
            Some("ttl passing"),
            agent(format!("check/pass/ttl-{ttl_id}")),
            true,
        ),
        step(
            Some("ttl deregister"),
            agent(format!("service/deregister/{ttl_id}")),
            true,
        ),
    ]
}

/// The watch mode from the gateway's "watching Consul per_service=N catalog=M" line.
fn watch_mode(line: &str) -> String {
    let count = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    };
    match (count("per_service="), count("catalog=")) {
        (_, 0) => "per-service".into(),
        (0, _) => "catalog".into(),
        (own, shared) => format!("hybrid {own}+{shared}"),
    }
}

/// When the gateway next logged a table update of `name` (within 10 s).
fn next_update(gateway: &Gateway, name: &str) -> Option<Instant> {
    loop {
        match gateway.updates.recv_timeout(Duration::from_secs(10)) {
            Ok((updated, at)) if updated == name => return Some(at),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// The agent (with HTTPS when `BENCH_CONSUL_TLS=1`) and the gateway's `consul:` keys that
/// reach it: its address and, over HTTPS, the test CA and a client certificate (their files
/// go with the returned `Pki`), and the port the gateway's connections go to.
async fn start_consul() -> (common::Consul, String, u16, Option<common::pki::Pki>) {
    // BENCH_CONSUL_HCL: extra agent configuration, e.g. a raised connection limit.
    let hcl = std::env::var("BENCH_CONSUL_HCL").unwrap_or_default();
    if std::env::var("BENCH_CONSUL_TLS").as_deref() != Ok("1") {
        let consul = common::Consul::start_with_hcl(&hcl).await;
        let keys = format!("  address: {}\n", consul.url());
        let port = consul.http_port;
        return (consul, keys, port, None);
    }
    let pki = common::pki::Pki::new("bench-consul");
    let server = pki.leaf("consul", "consul.test", &["consul.test"]);
    let client = pki.leaf("client", "switchyard", &["switchyard.test"]);
    let consul = common::Consul::start_tls_with_hcl(&pki.ca_file, &server, &hcl).await;
    let keys = format!(
        "  address: {}\n  ca_file: {:?}\n  cert_file: {:?}\n  key_file: {:?}\n  tls_server_name: consul.test\n",
        consul.https_url(),
        pki.ca_file,
        client.cert_file,
        client.key_file
    );
    let port = consul.https_port();
    (consul, keys, port, Some(pki))
}

async fn run(size: usize, changes: usize) -> String {
    let (consul, consul_keys, consul_port, _pki) = start_consul().await;
    let url = consul.url();
    let client = common::http_client();
    let started = Instant::now();
    for service in 0..size {
        for n in 0..INSTANCES {
            catalog(
                &client,
                &url,
                "register",
                instance(service, n, 20000 + n as u16, "passing"),
            )
            .await;
        }
    }
    eprintln!(
        "registered {size}x{INSTANCES} instances in {:?}",
        started.elapsed()
    );

    let (port, admin) = (common::free_port(), common::free_port());
    let dir = std::env::temp_dir().join(format!("switchyard-bench-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    // BENCH_CONSUL: extra `consul:` keys, e.g. "watch: catalog" or "max_connections: 16".
    let extra = std::env::var("BENCH_CONSUL").unwrap_or_default();
    let extra: String = extra
        .split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| format!("  {}\n", kv.trim()))
        .collect();
    let mut yaml = format!("listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nworkers: 1\nconsul:\n{consul_keys}{extra}services:\n");
    for service in 0..size {
        yaml.push_str(&format!("  - name: svc{service}\n"));
    }
    let config = dir.join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut child =
        Command::new(std::env::var("SWITCHYARD_BIN").unwrap_or_else(|_| {
            env!("CARGO_MANIFEST_DIR").to_owned() + "/target/release/switchyard"
        }))
        .arg("--config")
        .arg(&config)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting switchyard");
    let stderr = child.stderr.take().unwrap();
    let (tx, updates) = mpsc::channel();
    let mode = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mode_writer = mode.clone();
    std::thread::spawn(move || {
        // BENCH_LOG_FILE: keep the gateway's log (with BENCH_RUST_LOG=debug, its timings).
        let mut keep = std::env::var("BENCH_LOG_FILE")
            .ok()
            .map(|path| std::fs::File::create(format!("{path}.{size}")).expect("log file"));
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(file) = keep.as_mut() {
                use std::io::Write;
                let _ = writeln!(file, "{line}");
            }
            if line.contains("in catalog mode") {
                *mode_writer.lock().unwrap() = "catalog".into(); // a build before the hybrid
            } else if line.contains("watching Consul") {
                *mode_writer.lock().unwrap() = watch_mode(&line);
            }
            if line.contains("table updated") {
                if let Some(service) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("service="))
                {
                    let _ = tx.send((service.trim_matches('"').to_owned(), Instant::now()));
                }
            }
        }
    });
    let gateway = Gateway {
        child,
        updates,
        admin,
    };
    let ready = common::wait_until(Duration::from_secs(120), || async {
        client
            .get(format!("http://127.0.0.1:{}/readyz", gateway.admin))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready.is_some(), "gateway not ready");
    // Let the initial table builds drain.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while gateway.updates.try_recv().is_ok() {}
    let mode = match mode.lock().unwrap().clone() {
        mode if mode.is_empty() => "per-service".to_owned(), // a build before the hybrid
        mode => mode,
    };

    let gap = Duration::from_millis(
        std::env::var("GAP_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100),
    );
    let mut results: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..changes {
        let service = rng.usize(..size);
        let name = format!("svc{service}");
        for step in steps(service, INSTANCES + round) {
            if step.measured.is_none() {
                // Not measured, but wait for its update so it is not mistaken for the next.
                step.call.send(&client, &url).await;
                if step.updates {
                    while let Ok((updated, _)) =
                        gateway.updates.recv_timeout(Duration::from_secs(10))
                    {
                        if updated == name {
                            break;
                        }
                    }
                }
                continue;
            }
            // Isolated changes: let the watch's token bucket refill between them.
            tokio::time::sleep(gap).await;
            let sent = Instant::now();
            step.call.send(&client, &url).await;
            let kind = step.measured.expect("measured");
            match next_update(&gateway, &name) {
                Some(at) => results
                    .entry(kind)
                    .or_default()
                    .push(at.saturating_duration_since(sent)),
                None => eprintln!("{kind} on {name}: no table update within 10 s"),
            }
        }
    }
    for kind in KINDS {
        let mut samples = results.remove(kind).unwrap_or_default();
        samples.sort();
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
                .map_or("-".to_owned(), |d| {
                    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
                })
        };
        println!(
            "| {size} | {mode} | {kind} | {} | {} | {} | {} |",
            at(0.5),
            at(0.99),
            at(1.0),
            samples.len()
        );
    }

    let pid = gateway.child.id();
    let connections = Command::new("ss")
        .args([
            "-Htnp",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{consul_port}"),
        ])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(&format!("pid={pid},")))
                .count()
        })
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        .unwrap_or_default();
    let cpu = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks(11) + ticks(12)
    };
    let before = cpu(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_ticks = cpu(pid) - before;
    let _ = std::fs::remove_dir_all(&dir);
    format!(
        "| {size} | {} | {connections} | {:.1} MiB | {:.2}% |",
        size * INSTANCES,
        rss.parse::<f64>().unwrap_or(0.0) / 1024.0,
        idle_ticks as f64 / 5.0 // 100 ticks per second: ticks/5 s = percent
    )
}
