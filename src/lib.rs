//! switchyard: a Consul-driven load-balancing HTTP gateway (server-side discovery).
//!
//! Clients send every request to one address; switchyard finds a healthy instance of the
//! right service in Consul and forwards the request there.
//!
//! ```text
//! gateway.yaml + env ─> config ─┬─> watcher (one task per service: Consul blocking queries)
//!                               │      └─ new healthy set? build a table, ArcSwap::store
//!                               │                               │
//!                               │                        upstream (one table per service)
//!                               │                               │ load(), pick()
//!                               └─> gateway (plain + TLS) ──────┘─> pooled client ─> instance
//!                                   admin (/ /metrics /healthz /readyz /routes) reads both
//! ```
//!
//! - [`config`]: the file and env overrides, validated once into typed values.
//! - [`watcher`]: Consul blocking queries, index rules, rate limit, backoff; writes tables.
//!   Per service, or (many services) per service for as many as the connection budget
//!   allows and catalog-wide change detectors plus targeted fetches for the rest.
//! - [`upstream`]: immutable per-service tables behind `ArcSwap`, and the balancers.
//! - [`gateway`]: routing, header hygiene, forwarding and retries; reads tables.
//! - [`metrics`]: the Prometheus registry and per-service handles (a leaf).
//! - [`admin`]: the admin listener's endpoints.
//! - [`access_log`]: the optional JSON-lines access log, written off the request path.
//! - [`registration`]: optional self-registration of the gateway in Consul.
//! - [`server`]: the accept loop with connection deadlines and graceful shutdown, shared by
//!   every listener (plain, TLS, admin).
//! - [`tls`]: certificates, the SNI resolver (reloadable behind `ArcSwap`), the bounded
//!   handshake of the TLS listener.
//!
//! `watcher` and `gateway` never import each other: they meet only at the upstream tables.
//! A config reload ([`run_with_reload`]) re-reads the TLS certificates, rebuilds the tables'
//! set, the router and the watches and swaps them in; requests in flight keep what they
//! started with.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod gateway;
pub mod metrics;
pub mod registration;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod watcher;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::collections::HashSet;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::Config;
pub use tokio_util::sync::CancellationToken as Shutdown;

use crate::admin::Admin;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::server::{ServeSettings, Transport};
use crate::tls::{TlsSettings, TlsTerminator};
use crate::upstream::Upstreams;
use crate::watcher::{ConsulDiscovery, WatchSet};

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
    watcher::consul_tls(&config.consul)?;
    Ok(())
}

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("Consul client: {0}")]
    Discovery(#[from] watcher::DiscoveryError),
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
}

/// Applies each config from `reloads` until `stop`, then stops the watches.
async fn apply_reloads(
    mut state: Reload,
    mut reloads: mpsc::Receiver<Config>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
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
        self.watches.reconcile(&upstreams);
        self.gateway.replace_routes(&upstreams, &tls_clients);
        self.admin.upstreams.store(Arc::new(upstreams.clone()));
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

/// [`run_with_reload`] on sockets the caller bound, the TLS one included.
pub async fn run_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    let Listeners {
        gateway: listener,
        admin: admin_listener,
        tls,
    } = listeners;
    let metrics = Arc::new(Metrics::new()?);
    let tls = start_tls(&config, &metrics, tls).await?;
    let upstreams = Upstreams::new(&config.services, &metrics);
    let discovery = Arc::new(ConsulDiscovery::new(&config.consul)?);
    // Opened before anything is spawned, so a bad path fails the start cleanly. The writer
    // stops after the gateway listener has drained, so every answered request is logged.
    let stop_access_log = CancellationToken::new();
    let access_log = access_log::start(
        &config.access_log,
        metrics.access_log_dropped(),
        stop_access_log.clone(),
    )
    .await?;
    let (access_log, access_log_writer) = access_log.unzip();

    // Watchers outlive the listeners' drain so retries during it still see fresh tables.
    let stop_watchers = CancellationToken::new();
    let watches = WatchSet::start(discovery, &config.consul, &upstreams);
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        upstreams: ArcSwap::from_pointee(upstreams.clone()),
        stale_after: config.consul.stale_after,
    });
    let mut admin_builder = Builder::new(TokioExecutor::new());
    admin_builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.server.header_read_timeout);
    let admin_for_server = admin.clone();
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        admin_builder,
        move |_connection, request| {
            let admin = admin_for_server.clone();
            async move { admin.handle(&request) }
        },
        ServeSettings {
            name: "admin",
            max_connections: ADMIN_MAX_CONNECTIONS,
            grace: ADMIN_GRACE,
            ..ServeSettings::from_server("admin", &config.server)
        },
        metrics.for_connections("admin"),
        shutdown.clone(),
    ));

    let gateway = Arc::new(Gateway::new(
        &config,
        &upstreams,
        metrics.for_requests(metrics::UNROUTED),
        access_log,
    )?);
    let builder = server::http_builder(&config.server);
    info!(
        listen = %config.listen,
        admin = %config.admin_listen,
        tls = ?config.tls.as_ref().map(|t| t.listen),
        services = config.services.len(),
        "switchyard serving"
    );
    // The TLS listener serves the same gateway through the same connection path.
    let terminator = tls.as_ref().map(|(_, terminator)| terminator.clone());
    let tls_task = tls.map(|(tls_listener, terminator)| {
        let gateway = gateway.clone();
        tokio::spawn(server::serve_on(
            tls_listener,
            Transport::Tls(terminator),
            builder.clone(),
            move |connection, request| {
                let gateway = gateway.clone();
                async move { gateway.handle(connection, request).await }
            },
            ServeSettings::from_server("tls", &config.server),
            metrics.for_connections("tls"),
            shutdown.clone(),
        ))
    });
    let reloader = tokio::spawn(apply_reloads(
        Reload {
            config: config.clone(),
            upstreams,
            watches,
            gateway: gateway.clone(),
            admin,
            metrics: metrics.clone(),
            tls: terminator,
        },
        reloads,
        stop_watchers.clone(),
    ));
    // Registered once serving; deregistered as soon as shutdown starts, before the drain.
    let registration = config.register.clone().map(|register| {
        tokio::spawn(registration::maintain(
            config.consul.clone(),
            register,
            config.listen,
            config.admin_listen,
            shutdown.clone(),
        ))
    });
    // Upgraded (spliced) connections outlive their HTTP exchange: they get the same grace.
    let upgrades_drained = tokio::spawn({
        let (gateway, shutdown) = (gateway.clone(), shutdown.clone());
        let grace = config.server.shutdown_grace;
        async move {
            shutdown.cancelled().await;
            gateway.upgrades().drain(grace).await;
        }
    });
    server::serve(
        listener,
        builder,
        move |connection, request| {
            let gateway = gateway.clone();
            async move { gateway.handle(connection, request).await }
        },
        ServeSettings::from_server("gateway", &config.server),
        metrics.for_connections("gateway"),
        shutdown,
    )
    .await;
    if let Some(tls_task) = tls_task {
        let _ = tls_task.await;
    }
    let _ = upgrades_drained.await;

    if let Some(registration) = registration {
        let _ = registration.await;
    }
    stop_access_log.cancel();
    if let Some(writer) = access_log_writer {
        let _ = writer.await;
    }
    stop_watchers.cancel();
    let _ = admin_task.await;
    let _ = reloader.await;
    info!("switchyard stopped");
    Ok(())
}
