//! The Consul source: one HTTP client for every Consul call, the per-service blocking watch,
//! catalog mode and tag routes.
//!
//! [`ConsulClient`] is the one way to Consul: headers (the ACL token, marked sensitive so it
//! never reaches a log), TLS for `https://` addresses, and failover between the configured
//! addresses (after a server-side error every user moves on to the next one). The watches
//! and self-registration (`crate::registration`) share it, so both fail over alike.
//! Its GETs on `http://` addresses (the blocking queries) go through [`http1`], a small
//! client that holds no buffer while a query waits; PUTs and `https://` go through reqwest.
//!
//! [`watch`] is the per-service blocking query as a [`Source`](super::Source)
//! ([`ConsulSource`]): it sends typed updates with `X-Consul-Index` as their version, and
//! [`super::follow`] applies them like any other source's. With more services than Consul
//! connections, the rest are watched in catalog mode ([`catalog`]), which is Consul-internal
//! and writes the tables of its services itself; [`set`] decides which service is watched
//! which way, within one connection budget shared with the tag-route watcher.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use tracing::{info, warn};

mod catalog;
mod http1;
mod lanes;
pub mod limits;
mod set;
pub mod tag_routes;
mod watch;

pub use catalog::watch_catalog;
pub use set::{per_service_share, Claim, ConnectionBudget, ConsulWatches};
pub use watch::{watch_service, Backoff, ConsulSource, IndexStep, TokenBucket, WatchPacing};

use crate::config::{ConsulConfig, ServiceConfig};
use crate::tls::client::{client_config, ClientTls};
use crate::tls::TlsError;
use crate::upstream::Instance;

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
/// A connection to Consul not made within this is an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle connection to Consul is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The startup question whether Consul's HTTPS speaks HTTP/2 waits at most this (a TLS
/// handshake and one small answer; ~5 ms on loopback).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Agent calls (self-registration) are answered at once; one that takes longer is cut.
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time beyond Consul's own `wait + wait/16` before a long-poll counts as hung.
const LONG_POLL_SLACK: Duration = Duration::from_secs(5);
/// Token bucket for each watch loop: bursts of 10, then at most 50 queries/s. Enough for a
/// busy service (measured: a 10 query/s cap added ~100 ms to every change in a burst of five),
/// low enough that a loop Consul answers at once (a bug, or a broken index) cannot spin.
pub(crate) const RATE_BURST: u32 = 10;
pub(crate) const RATE_INTERVAL: Duration = Duration::from_millis(20);

/// A discovery failure. Never empties a table.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("Consul request failed: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("Consul request failed: {0}")]
    Connection(#[source] http1::Http1Error),
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

/// An answer as [`ConsulClient::get_raw`] returns it: status, headers, body.
pub(super) type RawAnswer = (
    reqwest::StatusCode,
    reqwest::header::HeaderMap,
    bytes::Bytes,
);

/// Consul's answer with an error `status` as a [`DiscoveryError::Status`] (the start of its
/// body: Consul's error text).
pub(super) fn status_error(status: reqwest::StatusCode, body: &[u8]) -> DiscoveryError {
    let text = String::from_utf8_lossy(body);
    DiscoveryError::Status {
        status: status.as_u16(),
        body: text.trim().chars().take(200).collect(),
    }
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
    // HTTP/2 first: Consul's HTTPS listener speaks it, and the long-polls then share
    // connections ([`lanes`]).
    client_config(&settings, &[b"h2", b"http/1.1"]).map(Some)
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

/// One answer of Consul's health endpoint for one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Consul's change index (`X-Consul-Index`).
    pub index: u64,
    /// Healthy instances carrying every configured tag.
    pub instances: Vec<Instance>,
}

/// Consul's blocking ("wake me on change") health query, as a trait so the watch loop runs
/// against a scripted fake in tests (`tests/fake_consul.rs`). Index-based and Consul's own:
/// other registries implement [`Source`](super::Source) instead.
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
// Consul.

/// What [`ConsulClient::negotiate_http2`] learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// Known for the life of the process (or nothing to ask: not HTTPS).
    Settled,
    /// Consul did not answer; worth asking again.
    NoAnswer,
}

/// Consul's `/v1/health/service/<name>` over HTTP, failing over between the configured
/// addresses: after an error every watch moves on to the next one.
pub struct ConsulClient {
    http: reqwest::Client,
    /// GETs on `http://` addresses (the long-polls): far less memory per connection.
    light: http1::LightClient,
    /// GETs on `https://` addresses: at most [`lanes::STREAMS_PER_LANE`] per connection, so a
    /// query never waits behind Go's 250 streams, whether or not the budget counted on
    /// HTTP/2 ([`ConsulClient::negotiate_http2`]).
    lanes: Option<lanes::Lanes>,
    bases: Vec<reqwest::Url>,
    current: AtomicUsize,
    datacenter: Option<String>,
    wait: Duration,
    hung_after: Duration,
}

impl ConsulClient {
    pub fn new(config: &ConsulConfig) -> Result<Self, DiscoveryError> {
        // Consul adds up to wait/16 of jitter to every blocking query.
        let hung_after = config.wait + config.wait / 16 + LONG_POLL_SLACK;
        let http = consul_client(config)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(idle_connections(config.max_connections))
            .build()
            .map_err(DiscoveryError::Transport)?;
        let light = http1::LightClient::new(
            consul_headers(config)?,
            idle_connections(config.max_connections),
        );
        let lanes = consul_tls(config)?
            .map(|tls| lanes::LaneSettings {
                headers: light.headers().clone(),
                tls,
                connect_timeout: CONNECT_TIMEOUT,
                idle_timeout: IDLE_TIMEOUT,
                max_lanes: config.max_connections,
            })
            .map(lanes::Lanes::new);
        Ok(Self {
            http,
            light,
            lanes,
            bases: config.addresses.clone(),
            current: AtomicUsize::new(0),
            datacenter: config.datacenter.clone(),
            wait: config.wait,
            hung_after,
        })
    }

    /// Asks whether Consul's HTTPS answers over HTTP/2 (a `GET /v1/status/leader` on the
    /// first address, within [`PROBE_TIMEOUT`]); if it does, the connection budget may count
    /// the long-polls that share a connection ([`lanes`]) from then on. Not every address
    /// `https://`, or an answer over HTTP/1.1: one long-poll per connection, as over
    /// `http://`. No answer: the same until a later ask gets one (`wiring` asks again).
    pub async fn negotiate_http2(&self) -> Negotiated {
        let Some(https_lanes) = &self.lanes else {
            return Negotiated::Settled;
        };
        if !self.bases.iter().all(|base| base.scheme() == "https") {
            return Negotiated::Settled;
        }
        let mut url = self.bases[0].clone();
        url.set_path("/v1/status/leader");
        let answer = match tokio::time::timeout(PROBE_TIMEOUT, self.http.get(url).send()).await {
            Ok(answer) => answer.map_err(|error| error.to_string()),
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        match answer {
            Ok(answer) if answer.version() == reqwest::Version::HTTP_2 => {
                info!(
                    queries_per_connection = lanes::STREAMS_PER_LANE,
                    "Consul answers HTTPS over HTTP/2: blocking queries share connections"
                );
                https_lanes.speak_http2();
                Negotiated::Settled
            }
            Ok(answer) => {
                info!(
                    version = ?answer.version(),
                    "Consul answers HTTPS without HTTP/2: one blocking query per connection"
                );
                Negotiated::Settled
            }
            Err(error) => {
                warn!(
                    error,
                    "no answer from Consul's HTTPS: one blocking query per connection until it answers"
                );
                Negotiated::NoAnswer
            }
        }
    }

    /// How many blocking queries one connection to Consul carries: [`lanes::STREAMS_PER_LANE`]
    /// over HTTP/2, else 1.
    pub fn queries_per_connection(&self) -> usize {
        match self.lanes.as_ref().is_some_and(lanes::Lanes::http2) {
            true => lanes::STREAMS_PER_LANE,
            false => 1,
        }
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

impl Discovery for ConsulClient {
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
            DiscoveryError::Transport(_)
            | DiscoveryError::Connection(_)
            | DiscoveryError::Hung(_)
            | DiscoveryError::NoLeader => true,
            DiscoveryError::Status { status, .. } => *status >= 500 || *status == 429,
            DiscoveryError::MissingIndex
            | DiscoveryError::Decode(_)
            | DiscoveryError::InvalidToken
            | DiscoveryError::Tls(_) => false,
        }
    }
}

impl ConsulClient {
    /// A PUT at `path` (with `body` as JSON, if any) on the current Consul address, moving to
    /// the next address on a server-side error, like the watches. Returns the address that
    /// took it: agent endpoints act on that agent only, so undoing the call goes there
    /// ([`ConsulClient::put_at`]).
    pub async fn put(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<reqwest::Url, DiscoveryError> {
        let server = self.current.load(Ordering::Relaxed) % self.bases.len();
        let base = self.bases[server].clone();
        let result = self.put_at(&base, path, body).await;
        if let Err(error) = &result {
            if error.is_server_side() {
                self.fail_over(server);
            }
        }
        result.map(|()| base)
    }

    /// A PUT at `path` on the Consul address `base`, cut after [`AGENT_CALL_TIMEOUT`].
    pub async fn put_at(
        &self,
        base: &reqwest::Url,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(), DiscoveryError> {
        let mut url = base.clone();
        url.set_path(path);
        let mut request = self.http.put(url);
        if let Some(body) = body {
            request = request.json(body);
        }
        let send = async {
            let response = request.send().await.map_err(DiscoveryError::Transport)?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let body = response.bytes().await.unwrap_or_default();
            Err(status_error(status, &body))
        };
        tokio::time::timeout(AGENT_CALL_TIMEOUT, send)
            .await
            .map_err(|_| DiscoveryError::Hung(AGENT_CALL_TIMEOUT))?
    }
}

impl ConsulClient {
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

    /// A GET of `url`: its status, headers and whole body, whatever the status.
    pub(super) async fn get_raw(&self, url: reqwest::Url) -> Result<RawAnswer, DiscoveryError> {
        if self.light.serves(&url) {
            return self
                .light
                .get(&url)
                .await
                .map_err(DiscoveryError::Connection);
        }
        // The lane's place is held until the whole answer is read.
        let ticket = match &self.lanes {
            Some(lanes) if url.scheme() == "https" => Some(lanes.take()?),
            _ => None,
        };
        let client = ticket.as_ref().map_or(&self.http, |ticket| ticket.client());
        let response = client
            .get(url)
            .send()
            .await
            .map_err(DiscoveryError::Transport)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(DiscoveryError::Transport)?;
        Ok((status, headers, body))
    }

    async fn get_url(&self, url: reqwest::Url) -> Result<(u64, bytes::Bytes), DiscoveryError> {
        // The watchdog: a long-poll that outlives Consul's own bound plus slack is hung.
        let (status, headers, body) = tokio::time::timeout(self.hung_after, self.get_raw(url))
            .await
            .map_err(|_| DiscoveryError::Hung(self.hung_after))??;
        // A missing KV key answers 404 with an index; blocking on it waits for its creation.
        let missing_key =
            status == reqwest::StatusCode::NOT_FOUND && parse_index(&headers).is_some();
        if !status.is_success() && !missing_key {
            return Err(status_error(status, &body));
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

#[cfg(test)]
mod tests {
    use super::*;

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
