//! The running Consul watches, reconciled with the Consul services of each (re)loaded config.
//!
//! The connection budget (`consul.max_connections`) decides how services are watched. In
//! `auto` mode the first services of the config, as many as the budget allows once catalog
//! mode and the idle connections have their share (13 of 64), each get a blocking query of
//! their own ([`watch_service`]: Consul encodes only that service's answer, which arrives in
//! ~2-6 ms), and the rest are watched together in catalog mode ([`watch_catalog`]). When
//! every service fits, there is no catalog part; `per_service` and `catalog` force one way
//! for all.
//!
//! One table, one writer: a reload that moves a service from one watch to another stops the
//! old watch first, and the new watches of that reload start only once every stopped watch
//! (and, for a catalog coordinator, every fetch it started) has finished, so an answer the old
//! watch got cannot overwrite a newer one of the new watch.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{idle_connections, watch_catalog, watch_service, ConsulClient, WatchPacing};
use crate::config::{ConsulConfig, WatchMode};
use crate::discovery::set::{after, start_when, Running};
use crate::upstream::{Upstream, Upstreams};

/// The most catalog-mode fetches at once next to per-service watches: enough to fetch the
/// few services a change names at once; a sweep of every service (at start, after an outage,
/// for a registration without checks) takes longer with fewer.
const HYBRID_FETCH_SLOTS: usize = 8;
/// Connections catalog mode needs beside per-service watches: its two detectors, the query
/// for the checks table's index and its fetch slots. The idle connections the HTTP pool
/// keeps ([`idle_connections`], shared by every watch) come on top.
const CATALOG_CONNECTIONS: usize = 3 + HYBRID_FETCH_SLOTS;

/// How many of `services` services get a blocking query of their own.
pub fn per_service_share(consul: &ConsulConfig, services: usize) -> usize {
    let idle = idle_connections(consul.max_connections);
    match consul.watch {
        WatchMode::PerService => services,
        WatchMode::Catalog => 0,
        // One query in flight per service, plus the idle connections of the HTTP pool.
        WatchMode::Auto if services + idle <= consul.max_connections => services,
        WatchMode::Auto => consul
            .max_connections
            .saturating_sub(CATALOG_CONNECTIONS + idle)
            .min(services),
    }
}

/// The running Consul watches (per service, and the catalog-mode coordinator).
pub struct ConsulWatches {
    discovery: Arc<ConsulClient>,
    pacing: WatchPacing,
    consul: ConsulConfig,
    /// Services with a blocking query of their own: their upstream and its watch.
    per_service: HashMap<String, (Arc<Upstream>, Running)>,
    /// The catalog-mode coordinator, with the services it watches.
    catalog: Option<(Vec<Arc<Upstream>>, Running)>,
}

impl ConsulWatches {
    pub fn start(
        discovery: Arc<ConsulClient>,
        consul: &ConsulConfig,
        upstreams: &Upstreams,
    ) -> Self {
        let mut set = ConsulWatches {
            discovery,
            pacing: WatchPacing::from(consul),
            consul: consul.clone(),
            per_service: HashMap::new(),
            catalog: None,
        };
        set.reconcile(upstreams);
        set
    }

    /// Watches exactly `upstreams`: a service that keeps its upstream (the same `Arc`) and its
    /// way of being watched keeps its watch; others get a new one, started once the watches
    /// this call stopped have finished; watches of services no longer listed stop.
    pub fn reconcile(&mut self, upstreams: &Upstreams) {
        let all: Vec<Arc<Upstream>> = upstreams.iter().cloned().collect();
        let share = per_service_share(&self.consul, all.len());
        let (own, shared) = all.split_at(share);
        let mut stopped = Vec::new();
        let mut kept = HashMap::new();
        let mut fresh = Vec::new();
        for upstream in own {
            match self.per_service.remove(upstream.name()) {
                Some((old, running)) if Arc::ptr_eq(&old, upstream) => {
                    kept.insert(upstream.name().to_owned(), (old, running));
                }
                previous => {
                    stopped.extend(previous.map(|(_, running)| running.stop()));
                    fresh.push(upstream.clone());
                }
            }
        }
        stopped.extend(self.per_service.drain().map(|(_, (_, r))| r.stop()));
        self.per_service = kept;
        let catalog_unchanged = self.catalog.as_ref().is_some_and(|(watched, _)| {
            watched.len() == shared.len()
                && watched.iter().zip(shared).all(|(a, b)| Arc::ptr_eq(a, b))
        });
        if !catalog_unchanged {
            stopped.extend(self.catalog.take().map(|(_, running)| running.stop()));
        }
        let ready = after(stopped);
        for upstream in fresh {
            let running = self.spawn_service(upstream.clone(), ready.clone());
            self.per_service
                .insert(upstream.name().to_owned(), (upstream, running));
        }
        if !catalog_unchanged && !shared.is_empty() {
            let running = self.spawn_catalog(shared, ready);
            self.catalog = Some((shared.to_vec(), running));
        }
        info!(
            per_service = own.len(),
            catalog = shared.len(),
            max_connections = self.consul.max_connections,
            "watching Consul"
        );
    }

    fn spawn_service(&self, upstream: Arc<Upstream>, ready: CancellationToken) -> Running {
        let stop = CancellationToken::new();
        let watch = watch_service(self.discovery.clone(), upstream, self.pacing, stop.clone());
        Running {
            task: tokio::spawn(start_when(ready, stop.clone(), watch)),
            stop,
        }
    }

    fn spawn_catalog(&self, shared: &[Arc<Upstream>], ready: CancellationToken) -> Running {
        let stop = CancellationToken::new();
        let budget = self
            .consul
            .max_connections
            .saturating_sub(self.per_service.len());
        let watch = watch_catalog(
            self.discovery.clone(),
            Upstreams::from_list(shared.to_vec()),
            self.pacing,
            budget,
            stop.clone(),
        );
        Running {
            task: tokio::spawn(start_when(ready, stop.clone(), watch)),
            stop,
        }
    }

    /// Stops every watch and waits for them.
    pub async fn stop(mut self) {
        let mut tasks: Vec<JoinHandle<()>> = self
            .per_service
            .drain()
            .map(|(_, (_, running))| running.stop())
            .collect();
        tasks.extend(self.catalog.take().map(|(_, running)| running.stop()));
        for task in tasks {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consul(watch: &str, max_connections: usize) -> ConsulConfig {
        let yaml = format!(
            "consul:\n  watch: {watch}\n  max_connections: {max_connections}\nservices: [{{name: s}}]\n"
        );
        crate::config::Config::from_yaml(&yaml, &Default::default())
            .unwrap()
            .consul
    }

    #[test]
    fn auto_gives_every_service_its_own_query_while_they_fit() {
        assert_eq!(per_service_share(&consul("auto", 64), 62), 62);
        // Beyond: the budget less catalog mode's share, the rest in catalog mode.
        assert_eq!(per_service_share(&consul("auto", 64), 63), 51);
        assert_eq!(per_service_share(&consul("auto", 64), 1000), 51);
        assert_eq!(per_service_share(&consul("auto", 4), 10), 0);
    }

    #[test]
    fn forced_modes_watch_every_service_one_way() {
        assert_eq!(per_service_share(&consul("per_service", 4), 10), 10);
        assert_eq!(per_service_share(&consul("catalog", 64), 10), 0);
    }
}
