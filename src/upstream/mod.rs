//! Upstreams: per service, the current table of healthy instances and what the gateway
//! learns about them, as separate parts the gateway and the watchers compose:
//!
//! - [`table`]: the immutable [`ServiceTable`] (instances plus balancer state) and [`Tried`].
//! - [`instance`]: one [`Instance`], its passive health and its in-flight slots.
//! - [`outlier`]: the [`OutlierDetector`] (consecutive failures eject an instance).
//! - [`retry_budget`]: the [`RetryBudget`] (retries held to a share of requests).
//! - [`sync`]: the [`SyncStatus`] of discovery (last answer, index, failing since).
//!
//! The watcher (a table's only writer) builds a new table off the request path and swaps it
//! in with one `ArcSwap::store`, and only when the instance set really changed. Requests take
//! one `load` and one pick; nothing on the request path takes a lock or allocates.

pub mod instance;
pub mod outlier;
pub mod retry_budget;
pub mod sync;
pub mod table;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::balance::BalanceSettings;
use crate::config::ServiceConfig;
use crate::metrics::{Metrics, ServiceMetrics};
pub use instance::{Instance, InstanceHealth, InstanceSlot, InvalidInstance};
pub use outlier::{OutlierDetector, Verdict};
pub use retry_budget::{BudgetSettings, RetryBudget};
pub use sync::SyncStatus;
pub use table::{ServiceTable, Tried};

/// One configured service: its config, its current table, and its parts.
pub struct Upstream {
    pub config: ServiceConfig,
    pub metrics: ServiceMetrics,
    table: ArcSwap<ServiceTable>,
    balance: BalanceSettings,
    pub outlier: OutlierDetector,
    pub retry_budget: RetryBudget,
    pub sync: SyncStatus,
}

impl Upstream {
    pub fn new(config: ServiceConfig, metrics: ServiceMetrics) -> Self {
        let balance = BalanceSettings::from_service(&config);
        Self {
            table: ArcSwap::from_pointee(ServiceTable::new(Vec::new(), &balance)),
            balance,
            outlier: OutlierDetector::new(config.outlier),
            retry_budget: RetryBudget::new(BudgetSettings::from_retry(&config.retry)),
            sync: SyncStatus::default(),
            config,
            metrics,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The current table. One atomic load; the `Arc` keeps it alive for the whole request
    /// even if the watcher swaps in a new one meanwhile.
    pub fn table(&self) -> Arc<ServiceTable> {
        self.table.load_full()
    }

    /// Replaces the table when `instances` differ from the current set. Returns whether it
    /// did. Must be called by one writer only (the service's watcher).
    pub fn replace_instances(&self, mut instances: Vec<Instance>) -> bool {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        let current = self.table.load();
        if *current.instances == *instances {
            return false;
        }
        // An instance that stays keeps its passive health (and any ejection).
        for instance in instances.iter_mut() {
            if let Ok(i) = current
                .instances
                .binary_search_by(|old| old.id.as_str().cmp(&instance.id))
            {
                if current.instances[i].authority == instance.authority {
                    instance.health = current.instances[i].health.clone();
                }
            }
        }
        let candidate = ServiceTable::new(instances, &self.balance);
        candidate.carry_over(&current);
        let count = candidate.instances().len();
        self.table.store(Arc::new(candidate));
        self.metrics.table_replaced(count);
        true
    }

    /// A try on `instance` got an answer that was not a 5xx.
    pub fn record_success(&self, instance: &Instance) {
        self.outlier.record_success(instance);
    }

    /// A try on `instance` failed: counted by the outlier detector, logged and counted when
    /// it ejects.
    pub fn record_failure(&self, table: &ServiceTable, instance: &Instance) {
        match self.outlier.record_failure(table, instance) {
            Verdict::Counted => {}
            Verdict::LimitReached { ejected, total } => warn!(
                service = self.name(),
                instance = %instance.id,
                ejected,
                total,
                "instance keeps failing but the ejection limit is reached; keeping it"
            ),
            Verdict::Ejected { failures, duration } => {
                self.metrics.ejected();
                info!(service = self.name(), instance = %instance.id, failures, ?duration, "instance ejected");
            }
        }
    }

    /// Takes one retry from the budget; `false` (and counted) when it is spent.
    pub fn try_take_retry(&self) -> bool {
        let taken = self.retry_budget.try_take();
        if !taken {
            self.metrics.retry_budget_exhausted();
        }
        taken
    }

    /// Records a successful discovery answer at `index`.
    pub fn record_sync(&self, index: u64) {
        self.sync.record_sync(index);
        self.metrics.consul_success();
    }

    /// Records that discovery answered (a change detector, in catalog mode) without a table.
    pub fn record_contact(&self) {
        if self.sync.record_contact() {
            self.metrics.consul_success();
        }
    }

    /// Records a failed discovery query (the table is left as it is).
    pub fn record_discovery_error(&self) {
        self.sync.record_error();
        self.metrics.discovery_error();
    }
}

/// All configured services, in config order.
#[derive(Clone)]
pub struct Upstreams {
    services: Arc<[Arc<Upstream>]>,
}

impl Upstreams {
    pub fn new(configs: &[ServiceConfig], metrics: &Metrics) -> Self {
        let services = configs
            .iter()
            .map(|config| {
                Arc::new(Upstream::new(
                    config.clone(),
                    metrics.for_service_from(&config.name, config.source.name()),
                ))
            })
            .collect();
        Self { services }
    }

    /// The services of a reloaded config: an unchanged service keeps its `Upstream` (table,
    /// passive health, watch); a changed one gets a new `Upstream` seeded with the old table
    /// when its tags did not change, so requests never see it empty; new ones start empty.
    /// A changed service's metrics are resolved while the old `Upstream` still holds its
    /// handles, so its series continue; a dropped service's series go with its last handle.
    pub fn rebuild(&self, configs: &[ServiceConfig], metrics: &Metrics) -> Upstreams {
        let services = configs
            .iter()
            .map(|config| match self.get(&config.name) {
                Some(old) if old.config == *config => old.clone(),
                Some(old) => {
                    let fresh = Upstream::new(
                        config.clone(),
                        metrics.for_service_from(&config.name, config.source.name()),
                    );
                    // Seeded only from the same source and tags: another source's set is not
                    // this one's.
                    if old.config.tags == config.tags && old.config.source == config.source {
                        fresh.replace_instances(old.table().instances().to_vec());
                        if old.sync.is_synced() {
                            fresh.record_sync(old.sync.index());
                        }
                    }
                    Arc::new(fresh)
                }
                None => Arc::new(Upstream::new(
                    config.clone(),
                    metrics.for_service_from(&config.name, config.source.name()),
                )),
            })
            .collect();
        Upstreams { services }
    }

    /// Upstreams found at run time (tag routes), or a subset (one watch's), in the given
    /// order.
    pub fn from_list(services: Vec<Arc<Upstream>>) -> Self {
        Self {
            services: services.into(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.services.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.services.iter().find(|u| u.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::balance::hash::hash_bytes;
    use crate::config::{Balance, OutlierConfig, RetryConfig, RouteConfig};

    fn table(instances: Vec<Instance>, balance: Balance) -> ServiceTable {
        ServiceTable::new(
            instances,
            &BalanceSettings {
                balance,
                splits: vec![],
            },
        )
    }

    fn instance(n: usize) -> Instance {
        Instance::new(
            format!("i{n}"),
            "127.0.0.1".into(),
            9000 + n as u16,
            vec![],
            BTreeMap::new(),
        )
        .unwrap()
    }

    fn service(balance: Balance) -> ServiceConfig {
        ServiceConfig {
            name: "svc".into(),
            tags: vec![],
            route: RouteConfig {
                path_prefix: "/svc".into(),
                host: None,
                strip_prefix: false,
            },
            balance,
            hash_on: None,
            split: vec![],
            protocol: Default::default(),
            tls: None,
            retry: RetryConfig {
                attempts: 3,
                timeout: Duration::from_secs(1),
                budget_percent: 20,
                budget_min_per_second: 10,
            },
            outlier: OutlierConfig {
                consecutive_failures: 3,
                base_ejection_time: Duration::from_secs(10),
                max_ejection_time: Duration::from_secs(60),
                max_ejected_percent: 50,
            },
            source: crate::config::SourceConfig::Consul,
        }
    }

    #[test]
    fn round_robin_is_exactly_fair() {
        for (requests, count) in [(300, 3), (301, 3), (1000, 7), (5, 8)] {
            let table = table((0..count).map(instance).collect(), Balance::RoundRobin);
            let mut hits = vec![0usize; count];
            for _ in 0..requests {
                let (i, _) = table.pick(&Tried::default(), None).unwrap();
                hits[i] += 1;
            }
            let (min, max) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
            assert!(max - min <= 1, "{requests} over {count}: {hits:?}");
            assert_eq!(hits.iter().sum::<usize>(), requests);
        }
    }

    #[test]
    fn pick_prefers_untried_instances() {
        for balance in Balance::ALL {
            let table = table((0..3).map(instance).collect(), balance);
            for _ in 0..50 {
                let mut tried = Tried::default();
                let mut seen = Vec::new();
                for _ in 0..3 {
                    let (i, _) = table.pick(&tried, None).unwrap();
                    assert!(
                        !seen.contains(&i),
                        "{balance:?} repeated {i} before trying all"
                    );
                    seen.push(i);
                    tried.insert(i);
                }
                // All tried: still answers (with some instance) rather than giving up.
                assert!(table.pick(&tried, None).is_some());
            }
        }
    }

    #[test]
    fn empty_table_picks_nothing() {
        let table = table(vec![], Balance::RoundRobin);
        assert!(table.pick(&Tried::default(), None).is_none());
    }

    #[test]
    fn equal_sets_are_not_restored() {
        let metrics = Metrics::new().unwrap();
        let upstream = Upstream::new(service(Balance::RoundRobin), metrics.for_service("svc"));
        assert!(upstream.replace_instances(vec![instance(1), instance(2)]));
        let before = upstream.table();
        // Same set in another order: no swap.
        assert!(!upstream.replace_instances(vec![instance(2), instance(1)]));
        assert!(Arc::ptr_eq(&before, &upstream.table()));
        assert!(upstream.replace_instances(vec![instance(1)]));
        assert_eq!(upstream.table().instances().len(), 1);
    }

    #[test]
    fn consecutive_failures_eject_within_the_limit_and_health_survives_updates() {
        let metrics = Metrics::new().unwrap();
        let upstream = Upstream::new(service(Balance::RoundRobin), metrics.for_service("svc"));
        upstream.replace_instances((0..4).map(instance).collect());
        let table = upstream.table();
        let sick = &table.instances()[0];
        for _ in 0..2 {
            upstream.record_failure(&table, sick);
        }
        upstream.record_success(sick);
        upstream.record_failure(&table, sick);
        assert!(
            sick.health.ejected_for().is_none(),
            "a success resets the count"
        );
        for _ in 0..2 {
            upstream.record_failure(&table, sick);
        }
        let ejected_for = sick.health.ejected_for().expect("ejected after 3 in a row");
        assert!(ejected_for <= Duration::from_secs(10) && ejected_for > Duration::from_secs(9));
        for _ in 0..40 {
            let (i, _) = table.pick(&Tried::default(), None).unwrap();
            assert_ne!(i, 0, "an ejected instance gets no traffic");
        }
        // A second instance may go (2 of 4 = 50%), a third may not.
        for victim in 1..3 {
            for _ in 0..3 {
                upstream.record_failure(&table, &table.instances()[victim]);
            }
        }
        assert_eq!(
            table.ejected_count(),
            2,
            "max_ejected_percent caps ejections"
        );
        // A Consul update that keeps the instance keeps its ejection.
        upstream.replace_instances((0..5).map(instance).collect());
        assert_eq!(upstream.table().ejected_count(), 2);
        assert!(upstream.table().instances()[0]
            .health
            .ejected_for()
            .is_some());
    }

    #[test]
    fn all_ejected_still_answers() {
        let table = table((0..2).map(instance).collect(), Balance::RoundRobin);
        for i in table.instances() {
            i.health
                .ejected_until_ms
                .store(instance::now_ms() + 60_000, Ordering::Relaxed);
        }
        assert!(table.pick(&Tried::default(), None).is_some());
    }

    #[test]
    fn table_swap_under_concurrent_readers() {
        let metrics = Metrics::new().unwrap();
        let upstream = Arc::new(Upstream::new(
            service(Balance::RoundRobin),
            metrics.for_service("svc"),
        ));
        upstream.replace_instances((0..3).map(instance).collect());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let picks = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let upstream = upstream.clone();
                let stop = stop.clone();
                let picks = picks.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let table = upstream.table();
                        // Every table a reader sees is whole: 3 or 5 instances, never torn.
                        let len = table.instances().len();
                        assert!(len == 3 || len == 5, "torn table of {len}");
                        let (_, chosen) = table.pick(&Tried::default(), None).unwrap();
                        assert!(table.instances().contains(chosen));
                        picks.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        // At least 2000 swaps, and on until the readers really raced them: on a loaded
        // machine the reader threads may not be scheduled before 2000 swaps are done. A
        // reader that panicked has finished, which ends the loop so `join` reports it.
        let mut round = 0u64;
        while round < 2000
            || (picks.load(Ordering::Relaxed) < 1000 && !readers.iter().any(|r| r.is_finished()))
        {
            let count = if round.is_multiple_of(2) { 5 } else { 3 };
            assert!(upstream.replace_instances((0..count).map(instance).collect()));
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
        assert!(picks.load(Ordering::Relaxed) >= 1000);
    }

    /// The table index each of 10,000 keys reaches.
    fn owners(table: &ServiceTable) -> Vec<usize> {
        (0..10_000u32)
            .map(|k| {
                let key = hash_bytes(format!("user-{k}").as_bytes());
                table.pick(&Tried::default(), Some(key)).unwrap().0
            })
            .collect()
    }

    #[test]
    fn hash_moves_an_ejected_instances_keys_and_no_others() {
        let table = table((0..10).map(instance).collect(), Balance::Hash);
        let before = owners(&table);
        assert_eq!(
            before,
            owners(&table),
            "the same key reaches the same instance"
        );
        table.instances()[3]
            .health
            .ejected_until_ms
            .store(instance::now_ms() + 60_000, Ordering::Relaxed);
        let after = owners(&table);
        for (b, a) in before.iter().zip(&after) {
            match *b {
                3 => assert_ne!(*a, 3, "an ejected instance's keys move"),
                b => assert_eq!(*a, b, "other keys stay"),
            }
        }
        let moved = before.iter().filter(|&&b| b == 3).count();
        assert!((700..=1300).contains(&moved), "{moved}");
        // Its keys spread over the others rather than landing on one neighbour.
        let mut receivers: Vec<usize> = after
            .iter()
            .zip(&before)
            .filter(|(_, &b)| b == 3)
            .map(|(&a, _)| a)
            .collect();
        receivers.sort_unstable();
        receivers.dedup();
        assert!(receivers.len() >= 8, "{receivers:?}");
    }

    #[test]
    fn a_retry_of_a_hashed_key_goes_to_another_instance() {
        let table = table((0..5).map(instance).collect(), Balance::Hash);
        let key = Some(hash_bytes(b"alice"));
        let (first, _) = table.pick(&Tried::default(), key).unwrap();
        let mut tried = Tried::default();
        tried.insert(first);
        let (second, _) = table.pick(&tried, key).unwrap();
        assert_ne!(first, second);
        assert_eq!(table.pick(&tried, key).unwrap().0, second, "deterministic");
    }
}
