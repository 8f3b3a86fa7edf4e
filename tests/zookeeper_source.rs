//! `source: zookeeper` against a real 3-server ZooKeeper ensemble on loopback ports, through
//! a running gateway: a path created late, ephemeral sequential children, a registrar's
//! session closing and garbage data reach its routing; a full outage keeps the last set
//! serving (errors counted), then resyncs on a new session; a killed leader costs no request
//! and later registrations still arrive.

mod common;

use std::time::Duration;

use common::sources::{discovery_errors, gateway_without_consul, quoted};
use common::zookeeper::{register, ZookeeperEnsemble};
use common::{Backend, Gateway, Load};

const PATH: &str = "/services/web";
const WAIT: Duration = Duration::from_secs(15);
/// The gateway's and the registrars' session timeout: short, so expiry drills take seconds.
const SESSION: Duration = Duration::from_secs(2);

/// A gateway routing `/web` to the ZooKeeper service `web` (path `/services/web`); its
/// Consul address is a port nothing listens on (no service uses Consul).
async fn gateway(ensemble: &ZookeeperEnsemble) -> Gateway {
    let rest = format!(
        "zookeeper:\n  servers: [{}]\n  session_timeout: 2s\nservices:\n  - name: web\n    source: zookeeper\n    route: {{path_prefix: /web}}\n",
        quoted(&ensemble.servers())
    );
    gateway_without_consul(&rest).await
}

/// A 3-server ensemble, two backends with the first registered by a registrar whose 30 s
/// session outlives the drills (returned to keep it open), and a gateway serving it.
async fn serving_the_first() -> (
    ZookeeperEnsemble,
    Vec<Backend>,
    zookeeper_client::Client,
    Gateway,
) {
    let ensemble = ZookeeperEnsemble::start(3).await;
    let backends = common::backends("web", 2).await;
    let registrar = ensemble.session(Duration::from_secs(30)).await;
    register(&registrar, PATH, &address(&backends[0])).await;
    let gateway = gateway(&ensemble).await;
    assert!(wait_for(&gateway, &[&backends[0]]).await.is_some());
    (ensemble, backends, registrar, gateway)
}

fn address(backend: &Backend) -> String {
    format!("127.0.0.1:{}", backend.port)
}

/// The `host:port` of the instances in the gateway's table, sorted.
async fn addresses(gateway: &Gateway) -> Vec<String> {
    let mut all: Vec<String> = gateway
        .instance_entries("web")
        .await
        .iter()
        .filter_map(|i| {
            Some(format!(
                "{}:{}",
                i["address"].as_str()?,
                i["port"].as_u64()?
            ))
        })
        .collect();
    all.sort();
    all
}

/// Waits until the gateway routes to exactly `backends`.
async fn wait_for(gateway: &Gateway, backends: &[&Backend]) -> Option<Duration> {
    let mut want: Vec<String> = backends.iter().map(|b| address(b)).collect();
    want.sort();
    common::wait_until(WAIT, || {
        let want = want.clone();
        async move { addresses(gateway).await == want }
    })
    .await
}

async fn errors(gateway: &Gateway) -> f64 {
    discovery_errors(&gateway.admin_get("/metrics").await, "web")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_sessions_and_garbage_reach_the_gateway() {
    let ensemble = ZookeeperEnsemble::start(3).await;
    let backends = common::backends("web", 2).await;
    // The path does not exist yet: an empty table (503), not a failure.
    let gateway = gateway(&ensemble).await;
    let empty = common::wait_until(WAIT, || async {
        gateway.get("/web/x").await.status() == 503
    })
    .await;
    assert!(empty.is_some(), "a missing path is an empty set");

    let first = ensemble.session(SESSION).await;
    let node = register(&first, PATH, &address(&backends[0])).await;
    let took = wait_for(&gateway, &[&backends[0]]).await;
    println!("zookeeper path created with a child -> gateway routing: {took:?}");
    assert!(took.is_some());
    assert_eq!(gateway.instances("web").await, std::slice::from_ref(&node));

    let second = ensemble.session(SESSION).await;
    let url = format!("http://{}", address(&backends[1]));
    register(&second, PATH, &url).await;
    register(&second, PATH, "garbage").await;
    let took = wait_for(&gateway, &[&backends[0], &backends[1]]).await;
    println!("zookeeper child added -> gateway routing: {took:?}");
    assert!(took.is_some());
    let (hits, failures) = gateway.spread("/web/x", 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        (hits.get("web-1"), hits.get("web-2")),
        (Some(&10), Some(&10))
    );

    // The second registrar goes away: its ephemeral nodes go with its session.
    drop(second);
    let took = wait_for(&gateway, &[&backends[0]]).await;
    println!("zookeeper registrar session closed -> removed from the gateway: {took:?}");
    assert!(took.is_some());

    first.delete(&node, None).await.expect("deleting a node");
    assert!(wait_for(&gateway, &[]).await.is_some());
    assert_eq!(
        errors(&gateway).await,
        0.0,
        "no failure while ZooKeeper was up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outage_keeps_serving_the_last_set_and_resyncs() {
    let (mut ensemble, backends, _registrar, gateway) = serving_the_first().await;

    let load = Load::start(gateway.url("/web/x"), 2);
    for i in 0..3 {
        ensemble.kill(i);
    }
    // Disconnected, then the session expires on the client side and new sessions fail:
    // each is counted, and the last set keeps serving.
    let counted = common::wait_until(WAIT, || async { errors(&gateway).await >= 3.0 }).await;
    assert!(
        counted.is_some(),
        "errors counted: {}",
        errors(&gateway).await
    );
    let mut stats = load.finish().await;
    println!("zookeeper down: {}", stats.summary());
    stats.expect_no_failures("ZooKeeper ensemble down");

    for i in 0..3 {
        ensemble.restart(i);
    }
    assert!(ensemble
        .wait_for_leader(Duration::from_secs(60))
        .await
        .is_some());
    let later = ensemble.session(SESSION).await;
    register(&later, PATH, &address(&backends[1])).await;
    let want = address(&backends[1]);
    let took = common::wait_until(Duration::from_secs(30), || async {
        addresses(&gateway).await.contains(&want)
    })
    .await;
    println!("zookeeper back: a registration after the restart in the gateway after {took:?}");
    assert!(took.is_some(), "no resync: {:?}", addresses(&gateway).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_costs_no_request_and_later_changes_arrive() {
    let (mut ensemble, backends, _registrar, gateway) = serving_the_first().await;

    let load = Load::start(gateway.url("/web/x"), 2);
    let leader = ensemble.leader().await.expect("a leader");
    ensemble.kill(leader);
    let new_leader = ensemble.wait_for_leader(Duration::from_secs(30)).await;
    assert!(new_leader.is_some_and(|l| l != leader), "no new leader");
    let later = ensemble.session(SESSION).await;
    register(&later, PATH, &address(&backends[1])).await;
    let want = address(&backends[1]);
    let took =
        common::wait_until(WAIT, || async { addresses(&gateway).await.contains(&want) }).await;
    println!(
        "zookeeper server {} (leader) killed: a later registration in the gateway after {took:?}",
        leader + 1
    );
    assert!(
        took.is_some(),
        "after the leader's death: {:?}",
        addresses(&gateway).await
    );
    let mut stats = load.finish().await;
    println!("zookeeper leader killed: {}", stats.summary());
    stats.expect_no_failures("ZooKeeper leader killed");
}
