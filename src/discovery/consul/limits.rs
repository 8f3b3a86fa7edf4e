//! The Consul agent's own limit on HTTP connections per client address, checked once against
//! `consul.max_connections`.
//!
//! An agent refuses (closes at once) a client address's connections beyond
//! `limits.http_max_conns_per_client` (200 by default). A gateway whose budget is larger would
//! see some of its watches fail and back off, so at startup it reads the agent's setting from
//! `GET /v1/agent/self` (`DebugConfig.HTTPMaxConnsPerClient`, present in Consul 1.8) and warns,
//! naming both settings, when the budget exceeds it. The check only informs: a failure to read
//! the setting (an ACL token without `agent:read`, an older agent) is logged and ignored.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::{debug, warn};

use super::{status_error, ConsulClient, DiscoveryError};

/// The check is one call to the agent; one that takes longer is cut.
const AGENT_SELF_TIMEOUT: Duration = Duration::from_secs(5);

/// The part of `/v1/agent/self` the check reads.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentSelf {
    #[serde(default)]
    debug_config: Option<DebugConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DebugConfig {
    #[serde(default, rename = "HTTPMaxConnsPerClient")]
    http_max_conns_per_client: Option<usize>,
}

/// Reads the agent's `HTTPMaxConnsPerClient` from the body of `/v1/agent/self`; `None` when
/// the agent does not report it.
pub fn parse_agent_limit(body: &[u8]) -> Result<Option<usize>, DiscoveryError> {
    let agent: AgentSelf = serde_json::from_slice(body).map_err(DiscoveryError::Decode)?;
    Ok(agent
        .debug_config
        .and_then(|config| config.http_max_conns_per_client))
}

/// Whether a budget of `max_connections` goes beyond the agent's `agent_limit` (0 means no
/// limit, as in Consul).
pub fn exceeds_agent_limit(max_connections: usize, agent_limit: usize) -> bool {
    agent_limit > 0 && max_connections > agent_limit
}

impl ConsulClient {
    /// The current agent's `limits.http_max_conns_per_client`, if it reports it.
    pub async fn agent_connection_limit(&self) -> Result<Option<usize>, DiscoveryError> {
        let server = self.current.load(Ordering::Relaxed) % self.bases.len();
        let mut url = self.bases[server].clone();
        url.set_path("/v1/agent/self");
        let (status, _, body) = tokio::time::timeout(AGENT_SELF_TIMEOUT, self.get_raw(url))
            .await
            .map_err(|_| DiscoveryError::Hung(AGENT_SELF_TIMEOUT))??;
        if !status.is_success() {
            return Err(status_error(status, &body));
        }
        parse_agent_limit(&body)
    }
}

/// Reads the agent's limit once and warns when `max_connections` exceeds it.
pub async fn check_agent_limit(client: Arc<ConsulClient>, max_connections: usize) {
    match client.agent_connection_limit().await {
        Ok(Some(limit)) if exceeds_agent_limit(max_connections, limit) => warn!(
            max_connections,
            http_max_conns_per_client = limit,
            "consul.max_connections exceeds the Consul agent's limits.http_max_conns_per_client: \
             the agent will refuse the connections beyond it; raise the agent's limit or lower \
             consul.max_connections"
        ),
        Ok(limit) => debug!(
            max_connections,
            http_max_conns_per_client = ?limit,
            "Consul agent's connection limit"
        ),
        Err(error) => debug!(%error, "could not read the Consul agent's connection limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_limit_from_debug_config() {
        let body = br#"{"Config": {"Version": "1.8.7"}, "DebugConfig": {"HTTPMaxConnsPerClient": 200, "RPCMaxConnsPerClient": 100}}"#;
        assert_eq!(parse_agent_limit(body).unwrap(), Some(200));
        assert_eq!(parse_agent_limit(br#"{"Config": {}}"#).unwrap(), None);
        assert!(parse_agent_limit(b"not json").is_err());
    }

    #[test]
    fn only_a_budget_above_a_set_limit_exceeds_it() {
        assert!(exceeds_agent_limit(1010, 200));
        assert!(!exceeds_agent_limit(200, 200));
        assert!(!exceeds_agent_limit(1010, 4096));
        assert!(!exceeds_agent_limit(1010, 0));
    }
}
