//! The gateway: maps each client request to a service, picks an instance from that service's
//! current table, forwards over a pooled client ([`h1`], its own, for HTTP/1.1 instances,
//! plain and `https`; hyper-util's for h2c and `h2`), and retries on another instance when
//! that is safe.
//!
//! What it owns: the [`router`] (built from config, swapped whole on reload, read without
//! locks), request screening (one valid `Host`, methods, transfer codings, path
//! normalisation, throttled clients), the https [`redirect`] of `tls.redirect_http`, [`headers`] hygiene, the [`retry`] rules, the [`body`]
//! handling that tells a client's broken body from an instance's failure, and the gateway's
//! own [`answers`]. It reads upstream tables and never writes them; it does not know about
//! Consul. When the access log is on, it hands each answered request to it (a channel send,
//! never a write).
//!
//! Futures on the request path: the largest stages return an `async move` block instead of
//! being `async fn`s. An `async fn`'s future keeps its arguments twice (rustc moves them into
//! locals on the first poll and does not reuse the room), so the request (264 bytes) was held
//! and copied once more in each stage; an `async` block uses what it captures in place.

pub mod affinity;
pub mod answers;
pub mod body;
pub mod clients;
pub mod grpc;
pub mod h1;
pub mod head;
pub mod headers;
pub mod path;
pub mod redirect;
pub mod retry;
pub mod router;
pub mod upgrade;

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::debug;

use crate::access_log::{AccessLog, Entry};
use crate::config::{Config, ServiceConfig, UpstreamProtocol};
use crate::metrics::RequestMetrics;
use crate::routes::DynamicRoutes;
use crate::server::timer::TimerSlot;
use crate::server::{ClientConnection, RequestBody};
use crate::tls::TlsError;
use crate::upstream::{Instance, InstanceSlot, ServiceTable, Tried, Upstream, Upstreams};
pub use answers::{GatewayError, ERROR_HEADER};
use body::{client_body_fault, BodyLimits, Exchange, HeldBody, InstanceBody, UpstreamBody};
use clients::{Clients, TlsClient, TlsClients, TryError};
use head::Head;
use headers::{forward_headers, request_authority, Forwarded, Hop};
pub use headers::{remove_hop_by_hop, strip_port};
use retry::{is_bad_gateway_status, may_retry, TryFailure};
pub use router::{Route, Router};
use upgrade::{InstanceSide, Upgrades};

/// Body of a response to the client: streamed from an instance, or made by the gateway.
pub type ProxyBody = Either<InstanceBody, Full<Bytes>>;

/// What the gateway takes from the config (rpxy's "settings a component takes").
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub body: BodyLimits,
    /// Peers whose forwarded headers are kept.
    pub trusted_proxies: Vec<IpNet>,
    pub normalize_path: bool,
    /// In-flight requests per instance, and how long a request waits for one to free up.
    pub max_connections_per_instance: usize,
    pub connect_timeout: Duration,
    /// `tls.redirect_http`: plain requests get a 308 to this HTTPS port instead of a route.
    pub redirect_https: Option<u16>,
}

impl GatewaySettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            body: BodyLimits {
                max_replay: config.upstream.max_replay_body_bytes,
                max: config.server.max_body_bytes,
            },
            trusted_proxies: config.server.trusted_proxies.clone(),
            normalize_path: config.server.normalize_path,
            max_connections_per_instance: config.upstream.max_connections_per_instance,
            connect_timeout: config.upstream.connect_timeout,
            redirect_https: config
                .tls
                .as_ref()
                .filter(|tls| tls.redirect_http)
                .map(|tls| tls.listen.port()),
        }
    }

    fn trusts(&self, peer: IpAddr) -> bool {
        !self.trusted_proxies.is_empty() && self.trusted_proxies.iter().any(|n| n.contains(&peer))
    }
}

/// The gateway's request handler and its shared, read-only state.
pub struct Gateway {
    /// Swapped whole on a config reload or a dynamic route change; requests in flight keep
    /// the one they started with.
    router: ArcSwap<Router>,
    /// What the router is built from; written off the request path only, by the reload and
    /// the tag-route tasks.
    route_inputs: Mutex<RouteInputs>,
    clients: Clients,
    settings: GatewaySettings,
    unrouted: RequestMetrics,
    access_log: Option<AccessLog>,
    upgrades: Upgrades,
}

/// The file's services and the dynamic routes, each with their TLS clients.
struct RouteInputs {
    upstreams: Upstreams,
    tls: TlsClients,
    dynamic: Arc<DynamicRoutes>,
    dynamic_tls: TlsClients,
}

impl RouteInputs {
    /// The router of these inputs (a file service's TLS client wins over a tag service's).
    fn router(&self) -> Router {
        let mut tls = self.dynamic_tls.clone();
        tls.extend(
            self.tls
                .iter()
                .map(|(name, client)| (name.clone(), client.clone())),
        );
        Router::with_dynamic(&self.upstreams, &self.dynamic).with_tls_clients(&tls)
    }
}

/// What the tries of one request came to, for the access log.
#[derive(Debug, Default)]
struct Tries {
    count: u32,
    /// The instance of the last try; recorded only when the access log is on.
    last: Option<Authority>,
}

/// A request that passed screening: where it is going.
struct Target {
    /// The authority it is for (`Host`, or the absolute-form target / `:authority`).
    authority: Option<HeaderValue>,
    /// The normalised path, when it differs from the one sent.
    path: Option<String>,
}

/// What to do after one try.
enum Next {
    Answer(Response<ProxyBody>),
    /// Try another instance; keep this answer in case no other try does better.
    Retry(Option<Response<InstanceBody>>),
    /// Stop trying.
    Stop,
}

impl Gateway {
    /// Fails when a service's TLS files (CA, client certificate) cannot be used.
    pub fn new(
        config: &Config,
        upstreams: &Upstreams,
        unrouted: RequestMetrics,
        access_log: Option<AccessLog>,
    ) -> Result<Self, TlsError> {
        let clients = Clients::new(&config.upstream);
        let tls = clients.tls_clients(&config.services)?;
        Ok(Self {
            router: ArcSwap::from_pointee(Router::new(upstreams).with_tls_clients(&tls)),
            route_inputs: Mutex::new(RouteInputs {
                upstreams: upstreams.clone(),
                tls,
                dynamic: Arc::default(),
                dynamic_tls: TlsClients::default(),
            }),
            clients,
            settings: GatewaySettings::from_config(config),
            unrouted,
            access_log,
            upgrades: Upgrades::default(),
        })
    }

    /// The TLS clients `services` need (files read afresh), checked before a reload applies.
    pub fn tls_clients(&self, services: &[ServiceConfig]) -> Result<TlsClients, TlsError> {
        self.clients.tls_clients(services)
    }

    fn route_inputs(&self) -> std::sync::MutexGuard<'_, RouteInputs> {
        self.route_inputs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes new requests over `upstreams` (a reloaded config), with `tls` from
    /// [`Gateway::tls_clients`]; the dynamic routes stay.
    pub fn replace_routes(&self, upstreams: &Upstreams, tls: &TlsClients) {
        let mut inputs = self.route_inputs();
        inputs.upstreams = upstreams.clone();
        inputs.tls = tls.clone();
        self.router.store(Arc::new(inputs.router()));
    }

    /// Routes new requests with `dynamic` routes (tags, KV) besides the file's. Their TLS
    /// services (`proto=https|grpcs`) get clients; if those cannot be built the routes are
    /// not applied (logged).
    pub fn replace_dynamic_routes(&self, dynamic: Arc<DynamicRoutes>) {
        let mut configs: Vec<ServiceConfig> = Vec::new();
        for target in dynamic.routes.iter().flat_map(|r| &r.targets) {
            let config = &target.upstream.config;
            if config.protocol.is_tls() && !configs.iter().any(|c| c.name == config.name) {
                configs.push(config.clone());
            }
        }
        let dynamic_tls = match self.clients.tls_clients(&configs) {
            Ok(clients) => clients,
            Err(error) => {
                tracing::warn!(%error, "tag routes: a TLS client could not be built; routes unchanged");
                return;
            }
        };
        let mut inputs = self.route_inputs();
        inputs.dynamic = dynamic;
        inputs.dynamic_tls = dynamic_tls;
        self.router.store(Arc::new(inputs.router()));
    }

    /// Answers one client request. Never fails: errors become the gateway's own answers.
    #[allow(clippy::manual_async_fn)] // on purpose: see the module doc on futures
    pub fn handle(
        &self,
        connection: Arc<ClientConnection>,
        request: Request<RequestBody>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + '_ {
        async move {
            let started = Instant::now();
            let entry = self.access_log_entry(&connection, &request);
            let screened = self.screen(&connection, &request);
            let redirect = self.settings.redirect_https.filter(|_| !connection.secure);
            if let (Ok(target), Some(port)) = (&screened, redirect) {
                let response = redirect::to_https(target.authority.as_ref(), request.uri(), port);
                return self.answer_unrouted(entry, response, started);
            }
            let grpc = grpc::is_grpc(request.headers());
            let answer = |error: GatewayError| match grpc {
                true => error.into_grpc_response(),
                false => error.into_response(),
            };
            let router = self.router.load_full();
            let routed = screened.and_then(|target| {
                let path = target.path.as_deref().unwrap_or(request.uri().path());
                let host = target
                    .authority
                    .as_ref()
                    .and_then(|a| a.to_str().ok())
                    .map(strip_port);
                match router.find(host, path) {
                    Some(route) => Ok((route, target)),
                    None => Err(GatewayError::NoRoute),
                }
            });
            let (route, target) = match routed {
                Ok(routed) => routed,
                Err(error) => return self.answer_unrouted(entry, answer(error), started),
            };
            if let Some(response) = route_answer(route, connection.peer.ip(), &request, grpc) {
                return self.answer_routed(entry, route, Tries::default(), response, started);
            }
            let mut tries = Tries::default();
            let forwarded = self.forward(route, &connection, request, target, grpc, &mut tries);
            let response = match forwarded.await {
                Ok(response) => response,
                Err(error) => answer(error),
            };
            self.answer_routed(entry, route, tries, response, started)
        }
    }

    /// Counts and logs a routed request's answer.
    fn answer_routed(
        &self,
        entry: Option<Entry>,
        route: &Route,
        tries: Tries,
        response: Response<ProxyBody>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let elapsed = started.elapsed();
        let requests = &route.upstream.metrics.requests;
        requests.observe_request(response.status().as_u16(), elapsed);
        self.log(entry, Some(route), tries, &response, elapsed);
        response
    }

    /// What the gateway refuses before routing: a throttled client, CONNECT and TRACE,
    /// transfer codings other than chunked, a missing, repeated or invalid Host.
    fn screen(
        &self,
        connection: &ClientConnection,
        request: &Request<RequestBody>,
    ) -> Result<Target, GatewayError> {
        if connection.client.is_throttled() {
            return Err(GatewayError::TooManyResets);
        }
        if matches!(*request.method(), Method::CONNECT | Method::TRACE) {
            return Err(GatewayError::MethodNotAllowed);
        }
        if has_unsupported_coding(request) {
            return Err(GatewayError::UnsupportedTransferCoding);
        }
        let authority = request_authority(request)?;
        let path = match self.settings.normalize_path {
            true => match path::normalize(request.uri().path()) {
                std::borrow::Cow::Borrowed(_) => None,
                std::borrow::Cow::Owned(normal) => Some(normal),
            },
            false => None,
        };
        Ok(Target { authority, path })
    }

    /// The access log's view of the request, taken before `forward` consumes it, and only
    /// when the log is on.
    fn access_log_entry(
        &self,
        connection: &ClientConnection,
        request: &Request<RequestBody>,
    ) -> Option<Entry> {
        self.access_log.as_ref().map(|_| Entry {
            time: SystemTime::now(),
            client: connection.peer.ip(),
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            service: None,
            instance: None,
            status: 0,
            duration: Duration::ZERO,
            tries: 0,
        })
    }

    /// Counts and logs an answer that went to no service (refused, no route, redirect).
    fn answer_unrouted(
        &self,
        entry: Option<Entry>,
        response: Response<ProxyBody>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let elapsed = started.elapsed();
        self.unrouted
            .observe_request(response.status().as_u16(), elapsed);
        self.log(entry, None, Tries::default(), &response, elapsed);
        response
    }

    /// Completes `entry` (present only when the access log is on) and queues it.
    fn log(
        &self,
        entry: Option<Entry>,
        route: Option<&Route>,
        tries: Tries,
        response: &Response<ProxyBody>,
        elapsed: Duration,
    ) {
        if let (Some(log), Some(mut entry)) = (&self.access_log, entry) {
            entry.service = route.map(|r| r.service.clone());
            entry.instance = tries.last;
            entry.tries = tries.count;
            entry.status = response.status().as_u16();
            entry.duration = elapsed;
            log.record(entry);
        }
    }

    /// Sends the request to instances of `route` until one answers or the rules say stop;
    /// `grpc`: the client speaks gRPC (its `grpc-timeout` can shorten the deadline).
    #[allow(clippy::manual_async_fn)] // on purpose: see the module doc on futures
    fn forward<'a>(
        &'a self,
        route: &'a Route,
        connection: &'a ClientConnection,
        mut request: Request<RequestBody>,
        target: Target,
        grpc: bool,
        tries: &'a mut Tries,
    ) -> impl Future<Output = Result<Response<ProxyBody>, GatewayError>> + Send + 'a {
        async move {
            let upstream = &route.upstream;
            let table = upstream.table();
            if table.is_empty() {
                return Err(GatewayError::NoHealthyInstance);
            }
            upstream.retry_budget.deposit();
            // A gRPC client's own deadline, when shorter than the route's, is the deadline.
            let client_deadline = grpc
                .then(|| grpc::timeout(request.headers()))
                .flatten()
                .filter(|asked| *asked < upstream.config.retry.timeout);
            let deadline =
                Instant::now() + client_deadline.unwrap_or(upstream.config.retry.timeout);
            let upgrade = upgrade::requested_protocol(&request)
                .map(|protocol| (protocol, hyper::upgrade::on(&mut request)));
            let (mut parts, body) = request.into_parts();
            let hop = &Hop {
                client: connection.peer_ip_header().clone(),
                trusted: self.settings.trusts(connection.peer.ip()),
                secure: connection.secure,
            };
            // Only `balance: hash` computes a key (before the headers are rewritten).
            let key = upstream.config.hash_on.as_ref().and_then(|hash_on| {
                affinity::request_key(hash_on, &parts.headers, hop.client.as_bytes())
            });
            let body = HeldBody::hold(&parts, body, self.settings.body, deadline).await?;
            let path = route.upstream_path(&parts.uri, target.path.as_deref());
            let forwarded = forward_headers(&mut parts, target.authority, hop);
            let upgrade = upgrade.map(|(protocol, client)| {
                upgrade::restore_headers(&mut parts.headers, protocol);
                client
            });
            parts.extensions.clear();
            // A later try needs a copy of the head only when there can be one (more than one
            // attempt and a body that can be sent twice: a streamed body ends the tries after the
            // first) and the client keeps the head (the HTTP/1.1 client gives it back).
            let copies = upstream.config.retry.attempts > 1
                && body.is_replayable()
                && !Clients::is_pooled(upstream.config.protocol);
            let mut forwarding = Forwarding {
                tls: route.tls.clone(),
                upstream,
                table,
                key,
                method: parts.method.clone(),
                head: Head::new(parts, copies),
                forwarded,
                path,
                body,
                deadline,
                timer: connection.deadline_timer(),
                upgrade,
                grpc,
                client_deadline: client_deadline.is_some(),
            };
            self.tries(&mut forwarding, tries).await
        }
    }

    /// The loop around one try: pick, send, settle.
    async fn tries(
        &self,
        forwarding: &mut Forwarding<'_>,
        tries: &mut Tries,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let upstream = forwarding.upstream;
        let attempts = upstream.config.retry.attempts;
        let table = forwarding.table.clone();
        let mut tried = Tried::default();
        let mut last_response = None;
        let mut saturated = false;
        for attempt in 0..attempts {
            // A retry must fit in the budget; the first try always goes.
            if attempt > 0 && !upstream.try_take_retry() {
                break;
            }
            let Some((index, instance)) = table.pick(&tried, forwarding.key) else {
                break;
            };
            tried.insert(index);
            let wait = self.settings.connect_timeout;
            let limit = self.settings.max_connections_per_instance;
            let Some(slot) = instance.acquire(limit, wait).await else {
                // The gateway's own limit, not the instance's failure: try another.
                debug!(service = upstream.name(), instance = %instance.id, "instance at its connection limit");
                saturated = true;
                continue;
            };
            let Some(request_body) = forwarding.body.take() else {
                break;
            };
            tries.count += 1;
            if self.access_log.is_some() {
                tries.last = Some(instance.authority.clone());
            }
            if attempt > 0 {
                upstream.metrics.inc_retries();
            }
            let is_last = attempt + 1 == attempts;
            match self
                .one_try(forwarding, instance, slot, request_body, is_last)
                .await?
            {
                Next::Answer(response) => return Ok(response),
                Next::Retry(response) => last_response = response.or(last_response),
                Next::Stop => break,
            }
        }
        match last_response {
            Some(response) => Ok(client_response(response)),
            None if saturated => Err(GatewayError::UpstreamSaturated),
            None => Err(GatewayError::BadGateway),
        }
    }

    /// Sends one try to `instance` and settles its outcome.
    async fn one_try(
        &self,
        forwarding: &mut Forwarding<'_>,
        instance: &Instance,
        slot: InstanceSlot,
        body: UpstreamBody,
        is_last: bool,
    ) -> Result<Next, GatewayError> {
        let protocol = forwarding.upstream.config.protocol;
        let mut head = forwarding
            .head
            .for_try(is_last)
            .ok_or(GatewayError::BadGateway)?;
        let pooled = Clients::is_pooled(protocol);
        aim(&mut head, &forwarding.path, instance, protocol, pooled)?;
        let deadline = forwarding.deadline;
        let tls = forwarding.tls.as_deref();
        let forwarded = forwarding.forwarded.clone();
        let sent = self
            .clients
            .request(protocol, tls, &instance.authority, head, body, forwarded);
        let exchange = Exchange::new(sent, slot, deadline);
        let timer = forwarding.timer.lend(deadline);
        let sent = exchange.send(&mut forwarding.head);
        tokio::select! {
            biased;
            answer = sent => match answer {
                Ok(response) => Ok(self.settle_answer(forwarding, instance, response, is_last)),
                Err(error) => forwarding.settle_error(instance, &error),
            },
            () = timer => forwarding.settle_timeout(instance),
        }
    }

    /// An instance answered: passed on (a 101 spliced), unless a 502/503/504 may be retried
    /// elsewhere.
    fn settle_answer(
        &self,
        forwarding: &mut Forwarding<'_>,
        instance: &Instance,
        mut response: Response<InstanceBody>,
        is_last: bool,
    ) -> Next {
        let upstream = forwarding.upstream;
        let status = response.status();
        if status.is_server_error() {
            upstream.record_failure(&forwarding.table, instance);
        } else {
            upstream.record_success(instance);
        }
        if let Some(client) = forwarding.upgrade.take() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                let slot = response.body_mut().take_slot();
                let instance_side = match response.body_mut().take_upgraded() {
                    Some(upgraded) => InstanceSide::Own(upgraded),
                    None => InstanceSide::Hyper(hyper::upgrade::on(&mut response)),
                };
                let gauge = upstream.metrics.upgraded();
                self.upgrades.splice(client, instance_side, gauge, slot);
            }
            // Nothing is retried after a 101; a refusal is passed through as it is.
            return Next::Answer(client_response(response));
        }
        let retry = is_bad_gateway_status(status)
            && !is_last
            && !forwarding.grpc
            && may_retry(
                &forwarding.method,
                TryFailure::BadGatewayStatus,
                forwarding.body.is_replayable(),
            );
        if !retry {
            return Next::Answer(client_response(response));
        }
        debug!(service = upstream.name(), instance = %instance.id, %status, "retrying after bad gateway status");
        Next::Retry(Some(response))
    }

    /// Open upgraded (spliced) connections: the gateway's shutdown drains them.
    pub fn upgrades(&self) -> &Upgrades {
        &self.upgrades
    }
}

/// One request on its way through its tries.
struct Forwarding<'a> {
    upstream: &'a Upstream,
    /// The service's TLS client, for `https` and `h2`.
    tls: Option<Arc<TlsClient>>,
    table: Arc<ServiceTable>,
    /// The `hash` balancer's key for this request (`None` for other balancers).
    key: Option<u64>,
    /// The client's method, for the retry rules once the head has gone to an instance.
    method: Method,
    /// Method, headers and version as they go to every instance.
    head: Head,
    /// The forwarded family this hop adds to the head.
    forwarded: Forwarded,
    path: PathAndQuery,
    body: HeldBody,
    deadline: Instant,
    /// The client connection's timer, lent to each try for the deadline.
    timer: &'a TimerSlot,
    /// The client's side of an upgrade request, until an instance answers.
    upgrade: Option<OnUpgrade>,
    /// A gRPC call: never retried once sent (a `grpc-status` is an answer).
    grpc: bool,
    /// The deadline is the client's (`grpc-timeout`): missing it is no instance's failure.
    client_deadline: bool,
}

impl Forwarding<'_> {
    /// The deadline passed during a try: the client's stall if its body is still arriving.
    fn settle_timeout(&self, instance: &Instance) -> Result<Next, GatewayError> {
        if self.body.client_still_sending() {
            return Err(GatewayError::RequestBodyTimeout);
        }
        if !self.client_deadline {
            self.upstream.record_failure(&self.table, instance);
        }
        Err(GatewayError::DeadlineExceeded)
    }

    /// A try failed without an answer: the client's fault if its body broke, else the
    /// instance's (and retried when the rules allow).
    fn settle_error(&self, instance: &Instance, error: &TryError) -> Result<Next, GatewayError> {
        let upstream = self.upstream;
        if let Some(fault) = client_body_fault(error) {
            debug!(service = upstream.name(), %error, "the client's request body failed");
            return Err(fault);
        }
        upstream.record_failure(&self.table, instance);
        let failure = if error.is_connect() {
            TryFailure::BeforeSend
        } else {
            TryFailure::AfterSend
        };
        debug!(service = upstream.name(), instance = %instance.id, ?failure, %error, "try failed");
        let sent = failure != TryFailure::BeforeSend;
        if !(self.grpc && sent) && may_retry(&self.method, failure, self.body.is_replayable()) {
            Ok(Next::Retry(None))
        } else {
            Ok(Next::Stop)
        }
    }
}

/// Aims the head of one try at `instance`: its version, and its target. The HTTP/1.1 client
/// (`pooled`) takes the origin-form target, which is the client's own when the path is
/// unchanged (no rebuild), and adds `Host` if missing; hyper-util's client takes an absolute
/// one. In place: the head is 224 bytes, and each move of it is a `memcpy`.
fn aim(
    head: &mut Parts,
    path: &PathAndQuery,
    instance: &Instance,
    protocol: UpstreamProtocol,
    pooled: bool,
) -> Result<(), GatewayError> {
    head.version = match protocol {
        UpstreamProtocol::Http1 | UpstreamProtocol::Https => Version::HTTP_11,
        UpstreamProtocol::H2c | UpstreamProtocol::H2 => Version::HTTP_2,
    };
    if pooled {
        if head.uri.scheme().is_some() || head.uri.path_and_query() != Some(path) {
            head.uri = Uri::from(path.clone());
        }
        return Ok(());
    }
    let scheme = if protocol.is_tls() {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    head.uri = Uri::builder()
        .scheme(scheme)
        .authority(instance.authority.clone())
        .path_and_query(path.clone())
        .build()
        .map_err(|_| GatewayError::BadGateway)?;
    Ok(())
}

/// What a route answers itself: 403 to a client its `allow=`/`deny=` refuses, its
/// `redirect=` (with `$path` replaced by the request's path and query).
fn route_answer(
    route: &Route,
    client: IpAddr,
    request: &Request<RequestBody>,
    grpc: bool,
) -> Option<Response<ProxyBody>> {
    if route
        .access
        .as_ref()
        .is_some_and(|access| !access.admits(client))
    {
        let error = GatewayError::Forbidden;
        return Some(if grpc {
            error.into_grpc_response()
        } else {
            error.into_response()
        });
    }
    let redirect = route.redirect.as_ref()?;
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = HeaderValue::from_str(&redirect.url.replace("$path", path)).ok()?;
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::from_u16(redirect.code).unwrap_or(StatusCode::FOUND);
    response.headers_mut().insert(header::LOCATION, location);
    Some(response)
}

/// `Transfer-Encoding` naming any coding but `chunked` (hyper accepts `gzip, chunked` and
/// would silently drop the gzip): 501, as RFC 9112 §6.1 allows.
fn has_unsupported_coding(request: &Request<RequestBody>) -> bool {
    request
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .any(|coding| !coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// An instance's response, ready for the client (a 101 keeps its `Upgrade`).
fn client_response(response: Response<InstanceBody>) -> Response<ProxyBody> {
    if response.body().is_hop_free() {
        // The HTTP/1.1 client left hop-by-hop lines out as it parsed the head.
        return response.map(Either::Left);
    }
    let (mut parts, body) = response.into_parts();
    let upgrade = (parts.status == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| parts.headers.get(header::UPGRADE).cloned())
        .flatten();
    remove_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = upgrade {
        upgrade::restore_headers(&mut parts.headers, protocol);
    }
    Response::from_parts(parts, Either::Left(body))
}
