//! `source: etcd`: instances are keys under the service's `etcd_prefix`, in go-kit's
//! `sd/etcdv3` layout: one key per instance (the instance id), value `host:port` or
//! `http://host:port`, held by the registrar's lease so that a dead instance's key expires.
//!
//! Each watch lists the prefix (a range get), watches the prefix from the list's revision + 1
//! (so no change between the two is lost) and sends the listed set. Watch events are applied to the
//! listed set; a compacted watch lists again at once. A connect, a list or a watch set-up that
//! takes longer than `etcd.timeout` is cut; a watch is asked for a progress report every
//! `etcd.timeout` and one that does not answer within another `etcd.timeout` counts as hung.
//! Every failed attempt is an [`Update::Failed`]; the table keeps the last good set meanwhile.
//!
//! All etcd-sourced services share one [`Client`] of **one member** at a time (one HTTP/2
//! connection: each watch is a stream on it). Any failed round (broken, hung or cancelled
//! watch, failed list or set-up) drops that client and moves to the next member; the next
//! round starts after `backoff_base`, and the backoff grows only once every member failed
//! in a row (see [`Retry`]).
//!
//! Why not etcd-client's balanced channel over all endpoints: it cannot tell a dead member
//! from a live one. Its connections are lazy: a crashed member's refused connect is kept as
//! "ready" and returned to the next call routed there (often the first call of a new
//! channel, as a refusal is ready before a live member's handshake), and a frozen member's
//! TCP connect still succeeds, so the rounds after a death kept landing on the dead member,
//! each failure growing the backoff (up to 5 s a step). Measured (tests/etcd_source.rs, the
//! member holding the watch killed, `timeout` 1 s): 2 failed attempts after a SIGKILL; 5
//! attempts and 6.7 s to the next routed change after a SIGSTOP (3 lists or set-ups cut at
//! 1 s on the frozen member); with 1 of 3 members dead, 22-26 of 60 first lists of a fresh
//! client failed, 15-17 of 60 lists on a kept one. One member at a time: 1 failed attempt,
//! next change routed 73-150 ms after a SIGKILL and 1.8-2.9 s after a SIGSTOP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, WatchOptions, WatchResponse,
    WatchStream,
};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::consul::Backoff;
use super::static_::parse_instance;
use super::{bounded, Source, SourceError, TimedOut, Update, Updates, WatchFuture};
use crate::config::{EtcdConfig, ServiceConfig, SourceConfig};
use crate::upstream::Instance;

const SOURCE: &str = "etcd";

/// What the etcd source needs to know: the cluster and its pacing.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// Client URLs of the members (`http://127.0.0.1:2379`); one is used at a time.
    pub endpoints: Vec<String>,
    /// Bounds a connect, a list, a watch set-up and a progress report.
    pub timeout: Duration,
    /// Jittered exponential backoff between failed attempts.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl EtcdSettings {
    /// The settings of the `etcd` section, with a 100 ms - 5 s backoff.
    pub fn new(config: &EtcdConfig) -> Self {
        Self {
            endpoints: config
                .endpoints
                .iter()
                .map(|url| url.as_str().trim_end_matches('/').to_owned())
                .collect(),
            timeout: config.timeout,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Why one list-and-watch round ended.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: etcd_client::Error,
    },
    #[error(transparent)]
    Timeout(#[from] TimedOut),
    #[error("{what}: {source}")]
    Rpc {
        what: &'static str,
        source: etcd_client::Error,
    },
    #[error("the watch stream was closed by the server")]
    WatchClosed,
    #[error("the watch was cancelled: {0}")]
    Cancelled(String),
    /// Not a failure: the watch's start revision was compacted away; list again.
    #[error("the watch's revision was compacted (now at {0}); listing again")]
    Compacted(i64),
}

/// etcd's `--grpc-keepalive-min-time` default: a client that pings more often on a
/// connection the server has not written to since is sent `GOAWAY too_many_pings` after three
/// such pings. Measured with pings every 1 s (`etcd.timeout` of the tests): each idle
/// connection of the balanced channel was closed that way ~4 s after it opened.
const ETCD_MIN_PING_INTERVAL: Duration = Duration::from_secs(5);

/// The etcd source; one per gateway, shared by every `source: etcd` service.
pub struct EtcdSource {
    settings: EtcdSettings,
    client: Mutex<Shared>,
}

/// The shared client, the member it talks to and its generation, so a watch that saw it fail
/// drops only that one.
struct Shared {
    generation: u64,
    /// Index in `endpoints` of the member in use.
    member: usize,
    client: Option<Client>,
}

impl EtcdSource {
    /// Starts at a random member, so that a fleet of gateways spreads over the cluster.
    pub fn new(settings: EtcdSettings) -> Self {
        let member = fastrand::usize(..settings.endpoints.len().max(1));
        let shared = Shared {
            generation: 0,
            member,
            client: None,
        };
        Self {
            settings,
            client: Mutex::new(shared),
        }
    }

    /// The shared client and its generation, connected on first use (bounded by the timeout);
    /// a member that cannot be connected to is left for the next at once.
    async fn client(&self) -> Result<(u64, Client), EtcdError> {
        let mut shared = self.client.lock().await;
        if let Some(client) = shared.client.as_ref() {
            return Ok((shared.generation, client.clone()));
        }
        let endpoint = &self.settings.endpoints[shared.member];
        let connect = Client::connect([endpoint], Some(self.connect_options()));
        let connected = bounded("connect", self.settings.timeout, connect)
            .await
            .map_err(EtcdError::from)
            .and_then(|connected| {
                connected.map_err(|source| EtcdError::Connect {
                    endpoint: endpoint.clone(),
                    source,
                })
            });
        match connected {
            Ok(client) => {
                debug!(endpoint, "etcd client connected");
                shared.client = Some(client.clone());
                Ok((shared.generation, client))
            }
            Err(error) => {
                self.next_member(&mut shared);
                Err(error)
            }
        }
    }

    /// HTTP/2 pings while streams are open, `timeout` to answer: a member that vanished
    /// without closing the connection breaks its unary calls and watches within seconds
    /// instead of at TCP's own timeouts (the watch's progress requests usually notice first,
    /// in 2 × timeout). No pings on an idle connection, and none more often than etcd
    /// accepts ([`ETCD_MIN_PING_INTERVAL`]). `require_leader`: a member cut off from its
    /// leader cancels its watches (they would silently stop seeing changes), so they move on.
    fn connect_options(&self) -> ConnectOptions {
        let timeout = self.settings.timeout;
        ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(timeout.max(ETCD_MIN_PING_INTERVAL), timeout)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true)
    }

    /// Drops client `generation` after a failed round and moves to the next member: the
    /// next attempt connects anew. Measured (loadtest/sources.sh, 30 s outage of the whole
    /// cluster): with the client kept, a change written 0.4 s after the restart was routed
    /// 4.4 s and 10.6 s after it (two runs: tries on the old channel timed out); with a new
    /// client, 2.4 s, which is the source's own backoff.
    async fn forget(&self, generation: u64) {
        let mut shared = self.client.lock().await;
        if shared.generation == generation {
            self.next_member(&mut shared);
        }
    }

    /// Drops the client and moves to the next member, a new generation.
    fn next_member(&self, shared: &mut Shared) {
        shared.generation += 1;
        shared.member = (shared.member + 1) % self.settings.endpoints.len().max(1);
        shared.client = None;
    }

    /// Lists and watches `prefix` until nobody follows; every failed round is reported.
    async fn run(self: Arc<Self>, service: String, prefix: String, updates: Updates) {
        let mut retry = Retry::new(&self.settings);
        loop {
            let error = match self.round(&service, &prefix, &updates, &mut retry).await {
                Ok(()) => return,
                Err(EtcdError::Compacted(revision)) => {
                    info!(
                        service,
                        prefix, revision, "etcd watch compacted; listing again"
                    );
                    continue;
                }
                Err(error) => error,
            };
            let failed = Update::Failed(SourceError::new(SOURCE, &error));
            if !updates.send_then_wait(failed, retry.next_delay()).await {
                return;
            }
        }
    }

    /// One round on the current member; any failure but a compaction drops its client (the
    /// generation the round got it with), so the next round goes to the next member. `Ok`
    /// when nobody follows any more.
    async fn round(
        &self,
        service: &str,
        prefix: &str,
        updates: &Updates,
        retry: &mut Retry,
    ) -> Result<(), EtcdError> {
        let (generation, client) = self.client().await?;
        let result = self
            .list_and_watch(client, service, prefix, updates, retry)
            .await;
        if matches!(result, Err(ref error) if !matches!(error, EtcdError::Compacted(_))) {
            self.forget(generation).await;
        }
        result
    }

    /// One list on `client`, then the watch from the next revision, until it ends.
    async fn list_and_watch(
        &self,
        mut client: Client,
        service: &str,
        prefix: &str,
        updates: &Updates,
        retry: &mut Retry,
    ) -> Result<(), EtcdError> {
        let timeout = self.settings.timeout;
        let (mut set, revision, mut stream) = start(&mut client, service, prefix, timeout).await?;
        if !updates.send(set.update(revision)).await {
            return Ok(());
        }
        retry.reset();
        debug!(service, prefix, revision, "etcd watch started");
        follow_watch(&mut stream, service, &mut set, updates, timeout).await
    }
}

/// Pacing of one watch's failed rounds: each moves to the next member, which is tried after
/// `backoff_base` (jittered; a dead member costs one failed attempt, not a growing backoff); once
/// every member failed in a row (an outage, not a member's death), the jittered
/// exponential backoff paces the passes.
struct Retry {
    backoff: Backoff,
    base: Duration,
    members: usize,
    failed: usize,
}

impl Retry {
    fn new(settings: &EtcdSettings) -> Self {
        Self {
            backoff: Backoff::new(settings.backoff_base, settings.backoff_max),
            base: settings.backoff_base,
            members: settings.endpoints.len().max(1),
            failed: 0,
        }
    }

    /// The delay before the round after a failed one.
    fn next_delay(&mut self) -> Duration {
        self.failed += 1;
        if self.failed.is_multiple_of(self.members) {
            self.backoff.next_delay()
        } else {
            self.base.mul_f64(0.5 + fastrand::f64() / 2.0)
        }
    }

    fn reset(&mut self) {
        self.failed = 0;
        self.backoff.reset();
    }
}

impl Source for EtcdSource {
    fn name(&self) -> &'static str {
        SOURCE
    }

    fn watch(self: Arc<Self>, service: ServiceConfig, updates: Updates) -> WatchFuture {
        let prefix = match &service.source {
            SourceConfig::Etcd { prefix } => prefix.clone(),
            _ => crate::config::default_etcd_prefix(&service.name),
        };
        Box::pin(self.run(service.name, prefix, updates))
    }
}

/// Lists `prefix` and opens its watch from the next revision, each bounded by `timeout`.
async fn start(
    client: &mut Client,
    service: &str,
    prefix: &str,
    timeout: Duration,
) -> Result<(InstanceSet, i64, WatchStream), EtcdError> {
    let (set, revision) = bounded("list", timeout, list(client, service, prefix)).await??;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let stream = bounded("watch set-up", timeout, client.watch(prefix, Some(options)))
        .await?
        .map_err(|source| EtcdError::Rpc {
            what: "watch",
            source,
        })?;
    Ok((set, revision, stream))
}

/// The instances under `prefix` and the store's revision they were read at.
async fn list(
    client: &mut Client,
    service: &str,
    prefix: &str,
) -> Result<(InstanceSet, i64), EtcdError> {
    let response = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|source| EtcdError::Rpc {
            what: "list",
            source,
        })?;
    let revision = response.header().map_or(0, |h| h.revision());
    let mut set = InstanceSet::default();
    for kv in response.kvs() {
        set.put(service, kv);
    }
    Ok((set, revision))
}

/// Applies the watch's events to `set` until the watch ends (always an `Err`) or nobody
/// follows (`Ok`). After `timeout` without a message a progress report is requested; none
/// within another `timeout` means a hung stream, so a silent member is left 2 × `timeout`
/// after its last message at most (with a fixed tick instead, measured 1.8-2.9 s at a 1 s
/// `timeout`: up to a tick passed before the request, and its deadline was checked a tick
/// late).
async fn follow_watch(
    stream: &mut WatchStream,
    service: &str,
    set: &mut InstanceSet,
    updates: &Updates,
    timeout: Duration,
) -> Result<(), EtcdError> {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut asked = false;
    loop {
        let message = tokio::select! {
            _ = updates.closed() => return Ok(()),
            _ = &mut deadline => {
                if asked {
                    let what = "a watch progress report";
                    return Err(TimedOut { what, timeout }.into());
                }
                stream.request_progress().await.map_err(|source| {
                    EtcdError::Rpc { what: "watch progress request", source }
                })?;
                asked = true;
                deadline.as_mut().reset(Instant::now() + timeout);
                continue;
            }
            message = stream.message() => message,
        };
        asked = false;
        deadline.as_mut().reset(Instant::now() + timeout);
        let response = message
            .map_err(|source| EtcdError::Rpc {
                what: "watch",
                source,
            })?
            .ok_or(EtcdError::WatchClosed)?;
        if !updates.send(set.apply(service, &response)?).await {
            return Ok(());
        }
    }
}

/// The current instances by key.
#[derive(Debug, Default)]
struct InstanceSet {
    by_key: BTreeMap<String, Instance>,
}

impl InstanceSet {
    /// A key was written: its value is the instance's address. A value that is not one is
    /// skipped and logged, and removes what the key held before.
    fn put(&mut self, service: &str, kv: &KeyValue) {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match instance(&key, kv.value()) {
            Some(instance) => {
                self.by_key.insert(key, instance);
            }
            None => {
                let value = String::from_utf8_lossy(kv.value());
                warn!(service, key, %value, "etcd value is not a host:port address; skipped");
                self.by_key.remove(&key);
            }
        }
    }

    /// Applies one watch response: events make a new set, an empty response (a progress
    /// report) confirms the current one; a compacted or cancelled watch is an error.
    fn apply(&mut self, service: &str, response: &WatchResponse) -> Result<Update, EtcdError> {
        if response.compact_revision() > 0 {
            return Err(EtcdError::Compacted(response.compact_revision()));
        }
        if response.canceled() {
            return Err(EtcdError::Cancelled(response.cancel_reason().to_owned()));
        }
        if response.events().is_empty() {
            return Ok(Update::Unchanged);
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => self.put(service, kv),
                EventType::Delete => self.delete(kv),
            }
        }
        Ok(self.update(response.header().map_or(0, |h| h.revision())))
    }

    fn delete(&mut self, kv: &KeyValue) {
        self.by_key.remove(&*String::from_utf8_lossy(kv.key()));
    }

    fn update(&self, revision: i64) -> Update {
        Update::Instances {
            instances: self.by_key.values().cloned().collect(),
            version: u64::try_from(revision).unwrap_or(0),
            observed: Instant::now(),
        }
    }
}

/// The instance a key's value names, with the key as its id.
fn instance(key: &str, value: &[u8]) -> Option<Instance> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut instance = parse_instance(text)?;
    instance.id = key.to_owned();
    Some(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(members: usize) -> EtcdSettings {
        EtcdSettings {
            endpoints: (0..members)
                .map(|i| format!("http://127.0.0.1:{i}"))
                .collect(),
            timeout: Duration::from_secs(1),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_failed_member_is_left_for_the_next_at_once_and_a_failed_pass_backs_off() {
        let mut retry = Retry::new(&settings(3));
        let delays: Vec<Duration> = (0..9).map(|_| retry.next_delay()).collect();
        let base = Duration::from_millis(100);
        for (i, delay) in delays.iter().enumerate() {
            let pass = i / 3;
            let (low, high) = if i % 3 == 2 {
                let exp = (base * (1 << pass)).min(Duration::from_secs(5));
                (exp / 2, exp)
            } else {
                (base / 2, base)
            };
            assert!((low..=high).contains(delay), "failure {i}: {delay:?}");
        }
        retry.reset();
        assert!(retry.next_delay() <= base, "a success starts over");
        let mut alone = Retry::new(&settings(1));
        let grows: Vec<Duration> = (0..3).map(|_| alone.next_delay()).collect();
        assert!(
            grows[2] >= Duration::from_millis(200),
            "one member: {grows:?}"
        );
    }

    #[test]
    fn values_become_instances_with_the_key_as_id() {
        let one = instance("/services/a/1", b"127.0.0.1:8080").expect("an address");
        assert_eq!(
            (one.id.as_str(), one.authority.as_str()),
            ("/services/a/1", "127.0.0.1:8080")
        );
        let two = instance("/services/a/2", b"http://10.0.0.1:80\n").expect("a URL");
        assert_eq!(two.authority.as_str(), "10.0.0.1:80");
        for garbage in [
            &b"garbage"[..],
            b"",
            b"\xff\xfe:80",
            b"host:99999",
            b"{\"a\":1}",
        ] {
            assert!(instance("/k", garbage).is_none(), "{garbage:?}");
        }
    }
}
