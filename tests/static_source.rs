//! `source: static` end to end, with no registry at all: Consul's address points at a port
//! nothing listens on, and the gateway still routes, is ready, and follows a reloaded list.

mod common;

use std::time::Duration;

use common::{free_port, Gateway};
use switchyard::config::{Config, ConsulEnv};

fn config(nowhere: &str, instances: &[String]) -> String {
    format!(
        "consul:\n  address: [{nowhere}]\nservices:\n  - name: web\n    source: static\n    instances: [{}]\n    route: {{path_prefix: /web}}\n  - name: api\n    source: static\n    instances: [\"{}\"]\n",
        instances.join(", "),
        instances[0],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_instances_are_proxied_without_any_registry() {
    let backends = common::backends("web", 2).await;
    let instances: Vec<String> = backends
        .iter()
        .map(|b| format!("127.0.0.1:{}", b.port))
        .collect();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let yaml = config(&nowhere, &instances);
    let gateway =
        Gateway::start_config(Config::from_yaml(&yaml, &ConsulEnv::default()).unwrap()).await;
    let ids: Vec<&str> = instances.iter().map(String::as_str).collect();
    assert!(gateway
        .wait_for_instances("web", &ids, Duration::from_secs(5))
        .await
        .is_some());
    let (hits, failures) = gateway.spread("/web/x", 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert_eq!(gateway.admin_get("/readyz").await, "ready\n");
    let metrics = gateway.admin_get("/metrics").await;
    assert!(
        !metrics.contains("switchyard_consul_errors_total{"),
        "no Consul service, no Consul series: {metrics}"
    );

    // A reload with a shorter list: the static set follows it.
    let yaml = config(&nowhere, &instances[1..]);
    let next = Config::from_yaml(&yaml, &ConsulEnv::default()).unwrap();
    gateway.reload.send(next).await.unwrap();
    assert!(gateway
        .wait_for_instances("web", &[ids[1]], Duration::from_secs(5))
        .await
        .is_some());
    let (hits, failures) = gateway.spread("/web/x", 10).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(hits.keys().collect::<Vec<_>>(), [&backends[1].id]);
}
