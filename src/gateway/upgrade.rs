//! HTTP/1.1 upgrades (WebSocket and any other `Upgrade` protocol): the request keeps
//! `Upgrade` and `Connection: upgrade` on its way to the instance; when the instance answers
//! 101, the client's and the instance's connections are spliced, bytes both ways, until
//! either side closes. Routing, balancing and outlier detection apply to the upgrade request
//! like to any other; nothing is retried after a 101, and a refusal (any other status) is
//! passed through as it is.
//!
//! Spliced connections are tracked: on shutdown they get the grace period, then are cut.

use std::time::Duration;

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Version};
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::h1::body::Upgraded;
use crate::upstream::InstanceSlot;

/// The instance's side of an upgrade: from the HTTP/1.1 client, or from hyper's (TLS, h2c).
pub enum InstanceSide {
    Own(Upgraded),
    Hyper(OnUpgrade),
}

/// The protocol a request asks to upgrade to: HTTP/1.1 with `Upgrade` and a `Connection`
/// that names `upgrade` (RFC 9110 §7.8).
pub fn requested_protocol<B>(request: &Request<B>) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let upgrade = request.headers().get(header::UPGRADE)?;
    let asks = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    asks.then(|| upgrade.clone())
}

/// Puts back what hop-by-hop removal took from an upgrade request.
pub fn restore_headers(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// The spliced connections of one gateway.
#[derive(Default)]
pub struct Upgrades {
    tracker: TaskTracker,
    /// Cancelled when the shutdown grace period ends.
    cut: CancellationToken,
}

impl Upgrades {
    /// Splices the client's and the instance's connections once both upgrades complete.
    /// `gauge` counts the service's spliced connections; `slot` holds the instance's
    /// connection budget for as long as the splice lasts.
    pub fn splice(
        &self,
        client: OnUpgrade,
        instance: InstanceSide,
        gauge: IntGauge,
        slot: Option<InstanceSlot>,
    ) {
        let cut = self.cut.clone();
        self.tracker.spawn(async move {
            let client = match client.await {
                Ok(client) => TokioIo::new(client),
                Err(error) => {
                    debug!(%error, "upgrade did not complete");
                    return;
                }
            };
            match instance {
                InstanceSide::Own(instance) => copy(client, instance, &gauge, cut).await,
                InstanceSide::Hyper(instance) => match instance.await {
                    Ok(instance) => copy(client, TokioIo::new(instance), &gauge, cut).await,
                    Err(error) => debug!(%error, "upgrade did not complete"),
                },
            }
            drop(slot);
        });
    }

    /// Spliced connections open now.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Lets spliced connections run for up to `grace`, then cuts them; returns when all are
    /// closed.
    pub async fn drain(&self, grace: Duration) {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            self.cut.cancel();
            self.tracker.wait().await;
        }
    }
}

/// Copies both ways until either side closes or the grace period ends.
async fn copy(
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    mut instance: impl AsyncRead + AsyncWrite + Unpin,
    gauge: &IntGauge,
    cut: CancellationToken,
) {
    gauge.inc();
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut instance) => {
            if let Err(error) = copied {
                debug!(%error, "upgraded connection ended with an error");
            }
        }
        _ = cut.cancelled() => debug!("upgraded connection cut at end of grace period"),
    }
    gauge.dec();
}
