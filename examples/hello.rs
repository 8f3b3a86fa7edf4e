//! The demo service of go-kit's Consul examples: serves `/hello` and `/health`, registers
//! itself on start and deregisters on Ctrl-C or SIGTERM. In Consul (the default): unique ID,
//! tags, an HTTP check on `/health`. With `--registry etcd` or `--registry zookeeper`, go-kit's
//! registrar layouts (examples/support/registry.rs): an etcd key `/services/<name>/<id>` on a
//! kept-alive lease, or a protected ephemeral sequential ZooKeeper node under
//! `/services/<name>`; the value is `host:port` in both.
//!
//! ```text
//! cargo run --example hello -- --port 0 --consul http://127.0.0.1:8500
//! cargo run --example hello -- --registry etcd --etcd http://127.0.0.1:2379
//! cargo run --example hello -- --registry zookeeper --zookeeper 127.0.0.1:2181
//! # a weighted pair: 3 of every 4 requests to the first (round robin honours Consul weights)
//! cargo run --example hello -- --weight 3 & cargo run --example hello -- --weight 1
//! ```
//! Its default tags include `urlprefix-/hello`, so a gateway with `tag_routes.enabled` routes
//! it without a `services[]` entry, as fabio would.
//! Prints `listening on <addr> as <id>` once registered.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::json;
use tokio::net::TcpListener;

#[path = "support/registry.rs"]
mod registry;

/// Where the instance registers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Registry {
    Consul,
    Etcd,
    Zookeeper,
}

#[derive(Debug, Parser)]
#[command(about = "A hello service that registers itself in Consul, etcd or ZooKeeper")]
struct Args {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to listen on and to register.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// Consul service name.
    #[arg(long, default_value = "hello")]
    name: String,
    /// Unique instance ID (default: <name>-<port>).
    #[arg(long)]
    id: Option<String>,
    /// Comma-separated tags.
    #[arg(long, default_value = "demo,urlprefix-/hello", value_delimiter = ',')]
    tags: Vec<String>,
    /// Consul `Weights.Passing`: this instance's share relative to the others.
    #[arg(long, default_value_t = 1)]
    weight: u32,
    /// Consul HTTP address.
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500"
    )]
    consul: String,
    /// How often Consul checks /health.
    #[arg(long, default_value = "1s")]
    check_interval: String,
    /// The registry to register in.
    #[arg(long, value_enum, default_value_t = Registry::Consul)]
    registry: Registry,
    /// etcd client URLs (comma-separated), for `--registry etcd`.
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// Seconds of the etcd lease (kept alive every third of it).
    #[arg(long, default_value_t = 5)]
    etcd_ttl: i64,
    /// ZooKeeper connect string, for `--registry zookeeper`.
    #[arg(long, env = "ZOOKEEPER_SERVERS", default_value = "127.0.0.1:2181")]
    zookeeper: String,
}

/// A registration in one of the registries, removed by `deregister`.
enum Registered {
    Consul(reqwest::Client, String),
    Etcd(Box<registry::EtcdRegistration>),
    Zookeeper(registry::ZookeeperRegistration),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind((args.address.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.address, args.port))?;
    let local = listener.local_addr()?;
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", args.name, local.port()));
    // Serve before registering so Consul's first check finds us up.
    let server = tokio::spawn(serve(listener, id.clone()));
    let registered = register(&args, &id, local).await?;
    println!("listening on {local} as {id}");

    wait_for_signal().await;
    match registered.deregister(&id).await {
        Ok(()) => eprintln!("{id}: deregistered"),
        Err(error) => eprintln!("{id}: deregistration failed: {error}"),
    }
    server.abort();
    Ok(())
}

/// Registers the instance at `local` as `id` in the chosen registry.
async fn register(args: &Args, id: &str, local: SocketAddr) -> anyhow::Result<Registered> {
    let address = local.to_string();
    match args.registry {
        Registry::Consul => register_consul(args, id, local).await,
        Registry::Etcd => Ok(Registered::Etcd(Box::new(
            registry::EtcdRegistration::register(
                &args.etcd,
                &args.name,
                id,
                &address,
                args.etcd_ttl,
            )
            .await?,
        ))),
        Registry::Zookeeper => Ok(Registered::Zookeeper(
            registry::ZookeeperRegistration::register(&args.zookeeper, &args.name, id, &address)
                .await?,
        )),
    }
}

async fn register_consul(args: &Args, id: &str, local: SocketAddr) -> anyhow::Result<Registered> {
    let consul = if args.consul.contains("://") {
        args.consul.clone()
    } else {
        format!("http://{}", args.consul)
    };
    switchyard::tls::install_default_provider(); // reqwest's rustls needs one
    let http = reqwest::Client::new();
    let registration = json!({
        "ID": id,
        "Name": args.name,
        "Address": local.ip().to_string(),
        "Port": local.port(),
        "Tags": args.tags,
        "Weights": {"Passing": args.weight, "Warning": 1},
        "Meta": {"version": env!("CARGO_PKG_VERSION")},
        "Check": {
            "HTTP": format!("http://{local}/health"),
            "Interval": args.check_interval,
            "Timeout": "1s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    });
    http.put(format!("{consul}/v1/agent/service/register"))
        .json(&registration)
        .send()
        .await
        .context("registering in Consul")?
        .error_for_status()
        .context("registering in Consul")?;
    Ok(Registered::Consul(http, consul))
}

impl Registered {
    async fn deregister(self, id: &str) -> anyhow::Result<()> {
        match self {
            Registered::Consul(http, consul) => {
                http.put(format!("{consul}/v1/agent/service/deregister/{id}"))
                    .send()
                    .await?
                    .error_for_status()?;
                Ok(())
            }
            Registered::Etcd(registration) => registration.deregister().await,
            Registered::Zookeeper(registration) => registration.deregister().await,
        }
    }
}

async fn serve(listener: TcpListener, id: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let id = id.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let id = id.clone();
                async move { Ok::<_, Infallible>(answer(&id, &request)) }
            });
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(id: &str, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match request.uri().path() {
        "/health" => (StatusCode::OK, "ok\n".to_owned()),
        path if path.starts_with("/hello") => (StatusCode::OK, format!("hello from {id}\n")),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = id.parse() {
        response.headers_mut().insert("x-instance", value);
    }
    response
}

async fn wait_for_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
