//! Prometheus metrics: one registry per gateway, with per-service handles resolved once.
//!
//! The request path never calls `with_label_values`: each service gets a `ServiceMetrics`
//! holding its counters, and status-code counters are resolved on the first use of each code
//! and cached in a lock-free slot. Label values come from configuration and Consul service
//! names, never from request paths, so cardinality is bounded by the config. This module
//! imports no other module of the crate.
//!
//! A service's series live as long as its handles: every [`ServiceMetrics`] for one service
//! shares a lease, and when the last one is dropped (the service left the config, its watch
//! stopped, the requests it was serving finished and no scrape is reading it) all its series
//! are removed from the families. Removing them any earlier would let a late write through a
//! handle resolved before (a status code seen for the first time) recreate a series nobody
//! removes again. A service changed by a reload resolves its handles while the old ones are
//! still held, so it shares the lease and its series simply continue. A handle taken out of
//! a `ServiceMetrics` (the upgraded-connections gauge an open WebSocket holds) may outlive
//! the lease: its later writes are not exported, and being pre-resolved they never recreate
//! a removed series.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The values of the `source` label (`services[].source`).
pub const SOURCES: [&str; 5] = ["consul", "etcd", "zookeeper", "dns", "static"];

/// The `service` label of requests that matched no route.
pub const UNROUTED: &str = "unrouted";

/// Latency buckets from 250µs to 10s: a proxy's added latency lives in the low end.
const DURATION_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How many of one set's Consul services have a blocking query of their own and how many are
/// watched in catalog mode (`switchyard_consul_watched_services`).
#[derive(Clone, Debug)]
pub struct ConsulWatchedGauges {
    pub per_service: IntGauge,
    pub catalog: IntGauge,
}

/// Every metric family of the gateway.
pub struct Metrics {
    registry: Registry,
    per_service: Arc<PerService>,
    /// By `source` (consul, dns, ...): per source, not per service, so never removed.
    propagation: HistogramVec,
    access_log_dropped: IntCounter,
    tls_handshakes: IntCounterVec,
    connections: ConnectionFamilies,
    /// Consul services by how they are watched (a handful of series, never removed).
    consul_watched: IntGaugeVec,
}

/// The families labelled by service, and the lease of each service label in use.
struct PerService {
    requests: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    instances: IntGaugeVec,
    table_updates: IntCounterVec,
    consul_errors: IntCounterVec,
    /// By service and source (every source, Consul too).
    discovery_errors: IntCounterVec,
    consul_last_success: GaugeVec,
    consul_hung: IntCounterVec,
    consul_failing: GaugeVec,
    ejections: IntCounterVec,
    ejected: IntGaugeVec,
    retry_budget_exhausted: IntCounterVec,
    upgraded: IntGaugeVec,
    /// Held only while handles are resolved and while series are removed, never per request.
    leases: Mutex<HashMap<String, Weak<SeriesLease>>>,
}

impl PerService {
    fn leases(&self) -> MutexGuard<'_, HashMap<String, Weak<SeriesLease>>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes every series labelled `service` (absent ones are no error).
    fn remove(&self, service: &str) {
        for code in (100..=599).map(|c: u16| c.to_string()) {
            let _ = self.requests.remove_label_values(&[service, code.as_str()]);
        }
        let _ = self.requests.remove_label_values(&[service, "other"]);
        let _ = self.duration.remove_label_values(&[service]);
        let _ = self.instances.remove_label_values(&[service]);
        let _ = self.ejected.remove_label_values(&[service]);
        let _ = self.upgraded.remove_label_values(&[service]);
        let _ = self.consul_last_success.remove_label_values(&[service]);
        let _ = self.consul_failing.remove_label_values(&[service]);
        for source in SOURCES {
            let _ = self
                .discovery_errors
                .remove_label_values(&[service, source]);
        }
        for counter in [
            &self.retries,
            &self.table_updates,
            &self.consul_errors,
            &self.consul_hung,
            &self.ejections,
            &self.retry_budget_exhausted,
        ] {
            let _ = counter.remove_label_values(&[service]);
        }
    }
}

/// Keeps one service's series in the families; the last holder to drop it removes them.
struct SeriesLease {
    service: String,
    families: Arc<PerService>,
}

impl Drop for SeriesLease {
    fn drop(&mut self) {
        let mut leases = self.families.leases();
        // A lease taken for the same service since this one died (a service re-added) is
        // alive and keeps the series; only a dead entry means nobody can write them.
        if leases
            .get(&self.service)
            .is_some_and(|lease| lease.strong_count() == 0)
        {
            leases.remove(&self.service);
            self.families.remove(&self.service);
        }
    }
}

/// Registers `collector` in `registry` and gives it back: a family is made and registered in
/// one step.
fn register<C>(registry: &Registry, collector: C) -> Result<C, prometheus::Error>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// A family labelled by service, made by `make` (`IntCounterVec::new`, `GaugeVec::new`, ...).
fn by_service<C>(
    registry: &Registry,
    make: fn(Opts, &[&str]) -> Result<C, prometheus::Error>,
    name: &str,
    help: &str,
) -> Result<C, prometheus::Error>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    register(registry, make(Opts::new(name, help), &["service"])?)
}

impl PerService {
    /// The families labelled by service: requests and retries (the gateway), the table and
    /// outlier detection (upstream), discovery and Consul errors (discovery), upgrades.
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "switchyard_requests_total",
                    "Requests answered, by service and status code.",
                ),
                &["service", "code"],
            )?,
        )?;
        let duration = register(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "switchyard_request_duration_seconds",
                    "Time from request received to response head sent, all tries included.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["service"],
            )?,
        )?;
        let discovery_errors = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "switchyard_discovery_errors_total",
                    "Failed discovery attempts (queries, lookups, watches), by service and source.",
                ),
                &["service", "source"],
            )?,
        )?;
        Ok(Self {
            requests,
            duration,
            retries: by_service(
                registry,
                IntCounterVec::new,
                "switchyard_retries_total",
                "Tries after the first, by service.",
            )?,
            instances: by_service(
                registry,
                IntGaugeVec::new,
                "switchyard_upstream_instances",
                "Healthy instances in the current table.",
            )?,
            table_updates: by_service(
                registry,
                IntCounterVec::new,
                "switchyard_table_updates_total",
                "Times a service's instance table was replaced with a different set.",
            )?,
            consul_errors: by_service(
                registry,
                IntCounterVec::new,
                "switchyard_consul_errors_total",
                "Failed Consul queries, by service.",
            )?,
            discovery_errors,
            consul_last_success: by_service(
                registry,
                GaugeVec::new,
                "switchyard_consul_last_success_timestamp_seconds",
                "Unix time of the last successful Consul answer, by service.",
            )?,
            consul_hung: by_service(
                registry,
                IntCounterVec::new,
                "switchyard_consul_hung_queries_total",
                "Consul long-polls cut by the watchdog after hanging past wait plus slack.",
            )?,
            consul_failing: by_service(
                registry,
                GaugeVec::new,
                "switchyard_consul_failing_seconds",
                "How long Consul queries have failed without a success in between (0 when fine).",
            )?,
            ejections: by_service(
                registry,
                IntCounterVec::new,
                "switchyard_ejections_total",
                "Instances ejected by passive outlier detection.",
            )?,
            ejected: by_service(
                registry,
                IntGaugeVec::new,
                "switchyard_ejected_instances",
                "Instances ejected right now.",
            )?,
            retry_budget_exhausted: by_service(
                registry,
                IntCounterVec::new,
                "switchyard_retry_budget_exhausted_total",
                "Retries refused because the retry budget was spent.",
            )?,
            upgraded: by_service(
                registry,
                IntGaugeVec::new,
                "switchyard_upgraded_connections",
                "Upgraded (WebSocket and other) connections spliced to an instance now.",
            )?,
            leases: Mutex::new(HashMap::new()),
        })
    }
}

impl Metrics {
    /// Builds and registers all families. Fails only on a programming error (duplicate names).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let per_service = Arc::new(PerService::register(&registry)?);
        let propagation = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "switchyard_propagation_seconds",
                    "Time from a source reporting a change (a Consul watch or change detector answering, a DNS lookup, ...) to the new table being swapped in, by source.",
                )
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
                &["source"],
            )?,
        )?;
        let access_log_dropped = register(
            &registry,
            IntCounter::new(
                "switchyard_access_log_dropped_total",
                "Access log entries dropped because the writer fell behind.",
            )?,
        )?;
        let tls_handshakes = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "switchyard_tls_handshakes_total",
                    "TLS handshakes on the TLS listener, by result: ok, error (failed or not TLS), timeout (not done within server.header_read_timeout).",
                ),
                &["result"],
            )?,
        )?;
        let connections = ConnectionFamilies::register(&registry)?;
        let consul_watched = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "switchyard_consul_watched_services",
                    "Consul services by how they are watched now: mode per_service (a blocking query each) or catalog; set file (the config's services) or tags (found by tag routes).",
                ),
                &["set", "mode"],
            )?,
        )?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            per_service,
            propagation,
            access_log_dropped,
            tls_handshakes,
            connections,
            consul_watched,
        })
    }

    /// The gauges of how the Consul services of `set` ("file" or "tags") are watched.
    pub fn consul_watched(&self, set: &str) -> ConsulWatchedGauges {
        ConsulWatchedGauges {
            per_service: self.consul_watched.with_label_values(&[set, "per_service"]),
            catalog: self.consul_watched.with_label_values(&[set, "catalog"]),
        }
    }

    /// Handles for one listener's connection lifecycle (`listener`: "gateway", "admin", ...),
    /// on worker 0.
    pub fn for_connections(&self, listener: &str) -> ConnectionMetrics {
        self.connections.for_listener(listener, "0")
    }

    /// The same for `worker` (`workers: N` runs one accept loop per worker).
    pub fn for_worker_connections(&self, listener: &str, worker: usize) -> ConnectionMetrics {
        self.connections.for_listener(listener, &worker.to_string())
    }

    /// The handshake counters of the TLS listener, resolved once (each series starts at 0).
    pub fn tls_handshakes(&self) -> HandshakeMetrics {
        HandshakeMetrics {
            ok: self.tls_handshakes.with_label_values(&["ok"]),
            error: self.tls_handshakes.with_label_values(&["error"]),
            timeout: self.tls_handshakes.with_label_values(&["timeout"]),
        }
    }

    /// The counter of access log entries dropped on overflow.
    pub fn access_log_dropped(&self) -> IntCounter {
        self.access_log_dropped.clone()
    }

    /// Request counters for a label that lives as long as the gateway ([`UNROUTED`]); a
    /// service's come with [`Metrics::for_service`].
    pub fn for_requests(&self, label: &str) -> RequestMetrics {
        RequestMetrics::new(&self.per_service, label, None)
    }

    /// [`Metrics::for_service_from`] for a Consul service (tag routes, tests).
    pub fn for_service(&self, service: &str) -> ServiceMetrics {
        self.for_service_from(service, "consul")
    }

    /// Resolves every handle one service of `source` needs. Call once per service (and again
    /// for a service a reload changed); the series stay while any of the handles does.
    pub fn for_service_from(&self, service: &str, source: &str) -> ServiceMetrics {
        let families = &self.per_service;
        // Resolved under the lock, so a dying lease cannot remove series resolved here.
        let mut leases = families.leases();
        let lease = match leases.get(service).and_then(Weak::upgrade) {
            Some(lease) => lease,
            None => {
                let lease = Arc::new(SeriesLease {
                    service: service.to_owned(),
                    families: families.clone(),
                });
                leases.insert(service.to_owned(), Arc::downgrade(&lease));
                lease
            }
        };
        let label = &[service];
        ServiceMetrics {
            requests: RequestMetrics::new(families, service, Some(lease)),
            retries: families.retries.with_label_values(label),
            instances: families.instances.with_label_values(label),
            table_updates: families.table_updates.with_label_values(label),
            consul_errors: (source == "consul")
                .then(|| families.consul_errors.with_label_values(label)),
            discovery_errors: families
                .discovery_errors
                .with_label_values(&[service, source]),
            consul_last_success: families.consul_last_success.with_label_values(label),
            consul_hung: families.consul_hung.with_label_values(label),
            consul_failing: families.consul_failing.with_label_values(label),
            ejections: families.ejections.with_label_values(label),
            ejected: families.ejected.with_label_values(label),
            retry_budget_exhausted: families.retry_budget_exhausted.with_label_values(label),
            propagation: self.propagation.with_label_values(&[source]),
            upgraded: families.upgraded.with_label_values(label),
        }
    }

    /// The text exposition format, ready for `/metrics`.
    pub fn encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut buffer = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        Ok(buffer)
    }
}

/// `switchyard_tls_handshakes_total{result}`, one handle per result.
#[derive(Clone)]
pub struct HandshakeMetrics {
    pub ok: IntCounter,
    pub error: IntCounter,
    pub timeout: IntCounter,
}

/// The families of client-connection series, labelled by listener.
struct ConnectionFamilies {
    open: IntGaugeVec,
    closed: IntCounterVec,
    resets: IntCounterVec,
}

impl ConnectionFamilies {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let open = IntGaugeVec::new(
            Opts::new(
                "switchyard_client_connections",
                "Client connections open now, by listener.",
            ),
            &["listener", "worker"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "switchyard_client_connections_closed_total",
                "Client connections the gateway closed itself, by listener and reason: \
                 first_request_timeout, idle, per_client_limit (refused at accept).",
            ),
            &["listener", "worker", "reason"],
        )?;
        let resets = IntCounterVec::new(
            Opts::new(
                "switchyard_client_resets_total",
                "Requests the client abandoned before their answer (HTTP/2 RST_STREAM, closed connection).",
            ),
            &["listener", "worker"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        registry.register(Box::new(resets.clone()))?;
        Ok(Self {
            open,
            closed,
            resets,
        })
    }

    fn for_listener(&self, listener: &str, worker: &str) -> ConnectionMetrics {
        let closed = |reason: &str| self.closed.with_label_values(&[listener, worker, reason]);
        ConnectionMetrics {
            open: self.open.with_label_values(&[listener, worker]),
            first_request_timeout: closed("first_request_timeout"),
            idle: closed("idle"),
            per_client_limit: closed("per_client_limit"),
            resets: self.resets.with_label_values(&[listener, worker]),
        }
    }
}

/// Pre-resolved connection series of one listener.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: IntGauge,
    /// Closed because no request started within the header read timeout.
    pub first_request_timeout: IntCounter,
    /// Closed after `server.idle_timeout` without a request.
    pub idle: IntCounter,
    /// Refused at accept: the client address already holds its share.
    pub per_client_limit: IntCounter,
    /// Requests abandoned by the client before their answer.
    pub resets: IntCounter,
}

/// Status codes 100..=599 each get a slot; anything else shares the last one.
const CODE_SLOTS: usize = 501;
/// Slots are allocated in groups of this many codes, when a code of the group is first
/// counted: 501 slots up front took 8 KB per service (8.0 MB of heap at 1,000 watched
/// services, heaptrack), for the handful of codes a service answers.
const CODE_GROUP: usize = 10;
const CODE_GROUPS: usize = CODE_SLOTS.div_ceil(CODE_GROUP);

/// The counters of one group of [`CODE_GROUP`] status codes, each resolved when first used.
type CodeGroup = [OnceLock<IntCounter>; CODE_GROUP];

/// Request count and latency for one `service` label.
pub struct RequestMetrics {
    requests: IntCounterVec,
    service: String,
    /// [`CODE_GROUPS`] groups of slots (slot = status - 100), each allocated when first used.
    codes: Box<[OnceLock<Box<CodeGroup>>]>,
    duration: Histogram,
    /// Keeps the service's series (a code counter may still be resolved through this);
    /// `None` for labels never removed.
    _lease: Option<Arc<SeriesLease>>,
}

/// One service's handles, resolved at start.
pub struct ServiceMetrics {
    pub requests: RequestMetrics,
    retries: IntCounter,
    instances: IntGauge,
    table_updates: IntCounter,
    /// `Some` for a Consul service only: the Consul family keeps its meaning.
    consul_errors: Option<IntCounter>,
    discovery_errors: IntCounter,
    consul_last_success: Gauge,
    consul_hung: IntCounter,
    consul_failing: Gauge,
    ejections: IntCounter,
    ejected: IntGauge,
    retry_budget_exhausted: IntCounter,
    propagation: Histogram,
    upgraded: IntGauge,
}

impl RequestMetrics {
    fn new(families: &PerService, service: &str, lease: Option<Arc<SeriesLease>>) -> Self {
        RequestMetrics {
            requests: families.requests.clone(),
            service: service.to_owned(),
            codes: (0..CODE_GROUPS).map(|_| OnceLock::new()).collect(),
            duration: families.duration.with_label_values(&[service]),
            _lease: lease,
        }
    }

    /// Counts one answered request and its latency.
    pub fn observe_request(&self, status: u16, elapsed: Duration) {
        // Out-of-range codes all share the last slot, so no two slots hold the same
        // "other" counter (a clamp would have put codes below 100 in status 100's slot).
        let slot = if (100..=599).contains(&status) {
            usize::from(status - 100)
        } else {
            CODE_SLOTS - 1
        };
        self.codes[slot / CODE_GROUP]
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())))[slot % CODE_GROUP]
            .get_or_init(|| {
                let code = if (100..=599).contains(&status) {
                    status.to_string()
                } else {
                    "other".to_owned()
                };
                self.requests
                    .with_label_values(&[self.service.as_str(), code.as_str()])
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Requests answered so far, every status code together.
    pub fn total(&self) -> u64 {
        self.count(|_| true)
    }

    /// Requests answered so far with a 5xx status.
    pub fn errors_5xx(&self) -> u64 {
        self.count(|slot| (400..500).contains(&slot))
    }

    /// Sums the counters of the code slots `slot` selects (slot = status - 100). Reads
    /// atomics only; for the admin endpoints, not the request path.
    fn count(&self, slot: impl Fn(usize) -> bool) -> u64 {
        let groups = self.codes.iter().enumerate();
        let groups = groups.filter_map(|(g, group)| Some((g * CODE_GROUP, group.get()?)));
        groups
            .flat_map(|(first, group)| group.iter().enumerate().map(move |(i, c)| (first + i, c)))
            .filter(|(i, _)| slot(*i))
            .filter_map(|(_, code)| code.get())
            .map(IntCounter::get)
            .sum()
    }
}

impl ServiceMetrics {
    /// The gauge of this service's upgraded connections.
    pub fn upgraded(&self) -> IntGauge {
        self.upgraded.clone()
    }

    pub fn inc_retries(&self) {
        self.retries.inc();
    }

    pub fn table_replaced(&self, instance_count: usize) {
        self.table_updates.inc();
        self.instances
            .set(i64::try_from(instance_count).unwrap_or(i64::MAX));
    }

    /// A failed discovery attempt of the service's source.
    pub fn discovery_error(&self) {
        self.discovery_errors.inc();
        if let Some(consul) = &self.consul_errors {
            consul.inc();
        }
    }

    pub fn consul_hung(&self) {
        self.consul_hung.inc();
    }

    pub fn ejected(&self) {
        self.ejections.inc();
    }

    pub fn observe_propagation(&self, elapsed: Duration) {
        self.propagation.observe(elapsed.as_secs_f64());
    }

    pub fn retry_budget_exhausted(&self) {
        self.retry_budget_exhausted.inc();
    }

    /// Gauges that depend on the clock, refreshed just before each scrape.
    pub fn refresh(&self, failing_for: Option<Duration>, ejected_now: usize) {
        self.consul_failing
            .set(failing_for.map_or(0.0, |age| age.as_secs_f64()));
        self.ejected
            .set(i64::try_from(ejected_now).unwrap_or(i64::MAX));
    }

    pub fn consul_success(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.consul_last_success.set(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counter_uses_code_label() {
        let metrics = Metrics::new().unwrap();
        let hello = metrics.for_service("hello");
        for _ in 0..3 {
            hello
                .requests
                .observe_request(200, Duration::from_millis(1));
        }
        hello
            .requests
            .observe_request(503, Duration::from_millis(1));
        let text = String::from_utf8(metrics.encode().unwrap()).unwrap();
        assert!(
            text.contains(r#"switchyard_requests_total{code="200",service="hello"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"switchyard_requests_total{code="503",service="hello"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"switchyard_request_duration_seconds_count{service="hello"} 4"#));
    }

    fn series_of(metrics: &Metrics, service: &str) -> Vec<String> {
        let text = String::from_utf8(metrics.encode().unwrap()).unwrap();
        let label = format!("service=\"{service}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .map(str::to_owned)
            .collect()
    }

    fn exercise(service: &ServiceMetrics) {
        service
            .requests
            .observe_request(200, Duration::from_millis(1));
        service
            .requests
            .observe_request(502, Duration::from_millis(1));
        service
            .requests
            .observe_request(42, Duration::from_millis(1));
        service.inc_retries();
        service.table_replaced(2);
        service.discovery_error();
        service.consul_hung();
        service.ejected();
        service.retry_budget_exhausted();
        service.consul_success();
        service.refresh(Some(Duration::from_secs(1)), 1);
    }

    #[test]
    fn series_go_when_the_last_handle_of_their_service_does() {
        let metrics = Metrics::new().unwrap();
        let (gone, kept) = (metrics.for_service("gone"), metrics.for_service("kept"));
        exercise(&gone);
        exercise(&kept);
        let all = series_of(&metrics, "gone").len();
        assert!(all >= 29, "{all}");
        // A changed service: new handles for the same label share the series...
        let rebuilt = metrics.for_service("gone");
        drop(gone);
        assert_eq!(series_of(&metrics, "gone").len(), all);
        rebuilt
            .requests
            .observe_request(200, Duration::from_millis(1));
        let text = String::from_utf8(metrics.encode().unwrap()).unwrap();
        assert!(
            text.contains(r#"switchyard_requests_total{code="200",service="gone"} 2"#),
            "the count continues: {text}"
        );
        // ...and the last one to go takes them along, and only them.
        drop(rebuilt);
        assert_eq!(series_of(&metrics, "gone"), Vec::<String>::new());
        assert_eq!(series_of(&metrics, "kept").len(), all);
        // Added again: fresh series, removed again with their handles.
        let again = metrics.for_service("gone");
        again
            .requests
            .observe_request(204, Duration::from_millis(1));
        let text = String::from_utf8(metrics.encode().unwrap()).unwrap();
        assert!(
            text.contains(r#"switchyard_requests_total{code="204",service="gone"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"code="200",service="gone""#), "{text}");
        drop(again);
        assert!(series_of(&metrics, "gone").is_empty());
    }

    #[test]
    fn code_slots_are_allocated_per_group_when_first_used() {
        let metrics = Metrics::new().unwrap();
        let hello = metrics.for_service("hello");
        let allocated = |r: &RequestMetrics| r.codes.iter().filter(|g| g.get().is_some()).count();
        assert_eq!(allocated(&hello.requests), 0);
        for status in [200, 204, 200, 503] {
            hello
                .requests
                .observe_request(status, Duration::from_millis(1));
        }
        assert_eq!(allocated(&hello.requests), 2, "200..209 and 500..509");
        assert_eq!(hello.requests.total(), 4);
        assert_eq!(hello.requests.errors_5xx(), 1);
    }

    #[test]
    fn totals_count_every_code_and_5xx_alone() {
        let metrics = Metrics::new().unwrap();
        let hello = metrics.for_service("hello");
        for status in [200, 204, 404, 499, 500, 502, 599, 600, 42] {
            hello
                .requests
                .observe_request(status, Duration::from_millis(1));
        }
        assert_eq!(hello.requests.total(), 9);
        assert_eq!(hello.requests.errors_5xx(), 3);
    }
}
