//! Discovery sources: where a service's instances come from.
//!
//! A [`Source`] watches one service and yields its instance sets as a stream of typed
//! [`Update`]s (Linkerd's `Resolve` is the model): each source owns its watch mechanics
//! (Consul blocking queries, etcd watches, ZooKeeper child watches, DNS TTLs, a fixed list)
//! and only reports what it learned. [`follow`] is the one consumer: it stores new sets in
//! the service's table, counts errors and keeps the sync status, the same way for every
//! source. A failed update never touches the table: the last good set keeps serving.
//!
//! Discovery writes tables and never imports the gateway; the two meet at the tables.

pub mod consul;
pub mod dns;
pub mod etcd;
mod set;
mod sources;
pub mod static_;
pub mod zookeeper;

pub use set::WatchSet;
pub use sources::{SourceSettings, Sources};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::ServiceConfig;
use crate::upstream::{Instance, Upstream};

/// What a source failed at. Never empties a table.
#[derive(Debug, thiserror::Error)]
#[error("{source_name} discovery failed: {message}")]
pub struct SourceError {
    /// The source's name as in `services[].source` (`consul`, `etcd`, ...).
    pub source_name: &'static str,
    /// What went wrong, without secrets (tokens and keys never reach this text).
    pub message: String,
    /// A request that hung past the source's own bound and was cut (counted apart, as
    /// `switchyard_consul_hung_queries_total` for Consul).
    pub hung: bool,
}

impl SourceError {
    pub fn new(source_name: &'static str, error: impl std::fmt::Display) -> Self {
        Self {
            source_name,
            message: error.to_string(),
            hung: false,
        }
    }

    /// Marks the error as a hung request that was cut.
    pub fn hung(mut self) -> Self {
        self.hung = true;
        self
    }
}

/// One thing a source learned about one service.
#[derive(Debug)]
pub enum Update {
    /// The whole current set of healthy instances. `version` is the source's change index
    /// (Consul's `X-Consul-Index`, etcd's revision, ZooKeeper's child version; 0 when the
    /// source has none); `observed` is when the source learned it, for
    /// `switchyard_propagation_seconds`. An unchanged set is not stored again.
    Instances {
        instances: Vec<Instance>,
        version: u64,
        observed: Instant,
    },
    /// The source answered and nothing changed: the table is confirmed fresh.
    Unchanged,
    /// The source failed (it retries on its own, with backoff); the table is left as it is.
    Failed(SourceError),
}

/// The sending side of one watch, handed to [`Source::watch`].
pub struct Updates {
    tx: mpsc::Sender<Update>,
}

impl Updates {
    /// Sends `update`; `false` when nobody follows the watch any more (the source stops).
    pub async fn send(&self, update: Update) -> bool {
        self.tx.send(update).await.is_ok()
    }

    /// Completes when nobody follows the watch any more.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Waits `delay` before the source's next attempt; `false` when nobody follows any more.
    pub async fn wait(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.closed() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Sends `update`, then waits `delay` (the next refresh, a backoff) before the source's
    /// next attempt; `false` when nobody follows any more (the source stops).
    pub async fn send_then_wait(&self, update: Update, delay: Duration) -> bool {
        self.send(update).await && self.wait(delay).await
    }
}

/// A registry call that took longer than its bound (the etcd and ZooKeeper sources').
#[derive(Debug, thiserror::Error)]
#[error("{what} took longer than {timeout:?}")]
pub struct TimedOut {
    pub what: &'static str,
    pub timeout: Duration,
}

/// Runs `future` for at most `timeout`; `what` names the call in the error.
pub async fn bounded<T>(
    what: &'static str,
    timeout: Duration,
    future: impl Future<Output = T>,
) -> Result<T, TimedOut> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| TimedOut { what, timeout })
}

/// A boxed watch future, so sources can be stored as `Arc<dyn Source>`.
pub type WatchFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A registry that can watch a service's healthy instances.
pub trait Source: Send + Sync + 'static {
    /// The name of this source as in `services[].source` and the `source` metric label.
    fn name(&self) -> &'static str;

    /// Watches `service` until `updates` is closed: sends the first set as soon as it is
    /// known, then every change, and a [`Update::Failed`] for each failed attempt. Retries,
    /// backoff, timeouts and reconnects are the source's own business.
    fn watch(self: Arc<Self>, service: ServiceConfig, updates: Updates) -> WatchFuture;
}

/// Starts `source`'s watch of `upstream`'s service and applies its updates to the table
/// until `stop` is cancelled. The one writer of that table.
pub async fn follow(source: Arc<dyn Source>, upstream: Arc<Upstream>, stop: CancellationToken) {
    // A small buffer: a source never runs far ahead of the table (only the latest set counts).
    let (tx, mut rx) = mpsc::channel(4);
    let name = source.name();
    let watch = tokio::spawn(source.watch(upstream.config.clone(), Updates { tx }));
    loop {
        let update = tokio::select! {
            _ = stop.cancelled() => break,
            update = rx.recv() => match update {
                Some(update) => update,
                None => break,
            },
        };
        apply(&upstream, name, update);
    }
    watch.abort();
    debug!(service = upstream.name(), source = name, "watch stopped");
}

/// Applies one update to `upstream`'s table and sync status.
fn apply(upstream: &Upstream, source: &'static str, update: Update) {
    match update {
        Update::Instances {
            instances,
            version,
            observed,
        } => {
            upstream.record_sync(version);
            let count = instances.len();
            if upstream.replace_instances(instances) {
                upstream.metrics.observe_propagation(observed.elapsed());
                info!(
                    service = upstream.name(),
                    source,
                    version,
                    instances = count,
                    "table updated"
                );
            }
        }
        Update::Unchanged => upstream.record_contact(),
        Update::Failed(error) => {
            upstream.record_discovery_error();
            if error.hung {
                upstream.metrics.consul_hung();
            }
            warn!(service = upstream.name(), source, %error, "discovery failed; keeping the last table");
        }
    }
}
