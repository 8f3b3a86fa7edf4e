//! `source: dns`: the SRV records of `dns_name` (default `<name>.service.consul`, which
//! Consul's own DNS interface answers), looked up with `hickory-resolver`.
//!
//! Each SRV answer of the lowest priority (RFC 2782: higher ones are fallbacks) is one
//! instance, `target:port` (the target's trailing dot dropped), weighted by its SRV weight; the
//! target is resolved to an address from the A/AAAA records of the answer's additional
//! section when present (Consul sends them), else looked up. The set is looked up again when
//! the records' TTL runs out, but never more often than `dns.refresh` (Consul answers TTL 0
//! by default, so there the refresh alone paces it).
//!
//! What an answer means: NXDOMAIN or no SRV record is a real answer, an empty set (503 until
//! instances come back); a timeout, SERVFAIL, REFUSED or an unreachable server is a failure
//! ([`Update::Failed`]): the last set keeps serving, the error is counted and, past
//! `consul.stale_after`, `/readyz` says so.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{RData, Record};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::time::Instant;
use tracing::debug;

use super::{Source, SourceError, Update, Updates, WatchFuture};
use crate::config::{DnsConfig, ServiceConfig, SourceConfig};
use crate::upstream::Instance;

/// The DNS SRV source: one resolver shared by every `source: dns` service.
pub struct DnsSource {
    resolver: TokioResolver,
    settings: DnsConfig,
}

/// What one lookup found.
#[derive(Debug)]
struct Found {
    instances: Vec<Instance>,
    /// The smallest TTL of the SRV records (none: no record, looked up again at the floor).
    ttl: Option<Duration>,
}

impl DnsSource {
    /// A source asking `settings.servers` (empty: the system's resolvers).
    pub fn new(settings: &DnsConfig) -> Result<Self, SourceError> {
        let mut builder = match settings.servers.is_empty() {
            true => Resolver::builder_tokio().map_err(|e| SourceError::new("dns", e))?,
            false => Resolver::builder_with_config(
                explicit_servers(&settings.servers),
                TokioRuntimeProvider::default(),
            ),
        };
        let options = builder.options_mut();
        options.timeout = settings.timeout;
        // One try per server within `dns.timeout`: the refresh loop is the retry.
        options.attempts = 1;
        let resolver = builder.build().map_err(|e| SourceError::new("dns", e))?;
        Ok(Self {
            resolver,
            settings: settings.clone(),
        })
    }

    /// Looks `name` up once (SRV, then the targets' addresses), within `dns.timeout`.
    async fn lookup(&self, name: &str) -> Result<Found, SourceError> {
        // Each refresh asks the server: the resolver's cache would answer for the TTL, and
        // the loop already waits at least that long.
        self.resolver.clear_cache();
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let lookup = tokio::time::timeout(self.settings.timeout, self.resolver.srv_lookup(fqdn))
            .await
            .map_err(|_| SourceError::new("dns", "SRV lookup timed out"))?;
        let lookup = match lookup {
            Ok(lookup) => lookup,
            Err(error) if error.is_no_records_found() => {
                return Ok(Found {
                    instances: Vec::new(),
                    ttl: None,
                })
            }
            Err(error) => return Err(SourceError::new("dns", describe(&error))),
        };
        let glue = addresses(lookup.additionals());
        let (targets, ttl) = srv_targets(lookup.answers());
        let mut instances = Vec::new();
        for target in targets {
            let address = match glue.get(&target.host) {
                Some(ip) => *ip,
                None => match self.resolve(&target.host).await {
                    Some(ip) => ip,
                    None => continue,
                },
            };
            instances.extend(
                instance(&target.host, address, target.port).map(|i| i.with_weight(target.weight)),
            );
        }
        Ok(Found {
            instances,
            ttl: ttl.map(|t| Duration::from_secs(u64::from(t))),
        })
    }

    /// The first address of `host`; `None` (logged) when it has none.
    async fn resolve(&self, host: &str) -> Option<IpAddr> {
        let fqdn = format!("{host}.");
        let found = tokio::time::timeout(self.settings.timeout, self.resolver.lookup_ip(fqdn));
        match found.await {
            Ok(Ok(ips)) => ips.iter().next(),
            Ok(Err(error)) => {
                debug!(host, error = %describe(&error), "SRV target has no address; skipped");
                None
            }
            Err(_) => {
                debug!(host, "SRV target lookup timed out; skipped");
                None
            }
        }
    }
}

impl Source for DnsSource {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn watch(self: Arc<Self>, service: ServiceConfig, updates: Updates) -> WatchFuture {
        Box::pin(async move {
            let name = match &service.source {
                SourceConfig::Dns { name } => name.clone(),
                _ => crate::config::default_dns_name(&service.name),
            };
            self.refresh_loop(&name, &updates).await
        })
    }
}

impl DnsSource {
    /// Looks `name` up until nobody follows: at the TTL, at most every `dns.refresh`; after a
    /// failure, again after `dns.refresh`.
    async fn refresh_loop(&self, name: &str, updates: &Updates) {
        let mut last: Option<Vec<Instance>> = None;
        loop {
            let (update, wait) = match self.lookup(name).await {
                Ok(found) => {
                    let wait = found.ttl.unwrap_or_default().max(self.settings.refresh);
                    (self.answer(&mut last, found.instances), wait)
                }
                Err(error) => (Update::Failed(error), self.settings.refresh),
            };
            if !updates.send_then_wait(update, wait).await {
                return;
            }
        }
    }

    /// `Unchanged` when `instances` is the set last sent, else the new set (remembered).
    fn answer(&self, last: &mut Option<Vec<Instance>>, mut instances: Vec<Instance>) -> Update {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        if last.as_ref() == Some(&instances) {
            return Update::Unchanged;
        }
        *last = Some(instances.clone());
        Update::Instances {
            instances,
            version: 0,
            observed: Instant::now(),
        }
    }
}

/// A resolver config asking exactly `servers` (UDP, then TCP for truncated answers).
fn explicit_servers(servers: &[SocketAddr]) -> ResolverConfig {
    let name_servers = servers
        .iter()
        .map(|server| {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            let mut config = NameServerConfig::udp_and_tcp(server.ip());
            config.connections = vec![udp, tcp];
            config
        })
        .collect();
    ResolverConfig::from_parts(None, Vec::new(), name_servers)
}

/// One SRV answer: where, and its share of traffic.
#[derive(Debug, PartialEq)]
struct Target {
    /// The target's name without the trailing dot.
    host: String,
    port: u16,
    /// SRV weight as the instance's weight (0, "no preference", counts as 1).
    weight: u32,
}

/// The targets of the SRV `answers` of the lowest priority (RFC 2782: higher priorities are
/// fallbacks, used only when none of a lower one is listed), and the smallest TTL of all.
fn srv_targets(answers: &[Record]) -> (Vec<Target>, Option<u32>) {
    let srvs: Vec<_> = answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some((srv, r.ttl)),
            _ => None,
        })
        .collect();
    let ttl = srvs.iter().map(|(_, ttl)| *ttl).min();
    let Some(lowest) = srvs.iter().map(|(srv, _)| srv.priority).min() else {
        return (Vec::new(), ttl);
    };
    let targets = srvs
        .iter()
        .filter(|(srv, _)| srv.priority == lowest)
        .filter_map(|(srv, _)| {
            let host = srv.target.to_ascii().trim_end_matches('.').to_owned();
            // A target of "." means: decidedly not available here.
            (!host.is_empty()).then(|| Target {
                host,
                port: srv.port,
                weight: u32::from(srv.weight).max(1),
            })
        })
        .collect();
    (targets, ttl)
}

/// Host name (no trailing dot) -> address, from A/AAAA records (the additional section).
fn addresses(records: &[Record]) -> HashMap<String, IpAddr> {
    records
        .iter()
        .filter_map(|record| {
            let ip = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                _ => return None,
            };
            let host = record.name.to_ascii();
            Some((host.trim_end_matches('.').to_owned(), ip))
        })
        .collect()
}

/// One SRV target as an instance: id `target:port` (stable across lookups), the address
/// it resolved to. An address that is not usable is skipped and logged.
fn instance(target: &str, address: IpAddr, port: u16) -> Option<Instance> {
    let id = format!("{target}:{port}");
    match Instance::new(
        id,
        address.to_string(),
        port,
        Vec::new(),
        Default::default(),
    ) {
        Ok(instance) => Some(instance),
        Err(error) => {
            debug!(target, %error, "unusable SRV target; skipped");
            None
        }
    }
}

/// An error's text for logs and `/routes`: the resolver's own words.
fn describe(error: &NetError) -> String {
    error.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::{A, SRV};
    use hickory_resolver::proto::rr::Name;

    #[test]
    fn glue_records_name_their_hosts_without_the_trailing_dot() {
        let name = Name::from_ascii("7f000001.addr.dc1.consul.").unwrap();
        let records = vec![
            Record::from_rdata(name.clone(), 0, RData::A(A::new(127, 0, 0, 1))),
            Record::from_rdata(
                name,
                0,
                RData::SRV(SRV::new(1, 1, 80, Name::from_ascii("x.").unwrap())),
            ),
        ];
        let glue = addresses(&records);
        assert_eq!(glue.len(), 1);
        assert_eq!(
            glue["7f000001.addr.dc1.consul"],
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str, ttl: u32) -> Record {
        let name = Name::from_ascii("web.service.consul.").unwrap();
        let target = Name::from_ascii(target).unwrap();
        Record::from_rdata(
            name,
            ttl,
            RData::SRV(SRV::new(priority, weight, port, target)),
        )
    }

    #[test]
    fn lowest_priority_targets_with_their_weights_and_the_smallest_ttl() {
        let answers = [
            srv(1, 3, 80, "a.node.consul.", 30),
            srv(1, 0, 81, "b.node.consul.", 10),
            srv(2, 1, 82, "fallback.node.consul.", 5),
            srv(1, 1, 83, ".", 30),
        ];
        let (targets, ttl) = srv_targets(&answers);
        let found: Vec<_> = targets
            .iter()
            .map(|t| (t.host.as_str(), t.port, t.weight))
            .collect();
        assert_eq!(found, [("a.node.consul", 80, 3), ("b.node.consul", 81, 1)]);
        assert_eq!(ttl, Some(5));
        assert_eq!(srv_targets(&[]), (Vec::new(), None));
    }

    #[test]
    fn instances_are_named_by_target_and_port() {
        let one = instance("web.node.consul", "10.0.0.1".parse().unwrap(), 8080).unwrap();
        assert_eq!(one.id, "web.node.consul:8080");
        assert_eq!(one.authority.as_str(), "10.0.0.1:8080");
    }

    #[test]
    fn explicit_servers_keep_their_ports() {
        let config = explicit_servers(&["127.0.0.1:8600".parse().unwrap()]);
        let server = &config.name_servers()[0];
        assert!(server.connections.iter().all(|c| c.port == 8600));
    }
}
