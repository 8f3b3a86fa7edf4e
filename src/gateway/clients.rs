//! The pooled clients to instances, one per way of reaching them: HTTP/1.1 and h2c over plain
//! TCP (shared by every service, for the gateway's life), and one per distinct TLS setting for
//! `https` and `h2` services, built with the routes: a reload re-reads their CA and client
//! certificate files (rotation) and starts their pools afresh.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::ServerName;

use super::body::UpstreamBody;
use crate::config::{ServiceConfig, UpstreamConfig, UpstreamProtocol, UpstreamTlsConfig};
use crate::tls::client::{client_config, ClientTls};
use crate::tls::TlsError;

type PlainClient = Client<HttpConnector, UpstreamBody>;
/// A client to TLS instances.
pub type TlsClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;
/// The TLS client of each `https`/`h2` service, by service name.
pub type TlsClients = HashMap<String, Arc<TlsClient>>;

/// The plain clients of one gateway.
pub struct Clients {
    config: UpstreamConfig,
    http1: PlainClient,
    h2c: PlainClient,
}

impl Clients {
    pub fn new(config: &UpstreamConfig) -> Self {
        Self {
            config: *config,
            http1: builder(config, false).build(connector(config)),
            h2c: builder(config, true).build(connector(config)),
        }
    }

    /// Sends `request` over the plain client of `protocol`, or over `tls` for TLS services.
    pub fn request(
        &self,
        protocol: UpstreamProtocol,
        tls: Option<&TlsClient>,
        request: Request<UpstreamBody>,
    ) -> ResponseFuture {
        match (protocol, tls) {
            (_, Some(tls)) => tls.request(request),
            (UpstreamProtocol::H2c | UpstreamProtocol::H2, None) => self.h2c.request(request),
            _ => self.http1.request(request),
        }
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

fn build_tls_client(
    config: &UpstreamConfig,
    key: &str,
    protocol: UpstreamProtocol,
    settings: &UpstreamTlsConfig,
) -> Result<TlsClient, TlsError> {
    let http2 = protocol == UpstreamProtocol::H2;
    // hyper-rustls sets ALPN itself (`enable_http1` / `enable_http2`).
    let tls = client_config(&client_tls(key, settings), &[])?;
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let builder = match settings.server_name.as_deref().map(ServerName::try_from) {
        Some(Ok(name)) => {
            builder.with_server_name_resolver(FixedServerNameResolver::new(name.to_owned()))
        }
        _ => builder.with_server_name_resolver(hyper_rustls::DefaultServerNameResolver::default()),
    };
    let connector = if http2 {
        builder.enable_http2().wrap_connector(connector(config))
    } else {
        builder.enable_http1().wrap_connector(connector(config))
    };
    Ok(self::builder(config, http2).build(connector))
}
