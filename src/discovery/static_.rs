//! `source: static`: a fixed list of instances from the config, for services outside any
//! registry and for tests that need no registry. The set is sent once and never changes
//! until a reload gives the service a new list; it is confirmed every minute.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{Source, Update, Updates, WatchFuture};
use crate::config::{split_host_port, ServiceConfig, SourceConfig};
use crate::upstream::Instance;

/// How often the static source confirms its set (well inside the 900 s stale alert).
const STILL_CURRENT: Duration = Duration::from_secs(60);

/// The static source: instances are `host:port` texts of the config.
#[derive(Debug, Default)]
pub struct StaticSource;

impl Source for StaticSource {
    fn name(&self) -> &'static str {
        "static"
    }

    fn watch(self: Arc<Self>, service: ServiceConfig, updates: Updates) -> WatchFuture {
        Box::pin(async move {
            let texts = match &service.source {
                SourceConfig::Static { instances } => instances.as_slice(),
                _ => &[],
            };
            let instances = parse_instances(&service.name, texts);
            let sent = updates
                .send(Update::Instances {
                    instances,
                    version: 1,
                    observed: Instant::now(),
                })
                .await;
            if !sent {
                return;
            }
            // A fixed list is always current: say so now and then, so the last-success
            // timestamp (and `SwitchyardConsulSyncStale`, at 900 s) does not take a silent
            // source for a stale one.
            loop {
                tokio::select! {
                    _ = updates.closed() => return,
                    _ = tokio::time::sleep(STILL_CURRENT) => {}
                }
                if !updates.send(Update::Unchanged).await {
                    return;
                }
            }
        })
    }
}

/// Parses `host:port` texts (IPv6 as `[::1]:80`; an `http://` prefix is allowed) into
/// instances whose id is the text itself. A text that is not an address is skipped and
/// logged (config validation rejects those before; this guards other callers).
pub fn parse_instances(service: &str, texts: &[String]) -> Vec<Instance> {
    texts
        .iter()
        .filter_map(|text| match parse_instance(text) {
            Some(instance) => Some(instance),
            None => {
                warn!(service, instance = %text, "not a host:port address; skipped");
                None
            }
        })
        .collect()
}

/// One `host:port` (or `http://host:port`) text as an instance with that text as its id.
pub fn parse_instance(text: &str) -> Option<Instance> {
    let (host, port) = split_host_port(text)?;
    Instance::new(
        text.to_owned(),
        host.to_owned(),
        port,
        Vec::new(),
        Default::default(),
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_set_is_sent_once_then_confirmed_every_minute() {
        let yaml = "services: [{name: s, source: static, instances: [\"127.0.0.1:80\"]}]\n";
        let config = crate::config::Config::from_yaml(yaml, &Default::default()).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let service = config.services[0].clone();
        tokio::spawn(Arc::new(StaticSource).watch(service, Updates { tx }));
        let first = rx.recv().await;
        assert!(
            matches!(first, Some(Update::Instances { ref instances, .. }) if instances.len() == 1)
        );
        let started = tokio::time::Instant::now();
        assert!(matches!(rx.recv().await, Some(Update::Unchanged)));
        assert_eq!(started.elapsed(), STILL_CURRENT);
    }

    #[test]
    fn parses_addresses_and_skips_others() {
        let texts: Vec<String> = [
            "127.0.0.1:80",
            "http://10.0.0.1:8080/",
            "[::1]:9000",
            "nope",
            "a:b",
            ":80",
            "x/y:1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let instances = parse_instances("s", &texts);
        let authorities: Vec<_> = instances.iter().map(|i| i.authority.as_str()).collect();
        assert_eq!(authorities, ["127.0.0.1:80", "10.0.0.1:8080", "[::1]:9000"]);
    }
}
