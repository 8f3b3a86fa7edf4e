//! A discovery source followed into an [`Upstream`] with [`follow`], without a gateway: the
//! table a source writes, and the errors it counted, for tests of one source.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use switchyard::config::{Config, ConsulEnv};
use switchyard::discovery::{follow, Source};
use switchyard::metrics::Metrics;
use switchyard::upstream::Upstream;

use super::wait_until;

/// `source` followed for the first service of a `services:` YAML; stopped on drop.
pub struct Followed {
    pub upstream: Arc<Upstream>,
    metrics: Metrics,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Followed {
    pub fn start(source: Arc<dyn Source>, services_yaml: &str) -> Followed {
        let config =
            Config::from_yaml(services_yaml, &ConsulEnv::default()).expect("valid test config");
        let service = config.services[0].clone();
        let metrics = Metrics::new().expect("metrics");
        let upstream = Arc::new(Upstream::new(
            service.clone(),
            metrics.for_service(&service.name),
        ));
        let stop = CancellationToken::new();
        let task = tokio::spawn(follow(source, upstream.clone(), stop.clone()));
        Followed {
            upstream,
            metrics,
            stop,
            task: Some(task),
        }
    }

    /// The ids in the table, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .upstream
            .table()
            .instances()
            .iter()
            .map(|i| i.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The authorities (`host:port`) in the table, sorted.
    pub fn authorities(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .upstream
            .table()
            .instances()
            .iter()
            .map(|i| i.authority.as_str().to_owned())
            .collect();
        all.sort();
        all
    }

    /// Waits until the table holds exactly `ids`; how long it took.
    pub async fn wait_for(&self, ids: &[&str], timeout: Duration) -> Option<Duration> {
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        wait_until(timeout, || {
            let have = self.ids();
            let want = want.clone();
            async move { have == want }
        })
        .await
    }

    /// The discovery errors counted for the service so far.
    pub fn errors(&self) -> f64 {
        let text =
            String::from_utf8(self.metrics.encode().expect("metrics encode")).expect("utf-8");
        discovery_errors(&text, self.upstream.name())
    }

    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Followed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The discovery errors counted for `service` in Prometheus text, under either name the
/// counter has had (`switchyard_consul_errors_total`, `switchyard_discovery_errors_total`).
pub fn discovery_errors(metrics: &str, service: &str) -> f64 {
    let service = format!("service=\"{service}\"");
    metrics
        .lines()
        .filter(|l| {
            (l.starts_with("switchyard_consul_errors_total{")
                || l.starts_with("switchyard_discovery_errors_total{"))
                && l.contains(&service)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
