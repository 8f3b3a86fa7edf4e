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
//! Fetches are non-blocking `health/service` queries, at most the coordinator's connection
//! budget less five at once (the two detectors, the checks-table query, the idle
//! connections of the HTTP pool), and one at a time per
//! service so each table still has a single writer. A stopping coordinator waits for its
//! fetches in flight, so a successor never races them. After a detector failed (an outage),
//! the recovery sweep's answers are applied only once confirmed by a second query
//! ([`confirmed_fetch`]), as the per-service watch does after an outage.
//!
//! What a change costs (100 services x 10 instances, release build, debug log lines): Consul
//! answers `/v1/health/state/any` (370 KB) ~11 ms after `/v1/catalog/services` (2 KB) for the
//! same write, as it encodes every check of the catalog; then parsing it takes ~1.2 ms, the
//! diff ~0.15 ms, the fetch ~1-2 ms. That first part grows with the catalog, which is why
//! `auto` gives as many services as the connection budget allows a blocking query of their own
//! (see [`super::set`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{idle_connections, RATE_BURST, RATE_INTERVAL};
use super::{
    Answer, Backoff, ConsulClient, Discovery, DiscoveryError, IndexStep, TokenBucket, WatchPacing,
};
use crate::upstream::{Upstream, Upstreams};

/// Raft indexes of recent check changes, kept to explain catalog changes that arrive later.
const EXPLAINED_MEMORY: usize = 4096;
/// How long a catalog change may wait for the checks detector to explain it before the
/// coordinator asks Consul whether a check was written with it (if not, every service is
/// swept). Encoding `/v1/health/state/any` takes Consul ~50-130 ms at 10,000 checks.
const EXPLAIN_GRACE: Duration = Duration::from_millis(300);
/// How much longer a catalog change waits when the checks table has moved past it but the
/// checks detector has not (a large catalog is slow to encode; but Consul also moves the
/// checks table's index when it deregisters an instance without checks, and then the
/// detector does not wake).
const LATE_GRACE: Duration = Duration::from_secs(1);

/// What to do when the grace of waiting catalog changes ends.
#[derive(Clone, Copy)]
enum GraceEnd {
    /// Ask Consul for the checks table's index.
    Ask,
    /// Sweep for whatever still waits.
    Sweep,
}

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
    /// Raft indexes at which checks were added or changed.
    indexes: Vec<u64>,
    /// Whether checks were removed: a removal leaves no index behind, it happened somewhere
    /// after the old snapshot's index, up to the new one's.
    removed: bool,
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

/// Services whose checks were added, changed or removed.
fn diff_checks(old: &ChecksSnapshot, new: &ChecksSnapshot) -> ChecksDiff {
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
            diff.removed = true;
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
    /// The checks table's index when the grace ran out (0 when Consul could not say).
    ChecksTable(u64),
}

#[derive(Clone, Copy)]
enum Detector {
    Checks,
    Catalog,
}

/// One change detector: a blocking query loop on a catalog-wide endpoint.
async fn detect(
    kind: Detector,
    discovery: Arc<ConsulClient>,
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
                let asked = Instant::now();
                bucket.acquire().await;
                let paced = asked.elapsed();
                let result = discovery.get(path, index, |_| {}).await;
                (paced, result)
            } => result,
        };
        let (paced, result) = result;
        let woke = Instant::now();
        let event = match result {
            Ok((answered, body)) => {
                backoff.reset();
                let step = IndexStep::from_indexes(index, answered);
                index = step.next_index();
                if let IndexStep::Unchanged { .. } = step {
                    Event::Contact
                } else {
                    let event = match parse_off_runtime(kind, answered, body.clone()).await {
                        Ok(event) => event,
                        Err(error) => Event::Failed(error),
                    };
                    debug!(
                        detector = path,
                        index = answered,
                        bytes = body.len(),
                        paced_us = micros(paced),
                        parse_us = micros(woke.elapsed()),
                        "change detected"
                    );
                    event
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

/// Parses off the runtime's threads: at 1,000 services `/v1/health/state/any` is 3.7 MB,
/// 15-80 ms of parsing that would otherwise stall the gateway (one worker by default).
async fn parse_off_runtime(
    kind: Detector,
    index: u64,
    body: bytes::Bytes,
) -> Result<Event, DiscoveryError> {
    match tokio::task::spawn_blocking(move || parse(kind, index, &body)).await {
        Ok(parsed) => parsed,
        Err(panicked) => std::panic::resume_unwind(panicked.into_panic()),
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
    /// The next fetch's answer is applied only once a second query confirms it (after an
    /// outage; see [`confirmed_fetch`]).
    confirm: bool,
}

struct Coordinator {
    discovery: Arc<ConsulClient>,
    upstreams: Upstreams,
    by_name: HashMap<String, Arc<Upstream>>,
    slots: Arc<Semaphore>,
    events: mpsc::Sender<Event>,
    fetches: HashMap<String, FetchState>,
    checks: Option<ChecksSnapshot>,
    catalog: Option<(u64, HashSet<String>)>,
    explained: VecDeque<u64>,
    /// The index of the last checks snapshot.
    checks_index: u64,
    /// Catalog changes waiting for the checks detector to reach their index.
    unexplained: Vec<u64>,
    /// When to ask Consul whether a check was written at those indexes, or to sweep.
    grace: Option<(tokio::time::Instant, GraceEnd)>,
    recovering: bool,
    /// A detector failed since the last sweep: the recovery sweep's answers need confirming.
    after_outage: bool,
    /// How long a confirming query waits after the answer it confirms (`backoff_base`).
    confirm_delay: Duration,
    /// This coordinator's stop: its fetches must not write tables once a successor (after a
    /// config reload) may be writing them.
    shutdown: CancellationToken,
    /// The fetches in flight, waited for when the coordinator stops: a successor starts only
    /// once they are done.
    tracker: TaskTracker,
}

impl Coordinator {
    /// A coordinator for `upstreams` with `max_connections` to Consul; the detectors send to
    /// `events`.
    fn new(
        discovery: Arc<ConsulClient>,
        upstreams: Upstreams,
        pacing: WatchPacing,
        max_connections: usize,
        events: mpsc::Sender<Event>,
        shutdown: CancellationToken,
    ) -> Self {
        let by_name = upstreams
            .iter()
            .map(|u| (u.name().to_owned(), u.clone()))
            .collect();
        Coordinator {
            discovery,
            upstreams,
            by_name,
            // Of the budget: two connections for the detectors, one for the query of the checks
            // table's index, and the idle ones the HTTP pool keeps; the rest fetch.
            slots: Arc::new(Semaphore::new(
                max_connections
                    .saturating_sub(3 + idle_connections(max_connections))
                    .max(1),
            )),
            events,
            fetches: HashMap::new(),
            checks: None,
            catalog: None,
            explained: VecDeque::new(),
            checks_index: 0,
            unexplained: Vec::new(),
            grace: None,
            recovering: true,
            after_outage: false,
            confirm_delay: pacing.backoff_base,
            shutdown,
            tracker: TaskTracker::new(),
        }
    }

    fn mark_dirty<'a>(&mut self, names: impl IntoIterator<Item = &'a String>) {
        let now = Instant::now();
        for name in names {
            let Some(upstream) = self.by_name.get(name).cloned() else {
                continue; // a service this gateway does not route
            };
            let state = self.fetches.entry(name.clone()).or_default();
            state.confirm |= self.after_outage;
            if state.running {
                state.again = true;
                continue;
            }
            state.running = true;
            let confirm = std::mem::take(&mut state.confirm).then_some(self.confirm_delay);
            self.spawn_fetch(upstream, now, confirm);
        }
    }

    /// Fetches `upstream`'s instances and applies them; with `confirm`, only once a second
    /// query that much later answers the same index.
    fn spawn_fetch(&self, upstream: Arc<Upstream>, woke: Instant, confirm: Option<Duration>) {
        let (discovery, slots, events, stopped) = (
            self.discovery.clone(),
            self.slots.clone(),
            self.events.clone(),
            self.shutdown.clone(),
        );
        self.tracker.spawn(async move {
            let fetch = async {
                if let Some(delay) = confirm {
                    let confirmed = confirmed_fetch(&discovery, &slots, &upstream, delay).await;
                    let slot = slots.clone().acquire_owned().await;
                    return (slot, micros(woke.elapsed()), confirmed);
                }
                let slot = slots.clone().acquire_owned().await;
                let slot_us = micros(woke.elapsed());
                (slot, slot_us, discovery.fetch(&upstream.config, 0).await)
            };
            let (slot, slot_us, fetched) = tokio::select! {
                _ = stopped.cancelled() => return,
                fetched = fetch => fetched,
            };
            if let Ok(_slot) = slot {
                debug!(
                    service = upstream.name(),
                    slot_us,
                    fetched_us = micros(woke.elapsed()),
                    "fetched"
                );
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
        self.after_outage = false;
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
            let started = Instant::now();
            let diff = diff_checks(old, &snapshot);
            debug!(
                index,
                services = diff.services.len(),
                diff_us = micros(started.elapsed()),
                "checks diffed"
            );
            self.remember(&diff.indexes);
            if diff.removed {
                self.explain_removal(index);
            }
            self.mark_dirty(&diff.services);
        }
        self.checks = Some(snapshot);
        self.checks_index = index;
        self.resolve(|pending, coordinator| pending <= coordinator.checks_index);
    }

    /// Checks were removed between the last snapshot and this one at `index`, by a
    /// deregistration the catalog detector saw too. When one waiting catalog change lies in
    /// that window it is the one (several: which is unknown, so they stay unexplained).
    fn explain_removal(&mut self, index: u64) {
        let inside: Vec<u64> = self
            .unexplained
            .iter()
            .copied()
            .filter(|&pending| pending > self.checks_index && pending <= index)
            .filter(|pending| !self.explained.contains(pending))
            .collect();
        if inside.len() == 1 {
            self.remember(&inside);
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
            // The checks detector may not have reached the same write yet: at 1,000 services
            // it answers 0.3-0.8 s after this one (measured on a busy 2-core machine).
            self.unexplained.push(index);
            self.grace
                .get_or_insert((tokio::time::Instant::now() + EXPLAIN_GRACE, GraceEnd::Ask));
            // Unless it is there already.
            self.resolve(|pending, coordinator| pending <= coordinator.checks_index);
        }
    }

    /// Settles the catalog changes `due` says can be judged now: if a check change explains
    /// none, those services were fetched already; else (an instance without checks) sweep.
    fn resolve(&mut self, due: impl Fn(u64, &Self) -> bool) {
        let pending = std::mem::take(&mut self.unexplained);
        let (settled, waiting): (Vec<u64>, Vec<u64>) =
            pending.into_iter().partition(|&index| due(index, self));
        self.unexplained = waiting;
        if self.unexplained.is_empty() {
            self.grace = None;
        }
        if settled.iter().any(|index| !self.explained.contains(index)) {
            self.sweep("catalog change not explained by a check change");
        }
    }

    /// The grace ran out with catalog changes still waiting.
    fn grace_ended(&mut self, end: GraceEnd) {
        self.grace = None;
        match end {
            GraceEnd::Ask => self.ask_checks_table(),
            GraceEnd::Sweep => self.resolve(|_, _| true),
        }
    }

    /// Asks Consul for the checks table's index (a small non-blocking query). Changes past it
    /// wrote no check: sweep for them at once; the others wait for the checks detector a
    /// little longer ([`LATE_GRACE`]).
    fn ask_checks_table(&mut self) {
        let (discovery, events) = (self.discovery.clone(), self.events.clone());
        let stopped = self.shutdown.clone();
        self.tracker.spawn(async move {
            let asked = tokio::select! {
                _ = stopped.cancelled() => return,
                asked = discovery.get("/v1/health/state/critical", 0, |_| {}) => asked,
            };
            let index = match asked {
                Ok((index, _)) => index,
                Err(error) => {
                    debug!(%error, "checks table index unknown; sweeping");
                    0
                }
            };
            let _ = events.send(Event::ChecksTable(index)).await;
        });
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Checks { index, snapshot } => {
                self.on_checks(index, snapshot);
                self.recovered();
            }
            Event::Catalog { index, names } => {
                self.on_catalog(index, names);
                self.recovered();
            }
            Event::Contact => self.contact(),
            Event::Failed(error) => self.on_failed(error),
            Event::Fetched(name) => self.on_fetched(name),
            Event::ChecksTable(table) => {
                self.resolve(|pending, coordinator| {
                    pending > table || pending <= coordinator.checks_index
                });
                if !self.unexplained.is_empty() {
                    let late = tokio::time::Instant::now() + LATE_GRACE;
                    self.grace = Some((late, GraceEnd::Sweep));
                }
            }
        }
    }

    /// A detector failed: changes may be missed while it is down, so start over from new
    /// baselines and sweep once Consul answers again.
    fn on_failed(&mut self, error: DiscoveryError) {
        warn!(%error, "Consul change detector failed; keeping the last tables");
        for upstream in self.upstreams.iter() {
            upstream.record_discovery_error();
            if let DiscoveryError::Hung(_) = error {
                upstream.metrics.consul_hung();
            }
        }
        self.checks = None;
        self.catalog = None;
        self.checks_index = 0;
        self.unexplained.clear(); // the recovery sweep covers them
        self.grace = None;
        self.recovering = true;
        self.after_outage = true;
    }

    fn on_fetched(&mut self, name: String) {
        let Some(state) = self.fetches.get_mut(&name) else {
            return;
        };
        if state.again {
            state.again = false;
            let confirm = std::mem::take(&mut state.confirm).then_some(self.confirm_delay);
            if let Some(upstream) = self.by_name.get(&name).cloned() {
                self.spawn_fetch(upstream, Instant::now(), confirm);
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

/// After an outage a Consul server that restarted may answer from a log it is still
/// replaying (the per-service watch's `Resync` has the story): an answer counts once a second
/// query, `delay` later, answers the same index. The slot is held for each query only, not
/// across the waits, so a recovery sweep of many services waits for them all at once.
async fn confirmed_fetch(
    discovery: &ConsulClient,
    slots: &Arc<Semaphore>,
    upstream: &Upstream,
    delay: Duration,
) -> Result<Answer, DiscoveryError> {
    let fetch = || async {
        let _slot = slots.acquire().await;
        discovery.fetch(&upstream.config, 0).await
    };
    let mut candidate = fetch().await?;
    loop {
        tokio::time::sleep(delay).await;
        let answer = fetch().await?;
        if answer.index == candidate.index {
            return Ok(answer);
        }
        debug!(
            service = upstream.name(),
            first = candidate.index,
            then = answer.index,
            "answer after an outage not confirmed; asking again"
        );
        candidate = answer;
    }
}

/// For the timings in debug log lines.
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

async fn grace_end(grace: Option<(tokio::time::Instant, GraceEnd)>) -> GraceEnd {
    match grace {
        Some((deadline, end)) => {
            tokio::time::sleep_until(deadline).await;
            end
        }
        None => std::future::pending().await,
    }
}

/// Watches every service of `upstreams` with two detectors and targeted fetches, using at
/// most `max_connections` connections to Consul.
pub async fn watch_catalog(
    discovery: Arc<ConsulClient>,
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
    let mut coordinator = Coordinator::new(
        discovery,
        upstreams,
        pacing,
        max_connections,
        events,
        shutdown.clone(),
    );
    info!(
        services = coordinator.by_name.len(),
        max_connections, "catalog-mode coordinator started"
    );
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            end = grace_end(coordinator.grace) => {
                coordinator.grace_ended(end);
                continue;
            }
            event = inbox.recv() => match event {
                Some(event) => event,
                None => break,
            },
        };
        coordinator.on_event(event);
    }
    // Closed first, so a fetch finishing now is not stuck reporting to a full inbox.
    drop(inbox);
    coordinator.tracker.close();
    coordinator.tracker.wait().await;
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
        ]); // b-1 deregistered
        let diff = diff_checks(&old, &new);
        let mut services: Vec<_> = diff.services.into_iter().collect();
        services.sort();
        assert_eq!(services, ["a", "b", "d"]);
        let mut indexes = diff.indexes;
        indexes.sort();
        assert_eq!(indexes, [20, 21]);
        assert!(diff.removed);
    }

    #[test]
    fn equal_snapshots_have_no_diff() {
        let a = snapshot(vec![check("n1", "service:a-1", "a", 10)]);
        let b = snapshot(vec![check("n1", "service:a-1", "a", 10)]);
        assert_eq!(diff_checks(&a, &b), ChecksDiff::default());
    }
}
