//! What the `grpc` and `websocket` examples share with `hello`: the Consul flags, registration
//! with an HTTP check on `/health`, deregistration on Ctrl-C or SIGTERM, and the instance's
//! life around them ([`Registration::run`]). Included with
//! `#[path = "support/consul.rs"] mod consul;` (a folder without `main.rs` is no example).

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tokio::net::TcpListener;

/// How an example registers itself in Consul.
#[derive(Debug, Args)]
pub struct Registration {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Address to listen on and to register.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: String,
    /// Unique instance ID (default: <name>-<port>).
    #[arg(long)]
    pub id: Option<String>,
    /// Comma-separated tags.
    #[arg(long, default_value = "demo", value_delimiter = ',')]
    pub tags: Vec<String>,
    /// Consul HTTP address.
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500"
    )]
    pub consul: String,
    /// How often Consul checks /health.
    #[arg(long, default_value = "1s")]
    pub check_interval: String,
}

/// A registered instance; `deregister` removes it again.
pub struct Registered {
    http: reqwest::Client,
    consul: String,
    pub id: String,
}

impl Registration {
    /// Binds the address, serves with `serve(listener, id)` in a task of its own, registers
    /// `name` (after serving starts, so Consul's first check finds the instance up), then waits
    /// for Ctrl-C or SIGTERM and deregisters.
    pub async fn run<F, Fut>(&self, name: &str, serve: F) -> anyhow::Result<()>
    where
        F: FnOnce(TcpListener, String) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind((self.address.as_str(), self.port))
            .await
            .with_context(|| format!("binding {}:{}", self.address, self.port))?;
        let local = listener.local_addr()?;
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("{name}-{}", local.port()));
        let server = tokio::spawn(serve(listener, id));
        let registered = self.register(name, local).await?;
        println!("listening on {local} as {}", registered.id);
        wait_for_signal().await;
        registered.deregister().await;
        server.abort();
        Ok(())
    }

    /// Registers `name` at `local` (serve before calling this, so the first check finds it).
    pub async fn register(&self, name: &str, local: SocketAddr) -> anyhow::Result<Registered> {
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("{name}-{}", local.port()));
        let consul = if self.consul.contains("://") {
            self.consul.clone()
        } else {
            format!("http://{}", self.consul)
        };
        let registration = json!({
            "ID": id,
            "Name": name,
            "Address": local.ip().to_string(),
            "Port": local.port(),
            "Tags": self.tags,
            "Meta": {"version": env!("CARGO_PKG_VERSION")},
            "Check": {
                "HTTP": format!("http://{local}/health"),
                "Interval": self.check_interval,
                "Timeout": "1s",
                "DeregisterCriticalServiceAfter": "1m",
            },
        });
        switchyard::tls::install_default_provider(); // reqwest's rustls needs one
        let http = reqwest::Client::new();
        http.put(format!("{consul}/v1/agent/service/register"))
            .json(&registration)
            .send()
            .await
            .context("registering in Consul")?
            .error_for_status()
            .context("registering in Consul")?;
        Ok(Registered { http, consul, id })
    }
}

impl Registered {
    pub async fn deregister(self) {
        let id = &self.id;
        let deregistered = self
            .http
            .put(format!("{}/v1/agent/service/deregister/{id}", self.consul))
            .send()
            .await
            .and_then(|r| r.error_for_status());
        match deregistered {
            Ok(_) => eprintln!("{id}: deregistered"),
            Err(error) => eprintln!("{id}: deregistration failed: {error}"),
        }
    }
}

/// Returns on Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
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
