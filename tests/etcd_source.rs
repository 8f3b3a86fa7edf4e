//! `source: etcd` against a real 3-member etcd cluster on loopback ports: puts, deletes, an
//! expired lease and garbage values reach the table; a full outage keeps the last set and
//! counts errors, then resyncs; a killed leader changes nothing the table shows.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::etcd::EtcdCluster;
use common::follow::Followed;
use switchyard::discovery::etcd::{EtcdSettings, EtcdSource};

const SERVICES: &str = "services:
  - name: web
    source: etcd
    route: {path_prefix: /web}
";

/// A source with a 1 s timeout and a short backoff, so drills resolve in seconds.
fn source(cluster: &EtcdCluster) -> Arc<EtcdSource> {
    Arc::new(EtcdSource::new(EtcdSettings {
        endpoints: cluster.endpoints(),
        timeout: Duration::from_secs(1),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
    }))
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_deletes_expired_leases_and_garbage_reach_the_table() {
    let cluster = EtcdCluster::start(3).await;
    // Listed at start: two instances (both value forms) and a garbage value, skipped.
    cluster.put("/services/web/a", "127.0.0.1:9001").await;
    cluster
        .put("/services/web/b", "http://127.0.0.1:9002")
        .await;
    cluster.put("/services/web/junk", "not an address").await;
    cluster.put("/services/other/x", "127.0.0.1:9009").await;
    let followed = Followed::start(source(&cluster), SERVICES);
    let took = followed
        .wait_for(&["/services/web/a", "/services/web/b"], WAIT)
        .await;
    assert!(took.is_some(), "listed set: {:?}", followed.ids());
    assert_eq!(followed.authorities(), ["127.0.0.1:9001", "127.0.0.1:9002"]);

    // Watched: a put and a delete.
    cluster.put("/services/web/c", "127.0.0.1:9003").await;
    let took = followed
        .wait_for(
            &["/services/web/a", "/services/web/b", "/services/web/c"],
            WAIT,
        )
        .await;
    println!("etcd put -> table: {took:?}");
    assert!(took.is_some(), "after a put: {:?}", followed.ids());
    cluster.delete("/services/web/a").await;
    let took = followed
        .wait_for(&["/services/web/b", "/services/web/c"], WAIT)
        .await;
    println!("etcd delete -> table: {took:?}");
    assert!(took.is_some(), "after a delete: {:?}", followed.ids());

    // A value rewritten to garbage drops that instance (and nothing panics).
    cluster.put("/services/web/b", "{\"json\": true}").await;
    assert!(followed
        .wait_for(&["/services/web/c"], WAIT)
        .await
        .is_some());

    // A lease nobody keeps alive expires (TTL 2 s; etcd revokes within about a second
    // more), and its key goes with it.
    cluster
        .put_with_lease("/services/web/leased", "127.0.0.1:9004", 2)
        .await;
    let both = ["/services/web/c", "/services/web/leased"];
    assert!(
        followed.wait_for(&both, WAIT).await.is_some(),
        "{:?}",
        followed.ids()
    );
    let took = followed.wait_for(&["/services/web/c"], WAIT).await;
    println!("etcd lease (TTL 2 s) put -> removed from the table: {took:?}");
    assert!(
        took.is_some(),
        "the leased key stayed: {:?}",
        followed.ids()
    );
    assert_eq!(followed.errors(), 0.0, "no failure while etcd was up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outage_keeps_the_last_set_and_resyncs() {
    let mut cluster = EtcdCluster::start(3).await;
    cluster.put("/services/web/a", "127.0.0.1:9001").await;
    let followed = Followed::start(source(&cluster), SERVICES);
    assert!(followed
        .wait_for(&["/services/web/a"], WAIT)
        .await
        .is_some());

    for i in 0..3 {
        cluster.kill(i);
    }
    // Errors are counted (each failed attempt), and the table is left as it was.
    let counted = common::wait_until(WAIT, || async { followed.errors() >= 3.0 }).await;
    assert!(counted.is_some(), "errors counted: {}", followed.errors());
    assert_eq!(followed.ids(), ["/services/web/a"]);

    for i in 0..3 {
        cluster.restart(i);
    }
    assert!(cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .is_some());
    cluster.put("/services/web/b", "127.0.0.1:9002").await;
    let took = followed
        .wait_for(
            &["/services/web/a", "/services/web/b"],
            Duration::from_secs(20),
        )
        .await;
    println!("etcd back: change after the restart in the table after {took:?}");
    assert!(took.is_some(), "no resync: {:?}", followed.ids());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_keeps_the_set_and_later_changes_arrive() {
    let mut cluster = EtcdCluster::start(3).await;
    cluster.put("/services/web/a", "127.0.0.1:9001").await;
    let followed = Followed::start(source(&cluster), SERVICES);
    assert!(followed
        .wait_for(&["/services/web/a"], WAIT)
        .await
        .is_some());

    let leader = cluster.leader().await.expect("a leader");
    cluster.kill(leader);
    assert_eq!(followed.ids(), ["/services/web/a"]);
    let new_leader = cluster.wait_for_leader(WAIT).await;
    assert!(new_leader.is_some_and(|l| l != leader), "no new leader");

    cluster.put("/services/web/b", "127.0.0.1:9002").await;
    cluster.delete("/services/web/a").await;
    let took = followed.wait_for(&["/services/web/b"], WAIT).await;
    println!("etcd leader m{leader} killed: later changes in the table after {took:?}");
    assert!(
        took.is_some(),
        "after the leader's death: {:?}",
        followed.ids()
    );
}
