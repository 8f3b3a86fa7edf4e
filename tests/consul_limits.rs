//! The Consul agent's per-client connection limit, read from a real `consul agent -dev`
//! (`/v1/agent/self` → `DebugConfig.HTTPMaxConnsPerClient`) and compared with
//! `consul.max_connections`.

mod common;

use common::Consul;
use switchyard::discovery::consul::limits::exceeds_agent_limit;
use switchyard::discovery::consul::ConsulClient;

/// A Consul client for `consul` with `consul.max_connections: max_connections`.
fn client(consul: &Consul, max_connections: usize) -> (ConsulClient, usize) {
    let yaml = format!(
        "consul:\n  address: {}\n  max_connections: {max_connections}\nservices: [{{name: s}}]\n",
        consul.url()
    );
    let config = switchyard::Config::from_yaml(&yaml, &Default::default()).expect("valid config");
    let client = ConsulClient::new(&config.consul).expect("a Consul client");
    (client, config.consul.max_connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_above_the_agents_default_limit_is_detected() {
    let consul = Consul::start().await;
    let (client, max_connections) = client(&consul, 1010);
    let limit = client
        .agent_connection_limit()
        .await
        .expect("reading /v1/agent/self");
    // Consul's default: 200 connections per client address.
    assert_eq!(limit, Some(200));
    assert!(exceeds_agent_limit(max_connections, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_agent_limit_is_read_and_accepted() {
    let consul = Consul::start_with_hcl("limits { http_max_conns_per_client = 4096 }").await;
    let (client, max_connections) = client(&consul, 1010);
    let limit = client
        .agent_connection_limit()
        .await
        .expect("reading /v1/agent/self");
    assert_eq!(limit, Some(4096));
    assert!(!exceeds_agent_limit(max_connections, 4096));
}
