//! Discovery: watch tasks keep each service's upstream table in step with Consul.
//!
//! Each task runs Consul *blocking queries* on `/v1/health/service/<name>?passing`, which
//! return the moment the healthy set changes (or after `wait`). The loop follows Consul's
//! rules for blocking queries: send back `X-Consul-Index`, reset when it goes backwards, never
//! send an index below 1 after the first answer, treat an unchanged index as "no change",
//! cut a long-poll that hangs past `wait * 17/16` plus slack, rate-limit the loop with a token
//! bucket, and back off with jitter on errors. Errors never touch the table: the gateway keeps
//! serving the last good set while Consul is away.
//!
//! The loop talks to Consul through the [`Discovery`] trait (typed answers for one service),
//! so another source can be added beside Consul without touching the loop.
//!
//! With more services than Consul connections, the rest are watched in catalog mode
//! ([`catalog`]); [`set`] decides which service is watched which way and reconciles the
//! watches with each reloaded config.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod catalog;
mod set;
pub mod tag_routes;

pub use catalog::watch_catalog;
pub use set::{per_service_share, WatchSet};

use crate::config::{ConsulConfig, ServiceConfig};
use crate::tls::client::{client_config, ClientTls};
use crate::tls::TlsError;
use crate::upstream::{Instance, Upstream};

/// Idle connections to Consul kept for reuse (none under a budget of 8). The HTTP pool can
/// open a connection for a watch's next query before the last one is back; capping the idle
/// ones keeps the total at the queries in flight (which the watches budget) plus this.
pub fn idle_connections(max_connections: usize) -> usize {
    if max_connections >= 8 {
        2
    } else {
        0
    }
}
/// Extra time beyond Consul's own `wait + wait/16` before a long-poll counts as hung.
const LONG_POLL_SLACK: Duration = Duration::from_secs(5);
/// Token bucket for each watch loop: bursts of 10, then at most 50 queries/s. Enough for a
/// busy service (measured: a 10 query/s cap added ~100 ms to every change in a burst of five),
/// low enough that a loop Consul answers at once (a bug, or a broken index) cannot spin.
const RATE_BURST: u32 = 10;
const RATE_INTERVAL: Duration = Duration::from_millis(20);

/// A discovery failure. Never empties a table.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("Consul request failed: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("Consul long-poll hung past {0:?} and was cut")]
    Hung(Duration),
    #[error("Consul answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("Consul answer lacks a valid X-Consul-Index header")]
    MissingIndex,
    #[error("Consul answer is not the expected JSON: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("consul.token contains characters not allowed in a header")]
    InvalidToken,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the Consul server knows no leader; its answer may be an old state")]
    NoLeader,
}

/// Headers every Consul call carries: the ACL token, marked sensitive so it is never logged.
/// An HTTP client builder for Consul: the token header and, when an address is `https://`,
/// TLS from `consul.ca_file`, `cert_file`, `key_file`, `tls_server_name`. Shared by the
/// watches and self-registration.
pub fn consul_client(config: &ConsulConfig) -> Result<reqwest::ClientBuilder, DiscoveryError> {
    crate::tls::install_default_provider();
    let builder = reqwest::Client::builder().default_headers(consul_headers(config)?);
    match consul_tls(config)? {
        Some(tls) => Ok(builder.tls_backend_preconfigured(tls)),
        None => Ok(builder),
    }
}

/// The rustls config for Consul when any address is `https://`.
pub fn consul_tls(config: &ConsulConfig) -> Result<Option<rustls::ClientConfig>, TlsError> {
    if !config.addresses.iter().any(|a| a.scheme() == "https") {
        return Ok(None);
    }
    let tls = &config.tls;
    let settings = ClientTls {
        key: "consul".into(),
        ca_file: tls.ca_file.clone(),
        identity: tls.cert_file.clone().zip(tls.key_file.clone()),
        insecure_skip_verify: false,
        server_name: tls.server_name.clone(),
    };
    client_config(&settings, &[b"http/1.1"]).map(Some)
}

pub fn consul_headers(config: &ConsulConfig) -> Result<HeaderMap, DiscoveryError> {
    let mut headers = HeaderMap::new();
    if !config.token.is_empty() {
        let mut token = HeaderValue::from_str(config.token.expose())
            .map_err(|_| DiscoveryError::InvalidToken)?;
        token.set_sensitive(true);
        headers.insert("x-consul-token", token);
    }
    Ok(headers)
}

/// One answer of a discovery source for one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The source's change index (Consul's `X-Consul-Index`).
    pub index: u64,
    /// Healthy instances carrying every configured tag.
    pub instances: Vec<Instance>,
}

/// A source of healthy instances that supports blocking ("wake me on change") queries.
pub trait Discovery: Send + Sync + 'static {
    /// Returns the healthy instances of `service`, blocking until the source's index moves
    /// past `index` (or its wait elapses). `index == 0` returns at once.
    fn fetch(
        &self,
        service: &ServiceConfig,
        index: u64,
    ) -> impl Future<Output = Result<Answer, DiscoveryError>> + Send;
}

// ---------------------------------------------------------------------------------------------
// Consul's index rules.

/// What an answer's index means for the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexStep {
    /// First answer, or the index moved forward: look at the instances.
    Advanced { next: u64 },
    /// Same index as last time: nothing changed, do not rebuild.
    Unchanged { next: u64 },
    /// The index went backwards (e.g. a Consul server restarted with less state): the data is
    /// current, but the next query starts over from 0 so it does not block on a stale index.
    Reset,
}

impl IndexStep {
    /// Applies Consul's rules to `answered`, given the index of the previous query.
    pub fn from_indexes(previous: u64, answered: u64) -> Self {
        if answered < previous {
            IndexStep::Reset
        } else if answered == previous && previous != 0 {
            IndexStep::Unchanged { next: previous }
        } else {
            // Never block on index 0 after the first answer: that would return at once, forever.
            IndexStep::Advanced {
                next: answered.max(1),
            }
        }
    }

    /// The index to send with the next query.
    pub fn next_index(self) -> u64 {
        match self {
            IndexStep::Advanced { next } | IndexStep::Unchanged { next } => next,
            IndexStep::Reset => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pacing: token bucket and jittered backoff.

/// Allows `burst` queries at once, then one per `interval`.
#[derive(Debug)]
pub struct TokenBucket {
    burst: u32,
    interval: Duration,
    tokens: u32,
    last_refill: Instant,
}

impl TokenBucket {
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            tokens: burst,
            last_refill: Instant::now(),
        }
    }

    /// Waits until a token is available and takes it.
    pub async fn acquire(&mut self) {
        loop {
            let now = Instant::now();
            let earned = now.duration_since(self.last_refill).as_nanos() / self.interval.as_nanos();
            if earned > 0 {
                let earned = u32::try_from(earned).unwrap_or(u32::MAX);
                self.tokens = self.tokens.saturating_add(earned).min(self.burst);
                self.last_refill += self.interval * earned.min(self.burst);
                if self.tokens == self.burst {
                    self.last_refill = now;
                }
            }
            if self.tokens > 0 {
                self.tokens -= 1;
                return;
            }
            tokio::time::sleep_until(self.last_refill + self.interval).await;
        }
    }
}

/// Exponential backoff with "equal jitter": each delay is half fixed, half random, so many
/// gateways that lost Consul together do not come back in lockstep.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: 0,
        }
    }

    /// The delay before the next try; grows with each call until `reset`.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = exp / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// Consul.

/// Consul's `/v1/health/service/<name>` over HTTP, failing over between the configured
/// addresses: after an error every watch moves on to the next one.
pub struct ConsulDiscovery {
    http: reqwest::Client,
    bases: Vec<reqwest::Url>,
    current: AtomicUsize,
    datacenter: Option<String>,
    wait: Duration,
    hung_after: Duration,
}

impl ConsulDiscovery {
    pub fn new(config: &ConsulConfig) -> Result<Self, DiscoveryError> {
        // Consul adds up to wait/16 of jitter to every blocking query.
        let hung_after = config.wait + config.wait / 16 + LONG_POLL_SLACK;
        let http = consul_client(config)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(idle_connections(config.max_connections))
            .build()
            .map_err(DiscoveryError::Transport)?;
        Ok(Self {
            http,
            bases: config.addresses.clone(),
            current: AtomicUsize::new(0),
            datacenter: config.datacenter.clone(),
            wait: config.wait,
            hung_after,
        })
    }

    /// Overrides when a long-poll counts as hung (default `wait * 17/16 + 5s`).
    pub fn with_hung_after(mut self, hung_after: Duration) -> Self {
        self.hung_after = hung_after;
        self
    }

    /// After an error on address `failed`, moves every watch to the next address. Watches
    /// that fail together move it once, not once each.
    fn fail_over(&self, failed: usize) {
        if self.bases.len() > 1 {
            let next = (failed + 1) % self.bases.len();
            if self
                .current
                .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                info!(from = %self.bases[failed], to = %self.bases[next], "moving to the next Consul address");
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    #[serde(default)]
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    /// Absent on old Consul versions: weight 1.
    #[serde(default)]
    weights: Option<HealthWeights>,
}

/// `Service.Weights`: the share of traffic an instance gets while its checks pass.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthWeights {
    #[serde(default = "one")]
    passing: u32,
}

fn one() -> u32 {
    1
}

/// Turns Consul's health entries into instances carrying all `required_tags`. Entries that
/// cannot be addressed are skipped with a warning rather than failing the whole answer.
fn instances_from_entries(service: &ServiceConfig, entries: Vec<HealthEntry>) -> Vec<Instance> {
    entries
        .into_iter()
        .filter_map(|entry| {
            let tags = entry.service.tags.unwrap_or_default();
            if !service.tags.iter().all(|t| tags.contains(t)) {
                return None;
            }
            let address = if entry.service.address.is_empty() {
                entry.node.address
            } else {
                entry.service.address
            };
            let meta = entry.service.meta.unwrap_or_default();
            let weight = entry.service.weights.map_or(1, |w| w.passing);
            match Instance::new(entry.service.id, address, entry.service.port, tags, meta) {
                Ok(instance) => Some(instance.with_weight(weight)),
                Err(e) => {
                    warn!(service = %service.name, error = %e, "skipping unaddressable instance");
                    None
                }
            }
        })
        .collect()
}

fn parse_index(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("x-consul-index")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Discovery for ConsulDiscovery {
    async fn fetch(&self, service: &ServiceConfig, index: u64) -> Result<Answer, DiscoveryError> {
        let (index, body) = self
            .get(
                &format!("/v1/health/service/{}", service.name),
                index,
                |query| {
                    query.append_key_only("passing");
                    for tag in &service.tags {
                        query.append_pair("tag", tag);
                    }
                },
            )
            .await?;
        let entries: Vec<HealthEntry> =
            serde_json::from_slice(&body).map_err(DiscoveryError::Decode)?;
        Ok(Answer {
            index,
            instances: instances_from_entries(service, entries),
        })
    }
}

impl DiscoveryError {
    /// Whether another Consul server might do better (not, say, a malformed answer).
    fn is_server_side(&self) -> bool {
        match self {
            DiscoveryError::Transport(_) | DiscoveryError::Hung(_) | DiscoveryError::NoLeader => {
                true
            }
            DiscoveryError::Status { status, .. } => *status >= 500 || *status == 429,
            DiscoveryError::MissingIndex
            | DiscoveryError::Decode(_)
            | DiscoveryError::InvalidToken
            | DiscoveryError::Tls(_) => false,
        }
    }
}

impl ConsulDiscovery {
    /// A (blocking, when `index > 0`) GET of `path` on the current Consul server, with the
    /// common parameters (`stale`, `index`, `wait`, `dc`) plus those `add_query` appends.
    /// Returns `X-Consul-Index` and the body. Moves to the next server on server-side errors.
    pub(crate) async fn get(
        &self,
        path: &str,
        index: u64,
        add_query: impl FnOnce(&mut url::form_urlencoded::Serializer<'_, url::UrlQuery<'_>>),
    ) -> Result<(u64, bytes::Bytes), DiscoveryError> {
        let server = self.current.load(Ordering::Relaxed) % self.bases.len();
        let mut url = self.bases[server].clone();
        url.set_path(path);
        {
            let mut query = url.query_pairs_mut();
            add_query(&mut query);
            query.append_key_only("stale");
            query.append_pair("index", &index.to_string());
            query.append_pair("wait", &format!("{}ms", self.wait.as_millis()));
            if let Some(dc) = &self.datacenter {
                query.append_pair("dc", dc);
            }
        }
        let result = self.get_url(url).await;
        if let Err(error) = &result {
            if error.is_server_side() {
                self.fail_over(server);
            }
        }
        result
    }

    async fn get_url(&self, url: reqwest::Url) -> Result<(u64, bytes::Bytes), DiscoveryError> {
        let send = async {
            let response = self
                .http
                .get(url)
                .send()
                .await
                .map_err(DiscoveryError::Transport)?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(DiscoveryError::Transport)?;
            Ok::<_, DiscoveryError>((status, headers, body))
        };
        // The watchdog: a long-poll that outlives Consul's own bound plus slack is hung.
        let (status, headers, body) = tokio::time::timeout(self.hung_after, send)
            .await
            .map_err(|_| DiscoveryError::Hung(self.hung_after))??;
        // A missing KV key answers 404 with an index; blocking on it waits for its creation.
        let missing_key =
            status == reqwest::StatusCode::NOT_FOUND && parse_index(&headers).is_some();
        if !status.is_success() && !missing_key {
            let text = String::from_utf8_lossy(&body);
            let body: String = text.trim().chars().take(200).collect();
            return Err(DiscoveryError::Status {
                status: status.as_u16(),
                body,
            });
        }
        let index = parse_index(&headers).ok_or(DiscoveryError::MissingIndex)?;
        if headers
            .get("x-consul-knownleader")
            .and_then(|v| v.to_str().ok())
            == Some("false")
        {
            // A server that knows no leader may serve an old state: a restarted one answers
            // from its last snapshot until it has replayed its log (seen emptying a table in
            // the restart drill). Not applied; another server, or this one once it has a
            // leader, is asked again.
            return Err(DiscoveryError::NoLeader);
        }
        match missing_key {
            true => Ok((index, bytes::Bytes::new())),
            false => Ok((index, body)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The watch loop.

/// Pacing of one watch loop.
#[derive(Debug, Clone, Copy)]
pub struct WatchPacing {
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl From<&ConsulConfig> for WatchPacing {
    fn from(config: &ConsulConfig) -> Self {
        Self {
            backoff_base: config.backoff_base,
            backoff_max: config.backoff_max,
        }
    }
}

/// Keeps `upstream`'s table in step with `discovery` until `shutdown` is cancelled.
pub async fn watch_service<D: Discovery>(
    discovery: Arc<D>,
    upstream: Arc<Upstream>,
    pacing: WatchPacing,
    shutdown: CancellationToken,
) {
    let name = upstream.name().to_owned();
    let mut index = 0u64;
    let mut bucket = TokenBucket::new(RATE_BURST, RATE_INTERVAL);
    let mut backoff = Backoff::new(pacing.backoff_base, pacing.backoff_max);
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            result = async {
                bucket.acquire().await;
                discovery.fetch(&upstream.config, index).await
            } => result,
        };
        match result {
            Ok(answer) => {
                if backoff.failures > 0 {
                    info!(service = %name, index = answer.index, "Consul watch resumed");
                }
                backoff.reset();
                let step = IndexStep::from_indexes(index, answer.index);
                let answered = Instant::now();
                upstream.record_sync(answer.index);
                if step != (IndexStep::Unchanged { next: index }) {
                    let count = answer.instances.len();
                    if upstream.replace_instances(answer.instances) {
                        upstream.metrics.observe_propagation(answered.elapsed());
                        info!(service = %name, index = answer.index, instances = count, "table updated");
                    }
                }
                if step == IndexStep::Reset {
                    info!(service = %name, previous = index, answered = answer.index, "Consul index went backwards; resetting");
                }
                index = step.next_index();
            }
            Err(error) => {
                upstream.record_discovery_error();
                if let DiscoveryError::Hung(_) = error {
                    upstream.metrics.consul_hung();
                }
                // Resync with a non-blocking query: blocking on the old index would leave a
                // Consul that came back unchanged unconfirmed (and us stale) for a whole `wait`.
                index = 0;
                let delay = backoff.next_delay();
                warn!(service = %name, %error, retry_in = ?delay, "Consul query failed; keeping the last table");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    debug!(service = %name, "watch stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_answer_advances_and_never_below_one() {
        assert_eq!(
            IndexStep::from_indexes(0, 42),
            IndexStep::Advanced { next: 42 }
        );
        // An index of 0 from Consul must not be sent back: it would never block.
        assert_eq!(
            IndexStep::from_indexes(0, 0),
            IndexStep::Advanced { next: 1 }
        );
        assert_eq!(IndexStep::from_indexes(0, 0).next_index(), 1);
    }

    #[test]
    fn unchanged_index_means_no_change() {
        assert_eq!(
            IndexStep::from_indexes(42, 42),
            IndexStep::Unchanged { next: 42 }
        );
    }

    #[test]
    fn backwards_index_resets() {
        assert_eq!(IndexStep::from_indexes(42, 7), IndexStep::Reset);
        assert_eq!(IndexStep::from_indexes(42, 7).next_index(), 0);
        // After a reset, the next answer is taken as a first answer.
        assert_eq!(
            IndexStep::from_indexes(0, 7),
            IndexStep::Advanced { next: 7 }
        );
    }

    #[test]
    fn forward_index_advances() {
        assert_eq!(
            IndexStep::from_indexes(42, 43),
            IndexStep::Advanced { next: 43 }
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_burst_then_paces() {
        let mut bucket = TokenBucket::new(3, Duration::from_millis(100));
        let start = Instant::now();
        for _ in 0..3 {
            bucket.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "burst is immediate");
        for _ in 0..5 {
            bucket.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(600), "{elapsed:?}");
    }

    #[test]
    fn entries_use_service_address_then_node_address_and_filter_tags() {
        let json = r#"[
          {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "a", "Address": "", "Port": 80, "Tags": ["v2", "x"]}},
          {"Node": {"Address": "10.0.0.2"}, "Service": {"ID": "b", "Address": "10.9.9.9", "Port": 81, "Tags": ["v2"]}},
          {"Node": {"Address": "10.0.0.3"}, "Service": {"ID": "c", "Address": "", "Port": 82, "Tags": null}}
        ]"#;
        let entries: Vec<HealthEntry> = serde_json::from_str(json).unwrap();
        let mut service = crate::config::Config::from_yaml(
            "services:\n  - name: s\n    tags: [v2]\n",
            &Default::default(),
        )
        .unwrap()
        .services
        .remove(0);
        let instances = instances_from_entries(&service, entries);
        let authorities: Vec<_> = instances.iter().map(|i| i.authority.as_str()).collect();
        assert_eq!(authorities, ["10.0.0.1:80", "10.9.9.9:81"]);
        service.tags.clear();
        let entries: Vec<HealthEntry> = serde_json::from_str(json).unwrap();
        assert_eq!(instances_from_entries(&service, entries).len(), 3);
    }

    #[test]
    fn entries_carry_the_passing_weight() {
        let json = r#"[
          {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "a", "Port": 80, "Weights": {"Passing": 3, "Warning": 1}}},
          {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "b", "Port": 81}}
        ]"#;
        let entries: Vec<HealthEntry> = serde_json::from_str(json).unwrap();
        let service =
            crate::config::Config::from_yaml("services:\n  - name: s\n", &Default::default())
                .unwrap()
                .services
                .remove(0);
        let weights: Vec<u32> = instances_from_entries(&service, entries)
            .iter()
            .map(|i| i.weight)
            .collect();
        assert_eq!(weights, [3, 1]);
    }
}
