//! The clients to instances, one per way of reaching them: HTTP/1.1 and h2c over plain TCP
//! (shared by every service, for the gateway's life), and one per distinct TLS setting for
//! `https` and `h2` services, built with the routes: a reload re-reads their CA and client
//! certificate files (rotation) and starts their pools afresh.
//!
//! HTTP/1.1 instances, plain (`http1`, the common case) or over TLS (`https`), go through the
//! gateway's own HTTP/1.1 client ([`h1`](super::h1), per-worker pools); h2c and `h2`
//! instances through hyper-util's pooled client, which multiplexes streams on a connection.
//! [`Sent`], [`AnswerBody`] and [`TryError`] are the one seam between the two.

use std::collections::HashMap;
use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::http::request::Parts;
use hyper::http::uri::Authority;
use hyper::{Request, Response};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::ServerName;

use super::body::UpstreamBody;
use super::h1::body::{ResponseBody, Upgraded};
use super::h1::stream::TlsOrigin;
use super::h1::{self, H1Error, PoolSettings};
use super::headers::Forwarded;
use crate::config::{ServiceConfig, UpstreamConfig, UpstreamProtocol, UpstreamTlsConfig};
use crate::tls::client::{client_config, ClientTls};
use crate::tls::TlsError;
use crate::wire::{HeadLines, RawLines};

type PlainClient = Client<HttpConnector, UpstreamBody>;
type H2TlsClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// How one TLS setting reaches instances.
pub enum TlsClient {
    /// `https`: the HTTP/1.1 client, over connections pooled apart for these settings.
    Http1(Arc<TlsOrigin>),
    /// `h2`: hyper-util's pooled client (boxed: it is 336 bytes; the enum sits in an `Arc`).
    H2(Box<H2TlsClient>),
}
/// The TLS client of each `https`/`h2` service, by service name.
pub type TlsClients = HashMap<String, Arc<TlsClient>>;

/// The plain clients of one gateway.
pub struct Clients {
    config: UpstreamConfig,
    /// The per-worker HTTP/1.1 pool's settings (the pool itself is thread-local).
    http1: PoolSettings,
    h2c: PlainClient,
}

/// One try's answer.
pub type Answer = Response<AnswerBody>;

/// An answer's body from either client.
pub enum AnswerBody {
    /// From the HTTP/1.1 client: holds its connection until read.
    H1(ResponseBody),
    /// From hyper-util's client, which pools on its own.
    Pooled(Incoming),
}

impl AnswerBody {
    /// Whether the answer's head is known to hold no hop-by-hop line.
    pub fn is_hop_free(&self) -> bool {
        match self {
            AnswerBody::H1(body) => body.is_hop_free(),
            AnswerBody::Pooled(_) => false,
        }
    }

    /// A 101's connection, from the HTTP/1.1 client (hyper's come through `hyper::upgrade`).
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        match self {
            AnswerBody::H1(body) => body.take_upgraded(),
            AnswerBody::Pooled(_) => None,
        }
    }
}

impl HeadLines for AnswerBody {
    fn take_lines(&mut self) -> Option<RawLines> {
        match self {
            AnswerBody::H1(body) => body.take_lines(),
            AnswerBody::Pooled(_) => None,
        }
    }
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = Box<dyn Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            AnswerBody::H1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            AnswerBody::Pooled(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AnswerBody::H1(body) => body.is_end_stream(),
            AnswerBody::Pooled(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AnswerBody::H1(body) => body.size_hint(),
            AnswerBody::Pooled(body) => body.size_hint(),
        }
    }
}

/// Why a try got no answer.
#[derive(Debug, thiserror::Error)]
pub enum TryError {
    #[error(transparent)]
    H1(H1Error),
    #[error(transparent)]
    Client(hyper_util::client::legacy::Error),
}

impl TryError {
    /// Nothing reached the instance (connect refused, reset or timed out).
    pub fn is_connect(&self) -> bool {
        match self {
            TryError::H1(error) => error.is_connect(),
            TryError::Client(error) => error.is_connect(),
        }
    }
}

/// A try on its way: the HTTP/1.1 client's (one boxed future: it must be movable into a task of its
/// own when the client goes away mid-exchange, see `body::Exchange`) or hyper-util's.
pub enum Sent {
    /// `h1::send`'s own future, boxed as it is: an `async` block mapping its output would
    /// hold it twice (3,768 bytes instead of 1,880, copied into the box for every request).
    Pooled(Pin<Box<dyn Future<Output = h1::Sent> + Send>>),
    Client(ResponseFuture),
}

/// What a try came to: the answer or the failure, and the request's head when the client gave
/// it back (the HTTP/1.1 client does; hyper-util's keeps it).
pub struct Outcome {
    pub head: Option<Parts>,
    pub answer: Result<Answer, TryError>,
}

impl Future for Sent {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match self.get_mut() {
            Sent::Pooled(future) => future.as_mut().poll(cx).map(|(head, answer)| Outcome {
                head: Some(head),
                answer: answer
                    .map(|response| response.map(AnswerBody::H1))
                    .map_err(TryError::H1),
            }),
            Sent::Client(future) => Pin::new(future).poll(cx).map(|r| Outcome {
                head: None,
                answer: r
                    .map(|response| response.map(AnswerBody::Pooled))
                    .map_err(TryError::Client),
            }),
        }
    }
}

impl Clients {
    pub fn new(config: &UpstreamConfig) -> Self {
        Self {
            config: *config,
            http1: PoolSettings {
                connect_timeout: config.connect_timeout,
                idle_timeout: config.pool_idle_timeout,
                max_idle: config.pool_max_idle_per_host,
            },
            h2c: builder(config, true).build(connector(config)),
        }
    }

    /// Whether `protocol` goes through the per-worker pool, which takes origin-form targets
    /// (hyper-util's client takes absolute ones and picks its pool by them).
    pub fn is_pooled(protocol: UpstreamProtocol) -> bool {
        matches!(protocol, UpstreamProtocol::Http1 | UpstreamProtocol::Https)
    }

    /// Sends `head` and `body` with the `forwarded` lines to `instance`: over the HTTP/1.1
    /// client for HTTP/1.1 (through `tls` for `https`), hyper-util's for h2c and `h2`.
    pub fn request(
        &self,
        protocol: UpstreamProtocol,
        tls: Option<&TlsClient>,
        instance: &Authority,
        mut head: Parts,
        body: UpstreamBody,
        forwarded: Forwarded,
    ) -> Sent {
        let origin = match (protocol, tls) {
            (_, Some(TlsClient::H2(client))) => {
                forwarded.apply(&mut head.headers);
                return Sent::Client(client.request(Request::from_parts(head, body)));
            }
            (UpstreamProtocol::H2c | UpstreamProtocol::H2, None) => {
                forwarded.apply(&mut head.headers);
                return Sent::Client(self.h2c.request(Request::from_parts(head, body)));
            }
            (_, Some(TlsClient::Http1(origin))) => Some(origin.clone()),
            (_, None) => None,
        };
        let send = h1::send(self.http1, instance.clone(), origin, head, body, forwarded);
        Sent::Pooled(Box::pin(send))
    }

    /// A TLS client for each `https`/`h2` service of `services`, by service name; services
    /// with the same settings share one.
    pub fn tls_clients(&self, services: &[ServiceConfig]) -> Result<TlsClients, TlsError> {
        let mut built: HashMap<(UpstreamProtocol, &UpstreamTlsConfig), Arc<TlsClient>> =
            HashMap::new();
        let mut clients = HashMap::new();
        for (i, service) in services.iter().enumerate() {
            let Some(settings) = &service.tls else {
                continue;
            };
            let id = (service.protocol, settings);
            let client = match built.get(&id) {
                Some(client) => client.clone(),
                None => {
                    let key = format!("services[{i}].tls");
                    let client = build_tls_client(&self.config, &key, service.protocol, settings)?;
                    built.entry(id).or_insert(Arc::new(client)).clone()
                }
            };
            clients.insert(service.name.clone(), client);
        }
        Ok(clients)
    }
}

fn connector(config: &UpstreamConfig) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.enforce_http(false);
    connector
}

/// A pooled client's settings: HTTP/1.1, or HTTP/2 only (`http2`).
fn builder(config: &UpstreamConfig, http2: bool) -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        .http2_only(http2);
    builder
}

/// The settings as the TLS module takes them.
pub fn client_tls(key: &str, settings: &UpstreamTlsConfig) -> ClientTls {
    ClientTls {
        key: key.to_owned(),
        ca_file: settings.ca_file.clone(),
        identity: settings.cert_file.clone().zip(settings.key_file.clone()),
        insecure_skip_verify: settings.insecure_skip_verify,
        server_name: settings.server_name.clone(),
    }
}

/// The name a service's instances are verified for, when not the address dialled.
fn server_name(settings: &UpstreamTlsConfig) -> Option<ServerName<'static>> {
    let name = settings.server_name.as_deref()?;
    ServerName::try_from(name).ok().map(|name| name.to_owned())
}

fn build_tls_client(
    config: &UpstreamConfig,
    key: &str,
    protocol: UpstreamProtocol,
    settings: &UpstreamTlsConfig,
) -> Result<TlsClient, TlsError> {
    if protocol != UpstreamProtocol::H2 {
        let tls = client_config(&client_tls(key, settings), &[b"http/1.1"])?;
        return Ok(TlsClient::Http1(TlsOrigin::new(tls, server_name(settings))));
    }
    // hyper-rustls sets ALPN itself (`enable_http2`).
    let tls = client_config(&client_tls(key, settings), &[])?;
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let builder = match server_name(settings) {
        Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
        None => {
            builder.with_server_name_resolver(hyper_rustls::DefaultServerNameResolver::default())
        }
    };
    let connector = builder.enable_http2().wrap_connector(connector(config));
    Ok(TlsClient::H2(Box::new(
        self::builder(config, true).build(connector),
    )))
}
