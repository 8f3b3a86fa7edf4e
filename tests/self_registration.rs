//! Self-registration against a real Consul: the gateway appears as a service with a passing
//! check on its admin `/healthz`, and is gone as soon as it shuts down.

mod common;

use std::time::Duration;

use common::{Consul, Gateway};
use serde_json::Value;

async fn gateway_entries(consul: &Consul, passing: bool) -> Vec<Value> {
    let filter = if passing { "?passing" } else { "" };
    common::http_client()
        .get(format!(
            "{}/v1/health/service/edge-gw{filter}",
            consul.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_registers_with_a_health_check_and_deregisters_on_shutdown() {
    let consul = Consul::start().await;
    let mut gateway = Gateway::start_with(
        &[consul.url()],
        "",
        "register:\n  enabled: true\n  name: edge-gw\n  tags: [edge]\n  check_interval: 1s\nservices:\n  - name: web\n",
    )
    .await;
    let passing = common::wait_until(Duration::from_secs(10), || async {
        gateway_entries(&consul, true).await.len() == 1
    })
    .await;
    assert!(
        passing.is_some(),
        "the gateway never showed up passing in Consul"
    );
    let entry = gateway_entries(&consul, true).await.remove(0);
    assert_eq!(entry["Service"]["Port"], gateway.addr.port());
    assert_eq!(entry["Service"]["Tags"][0], "edge");
    let check = entry["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["ServiceName"] == "edge-gw")
        .cloned()
        .unwrap();
    assert_eq!(check["Status"], "passing");
    assert!(
        check["Output"].as_str().unwrap_or("").contains("/healthz"),
        "{check}"
    );

    gateway.stop().await;
    assert!(
        gateway_entries(&consul, false).await.is_empty(),
        "still registered after shutdown"
    );
}

/// Registration goes through the watches' Consul client: with the first `consul.address`
/// dead, it fails over to the second instead of retrying the dead one forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_fails_over_to_the_next_consul_address() {
    let consul = Consul::start().await;
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let mut gateway = Gateway::start_with(
        &[dead, consul.url()],
        "",
        "register:\n  enabled: true\n  name: edge-gw\n  check_interval: 1s\nservices:\n  - name: web\n",
    )
    .await;
    let landed = common::wait_until(Duration::from_secs(10), || async {
        gateway_entries(&consul, false).await.len() == 1
    })
    .await;
    assert!(
        landed.is_some(),
        "the registration never reached the second Consul address"
    );
    gateway.stop().await;
    assert!(
        gateway_entries(&consul, false).await.is_empty(),
        "deregistration did not go to the agent that took the registration"
    );
}
