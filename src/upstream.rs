//! Upstream tables: per service, the current set of healthy instances and the balancer state.
//!
//! A [`ServiceTable`] is immutable once built. The watcher (the table's only writer) builds a
//! new one off the request path and swaps it in with one `ArcSwap::store`, and only when the
//! instance set really changed. Requests take one `load` and one atomic increment; nothing on
//! the request path takes a lock or allocates.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::http::uri::Authority;

use crate::config::{Balance, ServiceConfig};
use crate::metrics::{Metrics, ServiceMetrics};

/// One healthy service instance, as Consul reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Consul's service ID, unique per agent; tables are sorted by it.
    pub id: String,
    /// `Service.Address`, or `Node.Address` when the service left it empty.
    pub address: String,
    pub port: u16,
    /// `address:port` (bracketed for IPv6), pre-built so requests do not format it.
    pub authority: Authority,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

/// Why an [`Instance`] could not be built from discovery data.
#[derive(Debug, thiserror::Error)]
#[error("instance {id:?}: {address:?}:{port} is not a valid host:port")]
pub struct InvalidInstance {
    pub id: String,
    pub address: String,
    pub port: u16,
}

impl Instance {
    pub fn new(
        id: String,
        address: String,
        port: u16,
        tags: Vec<String>,
        meta: BTreeMap<String, String>,
    ) -> Result<Self, InvalidInstance> {
        let text = if address.contains(':') && !address.starts_with('[') {
            format!("[{address}]:{port}")
        } else {
            format!("{address}:{port}")
        };
        match text.parse::<Authority>() {
            Ok(authority) if port != 0 && !address.is_empty() => Ok(Self {
                id,
                address,
                port,
                authority,
                tags,
                meta,
            }),
            _ => Err(InvalidInstance { id, address, port }),
        }
    }
}

/// Instances already tried by one request, so a retry can prefer another. Inline (no heap);
/// beyond its capacity it forgets the oldest, which only weakens that preference.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tried {
    slots: [usize; Tried::CAPACITY],
    len: usize,
}

impl Tried {
    const CAPACITY: usize = 8;

    pub fn insert(&mut self, index: usize) {
        self.slots[self.len % Self::CAPACITY] = index;
        self.len += 1;
    }

    pub fn contains(&self, index: usize) -> bool {
        self.slots[..self.len.min(Self::CAPACITY)].contains(&index)
    }
}

/// An immutable snapshot of one service's healthy instances plus balancer state.
#[derive(Debug)]
pub struct ServiceTable {
    instances: Box<[Instance]>,
    balance: Balance,
    /// Round-robin cursor. The only mutable part, and only through one atomic add.
    next: AtomicUsize,
}

impl ServiceTable {
    /// Builds a table; instances are sorted by ID so equal sets compare equal.
    pub fn new(mut instances: Vec<Instance>, balance: Balance) -> Self {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Self {
            instances: instances.into_boxed_slice(),
            balance,
            next: AtomicUsize::new(0),
        }
    }

    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Picks an instance, preferring one not in `tried`. Returns its index in this table.
    pub fn pick(&self, tried: &Tried) -> Option<(usize, &Instance)> {
        let count = self.instances.len();
        if count == 0 {
            return None;
        }
        let start = match self.balance {
            Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % count,
            Balance::Random => fastrand::usize(..count),
        };
        let index = (0..count)
            .map(|offset| (start + offset) % count)
            .find(|&i| !tried.contains(i))
            .unwrap_or(start);
        Some((index, &self.instances[index]))
    }
}

/// One configured service: its config, its current table and its discovery status.
pub struct Upstream {
    pub config: ServiceConfig,
    pub metrics: ServiceMetrics,
    table: ArcSwap<ServiceTable>,
    created: Instant,
    /// Milliseconds since `created` of the last successful discovery answer, plus one;
    /// zero means never.
    last_sync_ms: AtomicU64,
    /// The discovery index (Consul's `X-Consul-Index`) of the current table.
    index: AtomicU64,
}

impl Upstream {
    pub fn new(config: ServiceConfig, metrics: ServiceMetrics) -> Self {
        let table = ServiceTable::new(Vec::new(), config.balance);
        Self {
            config,
            metrics,
            table: ArcSwap::from_pointee(table),
            created: Instant::now(),
            last_sync_ms: AtomicU64::new(0),
            index: AtomicU64::new(0),
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
    pub fn replace_instances(&self, instances: Vec<Instance>) -> bool {
        let candidate = ServiceTable::new(instances, self.config.balance);
        let current = self.table.load();
        if current.instances == candidate.instances {
            return false;
        }
        // Carry the cursor over so a table change does not send the next request to the
        // first instance of every replica at once.
        candidate
            .next
            .store(current.next.load(Ordering::Relaxed), Ordering::Relaxed);
        let count = candidate.instances.len();
        self.table.store(Arc::new(candidate));
        self.metrics.table_replaced(count);
        true
    }

    /// Records a successful discovery answer at `index`.
    pub fn record_sync(&self, index: u64) {
        let elapsed = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_sync_ms.store(elapsed + 1, Ordering::Relaxed);
        self.index.store(index, Ordering::Relaxed);
        self.metrics.consul_success();
    }

    /// Whether discovery has answered at least once.
    pub fn is_synced(&self) -> bool {
        self.last_sync_ms.load(Ordering::Relaxed) != 0
    }

    /// Time since the last successful discovery answer; `None` before the first.
    pub fn sync_age(&self) -> Option<Duration> {
        match self.last_sync_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.created
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }

    pub fn index(&self) -> u64 {
        self.index.load(Ordering::Relaxed)
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
                    metrics.for_service(&config.name),
                ))
            })
            .collect();
        Self { services }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.services.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.services.iter().find(|u| u.name() == name)
    }

    /// Ready once every service has had one successful discovery answer.
    pub fn all_synced(&self) -> bool {
        self.services.iter().all(|u| u.is_synced())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RetryConfig, RouteConfig};

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
            retry: RetryConfig {
                attempts: 3,
                timeout: Duration::from_secs(1),
            },
        }
    }

    #[test]
    fn round_robin_is_exactly_fair() {
        for (requests, count) in [(300, 3), (301, 3), (1000, 7), (5, 8)] {
            let table = ServiceTable::new((0..count).map(instance).collect(), Balance::RoundRobin);
            let mut hits = vec![0usize; count];
            for _ in 0..requests {
                let (i, _) = table.pick(&Tried::default()).unwrap();
                hits[i] += 1;
            }
            let (min, max) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
            assert!(max - min <= 1, "{requests} over {count}: {hits:?}");
            assert_eq!(hits.iter().sum::<usize>(), requests);
        }
    }

    #[test]
    fn pick_prefers_untried_instances() {
        for balance in [Balance::RoundRobin, Balance::Random] {
            let table = ServiceTable::new((0..3).map(instance).collect(), balance);
            for _ in 0..50 {
                let mut tried = Tried::default();
                let mut seen = Vec::new();
                for _ in 0..3 {
                    let (i, _) = table.pick(&tried).unwrap();
                    assert!(
                        !seen.contains(&i),
                        "{balance:?} repeated {i} before trying all"
                    );
                    seen.push(i);
                    tried.insert(i);
                }
                // All tried: still answers (with some instance) rather than giving up.
                assert!(table.pick(&tried).is_some());
            }
        }
    }

    #[test]
    fn random_uses_every_instance() {
        let table = ServiceTable::new((0..3).map(instance).collect(), Balance::Random);
        let mut hits = [0usize; 3];
        for _ in 0..300 {
            hits[table.pick(&Tried::default()).unwrap().0] += 1;
        }
        assert!(hits.iter().all(|&h| h > 0), "{hits:?}");
    }

    #[test]
    fn empty_table_picks_nothing() {
        let table = ServiceTable::new(vec![], Balance::RoundRobin);
        assert!(table.pick(&Tried::default()).is_none());
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
    fn ipv6_authority_is_bracketed() {
        let i = Instance::new("a".into(), "::1".into(), 80, vec![], BTreeMap::new()).unwrap();
        assert_eq!(i.authority.as_str(), "[::1]:80");
        assert!(Instance::new("b".into(), "".into(), 80, vec![], BTreeMap::new()).is_err());
        assert!(Instance::new("c".into(), "h".into(), 0, vec![], BTreeMap::new()).is_err());
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
                        let (_, chosen) = table.pick(&Tried::default()).unwrap();
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
            let count = if round % 2 == 0 { 5 } else { 3 };
            assert!(upstream.replace_instances((0..count).map(instance).collect()));
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
        assert!(picks.load(Ordering::Relaxed) >= 1000);
    }
}
