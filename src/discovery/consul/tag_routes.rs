//! Tag routes (fabio's model): every Consul service carrying a tag that starts with
//! `tag_routes.prefix` is routed as the tag says, and fabio's manual commands at
//! `tag_routes.kv_path` in Consul KV override the tags.
//!
//! Two blocking queries feed one task: `/v1/catalog/services` (every service and its tags;
//! wakes on any registration or tag change) and, when set, the KV key (`?raw`). Each answer
//! rebuilds the whole [`DynamicRoutes`]; a changed one is published (the wiring hands it to
//! the gateway's router and the admin listener). A routed service gets an upstream watched
//! like a configured one (the same blocking watch, so instance changes propagate as fast);
//! a service the config file lists reuses the file's upstream. Tags the gateway cannot
//! honour are skipped, logged once, and listed with the reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Backoff, Claim, ConnectionBudget, ConsulClient, ConsulWatches, IndexStep};
use super::{TokenBucket, WatchPacing};
use super::{RATE_BURST, RATE_INTERVAL};
use crate::config::{ConsulConfig, ServiceConfig, TagRoutesConfig, UpstreamProtocol};
use crate::metrics::Metrics;
use crate::routes::fabio::{self, Command, Proto, TagRoute};
use crate::routes::{DynamicRoute, DynamicRoutes, Origin, RouteOptions, Skipped, Source, Target};
use crate::upstream::{Instance, Upstream, Upstreams};

/// What the tag-route watcher is given by the wiring.
pub struct TagRouteWatch {
    pub discovery: Arc<ConsulClient>,
    pub settings: TagRoutesConfig,
    pub consul: ConsulConfig,
    /// The Consul connection budget shared with the file's watches (this side gets the rest).
    pub budget: Arc<ConnectionBudget>,
    /// The config file's services, swapped on reload (`reloaded` is notified then).
    pub files: Arc<ArcSwap<Upstreams>>,
    pub reloaded: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Called with each changed set of routes.
    pub publish: Box<dyn Fn(Arc<DynamicRoutes>) + Send + Sync>,
}

enum Update {
    Catalog(Bytes),
    Kv(Bytes),
}

/// What the last answers said, and what was built from them.
#[derive(Default)]
struct State {
    /// Service name -> tags.
    catalog: BTreeMap<String, Vec<String>>,
    kv: String,
    /// Upstreams of routed services the file does not list, by name (and KV `route add`
    /// targets, by `name dst`).
    own: HashMap<String, Arc<Upstream>>,
    /// Skipped tags and commands already logged.
    logged: HashSet<String>,
    published: Arc<DynamicRoutes>,
}

impl TagRouteWatch {
    /// Runs until `stop`, then stops the watches it started.
    pub async fn run(self, stop: CancellationToken) {
        let (updates, mut received) = mpsc::channel(4);
        let pacing = WatchPacing::from(&self.consul);
        let catalog = "/v1/catalog/services".to_owned();
        tokio::spawn(poll(
            self.discovery.clone(),
            catalog,
            pacing,
            updates.clone(),
            Update::Catalog,
            stop.clone(),
        ));
        if let Some(kv) = &self.settings.kv_path {
            let path = format!("/v1/kv/{kv}");
            tokio::spawn(poll(
                self.discovery.clone(),
                path,
                pacing,
                updates,
                Update::Kv,
                stop.clone(),
            ));
        }
        let mut state = State::default();
        let mut watches = ConsulWatches::start(
            self.discovery.clone(),
            &self.consul,
            (self.budget.clone(), Claim::Rest),
            &Upstreams::from_list(Vec::new()),
        );
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.reloaded.notified() => {}
                update = received.recv() => match update {
                    Some(update) => state.take(update),
                    None => break,
                },
            }
            let routes = state.build(&self.settings, &self.files.load(), &self.metrics);
            watches.reconcile(&state.watched());
            if !routes.same_as(&state.published) {
                info!(
                    routes = routes.routes.len(),
                    skipped = routes.skipped.len(),
                    "tag routes changed"
                );
                state.published = Arc::new(routes);
                (self.publish)(state.published.clone());
            }
        }
        watches.stop().await;
    }
}

/// Long-polls `path`, sending each changed answer, with the watch loop's pacing and backoff.
async fn poll(
    discovery: Arc<ConsulClient>,
    path: String,
    pacing: WatchPacing,
    updates: mpsc::Sender<Update>,
    wrap: fn(Bytes) -> Update,
    stop: CancellationToken,
) {
    let (mut index, mut bucket) = (0u64, TokenBucket::new(RATE_BURST, RATE_INTERVAL));
    let mut backoff = Backoff::new(pacing.backoff_base, pacing.backoff_max);
    let raw = path.starts_with("/v1/kv/");
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = async {
                bucket.acquire().await;
                discovery.get(&path, index, |query| if raw { query.append_key_only("raw"); }).await
            } => result,
        };
        match result {
            Ok((answered, body)) => {
                backoff.reset();
                let step = IndexStep::from_indexes(index, answered);
                if step != (IndexStep::Unchanged { next: index })
                    && updates.send(wrap(body)).await.is_err()
                {
                    return;
                }
                index = step.next_index();
            }
            Err(error) => {
                index = 0;
                let delay = backoff.next_delay();
                warn!(%path, %error, retry_in = ?delay, "tag routes: Consul query failed; keeping the routes");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// A service's route from one tag, before upstreams are attached.
struct Found {
    service: String,
    source: Source,
    options: RouteOptions,
    origin: Origin,
    /// `route add`: the fixed address.
    dst: Option<String>,
}

impl State {
    fn take(&mut self, update: Update) {
        match update {
            Update::Catalog(body) => match serde_json::from_slice(&body) {
                Ok(catalog) => self.catalog = catalog,
                Err(error) => warn!(%error, "unreadable /v1/catalog/services answer"),
            },
            Update::Kv(body) => self.kv = String::from_utf8_lossy(&body).into_owned(),
        }
    }

    fn build(
        &mut self,
        settings: &TagRoutesConfig,
        files: &Upstreams,
        metrics: &Metrics,
    ) -> DynamicRoutes {
        let mut skipped = Vec::new();
        let mut found = self.tag_routes(&settings.prefix, &mut skipped);
        self.apply_commands(&mut found, &mut skipped);
        for skip in &skipped {
            if self
                .logged
                .insert(format!("{}\n{}", skip.origin, skip.text))
            {
                warn!(origin = %skip.origin, text = %skip.text, reason = %skip.reason, "route not honoured; skipped");
            }
        }
        let mut own = HashMap::new();
        let mut by_source: BTreeMap<Source, Vec<Target>> = BTreeMap::new();
        for route in found {
            let Some(upstream) = self.upstream_for(&route, files, metrics, &mut own) else {
                continue;
            };
            by_source.entry(route.source).or_default().push(Target {
                upstream,
                options: route.options,
                origin: route.origin,
            });
        }
        self.own = own;
        let routes = by_source
            .into_iter()
            .map(|(source, targets)| DynamicRoute { source, targets })
            .collect();
        DynamicRoutes { routes, skipped }
    }

    /// The upstreams to watch in Consul: those of tag routes (not `route add`'s fixed ones).
    fn watched(&self) -> Upstreams {
        let watched = self.own.iter().filter(|(key, u)| *key == u.name());
        Upstreams::from_list(watched.map(|(_, u)| u.clone()).collect())
    }

    /// Every route tag of every service, and the skipped ones.
    fn tag_routes(&self, prefix: &str, skipped: &mut Vec<Skipped>) -> Vec<Found> {
        let mut found = Vec::new();
        for (service, tags) in &self.catalog {
            for tag in tags {
                match fabio::parse_tag(prefix, tag) {
                    None => {}
                    Some(Err(reason)) => skipped.push(Skipped {
                        origin: format!("tag of service {service}"),
                        text: tag.clone(),
                        reason: reason.to_string(),
                    }),
                    Some(Ok(TagRoute { source, options })) => found.push(Found {
                        service: service.clone(),
                        source,
                        options,
                        origin: Origin::Tag {
                            service: service.clone(),
                            tag: tag.clone(),
                        },
                        dst: None,
                    }),
                }
            }
        }
        found
    }

    /// fabio's KV commands, in order, over the tag routes.
    fn apply_commands(&self, found: &mut Vec<Found>, skipped: &mut Vec<Skipped>) {
        let (commands, errors) = fabio::parse_commands(&self.kv);
        skipped.extend(errors.into_iter().map(|(line, reason)| Skipped {
            origin: "KV".into(),
            text: line,
            reason: reason.to_string(),
        }));
        for command in commands {
            match command {
                Command::Del { service, source } => found.retain(|f| {
                    f.service != service || source.as_ref().is_some_and(|s| *s != f.source)
                }),
                Command::Weight {
                    service,
                    source,
                    weight,
                } => {
                    for f in found
                        .iter_mut()
                        .filter(|f| f.service == service && f.source == source)
                    {
                        f.options.weight = Some(weight);
                    }
                }
                Command::Add {
                    service,
                    source,
                    dst,
                    weight,
                    mut options,
                } => {
                    options.weight = weight.or(options.weight);
                    let line = format!("route add {service} {source} {dst}");
                    found.push(Found {
                        service,
                        source,
                        options,
                        origin: Origin::Kv { line },
                        dst: Some(dst),
                    });
                }
            }
        }
    }

    /// The file's upstream of that name, else this watcher's own (kept when unchanged).
    fn upstream_for(
        &self,
        route: &Found,
        files: &Upstreams,
        metrics: &Metrics,
        own: &mut HashMap<String, Arc<Upstream>>,
    ) -> Option<Arc<Upstream>> {
        if route.dst.is_none() {
            if let Some(upstream) = files.get(&route.service) {
                return Some(upstream.clone());
            }
        }
        let protocol = match route.options.proto {
            Proto::Http => UpstreamProtocol::Http1,
            Proto::Https => UpstreamProtocol::Https,
            Proto::Grpc => UpstreamProtocol::H2c,
            Proto::Grpcs => UpstreamProtocol::H2,
        };
        let skip_verify = route.options.tls_skip_verify;
        let key = key_of(route);
        // One upstream per service: its first route's protocol decides.
        if let Some(upstream) = own.get(&key) {
            return Some(upstream.clone());
        }
        // The last build's is kept while its protocol is the same (table, health, watch).
        let kept = self.own.get(&key).cloned();
        let same = |u: &Arc<Upstream>| {
            let kept_skip = u
                .config
                .tls
                .as_ref()
                .is_some_and(|t| t.insecure_skip_verify);
            u.config.protocol == protocol && kept_skip == (skip_verify && protocol.is_tls())
        };
        if let Some(upstream) = kept.filter(same) {
            own.insert(key, upstream.clone());
            return Some(upstream);
        }
        let config = ServiceConfig::with_defaults(&route.service, protocol, skip_verify).ok()?;
        let upstream = Arc::new(Upstream::new(config, metrics.for_service(&route.service)));
        if let Some(dst) = &route.dst {
            let instance = fixed_instance(dst)?;
            upstream.replace_instances(vec![instance]);
            upstream.record_sync(1);
        }
        own.insert(key, upstream.clone());
        Some(upstream)
    }
}

fn key_of(route: &Found) -> String {
    match &route.dst {
        Some(dst) => format!("{} {dst}", route.service),
        None => route.service.clone(),
    }
}

/// `http://host:port[/...]` (or `host:port`) of a `route add` as an instance.
fn fixed_instance(dst: &str) -> Option<Instance> {
    let rest = dst.strip_prefix("http://").unwrap_or(dst);
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Instance::new(
        dst.to_owned(),
        host.to_owned(),
        port.parse().ok()?,
        Vec::new(),
        BTreeMap::new(),
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(catalog: &[(&str, &[&str])], kv: &str) -> State {
        State {
            catalog: catalog
                .iter()
                .map(|(s, tags)| (s.to_string(), tags.iter().map(|t| t.to_string()).collect()))
                .collect(),
            kv: kv.to_owned(),
            ..State::default()
        }
    }

    fn settings() -> TagRoutesConfig {
        TagRoutesConfig {
            enabled: true,
            prefix: "urlprefix-".into(),
            kv_path: Some("fabio/config".into()),
        }
    }

    #[test]
    fn tags_commands_and_file_services_make_the_routes() {
        let metrics = Metrics::new().unwrap();
        let config =
            crate::config::Config::from_yaml("services:\n  - name: api\n", &Default::default())
                .unwrap();
        let files = Upstreams::new(&config.services, &metrics);
        let mut state = state(
            &[
                ("api", &["urlprefix-/api strip=/api"]),
                ("web", &["urlprefix-/web", "v1"]),
                ("web-v2", &["urlprefix-/web"]),
                ("db", &["urlprefix-:5432 proto=tcp"]),
            ],
            "route weight web-v2 /web weight 0.1\nroute add legacy /old http://10.0.0.9:8080/\nroute del nobody\n",
        );
        let routes = state.build(&settings(), &files, &metrics);
        let sources: Vec<String> = routes.routes.iter().map(|r| r.source.to_string()).collect();
        assert_eq!(sources, ["/api", "/old", "/web"]);
        // A service the file lists reuses the file's upstream (its watch, its table).
        assert!(Arc::ptr_eq(
            &routes.routes[0].targets[0].upstream,
            files.get("api").unwrap()
        ));
        let web = &routes.routes[2].targets;
        assert_eq!(web.len(), 2);
        assert_eq!(web[1].options.weight, Some(0.1), "route weight from KV");
        let old = &routes.routes[1].targets[0];
        assert_eq!(
            old.upstream.table().instances()[0].authority.as_str(),
            "10.0.0.9:8080"
        );
        assert!(matches!(old.origin, Origin::Kv { .. }));
        assert_eq!(routes.skipped.len(), 1, "{:?}", routes.skipped);
        // Watched: the tag services only (not the file's, not route add's fixed address).
        let mut watched: Vec<String> = state
            .watched()
            .iter()
            .map(|u| u.name().to_owned())
            .collect();
        watched.sort();
        assert_eq!(watched, ["web", "web-v2"]);
        // Rebuilt unchanged: the same upstreams, so nothing to publish.
        let again = state.build(&settings(), &files, &metrics);
        assert!(again.same_as(&routes));
    }
}
