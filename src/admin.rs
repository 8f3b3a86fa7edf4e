//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process is up),
//! `/readyz` (every service has had a successful discovery answer), `/routes` (JSON: each
//! service, its route, balancer, instances, discovery index, sync age and request totals) and
//! `/`, a status page for people (`status.html`: one self-contained file that polls `/routes`
//! and `/metrics` and computes rates and p99 in the browser, so the gateway keeps no history).
//!
//! It binds to 127.0.0.1 unless configured otherwise: `/routes` shows internal addresses.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::metrics::Metrics;
use crate::upstream::Upstreams;

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
    /// `/readyz` fails once a service's Consul queries have failed for this long.
    pub stale_after: Duration,
}

impl Admin {
    pub fn handle(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
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

    /// Ready when every service has had a Consul answer and none has been failing for longer
    /// than `stale_after`. A stale gateway still serves its tables; readiness tells a load
    /// balancer in front to prefer a replica that sees Consul.
    fn readiness(&self) -> Response<Full<Bytes>> {
        let mut problems = Vec::new();
        for upstream in self.upstreams.load().iter() {
            if !upstream.sync.is_synced() {
                problems.push(format!("{}: no Consul answer yet", upstream.name()));
            } else if upstream.sync.is_stale(self.stale_after) {
                let age = upstream.sync.failing_for().unwrap_or_default();
                problems.push(format!(
                    "{}: Consul failing for {:.0}s (limit {:.0}s)",
                    upstream.name(),
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
        for upstream in self.upstreams.load().iter() {
            upstream.metrics.refresh(
                upstream.sync.failing_for(),
                upstream.table().ejected_count(),
            );
        }
        self.metrics.encode()
    }

    fn routes(&self) -> serde_json::Value {
        let upstreams = self.upstreams.load();
        let services: Vec<_> = upstreams
            .iter()
            .map(|upstream| {
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
                            "ejected_for_seconds": i.health.ejected_for().map(|d| d.as_secs_f64()),
                        })
                    })
                    .collect();
                json!({
                    "service": config.name,
                    "route": {
                        "host": config.route.host,
                        "path_prefix": config.route.path_prefix,
                        "strip_prefix": config.route.strip_prefix,
                    },
                    "balance": config.balance.as_str(),
                    "protocol": config.protocol.as_str(),
                    "tags": config.tags,
                    "retry": {
                        "attempts": config.retry.attempts,
                        "timeout_seconds": config.retry.timeout.as_secs_f64(),
                    },
                    "instances": instances,
                    "consul_index": upstream.sync.index(),
                    "synced": upstream.sync.is_synced(),
                    "consul_failing_seconds": upstream.sync.failing_for().map(|d| d.as_secs_f64()),
                    "last_sync_age_seconds": upstream.sync.sync_age().map(|age| age.as_secs_f64()),
                    // Cumulative, like the Prometheus counters: a reader computes rates
                    // from two answers.
                    "requests_total": upstream.metrics.requests.total(),
                    "errors_5xx_total": upstream.metrics.requests.errors_5xx(),
                })
            })
            .collect();
        json!({ "services": services })
    }
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
