//! The demo service of go-kit's Consul examples: serves `/hello` and `/health`, registers
//! itself in Consul on start (unique ID, tags, an HTTP check on `/health`) and deregisters on
//! Ctrl-C or SIGTERM.
//!
//! ```text
//! cargo run --example hello -- --port 0 --consul http://127.0.0.1:8500
//! # a weighted pair: 3 of every 4 requests to the first (round robin honours Consul weights)
//! cargo run --example hello -- --weight 3 & cargo run --example hello -- --weight 1
//! ```
//! Its default tags include `urlprefix-/hello`, so a gateway with `tag_routes.enabled` routes
//! it without a `services[]` entry, as fabio would.
//! Prints `listening on <addr> as <id>` once registered.

use std::convert::Infallible;

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

#[derive(Debug, Parser)]
#[command(about = "A hello service that registers itself in Consul")]
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
    // Serve before registering so Consul's first check finds us up.
    let served_id = id.clone();
    let server = tokio::spawn(serve(listener, served_id));
    http.put(format!("{consul}/v1/agent/service/register"))
        .json(&registration)
        .send()
        .await
        .context("registering in Consul")?
        .error_for_status()
        .context("registering in Consul")?;
    println!("listening on {local} as {id}");

    wait_for_signal().await;
    let deregistered = http
        .put(format!("{consul}/v1/agent/service/deregister/{id}"))
        .send()
        .await
        .and_then(|r| r.error_for_status());
    match deregistered {
        Ok(_) => eprintln!("{id}: deregistered"),
        Err(error) => eprintln!("{id}: deregistration failed: {error}"),
    }
    server.abort();
    Ok(())
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
