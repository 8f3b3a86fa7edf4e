//! Upstream tables: per service, the current set of healthy instances and the balancer state.
//!
//! A [`ServiceTable`] is immutable once built. The watcher (the table's only writer) builds a
//! new one off the request path and swaps it in with one `ArcSwap::store`, and only when the
//! instance set really changed. Requests take one `load` and one atomic increment; nothing on
//! the request path takes a lock or allocates.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::http::uri::Authority;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::{Balance, ServiceConfig};
use crate::metrics::{Metrics, ServiceMetrics};

/// Milliseconds on a process-wide monotonic clock (never 0, so 0 can mean "unset").
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Passive health of one instance, learned from the gateway's own tries. Shared by every
/// table that lists the instance, so a Consul update does not forgive an ejection.
#[derive(Debug, Default)]
pub struct InstanceHealth {
    consecutive_failures: AtomicU32,
    /// `now_ms()` until which the instance gets no traffic; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// Requests in flight to the instance (over HTTP/1.1: its connections in use).
    in_flight: AtomicUsize,
    /// Requests waiting for a slot, and their wake-up.
    waiting: AtomicUsize,
    released: Notify,
}

/// One request's hold on an instance's connection budget; released on drop.
#[derive(Debug)]
pub struct InstanceSlot(Arc<InstanceHealth>);

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.released.notify_one();
        }
    }
}

impl Instance {
    /// A slot among the instance's `limit` in-flight requests, waiting up to `wait` for one
    /// to free up (`upstream.max_connections_per_instance`): a flood of requests, or of
    /// client resets, cannot open unbounded connections to one instance.
    pub async fn acquire(&self, limit: usize, wait: Duration) -> Option<InstanceSlot> {
        if let Some(slot) = self.try_acquire(limit) {
            return Some(slot);
        }
        let health = &self.health;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let released = health.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            health.waiting.fetch_add(1, Ordering::SeqCst);
            let slot = match self.try_acquire(limit) {
                Some(slot) => Some(slot),
                None => tokio::time::timeout_at(deadline, released)
                    .await
                    .ok()
                    .and(None),
            };
            health.waiting.fetch_sub(1, Ordering::SeqCst);
            if slot.is_some() || tokio::time::Instant::now() >= deadline {
                return slot.or_else(|| self.try_acquire(limit));
            }
        }
    }

    fn try_acquire(&self, limit: usize) -> Option<InstanceSlot> {
        let health = &self.health;
        if health.in_flight.fetch_add(1, Ordering::SeqCst) < limit {
            return Some(InstanceSlot(health.clone()));
        }
        health.in_flight.fetch_sub(1, Ordering::SeqCst);
        None
    }

    /// Requests in flight to this instance now.
    pub fn in_flight(&self) -> usize {
        self.health.in_flight.load(Ordering::Relaxed)
    }
}

impl InstanceHealth {
    /// `now` is computed only when an ejection is on record: the common case reads one atomic.
    fn is_ejected(&self, now: &mut Option<u64>) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && *now.get_or_insert_with(now_ms) < until
    }

    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }
}

/// One healthy service instance, as Consul reported it.
#[derive(Debug, Clone)]
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
    pub health: Arc<InstanceHealth>,
}

/// Equal when discovery says the same thing; passive health is not part of identity.
impl PartialEq for Instance {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.authority == other.authority
            && self.tags == other.tags
            && self.meta == other.meta
    }
}

impl Eq for Instance {}

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
                health: Arc::default(),
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

    /// How many instances are ejected right now.
    pub fn ejected_count(&self) -> usize {
        let mut now = None;
        self.instances
            .iter()
            .filter(|i| i.health.is_ejected(&mut now))
            .count()
    }

    /// Draws beyond this fall back to a scan, bounding `pick` on large tables.
    const MAX_DRAWS: usize = 8;

    fn draw(&self, count: usize) -> usize {
        match self.balance {
            Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % count,
            Balance::Random => fastrand::usize(..count),
        }
    }

    /// Picks an instance: one neither tried by this request nor ejected if there is one, else
    /// an ejected one not tried, else any. Returns its index in this table.
    pub fn pick(&self, tried: &Tried) -> Option<(usize, &Instance)> {
        let count = self.instances.len();
        if count == 0 {
            return None;
        }
        let mut now = None;
        // Fresh draws first, so the turns of a skipped instance spread evenly over the others
        // instead of all landing on its neighbour.
        let mut start = None;
        for _ in 0..count.min(Self::MAX_DRAWS) {
            let i = self.draw(count);
            start.get_or_insert(i);
            if !tried.contains(i) && !self.instances[i].health.is_ejected(&mut now) {
                return Some((i, &self.instances[i]));
            }
        }
        let start = start.unwrap_or(0);
        let mut ejected_fallback = None;
        for offset in 0..count {
            let i = (start + offset) % count;
            if tried.contains(i) {
                continue;
            }
            if self.instances[i].health.is_ejected(&mut now) {
                ejected_fallback.get_or_insert(i);
                continue;
            }
            return Some((i, &self.instances[i]));
        }
        let index = ejected_fallback.unwrap_or(start);
        Some((index, &self.instances[index]))
    }
}

/// The most the retry budget holds: ten seconds of the minimum rate, and at least 100
/// retries, so a burst of failures (an instance crashing mid-request) is covered.
fn retry_budget_cap(config: &ServiceConfig) -> i64 {
    (i64::from(config.retry.budget_min_per_second) * 10).max(100) * MILLI
}

/// What `elapsed_ms` earns at `per_second` retries per second, in thousandths of a retry
/// (per_second retries per 1000 ms = per_second thousandths per ms).
fn time_refill(elapsed_ms: u64, per_second: u32) -> i64 {
    i64::try_from(elapsed_ms)
        .unwrap_or(i64::MAX / 4)
        .saturating_mul(i64::from(per_second))
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
    /// `now_ms()` of the first discovery error since the last success; 0 while healthy.
    failing_since_ms: AtomicU64,
    /// The retry budget, in thousandths of a retry: each request deposits
    /// `budget_percent` of one, time deposits `budget_min_per_second`, a retry takes one.
    retry_tokens: AtomicI64,
    retry_refilled_ms: AtomicU64,
}

/// Thousandths of a retry, the unit of the retry budget.
const MILLI: i64 = 1000;

impl Upstream {
    pub fn new(config: ServiceConfig, metrics: ServiceMetrics) -> Self {
        let table = ServiceTable::new(Vec::new(), config.balance);
        let retry_tokens = retry_budget_cap(&config);
        Self {
            config,
            metrics,
            table: ArcSwap::from_pointee(table),
            created: Instant::now(),
            last_sync_ms: AtomicU64::new(0),
            index: AtomicU64::new(0),
            failing_since_ms: AtomicU64::new(0),
            retry_tokens: AtomicI64::new(retry_tokens),
            retry_refilled_ms: AtomicU64::new(now_ms()),
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
        let mut candidate = ServiceTable::new(instances, self.config.balance);
        let current = self.table.load();
        if current.instances == candidate.instances {
            return false;
        }
        // An instance that stays keeps its passive health (and any ejection).
        for instance in candidate.instances.iter_mut() {
            if let Ok(i) = current
                .instances
                .binary_search_by(|old| old.id.as_str().cmp(&instance.id))
            {
                if current.instances[i].authority == instance.authority {
                    instance.health = current.instances[i].health.clone();
                }
            }
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

    /// Records a failed discovery query (the table is left as it is).
    pub fn record_discovery_error(&self) {
        let _ = self.failing_since_ms.compare_exchange(
            0,
            now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.metrics.consul_error();
    }

    /// How long discovery has been failing without a success in between; `None` while fine.
    pub fn failing_for(&self) -> Option<Duration> {
        match self.failing_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(now_ms().saturating_sub(since))),
        }
    }

    /// Whether the table is too stale to call the gateway ready.
    pub fn is_stale(&self, limit: Duration) -> bool {
        self.failing_for().is_some_and(|age| age > limit)
    }

    /// Credits the retry budget with one request (`budget_percent` of a retry).
    pub fn deposit_retry_budget(&self) {
        let cap = retry_budget_cap(&self.config);
        // Load first: at the cap (the common case when nothing fails) no write is needed.
        if self.retry_tokens.load(Ordering::Relaxed) < cap {
            self.retry_tokens.fetch_add(
                i64::from(self.config.retry.budget_percent) * MILLI / 100,
                Ordering::Relaxed,
            );
        }
    }

    /// Takes one retry from the budget; `false` (and counted) when it is spent. Retries are
    /// thus held to `budget_percent` of requests plus `budget_min_per_second`, with bursts up
    /// to the cap, as in Linkerd's retry budget: a crash that fails every in-flight request
    /// at once is retried, a sustained overload is not multiplied.
    pub fn try_take_retry(&self) -> bool {
        let retry = &self.config.retry;
        let cap = retry_budget_cap(&self.config);
        let now = now_ms();
        let elapsed = now.saturating_sub(self.retry_refilled_ms.swap(now, Ordering::Relaxed));
        let refill = time_refill(elapsed, retry.budget_min_per_second).min(cap);
        if refill > 0 {
            let before = self.retry_tokens.fetch_add(refill, Ordering::Relaxed);
            if before + refill > cap {
                self.retry_tokens.fetch_min(cap, Ordering::Relaxed);
            }
        }
        let taken = self
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                (tokens >= MILLI).then_some(tokens - MILLI)
            })
            .is_ok();
        if !taken {
            self.metrics.retry_budget_exhausted();
        }
        taken
    }

    /// A try on `instance` got an answer that was not a 5xx.
    pub fn record_success(&self, instance: &Instance) {
        // Read first: a store on every success would bounce the cache line between cores.
        if instance.health.consecutive_failures.load(Ordering::Relaxed) != 0 {
            instance
                .health
                .consecutive_failures
                .store(0, Ordering::Relaxed);
        }
    }

    /// A try on `instance` failed (connect error, lost connection or 5xx). Ejects it after
    /// `outlier.consecutive_failures` in a row, unless that would eject more than
    /// `outlier.max_ejected_percent` of `table`.
    pub fn record_failure(&self, table: &ServiceTable, instance: &Instance) {
        let outlier = &self.config.outlier;
        if outlier.consecutive_failures == 0 {
            return;
        }
        let health = &instance.health;
        let failures = health.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures || health.ejected_for().is_some() {
            return;
        }
        let total = table.instances().len();
        let ejected = table.ejected_count();
        if (ejected + 1) * 100 > total * outlier.max_ejected_percent as usize {
            warn!(
                service = self.name(),
                instance = %instance.id,
                ejected,
                total,
                "instance keeps failing but the ejection limit is reached; keeping it"
            );
            return;
        }
        let ejections = health.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = outlier
            .base_ejection_time
            .saturating_mul(ejections)
            .min(outlier.max_ejection_time);
        let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX / 2);
        health
            .ejected_until_ms
            .store(now_ms() + duration_ms, Ordering::Relaxed);
        health.consecutive_failures.store(0, Ordering::Relaxed);
        self.metrics.ejected();
        info!(
            service = self.name(),
            instance = %instance.id,
            failures,
            ?duration,
            "instance ejected"
        );
    }

    /// Records that Consul answered (a change detector, in catalog mode) without a new table.
    pub fn record_contact(&self) {
        self.failing_since_ms.store(0, Ordering::Relaxed);
        if self.is_synced() {
            self.touch_sync();
        }
    }

    fn touch_sync(&self) {
        let elapsed = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_sync_ms.store(elapsed + 1, Ordering::Relaxed);
        self.metrics.consul_success();
    }

    /// Records a successful discovery answer at `index`.
    pub fn record_sync(&self, index: u64) {
        self.failing_since_ms.store(0, Ordering::Relaxed);
        self.touch_sync();
        self.index.store(index, Ordering::Relaxed);
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
                    let fresh = Upstream::new(config.clone(), metrics.for_service(&config.name));
                    if old.config.tags == config.tags {
                        fresh.replace_instances(old.table().instances().to_vec());
                        if old.is_synced() {
                            fresh.record_sync(old.index());
                        }
                    }
                    Arc::new(fresh)
                }
                None => Arc::new(Upstream::new(
                    config.clone(),
                    metrics.for_service(&config.name),
                )),
            })
            .collect();
        Upstreams { services }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.services.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.services.iter().find(|u| u.name() == name)
    }
}

/// A subset of the services (e.g. those one watch covers), in the given order.
impl FromIterator<Arc<Upstream>> for Upstreams {
    fn from_iter<I: IntoIterator<Item = Arc<Upstream>>>(iter: I) -> Self {
        Upstreams {
            services: iter.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OutlierConfig, RetryConfig, RouteConfig};

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
            let (i, _) = table.pick(&Tried::default()).unwrap();
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
        let table = ServiceTable::new((0..2).map(instance).collect(), Balance::RoundRobin);
        for i in table.instances() {
            i.health
                .ejected_until_ms
                .store(now_ms() + 60_000, Ordering::Relaxed);
        }
        assert!(table.pick(&Tried::default()).is_some());
    }

    #[test]
    fn retry_budget_allows_bursts_and_holds_the_rate() {
        let metrics = Metrics::new().unwrap();
        let upstream = Upstream::new(service(Balance::RoundRobin), metrics.for_service("svc"));
        // A full budget covers a burst of 100 retries (an instance dying mid-request)...
        let burst = (0..150).filter(|_| upstream.try_take_retry()).count();
        assert!((100..=102).contains(&burst), "{burst}");
        // ...then retries are earned: 20% of requests (50 requests buy 10 retries).
        upstream
            .retry_refilled_ms
            .store(now_ms(), Ordering::Relaxed);
        for _ in 0..50 {
            upstream.deposit_retry_budget();
        }
        let earned = (0..20).filter(|_| upstream.try_take_retry()).count();
        assert!((10..=11).contains(&earned), "{earned}");
        // Spent: no more until requests or time earn some.
        upstream.retry_tokens.store(0, Ordering::Relaxed);
        upstream
            .retry_refilled_ms
            .store(now_ms(), Ordering::Relaxed);
        assert!(!upstream.try_take_retry());
        // Time earns budget_min_per_second: 10/s is 5 retries in half a second.
        assert_eq!(time_refill(500, 10), 5 * MILLI);
        assert_eq!(time_refill(u64::MAX, 10), i64::MAX, "saturates");
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
