//! Configuration: `gateway.yaml` plus `SWITCHYARD__*` environment overrides, read and validated
//! once at start into typed values (`SocketAddr`, `Duration`, `Url`).
//!
//! Raw structs mirror the file and reject unknown keys (`deny_unknown_fields`), so a typo is an
//! error rather than a silently ignored setting. Validation turns them into the `Config` the
//! rest of the crate uses; every error names the offending key. This module imports no other
//! module of the crate.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod sources;

pub use sources::{default_dns_name, default_etcd_prefix, default_zookeeper_path};
pub use sources::{
    is_host_port, split_host_port, DnsConfig, EtcdConfig, SourceConfig, ZookeeperConfig,
};
use sources::{RawDns, RawEtcd, RawServiceSource, RawZookeeper};

use ipnet::IpNet;
use reqwest::Url;
use serde::{Deserialize, Serialize};

/// Consul's upper bound for a blocking query's `wait`.
const CONSUL_MAX_WAIT: Duration = Duration::from_secs(600);

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing, is not YAML, has an unknown key or a value of the wrong type.
    /// The `config` crate's message names the key.
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// The file parsed but a value is not acceptable.
    #[error("invalid `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// A value that must never be printed or logged (the Consul ACL token).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// How a service's instances are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    /// Power of two choices over requests in flight.
    LeastRequest,
    /// Consistent hashing (Maglev) of the request's `hash_on` key.
    Hash,
}

impl Balance {
    pub const ALL: [Balance; 4] = [
        Balance::RoundRobin,
        Balance::Random,
        Balance::LeastRequest,
        Balance::Hash,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::Random => "random",
            Balance::LeastRequest => "least_request",
            Balance::Hash => "hash",
        }
    }
}

/// What the `hash` balancer hashes (`hash_on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header's value (`header:X-User`); the name is kept lower-case.
    Header(String),
    /// A cookie's value (`cookie:session`).
    Cookie(String),
    /// The client's IP address (the connection's peer).
    ClientIp,
}

impl HashOn {
    fn parse(key: &str, text: &str) -> Result<HashOn, ConfigError> {
        let text = text.trim();
        let named = |name: &str| -> Result<String, ConfigError> {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
            match valid {
                true => Ok(name.to_owned()),
                false => Err(invalid(
                    key,
                    format!("{name:?} is not a valid header or cookie name"),
                )),
            }
        };
        match text.split_once(':') {
            Some(("header", name)) => Ok(HashOn::Header(named(name.trim())?.to_ascii_lowercase())),
            Some(("cookie", name)) => Ok(HashOn::Cookie(named(name.trim())?)),
            _ if text == "client_ip" => Ok(HashOn::ClientIp),
            _ => Err(invalid(
                key,
                format!(
                    "{text:?} is not one of \"header:<name>\", \"cookie:<name>\", \"client_ip\""
                ),
            )),
        }
    }
}

impl fmt::Display for HashOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashOn::Header(name) => write!(f, "header:{name}"),
            HashOn::Cookie(name) => write!(f, "cookie:{name}"),
            HashOn::ClientIp => f.write_str("client_ip"),
        }
    }
}

impl Serialize for HashOn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One canary share (`services[].split`): `basis_points` of 10,000 requests go to the
/// instances carrying all of `tags`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitConfig {
    pub tags: Vec<String>,
    /// Hundredths of a percent (`percent: 5` is 500).
    pub basis_points: u32,
}

/// How the gateway speaks to a service's instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over plain TCP.
    #[default]
    Http1,
    /// HTTP/2 over plain TCP with prior knowledge (gRPC's usual transport).
    H2c,
    /// HTTP/1.1 over TLS.
    Https,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::Https => "https",
            UpstreamProtocol::H2 => "h2",
        }
    }

    /// Whether the connection to the instance is TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, UpstreamProtocol::Https | UpstreamProtocol::H2)
    }
}

/// TLS to a service's instances (`services[].tls`, with `protocol: https | h2`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct UpstreamTlsConfig {
    /// PEM CA bundle to verify instances; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The name to verify (and send as SNI); `None`: the instance's address.
    pub server_name: Option<String>,
    /// Accept any certificate (warned about at start).
    pub insecure_skip_verify: bool,
    /// Client certificate chain and key, for instances that require mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The whole, validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `/routes`.
    pub admin_listen: SocketAddr,
    /// Tokio worker threads; 0 means one per core.
    pub workers: usize,
    pub consul: ConsulConfig,
    pub services: Vec<ServiceConfig>,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub access_log: AccessLogConfig,
    /// `None`: the gateway does not register itself in Consul.
    pub register: Option<RegisterConfig>,
    pub tag_routes: TagRoutesConfig,
    /// `None`: no TLS listener.
    pub tls: Option<TlsConfig>,
    /// Registries other than Consul, used by services with `source: etcd|zookeeper|dns`.
    pub etcd: EtcdConfig,
    pub zookeeper: ZookeeperConfig,
    pub dns: DnsConfig,
    /// `Some(interval)`: also reload when the config file changes (checked every interval),
    /// besides SIGHUP.
    #[serde(with = "optional_duration")]
    pub watch_config: Option<Duration>,
}

mod optional_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => serializer.serialize_str(&humantime::format_duration(*d).to_string()),
            None => serializer.serialize_none(),
        }
    }
}

/// Routes from Consul service tags in fabio's grammar, and fabio's KV commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TagRoutesConfig {
    pub enabled: bool,
    /// A tag starting with this is a route (`urlprefix-/api strip=/api`).
    pub prefix: String,
    /// The Consul KV key with `route add|del|weight` commands; `None`: not read.
    pub kv_path: Option<String>,
}

/// TLS termination: a second client listener. The files are read by the `tls` module, at
/// start and on every reload; only their paths live here (never key material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// SNI picks among these by the names each certificate is valid for; the first is the
    /// default (no SNI, or a name none of them has).
    pub certificates: Vec<CertificateConfig>,
    /// The plain listener answers every request with a 308 to the https URL.
    pub redirect_http: bool,
}

/// One certificate: a PEM chain (leaf first) and its private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The gateway's own registration in Consul, with an HTTP check on the admin `/healthz`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegisterConfig {
    pub name: String,
    /// Empty: `<name>-<listen port>-<host name>` at start.
    pub id: String,
    /// The address other services should use; empty: the `listen` IP (or, when that is
    /// unspecified, the agent's node address).
    pub address: String,
    pub tags: Vec<String>,
    #[serde(with = "humantime_serde_compat")]
    pub check_interval: Duration,
    /// Consul removes the registration if its check stays critical this long (a crashed
    /// gateway that never deregistered).
    #[serde(with = "humantime_serde_compat")]
    pub deregister_after: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsulConfig {
    /// One or more Consul HTTP addresses; on errors the watcher moves to the next one.
    #[serde(serialize_with = "serialize_urls")]
    pub addresses: Vec<Url>,
    pub token: Secret,
    /// `None`: the agent's own datacenter.
    pub datacenter: Option<String>,
    #[serde(with = "humantime_serde_compat")]
    pub wait: Duration,
    /// First delay after a failed query; doubles per failure up to `backoff_max`, jittered.
    #[serde(with = "humantime_serde_compat")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub backoff_max: Duration,
    /// A service whose Consul queries have failed for this long makes `/readyz` answer 503
    /// (its table keeps serving).
    #[serde(with = "humantime_serde_compat")]
    pub stale_after: Duration,
    /// Most HTTP connections the gateway opens to Consul (Consul refuses more than 200 per
    /// client address by default).
    pub max_connections: usize,
    pub watch: WatchMode,
    /// TLS for `https://` addresses.
    pub tls: ConsulTlsConfig,
}

/// TLS to Consul (`consul.ca_file` ... or Consul's own `CONSUL_CACERT` ... variables).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConsulTlsConfig {
    /// PEM CA bundle; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and key (Consul's `verify_incoming`).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name to verify; `None`: the address's host.
    pub server_name: Option<String>,
}

/// How services are watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchMode {
    /// `per_service` while every service fits in `max_connections`; beyond, per-service for
    /// as many services as fit beside catalog mode's share, catalog mode for the rest.
    Auto,
    /// One blocking query per service: the fastest propagation, one connection each.
    PerService,
    /// Two catalog-wide change detectors plus targeted fetches: bounded connections.
    Catalog,
}

impl ConsulConfig {
    /// Calls `check` with each key's name and whether it differs in `next` (all restart-only:
    /// the Consul client and the watches are built at start).
    fn diff(&self, next: &ConsulConfig, check: &mut impl FnMut(&'static str, bool)) {
        let ConsulConfig {
            addresses,
            token,
            datacenter,
            wait,
            backoff_base,
            backoff_max,
            stale_after,
            max_connections,
            watch,
            tls,
        } = self;
        check("consul.address", *addresses != next.addresses);
        check("consul.token", *token != next.token);
        check("consul.datacenter", *datacenter != next.datacenter);
        check("consul.wait", *wait != next.wait);
        check("consul.backoff_base", *backoff_base != next.backoff_base);
        check("consul.backoff_max", *backoff_max != next.backoff_max);
        check("consul.stale_after", *stale_after != next.stale_after);
        check(
            "consul.max_connections",
            *max_connections != next.max_connections,
        );
        check("consul.watch", *watch != next.watch);
        check("consul.ca_file", tls.ca_file != next.tls.ca_file);
        check("consul.cert_file", tls.cert_file != next.tls.cert_file);
        check("consul.key_file", tls.key_file != next.tls.key_file);
        check(
            "consul.tls_server_name",
            tls.server_name != next.tls.server_name,
        );
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceConfig {
    pub name: String,
    /// An instance must carry all of these tags.
    pub tags: Vec<String>,
    pub route: RouteConfig,
    pub balance: Balance,
    /// For `balance: hash`: what identifies a request's session.
    pub hash_on: Option<HashOn>,
    /// Shares of requests to instances by tag; the rest to instances in no split.
    pub split: Vec<SplitConfig>,
    pub protocol: UpstreamProtocol,
    /// `Some` exactly when `protocol` is `https` or `h2`.
    pub tls: Option<UpstreamTlsConfig>,
    pub retry: RetryConfig,
    pub outlier: OutlierConfig,
    /// Where the instances come from (`source` and its key).
    #[serde(flatten)]
    pub source: SourceConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteConfig {
    /// Always starts with `/`; the longest matching prefix wins.
    pub path_prefix: String,
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    pub strip_prefix: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryConfig {
    /// Total tries, the first included (>= 1).
    pub attempts: u32,
    /// Deadline for all tries together.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Retries may be at most this share (percent) of requests, so retries cannot multiply
    /// an overload (Envoy's and Linkerd's 20%)...
    pub budget_percent: u32,
    /// ...plus this many retries per second (so a quiet service can retry too).
    pub budget_min_per_second: u32,
}

/// Passive outlier detection: instances that keep failing are ejected for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutlierConfig {
    /// Consecutive failed tries (connect errors or 5xx) that eject an instance; 0 disables.
    pub consecutive_failures: u32,
    /// First ejection time; the n-th ejection of the same instance lasts n times this.
    #[serde(with = "humantime_serde_compat")]
    pub base_ejection_time: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub max_ejection_time: Duration,
    /// Never eject more than this share (percent) of a service's instances at once, so a sick
    /// service degrades instead of going dark (Envoy's panic threshold, seen from the other side).
    pub max_ejected_percent: u32,
}

/// Limits of the client-facing listener.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerConfig {
    /// How long in-flight requests may run after SIGTERM/SIGINT before being cut.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    /// A client must send its whole request head within this time (slowloris guard).
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Largest request body accepted; larger gets 413.
    pub max_body_bytes: u64,
    /// Client connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one client address may hold open at once; 0: no limit. More are closed
    /// at accept (nginx's `limit_conn`, HAProxy's `src_conn_cur`).
    pub max_connections_per_client: usize,
    /// A connection with no request in flight and none started for this long is closed
    /// (HTTP/2 gets a GOAWAY first).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Requests per second one client address may abandon before its answer (an HTTP/2
    /// RST_STREAM, a closed connection); beyond, its requests get 429 for a second. 0: no limit.
    pub client_reset_rate: u32,
    /// Peers whose `X-Forwarded-*`, `Forwarded` and `X-Real-IP` headers are kept (and
    /// appended to); from any other peer they are replaced. Empty: trust no one.
    #[serde(serialize_with = "serialize_display_list")]
    pub trusted_proxies: Vec<IpNet>,
    /// Resolve `.`/`..` segments (also percent-encoded) and merge repeated slashes before
    /// routing, and forward the result (Envoy's `normalize_path` + `merge_slashes`).
    pub normalize_path: bool,
}

/// How the gateway talks to service instances.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Request bodies up to this size (by Content-Length) are buffered so a retry can resend
    /// them; larger or unsized bodies are streamed and never retried after sending.
    pub max_replay_body_bytes: usize,
    /// Requests in flight to one instance at once (over HTTP/1.1, its connections); more wait
    /// up to `connect_timeout` for a slot, then try another instance or get 503.
    pub max_connections_per_instance: usize,
}

/// Where the JSON-lines access log goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogTarget {
    /// No access log (the default): the request path does no logging work at all.
    Off,
    /// Standard output (`path: "-"`); the process's own log goes to standard error.
    Stdout,
    /// Appended to this file, created if missing.
    File(PathBuf),
}

/// The optional access log: one JSON object per answered request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessLogConfig {
    pub target: AccessLogTarget,
    /// Entries queued for the writer; when it falls behind, more are dropped and counted.
    pub buffer: usize,
}

fn serialize_display_list<S, T>(items: &[T], serializer: S) -> Result<S::Ok, S::Error>
where
    S: serde::Serializer,
    T: fmt::Display,
{
    serializer.collect_seq(items.iter().map(ToString::to_string))
}

fn serialize_urls<S: serde::Serializer>(urls: &[Url], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(urls.iter().map(Url::as_str))
}

/// Serializes durations the way the file spells them ("5s", "5m").
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Raw, as written in the file.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_admin_listen")]
    admin_listen: String,
    #[serde(default)]
    workers: usize,
    #[serde(default)]
    consul: RawConsul,
    services: Vec<RawService>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    access_log: RawAccessLog,
    #[serde(default)]
    register: RawRegister,
    #[serde(default)]
    tag_routes: RawTagRoutes,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    etcd: RawEtcd,
    #[serde(default)]
    zookeeper: RawZookeeper,
    #[serde(default)]
    dns: RawDns,
    /// "" or "off": SIGHUP only; a duration ("2s"): also poll the file for changes.
    #[serde(default)]
    watch_config: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTagRoutes {
    #[serde(default)]
    enabled: bool,
    #[serde(default = "default_tag_prefix")]
    prefix: String,
    #[serde(default = "default_kv_path")]
    kv_path: String,
}

impl Default for RawTagRoutes {
    fn default() -> Self {
        Self {
            enabled: false,
            prefix: default_tag_prefix(),
            kv_path: default_kv_path(),
        }
    }
}

fn default_tag_prefix() -> String {
    "urlprefix-".into()
}
fn default_kv_path() -> String {
    "/fabio/config".into()
}

impl RawTagRoutes {
    fn validate(self) -> Result<TagRoutesConfig, ConfigError> {
        if self.prefix.trim().is_empty() || self.prefix.contains(char::is_whitespace) {
            return Err(invalid(
                "tag_routes.prefix",
                "must be non-empty, without spaces",
            ));
        }
        let kv_path = self.kv_path.trim().trim_matches('/').to_owned();
        Ok(TagRoutesConfig {
            enabled: self.enabled,
            prefix: self.prefix,
            kv_path: Some(kv_path).filter(|p| !p.is_empty()),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegister {
    #[serde(default)]
    enabled: bool,
    #[serde(default = "default_register_name")]
    name: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default = "default_register_interval")]
    check_interval: String,
    #[serde(default = "default_register_deregister_after")]
    deregister_after: String,
}

impl Default for RawRegister {
    fn default() -> Self {
        Self {
            enabled: false,
            name: default_register_name(),
            id: String::new(),
            address: String::new(),
            tags: Vec::new(),
            check_interval: default_register_interval(),
            deregister_after: default_register_deregister_after(),
        }
    }
}

fn default_register_name() -> String {
    "switchyard".into()
}
fn default_register_interval() -> String {
    "10s".into()
}
fn default_register_deregister_after() -> String {
    "10m".into()
}

impl RawRegister {
    fn validate(self) -> Result<Option<RegisterConfig>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        if !is_valid_service_name(self.name.trim()) {
            return Err(invalid(
                "register.name",
                format!(
                    "{:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                    self.name
                ),
            ));
        }
        let deregister_after =
            parse_positive_duration("register.deregister_after", &self.deregister_after)?;
        if deregister_after < Duration::from_secs(60) {
            return Err(invalid(
                "register.deregister_after",
                "Consul's minimum is 1m",
            ));
        }
        Ok(Some(RegisterConfig {
            name: self.name.trim().to_owned(),
            id: self.id.trim().to_owned(),
            address: self.address.trim().to_owned(),
            tags: self.tags,
            check_interval: parse_positive_duration(
                "register.check_interval",
                &self.check_interval,
            )?,
            deregister_after,
        }))
    }
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:8081".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsul {
    address: Option<RawAddresses>,
    token: Option<String>,
    #[serde(default)]
    datacenter: String,
    #[serde(default = "default_wait")]
    wait: String,
    #[serde(default = "default_backoff_base")]
    backoff_base: String,
    #[serde(default = "default_backoff_max")]
    backoff_max: String,
    #[serde(default = "default_stale_after")]
    stale_after: String,
    #[serde(default = "default_consul_max_connections")]
    max_connections: usize,
    #[serde(default)]
    watch: Option<String>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    tls_server_name: Option<String>,
}

/// `consul.address`: one address, a comma-separated list (handy in env overrides), or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAddresses {
    One(String),
    Many(Vec<String>),
}

impl Default for RawConsul {
    fn default() -> Self {
        Self {
            address: None,
            token: None,
            datacenter: String::new(),
            wait: default_wait(),
            backoff_base: default_backoff_base(),
            backoff_max: default_backoff_max(),
            stale_after: default_stale_after(),
            max_connections: default_consul_max_connections(),
            watch: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_server_name: None,
        }
    }
}

fn default_wait() -> String {
    "5m".into()
}
fn default_backoff_base() -> String {
    "200ms".into()
}
fn default_backoff_max() -> String {
    "5s".into()
}
fn default_stale_after() -> String {
    "60s".into()
}
/// 128 lets `auto` give each of 100 services a blocking query of its own (per-service
/// propagation p99 7-9 ms at 100 services x 10 instances, against 22-285 ms with 51 per-service
/// and 49 in catalog mode at 64), and leaves 72 of Consul's default 200 connections per client
/// address for other clients on the same address.
fn default_consul_max_connections() -> usize {
    128
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    route: Option<RawRoute>,
    /// Parsed in `validate` so the error can list the choices.
    #[serde(default)]
    balance: Option<String>,
    /// `header:<name>`, `cookie:<name>` or `client_ip`; required by (and only for) `hash`.
    #[serde(default)]
    hash_on: String,
    #[serde(default)]
    split: Vec<RawSplit>,
    /// Parsed in `validate` so the error can list the choices.
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    tls: Option<RawUpstreamTls>,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    outlier: RawOutlier,
    /// Parsed in `validate` so the error can list the choices.
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    etcd_prefix: String,
    #[serde(default)]
    zookeeper_path: String,
    #[serde(default)]
    dns_name: String,
    #[serde(default)]
    instances: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    #[serde(default)]
    ca_file: String,
    #[serde(default)]
    server_name: String,
    #[serde(default)]
    insecure_skip_verify: bool,
    #[serde(default)]
    cert_file: String,
    #[serde(default)]
    key_file: String,
}

/// A path, or `None` for an empty string.
fn optional_path(text: &str) -> Option<PathBuf> {
    Some(text.trim())
        .filter(|t| !t.is_empty())
        .map(PathBuf::from)
}

/// `cert_file` and `key_file` come together or not at all.
fn identity_pair(
    key: &str,
    cert_file: &str,
    key_file: &str,
) -> Result<(Option<PathBuf>, Option<PathBuf>), ConfigError> {
    let (cert, private) = (optional_path(cert_file), optional_path(key_file));
    match (&cert, &private) {
        (Some(_), None) => Err(invalid(
            format!("{key}.key_file"),
            "required with `cert_file`",
        )),
        (None, Some(_)) => Err(invalid(
            format!("{key}.cert_file"),
            "required with `key_file`",
        )),
        _ => Ok((cert, private)),
    }
}

impl RawUpstreamTls {
    fn validate(self, key: &str) -> Result<UpstreamTlsConfig, ConfigError> {
        let (cert_file, key_file) = identity_pair(key, &self.cert_file, &self.key_file)?;
        let server_name = Some(self.server_name.trim().to_owned()).filter(|n| !n.is_empty());
        if let Some(name) = &server_name {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(invalid(
                    format!("{key}.server_name"),
                    format!("{name:?} is not a DNS name or IP address"),
                ));
            }
        }
        Ok(UpstreamTlsConfig {
            ca_file: optional_path(&self.ca_file),
            server_name,
            insecure_skip_verify: self.insecure_skip_verify,
            cert_file,
            key_file,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    tags: Vec<String>,
    /// 0 to 100, at most two decimals (0.5 is half a percent).
    percent: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    #[serde(default = "default_consecutive_failures")]
    consecutive_failures: u32,
    #[serde(default = "default_base_ejection_time")]
    base_ejection_time: String,
    #[serde(default = "default_max_ejection_time")]
    max_ejection_time: String,
    #[serde(default = "default_max_ejected_percent")]
    max_ejected_percent: u32,
}

impl Default for RawOutlier {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection_time(),
            max_ejection_time: default_max_ejection_time(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection_time() -> String {
    "10s".into()
}
fn default_max_ejection_time() -> String {
    "5m".into()
}
fn default_max_ejected_percent() -> u32 {
    50
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path_prefix: Option<String>,
    #[serde(default)]
    host: String,
    #[serde(default)]
    strip_prefix: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default = "default_attempts")]
    attempts: u32,
    #[serde(default = "default_retry_timeout")]
    timeout: String,
    #[serde(default = "default_budget_percent")]
    budget_percent: u32,
    #[serde(default = "default_budget_min_per_second")]
    budget_min_per_second: u32,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            timeout: default_retry_timeout(),
            budget_percent: default_budget_percent(),
            budget_min_per_second: default_budget_min_per_second(),
        }
    }
}

fn default_attempts() -> u32 {
    3
}
fn default_retry_timeout() -> String {
    "5s".into()
}
fn default_budget_percent() -> u32 {
    20
}
fn default_budget_min_per_second() -> u32 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace: String,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout: String,
    #[serde(default = "default_max_header_bytes")]
    max_header_bytes: usize,
    #[serde(default = "default_max_body_bytes")]
    max_body_bytes: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_connections_per_client")]
    max_connections_per_client: usize,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: String,
    #[serde(default = "default_client_reset_rate")]
    client_reset_rate: u32,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default = "default_true")]
    normalize_path: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            shutdown_grace: default_shutdown_grace(),
            header_read_timeout: default_header_read_timeout(),
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: default_max_body_bytes(),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            idle_timeout: default_idle_timeout(),
            client_reset_rate: default_client_reset_rate(),
            trusted_proxies: Vec::new(),
            normalize_path: true,
        }
    }
}

fn default_shutdown_grace() -> String {
    "30s".into()
}
fn default_header_read_timeout() -> String {
    "30s".into()
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_connections_per_client() -> usize {
    512
}
fn default_idle_timeout() -> String {
    "60s".into()
}
fn default_client_reset_rate() -> u32 {
    100
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    #[serde(default = "default_connect_timeout")]
    connect_timeout: String,
    #[serde(default = "default_pool_idle_timeout")]
    pool_idle_timeout: String,
    #[serde(default = "default_pool_max_idle_per_host")]
    pool_max_idle_per_host: usize,
    #[serde(default = "default_max_replay_body_bytes")]
    max_replay_body_bytes: usize,
    #[serde(default = "default_max_connections_per_instance")]
    max_connections_per_instance: usize,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            pool_idle_timeout: default_pool_idle_timeout(),
            pool_max_idle_per_host: default_pool_max_idle_per_host(),
            max_replay_body_bytes: default_max_replay_body_bytes(),
            max_connections_per_instance: default_max_connections_per_instance(),
        }
    }
}

fn default_connect_timeout() -> String {
    "1s".into()
}
fn default_pool_idle_timeout() -> String {
    "90s".into()
}
fn default_pool_max_idle_per_host() -> usize {
    1024
}
fn default_max_replay_body_bytes() -> usize {
    64 * 1024
}
fn default_max_connections_per_instance() -> usize {
    1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default = "default_tls_listen")]
    listen: String,
    #[serde(default)]
    certificates: Vec<RawCertificate>,
    #[serde(default)]
    redirect_http: bool,
}

fn default_tls_listen() -> String {
    "0.0.0.0:8443".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    #[serde(default)]
    cert_file: String,
    #[serde(default)]
    key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    #[serde(default)]
    path: String,
    #[serde(default = "default_access_log_buffer")]
    buffer: usize,
}

impl Default for RawAccessLog {
    fn default() -> Self {
        Self {
            path: String::new(),
            buffer: default_access_log_buffer(),
        }
    }
}

fn default_access_log_buffer() -> usize {
    8192
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Values taken from Consul's own environment variables when the file leaves the keys out.
#[derive(Debug, Default, Clone)]
pub struct ConsulEnv {
    /// `CONSUL_HTTP_ADDR`
    pub http_addr: Option<String>,
    /// `CONSUL_HTTP_TOKEN`
    pub http_token: Option<String>,
    /// `CONSUL_CACERT`
    pub ca_cert: Option<String>,
    /// `CONSUL_CLIENT_CERT`
    pub client_cert: Option<String>,
    /// `CONSUL_CLIENT_KEY`
    pub client_key: Option<String>,
    /// `CONSUL_TLS_SERVER_NAME`
    pub tls_server_name: Option<String>,
}

impl ConsulEnv {
    pub fn from_process() -> Self {
        let non_empty = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Self {
            http_addr: non_empty("CONSUL_HTTP_ADDR"),
            http_token: non_empty("CONSUL_HTTP_TOKEN"),
            ca_cert: non_empty("CONSUL_CACERT"),
            client_cert: non_empty("CONSUL_CLIENT_CERT"),
            client_key: non_empty("CONSUL_CLIENT_KEY"),
            tls_server_name: non_empty("CONSUL_TLS_SERVER_NAME"),
        }
    }
}

impl Config {
    /// Reads `path`, applies `SWITCHYARD__…` overrides from the process environment, then the
    /// `CONSUL_HTTP_*` fallbacks, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = config::Config::builder()
            .add_source(
                config::File::from(path)
                    .format(config::FileFormat::Yaml)
                    .required(true),
            )
            .add_source(
                config::Environment::with_prefix("SWITCHYARD")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        raw.validate(&ConsulEnv::from_process())
    }

    /// Parses YAML text without looking at the environment (tests, embedding).
    pub fn from_yaml(text: &str, env: &ConsulEnv) -> Result<Config, ConfigError> {
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Yaml))
            .build()?
            .try_deserialize()?;
        raw.validate(env)
    }

    /// The keys changed in `next` that take effect only on restart (they shape listeners,
    /// the runtime or clients), by name, for the reload log; values are compared unmasked and
    /// never returned. `services`, `watch_config`, `etcd`, `zookeeper` and `dns` are applied
    /// on reload. Exhaustive
    /// destructuring: a new key does not compile until it is sorted into one or the other.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<&'static str> {
        let Config {
            listen,
            admin_listen,
            workers,
            consul,
            services: _,
            server,
            upstream,
            access_log,
            register,
            tag_routes,
            watch_config: _,
            tls,
            // Applied on reload: the watch set rebuilds a registry's source when its section
            // changes (`discovery::Sources::rebuild`).
            etcd: _,
            zookeeper: _,
            dns: _,
        } = self;
        let mut changed = Vec::new();
        let mut check = |key, differs: bool| {
            if differs {
                changed.push(key);
            }
        };
        check("listen", *listen != next.listen);
        check("admin_listen", *admin_listen != next.admin_listen);
        check("workers", *workers != next.workers);
        consul.diff(&next.consul, &mut check);
        check("server", *server != next.server);
        check("upstream", *upstream != next.upstream);
        check("access_log", *access_log != next.access_log);
        check("register", *register != next.register);
        check("tag_routes", *tag_routes != next.tag_routes);
        // Certificates are re-read on every reload; the listener and the redirect are not.
        let listen_of = |tls: &Option<TlsConfig>| tls.as_ref().map(|t| t.listen);
        check("tls.listen", listen_of(tls) != listen_of(&next.tls));
        let redirect_of = |tls: &Option<TlsConfig>| tls.as_ref().map(|t| t.redirect_http);
        check(
            "tls.redirect_http",
            redirect_of(tls) != redirect_of(&next.tls),
        );
        changed
    }

    /// The effective configuration as YAML-ish JSON, with secrets masked.
    pub fn to_masked_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("<unprintable: {e}>"))
    }
}

fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        invalid(
            key,
            format!("{text:?} is not a duration like \"5s\" or \"5m\" ({e})"),
        )
    })
}

fn parse_positive_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    let value = parse_duration(key, text)?;
    if value.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(value)
}

fn parse_socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not an address like \"127.0.0.1:8080\""),
        )
    })
}

/// Characters Consul accepts in a service name and that are safe in a URL path segment.
fn is_valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl RawConfig {
    fn validate(self, env: &ConsulEnv) -> Result<Config, ConfigError> {
        let listen = parse_socket_addr("listen", &self.listen)?;
        let admin_listen = parse_socket_addr("admin_listen", &self.admin_listen)?;
        if listen == admin_listen {
            return Err(invalid("admin_listen", "must differ from `listen`"));
        }
        let consul = self.consul.validate(env)?;
        let services = validate_services(self.services)?;
        Ok(Config {
            listen,
            admin_listen,
            workers: self.workers,
            consul,
            services,
            server: self.server.validate()?,
            upstream: self.upstream.validate()?,
            access_log: self.access_log.validate()?,
            register: self.register.validate()?,
            tag_routes: self.tag_routes.validate()?,
            tls: self
                .tls
                .map(|tls| tls.validate(listen, admin_listen))
                .transpose()?,
            etcd: self.etcd.validate()?,
            zookeeper: self.zookeeper.validate()?,
            dns: self.dns.validate()?,
            watch_config: match self.watch_config.trim() {
                "" | "off" => None,
                text => Some(parse_positive_duration("watch_config", text)?),
            },
        })
    }
}

/// `services`: at least one, each valid, no name listed twice, no host and path prefix
/// routed to two services.
fn validate_services(raw: Vec<RawService>) -> Result<Vec<ServiceConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid("services", "at least one service is required"));
    }
    let mut names = HashSet::new();
    let mut routes = HashSet::new();
    let mut services = Vec::with_capacity(raw.len());
    for (i, raw) in raw.into_iter().enumerate() {
        let service = raw.validate(&format!("services[{i}]"))?;
        if !names.insert(service.name.clone()) {
            return Err(invalid(
                format!("services[{i}].name"),
                format!("service {:?} is listed twice", service.name),
            ));
        }
        let route_key = (
            service.route.host.clone(),
            service.route.path_prefix.clone(),
        );
        if !routes.insert(route_key) {
            return Err(invalid(
                format!("services[{i}].route"),
                format!(
                    "host {:?} with path_prefix {:?} is already routed to another service",
                    service.route.host.as_deref().unwrap_or(""),
                    service.route.path_prefix
                ),
            ));
        }
        services.push(service);
    }
    Ok(services)
}

impl RawConsul {
    fn validate(self, env: &ConsulEnv) -> Result<ConsulConfig, ConfigError> {
        let addresses = consul_addresses(self.address, env)?;
        let token = Secret::new(
            self.token
                .filter(|t| !t.is_empty())
                .or_else(|| env.http_token.clone())
                .unwrap_or_default(),
        );
        let wait = parse_positive_duration("consul.wait", &self.wait)?;
        if wait > CONSUL_MAX_WAIT {
            return Err(invalid(
                "consul.wait",
                "Consul caps blocking queries at 10m",
            ));
        }
        let backoff_base = parse_positive_duration("consul.backoff_base", &self.backoff_base)?;
        let backoff_max = parse_positive_duration("consul.backoff_max", &self.backoff_max)?;
        if backoff_max < backoff_base {
            return Err(invalid(
                "consul.backoff_max",
                "must be at least `consul.backoff_base`",
            ));
        }
        let datacenter = Some(self.datacenter.trim().to_owned()).filter(|d| !d.is_empty());
        let stale_after = parse_positive_duration("consul.stale_after", &self.stale_after)?;
        if self.max_connections < 3 {
            return Err(invalid("consul.max_connections", "must be at least 3"));
        }
        let watch = parse_watch_mode(self.watch.as_deref())?;
        let tls = consul_tls(
            [
                self.ca_file,
                self.cert_file,
                self.key_file,
                self.tls_server_name,
            ],
            env,
        )?;
        Ok(ConsulConfig {
            tls,
            addresses,
            stale_after,
            max_connections: self.max_connections,
            watch,
            token,
            datacenter,
            wait,
            backoff_base,
            backoff_max,
        })
    }
}

/// `consul.address`: one address, a comma-separated list or a YAML list; none means
/// `CONSUL_HTTP_ADDR`, else `http://127.0.0.1:8500`.
fn consul_addresses(raw: Option<RawAddresses>, env: &ConsulEnv) -> Result<Vec<Url>, ConfigError> {
    let texts: Vec<String> = match raw {
        Some(RawAddresses::One(text)) => text
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect(),
        Some(RawAddresses::Many(list)) => list,
        None => Vec::new(),
    };
    let texts = if texts.is_empty() {
        vec![env
            .http_addr
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:8500".into())]
    } else {
        texts
    };
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| parse_consul_address(i, texts.len(), text))
        .collect()
}

/// `consul.watch`: `auto` (the default), `per_service` or `catalog`.
fn parse_watch_mode(text: Option<&str>) -> Result<WatchMode, ConfigError> {
    match text.map(str::trim) {
        None | Some("auto") => Ok(WatchMode::Auto),
        Some("per_service") => Ok(WatchMode::PerService),
        Some("catalog") => Ok(WatchMode::Catalog),
        Some(other) => Err(invalid(
            "consul.watch",
            format!("{other:?} is not one of \"auto\", \"per_service\", \"catalog\""),
        )),
    }
}

/// `consul.ca_file`, `cert_file`, `key_file`, `tls_server_name`, each falling back to Consul's
/// own variable when the file leaves it out.
fn consul_tls(file: [Option<String>; 4], env: &ConsulEnv) -> Result<ConsulTlsConfig, ConfigError> {
    let [ca_file, cert_file, key_file, server_name] = file;
    let pick = |file: Option<String>, env: &Option<String>| {
        file.filter(|v| !v.trim().is_empty())
            .or_else(|| env.clone())
            .unwrap_or_default()
    };
    let (cert_file, key_file) = identity_pair(
        "consul",
        &pick(cert_file, &env.client_cert),
        &pick(key_file, &env.client_key),
    )?;
    let server_name = pick(server_name, &env.tls_server_name);
    Ok(ConsulTlsConfig {
        ca_file: optional_path(&pick(ca_file, &env.ca_cert)),
        cert_file,
        key_file,
        server_name: Some(server_name.trim().to_owned()).filter(|n| !n.is_empty()),
    })
}

fn parse_consul_address(position: usize, count: usize, text: &str) -> Result<Url, ConfigError> {
    let key = if count > 1 {
        format!("consul.address[{position}]")
    } else {
        "consul.address".to_owned()
    };
    // CONSUL_HTTP_ADDR is often written without a scheme ("127.0.0.1:8500").
    let text = text.trim();
    let full = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let url = Url::parse(&full).map_err(|e| invalid(&key, format!("{text:?}: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(invalid(
            &key,
            format!(
                "scheme {:?} is not supported (use http:// or https://)",
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none() {
        return Err(invalid(&key, "has no host"));
    }
    Ok(url)
}

impl ServiceConfig {
    /// A service found at run time (a tag route): every key at its default, the protocol
    /// given (with `insecure_skip_verify` for a TLS one), routed at `/<name>` (the router
    /// uses the tag's route instead).
    pub fn with_defaults(
        name: &str,
        protocol: UpstreamProtocol,
        insecure_skip_verify: bool,
    ) -> Result<ServiceConfig, ConfigError> {
        let tls = (protocol.is_tls() && insecure_skip_verify).then(|| RawUpstreamTls {
            ca_file: String::new(),
            server_name: String::new(),
            insecure_skip_verify,
            cert_file: String::new(),
            key_file: String::new(),
        });
        let raw = RawService {
            name: name.to_owned(),
            tags: Vec::new(),
            route: None,
            balance: None,
            hash_on: String::new(),
            split: Vec::new(),
            protocol: Some(protocol.as_str().to_owned()),
            tls,
            retry: RawRetry::default(),
            outlier: RawOutlier::default(),
            source: None,
            etcd_prefix: String::new(),
            zookeeper_path: String::new(),
            dns_name: String::new(),
            instances: Vec::new(),
        };
        raw.validate("tag_routes")
    }
}

impl RawService {
    fn validate(self, key: &str) -> Result<ServiceConfig, ConfigError> {
        let name = self.name.trim().to_owned();
        if !is_valid_service_name(&name) {
            return Err(invalid(
                format!("{key}.name"),
                format!(
                    "{:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                    self.name
                ),
            ));
        }
        if let Some(i) = self.tags.iter().position(|t| t.trim().is_empty()) {
            return Err(invalid(format!("{key}.tags[{i}]"), "empty tag"));
        }
        let route = RawRoute::validate(self.route, key, &name)?;
        let retry = self.retry.validate(key)?;
        let outlier = self.outlier.validate(&format!("{key}.outlier"))?;
        let protocol = parse_protocol(key, self.protocol.as_deref())?;
        let tls = service_tls(key, protocol, self.tls)?;
        let balance = parse_balance(key, self.balance.as_deref())?;
        let hash_on = parse_hash_on(key, balance, self.hash_on.trim())?;
        let split = validate_splits(key, self.split)?;
        let source = RawServiceSource {
            source: self.source,
            etcd_prefix: self.etcd_prefix,
            zookeeper_path: self.zookeeper_path,
            dns_name: self.dns_name,
            instances: self.instances,
        }
        .validate(key, &name)?;
        Ok(ServiceConfig {
            name,
            tags: self.tags,
            route,
            balance,
            hash_on,
            split,
            protocol,
            tls,
            retry,
            outlier,
            source,
        })
    }
}

impl RawRoute {
    /// Service `name`'s route (`key.route`); without one, the path prefix `/<name>`.
    fn validate(raw: Option<Self>, key: &str, name: &str) -> Result<RouteConfig, ConfigError> {
        let raw = raw.unwrap_or(RawRoute {
            path_prefix: None,
            host: String::new(),
            strip_prefix: false,
        });
        let path_prefix = raw.path_prefix.unwrap_or_else(|| format!("/{name}"));
        if !path_prefix.starts_with('/') {
            return Err(invalid(
                format!("{key}.route.path_prefix"),
                format!("{path_prefix:?} must start with '/'"),
            ));
        }
        let host = raw.host.trim().to_ascii_lowercase();
        if host.contains(['/', ' ', ':']) {
            return Err(invalid(
                format!("{key}.route.host"),
                format!("{host:?} must be a bare host name without scheme, port or path"),
            ));
        }
        Ok(RouteConfig {
            path_prefix,
            host: Some(host).filter(|h| !h.is_empty()),
            strip_prefix: raw.strip_prefix,
        })
    }
}

impl RawRetry {
    /// `key.retry`: at least one attempt, a budget between 0 and 100 percent.
    fn validate(self, key: &str) -> Result<RetryConfig, ConfigError> {
        if self.attempts == 0 {
            return Err(invalid(
                format!("{key}.retry.attempts"),
                "must be at least 1",
            ));
        }
        if self.budget_percent > 100 {
            return Err(invalid(
                format!("{key}.retry.budget_percent"),
                "must be between 0 and 100",
            ));
        }
        Ok(RetryConfig {
            budget_percent: self.budget_percent,
            budget_min_per_second: self.budget_min_per_second,
            attempts: self.attempts,
            timeout: parse_positive_duration(&format!("{key}.retry.timeout"), &self.timeout)?,
        })
    }
}

fn parse_protocol(key: &str, text: Option<&str>) -> Result<UpstreamProtocol, ConfigError> {
    match text.map(str::trim) {
        None | Some("http1") => Ok(UpstreamProtocol::Http1),
        Some("h2c") => Ok(UpstreamProtocol::H2c),
        Some("https") => Ok(UpstreamProtocol::Https),
        Some("h2") => Ok(UpstreamProtocol::H2),
        Some(other) => Err(invalid(
            format!("{key}.protocol"),
            format!("{other:?} is not one of \"http1\", \"h2c\", \"https\", \"h2\""),
        )),
    }
}

/// `key.tls`: defaults for a TLS protocol, an error for a plain one.
fn service_tls(
    key: &str,
    protocol: UpstreamProtocol,
    raw: Option<RawUpstreamTls>,
) -> Result<Option<UpstreamTlsConfig>, ConfigError> {
    match (protocol.is_tls(), raw) {
        (true, raw) => Ok(Some(
            raw.unwrap_or_default().validate(&format!("{key}.tls"))?,
        )),
        (false, None) => Ok(None),
        (false, Some(_)) => Err(invalid(
            format!("{key}.tls"),
            "needs `protocol: https` or `protocol: h2`",
        )),
    }
}

/// `key.hash_on`: required by (and only used by) `balance: hash`.
fn parse_hash_on(key: &str, balance: Balance, text: &str) -> Result<Option<HashOn>, ConfigError> {
    match (balance, text) {
        (Balance::Hash, "") => Err(invalid(
            format!("{key}.hash_on"),
            "is required by `balance: hash` (header:<name>, cookie:<name> or client_ip)",
        )),
        (Balance::Hash, text) => Ok(Some(HashOn::parse(&format!("{key}.hash_on"), text)?)),
        (_, "") => Ok(None),
        (_, _) => Err(invalid(
            format!("{key}.hash_on"),
            "is only used by `balance: hash`",
        )),
    }
}

fn parse_balance(key: &str, text: Option<&str>) -> Result<Balance, ConfigError> {
    let text = text.map(str::trim).unwrap_or(Balance::default().as_str());
    Balance::ALL
        .into_iter()
        .find(|b| b.as_str() == text)
        .ok_or_else(|| {
            let choices: Vec<String> = Balance::ALL
                .iter()
                .map(|b| format!("{:?}", b.as_str()))
                .collect();
            invalid(
                format!("{key}.balance"),
                format!("{text:?} is not one of {}", choices.join(", ")),
            )
        })
}

/// Splits with tags, shares between 0 and 100 percent (two decimals) summing to at most 100.
fn validate_splits(key: &str, raw: Vec<RawSplit>) -> Result<Vec<SplitConfig>, ConfigError> {
    let mut total = 0;
    let mut splits = Vec::with_capacity(raw.len());
    for (i, split) in raw.into_iter().enumerate() {
        let at = format!("{key}.split[{i}]");
        if split.tags.is_empty() || split.tags.iter().any(|t| t.trim().is_empty()) {
            return Err(invalid(
                format!("{at}.tags"),
                "needs at least one non-empty tag",
            ));
        }
        let basis_points = split.percent * 100.0;
        if !(0.0..=10_000.0).contains(&basis_points)
            || (basis_points - basis_points.round()).abs() > 1e-6
        {
            return Err(invalid(
                format!("{at}.percent"),
                "must be between 0 and 100, with at most two decimals",
            ));
        }
        let basis_points = basis_points.round() as u32;
        total += basis_points;
        splits.push(SplitConfig {
            tags: split.tags,
            basis_points,
        });
    }
    if total > 10_000 {
        return Err(invalid(
            format!("{key}.split"),
            "the percents add up to more than 100",
        ));
    }
    Ok(splits)
}

impl RawOutlier {
    /// `key` is the section's own key (`services[i].outlier`).
    fn validate(self, key: &str) -> Result<OutlierConfig, ConfigError> {
        if self.max_ejected_percent > 100 {
            return Err(invalid(
                format!("{key}.max_ejected_percent"),
                "must be between 0 and 100",
            ));
        }
        let base_ejection_time = parse_positive_duration(
            &format!("{key}.base_ejection_time"),
            &self.base_ejection_time,
        )?;
        let max_ejection_time =
            parse_positive_duration(&format!("{key}.max_ejection_time"), &self.max_ejection_time)?;
        if max_ejection_time < base_ejection_time {
            return Err(invalid(
                format!("{key}.max_ejection_time"),
                format!(
                    "{:?} is below `base_ejection_time` ({:?}): it must be at least that",
                    self.max_ejection_time.trim(),
                    self.base_ejection_time.trim()
                ),
            ));
        }
        Ok(OutlierConfig {
            consecutive_failures: self.consecutive_failures,
            base_ejection_time,
            max_ejection_time,
            max_ejected_percent: self.max_ejected_percent,
        })
    }
}

impl RawServer {
    fn validate(self) -> Result<ServerConfig, ConfigError> {
        if self.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if self.max_header_bytes < 8192 {
            return Err(invalid("server.max_header_bytes", "must be at least 8192"));
        }
        Ok(ServerConfig {
            shutdown_grace: parse_duration("server.shutdown_grace", &self.shutdown_grace)?,
            header_read_timeout: parse_positive_duration(
                "server.header_read_timeout",
                &self.header_read_timeout,
            )?,
            max_header_bytes: self.max_header_bytes,
            max_body_bytes: self.max_body_bytes,
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client,
            idle_timeout: parse_positive_duration("server.idle_timeout", &self.idle_timeout)?,
            client_reset_rate: self.client_reset_rate,
            trusted_proxies: parse_networks("server.trusted_proxies", &self.trusted_proxies)?,
            normalize_path: self.normalize_path,
        })
    }
}

impl RawTls {
    /// Paths only: the files are read (and their errors named) by the `tls` module.
    fn validate(
        self,
        listen: SocketAddr,
        admin_listen: SocketAddr,
    ) -> Result<TlsConfig, ConfigError> {
        let tls_listen = parse_socket_addr("tls.listen", &self.listen)?;
        if tls_listen == listen || tls_listen == admin_listen {
            return Err(invalid(
                "tls.listen",
                "must differ from `listen` and `admin_listen`",
            ));
        }
        if self.certificates.is_empty() {
            return Err(invalid(
                "tls.certificates",
                "at least one certificate is required",
            ));
        }
        let certificates = self
            .certificates
            .into_iter()
            .enumerate()
            .map(|(i, raw)| raw.validate(&format!("tls.certificates[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TlsConfig {
            listen: tls_listen,
            certificates,
            redirect_http: self.redirect_http,
        })
    }
}

impl RawCertificate {
    fn validate(self, key: &str) -> Result<CertificateConfig, ConfigError> {
        let path = |field: &str, text: String| match text.trim() {
            "" => Err(invalid(format!("{key}.{field}"), "is required")),
            path => Ok(PathBuf::from(path)),
        };
        Ok(CertificateConfig {
            cert_file: path("cert_file", self.cert_file)?,
            key_file: path("key_file", self.key_file)?,
        })
    }
}

/// CIDRs (`10.0.0.0/8`) or single addresses (`192.0.2.7`, `::1`).
fn parse_networks(key: &str, texts: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let text = text.trim();
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    invalid(
                        format!("{key}[{i}]"),
                        format!("{text:?} is not an address or CIDR like \"10.0.0.0/8\""),
                    )
                })
        })
        .collect()
}

impl RawAccessLog {
    fn validate(self) -> Result<AccessLogConfig, ConfigError> {
        if self.buffer == 0 {
            return Err(invalid("access_log.buffer", "must be at least 1"));
        }
        let target = match self.path.trim() {
            "" => AccessLogTarget::Off,
            "-" => AccessLogTarget::Stdout,
            path => AccessLogTarget::File(PathBuf::from(path)),
        };
        Ok(AccessLogConfig {
            target,
            buffer: self.buffer,
        })
    }
}

impl RawUpstream {
    fn validate(self) -> Result<UpstreamConfig, ConfigError> {
        Ok(UpstreamConfig {
            connect_timeout: parse_positive_duration(
                "upstream.connect_timeout",
                &self.connect_timeout,
            )?,
            pool_idle_timeout: parse_positive_duration(
                "upstream.pool_idle_timeout",
                &self.pool_idle_timeout,
            )?,
            pool_max_idle_per_host: self.pool_max_idle_per_host,
            max_replay_body_bytes: self.max_replay_body_bytes,
            max_connections_per_instance: match self.max_connections_per_instance {
                0 => {
                    return Err(invalid(
                        "upstream.max_connections_per_instance",
                        "must be at least 1",
                    ))
                }
                n => n,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, &ConsulEnv::default())
    }

    const MINIMAL: &str = "services:\n  - name: hello\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.admin_listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(
            config.consul.addresses[0].as_str(),
            "http://127.0.0.1:8500/"
        );
        assert_eq!(config.consul.wait, Duration::from_secs(300));
        let hello = &config.services[0];
        assert_eq!(hello.route.path_prefix, "/hello");
        assert_eq!(hello.balance, Balance::RoundRobin);
        assert_eq!(hello.retry.attempts, 3);
        assert_eq!(hello.retry.timeout, Duration::from_secs(5));
    }

    #[test]
    fn access_log_is_off_unless_a_path_is_given() {
        assert_eq!(
            parse(MINIMAL).unwrap().access_log.target,
            AccessLogTarget::Off
        );
        let on = parse(&format!(
            "access_log:\n  path: /var/log/sy.jsonl\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            on.access_log.target,
            AccessLogTarget::File("/var/log/sy.jsonl".into())
        );
        assert_eq!(on.access_log.buffer, 8192);
        let stdout = parse(&format!("access_log: {{path: \"-\"}}\n{MINIMAL}")).unwrap();
        assert_eq!(stdout.access_log.target, AccessLogTarget::Stdout);
        let err = parse(&format!("access_log: {{path: x, buffer: 0}}\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("access_log.buffer"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("services:\n  - name: hello\n    balanse: random\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `balanse`"), "{err}");
        let err = parse("listen: 0.0.0.0:1\nconsul:\n  adress: x\nservices: []\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `adress`"), "{err}");
    }

    #[test]
    fn bad_enum_value_is_named() {
        let err = parse("services:\n  - name: hello\n    balance: least_conn\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("services[0].balance"), "{text}");
        assert!(
            text.contains("least_conn") && text.contains("round_robin"),
            "{text}"
        );
    }

    #[test]
    fn bad_duration_names_the_key() {
        let err = parse("consul:\n  wait: soon\nservices:\n  - name: hello\n").unwrap_err();
        assert!(err.to_string().contains("consul.wait"), "{err}");
    }

    #[test]
    fn duplicate_names_and_routes_are_rejected() {
        let err = parse("services:\n  - name: a\n  - name: a\n").unwrap_err();
        assert!(err.to_string().contains("services[1].name"), "{err}");
        let err = parse(
            "services:\n  - name: a\n    route: {path_prefix: /x}\n  - name: b\n    route: {path_prefix: /x}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("services[1].route"), "{err}");
    }

    #[test]
    fn zero_attempts_rejected() {
        let err = parse("services:\n  - name: a\n    retry: {attempts: 0}\n").unwrap_err();
        assert!(
            err.to_string().contains("services[0].retry.attempts"),
            "{err}"
        );
    }

    #[test]
    fn max_ejection_time_below_base_is_rejected() {
        let outlier = |times: &str| {
            parse(&format!(
                "services:\n  - name: a\n  - name: b\n    outlier: {{{times}}}\n"
            ))
        };
        let err = outlier("base_ejection_time: 30s, max_ejection_time: 10s").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("services[1].outlier.max_ejection_time"),
            "{text}"
        );
        assert!(text.contains("base_ejection_time"), "{text}");
        // The default max (5m) below a larger base is caught too; equal is fine.
        assert!(outlier("base_ejection_time: 10m").is_err());
        let equal = outlier("base_ejection_time: 10s, max_ejection_time: 10s").unwrap();
        assert_eq!(
            equal.services[1].outlier.max_ejection_time,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn consul_env_fills_missing_keys_only() {
        let env = ConsulEnv {
            http_addr: Some("10.1.2.3:8500".into()),
            http_token: Some("s3cret".into()),
            ..ConsulEnv::default()
        };
        let config = Config::from_yaml(MINIMAL, &env).unwrap();
        assert_eq!(config.consul.addresses[0].as_str(), "http://10.1.2.3:8500/");
        assert_eq!(config.consul.token.expose(), "s3cret");
        let with_file = "consul:\n  address: http://127.0.0.9:8500\nservices:\n  - name: a\n";
        let config = Config::from_yaml(with_file, &env).unwrap();
        assert_eq!(
            config.consul.addresses[0].as_str(),
            "http://127.0.0.9:8500/"
        );
    }

    #[test]
    fn consul_address_may_be_a_list() {
        let list = "consul:\n  address: [\"http://127.0.0.1:1\", \"127.0.0.2:2\"]\nservices:\n  - name: a\n";
        let config = parse(list).unwrap();
        let urls: Vec<_> = config.consul.addresses.iter().map(|u| u.as_str()).collect();
        assert_eq!(urls, ["http://127.0.0.1:1/", "http://127.0.0.2:2/"]);
        let comma = "consul:\n  address: \"http://127.0.0.1:1, http://127.0.0.3:3\"\nservices:\n  - name: a\n";
        assert_eq!(parse(comma).unwrap().consul.addresses.len(), 2);
        let bad =
            "consul:\n  address: [\"http://127.0.0.1:1\", \"ftp://x\"]\nservices:\n  - name: a\n";
        assert!(parse(bad)
            .unwrap_err()
            .to_string()
            .contains("consul.address[1]"));
    }

    #[test]
    fn tls_is_off_unless_configured_and_names_its_keys() {
        assert!(parse(MINIMAL).unwrap().tls.is_none());
        let tls = parse(&format!(
            "tls:\n  certificates:\n    - {{cert_file: /c.pem, key_file: /k.pem}}\n{MINIMAL}"
        ))
        .unwrap()
        .tls
        .expect("tls configured");
        assert_eq!(tls.listen, "0.0.0.0:8443".parse().unwrap());
        assert!(!tls.redirect_http);
        assert_eq!(tls.certificates[0].key_file, PathBuf::from("/k.pem"));
        let cases = [
            ("tls: {certificates: []}", "tls.certificates"),
            (
                "tls:\n  certificates:\n    - {cert_file: /c, key_file: /k}\n    - {cert_file: /c}",
                "tls.certificates[1].key_file",
            ),
            (
                "tls: {listen: nowhere, certificates: [{cert_file: /c, key_file: /k}]}",
                "tls.listen",
            ),
            (
                "tls: {certificates: [{cert_file: /c, key_file: /k, password: x}]}",
                "unknown field `password`",
            ),
            (
                "listen: 0.0.0.0:8443\ntls: {certificates: [{cert_file: /c, key_file: /k}]}",
                "tls.listen",
            ),
        ];
        for (yaml, key) in cases {
            let err = parse(&format!("{yaml}\n{MINIMAL}")).unwrap_err();
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        // Certificates are re-read on reload; the listener and the redirect need a restart.
        let with = |tls: &str| parse(&format!("tls: {tls}\n{MINIMAL}")).unwrap();
        let base = with("{certificates: [{cert_file: /c, key_file: /k}]}");
        let rotated = with("{certificates: [{cert_file: /c2, key_file: /k2}]}");
        assert!(base.restart_only_changes(&rotated).is_empty());
        let moved = with("{listen: 0.0.0.0:9443, redirect_http: true, certificates: [{cert_file: /c, key_file: /k}]}");
        assert_eq!(
            base.restart_only_changes(&moved),
            ["tls.listen", "tls.redirect_http"]
        );
    }

    #[test]
    fn reload_diff_names_restart_only_keys_and_compares_the_real_token() {
        let with = |prefix: &str| parse(&format!("{prefix}{MINIMAL}")).unwrap();
        let base = with("consul: {token: first}\n");
        assert!(base.restart_only_changes(&base.clone()).is_empty());
        // Masked, both tokens serialize as "***": the diff must still see the change.
        let rotated = with("consul: {token: second}\n");
        assert_eq!(base.restart_only_changes(&rotated), ["consul.token"]);
        let moved = with(
            "listen: 0.0.0.0:9\nconsul: {token: first, wait: 1m}\nserver: {max_connections: 5}\n",
        );
        assert_eq!(
            base.restart_only_changes(&moved),
            ["listen", "consul.wait", "server"]
        );
        // Applied on reload, so not reported: services and watch_config.
        let applied =
            parse("consul: {token: first}\nwatch_config: 1s\nservices:\n  - name: other\n")
                .unwrap();
        assert!(base.restart_only_changes(&applied).is_empty());
    }

    #[test]
    fn consul_tls_falls_back_to_consuls_own_variables() {
        let env = ConsulEnv {
            ca_cert: Some("/etc/consul/ca.pem".into()),
            client_cert: Some("/etc/consul/client.pem".into()),
            client_key: Some("/etc/consul/client.key".into()),
            tls_server_name: Some("consul.internal".into()),
            ..ConsulEnv::default()
        };
        let yaml = "consul: {address: \"https://10.0.0.5:8501\"}\nservices:\n  - name: a\n";
        let tls = Config::from_yaml(yaml, &env).unwrap().consul.tls;
        assert_eq!(tls.ca_file, Some("/etc/consul/ca.pem".into()));
        assert_eq!(tls.cert_file, Some("/etc/consul/client.pem".into()));
        assert_eq!(tls.server_name.as_deref(), Some("consul.internal"));
        let file = "consul: {ca_file: /file/ca.pem}\nservices:\n  - name: a\n";
        let tls = Config::from_yaml(file, &env).unwrap().consul.tls;
        assert_eq!(tls.ca_file, Some("/file/ca.pem".into()), "the file wins");
        let half = "consul: {cert_file: /c.pem}\nservices:\n  - name: a\n";
        let err = Config::from_yaml(half, &ConsulEnv::default()).unwrap_err();
        assert!(err.to_string().contains("consul.key_file"), "{err}");
    }

    #[test]
    fn upstream_tls_needs_a_tls_protocol() {
        let ok = parse("services:\n  - {name: a, protocol: h2, tls: {server_name: a.internal}}\n");
        let tls = ok.unwrap().services[0].tls.clone().unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("a.internal"));
        let default = parse("services:\n  - {name: a, protocol: https}\n").unwrap();
        assert!(
            default.services[0].tls.is_some(),
            "https gets TLS with defaults"
        );
        let err = parse("services:\n  - {name: a, tls: {ca_file: x}}\n").unwrap_err();
        assert!(err.to_string().contains("services[0].tls"), "{err}");
        let err = parse("services:\n  - {name: a, protocol: quic}\n").unwrap_err();
        assert!(err.to_string().contains("services[0].protocol"), "{err}");
    }

    #[test]
    fn token_never_printed() {
        let env = ConsulEnv {
            http_addr: None,
            http_token: Some("s3cret".into()),
            ..ConsulEnv::default()
        };
        let config = Config::from_yaml(MINIMAL, &env).unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(!config.to_masked_json().contains("s3cret"));
    }
}
