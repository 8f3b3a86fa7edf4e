//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process is up),
//! `/readyz` (every service has had a successful discovery answer), `/routes` (JSON: each
//! service, its source, its routes with their origin (file, tag, KV), balancer, instances,
//! discovery index, sync age and request totals, plus the route tags and commands skipped,
//! and why) and
//! `/`, a status page for people (`status.html`: one self-contained file that polls `/routes`
//! and `/metrics` and computes rates and p99 in the browser, so the gateway keeps no history).
//!
//! It binds to 127.0.0.1 unless configured otherwise: `/routes` shows internal addresses.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::metrics::Metrics;
use crate::routes::{DynamicRoutes, Origin};
use crate::upstream::{Upstream, Upstreams};

/// The status page, compiled into the binary: the admin listener serves no files.
const STATUS_PAGE: &str = include_str!("status.html");

/// The page's own inline script and style may run; nothing may be loaded from elsewhere, and
/// it may fetch only from this listener. A leaked or injected reference cannot phone out.
const STATUS_PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// What the admin handlers read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Swapped on a config reload.
    pub upstreams: arc_swap::ArcSwap<Upstreams>,
    /// Routes from tags and KV; swapped when they change.
    pub dynamic: arc_swap::ArcSwap<DynamicRoutes>,
    /// `/readyz` fails once a service's discovery (any source) has failed for this long.
    pub stale_after: Duration,
}

impl Admin {
    pub fn handle<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        }
        match request.uri().path() {
            "/" => {
                let mut response =
                    with_type(StatusCode::OK, STATUS_PAGE, "text/html; charset=utf-8");
                response.headers_mut().insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(STATUS_PAGE_CSP),
                );
                response
            }
            "/metrics" => match self.refresh_and_encode() {
                Ok(body) => with_type(
                    StatusCode::OK,
                    body,
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                Err(error) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding failed: {error}\n"),
                ),
            },
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readiness(),
            "/routes" => {
                let body = serde_json::to_vec_pretty(&self.routes()).unwrap_or_default();
                with_type(StatusCode::OK, body, "application/json")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "admin endpoints: / /metrics /healthz /readyz /routes\n",
            ),
        }
    }

    /// Ready when every routed service (the file's and those found by tags) has had an answer
    /// from its source and none has been failing for longer than `stale_after`
    /// (`consul.stale_after`, for every source). A stale gateway still serves its tables;
    /// readiness tells a load balancer in front to prefer a replica that sees its registries.
    fn readiness(&self) -> Response<Full<Bytes>> {
        let mut problems = Vec::new();
        let upstreams = self.upstreams.load();
        let dynamic = self.dynamic.load();
        let found = dynamic
            .routes
            .iter()
            .flat_map(|r| r.targets.iter().map(|t| &t.upstream));
        let mut seen = std::collections::HashSet::new();
        for upstream in upstreams.iter().chain(found) {
            if !seen.insert(Arc::as_ptr(upstream)) {
                continue;
            }
            if !upstream.sync.is_synced() {
                problems.push(format!(
                    "{}: no {} answer yet",
                    upstream.name(),
                    upstream.config.source.name()
                ));
            } else if upstream.sync.is_stale(self.stale_after) {
                let age = upstream.sync.failing_for().unwrap_or_default();
                problems.push(format!(
                    "{}: {} failing for {:.0}s (limit {:.0}s)",
                    upstream.name(),
                    upstream.config.source.name(),
                    age.as_secs_f64(),
                    self.stale_after.as_secs_f64()
                ));
            }
        }
        if problems.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready\n{}\n", problems.join("\n")),
            )
        }
    }

    fn refresh_and_encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        let dynamic = self.dynamic.load();
        let found = dynamic
            .routes
            .iter()
            .flat_map(|r| r.targets.iter().map(|t| &t.upstream));
        for upstream in self.upstreams.load().iter().chain(found) {
            upstream.metrics.refresh(
                upstream.sync.failing_for(),
                upstream.table().ejected_count(),
            );
        }
        self.metrics.encode()
    }

    /// Every routed service (the file's, then those found by tags), each with its routes.
    fn routes(&self) -> serde_json::Value {
        let upstreams = self.upstreams.load();
        let dynamic = self.dynamic.load();
        let mut services: Vec<(Arc<Upstream>, Vec<serde_json::Value>)> = upstreams
            .iter()
            .map(|u| {
                let route = &u.config.route;
                let file = json!({
                    "host": route.host, "path_prefix": route.path_prefix,
                    "strip": route.strip_prefix.then_some(&route.path_prefix),
                    "origin": Origin::File,
                });
                (u.clone(), vec![file])
            })
            .collect();
        for route in &dynamic.routes {
            for target in &route.targets {
                let options = &target.options;
                let entry = json!({
                    "host": route.source.host, "path_prefix": route.source.path,
                    "strip": options.strip, "prepend": options.prepend,
                    "weight": options.weight, "redirect": options.redirect.as_ref().map(|r| format!("{} {}", r.code, r.url)),
                    "access": options.access.as_ref().map(|a| json!({"allow": a.allow, "nets": a.nets.iter().map(|n| n.to_string()).collect::<Vec<_>>()})),
                    "origin": target.origin,
                });
                match services
                    .iter_mut()
                    .find(|(u, _)| Arc::ptr_eq(u, &target.upstream))
                {
                    Some((_, routes)) => routes.push(entry),
                    None => services.push((target.upstream.clone(), vec![entry])),
                }
            }
        }
        let services: Vec<_> = services
            .iter()
            .map(|(upstream, routes)| {
                service_json(upstream, routes, upstreams.get(upstream.name()).is_some())
            })
            .collect();
        json!({ "services": services, "skipped": dynamic.skipped })
    }
}

/// One service for `/routes`: `route` is the file's (absent for a service found by tags).
fn service_json(
    upstream: &Upstream,
    routes: &[serde_json::Value],
    in_file: bool,
) -> serde_json::Value {
    let config = &upstream.config;
    let table = upstream.table();
    let instances: Vec<_> = table
        .instances()
        .iter()
        .map(|i| {
            json!({
                "id": i.id,
                "address": i.address,
                "port": i.port,
                "tags": i.tags,
                "meta": i.meta,
                "weight": i.weight,
                "ejected_for_seconds": i.health.ejected_for().map(|d| d.as_secs_f64()),
            })
        })
        .collect();
    let sync = &upstream.sync;
    json!({
        "service": config.name,
        "route": in_file.then(|| json!({
            "host": config.route.host,
            "path_prefix": config.route.path_prefix,
            "strip_prefix": config.route.strip_prefix,
        })),
        "routes": routes,
        "source": config.source.name(),
        "balance": config.balance.as_str(),
        "hash_on": config.hash_on,
        "split": config.split,
        "protocol": config.protocol.as_str(),
        "tls_insecure_skip_verify": config.tls.as_ref().map(|t| t.insecure_skip_verify),
        "tags": config.tags,
        "retry": {
            "attempts": config.retry.attempts,
            "timeout_seconds": config.retry.timeout.as_secs_f64(),
        },
        "instances": instances,
        "consul_index": sync.index(),
        "synced": sync.is_synced(),
        "consul_failing_seconds": sync.failing_for().map(|d| d.as_secs_f64()),
        "last_sync_age_seconds": sync.sync_age().map(|age| age.as_secs_f64()),
        // Cumulative, like the Prometheus counters: a reader computes rates
        // from two answers.
        "requests_total": upstream.metrics.requests.total(),
        "errors_5xx_total": upstream.metrics.requests.errors_5xx(),
    })
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
