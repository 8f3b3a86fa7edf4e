//! Catalog mode (two change detectors + targeted fetches) against a real Consul: the same
//! propagation guarantees as one blocking query per service. Also the hybrid (`auto` with
//! more services than connections): some services with a blocking query of their own, the
//! rest in catalog mode, and reloads that move services between the two.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Behavior, Consul, Gateway};

const SERVICES: &str = "services:
  - name: web
  - name: api
  - name: quiet
";

async fn gateway(consul: &Consul) -> Gateway {
    Gateway::start_with(
        &[consul.url()],
        "  watch: catalog\n  max_connections: 4\n",
        SERVICES,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_with_and_without_checks_propagate() {
    let consul = Consul::start().await;
    let backends = [
        Backend::start("web-1", Behavior::Ok).await,
        Backend::start("web-2", Behavior::Ok).await,
        Backend::start("api-1", Behavior::Ok).await,
    ];
    consul
        .register_with_ttl("web", "web-1", backends[0].port)
        .await;
    consul.register("api", "api-1", backends[2].port, &[]).await;
    let gateway = gateway(&consul).await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());
    assert!(gateway
        .wait_for_instances("api", &["api-1"], Duration::from_secs(10))
        .await
        .is_some());

    // Speed is the propagation bench's business; here only that each change arrives.
    let timed = |what: &'static str, took: Option<Duration>| {
        println!("catalog mode: {what}: {took:?}");
        assert!(took.is_some(), "{what}: never reached the table");
    };

    // With a check: attributed through /v1/health/state/any.
    let start = Instant::now();
    consul
        .register_with_ttl("web", "web-2", backends[1].port)
        .await;
    let took = gateway
        .wait_for_instances("web", &["web-1", "web-2"], Duration::from_secs(5))
        .await;
    timed("register with check", took.map(|_| start.elapsed()));

    let start = Instant::now();
    consul.fail_check("web-1").await;
    let took = gateway
        .wait_for_instances("web", &["web-2"], Duration::from_secs(5))
        .await;
    timed("check critical", took.map(|_| start.elapsed()));

    // Without checks: only /v1/catalog/services sees it, and a sweep finds it.
    let start = Instant::now();
    consul.register("api", "api-2", backends[1].port, &[]).await;
    let took = gateway
        .wait_for_instances("api", &["api-1", "api-2"], Duration::from_secs(5))
        .await;
    timed("register without check", took.map(|_| start.elapsed()));

    let start = Instant::now();
    consul.deregister("api-1").await;
    let took = gateway
        .wait_for_instances("api", &["api-2"], Duration::from_secs(5))
        .await;
    timed("deregister without check", took.map(|_| start.elapsed()));

    let start = Instant::now();
    consul.deregister("web-2").await;
    let took = gateway
        .wait_for_instances("web", &[], Duration::from_secs(5))
        .await;
    timed("deregister with check", took.map(|_| start.elapsed()));

    let response = gateway.get("/api").await;
    assert_eq!(response.status(), 200);
    assert_eq!(gateway.get("/web").await.status(), 503);
    let client = common::http_client();
    let ready = client
        .get(gateway.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "a service with no instances is synced, not stale"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_mode_survives_a_consul_outage() {
    let mut consul = Consul::start().await;
    let backend = Backend::start("web-1", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    let gateway = gateway(&consul).await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());
    consul.stop();
    let (hits, failures) = gateway.spread("/web", 50).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(hits.get("web-1"), Some(&50));
    consul.restart().await;
    let backend2 = Backend::start("web-2", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    consul.register("web", "web-2", backend2.port, &[]).await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2"], Duration::from_secs(10))
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_restarts_the_coordinator_and_keeps_tables() {
    let consul = Consul::start().await;
    let web = Backend::start("web-1", Behavior::Ok).await;
    let api = Backend::start("api-1", Behavior::Ok).await;
    consul.register_with_ttl("web", "web-1", web.port).await;
    consul.register_with_ttl("api", "api-1", api.port).await;
    let gateway = gateway(&consul).await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());
    assert_eq!(gateway.get("/other").await.status(), 404);

    // Add a service routed at /other and change web's balance: the coordinator restarts.
    let mut next = gateway.config.clone();
    let yaml = format!(
        "consul:\n  address: {}\n  watch: catalog\n  max_connections: 4\nservices:\n  - name: web\n    balance: random\n  - name: api\n    route: {{path_prefix: /other}}\n",
        consul.url()
    );
    let reloaded = switchyard::Config::from_yaml(&yaml, &Default::default()).unwrap();
    next.services = reloaded.services;
    gateway.reload.send(next).await.unwrap();
    let routed = common::wait_until(Duration::from_secs(5), || async {
        gateway
            .get("/other")
            .await
            .headers()
            .get("x-instance")
            .is_some_and(|v| v == "api-1")
    })
    .await;
    assert!(routed.is_some(), "the added service was not routed");
    // web's table carried over (no 503 gap) and changes still propagate after the restart.
    assert_eq!(gateway.get("/web").await.status(), 200);
    let start = Instant::now();
    consul.fail_check("web-1").await;
    let took = gateway
        .wait_for_instances("web", &[], Duration::from_secs(5))
        .await;
    println!(
        "catalog mode after reload: check critical -> {:?}",
        took.map(|_| start.elapsed())
    );
    assert!(took.is_some());
}

/// `auto` at `max_connections: 15`: the first 15 - 13 (catalog mode's share and the idle
/// connections) = 2 services of the config get a blocking query of their own, the other 12
/// are watched in catalog mode.
const HYBRID_CONSUL: &str = "  watch: auto\n  max_connections: 15\n";

/// `first` and `last` with twelve instance-less services between them: 14 services, more
/// than fit in 15 connections beside the 2 idle ones.
fn hybrid_services(first: &str, last: &str) -> String {
    let mut yaml = format!("services:\n  - name: {first}\n");
    for n in 0..12 {
        yaml.push_str(&format!("  - name: filler{n}\n"));
    }
    yaml.push_str(&format!("  - name: {last}\n"));
    yaml
}

#[test]
fn hybrid_split_is_what_the_tests_assume() {
    let yaml = format!("consul:\n{HYBRID_CONSUL}{}", hybrid_services("web", "api"));
    let config = switchyard::Config::from_yaml(&yaml, &Default::default()).unwrap();
    assert_eq!(
        switchyard::discovery::consul::per_service_share(&config.consul, config.services.len()),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_changes_reach_tables_watched_either_way() {
    let consul = Consul::start().await;
    let backends = common::backends("b", 4).await;
    consul
        .register_with_ttl("web", "web-1", backends[0].port)
        .await;
    consul
        .register_with_ttl("api", "api-1", backends[1].port)
        .await;
    // web: a blocking query of its own; api: catalog mode.
    let gateway = Gateway::start_with(
        &[consul.url()],
        HYBRID_CONSUL,
        &hybrid_services("web", "api"),
    )
    .await;
    for (service, id) in [("web", "web-1"), ("api", "api-1")] {
        let found = gateway
            .wait_for_instances(service, &[id], Duration::from_secs(10))
            .await;
        assert!(found.is_some(), "{service}: {id} never listed");
    }
    for (service, port) in [("web", backends[2].port), ("api", backends[3].port)] {
        let first = format!("{service}-1");
        let second = format!("{service}-2");
        consul.register_with_ttl(service, &second, port).await;
        let both = gateway
            .wait_for_instances(service, &[&first, &second], Duration::from_secs(10))
            .await;
        assert!(both.is_some(), "{service}: registration not applied");
        consul.fail_check(&first).await;
        let failed = gateway
            .wait_for_instances(service, &[&second], Duration::from_secs(10))
            .await;
        assert!(failed.is_some(), "{service}: critical check not applied");
        consul.deregister(&second).await;
        let gone = gateway
            .wait_for_instances(service, &[], Duration::from_secs(10))
            .await;
        assert!(gone.is_some(), "{service}: deregistration not applied");
    }
    let ready = common::http_client()
        .get(gateway.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "every service, watched either way, is synced"
    );
    // The split, as an operator sees it.
    let text = gateway.admin_get("/metrics").await;
    let watched = |mode: &str| {
        let series = format!("switchyard_consul_watched_services{{mode=\"{mode}\",set=\"file\"}}");
        common::metric(&text, &series)
    };
    assert_eq!((watched("per_service"), watched("catalog")), (2.0, 12.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_reload_moving_services_between_sets_keeps_serving() {
    let consul = Consul::start().await;
    let backends = common::backends("b", 4).await;
    consul
        .register_with_ttl("web", "web-1", backends[0].port)
        .await;
    consul
        .register_with_ttl("api", "api-1", backends[1].port)
        .await;
    let gateway = Gateway::start_with(
        &[consul.url()],
        HYBRID_CONSUL,
        &hybrid_services("web", "api"),
    )
    .await;
    for (service, id) in [("web", "web-1"), ("api", "api-1")] {
        let found = gateway
            .wait_for_instances(service, &[id], Duration::from_secs(10))
            .await;
        assert!(found.is_some(), "{service}: {id} never listed");
    }

    // The same services in another order: web moves to catalog mode, api to a query of its own.
    let mut next = gateway.config.clone();
    let yaml = format!(
        "consul:\n  address: {}\n{HYBRID_CONSUL}{}",
        consul.url(),
        hybrid_services("api", "web")
    );
    next.services = switchyard::Config::from_yaml(&yaml, &Default::default())
        .unwrap()
        .services;
    gateway.reload.send(next).await.unwrap();
    for path in ["/web", "/api"] {
        let (hits, failures) = gateway.spread(path, 20).await;
        assert!(failures.is_empty(), "{path} during the move: {failures:?}");
        assert_eq!(hits.values().sum::<usize>(), 20, "{path}: {hits:?}");
    }
    // Each keeps following Consul from its new watch.
    for (service, port) in [("web", backends[2].port), ("api", backends[3].port)] {
        let first = format!("{service}-1");
        let second = format!("{service}-2");
        consul.register_with_ttl(service, &second, port).await;
        let both = gateway
            .wait_for_instances(service, &[&first, &second], Duration::from_secs(10))
            .await;
        assert!(
            both.is_some(),
            "{service}: registration after the move not applied"
        );
        consul.fail_check(&first).await;
        let failed = gateway
            .wait_for_instances(service, &[&second], Duration::from_secs(10))
            .await;
        assert!(
            failed.is_some(),
            "{service}: check after the move not applied"
        );
    }
}
