//! The running watches of every service, by source, reconciled with each (re)loaded config.
//!
//! Services with `source: consul` go to the Consul machinery ([`ConsulWatches`]: a blocking
//! query each, or catalog mode, within the connection budget); every other service gets
//! [`follow`] of its source from [`Sources`]. A service whose source has no client (a
//! registry that failed to set up, or one not built in) is logged and left unwatched: its
//! table stays empty (503) and `/readyz` names it.
//!
//! One table, one writer: a service that keeps its upstream (the same `Arc`) and its source
//! keeps its watch; otherwise the old watch is stopped and the new one starts only once the
//! old one has finished.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::consul::{Claim, ConnectionBudget, ConsulWatches};
use super::sources::{SourceSettings, Sources};
use super::{follow, Source};
use crate::config::{ConsulConfig, SourceConfig};
use crate::upstream::{Upstream, Upstreams};

/// A running watch task and how to stop it.
pub(crate) struct Running {
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Running {
    pub fn stop(self) -> JoinHandle<()> {
        self.stop.cancel();
        self.task
    }
}

/// A followed service of a source other than Consul.
struct Followed {
    upstream: Arc<Upstream>,
    source: Arc<dyn Source>,
    running: Running,
}

/// The running watches of every service.
pub struct WatchSet {
    sources: Sources,
    consul: ConsulWatches,
    others: HashMap<String, Followed>,
}

impl WatchSet {
    /// Starts watching `upstreams`, each through its source; the Consul ones first within
    /// `budget` (shared with the tag-route watcher).
    pub fn start(
        sources: Sources,
        consul: &ConsulConfig,
        budget: Arc<ConnectionBudget>,
        upstreams: &Upstreams,
    ) -> Self {
        let none = Upstreams::from_list(Vec::new());
        let claim = (budget, Claim::First);
        let mut set = WatchSet {
            consul: ConsulWatches::start(sources.consul.clone(), consul, claim, &none),
            sources,
            others: HashMap::new(),
        };
        set.reconcile(upstreams);
        set
    }

    /// Watches exactly `upstreams` (see the module doc for what is kept and restarted).
    pub fn reconcile(&mut self, upstreams: &Upstreams) {
        let (of_consul, others) = split(upstreams);
        self.consul.reconcile(&of_consul);
        let mut stopped = Vec::new();
        let mut kept = HashMap::new();
        let mut fresh = Vec::new();
        for upstream in others.iter() {
            let source = self.sources.for_service(&upstream.config.source);
            match self.others.remove(upstream.name()) {
                Some(old) if same_watch(&old, upstream, source.as_ref()) => {
                    kept.insert(upstream.name().to_owned(), old);
                }
                previous => {
                    stopped.extend(previous.map(|old| old.running.stop()));
                    fresh.push((upstream.clone(), source));
                }
            }
        }
        stopped.extend(self.others.drain().map(|(_, old)| old.running.stop()));
        self.others = kept;
        let ready = after(stopped);
        for (upstream, source) in fresh {
            let Some(source) = source else {
                error!(
                    service = upstream.name(),
                    source = upstream.config.source.name(),
                    "no client for this source; the service is not watched (503 until it is)"
                );
                continue;
            };
            let running = spawn_follow(source.clone(), upstream.clone(), ready.clone());
            let name = upstream.name().to_owned();
            self.others.insert(
                name,
                Followed {
                    upstream,
                    source,
                    running,
                },
            );
        }
        info!(
            consul = of_consul.iter().count(),
            others = self.others.len(),
            "watching services"
        );
    }

    /// A reload's registry settings: sources whose settings changed are rebuilt (their
    /// services' watches restart on the next [`WatchSet::reconcile`]); the rest are kept.
    pub fn update_sources(&mut self, settings: SourceSettings) {
        self.sources = self.sources.rebuild(settings);
    }

    /// Stops every watch and waits for them.
    pub async fn stop(mut self) {
        let tasks: Vec<JoinHandle<()>> = self
            .others
            .drain()
            .map(|(_, old)| old.running.stop())
            .collect();
        self.consul.stop().await;
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// `upstreams` split into the Consul ones and the others, each in config order.
fn split(upstreams: &Upstreams) -> (Upstreams, Vec<Arc<Upstream>>) {
    let (consul, others): (Vec<_>, Vec<_>) = upstreams
        .iter()
        .cloned()
        .partition(|u| u.config.source == SourceConfig::Consul);
    (Upstreams::from_list(consul), others)
}

/// Whether `old` already watches `upstream` through `source`.
fn same_watch(old: &Followed, upstream: &Arc<Upstream>, source: Option<&Arc<dyn Source>>) -> bool {
    Arc::ptr_eq(&old.upstream, upstream) && source.is_some_and(|s| Arc::ptr_eq(&old.source, s))
}

fn spawn_follow(
    source: Arc<dyn Source>,
    upstream: Arc<Upstream>,
    ready: CancellationToken,
) -> Running {
    let stop = CancellationToken::new();
    let watch = follow(source, upstream, stop.clone());
    Running {
        task: tokio::spawn(start_when(ready, stop.clone(), watch)),
        stop,
    }
}

/// A token cancelled once every task of `stopped` has finished (at once when there is none).
pub(crate) fn after(stopped: Vec<JoinHandle<()>>) -> CancellationToken {
    let ready = CancellationToken::new();
    if stopped.is_empty() {
        ready.cancel();
    } else {
        let done = ready.clone();
        tokio::spawn(async move {
            for task in stopped {
                let _ = task.await;
            }
            done.cancel();
        });
    }
    ready
}

/// Runs `watch` once `ready` is cancelled, unless `stop` comes first.
pub(crate) async fn start_when(
    ready: CancellationToken,
    stop: CancellationToken,
    watch: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = ready.cancelled() => {}
    }
    watch.await;
}
