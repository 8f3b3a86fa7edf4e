//! switchyard: a service-discovery load-balancing HTTP gateway (server-side discovery).
//!
//! Clients send every request to one address; switchyard finds a healthy instance of the
//! right service in its registry (Consul, etcd, ZooKeeper, DNS SRV or a static list) and
//! forwards the request there.
//!
//! ```text
//! gateway.yaml + env ─> config ─┬─> discovery (one source per service: Consul blocking
//!                               │      │  queries or catalog mode, DNS SRV, static, ...;
//!                               │      │  tag routes: Consul services found by their tags)
//!                               │      └─ new healthy set? build a table, ArcSwap::store
//!                               │         new tag routes? publish DynamicRoutes ───┐
//!                               │                               │                   │
//!                               │                        upstream (one table per    routes
//!                               │                        service, its balancer)     │
//!                               │                               │ load(), pick()    │
//!                               └─> gateway (plain + TLS) ──────┘─> router ◄────────┘
//!                                     └─> pooled client ─> instance
//!                                   admin (/ /metrics /healthz /readyz /routes) reads all
//! ```
//!
//! - [`config`]: the file and env overrides, validated once into typed values.
//! - [`discovery`]: the `Source` seam (a stream of instance sets per service) and
//!   [`discovery::follow`], the one table writer; the [`discovery::WatchSet`] of every
//!   service by its source. [`discovery::consul`]: the Consul client (shared with
//!   self-registration), blocking queries, index rules, rate limit, backoff; per service,
//!   or (many services) per service for as many as the connection budget allows and
//!   catalog-wide change detectors plus targeted fetches for the rest;
//!   [`discovery::consul::tag_routes`] routes services by their Consul tags (fabio's
//!   `urlprefix-`). [`discovery::static_`]: a fixed list.
//! - [`upstream`]: immutable per-service tables behind `ArcSwap`, composed with the outlier
//!   detector, the retry budget and the discovery sync status.
//! - [`balance`]: the balancers, one file each behind one trait (round robin, random,
//!   least request, Maglev hash) and tag splits.
//! - [`routes`]: routes found at run time (fabio's grammar: tags, KV commands), where the
//!   tag-route watcher and the router meet.
//! - [`gateway`]: request screening, routing, header hygiene, forwarding over pooled clients
//!   (HTTP/1.1, h2c, TLS), retries, upgrades (WebSocket) and gRPC answers; reads tables.
//! - [`metrics`]: the Prometheus registry and per-service handles (a leaf).
//! - [`admin`]: the admin listener's endpoints.
//! - [`access_log`]: the optional JSON-lines access log, written off the request path.
//! - [`registration`]: optional self-registration of the gateway in Consul.
//! - [`server`]: the accept loop with connection deadlines and graceful shutdown, shared by
//!   every listener (plain, TLS, admin); plain HTTP/1.1 requests without a body on its own
//!   path ([`server::h1`]), everything else through hyper; each connection keeps a deadline
//!   timer its requests reuse ([`server::timer`]).
//! - [`wire`]: what both HTTP/1.1 sides share at the byte level (numbers, header spans, an
//!   instance's header lines handed on as they arrived, request header maps reused per
//!   thread, a stream with bytes put back); a leaf.
//! - [`tls`]: certificates, the SNI resolver (reloadable behind `ArcSwap`), the bounded
//!   handshake of the TLS listener; and TLS as a client (instances, Consul).
//!
//! `discovery` and `gateway` never import each other: they meet only at the upstream tables and
//! the dynamic routes (handed over by the wiring here).
//! A config reload ([`run_with_reload`]) re-reads the TLS certificates, rebuilds the tables'
//! set, the router and the watches and swaps them in; requests in flight keep what they
//! started with.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod gateway;
pub mod metrics;
pub mod registration;
pub mod routes;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::collections::HashSet;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::Config;
pub use tokio_util::sync::CancellationToken as Shutdown;

use crate::admin::Admin;
use crate::discovery::consul::tag_routes::TagRouteWatch;
use crate::discovery::consul::{ConnectionBudget, ConsulClient, Negotiated};
use crate::discovery::{SourceSettings, Sources, WatchSet};
use crate::gateway::Gateway;
use crate::metrics::{ConnectionMetrics, Metrics};
use crate::routes::DynamicRoutes;
use crate::server::{ServeSettings, Source, Transport};
use crate::tls::{TlsSettings, TlsTerminator};
use crate::upstream::Upstreams;

/// The admin listener only serves quick requests; it needs little time to drain.
const ADMIN_GRACE: Duration = Duration::from_secs(1);
/// Scrapers and probes only: a small cap keeps a misbehaving client from exhausting fds.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Reads and checks every file the config names (certificates and keys to serve, CA bundles
/// and client certificates for instances and Consul), so that a bad one fails `--check` and
/// the start, naming its key, before anything is bound.
pub fn check_files(config: &Config) -> Result<(), tls::TlsError> {
    if let Some(tls) = &config.tls {
        tls::Certificates::load(&tls.certificates)?;
    }
    gateway::clients::Clients::new(&config.upstream).tls_clients(&config.services)?;
    discovery::consul::consul_tls(&config.consul)?;
    Ok(())
}

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("Consul client: {0}")]
    Discovery(#[from] discovery::consul::DiscoveryError),
    #[error(transparent)]
    AccessLog(#[from] access_log::AccessLogError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("binding `{key}` {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The sockets the gateway serves on, bound by the caller (so a bad address fails first).
pub struct Listeners {
    /// `listen`: plain HTTP/1.1 and h2c.
    pub gateway: TcpListener,
    /// `admin_listen`.
    pub admin: TcpListener,
    /// `tls.listen`; when `None` and the config has `tls`, it is bound here.
    pub tls: Option<TcpListener>,
    /// More sockets on `listen` (bound with `SO_REUSEPORT`), one per extra worker: each is
    /// served by an accept loop on a current-thread runtime of its own (`workers: N`).
    pub workers: Vec<std::net::TcpListener>,
}

/// Runs the gateway on `listener` and the admin endpoints on `admin_listener` until
/// `shutdown` is cancelled, then drains in-flight requests for `server.shutdown_grace`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (_no_reloads, reloads) = mpsc::channel(1);
    run_with_reload(config, listener, admin_listener, shutdown, reloads).await
}

/// What a config reload replaces.
struct Reload {
    config: Config,
    upstreams: Upstreams,
    watches: WatchSet,
    gateway: Arc<Gateway>,
    admin: Arc<Admin>,
    metrics: Arc<Metrics>,
    /// Present when the TLS listener runs; its certificates are re-read on every reload.
    tls: Option<Arc<TlsTerminator>>,
    /// The file's services as the tag-route watcher sees them, and its wake-up on reload.
    files: Arc<ArcSwap<Upstreams>>,
    reloaded: Arc<Notify>,
}

/// How often the gateway asks again whether Consul's HTTPS speaks HTTP/2, when it did not
/// answer at startup.
const HTTP2_REASK: Duration = Duration::from_secs(2);

/// Applies each config from `reloads` (and each re-plan of the same services: `replan`)
/// until `stop`, then stops the watches.
async fn apply_reloads(
    mut state: Reload,
    mut reloads: mpsc::Receiver<Config>,
    replan: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            _ = replan.notified() => {
                state.replan();
                continue;
            }
            next = reloads.recv() => match next {
                Some(next) => next,
                None => {
                    stop.cancelled().await;
                    break;
                }
            },
        };
        state.apply(next);
    }
    state.watches.stop().await;
}

impl Reload {
    /// Services and routes take effect at once; connections and in-flight requests are not
    /// touched. Keys that shape listeners, runtime or clients need a restart: said in a log line.
    /// A removed service's metric series go once the last of its handles is dropped (its
    /// watch stopped, its requests answered): see [`metrics`].
    fn apply(&mut self, next: Config) {
        // Checked first: a service whose TLS files cannot be used refuses the whole reload.
        let tls_clients = match self.gateway.tls_clients(&next.services) {
            Ok(clients) => clients,
            Err(error) => {
                error!(%error, "reloaded config refused; the running config stays");
                return;
            }
        };
        // First, so that once the new routes are visible the certificates are in place too.
        self.reload_certificates(&next);
        let upstreams = self.upstreams.rebuild(&next.services, &self.metrics);
        let before: HashSet<&str> = self.upstreams.iter().map(|u| u.name()).collect();
        let after: HashSet<&str> = upstreams.iter().map(|u| u.name()).collect();
        let changed = upstreams
            .iter()
            .filter(|u| {
                self.upstreams
                    .get(u.name())
                    .is_some_and(|old| !Arc::ptr_eq(old, u))
            })
            .count();
        self.watches
            .update_sources(SourceSettings::from_config(&next));
        self.watches.reconcile(&upstreams);
        self.gateway.replace_routes(&upstreams, &tls_clients);
        self.admin.upstreams.store(Arc::new(upstreams.clone()));
        self.files.store(Arc::new(upstreams.clone()));
        self.reloaded.notify_one();
        info!(
            services = after.len(),
            added = after.difference(&before).count(),
            removed = before.difference(&after).count(),
            changed,
            "config reloaded"
        );
        for key in self.config.restart_only_changes(&next) {
            warn!(
                key,
                "changed in the reloaded config; takes effect on restart"
            );
        }
        self.upstreams = upstreams;
        self.config = next;
    }

    /// The same services watched anew within a grown connection budget (the sets move
    /// services between catalog mode and queries of their own; tables are kept).
    fn replan(&mut self) {
        let upstreams = self.upstreams.clone();
        self.watches.reconcile(&upstreams);
        self.reloaded.notify_one();
        info!("Consul watches re-planned");
    }

    /// New handshakes get the re-read certificates; a set that does not load is logged by
    /// the terminator (naming the key) and the running one kept.
    fn reload_certificates(&self, next: &Config) {
        if let (Some(terminator), Some(tls)) = (&self.tls, &next.tls) {
            let _ = terminator.reload(&tls.certificates);
        }
    }
}

/// [`run`], also applying each config sent on `reloads` (SIGHUP in `main`): services and
/// routes are added, changed and removed without touching connections or in-flight requests.
pub async fn run_with_reload(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    let listeners = Listeners {
        gateway: listener,
        admin: admin_listener,
        tls: None,
        workers: Vec::new(),
    };
    run_listeners(config, listeners, shutdown, reloads).await
}

/// Loads the certificates and binds `tls.listen` (unless `bound`) when the config has TLS.
async fn start_tls(
    config: &Config,
    metrics: &Metrics,
    bound: Option<TcpListener>,
) -> Result<Option<(TcpListener, Arc<TlsTerminator>)>, RunError> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let settings = TlsSettings {
        certificates: tls.certificates.clone(),
        handshake_timeout: config.server.header_read_timeout,
    };
    let terminator = Arc::new(TlsTerminator::new(&settings, metrics.tls_handshakes())?);
    let listener = match bound {
        Some(listener) => listener,
        None => TcpListener::bind(tls.listen)
            .await
            .map_err(|source| RunError::Bind {
                key: "tls.listen",
                addr: tls.listen,
                source,
            })?,
    };
    Ok(Some((listener, terminator)))
}

/// What every listener and background task of a running gateway shares, built before
/// anything is spawned: a bad access-log path or a TLS client file fails the start cleanly.
struct Wiring {
    config: Config,
    metrics: Arc<Metrics>,
    discovery: Arc<ConsulClient>,
    gateway: Arc<Gateway>,
    admin: Arc<Admin>,
    /// Gateway connections per client address, counted across the plain and TLS listeners
    /// and every worker.
    clients: Arc<server::Clients>,
    /// The file's services (swapped on every reload, so that a removed service's tables and
    /// metric series go; no other copy is kept here) as the watches, the reloader and the
    /// tag-route watcher see them, and the tag-route watcher's wake-up on reload.
    files: Arc<ArcSwap<Upstreams>>,
    reloaded: Arc<Notify>,
    /// Whether Consul's HTTPS answered the HTTP/2 question at startup.
    http2: Negotiated,
    /// Wakes the reloader to reconcile the watch sets with the same services (the budget
    /// grew: Consul answered over HTTP/2 after startup).
    replan: Arc<Notify>,
    shutdown: CancellationToken,
    /// Cancelled after the listeners have drained: retries during the drain still see fresh
    /// tables.
    stop_watchers: CancellationToken,
}

/// The access log's writer task and its stop, cancelled once the gateway listener has
/// drained so that every answered request is logged.
struct AccessLogWriter {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Wiring {
    async fn build(
        config: Config,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<(Self, AccessLogWriter), RunError> {
        let upstreams = Upstreams::new(&config.services, &metrics);
        let discovery = Arc::new(ConsulClient::new(&config.consul)?);
        let http2 = discovery.negotiate_http2().await;
        let stop = CancellationToken::new();
        let dropped = metrics.access_log_dropped();
        let access_log = access_log::start(&config.access_log, dropped, stop.clone()).await?;
        let (access_log, task) = access_log.unzip();
        let unrouted = metrics.for_requests(metrics::UNROUTED);
        let gateway = Arc::new(Gateway::new(&config, &upstreams, unrouted, access_log)?);
        let admin = Arc::new(Admin {
            metrics: metrics.clone(),
            upstreams: ArcSwap::from_pointee(upstreams.clone()),
            dynamic: ArcSwap::from_pointee(DynamicRoutes::default()),
            stale_after: config.consul.stale_after,
        });
        let clients =
            server::Clients::new(ServeSettings::from_server("gateway", &config.server).clients);
        let wiring = Self {
            files: Arc::new(ArcSwap::from_pointee(upstreams.clone())),
            reloaded: Arc::new(Notify::new()),
            http2,
            replan: Arc::new(Notify::new()),
            stop_watchers: CancellationToken::new(),
            config,
            metrics,
            discovery,
            gateway,
            admin,
            clients,
            shutdown,
        };
        Ok((wiring, AccessLogWriter { stop, task }))
    }

    /// Starts a watch for each of the file's services, sharing one Consul connection budget
    /// with the tag-route watcher, whose catalog and KV long-polls come off the top.
    fn start_watches(&self) -> (WatchSet, Arc<ConnectionBudget>) {
        let sources = Sources::new(
            self.discovery.clone(),
            SourceSettings::from_config(&self.config),
        );
        let tag_route_polls = match &self.config.tag_routes {
            t if !t.enabled => 0,
            t => 1 + usize::from(t.kv_path.is_some()),
        };
        let budget = ConnectionBudget::reporting(
            &self.config.consul,
            tag_route_polls,
            self.discovery.queries_per_connection(),
            &self.metrics,
        );
        let watches = WatchSet::start(
            sources,
            &self.config.consul,
            budget.clone(),
            &self.files.load(),
        );
        (watches, budget)
    }

    /// The admin endpoints on `listener`: quick requests only, few connections, a short drain.
    fn spawn_admin(&self, listener: TcpListener) -> JoinHandle<()> {
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.server.header_read_timeout);
        let admin = self.admin.clone();
        let handler = move |_connection, request| {
            let admin = admin.clone();
            async move { admin.handle(&request) }
        };
        let settings = ServeSettings {
            name: "admin",
            max_connections: ADMIN_MAX_CONNECTIONS,
            grace: ADMIN_GRACE,
            ..ServeSettings::from_server("admin", &self.config.server)
        };
        let connections = self.metrics.for_connections("admin");
        let serving = server::serve(
            listener,
            builder,
            handler,
            settings,
            connections,
            self.shutdown.clone(),
        );
        tokio::spawn(serving)
    }

    /// The tag-route watcher (`tag_routes.enabled`), which hands each changed set of routes to
    /// the gateway's router and the admin listener.
    fn spawn_tag_routes(&self, budget: &Arc<ConnectionBudget>) -> Option<JoinHandle<()>> {
        if !self.config.tag_routes.enabled {
            return None;
        }
        let (gateway, admin) = (self.gateway.clone(), self.admin.clone());
        let watch = TagRouteWatch {
            discovery: self.discovery.clone(),
            settings: self.config.tag_routes.clone(),
            consul: self.config.consul.clone(),
            budget: budget.clone(),
            files: self.files.clone(),
            reloaded: self.reloaded.clone(),
            metrics: self.metrics.clone(),
            publish: Box::new(move |routes: Arc<DynamicRoutes>| {
                admin.dynamic.store(routes.clone());
                gateway.replace_dynamic_routes(routes);
            }),
        };
        Some(tokio::spawn(watch.run(self.stop_watchers.clone())))
    }

    /// The TLS listener: the same gateway through the same connection path.
    fn spawn_tls(&self, listener: TcpListener, terminator: Arc<TlsTerminator>) -> JoinHandle<()> {
        let builder = server::tls_http_builder(&self.config.server);
        let transport = Transport::Tls(terminator);
        tokio::spawn(self.serve_listener("tls", listener, transport, builder))
    }

    /// The gateway on listener `name`'s socket until shutdown, then drained.
    fn serve_listener(
        &self,
        name: &'static str,
        listener: TcpListener,
        transport: Transport,
        builder: Builder<TokioExecutor>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let source = Source {
            listener,
            transport,
            clients: self.clients.clone(),
        };
        serve_gateway(
            self.gateway.clone(),
            source,
            builder,
            ServeSettings::from_server(name, &self.config.server),
            self.metrics.for_connections(name),
            self.shutdown.clone(),
        )
    }

    /// Applies each config from `reloads` (SIGHUP in `main`) until the watchers stop.
    fn spawn_reloader(
        &self,
        watches: WatchSet,
        tls: Option<Arc<TlsTerminator>>,
        reloads: mpsc::Receiver<Config>,
    ) -> JoinHandle<()> {
        let state = Reload {
            config: self.config.clone(),
            upstreams: Upstreams::clone(&self.files.load()),
            watches,
            gateway: self.gateway.clone(),
            admin: self.admin.clone(),
            metrics: self.metrics.clone(),
            tls,
            files: self.files.clone(),
            reloaded: self.reloaded.clone(),
        };
        let replan = self.replan.clone();
        tokio::spawn(apply_reloads(
            state,
            reloads,
            replan,
            self.stop_watchers.clone(),
        ))
    }

    /// When Consul's HTTPS did not answer at startup, asks again every [`HTTP2_REASK`] until
    /// it does; an answer over HTTP/2 grows the budget and re-plans the watch sets (the
    /// services in catalog mode get queries of their own).
    fn spawn_http2_reask(&self, budget: Arc<ConnectionBudget>) -> Option<JoinHandle<()>> {
        if self.http2 != Negotiated::NoAnswer {
            return None;
        }
        let (discovery, replan) = (self.discovery.clone(), self.replan.clone());
        let stop = self.stop_watchers.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(HTTP2_REASK) => {}
                }
                if discovery.negotiate_http2().await == Negotiated::NoAnswer {
                    continue;
                }
                if discovery.queries_per_connection() > 1 {
                    budget.multiplex(discovery.queries_per_connection());
                    replan.notify_one();
                }
                return;
            }
        }))
    }

    /// Self-registration (`register`): registered once serving, deregistered as soon as
    /// shutdown starts, before the drain.
    fn spawn_registration(&self) -> Option<JoinHandle<()>> {
        let register = self.config.register.clone()?;
        Some(tokio::spawn(registration::maintain(
            self.discovery.clone(),
            register,
            self.config.listen,
            self.config.admin_listen,
            self.shutdown.clone(),
        )))
    }

    /// Upgraded (spliced) connections outlive their HTTP exchange: they get the same grace.
    fn spawn_upgrade_drain(&self) -> JoinHandle<()> {
        let (gateway, shutdown) = (self.gateway.clone(), self.shutdown.clone());
        let grace = self.config.server.shutdown_grace;
        tokio::spawn(async move {
            shutdown.cancelled().await;
            gateway.upgrades().drain(grace).await;
        })
    }

    /// The plain listener (`listen`), served on this task until shutdown, then drained.
    async fn serve_plain(&self, listener: TcpListener) {
        tokio::spawn(server::timer_heartbeat(self.shutdown.clone()));
        let builder = server::http_builder(&self.config.server);
        self.serve_listener("gateway", listener, Transport::Plain, builder)
            .await;
    }

    /// Runs an accept loop for each extra gateway socket, each on a current-thread runtime of
    /// its own (nginx's and Pingora's worker model): the kernel spreads connections across the
    /// `SO_REUSEPORT` sockets, and a connection's requests stay on its worker's thread. The
    /// workers share the gateway (routes, tables, pools) and the per-client registry.
    fn spawn_workers(
        &self,
        sockets: Vec<std::net::TcpListener>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        let mut threads = Vec::new();
        for (i, socket) in sockets.into_iter().enumerate() {
            let worker = i + 1;
            let serving = self.worker(worker, socket);
            let spawned = std::thread::Builder::new()
                .name(format!("switchyard-worker-{worker}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime.block_on(serving),
                        Err(error) => error!(worker, %error, "worker runtime failed to start"),
                    }
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(error) => error!(worker, %error, "worker thread failed to start"),
            }
        }
        threads
    }

    /// Worker `worker`'s accept loop on `socket`, to run on its own runtime.
    fn worker(
        &self,
        worker: usize,
        socket: std::net::TcpListener,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (gateway, clients) = (self.gateway.clone(), self.clients.clone());
        let builder = server::http_builder(&self.config.server);
        let settings = ServeSettings::from_server("gateway", &self.config.server);
        let connections = self.metrics.for_worker_connections("gateway", worker);
        let shutdown = self.shutdown.clone();
        async move {
            tokio::spawn(server::timer_heartbeat(shutdown.clone()));
            let listener = match TcpListener::from_std(socket) {
                Ok(listener) => listener,
                Err(error) => return error!(worker, %error, "worker socket unusable"),
            };
            let source = Source {
                listener,
                transport: Transport::Plain,
                clients,
            };
            serve_gateway(gateway, source, builder, settings, connections, shutdown).await;
        }
    }
}

/// Serves `gateway` on `source` until `shutdown`, then drains: the plain and TLS listeners
/// and each worker.
async fn serve_gateway(
    gateway: Arc<Gateway>,
    source: Source,
    builder: Builder<TokioExecutor>,
    settings: ServeSettings,
    connections: ConnectionMetrics,
    shutdown: CancellationToken,
) {
    let handler = move |connection, request| {
        let gateway = gateway.clone();
        async move { gateway.handle(connection, request).await }
    };
    server::serve_on(source, builder, handler, settings, connections, shutdown).await;
}

/// What runs beside the plain listener, stopped by [`Running::stop`] once it has drained.
struct Running {
    workers: Vec<std::thread::JoinHandle<()>>,
    tls: Option<JoinHandle<()>>,
    upgrades_drained: JoinHandle<()>,
    registration: Option<JoinHandle<()>>,
    access_log: AccessLogWriter,
    stop_watchers: CancellationToken,
    admin: JoinHandle<()>,
    reloader: JoinHandle<()>,
    tag_routes: Option<JoinHandle<()>>,
    /// Asking Consul's HTTPS again about HTTP/2 (when it did not answer at startup).
    http2_reask: Option<JoinHandle<()>>,
}

impl Running {
    /// In the order the drain needs: the workers, the TLS listener and upgraded connections
    /// finish draining; then the registration (already deregistered), the access log's last
    /// lines, the watches and the reloader, the admin listener.
    async fn stop(self) {
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        })
        .await;
        for task in [self.tls, Some(self.upgrades_drained), self.registration]
            .into_iter()
            .flatten()
        {
            let _ = task.await;
        }
        self.access_log.stop.cancel();
        if let Some(writer) = self.access_log.task {
            let _ = writer.await;
        }
        self.stop_watchers.cancel();
        for task in [
            Some(self.admin),
            Some(self.reloader),
            self.tag_routes,
            self.http2_reask,
        ]
        .into_iter()
        .flatten()
        {
            let _ = task.await;
        }
    }
}

/// [`run_with_reload`] on sockets the caller bound, the TLS one included.
pub async fn run_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new()?);
    let tls = start_tls(&config, &metrics, listeners.tls).await?;
    let (wiring, access_log) = Wiring::build(config, metrics, shutdown.clone()).await?;
    let (watches, budget) = wiring.start_watches();
    let admin = wiring.spawn_admin(listeners.admin);
    let tag_routes = wiring.spawn_tag_routes(&budget);
    let http2_reask = wiring.spawn_http2_reask(budget.clone());
    let config = &wiring.config;
    info!(
        listen = %config.listen,
        admin = %config.admin_listen,
        tls = ?config.tls.as_ref().map(|t| t.listen),
        services = config.services.len(),
        "switchyard serving"
    );
    let terminator = tls.as_ref().map(|(_, terminator)| terminator.clone());
    let running = Running {
        tls: tls.map(|(listener, terminator)| wiring.spawn_tls(listener, terminator)),
        reloader: wiring.spawn_reloader(watches, terminator, reloads),
        registration: wiring.spawn_registration(),
        upgrades_drained: wiring.spawn_upgrade_drain(),
        workers: wiring.spawn_workers(listeners.workers),
        stop_watchers: wiring.stop_watchers.clone(),
        access_log,
        admin,
        tag_routes,
        http2_reask,
    };
    wiring.serve_plain(listeners.gateway).await;
    running.stop().await;
    info!("switchyard stopped");
    Ok(())
}
