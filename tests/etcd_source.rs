//! `source: etcd` against a real 3-member etcd cluster on loopback ports, through a running
//! gateway: puts, deletes, an expired lease and garbage values reach its routing; a full
//! outage keeps the last set serving (errors counted), then resyncs; a killed leader costs
//! no request and later changes still arrive.

mod common;

use std::time::Duration;

use common::etcd::EtcdCluster;
use common::sources::{discovery_errors, gateway_without_consul, quoted};
use common::{Backend, Gateway, Load};

const WAIT: Duration = Duration::from_secs(15);

/// A gateway routing `/web` to the etcd service `web` (prefix `/services/web/`), its log in
/// the test's output; its Consul address is a port nothing listens on (no service uses Consul).
async fn gateway(cluster: &EtcdCluster) -> Gateway {
    common::log_to_test_output();
    let rest = format!(
        "etcd:\n  endpoints: [{}]\n  timeout: 1s\nservices:\n  - name: web\n    source: etcd\n    route: {{path_prefix: /web}}\n",
        quoted(&cluster.endpoints())
    );
    gateway_without_consul(&rest).await
}

/// A 3-member cluster, two backends with the first registered, and a gateway serving it.
async fn serving_web_1() -> (EtcdCluster, Vec<Backend>, Gateway) {
    let cluster = EtcdCluster::start(3).await;
    let backends = common::backends("web", 2).await;
    put(&cluster, &backends[0]).await;
    let gateway = gateway(&cluster).await;
    assert!(wait_for(&gateway, &["web-1"]).await.is_some());
    (cluster, backends, gateway)
}

fn key(id: &str) -> String {
    format!("/services/web/{id}")
}

/// Registers `backend` under its id, with the value `127.0.0.1:<port>`.
async fn put(cluster: &EtcdCluster, backend: &Backend) {
    cluster
        .put(&key(&backend.id), &format!("127.0.0.1:{}", backend.port))
        .await;
}

async fn wait_for(gateway: &Gateway, ids: &[&str]) -> Option<Duration> {
    let keys: Vec<String> = ids.iter().map(|id| key(id)).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    gateway.wait_for_instances("web", &keys, WAIT).await
}

async fn errors(gateway: &Gateway) -> f64 {
    discovery_errors(&gateway.admin_get("/metrics").await, "web")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_deletes_expired_leases_and_garbage_reach_the_gateway() {
    let cluster = EtcdCluster::start(3).await;
    let backends = common::backends("web", 3).await;
    // Listed at start: two instances (both value forms) and a garbage value, skipped.
    put(&cluster, &backends[0]).await;
    let second = format!("http://127.0.0.1:{}", backends[1].port);
    cluster.put(&key("web-2"), &second).await;
    cluster.put(&key("junk"), "not an address").await;
    cluster.put("/services/other/x", "127.0.0.1:9").await;
    let gateway = gateway(&cluster).await;
    assert!(wait_for(&gateway, &["web-1", "web-2"]).await.is_some());
    let (hits, failures) = gateway.spread("/web/x", 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        (hits.get("web-1"), hits.get("web-2")),
        (Some(&10), Some(&10))
    );

    // Watched: a put and a delete.
    put(&cluster, &backends[2]).await;
    let took = wait_for(&gateway, &["web-1", "web-2", "web-3"]).await;
    println!("etcd put -> gateway routing: {took:?}");
    assert!(took.is_some());
    cluster.delete(&key("web-1")).await;
    let took = wait_for(&gateway, &["web-2", "web-3"]).await;
    println!("etcd delete -> gateway routing: {took:?}");
    assert!(took.is_some());
    let (hits, failures) = gateway.spread("/web/x", 20).await;
    assert!(
        failures.is_empty() && !hits.contains_key("web-1"),
        "{hits:?} {failures:?}"
    );

    // A value rewritten to garbage drops that instance (and nothing panics).
    cluster.put(&key("web-2"), "{\"json\": true}").await;
    assert!(wait_for(&gateway, &["web-3"]).await.is_some());

    // A lease nobody keeps alive expires (TTL 2 s), and its key goes with it.
    let leased = format!("127.0.0.1:{}", backends[0].port);
    cluster.put_with_lease(&key("web-1"), &leased, 2).await;
    assert!(wait_for(&gateway, &["web-1", "web-3"]).await.is_some());
    let took = wait_for(&gateway, &["web-3"]).await;
    println!("etcd lease (TTL 2 s) granted -> removed from the gateway after {took:?}");
    assert!(took.is_some(), "the leased key stayed");
    assert_eq!(errors(&gateway).await, 0.0, "no failure while etcd was up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outage_keeps_serving_the_last_set_and_resyncs() {
    let (mut cluster, backends, gateway) = serving_web_1().await;

    let load = Load::start(gateway.url("/web/x"), 2);
    for i in 0..3 {
        cluster.kill(i);
    }
    // Each failed attempt is counted, and the last set keeps serving.
    let counted = common::wait_until(WAIT, || async { errors(&gateway).await >= 3.0 }).await;
    assert!(
        counted.is_some(),
        "errors counted: {}",
        errors(&gateway).await
    );
    let mut stats = load.finish().await;
    println!("etcd down: {}", stats.summary());
    stats.expect_no_failures("etcd cluster down");
    assert!(stats.ok > 0);

    for i in 0..3 {
        cluster.restart(i);
    }
    assert!(cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .is_some());
    put(&cluster, &backends[1]).await;
    let took = wait_for(&gateway, &["web-1", "web-2"]).await;
    println!("etcd back: a change after the restart in the gateway after {took:?}");
    assert!(took.is_some(), "no resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_costs_no_request_and_later_changes_arrive() {
    let (mut cluster, backends, gateway) = serving_web_1().await;

    let load = Load::start(gateway.url("/web/x"), 2);
    let leader = cluster.leader().await.expect("a leader");
    cluster.kill(leader);
    let new_leader = cluster.wait_for_leader(WAIT).await;
    assert!(new_leader.is_some_and(|l| l != leader), "no new leader");
    put(&cluster, &backends[1]).await;
    cluster.delete(&key("web-1")).await;
    let took = wait_for(&gateway, &["web-2"]).await;
    let failed = errors(&gateway).await;
    println!("etcd leader m{leader} killed: later changes in the gateway after {took:?}");
    println!("etcd leader m{leader} killed: {failed} failed discovery attempts");
    assert!(took.is_some(), "after the leader's death");
    let mut stats = load.finish().await;
    println!("etcd leader killed: {}", stats.summary());
    stats.expect_no_failures("etcd leader killed");
}

/// The member the gateway's watch goes through dies while the cluster keeps its leader:
/// crashed (SIGKILL: the kernel closes its sockets) or silent (SIGSTOP: nothing is closed and
/// nothing answers). Each time the watch must move to a live member after exactly one failed
/// attempt (the code before this test took 2-7: its retries kept landing on the dead member),
/// and the next change must be routed within `DEAD_MEMBER_BOUND` of the death: a silent death
/// is noticed by the watch's unanswered progress request, within 2 × `timeout` of the last
/// message (a SIGKILL at once); the bound leaves room for a loaded CI machine, the count is
/// the sharp check. Six deaths, alternating; the member is restarted and serving before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_holding_the_watch_dies_and_the_watch_moves_on() {
    const DEAD_MEMBER_BOUND: Duration = Duration::from_secs(8);
    let (mut cluster, backends, gateway) = serving_web_1().await;
    for death in 0..6 {
        let silent = death % 2 == 1;
        let (old, new) = (&backends[death % 2], &backends[(death + 1) % 2]);
        let member = cluster.wait_for_watching_member(WAIT).await;
        let member = member.expect("exactly one member serves the gateway's watch");
        cluster.make_follower(member, WAIT).await;
        let before = errors(&gateway).await;
        let died = std::time::Instant::now();
        if silent {
            cluster.pause(member);
        } else {
            cluster.kill(member);
        }
        put(&cluster, new).await;
        cluster.delete(&key(&old.id)).await;
        let routed = wait_for(&gateway, &[&new.id]).await.map(|_| died.elapsed());
        let failed = errors(&gateway).await - before;
        let how = if silent { "SIGSTOP" } else { "SIGKILL" };
        println!("watching member m{member} {how}: next change routed {routed:?} after");
        println!("watching member m{member} {how}: {failed} failed attempts");
        assert!(
            routed.is_some_and(|took| took < DEAD_MEMBER_BOUND),
            "m{member} {how}: next change routed {routed:?} after the death"
        );
        assert_eq!(
            failed, 1.0,
            "m{member} {how}: failed attempts before the move"
        );
        cluster.restart(member);
        let serving = cluster.wait_until_serving(member, WAIT).await;
        assert!(serving.is_some(), "m{member} did not rejoin");
    }
}
