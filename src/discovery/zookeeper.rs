//! `source: zookeeper`: instances are the children of the service's `zookeeper_path`, in
//! go-kit's `sd/zk` layout: ephemeral sequential nodes (they vanish with their registrar's
//! session) whose data is `host:port` (or `http://host:port`).
//!
//! Each watch lists the children with a children watch, reads the data of children it has not
//! seen (a registrar never rewrites it, so known children are not read again), sends the set,
//! and waits for the watch to fire, then lists again, re-arming it: ZooKeeper watches fire
//! once. A path that does not exist yet is an empty set and an exists watch, not a failure.
//! A lost connection is reported as a failure (the client reconnects on its own, within the
//! session, and the watches come back with it); an expired session ends every watch, the
//! next attempt opens a new session and lists again. The table keeps the last good set
//! meanwhile.
//!
//! All ZooKeeper-sourced services share one session (one TCP connection to one server).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{debug, warn};
use zookeeper_client as zk;

use super::consul::Backoff;
use super::static_::parse_instance;
use super::{bounded, Source, SourceError, TimedOut, Update, Updates, WatchFuture};
use crate::config::{ServiceConfig, SourceConfig, ZookeeperConfig};
use crate::upstream::Instance;

const SOURCE: &str = "zookeeper";
/// A quiet children watch on a live session is a current set: confirmed this often, so the
/// last-success timestamp (and the 900 s stale alert) does not take silence for staleness.
const STILL_CURRENT: Duration = Duration::from_secs(60);

/// What the ZooKeeper source needs to know: the ensemble and its pacing.
#[derive(Debug, Clone)]
pub struct ZookeeperSettings {
    /// `host:port` of each server; the client picks one and fails over to the others.
    pub servers: Vec<String>,
    /// The session's timeout; also bounds a connect and each request.
    pub session_timeout: Duration,
    /// Jittered exponential backoff between failed attempts.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl ZookeeperSettings {
    /// The settings of the `zookeeper` section, with a 100 ms - 5 s backoff.
    pub fn new(config: &ZookeeperConfig) -> Self {
        Self {
            servers: config.servers.clone(),
            session_timeout: config.session_timeout,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Why one watch round ended.
#[derive(Debug, thiserror::Error)]
pub enum ZookeeperError {
    #[error("connecting to {servers}: {source}")]
    Connect { servers: String, source: zk::Error },
    #[error("{what} of {path}: {source}")]
    Request {
        what: &'static str,
        path: String,
        source: zk::Error,
    },
    #[error(transparent)]
    Timeout(#[from] TimedOut),
    #[error("disconnected from the ensemble (the client reconnects within the session)")]
    Disconnected,
    #[error("the session ended ({0}); a new one lists again")]
    SessionEnded(zk::SessionState),
}

/// The ZooKeeper source; one per gateway, shared by every `source: zookeeper` service.
pub struct ZookeeperSource {
    settings: ZookeeperSettings,
    session: Mutex<Option<zk::Client>>,
}

impl ZookeeperSource {
    pub fn new(settings: ZookeeperSettings) -> Self {
        Self {
            settings,
            session: Mutex::new(None),
        }
    }

    /// The shared session; a new one when there is none or the last one ended (expired).
    async fn session(&self) -> Result<zk::Client, ZookeeperError> {
        let mut slot = self.session.lock().await;
        if let Some(client) = slot.as_ref() {
            if !client.state().is_terminated() {
                return Ok(client.clone());
            }
        }
        let timeout = self.settings.session_timeout;
        let servers = self.settings.servers.join(",");
        let connect = zk::Client::connector()
            .with_session_timeout(timeout)
            .with_fail_eagerly()
            .connect(&servers);
        let client = bounded("connect", timeout, connect)
            .await?
            .map_err(|source| ZookeeperError::Connect {
                servers: servers.clone(),
                source,
            })?;
        debug!(servers, session = %client.session_id(), "zookeeper session opened");
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Watches `path` until nobody follows; every failed round is reported.
    async fn run(self: Arc<Self>, service: String, path: String, updates: Updates) {
        let mut backoff = Backoff::new(self.settings.backoff_base, self.settings.backoff_max);
        let mut children = Children::default();
        loop {
            let round = async {
                let client = self.session().await?;
                let mut watch = PathWatch {
                    client: &client,
                    service: &service,
                    path: &path,
                    timeout: self.settings.session_timeout,
                    children: &mut children,
                };
                watch.run(&updates, &mut backoff).await
            };
            let error = match round.await {
                Ok(()) => return,
                Err(error) => error,
            };
            let failed = Update::Failed(SourceError::new(SOURCE, &error));
            if !updates.send_then_wait(failed, backoff.next_delay()).await {
                return;
            }
        }
    }
}

impl Source for ZookeeperSource {
    fn name(&self) -> &'static str {
        SOURCE
    }

    fn watch(self: Arc<Self>, service: ServiceConfig, updates: Updates) -> WatchFuture {
        let path = match &service.source {
            SourceConfig::Zookeeper { path } => path.clone(),
            _ => crate::config::default_zookeeper_path(&service.name),
        };
        Box::pin(self.run(service.name, path, updates))
    }
}

/// What one watch knows: each child's instance (`None`: its data is not an address).
#[derive(Debug, Default)]
struct Children {
    by_name: BTreeMap<String, Option<Instance>>,
}

/// One service's watch on one session.
struct PathWatch<'a> {
    client: &'a zk::Client,
    service: &'a str,
    path: &'a str,
    timeout: Duration,
    children: &'a mut Children,
}

impl PathWatch<'_> {
    /// Lists, sends, waits for the watch to fire; again. `Ok` when nobody follows.
    async fn run(
        &mut self,
        updates: &Updates,
        backoff: &mut Backoff,
    ) -> Result<(), ZookeeperError> {
        let mut state = self.client.state_watcher();
        state.state();
        loop {
            let (update, watcher) = self.list().await?;
            backoff.reset();
            if !updates.send(update).await {
                return Ok(());
            }
            if !wait(watcher, &mut state, updates).await? {
                return Ok(());
            }
        }
    }

    /// The current set and the watch that fires on its next change: a children watch, or an
    /// exists watch while the path is missing (an empty set).
    async fn list(&mut self) -> Result<(Update, zk::OneshotWatcher), ZookeeperError> {
        loop {
            let listed = self.client.get_and_watch_children(self.path);
            match bounded("list", self.timeout, listed).await? {
                Ok((names, stat, watcher)) => {
                    self.read_new(&names).await?;
                    let version = u64::try_from(stat.cversion).unwrap_or(0);
                    return Ok((self.update(version), watcher));
                }
                Err(zk::Error::NoNode) => {
                    let exists = self.client.check_and_watch_stat(self.path);
                    let (stat, watcher) = bounded("exists", self.timeout, exists)
                        .await?
                        .map_err(|source| self.error("exists", source))?;
                    // Created between the two calls: list it. (An exists watch on a node
                    // that exists fires on its data or deletion, never on new children; a
                    // run under load waited on one for good before this.)
                    if stat.is_some() {
                        continue;
                    }
                    let service = self.service;
                    debug!(
                        service,
                        path = self.path,
                        "zookeeper path missing; waiting for it"
                    );
                    self.children.by_name.clear();
                    return Ok((self.update(0), watcher));
                }
                Err(source) => return Err(self.error("list", source)),
            }
        }
    }

    /// Forgets children that are gone and reads the data of new ones.
    async fn read_new(&mut self, names: &[String]) -> Result<(), ZookeeperError> {
        self.children
            .by_name
            .retain(|name, _| names.iter().any(|n| n == name));
        for name in names {
            if self.children.by_name.contains_key(name) {
                continue;
            }
            let child = format!("{}/{name}", self.path);
            let read = self.client.get_data(&child);
            let data = match bounded("read", self.timeout, read).await? {
                Ok((data, _)) => data,
                // Gone between the list and the read: the children watch has fired already.
                Err(zk::Error::NoNode) => continue,
                Err(source) => return Err(self.error("read", source)),
            };
            let instance = instance(&child, &data);
            if instance.is_none() {
                let data = String::from_utf8_lossy(&data);
                let service = self.service;
                warn!(service, node = child, %data, "zookeeper data is not a host:port address; skipped");
            }
            self.children.by_name.insert(name.clone(), instance);
        }
        Ok(())
    }

    fn update(&self, version: u64) -> Update {
        Update::Instances {
            instances: self.children.by_name.values().flatten().cloned().collect(),
            version,
            observed: Instant::now(),
        }
    }

    fn error(&self, what: &'static str, source: zk::Error) -> ZookeeperError {
        if source == zk::Error::SessionExpired {
            return ZookeeperError::SessionEnded(zk::SessionState::Expired);
        }
        ZookeeperError::Request {
            what,
            path: self.path.to_owned(),
            source,
        }
    }
}

/// Waits for `watcher` to fire or the connection to come back (list again: `Ok(true)`);
/// a lost connection is reported on the way, and while connected the set is confirmed every
/// [`STILL_CURRENT`]. `Ok(false)` when nobody follows; an ended session is an error.
async fn wait(
    watcher: zk::OneshotWatcher,
    state: &mut zk::StateWatcher,
    updates: &Updates,
) -> Result<bool, ZookeeperError> {
    let fired = watcher.changed();
    tokio::pin!(fired);
    let mut confirm = tokio::time::interval_at(Instant::now() + STILL_CURRENT, STILL_CURRENT);
    loop {
        let now = tokio::select! {
            _ = updates.closed() => return Ok(false),
            _ = &mut fired => return Ok(true),
            now = state.changed() => now,
            _ = confirm.tick() => {
                let connected = matches!(
                    state.peek_state(),
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
                );
                if connected && !updates.send(Update::Unchanged).await {
                    return Ok(false);
                }
                continue;
            }
        };
        match now {
            zk::SessionState::Disconnected => {
                let failed = SourceError::new(SOURCE, ZookeeperError::Disconnected);
                if !updates.send(Update::Failed(failed)).await {
                    return Ok(false);
                }
            }
            // Back: list again, in case a change slipped by while away.
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                return Ok(true)
            }
            ended => return Err(ZookeeperError::SessionEnded(ended)),
        }
    }
}

/// The instance a child's data names, with the child's path as its id.
fn instance(node: &str, data: &[u8]) -> Option<Instance> {
    let text = std::str::from_utf8(data).ok()?.trim();
    let mut instance = parse_instance(text)?;
    instance.id = node.to_owned();
    Some(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_becomes_an_instance_with_the_node_as_id() {
        let one = instance("/services/a/member_0000000001", b"127.0.0.1:8080").expect("address");
        assert_eq!(one.id, "/services/a/member_0000000001");
        assert_eq!(one.authority.as_str(), "127.0.0.1:8080");
        for garbage in [&b"garbage"[..], b"", b"\xff:1", b"h:0x50"] {
            assert!(instance("/n", garbage).is_none(), "{garbage:?}");
        }
    }
}
