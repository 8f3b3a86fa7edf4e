//! Reliability drills: each runs a real failure under load and prints its figures
//! (failed / total, p99). All traffic stays on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Behavior, Consul, ConsulCluster, Gateway, Load};

const LOAD_CONCURRENCY: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_backend_crash_under_load() {
    let consul = Consul::start().await;
    let mut backends = vec![
        Backend::start("web-1", Behavior::Ok).await,
        Backend::start("web-2", Behavior::Ok).await,
        Backend::start("web-3", Behavior::Ok).await,
    ];
    for b in &backends {
        consul.register_with_ttl("web", &b.id, b.port).await;
    }
    let gateway = Gateway::start(&consul, "services:\n  - name: web\n").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2", "web-3"], Duration::from_secs(10))
        .await
        .is_some());

    let load = Load::start(gateway.url("/web"), LOAD_CONCURRENCY);
    tokio::time::sleep(Duration::from_secs(3)).await;
    backends[2].kill(); // its Consul check still says passing
    let killed = Instant::now();
    let client = common::http_client();
    let ejected = common::wait_until(Duration::from_secs(3), || async {
        let routes: serde_json::Value = client
            .get(gateway.admin_url("/routes"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        routes["services"][0]["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["id"] == "web-3" && i["ejected_for_seconds"].is_number())
    })
    .await;
    println!(
        "crash -> ejected after {:?}",
        ejected.map(|_| killed.elapsed())
    );
    assert!(ejected.is_some(), "the crashed instance was not ejected");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Consul's check catches up: the instance leaves the table.
    consul.fail_check("web-3").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2"], Duration::from_secs(5))
        .await
        .is_some());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut stats = load.finish().await;
    println!(
        "drill backend crash: {} {:?}",
        stats.summary(),
        stats.by_instance
    );
    assert!(
        stats.failures.is_empty(),
        "{:?}",
        &stats.failures[..stats.failures.len().min(10)]
    );
    assert!(stats.total() > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_rolling_deploy_under_load() {
    let consul = Consul::start().await;
    let mut backends = vec![
        Backend::start("web-1", Behavior::Ok).await,
        Backend::start("web-2", Behavior::Ok).await,
        Backend::start("web-3", Behavior::Ok).await,
    ];
    for b in &backends {
        consul.register("web", &b.id, b.port, &[]).await;
    }
    let gateway = Gateway::start(&consul, "services:\n  - name: web\n").await;
    let all = ["web-1", "web-2", "web-3"];
    assert!(gateway
        .wait_for_instances("web", &all, Duration::from_secs(10))
        .await
        .is_some());

    let load = Load::start(gateway.url("/web"), LOAD_CONCURRENCY);
    for backend in backends.iter_mut() {
        let id = backend.id.clone();
        let others: Vec<&str> = all.iter().copied().filter(|other| *other != id).collect();
        // 1. Deregister, and wait until the gateway stops sending new requests.
        consul.deregister(&id).await;
        assert!(gateway
            .wait_for_instances("web", &others, Duration::from_secs(5))
            .await
            .is_some());
        // 2. Stop once in-flight requests are done; 3. start the new version.
        backend.stop_gracefully().await;
        backend.restart().await;
        // 4. Register again and wait until it is back in rotation.
        consul.register("web", &id, backend.port, &[]).await;
        assert!(gateway
            .wait_for_instances("web", &all, Duration::from_secs(5))
            .await
            .is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut stats = load.finish().await;
    println!(
        "drill rolling deploy: {} {:?}",
        stats.summary(),
        stats.by_instance
    );
    assert!(
        stats.failures.is_empty(),
        "{:?}",
        &stats.failures[..stats.failures.len().min(10)]
    );
    assert!(
        backends.iter().all(|b| b.hits() > 0),
        "every restarted instance served again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_consul_leader_killed_under_load() {
    let mut cluster = ConsulCluster::start(3).await;
    let backends = [
        Backend::start("web-1", Behavior::Ok).await,
        Backend::start("web-2", Behavior::Ok).await,
        Backend::start("web-3", Behavior::Ok).await,
    ];
    for b in &backends[..2] {
        cluster.register("web", &b.id, b.port).await;
    }
    let gateway = Gateway::start_with(&cluster.urls(), "", "services:\n  - name: web\n").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2"], Duration::from_secs(15))
        .await
        .is_some());

    let load = Load::start(gateway.url("/web"), LOAD_CONCURRENCY);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = cluster.leader().await.expect("a leader");
    cluster.kill(leader);
    let killed = Instant::now();
    let new_leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .expect("a new leader");
    println!(
        "leader {leader} killed; server {new_leader} elected after {:?}",
        killed.elapsed()
    );
    assert_ne!(leader, new_leader);

    // A change made after the election reaches the gateway within 5 s.
    cluster.register("web", "web-3", backends[2].port).await;
    let registered = Instant::now();
    let applied = gateway
        .wait_for_instances("web", &["web-1", "web-2", "web-3"], Duration::from_secs(5))
        .await
        .map(|_| registered.elapsed());
    println!("change after election applied in {applied:?}");
    assert!(applied.is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stats = load.finish().await;
    println!(
        "drill consul leader kill: {} {:?}",
        stats.summary(),
        stats.by_instance
    );
    assert!(
        stats.failures.is_empty(),
        "{:?}",
        &stats.failures[..stats.failures.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_consul_restart_and_long_outage() {
    let mut cluster = ConsulCluster::start(1).await;
    let backends = [
        Backend::start("web-1", Behavior::Ok).await,
        Backend::start("web-2", Behavior::Ok).await,
        Backend::start("web-3", Behavior::Ok).await,
    ];
    for b in &backends {
        cluster.register("web", &b.id, b.port).await;
    }
    let gateway = Gateway::start_with(
        &cluster.urls(),
        "  stale_after: 3s\n",
        "services:\n  - name: web\n",
    )
    .await;
    let all = ["web-1", "web-2", "web-3"];
    assert!(gateway
        .wait_for_instances("web", &all, Duration::from_secs(15))
        .await
        .is_some());
    let client = common::http_client();
    let readyz = || async {
        client
            .get(gateway.admin_url("/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(readyz().await, 200);

    let load = Load::start(gateway.url("/web"), LOAD_CONCURRENCY);
    cluster.kill(0);
    let down = Instant::now();
    let unready =
        common::wait_until(Duration::from_secs(10), || async { readyz().await == 503 }).await;
    println!("Consul down -> /readyz 503 after {unready:?} (stale_after 3s)");
    assert!(
        unready.is_some_and(|d| d >= Duration::from_secs(3)),
        "{unready:?}"
    );
    let outage = Duration::from_secs(30);
    tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
    assert_eq!(
        gateway.instances("web").await.len(),
        3,
        "the table survives the outage"
    );

    cluster.restart(0);
    let back = Instant::now();
    let ready =
        common::wait_until(Duration::from_secs(30), || async { readyz().await == 200 }).await;
    println!(
        "Consul back -> /readyz 200 after {:?}",
        ready.map(|_| back.elapsed())
    );
    assert!(ready.is_some());
    let mut stats = load.finish().await;
    println!(
        "drill consul 30 s outage: {} {:?}",
        stats.summary(),
        stats.by_instance
    );
    assert!(
        stats.failures.is_empty(),
        "{:?}",
        &stats.failures[..stats.failures.len().min(10)]
    );
    assert_eq!(stats.by_instance.len(), 3);
}
