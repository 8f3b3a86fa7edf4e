//! `source: zookeeper` against a real 3-server ZooKeeper ensemble on loopback ports: a path
//! created late, ephemeral sequential children, a registrar's session closing and garbage
//! data reach the table; a full outage keeps the last set and counts errors, then resyncs
//! on a new session; a killed leader changes nothing the table shows.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::follow::Followed;
use common::zookeeper::{register, ZookeeperEnsemble};
use switchyard::discovery::zookeeper::{ZookeeperSettings, ZookeeperSource};

const SERVICES: &str = "services:
  - name: web
    source: zookeeper
    route: {path_prefix: /web}
";

const PATH: &str = "/services/web";
const WAIT: Duration = Duration::from_secs(15);
/// The source's and the registrars' session timeout: short, so expiry drills take seconds.
const SESSION: Duration = Duration::from_secs(2);

fn source(ensemble: &ZookeeperEnsemble) -> Arc<ZookeeperSource> {
    Arc::new(ZookeeperSource::new(ZookeeperSettings {
        servers: ensemble.servers(),
        session_timeout: SESSION,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
    }))
}

/// Waits until the table's authorities are exactly `want`.
async fn wait_for_authorities(followed: &Followed, want: &[&str]) -> Option<Duration> {
    common::wait_until(WAIT, || async { followed.authorities() == want }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_sessions_and_garbage_reach_the_table() {
    let ensemble = ZookeeperEnsemble::start(3).await;
    // The path does not exist yet: the source waits on it, without failing.
    let followed = Followed::start(source(&ensemble), SERVICES);
    let synced = common::wait_until(WAIT, || async { followed.upstream.sync.is_synced() }).await;
    assert!(
        synced.is_some(),
        "a missing path is an empty set, not a failure"
    );
    assert!(followed.ids().is_empty());

    let first = ensemble.session(SESSION).await;
    let a = register(&first, PATH, "127.0.0.1:9001").await;
    let took = wait_for_authorities(&followed, &["127.0.0.1:9001"]).await;
    println!("zookeeper path created with a child -> table: {took:?}");
    assert!(took.is_some(), "{:?}", followed.ids());
    assert_eq!(followed.ids(), std::slice::from_ref(&a));

    let second = ensemble.session(SESSION).await;
    register(&second, PATH, "http://127.0.0.1:9002").await;
    register(&second, PATH, "garbage").await;
    let took = wait_for_authorities(&followed, &["127.0.0.1:9001", "127.0.0.1:9002"]).await;
    println!("zookeeper child added -> table: {took:?}");
    assert!(took.is_some(), "{:?}", followed.authorities());

    // The second registrar goes away: its ephemeral nodes go with its session.
    drop(second);
    let took = wait_for_authorities(&followed, &["127.0.0.1:9001"]).await;
    println!("zookeeper registrar session closed -> removed from the table: {took:?}");
    assert!(took.is_some(), "{:?}", followed.authorities());

    first.delete(&a, None).await.expect("deleting a node");
    assert!(wait_for_authorities(&followed, &[]).await.is_some());
    assert_eq!(followed.errors(), 0.0, "no failure while ZooKeeper was up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outage_keeps_the_last_set_and_resyncs() {
    let mut ensemble = ZookeeperEnsemble::start(3).await;
    let registrar = ensemble.session(Duration::from_secs(30)).await;
    register(&registrar, PATH, "127.0.0.1:9001").await;
    let followed = Followed::start(source(&ensemble), SERVICES);
    assert!(wait_for_authorities(&followed, &["127.0.0.1:9001"])
        .await
        .is_some());

    for i in 0..3 {
        ensemble.kill(i);
    }
    // Disconnected, then the session expires on the client side and new sessions fail:
    // each is counted, and the table is left as it was.
    let counted = common::wait_until(WAIT, || async { followed.errors() >= 3.0 }).await;
    assert!(counted.is_some(), "errors counted: {}", followed.errors());
    assert_eq!(followed.authorities(), ["127.0.0.1:9001"]);

    for i in 0..3 {
        ensemble.restart(i);
    }
    assert!(ensemble
        .wait_for_leader(Duration::from_secs(60))
        .await
        .is_some());
    let later = ensemble.session(SESSION).await;
    register(&later, PATH, "127.0.0.1:9002").await;
    let took = common::wait_until(Duration::from_secs(30), || async {
        followed
            .authorities()
            .contains(&"127.0.0.1:9002".to_owned())
    })
    .await;
    println!("zookeeper back: a registration after the restart in the table after {took:?}");
    assert!(took.is_some(), "no resync: {:?}", followed.authorities());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_keeps_the_set_and_later_changes_arrive() {
    let mut ensemble = ZookeeperEnsemble::start(3).await;
    let registrar = ensemble.session(Duration::from_secs(30)).await;
    register(&registrar, PATH, "127.0.0.1:9001").await;
    let followed = Followed::start(source(&ensemble), SERVICES);
    assert!(wait_for_authorities(&followed, &["127.0.0.1:9001"])
        .await
        .is_some());

    let leader = ensemble.leader().await.expect("a leader");
    ensemble.kill(leader);
    assert_eq!(followed.authorities(), ["127.0.0.1:9001"]);
    let new_leader = ensemble.wait_for_leader(Duration::from_secs(30)).await;
    assert!(new_leader.is_some_and(|l| l != leader), "no new leader");

    let later = ensemble.session(SESSION).await;
    register(&later, PATH, "127.0.0.1:9002").await;
    let took = common::wait_until(WAIT, || async {
        followed
            .authorities()
            .contains(&"127.0.0.1:9002".to_owned())
    })
    .await;
    println!(
        "zookeeper leader {} killed: a later registration in the table after {took:?}",
        leader + 1
    );
    assert!(
        took.is_some(),
        "after the leader's death: {:?}",
        followed.authorities()
    );
    assert!(followed
        .authorities()
        .contains(&"127.0.0.1:9001".to_owned()));
}
