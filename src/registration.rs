//! Self-registration: optionally the gateway registers itself in Consul (the same pattern
//! the example services use), with an HTTP check on the admin listener's `/healthz`, and
//! deregisters on shutdown so clients that find it through Consul stop coming before it drains.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use crate::config::{ConsulConfig, RegisterConfig};

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("registering in Consul failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("registering in Consul failed: Consul answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("Consul client: {0}")]
    Client(#[from] crate::watcher::DiscoveryError),
}

/// A registration that can be undone.
pub struct Registration {
    http: reqwest::Client,
    agent: reqwest::Url,
    pub id: String,
}

/// The instance ID: configured, or `<name>-<port>-<host name>` so replicas on different hosts
/// and ports never collide.
fn instance_id(config: &RegisterConfig, listen: SocketAddr) -> String {
    if !config.id.is_empty() {
        return config.id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!("{}-{}-{host}", config.name, listen.port())
}

/// Registers the gateway listening on `listen` with a check on `admin`'s `/healthz`.
pub async fn register(
    consul: &ConsulConfig,
    config: &RegisterConfig,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<Registration, RegistrationError> {
    let http = crate::watcher::consul_client(consul)?
        .timeout(Duration::from_secs(10))
        .build()?;
    let id = instance_id(config, listen);
    let address = if !config.address.is_empty() {
        config.address.clone()
    } else if listen.ip().is_unspecified() {
        String::new() // Consul uses the agent's node address
    } else {
        listen.ip().to_string()
    };
    let check_host = if admin.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], admin.port()))
    } else {
        admin
    };
    let body = json!({
        "ID": id,
        "Name": config.name,
        "Address": address,
        "Port": listen.port(),
        "Tags": config.tags,
        "Meta": {"version": env!("CARGO_PKG_VERSION")},
        "Check": {
            "HTTP": format!("http://{check_host}/healthz"),
            "Interval": format!("{}s", config.check_interval.as_secs().max(1)),
            "Timeout": "2s",
            "DeregisterCriticalServiceAfter": format!("{}s", config.deregister_after.as_secs()),
        },
    });
    let agent = consul.addresses[0].clone();
    let mut url = agent.clone();
    url.set_path("/v1/agent/service/register");
    let response = http.put(url).json(&body).send().await?;
    if !response.status().is_success() {
        let status = response.status().as_u16();
        let body = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        return Err(RegistrationError::Status { status, body });
    }
    info!(id = %id, name = %config.name, "registered in Consul");
    Ok(Registration { http, agent, id })
}

impl Registration {
    /// Deregisters; failures are logged (Consul's check will remove it eventually).
    pub async fn deregister(self) {
        let mut url = self.agent.clone();
        url.set_path(&format!("/v1/agent/service/deregister/{}", self.id));
        match self.http.put(url).send().await {
            Ok(r) if r.status().is_success() => info!(id = %self.id, "deregistered from Consul"),
            Ok(r) => warn!(id = %self.id, status = %r.status(), "deregistration refused"),
            Err(error) => warn!(id = %self.id, %error, "deregistration failed"),
        }
    }
}

/// Registers (retrying with backoff while Consul is unreachable), then deregisters as soon as
/// `shutdown` is cancelled.
pub async fn maintain(
    consul: ConsulConfig,
    config: RegisterConfig,
    listen: SocketAddr,
    admin: SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut backoff =
        crate::watcher::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let registration = loop {
        match register(&consul, &config, listen, admin).await {
            Ok(registration) => break registration,
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(%error, retry_in = ?delay, "could not register in Consul");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    shutdown.cancelled().await;
    registration.deregister().await;
}
