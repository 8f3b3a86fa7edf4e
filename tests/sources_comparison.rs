//! The discovery-source comparison of issue 12, measured (`loadtest/sources.sh` runs it:
//! `cargo test --test sources_comparison -- --ignored --nocapture`; not part of CI).
//!
//! For etcd (3 members) and ZooKeeper (3 servers), each on loopback ports, with an in-process
//! gateway (the test build) routing `/web` to the registry's service `web`:
//! - propagation: `CHANGES` (default 50) adds and as many removes of one instance, each timed
//!   from just before the registry write to the gateway's admin `/routes` showing it (polled
//!   back to back, ~1 ms apart);
//! - outage: every member killed for `OUTAGE_S` (default 30) seconds under 2 request loops;
//!   failed requests, then the time from the restart to a new instance routed (resync);
//! - leader: the leader killed under 2 request loops; failed requests, and the time from the
//!   kill to a new instance routed;
//! - connections: TCP connections from the gateway to the registry's client ports with 100
//!   services of that source, all synced.
//!
//! Each row is printed as `ROW <source> <measure> <value>` for the script to collect.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::zookeeper::{try_register, ZookeeperEnsemble};
use common::{free_port, Backend, Gateway, Load};
use zookeeper_client as zk;

/// One registry under test, with a writer of its own.
enum Registry {
    Etcd(EtcdCluster, Box<etcd_client::Client>),
    Zookeeper(ZookeeperEnsemble, zk::Client, HashMap<String, String>),
}

impl Registry {
    fn name(&self) -> &'static str {
        match self {
            Registry::Etcd(..) => "etcd",
            Registry::Zookeeper(..) => "zookeeper",
        }
    }

    /// The gateway's registry section and `services:` with `count` services `web`, `web1`..
    fn yaml(&self, count: usize) -> String {
        let quoted = |list: Vec<String>| {
            let items: Vec<String> = list.iter().map(|s| format!("\"{s}\"")).collect();
            items.join(", ")
        };
        let section = match self {
            Registry::Etcd(c, _) => format!(
                "etcd:\n  endpoints: [{}]\n  timeout: 1s\n",
                quoted(c.endpoints())
            ),
            Registry::Zookeeper(e, ..) => {
                format!(
                    "zookeeper:\n  servers: [{}]\n  session_timeout: 4s\n",
                    quoted(e.servers())
                )
            }
        };
        let mut yaml = format!("{section}services:\n");
        for i in 0..count {
            let name = service(i);
            yaml.push_str(&format!(
                "  - name: {name}\n    source: {}\n    route: {{path_prefix: /{name}}}\n",
                self.name()
            ));
        }
        yaml
    }

    async fn add(&mut self, service: &str, id: &str, address: &str) {
        match self {
            Registry::Etcd(_, client) => {
                let key = format!("/services/{service}/{id}");
                retry(|| async {
                    client
                        .clone()
                        .put(key.as_str(), address, None)
                        .await
                        .is_ok()
                })
                .await;
            }
            Registry::Zookeeper(e, session, nodes) => {
                let path = format!("/services/{service}");
                let node = loop {
                    if session.state().is_terminated() {
                        *session = e.session(Duration::from_secs(30)).await;
                    }
                    let create = tokio::time::timeout(
                        Duration::from_secs(3),
                        try_register(session, &path, address),
                    );
                    if let Ok(Ok(node)) = create.await {
                        break node;
                    }
                };
                nodes.insert(id.to_owned(), node);
            }
        }
    }

    async fn remove(&mut self, service: &str, id: &str) {
        match self {
            Registry::Etcd(_, client) => {
                let key = format!("/services/{service}/{id}");
                retry(|| async { (**client).clone().delete(key.as_str(), None).await.is_ok() })
                    .await;
            }
            Registry::Zookeeper(_, session, nodes) => {
                let node = nodes.remove(id).expect("a registered node");
                retry(|| async {
                    matches!(
                        session.delete(&node, None).await,
                        Ok(()) | Err(zk::Error::NoNode)
                    )
                })
                .await;
            }
        }
    }

    fn kill(&mut self, i: usize) {
        match self {
            Registry::Etcd(c, _) => c.kill(i),
            Registry::Zookeeper(e, ..) => e.kill(i),
        }
    }

    /// Restarts every member; how long until a leader served.
    async fn restart_all(&mut self) -> Duration {
        let start = Instant::now();
        for i in 0..3 {
            match self {
                Registry::Etcd(c, _) => c.restart(i),
                Registry::Zookeeper(e, ..) => e.restart(i),
            }
        }
        let leader = match self {
            Registry::Etcd(c, _) => c.wait_for_leader(Duration::from_secs(60)).await,
            Registry::Zookeeper(e, ..) => e.wait_for_leader(Duration::from_secs(60)).await,
        };
        assert!(leader.is_some(), "no leader after the restart");
        let elected = start.elapsed();
        // The writer's session may have expired while everything was down.
        if let Registry::Zookeeper(e, session, _) = self {
            if session.state().is_terminated() {
                *session = e.session(Duration::from_secs(30)).await;
            }
        }
        elected
    }

    async fn leader(&self) -> usize {
        match self {
            Registry::Etcd(c, _) => c.leader().await,
            Registry::Zookeeper(e, ..) => e.leader().await,
        }
        .expect("a leader")
    }

    /// Client ports of the members, for counting connections.
    fn client_ports(&self) -> Vec<u16> {
        match self {
            Registry::Etcd(c, _) => c.members.iter().map(|m| m.client_port).collect(),
            Registry::Zookeeper(e, ..) => e.servers.iter().map(|s| s.client_port).collect(),
        }
    }
}

/// Runs `op` until it returns true (each try bounded by 3 s), for at most 60 s.
async fn retry<F, Fut>(mut op: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !matches!(
        tokio::time::timeout(Duration::from_secs(3), op()).await,
        Ok(true)
    ) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "a registry write kept failing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn service(i: usize) -> String {
    if i == 0 {
        "web".to_owned()
    } else {
        format!("web{i}")
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn row(source: &str, measure: &str, value: String) {
    println!("ROW {source} {measure} {value}");
}

/// The number of instances `/routes` shows for `web`.
async fn routed(gateway: &Gateway) -> usize {
    gateway.instance_entries("web").await.len()
}

/// Polls `/routes` back to back until `web` has `count` instances; how long since `start`.
async fn until_routed(gateway: &Gateway, count: usize, start: Instant) -> Duration {
    let deadline = Duration::from_secs(60);
    while routed(gateway).await != count {
        assert!(start.elapsed() < deadline, "never routed {count} instances");
    }
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn propagation(registry: &mut Registry, gateway: &Gateway, extra: &Backend) {
    let changes = env_or("CHANGES", 50) as usize;
    let (mut adds, mut removes) = (Vec::new(), Vec::new());
    let address = format!("127.0.0.1:{}", extra.port);
    for i in 0..changes {
        let id = format!("p{i}");
        let start = Instant::now();
        registry.add("web", &id, &address).await;
        adds.push(until_routed(gateway, 2, start).await);
        let start = Instant::now();
        registry.remove("web", &id).await;
        removes.push(until_routed(gateway, 1, start).await);
    }
    for (what, mut all) in [("add", adds), ("remove", removes)] {
        all.sort();
        let summary = format!(
            "{} / {} (n={})",
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            all.len()
        );
        row(
            registry.name(),
            &format!("propagation_{what}_ms_p50_p99"),
            summary,
        );
    }
}

async fn outage(registry: &mut Registry, gateway: &Gateway, extra: &Backend) {
    let seconds = env_or("OUTAGE_S", 30);
    let load = Load::start(gateway.url("/web/x"), 2);
    for i in 0..3 {
        registry.kill(i);
    }
    // The drill's length, not a wait for an event.
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let restart = Instant::now();
    let elected = registry.restart_all().await;
    registry
        .add("web", "resync", &format!("127.0.0.1:{}", extra.port))
        .await;
    let accepted = restart.elapsed();
    let resync = until_routed(gateway, 2, restart).await;
    let mut stats = load.finish().await;
    let name = registry.name();
    row(
        name,
        "outage_failed_requests",
        format!("{} of {}", stats.failures.len(), stats.total()),
    );
    row(name, "outage_p99_ms", ms(stats.p99()));
    row(name, "restart_to_leader_ms", ms(elected));
    row(name, "restart_to_write_accepted_ms", ms(accepted));
    row(name, "restart_to_change_routed_ms", ms(resync));
    registry.remove("web", "resync").await;
    until_routed(gateway, 1, Instant::now()).await;
}

async fn leader_kill(registry: &mut Registry, gateway: &Gateway, extra: &Backend) {
    let load = Load::start(gateway.url("/web/x"), 2);
    let leader = registry.leader().await;
    let killed = Instant::now();
    registry.kill(leader);
    registry
        .add("web", "after-kill", &format!("127.0.0.1:{}", extra.port))
        .await;
    let accepted = killed.elapsed();
    let followed = until_routed(gateway, 2, killed).await;
    let stats = load.finish().await;
    let name = registry.name();
    row(
        name,
        "leader_kill_failed_requests",
        format!("{} of {}", stats.failures.len(), stats.total()),
    );
    row(name, "leader_kill_to_write_accepted_ms", ms(accepted));
    row(name, "leader_kill_to_change_routed_ms", ms(followed));
}

/// ESTABLISHED TCP connections to `ports` (every process; the registry's own and the
/// writer's are in the baseline the caller subtracts).
fn connections_to(ports: &[u16]) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote = fields.get(2).and_then(|a| a.rsplit(':').next());
            let port = remote.and_then(|p| u16::from_str_radix(p, 16).ok());
            fields.get(3) == Some(&"01") && port.is_some_and(|p| ports.contains(&p))
        })
        .count()
}

async fn connections(registry: &mut Registry, backend: &Backend) {
    let address = format!("127.0.0.1:{}", backend.port);
    for i in 0..100 {
        registry.add(&service(i), "c", &address).await;
    }
    let ports = registry.client_ports();
    let baseline = connections_to(&ports);
    let consul = format!("http://127.0.0.1:{}", free_port());
    let gateway = Gateway::start_with(&[consul], "", &registry.yaml(100)).await;
    let synced = common::wait_until(Duration::from_secs(60), || async {
        let routes: serde_json::Value =
            serde_json::from_str(&gateway.admin_get("/routes").await).unwrap_or_default();
        let services = routes["services"].as_array().cloned().unwrap_or_default();
        services
            .iter()
            .filter(|s| s["instances"].as_array().is_some_and(|i| !i.is_empty()))
            .count()
            >= 100
    })
    .await;
    assert!(synced.is_some(), "100 services did not sync");
    let held = connections_to(&ports).saturating_sub(baseline);
    row(
        registry.name(),
        "connections_per_100_services",
        held.to_string(),
    );
}

async fn compare(mut registry: Registry) {
    let backends = common::backends("web", 2).await;
    registry
        .add("web", "base", &format!("127.0.0.1:{}", backends[0].port))
        .await;
    let consul = format!("http://127.0.0.1:{}", free_port());
    let gateway = Gateway::start_with(&[consul], "", &registry.yaml(1)).await;
    until_routed(&gateway, 1, Instant::now()).await;
    propagation(&mut registry, &gateway, &backends[1]).await;
    leader_kill(&mut registry, &gateway, &backends[1]).await;
    registry.restart_all().await;
    registry.remove("web", "after-kill").await;
    until_routed(&gateway, 1, Instant::now()).await;
    outage(&mut registry, &gateway, &backends[1]).await;
    drop(gateway);
    connections(&mut registry, &backends[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (loadtest/sources.sh), not a check"]
async fn etcd() {
    let cluster = EtcdCluster::start(3).await;
    let client = cluster.client().await;
    compare(Registry::Etcd(cluster, Box::new(client))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (loadtest/sources.sh), not a check"]
async fn zookeeper() {
    let ensemble = ZookeeperEnsemble::start(3).await;
    let session = ensemble.session(Duration::from_secs(30)).await;
    compare(Registry::Zookeeper(ensemble, session, HashMap::new())).await;
}
