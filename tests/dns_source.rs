//! `source: dns` against Consul's own DNS interface (SRV answers for `<name>.service.consul`,
//! with the targets' A records in the additional section): instances are routed, a
//! deregistered one goes at the next refresh, an unknown name is an empty set (503), and a
//! DNS server that stops answering keeps the last set, counts errors and turns `/readyz` 503.

mod common;

use std::time::{Duration, Instant};

use common::{Consul, Gateway};

const WAIT: Duration = Duration::from_secs(10);

/// A gateway whose `web` and `ghost` come from `consul`'s DNS interface.
async fn dns_gateway(consul: &Consul) -> Gateway {
    let rest = format!(
        "dns:\n  servers: [\"{}\"]\n  refresh: 200ms\n  timeout: 500ms\nservices:
  - name: web
    source: dns
    route: {{path_prefix: /web}}
  - name: ghost
    source: dns
    dns_name: ghost.service.consul
    route: {{path_prefix: /ghost}}\n",
        consul.dns_addr()
    );
    Gateway::start_with(&[consul.url()], "  stale_after: 2s\n", &rest).await
}

/// The ports of `service`'s instances in the gateway's table.
async fn ports(gateway: &Gateway, service: &str) -> Vec<u16> {
    let mut ports: Vec<u16> = gateway
        .instance_entries(service)
        .await
        .iter()
        .filter_map(|i| i["port"].as_u64())
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    ports.sort();
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_are_routed_and_follow_deregistration() {
    let consul = Consul::start().await;
    let backends = common::backends("web", 2).await;
    for b in &backends {
        consul.register("web", &b.id, b.port, &[]).await;
    }
    let gateway = dns_gateway(&consul).await;
    let mut both: Vec<u16> = backends.iter().map(|b| b.port).collect();
    both.sort();
    let found = common::wait_until(WAIT, || async { ports(&gateway, "web").await == both }).await;
    assert!(found.is_some(), "the SRV set never reached the table");
    let (hits, failures) = gateway.spread("/web/x", 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(hits.len(), 2, "both instances get traffic: {hits:?}");
    let routes = gateway.admin_get("/routes").await;
    assert!(routes.contains("\"source\": \"dns\""), "{routes}");

    let started = Instant::now();
    consul.deregister(&backends[0].id).await;
    let gone = common::wait_until(WAIT, || async {
        ports(&gateway, "web").await == [backends[1].port]
    })
    .await;
    println!(
        "DNS SRV: deregistration -> out of the table in {:?} (dns.refresh 200ms)",
        started.elapsed()
    );
    assert!(gone.is_some(), "the deregistered instance stayed");

    // Propagation over repeated changes: a poll, so each change waits for the next refresh.
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let started = Instant::now();
        consul
            .register("web", &backends[0].id, backends[0].port, &[])
            .await;
        let ok = common::wait_until(WAIT, || async { ports(&gateway, "web").await == both }).await;
        assert!(ok.is_some());
        added.push(started.elapsed());
        let started = Instant::now();
        consul.deregister(&backends[0].id).await;
        let ok = common::wait_until(WAIT, || async {
            ports(&gateway, "web").await == [backends[1].port]
        })
        .await;
        assert!(ok.is_some());
        removed.push(started.elapsed());
    }
    added.sort();
    removed.sort();
    println!(
        "DNS SRV, 10 changes each (dns.refresh 200ms): add p50 {:?} max {:?}; remove p50 {:?} max {:?}",
        added[5], added[9], removed[5], removed[9]
    );

    // NXDOMAIN is an answer: an empty table, 503 at once, and the service counts as synced.
    let response = gateway.get("/ghost/x").await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        common::header_or(response.headers(), "x-switchyard-error", ""),
        "no-healthy-instance"
    );
    let metrics = gateway.admin_get("/metrics").await;
    let errors = r#"switchyard_discovery_errors_total{service="ghost",source="dns"}"#;
    assert_eq!(common::metric(&metrics, errors), 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_outage_keeps_the_last_set_and_turns_readiness_off() {
    let mut consul = Consul::start().await;
    let backends = common::backends("web", 2).await;
    for b in &backends {
        consul.register("web", &b.id, b.port, &[]).await;
    }
    consul.register("ghost", "g-1", backends[0].port, &[]).await;
    let gateway = dns_gateway(&consul).await;
    let ready = common::wait_until(WAIT, || async {
        gateway.admin_get("/readyz").await.starts_with("ready")
            && ports(&gateway, "web").await.len() == 2
    })
    .await;
    assert!(ready.is_some(), "{}", gateway.admin_get("/readyz").await);

    consul.stop();
    let started = Instant::now();
    let unready = common::wait_until(WAIT, || async {
        gateway.admin_get("/readyz").await.starts_with("not ready")
    })
    .await;
    println!(
        "DNS server down -> /readyz 503 after {:?} (stale_after 2s)",
        started.elapsed()
    );
    assert!(unready.is_some(), "/readyz stayed ready with DNS down");
    let readyz = gateway.admin_get("/readyz").await;
    assert!(readyz.contains("web: dns failing for"), "{readyz}");
    assert_eq!(
        ports(&gateway, "web").await.len(),
        2,
        "the last set keeps serving"
    );
    let (_, failures) = gateway.spread("/web/x", 10).await;
    assert!(failures.is_empty(), "{failures:?}");
    let metrics = gateway.admin_get("/metrics").await;
    let errors = r#"switchyard_discovery_errors_total{service="web",source="dns"}"#;
    assert!(common::metric(&metrics, errors) >= 2.0, "{metrics}");
}

/// `dns` applies on reload: a gateway pointed at a dead resolver follows the reloaded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_dns_section_takes_effect_without_a_restart() {
    let consul = Consul::start().await;
    let backends = common::backends("web", 1).await;
    consul.register("web", "web-1", backends[0].port, &[]).await;
    let dead = format!("127.0.0.1:{}", common::free_port());
    let yaml = |server: &str| {
        format!(
            "consul:\n  address: [{}]\ndns:\n  servers: [\"{server}\"]\n  refresh: 200ms\n  timeout: 300ms\nservices:\n  - name: web\n    source: dns\n",
            consul.url()
        )
    };
    let config = |server: &str| {
        switchyard::Config::from_yaml(&yaml(server), &Default::default()).expect("valid")
    };
    let gateway = Gateway::start_config(config(&dead)).await;
    // The dead resolver has been asked (and failed) before anything is checked.
    let errors = r#"switchyard_discovery_errors_total{service="web",source="dns"}"#;
    let failed = common::wait_until(WAIT, || async {
        common::metric(&gateway.admin_get("/metrics").await, errors) >= 1.0
    })
    .await;
    assert!(failed.is_some(), "no lookup of the dead resolver failed");
    assert!(ports(&gateway, "web").await.is_empty());
    assert!(gateway
        .admin_get("/readyz")
        .await
        .contains("web: no dns answer yet"));
    gateway
        .reload
        .send(config(&consul.dns_addr()))
        .await
        .unwrap();
    let found = common::wait_until(WAIT, || async {
        ports(&gateway, "web").await == [backends[0].port]
    })
    .await;
    assert!(found.is_some(), "the reloaded dns.servers were not used");
}
