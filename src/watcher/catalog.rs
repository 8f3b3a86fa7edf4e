//! Catalog mode: watching many services over a bounded number of Consul connections.
//!
//! One blocking query per service cannot scale: Consul refuses more than 200 HTTP connections
//! per client address by default (`limits.http_max_conns_per_client`), and 1,000 long-polls
//! cost 1,000 sockets on both sides. In catalog mode two blocking queries detect change for
//! the whole catalog, and only the services that changed are fetched:
//!
//! - `/v1/health/state/any` wakes on every check change. Diffing its checks (by node and
//!   check ID, comparing `ModifyIndex`) names the services whose health changed, including
//!   registrations and deregistrations of instances that have checks.
//! - `/v1/catalog/services` wakes on every service registration. A change whose raft index no
//!   check change explains (an instance registered without checks) cannot be attributed, so
//!   it triggers a sweep of every watched service.
//!
//! Fetches are non-blocking `health/service` queries, at most `consul.max_connections - 2`
//! at once, and one at a time per service so each table still has a single writer.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Backoff, ConsulDiscovery, Discovery, DiscoveryError, IndexStep, TokenBucket, WatchPacing,
};
use super::{RATE_BURST, RATE_INTERVAL};
use crate::upstream::{Upstream, Upstreams};

/// Raft indexes of recent check changes, kept to explain catalog changes that arrive later.
const EXPLAINED_MEMORY: usize = 4096;
/// How long a catalog change may wait for the checks detector to explain it before every
/// service is swept. Encoding `/v1/health/state/any` takes Consul ~50-130 ms at 10,000 checks.
const EXPLAIN_GRACE: Duration = Duration::from_millis(300);

/// One check of `/v1/health/state/any`, borrowing from the body where JSON allows: a large
/// catalog answers with megabytes of checks on every change.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckEntry<'a> {
    #[serde(borrow)]
    node: Cow<'a, str>,
    #[serde(rename = "CheckID", borrow)]
    check_id: Cow<'a, str>,
    #[serde(default, borrow)]
    service_name: Cow<'a, str>,
    modify_index: u64,
}

/// Every check in the catalog: hash of (node, check ID) -> (service name, ModifyIndex).
/// A 64-bit hash collision among a catalog's checks would cost at most one missed or extra
/// fetch, and the odds are negligible next to keeping 10,000 key strings.
type ChecksSnapshot = HashMap<u64, (String, u64)>;

fn check_key(node: &str, check_id: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (node, check_id).hash(&mut hasher);
    hasher.finish()
}

/// What changed between two check snapshots.
#[derive(Debug, Default, PartialEq)]
struct ChecksDiff {
    services: HashSet<String>,
    /// Raft indexes at which the changes happened.
    indexes: Vec<u64>,
}

fn snapshot(entries: Vec<CheckEntry<'_>>) -> ChecksSnapshot {
    entries
        .into_iter()
        .map(|c| {
            (
                check_key(&c.node, &c.check_id),
                (c.service_name.into_owned(), c.modify_index),
            )
        })
        .collect()
}

/// Services whose checks were added, changed or removed; `index` is the checks table's index
/// (the raft index of a removal, which leaves no ModifyIndex behind).
fn diff_checks(old: &ChecksSnapshot, new: &ChecksSnapshot, index: u64) -> ChecksDiff {
    let mut diff = ChecksDiff::default();
    for (key, (service, modify_index)) in new {
        if old
            .get(key)
            .is_none_or(|(_, previous)| previous != modify_index)
        {
            diff.indexes.push(*modify_index);
            if !service.is_empty() {
                diff.services.insert(service.clone());
            }
        }
    }
    for (key, (service, _)) in old {
        if !new.contains_key(key) {
            diff.indexes.push(index);
            if !service.is_empty() {
                diff.services.insert(service.clone());
            }
        }
    }
    diff
}

/// What the detectors report to the coordinator.
enum Event {
    Checks {
        index: u64,
        snapshot: ChecksSnapshot,
    },
    Catalog {
        index: u64,
        names: HashSet<String>,
    },
    /// A detector's blocking query returned with no change: Consul is reachable.
    Contact,
    Failed(DiscoveryError),
    /// A fetch for this service finished (applied or failed).
    Fetched(String),
}

#[derive(Clone, Copy)]
enum Detector {
    Checks,
    Catalog,
}

/// One change detector: a blocking query loop on a catalog-wide endpoint.
async fn detect(
    kind: Detector,
    discovery: Arc<ConsulDiscovery>,
    events: mpsc::Sender<Event>,
    pacing: WatchPacing,
    shutdown: CancellationToken,
) {
    let path = match kind {
        Detector::Checks => "/v1/health/state/any",
        Detector::Catalog => "/v1/catalog/services",
    };
    let mut index = 0u64;
    let mut bucket = TokenBucket::new(RATE_BURST, RATE_INTERVAL);
    let mut backoff = Backoff::new(pacing.backoff_base, pacing.backoff_max);
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = async {
                bucket.acquire().await;
                discovery.get(path, index, |_| {}).await
            } => result,
        };
        let event = match result {
            Ok((answered, body)) => {
                backoff.reset();
                let step = IndexStep::from_indexes(index, answered);
                index = step.next_index();
                if let IndexStep::Unchanged { .. } = step {
                    Event::Contact
                } else {
                    match parse(kind, answered, &body) {
                        Ok(event) => event,
                        Err(error) => Event::Failed(error),
                    }
                }
            }
            Err(error) => Event::Failed(error),
        };
        let failed = matches!(event, Event::Failed(_));
        if events.send(event).await.is_err() {
            return;
        }
        if failed {
            index = 0;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

fn parse(kind: Detector, index: u64, body: &[u8]) -> Result<Event, DiscoveryError> {
    Ok(match kind {
        Detector::Checks => {
            let entries: Vec<CheckEntry> =
                serde_json::from_slice(body).map_err(DiscoveryError::Decode)?;
            Event::Checks {
                index,
                snapshot: snapshot(entries),
            }
        }
        Detector::Catalog => {
            let services: HashMap<String, serde_json::Value> =
                serde_json::from_slice(body).map_err(DiscoveryError::Decode)?;
            Event::Catalog {
                index,
                names: services.into_keys().collect(),
            }
        }
    })
}

/// Per-service fetch bookkeeping: one fetch at a time, and another after it if the service
/// changed again meanwhile.
#[derive(Default)]
struct FetchState {
    running: bool,
    again: bool,
}

struct Coordinator {
    discovery: Arc<ConsulDiscovery>,
    upstreams: Upstreams,
    by_name: HashMap<String, Arc<Upstream>>,
    slots: Arc<Semaphore>,
    events: mpsc::Sender<Event>,
    fetches: HashMap<String, FetchState>,
    checks: Option<ChecksSnapshot>,
    catalog: Option<(u64, HashSet<String>)>,
    explained: VecDeque<u64>,
    /// A catalog change waiting for the checks detector, and until when.
    unexplained: Option<(u64, tokio::time::Instant)>,
    recovering: bool,
    /// This coordinator's stop: its fetches must not write tables once a successor (after a
    /// config reload) may be writing them.
    shutdown: CancellationToken,
}

impl Coordinator {
    fn mark_dirty<'a>(&mut self, names: impl IntoIterator<Item = &'a String>) {
        let now = Instant::now();
        for name in names {
            let Some(upstream) = self.by_name.get(name).cloned() else {
                continue; // a service this gateway does not route
            };
            let state = self.fetches.entry(name.clone()).or_default();
            if state.running {
                state.again = true;
                continue;
            }
            state.running = true;
            self.spawn_fetch(upstream, now);
        }
    }

    fn spawn_fetch(&self, upstream: Arc<Upstream>, woke: Instant) {
        let (discovery, slots, events, stopped) = (
            self.discovery.clone(),
            self.slots.clone(),
            self.events.clone(),
            self.shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Ok(_slot) = slots.acquire().await {
                let fetched = tokio::select! {
                    _ = stopped.cancelled() => return,
                    fetched = discovery.fetch(&upstream.config, 0) => fetched,
                };
                if stopped.is_cancelled() {
                    return; // one table, one writer: a successor owns it now
                }
                match fetched {
                    Ok(answer) => {
                        let count = answer.instances.len();
                        if upstream.replace_instances(answer.instances) {
                            upstream.metrics.observe_propagation(woke.elapsed());
                            info!(
                                service = upstream.name(),
                                index = answer.index,
                                instances = count,
                                "table updated"
                            );
                        }
                        upstream.record_sync(answer.index);
                    }
                    Err(error) => {
                        warn!(service = upstream.name(), %error, "Consul fetch failed; keeping the last table");
                        upstream.record_discovery_error();
                    }
                }
            }
            let _ = events
                .send(Event::Fetched(upstream.name().to_owned()))
                .await;
        });
    }

    fn sweep(&mut self, why: &str) {
        debug!(
            why,
            services = self.by_name.len(),
            "sweeping every watched service"
        );
        let names: Vec<String> = self.by_name.keys().cloned().collect();
        self.mark_dirty(&names);
    }

    fn remember(&mut self, indexes: &[u64]) {
        for &index in indexes {
            if self.explained.len() == EXPLAINED_MEMORY {
                self.explained.pop_front();
            }
            self.explained.push_back(index);
        }
    }

    /// Applies a new checks snapshot: fetches the services it names, remembers its indexes.
    fn on_checks(&mut self, index: u64, snapshot: ChecksSnapshot) {
        if let Some(old) = &self.checks {
            let diff = diff_checks(old, &snapshot, index);
            self.remember(&diff.indexes);
            self.mark_dirty(&diff.services);
        }
        self.checks = Some(snapshot);
        if let Some((index, _)) = self.unexplained {
            if self.explained.contains(&index) {
                self.unexplained = None;
            }
        }
    }

    fn on_catalog(&mut self, index: u64, names: HashSet<String>) {
        let Some((previous_index, previous_names)) = self.catalog.replace((index, names)) else {
            return; // the baseline
        };
        let (_, names) = self.catalog.as_ref().expect("just set");
        let renamed: Vec<String> = names
            .symmetric_difference(&previous_names)
            .cloned()
            .collect();
        self.mark_dirty(&renamed);
        if index != previous_index && !self.explained.contains(&index) {
            // The checks detector may not have woken yet for the same write.
            self.unexplained = Some((index, tokio::time::Instant::now() + EXPLAIN_GRACE));
        }
    }

    /// Sweeps if the catalog change still waits for an explanation.
    fn explain_or_sweep(&mut self) {
        if let Some((index, _)) = self.unexplained.take() {
            if !self.explained.contains(&index) {
                // An instance registered without checks (or an unattributable change).
                self.sweep("catalog change not explained by a check change");
            }
        }
    }

    fn on_fetched(&mut self, name: String) {
        let Some(state) = self.fetches.get_mut(&name) else {
            return;
        };
        if state.again {
            state.again = false;
            if let Some(upstream) = self.by_name.get(&name).cloned() {
                self.spawn_fetch(upstream, Instant::now());
                return;
            }
        }
        state.running = false;
    }

    /// A detector answered: Consul is reachable. Once both detectors have a baseline (at
    /// start, and after an outage) sweep every service: any change before the baselines is
    /// caught by the sweep, any change after them wakes a detector.
    fn recovered(&mut self) {
        self.contact();
        if self.recovering && self.checks.is_some() && self.catalog.is_some() {
            self.recovering = false;
            self.sweep("detectors have baselines");
        }
    }

    fn contact(&self) {
        for upstream in self.upstreams.iter() {
            upstream.record_contact();
        }
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Watches every service of `upstreams` with two detectors and targeted fetches, using at
/// most `max_connections` connections to Consul.
pub async fn watch_catalog(
    discovery: Arc<ConsulDiscovery>,
    upstreams: Upstreams,
    pacing: WatchPacing,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let (events, mut inbox) = mpsc::channel(1024);
    for kind in [Detector::Checks, Detector::Catalog] {
        tokio::spawn(detect(
            kind,
            discovery.clone(),
            events.clone(),
            pacing,
            shutdown.clone(),
        ));
    }
    let by_name = upstreams
        .iter()
        .map(|u| (u.name().to_owned(), u.clone()))
        .collect();
    let mut coordinator = Coordinator {
        discovery,
        upstreams,
        by_name,
        // Two connections belong to the detectors; one more is kept spare because the HTTP
        // pool may open a connection for the next long-poll before the last one is back.
        slots: Arc::new(Semaphore::new(max_connections.saturating_sub(3).max(1))),
        events,
        fetches: HashMap::new(),
        checks: None,
        catalog: None,
        explained: VecDeque::new(),
        unexplained: None,
        recovering: true,
        shutdown: shutdown.clone(),
    };
    info!(
        services = coordinator.by_name.len(),
        max_connections, "watching Consul in catalog mode"
    );
    loop {
        let grace_end = coordinator.unexplained.map(|(_, deadline)| deadline);
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sleep_until_some(grace_end) => {
                coordinator.explain_or_sweep();
                continue;
            }
            event = inbox.recv() => match event {
                Some(event) => event,
                None => break,
            },
        };
        match event {
            Event::Checks { index, snapshot } => {
                coordinator.on_checks(index, snapshot);
                coordinator.recovered();
            }
            Event::Catalog { index, names } => {
                coordinator.on_catalog(index, names);
                coordinator.recovered();
            }
            Event::Contact => coordinator.contact(),
            Event::Failed(error) => {
                warn!(%error, "Consul change detector failed; keeping the last tables");
                for upstream in coordinator.upstreams.iter() {
                    upstream.record_discovery_error();
                    if let DiscoveryError::Hung(_) = error {
                        upstream.metrics.consul_hung();
                    }
                }
                // Changes may be missed while a detector is down: start over from new
                // baselines and sweep once Consul answers again.
                coordinator.checks = None;
                coordinator.catalog = None;
                coordinator.recovering = true;
            }
            Event::Fetched(name) => coordinator.on_fetched(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<'a>(
        node: &'a str,
        id: &'a str,
        service: &'a str,
        modify_index: u64,
    ) -> CheckEntry<'a> {
        CheckEntry {
            node: node.into(),
            check_id: id.into(),
            service_name: service.into(),
            modify_index,
        }
    }

    #[test]
    fn diff_names_changed_added_and_removed_services() {
        let old = snapshot(vec![
            check("n1", "serfHealth", "", 5),
            check("n1", "service:a-1", "a", 10),
            check("n1", "service:b-1", "b", 11),
            check("n1", "service:c-1", "c", 12),
        ]);
        let new = snapshot(vec![
            check("n1", "serfHealth", "", 5),
            check("n1", "service:a-1", "a", 20), // status changed
            check("n1", "service:c-1", "c", 12), // unchanged
            check("n1", "service:d-1", "d", 21), // registered
        ]); // b-1 deregistered at 22
        let diff = diff_checks(&old, &new, 22);
        let mut services: Vec<_> = diff.services.into_iter().collect();
        services.sort();
        assert_eq!(services, ["a", "b", "d"]);
        let mut indexes = diff.indexes;
        indexes.sort();
        assert_eq!(indexes, [20, 21, 22]);
    }

    #[test]
    fn equal_snapshots_have_no_diff() {
        let a = snapshot(vec![check("n1", "service:a-1", "a", 10)]);
        let b = snapshot(vec![check("n1", "service:a-1", "a", 10)]);
        assert_eq!(diff_checks(&a, &b, 10), ChecksDiff::default());
    }
}
