//! What the discovery-source tests share besides their registries' harnesses.

/// `switchyard_discovery_errors_total` of `service` (any source) in Prometheus text.
pub fn discovery_errors(metrics: &str, service: &str) -> f64 {
    let service = format!("service=\"{service}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("switchyard_discovery_errors_total{") && l.contains(&service))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
