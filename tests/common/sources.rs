//! What the discovery-source tests share besides their registries' harnesses.

use super::{free_port, Gateway};

/// A gateway configured by `rest` (the YAML after `consul:`) whose Consul address is a port
/// nothing listens on: for services of another source, or of none.
pub async fn gateway_without_consul(rest: &str) -> Gateway {
    Gateway::start_with(&[format!("http://127.0.0.1:{}", free_port())], "", rest).await
}

/// `items` as the entries of a YAML flow list: `"a", "b"`.
pub fn quoted(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| format!("\"{item}\"")).collect();
    quoted.join(", ")
}

/// `switchyard_discovery_errors_total` of `service` (any source) in Prometheus text.
pub fn discovery_errors(metrics: &str, service: &str) -> f64 {
    let service = format!("service=\"{service}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("switchyard_discovery_errors_total{") && l.contains(&service))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
