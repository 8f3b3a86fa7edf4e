//! The gateway: maps each client request to a service, picks an instance from that service's
//! current table, forwards over one pooled HTTP client, and retries on another instance when
//! that is safe.
//!
//! What it owns: the router (built from config, swapped whole on reload, read without locks), header hygiene
//! (hop-by-hop removal, `X-Forwarded-*`), the retry rules, and the gateway's own answers
//! (404/503/502/504/400, each with an `x-switchyard-error` header naming the cause).
//! It reads upstream tables and never writes them; it does not know about Consul. When the
//! access log is on, it hands each answered request to it (a channel send, never a write).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use crate::access_log::{AccessLog, Entry};
use crate::config::{Config, UpstreamConfig};
use crate::metrics::RequestMetrics;
use crate::server::ClientConnection;
use crate::upstream::{Tried, Upstream, Upstreams};

/// Body of a response to the client: streamed from an instance, or made by the gateway.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;
/// Body of a request to an instance: buffered (replayable) or streamed from the client.
type UpstreamBody = Either<Full<Bytes>, Limited<Incoming>>;

/// The header on every answer the gateway makes itself, naming the cause.
pub const ERROR_HEADER: &str = "x-switchyard-error";

// ---------------------------------------------------------------------------------------------
// The gateway's own answers.

/// Why the gateway answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("the service has no healthy instance")]
    NoHealthyInstance,
    #[error("no instance could be reached")]
    BadGateway,
    #[error("the deadline for this request passed")]
    DeadlineExceeded,
    #[error("the request body could not be read")]
    BadRequestBody,
    #[error("the request body is larger than this gateway accepts")]
    PayloadTooLarge,
    #[error("the request has no usable Host to redirect to")]
    BadRequestHost,
}

impl GatewayError {
    /// The value of the `x-switchyard-error` header.
    pub fn cause(self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no-route",
            GatewayError::NoHealthyInstance => "no-healthy-instance",
            GatewayError::BadGateway => "upstream-unreachable",
            GatewayError::DeadlineExceeded => "deadline-exceeded",
            GatewayError::BadRequestBody => "bad-request-body",
            GatewayError::PayloadTooLarge => "body-too-large",
            GatewayError::BadRequestHost => "bad-host",
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let body = format!("switchyard: {self}\n");
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
        *response.status_mut() = StatusCode::from(self);
        let headers = response.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.cause()));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl From<GatewayError> for StatusCode {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::NoHealthyInstance => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::BadGateway => StatusCode::BAD_GATEWAY,
            GatewayError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::BadRequestBody => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BadRequestHost => StatusCode::BAD_REQUEST,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Header hygiene.

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard ones proxies are known to leak. Never forwarded in either direction.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers: the static list, `Upgrade`, and every header that
/// `Connection` names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Collect first: `Connection` must be read before it is removed.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The request's host without port, from `Host` (HTTP/1) or the URI authority (HTTP/2).
fn request_host(request: &Request<Incoming>) -> Option<&str> {
    let raw = match request.headers().get(header::HOST) {
        Some(value) => value.to_str().ok()?,
        None => request.uri().authority()?.as_str(),
    };
    Some(strip_port(raw))
}

pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port; a client may send a '[' without its ']'.
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Prepares the client's headers for an instance: hop-by-hop removed, the client's Host
/// kept, and `X-Forwarded-For` (appended), `-Proto` (`https` when `secure`) and `-Host` (set
/// by this hop).
fn forward_headers(parts: &mut Parts, client: SocketAddr, secure: bool) {
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    remove_hop_by_hop(&mut parts.headers);
    // Built in a stack buffer: `format!` here would cost two allocations per request.
    let mut buffer = [0u8; 512];
    let mut cursor = std::io::Cursor::new(&mut buffer[..]);
    let previous = parts.headers.get(&X_FORWARDED_FOR);
    let written = match previous {
        Some(previous) => cursor
            .write_all(previous.as_bytes())
            .and_then(|()| write!(cursor, ", {}", client.ip())),
        None => write!(cursor, "{}", client.ip()),
    };
    let value = match written {
        Ok(()) => {
            let length = usize::try_from(cursor.position()).unwrap_or(0);
            HeaderValue::from_bytes(&buffer[..length]).ok()
        }
        // A chain longer than the buffer: rare enough to allocate for.
        Err(_) => previous
            .and_then(|p| p.to_str().ok())
            .and_then(|p| HeaderValue::from_str(&format!("{p}, {}", client.ip())).ok()),
    };
    if let Some(value) = value {
        parts.headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    let proto = if secure { "https" } else { "http" };
    parts
        .headers
        .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if let Some(host) = original_host {
        parts.headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        // HTTP/2 clients send no Host header; an HTTP/1.1 instance needs one.
        parts.headers.entry(header::HOST).or_insert(host);
    }
}

/// `tls.redirect_http`: the answer to every plain request, a 308 to
/// `https://<host>[:<https_port> unless 443]<path?query>`. A request without a usable Host
/// gets 400 (there is nowhere to send it).
pub fn https_redirect<B>(request: &Request<B>, https_port: u16) -> Response<ProxyBody> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .map(strip_port)
        .filter(|host| is_plain_host(host));
    let Some(host) = host else {
        return GatewayError::BadRequestHost.into_response();
    };
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let location = if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    };
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// A host name or address, nothing that could change where a redirect leads (`@`, `/`, ...).
fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        })
}

// ---------------------------------------------------------------------------------------------
// Routing.

/// One route: requests for `host` (any host if `None`) whose path starts with `prefix`.
pub struct Route {
    /// The service's name, shared with access log entries without copying.
    service: Arc<str>,
    host: Option<String>,
    prefix: String,
    strip_prefix: bool,
    pub upstream: Arc<Upstream>,
}

/// Routes built once from config into a byte trie of path prefixes, so a lookup costs one
/// walk along the request path however many routes there are (a linear scan over 1,000
/// prefixes measured 1.2 µs).
pub struct Router {
    routes: Vec<Route>,
    nodes: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    /// Sorted by byte.
    children: Vec<(u8, usize)>,
    /// Routes whose prefix ends here: host-specific ones first.
    routes: Vec<usize>,
}

impl Router {
    pub fn new(upstreams: &Upstreams) -> Self {
        let mut routes: Vec<Route> = upstreams
            .iter()
            .map(|upstream| {
                let route = &upstream.config.route;
                Route {
                    service: Arc::from(upstream.name()),
                    host: route.host.clone(),
                    prefix: route.path_prefix.clone(),
                    strip_prefix: route.strip_prefix,
                    upstream: upstream.clone(),
                }
            })
            .collect();
        // At the same prefix a host-specific route beats a catch-all.
        routes.sort_by_key(|route| route.host.is_none());
        let mut nodes = vec![TrieNode::default()];
        for (index, route) in routes.iter().enumerate() {
            let mut node = 0;
            for &byte in route.prefix.as_bytes() {
                node = match nodes[node]
                    .children
                    .binary_search_by_key(&byte, |&(b, _)| b)
                {
                    Ok(i) => nodes[node].children[i].1,
                    Err(i) => {
                        nodes.push(TrieNode::default());
                        let child = nodes.len() - 1;
                        nodes[node].children.insert(i, (byte, child));
                        child
                    }
                };
            }
            nodes[node].routes.push(index);
        }
        Self { routes, nodes }
    }

    /// The best route for `host` and `path`: the longest matching prefix, and at that prefix
    /// a route for this host before one for any host.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let mut best = self.matching(0, host);
        let mut node = 0;
        for &byte in path.as_bytes() {
            let children = &self.nodes[node].children;
            match children.binary_search_by_key(&byte, |&(b, _)| b) {
                Ok(i) => node = children[i].1,
                Err(_) => break,
            }
            if let Some(route) = self.matching(node, host) {
                best = Some(route);
            }
        }
        best
    }

    fn matching(&self, node: usize, host: Option<&str>) -> Option<&Route> {
        self.nodes[node]
            .routes
            .iter()
            .map(|&i| &self.routes[i])
            .find(|route| {
                route
                    .host
                    .as_deref()
                    .is_none_or(|want| host.is_some_and(|h| h.eq_ignore_ascii_case(want)))
            })
    }
}

impl Route {
    /// The path and query to send to the instance.
    pub fn upstream_path(&self, uri: &Uri) -> PathAndQuery {
        let original = uri.path_and_query().map_or("/", |pq| pq.as_str());
        if !self.strip_prefix || self.prefix == "/" {
            return uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
        }
        let rest = &original[self.prefix.len().min(original.len())..];
        let rebuilt = if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        };
        rebuilt
            .parse()
            .unwrap_or_else(|_| PathAndQuery::from_static("/"))
    }
}

// ---------------------------------------------------------------------------------------------
// Retry rules.

/// How a try failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    /// Nothing reached the instance (connection refused, reset or timed out while connecting).
    BeforeSend,
    /// The request may have reached the instance (connection lost after sending).
    AfterSend,
    /// The instance answered 502, 503 or 504.
    BadGatewayStatus,
}

/// Methods that may be sent twice without changing the outcome (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a try that failed this way may be tried again on another instance.
/// `replayable`: the request body can be sent again (empty or buffered).
pub fn may_retry(method: &Method, failure: TryFailure, replayable: bool) -> bool {
    replayable
        && match failure {
            TryFailure::BeforeSend => true,
            TryFailure::AfterSend | TryFailure::BadGatewayStatus => is_idempotent(method),
        }
}

fn is_bad_gateway_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// A request body as the gateway holds it between tries.
enum HeldBody {
    /// Empty or buffered: can be sent any number of times.
    Replayable(Bytes),
    /// Streamed from the client (cut at `server.max_body_bytes`): can be sent once.
    Streaming(Option<Limited<Incoming>>),
}

impl HeldBody {
    fn is_replayable(&self) -> bool {
        matches!(self, HeldBody::Replayable(_))
    }

    /// The body for the next try, or `None` if a streamed body was already sent.
    fn take(&mut self) -> Option<UpstreamBody> {
        match self {
            HeldBody::Replayable(bytes) => Some(Either::Left(Full::new(bytes.clone()))),
            HeldBody::Streaming(body) => body.take().map(Either::Right),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forwarding.

/// The pooled HTTP/1.1 client used for every instance.
fn build_client(config: &UpstreamConfig) -> Client<HttpConnector, UpstreamBody> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        .build(connector)
}

/// The gateway's request handler and its shared, read-only state.
pub struct Gateway {
    /// Swapped whole on a config reload; requests in flight keep the one they started with.
    router: ArcSwap<Router>,
    client: Client<HttpConnector, UpstreamBody>,
    max_replay_body_bytes: usize,
    max_body_bytes: u64,
    unrouted: RequestMetrics,
    access_log: Option<AccessLog>,
    /// `tls.redirect_http`: plain requests get a 308 to this HTTPS port instead of a route.
    redirect_https: Option<u16>,
}

/// What the tries of one request came to, for the access log.
#[derive(Debug, Default)]
struct Tries {
    count: u32,
    /// The instance of the last try; recorded only when the access log is on.
    last: Option<Authority>,
}

impl Gateway {
    pub fn new(
        config: &Config,
        upstreams: &Upstreams,
        unrouted: RequestMetrics,
        access_log: Option<AccessLog>,
    ) -> Self {
        Self {
            router: ArcSwap::from_pointee(Router::new(upstreams)),
            client: build_client(&config.upstream),
            max_replay_body_bytes: config.upstream.max_replay_body_bytes,
            max_body_bytes: config.server.max_body_bytes,
            unrouted,
            access_log,
            redirect_https: config
                .tls
                .as_ref()
                .filter(|tls| tls.redirect_http)
                .map(|tls| tls.listen.port()),
        }
    }

    /// Routes new requests over `upstreams` (a reloaded config).
    pub fn replace_routes(&self, upstreams: &Upstreams) {
        self.router.store(Arc::new(Router::new(upstreams)));
    }

    /// Answers one client request. Never fails: errors become the gateway's own answers.
    pub async fn handle(
        &self,
        connection: Arc<ClientConnection>,
        request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let client = connection.peer;
        // What the access log needs from the request, taken before `forward` consumes it,
        // and only when the log is on.
        let entry = self.access_log.as_ref().map(|_| Entry {
            time: SystemTime::now(),
            client: client.ip(),
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            service: None,
            instance: None,
            status: 0,
            duration: Duration::ZERO,
            tries: 0,
        });
        if let Some(port) = self.redirect_https.filter(|_| !connection.secure) {
            let response = https_redirect(&request, port);
            return self.answer_unrouted(entry, response, started);
        }
        let router = self.router.load_full();
        let Some(route) = router.find(request_host(&request), request.uri().path()) else {
            let response = GatewayError::NoRoute.into_response();
            return self.answer_unrouted(entry, response, started);
        };
        let mut tries = Tries::default();
        let forwarded = self.forward(route, (client, connection.secure), request, &mut tries);
        let response = match forwarded.await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        };
        let elapsed = started.elapsed();
        route
            .upstream
            .metrics
            .requests
            .observe_request(response.status().as_u16(), elapsed);
        self.log(entry, Some(route), tries, &response, elapsed);
        response
    }

    /// Counts and logs an answer that went to no service (no route, redirect).
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

    async fn forward(
        &self,
        route: &Route,
        (client, secure): (SocketAddr, bool),
        request: Request<Incoming>,
        tries: &mut Tries,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let upstream = &route.upstream;
        let table = upstream.table();
        if table.is_empty() {
            return Err(GatewayError::NoHealthyInstance);
        }
        upstream.deposit_retry_budget();
        let retry = upstream.config.retry;
        let deadline = Instant::now() + retry.timeout;
        let (mut parts, body) = request.into_parts();
        let mut body = self.hold_body(&parts, body, deadline).await?;
        let path = route.upstream_path(&parts.uri);
        forward_headers(&mut parts, client, secure);

        let mut tried = Tried::default();
        let mut last_response = None;
        for attempt in 0..retry.attempts {
            // A retry must fit in the budget; the first try always goes.
            if attempt > 0 && !upstream.try_take_retry() {
                break;
            }
            let Some(request_body) = body.take() else {
                break;
            };
            let Some((index, instance)) = table.pick(&tried) else {
                break;
            };
            tried.insert(index);
            tries.count += 1;
            if self.access_log.is_some() {
                tries.last = Some(instance.authority.clone());
            }
            if attempt > 0 {
                upstream.metrics.inc_retries();
            }
            let uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(instance.authority.clone())
                .path_and_query(path.clone())
                .build()
                .map_err(|_| GatewayError::BadGateway)?;
            let mut outgoing = Request::new(request_body);
            *outgoing.method_mut() = parts.method.clone();
            *outgoing.uri_mut() = uri;
            *outgoing.version_mut() = Version::HTTP_11;
            *outgoing.headers_mut() = parts.headers.clone();

            let is_last = attempt + 1 == retry.attempts;
            let outcome = tokio::time::timeout_at(deadline, self.client.request(outgoing)).await;
            match outcome {
                Err(_) => {
                    upstream.record_failure(&table, instance);
                    return Err(GatewayError::DeadlineExceeded);
                }
                Ok(Ok(response)) => {
                    let status = response.status();
                    if status.is_server_error() {
                        upstream.record_failure(&table, instance);
                    } else {
                        upstream.record_success(instance);
                    }
                    if !is_bad_gateway_status(status)
                        || is_last
                        || !may_retry(
                            &parts.method,
                            TryFailure::BadGatewayStatus,
                            body.is_replayable(),
                        )
                    {
                        return Ok(client_response(response));
                    }
                    debug!(service = upstream.name(), instance = %instance.id, %status, "retrying after bad gateway status");
                    last_response = Some(response);
                }
                Ok(Err(error)) => {
                    if exceeded_body_limit(&error) {
                        return Err(GatewayError::PayloadTooLarge);
                    }
                    upstream.record_failure(&table, instance);
                    let failure = if error.is_connect() {
                        TryFailure::BeforeSend
                    } else {
                        TryFailure::AfterSend
                    };
                    debug!(service = upstream.name(), instance = %instance.id, ?failure, %error, "try failed");
                    if !may_retry(&parts.method, failure, body.is_replayable()) {
                        break;
                    }
                }
            }
        }
        match last_response {
            Some(response) => Ok(client_response(response)),
            None => Err(GatewayError::BadGateway),
        }
    }

    /// Buffers a body small enough to replay (by its Content-Length); streams the rest.
    async fn hold_body(
        &self,
        parts: &Parts,
        body: Incoming,
        deadline: Instant,
    ) -> Result<HeldBody, GatewayError> {
        if body.is_end_stream() {
            return Ok(HeldBody::Replayable(Bytes::new()));
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes) {
            return Err(GatewayError::PayloadTooLarge);
        }
        match declared {
            Some(length) if length <= self.max_replay_body_bytes as u64 => {
                let collected = tokio::time::timeout_at(
                    deadline,
                    Limited::new(body, self.max_replay_body_bytes).collect(),
                )
                .await
                .map_err(|_| GatewayError::DeadlineExceeded)?
                .map_err(|_| GatewayError::BadRequestBody)?;
                Ok(HeldBody::Replayable(collected.to_bytes()))
            }
            _ => Ok(HeldBody::Streaming(Some(Limited::new(
                body,
                usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            )))),
        }
    }
}

/// Whether a try failed because the client's streamed body passed `server.max_body_bytes`.
fn exceeded_body_limit(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// An instance's response, ready for the client.
fn client_response(response: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_rules_per_method_and_failure() {
        let idempotent = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ];
        let unsafe_methods = [Method::POST, Method::PATCH, Method::CONNECT];
        for method in &idempotent {
            assert!(may_retry(method, TryFailure::BeforeSend, true));
            assert!(may_retry(method, TryFailure::AfterSend, true));
            assert!(may_retry(method, TryFailure::BadGatewayStatus, true));
            // A streamed body cannot be sent twice, whatever the method.
            assert!(!may_retry(method, TryFailure::BeforeSend, false));
        }
        for method in &unsafe_methods {
            assert!(
                may_retry(method, TryFailure::BeforeSend, true),
                "{method}: nothing was sent"
            );
            assert!(!may_retry(method, TryFailure::AfterSend, true), "{method}");
            assert!(
                !may_retry(method, TryFailure::BadGatewayStatus, true),
                "{method}"
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        headers.insert("x-end-to-end", HeaderValue::from_static("kept"));
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        remove_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(headers.contains_key("x-end-to-end") && headers.contains_key(header::HOST));
    }

    #[test]
    fn gateway_answers_carry_status_and_cause() {
        for (error, status) in [
            (GatewayError::NoRoute, 404),
            (GatewayError::NoHealthyInstance, 503),
            (GatewayError::BadGateway, 502),
            (GatewayError::DeadlineExceeded, 504),
            (GatewayError::BadRequestBody, 400),
            (GatewayError::PayloadTooLarge, 413),
        ] {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()[ERROR_HEADER], error.cause());
        }
    }

    fn build_router(yaml: &str) -> Router {
        let config = crate::config::Config::from_yaml(yaml, &Default::default()).unwrap();
        let metrics = crate::metrics::Metrics::new().unwrap();
        Router::new(&Upstreams::new(&config.services, &metrics))
    }

    #[test]
    fn longest_prefix_then_host_wins() {
        let router = build_router(
            "services:
  - {name: root, route: {path_prefix: /}}
  - {name: api, route: {path_prefix: /api}}
  - {name: api-v2, route: {path_prefix: /api/v2}}
  - {name: api-example, route: {path_prefix: /api, host: Example.com}}
",
        );
        let name = |host: Option<&str>, path: &str| {
            router
                .find(host, path)
                .map(|r| r.upstream.name().to_owned())
        };
        assert_eq!(name(None, "/api/v2/x").as_deref(), Some("api-v2"));
        assert_eq!(
            name(Some("example.com"), "/api/x").as_deref(),
            Some("api-example")
        );
        assert_eq!(
            name(Some("EXAMPLE.COM"), "/api").as_deref(),
            Some("api-example")
        );
        assert_eq!(name(Some("other.org"), "/api/x").as_deref(), Some("api"));
        assert_eq!(
            name(Some("example.com"), "/api/v2/x").as_deref(),
            Some("api-v2")
        );
        assert_eq!(
            name(None, "/apix").as_deref(),
            Some("api"),
            "plain string prefixes"
        );
        assert_eq!(name(None, "/other").as_deref(), Some("root"));
        assert_eq!(name(None, "").as_deref(), None);
        let hostonly =
            build_router("services:\n  - {name: a, route: {path_prefix: /a, host: h.io}}\n");
        assert!(hostonly.find(Some("x.io"), "/a").is_none());
        assert!(hostonly.find(None, "/a").is_none());
    }

    #[test]
    fn forwarded_for_is_set_or_appended() {
        let client: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let (mut parts, ()) = Request::builder()
            .uri("/x")
            .header("host", "gw.example")
            .body(())
            .unwrap()
            .into_parts();
        forward_headers(&mut parts, client, false);
        assert_eq!(parts.headers[&X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(parts.headers[&X_FORWARDED_HOST], "gw.example");
        assert_eq!(parts.headers[&X_FORWARDED_PROTO], "http");
        let (mut parts, ()) = Request::builder()
            .uri("/x")
            .header("x-forwarded-for", "192.0.2.1, 198.51.100.7")
            .body(())
            .unwrap()
            .into_parts();
        forward_headers(&mut parts, "[2001:db8::1]:80".parse().unwrap(), true);
        assert_eq!(parts.headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(
            parts.headers[&X_FORWARDED_FOR],
            "192.0.2.1, 198.51.100.7, 2001:db8::1"
        );
        let long = vec!["203.0.113.9"; 60].join(", ");
        let (mut parts, ()) = Request::builder()
            .uri("/x")
            .header("x-forwarded-for", long.as_str())
            .body(())
            .unwrap()
            .into_parts();
        forward_headers(&mut parts, client, false);
        assert_eq!(
            parts.headers[&X_FORWARDED_FOR].to_str().unwrap(),
            format!("{long}, 10.1.2.3")
        );
    }

    #[test]
    fn https_redirect_keeps_host_path_and_query() {
        let location = |host: &str, target: &str, port: u16| {
            let request = Request::builder()
                .uri(target)
                .header("host", host)
                .body(())
                .unwrap();
            let response = https_redirect(&request, port);
            let location = response.headers().get(header::LOCATION).cloned();
            (
                response.status().as_u16(),
                location.map(|l| l.to_str().unwrap().to_owned()),
            )
        };
        assert_eq!(
            location("gw.example:8080", "/a/b?x=1&y", 8443),
            (308, Some("https://gw.example:8443/a/b?x=1&y".into()))
        );
        assert_eq!(
            location("gw.example", "/", 443),
            (308, Some("https://gw.example/".into()))
        );
        assert_eq!(
            location("[::1]:80", "/v6", 8443),
            (308, Some("https://[::1]:8443/v6".into()))
        );
        assert_eq!(location("evil.example/x@", "/", 443).0, 400);
        assert_eq!(location("", "/", 443).0, 400);
    }

    #[test]
    fn strip_port_handles_names_and_ipv6() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(
            strip_port("[u0k."),
            "[u0k.",
            "found by tests/fuzz.rs: once a panic"
        );
    }
}
