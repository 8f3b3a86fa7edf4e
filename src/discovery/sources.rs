//! The registry of source instances: one client per registry, built from the config's
//! registry sections and shared by every service that names that source.
//!
//! A registry no service uses gets no client (a Consul-only config never dials etcd). On a
//! reload, [`Sources::rebuild`] keeps each source whose settings did not change and builds
//! the others anew; the watch set then restarts the watches of the services whose source
//! was replaced. So `etcd`, `zookeeper` and `dns` apply on reload; `consul.*` still needs a
//! restart (its client is shared with self-registration and the tag routes).

use std::collections::BTreeSet;
use std::sync::Arc;

use tracing::error;

use super::consul::ConsulClient;
use super::static_::StaticSource;
use super::{Source, SourceError};
use crate::config::{Config, DnsConfig, EtcdConfig, SourceConfig, ZookeeperConfig};

/// What the sources are built from: the registries' sections and which sources are in use.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSettings {
    pub etcd: EtcdConfig,
    pub zookeeper: ZookeeperConfig,
    pub dns: DnsConfig,
    /// The `source` names of the config's services.
    pub used: BTreeSet<&'static str>,
}

impl SourceSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            etcd: config.etcd.clone(),
            zookeeper: config.zookeeper.clone(),
            dns: config.dns.clone(),
            used: config.services.iter().map(|s| s.source.name()).collect(),
        }
    }
}

/// One source instance per registry.
#[derive(Clone)]
pub struct Sources {
    /// Consul: the shared HTTP client (per-service, catalog mode and tag routes use it).
    pub consul: Arc<ConsulClient>,
    pub static_: Arc<dyn Source>,
    pub dns: Option<Arc<dyn Source>>,
    pub etcd: Option<Arc<dyn Source>>,
    pub zookeeper: Option<Arc<dyn Source>>,
    settings: SourceSettings,
}

impl Sources {
    /// Builds a source for each registry `settings.used` names.
    pub fn new(consul: Arc<ConsulClient>, settings: SourceSettings) -> Self {
        Sources {
            consul,
            static_: Arc::new(StaticSource),
            dns: build("dns", &settings, || build_dns(&settings.dns)),
            etcd: build("etcd", &settings, || build_etcd(&settings.etcd)),
            zookeeper: build("zookeeper", &settings, || {
                build_zookeeper(&settings.zookeeper)
            }),
            settings,
        }
    }

    /// The sources for a reloaded config: a registry whose section did not change (and that
    /// had a source) keeps it, so its services keep their watches; the others are built anew
    /// (or dropped, when no service uses them any more).
    pub fn rebuild(&self, settings: SourceSettings) -> Sources {
        let old = &self.settings;
        let keep = |name, same: bool, source: &Option<Arc<dyn Source>>| {
            (same && source.is_some() && settings.used.contains(name)).then(|| source.clone())
        };
        let dns = keep("dns", settings.dns == old.dns, &self.dns)
            .unwrap_or_else(|| build("dns", &settings, || build_dns(&settings.dns)));
        let etcd = keep("etcd", settings.etcd == old.etcd, &self.etcd)
            .unwrap_or_else(|| build("etcd", &settings, || build_etcd(&settings.etcd)));
        let zookeeper = keep(
            "zookeeper",
            settings.zookeeper == old.zookeeper,
            &self.zookeeper,
        )
        .unwrap_or_else(|| {
            build("zookeeper", &settings, || {
                build_zookeeper(&settings.zookeeper)
            })
        });
        Sources {
            consul: self.consul.clone(),
            static_: self.static_.clone(),
            dns,
            etcd,
            zookeeper,
            settings,
        }
    }

    /// The source that watches a service with `source`; `None` for Consul (watched by the
    /// Consul machinery) and for a registry without a client.
    pub fn for_service(&self, source: &SourceConfig) -> Option<Arc<dyn Source>> {
        match source {
            SourceConfig::Consul => None,
            SourceConfig::Static { .. } => Some(self.static_.clone()),
            SourceConfig::Dns { .. } => self.dns.clone(),
            SourceConfig::Etcd { .. } => self.etcd.clone(),
            SourceConfig::Zookeeper { .. } => self.zookeeper.clone(),
        }
    }
}

type Built = Result<Option<Arc<dyn Source>>, SourceError>;

/// Runs `make` when a service uses `name`; a failure is logged and leaves no source.
fn build(
    name: &str,
    settings: &SourceSettings,
    make: impl FnOnce() -> Built,
) -> Option<Arc<dyn Source>> {
    if !settings.used.contains(name) {
        return None;
    }
    match make() {
        Ok(Some(source)) => Some(source),
        Ok(None) => {
            error!(source = name, "this build has no client for this source");
            None
        }
        Err(error) => {
            error!(source = name, %error, "setting up the source failed");
            None
        }
    }
}

/// `source: dns`.
fn build_dns(settings: &DnsConfig) -> Built {
    Ok(Some(Arc::new(super::dns::DnsSource::new(settings)?)))
}

/// `source: etcd`: one client for every etcd service, connected on first use.
fn build_etcd(settings: &EtcdConfig) -> Built {
    let settings = super::etcd::EtcdSettings::new(settings);
    Ok(Some(Arc::new(super::etcd::EtcdSource::new(settings))))
}

/// `source: zookeeper`: one session for every ZooKeeper service, opened on first use.
fn build_zookeeper(settings: &ZookeeperConfig) -> Built {
    let settings = super::zookeeper::ZookeeperSettings::new(settings);
    Ok(Some(Arc::new(super::zookeeper::ZookeeperSource::new(
        settings,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(yaml: &str) -> (Arc<ConsulClient>, SourceSettings) {
        let config = Config::from_yaml(yaml, &Default::default()).unwrap();
        let consul = ConsulClient::new(&config.consul).unwrap();
        (Arc::new(consul), SourceSettings::from_config(&config))
    }

    const DNS: &str = "dns: {servers: [\"127.0.0.1:8600\"]}\nservices: [{name: a, source: dns}]\n";

    #[test]
    fn a_reload_keeps_an_unchanged_source_and_rebuilds_a_changed_one() {
        let (consul, first) = settings(DNS);
        let sources = Sources::new(consul, first);
        let dns = sources.dns.clone().expect("a dns source");
        assert!(sources.etcd.is_none(), "no service uses etcd");
        let (_, same) = settings(DNS);
        let kept = sources.rebuild(same);
        assert!(Arc::ptr_eq(&dns, kept.dns.as_ref().unwrap()));
        let (_, changed) = settings(&DNS.replace("8600", "8601"));
        let rebuilt = kept.rebuild(changed);
        assert!(!Arc::ptr_eq(&dns, rebuilt.dns.as_ref().unwrap()));
        let (_, unused) = settings("services: [{name: a}]\n");
        assert!(rebuilt.rebuild(unused).dns.is_none());
    }
}
