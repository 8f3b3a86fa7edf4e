//! Balancing and propagation against a real `consul agent -dev`.

mod common;

use std::time::Duration;

use common::{Backend, Behavior, Consul, Gateway};

const SERVICES: &str = "services:
  - name: web
    route: {path_prefix: /web}
  - name: rnd
    route: {path_prefix: /rnd}
    balance: random
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact_and_random_uses_every_instance() {
    let consul = Consul::start().await;
    let backends = common::backends("web", 3).await;
    for b in &backends {
        consul.register("web", &b.id, b.port, &[]).await;
        consul
            .register("rnd", &format!("r{}", b.id), b.port, &[])
            .await;
    }
    let gateway = Gateway::start(&consul, SERVICES).await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2", "web-3"], Duration::from_secs(10))
        .await
        .is_some());
    assert!(gateway
        .wait_for_instances(
            "rnd",
            &["rweb-1", "rweb-2", "rweb-3"],
            Duration::from_secs(10)
        )
        .await
        .is_some());

    let (hits, failures) = gateway.spread("/web/x", 300).await;
    println!("round robin over 3 instances, 300 GETs: {hits:?}");
    assert!(failures.is_empty(), "{failures:?}");
    for b in &backends {
        let got = hits.get(&b.id).copied().unwrap_or(0);
        assert!(
            (99..=101).contains(&got),
            "{}: {got} of 300 ({hits:?})",
            b.id
        );
    }

    let before: Vec<usize> = backends.iter().map(Backend::hits).collect();
    let (hits, failures) = gateway.spread("/rnd/x", 300).await;
    println!("random over 3 instances, 300 GETs: {hits:?}");
    assert!(failures.is_empty(), "{failures:?}");
    for (b, before) in backends.iter().zip(before) {
        assert!(
            b.hits() > before,
            "{} got no random traffic: {hits:?}",
            b.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_deregistrations_and_failing_checks_propagate() {
    let consul = Consul::start().await;
    let backends = common::backends("web", 3).await;
    for b in &backends {
        consul.register_with_ttl("web", &b.id, b.port).await;
    }
    let gateway = Gateway::start(&consul, SERVICES).await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2", "web-3"], Duration::from_secs(10))
        .await
        .is_some());

    // A 4th instance gets traffic within 1 s of its registration.
    let fourth = Backend::start("web-4", Behavior::Ok).await;
    let registered = std::time::Instant::now();
    consul.register_with_ttl("web", "web-4", fourth.port).await;
    let seen = common::wait_until(Duration::from_secs(5), || async {
        gateway
            .get("/web")
            .await
            .headers()
            .get("x-instance")
            .is_some_and(|v| v == "web-4")
    })
    .await
    .map(|_| registered.elapsed());
    println!("registration -> first request on the new instance: {seen:?}");
    assert!(seen.is_some_and(|d| d < Duration::from_secs(1)), "{seen:?}");

    // Deregistered: out of the table within 1 s, and then no more traffic.
    let deregistered = std::time::Instant::now();
    consul.deregister("web-4").await;
    let gone = gateway
        .wait_for_instances("web", &["web-1", "web-2", "web-3"], Duration::from_secs(5))
        .await
        .map(|_| deregistered.elapsed());
    println!("deregistration -> table without it: {gone:?}");
    assert!(gone.is_some_and(|d| d < Duration::from_secs(1)), "{gone:?}");
    let hits_before = fourth.hits();
    let (hits, failures) = gateway.spread("/web", 30).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        fourth.hits(),
        hits_before,
        "deregistered instance still got traffic: {hits:?}"
    );

    // A check turning critical takes the instance out.
    let failed = std::time::Instant::now();
    consul.fail_check("web-3").await;
    let out = gateway
        .wait_for_instances("web", &["web-1", "web-2"], Duration::from_secs(5))
        .await
        .map(|_| failed.elapsed());
    println!("check critical -> table without it: {out:?}");
    assert!(out.is_some_and(|d| d < Duration::from_secs(1)), "{out:?}");
    let (hits, failures) = gateway.spread("/web", 30).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(!hits.contains_key("web-3"), "{hits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_outage_keeps_the_last_table_and_the_watch_resumes() {
    let mut consul = Consul::start().await;
    let backends = common::backends("web", 3).await;
    for b in &backends {
        consul.register("web", &b.id, b.port, &[]).await;
    }
    let gateway = Gateway::start(&consul, SERVICES).await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2", "web-3"], Duration::from_secs(10))
        .await
        .is_some());

    consul.stop();
    let (hits, failures) = gateway.spread("/web", 300).await;
    println!("Consul down, 300 GETs: {hits:?}, failures {failures:?}");
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(hits.len(), 3, "{hits:?}");
    assert_eq!(
        gateway.instances("web").await.len(),
        3,
        "table kept while Consul is down"
    );

    // A fresh agent (its index starts over, lower than before) with a changed set.
    consul.restart().await;
    let fourth = Backend::start("web-4", Behavior::Ok).await;
    for b in backends.iter().chain([&fourth]) {
        consul.register("web", &b.id, b.port, &[]).await;
    }
    let resumed = gateway
        .wait_for_instances(
            "web",
            &["web-1", "web-2", "web-3", "web-4"],
            Duration::from_secs(15),
        )
        .await;
    println!("Consul back -> change applied after {resumed:?}");
    assert!(resumed.is_some());
    let (hits, failures) = gateway.spread("/web", 40).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(hits.get("web-4"), Some(&10), "{hits:?}");
}
