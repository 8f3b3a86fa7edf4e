//! Where each service's instances come from (`services[].source` and its keys) and the
//! registries' own sections (`etcd`, `zookeeper`, `dns`): raw file model → validated values.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::{invalid, parse_positive_duration, ConfigError};

/// Where a service's instances come from, with that source's key for the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum SourceConfig {
    /// Consul blocking queries (or catalog mode) on the service's name and `tags`.
    Consul,
    /// Keys under `prefix` (default `/services/<name>/`), value `host:port`.
    Etcd { prefix: String },
    /// Children of `path` (default `/services/<name>`), data `host:port`.
    Zookeeper { path: String },
    /// SRV records of `name` (default `<name>.service.consul`).
    Dns { name: String },
    /// A fixed list of `host:port`.
    Static { instances: Vec<String> },
}

impl SourceConfig {
    /// The source's name as in `services[].source` and the `source` metric label.
    pub fn name(&self) -> &'static str {
        match self {
            SourceConfig::Consul => "consul",
            SourceConfig::Etcd { .. } => "etcd",
            SourceConfig::Zookeeper { .. } => "zookeeper",
            SourceConfig::Dns { .. } => "dns",
            SourceConfig::Static { .. } => "static",
        }
    }
}

/// The per-service source keys as written in the file.
#[derive(Debug, Default)]
pub(super) struct RawServiceSource {
    pub source: Option<String>,
    pub etcd_prefix: String,
    pub zookeeper_path: String,
    pub dns_name: String,
    pub instances: Vec<String>,
}

impl RawServiceSource {
    /// Validates the keys of the service `name` at `key` (`services[i]`): a key that belongs
    /// to another source than the one chosen is an error, not silently ignored.
    pub fn validate(self, key: &str, name: &str) -> Result<SourceConfig, ConfigError> {
        let chosen = self.source.as_deref().map(str::trim).unwrap_or("consul");
        let stray = [
            ("etcd_prefix", !self.etcd_prefix.is_empty(), "etcd"),
            (
                "zookeeper_path",
                !self.zookeeper_path.is_empty(),
                "zookeeper",
            ),
            ("dns_name", !self.dns_name.is_empty(), "dns"),
            ("instances", !self.instances.is_empty(), "static"),
        ];
        if let Some((field, _, owner)) = stray
            .iter()
            .find(|(_, set, owner)| *set && *owner != chosen)
        {
            return Err(invalid(
                format!("{key}.{field}"),
                format!("is only used by `source: {owner}` (this service has `source: {chosen}`)"),
            ));
        }
        match chosen {
            "consul" => Ok(SourceConfig::Consul),
            "etcd" => Ok(SourceConfig::Etcd {
                prefix: etcd_prefix(key, name, self.etcd_prefix)?,
            }),
            "zookeeper" => Ok(SourceConfig::Zookeeper {
                path: zookeeper_path(key, name, self.zookeeper_path)?,
            }),
            "dns" => Ok(SourceConfig::Dns {
                name: dns_name(key, name, self.dns_name)?,
            }),
            "static" => Ok(SourceConfig::Static {
                instances: static_instances(key, self.instances)?,
            }),
            other => Err(invalid(
                format!("{key}.source"),
                format!("{other:?} is not one of \"consul\", \"etcd\", \"zookeeper\", \"dns\", \"static\""),
            )),
        }
    }
}

/// `etcd_prefix` when the file leaves it empty (go-kit's layout).
pub fn default_etcd_prefix(name: &str) -> String {
    format!("/services/{name}/")
}

/// `zookeeper_path` when the file leaves it empty (go-kit's layout).
pub fn default_zookeeper_path(name: &str) -> String {
    format!("/services/{name}")
}

/// `dns_name` when the file leaves it empty: what Consul's DNS interface answers.
pub fn default_dns_name(name: &str) -> String {
    format!("{name}.service.consul")
}

fn etcd_prefix(key: &str, name: &str, text: String) -> Result<String, ConfigError> {
    let prefix = match text.trim() {
        "" => default_etcd_prefix(name),
        text => text.to_owned(),
    };
    if !prefix.starts_with('/') {
        return Err(invalid(
            format!("{key}.etcd_prefix"),
            format!("{prefix:?} must start with '/'"),
        ));
    }
    Ok(prefix)
}

fn zookeeper_path(key: &str, name: &str, text: String) -> Result<String, ConfigError> {
    let path = match text.trim() {
        "" => default_zookeeper_path(name),
        text => text.trim_end_matches('/').to_owned(),
    };
    if !path.starts_with('/') || path.len() < 2 || path.contains("//") {
        return Err(invalid(
            format!("{key}.zookeeper_path"),
            format!("{path:?} must be an absolute ZooKeeper path like \"/services/hello\""),
        ));
    }
    Ok(path)
}

fn dns_name(key: &str, name: &str, text: String) -> Result<String, ConfigError> {
    let dns = match text.trim() {
        "" => default_dns_name(name),
        text => text.trim_end_matches('.').to_owned(),
    };
    let valid = dns.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    });
    if !valid {
        return Err(invalid(
            format!("{key}.dns_name"),
            format!("{dns:?} is not a DNS name"),
        ));
    }
    Ok(dns)
}

fn static_instances(key: &str, texts: Vec<String>) -> Result<Vec<String>, ConfigError> {
    if texts.is_empty() {
        return Err(invalid(
            format!("{key}.instances"),
            "`source: static` needs at least one \"host:port\"",
        ));
    }
    for (i, text) in texts.iter().enumerate() {
        if !is_host_port(text) {
            return Err(invalid(
                format!("{key}.instances[{i}]"),
                format!("{text:?} is not an address like \"10.0.0.5:8080\""),
            ));
        }
    }
    Ok(texts.into_iter().map(|t| t.trim().to_owned()).collect())
}

/// `host:port` or `http://host:port` (IPv6 in brackets), with a port 1-65535.
pub fn is_host_port(text: &str) -> bool {
    split_host_port(text).is_some()
}

/// The host (IPv6 without brackets) and port of a [`is_host_port`] text; the one parser of
/// instance addresses written as text (static lists, etcd values, ZooKeeper data).
pub fn split_host_port(text: &str) -> Option<(&str, u16)> {
    let bare = text.trim();
    let bare = bare
        .strip_prefix("http://")
        .unwrap_or(bare)
        .trim_end_matches('/');
    let (host, port) = bare.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse::<u16>().ok().filter(|&p| p != 0)?;
    let valid = !host.is_empty() && !host.contains(['/', '@', ' ', '?', '#']);
    valid.then_some((host, port))
}

/// `etcd`: the cluster's client endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EtcdConfig {
    #[serde(serialize_with = "super::serialize_urls")]
    pub endpoints: Vec<Url>,
    /// A list, a watch set-up or a connect that takes longer is cut and retried.
    #[serde(with = "super::humantime_serde_compat")]
    pub timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEtcd {
    #[serde(default = "default_etcd_endpoints")]
    endpoints: Vec<String>,
    #[serde(default = "default_registry_timeout")]
    timeout: String,
}

impl Default for RawEtcd {
    fn default() -> Self {
        Self {
            endpoints: default_etcd_endpoints(),
            timeout: default_registry_timeout(),
        }
    }
}

fn default_etcd_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}

fn default_registry_timeout() -> String {
    "5s".into()
}

impl RawEtcd {
    pub fn validate(self) -> Result<EtcdConfig, ConfigError> {
        if self.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "needs at least one endpoint"));
        }
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for (i, text) in self.endpoints.iter().enumerate() {
            let key = format!("etcd.endpoints[{i}]");
            let url = Url::parse(text.trim()).map_err(|e| {
                invalid(
                    &key,
                    format!("{text:?} is not a URL like \"http://127.0.0.1:2379\" ({e})"),
                )
            })?;
            if !matches!(url.scheme(), "http" | "https")
                || url.host_str().is_none()
                || url.port_or_known_default().is_none()
            {
                return Err(invalid(
                    &key,
                    format!("{text:?} must be http(s)://host:port"),
                ));
            }
            endpoints.push(url);
        }
        Ok(EtcdConfig {
            endpoints,
            timeout: parse_positive_duration("etcd.timeout", &self.timeout)?,
        })
    }
}

/// `zookeeper`: the ensemble's client addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZookeeperConfig {
    /// `host:port` of each server, tried in turn.
    pub servers: Vec<String>,
    #[serde(with = "super::humantime_serde_compat")]
    pub session_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawZookeeper {
    #[serde(default = "default_zookeeper_servers")]
    servers: Vec<String>,
    #[serde(default = "default_session_timeout")]
    session_timeout: String,
}

impl Default for RawZookeeper {
    fn default() -> Self {
        Self {
            servers: default_zookeeper_servers(),
            session_timeout: default_session_timeout(),
        }
    }
}

fn default_zookeeper_servers() -> Vec<String> {
    vec!["127.0.0.1:2181".into()]
}

fn default_session_timeout() -> String {
    "10s".into()
}

impl RawZookeeper {
    pub fn validate(self) -> Result<ZookeeperConfig, ConfigError> {
        if self.servers.is_empty() {
            return Err(invalid("zookeeper.servers", "needs at least one server"));
        }
        for (i, text) in self.servers.iter().enumerate() {
            if !is_host_port(text) || text.contains("://") {
                return Err(invalid(
                    format!("zookeeper.servers[{i}]"),
                    format!("{text:?} is not an address like \"127.0.0.1:2181\""),
                ));
            }
        }
        Ok(ZookeeperConfig {
            servers: self
                .servers
                .into_iter()
                .map(|s| s.trim().to_owned())
                .collect(),
            session_timeout: parse_positive_duration(
                "zookeeper.session_timeout",
                &self.session_timeout,
            )?,
        })
    }
}

/// `dns`: the resolvers SRV lookups ask, and the refresh floor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsConfig {
    /// Empty: the system's resolvers (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    /// Records are looked up again at their TTL, but at most this often.
    #[serde(with = "super::humantime_serde_compat")]
    pub refresh: Duration,
    /// A lookup that takes longer is a failure (the last set keeps serving).
    #[serde(with = "super::humantime_serde_compat")]
    pub timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    #[serde(default)]
    servers: Vec<String>,
    #[serde(default = "default_dns_refresh")]
    refresh: String,
    #[serde(default = "default_dns_timeout")]
    timeout: String,
}

impl Default for RawDns {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            refresh: default_dns_refresh(),
            timeout: default_dns_timeout(),
        }
    }
}

fn default_dns_refresh() -> String {
    "5s".into()
}

fn default_dns_timeout() -> String {
    "2s".into()
}

impl RawDns {
    pub fn validate(self) -> Result<DnsConfig, ConfigError> {
        let mut servers = Vec::with_capacity(self.servers.len());
        for (i, text) in self.servers.iter().enumerate() {
            servers.push(text.trim().parse().map_err(|_| {
                invalid(
                    format!("dns.servers[{i}]"),
                    format!("{text:?} is not an address like \"127.0.0.1:8600\""),
                )
            })?);
        }
        Ok(DnsConfig {
            servers,
            refresh: parse_positive_duration("dns.refresh", &self.refresh)?,
            timeout: parse_positive_duration("dns.timeout", &self.timeout)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(source: &str) -> RawServiceSource {
        RawServiceSource {
            source: Some(source.into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_the_service_name() {
        assert_eq!(
            raw("etcd").validate("s", "hello").unwrap(),
            SourceConfig::Etcd {
                prefix: "/services/hello/".into()
            }
        );
        assert_eq!(
            raw("zookeeper").validate("s", "hello").unwrap(),
            SourceConfig::Zookeeper {
                path: "/services/hello".into()
            }
        );
        assert_eq!(
            raw("dns").validate("s", "hello").unwrap(),
            SourceConfig::Dns {
                name: "hello.service.consul".into()
            }
        );
        assert_eq!(
            RawServiceSource::default().validate("s", "hello").unwrap(),
            SourceConfig::Consul
        );
    }

    #[test]
    fn bad_input_names_the_key() {
        let error = |raw: RawServiceSource| {
            raw.validate("services[0]", "hello")
                .unwrap_err()
                .to_string()
        };
        assert!(error(raw("eureka")).contains("services[0].source"));
        assert!(error(raw("static")).contains("services[0].instances"));
        let mut bad = raw("static");
        bad.instances = vec!["10.0.0.1:80".into(), "nope".into()];
        assert!(error(bad).contains("services[0].instances[1]"));
        let mut stray = raw("consul");
        stray.etcd_prefix = "/x/".into();
        assert!(error(stray).contains("services[0].etcd_prefix"));
        let mut bad = raw("dns");
        bad.dns_name = "a..b".into();
        assert!(error(bad).contains("services[0].dns_name"));
    }

    #[test]
    fn host_ports() {
        for good in ["127.0.0.1:80", "http://a.b:8080", "[::1]:9000", "host:1"] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in ["", "a", "a:0", ":80", "a:b", "a/b:1", "u@h:1", "a:70000"] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }
}
