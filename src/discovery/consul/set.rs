//! The running Consul watches, reconciled with the Consul services of each (re)loaded config.
//!
//! The connection budget (`consul.max_connections`) decides how services are watched. In
//! `auto` mode the first services of the config, as many as the budget allows once catalog
//! mode and the idle connections have their share (13 of 64), each get a blocking query of
//! their own ([`watch_service`]: Consul encodes only that service's answer, which arrives in
//! ~2-6 ms), and the rest are watched together in catalog mode ([`watch_catalog`]). When
//! every service fits, there is no catalog part; `per_service` and `catalog` force one way
//! for all. The budget is one for the gateway ([`ConnectionBudget`]): with tag routes on, the
//! tag-route watcher's long-polls come off the top, the file's services are served first
//! (leaving at least a catalog coordinator's four connections), and the services found by tags
//! get the rest; before, the tag-route watcher's own set could open `max_connections` more.
//!
//! One table, one writer: a reload that moves a service from one watch to another stops the
//! old watch first, and the new watches of that reload start only once every stopped watch
//! (and, for a catalog coordinator, every fetch it started) has finished, so an answer the old
//! watch got cannot overwrite a newer one of the new watch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::limits::check_agent_limit;
use super::{idle_connections, watch_catalog, watch_service, ConsulClient, WatchPacing};
use crate::config::{ConsulConfig, WatchMode};
use crate::discovery::set::{after, start_when, Running};
use crate::metrics::{ConsulWatchedGauges, Metrics};
use crate::upstream::{Upstream, Upstreams};

/// The most catalog-mode fetches at once next to per-service watches: enough to fetch the
/// few services a change names at once; a sweep of every service (at start, after an outage,
/// for a registration without checks) takes longer with fewer.
const HYBRID_FETCH_SLOTS: usize = 8;
/// Connections catalog mode needs beside per-service watches: its two detectors, the query
/// for the checks table's index and its fetch slots. The idle connections the HTTP pool
/// keeps ([`idle_connections`], shared by every watch) come on top.
const CATALOG_CONNECTIONS: usize = 3 + HYBRID_FETCH_SLOTS;

/// The fewest connections a catalog-mode coordinator runs on (two detectors, the checks
/// table's query, one fetch): what the file's watches leave the tag-route watcher at least.
const CATALOG_FLOOR: usize = 4;

/// How many of `services` services get a blocking query of their own, with the whole budget.
pub fn per_service_share(consul: &ConsulConfig, services: usize) -> usize {
    let idle = idle_connections(consul.max_connections);
    share(consul.watch, consul.max_connections, idle, services)
}

/// How many of `services` get a query of their own within `limit` connections, `idle` of
/// which the HTTP pool keeps.
fn share(mode: WatchMode, limit: usize, idle: usize, services: usize) -> usize {
    match mode {
        WatchMode::PerService => services,
        WatchMode::Catalog => 0,
        // One query in flight per service, plus the idle connections of the HTTP pool.
        WatchMode::Auto if services + idle <= limit => services,
        WatchMode::Auto => limit
            .saturating_sub(CATALOG_CONNECTIONS + idle)
            .min(services),
    }
}

/// One Consul connection budget (`consul.max_connections`) for every Consul watch: the
/// file's services are watched first ([`Claim::First`]); the tag-route watcher's services
/// ([`Claim::Rest`]) get what those leave, less the tag-route watcher's own long-polls. Each
/// set's share is computed when it reconciles; a reload that grows the file's share is
/// followed by the tag-route watcher's reconcile (it is notified of every reload).
///
/// It counts blocking queries: one per connection over HTTP/1.1, and
/// [`STREAMS_PER_LANE`](super::lanes::STREAMS_PER_LANE) per connection once Consul's HTTPS was
/// seen speaking HTTP/2 (`ConsulClient::queries_per_connection`): then 128 connections carry
/// 12,800 queries, and every service of a large catalog gets its own.
#[derive(Debug)]
pub struct ConnectionBudget {
    /// Queries in flight at once: `max_connections` × queries per connection (grows once,
    /// when Consul is found speaking HTTP/2 after startup: [`ConnectionBudget::multiplex`]).
    total: AtomicUsize,
    /// `consul.max_connections`.
    connections: usize,
    /// Long-polls outside any watch set (the tag-route watcher's catalog and KV queries).
    reserved: usize,
    /// Kept free by the file's watches for the tag-route watcher's services (0 without it).
    rest_floor: usize,
    /// What the file's watches may use now.
    first: AtomicUsize,
    /// `switchyard_consul_watched_services` of the file's set and the tag routes' set.
    watched: Option<[ConsulWatchedGauges; 2]>,
}

/// Which side of the [`ConnectionBudget`] a watch set is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The config file's services: first served.
    First,
    /// Services found by tags: what the file's leave.
    Rest,
}

impl ConnectionBudget {
    /// The budget of `consul`, with `tag_route_polls` long-polls of the tag-route watcher
    /// (0 when tag routes are off), each connection carrying `queries_per_connection`.
    pub fn new(
        consul: &ConsulConfig,
        tag_route_polls: usize,
        queries_per_connection: usize,
    ) -> Arc<Self> {
        Arc::new(Self::build(consul, tag_route_polls, queries_per_connection))
    }

    fn build(consul: &ConsulConfig, tag_route_polls: usize, queries_per_connection: usize) -> Self {
        let rest_floor = if tag_route_polls > 0 {
            CATALOG_FLOOR
        } else {
            0
        };
        Self {
            total: AtomicUsize::new(consul.max_connections * queries_per_connection.max(1)),
            connections: consul.max_connections,
            reserved: tag_route_polls,
            rest_floor,
            first: AtomicUsize::new(0),
            watched: None,
        }
    }

    /// [`ConnectionBudget::new`], each set's split reported in `metrics`
    /// (`switchyard_consul_watched_services`).
    pub fn reporting(
        consul: &ConsulConfig,
        tag_route_polls: usize,
        queries_per_connection: usize,
        metrics: &Metrics,
    ) -> Arc<Self> {
        let mut budget = Self::build(consul, tag_route_polls, queries_per_connection);
        budget.watched = Some([
            metrics.consul_watched("file"),
            metrics.consul_watched("tags"),
        ]);
        Arc::new(budget)
    }

    /// From now on each connection carries `queries_per_connection`; the sets use it when
    /// they next reconcile.
    pub fn multiplex(&self, queries_per_connection: usize) {
        self.total.store(
            self.connections * queries_per_connection.max(1),
            Ordering::Relaxed,
        );
    }

    /// Records how a set of `claim` watches its services now.
    fn report(&self, claim: Claim, per_service: usize, catalog: usize) {
        let Some(watched) = &self.watched else {
            return;
        };
        let gauges = &watched[usize::from(claim == Claim::Rest)];
        gauges.per_service.set(per_service as i64);
        gauges.catalog.set(catalog as i64);
    }

    /// The connections a set of `claim` may use now.
    fn limit(&self, claim: Claim) -> usize {
        let free = self
            .total
            .load(Ordering::Relaxed)
            .saturating_sub(self.reserved);
        match claim {
            Claim::First => free.saturating_sub(self.rest_floor),
            Claim::Rest => free.saturating_sub(self.first.load(Ordering::Relaxed)),
        }
    }

    /// How many of `services` of `claim` get a query of their own, and how many connections
    /// the set may use; the file's side records what it takes.
    fn plan(&self, claim: Claim, mode: WatchMode, services: usize) -> (usize, usize) {
        let limit = self.limit(claim);
        let idle = self.idle(claim);
        let own = share(mode, limit, idle, services);
        if claim == Claim::First {
            // A catalog coordinator may use whatever the per-service watches leave.
            let used = if own == services { own + idle } else { limit };
            self.first.store(used, Ordering::Relaxed);
        }
        (own, limit)
    }

    /// The idle connections of the shared HTTP pool, counted once (by the file's side).
    fn idle(&self, claim: Claim) -> usize {
        match claim {
            Claim::First => idle_connections(self.connections),
            Claim::Rest => 0,
        }
    }
}

/// The running Consul watches (per service, and the catalog-mode coordinator).
pub struct ConsulWatches {
    discovery: Arc<ConsulClient>,
    pacing: WatchPacing,
    consul: ConsulConfig,
    budget: Arc<ConnectionBudget>,
    claim: Claim,
    /// Services with a blocking query of their own: their upstream and its watch.
    per_service: HashMap<String, (Arc<Upstream>, Running)>,
    /// The catalog-mode coordinator, with the services it watches.
    catalog: Option<(Vec<Arc<Upstream>>, Running)>,
    /// Whether the agent's connection limit has been checked against the budget (once, by
    /// the file's side, when it first has services to watch).
    limit_checked: bool,
}

impl ConsulWatches {
    pub fn start(
        discovery: Arc<ConsulClient>,
        consul: &ConsulConfig,
        (budget, claim): (Arc<ConnectionBudget>, Claim),
        upstreams: &Upstreams,
    ) -> Self {
        let mut set = ConsulWatches {
            discovery,
            pacing: WatchPacing::from(consul),
            consul: consul.clone(),
            budget,
            claim,
            per_service: HashMap::new(),
            catalog: None,
            limit_checked: false,
        };
        set.reconcile(upstreams);
        set
    }

    /// Watches exactly `upstreams`: a service that keeps its upstream (the same `Arc`) and its
    /// way of being watched keeps its watch; others get a new one, started once the watches
    /// this call stopped have finished; watches of services no longer listed stop.
    pub fn reconcile(&mut self, upstreams: &Upstreams) {
        let all: Vec<Arc<Upstream>> = upstreams.iter().cloned().collect();
        self.check_agent_limit_once(all.len());
        let (share, limit) = self.budget.plan(self.claim, self.consul.watch, all.len());
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
            // Catalog mode's fetches stay within the connection count (a sweep of every
            // service at once would otherwise be as wide as the multiplexed budget).
            let running = self.spawn_catalog(shared, limit.min(self.budget.connections), ready);
            self.catalog = Some((shared.to_vec(), running));
        }
        self.budget.report(self.claim, own.len(), shared.len());
        info!(
            per_service = own.len(),
            catalog = shared.len(),
            queries = limit,
            max_connections = self.consul.max_connections,
            watches = ?self.claim,
            "watching Consul"
        );
    }

    /// Reads the agent's per-client connection limit in the background the first time the
    /// file's services include Consul ones ([`check_agent_limit`]).
    fn check_agent_limit_once(&mut self, services: usize) {
        if self.limit_checked || self.claim != Claim::First || services == 0 {
            return;
        }
        self.limit_checked = true;
        let max_connections = self.consul.max_connections;
        tokio::spawn(check_agent_limit(self.discovery.clone(), max_connections));
    }

    fn spawn_service(&self, upstream: Arc<Upstream>, ready: CancellationToken) -> Running {
        let stop = CancellationToken::new();
        let watch = watch_service(self.discovery.clone(), upstream, self.pacing, stop.clone());
        Running {
            task: tokio::spawn(start_when(ready, stop.clone(), watch)),
            stop,
        }
    }

    fn spawn_catalog(
        &self,
        shared: &[Arc<Upstream>],
        limit: usize,
        ready: CancellationToken,
    ) -> Running {
        let stop = CancellationToken::new();
        let budget = limit.saturating_sub(self.per_service.len());
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

    /// What a set of `services` in `auto` mode holds: its own queries, plus a catalog
    /// coordinator's budget when some services are left over.
    fn held(budget: &ConnectionBudget, claim: Claim, services: usize) -> usize {
        let (own, limit) = budget.plan(claim, WatchMode::Auto, services);
        let idle = budget.idle(claim);
        if own == services {
            own + idle
        } else {
            // The coordinator gets what the per-service watches leave, and uses at least 4.
            own + (limit - own).max(CATALOG_FLOOR)
        }
    }

    #[test]
    fn tag_routes_share_the_budget_with_the_file_services() {
        let config = consul("auto", 64);
        for (file, tagged) in [(10, 30), (10, 100), (62, 10), (100, 100), (0, 200)] {
            let budget = ConnectionBudget::new(&config, 2, 1);
            let total = held(&budget, Claim::First, file) + held(&budget, Claim::Rest, tagged) + 2;
            assert!(
                total <= 64,
                "{file} file + {tagged} tagged services: {total} connections"
            );
        }
        // Few services: everyone gets a query of their own.
        let budget = ConnectionBudget::new(&config, 2, 1);
        assert_eq!(budget.plan(Claim::First, WatchMode::Auto, 10).0, 10);
        assert_eq!(budget.plan(Claim::Rest, WatchMode::Auto, 30).0, 30);
        // Without tag routes the file's services keep the whole budget, as before.
        let alone = ConnectionBudget::new(&config, 0, 1);
        assert_eq!(alone.plan(Claim::First, WatchMode::Auto, 62).0, 62);
    }

    #[test]
    fn over_http2_the_budget_counts_queries_not_connections() {
        let config = consul("auto", 128);
        let one = ConnectionBudget::new(&config, 0, 1);
        assert_eq!(one.plan(Claim::First, WatchMode::Auto, 1000).0, 115);
        let multiplexed = ConnectionBudget::new(&config, 0, 100);
        let (own, limit) = multiplexed.plan(Claim::First, WatchMode::Auto, 1000);
        assert_eq!((own, limit), (1000, 12_800));
        // Past 12,800 services the rest are watched in catalog mode, as before.
        assert_eq!(
            multiplexed.plan(Claim::First, WatchMode::Auto, 20_000).0,
            12_787
        );
    }

    #[test]
    fn forced_modes_watch_every_service_one_way() {
        assert_eq!(per_service_share(&consul("per_service", 4), 10), 10);
        assert_eq!(per_service_share(&consul("catalog", 64), 10), 0);
    }
}
