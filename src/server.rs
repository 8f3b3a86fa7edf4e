//! The accept loop shared by the gateway and admin listeners: serves HTTP/1.1 and h2c on each
//! connection, and on shutdown stops accepting at once, lets in-flight requests finish, and
//! cuts what is left when the grace period ends.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `listener` until `shutdown`, then drains for at most `grace`. At most
/// `max_connections` are served at once; further clients wait in the kernel's backlog.
///
/// `handler` answers each request; it gets the client's address and never fails (errors
/// become responses).
pub async fn serve<H, F, B>(
    name: &'static str,
    listener: TcpListener,
    builder: Builder<TokioExecutor>,
    handler: H,
    max_connections: usize,
    shutdown: CancellationToken,
    grace: Duration,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    // Cancelled when the grace period ends, to cut connections still open.
    let cut = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(listener = name, %error, "could not set TCP_NODELAY");
        }
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let response = handler(peer, request);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let cut = cut.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                result = connection => if let Err(error) = result {
                    debug!(listener = name, %peer, %error, "connection ended with an error");
                },
                _ = cut.cancelled() => debug!(listener = name, %peer, "connection cut at end of grace period"),
            }
        });
    }
    // Refuse new connections at once; finish what is in flight.
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        info!(listener = name, connections = open, ?grace, "draining");
    }
    tokio::select! {
        _ = graceful.shutdown() => debug!(listener = name, "drained"),
        _ = tokio::time::sleep(grace) => {
            warn!(listener = name, "grace period over; cutting remaining connections");
            cut.cancel();
        }
    }
}
