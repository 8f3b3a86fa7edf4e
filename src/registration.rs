//! Self-registration: optionally the gateway registers itself in Consul (the same pattern
//! the example services use), with an HTTP check on the admin listener's `/healthz`, and
//! deregisters on shutdown so clients that find it through Consul stop coming before it drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use crate::config::RegisterConfig;
use crate::discovery::consul::{Backoff, ConsulClient, DiscoveryError};

#[derive(Debug, thiserror::Error)]
#[error("registering in Consul failed: {0}")]
pub struct RegistrationError(#[from] DiscoveryError);

/// A registration that can be undone.
pub struct Registration {
    client: Arc<ConsulClient>,
    /// The Consul agent that took the registration (the one to deregister from).
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

/// Registers the gateway listening on `listen` with a check on `admin`'s `/healthz`,
/// through the shared Consul client (so a dead first `consul.address` fails over to the next,
/// as the watches do).
pub async fn register(
    client: Arc<ConsulClient>,
    config: &RegisterConfig,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<Registration, RegistrationError> {
    let id = instance_id(config, listen);
    let body = registration_body(config, &id, listen, admin);
    let agent = client
        .put("/v1/agent/service/register", Some(&body))
        .await?;
    info!(id = %id, name = %config.name, %agent, "registered in Consul");
    Ok(Registration { client, agent, id })
}

/// The agent's service definition of the gateway.
fn registration_body(
    config: &RegisterConfig,
    id: &str,
    listen: SocketAddr,
    admin: SocketAddr,
) -> serde_json::Value {
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
    json!({
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
    })
}

impl Registration {
    /// Deregisters; failures are logged (Consul's check will remove it eventually).
    pub async fn deregister(self) {
        let path = format!("/v1/agent/service/deregister/{}", self.id);
        match self.client.put_at(&self.agent, &path, None).await {
            Ok(()) => info!(id = %self.id, "deregistered from Consul"),
            Err(error) => warn!(id = %self.id, %error, "deregistration failed"),
        }
    }
}

/// Registers (retrying with backoff while Consul is unreachable), then deregisters as soon as
/// `shutdown` is cancelled.
pub async fn maintain(
    client: Arc<ConsulClient>,
    config: RegisterConfig,
    listen: SocketAddr,
    admin: SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let registration = loop {
        match register(client.clone(), &config, listen, admin).await {
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
